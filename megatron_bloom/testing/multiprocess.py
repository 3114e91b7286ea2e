"""Run a function on N gloo ranks and collect what each returns, without ever hanging the caller.

- ``spawn`` start method: a forked child would inherit the parent's threads and torch state;
- a free port per call, so tests can run back to back;
- a hard deadline: when it passes, every rank still running is killed and the error names the
  ranks that stalled (usually the ones stuck in a collective that a crashed rank never joined);
- the first rank that raises fails the call with that rank's traceback.

The function must be importable by the children (defined at module level of an importable file).
"""
from __future__ import annotations

import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

from megatron_bloom.distributed.init import shutdown
from megatron_bloom.distributed.launch_env import free_port


class RankFailure(AssertionError):
    """A rank raised, exited without reporting, or stalled past the deadline."""


def _worker(rank, world_size, port, fn, args, kwargs, results, env, init, threads, timeout_s):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import torch
    import torch.distributed as dist

    # Oversubscribed cores: more than a thread or two per rank only adds contention.
    torch.set_num_threads(threads)
    try:
        if init:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        out = fn(*args, **kwargs)
        results.put(("ok", rank, out))
        together = True
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put(("error", rank, traceback.format_exc()))
        together = False
    shutdown(together=together)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: Optional[Dict[str, str]] = None,
    init: bool = True,
    threads: int = 1,
    **kwargs: Any,
) -> List[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the results by rank.

    With ``init=True`` the default gloo group is up when ``fn`` starts (rank and world size come
    from ``torch.distributed``); collectives time out a little before the call's own deadline so a
    rank stuck in one reports instead of being killed silently.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    collective_timeout = max(5.0, timeout * 0.8)
    procs = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs, results, dict(env or {}), init, threads, collective_timeout),
            daemon=True,
        )
        p.start()
        procs.append(p)

    outputs: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    stalled = sorted(set(range(world_size)) - set(outputs))
                    raise RankFailure(
                        f"rank(s) {stalled} of {world_size} stalled: no result after {timeout:.0f} s"
                    ) from None
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    # Give a dying rank's queued traceback a moment to arrive before giving up on it.
                    time.sleep(0.5)
                    if results.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RankFailure(f"rank(s) {dead} exited without a result (exit codes {codes})") from None
                continue
            if status == "error":
                raise RankFailure(f"rank {rank} of {world_size} raised:\n{payload}")
            outputs[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10 if len(outputs) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [outputs[r] for r in range(world_size)]


def run_each(fn: Callable[..., Any], world_sizes: Sequence[int], *args: Any, **kwargs: Any) -> Dict[int, List[Any]]:
    """``run_distributed`` for several world sizes (parity tests over TP=1/2/4 and the like)."""
    return {ws: run_distributed(fn, ws, *args, **kwargs) for ws in world_sizes}


def launcher_env(repo: Optional[str] = None) -> Dict[str, str]:
    """The environment a test gives a launched process tree (torchrun, an entry point): DeepSpeed's
    CPU accelerator, one OpenMP thread per rank, unbuffered output, ``repo`` first on PYTHONPATH,
    and none of the caller's rank variables (a child that inherited them would join another job)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if repo:
        env["PYTHONPATH"] = repo + os.pathsep + os.environ.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
