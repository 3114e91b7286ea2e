"""--bf16 --zero-stage 0, BLOOM-176B's setting: DeepSpeed's BF16_Optimizer, fp32 masters and gradients.

DeepSpeed 0.19 runs that optimizer (with fp32 gradient accumulation) at its ZeRO stage 1 only, so
zero_stage 0 with bf16 is handed to it as stage 1 (training/deepspeed_config.py,
``deepspeed_zero_stage``). These tests check what the engine really holds, that the run is BLOOM's
optimizer step for step, and that its checkpoints (bf16_zero_pp_rank_* files) resume bitwise,
change layout through a universal checkpoint and export to transformers.

Sizes are tiny (4 layers, hidden 48, 8 sequences of 32 tokens per step): bf16 matmuls are
emulated on CPUs without AVX-512 (~1 GFLOP/s).
"""
import math
import os

import pytest
import torch
import torch.distributed as dist

from megatron_bloom.testing import run_distributed

from engine_worker import micro_batches, tiny_config, train

pytestmark = pytest.mark.distributed

STEPS = 6
SAVED_AT = 3


def optimizer_facts(pp):
    """Build the engine at bf16 ZeRO-0 on this world, take one step; what its optimizer holds."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from megatron_bloom.config import validate_config
    from megatron_bloom.distributed import init_distributed
    from megatron_bloom.training.engine import BloomEngine

    cfg = tiny_config(1, pp, 0, bf16=True)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(1, pp, backend="gloo")
    engine = BloomEngine(cfg, state)
    opt, ds = engine.optimizer, engine.engine
    seen = {}
    take_step = ds._take_model_step

    def record_accumulated_gradients(*args, **kwargs):
        # Every micro-batch's gradient has been added (and all-reduced over DP) by now.
        seen["grad_dtypes"] = {g.dtype for g in opt.fp32_groups_gradients_flat}
        seen["grad_nonzero"] = all(bool(g.abs().sum() > 0) for g in opt.fp32_groups_gradients_flat)
        return take_step(*args, **kwargs)

    ds._take_model_step = record_accumulated_gradients
    t = cfg.training
    batches = micro_batches(0, t.global_batch_size, t.micro_batch_size, state.dims.dp, state.dp_rank)
    engine.train_step(batches if engine.reads_data else [])
    base = opt.optimizer
    masters = list(opt.fp32_groups_flat_partition)
    return {
        "bf16_optimizer": isinstance(opt, BF16_Optimizer),
        "torch_optimizer": type(base).__name__,
        "data_types": ds.get_data_types(),
        "deepspeed_stage": ds.zero_optimization_stage(),
        "weights": {p.dtype for p in ds.module.parameters()},
        "masters": {m.dtype for m in masters},
        # The fp32 masters are this rank's 1/DP of the flat bf16 weights, and they are what Adam steps.
        "master_fraction": [m.numel() / flat.numel() for m, flat in zip(masters, opt.bf16_groups_flat)],
        "adam_steps_masters": all(g["params"] == [m] for g, m in zip(base.param_groups, masters)),
        "moments": {(k, v.dtype, v.numel() == m.numel()) for m in masters for k, v in base.state[m].items()
                    if k in ("exp_avg", "exp_avg_sq")},
        "grad_acc_dtype": opt.grad_acc_dtype,
        # The fp32 gradient buffer is whole (every parameter of the rank), not a partition.
        "grad_buffer_whole": all(g.numel() == flat.numel()
                                 for g, flat in zip(opt.fp32_groups_gradients_flat, opt.bf16_groups_flat)),
        **seen,
    }


@pytest.mark.parametrize("pp", [1, 2], ids=["dp2", "pp2"])
def test_engine_runs_bf16_optimizer_with_fp32_masters_and_gradients(pp):
    facts = run_distributed(optimizer_facts, 2, pp, timeout=300)
    dp = 2 // pp
    for f in facts:
        assert f["bf16_optimizer"] and f["torch_optimizer"] == "AdamW", f
        assert f["data_types"] == (torch.bfloat16, torch.float32), f
        assert f["deepspeed_stage"] == 1, f  # BF16_Optimizer's stage in DeepSpeed 0.19 (see the module doc)
        assert f["weights"] == {torch.bfloat16}, f
        assert f["masters"] == {torch.float32} and f["adam_steps_masters"], f
        assert all(abs(x - 1 / dp) < 1e-3 for x in f["master_fraction"]), f  # up to alignment padding
        assert f["moments"] == {("exp_avg", torch.float32, True), ("exp_avg_sq", torch.float32, True)}, f
        assert f["grad_acc_dtype"] == torch.float32 and f["grad_dtypes"] == {torch.float32}, f
        assert f["grad_buffer_whole"] and f["grad_nonzero"], f


# ---- the run: BF16_Optimizer's, and the same at every DP ---------------------------------------------

@pytest.fixture(scope="module")
def dp2_zero0():
    """bf16 ZeRO-0 at DP=2, the run every other is compared with."""
    out = run_distributed(train, 2, 1, 1, 0, STEPS, timeout=300, bf16=True)[0]
    assert not any(skipped for _, _, skipped in out)
    assert out[-1][0] < out[0][0] - 0.3, out  # it learns
    return out


def test_zero0_is_zero1_step_for_step(dp2_zero0):
    """Stage 0 and stage 1 run the same optimizer with the same DeepSpeed config: bitwise equal."""
    assert run_distributed(train, 2, 1, 1, 1, STEPS, timeout=300, bf16=True)[0] == dp2_zero0


# One process and DP=2 compute every micro-batch's bf16 gradient alike but add them in another order
# in fp32 (((g0+g1)+g2)+g3 against (g0+g2)+(g1+g3), then the DP all-reduce). Those ~1e-7 relative
# differences in the fp32 masters flip the rounding of a few bf16 weights per step (bf16 keeps 8
# bits), and the curves drift apart: measured over 10 steps, at most 9e-5 relative on the loss and
# 3e-4 on the gradient norm (bf16 against fp32 itself differs by up to 4e-4). Skipping the DP
# gradient all-reduce (each rank stepping on its half of the batch) moved the norm by 0.29 at the
# first step and the loss by 1e-2 from the second.
DP_RTOL = 5e-4
NORM_RTOL = 3e-3


def test_one_process_follows_dp2(dp2_zero0):
    one = run_distributed(train, 1, 1, 1, 0, STEPS, timeout=300, bf16=True)[0]
    for step, ((loss, norm, _), (want, want_norm, _)) in enumerate(zip(one, dp2_zero0)):
        assert math.isclose(loss, want, rel_tol=DP_RTOL), (step, one, dp2_zero0)
        assert math.isclose(norm, want_norm, rel_tol=NORM_RTOL), (step, one, dp2_zero0)


# ---- checkpoints: bitwise resume, another layout, transformers ----------------------------------------

def test_trainer_layout_records_deepspeeds_stage():
    """A bf16 checkpoint of either stage (and a Megatron-DeepSpeed one, read as stage 1) resumes at
    the other as the same layout; fp32 at ZeRO-0 keeps its own (no universal conversion there)."""
    from megatron_bloom.training.pretrain import layout_of

    zero0, zero1 = tiny_config(1, 1, 0, bf16=True), tiny_config(1, 1, 1, bf16=True)
    assert layout_of(zero0) == layout_of(zero1) and layout_of(zero0)["zero"] == 1
    assert layout_of(tiny_config(1, 1, 0))["zero"] == 0


def run_as_trainer(*args, **kwargs):
    """ckpt_worker.run, recording the layout as the trainer does (pretrain.layout_of)."""
    import ckpt_worker

    from megatron_bloom.training.pretrain import layout_of

    ckpt_worker.layout_of = layout_of
    return ckpt_worker.run(*args, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """bf16 ZeRO-0 at DP=2: STEPS steps straight, and SAVED_AT steps + save."""
    d = str(tmp_path_factory.mktemp("bf16_zero0"))
    straight = run_distributed(run_as_trainer, 2, 1, 1, 0, 0, STEPS, timeout=300, bf16=True)[0]
    first = run_distributed(run_as_trainer, 2, 1, 1, 0, 0, SAVED_AT, save_dir=d, timeout=300, bf16=True)[0]
    assert first == straight[:SAVED_AT]
    return d, straight


def test_checkpoint_holds_bf16_optimizer_partitions(saved):
    from megatron_bloom.checkpoint import find_checkpoint
    from megatron_bloom.checkpoint.trust import safe_load

    d, _ = saved
    info = find_checkpoint(d)
    assert info.layout == {"tp": 1, "pp": 1, "dp": 2, "zero": 1}  # DeepSpeed's stage: what the files depend on
    files = sorted(n for n in os.listdir(info.path) if n.endswith("_optim_states.pt"))
    assert files == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    for r, name in enumerate(files):
        sd = safe_load(os.path.join(info.path, name))["optimizer_state_dict"]  # the weights-only allow-list
        masters = sd["single_partition_of_fp32_groups"]
        assert set(sd["partition_count"]) == {2} and all(m.dtype == torch.float32 for m in masters)


def test_resume_is_bitwise(saved):
    d, straight = saved
    resumed = run_distributed(run_as_trainer, 2, 1, 1, 0, SAVED_AT, STEPS, load_dir=d, timeout=300, bf16=True)[0]
    assert resumed == straight[SAVED_AT:]


def test_resume_at_dp1_through_a_universal_checkpoint(saved):
    """DP=2 -> DP=1: DeepSpeed's converter merges both ranks' fp32 masters and moments; the steps
    after differ from DP=2's as one process does (DP_RTOL, above; measured at most 2.3e-5)."""
    d, straight = saved
    resumed = run_distributed(run_as_trainer, 1, 1, 1, 0, SAVED_AT, STEPS, load_dir=d, timeout=300, bf16=True)[0]
    assert os.path.isdir(os.path.join(d, "universal", f"global_step{SAVED_AT}"))
    for got, want in zip(resumed, straight[SAVED_AT:]):
        assert math.isclose(got, want, rel_tol=DP_RTOL), (resumed, straight[SAVED_AT:])


def test_exports_to_transformers(saved, tmp_path):
    import transformers

    from interop_helpers import run_cli
    from megatron_bloom.checkpoint.native import model_from_state_dict, read_native_checkpoint

    d, _ = saved
    cfg, sd = read_native_checkpoint(d)
    assert sd["transformer.word_embeddings.weight"].dtype == torch.bfloat16  # the bf16 weights, as trained
    proc = run_cli("convert_checkpoint.py", "native-to-hf", "--load", d, "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    for name, tensor in hf.state_dict().items():
        if name in sd:
            assert torch.equal(tensor, sd[name].float()[: tensor.shape[0]] if "word_embeddings.weight" in name
                               else sd[name].float()), name
    ours = model_from_state_dict(cfg, {k: v.float() for k, v in sd.items()}, attention_impl="eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[..., :cfg.vocab_size], hf(ids).logits, atol=1e-5, rtol=1e-5)
