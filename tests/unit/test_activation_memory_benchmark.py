"""benchmarks/activation_memory.py runs end to end at a small size and reports both peaks."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_activation_memory_benchmark_reports_peaks():
    argv = ["benchmarks/activation_memory.py", "--seq-length", "128", "--hidden-size", "64", "--num-layers", "2",
            "--num-attention-heads", "4", "--json"]
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert "activation_memory.py --seq-length 128" in result["run"]["command"]
    loss, alibi = result["rows"]
    assert (loss["case"], alibi["case"]) == ("loss", "alibi")
    logits_bytes = 4 * 128 * 250_880
    # The step's logits and their gradient at once, at most with the LM head's weight gradient and
    # one float32 chunk (planning/memory.py's last-stage term; tests/model/test_activation_memory.py
    # bounds the loss alone at a size where the old whole-tensor version exceeds it).
    assert 2 * logits_bytes <= loss["torch_peak_bytes"] <= 2 * logits_bytes + 4 * 250_880 * 64 + 4 * 2**24 + 2**20
    assert alibi["torch_peak_bytes"] > 0 and loss["rss_peak_bytes"] > 0 and alibi["rss_peak_bytes"] > 0
    assert "| loss | b=1 s=128 h=64 V=250880 fp32 logits |" in p.stdout
