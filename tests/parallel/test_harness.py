"""The multi-rank harness itself, and process-group construction over gloo."""
import time

import pytest
import torch
import torch.distributed as dist

from megatron_bloom.distributed import init_distributed
from megatron_bloom.testing import RankFailure, run_distributed

pytestmark = pytest.mark.distributed


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise RuntimeError("boom on purpose")
    return dist.get_rank()


def _rank_two_stalls():
    if dist.get_rank() == 2:
        time.sleep(600)
    return dist.get_rank()


def _groups(tp, pp):
    state = init_distributed(tp=tp, pp=pp, backend="gloo", timeout_minutes=1)

    def reduce_over(group):
        t = torch.tensor([float(state.rank)])
        dist.all_reduce(t, group=group)
        return t.item()

    return {
        "coord": tuple(state.coord),
        "tp": reduce_over(state.tp_group),
        "dp": reduce_over(state.dp_group),
        "pp": reduce_over(state.pp_group),
        "emb": reduce_over(state.embedding_group),
        "ranks": (state.tp_ranks, state.dp_ranks, state.pp_ranks, state.embedding_ranks),
    }


def test_results_by_rank():
    out = run_distributed(_all_reduce_rank, 4, timeout=60)
    assert out == [(r, 6.0) for r in range(4)]


def test_error_names_rank():
    with pytest.raises(RankFailure, match="rank 1 of 2 raised:[\\s\\S]*boom on purpose"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def test_stall_names_rank():
    start = time.monotonic()
    # The deadline must leave time to start 3 ranks on a loaded 2-core machine (seen: > 8 s).
    with pytest.raises(RankFailure, match=r"rank\(s\) \[2\] of 3 stalled"):
        run_distributed(_rank_two_stalls, 3, timeout=45)
    assert time.monotonic() - start < 75


def test_init_distributed_builds_the_documented_groups():
    """8 ranks, TP=2, PP=2, DP=2: each group sums exactly the ranks topology.py lists."""
    from megatron_bloom.distributed import ParallelDims

    dims = ParallelDims(tp=2, pp=2, dp=2)
    out = run_distributed(_groups, 8, 2, 2, init=False, timeout=90)
    for rank, res in enumerate(out):
        assert res["coord"] == tuple(dims.coord(rank))
        tp, dp, pp, emb = res["ranks"]
        assert tp == dims.group_of(dims.tp_groups(), rank)
        assert dp == dims.group_of(dims.dp_groups(), rank)
        assert pp == dims.group_of(dims.pp_groups(), rank)
        assert emb == dims.group_of(dims.embedding_groups(), rank)
        assert res["tp"] == sum(tp) and res["dp"] == sum(dp) and res["pp"] == sum(pp) and res["emb"] == sum(emb)


def _leave_through_entry_point(fail_on_rank_zero):
    """Rank 1's main returns 3 s after rank 0's; report when rank 1's main ended and each rank left."""
    from megatron_bloom.cli import entry_point
    from megatron_bloom.errors import UserError

    main_ended = {}

    def main():
        if dist.get_rank() == 0:
            if fail_on_rank_zero:
                raise UserError("bad input on purpose")
            return 0
        time.sleep(3.0)
        main_ended[1] = time.time()
        return 0

    try:
        entry_point(main)()
    except SystemExit as exc:
        return exc.code, time.time(), main_ended.get(1)


def test_a_finished_run_leaves_together_and_a_failed_one_does_not_wait():
    # The normal end waits at a barrier before the group goes down: a DeepSpeed run whose ranks
    # left one by one sometimes aborted at interpreter exit. Rank 0 leaves after rank 1's main ended.
    (code0, left0, _), (code1, _, main_ended1) = run_distributed(_leave_through_entry_point, 2, False, timeout=60)
    assert code0 == code1 == 0
    assert left0 >= main_ended1, f"rank 0 left {main_ended1 - left0:.1f} s before rank 1's main ended"
    # A user error leaves at once with its one-line error (exit 2); nobody waits for it.
    (code0, left0, _), (code1, _, main_ended1) = run_distributed(_leave_through_entry_point, 2, True, timeout=60)
    assert (code0, code1) == (2, 0)
    assert left0 < main_ended1, "the failing rank waited for its peer"


def _denormals_after_start_up(start_threads_first):
    """Nonzero denormal results of a parallel op, after init_distributed (worker threads started before, or not)."""
    import warnings

    from megatron_bloom.distributed.init import surviving_denormals

    if start_threads_first:
        (torch.ones(1 << 20) * 2).sum()  # the intra-op thread pool exists from here on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init_distributed(tp=1, pp=1, backend="gloo", timeout_minutes=1)
    return surviving_denormals(), [str(w.message) for w in caught]


def test_start_up_flushes_denormals_on_every_cpu_thread():
    # ALiBi scores underflow to denormals in the attention softmax, which x86 computes much more
    # slowly; torch's worker threads inherit the flush only if they start after it.
    nonzero, warned = run_distributed(_denormals_after_start_up, 1, False, init=False, threads=2, timeout=60)[0]
    assert nonzero == 0 and not any("denormal" in w for w in warned), (nonzero, warned)
    # Too late: the worker threads keep computing denormals, and start-up says so.
    nonzero, warned = run_distributed(_denormals_after_start_up, 1, True, init=False, threads=2, timeout=60)[0]
    assert nonzero > 0 and any("flushed to zero on the main thread only" in w for w in warned), (nonzero, warned)
