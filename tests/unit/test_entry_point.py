"""An impossible layout fails in the first lines of the training entry point: one line, exit 2."""
import os
import subprocess
import sys
import time

import pytest


def run_pretrain(repo_root, args, world_size):
    env = dict(os.environ, RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_PORT="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, os.path.join(repo_root, "launch", "pretrain.py"), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )
    return proc, time.monotonic() - start


@pytest.mark.parametrize(
    "args, world, message",
    [
        (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3", "--train-iters", "5"], 3,
         "error: num_attention_heads=4 is not divisible by tensor_model_parallel_size=3; use 1, 2 or 4"),
        (["--num-layrs", "4"], 1, "error: unknown argument '--num-layrs'; did you mean '--num-layers'?"),
    ],
)
def test_bad_layout_fails_fast_without_traceback(repo_root, args, world, message):
    proc, seconds = run_pretrain(repo_root, args, world)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stderr + proc.stdout
    assert seconds < 20  # python + config import only; no process group, no torch.distributed init
