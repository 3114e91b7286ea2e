"""Capacity planning for BLOOM layouts: parameters, memory per GPU, bubble, communication, step time.

    from megatron_bloom.planning import Cluster, Layout, accelerator, estimate
    e = estimate(named_model_config("bloom-176b"), Cluster(48, 8, accelerator("a100-80g")),
                 Layout(4, 12, micro_batch_size=2, global_batch_size=2048))

Pure arithmetic (no process, no allocation); ``launch/plan.py`` is the command line.
``planning.measure`` (imported on its own: it needs torch and DeepSpeed) counts what a live
engine holds, to check the memory model.
"""
from .estimate import Assumptions, Cluster, Estimate, Layout, estimate, run_config, search
from .hardware import ACCELERATORS, Accelerator, accelerator
from .memory import PlanError
from .published import PUBLISHED, PublishedLayout
from .stages import block_parameters, stages, total_parameters

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "Assumptions",
    "Cluster",
    "Estimate",
    "Layout",
    "PUBLISHED",
    "PlanError",
    "PublishedLayout",
    "accelerator",
    "block_parameters",
    "estimate",
    "run_config",
    "search",
    "stages",
    "total_parameters",
]
