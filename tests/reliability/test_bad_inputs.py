"""The bad-input catalogue (docs/bad-inputs.md): every row is run here through its real entry point.

Each case starts the command a user would type, as a subprocess (one process; launch/pretrain.py
runs without torchrun as world size 1), and checks the contract of docs/bad-inputs.md:

* exit code 2, and the last non-empty stderr line is ``error: ...`` naming the problem;
* no ``Traceback`` anywhere in the output;
* refused before the expensive part: no DeepSpeed engine was built (its "Using topology" line
  never appears), the run took less than ``SECONDS_LIMIT`` and nothing was written where the
  command would have written (no checkpoint folder, no .bin/.idx or their .tmp files).

The rows the docs list as accepted (a weights-only checkpoint of another layout) are run too and
must train. The ids of the cases are the ids in the docs' table.
"""
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
from one_process import env

REPO = Path(__file__).resolve().parents[2]

# A refusal comes after imports (torch ~2-3 s) and a few small reads. The bound is loose because
# CI machines are shared; the "no engine, nothing written" checks are the sharp ones.
SECONDS_LIMIT = 45.0

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3", "--split", "90,10,0",
         "--train-iters", "1", "--eval-iters", "1", "--log-interval", "1", "--zero-stage", "1"]




def run(tool: str, *args) -> "Run":
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / tool), *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=300)
    return Run(proc, time.monotonic() - start)


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    seconds: float

    @property
    def last_error_line(self) -> str:
        lines = [ln for ln in self.proc.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def assert_refused(r: Run, fragment: str) -> None:
    out = r.proc.stdout + r.proc.stderr
    assert r.proc.returncode == 2, f"exit {r.proc.returncode}\n{out[-3000:]}"
    assert r.last_error_line.startswith("error: "), out[-3000:]
    assert fragment in r.last_error_line, r.last_error_line
    assert "Traceback" not in out, out[-3000:]
    assert "Using topology" not in out and "> training from iteration" not in out, "refused only after the engine was built"
    assert r.seconds < SECONDS_LIMIT, f"took {r.seconds:.1f} s"


def files_starting(folder: Path, stem: str) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(stem)) if folder.is_dir() else []


# ---- inputs ----------------------------------------------------------------------------------------


def pretrain_args(p, *extra) -> list:
    return [*MODEL, "--vocab-size", p["vocab"], *TRAIN, "--data-path", p["data"], *extra]


# ---- data preprocessing ------------------------------------------------------------------------------


def _write(p, name: str, data: bytes) -> Path:
    path = p["d"] / name
    path.write_bytes(data)
    return path


def _late_bad_line(p) -> Path:
    # Many good lines first, small chunks: earlier chunks are tokenized and written before the bad
    # line is reached, so "nothing half-written" is really tested.
    good = p["jsonl"].read_bytes().splitlines(keepends=True)[:200]
    return _write(p, "late_bad.jsonl", b"".join(good) + b'{"text": "unterminated\n')


PREPROCESS_CASES = {
    # id: (input, fragment of the error line)
    "malformed-jsonl": (_late_bad_line, "late_bad.jsonl:201: malformed JSON"),
    "missing-key": (lambda p: _write(p, "nokey.jsonl", b'{"body": "x"}\n'), "key 'text' is missing (keys: body); choose keys with --json-keys"),
    "missing-key-later": (lambda p: _write(p, "nokey2.jsonl", b'{"text": "a"}\n{"body": "b"}\n'), "nokey2.jsonl:2: key 'text' is missing"),
    "empty-file": (lambda p: _write(p, "empty.jsonl", b""), "input is empty"),
    "undecodable-bytes": (lambda p: _write(p, "latin1.jsonl", '{"text": "café"}\n'.encode("latin-1")), "latin1.jsonl:1: invalid UTF-8"),
    "missing-input": (lambda p: p["d"] / "nowhere.jsonl", "no such file or folder"),
}


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_preprocess_data_refuses(p, case, tmp_path):
    make_input, fragment = PREPROCESS_CASES[case]
    r = run("data_tools/preprocess_data.py", "--input", make_input(p), "--output-prefix", tmp_path / "out",
            "--tokenizer-name-or-path", p["tok"], "--workers", "1", "--chunk-mb", "0.01", "--quiet")
    assert_refused(r, fragment)
    assert files_starting(tmp_path, "out") == []  # neither finished nor .tmp outputs


def test_preprocess_data_missing_tokenizer_and_unwritable_output(p, tmp_path):
    r = run("data_tools/preprocess_data.py", "--input", p["jsonl"], "--output-prefix", tmp_path / "out",
            "--tokenizer-name-or-path", tmp_path / "no_tokenizer", "--quiet")
    assert_refused(r, "tokenizer not found")
    r = run("data_tools/preprocess_data.py", "--input", p["jsonl"], "--output-prefix", p["file"] / "out",
            "--tokenizer-name-or-path", p["tok"], "--quiet")
    assert_refused(r, "is a file, not a folder")
    assert files_starting(tmp_path, "out") == []


def test_preprocess_xp3_refuses_without_partial_outputs(p, tmp_path):
    # The first file's pairs are written (batch size 1) before the second file's bad row is read.
    folder = tmp_path / "xp3" / "en"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"inputs": "Q1", "targets": "A1"}\n{"inputs": "Q2", "targets": "A2"}\n')
    (folder / "b.jsonl").write_text('{"inputs": "Q3"}\n')
    r = run("data_tools/preprocess_xp3.py", "--input", tmp_path / "xp3", "--output-prefix", tmp_path / "out" / "pairs",
            "--tokenizer-name-or-path", p["tok"], "--batch-size", "1")
    assert_refused(r, "b.jsonl:1: key 'targets' is missing")
    assert files_starting(tmp_path / "out", "pairs") == []
    r = run("data_tools/preprocess_xp3.py", "--input", folder / "a.jsonl", "--output-prefix", p["file"] / "pairs",
            "--tokenizer-name-or-path", p["tok"])
    assert_refused(r, "is a file, not a folder")


def test_preprocessing_records_the_largest_token_id(p):
    """The sidecar pretraining reads instead of scanning the .bin; stale or missing, the .bin is scanned."""
    from megatron_bloom.data.indexed_dataset import MMapIndexedDataset, token_stats_path

    for prefix in (p["xp3"], p["data"]):
        ds = MMapIndexedDataset(str(prefix))
        scanned = ds.scan_max_token_id()
        assert ds.max_token_id() == (scanned, "sidecar") and 0 < scanned < p["vocab"]
    copy = p["d"] / "copy_text_document"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(str(p["data"]) + suffix, str(copy) + suffix)
    ds = MMapIndexedDataset(str(copy))
    assert ds.max_token_id() == (scanned, "scan")  # no sidecar (another tool's data)
    assert ds.max_token_id(scan_limit_bytes=10) == (None, "unknown")  # too large to scan at start-up
    Path(token_stats_path(str(copy))).write_text('{"max_token_id": 1, "num_sequences": 1, "bin_bytes": 2}')
    assert ds.max_token_id() == (scanned, "scan")  # a sidecar of another .bin is ignored


# ---- pretraining -------------------------------------------------------------------------------------


PRETRAIN_CASES = {
    # id: (extra flags, fragment of the error line)
    "data-prefix-missing": (lambda p: ["--data-path", p["d"] / "nowhere_text_document"], "nowhere_text_document.idx: file not found"),
    "bin-truncated": (lambda p: ["--data-path", p["d"] / "short_bin"], "the .bin is truncated or belongs to another .idx"),
    "idx-truncated": (lambda p: ["--data-path", p["d"] / "short_idx"], "the file is truncated or corrupt"),
    "data-path-weights": (lambda p: ["--data-path", "0.7", p["data"], "0.3"], "weight '0.3' (token 3) has no prefix after it"),
    "data-path-not-a-number": (lambda p: ["--data-path", "0.7x", p["data"]], "'0.7x' (token 1) should be a weight but is not a number"),
    "weighted-split-range": (lambda p: ["--train-weighted-split-paths", f"train: 1 0:1.5 {p['data']}"], "needs 0 <= START < END <= 1"),
    "token-id-over-vocab": (lambda p: ["--vocab-size", "200"], "holds token id"),  # the later flag wins
    "impossible-layout": (lambda p: ["--tensor-model-parallel-size", "2"], "world size 1 is not divisible by tensor_model_parallel_size"),
    "heads-vs-hidden": (lambda p: ["--num-attention-heads", "3"], "hidden_size=64 is not divisible by num_attention_heads=3"),
    "missing-tokenizer": (lambda p: ["--tokenizer-name-or-path", p["d"] / "no_tokenizer"], "tokenizer not found"),
    "tokenizer-over-vocab": (lambda p: ["--tokenizer-name-or-path", p["tok"], "--vocab-size", "300"], "tokens but vocab_size is 300"),
    "checkpoint-other-shape": (lambda p: ["--load", p["d"] / "ckpt_tp2", "--hidden-size", "32"], "has hidden_size=64 but the configuration says 32"),
    "checkpoint-truncated-layer": (lambda p: ["--load", p["d"] / "ckpt_truncated"], "layer_03-model_01-model_states.pt is corrupt or truncated"),
    "checkpoint-truncated-state": (lambda p: ["--load", p["d"] / "ckpt_bad_state"], "megatron_bloom.pt is corrupt, truncated or not a tensor file"),
    "checkpoint-other-layout-zero0": (lambda p: ["--load", p["d"] / "ckpt_trained_tp2", "--zero-stage", "0"], "needs ZeRO-1 on both sides"),
    "save-dir-unwritable": (lambda p: ["--save", p["file"] / "ckpt"], "a_file is a file, not a folder"),
    "sync-tp-with-zero3": (lambda p: ["--sync-tp-duplicated-parameters", "--zero-stage", "3"],
                           "sync_tp_duplicated_parameters averages whole parameters in every forward, which ZeRO-3"),
    # Validation that would evaluate nothing while --eval-iters asks for batches (--eval-iters 0 accepts them all).
    "split-validation-rounds-to-nothing": (lambda p: ["--data-path", p["d"] / "empty_docs", "--split", "99,1,0"],
                                           "no validation documents in"),
    "valid-range-empty": (lambda p: ["--train-weighted-split-paths", f"train: 1 0:0.5 {p['data']}",
                                     "--valid-weighted-split-paths", f"valid: 1 0.95:0.95 {p['data']}"],
                          "range '0.95:0.95' needs 0 <= START < END <= 1"),
    "valid-range-no-document": (lambda p: ["--train-weighted-split-paths", f"train: 1 0:0.5 {p['d'] / 'empty_docs'}",
                                           "--valid-weighted-split-paths", f"valid: 1 0.99:1 {p['d'] / 'empty_docs'}"],
                                "validation group 'valid': no validation documents in"),
    "valid-documents-empty": (lambda p: ["--train-weighted-split-paths", f"train: 1 0:0.5 {p['d'] / 'empty_docs'}",
                                         "--valid-weighted-split-paths", f"valid: 1 0.5:1 {p['d'] / 'empty_docs'}"],
                              "the validation documents [10, 20) of"),
    "tp-copies-drifted": (lambda p: ["--load", p["d"] / "ckpt_drifted_tp2"],
                          "the TP copies of duplicated parameters differ (1 of them; the most: 'transformer.h.0.input_layernorm.weight', by 0.01)"),
}


@pytest.mark.slow  # ~3-5 s each (torch import); all of them ~1 min
@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_pretrain_refuses(p, case, tmp_path):
    extra, fragment = PRETRAIN_CASES[case]
    save = tmp_path / "ckpt"
    args = pretrain_args(p, "--save", save, "--tensorboard-dir", tmp_path / "tb", *extra(p))
    r = run("launch/pretrain.py", *args)
    assert_refused(r, fragment)
    assert not save.exists() and not (tmp_path / "tb").exists()


@pytest.mark.slow  # trains one step (~10 s)
def test_pretrain_accepts_a_checkpoint_of_another_layout(p, tmp_path):
    """Layout-free resume: a TP=2 weights-only checkpoint loads at TP=1 (and under ZeRO-0)."""
    r = run("launch/pretrain.py", *pretrain_args(p, "--load", p["d"] / "ckpt_tp2", "--zero-stage", "0"))
    out = r.proc.stdout + r.proc.stderr
    assert r.proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert f"> loaded weights from {p['d'] / 'ckpt_tp2' / 'global_step0'}" in r.proc.stdout


@pytest.mark.slow
def test_finetune_refuses(p, tmp_path):
    base = [*TRAIN, "--data-path", p["xp3"], "--save", tmp_path / "ft"]
    r = run("launch/finetune.py", *base, "--pretrained", p["d"] / "ckpt_truncated")
    assert_refused(r, "layer_03-model_01-model_states.pt is corrupt or truncated")
    assert not (tmp_path / "ft").exists()  # the conversion of --pretrained never started
    r = run("launch/finetune.py", *base, "--pretrained", p["d"] / "ckpt_tp2", "--vocab-size", "100")
    assert_refused(r, "holds token id")
    r = run("launch/finetune.py", *base, "--pretrained", p["d"] / "ckpt_tp2", "--train-weighted-split-paths",
            f"train: 1 0:0.9 {p['xp3']}", "--valid-weighted-split-paths", f"heldout: 1 0.99:1 {p['xp3']}")
    assert_refused(r, "validation group 'heldout': no validation pairs in")


# ---- conversion and evaluation ---------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_checkpoint_refuses(p, tmp_path):
    out = tmp_path / "hf"
    r = run("launch/convert_checkpoint.py", "native-to-hf", "--load", p["d"] / "ckpt_tp2", "--out", out,
            "--tokenizer", tmp_path / "no_tokenizer")
    assert_refused(r, "no_tokenizer does not exist")
    r = run("launch/convert_checkpoint.py", "native-to-hf", "--load", p["d"] / "ckpt_truncated", "--out", out)
    assert_refused(r, "layer_03-model_01-model_states.pt is corrupt, truncated or not a tensor file")
    r = run("launch/convert_checkpoint.py", "native-to-hf", "--load", p["d"] / "ckpt_tp2", "--out", p["file"] / "hf")
    assert_refused(r, "is a file, not a folder")
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_refuses(p, tmp_path):
    r = run("launch/evaluate.py", "--load", p["d"] / "ckpt_tp2", "--data", p["jsonl"], "--tokenizer", tmp_path / "no_tokenizer")
    assert_refused(r, "no_tokenizer does not exist")
    r = run("launch/evaluate.py", "--load", p["d"] / "ckpt_truncated", "--data", p["jsonl"], "--tokenizer", p["tok"])
    assert_refused(r, "is corrupt, truncated or not a tensor file")
