"""A rank that dies mid-step ends the whole job quickly and is named; ranks never outlive their launcher."""
import os
import signal
import time

import pytest

from megatron_bloom.distributed.init import lost_peer_hint
from reliability_job import Job, data_args

TIMEOUT_MINUTES = 0.5


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished dying
    except FileNotFoundError:
        return False


def long_run(corpus, *extra):
    return data_args(corpus) + ["--train-iters", "100000", "--eval-interval", "100000",
                                "--distributed-timeout-minutes", str(TIMEOUT_MINUTES), *extra]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_within_the_timeout_and_is_named(corpus):
    job = Job(2, long_run(corpus))
    job.wait_for("iteration        3/")
    pids = job.rank_pids()
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    code = job.finish(timeout=TIMEOUT_MINUTES * 60 + 60)
    ended = time.monotonic() - killed
    assert code != 0
    assert ended < TIMEOUT_MINUTES * 60, ended  # rank 0 did not wait for anything, let alone hang
    assert not alive(pids[0])
    # torchrun's report names the lost rank and how it died.
    root_cause = job.output.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, job.output[-3000:]
    assert "Signal 9 (SIGKILL)" in root_cause, job.output[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_orphaned_ranks_stop_when_their_agent_dies(corpus, tmp_path):
    """torchrun starts every rank in its own session: killing the agent's process group alone
    used to leave both ranks training (and saving) on their own."""
    ckpt = tmp_path / "ckpt"
    job = Job(2, long_run(corpus, "--save", str(ckpt), "--save-interval", "1000"))
    job.wait_for("iteration        3/")
    pids = job.rank_pids()
    assert sorted(pids) == [0, 1]
    job.kill_agent()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = [rank for rank, pid in pids.items() if alive(pid)]
    for pid in pids.values():  # never leave a rank behind, even when the test fails
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not still, f"ranks {still} outlived their agent by 5 s"
    job.finish(timeout=30)
    assert not (ckpt / "latest").exists()  # no rank saved after the job was killed


def test_lost_peer_hint():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:7045: Connection reset by peer.")
    hint = lost_peer_hint(gloo, 3, 0.5)
    assert hint.startswith("error: rank 3: a collective failed because another rank died or stopped answering")
    assert "--distributed-timeout-minutes 0.5" in hint and "Root Cause" in hint
    assert lost_peer_hint(RuntimeError("shape mismatch"), 3, 0.5) is None
    assert lost_peer_hint(ValueError("Connection reset by peer"), 3, 0.5) is None
