"""Stop requests: SIGTERM / SIGUSR1 (SLURM preemption or time limit), a kill-switch file.

A handler only records the request; the training loop acts on it at the next step boundary,
after agreeing with every rank (a rank that saw the signal late must not keep stepping while
the others save). The run then saves and exits with ``EXIT_REQUEUE``, which the sbatch scripts
turn into ``scontrol requeue``.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch.distributed as dist

from megatron_bloom.distributed.collectives import all_reduce_values

EXIT_REQUEUE = 3
"""Exit code meaning "saved, please requeue me" (the sbatch scripts check for it)."""


class StopRequests:
    def __init__(self, kill_switch_path: Optional[str] = None):
        self.kill_switch_path = kill_switch_path
        self.signal_received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopRequests":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        # A mask inherited from the launching process (blocked signals survive fork and exec) would
        # hold a preemption signal pending forever: the run would never save before being killed.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signal_received = signum

    def kill_switch(self) -> bool:
        return bool(self.kill_switch_path) and os.path.exists(self.kill_switch_path)

    def agreed(self) -> tuple[bool, bool]:
        """(signal on any rank, kill switch on any rank), the same answer on every rank."""
        flags = [1.0 if self.signal_received is not None else 0.0, 1.0 if self.kill_switch() else 0.0]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = all_reduce_values(flags, op="max")
        return bool(flags[0]), bool(flags[1])
