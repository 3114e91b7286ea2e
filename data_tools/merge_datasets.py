"""Concatenate MMIDIDX shards into one dataset, in the order given.

    python data_tools/merge_datasets.py --input shard0_text_document shard1_text_document \\
        --output-prefix merged_text_document

Every input is checked (header, sizes, same dtype) before anything is written; the output is
written as `*.tmp` and renamed when complete, the .idx last, like preprocess_data.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from data_tools import run_tool
from megatron_bloom.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    token_stats_path,
)
from megatron_bloom.data.readers import make_output_dir


def _prefix(path: str) -> str:
    # Accept `shard.bin` / `shard.idx` as well as the bare prefix.
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def merge(inputs: list[str], output_prefix: str) -> dict:
    prefixes = [_prefix(p) for p in inputs]
    datasets = [MMapIndexedDataset(p) for p in prefixes]  # validates every shard up front
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        found = ", ".join(f"{p}: {ds.dtype.name}" for p, ds in zip(prefixes, datasets))
        raise IndexedDatasetError(f"shards have different dtypes ({found}); re-run preprocess_data.py with one tokenizer")
    if _prefix(output_prefix) in prefixes:
        raise IndexedDatasetError(f"{output_prefix}: output would overwrite an input; choose another --output-prefix")
    make_output_dir(output_prefix)
    bin_tmp, idx_tmp = data_file_path(output_prefix) + ".tmp", index_file_path(output_prefix) + ".tmp"
    builder = MMapIndexedDatasetBuilder(bin_tmp, dtypes.pop())
    done = False
    try:
        for prefix in prefixes:
            builder.merge_file_(prefix)
        builder.finalize(idx_tmp)
        if os.path.exists(index_file_path(output_prefix)):
            os.remove(index_file_path(output_prefix))  # never pair an old .idx with the new .bin
        builder.write_token_stats(token_stats_path(output_prefix))
        os.replace(bin_tmp, data_file_path(output_prefix))
        os.replace(idx_tmp, index_file_path(output_prefix))
        done = True
    finally:
        if not done:
            builder.close()
            for path in (bin_tmp, idx_tmp):
                if os.path.exists(path):
                    os.remove(path)
    return {
        "shards": len(datasets),
        "sequences": sum(len(ds) for ds in datasets),
        "documents": sum(len(ds.doc_idx) - 1 for ds in datasets),
        "tokens": int(sum(int(ds.sizes.sum(dtype="int64")) for ds in datasets)),
    }


def merge_command(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx), merged in this order")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stats = merge(args.input, args.output_prefix)
    print(
        f"done: merged {stats['shards']} shards, {stats['documents']:,} documents, {stats['tokens']:,} tokens "
        f"in {time.perf_counter() - start:.1f}s -> {args.output_prefix}.{{bin,idx}}",
        file=sys.stderr,
    )
    return 0


def main(argv=None) -> None:
    """``python data_tools/merge_datasets.py`` and ``megatron-bloom-merge-datasets``."""
    run_tool(merge_command, argv)


if __name__ == "__main__":
    main()
