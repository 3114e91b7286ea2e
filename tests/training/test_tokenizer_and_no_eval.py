"""Every save carries the run's tokenizer, however the run started, so that an exported folder loads
in transformers; and --eval-iters 0 means no evaluation, in pretraining and finetuning alike.

Three 1-process runs of 2 steps on the session corpus (~1 min with the exports):

* pretraining with --tokenizer-name-or-path, a --valid-weighted-split-paths group, --eval-iters 0
  and --eval-interval 1 (no evaluation in the loop nor at the end);
* finetuning from the transformers export of that run (no tokenizer flag: the folder's own), with
  a --split validation part, --eval-iters 0 and --eval-interval 1 (the same);
* finetuning from the native pretraining checkpoint (its ``tokenizer/``), with --eval-interval
  past the run: one evaluation, at the end, as Megatron-DeepSpeed runs it.

Each checkpoint folder is exported with ``convert_checkpoint.py native-to-hf`` and loaded with
``AutoTokenizer`` and ``AutoModelForCausalLM``.
"""
import json
import os

import pytest

from finetune_helpers import launch, run_tool
from pretrain_run import pretrain

pytestmark = pytest.mark.slow

ITERS = ["--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2", "--log-interval", "1"]


def ok(p) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def export_and_load(ckpt, out, tokenizer_src):
    """native-to-hf without --tokenizer; the folder loads in transformers with the run's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not out.exists():
        run_tool("launch/convert_checkpoint.py", "native-to-hf", "--load", str(ckpt), "--out", str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    text = "one two three, quatre cinq"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == AutoTokenizer.from_pretrained(tokenizer_src)(text).input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_runs")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"inputs": f"Copy: {w} =", "targets": w}) + "\n"
                             for w in ("one", "two", "three", "four", "five", "six", "seven", "eight") * 5))
    run_tool("data_tools/preprocess_xp3.py", "--input", str(pairs), "--output-prefix", str(root / "xp3"),
             "--tokenizer-name-or-path", corpus["tokenizer"])
    data = corpus["data_path"]
    pre = ok(pretrain(1, *ITERS, "--train-weighted-split-paths", f"train: 1 0:0.9 {data}",
                      "--valid-weighted-split-paths", f"valid: 1 0.9:1 {data}", "--eval-iters", "0",
                      "--eval-interval", "1", "--tokenizer-name-or-path", corpus["tokenizer"],
                      "--lr-warmup-iters", "0", "--save", str(root / "pre"), "--save-interval", "1"))
    run_tool("launch/convert_checkpoint.py", "native-to-hf", "--load", str(root / "pre"), "--out", str(root / "pre_hf"))
    finetune = [*ITERS, "--data-path", str(root / "xp3"), "--seq-length", "32"]
    from_hf = ok(launch("finetune.py", 1, [*finetune, "--pretrained", str(root / "pre_hf"), "--split", "80,20,0",
                                           "--eval-iters", "0", "--eval-interval", "1", "--save", str(root / "ft_hf")]))
    from_native = ok(launch("finetune.py", 1, [*finetune, "--pretrained", str(root / "pre"), "--split", "80,20,0",
                                               "--eval-iters", "1", "--eval-interval", "100",
                                               "--save", str(root / "ft_native")]))
    return {"root": root, "pre": pre, "from_hf": from_hf, "from_native": from_native, "tok": corpus["tokenizer"]}


def validation_lines(out: str):
    return [line for line in out.splitlines() if line.startswith(" validation loss at iteration")]


def test_eval_iters_0_means_no_evaluation(runs):
    for name in ("pre", "from_hf"):
        assert validation_lines(runs[name]) == [], name
        assert "training done at iteration 2" in runs[name], name


def test_eval_interval_past_the_run_evaluates_once_at_the_end(runs):
    assert len(validation_lines(runs["from_native"])) == 1, runs["from_native"][-3000:]


@pytest.mark.parametrize("run", ["pre", "ft_hf", "ft_native"])
def test_every_start_mode_saves_the_tokenizer_and_exports_a_loadable_folder(runs, run, tmp_path):
    ckpt = runs["root"] / run
    from megatron_bloom.checkpoint.files import tokenizer_files

    assert sorted(os.listdir(ckpt / "tokenizer")) == tokenizer_files(runs["tok"])
    # The pretraining run was exported (without --tokenizer) to start the finetune from it.
    export_and_load(ckpt, runs["root"] / "pre_hf" if run == "pre" else tmp_path / "hf", runs["tok"])


def test_the_tokenizer_is_copied_once(runs):
    # --save-interval 1 and 2 steps: two saves, the tokenizer written by the first only (before
    # that save completed), not again by the second.
    pre = runs["root"] / "pre"
    assert runs["pre"].count("tokenizer files of") == 1
    assert (pre / "global_step2" / "complete").exists()
    written = os.stat(pre / "tokenizer" / "tokenizer.json").st_mtime_ns
    assert written <= os.stat(pre / "global_step1" / "complete").st_mtime_ns


def test_tokenizer_files_are_written_once_and_only_from_a_tokenizer_folder(corpus, tmp_path):
    from megatron_bloom.checkpoint.files import first_tokenizer_folder, save_tokenizer_files

    tok = corpus["tokenizer"]
    assert save_tokenizer_files(tok, str(tmp_path)) is True
    inode = os.stat(tmp_path / "tokenizer" / "tokenizer.json").st_ino
    assert save_tokenizer_files(tok, str(tmp_path)) is False  # identical: nothing rewritten
    assert os.stat(tmp_path / "tokenizer" / "tokenizer.json").st_ino == inode
    # No local tokenizer (none given, a Hub name, a checkpoint without tokenizer/): none is saved.
    assert first_tokenizer_folder([None, "bigscience/bloom", str(tmp_path / "nowhere"), str(tmp_path)]) is None
    assert first_tokenizer_folder([None, str(tmp_path / "tokenizer"), tok]) == str(tmp_path / "tokenizer")
