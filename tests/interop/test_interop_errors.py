"""Broken or mismatched checkpoints give one-line errors that name the file; the CLIs exit 2."""
import json
import os
import pickle
import shutil

import pytest
import torch

from interop_helpers import run_cli, tiny_hf_model
from megatron_bloom.checkpoint.hf import read_hf_checkpoint
from megatron_bloom.checkpoint.native import LAYER_FILE, read_native_checkpoint, write_native_checkpoint
from megatron_bloom.errors import UserError


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("err")
    hf = tiny_hf_model(seed=9, vocab_size=250, hidden_size=24, n_head=3, n_layer=2)
    hf.save_pretrained(root / "hf")
    hf.save_pretrained(root / "sharded", max_shard_size="20KB")
    cfg, sd = read_hf_checkpoint(str(root / "hf"))
    write_native_checkpoint(sd, cfg, str(root / "native"), tp=1)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)


def _truncate(path, keep):
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: keep if keep > 0 else len(data) + keep])


def broken_hf(root, tmp_path, kind):
    """A transformers folder broken in one way; returns (folder, text the error must contain)."""
    if kind == "truncated-safetensors":
        _copy(root / "hf", tmp_path / kind)
        _truncate(tmp_path / kind / "model.safetensors", -100)
        return tmp_path / kind, "model.safetensors is not a valid safetensors file"
    if kind == "truncated-header":
        _copy(root / "hf", tmp_path / kind)
        _truncate(tmp_path / kind / "model.safetensors", 5)
        return tmp_path / kind, "model.safetensors is not a valid safetensors file"
    if kind == "missing-shard":
        _copy(root / "sharded", tmp_path / kind)
        index = json.load(open(tmp_path / kind / "model.safetensors.index.json"))
        shard = sorted(set(index["weight_map"].values()))[1]
        os.remove(tmp_path / kind / shard)
        return tmp_path / kind, f"model.safetensors.index.json lists shard {shard}, which is missing"
    if kind == "other-shape":
        _copy(root / "hf", tmp_path / kind)
        config = json.load(open(tmp_path / kind / "config.json"))
        config["hidden_size"] = 48  # the tensors are 24 wide
        config["n_head"] = 6
        json.dump(config, open(tmp_path / kind / "config.json", "w"))
        return tmp_path / kind, "has shape (250, 24), expected (250, 48)"
    if kind == "corrupt-bin":
        os.makedirs(tmp_path / kind)
        shutil.copyfile(root / "hf" / "config.json", tmp_path / kind / "config.json")
        with open(tmp_path / kind / "pytorch_model.bin", "wb") as fh:
            fh.write(b"PK\x03\x04 this is not a zip archive")
        return tmp_path / kind, "pytorch_model.bin is corrupt, truncated or not a tensor file"
    if kind == "pickle-with-code":
        os.makedirs(tmp_path / kind)
        shutil.copyfile(root / "hf" / "config.json", tmp_path / kind / "config.json")
        torch.save({"transformer.ln_f.weight": _Evil()}, tmp_path / kind / "pytorch_model.bin")
        return tmp_path / kind, "pytorch_model.bin holds posix.system, which loading would build by running code"
    raise ValueError(kind)


KINDS = ["truncated-safetensors", "truncated-header", "missing-shard", "other-shape", "corrupt-bin", "pickle-with-code"]


@pytest.mark.parametrize("kind", KINDS)
def test_broken_transformers_folder(folders, tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, message = broken_hf(folders, tmp_path, kind)
    with pytest.raises(UserError) as info:
        read_hf_checkpoint(str(folder))
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert not os.path.exists(tmp_path / "pwned")  # unpickling never runs code


@pytest.mark.parametrize("damage", ["truncate", "garbage", "remove"])
def test_broken_native_checkpoint(folders, tmp_path, damage):
    ckpt = tmp_path / "native"
    _copy(folders / "native", ckpt)
    layer = ckpt / "global_step0" / LAYER_FILE.format(idx=3, tp=0)
    if damage == "truncate":
        _truncate(layer, 300)
    elif damage == "garbage":
        layer.write_bytes(pickle.dumps("not a checkpoint"))
    else:
        os.remove(layer)
    with pytest.raises(UserError) as info:
        read_native_checkpoint(str(ckpt))
    assert str(layer) in str(info.value) and "\n" not in str(info.value)


def test_engine_refuses_another_model_shape(folders):
    from megatron_bloom.checkpoint.manager import check_compatible, find_checkpoint
    from megatron_bloom.config.schema import ModelConfig

    info = find_checkpoint(str(folders / "native"))
    with pytest.raises(UserError, match="hidden_size=24 but the configuration says 32"):
        check_compatible(info, ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=3, vocab_size=250))


def test_tp_must_divide_heads(folders, tmp_path):
    cfg, sd = read_hf_checkpoint(str(folders / "hf"))
    with pytest.raises(UserError, match="num_attention_heads=3 is not divisible by tensor-parallel size 2; use one of 1, 3"):
        write_native_checkpoint(sd, cfg, str(tmp_path / "n"), tp=2)


@pytest.mark.parametrize("kind", ["truncated-safetensors", "missing-shard", "other-shape", "corrupt-native", "bad-flag"])
def test_cli_errors_are_one_line(folders, tmp_path, kind):
    if kind == "corrupt-native":
        ckpt = tmp_path / "native"
        _copy(folders / "native", ckpt)
        (ckpt / "global_step0" / LAYER_FILE.format(idx=1, tp=0)).write_bytes(b"\x80\x02garbage")
        args, message = ["native-to-hf", "--load", ckpt, "--out", tmp_path / "o"], "layer_01-model_00-model_states.pt is corrupt"
    elif kind == "bad-flag":
        args, message = ["hf-to-native", "--hf", folders / "hf", "--out", tmp_path / "o", "--tp", "two"], "--tp: invalid int value: 'two'"
    else:
        folder, message = broken_hf(folders, tmp_path, kind)
        args = ["hf-to-native", "--hf", folder, "--out", tmp_path / "o", "--tp", 1]
    proc = run_cli("convert_checkpoint.py", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_generate_cli_error(tmp_path):
    proc = run_cli("generate.py", "--load", tmp_path / "nowhere", "--prompt", "hi")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --load {tmp_path / 'nowhere'} does not exist"
