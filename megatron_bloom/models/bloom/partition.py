"""Which pipeline stage holds which layer: DeepSpeed's PipelineModule cut of BLOOM's layer list.

The names are those DeepSpeed's ``type:REGEX`` partitioning sees in ``pipeline.py``'s specs, which
are Megatron-DeepSpeed's ``GPTModelPipe`` names, so that every method cuts as it did for BLOOM::

    idx 0        _to_float16
    idx 1        EmbeddingPipe                  (tied: the input embedding)
    idx 2        <lambda>
    idx 3..L+2   ParallelTransformerLayerPipe
    idx L+3      undo
    idx L+4      MixedFusedLayerNorm
    idx L+5      EmbeddingPipe                  (tied: the LM head)
    idx L+6      float16_to_fp32                (fp16 and bf16 runs only)

DeepSpeed's PipelineModule lower-cases the method and then cuts:

    uniform       the specs, weightless ones too, into PP runs of equal length; the first
                  ``len % PP`` runs take one more (``partition_uniform``)
    parameters    ``partition_balanced`` over each spec's trainable parameters on its TP rank
    type:REGEX    ``partition_balanced`` over weights 1 for specs whose name the REGEX (the text up
                  to the next ':') finds, case-insensitively, and 0 for the others

``partition_balanced`` minimises (largest part - smallest part); on 0/1 weights that gives every
stage the same number of counted layers, the first ones taking the remainder, with each boundary
right before a counted layer, so a weightless spec stays with the stage before it. Worked example,
BLOOMZ-176B (``type:transformer|embedding``, 70 blocks + 2 embeddings = 72 counted layers, bf16)
on 72 stages::

    stage 0      _to_float16, EmbeddingPipe, <lambda>
    stage 1..69  one block each
    stage 70     the last block, undo, MixedFusedLayerNorm
    stage 71     EmbeddingPipe (the LM head), float16_to_fp32

and on 12 stages: 6 counted layers each, so 5 blocks on stage 0 and 11, 6 on the others.

Every stage needs a layer with weights (a stage without one has nothing to train and DeepSpeed's
optimizer refuses it); ``max_stages`` is the most stages a method can fill. No torch here: the
configuration checks (``config/validate.py``) and the planner use this module.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import List, Tuple

from megatron_bloom.models.bloom.config import ModelConfig
from megatron_bloom.models.bloom.sharding import EMBEDDING_LAYER

EMBEDDING, BLOCK, FINAL_LN = "EmbeddingPipe", "ParallelTransformerLayerPipe", "MixedFusedLayerNorm"
"""Class names of the pipeline layers with weights (``pipeline.py``)."""
TO_FLOAT16, TO_SEQUENCE_FIRST, UNDO, TO_FP32 = "_to_float16", "<lambda>", "undo", "float16_to_fp32"
"""Names of the weightless functions in the list."""


def layer_names(num_layers: int, half_precision: bool = False) -> List[str]:
    names = [TO_FLOAT16, EMBEDDING, TO_SEQUENCE_FIRST, *[BLOCK] * num_layers, UNDO, FINAL_LN, EMBEDDING]
    return names + [TO_FP32] if half_precision else names


def block_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """One block's parameters on one TP rank (biases of the row-parallel linears are replicated)."""
    h, f = cfg.hidden_size, cfg.ffn_size
    return 4 * h + (3 * h * h + 3 * h) // tp + h * h // tp + h + (f * h + f) // tp + f * h // tp + h


def layer_parameters(idx: int, name: str, cfg: ModelConfig, tp: int = 1) -> int:
    """Trainable parameters of spec ``idx`` built on one TP rank (what DeepSpeed's ``parameters`` counts).

    Only the input embedding's copy of the tied embedding (``EMBEDDING_LAYER``) has a LayerNorm (``pipeline.EmbeddingPipe``).
    """
    h = cfg.hidden_size
    if name == EMBEDDING:
        return cfg.padded_vocab_size(tp) * h // tp + (2 * h if idx == EMBEDDING_LAYER else 0)
    if name == FINAL_LN:
        return 2 * h
    if name == BLOCK:
        return block_parameters(cfg, tp)
    return 0


def partition_weights(names: List[str], method: str, cfg: ModelConfig, tp: int = 1) -> Tuple[int, ...]:
    """The weight DeepSpeed gives each spec under ``method`` ('type:...' or 'parameters')."""
    method = method.lower()
    if method == "parameters":
        return tuple(layer_parameters(i, n, cfg, tp) for i, n in enumerate(names))
    if method.startswith("type:"):
        regex = re.compile(method.split(":")[1], re.IGNORECASE)
        return tuple(1 if regex.search(n) else 0 for n in names)
    raise ValueError(f"pp_partition_method '{method}' has no weights: 'parameters' or 'type:REGEX'")


def _uniform(num_items: int, num_parts: int) -> Tuple[int, ...]:
    """Boundaries of ``num_parts`` contiguous runs; the first ``num_items % num_parts`` get one more."""
    if num_items <= num_parts:
        return tuple(min(p, num_items) for p in range(num_parts + 1))
    q, r = divmod(num_items, num_parts)
    return tuple(p * q + min(p, r) for p in range(num_parts + 1))


@lru_cache(maxsize=512)
def _balanced(weights: Tuple[int, ...], num_parts: int) -> Tuple[int, ...]:
    counted = [i for i, w in enumerate(weights) if w]
    if len(weights) <= num_parts:
        return _uniform(len(weights), num_parts)
    if set(weights) <= {0, 1} and num_parts <= len(counted):
        # 0/1 weights: equal numbers of counted layers, a boundary right before the first counted
        # layer of each part (the cut partition_balanced finds; the tests compare the two).
        sizes = _uniform(len(counted), num_parts)
        return (0, *[counted[sizes[p]] for p in range(1, num_parts)], len(weights))
    # Any other weights: DeepSpeed's own dynamic program, so the cut is the engine's.
    from deepspeed.runtime.utils import partition_balanced

    return tuple(int(b) for b in partition_balanced(list(weights), num_parts))


def partition(cfg: ModelConfig, pp: int, method: str, tp: int = 1, half_precision: bool = False) -> Tuple[int, ...]:
    """Stage boundaries over ``layer_names``: stage i holds specs [b[i], b[i+1])."""
    names = layer_names(cfg.num_layers, half_precision)
    if method.lower() == "uniform":
        return _uniform(len(names), pp)
    return _balanced(partition_weights(names, method, cfg, tp), pp)


def stage_layers(cfg: ModelConfig, pp: int, method: str, tp: int = 1, half_precision: bool = False) -> List[List[int]]:
    """The spec indices on each stage."""
    b = partition(cfg, pp, method, tp, half_precision)
    return [list(range(b[i], b[i + 1])) for i in range(pp)]


def stages_without_weights(cfg: ModelConfig, pp: int, method: str, tp: int = 1,
                           half_precision: bool = False) -> List[int]:
    """Stages that would hold no layer with weights (none or only weightless functions)."""
    names = layer_names(cfg.num_layers, half_precision)
    return [s for s, idxs in enumerate(stage_layers(cfg, pp, method, tp, half_precision))
            if not any(layer_parameters(i, names[i], cfg, tp) for i in idxs)]


def max_stages(cfg: ModelConfig, method: str, tp: int = 1, half_precision: bool = False) -> int:
    """The most stages ``method`` fills, every one holding a layer with weights.

    ``type:transformer|embedding`` in fp16/bf16: num_layers + 2 (in fp32, without the last
    function, DeepSpeed's cut at num_layers + 3 gives the final LayerNorm a stage too);
    ``type:transformer`` in fp16/bf16: num_layers.
    """
    names = layer_names(cfg.num_layers, half_precision)
    with_weights = sum(1 for i, n in enumerate(names) if layer_parameters(i, n, cfg, tp))
    for pp in range(with_weights, 1, -1):
        if not stages_without_weights(cfg, pp, method, tp, half_precision):
            return pp
    return 1
