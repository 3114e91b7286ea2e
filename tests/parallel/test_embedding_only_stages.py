"""Stages that hold only an embedding (BLOOMZ-176B's 70 blocks on 72 stages, made tiny).

Two blocks on PP=4 with ``type:transformer|embedding``: stage 0 holds the embedding, stages 1 and 2
one block each (2 with the final LayerNorm), stage 3 only the tied LM head. It trains along the
one-process curve, resumes bitwise, keeps Megatron-DeepSpeed's layer file names and exports the
same transformers weights as one process.

Tolerance: as in tests/engine/test_engine_parity.py. fp32 on CPU; a pipeline of one micro-batch
stream per stage sums the same numbers in the same order as one process except where DeepSpeed's
pipeline engine accumulates the tied embedding's two gradients (first and last stage), so losses
and weights may differ from one process by float summation order only: 2e-5 relative on the loss
(the exported weights: see the test).
"""
import math
import os

import pytest
from safetensors.torch import load_file

from megatron_bloom.testing import run_distributed

from ckpt_worker import run  # tests/checkpoint, on pytest.ini's pythonpath
from interop_helpers import run_cli  # tests/interop

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RTOL = 2e-5
TWO_BLOCKS = dict(model=dict(num_layers=2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process 0 -> 3 saved; PP=4 0 -> 6 straight, 0 -> 3 saved and 3 -> 6 resumed (ZeRO-0: under
    ZeRO-1 the installed DeepSpeed reduces the gradient norm once per parameter group, and drops the
    LM-head-only stage's empty no-decay group, so that stage skips a collective the others make)."""
    root = tmp_path_factory.mktemp("embedding_stages")
    one, four = str(root / "one"), str(root / "four")
    reference = run_distributed(run, 1, 1, 1, 0, 0, 3, save_dir=one, timeout=300, **TWO_BLOCKS)[0]
    straight = run_distributed(run, 4, 1, 4, 0, 0, 6, timeout=400, **TWO_BLOCKS)[0]
    first = run_distributed(run, 4, 1, 4, 0, 0, 3, save_dir=four, timeout=400, **TWO_BLOCKS)[0]
    resumed = run_distributed(run, 4, 1, 4, 0, 3, 6, load_dir=four, timeout=400, **TWO_BLOCKS)[0]
    return dict(one=one, four=four, reference=reference, straight=straight, first=first, resumed=resumed)


def test_trains_like_one_process(runs):
    for step, (got, want) in enumerate(zip(runs["straight"][:3], runs["reference"])):
        assert math.isclose(got, want, rel_tol=RTOL), (step, got, want)


def test_resumes_bitwise(runs):
    assert runs["first"] == runs["straight"][:3]
    assert runs["resumed"] == runs["straight"][3:]


def test_layer_files_are_megatron_deepspeeds(runs):
    """The embedding (1), the blocks (3, 4) and the final LayerNorm (6), as one process writes them;
    the last stage's tied LM head has no file of its own (DeepSpeed saves it with layer 1)."""
    def layer_files(folder):
        return {n for n in os.listdir(os.path.join(folder, "global_step3")) if n.startswith("layer_")}

    want = {f"layer_{i:02d}-model_00-model_states.pt" for i in (1, 3, 4, 6)}
    assert layer_files(runs["four"]) == layer_files(runs["one"]) == want


def test_exports_the_one_process_weights(runs, tmp_path):
    exported = {}
    for name in ("one", "four"):
        out = tmp_path / name
        proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", runs[name], "--out", out)
        assert proc.returncode == 0, proc.stderr
        exported[name] = {}
        for f in sorted(os.listdir(out)):
            if f.endswith(".safetensors"):
                exported[name].update(load_file(os.path.join(out, f)))
    one, four = exported["one"], exported["four"]
    assert set(one) == set(four) and any("h.1." in k for k in one)
    for key in one:
        # Adam turns a summation-order difference in a near-zero gradient into a visible one in
        # that element's update (measured: 1.2e-6 in a query_key_value bias of largest value 9e-3),
        # so each tensor is compared to its own scale; a misplaced or stale layer is off by O(1).
        assert four[key].shape == one[key].shape, key
        assert (four[key] - one[key]).abs().max() <= 1e-3 * one[key].abs().max(), key


def test_bf16_trains_like_one_process_and_other_optimizers_are_refused():
    """BLOOMZ-176B's precision on its kind of layout: bf16 (DeepSpeed's bf16 optimizer) with a last
    stage that holds only the tied LM head, whose gradient-norm list is empty (one all-reduce is
    kept: training/deepspeed_glue.py). fp16 and fp32 ZeRO-1 reduce per parameter group and would
    hang on that stage: validate_config refuses them in one line."""
    from megatron_bloom.config import parse_config, validate_config
    from megatron_bloom.errors import UserError

    one = run_distributed(run, 1, 1, 1, 0, 0, 2, timeout=300, bf16=True, **TWO_BLOCKS)[0]
    four = run_distributed(run, 4, 1, 4, 0, 0, 2, timeout=400, bf16=True, **TWO_BLOCKS)[0]
    for got, want in zip(four, one):
        assert math.isclose(got, want, rel_tol=1e-2), (four, one)  # bf16 sums in another order
    for flags in (["--fp16"], ["--zero-stage", "1"]):
        with pytest.raises(UserError, match="stage 3 with only the tied LM head .* hangs; train in bf16"):
            validate_config(parse_config(["--model-name", "tiny", "--pipeline-model-parallel-size", "4", *flags]), 4)
