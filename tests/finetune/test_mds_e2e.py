"""launch/finetune.py on Megatron-DeepSpeed's two-file xP3 pairs listed in bigscience-style mixture files.

A tiny tokenizer and two languages of copy tasks -> data_tools/preprocess_xp3.py --output-format
megatron-deepspeed (PREFIX_<lang>_{inputs,targets}_document.{bin,idx} + a quoted train mixture) ->
a validation mixture file written here byte for byte as bigscience's (one line, one quoted group
per language) -> a 4-step finetune of a randomly initialised 2-layer model that trains and
validates every group. One process, ~10 s.
"""
import json
import os
import random
import subprocess
import sys

import pytest

from finetune_helpers import REPO, env, run_tool

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "384",
         "--seq-length", "32", "--hidden-dropout", "0", "--attention-dropout", "0"]

def finetune(tmp, args):
    cmd = [sys.executable, os.path.join(REPO, "launch", "finetune.py"), *args]
    e = dict(env(), PYTHONPATH=REPO + os.pathsep + env().get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mds")
    rng = random.Random(0)
    words = {"en": "one two three four five six seven eight nine ten".split(),
             "fr": "un deux trois quatre cinq six sept huit neuf dix".split()}
    texts = []
    for lang, ws in words.items():
        (d / "in" / lang).mkdir(parents=True)
        with open(d / "in" / lang / "copy.jsonl", "w", encoding="utf-8") as fh:
            for _ in range(80):
                item = " ".join(rng.choice(ws) for _ in range(rng.randint(1, 4)))
                fh.write(json.dumps({"inputs": f"Copy: {item} =", "targets": item}) + "\n")
                texts.append(json.dumps({"text": f"Copy: {item} = {item}"}) + "\n")
    (d / "tok.jsonl").write_text("".join(texts))
    run_tool("data_tools/train_tokenizer.py", "--input", str(d / "tok.jsonl"), "--vocab-size", "300", "--output-dir", str(d / "tok"))
    run_tool("data_tools/preprocess_xp3.py", "--input", str(d / "in"), "--output-prefix", str(d / "xp3" / "xp3"),
             "--tokenizer-name-or-path", str(d / "tok"), "--prepend-space", "--split-by", "language",
             "--output-format", "megatron-deepspeed", "--mixture-range", "0:0.9")
    x = d / "xp3" / "xp3"
    (d / "valid.txt").write_bytes(f'"validation_en: 1 0.9:1 {x}_en" "validation_fr: 1 0.9:1 {x}_fr"\n'.encode())
    return d


def args_for(d, run, train_mixture):
    return [*MODEL, "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3",
            "--seed", "3", "--train-weighted-split-paths-path", str(train_mixture),
            "--valid-weighted-split-paths-path", str(d / "valid.txt"), "--log-interval", "1", "--eval-interval", "2",
            "--eval-iters", "1", "--save", str(run), "--tokenizer-name-or-path", str(d / "tok")]


def test_finetune_trains_and_validates_on_two_file_pairs(data, tmp_path):
    d = data
    assert (d / "xp3" / "xp3_en_inputs_document.idx").exists() and not (d / "xp3" / "xp3_en.idx").exists()
    assert (d / "xp3" / "xp3.mixture.txt").read_text().startswith('"train: 0.5 0:0.9 ')
    p = finetune(tmp_path, args_for(d, tmp_path / "run", d / "xp3" / "xp3.mixture.txt"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    # DecoderPackedMTFDataset packing (rows of seq_length + 1 tokens) for every dataset of every group.
    for label in ("train/train/xp3_en[0:72]", "train/train/xp3_fr[0:72]", "valid/validation_en/xp3_en[72:80]",
                  "valid/validation_fr/xp3_fr[72:80]"):
        assert f"packing {label}:" in out and "rows of 33 tokens" in out, label
    losses = [float(line.split("lm loss:")[1].split("|")[0]) for line in out.splitlines() if " iteration " in line
              and "lm loss:" in line]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    for group in ("validation_en", "validation_fr"):
        vals = [line for line in out.splitlines() if f"| {group} lm loss value:" in line]
        assert len(vals) == 2, group  # evaluated at steps 2 and 4
    assert (tmp_path / "run" / "global_step4").is_dir()


def test_finetune_names_missing_pair_files_in_one_error_line(data, tmp_path):
    d = data
    bad = tmp_path / "bad.txt"
    bad.write_bytes(f'"train: 1 0:1 {d / "xp3" / "xp3_de"}"\n'.encode())
    p = finetune(tmp_path, args_for(d, tmp_path / "run", bad))
    last = [line for line in p.stderr.splitlines() if line.strip()][-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert last.startswith("error: ") and "xp3_de_inputs_document.bin" in last and "--output-format megatron-deepspeed" in last
    assert not (tmp_path / "run").exists()
