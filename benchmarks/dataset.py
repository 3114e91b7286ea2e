"""GPT dataset speed: index build for millions of documents, blend order, and sample reads.

1. Index build (doc_idx + sample_idx + shuffle_idx) from a synthetic sizes array (log-normal
   document lengths, mean ~600 tokens; no tokens needed), in memory and through the .npy cache.
2. Blending indices (Megatron's greedy order) for --blend-samples samples of 2, 10 and 46 datasets.
3. Reading: a real .bin/.idx of --read-docs documents is written to a temp dir, then samples are
   read through GPTDataset.__getitem__ in shuffled order.

    python benchmarks/dataset.py                      # markdown table
    python benchmarks/dataset.py --json               # ... and one JSON object as the last line
    python benchmarks/dataset.py --plot out           # ... and PNGs in out/
    python benchmarks/dataset.py --num-docs 1000000 5000000 --epochs 1 2.5
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.common import add_output_args, finish, format_run_info, run_info
from megatron_bloom.data.blends import build_blending_indices
from megatron_bloom.data.gpt_dataset import GPTDataset, build_index_mappings, load_or_build_index_mappings
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron_bloom.errors import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-docs", type=int, nargs="+", default=[1_000_000, 5_000_000])
    p.add_argument("--epochs", type=float, nargs="+", default=[1.0, 2.5], help="samples requested, in epochs")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--blend-samples", type=int, default=10_000_000)
    p.add_argument("--read-docs", type=int, default=50_000)
    p.add_argument("--read-samples", type=int, default=3_000)
    p.add_argument("--seed", type=int, default=1234)
    add_output_args(p)
    return p.parse_args(argv)


def synthetic_sizes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Log-normal with median ~400 and mean ~600 tokens, like web text documents.
    return np.clip(rng.lognormal(mean=6.0, sigma=0.9, size=n), 1, 100_000).astype(np.int32)


def bench_index(num_docs: int, epochs: float, seq_length: int, seed: int) -> dict:
    sizes = synthetic_sizes(num_docs, seed)
    documents = np.arange(num_docs)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = max(1, int(epochs * (tokens - 1) // seq_length))
    start = time.perf_counter()
    m = build_index_mappings(documents, sizes, num_samples, seq_length, seed)
    in_memory = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "synthetic")
        start = time.perf_counter()
        load_or_build_index_mappings(prefix, "train", documents, sizes, num_samples, seq_length, seed)
        cached_build = time.perf_counter() - start
        start = time.perf_counter()
        _, built = load_or_build_index_mappings(prefix, "train", documents, sizes, num_samples, seq_length, seed)
        load = time.perf_counter() - start
        assert not built
    return {
        "num_docs": num_docs, "tokens": tokens, "num_samples": num_samples, "num_epochs": m.num_epochs,
        "total_samples": len(m.shuffle_idx), "build_s": in_memory, "build_and_save_s": cached_build, "load_s": load,
    }


def bench_blend(num_datasets: int, size: int, seed: int) -> dict:
    weights = np.random.default_rng(seed).random(num_datasets) + 0.05
    start = time.perf_counter()
    build_blending_indices(weights, size)
    return {"num_datasets": num_datasets, "samples": size, "seconds": time.perf_counter() - start}


def bench_read(num_docs: int, read_samples: int, seq_length: int, seed: int) -> dict:
    sizes = synthetic_sizes(num_docs, seed)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        start = time.perf_counter()
        builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for n in sizes:
            builder.add_item(rng.integers(0, 65_000, size=int(n), dtype=np.uint16))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        write_s = time.perf_counter() - start
        indexed = MMapIndexedDataset(prefix)
        tokens = int(sizes.sum(dtype=np.int64))
        num_samples = (tokens - 1) // seq_length
        ds = GPTDataset("train", prefix, np.arange(num_docs), indexed, num_samples, seq_length, seed)
        count = min(read_samples, len(ds))
        ds[0]  # first touch of the maps
        start = time.perf_counter()
        checksum = 0
        for i in range(count):
            checksum += int(ds[i]["text"][-1])
        read_s = time.perf_counter() - start
    return {
        "num_docs": num_docs, "tokens": tokens, "bin_mb": tokens * 2 / 1e6, "write_s": write_s, "samples": count,
        "samples_per_s": count / read_s, "tokens_per_s": count * (seq_length + 1) / read_s, "checksum": checksum,
    }


def plot(result: dict, out_dir: str) -> list:
    """dataset_index.png: index build and cached load per documents x epochs; dataset_blend.png:
    blending time per number of datasets."""
    from benchmarks.common import pyplot

    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    rows = result["index"]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["build_and_save_s"] for r in rows], 0.4, label="build + save")
    ax.bar(x + 0.2, [r["load_s"] for r in rows], 0.4, label="load cached")
    ax.set_xticks(x, [f"{r['num_docs']:,} docs\n{r['num_epochs']} epoch(s)" for r in rows], fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title(f"GPT index build, seq_length {result['seq_length']}")
    ax.legend()
    paths.append(os.path.join(out_dir, "dataset_index.png"))
    fig.tight_layout()
    fig.savefig(paths[-1])
    plt.close(fig)
    blend = result["blend"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.bar([str(r["num_datasets"]) for r in blend], [r["seconds"] for r in blend])
    ax.set_xlabel("datasets blended")
    ax.set_ylabel("seconds")
    ax.set_title(f"blending indices, {blend[0]['samples']:,} samples" if blend else "blending indices")
    paths.append(os.path.join(out_dir, "dataset_blend.png"))
    fig.tight_layout()
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        from benchmarks.common import pyplot

        pyplot()  # fail now, not after the runs
    result = {"run": run_info(argv), "seq_length": args.seq_length, "index": [], "blend": [], "read": None}
    for n in args.num_docs:
        for e in args.epochs:
            result["index"].append(bench_index(n, e, args.seq_length, args.seed))
    for k in (2, 10, 46):
        result["blend"].append(bench_blend(k, args.blend_samples, args.seed))
    result["read"] = bench_read(args.read_docs, args.read_samples, args.seq_length, args.seed)

    print(format_run_info(result["run"]) + "\n")
    print(f"### Index build (seq_length={args.seq_length}, numpy {np.__version__}, 1 process)\n")
    print("| documents | tokens | samples asked | epochs | samples built | build (s) | build+save (s) | load cached (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["index"]:
        print(f"| {r['num_docs']:,} | {r['tokens']:,} | {r['num_samples']:,} | {r['num_epochs']} | {r['total_samples']:,} "
              f"| {r['build_s']:.2f} | {r['build_and_save_s']:.2f} | {r['load_s']:.3f} |")
    print("\n### Blending indices (Megatron greedy order)\n")
    print("| datasets | samples | time (s) | samples/s |")
    print("|---:|---:|---:|---:|")
    for r in result["blend"]:
        print(f"| {r['num_datasets']} | {r['samples']:,} | {r['seconds']:.2f} | {r['samples'] / r['seconds']:,.0f} |")
    r = result["read"]
    print("\n### Reading samples from .bin/.idx (GPTDataset.__getitem__, shuffled order)\n")
    print("| documents | tokens | .bin (MB) | samples read | samples/s | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['num_docs']:,} | {r['tokens']:,} | {r['bin_mb']:.1f} | {r['samples']:,} | {r['samples_per_s']:,.0f} "
          f"| {r['tokens_per_s']:,.0f} |")
    finish(result, args, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
