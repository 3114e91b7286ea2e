"""Predicted vs measured bytes for one layout, run in the current process group (``plan.py --measure``)."""
from __future__ import annotations

from typing import Dict, Optional

from .estimate import Estimate, run_config
from .memory import block_activation_bytes

KINDS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer_states", "optimizer_states"),
         ("buffers", "other"))
"""(predicted field, measured kind): the ZeRO reduction bucket is the only 'other' tensor expected."""


def measure_and_compare(e: Estimate, steps: int = 3) -> Optional[Dict]:
    """Every rank measures its engine; rank 0 prints the table and returns the figures (others None)."""
    import torch
    import torch.distributed as dist

    from megatron_bloom.config import validate_config
    from megatron_bloom.distributed.collectives import all_gather_object
    from megatron_bloom.distributed.launch_env import world_size_from_env

    from .measure import measure_engine, saved_activation_bytes

    cfg = run_config(e.model, e.layout)
    cfg.training.train_iters = steps
    cfg.parallel.distributed_backend = "gloo"
    # fp16 starts at a loss scale of 2^32 and skips the first steps on overflow; a skipped step
    # creates no Adam state, so start low enough that every measured step is taken.
    cfg.training.initial_loss_scale = 2.0**8
    world = world_size_from_env()
    if world != e.cluster.world_size:
        raise ValueError(f"--measure runs on the launched processes: world size {world} but the plan is for "
                         f"{e.cluster.world_size}; use --nodes 1 --gpus-per-node {world}")
    validate_config(cfg, world)
    mine = measure_engine(cfg, steps)
    rank = dist.get_rank()
    stage = rank // (e.layout.tensor_model_parallel_size * e.data_parallel_size)
    predicted = e.stages[stage]
    row = {"rank": rank, "stage": stage, "parameters_measured": mine.parameters,
           "parameters_predicted": predicted.parameters, "largest_other": mine.largest_other}
    for pred_kind, meas_kind in KINDS:
        row[pred_kind] = {"predicted": getattr(predicted, pred_kind), "measured": mine.bytes[meas_kind]}
    row["all_states"] = {"predicted": sum(row[k]["predicted"] for k, _ in KINDS), "measured": mine.peak_total}
    rows = all_gather_object(row)
    if rank == 0:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[e.layout.precision]
        acts_measured = saved_activation_bytes(cfg, dtype)
    # Every rank leaves together and tears the group down: a DeepSpeed engine still holding a live
    # group at interpreter exit can abort the process (SIGABRT), failing the run after the work.
    from megatron_bloom.distributed import shutdown

    shutdown(together=True)
    if rank != 0:
        return None

    acts_predicted = block_activation_bytes(e.model, e.model.seq_length, e.layout.micro_batch_size, 1, e.layout.precision,
                                            e.cluster.accelerator.dropout_mask_in_input_dtype)

    print("measured on the live engine (bytes; ratio = measured / predicted)")
    print("  rank stage  params(meas/pred)       kind              predicted       measured   ratio")
    for r in rows:
        for pred_kind, _ in KINDS:
            p, m = r[pred_kind]["predicted"], r[pred_kind]["measured"]
            ratio = f"{m / p:6.3f}" if p else ("   -  " if not m else "  inf ")
            print(f"  {r['rank']:4d} {r['stage']:5d}  {r['parameters_measured']:>9,d}/{r['parameters_predicted']:<9,d}"
                  f"  {pred_kind:16s} {p:14,.0f} {m:14,.0f}  {ratio}")
        states_p, states_m = r["all_states"]["predicted"], r["all_states"]["measured"]
        print(f"  {r['rank']:4d} {r['stage']:5d}  {'':19s}  {'all (peak sum)':16s} {states_p:14,.0f} {states_m:14,.0f}  "
              f"{states_m / states_p:6.3f}")
    print(f"  activations of one block, one micro-batch (saved for backward, TP=1): predicted {acts_predicted:,.0f}, "
          f"measured {acts_measured:,.0f}, ratio {acts_measured / acts_predicted:.3f}")
    return {"ranks": rows, "block_activations": {"predicted": acts_predicted, "measured": acts_measured}}
