"""benchmarks/preprocess.py --megatron-deepspeed DIR: a wrong DIR or a missing module is one error
line before any work, and the timing, id comparison and report run against a stand-in checkout.

The real Megatron-DeepSpeed is not here in CI, so DIR is a folder whose tools/preprocess_data.py
(written by the test) takes their script's flags and writes the MMIDIDX pair with our writer.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.megatron_deepspeed import compare
from megatron_bloom.data.indexed_dataset import MMapIndexedDatasetBuilder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Their flags, their output name (PREFIX_text_document), our tokenizer and writer; main() only
# under __main__, as theirs, so the benchmark's import check does not run it.
FAKE_SCRIPT = """
import argparse, json, sys
sys.path.insert(0, {repo!r})
from megatron_bloom.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron_bloom.data.tokenizer import load_tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", choices=["PretrainedFromHF"], required=True)
    p.add_argument("--tokenizer-name-or-path", required=True)
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, required=True)
    args = p.parse_args()
    tok = load_tokenizer(args.tokenizer_name_or_path)
    out = MMapIndexedDatasetBuilder(args.output_prefix + "_text_document.bin", dtype="uint16")
    with open(args.input, encoding="utf-8") as f:
        for line in f:
            out.add_item(tok.encode(json.loads(line)["text"]) + ([tok.eod_id] if args.append_eod else []))
            out.end_document()
    out.finalize(args.output_prefix + "_text_document.idx")


if __name__ == "__main__":
    main()
"""


def bench(*argv):
    return subprocess.run([sys.executable, "benchmarks/preprocess.py", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def checkout(tmp_path, script):
    tools = tmp_path / "mds" / "tools"
    tools.mkdir(parents=True)
    (tools / "preprocess_data.py").write_text(script)
    return str(tmp_path / "mds")


def test_a_folder_without_their_script_is_one_error_line_before_any_work(tmp_path):
    work = tmp_path / "work"
    p = bench("--megatron-deepspeed", str(tmp_path), "--work-dir", str(work), "--size-mb", "0.1")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"error: --megatron-deepspeed {tmp_path}: {tmp_path}/tools/preprocess_data.py not found; pass a checkout of "
        "bigscience-workshop/Megatron-DeepSpeed (git clone https://github.com/bigscience-workshop/Megatron-DeepSpeed)"]
    assert not work.exists()


@pytest.mark.parametrize("script", [
    "import no_such_module_xyz\n",
    # Theirs guards `import nltk` and then subclasses nltk's class at module level.
    "try:\n    import no_such_module_xyz\nexcept ImportError:\n    pass\nclass C(no_such_module_xyz.Base):\n    pass\n",
])
def test_a_missing_module_is_one_error_line_naming_it_before_the_corpus(tmp_path, script):
    work = tmp_path / "work"
    p = bench("--megatron-deepspeed", checkout(tmp_path, script), "--work-dir", str(work), "--size-mb", "0.1")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: Megatron-DeepSpeed's tools/preprocess_data.py needs the module 'no_such_module_xyz'")
    assert p.stderr.rstrip().endswith("-m pip install no_such_module_xyz")
    assert not (work / "corpus.jsonl").exists()


def test_their_rows_run_line_and_id_check_are_reported(tmp_path):  # ~10 s
    mds = checkout(tmp_path, FAKE_SCRIPT.format(repo=REPO))
    p = bench("--megatron-deepspeed", mds, "--size-mb", "0.1", "--train-sample-mb", "0.1", "--workers", "1",
              "--array-tasks", "0", "--json")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    ours, theirs = res["runs"][0], res["megatron_deepspeed"]["runs"][0]
    assert theirs["ids"] == {"documents": [ours["documents"]] * 2, "tokens": [ours["tokens"]] * 2,
                             "dtypes": ["uint16", "uint16"], "match": True,
                             "explanation": f"same token ids: {ours['documents']:,} documents, {ours['tokens']:,} tokens"}
    assert theirs["tokens_per_s"] == pytest.approx(theirs["tokens"] / theirs["wall_s"])
    assert theirs["mb_per_s"] == pytest.approx(res["corpus_mb"] / theirs["wall_s"])
    assert res["megatron_deepspeed"]["dir"] == mds and res["megatron_deepspeed"]["commit"] is None
    command = res["megatron_deepspeed"]["run"]["command"]
    assert command.startswith("tools/preprocess_data.py --input ") and command.endswith(" --append-eod --workers 1")
    assert f"\n`{command}`\n" in p.stdout  # their run line, under ours
    assert "| Megatron-DeepSpeed | 1 |" in p.stdout and "| megatron_bloom | 1 |" in p.stdout
    assert "token ids, 1 worker(s): match: same token ids" in p.stdout


def write(path, docs, dtype="uint16"):
    out = MMapIndexedDatasetBuilder(f"{path}.bin", dtype=dtype)
    for doc in docs:
        out.add_item(np.array(doc))
        out.end_document()
    out.finalize(f"{path}.idx")
    return str(path)


EOD = 2
OURS = [[5, 6, 7, EOD], [8, EOD], [9, 10, EOD]]


@pytest.mark.parametrize("theirs, dtype, expected", [
    (OURS, "int32", "same token ids: 3 documents, 9 tokens"),  # ids compared as values, not bytes
    ([d[:-1] for d in OURS], "uint16", "EOD handling: ours ends every document with one more token than theirs, an EOD "
                                       "(id 2) (the same ids otherwise); their script appends it only with --append-eod"),
    ([[5, 6, 7, EOD], [9, 10, EOD]], "uint16", None),
    ([[5, 6, 7, EOD], [8, 4, EOD], [9, 10, EOD]], "uint16", "first difference in sequence 1 at token 1: ours [2], "
                                                            "theirs [4, 2] (lengths 2 and 3); the two tokenizers split this text differently"),
    ([[5, 6, 7, EOD], [8, EOD], [9, 11, EOD]], "uint16", "first difference in sequence 2 at token 1: ours [10, 2], "
                                                         "theirs [11, 2] (lengths 3 and 3); the two tokenizers split this text differently"),
])
def test_compare_names_why_outputs_differ(tmp_path, theirs, dtype, expected):
    ours = write(tmp_path / "ours", OURS)
    found = compare(ours, write(tmp_path / "theirs", theirs, dtype), EOD)
    assert found["match"] == (theirs == OURS)
    if expected is None:  # theirs lacks the document ours kept as a lone EOD; the rest is the same
        ours = write(tmp_path / "ours_empty", [OURS[0], [EOD], OURS[2]])
        found = compare(ours, write(tmp_path / "theirs", theirs, dtype), EOD)
        expected = ("empty documents: ours keeps 1 document(s) without text tokens (first: sequence 1), "
                    "their script drops them; every other document has the same ids")
    assert found["explanation"] == expected
