"""GPT dataset speed: index build for millions of documents, blend order, sample reads, token-id scan.

1. Index build (doc_idx + sample_idx + shuffle_idx) from a synthetic sizes array (log-normal
   document lengths, mean ~600 tokens; no tokens needed), in memory and through the .npy cache.
2. Blending indices (Megatron's greedy order) for --blend-samples samples of 2, 10 and 46 datasets.
3. Reading: a real .bin/.idx of --read-docs documents is written to a temp dir, then samples are
   read through GPTDataset.__getitem__ in shuffled order.
4. Token-id scan (with --scan-gb): a .bin of that many GiB of random int32 ids (BLOOM's vocabulary
   needs int32) with no PREFIX.tokens.json sidecar is written to a temp dir, and start-up's check of
   data from other tools, MMapIndexedDataset(prefix).max_token_id(), is timed once cold (the .bin
   dropped from the page cache with posix_fadvise, where the OS has it) and warm (the median of
   --scan-repeat reads after that). One id above all others is planted at a random position, and
   the scan must find it.

    python benchmarks/dataset.py                      # markdown table
    python benchmarks/dataset.py --json               # ... and one JSON object as the last line
    python benchmarks/dataset.py --plot out           # ... and PNGs in out/
    python benchmarks/dataset.py --num-docs 1000000 5000000 --epochs 1 2.5
    python benchmarks/dataset.py --scan-gb 1          # ... and the token-id scan of a 1 GiB .bin
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
from megatron_bloom.data.indexed_dataset import (
    SCAN_LIMIT_BYTES,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
)
from megatron_bloom.errors import run_main
from megatron_bloom.models.bloom.sizes import BLOOM_PADDED_VOCAB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-docs", type=int, nargs="+", default=[1_000_000, 5_000_000])
    p.add_argument("--epochs", type=float, nargs="+", default=[1.0, 2.5], help="samples requested, in epochs")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--blend-samples", type=int, default=10_000_000)
    p.add_argument("--read-docs", type=int, default=50_000)
    p.add_argument("--read-samples", type=int, default=3_000)
    p.add_argument("--scan-gb", type=float, nargs="*", default=[], metavar="GIB",
                   help="time the token-id scan of a .bin of each size, in GiB (2**30 bytes; start-up scans\n"
                        f"up to {SCAN_LIMIT_BYTES / 2**30:g} GiB); none by default")
    p.add_argument("--scan-repeat", type=int, default=3, help="timed warm scans per size (median reported)")
    p.add_argument("--seed", type=int, default=1234)
    add_output_args(p)
    args = p.parse_args(argv)
    if args.scan_repeat < 1:
        p.error(f"--scan-repeat {args.scan_repeat}: pass 1 or more")
    return args


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


SCAN_IDS_BELOW = 250_000
"""The scan's random ids are drawn below this; one id of BLOOM_PADDED_VOCAB - 1 is planted."""


def write_scan_bin(prefix: str, gib: float, seed: int, chunk_tokens: int = 1 << 24) -> dict:
    """A .bin/.idx of ``gib`` GiB of random ids in log-normal documents (the preprocessing writer's
    ``add_documents``), without a sidecar; one id of BLOOM_PADDED_VOCAB - 1 at a random position."""
    dtype = np.dtype(best_dtype(BLOOM_PADDED_VOCAB))
    total = max(1, int(gib * 2**30) // dtype.itemsize)
    rng = np.random.default_rng(seed)
    planted_at = int(rng.integers(total))
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for start in range(0, total, chunk_tokens):
        n = min(chunk_tokens, total - start)
        ids = rng.integers(0, SCAN_IDS_BELOW, size=n, dtype=dtype)
        if start <= planted_at < start + n:
            ids[planted_at - start] = BLOOM_PADDED_VOCAB - 1
        lengths = synthetic_sizes(n // 300 + 1, int(rng.integers(2**31))).astype(np.int64)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n)) + 1]
        lengths[-1] -= int(lengths.sum()) - n  # the chunk's last document ends with the chunk
        builder.add_documents(ids, lengths[lengths > 0])
    builder.finalize(prefix + ".idx")
    return {"tokens": total, "dtype": dtype.name, "planted_id": BLOOM_PADDED_VOCAB - 1, "planted_at": planted_at}


def evict_from_page_cache(path: str) -> bool:
    """Write ``path`` to disk and drop it from this kernel's page cache (False where the OS cannot).
    A VM host's cache or the disk's own may still hold it, so a "cold" read can beat the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def bench_scan(gib: float, repeat: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "nosidecar")
        start = time.perf_counter()
        written = write_scan_bin(prefix, gib, seed)
        write_s = time.perf_counter() - start
        bin_bytes = os.path.getsize(prefix + ".bin")
        # Above the limit start-up does not scan; the limit is lifted to time what it would cost.
        limit = max(SCAN_LIMIT_BYTES, bin_bytes)
        cold = None
        if evict_from_page_cache(prefix + ".bin"):
            start = time.perf_counter()
            MMapIndexedDataset(prefix).max_token_id(limit)
            cold = time.perf_counter() - start
        else:
            MMapIndexedDataset(prefix).max_token_id(limit)  # untimed: brings the .bin into the page cache
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            found, how = MMapIndexedDataset(prefix).max_token_id(limit)  # what training/preflight.check_data runs
            times.append(time.perf_counter() - start)
    warm = float(np.median(times))
    return {
        **written, "bin_bytes": bin_bytes, "write_s": write_s, "found_id": found, "how": how,
        "startup_scans": bin_bytes <= SCAN_LIMIT_BYTES, "cold_s": cold, "warm_s": warm, "warm_runs_s": times,
        "gib_per_s": bin_bytes / 2**30 / warm,
    }


def plot(result: dict, out_dir: str) -> list:
    """dataset_index.png: index build and cached load per documents x epochs; dataset_blend.png:
    blending time per number of datasets; dataset_scan.png (with --scan-gb): cold and warm
    token-id scan time per .bin size."""
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
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
    paths.append(save_figure(fig, out_dir, "dataset_index.png"))
    blend = result["blend"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.bar([str(r["num_datasets"]) for r in blend], [r["seconds"] for r in blend])
    ax.set_xlabel("datasets blended")
    ax.set_ylabel("seconds")
    ax.set_title(f"blending indices, {blend[0]['samples']:,} samples" if blend else "blending indices")
    paths.append(save_figure(fig, out_dir, "dataset_blend.png"))
    scan = result["scan"]
    if scan:
        fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(scan)), 3.5))
        x = np.arange(len(scan))
        for shift, key, label in ((-0.2, "cold_s", "cold"), (0.2, "warm_s", "warm (median)")):
            secs = [r[key] or 0.0 for r in scan]
            bars = ax.bar(x + shift, secs, 0.4, label=label)
            ax.bar_label(bars, [f"{r['bin_bytes'] / 2**30 / t:.1f} GiB/s" if t else "n/a" for r, t in zip(scan, secs)],
                         fontsize=7)
        ax.set_xticks(x, [f"{r['bin_bytes'] / 2**30:.3g} GiB" for r in scan])
        ax.set_xlabel(".bin size")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
        ax.set_title("token-id scan at start-up (no sidecar)")
        paths.append(save_figure(fig, out_dir, "dataset_scan.png"))
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        from benchmarks.common import pyplot

        pyplot()  # fail now, not after the runs
    result = {"run": run_info(argv), "seq_length": args.seq_length, "index": [], "blend": [], "read": None,
              "scan": []}
    for n in args.num_docs:
        for e in args.epochs:
            result["index"].append(bench_index(n, e, args.seq_length, args.seed))
    for k in (2, 10, 46):
        result["blend"].append(bench_blend(k, args.blend_samples, args.seed))
    result["read"] = bench_read(args.read_docs, args.read_samples, args.seq_length, args.seed)
    for gib in args.scan_gb:
        result["scan"].append(bench_scan(gib, args.scan_repeat, args.seed))

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
    if result["scan"]:
        print(f"\n### Token-id scan of a .bin without a sidecar (MMapIndexedDataset.max_token_id: once cold, "
              f"then warm, median of {args.scan_repeat})\n")
        print("| .bin (GiB) | dtype | tokens | scanned at start-up | largest id (planted) | write (s) | cold scan (ms) "
              "| warm scan (ms) | warm GiB/s |")
        print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
        for r in result["scan"]:
            cold = "n/a" if r["cold_s"] is None else f"{r['cold_s'] * 1e3:,.1f}"
            print(f"| {r['bin_bytes'] / 2**30:.3f} | {r['dtype']} | {r['tokens']:,} | "
                  f"{'yes' if r['startup_scans'] else 'no, above the limit'} | {r['found_id']:,} ({r['planted_id']:,}) "
                  f"| {r['write_s']:.2f} | {cold} | {r['warm_s'] * 1e3:,.1f} | {r['gib_per_s']:.1f} |")
    finish(result, args, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
