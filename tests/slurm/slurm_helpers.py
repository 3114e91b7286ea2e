"""Commands and bounded waits the tests of a local SLURM cluster share (the fixtures are in conftest.py)."""
import os
import re
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def slurm(cluster, *args, timeout=30):
    return subprocess.run(list(args), capture_output=True, text=True, env=cluster["env"], timeout=timeout, check=True,
                          cwd=REPO).stdout


def job_field(cluster, job, name):
    out = slurm(cluster, "scontrol", "show", "job", str(job))
    m = re.search(rf"\b{name}=(\S*)", out)
    return m.group(1) if m else None


def wait_for(predicate, timeout, what, poll=0.5, log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = f"\njob log tail:\n{read(log_path)[-3000:]}" if log_path else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def release_if_delayed(cluster, job, requeued_at):
    """Slurm holds a requeued batch job back (BeginTime, ~2 min); start it now instead.

    Not within 2 s of the requeue: slurmd revokes the old run's job credential with a timestamp in
    whole seconds and refuses a new credential made in that same second ("Killing non-startable
    batch job: Job credential revoked"), which ends the requeued job as FAILED. That is what
    Slurm's own delay avoids.
    """
    if time.monotonic() - requeued_at < 2.0:
        return
    if job_field(cluster, job, "JobState") == "PENDING" and job_field(cluster, job, "Reason") == "BeginTime":
        slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")


def gone(cluster, job):
    return not slurm(cluster, "squeue", "-h", "-j", str(job), "-o", "%i").strip()
