"""transformers BLOOM folders: read any local one, write one that ``from_pretrained`` loads.

Reading takes ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``, single or
sharded with ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``, in fp32, fp16 or
bf16 (kept as stored). Keys may carry the ``transformer.`` prefix (``BloomForCausalLM`` saves) or
not (``BloomModel`` saves, e.g. the original bigscience/bloom upload); ``lm_head.weight`` may be
absent (tied) or present and equal to the embedding. Untrusted files are only ever opened with
safetensors or ``torch.load(weights_only=True)``.

Padded vocabulary on export: a folder gets exactly ``vocab_size`` embedding rows, i.e. the rows
the source checkpoint (or tokenizer) has. Rows added only so the embedding divides by
``make_vocab_size_divisible_by * TP`` exist in native checkpoints and in the training engine,
never in an exported folder: they are dropped. Rows that are part of the real vocabulary stay,
so BLOOM's own 250,880-row embedding (250,680 tokenizer tokens, padded by Megatron at training
time and released that way) is exported with 250,880 rows, as transformers' config says.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from megatron_bloom.checkpoint.files import copy_tokenizer_files, tokenizer_files
from megatron_bloom.checkpoint.native import (
    Layers,
    StateDict,
    check_state_dict,
    collect,
    full_keys,
    layer_indices,
    layers_of,
    parse_dtype,
)
from megatron_bloom.checkpoint.trust import safe_load
from megatron_bloom.errors import UserError
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.spec import get_model_spec

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_BIN = "pytorch_model.bin"
PT_BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""transformers' default shard size (5 GB); BLOOM-176B in bf16 is ~70 shards of it."""

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ---- config ------------------------------------------------------------------------------------


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def read_config_json(folder: str) -> Dict[str, Any]:
    """A transformers folder's config.json as a dict (UserError when missing or not a JSON object)."""
    return _read_json(os.path.join(folder, "config.json"))


def model_config_from_hf(values: Dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config dict (the model's HF adapter; older key names too)."""
    return get_model_spec().hf.config_from_hf(values, where)


def bloom_config_from_model_config(model_cfg: ModelConfig, **extra: Any):
    """transformers' config of a ``ModelConfig`` (the inverse of ``model_config_from_hf``);
    ``extra`` sets further config fields (token ids, dropout overrides, attn_implementation)."""
    return get_model_spec().hf.to_hf_config(model_cfg, **extra)


def special_tokens_from_hf(values: Dict[str, Any]) -> Dict[str, Optional[int]]:
    return {k: values.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}


# ---- reading weights ---------------------------------------------------------------------------


def _safetensors_error(path: str, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UserError(f"{path} is not a valid safetensors file, probably truncated or corrupt ({first})")


def _load_safetensors(path: str) -> StateDict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"{path} is missing")
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise _safetensors_error(path, exc) from None


def _load_bin(path: str, mmap: bool = False) -> StateDict:
    sd = safe_load(path, mmap=mmap)
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    return sd


def weight_files(folder: str) -> List[str]:
    """The weight files of a transformers folder, safetensors preferred; index shards checked."""
    for index_name, single, in ((SAFETENSORS_INDEX, SAFETENSORS), (PT_BIN_INDEX, PT_BIN)):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index} has no weight_map")
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                path = os.path.join(folder, shard)
                if not os.path.isfile(path):
                    raise UserError(f"{index} lists shard {shard}, which is missing from {folder}")
                files.append(path)
            return files
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise UserError(f"{folder} has no {SAFETENSORS}, {PT_BIN} or index of shards")


class _WeightFiles:
    """Tensors of a folder's weight files read by name, with only the files of the current layer open.

    safetensors files are opened lazily (their header alone names and shapes every tensor) and
    ``pytorch_model.bin`` files memory-mapped; ``close`` drops both, so the pages a layer touched
    are not kept resident while the next layer is read.
    """

    def __init__(self):
        self._open: Dict[str, Any] = {}

    def tensors(self, path: str) -> Dict[str, Any]:
        """name -> object with ``.shape`` (lazy; nothing read but the header / pickle)."""
        if path.endswith(".safetensors"):
            f = self._file(path)
            try:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            except Exception as exc:  # noqa: BLE001
                raise _safetensors_error(path, exc) from None
        return {k: torch.empty(v.shape, device="meta") if isinstance(v, Tensor) else v
                for k, v in self._file(path).items()}

    def get(self, path: str, name: str) -> Tensor:
        f = self._file(path)
        if not path.endswith(".safetensors"):
            return f[name]
        try:
            return f.get_tensor(name)
        except Exception as exc:  # noqa: BLE001
            raise _safetensors_error(path, exc) from None

    def _file(self, path: str):
        if path not in self._open:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                if not os.path.isfile(path):
                    raise UserError(f"{path} is missing")
                try:
                    self._open[path] = safe_open(path, framework="pt", device="cpu")
                except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
                    raise _safetensors_error(path, exc) from None
            else:
                self._open[path] = _load_bin(path, mmap=True)
        return self._open[path]

    def close(self) -> None:
        self._open.clear()


def iter_hf_checkpoint(folder: str) -> Tuple[ModelConfig, Layers]:
    """(ModelConfig, ``Layers`` with our keys and real vocabulary rows) of a transformers folder.

    Every tensor's name and shape is checked from the files' headers before the first layer is
    read; each layer is then read when it is taken, so a conversion holds one layer, not the model.
    """
    if not os.path.isdir(folder):
        raise UserError(f"transformers folder {folder} does not exist")
    config_path = os.path.join(folder, "config.json")
    values = _read_json(config_path)
    cfg = model_config_from_hf(values, config_path)
    adapter = get_model_spec().hf
    files = _WeightFiles()
    shapes: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    names: Dict[str, str] = {}
    for path in weight_files(folder):
        for name, tensor in files.tensors(path).items():
            if not isinstance(tensor, Tensor):
                continue
            key = adapter.hf_key(name)
            if key in shapes:
                raise UserError(f"{path}: tensor '{key}' also appears in {sources[key]}")
            shapes[key], sources[key], names[key] = tensor, path, name
        files.close()
    head = shapes.pop(adapter.TIED_HEAD_KEY, None)
    emb = shapes.get(adapter.EMBEDDING_KEY)
    if head is not None and (emb is None or head.shape != emb.shape):
        raise UserError(f"{sources[adapter.TIED_HEAD_KEY]}: {adapter.TIED_HEAD_KEY} differs from the word embeddings; "
                        f"only tied BLOOM heads are supported")
    check_state_dict(shapes, cfg, sources)

    def layers() -> Layers:
        for idx in layer_indices(cfg):
            keys = full_keys(cfg, idx, dict.fromkeys(get_model_spec().sharding.layer_table(idx, cfg.num_layers)))
            layer = {key: files.get(sources[key], names[key]) for key in keys}
            if head is not None and adapter.EMBEDDING_KEY in layer:
                tied = files.get(sources[adapter.TIED_HEAD_KEY], names[adapter.TIED_HEAD_KEY])
                if not torch.equal(tied, layer[adapter.EMBEDDING_KEY]):
                    raise UserError(f"{sources[adapter.TIED_HEAD_KEY]}: {adapter.TIED_HEAD_KEY} differs from the word "
                                    f"embeddings; only tied BLOOM heads are supported")
                del tied
            files.close()
            yield layer

    return cfg, layers()


def read_hf_checkpoint(folder: str) -> Tuple[ModelConfig, StateDict]:
    """``iter_hf_checkpoint`` joined into one full state dict (holds the whole model)."""
    cfg, layers = iter_hf_checkpoint(folder)
    return cfg, collect(layers)


# ---- writing -----------------------------------------------------------------------------------


def tokenizer_special_tokens(folder: str) -> Dict[str, Optional[int]]:
    """bos/eos/pad ids of the tokenizer in ``folder`` (transformers AutoTokenizer, local only)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load the tokenizer in {folder} ({type(exc).__name__}: {first})") from None
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}


def write_hf_checkpoint(
    weights: Union[StateDict, Iterable[StateDict]],
    model_cfg: ModelConfig,
    out_dir: str,
    dtype: Union[None, str, torch.dtype] = None,
    tokenizer_dir: Optional[str] = None,
    special_tokens: Optional[Dict[str, Optional[int]]] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Write a transformers BLOOM folder (safetensors, sharded above ``max_shard_bytes``).

    ``weights`` is a full state dict with exactly ``vocab_size`` embedding rows (see the module
    docstring) or ``Layers``; a shard is written as soon as it is full, so memory holds one shard
    and the layer being read. ``dtype`` casts (None keeps the stored dtype, recorded as ``dtype``
    in config.json). Shards are written under temporary names and named, with config.json, only
    once every layer was read: a source that fails halfway leaves no folder that half loads.
    """
    if isinstance(weights, dict):
        check_state_dict(weights, model_cfg, "the given state dict")
        weights = layers_of(weights, model_cfg)
    if model_cfg.ffn_size != 4 * model_cfg.hidden_size:
        raise UserError(f"transformers' BLOOM has ffn size 4*hidden_size; this model has {model_cfg.ffn_size}")
    cast = parse_dtype(dtype)
    # Special-token ids: the copied tokenizer's, else the source checkpoint's, else BLOOM's
    # (<unk>=0 <s>=1 </s>=2 <pad>=3), so config.json agrees with the tokenizer shipped beside it.
    # Read before anything is written: a tokenizer that does not load leaves no half-written folder.
    tokens = {"bos": 1, "eos": 2, "pad": 3}
    tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    if tokenizer_dir:
        tokenizer_files(tokenizer_dir)
        tokens.update({k: v for k, v in tokenizer_special_tokens(tokenizer_dir).items() if v is not None})
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        return _write_streamed(weights, model_cfg, out_dir, cast, tokens, tokenizer_dir, max_shard_bytes)
    except BaseException:
        # A source that fails halfway (its layers are read while writing) leaves nothing behind.
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for name in os.listdir(out_dir):
                if name.startswith(".shard-") and name.endswith(".tmp"):
                    os.remove(os.path.join(out_dir, name))
        raise


def _write_streamed(weights, model_cfg: ModelConfig, out_dir: str, cast, tokens: Dict[str, int],
                    tokenizer_dir: Optional[str], max_shard_bytes: int) -> str:
    from safetensors.torch import save_file

    written: List[Tuple[str, List[str]]] = []  # (temporary file, keys) per shard
    shard: StateDict = {}
    shard_bytes = total = 0
    dtypes = set()

    def flush() -> None:
        nonlocal shard, shard_bytes
        tmp = os.path.join(out_dir, f".shard-{len(written) + 1:05d}.safetensors.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, shard_bytes = {}, 0

    for layer in weights:
        for key, value in layer.items():
            value = (value.to(cast) if cast is not None else value).contiguous()
            nbytes = value.numel() * value.element_size()
            if value.untyped_storage().nbytes() != nbytes:
                # A view (e.g. the real rows of a padded embedding): the shard keeps its own copy,
                # not the whole storage behind it (safetensors also refuses tensors sharing one).
                value = value.clone()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush()
            shard[key] = value
            shard_bytes += nbytes
            total += nbytes
            dtypes.add(value.dtype)
        del layer
    if shard:
        flush()
    stored = cast or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    if stored not in _DTYPE_NAMES:
        raise UserError(f"cannot export tensors of dtype {stored}; pass --dtype fp32, fp16 or bf16")

    # Every layer is read: only now is an earlier export in the folder replaced.
    for stale in (SAFETENSORS, SAFETENSORS_INDEX, PT_BIN, PT_BIN_INDEX):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    weight_map = {}
    for i, (tmp, keys) in enumerate(written, 1):
        name = SAFETENSORS if len(written) == 1 else f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, name))
        weight_map.update({k: name for k in keys})
    if len(written) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)

    hf_config = bloom_config_from_model_config(
        model_cfg,
        bos_token_id=tokens["bos"],
        eos_token_id=tokens["eos"],
        pad_token_id=tokens["pad"],
        architectures=[get_model_spec().hf.ARCHITECTURE],
        tie_word_embeddings=True,
    )
    # transformers >= 5 reads "dtype", older versions "torch_dtype".
    import transformers

    major = int(transformers.__version__.split(".")[0])
    setattr(hf_config, "dtype" if major >= 5 else "torch_dtype", _DTYPE_NAMES[stored])
    hf_config.save_pretrained(out_dir)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
