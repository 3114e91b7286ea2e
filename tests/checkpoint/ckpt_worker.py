"""Runs for the checkpoint tests: train, save, resume (same or another layout)."""
import os

import torch.distributed as dist
from engine_worker import micro_batches, tiny_config  # tests/engine, on pytest.ini's pythonpath

from megatron_bloom.checkpoint import check_compatible, convert_to_universal, find_checkpoint, load_rng, save_checkpoint
from megatron_bloom.config import config_to_dict, validate_config
from megatron_bloom.distributed import init_distributed


def layout_of(cfg):
    p = cfg.parallel
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "dp": p.data_parallel_size, "zero": p.zero_stage}


def run(tp, pp, zero, start, stop, save_dir=None, load_dir=None, **kw):
    """Train iterations [start, stop); optionally resume from load_dir first and save at the end."""
    from megatron_bloom.training.engine import BloomEngine

    cfg = tiny_config(tp, pp, zero, **kw)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, pp, backend="gloo")
    info = find_checkpoint(load_dir) if load_dir else None
    same_layout = info is None or info.layout == layout_of(cfg)
    if info is not None:
        check_compatible(info, cfg.model)
        assert info.state["iteration"] == start, (info.state["iteration"], start)
        if not same_layout:
            if dist.get_rank() == 0:
                convert_to_universal(load_dir, info.tag, os.path.join(load_dir, "universal"), cfg.model)
            dist.barrier()
    engine = BloomEngine(cfg, state, load_universal=not same_layout)
    if info is not None:
        engine.load(load_dir if same_layout else os.path.join(load_dir, "universal"), info.tag)
        load_rng(info, dist.get_rank(), same_layout, engine.tracker)
    t = cfg.training
    losses = []
    for step in range(start, stop):
        batches = micro_batches(step, t.global_batch_size, t.micro_batch_size, state.dims.dp, state.dp_rank)
        losses.append(engine.train_step(batches if engine.reads_data else []).loss)
    if save_dir:
        save_checkpoint(engine, save_dir, stop, {"iteration": stop, "layout": layout_of(cfg),
                                                  "config": config_to_dict(cfg)}, keep_last_k=None)
    return losses
