import itertools

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron_bloom.distributed.topology import ParallelDims


def layouts(max_world=384):
    """Every (tp, pp, dp) with tp, dp in powers of two or BLOOM's sizes and world <= max_world."""
    out = set()
    for tp, pp, dp in itertools.product([1, 2, 3, 4, 8], [1, 2, 3, 4, 6, 12], [1, 2, 3, 4, 8]):
        if tp * pp * dp <= max_world:
            out.add((tp, pp, dp))
    out.add((4, 12, 8))  # BLOOM-176B: 384 ranks
    return sorted(out)


@pytest.mark.parametrize("tp, pp, dp", layouts())
def test_matches_deepspeed_topology(tp, pp, dp):
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    assert ds.world_size() == dims.world_size
    for rank in range(dims.world_size):
        c = ds.get_coord(rank)
        assert dims.coord(rank) == (c.pipe, c.data, c.model)
        assert dims.rank(c.pipe, c.data, c.model) == rank
    canon = lambda groups: sorted(sorted(g) for g in groups)
    assert canon(dims.tp_groups()) == canon(ds.get_axis_comm_lists("model") or [[r] for r in range(dims.world_size)])
    assert canon(dims.dp_groups()) == canon(ds.get_axis_comm_lists("data") or [[r] for r in range(dims.world_size)])
    assert canon(dims.pp_groups()) == canon(ds.get_axis_comm_lists("pipe") or [[r] for r in range(dims.world_size)])


@pytest.mark.parametrize("tp, pp, dp", layouts())
def test_groups_partition_the_world(tp, pp, dp):
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    world = list(range(dims.world_size))
    for groups, size in (
        (dims.tp_groups(), tp),
        (dims.dp_groups(), dp),
        (dims.pp_groups(), pp),
        (dims.model_parallel_groups(), tp * pp),
    ):
        assert sorted(r for g in groups for r in g) == world
        assert all(len(g) == size for g in groups)
    # Embedding groups: first and last stage of every pipeline.
    for g, pipe in zip(dims.embedding_groups(), dims.pp_groups()):
        assert g == sorted({pipe[0], pipe[-1]})
        assert dims.coord(g[0]).pp == 0 and dims.coord(g[-1]).pp == pp - 1


def test_worked_example_16_ranks():
    """The layout written out in topology.py's docstring."""
    d = ParallelDims(tp=2, pp=4, dp=2)
    assert d.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert d.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert d.pp_groups() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert d.model_parallel_groups() == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert d.embedding_groups() == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert d.coord(11) == (2, 1, 1)


def test_bloom_176b_layout():
    d = ParallelDims(tp=4, pp=12, dp=8)
    assert d.world_size == 384
    assert d.tp_groups()[0] == [0, 1, 2, 3]  # TP peers adjacent: one node's NVLink domain
    assert d.pp_groups()[0] == [32 * s for s in range(12)]
    assert d.embedding_groups()[5] == [5, 5 + 32 * 11]
    assert len(d.dp_groups()) == 48 and d.dp_groups()[0] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert d.coord(383) == (11, 7, 3)


def test_single_rank_and_bad_dims():
    d = ParallelDims(1, 1, 1)
    assert d.tp_groups() == d.dp_groups() == d.pp_groups() == d.embedding_groups() == [[0]]
    with pytest.raises(ValueError, match="tp=0"):
        ParallelDims(0, 1, 1)
