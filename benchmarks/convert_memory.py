"""Time and peak memory of every checkpoint conversion, against the size of the model and its largest layer.

A random BLOOM of the given shape is written as a sharded transformers folder (itself streamed, one
layer at a time), then each conversion runs in a fresh process that reports its resident-set
growth: the peak (``VmHWM``) minus the resident size right before converting, after the imports and
one tiny model built on the meta device (fixed costs of ~150 MB: torch's meta kernels and the
modules a model build imports, the same for any model size).

    hf-to-native --tp T       the folder -> a native checkpoint at TP=T
    native-to-hf              that checkpoint -> a transformers folder (TP shards merged)
    mds-to-hf                 the same files read as Megatron-DeepSpeed's layout (megatron-deepspeed-to-hf)
    load                      the native checkpoint merged into one process, as evaluation and
                              generation load it (``generation.load_model``); its target is the model

Conversions read and write one pipeline layer at a time, so their growth is bounded by about two
copies of the largest layer (the embedding: its TP shards or source, and the merged or padded copy)
plus one output shard, whatever the number of layers; ``load`` adds the model it fills.

    python benchmarks/convert_memory.py                     # bloom-560m's shapes, bf16 (~1.1 GB; ~1 min)
    python benchmarks/convert_memory.py --num-layers 8 --json --plot out
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from benchmarks.common import add_output_args, finish, format_run_info, markdown_table, run_info
from megatron_bloom.commands.convert_checkpoint import parse_size
from megatron_bloom.errors import UserError, run_main
from megatron_bloom.models.bloom.sizes import BLOOM_PADDED_VOCAB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, resource, sys, time
import safetensors.torch, torch, transformers  # imported before the baseline: not the conversion's memory
import megatron_bloom.checkpoint.hf, megatron_bloom.checkpoint.megatron_deepspeed
from megatron_bloom.commands.convert_checkpoint import convert
from megatron_bloom.generation import load_model


def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.models.spec import get_model_spec

# Fixed costs, not the conversion's: torch's meta kernels (~70 MB, loaded at the first meta
# operation) and the modules building a model imports (~75 MB: sympy, torch.distributed, ...).
with torch.device("meta"):
    get_model_spec().build_model(ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=16))
torch.empty(2, device="meta").sum()
mode, argv = sys.argv[1], sys.argv[2:]
base, start = status("VmRSS"), time.perf_counter()
if mode == "load":
    load_model(argv[0])
else:
    convert(argv)
print(json.dumps({"seconds": time.perf_counter() - start, "baseline": base, "peak": status("VmHWM")}))
"""


def model_bytes(hidden: int, layers: int, vocab: int, itemsize: int) -> Dict[str, int]:
    block = 12 * hidden * hidden + 13 * hidden  # qkv, dense, h->4h, 4h->h weights and biases, two LayerNorms
    embedding = vocab * hidden
    return {"embedding": embedding * itemsize, "block": block * itemsize,
            "model": (embedding + 4 * hidden + layers * block) * itemsize}


def write_random_hf(out: str, hidden: int, layers: int, heads: int, vocab: int, dtype: str, shard_bytes: int,
                    seed: int = 0) -> None:
    """A random BLOOM as a sharded transformers folder, generated and written one layer at a time."""
    import torch

    from megatron_bloom.checkpoint.hf import write_hf_checkpoint
    from megatron_bloom.checkpoint.native import expected_shapes, layer_indices, layer_state, full_keys
    from megatron_bloom.config.schema import ModelConfig

    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab)
    shapes = expected_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)

    def layers_():
        for idx in layer_indices(cfg):
            keys = full_keys(cfg, idx, layer_state({k: None for k in shapes}, cfg, idx))
            yield {k: (0.02 * torch.randn(shapes[k], generator=gen)).to(getattr(torch, dtype)) for k in keys}

    write_hf_checkpoint(layers_(), cfg, out, max_shard_bytes=shard_bytes)


def run_child(mode: str, argv: List[str]) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, *argv], capture_output=True, text=True, env=env,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["growth"] = out["peak"] - out["baseline"]
    return out


def measure(work: str, hidden: int, layers: int, heads: int, vocab: int, dtype: str, tp: int,
            shard_bytes: int) -> Dict[str, object]:
    """Write the random folder under ``work`` and run every conversion; sizes and results in bytes/seconds."""
    hf_dir, native_dir = os.path.join(work, "hf"), os.path.join(work, "native")
    start = time.perf_counter()
    write_random_hf(hf_dir, hidden, layers, heads, vocab, dtype, shard_bytes)
    written = time.perf_counter() - start
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    shard = f"{shard_bytes}B"
    steps = [
        ("hf-to-native", "convert", ["hf-to-native", "--hf", hf_dir, "--out", native_dir, "--tp", str(tp)]),
        ("native-to-hf", "convert", ["native-to-hf", "--load", native_dir, "--out", os.path.join(work, "back"),
                                     "--max-shard-size", shard]),
        ("mds-to-hf", "convert", ["megatron-deepspeed-to-hf", "--load", native_dir, "--out", os.path.join(work, "mds"),
                                  "--max-shard-size", shard]),
        ("load", "load", [native_dir]),
    ]
    results = []
    for name, mode, argv in steps:
        results.append(dict(step=name, **run_child(mode, argv)))
    return {"sizes": model_bytes(hidden, layers, vocab, itemsize), "shard_bytes": shard_bytes, "write_seconds": written,
            "results": results}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=BLOOM_PADDED_VOCAB)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    p.add_argument("--tp", type=int, default=2, help="TP of the native checkpoint (hf-to-native --tp)")
    p.add_argument("--max-shard-size", default="500MB", help="shard size of the transformers folders")
    p.add_argument("--work-dir", default=None, help="where the folders are written (default: a temporary folder)")
    add_output_args(p)
    return p.parse_args(argv)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_report(result: Dict) -> None:
    sizes = result["sizes"]
    print(f"model {gib(sizes['model'])} GiB, embedding {gib(sizes['embedding'])} GiB, block {gib(sizes['block'])} GiB, "
          f"shards {gib(result['shard_bytes'])} GiB; folder written in {result['write_seconds']:.1f} s")
    rows = [(r["step"], f"{r['seconds']:.1f}", gib(r["peak"]), gib(r["growth"]), f"{r['growth'] / sizes['model']:.2f}")
            for r in result["results"]]
    print(markdown_table(["step", "seconds", "peak RSS GiB", "growth GiB", "growth / model"], rows))
    print(format_run_info(result["run"]))


def plot(result: Dict, out_dir: str) -> List[str]:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in result["results"]]
    ax.bar(steps, [r["growth"] / 2**30 for r in result["results"]], label="peak RSS growth")
    ax.axhline(result["sizes"]["model"] / 2**30, color="k", linestyle="--", label="model size")
    ax.set_ylabel("GiB")
    ax.legend()
    return [save_figure(fig, out_dir, "convert_memory.png")]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.hidden_size % args.num_attention_heads or args.num_attention_heads % args.tp:
        raise UserError(f"--hidden-size {args.hidden_size} must divide by --num-attention-heads "
                        f"{args.num_attention_heads}, which must divide by --tp {args.tp}")
    if args.plot:
        from benchmarks.common import pyplot

        pyplot()  # fail now, not after the runs
    work = args.work_dir or tempfile.mkdtemp(prefix="convert_memory.")
    try:
        result = measure(work, args.hidden_size, args.num_layers, args.num_attention_heads, args.vocab_size,
                         args.dtype, args.tp, parse_size(args.max_shard_size))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["run"] = run_info(argv)
    print_report(result)
    finish(result, args, plot)


if __name__ == "__main__":
    run_main(main)
