"""The ``mpu`` interface DeepSpeed's non-pipeline engine asks for, answered from a ParallelState.

DeepSpeed calls "model parallel" what we call tensor parallel when there is no pipeline: its
gradient-norm all-reduce runs over ``get_model_parallel_group`` and its data-parallel gradient
all-reduce over ``get_data_parallel_group`` (which must exclude TP peers).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

from .parallel_state import ParallelState


def _answer(read: Callable[[ParallelState], Any]) -> Callable[["DeepSpeedMPU"], Any]:
    """A getter of DeepSpeed's interface that reads one value of the ParallelState."""
    return lambda mpu: read(mpu.state)


class DeepSpeedMPU:
    def __init__(self, state: ParallelState):
        self.state = state

    # tensor (= model) parallel
    get_model_parallel_group = get_tensor_model_parallel_group = _answer(lambda s: s.tp_group)
    get_model_parallel_rank = get_tensor_model_parallel_rank = _answer(lambda s: s.tp_rank)
    get_model_parallel_world_size = get_tensor_model_parallel_world_size = _answer(lambda s: s.dims.tp)
    get_tensor_model_parallel_src_rank = _answer(lambda s: s.tp_ranks[0])

    # pipeline (always 1 on this path)
    get_pipeline_model_parallel_world_size = _answer(lambda s: s.dims.pp)
    get_pipeline_model_parallel_rank = _answer(lambda s: s.pp_rank)
    get_pipeline_model_parallel_group = _answer(lambda s: s.pp_group)

    # data parallel
    get_data_parallel_group = _answer(lambda s: s.dp_group)
    get_data_parallel_rank = _answer(lambda s: s.dp_rank)
    get_data_parallel_world_size = _answer(lambda s: s.dims.dp)
    get_data_parallel_group_ranks = _answer(lambda s: list(s.dp_ranks))

    def get_global_rank(self) -> int:
        return dist.get_rank()
