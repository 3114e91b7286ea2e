"""Ranks for the interop tests: load a weights-only checkpoint into BloomEngine; train, save, evaluate."""
import dataclasses

import torch
import torch.distributed as dist
from engine_worker import SEQ, micro_batches, tiny_config  # tests/engine, on pytest.ini's pythonpath

EVAL_STEP = 100
"""Batches of this step index are never trained on: the fixed evaluation batch."""


def _setup(tp, pp, model_cfg=None, zero=1):
    from megatron_bloom.config import validate_config
    from megatron_bloom.distributed import init_distributed
    from megatron_bloom.training.engine import BloomEngine

    cfg = tiny_config(tp, pp, zero)
    if model_cfg is not None:
        cfg.model = dataclasses.replace(model_cfg, seq_length=SEQ)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, pp, backend="gloo")
    return cfg, state, BloomEngine(cfg, state)


def _batches(cfg, state, step):
    t = cfg.training
    return micro_batches(step, t.global_batch_size, t.micro_batch_size, state.dims.dp, state.dp_rank)


def load_weights_only_and_step(ckpt_dir, tp, pp, zero=1):
    """Load a converted checkpoint the way the trainer does, then one training step.

    Returns (first-step loss, largest change of any parameter in that step). Adam's first step
    moves each weight by about lr at most; a value near the random init's scale would mean the
    optimizer's fp32 master copies still held the random init and overwrote the loaded weights.
    """
    from megatron_bloom.checkpoint import check_compatible, find_checkpoint
    from megatron_bloom.checkpoint.native import load_weights_only, model_config_from_state

    info = find_checkpoint(ckpt_dir)
    assert info.state["weights_only"] is True
    cfg, state, engine = _setup(tp, pp, model_config_from_state(info.state, info.path), zero)
    check_compatible(info, cfg.model)
    load_weights_only(engine, info.directory, info.tag)
    loaded = _local_params(engine)
    loss = engine.train_step(_batches(cfg, state, 0) if engine.reads_data else []).loss
    drift = max(float((p - loaded[n]).abs().max()) for n, p in _local_params(engine).items())
    return loss, drift, cfg.training.lr


def _local_params(engine):
    """This rank's parameters (whole ones under ZeRO-3, gathered)."""
    params = dict(engine.module.named_parameters())
    if engine.engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


def train_save_eval(save_dir, tp, pp, steps, zero=1):
    """Train ``steps`` steps, save a native checkpoint, return the engine's loss on the eval batch."""
    from megatron_bloom.checkpoint import save_checkpoint
    from megatron_bloom.config import config_to_dict

    cfg, state, engine = _setup(tp, pp, zero=zero)
    for step in range(steps):
        engine.train_step(_batches(cfg, state, step) if engine.reads_data else [])
    layout = {"tp": tp, "pp": pp, "dp": state.dims.dp, "zero": cfg.parallel.zero_stage}
    save_checkpoint(engine, save_dir, steps, {"iteration": steps, "layout": layout, "config": config_to_dict(cfg)},
                    keep_last_k=None)
    return engine.eval_step(_batches(cfg, state, EVAL_STEP) if engine.reads_data else [])


def reference_loss(model, step, dp=1):
    """Mean over micro-batches of the token-mean loss, as the engine reports a step's loss."""
    from megatron_bloom.models.bloom.model import causal_lm_loss

    cfg = tiny_config(1, 1, 1)
    t = cfg.training
    losses = []
    with torch.no_grad():
        for rank in range(dp):
            for tokens, (labels, mask) in micro_batches(step, t.global_batch_size, t.micro_batch_size, dp, rank):
                losses.append(causal_lm_loss(model(tokens), labels, mask))
    return float(torch.stack(losses).mean())
