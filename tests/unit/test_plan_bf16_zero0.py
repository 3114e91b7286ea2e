"""The planner's memory model for bf16 at ZeRO-0 (BLOOM-176B's setting): DeepSpeed's BF16_Optimizer.

Per parameter of a rank, with d = DP: bf16 weights (2) and bf16 gradients (2) whole; the fp32
gradient buffer (4) whole too, since BF16_Optimizer allocates it flat for every parameter of the
rank and reads its partition only at the step; fp32 master weights and Adam's two moments (12)
partitioned over DP. No reduction buckets. The same as bf16 at ZeRO-1, which is the stage DeepSpeed
runs it at (training/deepspeed_config.py); tests/unit/test_plan.py measures that engine against the
model (bf16-z1-*), and tests/engine/test_bf16_zero0.py shows stage 0 builds it.
"""
import pytest

from megatron_bloom.planning.memory import reduce_bucket_bytes, state_bytes_per_parameter
from test_plan import last_json, run_plan


@pytest.mark.parametrize("dp", [1, 2, 8])
def test_bf16_zero0_holds_what_bf16_optimizer_holds(dp):
    assert state_bytes_per_parameter("bf16", 0, dp) == (2, 2 + 4, 12 / dp)
    assert state_bytes_per_parameter("bf16", 0, dp) == state_bytes_per_parameter("bf16", 1, dp)
    assert reduce_bucket_bytes("bf16", 0, 5e8) == 0.0


def test_bloom_176b_as_published_fits_at_zero0(capsys):
    """tr11-176B-ml's flags: --bf16 --zero-stage 0 at TP=4, PP=12 on 48 nodes of 8 A100 80GB."""
    argv = ["--model-name", "bloom-176b", "--nodes", "48", "--gpus-per-node", "8", "--gpu", "a100-80g",
            "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "12", "--micro-batch-size", "2",
            "--global-batch-size", "2048", "--checkpoint-activations", "--bf16", "--json"]
    code, out, err = run_plan(capsys, *argv, "--zero-stage", "0")
    assert code == 0, err
    zero0 = last_json(out)
    code, out, err = run_plan(capsys, *argv, "--zero-stage", "1")
    assert code == 0, err
    zero1 = last_json(out)
    zero0.pop("layout"), zero1.pop("layout")
    assert zero0 == zero1  # the same optimizer, the same bytes and the same step

