"""Original Megatron-DeepSpeed BLOOM checkpoints (bigscience's layout), faked from a random tiny model."""
import argparse
import os
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from interop_helpers import run_cli, tiny_hf_model
from megatron_bloom.checkpoint.megatron_args import PositionEmbeddingType, megatron_enums_importable
from megatron_bloom.checkpoint.megatron_deepspeed import read_megatron_deepspeed_checkpoint
from megatron_bloom.checkpoint.native import read_native_checkpoint
from megatron_bloom.errors import UserError

COLUMN = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
          "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
ROW = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


def write_original(hf, folder, tp, step=7, args=True, drift=0.0):
    """Write ``hf``'s weights the way Megatron-DeepSpeed's BLOOM pipeline saved them.

    layer_01 embedding (+ its norm as word_embeddings.norm), layer_02 a function (no file),
    block i in layer_{i+3}, layer_{L+3} a function, the final LayerNorm in layer_{L+4} as
    weight/bias. ``drift`` is added to TP rank 1's copies of replicated tensors (as bf16 training
    let them drift) so that averaging can be checked.
    """
    sd = {k.replace("transformer.", ""): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    L = hf.config.n_layer
    tag = os.path.join(folder, f"global_step{step}")
    os.makedirs(tag)

    def save(idx, rank, tensors):
        torch.save({k: v.clone() for k, v in tensors.items()}, os.path.join(tag, f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"))

    def replicated(t, rank):
        return t + drift if rank == 1 else t

    for r in range(tp):
        save(1, r, {"word_embeddings.weight": sd["word_embeddings.weight"].chunk(tp, 0)[r],
                    "word_embeddings.norm.weight": replicated(sd["word_embeddings_layernorm.weight"], r),
                    "word_embeddings.norm.bias": replicated(sd["word_embeddings_layernorm.bias"], r)})
        for i in range(L):
            block = {}
            for k, v in ((k[len(f"h.{i}."):], v) for k, v in sd.items() if k.startswith(f"h.{i}.")):
                block[k] = v.chunk(tp, 0)[r] if k in COLUMN else v.chunk(tp, 1)[r] if k in ROW else replicated(v, r)
            save(i + 3, r, block)
        save(L + 4, r, {"weight": replicated(sd["ln_f.weight"], r), "bias": replicated(sd["ln_f.bias"], r)})
    with megatron_enums_importable():  # pickled as Megatron-DeepSpeed does: megatron.enums members
        enums = sys.modules["megatron.enums"]
        for mp in range(tp):
            state = {"iteration": step, "module": None, "np_rng_state": np.random.get_state()}
            if args:
                state["args"] = argparse.Namespace(
                    num_attention_heads=hf.config.n_head, hidden_size=hf.config.hidden_size, layernorm_epsilon=1e-5,
                    seq_length=64, params_dtype=torch.bfloat16,
                    position_embedding_type=enums.PositionEmbeddingType.alibi)
            torch.save(state, os.path.join(tag, f"mp_rank_{mp:02d}_model_states.pt"))
    with open(os.path.join(folder, "latest"), "w") as fh:
        fh.write(f"global_step{step}")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("mds")
    hf = tiny_hf_model(seed=5, vocab_size=250, hidden_size=48, n_head=6, n_layer=3)
    hf.save_pretrained(root / "hf")
    write_original(hf, str(root / "mds"), tp=2)
    return root, hf


def test_to_transformers_and_native(original, tmp_path):
    root, hf = original
    out = tmp_path / "hf"
    proc = run_cli("convert_checkpoint.py", "megatron-deepspeed-to-hf", "--load", root / "mds", "--out", out)
    assert proc.returncode == 0, proc.stderr
    want, got = load_file(root / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 250, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)

    native = tmp_path / "native"
    proc = run_cli("convert_checkpoint.py", "megatron-deepspeed-to-native", "--load", root / "mds" / "global_step7",
                   "--out", native, "--tp", 3)
    assert proc.returncode == 0, proc.stderr
    cfg, sd = read_native_checkpoint(str(native))
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.vocab_size, cfg.seq_length) == (3, 6, 250, 64)
    assert all(torch.equal(sd[k], want[k]) for k in want)


def test_replicated_copies_are_averaged(tmp_path):
    hf = tiny_hf_model(seed=6, vocab_size=256, hidden_size=24, n_head=3, n_layer=2)
    write_original(hf, str(tmp_path), tp=2, drift=0.25)  # rank 1's LayerNorms and row-parallel biases
    cfg, sd, args = read_megatron_deepspeed_checkpoint(str(tmp_path))
    assert args["iteration"] == 7 and cfg.num_attention_heads == 3
    assert args["position_embedding_type"] is PositionEmbeddingType.alibi  # read without Megatron installed
    ref = hf.state_dict()
    for key in ("transformer.h.1.input_layernorm.weight", "transformer.h.0.self_attention.dense.bias",
                "transformer.ln_f.bias", "transformer.word_embeddings_layernorm.weight"):
        expected = torch.stack([ref[key], ref[key] + 0.25]).mean(0)
        torch.testing.assert_close(sd[key], expected, atol=0, rtol=0)
    assert torch.equal(sd["transformer.h.1.mlp.dense_4h_to_h.weight"], ref["transformer.h.1.mlp.dense_4h_to_h.weight"])


def test_head_count_needed_without_args(tmp_path):
    hf = tiny_hf_model(seed=7, vocab_size=250, hidden_size=24, n_head=3, n_layer=1)
    write_original(hf, str(tmp_path / "mds"), tp=1, args=False)
    with pytest.raises(UserError, match="pass --num-attention-heads"):
        read_megatron_deepspeed_checkpoint(str(tmp_path / "mds"))
    cfg, _, _ = read_megatron_deepspeed_checkpoint(str(tmp_path / "mds"), num_attention_heads=3)
    assert cfg.num_attention_heads == 3 and cfg.vocab_size == 250


class _Payload:
    """Stands for any class outside the allow-list (its unpickling could run code)."""


def test_args_with_other_objects_are_refused_not_unpickled(tmp_path):
    hf = tiny_hf_model(seed=8, vocab_size=250, hidden_size=24, n_head=3, n_layer=1)
    write_original(hf, str(tmp_path / "mds"), tp=1)
    path = tmp_path / "mds" / "global_step7" / "mp_rank_00_model_states.pt"
    torch.save({"iteration": 7, "args": argparse.Namespace(num_attention_heads=3, hook=_Payload())}, path)
    with pytest.raises(UserError) as err:
        read_megatron_deepspeed_checkpoint(str(tmp_path / "mds"))
    message = str(err.value)
    assert "\n" not in message and "_Payload" in message and "pass --num-attention-heads" in message
    cfg, _, _ = read_megatron_deepspeed_checkpoint(str(tmp_path / "mds"), num_attention_heads=3)
    assert cfg.num_attention_heads == 3
