"""Weights-only native checkpoints: write one from full weights, read one back merged, load it to train.

A *full state dict* here has transformers' ``BloomForCausalLM`` keys without ``lm_head.weight``
(it is tied) and only the real vocabulary rows::

    transformer.word_embeddings.weight            [vocab_size, h]
    transformer.word_embeddings_layernorm.weight  [h]             (and .bias)
    transformer.h.{i}.<block key>                 see BLOCK_KEYS
    transformer.ln_f.weight                       [h]             (and .bias)

A native checkpoint holds the same tensors as DeepSpeed pipeline layer files, one per pipeline
layer with weights and TP rank, in Megatron-DeepSpeed's BLOOM layout (numbering in
``models/bloom/sharding.py``, the layers in ``pipeline.py``)::

    <dir>/latest                                     "global_step0"
    <dir>/global_step0/layer_01-model_01-model_states.pt   word_embeddings.weight: rows [V/tp, 2V/tp)
                                                           of the padded embedding; word_embeddings.norm.*
    <dir>/global_step0/layer_{3+i}-model_XX-...            block i, sharded as in ``parallelize.py``
    <dir>/global_step0/layer_{L+4}-model_XX-...            the final LayerNorm: weight, bias
    <dir>/global_step0/mp_rank_XX_model_states.pt          Megatron-DeepSpeed's args and iteration
                                                           (TP x PP files; no weights: module None)
    <dir>/global_step0/megatron_bloom.pt                   iteration, layout, config, weights_only
    <dir>/global_step0/complete

A layer's file does not depend on the pipeline size, so one weights-only checkpoint serves every
PP; ``load_weights_only`` also reshards it to any TP, so it serves every layout. The embedding is
padded with zero rows to ``padded_vocab_size(tp)``; reading strips the padding again.

Conversions stream (``Layers``): a reader yields one pipeline layer's full tensors at a time and a
writer stores them before the next is read, so converting holds about one layer (the embedding
is the largest), never the model. ``read_native_checkpoint`` and friends still return a whole
state dict for callers that want one.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import sys
from collections import Counter
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from megatron_bloom.checkpoint.files import (
    COMPLETE,
    LATEST,
    LAYER_FILE,
    LAYER_FILE_GLOB,
    LAYER_FILE_RE,
    MP_RANK_FILE,
    MP_RANK_FILE_RE,
    STATE_FILE,
    TOKENIZER_DIR,
    atomic_torch_save,
    atomic_write_text,
    copy_tokenizer_files,
    tag_for,
)
from megatron_bloom.checkpoint.megatron_args import megatron_engine_state, megatron_enums_importable
from megatron_bloom.checkpoint.trust import safe_load
from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig, RunConfig
from megatron_bloom.layers.duplicated import tp_copies_drift
from megatron_bloom.models.spec import get_model_spec

StateDict = Dict[str, Tensor]
Layers = Iterator[StateDict]
"""A model's weights one pipeline layer at a time (embedding, each block, final LayerNorm), each
item with full-state-dict keys and real vocabulary rows."""


_SHARDING = get_model_spec().sharding
BLOCK_KEYS = _SHARDING.block_keys
"""A block's layer-local keys, in file order."""
SPLIT_DIM = _SHARDING.split_dim
"""Layer-local key -> the dim its TP shards are split on (the model's sharding table); every other key is replicated."""
EMBEDDING_KEY = _SHARDING.embedding_key

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``None`` (keep), a torch dtype, or one of fp32/fp16/bf16 (and their long names)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use fp32, fp16 or bf16")
    return _DTYPES[key]


# ---- keys and shapes ---------------------------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of a full state dict of ``cfg`` (real vocabulary rows only)."""
    h, f = cfg.hidden_size, cfg.ffn_size
    shapes: Dict[str, Tuple[int, ...]] = {
        "transformer.word_embeddings.weight": (cfg.vocab_size, h),
        "transformer.word_embeddings_layernorm.weight": (h,),
        "transformer.word_embeddings_layernorm.bias": (h,),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
    }
    block = {
        "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
        "self_attention.query_key_value.weight": (3 * h, h), "self_attention.query_key_value.bias": (3 * h,),
        "self_attention.dense.weight": (h, h), "self_attention.dense.bias": (h,),
        "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
        "mlp.dense_h_to_4h.weight": (f, h), "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (h, f), "mlp.dense_4h_to_h.bias": (h,),
    }
    for i in range(cfg.num_layers):
        for k, shape in block.items():
            shapes[f"transformer.h.{i}.{k}"] = shape
    return shapes


def check_state_dict(sd: StateDict, cfg: ModelConfig, source: Union[str, Dict[str, str]], partial: bool = False) -> None:
    """Raise a one-line UserError unless ``sd`` is exactly a full state dict of ``cfg`` (with
    ``partial``: a part of one, e.g. one layer). Only ``.shape`` is read: meta tensors do.

    ``source`` names where the tensors came from: one path, or a key -> file map.
    """
    def where(key: str) -> str:
        return source.get(key, "?") if isinstance(source, dict) else source

    shapes = expected_shapes(cfg)
    shape_of = (f"num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, "
                f"vocab_size={cfg.vocab_size}, ffn_hidden_size={cfg.ffn_size}")
    for key, shape in shapes.items():
        if key not in sd:
            if partial:
                continue
            files = sorted(set(source.values())) if isinstance(source, dict) else [source]
            raise UserError(f"{', '.join(files)[:300]}: tensor '{key}' is missing (expected a BLOOM with {shape_of})")
        if tuple(sd[key].shape) != shape:
            raise UserError(f"{where(key)}: '{key}' has shape {tuple(sd[key].shape)}, expected {shape} "
                            f"for a BLOOM with {shape_of}; the checkpoint is of another model shape")
    extra = sorted(set(sd) - set(shapes))
    if extra:
        raise UserError(f"{where(extra[0])}: unexpected tensor '{extra[0]}' (and {len(extra) - 1} more) "
                        f"for a BLOOM with {shape_of}")


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise UserError(f"tensor-parallel size must be >= 1, got {tp}")
    for name, value in (("num_attention_heads", cfg.num_attention_heads), ("ffn_hidden_size", cfg.ffn_size)):
        if value % tp:
            options = [d for d in range(1, value + 1) if value % d == 0 and d <= 64]
            raise UserError(f"{name}={value} is not divisible by tensor-parallel size {tp}; "
                            f"use one of {', '.join(map(str, options))}")


def layer_indices(cfg: ModelConfig) -> List[int]:
    """Pipeline indices of the layers with weights (one file per TP rank each)."""
    return _SHARDING.weight_layers(cfg.num_layers)


def layer_state(sd: StateDict, cfg: ModelConfig, idx: int) -> StateDict:
    """Full tensors of pipeline layer ``idx`` (one of ``layer_indices``) with layer-local keys."""
    table = _SHARDING.layer_table(idx, cfg.num_layers)
    return {k: sd[_SHARDING.full_key(idx, k, cfg.num_layers)] for k in table}


def full_keys(cfg: ModelConfig, idx: int, local: StateDict) -> StateDict:
    """Inverse of ``layer_state``: layer-local keys -> full-state-dict keys."""
    return {_SHARDING.full_key(idx, k, cfg.num_layers): v for k, v in local.items()}


def layers_of(sd: StateDict, cfg: ModelConfig) -> Layers:
    """A whole state dict as ``Layers`` (views, no copies)."""
    for idx in layer_indices(cfg):
        yield full_keys(cfg, idx, layer_state(sd, cfg, idx))


def checked_layers(layers: Iterable[StateDict], cfg: ModelConfig, source: Union[str, Dict[str, str]]) -> Layers:
    """``layers`` with every tensor's shape checked as it passes, and at the end that none was missing."""
    seen = set()
    for layer in layers:
        check_state_dict(layer, cfg, source, partial=True)
        seen.update(layer)
        yield layer
    shapes = expected_shapes(cfg)
    if len(seen) < len(shapes):
        # The message of a whole-state-dict check, naming the first missing tensor.
        check_state_dict({k: torch.empty(shape, device="meta") for k, shape in shapes.items() if k in seen}, cfg, source)


def collect(layers: Iterable[StateDict]) -> StateDict:
    """``Layers`` joined into one state dict (holds the whole model)."""
    sd: StateDict = {}
    for layer in layers:
        sd.update(layer)
    return sd


def _vocab_rows(t: Tensor, tp: int, rank: int, padded_vocab_size: int) -> Tensor:
    """Rank ``rank``'s rows of the embedding ``t`` [V, h] zero-padded to ``padded_vocab_size`` rows,
    without building the padded whole: [V_pad / tp, h]."""
    rows = padded_vocab_size // tp
    start = rank * rows
    out = t.new_zeros(rows, t.shape[1])
    real = t[start:start + rows]
    out[:real.shape[0]] = real
    return out


def shard_layer(full: StateDict, tp: int, rank: int, padded_vocab_size: int) -> StateDict:
    """TP rank ``rank``'s tensors of one layer (the embedding zero-padded to ``padded_vocab_size``)."""
    out = {}
    for key, t in full.items():
        if key == EMBEDDING_KEY and t.shape[0] < padded_vocab_size:
            out[key] = _vocab_rows(t, tp, rank, padded_vocab_size)
            continue
        dim = SPLIT_DIM.get(key)
        # clone: torch.save of a view would write the whole underlying storage.
        out[key] = t.clone() if dim is None or tp == 1 else t.chunk(tp, dim=dim)[rank].clone()
    return out


def merge_layer(shards: Sequence[StateDict], vocab_size: int, where: str) -> StateDict:
    """Inverse of ``shard_layer``: concatenate split tensors; TP-duplicated ones are checked.

    Copies of a duplicated tensor (LayerNorms, row-parallel biases) are equal in a healthy run and
    then taken as they are. Copies that drifted apart are averaged, as BLOOM's own converter merged
    them, and a warning names the tensor and the largest difference.
    """
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            raise UserError(f"{where}: TP rank {r} has keys {sorted(s)}, rank 0 has {sorted(keys)}")
    out = {}
    for key in keys:
        dim = SPLIT_DIM.get(key)
        if len(shards) == 1:
            out[key] = shards[0][key]
        elif dim is not None:
            out[key] = torch.cat([s[key] for s in shards], dim=dim)
        else:
            copies = [s[key] for s in shards]
            drift = tp_copies_drift(copies)
            out[key] = copies[0]
            if drift > 0:
                print(f"warning: {where}: the {len(copies)} TP copies of '{key}' differ by up to {drift:.3g}; "
                      f"using their mean (train with --sync-tp-duplicated-parameters to keep them equal)",
                      file=sys.stderr, flush=True)
                out[key] = torch.stack([c.double() for c in copies]).mean(0).to(copies[0].dtype)
    if EMBEDDING_KEY in out:
        out[EMBEDDING_KEY] = out[EMBEDDING_KEY][:vocab_size]  # drop rows added for TP divisibility
    return out


# ---- writing -----------------------------------------------------------------------------------


def write_native_checkpoint(
    weights: Union[StateDict, Iterable[StateDict]],
    model_cfg: ModelConfig,
    out_dir: str,
    tp: int,
    iteration: int = 0,
    dtype: Union[None, str, torch.dtype] = None,
    pp: Optional[int] = None,
    tokenizer_dir: Optional[str] = None,
    special_tokens: Optional[Dict[str, Optional[int]]] = None,
) -> str:
    """Write a weights-only native checkpoint at TP=``tp``; returns ``out_dir/global_step{iteration}``.

    ``weights`` is a full state dict (real vocabulary rows) or ``Layers``, each layer written to its
    TP files before the next is taken (a reader's layers are shape-checked as they are read).
    ``dtype`` casts every tensor (None keeps them). ``pp`` is only recorded in the configuration (layer files do not depend on it).
    ``tokenizer_dir``'s tokenizer files are copied to ``out_dir/tokenizer``; ``special_tokens``
    (bos/eos/pad ids) are recorded for generation.
    """
    if isinstance(weights, dict):
        check_state_dict(weights, model_cfg, "the given state dict")
        weights = layers_of(weights, model_cfg)
    check_tp(model_cfg, tp)
    cast = parse_dtype(dtype)
    tag = tag_for(iteration)
    path = os.path.join(out_dir, tag)
    if os.path.exists(path):
        raise UserError(f"{path} already exists; choose another output directory or delete it")
    created = not os.path.exists(out_dir)
    try:
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, os.path.join(out_dir, TOKENIZER_DIR))
        os.makedirs(path)
        _write_layers(weights, model_cfg, path, tp, cast)
    except BaseException:
        # A source that fails halfway leaves nothing behind (the layers are read while writing).
        shutil.rmtree(out_dir if created else path, ignore_errors=True)
        raise
    run = RunConfig(model=dataclasses.replace(model_cfg))
    run.parallel.tensor_model_parallel_size = tp
    if pp is not None:
        run.parallel.pipeline_model_parallel_size = pp
    state = {
        "iteration": iteration,
        "layout": {"tp": tp, "pp": None, "dp": None, "zero": None},
        "config": dataclasses.asdict(run),
        "weights_only": True,
        "special_tokens": dict(special_tokens or {}),
    }
    atomic_torch_save(state, os.path.join(path, STATE_FILE))
    # Megatron-DeepSpeed's engine file per model-parallel rank, with its args, as a save of its
    # own at this TP (and PP) would hold them; the weights are in the layer files.
    engine_state = megatron_engine_state(run, model_cfg.padded_vocab_size(tp), iteration)
    with megatron_enums_importable():
        for mp in range(tp * (pp or 1)):
            atomic_torch_save(engine_state, os.path.join(path, MP_RANK_FILE.format(tp=mp)))
    atomic_write_text(os.path.join(path, COMPLETE), tag + "\n")
    atomic_write_text(os.path.join(out_dir, LATEST), tag)
    return path


def _write_layers(weights: Iterable[StateDict], cfg: ModelConfig, path: str, tp: int, cast: Optional[torch.dtype]) -> None:
    padded = cfg.padded_vocab_size(tp)
    indices = layer_indices(cfg)
    written = 0
    for idx, layer in zip(indices, weights):
        full = layer_state(layer, cfg, idx)
        del layer
        if cast is not None:
            full = {k: v.to(cast) for k, v in full.items()}
        for rank in range(tp):
            atomic_torch_save(shard_layer(full, tp, rank, padded), os.path.join(path, LAYER_FILE.format(idx=idx, tp=rank)))
        del full
        written += 1
    if written != len(indices):
        raise UserError(f"{path}: the source ended after {written} of {len(indices)} layers")


# ---- reading -----------------------------------------------------------------------------------


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[str, str]:
    """``(directory, tag)`` of a native checkpoint given its directory (``latest`` names the tag)
    or one ``global_stepN`` folder itself."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint directory {path} does not exist")
    if tag is not None:
        return path, tag
    if os.path.isfile(os.path.join(path, STATE_FILE)) or glob.glob(os.path.join(path, LAYER_FILE_GLOB)):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    latest = os.path.join(path, LATEST)
    if not os.path.isfile(latest):
        raise UserError(f"{path} has no 'latest' file and no layer files: not a native checkpoint")
    tag = open(latest).read().strip()
    if not os.path.isdir(os.path.join(path, tag)):
        raise UserError(f"{latest} names '{tag}' but {os.path.join(path, tag)} does not exist")
    return path, tag


def model_config_from_state(state: Dict[str, Any], where: str) -> ModelConfig:
    try:
        saved = dict(state["config"]["model"])
    except (KeyError, TypeError):
        raise UserError(f"{where} has no model configuration (config.model)") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def read_state(path: str) -> Dict[str, Any]:
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise UserError(f"{path} has no {STATE_FILE}: not a megatron-bloom checkpoint "
                        f"(an original Megatron-DeepSpeed one converts with megatron-deepspeed-to-native)")
    state = safe_load(state_file)
    if not isinstance(state, dict):
        raise UserError(f"{state_file} does not hold a dict")
    return state


def checkpoint_tp(path: str, cfg: ModelConfig) -> int:
    """TP size of the layer files in ``path`` (from the file names); every file must be there."""
    ranks = {}
    for name in os.listdir(path):
        m = LAYER_FILE_RE.match(name)
        if m:
            ranks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    indices = layer_indices(cfg)
    if indices[0] not in ranks:
        raise UserError(f"{path} has no {LAYER_FILE.format(idx=indices[0], tp=0)}: no embedding layer file")
    tp = max(ranks[indices[0]]) + 1
    for idx in indices:
        for rank in range(tp):
            if rank not in ranks.get(idx, ()):
                raise UserError(f"{os.path.join(path, LAYER_FILE.format(idx=idx, tp=rank))} is missing "
                                f"(a TP={tp} checkpoint of {cfg.num_layers} blocks needs layers "
                                f"{', '.join(map(str, (indices[0], indices[1], indices[-2], indices[-1])))} ...)")
    return tp


def _layer_shards(path: str, idx: int, tp: int) -> List[StateDict]:
    shards = []
    for rank in range(tp):
        f = os.path.join(path, LAYER_FILE.format(idx=idx, tp=rank))
        sd = safe_load(f)
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise UserError(f"{f} does not hold a dict of tensors")
        shards.append(sd)
    return shards


def read_layer(path: str, cfg: ModelConfig, idx: int, tp: int) -> StateDict:
    """Merged full tensors of layer ``idx`` (layer-local keys, real vocabulary rows)."""
    return merge_layer(_layer_shards(path, idx, tp), cfg.vocab_size, os.path.join(path, LAYER_FILE.format(idx=idx, tp=0)))


def tp_duplicated_drift(path: str, cfg: ModelConfig) -> List[Tuple[str, float]]:
    """(full key, largest difference) of every TP-duplicated tensor whose copies differ, one layer at a time."""
    tp = checkpoint_tp(path, cfg)
    drifted = []
    for idx in layer_indices(cfg) if tp > 1 else ():
        shards = _layer_shards(path, idx, tp)
        for key in shards[0]:
            if key not in SPLIT_DIM:
                drift = tp_copies_drift([s[key] for s in shards])
                if drift > 0:
                    drifted.append((next(iter(full_keys(cfg, idx, {key: None}))), drift))
    return drifted


def _engine_state_layers(path: str, cfg: ModelConfig) -> Tuple[List[str], List[Dict[int, StateDict]]]:
    """Per TP rank, layer index -> tensors, from ``mp_rank_XX_model_states.pt`` of a PP=1 ZeRO-2 run.

    DeepSpeed's plain engine (used for ZeRO-2/3) writes no layer files; under ZeRO-2 its engine
    file per model-parallel (= TP) rank holds BloomSequential's state dict, ``layers.{idx}.<key>``.
    """
    files = sorted(f for f in os.listdir(path) if MP_RANK_FILE_RE.match(f))
    per_rank = []
    for name in files:
        f = os.path.join(path, name)
        state = safe_load(f)
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict) or not module:
            raise UserError(f"{f} holds no module weights")
        layers: Dict[int, StateDict] = {}
        for key, value in module.items():
            m = re.match(r"^layers\.(\d+)\.(.+)$", key)
            if not m or not isinstance(value, Tensor):
                raise UserError(f"{f}: unexpected entry '{key}' (not a BloomSequential checkpoint)")
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        per_rank.append(layers)
    return [os.path.join(path, f) for f in files], per_rank


def iter_native_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[ModelConfig, Layers]:
    """The model configuration and ``Layers`` of a native checkpoint (trained at any TP/PP, or converted).

    ``path`` is a checkpoint directory (``latest`` picks the tag) or a ``global_stepN`` folder. Each
    layer's TP shards are read and merged when the layer is taken, without the padded vocabulary
    rows. Pipeline-engine checkpoints (ZeRO 0/1, any PP, and every conversion) are read from their
    layer files; PP=1 ZeRO-2 ones from their engine files, which hold the whole model each, so
    these are read whole; ZeRO-3 ones are refused (their weights exist only as fp32 optimizer
    partitions). Missing files are reported before the first layer is read.
    """
    directory, tag = resolve_checkpoint(path, tag)
    ckpt = os.path.join(directory, tag)
    cfg = model_config_from_state(read_state(ckpt), os.path.join(ckpt, STATE_FILE))
    names = os.listdir(ckpt)
    if not any(LAYER_FILE_RE.match(n) for n in names) and any(MP_RANK_FILE_RE.match(n) for n in names):
        files, per_rank = _engine_state_layers(ckpt, cfg)

        def engine_layers() -> Layers:
            for idx in layer_indices(cfg):
                for r, layers in enumerate(per_rank):
                    if idx not in layers:
                        raise UserError(f"{files[r]} has no tensors of pipeline layer {idx}")
                yield full_keys(cfg, idx, merge_layer([layers.pop(idx) for layers in per_rank], cfg.vocab_size, files[0]))

        return cfg, checked_layers(engine_layers(), cfg, files[0])
    if not any(LAYER_FILE_RE.match(n) for n in names) and any(n.startswith("zero_pp_rank_") for n in names):
        raise UserError(f"{ckpt} was saved under ZeRO-3: its weights exist only as optimizer partitions, which "
                        f"this reader does not merge; train at ZeRO 0-2 to get readable checkpoints")
    tp = checkpoint_tp(ckpt, cfg)
    sources = {}
    for idx in layer_indices(cfg):
        sources.update({k: os.path.join(ckpt, LAYER_FILE.format(idx=idx, tp=0))
                        for k in full_keys(cfg, idx, dict.fromkeys(_SHARDING.layer_table(idx, cfg.num_layers)))})
        for rank in range(tp):
            # Every file's pickle, memory-mapped (no tensor data read): a truncated file or one holding
            # other classes is refused before the first layer is written anywhere.
            safe_load(os.path.join(ckpt, LAYER_FILE.format(idx=idx, tp=rank)), mmap=True)

    def file_layers() -> Layers:
        for idx in layer_indices(cfg):
            yield full_keys(cfg, idx, read_layer(ckpt, cfg, idx, tp))

    return cfg, checked_layers(file_layers(), cfg, sources)


def read_native_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[ModelConfig, StateDict]:
    """``iter_native_checkpoint`` joined into one full state dict (holds the whole model)."""
    cfg, layers = iter_native_checkpoint(path, tag)
    return cfg, collect(layers)


def checkpoint_special_tokens(path: str) -> Dict[str, Optional[int]]:
    """bos/eos/pad ids recorded by a conversion (empty for trained checkpoints)."""
    directory, tag = resolve_checkpoint(path)
    return dict(read_state(os.path.join(directory, tag)).get("special_tokens") or {})


def model_from_state_dict(
    cfg: ModelConfig, sd: StateDict, dtype: Union[None, str, torch.dtype] = None,
    attention_impl: Optional[str] = None,
):
    """A single-device model (the spec's ``build_model``) holding a full state dict (vocab padded for TP=1)."""
    check_state_dict(sd, cfg, "the given state dict")
    return model_from_layers(cfg, layers_of(sd, cfg), dtype, attention_impl)


def model_from_layers(
    cfg: ModelConfig, layers: Iterable[StateDict], dtype: Union[None, str, torch.dtype] = None,
    attention_impl: Optional[str] = None,
):
    """A single-device model (the spec's ``build_model``) filled one layer at a time from ``Layers``.

    Built on the meta device (in ``dtype`` when given), so no time is spent on a random init that
    would be overwritten, and memory holds the model plus the layer being copied in.
    """
    if attention_impl is not None:
        cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
    cast = parse_dtype(dtype)
    with torch.device("meta"):
        model = get_model_spec().build_model(cfg)
        if cast is not None:
            model.to(cast)  # allocated in the target dtype: never a float32 copy of the whole model
    model.to_empty(device="cpu")
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for layer in layers:
            for key, value in layer.items():
                if key not in params:
                    raise UserError(f"state dict does not fit the model: unexpected '{key}'")
                target = params[key]
                if key == "transformer.word_embeddings.weight":
                    target[value.shape[0]:].zero_()  # rows padded for TP divisibility
                    target = target[:value.shape[0]]
                target.copy_(value)
                filled.add(key)
            del layer
    missing = [k for k in params if k not in filled and k != "lm_head.weight"]
    if missing:
        raise UserError(f"state dict does not fit the model: missing {missing[:3]}")
    model.reset_derived_buffers()
    if cast is not None:
        model.to(cast)  # the derived buffers
    return model.eval()


# ---- loading into a training engine ------------------------------------------------------------


def _local_layers(engine) -> List[Tuple[int, nn.Module]]:
    """(pipeline layer index, module) of every layer this rank holds, tied copies included."""
    module = engine.module
    if not getattr(engine, "is_pipeline", False):
        # BloomSequential: its layers are keyed by spec index; the tied head reuses the embedding.
        return [(int(k), m) for k, m in module.layers.items()]
    out = [(module._local_start + i, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)]
    for tied in module.tied_modules.values():
        # The last stage holds the tied embedding only as the LM head's module (without the
        # embedding's LayerNorm): load the embedding layer's matrix into it.
        if not any(tied is m for _, m in out):
            out.append((_SHARDING.EMBEDDING_LAYER, tied))
    return out


def load_weights_only(engine, info_dir: str, tag: str) -> None:
    """Load the weights of ``info_dir/tag`` into a freshly built ``BloomEngine`` at any TP/PP/ZeRO.

    Collective-free: every rank reads the layer files of the layers it holds (all TP shards of
    them), merges, re-pads the vocabulary to the engine's ``padded_vocab_size`` and keeps its own
    TP shard, so the checkpoint's TP need not match the engine's. The optimizer's fp32 master
    copies (ZeRO-1/2/3, bf16/fp16 optimizers) are then refreshed from the new weights, as
    DeepSpeed's own ``load_module_only`` does, so the first optimizer step starts from them.
    Optimizer moments, LR schedule and data position stay fresh.
    """
    path = os.path.join(info_dir, tag)
    cfg = model_config_from_state(read_state(path), os.path.join(path, STATE_FILE))
    want = engine.cfg.model
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_size"):
        if getattr(cfg, key) != getattr(want, key):
            raise UserError(f"checkpoint {path} has {key}={getattr(cfg, key)} but the configuration says "
                            f"{getattr(want, key)}; use the checkpoint's model configuration")
    ck_tp = checkpoint_tp(path, cfg)
    tp, rank = engine.state.dims.tp, engine.state.tp_rank
    ds = engine.engine
    zero3 = bool(getattr(ds, "zero_optimization_partition_weights", lambda: False)())
    local = _local_layers(engine)
    uses = Counter(idx for idx, _ in local)  # the embedding twice where the tied head is local too
    cache: Dict[int, StateDict] = {}
    for idx, module in local:
        if idx not in cache:
            cache[idx] = read_layer(path, cfg, idx, ck_tp)
        uses[idx] -= 1
        # Only one merged layer is held at a time: its last user takes it out of the cache.
        full = cache[idx] if uses[idx] else cache.pop(idx)
        shard = shard_layer(full, tp, rank, engine.padded_vocab_size)
        del full
        params = dict(module.named_parameters())
        if idx == _SHARDING.EMBEDDING_LAYER:
            shard = {k: v for k, v in shard.items() if k in params}  # the LM head's copy has no LayerNorm
        if set(params) != set(shard):
            raise RuntimeError(f"layer {idx}: module parameters {sorted(params)} != checkpoint keys {sorted(shard)}")
        _copy_params(params, shard, zero3, os.path.join(path, LAYER_FILE.format(idx=idx, tp=0)))
    optimizer = getattr(ds, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()


def _copy_params(params: Dict[str, nn.Parameter], shard: StateDict, zero3: bool, where: str) -> None:
    import contextlib

    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        # Gather the partitioned parameters; on exit rank 0's values (the same on every rank here)
        # are partitioned again.
        ctx = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    with ctx, torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(shard[name].shape):
                raise UserError(f"{where}: '{name}' has shape {tuple(shard[name].shape)} for this rank, "
                                f"the engine expects {tuple(p.shape)}")
            p.data.copy_(shard[name])
