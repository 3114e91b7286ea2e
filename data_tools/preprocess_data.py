"""Tokenize a corpus into Megatron MMIDIDX files: `PREFIX_<key>_document.bin/.idx` per json key.

    python data_tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-name-or-path bigscience/bloom --json-keys text --append-eod --workers 8

Inputs: jsonl, jsonl.gz, parquet, a `datasets.save_to_disk` folder, or a Hub dataset name (online).
Each document becomes one sequence (one document) in the output, in input order whatever --workers.

How it stays fast: worker processes read their own byte range of the input, parse it and call the
Rust tokenizer on whole batches (encode_batch); they send back one numpy array of ids per key and
task, which the parent appends to the .bin with a single write. No Python code runs per token.

How it stays safe: outputs are written as `*.tmp` and renamed only when complete, the .idx last, so
an interrupted run never leaves a pair that looks finished. Problems are reported as one
`error: ...` line on stderr with exit code 2; a bad line names `file:line`.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from data_tools import run_tool
from megatron_bloom.data.indexed_dataset import (
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
    token_stats_path,
)
from megatron_bloom.data.readers import CorpusReader, InputError, check_records, make_output_dir, parse_jsonl, read_range
from megatron_bloom.data.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer
from megatron_bloom.errors import EXIT_INTERRUPTED, UserError, fail

# --------------------------------------------------------------------------------------------
# Worker side. State is a module global so forked workers inherit it without pickling; spawned
# workers rebuild it in `_init_worker` from the serialized tokenizer.
_STATE: dict | None = None


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the parent dies (e.g. SIGKILL by a scheduler).

    Pool workers otherwise wait forever on a task queue whose other end they hold themselves.
    """
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: orphans then exit when their pipe breaks, as before


def _init_worker(state: dict) -> None:
    global _STATE
    # One Rust thread per worker: the workers are the parallelism; rayon threads on top of them
    # would only fight over the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    _die_with_parent()
    if _STATE is None:
        state = dict(state)
        state["tokenizer"] = Tokenizer.from_str(state.pop("tokenizer_json"), state["special_tokens"], state["name"])
        _STATE = state


def _work(task: tuple):
    """One task -> (tokens and lengths per key, units covered, bytes covered, bad units, fatal)."""
    keys, skip_bad, batch = _STATE["keys"], _STATE["skip_bad"], _STATE["batch_size"]
    kind = task[0]
    if kind == "range":
        parsed = parse_jsonl(read_range(*task[1:]), keys, skip_bad)
    elif kind == "lines":
        parsed = parse_jsonl(task[1], keys, skip_bad)
    else:
        parsed = check_records(task[1], keys, skip_bad)
    tok, dtype, eod = _STATE["tokenizer"], _STATE["dtype"], _STATE["append_eod"]
    out = {}
    if parsed.fatal is None:
        # Texts were validated while parsing (strings, valid Unicode), so every key keeps the same
        # documents and a tokenizer exception here is a real bug, left to surface as one.
        for key in keys:
            texts = parsed.columns[key]
            parts = [tok.encode_batch_numpy(texts[s : s + batch], dtype=dtype, append_eod=eod) for s in range(0, len(texts), batch)]
            flat = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, dtype)
            lengths = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
            out[key] = (flat, lengths)
    return out, parsed.n_units, parsed.n_bytes, parsed.bad, parsed.fatal


# --------------------------------------------------------------------------------------------
# Parent side.
def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


class _Outputs:
    """Builders writing `*.tmp` files; `commit` renames them into place, `discard` deletes them."""

    def __init__(self, prefix: str, keys: list[str], dtype, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.final = {k: output_prefix_for(prefix, k) for k in keys}
        self.builders = {k: MMapIndexedDatasetBuilder(data_file_path(p) + ".tmp", dtype) for k, p in self.final.items()}

    def commit(self) -> None:
        for key, prefix in self.final.items():
            self.builders[key].finalize(index_file_path(prefix) + ".tmp")
        # An old .idx next to a new .bin would look finished but be wrong: drop it before the .bin
        # moves, and move every .idx only once every .bin is in place.
        for prefix in self.final.values():
            if os.path.exists(index_file_path(prefix)):
                os.remove(index_file_path(prefix))
        # The largest token id, so training can refuse a model vocabulary that is too small at once.
        for key, prefix in self.final.items():
            self.builders[key].write_token_stats(token_stats_path(prefix), vocab_size=self.tokenizer.vocab_size,
                                                 tokenizer=str(self.tokenizer.name_or_path))
        for prefix in self.final.values():
            os.replace(data_file_path(prefix) + ".tmp", data_file_path(prefix))
        for prefix in self.final.values():
            os.replace(index_file_path(prefix) + ".tmp", index_file_path(prefix))

    def discard(self) -> None:
        for key, prefix in self.final.items():
            self.builders[key].close()
            for path in (data_file_path(prefix) + ".tmp", index_file_path(prefix) + ".tmp"):
                if os.path.exists(path):
                    os.remove(path)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so `finally` blocks remove the partial outputs


def _fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def preprocess(args) -> dict:
    start = time.perf_counter()
    keys = list(dict.fromkeys(args.json_keys))
    # Cheap checks first: a wrong tokenizer path or key should fail in a second, not after an hour.
    reader = CorpusReader(args.input, keys, chunk_bytes=int(args.chunk_mb * 1_000_000), batch_size=args.batch_size)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path)
    if args.append_eod and tokenizer.eod_id is None:
        raise TokenizerLoadError(f"{args.tokenizer_name_or_path}: tokenizer has no eos token to use with --append-eod")
    reader.check()
    make_output_dir(args.output_prefix)
    dtype = best_dtype(tokenizer.vocab_size)

    state = {
        "keys": keys,
        "skip_bad": args.skip_bad_lines,
        "batch_size": args.batch_size,
        "append_eod": args.append_eod,
        "dtype": dtype,
        "special_tokens": tokenizer.special_tokens,
        "name": tokenizer.name_or_path,
    }
    global _STATE
    _STATE = dict(state, tokenizer=tokenizer)
    # fork is cheapest (no re-imports), but only safe before anything starts threads; the
    # columnar readers load pyarrow, which does, so those inputs use spawn.
    forkable = reader.format in ("jsonl", "jsonl.gz") and "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if forkable else "spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(dict(state, tokenizer_json=tokenizer.to_str()),))
    previous_term = signal.signal(signal.SIGTERM, _raise_on_sigterm)

    outputs = _Outputs(args.output_prefix, keys, dtype, tokenizer)
    total_bytes, total_rows = reader.total_bytes(), reader.total_rows()
    bar = tqdm(
        total=total_bytes if total_bytes is not None else total_rows,
        unit="B" if total_bytes is not None else "doc",
        unit_scale=True,
        disable=args.quiet,
        mininterval=0.5 if sys.stderr.isatty() else 5.0,
        desc="preprocess",
    )
    stats = {"docs": 0, "tokens": 0, "bytes": 0, "units": 0, "bad": 0, "first_bad": None, "bar_in_bytes": total_bytes is not None}
    committed = False
    try:
        pending: deque = deque()
        # A bounded window of tasks in flight keeps memory flat (gzip and columnar tasks carry
        # their data) while results are still consumed strictly in input order.
        window = 2 * args.workers + 2
        for task in reader.tasks():
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= window:
                _consume(pending.popleft().get(), reader, outputs, stats, bar, start)
        while pending:
            _consume(pending.popleft().get(), reader, outputs, stats, bar, start)
        if stats["docs"] == 0:
            raise InputError(f"{reader.path}: input has no usable documents ({stats['bad']} bad {reader.unit}s skipped)")
        outputs.commit()
        committed = True
    finally:
        pool.terminate()
        pool.join()
        bar.close()
        signal.signal(signal.SIGTERM, previous_term)
        if not committed:
            outputs.discard()
    stats["seconds"] = time.perf_counter() - start
    stats["outputs"] = list(outputs.final.values())
    return stats


def _consume(result, reader: CorpusReader, outputs: _Outputs, stats: dict, bar, start: float) -> None:
    per_key, n_units, n_bytes, bad, fatal = result
    first = stats["units"]  # units before this task, so unit i of the task is line first+i+1
    if fatal is not None:
        raise InputError(_where(reader, first + fatal[0]) + f": {fatal[1]}; fix it or pass --skip-bad-lines")
    if bad and stats["first_bad"] is None:
        stats["first_bad"] = _where(reader, first + bad[0][0]) + f": {bad[0][1]}"
    stats["bad"] += len(bad)
    stats["units"] += n_units
    for key, (flat, lengths) in per_key.items():
        outputs.builders[key].add_documents(flat, lengths)
    first_key = next(iter(per_key), None)
    n_docs = len(per_key[first_key][1]) if first_key else 0
    stats["docs"] += n_docs
    stats["tokens"] += sum(len(flat) for flat, _ in per_key.values())
    stats["bytes"] += n_bytes
    bar.update(n_bytes if stats["bar_in_bytes"] else n_docs)
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix_str(
        f"{stats['docs'] / elapsed:,.0f} docs/s, {stats['bytes'] / elapsed / 1e6:.1f} MB/s, {_fmt_count(stats['tokens'] / elapsed)} tok/s",
        refresh=False,
    )


def _where(reader: CorpusReader, unit_index: int) -> str:
    # 1-based like editors and `sed -n Np`: line N of a jsonl, row N of a table.
    if reader.unit == "line":
        return f"{reader.path}:{unit_index + 1}"
    return f"{reader.path}:row {unit_index + 1}"


def summary_line(stats: dict) -> str:
    s = max(stats["seconds"], 1e-9)
    line = (
        f"done: {stats['docs']:,} docs, {stats['tokens']:,} tokens, {stats['bytes'] / 1e6:.1f} MB in {s:.1f}s "
        f"({stats['bytes'] / s / 1e6:.1f} MB/s, {_fmt_count(stats['tokens'] / s)} tok/s, {stats['docs'] / s:,.0f} docs/s); "
        f"skipped {stats['bad']} bad lines"
    )
    if stats["first_bad"]:
        line += f" (first: {stats['first_bad']})"
    return line + f"; wrote {', '.join(p + '.{bin,idx}' for p in stats['outputs'])}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="jsonl, jsonl.gz, parquet, save_to_disk folder, or Hub dataset name")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-name-or-path", required=True, help="tokenizer folder, tokenizer.json, or Hub name")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize; one output per key")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eos (</s>) token")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    p.add_argument("--batch-size", type=int, default=1000, help="documents per tokenizer call")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="MB of input per worker task (small enough to balance workers)")
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count malformed lines instead of stopping (a first line without the key still stops: that is a wrong --json-keys)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary line is still printed)")
    return p


def preprocess_command(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.batch_size < 1 or args.chunk_mb <= 0:
        raise UserError("--workers and --batch-size must be >= 1 and --chunk-mb > 0")
    try:
        stats = preprocess(args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: preprocess has removed its .tmp files
        fail("interrupted; partial outputs removed", EXIT_INTERRUPTED)
    print(summary_line(stats), file=sys.stderr)
    return 0


def main(argv=None) -> None:
    """``python data_tools/preprocess_data.py`` and ``megatron-bloom-preprocess-data``."""
    run_tool(preprocess_command, argv)


if __name__ == "__main__":
    main()
