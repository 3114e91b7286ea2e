"""Print documents of an MMIDIDX dataset as text (and optionally token ids), to eyeball a preprocessing run.

    python data_tools/inspect_data.py --data-prefix data/corpus_text_document \\
        --tokenizer-name-or-path tok/ --index 0 --count 3 --ids
"""
from __future__ import annotations

import argparse

import numpy as np

from data_tools import run_tool
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset
from megatron_bloom.data.tokenizer import load_tokenizer
from megatron_bloom.errors import UserError


def document_tokens(ds: MMapIndexedDataset, doc: int) -> np.ndarray:
    """All sequences of document `doc` (doc_idx[doc] .. doc_idx[doc+1]) joined."""
    first, last = int(ds.doc_idx[doc]), int(ds.doc_idx[doc + 1])
    parts = [ds[i] for i in range(first, last)]
    return np.concatenate(parts) if parts else np.empty(0, ds.dtype)


def describe(ds: MMapIndexedDataset, prefix: str) -> str:
    n_docs = len(ds.doc_idx) - 1
    tokens = int(ds.sizes.sum(dtype=np.int64))
    mean = tokens / max(len(ds), 1)
    return (
        f"{prefix}: {n_docs:,} documents, {len(ds):,} sequences, {tokens:,} tokens "
        f"(mean {mean:.1f}/sequence, max {int(ds.sizes.max()) if len(ds) else 0}), dtype {ds.dtype.name}"
    )


def inspect_command(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-prefix", required=True, help="dataset prefix, without .bin/.idx")
    parser.add_argument("--tokenizer-name-or-path", required=True)
    parser.add_argument("--index", type=int, default=0, help="first document (negative counts from the end)")
    parser.add_argument("--count", type=int, default=1, help="number of documents to print")
    parser.add_argument("--ids", action="store_true", help="also print the token ids")
    args = parser.parse_args(argv)
    prefix = args.data_prefix[:-4] if args.data_prefix.endswith((".bin", ".idx")) else args.data_prefix
    ds = MMapIndexedDataset(prefix)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path)
    n_docs = len(ds.doc_idx) - 1
    start = args.index + n_docs if args.index < 0 else args.index
    if not 0 <= start < n_docs:
        raise UserError(f"--index {args.index} is out of range; {prefix} has {n_docs} documents")
    print(describe(ds, prefix))
    for doc in range(start, min(start + args.count, n_docs)):
        ids = document_tokens(ds, doc)
        print(f"\n=== document {doc} ({len(ids)} tokens) ===")
        print(tokenizer.decode(ids))
        if args.ids:
            print(f"--- ids ---\n{ids.tolist()}")
    return 0


def main(argv=None) -> None:
    """``python data_tools/inspect_data.py`` and ``megatron-bloom-inspect-data``."""
    run_tool(inspect_command, argv)


if __name__ == "__main__":
    main()
