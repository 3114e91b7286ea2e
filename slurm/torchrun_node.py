#!/usr/bin/env python
"""torchrun for one node of a SLURM job, made safe for SLURM's stop signal. srun starts one per node:

    srun --ntasks-per-node=1 python slurm/torchrun_node.py [--requeue-marker FILE] -- \\
        --nnodes 48 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT ... \\
        launch/pretrain.py --tensor-model-parallel-size 4 ...

Everything after ``--`` is torchrun's own command line, run by torchrun's own code
(``torch.distributed.run.run``: same flags, same c10d rendezvous, same elastic agent). Three
things differ, all about SIGUSR1, the signal the recipes ask SLURM to send before the time limit
(``--signal=USR1@600``) and that ``scancel --signal=USR1`` sends:

1. The agent never dies of it. torchrun handles TERM/INT/HUP/QUIT; USR1's default action would
   kill the agent, and with it the rendezvous store the other nodes use. Here USR1 is blocked in
   the agent and a thread takes it with ``sigwait`` and forwards it to the ranks (the agent's child
   processes), then again every ``--resend-seconds`` until they exit. (SLURM may also deliver USR1
   to the ranks itself: proctrack/cgroup and linuxproc signal every process of the step. A second
   USR1 changes nothing.)
2. No rank can die of it before the trainer listens. A rank inherits the blocked mask through fork
   and exec, so a USR1 that arrives while it starts stays pending; a one-line exec shim in front of
   the rank's command sets USR1 to "ignore" (which discards the pending one and survives exec) and
   unblocks it. The trainer later installs its handler, and the resend delivers the stop request
   then (the trainer saves at the next step boundary and exits 3).
3. The ranks' verdict comes back. torchrun exits 1 whatever its workers returned. When the ranks
   that ended all returned EXIT_REQUEUE (3: "checkpoint saved, requeue me"), this writes
   ``--requeue-marker`` (``{node}`` replaced by SLURM_NODEID) and exits 0 - a clean stop must
   not look like a failure to ``srun --kill-on-bad-exit``, which would kill the other nodes while
   they finish - or exits 3 when no marker is given. Any other failure exits with the first failed
   rank's code (128 + signal for a signal).
"""
from __future__ import annotations

import signal

# First statement: from here on a USR1 waits for the receiver thread instead of killing this process
# (what is left is the interpreter's own start-up, a few tens of milliseconds after srun starts the step).
# Only when run as the node's launcher: a process importing this module (a test) keeps its signal mask,
# which every child it starts would otherwise inherit.
if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import List  # noqa: E402

EXIT_REQUEUE = 3
"""megatron_bloom.training.signals.EXIT_REQUEUE (not imported: that module starts torch.distributed)."""

_IGNORE_USR1_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1}); os.execvp(sys.argv[1], sys.argv[1:])"
)
"""Run as ``python -c`` in front of each rank's command (which starts with USR1 blocked, like the
agent): ignore USR1 (a pending one is discarded), unblock it, exec. Exec keeps "ignored"."""


def _log(message: str) -> None:
    print(f"torchrun_node[{os.environ.get('SLURM_NODEID', '?')}]: {message}", file=sys.stderr, flush=True)


def _children() -> List[int]:
    """PIDs whose parent is this process: torchrun's agent starts the ranks as direct children."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me:
            out.append(int(entry))
    return out


class StopForwarder:
    """Take SIGUSR1 off the agent (blocked, received by a thread) and pass it on to the ranks."""

    def __init__(self, resend_seconds: float):
        self.resend_seconds = resend_seconds
        self.requested = threading.Event()

    def install(self) -> None:
        """Call before any other thread exists: threads and children inherit the blocked mask."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        # Started with USR1 ignored, a blocked USR1 would be discarded, not queued for sigwait.
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        threading.Thread(target=self._receive, name="usr1-receiver", daemon=True).start()
        threading.Thread(target=self._resend, name="usr1-resend", daemon=True).start()

    def forward(self) -> None:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def _receive(self) -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            if not self.requested.is_set():
                _log("SIGUSR1: asking the ranks to save and stop")
            self.requested.set()
            self.forward()

    def _resend(self) -> None:
        # A rank that was still starting ignored the first one; repeat until the ranks are gone.
        self.requested.wait()
        while True:
            time.sleep(self.resend_seconds)
            self.forward()


def _wrap_ranks(args) -> None:
    """Put the ignore-USR1 shim in front of the rank command torchrun would run."""
    python = os.getenv("PYTHON_EXEC", sys.executable)
    if args.no_python:
        real = [args.training_script]
    elif args.module:
        real = [python, "-u", "-m", args.training_script]
    else:
        real = [python, "-u", args.training_script]
    args.training_script_args = ["-c", _IGNORE_USR1_THEN_EXEC, *real, *args.training_script_args]
    args.training_script = python
    args.no_python, args.module = True, False
    if getattr(args, "run_path", False):
        raise SystemExit("torchrun_node.py: --run-path is not supported")
    handled = [s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() != "SIGUSR1"]
    args.signals_to_handle = ",".join(handled)


def _verdict(failures) -> int:
    """Node exit code from torchrun's ProcessFailure records (exitcode < 0 is -signal).

    Requeue when the first rank to end returned EXIT_REQUEUE and every other one did too or was
    stopped by the agent afterwards (torchrun SIGTERMs the rest as soon as one rank ends; a rank
    past its training loop no longer handles SIGTERM, so it shows as -15, or -9 after the timeout).
    The trainer only exits 3 after every rank's part of the checkpoint is on disk.
    """
    ordered = sorted(failures.values(), key=lambda f: f.timestamp)
    first = ordered[0].exitcode
    stopped_by_agent = (-signal.SIGTERM, -signal.SIGKILL)
    if first == EXIT_REQUEUE and all(f.exitcode in (EXIT_REQUEUE, *stopped_by_agent) for f in ordered):
        return EXIT_REQUEUE
    return first if first > 0 else 128 + (-first if first < 0 else 1)


def main(argv: List[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: torchrun_node.py [--requeue-marker FILE] [--resend-seconds S] -- TORCHRUN_ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="torchrun_node.py")
    parser.add_argument("--requeue-marker", help="file written (and exit 0) when the ranks stopped for requeue")
    parser.add_argument("--resend-seconds", type=float, default=30.0,
                        help="resend SIGUSR1 to the ranks this often until they exit (default 30)")
    opts = parser.parse_args(argv[:split])
    forwarder = StopForwarder(opts.resend_seconds)
    forwarder.install()  # before importing torch, which may start threads

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv[split + 1:])
    _wrap_ranks(args)
    try:
        run(args)
        code = 0
    except ChildFailedError as exc:
        code = _verdict(exc.failures)
        _log(f"ranks failed: {', '.join(f'rank {r} exit {f.exitcode}' for r, f in sorted(exc.failures.items()))}")
    except SignalException as exc:
        _log(f"agent stopped by {exc.sigval.name}")
        code = 128 + int(exc.sigval)
    if code == EXIT_REQUEUE:
        _log("ranks saved a checkpoint and stopped for requeue (exit code 3)")
        if opts.requeue_marker:
            marker = opts.requeue_marker.replace("{node}", os.environ.get("SLURM_NODEID", "0"))
            os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
            with open(marker, "w") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} job {os.environ.get('SLURM_JOB_ID', '?')}\n")
            return 0
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
