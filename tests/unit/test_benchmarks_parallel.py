"""benchmarks/parallel.py and benchmarks/zero_memory.py at their smallest: they run, print their tables
and one JSON object, write PNGs, and what they measure agrees with the analytic figures."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-attention-heads", "4", "--vocab-size", "256",
        "--seq-length", "32", "--micro-batch-size", "2"]

# Measured minus analytic bytes are a handful of scalar reductions DeepSpeed adds (gradient norm,
# overflow check): in these runs +16 bytes on TP (1.3 MB, 1.2e-5), +32 on DP (0.94 MB, 3.4e-5), +8 on
# the tied embedding (131 kB, 6e-5). 1e-3 of the volume allows ~100 such scalars; one missing or
# extra activation all-reduce is 1/(4L + 2) = 10% of the TP volume here, and a gradient bucket
# reduced twice or not at all moves DP's by far more than 1e-3.
REL_TOL = 1e-3


def run_benchmark(name, *argv, timeout=300):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *argv, "--json"],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, json.loads(p.stdout.strip().splitlines()[-1])


def assert_run_recorded(result):
    run = result["run"]
    for key in ("cpu", "cores", "python", "torch", "deepspeed", "date_utc", "command"):
        assert run[key], key
    assert "--json" in run["command"]


def assert_close_above(measured, analytic, what):
    assert analytic > 0, what
    assert measured >= analytic, (what, measured, analytic)
    assert (measured - analytic) / analytic <= REL_TOL, (what, measured, analytic)


@pytest.mark.slow
@pytest.mark.distributed
def test_parallel_costs(tmp_path):
    # One 4-rank layout exercises TP and DP at once (fewer process starts: they dominate here).
    out, result = run_benchmark("parallel.py", *TINY, "--layouts", "2,1,2", "--global-batch-size", "8",
                                "--bubble-micro-batches", "2", "--warmup", "1", "--steps", "1",
                                "--plot", str(tmp_path))
    assert "| (TP,PP,DP) |" in out and "Pipeline bubble" in out
    assert_run_recorded(result)
    (layout,) = result["layouts"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["processes"]) == (2, 1, 2, 4)
    for key in ("step_s", "tokens_per_s", "measured_bytes", "analytic_bytes", "bytes_by_kind_and_group"):
        assert key in layout, key
    assert layout["step_s"] > 0 and layout["micro_batches"] == 2
    assert_close_above(layout["measured_bytes"]["tp"], layout["analytic_bytes"]["tp"], "TP all-reduce")
    assert_close_above(layout["measured_bytes"]["dp"], layout["analytic_bytes"]["dp"], "DP gradient all-reduce")
    assert layout["measured_bytes"]["pp_send"] == 0

    (pp2,) = result["bubble"]
    # Pipeline sends are exactly the activations forward and their gradients backward.
    assert pp2["measured_bytes"]["pp_send"] == pp2["analytic_bytes"]["pp_send"] > 0
    assert_close_above(pp2["measured_bytes"]["pp_tied"], pp2["analytic_bytes"]["pp_tied"], "tied embedding")
    assert pp2["ideal_bubble"] == pytest.approx(1 / 3)
    assert [s["stage"] for s in pp2["stages"]] == [0, 1]
    assert all(0 <= s["bubble"] < 1 for s in pp2["stages"])
    assert sorted(os.listdir(tmp_path)) == ["parallel_costs.png", "pipeline_bubble.png"]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_memory(tmp_path):
    # fp16: the paper's K = 12 bytes of optimizer state per parameter, all of it partitioned from
    # stage 1 on (in fp32 DeepSpeed adds an fp32 partition copy only at stage >= 1, so the ratio
    # would be 12/(8 DP) instead).
    out, result = run_benchmark("zero_memory.py", *TINY, "--precision", "fp16", "--zero-stages", "0", "2",
                                "--attention-impls", "eager", "--steps", "2", "--plot", str(tmp_path))
    assert "| ZeRO stage |" in out and "| attention |" in out
    assert_run_recorded(result)
    dp = result["config"]["data_parallel_size"]
    z0, z2 = result["zero"]
    for row in (z0, z2):
        for key in ("measured", "paper", "planner", "ranks"):
            assert key in row
        assert len(row["ranks"]) == dp
    assert z2["measured"]["optimizer_states"] / z0["measured"]["optimizer_states"] == pytest.approx(1 / dp, rel=0.02)
    # Stage 2 partitions the gradients too. Measured: 1/DP plus one more buffer of the size of the
    # tied embedding's gradient partition (0.57 here, where the embedding is 14% of the parameters;
    # 0.54 at the benchmark's default size). A stage that stopped partitioning would give 1.
    assert 1 / dp <= z2["measured"]["gradients"] / z0["measured"]["gradients"] <= 1 / dp + 0.1
    assert z0["measured"]["optimizer_states"] == pytest.approx(z0["paper"]["optimizer_states"], rel=0.01)

    full, recomputed = result["activations"]
    assert not full["checkpoint_activations"] and recomputed["checkpoint_activations"]
    assert recomputed["saved_bytes"] < full["saved_bytes"] / 2
    # Eager attention keeps what Megatron's formula counts; the rest are [b, s] loss tensors and masks.
    for row in (full, recomputed):
        assert row["saved_bytes"] / row["formula_bytes"] == pytest.approx(1, abs=0.05)
    assert os.listdir(tmp_path) == ["zero_memory.png"]


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", os.path.join(REPO, "benchmarks", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, argv, message", [
    ("parallel.py", ["--layouts", "3,1,1"], "num_attention_heads=8 is not divisible by TP=3"),
    ("parallel.py", ["--layouts", "2-1-1"], "is not TP,PP,DP"),
    ("parallel.py", ["--layouts", "1,1,3"], "--global-batch-size 8 is not divisible by micro batch x DP = 6"),
    ("parallel.py", ["--zero-stage", "2"], "use --zero-stage 0 or 1"),
    ("zero_memory.py", ["--precision", "bf16"], "bf16 with ZeRO stage 0"),
    ("zero_memory.py", ["--steps", "1"], "use at least 2"),
])
def test_bad_arguments_are_refused_before_any_run(name, argv, message):
    from megatron_bloom.errors import UserError

    module = load_benchmark(name)
    with pytest.raises(UserError, match=re.escape(message)):
        module.check_args(module.parse_args(argv))


def test_command_line_error_is_one_line():
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "parallel.py"), "--layouts", "3,1,1"],
                       capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=120,
                       cwd=REPO)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: layout 3,1,1: ") and "Traceback" not in p.stderr
