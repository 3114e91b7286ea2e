"""Original Megatron-DeepSpeed BLOOM checkpoints (bigscience's BLOOM/BLOOMZ optimizer-state repos).

Layout, one file per pipeline layer and TP rank in ``global_stepN/``::

    layer_01-model_YY-model_states.pt       EmbeddingPipe: word_embeddings.weight (vocab-parallel rows),
                                            word_embeddings.norm.weight/bias (the embedding LayerNorm)
    layer_03 .. layer_{L+2}                 block i = file layer i + 3 (BLOOM's ParallelTransformerLayer
                                            keys, the same as transformers' block keys)
    layer_{L+4}-model_YY-model_states.pt    the final LayerNorm: keys weight / bias
    mp_rank_XX_model_states.pt              Megatron's args (argparse.Namespace) and iteration

Layers 00 (fp16/bf16 cast), 02 and L+3 (transposes) are functions and have no file; the tied
LM head (last) has none either. The files are told apart by their keys, not by their numbers: the
one with ``word_embeddings.weight`` is the embedding, those with ``input_layernorm.weight`` are the
blocks (in file order, which must be consecutive), the one holding only ``weight``/``bias`` is the
final LayerNorm.

TP merge: column-parallel tensors (query_key_value, dense_h_to_4h, vocabulary rows) concatenate on
dim 0, row-parallel weights (self_attention.dense, dense_4h_to_h) on dim 1. Replicated tensors
(LayerNorms, row-parallel biases) are AVERAGED over the TP ranks, in float32 and then cast back:
in BLOOM-176B's bf16 training the copies of these tensors drifted slightly apart between TP ranks,
and the released transformers weights were made by averaging them (transformers' conversion
script). Rank 0's copy alone would be an equally valid but different model; when the copies are
identical the average is exactly that copy.

The attention head count is not in any tensor shape: it comes from ``num_attention_heads`` in the
args of ``mp_rank_00_model_states.pt`` (read with ``torch.load(weights_only=True)`` allowing only
``argparse.Namespace`` and Megatron's enums, see ``megatron_args.py``), or from the caller when
those args cannot be read. Our own checkpoints have this layout too, so this reads them as well.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_bloom.checkpoint.megatron_args import args_dict
from megatron_bloom.checkpoint.files import LATEST, LAYER_FILE_RE, TAG_RE, layer_file, mp_rank_file
from megatron_bloom.checkpoint.native import BLOCK_KEYS, SPLIT_DIM, Layers, StateDict, check_state_dict, collect
from megatron_bloom.checkpoint.trust import load_megatron_state, safe_load
from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig

EMBEDDING_KEYS = {
    "word_embeddings.weight": "transformer.word_embeddings.weight",
    "word_embeddings.norm.weight": "transformer.word_embeddings_layernorm.weight",
    "word_embeddings.norm.bias": "transformer.word_embeddings_layernorm.bias",
}
FINAL_NORM_KEYS = {"weight": "transformer.ln_f.weight", "bias": "transformer.ln_f.bias"}


def resolve_tag_dir(path: str) -> str:
    """The ``global_stepN`` folder: ``path`` itself, the tag ``latest`` names, or the newest one."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint directory {path} does not exist")
    if any(LAYER_FILE_RE.match(n) for n in os.listdir(path)):
        return path
    # Megatron-LM's own marker holds a bare iteration number.
    for marker in (LATEST, "latest_checkpointed_iteration.txt"):
        f = os.path.join(path, marker)
        if os.path.isfile(f):
            tag = open(f).read().strip()
            if marker.endswith(".txt") and tag.isdigit():
                tag = f"global_step{tag}"
            if os.path.isdir(os.path.join(path, tag)):
                return os.path.join(path, tag)
            raise UserError(f"{f} names '{tag}' but {os.path.join(path, tag)} does not exist")
    steps = sorted((int(m.group(1)), n) for n in os.listdir(path) if (m := TAG_RE.match(n)))
    if not steps:
        raise UserError(f"{path} has no layer_XX-model_YY-model_states.pt files, 'latest' or global_stepN folder")
    return os.path.join(path, steps[-1][1])


def read_megatron_args(tag_dir: str) -> Dict[str, Any]:
    """Megatron's args and iteration from ``mp_rank_00_model_states.pt`` ({} when there is no such file).

    Read weights-only with the allow-list of ``megatron_args`` (argparse.Namespace and Megatron's
    enums); a file holding other objects raises a UserError saying which.
    """
    path = os.path.join(tag_dir, mp_rank_file(0))
    if not os.path.isfile(path):
        return {}
    return args_dict(load_megatron_state(path))


def _layer_files(tag_dir: str) -> Dict[int, Dict[int, str]]:
    files: Dict[int, Dict[int, str]] = {}
    for name in os.listdir(tag_dir):
        m = LAYER_FILE_RE.match(name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = os.path.join(tag_dir, name)
    if not files:
        raise UserError(f"{tag_dir} has no layer_XX-model_YY-model_states.pt files")
    tp = max(len(ranks) for ranks in files.values())
    for idx, ranks in sorted(files.items()):
        for r in range(tp):
            if r not in ranks:
                raise UserError(f"{os.path.join(tag_dir, layer_file(idx, r))} is missing "
                                f"(the other layers have {tp} TP ranks)")
    return files


def _merge(shards: List[StateDict], key: str, where: str) -> Tensor:
    dim = SPLIT_DIM.get(key)  # None for LayerNorms (incl. word_embeddings.norm.*) and row-parallel biases
    for r, s in enumerate(shards):
        if key not in s or not isinstance(s[key], Tensor):
            raise UserError(f"{where}: TP rank {r} has no tensor '{key}'")
    if len(shards) == 1:
        return shards[0][key]
    if dim is not None:
        return torch.cat([s[key] for s in shards], dim=dim)
    # Replicated: average in float32 (see the module docstring), back to the stored dtype.
    stacked = torch.stack([s[key].float() for s in shards])
    return stacked.mean(0).to(shards[0][key].dtype)


def _read_layer_file(path: str, mmap: bool) -> StateDict:
    sd = safe_load(path, mmap=mmap)
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    return sd


def _shapes_of(path: str) -> StateDict:
    """A layer file's entries, tensors as meta tensors of their shape: memory-mapped, so nothing
    but the file's pickle is read."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, Tensor) else v
            for k, v in _read_layer_file(path, mmap=True).items()}


def _merged_shape(shards: List[StateDict], key: str, where: str) -> Tensor:
    """A meta tensor of the shape ``_merge`` gives (computed, not by running it on meta tensors:
    the first meta operation of a process loads ~70 MB of torch's meta kernels)."""
    for r, s in enumerate(shards):
        if key not in s or not isinstance(s[key], Tensor):
            raise UserError(f"{where}: TP rank {r} has no tensor '{key}'")
    shape = list(shards[0][key].shape)
    dim = SPLIT_DIM.get(key)
    if dim is not None and len(shards) > 1 and dim < len(shape):
        shape[dim] = sum(s[key].shape[dim] for s in shards)
    return torch.empty(shape, dtype=shards[0][key].dtype, device="meta")


def iter_megatron_deepspeed_checkpoint(
    path: str,
    num_attention_heads: Optional[int] = None,
    layer_norm_epsilon: Optional[float] = None,
) -> Tuple[ModelConfig, Layers, Dict[str, Any]]:
    """(ModelConfig, ``Layers`` with our keys, Megatron args) of an original BLOOM checkpoint.

    Every file's keys and shapes are checked first (from their pickles, memory-mapped); each
    layer's TP files are then read and merged when the layer is taken, so converting holds one
    layer, not the model. The vocabulary keeps every embedding row of the checkpoint (BLOOM:
    250,880). ``num_attention_heads`` / ``layer_norm_epsilon`` override (or replace unreadable) args.
    """
    tag_dir = resolve_tag_dir(path)
    files = _layer_files(tag_dir)
    tp = len(next(iter(files.values())))
    shards = {idx: [_shapes_of(ranks[r]) for r in range(tp)] for idx, ranks in files.items()}

    embed = [i for i, p in shards.items() if "word_embeddings.weight" in p[0]]
    blocks = sorted(i for i, p in shards.items() if "input_layernorm.weight" in p[0])
    final = [i for i, p in shards.items() if set(p[0]) == {"weight", "bias"}]
    other = sorted(set(shards) - set(embed) - set(blocks) - set(final))
    if len(embed) != 1 or len(final) != 1 or not blocks or other:
        raise UserError(f"{tag_dir}: expected one embedding file, consecutive block files and one final LayerNorm "
                        f"file; found embedding layers {embed}, blocks {blocks}, final norm {final}, unknown {other}")
    if blocks != list(range(blocks[0], blocks[0] + len(blocks))) or not embed[0] < blocks[0] < final[0]:
        raise UserError(f"{tag_dir}: block layer files {blocks} are not consecutive between the embedding "
                        f"(layer {embed[0]}) and the final LayerNorm (layer {final[0]})")
    if "position_embeddings.weight" in shards[embed[0]][0]:
        raise UserError(f"{files[embed[0]][0]} has position embeddings: not a BLOOM (ALiBi) checkpoint")
    for idx in blocks:
        extra = set(shards[idx][0]) - set(BLOCK_KEYS)
        if extra:
            raise UserError(f"{files[idx][0]}: unexpected tensor '{sorted(extra)[0]}' in a BLOOM block")
    # (layer, {their key: our key}) in model order.
    plan = [(embed[0], EMBEDDING_KEYS)]
    plan += [(idx, {k: f"transformer.h.{i}.{k}" for k in BLOCK_KEYS}) for i, idx in enumerate(blocks)]
    plan.append((final[0], FINAL_NORM_KEYS))

    def merged(parts: List[StateDict], idx: int, keys: Dict[str, str]) -> StateDict:
        return {ours: _merge(parts, key, files[idx][0]) for key, ours in keys.items()}

    shapes: StateDict = {}
    sources: Dict[str, str] = {}
    for idx, keys in plan:
        for key, ours in keys.items():
            shapes[ours] = _merged_shape(shards[idx], key, files[idx][0])
            sources[ours] = files[idx][0]

    try:
        args = read_megatron_args(tag_dir)
    except UserError as exc:
        if not num_attention_heads:
            raise UserError(f"{exc}; the head count comes from those args: pass --num-attention-heads") from None
        args = {}
    heads = num_attention_heads or args.get("num_attention_heads")
    if not heads:
        raise UserError(f"{tag_dir}: the head count is not readable from mp_rank_00_model_states.pt; "
                        f"pass --num-attention-heads")
    emb = shapes["transformer.word_embeddings.weight"]
    qkv = shapes["transformer.h.0.self_attention.query_key_value.weight"]
    h = emb.shape[1]
    cfg = ModelConfig(
        num_layers=len(blocks),
        hidden_size=h,
        num_attention_heads=int(heads),
        vocab_size=emb.shape[0],
        ffn_hidden_size=shapes["transformer.h.0.mlp.dense_h_to_4h.weight"].shape[0],
        layer_norm_epsilon=float(layer_norm_epsilon or args.get("layernorm_epsilon") or 1e-5),
        init_method_std=float(args.get("init_method_std") or 0.0048),
    )
    if cfg.ffn_hidden_size == 4 * h:
        cfg.ffn_hidden_size = None
    if args.get("seq_length"):
        cfg.seq_length = int(args["seq_length"])
    if h % cfg.num_attention_heads or qkv.shape[0] != 3 * h:
        raise UserError(f"{files[blocks[0]][0]}: query_key_value has {qkv.shape[0]} rows for hidden size {h} "
                        f"and {cfg.num_attention_heads} heads; expected {3 * h} and heads dividing {h}")
    check_state_dict(shapes, cfg, sources)

    def layers() -> Layers:
        for idx, keys in plan:
            yield merged([_read_layer_file(files[idx][r], mmap=True) for r in range(tp)], idx, keys)

    return cfg, layers(), args


def read_megatron_deepspeed_checkpoint(
    path: str,
    num_attention_heads: Optional[int] = None,
    layer_norm_epsilon: Optional[float] = None,
) -> Tuple[ModelConfig, StateDict, Dict[str, Any]]:
    """``iter_megatron_deepspeed_checkpoint`` joined into one full state dict (holds the whole model)."""
    cfg, layers, args = iter_megatron_deepspeed_checkpoint(path, num_attention_heads, layer_norm_epsilon)
    return cfg, collect(layers), args
