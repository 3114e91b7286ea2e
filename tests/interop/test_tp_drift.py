"""TP-duplicated parameters whose copies drifted apart are reported by every TP merge, not hidden."""
import pytest
import torch
from safetensors.torch import load_file

from interop_helpers import run_cli, tiny_hf_model
from megatron_bloom.checkpoint.native import LAYER_FILE, model_config_from_state, read_native_checkpoint, read_state
from megatron_bloom.checkpoint.universal import refuse_drifted_copies
from megatron_bloom.errors import UserError

KEY = "input_layernorm.weight"  # of block 1: layer file 4 (block i is layer 3 + i)


@pytest.fixture()
def native(tmp_path):
    hf = tiny_hf_model(seed=2, n_layer=2)
    hf.save_pretrained(tmp_path / "hf")
    proc = run_cli("convert_checkpoint.py", "hf-to-native", "--hf", tmp_path / "hf", "--out", tmp_path / "native",
                   "--tp", 2)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "native"


def config_of(native):
    return model_config_from_state(read_state(str(native / "global_step0")), "megatron_bloom.pt")


def drift(native):
    """Move TP rank 1's copy of one duplicated tensor by up to 0.25; returns both copies."""
    f = native / "global_step0" / LAYER_FILE.format(idx=4, tp=1)
    sd = torch.load(f, weights_only=True)
    rank0 = torch.load(native / "global_step0" / LAYER_FILE.format(idx=4, tp=0), weights_only=True)[KEY]
    sd[KEY] = sd[KEY] + torch.linspace(0, 0.25, sd[KEY].numel())
    torch.save(sd, f)
    return rank0, sd[KEY]


def test_a_healthy_checkpoint_merges_silently(native, tmp_path):
    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", native, "--out", tmp_path / "out")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    refuse_drifted_copies(str(native / "global_step0"), config_of(native))  # nothing to refuse


def test_export_names_the_drift_and_averages_the_copies(native, tmp_path):
    rank0, rank1 = drift(native)
    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", native, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr
    assert f"the 2 TP copies of '{KEY}' differ by up to 0.25" in warnings[0]
    exported = load_file(tmp_path / "out" / "model.safetensors")[f"transformer.h.1.{KEY}"]
    torch.testing.assert_close(exported, (rank0 + rank1) / 2, atol=0, rtol=0)
    _, sd = read_native_checkpoint(str(native))  # the reader used by evaluation and generation
    torch.testing.assert_close(sd[f"transformer.h.1.{KEY}"], exported, atol=0, rtol=0)


def test_layout_change_refuses_drifted_copies_with_one_line(native):
    drift(native)
    with pytest.raises(UserError) as err:
        refuse_drifted_copies(str(native / "global_step0"), config_of(native))
    message = str(err.value)
    assert "\n" not in message
    assert f"'transformer.h.1.{KEY}', by 0.25" in message and "--sync-tp-duplicated-parameters" in message
