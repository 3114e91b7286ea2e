"""NaN/Inf gradients: --nan-policy skip leaves weights and optimizer exactly as they were and counts the
step, --nan-policy stop ends every rank before the update with one line naming iteration, rank and
parameter, and fp16 skips by loss scaling; all with a fault injected on ONE rank, so the other rank
must follow the agreement (a rank that stepped alone would change its weights or hang).

The fault is injected through megatron_bloom.training.nonfinite's test-only environment variable
(ITERATION:RANK:PARAMETER[:nan|inf]), which replaces one parameter's gradient upstream of the check
and of DeepSpeed.
"""
import glob
import math
import os

import pytest
import torch

from pretrain_run import REPO, command, env, scalars  # tests/training, via this folder's conftest

from megatron_bloom.config import RunConfig, validate_config  # noqa: E402
from megatron_bloom.errors import UserError  # noqa: E402
from megatron_bloom.training.engine import emulated_cpu_half_precision  # noqa: E402
from megatron_bloom.monitoring.metrics import IntervalStats, rss_mb  # noqa: E402
from megatron_bloom.training.nonfinite import INJECT_ENV, Injection  # noqa: E402


POISONED_ITERATION = 3
PARAMETER = "transformer.h.1.mlp.dense_h_to_4h.weight"  # rank 1 holds it in every layout below
ITERS = 6
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--global-batch-size", "4",
        "--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "1000", "--save-interval", "1"]


# ---- no processes ------------------------------------------------------------------------------


def test_injection_spec(monkeypatch):
    monkeypatch.setenv(INJECT_ENV, f"3:1:{PARAMETER}")
    nan = Injection.from_env()
    assert (nan.iteration, nan.rank, nan.parameter) == (3, 1, PARAMETER) and math.isnan(nan.value)
    monkeypatch.setenv(INJECT_ENV, f"7:0:{PARAMETER}:inf")
    assert Injection.from_env() == Injection(7, 0, PARAMETER, math.inf)
    for bad in ("3:1", "x:1:p", f"3:1:{PARAMETER}:zero"):
        monkeypatch.setenv(INJECT_ENV, bad)
        with pytest.raises(UserError, match="ITERATION:RANK:PARAMETER"):
            Injection.from_env()
    monkeypatch.delenv(INJECT_ENV)
    assert Injection.from_env() is None


def test_nan_policy_is_validated():
    cfg = RunConfig()
    cfg.training.train_iters, cfg.training.nan_policy = 10, "ignore"
    with pytest.raises(UserError, match="nan_policy='ignore' is not one of stop, skip"):
        validate_config(cfg, world_size=1)


def test_gradient_nan_counts_as_nan_iteration():
    stats = IntervalStats()
    stats.add(2.0, False, 4, 128, 1.0, 0.1)
    stats.add(2.5, True, 4, 128, 1.0, 0.1, nan=True)  # finite loss, NaN gradient: skipped by --nan-policy skip
    stats.add(math.inf, True, 4, 128, 1.0, 0.1)  # fp16 overflow with an inf loss: nan judged from the loss
    stats.add(3.0, True, 4, 128, 1.0, 0.1)  # fp16 overflow, finite loss
    s = stats.summary(1.0)
    assert (s.skipped_iterations, s.nan_iterations, s.mean_loss) == (3, 2, 2.0)


def test_current_rss_follows_allocations():
    before = rss_mb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    grown = rss_mb() - before
    del block
    assert 56 < grown < 90, grown  # 64 MB is above glibc's mmap threshold: fresh pages, resident once written


# ---- torchrun, 2 ranks ---------------------------------------------------------------------------


def run(corpus, tmp_path, inject, *args, timeout=300):
    import subprocess

    argv = TINY + ["--data-path", corpus["data_path"], "--tokenizer-name-or-path", corpus["tokenizer"],
                   "--save", str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb"), *args]
    return subprocess.run(command(2, argv), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(env(), **{INJECT_ENV: inject}))


def checkpoint_tensors(tag_dir):
    """{file/key path: tensor} of every tensor a checkpoint tag holds: weights, fp32 masters, Adam moments."""
    out = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            out[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable

    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        with megatron_enums_importable():  # engine files hold Megatron-DeepSpeed's args
            walk(torch.load(path, map_location="cpu", weights_only=False), os.path.basename(path))
    assert out, f"no tensors in {tag_dir}"
    return out


def changed(a, b):
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def console_line(stdout, iteration):
    return next(l for l in stdout.splitlines() if l.startswith(f" iteration {iteration:8d}/"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [
    # ZeRO-0 pipeline: DeepSpeed would apply the NaN update; only the guard keeps the weights.
    ["--pipeline-model-parallel-size", "2", "--zero-stage", "0"],
    # Plain engine (BloomSequential), gradients reduced and partitioned inside backward.
    ["--zero-stage", "2"],
    # bf16 with fp32 master weights and gradient accumulation (DeepSpeed's BF16 optimizer).
    ["--pipeline-model-parallel-size", "2", "--zero-stage", "1", "--bf16"],
], ids=["pp2-zero0-fp32", "dp2-zero2-fp32", "pp2-zero1-bf16"])
def test_skip_policy_leaves_the_step_out_on_every_rank(corpus, tmp_path, layout):
    p = run(corpus, tmp_path, f"{POISONED_ITERATION}:1:{PARAMETER}", *layout, "--nan-policy", "skip")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (f"> iteration {POISONED_ITERATION}: NaN/Inf gradient, first on rank 1 in {PARAMETER}; "
            f"update skipped on every rank") in p.stdout
    # Start-up says so when this CPU only emulates bf16 matmuls (once, from rank 0), and never for fp32.
    warnings = p.stdout.count("matmul kernels; torch emulates them")
    assert warnings == int("--bf16" in layout and emulated_cpu_half_precision("bf16")), p.stdout[:3000]
    line = console_line(p.stdout, POISONED_ITERATION)
    assert "number of skipped iterations:   1" in line and "number of nan iterations:   1" in line, line
    assert "lm loss" not in line and "grad norm" not in line  # Megatron prints neither for a skipped step

    tb = str(tmp_path / "tb")
    expected = {it: float(it == POISONED_ITERATION) for it in range(1, ITERS + 1)}
    assert scalars(tb, "skipped-iterations/skipped-iterations") == expected
    assert scalars(tb, "nan-iterations/nan-iterations") == expected
    loss = scalars(tb, "lm-loss-training/lm loss")
    assert sorted(loss) == [1, 2, 4, 5, 6] and all(math.isfinite(v) for v in loss.values()), loss

    ckpt = tmp_path / "ckpt"
    before, at, after = (checkpoint_tensors(ckpt / f"global_step{it}") for it in (2, 3, 4))
    assert changed(before, at) == []  # weights, fp32 masters and Adam moments: bit for bit, every rank's files
    assert len(changed(at, after)) > len(at) // 2  # the next step does update
    state = torch.load(ckpt / f"global_step{ITERS}" / "megatron_bloom.pt", weights_only=False)
    assert (state["skipped_iterations"], state["nan_iterations"]) == (1, 1)


@pytest.mark.slow
@pytest.mark.distributed
def test_stop_policy_names_iteration_rank_and_parameter_before_any_update(corpus, tmp_path):
    # Poisoned on data-parallel rank 1: rank 0's own gradients are finite, and it must stop too.
    p = run(corpus, tmp_path, f"{POISONED_ITERATION}:1:{PARAMETER}", "--zero-stage", "2", "--nan-policy", "stop",
            timeout=180)  # a rank left waiting would hit this instead of exiting
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert errors, p.stdout[-2000:] + p.stderr[-3000:]
    assert errors[0] == (
        f"error: iteration {POISONED_ITERATION}: NaN/Inf gradient, first on rank 1 in {PARAMETER} (pipeline stage 0, "
        f"tensor rank 0, data rank 1); stopped before the update (--nan-policy stop); resume from the last checkpoint "
        f"with --nan-policy skip or --skip-train-iteration-range {POISONED_ITERATION}-{POISONED_ITERATION}")
    assert len(set(errors)) == 1  # every rank reports the same agreed verdict
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == f"global_step{POISONED_ITERATION - 1}"
    assert not (ckpt / f"global_step{POISONED_ITERATION}").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_fp16_overflow_is_skipped_by_loss_scaling_and_counted(corpus, tmp_path):
    # A moderate initial scale: the tiny model never overflows by itself, so the injected Inf is the only skip.
    p = run(corpus, tmp_path, f"{POISONED_ITERATION}:1:{PARAMETER}:inf", "--pipeline-model-parallel-size", "2",
            "--fp16", "--initial-loss-scale", "1024")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "NaN/Inf gradient" not in p.stdout  # loss scaling handles fp16, not the guard
    assert p.stdout.count("no native fp16 matmul kernels") == int(emulated_cpu_half_precision("fp16"))
    line = console_line(p.stdout, POISONED_ITERATION)
    assert "number of skipped iterations:   1" in line and "loss scale: " in line, line
    tb = str(tmp_path / "tb")
    assert scalars(tb, "skipped-iterations/skipped-iterations") == {
        it: float(it == POISONED_ITERATION) for it in range(1, ITERS + 1)}
    assert sorted(scalars(tb, "lm-loss-training/lm loss")) == [1, 2, 4, 5, 6]
    assert scalars(tb, "loss-scale/loss-scale")
    ckpt = tmp_path / "ckpt"
    assert changed(checkpoint_tensors(ckpt / "global_step2"), checkpoint_tensors(ckpt / "global_step3")) == []
    state = torch.load(ckpt / f"global_step{ITERS}" / "megatron_bloom.pt", weights_only=False)
    assert state["skipped_iterations"] == 1


def test_gradient_sum_flags_any_nonfinite_element_without_a_temporary():
    import torch

    from megatron_bloom.training.nonfinite import gradient_sum

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.ones(1000, 64, dtype=dtype)  # sums to 64,000: past fp16's range, finite in float32
        assert torch.isfinite(gradient_sum(g)), dtype
        for bad in ([(3, 5, float("nan"))], [(3, 5, float("inf"))], [(3, 5, float("inf")), (7, 1, float("-inf"))]):
            h = g.clone()
            for i, j, v in bad:
                h[i, j] = v
            assert not torch.isfinite(gradient_sum(h)), (dtype, bad)
    # No copy of the gradient: what isfinite(grad).all() allocated (|g| and two masks) is gone.
    from torch.profiler import ProfilerActivity, profile

    g = torch.randn(2000, 2000, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gradient_sum(g)
    assert max((e.cpu_memory_usage for e in prof.key_averages()), default=0) < 1024
