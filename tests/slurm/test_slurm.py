"""slurm/tiny-cpu.slurm through a real SLURM: 2 emulated nodes x torchrun with 2 ranks each, gloo.

tests/slurm/local_cluster.sh installs Debian's munge/slurmctld/slurmd/slurm-client when missing,
starts slurmctld and one ``slurmd -N`` per node under a private directory, and stops exactly what it
started. The test skips only when the machine cannot host that (not root, or apt cannot install the
packages) and says why; anything else that goes wrong fails it.

Checked: the job trains on both nodes; ``scancel --signal=USR1`` makes every rank save at the next
step boundary and exit 3, which the launch template turns into ``scontrol requeue``; the requeued
job resumes from that checkpoint and finishes. ``--signal=USR1@N`` with a time limit (what the
recipes use) does the same without scancel. A job array chains two runs (the first stops at
``--exit-interval`` and exits 0, the second resumes) and cancels its pending third task when done.
Every wait is bounded; the cluster, and every job process, is stopped at the end.
"""
import os
import re
import subprocess
import sys
import time

import pytest
from slurm_helpers import gone, job_field, read, release_if_delayed, slurm, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "slurm", "tiny-cpu.slurm")
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+)")


def submit(cluster, tmp_path, corpus, *sbatch_args, **env):
    run_env = dict(cluster["env"], PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"), DATA_PATH=corpus["data_path"],
                   TOKENIZER=corpus["tokenizer"], PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=cluster["extensions"],
                   **env)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(k, None)
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, RECIPE], capture_output=True, text=True,
                         env=run_env, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_usr1_saves_requeues_and_resumes(cluster, slurm_corpus, tmp_path):
    out = str(tmp_path / "job-%j.out")
    job = submit(cluster, tmp_path, slurm_corpus, f"--output={out}", TRAIN_ITERS="60")
    log_path = out.replace("%j", job)
    try:
        # Trains: iterations appear (the first start builds DeepSpeed's CPU op; allow for it).
        wait_for(lambda: any(int(m.group(1)) >= 5 for m in ITERATION.finditer(read(log_path))), 400,
                 "iteration 5 in the job log", log_path=log_path)
        assert job_field(cluster, job, "NodeList") == "mbnode[1-2]"
        slurm(cluster, "scancel", "--signal=USR1", job)
        # Saves, exits 3, is requeued (Restarts=1), then resumes and finishes.
        wait_for(lambda: "=== stopped for requeue" in read(log_path), 240, "the requeue line", log_path=log_path)
        wait_for(lambda: job_field(cluster, job, "Restarts") == "1", 60, "Restarts=1")
        requeued_at = time.monotonic()
        wait_for(lambda: (release_if_delayed(cluster, job, requeued_at), gone(cluster, job))[1], 400,
                 "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job], env=cluster["env"], capture_output=True, timeout=30)
    log = read(log_path)
    assert job_field(cluster, job, "JobState") == "COMPLETED", log[-4000:]
    assert "=== nodes: mbnode[1-2] (2)" in log
    assert "Using topology" in log and "ProcessCoord(pipe=1, data=1, model=0): 3" in log  # 4 ranks, PP=2 x DP=2
    stopped = re.findall(r"stopping at iteration (\d+): signal 10; exit code 3", log)
    assert len(stopped) == 1, log[-4000:]
    n = int(stopped[0])
    assert 5 <= n < 60
    assert log.count("torchrun_node[") >= 2 and "SIGUSR1: asking the ranks to save and stop" in log
    assert re.search(rf"> resumed \S+/global_step{n} at iteration {n}, {8 * n} samples", log), log[-4000:]
    assert "> training done at iteration 60" in log
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step60"
    # The first run's lines end before the restart; the second run printed no iteration <= n.
    second = log.split("restart 1)")[1]
    assert min(int(m.group(1)) for m in ITERATION.finditer(second)) == n + 1


def test_array_chains_runs_and_cancels_the_rest(cluster, slurm_corpus, tmp_path):
    out = str(tmp_path / "array-%A_%a.out")
    job = submit(cluster, tmp_path, slurm_corpus, f"--output={out}", "--array=1-3%1", TRAIN_ITERS="20",
                 EXTRA_TRAINING_ARGS="--exit-interval 15")
    logs = [out.replace("%A", job).replace("%a", str(i)) for i in (1, 2, 3)]
    try:
        wait_for(lambda: gone(cluster, job), 600, "the array to finish")
    finally:
        subprocess.run(["scancel", job], env=cluster["env"], capture_output=True, timeout=30)
    first, second = read(logs[0]), read(logs[1])
    assert "stopping at iteration 15: --exit-interval 15; exit code 0" in first, first[-3000:]
    assert re.search(r"> resumed \S+/global_step15 at iteration 15", second), second[-3000:]
    assert "> training done at iteration 20" in second
    assert "cancelling the pending tasks of array job" in second
    assert read(logs[2]) == ""  # never started
    assert job_field(cluster, f"{job}_3", "JobState") == "CANCELLED"


def run_time_seconds(text):
    """scontrol's RunTime ([D-]HH:MM:SS) in seconds."""
    days, _, hms = text.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return ((int(days) if days else 0) * 24 + h) * 3600 + m * 60 + s


def test_time_limit_signal_saves_and_requeues(cluster, slurm_corpus, tmp_path):
    """#SBATCH --signal=USR1@N as the recipes use it: SLURM itself sends USR1 N seconds before the limit."""
    out = str(tmp_path / "job-%j.out")
    # slurmctld checks time limits every 30 s and sends the signal, at the first check at most N + 30 s
    # before the limit, to the job steps running then: a signal due before srun has started its step is
    # lost. So the job starts with a long limit; once it trains, the limit is cut to 2-3 minutes from
    # now and the signal is due within 90 s. EXIT_DURATION_MINS keeps the trainer's own stop out of the way.
    job = submit(cluster, tmp_path, slurm_corpus, f"--output={out}", "--time=30", "--signal=USR1@100",
                 TRAIN_ITERS="100000", EXIT_DURATION_MINS="60")
    log_path = out.replace("%j", job)
    try:
        wait_for(lambda: any(int(m.group(1)) >= 2 for m in ITERATION.finditer(read(log_path))), 400,
                 "iteration 2 in the job log", log_path=log_path)
        limit = run_time_seconds(job_field(cluster, job, "RunTime")) // 60 + 3
        slurm(cluster, "scontrol", "update", f"JobId={job}", f"TimeLimit={limit}")
        assert run_time_seconds(job_field(cluster, job, "TimeLimit")) == 60 * limit
        wait_for(lambda: "=== stopped for requeue" in read(log_path), 200, "the requeue line", log_path=log_path)
        wait_for(lambda: job_field(cluster, job, "Restarts") == "1", 60, "Restarts=1")
    finally:
        subprocess.run(["scancel", job], env=cluster["env"], capture_output=True, timeout=30)
    log = read(log_path)
    stopped = re.search(r"stopping at iteration (\d+): signal 10; exit code 3", log)
    assert stopped, log[-4000:]
    assert "SIGUSR1: asking the ranks to save and stop" in log, log[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"global_step{stopped.group(1)}"
