"""The ``mpu`` interface DeepSpeed's non-pipeline engine asks for, answered from a ParallelState.

DeepSpeed calls "model parallel" what we call tensor parallel when there is no pipeline: its
gradient-norm all-reduce runs over ``get_model_parallel_group`` and its data-parallel gradient
all-reduce over ``get_data_parallel_group`` (which must exclude TP peers).
"""
from __future__ import annotations

import torch.distributed as dist

from .parallel_state import ParallelState


class DeepSpeedMPU:
    def __init__(self, state: ParallelState):
        self.state = state

    # tensor (= model) parallel
    def get_model_parallel_group(self):
        return self.state.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.tp_ranks[0]

    # pipeline (always 1 on this path)
    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.state.dims.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.state.pp_rank

    def get_pipeline_model_parallel_group(self):
        return self.state.pp_group

    # data parallel
    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dims.dp

    def get_data_parallel_group_ranks(self):
        return list(self.state.dp_ranks)

    def get_global_rank(self) -> int:
        return dist.get_rank()
