"""Conversions hold one layer, not the model: peak memory of each against the embedding's size.

A random BLOOM of 48 blocks (fp32, 168 MiB; the embedding 16 MiB, a block 3 MiB) is converted by
``benchmarks/convert_memory.py``, each step in a fresh process reporting its resident-set growth
(peak minus the size after imports). A conversion that held the state dict would grow by at least
the model (the readers and writers before streaming grew by 1.2x to 2.3x of it); streaming ones
stay within two copies of the embedding, one output shard and a few blocks. Loading for evaluation
fills a model, so it may add the model itself, but not a merged copy besides. The converted
folders are then checked to hold exactly the source's tensors.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open

from benchmarks.convert_memory import measure
from interop_helpers import run_cli, save_tokenizer, tiny_hf_model

MIB = 2**20
SLACK = 32 * MIB
"""Allocator and interpreter noise of a step (measured: under 10 MiB at these sizes)."""


def _tensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out, files


@pytest.mark.slow
def test_conversions_stream_one_layer_at_a_time(tmp_path):
    result = measure(str(tmp_path), hidden=256, layers=48, heads=8, vocab=16000, dtype="float32", tp=2,
                     shard_bytes=16 * MIB)
    sizes, shard = result["sizes"], result["shard_bytes"]
    assert sizes["model"] > 160 * MIB and sizes["embedding"] < sizes["model"] / 10
    conversion_bound = 2 * sizes["embedding"] + shard + 2 * sizes["block"] + SLACK
    assert conversion_bound < 0.6 * sizes["model"]  # so holding the model could not pass
    growth = {r["step"]: r["growth"] for r in result["results"]}
    for step in ("hf-to-native", "native-to-hf", "mds-to-hf"):
        assert growth[step] <= conversion_bound, (step, growth[step] / MIB, conversion_bound / MIB)
    # Evaluation/generation: the model it fills, plus the layer being copied in.
    assert growth["load"] <= sizes["model"] + 2 * sizes["embedding"] + SLACK, growth["load"] / MIB

    source, _ = _tensors(tmp_path / "hf")
    for out in ("back", "mds"):
        converted, files = _tensors(tmp_path / out)
        assert len(files) > 5  # written shard by shard, named once complete
        assert not [n for n in os.listdir(tmp_path / out) if n.endswith(".tmp")]
        assert converted.keys() == source.keys()
        for key, value in source.items():
            got = converted[key]
            if out == "mds" and key == "transformer.word_embeddings.weight":
                # Megatron-DeepSpeed's reader keeps every row of the checkpoint (BLOOM's 250,880):
                # here the native checkpoint's TP padding, zeros.
                assert got.shape[0] == 16128 and not got[value.shape[0]:].any()
                got = got[:value.shape[0]]
            assert torch.equal(got, value), (out, key)


def test_hf_to_native_defaults_to_tp1_and_exports_say_whether_they_have_a_tokenizer(tmp_path):
    tiny_hf_model(seed=3, vocab_size=250, hidden_size=24, n_head=3, n_layer=2).save_pretrained(tmp_path / "hf")
    proc = run_cli("convert_checkpoint.py", "hf-to-native", "--hf", tmp_path / "hf", "--out", tmp_path / "n")
    assert proc.returncode == 0, proc.stderr
    assert "TP=1," in proc.stdout and os.path.isfile(tmp_path / "n" / "global_step0" / "layer_01-model_00-model_states.pt")
    assert not os.path.exists(tmp_path / "n" / "global_step0" / "layer_01-model_01-model_states.pt")

    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", tmp_path / "n", "--out", tmp_path / "bare")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "NO tokenizer" in last and "pass --tokenizer DIR" in last, last

    save_tokenizer(tmp_path / "tok", vocab_size=240)
    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", tmp_path / "n", "--out", tmp_path / "full",
                   "--tokenizer", tmp_path / "tok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].endswith(f"tokenizer from {tmp_path / 'tok'}")
