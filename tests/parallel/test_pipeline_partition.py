"""Our pipeline stages against Megatron-DeepSpeed's: the same specs on every stage, for every method.

The reference is Megatron-DeepSpeed's ``GPTModelPipe`` layer list for BLOOM, transcribed below as
(name, parameters on one TP rank) from bigscience-workshop/Megatron-DeepSpeed, branch main,
``megatron/model/gpt_model.py`` (``GPTModelPipe.__init__``), with BLOOM's flags (ALiBi, so no
position embeddings; ``--embed-layernorm``; no token types; ffn = 4h):

    self.specs.append(_to_float16)                       a function named "_to_float16"
    TiedLayerSpec('embed', EmbeddingPipe, ...)           language_model.py: mpu.VocabParallelEmbedding,
                                                         Vp/t x h, whose LayerNorm (2h, mpu/layers.py)
                                                         exists only on the first pipeline stage
    lambda x: (x[0].transpose(0, 1).contiguous(), ...)   a function named "<lambda>"
    LayerSpec(ParallelTransformerLayerPipe, ...) x L     transformer.py: two LayerNorms, query_key_value,
                                                         dense, dense_h_to_4h, dense_4h_to_h
    def undo(x)                                          a function named "undo"
    LayerSpec(LayerNorm, ...)                            ``MixedFusedLayerNorm as LayerNorm``: 2h
    TiedLayerSpec('embed', EmbeddingPipe, forward_fn=_logits_helper, ...)
    self.specs.append(float16_to_fp32)                   module.py, only ``if args.fp16 or args.bf16``

That list is then cut by the installed DeepSpeed's own ``PipelineModule._partition_layers`` (run on
a stand-in module holding the list, so the method's parsing, the regex matching of names and the
parameter counting are DeepSpeed's), and compared with ``models/bloom/partition.py`` and with the
same DeepSpeed call over our real ``bloom_layer_specs``.
"""
from __future__ import annotations

import types
from typing import List, Tuple

import pytest
import torch
import torch.nn as nn

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.bloom import named_model_config
from megatron_bloom.models.bloom import partition as ours


def _to_float16(inputs):
    return inputs


def undo(x):
    return x


def float16_to_fp32(x):
    return x


def _mds_block_parameters(h: int, tp: int) -> int:
    """ParallelTransformerLayer's parameters on one TP rank (transformer.py, ffn = 4h)."""
    layernorms = 2 * (2 * h)  # input_layernorm, post_attention_layernorm
    query_key_value = (3 * h * h + 3 * h) // tp  # ColumnParallelLinear(h, 3h)
    dense = h * h // tp + h  # RowParallelLinear(h, h): bias whole on every rank
    dense_h_to_4h = (4 * h * h + 4 * h) // tp  # ColumnParallelLinear(h, 4h)
    dense_4h_to_h = 4 * h * h // tp + h  # RowParallelLinear(4h, h)
    return layernorms + query_key_value + dense + dense_h_to_4h + dense_4h_to_h


def mds_layers(cfg: ModelConfig, tp: int, half_precision: bool, first_stage: bool) -> List[Tuple[str, int]]:
    """GPTModelPipe's specs for BLOOM as (name DeepSpeed's type: regex sees, parameters built on a
    rank of the first pipeline stage or, ``first_stage=False``, of any other stage)."""
    assert cfg.ffn_size == 4 * cfg.hidden_size
    h = cfg.hidden_size
    embedding = cfg.padded_vocab_size(tp) * h // tp + (2 * h if first_stage else 0)
    layers = [("_to_float16", 0), ("EmbeddingPipe", embedding), ("<lambda>", 0)]
    layers += [("ParallelTransformerLayerPipe", _mds_block_parameters(h, tp))] * cfg.num_layers
    layers += [("undo", 0), ("MixedFusedLayerNorm", 2 * h), ("EmbeddingPipe", embedding)]
    return layers + [("float16_to_fp32", 0)] if half_precision else layers


def _stand_in_specs(layers: List[Tuple[str, int]]) -> List:
    """DeepSpeed specs with these names: functions, or LayerSpecs of modules holding that many
    parameters (on the meta device: only counted)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    functions = {"_to_float16": _to_float16, "<lambda>": lambda x: x, "undo": undo, "float16_to_fp32": float16_to_fp32}
    specs = []
    for name, count in layers:
        if name in functions:
            specs.append(functions[name])
            continue

        def init(self, n=count):
            nn.Module.__init__(self)
            self.weight = nn.Parameter(torch.empty(n, device="meta"))

        cls = type(name, (nn.Module,), {"__init__": init})
        specs.append(TiedLayerSpec("embed", cls) if name == "EmbeddingPipe" else LayerSpec(cls))
    return specs


def deepspeed_partition(specs: List, pp: int, method: str) -> List[int]:
    """The boundaries ``PipelineModule._partition_layers`` computes for ``specs`` on ``pp`` stages."""
    from deepspeed.pipe import PipelineModule

    module = types.SimpleNamespace(
        _layer_specs=specs, num_stages=pp, global_rank=1,  # not rank 0: no printout
        _topo=types.SimpleNamespace(get_coord=lambda rank: types.SimpleNamespace(pipe=0)),
        _set_bounds=lambda start, stop: None, loss_fn=None,
    )
    module._find_layer_type = types.MethodType(PipelineModule._find_layer_type, module)
    module._count_layer_params = types.MethodType(PipelineModule._count_layer_params, module)
    PipelineModule._partition_layers(module, method)
    return [int(b) for b in module.parts]


def reference(cfg: ModelConfig, pp: int, method: str, tp: int = 1, half_precision: bool = True) -> List[int]:
    """Megatron-DeepSpeed's cut. Under ``parameters`` its weights depend on the rank (the embedding
    LayerNorm exists on the first stage only); the test cases are ones where both views agree."""
    cuts = {tuple(deepspeed_partition(_stand_in_specs(mds_layers(cfg, tp, half_precision, first)), pp, method))
            for first in ((True, False) if method == "parameters" else (True,))}
    assert len(cuts) == 1, f"Megatron-DeepSpeed's ranks disagree on {method} at PP={pp}: {cuts}"
    return list(cuts.pop())


def _cfg(num_layers: int, name: str = "tiny") -> ModelConfig:
    return named_model_config(name, num_layers=num_layers)


METHODS = ["type:transformer|embedding", "type:transformer", "uniform", "parameters",
           "type:embedding", "type:layernorm|transformer", "type:pipe", "type:Transformer|EMBEDDING"]


def test_layer_names_are_megatron_deepspeeds():
    """Our specs carry GPTModelPipe's names and parameter counts (the reference's, with
    the tied LM head's copy built without the LayerNorm it never uses), both precisions."""
    from megatron_bloom.models.bloom.pipeline import bloom_layer_specs

    cfg = _cfg(3)
    for half in (False, True):
        specs = bloom_layer_specs(cfg, cfg.padded_vocab_size(1), half_precision=half)
        names = [getattr(s, "typename", s).__name__ for s in specs]
        assert names == [n for n, _ in mds_layers(cfg, 1, half, True)] == ours.layer_names(3, half)
        built = [sum(p.numel() for p in s.build().parameters()) if hasattr(s, "build") else 0 for s in specs]
        assert built == [ours.layer_parameters(i, n, cfg) for i, n in enumerate(names)]


@pytest.mark.parametrize("num_layers", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("half", [False, True])
def test_small_models_every_method_every_stage_count(num_layers, half):
    """Every PP up to num_layers + 3 (stages with only an embedding, or beyond), every method: our
    arithmetic, DeepSpeed over our real specs and DeepSpeed over GPTModelPipe's specs agree."""
    from megatron_bloom.models.bloom.pipeline import bloom_layer_specs

    cfg = _cfg(num_layers)
    specs = bloom_layer_specs(cfg, cfg.padded_vocab_size(1), half_precision=half)
    for method in METHODS:
        for pp in range(1, num_layers + 4):
            want = reference(cfg, pp, method, half_precision=half)
            assert list(ours.partition(cfg, pp, method, 1, half)) == want, (method, pp)
            assert deepspeed_partition(specs, pp, method) == want, (method, pp)


@pytest.mark.parametrize("model, num_layers, pp, method, half", [
    ("bloom-176b", 70, 72, "type:transformer|embedding", True),  # BLOOMZ-176B
    ("bloom-176b", 70, 12, "type:transformer|embedding", True),  # BLOOM-176B
    ("bloom-176b", 70, 72, "parameters", True),
    ("bloom-176b", 70, 12, "uniform", True),
    ("bloom-176b", 70, 70, "type:transformer", False),
    ("bloom-1b7", 24, 2, "type:transformer|embedding", False),
    ("bloom-1b7", 24, 2, "parameters", True),
    ("bloom-1b7", 24, 26, "type:transformer|embedding", True),
    ("bloom-3b", 30, 1, "type:transformer|embedding", True),
    ("bloom-3b", 30, 4, "type:pipe", True),
])
def test_bloom_sizes(model, num_layers, pp, method, half):
    cfg = _cfg(num_layers, model)
    want = reference(cfg, pp, method, half_precision=half)
    assert list(ours.partition(cfg, pp, method, 1, half)) == want


def test_bloomz_176b_stages():
    """70 blocks on 72 stages: the first and last stage hold only an embedding."""
    layers = ours.stage_layers(_cfg(70, "bloom-176b"), 72, "type:transformer|embedding", half_precision=True)
    names = ours.layer_names(70, half_precision=True)
    assert [names[i] for i in layers[0]] == ["_to_float16", "EmbeddingPipe", "<lambda>"]
    assert all([names[i] for i in layers[s]] == ["ParallelTransformerLayerPipe"] for s in range(1, 70))
    assert [names[i] for i in layers[70]] == ["ParallelTransformerLayerPipe", "undo", "MixedFusedLayerNorm"]
    assert [names[i] for i in layers[71]] == ["EmbeddingPipe", "float16_to_fp32"]


@pytest.mark.parametrize("method, half, most", [
    # fp16/bf16 (float16_to_fp32 last): the embeddings take two stages of their own, L + 2.
    ("type:transformer|embedding", True, 7), ("type:transformer", True, 5), ("uniform", True, 6),
    ("parameters", True, 8), ("type:embedding", True, 2),
    # fp32: DeepSpeed's cut at L + 3 also gives the final LayerNorm a stage of its own.
    ("type:transformer|embedding", False, 8), ("type:transformer", False, 7), ("uniform", False, 6),
    ("parameters", False, 8), ("type:embedding", False, 3),
])
def test_max_stages_is_the_last_layout_without_a_weightless_stage(method, half, most):
    cfg = _cfg(5)
    assert ours.max_stages(cfg, method, half_precision=half) == most
    assert not ours.stages_without_weights(cfg, most, method, half_precision=half)
    assert ours.stages_without_weights(cfg, most + 1, method, half_precision=half)


def test_layer_files_keep_megatron_deepspeeds_numbers():
    """The layer files of an embedding-only layout are named by spec index, as Megatron-DeepSpeed's."""
    from megatron_bloom.models.bloom import sharding

    cfg = _cfg(2)
    layers = ours.stage_layers(cfg, 4, "type:transformer|embedding")
    with_weights = [[i for i in idxs if i in sharding.weight_layers(2)] for idxs in layers]
    # The LM head's copy (idx 7) is tied to layer 1 and saved with it.
    assert with_weights == [[1], [3], [4, 6], []]
