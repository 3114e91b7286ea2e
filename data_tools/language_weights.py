"""Language sampling weights from token counts, BLOOM-style: p_i proportional to (n_i / N) ** alpha.

alpha = 1 samples every language in proportion to its tokens; alpha < 1 flattens the mix so that
small languages are seen more often (upsampled, several epochs) and large ones less. The default
0.3 is what bigscience used in their multilingual 1B3 ablations (train/tr5-1B3-multilingual/oscar/
tr5b-*, tr5c-*: data strings made by data/sampling_probs/calc_iterator_prob.py, which cites XLM,
arXiv:1901.07291 sec. 3.1, and computes the same formula over dataset sizes in GB). BLOOM-176B's own
per-language ratios (data/catalogue/training_dataset_ratios*.json) are fixed numbers, not derived
here; pass them with `data_tools/corpus.py ratios --ratio LANG=R` instead.

Inputs are `LANG COUNT` pairs or MMIDIDX prefixes (the count is the sum of the .idx sizes), mixed
freely on the command line or one per line in --file. The last stdout line is a --data-path value;
the table (tokens, share, weight, how many times each language is seen relative to alpha = 1) goes
to stderr, so `--data-path $(python data_tools/language_weights.py ...)` works. `--mixture-file F`
also writes the weights as a bigscience mixture file ('"train: W 0:1 PREFIX, ..."' on one line,
readable by Megatron-DeepSpeed's and our --train-weighted-split-paths-path).

    python data_tools/language_weights.py en 1200000000 fr 400000000 yo 2000000
    python data_tools/language_weights.py data/en_text_document data/fr_text_document --alpha 0.5
    python data_tools/language_weights.py en 1e9 fr 4e8 --prefix-template 'data/{lang}_text_document'
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_bloom.atomic import atomic_write_text
from megatron_bloom.data.blends import weighted_split_group_text, weighted_split_paths_file_text
from megatron_bloom.data.indexed_dataset import MMapIndexedDataset, index_file_path
from megatron_bloom.data.mtf import mds_prefix
from megatron_bloom.errors import UserError, run_main


def alpha_weights(counts: Sequence[float], alpha: float = 0.3) -> np.ndarray:
    """Sampling probabilities p_i = q_i ** alpha / sum_j q_j ** alpha with q_i = n_i / N."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0 or np.any(counts <= 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"token counts must be finite and > 0, got {counts.tolist()}")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0 (1 = proportional to tokens, smaller = flatter)")
    scaled = (counts / counts.sum()) ** alpha
    return scaled / scaled.sum()


def _count(token: str) -> Optional[float]:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def parse_sources(tokens: Sequence[str]) -> List[Tuple[str, float, Optional[str]]]:
    """[(name, token count, prefix or None)] from 'LANG COUNT' pairs and index prefixes.

    A token followed by a number is a language with its count; any other token must be a prefix
    with an .idx file, named after its file name.
    """
    out, i = [], 0
    while i < len(tokens):
        name = tokens[i]
        count = _count(tokens[i + 1]) if i + 1 < len(tokens) else None
        if count is not None:
            if count <= 0:
                raise ValueError(f"{name}: token count {tokens[i + 1]!r} must be > 0")
            out.append((name, count, None))
            i += 2
            continue
        if _count(name) is not None:
            raise ValueError(f"count {name!r} (argument {i + 1}) follows no language name; give 'LANG COUNT' pairs")
        # A plain/paired prefix counts its own .idx; Megatron-DeepSpeed pairs their two files.
        parts = [name] if os.path.isfile(index_file_path(name)) else [mds_prefix(name, k) for k in ("inputs", "targets")]
        if not all(os.path.isfile(index_file_path(x)) for x in parts):
            raise ValueError(f"{name!r} is neither followed by a token count nor an index prefix ({index_file_path(name)} "
                             f"not found, nor {index_file_path(mds_prefix(name, 'inputs'))})")
        total = sum(float(np.asarray(MMapIndexedDataset(x).sizes).sum(dtype=np.int64)) for x in parts)
        out.append((os.path.basename(name), total, name))
        i += 1
    if not out:
        raise ValueError("no languages given; pass 'LANG COUNT' pairs or index prefixes")
    names = [n for n, _, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{', '.join(dupes)} given more than once")
    return out


def data_path_string(weights: Sequence[float], prefixes: Sequence[str]) -> str:
    """'W1 PREFIX1 W2 PREFIX2 ...' with enough digits that the weights round-trip closely."""
    return " ".join(f"{w:.6g} {p}" for w, p in zip(weights, prefixes))


def language_weights_command(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", help="LANG COUNT pairs and/or index prefixes")
    p.add_argument("--file", help="read sources from this file too, one 'LANG COUNT' or PREFIX per line")
    p.add_argument("--alpha", type=float, default=0.3, help="sampling exponent (default 0.3)")
    p.add_argument("--prefix-template", default="{lang}",
                   help="prefix written for a 'LANG COUNT' source, e.g. 'data/{lang}_text_document'")
    p.add_argument("--mixture-file", help="also write a bigscience mixture file for --train-weighted-split-paths-path")
    p.add_argument("--mixture-name", default="train", help="group name in --mixture-file (default train)")
    p.add_argument("--mixture-range", default="0:1", help="START:END fraction of every dataset in --mixture-file")
    args = p.parse_args(argv)
    tokens = list(args.sources)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            tokens += [t for line in f if not line.lstrip().startswith("#") for t in line.split()]
    try:
        sources = parse_sources(tokens)
        weights = alpha_weights([c for _, c, _ in sources], args.alpha)
    except ValueError as e:
        raise UserError(str(e)) from None
    counts = np.array([c for _, c, _ in sources])
    shares = counts / counts.sum()
    table: Dict[str, List[str]] = {"language": [], "tokens": [], "share": [], "weight": [], "x vs share": []}
    for (name, count, _), share, w in zip(sources, shares, weights):
        for key, value in zip(table, (name, f"{int(count):,}", f"{share:.4%}", f"{w:.4%}", f"{w / share:.2f}")):
            table[key].append(value)
    print(f"alpha = {args.alpha}", file=sys.stderr)
    print("| " + " | ".join(table) + " |", file=sys.stderr)
    print("|" + "|".join("---" for _ in table) + "|", file=sys.stderr)
    for row in zip(*table.values()):
        print("| " + " | ".join(row) + " |", file=sys.stderr)
    prefixes = [prefix or args.prefix_template.format(lang=name) for name, _, prefix in sources]
    if args.mixture_file:
        try:
            group = weighted_split_group_text(args.mixture_name, [(w, args.mixture_range, pre) for w, pre in zip(weights, prefixes)])
        except ValueError as e:
            raise UserError(f"--mixture-file {args.mixture_file}: {e}") from None
        atomic_write_text(args.mixture_file, weighted_split_paths_file_text([group]))
        print(f"wrote {args.mixture_file}", file=sys.stderr)
    print(data_path_string(weights, prefixes))
    return 0


def main(argv=None) -> None:
    """``python data_tools/language_weights.py`` and ``megatron-bloom-language-weights``."""
    run_main(language_weights_command, argv)


if __name__ == "__main__":
    main()
