"""Megatron-DeepSpeed's tools/preprocess_data.py, run from a user's checkout, and its output checked against ours.

`benchmarks/preprocess.py --megatron-deepspeed DIR` times their script on the same corpus, the same
tokenizer folder and the same worker counts as ours. Nothing of theirs is copied here: their script
runs as a subprocess in DIR, as their README runs it:

    cd DIR && python tools/preprocess_data.py --input corpus.jsonl --output-prefix out \\
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path TOKENIZER_DIR --append-eod --workers 2

Before any work, `check_checkout` refuses a DIR without tools/preprocess_data.py, and `preflight`
imports that script in the Python that will run it (its module level imports megatron, whose
__init__ pulls in torch, deepspeed and megatron.initialize; megatron.tokenizer needs transformers,
six and regex; the script itself builds a class on nltk), so a missing module is one `error:` line
naming it and the pip command, not a traceback after the corpus is built.

numpy 1.24 removed `np.float`, which their megatron/data/indexed_dataset.py puts in its dtype table
at import. With such a numpy, their script runs with `np.float = float`, exactly the alias it was
before 1.24, set by a sitecustomize.py on PYTHONPATH so that their worker processes get it too
whatever the start method; `environment` returns a note saying so, which the benchmark prints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from megatron_bloom.data.indexed_dataset import MMapIndexedDataset, data_file_path
from megatron_bloom.errors import UserError

SCRIPT = os.path.join("tools", "preprocess_data.py")

# Runs in DIR with the script's path as argv[1]: executes the script's module level (imports and
# class definitions) but not main(), which only runs under __main__. Prints one JSON line.
_PREFLIGHT = r"""
import importlib.util, json, runpy, sys, time, traceback
start = time.perf_counter()
try:
    runpy.run_path(sys.argv[1], run_name="preflight")
except ModuleNotFoundError as e:
    print(json.dumps({"missing": e.name}))
    raise SystemExit
except NameError as e:
    # `try: import nltk` guarded, then `class ...(nltk.tokenize...)` at module level: a missing
    # module shows up as a name that is not defined.
    if e.name and importlib.util.find_spec(e.name) is None:
        print(json.dumps({"missing": e.name}))
        raise SystemExit
    frame = traceback.extract_tb(e.__traceback__)[-1]
    print(json.dumps({"failed": f"NameError: {e}", "where": f"{frame.filename}:{frame.lineno}"}))
    raise SystemExit
except Exception as e:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    print(json.dumps({"failed": f"{type(e).__name__}: {e}".splitlines()[0], "where": f"{frame.filename}:{frame.lineno}"}))
    raise SystemExit
seconds = time.perf_counter() - start
versions = {m: getattr(sys.modules.get(m), "__version__", None) for m in ("torch", "deepspeed", "transformers", "numpy", "nltk")}
print(json.dumps({"import_s": seconds, "versions": versions}))
"""

_NUMPY_FLOAT_SHIM = "import numpy\nnumpy.float = float  # removed in numpy 1.24; Megatron-DeepSpeed's indexed_dataset.py uses it\n"


def check_checkout(path: str) -> str:
    """The checkout's absolute path; a folder without tools/preprocess_data.py is a UserError."""
    checkout = os.path.abspath(path)
    if not os.path.isfile(os.path.join(checkout, SCRIPT)):
        raise UserError(
            f"--megatron-deepspeed {path}: {os.path.join(path, SCRIPT)} not found; pass a checkout of "
            "bigscience-workshop/Megatron-DeepSpeed (git clone https://github.com/bigscience-workshop/Megatron-DeepSpeed)"
        )
    return checkout


def checkout_commit(checkout: str) -> str | None:
    """The checkout's git commit, or None when DIR is not a git work tree (e.g. an exported archive)."""
    result = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def environment(work: str) -> tuple[dict, list[str]]:
    """(environment for their script, notes on what was changed to let it run here)."""
    env, notes = dict(os.environ), []
    if not hasattr(np, "float"):
        shim = os.path.join(work, "mds_compat")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "sitecustomize.py"), "w", encoding="utf-8") as f:
            f.write(_NUMPY_FLOAT_SHIM)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, env.get("PYTHONPATH")) if p)
        notes.append(f"numpy {np.__version__} has no np.float (removed in 1.24), which their megatron/data/"
                     "indexed_dataset.py uses; their script ran with np.float = float, its meaning before 1.24")
    return env, notes


def preflight(checkout: str, env: dict) -> dict:
    """Import their script as it will run; {"import_s", "versions"} or a one-line UserError."""
    result = subprocess.run([sys.executable, "-c", _PREFLIGHT, SCRIPT], cwd=checkout, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"importing {os.path.join(checkout, SCRIPT)} failed: {last}")
    found = json.loads(lines[-1])
    missing = found.get("missing")
    if missing:
        top = missing.split(".")[0]
        if top == "megatron":
            raise UserError(f"{checkout} has no module {missing}: not a complete Megatron-DeepSpeed checkout")
        if top != missing:
            raise UserError(f"Megatron-DeepSpeed's {SCRIPT} imports {missing}, which this {top} lacks; "
                            f"fix: install the {top} version the checkout's requirements.txt asks for")
        raise UserError(f"Megatron-DeepSpeed's {SCRIPT} needs the module '{missing}', missing from this Python; "
                        f"fix: {sys.executable} -m pip install {missing}")
    if "failed" in found:
        raise UserError(f"Megatron-DeepSpeed's {SCRIPT} does not import in this Python: {found['failed']} (at {found['where']})")
    return found


def command(corpus: str, prefix: str, tok_dir: str, workers: int) -> list[str]:
    """Their script's command line (run in the checkout). --append-eod because ours is run with it."""
    return [sys.executable, SCRIPT, "--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", tok_dir, "--append-eod", "--workers", str(workers)]  # fmt: skip


def output_prefix(prefix: str) -> str:
    """What their script writes for --json-keys text (one sequence per document, no --split-sentences)."""
    return f"{prefix}_text_document"


def _tokens(ds: MMapIndexedDataset) -> np.ndarray:
    return np.fromfile(data_file_path(ds.path_prefix), dtype=ds.dtype)


def _first_difference(ours: np.ndarray, theirs: np.ndarray) -> int:
    n = min(ours.size, theirs.size)
    unequal = np.flatnonzero(ours[:n] != theirs[:n])
    return int(unequal[0]) if unequal.size else n


def _explain(ours: MMapIndexedDataset, theirs: MMapIndexedDataset, eod_id: int | None) -> str:
    """Why two outputs differ, from the pattern of the difference."""
    ours_flat, theirs_flat = _tokens(ours), _tokens(theirs)
    if len(ours) == len(theirs) and eod_id is not None and len(ours):
        extra = ours.sizes.astype(np.int64) - theirs.sizes
        for sign, longer, flat, shorter_flat, name, other in ((1, ours, ours_flat, theirs_flat, "ours", "theirs"),
                                                               (-1, theirs, theirs_flat, ours_flat, "theirs", "ours")):
            last = np.cumsum(longer.sizes, dtype=np.int64) - 1  # where each document's last token is
            if (extra == sign).all() and (flat[last] == eod_id).all():
                rest = "the same ids otherwise" if np.array_equal(np.delete(flat, last), shorter_flat) else "and other ids differ too"
                return (f"EOD handling: {name} ends every document with one more token than {other}, an EOD (id {eod_id}) "
                        f"({rest}); their script appends it only with --append-eod")
    if len(ours) > len(theirs):
        # Their script skips a document whose text gives no tokens; ours keeps it (a lone EOD with --append-eod).
        starts = np.cumsum(ours.sizes, dtype=np.int64) - ours.sizes
        empty = ours.sizes == 0
        single = np.flatnonzero(ours.sizes == 1)
        empty[single] = ours_flat[starts[single]] == eod_id
        keep = ~empty
        if keep.sum() == len(theirs) and np.array_equal(ours.sizes[keep], theirs.sizes) and \
                np.array_equal(ours_flat[np.repeat(keep, ours.sizes)], theirs_flat):
            return (f"empty documents: ours keeps {int(empty.sum())} document(s) without text tokens (first: "
                    f"sequence {int(np.flatnonzero(empty)[0])}), their script drops them; every other document has the same ids")
    if np.array_equal(ours.sizes, theirs.sizes):
        at = _first_difference(ours_flat, theirs_flat)
        if at == ours_flat.size:
            return (f"same tokens in the same sequences, grouped into documents differently (doc_idx of "
                    f"{len(ours.doc_idx)} and {len(theirs.doc_idx)} entries)")
        ends = np.cumsum(ours.sizes, dtype=np.int64)
        seq = int(np.searchsorted(ends, at, side="right"))
        tok = at - (int(ends[seq - 1]) if seq else 0)
    else:
        seq, tok = _first_difference(ours.sizes, theirs.sizes), None
    ours_seq = ours[seq] if seq < len(ours) else np.empty(0, ours.dtype)
    theirs_seq = theirs[seq] if seq < len(theirs) else np.empty(0, theirs.dtype)
    if tok is None:
        tok = _first_difference(ours_seq, theirs_seq)
    why = ("the two tokenizers split this text differently" if len(ours) == len(theirs)
           else f"one side has sequences the other lacks ({len(ours):,} and {len(theirs):,} sequences)")
    return (f"first difference in sequence {seq} at token {tok}: ours {ours_seq[tok:tok + 5].tolist()}, "
            f"theirs {theirs_seq[tok:tok + 5].tolist()} (lengths {ours_seq.size} and {theirs_seq.size}); {why}")


def compare(ours_prefix: str, theirs_prefix: str, eod_id: int | None) -> dict:
    """Whether both .bin/.idx pairs hold the same token ids in the same documents, and if not why."""
    ours, theirs = MMapIndexedDataset(ours_prefix), MMapIndexedDataset(theirs_prefix)
    result = {
        "documents": [len(ours.doc_idx) - 1, len(theirs.doc_idx) - 1],
        "tokens": [int(ours.sizes.sum(dtype=np.int64)), int(theirs.sizes.sum(dtype=np.int64))],
        "dtypes": [ours.dtype.name, theirs.dtype.name],
    }
    # Values, not bytes: the same ids stored as uint16 and as int32 are the same ids.
    same = (np.array_equal(ours.sizes, theirs.sizes) and np.array_equal(ours.doc_idx, theirs.doc_idx)
            and np.array_equal(_tokens(ours), _tokens(theirs)))
    result["match"] = bool(same)
    if same:
        result["explanation"] = f"same token ids: {result['documents'][0]:,} documents, {result['tokens'][0]:,} tokens"
    else:
        result["explanation"] = _explain(ours, theirs, eod_id)
    return result
