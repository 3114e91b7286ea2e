"""Print documents of an MMIDIDX dataset as text (and optionally token ids), to eyeball a preprocessing run.

    python data_tools/inspect_data.py --data-prefix data/corpus_text_document \\
        --tokenizer-name-or-path tok/ --index 0 --count 3 --ids
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron_bloom.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset
from megatron_bloom.data.tokenizer import TokenizerLoadError, load_tokenizer


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-prefix", required=True, help="dataset prefix, without .bin/.idx")
    parser.add_argument("--tokenizer-name-or-path", required=True)
    parser.add_argument("--index", type=int, default=0, help="first document (negative counts from the end)")
    parser.add_argument("--count", type=int, default=1, help="number of documents to print")
    parser.add_argument("--ids", action="store_true", help="also print the token ids")
    args = parser.parse_args(argv)
    prefix = args.data_prefix[:-4] if args.data_prefix.endswith((".bin", ".idx")) else args.data_prefix
    try:
        ds = MMapIndexedDataset(prefix)
        tokenizer = load_tokenizer(args.tokenizer_name_or_path)
    except (IndexedDatasetError, TokenizerLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_docs = len(ds.doc_idx) - 1
    start = args.index + n_docs if args.index < 0 else args.index
    if not 0 <= start < n_docs:
        print(f"error: --index {args.index} is out of range; {prefix} has {n_docs} documents", file=sys.stderr)
        return 2
    print(describe(ds, prefix))
    for doc in range(start, min(start + args.count, n_docs)):
        ids = document_tokens(ds, doc)
        print(f"\n=== document {doc} ({len(ids)} tokens) ===")
        print(tokenizer.decode(ids))
        if args.ids:
            print(f"--- ids ---\n{ids.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
