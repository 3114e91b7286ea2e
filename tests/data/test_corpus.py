"""data_tools/corpus.py without SLURM: slicing, atomic shards, skip on rerun, the merge check,
ratios, and split files byte for byte as bigscience's load_ratios_meg_ds_format.py writes them."""
import json
import os
import subprocess
import sys

import pytest

from data_tools import corpus
from data_tools.language_weights import alpha_weights
from megatron_bloom.data.blends import parse_weighted_split_paths
from megatron_bloom.data.xp3 import read_weighted_split_paths_file
from megatron_bloom.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = {"en": "one two three four five six", "fr": "un deux trois quatre cinq six", "ru": "один два три четыре пять"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3 languages x 3 small jsonl files and a 300-token BPE trained on them."""
    d = tmp_path_factory.mktemp("corpus")
    texts = []
    for lang, words in WORDS.items():
        w = words.split()
        (d / "raw" / lang / "sub").mkdir(parents=True)
        for i in range(3):
            docs = [" ".join(w[(i + j + k) % len(w)] for k in range(5 + 3 * j)) for j in range(6)]
            texts += docs
            # One file in a subfolder: folders are walked, and the order is the sorted path.
            path = d / "raw" / lang / ("sub" if i == 2 else "") / f"f{i}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (d / "tok.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    p = subprocess.run([sys.executable, "data_tools/train_tokenizer.py", "--input", str(d / "tok.jsonl"),
                        "--vocab-size", "300", "--output-dir", str(d / "tok")], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return d


def plan_for(raw, out, files_per_task=2):
    inputs = [f"{lang}={raw / 'raw' / lang}" for lang in WORDS]
    return corpus.write_plan(inputs, str(out), str(raw / "tok"), files_per_task)


def test_slices_are_fixed_runs_of_one_language(raw, tmp_path):
    plan = plan_for(raw, tmp_path)
    got = [(t["lang"], t["index"], [os.path.relpath(f, raw / "raw") for f in t["files"]]) for t in plan["tasks"]]
    assert got == [("en", 0, ["en/f0.jsonl", "en/f1.jsonl"]), ("en", 1, ["en/sub/f2.jsonl"]),
                   ("fr", 0, ["fr/f0.jsonl", "fr/f1.jsonl"]), ("fr", 1, ["fr/sub/f2.jsonl"]),
                   ("ru", 0, ["ru/f0.jsonl", "ru/f1.jsonl"]), ("ru", 1, ["ru/sub/f2.jsonl"])]
    assert json.loads((tmp_path / "plan.json").read_text())["tasks"] == plan["tasks"]
    assert [len(t["files"]) for t in corpus.make_tasks({"a": list("abcdefg")}, 3)] == [3, 3, 1]


@pytest.mark.parametrize("item, message", [
    ("en", "is not LANG=PATH"),
    ("en=does/not/exist", "no such file or folder"),
    ("e n=x", "language 'e n'"),
])
def test_bad_inputs_are_refused_before_any_work(item, message, tmp_path):
    with pytest.raises(UserError, match=message):
        corpus.parse_inputs([item])


def test_a_folder_without_input_files_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("nope")
    with pytest.raises(UserError, match="no .jsonl"):
        corpus.parse_inputs([f"en={tmp_path}"])


def _shard_files(out, lang="en", index=0):
    prefix = corpus.shard_prefix(str(out), lang, index)
    return {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}


def test_killed_shard_leaves_nothing_final_and_its_rerun_writes_the_same_bytes(raw, tmp_path):
    plan_for(raw, tmp_path / "whole")
    corpus.shard(corpus.read_plan(str(tmp_path / "whole" / "plan.json")), 0)
    plan_for(raw, tmp_path / "killed")
    p = subprocess.run([sys.executable, "data_tools/corpus.py", "shard", "--plan", str(tmp_path / "killed" / "plan.json"),
                        "--task", "0", "--workers", "1"], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, **{corpus.KILL_HOOK: "0", "SLURM_RESTART_COUNT": "0"}))
    assert p.returncode == -9, p.stderr  # SIGKILL after the first of its two files
    prefix = corpus.shard_prefix(str(tmp_path / "killed"), "en", 0)
    assert os.path.isdir(prefix + ".parts")  # the first file's part was written ...
    for ext in (".bin", ".idx", ".done.json"):
        assert not os.path.exists(prefix + ext), ext  # ... but nothing that looks finished
    r = corpus.shard(corpus.read_plan(str(tmp_path / "killed" / "plan.json")), 0)
    assert not r["skipped"] and r["documents"] == 12
    assert _shard_files(tmp_path / "killed") == _shard_files(tmp_path / "whole")
    assert not os.path.exists(prefix + ".parts")


def test_a_complete_shard_is_skipped_and_one_without_its_record_is_redone(raw, tmp_path):
    plan = plan_for(raw, tmp_path)
    first = corpus.shard(plan, 2)
    prefix = corpus.shard_prefix(str(tmp_path), "fr", 0)
    stamp = os.stat(prefix + ".bin").st_mtime_ns
    again = corpus.shard(plan, 2)
    assert again["skipped"] and again["tokens"] == first["tokens"]
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp
    os.remove(corpus.done_path(prefix))  # a shard renamed into place, killed before its record
    with open(prefix + ".bin", "ab") as fh:
        fh.write(b"junk")
    redone = corpus.shard(plan, 2)
    assert not redone["skipped"] and redone["tokens"] == first["tokens"]
    assert os.path.getsize(prefix + ".bin") == first["tokens"] * 2  # uint16 tokens, the junk gone


def test_a_changed_input_is_refused(raw, tmp_path):
    plan = plan_for(raw, tmp_path)
    plan["tasks"][1]["sizes"][0] += 1
    with pytest.raises(UserError, match="changed size since the plan"):
        corpus.shard(plan, 1)
    with pytest.raises(UserError, match="the plan has tasks 0..5"):
        corpus.shard(plan, 6)


def test_merge_sums_the_shards_and_refuses_a_mismatch_in_one_error_line(raw, tmp_path):
    plan = plan_for(raw, tmp_path)
    with pytest.raises(UserError, match=r"en: shard tasks 0, 1 have not completed"):
        corpus.merge_language(plan, "en")
    for task in range(len(plan["tasks"])):
        corpus.shard(plan, task)
    shards = [corpus.done_path(corpus.shard_prefix(str(tmp_path), "en", i)) for i in (0, 1)]
    records = [json.loads(open(s).read()) for s in shards]
    merged = corpus.merge_language(plan, "en")
    assert merged["documents"] == 18 == sum(r["documents"] for r in records)
    assert merged["tokens"] == sum(r["tokens"] for r in records)
    # A shard replaced after its task ended: its record no longer matches what merge reads.
    records[1]["tokens"] += 1
    with open(shards[1], "w") as fh:
        json.dump(records[1], fh)
    p = subprocess.run([sys.executable, "data_tools/corpus.py", "merge", "--plan", str(tmp_path / "plan.json")],
                       capture_output=True, text=True, cwd=REPO)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("error: en: merged ") and "shard records sum to" in lines[-1], p.stderr
    assert sum(line.startswith("error:") for line in lines) == 1


def test_ratios_from_token_counts_or_given():
    prefixes = ["o/merged/en/en_text_document", "o/merged/fr/fr_text_document"]
    r = corpus.ratios_list(prefixes, [900, 100], alpha=0.3, langs=["en", "fr"])
    assert [x["dataset_path"] for x in r] == prefixes
    assert [x["ratio"] for x in r] == alpha_weights([900, 100], 0.3).tolist()
    assert r[1]["ratio"] > 0.1  # flattened: fr is seen more than its 10% share
    assert [x["ratio"] for x in corpus.ratios_list(prefixes, [9, 1], given={"en": 0.7, "fr": 0.3},
                                                   langs=["en", "fr"])] == [0.7, 0.3]
    with pytest.raises(UserError, match="no ratio for fr; give one LANG=R per language"):
        corpus.ratios_list(prefixes, [9, 1], given={"en": 0.7}, langs=["en", "fr"])


# What data/catalogue/load_ratios_meg_ds_format.py writes for this ratios JSON (worked out by hand
# from their script: f"{ratio} {range} {path}" joined by ", " inside '"SPLIT: ...', ranges 0:0.950
# and 0.950:1.0, and for valid one '"valid_<parent folder>: 1 0.950:1.0 <path>"' per dataset).
RATIOS_JSON = """[
  {"dataset_path": "data/merged/en/en_text_document", "ratio": 0.0330676168743166},
  {"dataset_path": "data/merged/fr/fr_text_document", "ratio": 0.3},
  {"dataset_path": "data/merged/code/code_text_document", "ratio": 1}
]"""
TRAIN_TEXT = ('"train: 0.0330676168743166 0:0.950 data/merged/en/en_text_document, '
              '0.3 0:0.950 data/merged/fr/fr_text_document, 1 0:0.950 data/merged/code/code_text_document"\n')
VALID_TEXT = ('"valid: 0.0330676168743166 0.950:1.0 data/merged/en/en_text_document, '
              '0.3 0.950:1.0 data/merged/fr/fr_text_document, 1 0.950:1.0 data/merged/code/code_text_document" '
              '"valid_en: 1 0.950:1.0 data/merged/en/en_text_document" '
              '"valid_fr: 1 0.950:1.0 data/merged/fr/fr_text_document" '
              '"valid_code: 1 0.950:1.0 data/merged/code/code_text_document"\n')


def test_split_files_are_bigscience_bytes_and_the_trainer_reads_them(tmp_path):
    (tmp_path / "ratios.json").write_text(RATIOS_JSON)
    p = subprocess.run([sys.executable, "data_tools/corpus.py", "splits", "--ratios", str(tmp_path / "ratios.json"),
                        "--train-output", str(tmp_path / "train.txt"), "--valid-output", str(tmp_path / "valid.txt")],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "train.txt").read_bytes() == TRAIN_TEXT.encode()
    assert (tmp_path / "valid.txt").read_bytes() == VALID_TEXT.encode()
    train = parse_weighted_split_paths(read_weighted_split_paths_file(str(tmp_path / "train.txt"), "--train-weighted-split-paths-path"),
                                       "--train-weighted-split-paths")
    valid = parse_weighted_split_paths(read_weighted_split_paths_file(str(tmp_path / "valid.txt"), "--valid-weighted-split-paths-path"))
    assert [g.name for g in train] == ["train"] and [g.name for g in valid] == ["valid", "valid_en", "valid_fr", "valid_code"]
    assert [(e.weight, e.start, e.end) for e in valid[0].entries] == [(0.0330676168743166, 0.95, 1.0), (0.3, 0.95, 1.0), (1.0, 0.95, 1.0)]


@pytest.mark.parametrize("paths, message", [
    (["en_text_document"], "has no parent folder"),
    (["a/en/x", "b/en/y"], "share the folder 'en'"),
    (["a/en/x y"], "whitespace, a comma or a quote"),
])
def test_split_files_refuse_what_would_misname_or_misparse(paths, message):
    with pytest.raises(UserError, match=message):
        corpus.split_files_text([{"dataset_path": p, "ratio": 0.5} for p in paths])
