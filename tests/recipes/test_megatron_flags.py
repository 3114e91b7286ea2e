"""Megatron-DeepSpeed's flags: every one bigscience's scripts and finetune_t0.py pass is known, read
with its meaning, and refused in one line where its value is not built here."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from megatron_bloom.config import validate_config
from megatron_bloom.config.loader import build_parser, explicit_keys, parse_config
from megatron_bloom.training.sources import fill_from_sources
from megatron_bloom.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PUBLISHED = os.path.join(REPO, "tests", "recipes", "published")
SCRIPTS = ("tr11-176B-ml", "tr11b-1B3-ml", "tr13f-6b3-mtf", "tr13-176B-mtf")


def header(name: str, key: str) -> str:
    with open(os.path.join(PUBLISHED, name + ".args")) as fh:
        for line in fh:
            if line.startswith(f"# {key}:"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def published_argv(name: str, tmp) -> list:
    subs = {"TOKENIZER_NAME_OR_PATH": "bigscience/tokenizer", "KILL_SWITCH_PATH": str(tmp / "kill"),
            "TENSORBOARD_PATH": str(tmp / "tb"), "CHECKPOINT_PATH": str(tmp / "ckpt"),
            "TRAIN_DATA_PATH": str(tmp / "train.txt"), "VALID_DATA_PATH": str(tmp / "valid.txt"),
            "DEEPSPEED_CONFIG": os.path.join(PUBLISHED, header(name, "deepspeed_config"))}
    argv = []
    with open(os.path.join(PUBLISHED, name + ".args")) as fh:
        for line in fh:
            if not line.startswith("#") and line.strip():
                argv += [subs.get(w[1:], w) if w.startswith("$") else w for w in shlex.split(line)]
    return argv


def resolve(argv, world_size):
    cfg = parse_config(argv)
    fill_from_sources(cfg, explicit_keys(argv))
    return validate_config(cfg, world_size, for_training=False)


def test_every_published_flag_and_every_flag_finetune_t0_reads_is_known(tmp_path):
    known = {flag for action in build_parser()._actions for flag in action.option_strings}
    flags = set()
    for name in SCRIPTS:
        flags |= {w for w in published_argv(name, tmp_path) if w.startswith("--")}
    with open(os.path.join(PUBLISHED, "finetune_t0.flags")) as fh:
        t0 = {line.strip() for line in fh if line.startswith("--")}
    assert len(flags) > 60 and len(t0) == 19
    assert sorted((flags | t0) - known) == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_published_flag_list_resolves_to_its_run(name, tmp_path):
    cluster = dict(kv.split("=") for kv in header(name, "cluster").split())
    world = int(cluster["nodes"]) * int(cluster["gpus-per-node"])
    cfg = resolve(published_argv(name, tmp_path), world)
    with open(os.path.join(PUBLISHED, header(name, "deepspeed_config"))) as fh:
        ds = json.load(fh)
    t, p, m = cfg.training, cfg.parallel, cfg.model
    assert (t.micro_batch_size, t.global_batch_size) == (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"])
    assert p.zero_stage == ds["zero_optimization"]["stage"] and t.clip_grad == ds["gradient_clipping"]
    assert t.bf16 == ("bf16" in ds) and t.fp16 == ("fp16" in ds)
    if t.fp16:  # the loss scaling that lived in the JSON only
        assert (t.initial_loss_scale, t.loss_scale_window, t.hysteresis, t.min_loss_scale) == (4096.0, 500, 2, 1.0)
    # --pad-vocab-size-to 250880: BLOOM's embedding rows, the same at every TP these runs used.
    assert m.vocab_size == 250880 and m.padded_vocab_size(p.tensor_model_parallel_size) == 250880
    assert p.data_parallel_size * p.tensor_model_parallel_size * p.pipeline_model_parallel_size == world


def test_vocabulary_comes_from_the_tokenizer_padded_as_megatron_deepspeed(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(300)}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    fast.save_pretrained(tmp_path / "tok")
    base = ["--tokenizer-name-or-path", str(tmp_path / "tok"), "--num-attention-heads", "4"]
    for tp, rows in ((1, 384), (2, 512), (4, 512)):
        cfg = resolve([*base, "--tensor-model-parallel-size", str(tp)], tp)
        assert cfg.model.vocab_size == rows and cfg.model.padded_vocab_size(tp) == rows
    assert resolve([*base, "--pad-vocab-size-to", "640"], 1).model.vocab_size == 640
    assert resolve([*base, "--make-vocab-size-divisible-by", "64"], 1).model.vocab_size == 320
    assert resolve([*base, "--vocab-size", "1000"], 1).model.vocab_size == 1000  # a flag wins
    with pytest.raises(UserError, match=r"--pad-vocab-size-to 256 is smaller than the vocabulary \(300 tokens"):
        resolve([*base, "--pad-vocab-size-to", "256"], 1)
    cfg = resolve([*base, "--pad-vocab-size-to", "640", "--tensor-model-parallel-size", "4"], 4)
    assert cfg.model.padded_vocab_size(4) == 640  # exactly the rows asked for, 160 per TP rank
    with pytest.raises(UserError, match=r"--pad-vocab-size-to 320 must be a multiple of "
                                        r"--make-vocab-size-divisible-by 128 and of TP 1; use 384"):
        resolve([*base, "--pad-vocab-size-to", "320"], 1)


def ds_json(tmp_path, **values):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(values))
    return ["--deepspeed_config", str(path)]


def test_deepspeed_json_fills_what_flags_leave_and_refuses_what_they_contradict(tmp_path):
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
            "hysteresis": 3, "min_loss_scale": 2}
    cfg = resolve(ds_json(tmp_path, train_micro_batch_size_per_gpu=2, train_batch_size=16, gradient_clipping=0.5,
                          zero_optimization={"stage": 2}, fp16=fp16), 2)
    t = cfg.training
    assert (t.micro_batch_size, t.global_batch_size, t.clip_grad, cfg.parallel.zero_stage) == (2, 16, 0.5, 2)
    assert (t.fp16, t.bf16, t.initial_loss_scale, t.loss_scale_window, t.hysteresis, t.min_loss_scale) == (
        True, False, 4096.0, 500, 3, 2.0)
    # The engine's JSON carries them.
    from megatron_bloom.training.deepspeed_config import build_deepspeed_config

    assert build_deepspeed_config(cfg)["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                                                    "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 2.0}
    # DeepSpeed's defaults for what an fp16 section leaves out.
    t = resolve(ds_json(tmp_path, fp16={"enabled": True}), 1).training
    assert (t.initial_loss_scale, t.loss_scale_window) == (2.0**16, 1000)
    cases = [
        (["--micro-batch-size", "4"], dict(train_micro_batch_size_per_gpu=2),
         "--micro-batch-size 4 disagrees with train_micro_batch_size_per_gpu = 2 in --deepspeed_config"),
        (["--zero-stage", "1"], dict(zero_optimization={"stage": 2}),
         "--zero-stage 1 disagrees with zero_optimization.stage = 2"),
        (["--bf16"], dict(fp16={"enabled": True}), "--bf16 True disagrees with bf16.enabled = False"),
        (["--initial-loss-scale", "65536"], dict(fp16={"enabled": True, "initial_scale_power": 12}),
         "--initial-loss-scale 65536.0 disagrees with fp16.initial_scale_power = 12 (a scale of 4096)"),
        ([], dict(optimizer={"type": "Adam"}), "key 'optimizer' is not read here"),
        ([], dict(zero_optimization={"stage": 1, "offload_optimizer": {}}),
         "zero_optimization.offload_optimizer is not supported here"),
        ([], dict(train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3),
         "gradient_accumulation_steps = 3 in --deepspeed_config"),
    ]
    for flags, values, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve([*flags, *ds_json(tmp_path, **values)], 2)


REFUSED = [
    (["--position-embedding-type", "rotary"], "--position-embedding-type rotary is not built here"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer is not read here"),
    (["--max-position-embeddings", "64", "--seq-length", "128"], "--max-position-embeddings 64 is below --seq-length 128"),
    (["--no-embed-layernorm"], "--no-embed-layernorm: every BLOOM has a LayerNorm"),
    (["--data-impl", "lazy"], "--data-impl lazy: only Megatron's mmap"),
    (["--dataloader-type", "cyclic"], "--dataloader-type cyclic is not built here"),
    (["--optimizer", "sgd"], "--optimizer sgd is not built here"),
    (["--prefixlm"], "--prefixlm (inputs attend bidirectionally) is not built here"),
    (["--test-weighted-split-paths", "test: 1 0:1 x"], "--test-weighted-split-paths: the trainer evaluates validation"),
    (["--remote-device", "cpu"], "--remote-device cpu (ZeRO-3 parameter offload) is not supported"),
    (["--no-deepspeed"], "--no-deepspeed: DeepSpeed is the engine"),
    (["--reset-attention-mask"], "--reset-attention-mask (no attention across EOD) is not built for pretraining"),
    (["--micro-batch-size", "x"], "argument --micro-batch-size: invalid int value: 'x'"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[f[0][0] for f in REFUSED])
def test_values_not_built_here_are_refused_before_anything_starts(flags, message):
    from megatron_bloom.cli import check_pretrain_config

    with pytest.raises(UserError) as exc:
        check_pretrain_config(resolve([*flags, "--train-iters", "1"], 1))
    assert str(exc.value).startswith(message)


@pytest.mark.parametrize("flags, message", [REFUSED[0], *REFUSED[-2:]], ids=["rotary", "reset-attention-mask", "type"])
def test_the_entry_point_prints_one_error_line(flags, message):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), *flags, "--train-iters", "1"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message), proc.stderr


def test_every_switch_can_be_turned_off_over_a_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("training:\n  bf16: true\nmodel:\n  checkpoint_activations: true\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--no-bf16", "--no-checkpoint-activations"])
    assert not cfg.training.bf16 and not cfg.model.checkpoint_activations
