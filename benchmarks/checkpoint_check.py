"""What the pre-load checkpoint check costs: `--load` and `--pretrained` before anything is loaded.

``training/preflight.check_checkpoints`` runs ``checkpoint/trust.check_checkpoint_folder`` on rank 0
over every file the run could read: each file's pickle is read weights-only with its tensors
memory-mapped. Two folders are written to a temp dir and checked with that function:

1. layer files: a weights-only native checkpoint (``write_native_checkpoint``, TP=1) of a BLOOM
   with --hidden-size and --layer-files - 2 blocks, so --layer-files pipeline layer files (the
   embedding, the blocks, the final LayerNorm), plus its megatron_bloom.pt and mp_rank_00 file.
2. optimizer file: one ``zero_pp_rank_0_mp_rank_00_optim_states.pt`` of --optim-gib GiB, holding
   ``optimizer_state_dict`` as DeepSpeed's ZeRO-1 optimizer saves it (fp32 partition, Adam's
   exp_avg and exp_avg_sq, loss scaler, ZeroStageEnum, fragment_address slice mappings).

Each folder is checked once ("first": the files were just written, so this is not a cold read, but
it pays the first imports), then --repeat times (the median is reported).

    python benchmarks/checkpoint_check.py                 # 1,000 layer files and a 1 GiB optimizer file
    python benchmarks/checkpoint_check.py --json          # ... and one JSON object as the last line
    python benchmarks/checkpoint_check.py --plot out      # ... and a PNG in out/
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import add_output_args, finish, format_run_info, run_info
from megatron_bloom.checkpoint.files import atomic_torch_save
from megatron_bloom.checkpoint.native import expected_shapes, write_native_checkpoint
from megatron_bloom.checkpoint.trust import checkpoint_files, check_checkpoint_folder
from megatron_bloom.errors import UserError, run_main
from megatron_bloom.models.bloom.config import ModelConfig

OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer-files", type=int, default=1000, help="pipeline layer files (at least 3)")
    p.add_argument("--hidden-size", type=int, default=64, help="of the layer files' BLOOM (4 heads)")
    p.add_argument("--optim-gib", type=float, default=1.0, help="size of the optimizer file, GiB")
    p.add_argument("--repeat", type=int, default=3, help="timed checks per folder (median reported)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.layer_files < 3:
        raise UserError(f"--layer-files {args.layer_files}: a checkpoint has at least 3 (embedding, one block, "
                        f"final LayerNorm); pass 3 or more")
    return args


def write_layer_files(out_dir: str, layer_files: int, hidden_size: int) -> str:
    """A native checkpoint with ``layer_files`` layer files; returns its ``global_step0`` folder."""
    cfg = ModelConfig(num_layers=layer_files - 2, hidden_size=hidden_size, num_attention_heads=4)
    gen = torch.Generator().manual_seed(0)
    # One tensor per shape, shared by every block: the writer saves each layer's own copy.
    by_shape = {}
    sd = {k: by_shape.setdefault(s, torch.randn(s, generator=gen)) for k, s in expected_shapes(cfg).items()}
    return write_native_checkpoint(sd, cfg, out_dir, tp=1)


def zero1_optimizer_state(numel: int) -> dict:
    """The dict DeepSpeed's engine saves for one ZeRO-1 rank with one parameter group of ``numel``
    fp32 elements (``DeepSpeedZeroOptimizer.state_dict`` under ``optimizer_state_dict``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Slice mappings name each parameter's range of the flat partition, as for BLOOM's blocks.
    names = [f"transformer.h.{i}.mlp.dense_h_to_4h.weight" for i in range(8)]
    step = numel // len(names)
    mappings = collections.OrderedDict(
        (n, fragment_address(numel=step if i < len(names) - 1 else numel - step * i, start=step * i))
        for i, n in enumerate(names))
    adam = {"lr": 6e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
            "bias_correction": True, "params": [0]}
    return {
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(1.0),
            "dynamic_loss_scale": False,
            "overflow": False,
            "clip_grad": 1.0,
            "base_optimizer_state": {
                "state": {0: {"step": torch.tensor(100.0), "exp_avg": torch.zeros(numel),
                              "exp_avg_sq": torch.zeros(numel)}},
                "param_groups": [adam],
            },
            "single_partition_of_fp32_groups": [torch.zeros(numel)],
            "zero_stage": ZeroStageEnum.optimizer_states,
            "group_paddings": [0],
            "param_alignment_paddings": [0],
            "partition_count": [1],
            "ds_version": "0.19.8",
            "param_slice_mappings": [mappings],
        },
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}},
        "ds_version": "0.19.8",
    }


def write_optimizer_file(folder: str, gib: float) -> str:
    os.makedirs(folder)
    numel = max(1, int(gib * 2**30) // (3 * 4))  # three fp32 tensors: partition, exp_avg, exp_avg_sq
    path = os.path.join(folder, OPTIM_FILE)
    atomic_torch_save(zero1_optimizer_state(numel), path)
    return path


def time_check(name: str, folder: str, write_s: float, repeat: int) -> dict:
    files = checkpoint_files(folder)
    start = time.perf_counter()
    checked = check_checkpoint_folder(folder)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        check_checkpoint_folder(folder)
        times.append(time.perf_counter() - start)
    warm = float(np.median(times))
    return {"name": name, "files": len(files), "files_checked": checked,
            "bytes": sum(os.path.getsize(f) for f in files), "write_s": write_s, "first_s": first,
            "warm_s": warm, "warm_runs_s": times, "ms_per_file": warm * 1e3 / checked}


def plot(result: dict, out_dir: str) -> list:
    """checkpoint_check.png: warm check time of each folder (log scale: seconds next to milliseconds)."""
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    bars = ax.bar([f"{c['name']}\n{c['files']:,} file{'s' * (c['files'] != 1)}, {c['bytes'] / 2**20:,.0f} MiB" for c in cases],
                  [c["warm_s"] for c in cases])
    ax.bar_label(bars, [f"{c['warm_s'] * 1e3:,.1f} ms" for c in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (warm, median)")
    ax.set_title("checkpoint check before --load", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    return [save_figure(fig, out_dir, "checkpoint_check.png")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        from benchmarks.common import pyplot

        pyplot()  # fail now, not after the runs
    result = {"run": run_info(argv), "layer_files": args.layer_files, "hidden_size": args.hidden_size,
              "optim_gib": args.optim_gib, "repeat": args.repeat, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        layers = write_layer_files(os.path.join(tmp, "native"), args.layer_files, args.hidden_size)
        result["cases"].append(time_check("layer files", layers, time.perf_counter() - start, args.repeat))
        start = time.perf_counter()
        optim = os.path.join(tmp, "zero", "global_step1")
        write_optimizer_file(optim, args.optim_gib)
        result["cases"].append(time_check("optimizer file", optim, time.perf_counter() - start, args.repeat))

    print(format_run_info(result["run"]) + "\n")
    print(f"### Checkpoint check before --load (trust.check_checkpoint_folder, warm, median of {args.repeat})\n")
    print("| folder | files | MiB | write (s) | first check (s) | warm check (s) | per file (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in result["cases"]:
        print(f"| {c['name']} | {c['files']:,} | {c['bytes'] / 2**20:,.1f} | {c['write_s']:.2f} | {c['first_s']:.3f} "
              f"| {c['warm_s']:.3f} | {c['ms_per_file']:.2f} |")
    print(f"\nLayer files: BLOOM hidden {args.hidden_size}, 4 heads, {args.layer_files - 2} blocks, TP=1, fp32, "
          f"plus megatron_bloom.pt and mp_rank_00_model_states.pt. Optimizer file: {OPTIM_FILE}, "
          f"ZeRO-1, one parameter group.")
    finish(result, args, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
