"""Independent readers of Megatron-DeepSpeed's formats, written from their descriptions, for the tests.

``reference_bloom_state_dict`` follows the logic of transformers'
``convert_bloom_original_checkpoint_to_pytorch.py``, the script BLOOM's weights were released with:

* list the files of the checkpoint folder whose names start with ``layer`` and contain
  ``model_00``, sorted; for each, load the same name with ``model_00`` replaced by ``model_0{i}``
  for every TP rank i;
* rename keys: ``word_embeddings.weight`` stays, ``word_embeddings.norm.{weight,bias}`` become
  ``word_embeddings_layernorm.*``, bare ``weight``/``bias`` become ``ln_f.*``, and every other key
  ``k`` of file ``layer_NN`` becomes ``h.{NN - 3}.k``;
* merge over TP ranks: keys ending in a LayerNorm name or ``self_attention.dense.bias`` /
  ``mlp.dense_4h_to_h.bias`` are summed and divided by the TP size; keys containing
  ``mlp.dense_4h_to_h.weight`` or ``self_attention.dense.weight`` are concatenated on dim 1, all
  others on dim 0.

It keeps every embedding row (the padded vocabulary) and has no ``transformer.`` prefix.
"""
import os
import re

import torch

AVERAGED_SUFFIXES = (
    "word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias",
    "input_layernorm.weight", "input_layernorm.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "self_attention.dense.bias", "mlp.dense_4h_to_h.bias",
    "ln_f.weight", "ln_f.bias",
)
ROW_PARALLEL = ("mlp.dense_4h_to_h.weight", "self_attention.dense.weight")
RENAMED = {
    "word_embeddings.weight": "word_embeddings.weight",
    "word_embeddings.norm.weight": "word_embeddings_layernorm.weight",
    "word_embeddings.norm.bias": "word_embeddings_layernorm.bias",
    "weight": "ln_f.weight",
    "bias": "ln_f.bias",
}


def _rename(key, file_name):
    if key in RENAMED:
        return RENAMED[key]
    number = int(re.match(r".*layer_(\d*).*", file_name)[1]) - 3
    return f"h.{number}.{key}"


def reference_bloom_state_dict(folder, tp):
    """BLOOM's released conversion of a Megatron-DeepSpeed checkpoint folder (a ``global_stepN``)."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("layer") and "model_00" in n)
    out = {}
    for name in names:
        merged = None
        for i in range(tp):
            part = torch.load(os.path.join(folder, name.replace("model_00", f"model_0{i}")), map_location="cpu",
                              weights_only=True)
            part = {_rename(k, name): v for k, v in part.items()}
            if merged is None:
                merged = part
                continue
            for key in merged:
                if key.endswith(AVERAGED_SUFFIXES):
                    merged[key] = merged[key] + part[key]
                else:
                    dim = 1 if any(text in key for text in ROW_PARALLEL) else 0
                    merged[key] = torch.cat([merged[key], part[key]], dim=dim)
        for key in merged:
            if key.endswith(AVERAGED_SUFFIXES):
                merged[key] = merged[key] / tp
        for key in merged:
            if key in out:
                raise AssertionError(f"{name}: '{key}' already came from another file")
        out.update(merged)
    return out


def megatron_check_checkpoint_args(saved, current):
    """Megatron-DeepSpeed's ``check_checkpoint_args`` (checkpoint version 3): these must be equal."""
    keys = ["num_layers", "hidden_size", "num_attention_heads", "position_embedding_type",
            "tensor_model_parallel_size", "pipeline_model_parallel_size"]
    for key in keys:
        assert getattr(saved, key) == getattr(current, key), (key, getattr(saved, key), getattr(current, key))
