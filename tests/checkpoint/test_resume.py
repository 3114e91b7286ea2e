"""Exact resume at a 3D layout, and resume at another layout through universal checkpoints."""
import math
import os

import pytest

from megatron_bloom.testing import run_distributed

from ckpt_worker import run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Layout changes reshard the fp32 master weights and Adam moments exactly (bitwise, per DeepSpeed's
# converter); the losses after resume then differ from the unchanged run only by float summation
# order, as in the engine parity tests: the same 2e-5 relative tolerance applies.
RTOL = 2e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(2,2,2) ZeRO-1: 8 steps straight, and 4 steps + save (the shared checkpoint)."""
    d = str(tmp_path_factory.mktemp("ckpt"))
    straight = run_distributed(run, 8, 2, 2, 1, 0, 8, timeout=400)[0]
    first = run_distributed(run, 8, 2, 2, 1, 0, 4, save_dir=d, timeout=400)[0]
    assert first == straight[:4]
    return d, straight


def test_checkpoint_layout_on_disk(saved):
    d, _ = saved
    assert open(os.path.join(d, "latest")).read() == "global_step4"
    files = set(os.listdir(os.path.join(d, "global_step4")))
    # Megatron-DeepSpeed's BLOOM layout: one file per pipeline layer with weights and TP rank:
    # the embedding with its LayerNorm (1), 4 blocks (3-6), the final LayerNorm (8); 0, 2, 7 are
    # weightless and the tied head (9) shares layer 1's file.
    layers = {int(n[6:8]) for n in files if n.startswith("layer_")}
    assert layers == {1, 3, 4, 5, 6, 8}
    for layer in layers:
        assert f"layer_{layer:02d}-model_00-model_states.pt" in files
        assert f"layer_{layer:02d}-model_01-model_states.pt" in files
    assert {"mp_rank_00_model_states.pt", "complete", "megatron_bloom.pt", "rng"} <= files


def test_exact_resume_is_bitwise(saved):
    d, straight = saved
    second = run_distributed(run, 8, 2, 2, 1, 4, 8, load_dir=d, timeout=400)[0]
    assert second == straight[4:]


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2)])
def test_resume_at_another_layout(saved, tp, pp, dp):
    d, straight = saved
    resumed = run_distributed(run, tp * pp * dp, tp, pp, 1, 4, 8, load_dir=d, timeout=400)[0]
    for got, want in zip(resumed, straight[4:]):
        assert math.isclose(got, want, rel_tol=RTOL), (resumed, straight[4:])
