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
    except (FileNotFoundError, ProcessLookupError):  # gone, or being reaped (ESRCH)
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
    # rank 0 may be stopped by torchrun before it gets to say it, so its own line is not required here.


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


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_ends_the_others_within_the_timeout(corpus):
    """SIGSTOP, not SIGKILL: rank 1 keeps its sockets open and simply stops answering. Rank 0 must
    give up after --distributed-timeout-minutes in every group, also in the data-parallel group
    DeepSpeed creates for ZeRO (it used to wait torch's 30-minute default there)."""
    job = Job(2, long_run(corpus))
    job.wait_for("iteration        5/")
    pids = job.rank_pids()
    stopped = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        while alive(pids[0]) and time.monotonic() - stopped < TIMEOUT_MINUTES * 60 + 30:
            time.sleep(0.2)
        waited = time.monotonic() - stopped
        assert not alive(pids[0]), f"rank 0 still waiting {waited:.0f} s after rank 1 stopped"
    finally:
        job.kill()
    # It did wait for the timeout: the rank was stopped, not dead.
    assert TIMEOUT_MINUTES * 60 - 1 < waited, f"{waited:.1f} s\n" + job.output[-3000:]
    assert (f"error: rank 0: another rank did not answer a collective within --distributed-timeout-minutes "
            f"{TIMEOUT_MINUTES:g}") in job.output, job.output[-3000:]


def test_lost_peer_hint():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:7045: Connection reset by peer.")
    hint = lost_peer_hint(gloo, 3, 0.5)
    assert hint.startswith("error: rank 3: another rank died during a collective; torchrun's report names it")
    timeout = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation")
    assert "within --distributed-timeout-minutes 0.5; it hung" in lost_peer_hint(timeout, 3, 0.5)
    assert lost_peer_hint(RuntimeError("shape mismatch"), 3, 0.5) is None
    assert lost_peer_hint(ValueError("Connection reset by peer"), 3, 0.5) is None
