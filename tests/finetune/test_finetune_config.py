"""launch/finetune.py's configuration: BLOOMZ defaults, flags/YAML win, architecture from --pretrained."""
import json

import pytest

from megatron_bloom.errors import UserError
from megatron_bloom.training.finetune import resolve_finetune_config

BASE = ["--train-iters", "2", "--data-path", "unused"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


def test_bloomz_defaults_unless_set(tmp_path):
    cfg, _ = resolve_finetune_config(BASE)
    t = cfg.training
    assert (t.lr, t.lr_decay_style, t.lr_warmup_iters, t.weight_decay, t.clip_grad) == (2e-5, "constant", 0, 1e-4, 1.0)
    assert (t.adam_beta1, t.adam_beta2) == (0.9, 0.95)
    assert not cfg.finetune.norm_target_loss and cfg.finetune.overlong == "truncate"
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text("training:\n  weight_decay: 0.1\n  lr_decay_style: cosine\n")
    cfg, _ = resolve_finetune_config(BASE + ["--config", str(yaml_file), "--lr", "1e-3", "--norm-target-loss"])
    assert (cfg.training.lr, cfg.training.weight_decay, cfg.training.lr_decay_style) == (1e-3, 0.1, "cosine")
    assert cfg.finetune.norm_target_loss


def test_architecture_comes_from_the_pretrained_folder(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bloom", "n_layer": 3, "hidden_size": 48, "n_head": 4,
                                                "vocab_size": 300, "layer_norm_epsilon": 1e-6}))
    cfg, _ = resolve_finetune_config(BASE + ["--pretrained", str(hf), "--seq-length", "64"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size, m.layer_norm_epsilon) == (3, 48, 4, 300, 1e-6)
    assert m.seq_length == 64
    cfg, _ = resolve_finetune_config(BASE + ["--pretrained", str(hf), "--num-layers", "5"])
    assert cfg.model.num_layers == 5  # a flag still wins (the checkpoint check then refuses the mismatch)
    with pytest.raises(UserError, match="no such directory"):
        resolve_finetune_config(BASE + ["--pretrained", str(tmp_path / "missing")])


def test_bad_overlong_and_finetune_flags_in_pretraining():
    with pytest.raises(UserError, match="truncate, skip"):
        resolve_finetune_config(BASE + ["--overlong", "cut"])
    from megatron_bloom.config import parse_config
    from megatron_bloom.training.pretrain import pretrain

    with pytest.raises(UserError, match="launch/finetune.py"):
        pretrain(parse_config(BASE + ["--pretrained", "x"]))


@pytest.mark.parametrize("name, world", [("finetune-tp2-pp2.yaml", 4), ("bloomz-7b1.yaml", 32)])
def test_shipped_configs_validate(repo_root, monkeypatch, name, world):
    import os

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg, _ = resolve_finetune_config(["--config", os.path.join(repo_root, "configs", name), "--data-path", "x"])
    assert cfg.parallel.data_parallel_size * cfg.parallel.tensor_model_parallel_size \
        * cfg.parallel.pipeline_model_parallel_size == world
    if name == "bloomz-7b1.yaml":
        assert cfg.finetune.norm_target_loss and cfg.training.lr == 2e-5 and cfg.model.num_layers == 30
