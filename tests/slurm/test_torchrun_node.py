"""slurm/torchrun_node.py without SLURM: USR1 reaches the ranks (not torchrun's default action), a
USR1 during start-up is delivered once the trainer listens, and exit 3 becomes the requeue verdict."""
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torchrun_node  # slurm/, on pytest.ini's pythonpath

from megatron_bloom.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE = os.path.join(REPO, "slurm", "torchrun_node.py")

ITERATION = re.compile(r"iteration\s+(\d+)/")


def failure(code, t):
    return SimpleNamespace(exitcode=code, timestamp=t)


@pytest.mark.parametrize("failures, verdict", [
    ({0: failure(3, 1), 1: failure(3, 2)}, 3),
    ({0: failure(-15, 2), 1: failure(3, 1)}, 3),    # the agent stopped rank 0 after rank 1 exited 3
    ({0: failure(3, 2), 1: failure(1, 1)}, 1),      # a crash first: not a requeue
    ({0: failure(-9, 1), 1: failure(3, 2)}, 137),   # killed first: not a requeue
    ({0: failure(2, 1)}, 2),
])
def test_verdict(failures, verdict):
    assert torchrun_node._verdict(failures) == verdict


def children(pid):
    """Direct children of ``pid``, from /proc (no procps needed)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                if entry.isdigit() and int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return out


def read_until(proc, lines, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if predicate(line):
            return line
    raise AssertionError("not seen in time:\n" + "".join(lines[-40:]))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("when", ["start-up", "training"])
def test_usr1_saves_and_exits_for_requeue(slurm_corpus, tmp_path, when):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "requeue.{node}"
    cmd = [sys.executable, NODE, "--requeue-marker", str(marker), "--resend-seconds", "2", "--",
           "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0", "--tee", "3",
           os.path.join(REPO, "launch", "pretrain.py"),
           "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "1000",
           "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
           "--pipeline-model-parallel-size", "2", "--train-iters", "100000", "--log-interval", "1",
           "--eval-interval", "100000", "--eval-iters", "1", "--split", "90,10,0",
           "--data-path", slurm_corpus["data_path"], "--tokenizer-name-or-path", slurm_corpus["tokenizer"],
           "--save", str(ckpt), "--load", str(ckpt)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLURM_NODEID="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines = []
    try:
        # What SLURM does to every process of the step (proctrack/cgroup or linuxproc): the agent and the
        # ranks all get USR1. Before the trainer listens, a rank holds or ignores it; the agent resends it.
        if when == "start-up":
            # Every 5 ms for 3 s from just after the agent started: through the ranks' fork, exec, shim
            # and imports, the window where a default disposition would kill them.
            time.sleep(0.3)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and proc.poll() is None:
                for pid in [proc.pid, *children(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
                time.sleep(0.005)
        else:
            read_until(proc, lines, lambda l: (m := ITERATION.search(l)) and int(m.group(1)) >= 3, timeout=240)
            for pid in [proc.pid, *children(proc.pid)]:
                os.kill(pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=240)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]  # exit 3 became the marker
    assert (tmp_path / "requeue.0").exists()
    stopped = re.search(r"stopping at iteration (\d+): signal 10; exit code 3", log)
    assert stopped, log[-3000:]
    assert (ckpt / "latest").read_text() == f"global_step{stopped.group(1)}"
    assert "ranks saved a checkpoint and stopped for requeue" in log
    assert "Traceback" not in log.split("SIGUSR1")[0]  # nothing died of the signal before it was handled
