"""The layouts BigScience published for BLOOM and BLOOMZ, as the slurm/ recipes use them.

Pretraining (bigscience-workshop/bigscience, train/tr11-176B-ml and its smaller_models/): the
small models ran on Jean Zay's V100 32GB partition, 4 GPUs per node, in fp16 with DeepSpeed
ZeRO-0 (bloom-1b7's recipe too; the others here ZeRO-1, which resumes at another layout through
universal checkpoints); BLOOM-176B on 48 nodes x 8 A100 80GB in bf16 at ZeRO-0. BLOOMZ
(train/tr13-mtf): bloom-7b1 on 8 nodes x 8 A100 80GB, TP=1, PP=1, DP=64, fp16; bloom-176b on 36
nodes x 8, TP=1, bf16 at ZeRO-0. Where the trainer still refuses a published value the
recipe and this table hold its deviation; tests/recipes/test_published_recipes.py lists them, and
tests/unit/test_plan.py checks that this table and the recipes agree.
Old names in the training scripts: 350M = bloom-560m, 760M = 1b1, 1B3 = 1b7, 2B5 = 3b, 6B3 = 7b1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class PublishedLayout:
    model_name: str
    """Architecture (a NAMED_MODELS key); BLOOMZ-7b1 finetunes bloom-7b1."""
    nodes: int
    gpus_per_node: int
    gpu: str
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    precision: str
    checkpoint_activations: bool
    zero_stage: int = 1
    rampup_batch_size: Optional[Tuple[int, int, int]] = None
    source: str = ""
    finetune: bool = False
    """Run by launch/finetune.py (packed samples) rather than launch/pretrain.py."""

    @property
    def data_parallel_size(self) -> int:
        world = self.nodes * self.gpus_per_node
        return world // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


_RAMP16 = (192, 16, 9_765_625)
_RAMP32 = (192, 32, 9_765_625)
# BigScience's script ramped bloom-560m by 16 at DP=32; Megatron tolerated batches that micro-batch
# x DP does not divide, our trainer refuses them, so it ramps by 32.

PUBLISHED: Dict[str, PublishedLayout] = {
    "bloom-560m": PublishedLayout("bloom-560m", 8, 4, "v100-32g", 1, 1, 1, 256, "fp16", False, 1, _RAMP32, "tr11e-350M-ml"),
    "bloom-1b1": PublishedLayout("bloom-1b1", 8, 4, "v100-32g", 1, 2, 1, 256, "fp16", False, 1, _RAMP16, "tr11d-760M-ml"),
    "bloom-1b7": PublishedLayout("bloom-1b7", 16, 4, "v100-32g", 2, 2, 1, 512, "fp16", True, 0, _RAMP16, "tr11b-1B3-ml"),
    "bloom-3b": PublishedLayout("bloom-3b", 32, 4, "v100-32g", 4, 4, 1, 512, "fp16", True, 1, _RAMP32, "tr11c-2B5-ml"),
    "bloom-7b1": PublishedLayout("bloom-7b1", 32, 4, "v100-32g", 4, 4, 1, 512, "fp16", True, 1, _RAMP32, "tr11f-6B3-ml"),
    "bloom-176b": PublishedLayout("bloom-176b", 48, 8, "a100-80g", 4, 12, 2, 2048, "bf16", True, 0, _RAMP16, "tr11-176B-ml"),
    "bloomz-7b1": PublishedLayout("bloom-7b1", 8, 8, "a100-80g", 1, 1, 4, 2048, "fp16", True, 1, None, "tr13f-6B3-mtf (xP3)",
                                  finetune=True),
    "bloomz-176b": PublishedLayout("bloom-176b", 36, 8, "a100-80g", 1, 72, 1, 2048, "bf16", True, 0, None,
                                   "tr13-176B-mtf (xP3)", finetune=True),
}
"""Run name (model, or bloomz-* for a finetune) -> its published layout (the slurm/ recipe of that name)."""
