"""bigscience's published flag lists, run through launch/pretrain.py and launch/finetune.py on CPU.

Each list in tests/recipes/published/ is used as the script passed it; only sizes (model, batch,
schedule, intervals), paths and the backend (gloo) are swapped, and its DeepSpeed JSON is written
with the same swapped batch sizes. The data files are laid out as bigscience's were: one Megatron
dataset per language under ``<lang>/``, train and valid split files written as
``data/catalogue/load_ratios_meg_ds_format.py`` writes them (one line of quoted groups), and
xP3 pairs as Megatron-DeepSpeed's ``PREFIX_inputs_document`` / ``PREFIX_targets_document``.

- BLOOM-176B (tr11-176B-ml): TP=2 x PP=2, bf16 at ZeRO stage 0, batch-size ramp-up, four
  validation groups from the one-line file.
- BLOOMZ-7b1 (tr13f-6b3-mtf): DP=2 with its fp16 JSON (initial scale 2^12, window 500), started
  from the BLOOM run's checkpoint with --no-load-optim, as BLOOMZ started from BLOOM's.
"""
import json
import os
import random
import re
import shlex
import subprocess
import sys

import pytest
import torch

from megatron_bloom.distributed import free_port
from megatron_bloom.testing.multiprocess import launcher_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PUBLISHED = os.path.join(REPO, "tests", "recipes", "published")
LANGUAGES = {"en": "one two three four five six seven eight nine ten",
             "fr": "un deux trois quatre cinq six sept huit neuf dix",
             "es": "uno dos tres cuatro cinco seis siete ocho nueve diez"}

pytestmark = pytest.mark.slow


def env() -> dict:
    return launcher_env(REPO)


def tool(*args: str) -> None:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def published(name: str, paths: dict, swapped: dict) -> list:
    """The flag list of ``name`` with ``$VARIABLES`` replaced by ``paths`` and the values of the flags in
    ``swapped`` replaced (each must be in the list: nothing is added or dropped)."""
    argv = []
    with open(os.path.join(PUBLISHED, name + ".args")) as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            words = shlex.split(line)
            for key, value in paths.items():
                words = [w.replace("$" + key, value) for w in words]
            if words[0] in swapped:
                words = [words[0], *swapped.pop(words[0])]
            argv += words
    assert not swapped, f"not in {name}.args: {sorted(swapped)}"
    return argv


def deepspeed_json(name: str, out: str, micro: int, global_: int) -> str:
    """The script's DeepSpeed JSON with the swapped batch sizes."""
    with open(os.path.join(PUBLISHED, name + ".ds_config.json")) as fh:
        values = json.load(fh)
    values["train_micro_batch_size_per_gpu"], values["train_batch_size"] = micro, global_
    with open(out, "w") as fh:
        json.dump(values, fh, indent=2)
    return out


def ratio_files(ratios: list, train: str, valid: str) -> None:
    """Split files as bigscience's load_ratios_meg_ds_format.py writes them from a ratios JSON."""
    groups = [f"{r['ratio']} {{}} {r['dataset_path']}" for r in ratios]
    with open(train, "w") as fh:
        fh.write('"train: ' + ", ".join(g.format("0:0.950") for g in groups) + '"\n')
    extra = [f'"valid_{r["dataset_path"].split("/")[-2]}: 1 0.950:1.0 {r["dataset_path"]}"' for r in ratios]
    with open(valid, "w") as fh:
        fh.write('"valid: ' + ", ".join(g.format("0.950:1.0") for g in groups) + '" ' + " ".join(extra) + "\n")


def torchrun(script: str, nproc: int, argv: list, timeout: float = 900) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), os.path.join(REPO, "launch", script), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer, one Megatron dataset per language, bigscience's split files, and xP3 pairs."""
    d = tmp_path_factory.mktemp("published")
    rng = random.Random(0)
    texts = []
    ratios = []
    for lang, words in LANGUAGES.items():
        words = words.split()
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(120)]
        texts += docs
        (d / "raw").mkdir(exist_ok=True)
        (d / "raw" / f"{lang}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        (d / "xp3" / lang).mkdir(parents=True)
        with open(d / "xp3" / lang / "copy.jsonl", "w") as fh:
            for _ in range(120):
                item = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
                fh.write(json.dumps({"inputs": f"Copy: {item} =", "targets": item}) + "\n")
                texts.append(f"Copy: {item} = {item}")
    (d / "tok.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tool("data_tools/train_tokenizer.py", "--input", str(d / "tok.jsonl"), "--vocab-size", "300",
         "--output-dir", str(d / "tok"))
    for i, lang in enumerate(LANGUAGES):
        (d / "merged" / lang).mkdir(parents=True)
        prefix = d / "merged" / lang / f"roots_{lang}"
        tool("data_tools/preprocess_data.py", "--input", str(d / "raw" / f"{lang}.jsonl"), "--output-prefix",
             str(prefix), "--tokenizer-name-or-path", str(d / "tok"), "--append-eod", "--quiet")
        ratios.append({"dataset_path": f"{prefix}_text_document", "ratio": [0.5, 0.3, 0.2][i]})
    ratio_files(ratios, str(d / "train-splits.txt"), str(d / "valid-splits.txt"))
    tool("data_tools/preprocess_xp3.py", "--input", str(d / "xp3"), "--output-prefix", str(d / "pairs" / "xp3"),
         "--tokenizer-name-or-path", str(d / "tok"), "--prepend-space", "--split-by", "language",
         "--output-format", "megatron-deepspeed", "--mixture-range", "0:0.9")
    x = d / "pairs" / "xp3"
    (d / "pairs-valid.txt").write_text(" ".join(f'"valid_{lang}: 1 0.9:1 {x}_{lang}"' for lang in LANGUAGES) + "\n")
    return d


def paths(d, run, name) -> dict:
    return {"TOKENIZER_NAME_OR_PATH": str(d / "tok"), "KILL_SWITCH_PATH": str(run / "kill-switch"),
            "TENSORBOARD_PATH": str(run / "tb"), "CHECKPOINT_PATH": str(run / "checkpoints"),
            "DEEPSPEED_CONFIG": str(run / "ds_config.json")}


TINY_MODEL = {"--num-layers": ["2"], "--hidden-size": ["64"], "--num-attention-heads": ["4"],
              "--seq-length": ["32"], "--max-position-embeddings": ["32"], "--pad-vocab-size-to": ["384"]}


@pytest.fixture(scope="module")
def bloom_run(corpus, tmp_path_factory):
    """BLOOM-176B's flag list at TP=2 x PP=2 (4 processes), 8 steps of a 2 -> 4 ramp-up."""
    d, run = corpus, tmp_path_factory.mktemp("tr11")
    micro, global_ = 1, 4
    deepspeed_json("tr11-176B-ml", str(run / "ds_config.json"), micro, global_)
    argv = published("tr11-176B-ml", {**paths(d, run, "tr11"), "TRAIN_DATA_PATH": str(d / "train-splits.txt"),
                                      "VALID_DATA_PATH": str(d / "valid-splits.txt")}, {
        "--tensor-model-parallel-size": ["2"], "--pipeline-model-parallel-size": ["2"], **TINY_MODEL,
        "--micro-batch-size": [str(micro)], "--global-batch-size": [str(global_)],
        "--rampup-batch-size": ["2", "1", "6"], "--train-samples": ["24"], "--lr-decay-samples": ["20"],
        "--lr-warmup-samples": ["4"], "--save-interval": ["4"], "--eval-interval": ["3"],
        "--distributed-backend": ["gloo"]})
    return run, torchrun("pretrain.py", 4, argv)


def test_bloom_176b_flag_list_runs_at_tp2_pp2_with_bf16_zero0_rampup_and_one_line_validation(bloom_run):
    run, out = bloom_run
    # Megatron's ramp-up 2 -> 4 by 1 over 6 samples (one increment per 3 samples), then 4 per step,
    # until 24 samples are consumed: 27 in 8 steps.
    sizes = [int(m) for m in re.findall(r"global batch size:\s+(\d+)", out)]
    assert sizes == [2, 2, 3, 4, 4, 4, 4, 4], sizes
    # The valid file's four groups: the blend and one per language, each evaluated.
    for group in ("valid", "valid_en", "valid_fr", "valid_es"):
        assert re.search(rf"\| {group} lm loss value:", out), group
    steps = [line for line in out.splitlines() if " iteration " in line and "global batch size" in line]
    assert steps and not any("loss scale" in line for line in steps)  # bf16: no loss scaling
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step8"
    # --pad-vocab-size-to: the embedding has exactly the padded rows (split over TP=2).
    emb = torch.load(ckpt / "global_step8" / "layer_01-model_00-model_states.pt", weights_only=True)
    assert emb["word_embeddings.weight"].shape[0] == 384 // 2
    # bf16 at ZeRO stage 0: DeepSpeed's bf16 optimizer wrote its fp32 state per DP rank.
    assert any(n.startswith("bf16_zero_pp_rank_") for n in os.listdir(ckpt / "global_step8"))
    assert (run / "tb").is_dir() and os.listdir(run / "tb")


def test_bloomz_7b1_flag_list_finetunes_at_dp2_with_its_fp16_json(corpus, bloom_run, tmp_path):
    """BLOOMZ-7b1's flag list on 2 processes, --load holding the BLOOM run's checkpoint."""
    import shutil

    d, (bloom, _) = corpus, bloom_run
    run = tmp_path
    shutil.copytree(bloom / "checkpoints", run / "checkpoints")
    micro, global_ = 2, 8
    deepspeed_json("tr13f-6b3-mtf", str(run / "ds_config.json"), micro, global_)
    argv = published("tr13f-6b3-mtf", {**paths(d, run, "tr13f"),
                                       "TRAIN_DATA_PATH": str(d / "pairs" / "xp3.mixture.txt"),
                                       "VALID_DATA_PATH": str(d / "pairs-valid.txt")}, {
        **TINY_MODEL, "--micro-batch-size": [str(micro)], "--global-batch-size": [str(global_)],
        "--train-samples": ["40"], "--save-interval": ["1"], "--eval-interval": ["1"], "--eval-iters": ["1"],
        "--distributed-backend": ["gloo"]})
    out = torchrun("finetune.py", 2, argv)
    # --no-load-optim: BLOOM's weights, a fresh optimizer; its iteration and samples are kept (no --reset-progress).
    assert "not its optimizer state" in out
    assert "training from iteration 8 (27 samples consumed)" in out
    # fp16 with the JSON's dynamic loss scale: 2^12 to start.
    scales = [float(m) for m in re.findall(r"loss scale:\s+([0-9.e+]+)", out)]
    assert scales and scales[0] <= 4096.0, scales
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step10"
    for group in ("valid_en", "valid_fr", "valid_es"):
        assert re.search(rf"\| {group} lm loss value:", out), group
