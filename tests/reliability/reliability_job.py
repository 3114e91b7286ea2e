"""Jobs of launch/pretrain.py that the reliability tests start, watch, kill and compare."""
import os
import signal
import subprocess
import time

import torch

from pretrain_run import REPO, command, env


def _killpg(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def data_args(corpus):
    return ["--data-path", corpus["data_path"], "--tokenizer-name-or-path", corpus["tokenizer"]]


class Job:
    """One torchrun job in its own process group (the agent and its ranks), output merged."""

    def __init__(self, nproc, args, extra_env=None, cmd=None):
        self.lines = []
        self.proc = subprocess.Popen(cmd or command(nproc, list(args)), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**env(), **(extra_env or {})}, cwd=REPO,
                                     start_new_session=True)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, needle, timeout=180):
        """Read output until a line contains ``needle``; fail with the tail when it never comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if needle in line:
                return line
        self.kill()
        raise AssertionError(f"'{needle}' not seen:\n" + self.output[-4000:])

    def kill(self):
        """SIGKILL to every process of the job at once, as when its node dies.

        torchrun starts each rank in a session of its own, so killing the agent's process group
        alone would not reach them (see test_orphaned_ranks_stop_when_their_agent_dies).
        """
        if self.proc.poll() is None:
            for pid in self.rank_pids().values():
                _killpg(pid)
            _killpg(self.proc.pid)
        self.finish(timeout=60)

    def kill_agent(self):
        """SIGKILL to the torchrun agent's process group only (the ranks live in sessions of their own)."""
        _killpg(self.proc.pid)

    def finish(self, timeout):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in self.rank_pids().values():
                _killpg(pid)
            _killpg(self.proc.pid)
            out, _ = self.proc.communicate()
            self.lines.append(out)
            raise AssertionError(f"job still running after {timeout} s:\n" + self.output[-4000:])
        self.lines.append(out)
        return self.proc.returncode

    def rank_pids(self):
        """{rank: pid} of the job's ranks (children of the torchrun agent)."""
        found = {}
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    environ = fh.read().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):  # exited meanwhile (ESRCH while it is reaped)
                continue
            for entry in environ:
                if entry.startswith(b"RANK="):
                    found[int(entry[5:])] = int(pid)
        return found


def tensors(obj, prefix=""):
    """{path: tensor} of every tensor in a nested checkpoint object."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def checkpoint_tensors(folder):
    """{file/path: tensor} over every .pt file of a checkpoint folder (weights, optimizer, RNG, state)."""
    from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable

    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".pt"):
                path = os.path.join(root, name)
                with megatron_enums_importable():  # engine files hold Megatron-DeepSpeed's args
                    obj = torch.load(path, map_location="cpu", weights_only=False)
                found.update(tensors(obj, os.path.relpath(path, folder)))
    return found
