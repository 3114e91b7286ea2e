"""The model seam: BLOOM is reached through its ModelSpec, and only models/ imports models.bloom."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.spec import get_model_spec

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "megatron_bloom")


def test_bloom_spec_builds_a_tiny_model():
    spec = get_model_spec("bloom")
    assert spec is get_model_spec()
    cfg = spec.named_config("tiny")
    assert isinstance(cfg, ModelConfig) and spec.config_cls is ModelConfig
    torch.manual_seed(0)
    model = spec.build_model(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, cfg.padded_vocab_size(1))
    block = spec.build_block(cfg, 0)
    assert block(torch.randn(1, 4, cfg.hidden_size)).shape == (1, 4, cfg.hidden_size)


def test_named_sizes_are_reachable():
    spec = get_model_spec()
    assert {"bloom-560m", "bloom-176b", "tiny", "tiny-odd"} <= set(spec.named_configs)
    cfg = spec.named_config("bloom-7b1", seq_length=512)
    assert (cfg.model_name, cfg.num_layers, cfg.hidden_size, cfg.seq_length) == ("bloom-7b1", 30, 4096, 512)
    with pytest.raises(KeyError, match="unknown model_name"):
        spec.named_config("bloom-9000")


def test_hf_adapter_round_trips_the_config():
    pytest.importorskip("transformers")
    spec = get_model_spec()
    cfg = spec.named_config("tiny-odd", hidden_dropout=0.0, attention_dropout=0.0)
    back = spec.hf.config_from_hf(spec.hf.to_hf_config(cfg).to_dict())
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "layer_norm_epsilon"):
        assert getattr(back, key) == getattr(cfg, key), key
    assert spec.hf.hf_key("h.0.input_layernorm.weight") == "transformer.h.0.input_layernorm.weight"
    assert spec.hf.hf_key("lm_head.weight") == "lm_head.weight"


def test_unknown_family_is_refused():
    with pytest.raises(KeyError, match="unknown model family"):
        get_model_spec("gpt-17")


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_only_models_imports_a_model_family():
    """Every import statement counts, also those inside functions."""
    bad = []
    for folder, _, names in os.walk(PACKAGE):
        if os.path.relpath(folder, PACKAGE).split(os.sep)[0] == "models":
            continue
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                bad += [f"{os.path.relpath(path, PACKAGE)}: {m}" for m in _imports(path)
                        if m == "megatron_bloom.models.bloom" or m.startswith("megatron_bloom.models.bloom.")]
    assert not bad, "import BLOOM through megatron_bloom.models.spec.get_model_spec:\n" + "\n".join(sorted(set(bad)))


def test_configuration_loads_without_torch():
    code = "import sys, megatron_bloom.config; megatron_bloom.config.parse_config(['--model-name', 'tiny']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
