"""`make gpu-smoke`'s CPU rehearsal end to end: the steps a GPU would run (gloo, fp32, tiny sizes).

The failure report and the log readers are tests/unit/test_gpu_smoke_report.py. Here: a passing
rehearsal prints every summary line and leaves the runs it compared on disk, and a resumed run that
really differs (twice the learning rate after the checkpoint) fails the bitwise resume check."""
import os
import subprocess
import sys

import pytest

from pretrain_run import scalars

pytestmark = [pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS = "lm-loss-training/lm loss"


def rehearse(work, *args, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--device", "cpu", "--work-dir", str(work),
                           *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def summary_of(stdout):
    """{label: text} of the lines after 'gpu-smoke passed'."""
    lines = stdout.split("\ngpu-smoke passed on cpu in ", 1)[1].splitlines()
    return lines[0], {line[2:18].strip(): line[19:] for line in lines[1:] if line.startswith("  ")}


def test_cpu_rehearsal_passes_every_step(tmp_path):
    work = tmp_path / "work"
    p = rehearse(work)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    for number, step in enumerate(("data", "pretrain", "resume", "finetune", "generate", "evaluate", "export",
                                   "sdpa"), 1):
        assert f"=== [{number}/8] {step}:" in p.stdout
    head, summary = summary_of(p.stdout)
    assert "(gloo, world size 1, CPU rehearsal: fp32 instead of bf16/fp16)" in head
    assert list(summary) == ["SDPA kernel", "peak GPU memory", "tokens/s", "resume", "losses", "generate",
                             "evaluate", "export"]
    # Training runs with dropout: torch's CPU SDPA takes its math path then, its flash kernel without.
    assert summary["SDPA kernel"].startswith("training math (") and "inference flash (CPU) (" in summary["SDPA kernel"]
    assert summary["resume"] == "steps 4-6 bitwise equal to the straight run"
    assert summary["peak GPU memory"].startswith("pretrain max allocated ")
    assert summary["tokens/s"].startswith("pretrain ") and "(fp32), finetune " in summary["tokens/s"]
    assert summary["generate"] == "2 prompts answered"
    assert summary["evaluate"].startswith("perplexity ")
    assert summary["export"].startswith("transformers' logits match ours")
    # What the resume check compared is on disk: six steps straight, 4-6 resumed, the same bits.
    straight, resumed = scalars(str(work / "tb" / "straight"), LOSS), scalars(str(work / "tb" / "resumed"), LOSS)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == straight[s] for s in resumed)
    assert (work / "hf-export" / "config.json").is_file()


def test_a_resume_that_differs_fails_the_smoke_run(tmp_path):
    p = rehearse(tmp_path / "work", "--pretrain-steps", "4", "--break-resume")
    assert p.returncode == 1, p.stdout[-4000:] + p.stderr[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    # Step 3's loss is the forward before the first resumed update: equal; step 4's is not.
    assert last.startswith("gpu-smoke failed at step 'resume' after ")
    assert "resumed loss differs from the straight run's from step 4 on (after 1 resumed update(s))" in last
    assert "=== [4/8] finetune" not in p.stdout
