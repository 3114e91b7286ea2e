"""Our training checkpoints are Megatron-DeepSpeed's BLOOM layout: file for file, key for key, args included.

A TP=2 x PP=2 engine saves its starting weights; BLOOM's own conversion logic (transformers'
convert_bloom_original_checkpoint_to_pytorch.py, re-implemented in mds_reference.py) reads them
back bitwise, and the engine files carry Megatron-DeepSpeed's args as it pickles them.
"""
import os
import re

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from interop_helpers import run_cli
from interop_worker import _setup
from mds_reference import megatron_check_checkpoint_args, reference_bloom_state_dict
from megatron_bloom.testing import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TP, PP = 2, 2


def train_and_save(save_dir, tp, pp, steps):
    """``steps`` steps, then a save with Megatron-DeepSpeed's client state (as the trainer saves)."""
    from megatron_bloom.checkpoint import save_checkpoint
    from megatron_bloom.checkpoint.megatron_args import client_state
    from megatron_bloom.config import config_to_dict
    from megatron_bloom.training.schedules import LearningRateSchedule
    from interop_worker import _batches

    cfg, state, engine = _setup(tp, pp)
    for step in range(steps):
        engine.train_step(_batches(cfg, state, step) if engine.reads_data else [])
    gbs = cfg.training.global_batch_size
    schedule = LearningRateSchedule.from_config(cfg.training)
    layout = {"tp": tp, "pp": pp, "dp": state.dims.dp, "zero": cfg.parallel.zero_stage}
    save_checkpoint(engine, save_dir, steps, {"iteration": steps, "layout": layout, "config": config_to_dict(cfg)},
                    keep_last_k=None,
                    client_state=client_state(cfg, schedule, iteration=steps, consumed_samples=steps * gbs,
                                              consumed_tokens=steps * gbs * cfg.model.seq_length,
                                              padded_vocab_size=engine.padded_vocab_size,
                                              world_size=dist.get_world_size()))
    return cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("mds_layout")
    results = run_distributed(train_and_save, TP * PP, str(root / "ckpt"), TP, PP, 0, timeout=300)
    return root / "ckpt", results[0]


def test_files_are_megatron_deepspeeds(saved):
    ckpt, cfg = saved
    folder = ckpt / "global_step0"
    L = cfg.model.num_layers
    layers = sorted(n for n in os.listdir(folder) if n.startswith("layer_"))
    # GPTModelPipe: embedding 1, blocks 3 .. L+2, final LayerNorm L+4; one file per TP rank.
    want = [f"layer_{idx:02d}-model_{r:02d}-model_states.pt" for idx in [1, *range(3, L + 3), L + 4] for r in range(TP)]
    assert layers == sorted(want)
    assert (ckpt / "latest").read_text() == "global_step0"
    engine_files = sorted(n for n in os.listdir(folder) if n.startswith("mp_rank_"))
    assert engine_files == [f"mp_rank_{r:02d}_model_states.pt" for r in range(TP * PP)]
    optim = sorted(n for n in os.listdir(folder) if n.endswith("optim_states.pt"))
    assert optim and all(re.fullmatch(r"(bf16_)?zero_pp_rank_0_mp_rank_\d\d_optim_states\.pt", n) for n in optim)


def test_keys_are_megatron_deepspeeds(saved):
    ckpt, cfg = saved
    folder = ckpt / "global_step0"
    L = cfg.model.num_layers

    def keys(idx):
        return set(torch.load(folder / f"layer_{idx:02d}-model_00-model_states.pt", weights_only=True))

    assert keys(1) == {"word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias"}
    assert keys(L + 4) == {"weight", "bias"}
    block = {"input_layernorm.weight", "input_layernorm.bias", "self_attention.query_key_value.weight",
             "self_attention.query_key_value.bias", "self_attention.dense.weight", "self_attention.dense.bias",
             "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
             "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"}
    assert all(keys(idx) == block for idx in range(3, L + 3))


def initial_weights(cfg):
    """The starting weights at TP=1 PP=1: every spec built as the engine builds it (seed + layer index)."""
    from megatron_bloom.models.spec import get_model_spec
    from megatron_bloom.training.deepspeed_glue import BloomSequential

    spec = get_model_spec()
    model = BloomSequential(spec.layer_specs(cfg.model, cfg.model.padded_vocab_size(1)), None, cfg.training.seed)
    out = {}
    for idx, module in model.layers.items():
        for key, tensor in module.state_dict().items():
            out[spec.sharding.full_key(int(idx), key, cfg.model.num_layers)[len("transformer."):]] = tensor
    return out


def test_blooms_converter_logic_reads_the_starting_weights_bitwise(saved):
    """What TP=2 x PP=2 saved, merged by BLOOM's converter logic, is the TP=1 model's start exactly."""
    ckpt, cfg = saved
    got = reference_bloom_state_dict(str(ckpt / "global_step0"), TP)
    want = initial_weights(cfg)
    assert set(got) == set(want)
    V = cfg.model.vocab_size
    for key, tensor in want.items():
        g = got[key]
        if key == "word_embeddings.weight":
            assert not g[V:].any()  # padding rows are zero
            g, tensor = g[:V], tensor[:V]
        assert torch.equal(g, tensor), key


def test_engine_files_hold_megatron_args(saved):
    from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable

    ckpt, cfg = saved
    with megatron_enums_importable():
        import sys

        # Loaded as Megatron-DeepSpeed loads it: full unpickling, its own enum module.
        state = torch.load(ckpt / "global_step0" / "mp_rank_00_model_states.pt", weights_only=False)
        alibi = sys.modules["megatron.enums"].PositionEmbeddingType.alibi
        args = state["args"]
        assert args.position_embedding_type is alibi
    import argparse

    current = argparse.Namespace(num_layers=cfg.model.num_layers, hidden_size=cfg.model.hidden_size,
                                 num_attention_heads=cfg.model.num_attention_heads, position_embedding_type=alibi,
                                 tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    megatron_check_checkpoint_args(args, current)
    assert state["iteration"] == 0 and state["checkpoint_version"] == 3.0
    assert args.consumed_train_samples == 0 and args.padded_vocab_size % TP == 0
    assert state["checkpoint_info"] == {"padded_vocab_size": args.padded_vocab_size,
                                        "original_vocab_size": cfg.model.vocab_size}
    assert set(state["lr_scheduler"]) >= {"max_lr", "min_lr", "warmup_steps", "decay_steps", "num_steps", "decay_style"}


def test_megatron_deepspeed_to_hf_reads_ours(saved, tmp_path):
    ckpt, _ = saved
    mds = run_cli("convert_checkpoint.py", "megatron-deepspeed-to-hf", "--load", ckpt, "--out", tmp_path / "a")
    assert mds.returncode == 0, mds.stderr
    native = run_cli("convert_checkpoint.py", "native-to-hf", "--load", ckpt, "--out", tmp_path / "b")
    assert native.returncode == 0, native.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    # The Megatron-DeepSpeed reader keeps the padded rows (as BLOOM's 250,880 did); the rest is equal.
    assert set(a) == set(b)
    for key in b:
        assert torch.equal(a[key][: b[key].shape[0]], b[key]), key


def test_deepspeeds_checkpoint_reader_maps_ours(saved):
    """DeepSpeedCheckpoint, the reader behind Megatron-DeepSpeed's tools/convert_checkpoint scripts,
    finds the embedding, blocks, final norm, degrees, args and iteration where it expects them."""
    from deepspeed.checkpoint import DeepSpeedCheckpoint

    from megatron_bloom.checkpoint.megatron_args import megatron_enums_importable

    ckpt, cfg = saved
    L = cfg.model.num_layers
    with megatron_enums_importable():  # it unpickles the engine files in full, as Megatron-DeepSpeed does
        ds = DeepSpeedCheckpoint(str(ckpt / "global_step0"))
        assert (ds.tp_degree, ds.pp_degree, ds.dp_degree) == (TP, PP, 1)
        assert ds.get_embedding_layer_id() == "layer_01" and ds.get_final_norm_layer_id() == f"layer_{L + 4:02d}"
        assert set(ds.get_embedding_state(1)) == {"word_embeddings.weight", "word_embeddings.norm.weight",
                                                  "word_embeddings.norm.bias"}
        assert set(ds.get_final_norm_state(1)) == {"weight", "bias"}
        blocks = [len(ds.get_transformer_state(tp, pp)) for pp in range(PP) for tp in range(TP)]
        assert sum(blocks) == TP * L
        assert ds.get_iteration() == 0 and ds.get_args().num_layers == L


def test_converted_checkpoints_have_the_same_layout(tmp_path):
    """hf-to-native's weights-only checkpoints: the same layer files, engine files with the args."""
    from interop_helpers import tiny_hf_model
    from megatron_bloom.checkpoint.hf import read_hf_checkpoint
    from megatron_bloom.checkpoint.megatron_args import PositionEmbeddingType, args_dict
    from megatron_bloom.checkpoint.trust import load_megatron_state
    from megatron_bloom.checkpoint.native import write_native_checkpoint

    hf = tiny_hf_model(seed=3, vocab_size=250, hidden_size=48, n_head=6, n_layer=2)
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = read_hf_checkpoint(str(tmp_path / "hf"))
    folder = tmp_path / "native" / "global_step0"
    write_native_checkpoint(sd, cfg, str(tmp_path / "native"), tp=2)
    got = reference_bloom_state_dict(str(folder), 2)
    for key, tensor in hf.state_dict().items():
        if key.startswith("transformer."):
            g = got[key[len("transformer."):]]
            assert torch.equal(g[: tensor.shape[0]], tensor), key
    for rank in range(2):
        args = args_dict(load_megatron_state(str(folder / f"mp_rank_{rank:02d}_model_states.pt")))
        assert args["tensor_model_parallel_size"] == 2 and args["num_attention_heads"] == 6
        assert args["position_embedding_type"] is PositionEmbeddingType.alibi and args["iteration"] == 0
