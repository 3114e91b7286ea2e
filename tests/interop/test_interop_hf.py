"""transformers folder <-> native checkpoint: bitwise round trips, logits, dtypes, shards, key variants."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from interop_helpers import run_cli, save_tokenizer, tiny_hf_model
from megatron_bloom.checkpoint.hf import read_hf_checkpoint, write_hf_checkpoint
from megatron_bloom.checkpoint.native import (
    LAYER_FILE,
    model_from_state_dict,
    read_native_checkpoint,
    write_native_checkpoint,
)

# Our eager attention against transformers' (both baddbmm + float32 softmax), fp32: observed
# max difference ~1e-6 on logits of magnitude ~1 (summation order of the fused GeLU and of the
# TP-free matmuls); a wrong weight, slope or mask moves logits by 1e-2 or more.
ATOL = RTOL = 1e-5


def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf = tiny_hf_model(seed=1, vocab_size=250, hidden_size=48, n_head=6, n_layer=3)
    hf.save_pretrained(root / "src")
    save_tokenizer(str(root / "src"))  # a model folder that also carries its tokenizer
    return root, hf


def test_cli_round_trip_is_bitwise_and_matches_transformers(source, tmp_path):
    root, hf = source
    native = tmp_path / "native"
    proc = run_cli("convert_checkpoint.py", "hf-to-native", "--hf", root / "src", "--out", native, "--tp", 2, "--pp", 2)
    assert proc.returncode == 0, proc.stderr
    step = native / "global_step0"
    # vocab 250 padded to 256 (multiple of 128 * TP) and split by rows over the two TP ranks.
    emb = torch.load(step / LAYER_FILE.format(idx=1, tp=1), weights_only=True)["word_embeddings.weight"]
    assert emb.shape == (128, 48) and not emb[122:].any()
    state = torch.load(step / "megatron_bloom.pt", weights_only=True)
    assert state["weights_only"] and state["layout"]["tp"] == 2
    assert state["config"]["parallel"]["pipeline_model_parallel_size"] == 2
    assert os.path.isfile(native / "tokenizer" / "tokenizer.json")

    out = tmp_path / "back"
    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", native, "--out", out)
    assert proc.returncode == 0, proc.stderr
    _same(_tensors(root / "src"), _tensors(out))

    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)  # tokenizer travelled with the weights
    assert (again.config.bos_token_id, again.config.eos_token_id, again.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    cfg, sd = read_native_checkpoint(str(native))
    ours = model_from_state_dict(cfg, sd, attention_impl="eager")
    ids = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(again(ids).logits, expected, atol=0, rtol=0)  # same tensors, same code
        got = ours(ids)
    assert got.shape[-1] == 256 and int(got.argmax(-1).max()) < 250
    torch.testing.assert_close(got[..., :250], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_kept(tmp_path, dtype):
    hf = tiny_hf_model(seed=2, vocab_size=131, hidden_size=24, n_head=3, n_layer=2).to(dtype)
    hf.save_pretrained(tmp_path / "src")
    cfg, sd = read_hf_checkpoint(str(tmp_path / "src"))
    assert {t.dtype for t in sd.values()} == {dtype}
    write_native_checkpoint(sd, cfg, str(tmp_path / "native"), tp=3)
    cfg2, sd2 = read_native_checkpoint(str(tmp_path / "native"))
    write_hf_checkpoint(sd2, cfg2, str(tmp_path / "out"))
    _same(_tensors(tmp_path / "src"), _tensors(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["dtype"] == str(dtype).replace("torch.", "")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == dtype


def test_dtype_flag_casts(source, tmp_path):
    root, _ = source
    cfg, sd = read_hf_checkpoint(str(root / "src"))
    write_native_checkpoint(sd, cfg, str(tmp_path / "native"), tp=1, dtype="bf16")
    _, sd2 = read_native_checkpoint(str(tmp_path / "native"))
    assert all(t.dtype == torch.bfloat16 for t in sd2.values())
    write_hf_checkpoint(sd2, cfg, str(tmp_path / "out"), dtype="fp16")
    assert {t.dtype for t in _tensors(tmp_path / "out").values()} == {torch.float16}
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "float16"


def test_input_variants_read_the_same(source, tmp_path):
    """Sharded safetensors with an index, BloomModel keys (no prefix), an explicit tied lm_head,
    pytorch_model.bin shards with their index: all give the same state dict."""
    root, hf = source
    cfg, want = read_hf_checkpoint(str(root / "src"))

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    hf.transformer.save_pretrained(tmp_path / "base")  # BloomModel: keys without "transformer."

    full = {k: v.clone() for k, v in hf.state_dict().items()}  # includes lm_head.weight (tied)
    os.makedirs(tmp_path / "head")
    save_file(full, str(tmp_path / "head" / "model.safetensors"))

    os.makedirs(tmp_path / "bin")
    keys = sorted(full)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: full[k] for k in part}, tmp_path / "bin" / name)
        weight_map.update({k: name for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(tmp_path / "bin" / "pytorch_model.bin.index.json", "w"))

    for folder in ("sharded", "base", "head", "bin"):
        if folder in ("head", "bin"):
            hf.config.save_pretrained(tmp_path / folder)
        got_cfg, got = read_hf_checkpoint(str(tmp_path / folder))
        assert got_cfg == cfg, folder
        _same(want, got)


def test_old_config_key_names(source, tmp_path):
    root, _ = source
    cfg, sd = read_hf_checkpoint(str(root / "src"))
    write_hf_checkpoint(sd, cfg, str(tmp_path / "old"))
    config = json.load(open(tmp_path / "old" / "config.json"))
    config["n_embed"] = config.pop("hidden_size")
    config["num_attention_heads"] = config.pop("n_head")
    json.dump(config, open(tmp_path / "old" / "config.json", "w"))
    assert read_hf_checkpoint(str(tmp_path / "old"))[0] == cfg


def test_large_export_is_sharded_with_an_index(source, tmp_path):
    root, hf = source
    cfg, sd = read_hf_checkpoint(str(root / "src"))
    write_hf_checkpoint(sd, cfg, str(tmp_path / "out"), max_shard_bytes=50_000)
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not os.path.exists(tmp_path / "out" / "model.safetensors")
    _same(_tensors(root / "src"), _tensors(tmp_path / "out"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 250, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, atol=0, rtol=0)
