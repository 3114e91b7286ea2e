"""A transformers folder of another architecture (config.json's model_type is not 'bloom') is
refused in one line naming the type, before any weight file is looked at (docs/bad-inputs.md)."""
import json
import os

import pytest

from megatron_bloom.checkpoint.hf import model_config_from_hf, read_config_json, read_hf_checkpoint
from megatron_bloom.checkpoint.pretrained import pretrained_model_config
from megatron_bloom.errors import UserError

BLOOM = {"model_type": "bloom", "n_layer": 2, "hidden_size": 32, "n_head": 4, "vocab_size": 300}


@pytest.fixture
def llama(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(BLOOM, model_type="llama")))
    return str(folder)


def test_bloom_config_is_read():
    assert model_config_from_hf(BLOOM).hidden_size == 32


@pytest.mark.parametrize("read", [lambda f: model_config_from_hf(read_config_json(f), os.path.join(f, "config.json")),
                                  read_hf_checkpoint,  # convert_checkpoint.py hf-to-native, generate/evaluate --load
                                  pretrained_model_config])  # finetune --pretrained
def test_other_model_type_is_refused(llama, read):
    with pytest.raises(UserError) as err:
        read(llama)  # the folder has no weight files: the refusal comes from config.json alone
    assert str(err.value) == f"{os.path.join(llama, 'config.json')}: model_type is 'llama', not 'bloom'"
