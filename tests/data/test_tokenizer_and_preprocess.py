"""Tokenizer training/loading and the preprocessing CLI, end to end on a tiny generated corpus.

The CLI runs as a subprocess, as a user would run it: exit codes, stderr lines and the files left
on disk are the contract being tested.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.make_corpus import CorpusGenerator
from data_tools.train_tokenizer import save, train
from megatron_bloom.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset
from megatron_bloom.data.tokenizer import TokenizerLoadError, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
N_DOCS = 120


def run_tool(name, *args, env=None, timeout=120):
    cmd = [sys.executable, str(REPO / "data_tools" / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(directory, stem):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(stem))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small multilingual corpus with two text fields, and a 400-token tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    gen = CorpusGenerator(seed=3, min_words=5, max_words=120)
    records = []
    for i in range(N_DOCS):
        lang, text = gen.document()
        records.append({"id": i, "lang": lang, "title": text[:40], "text": text})
    records[7]["text"] = ""  # an empty document must still be one (possibly empty) sequence
    records[8]["text"] = "Ünïcödé ✓ emoji 🚀 and\ttabs\r\n"
    jsonl = root / "corpus.jsonl"
    write_jsonl(jsonl, records)
    tok_dir = root / "tok"
    save(train([str(jsonl)], vocab_size=400), str(tok_dir))
    return {"root": root, "jsonl": jsonl, "records": records, "tok": tok_dir}


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer(str(corpus["tok"]))


# --- tokenizer --------------------------------------------------------------------------------
def test_autotokenizer_loads_trained_folder(corpus, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(corpus["tok"]))
    assert hf.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert len(hf) == tokenizer.vocab_size == 400
    assert (tokenizer.eod_id, tokenizer.pad_id) == (2, 3)
    for r in corpus["records"][:20]:
        ids = hf(r["text"])["input_ids"]
        assert ids == tokenizer.encode(r["text"])  # no BOS/EOS added, as BLOOM
        assert hf.decode(ids) == r["text"]  # byte-level: lossless


def test_trained_pre_tokenizer_is_blooms(corpus):
    spec = json.loads((corpus["tok"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] is None
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == " ?[^(\\s|[.,!?…。，、।۔،])]+"
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="tokenizer not found: .*nope"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached
    start = time.perf_counter()
    with pytest.raises(TokenizerLoadError, match="unreachable"):
        load_tokenizer("some-org/not-a-real-tokenizer")
    assert time.perf_counter() - start < 10


# --- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_every_document(corpus, tokenizer, tmp_path, workers):
    prefix = tmp_path / "out"
    # Tiny chunks: many tasks in flight, so out-of-order completion would show.
    result = run_tool(
        "preprocess_data", "--input", corpus["jsonl"], "--output-prefix", prefix,
        "--tokenizer-name-or-path", corpus["tok"], "--append-eod", "--workers", workers, "--chunk-mb", "0.02",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"done: {N_DOCS} docs" in result.stderr and "skipped 0 bad lines" in result.stderr
    ds = MMapIndexedDataset(f"{prefix}_text_document")
    assert ds.dtype == np.uint16 and len(ds) == N_DOCS
    np.testing.assert_array_equal(ds.doc_idx, np.arange(N_DOCS + 1))
    for i, r in enumerate(corpus["records"]):
        assert ds[i].tolist() == tokenizer.encode(r["text"]) + [tokenizer.eod_id], i
    assert leftovers(tmp_path, "out") == ["out_text_document.bin", "out_text_document.idx", "out_text_document.tokens.json"]


def test_several_json_keys_without_eod(corpus, tokenizer, tmp_path):
    prefix = tmp_path / "multi"
    result = run_tool(
        "preprocess_data", "--input", corpus["jsonl"], "--output-prefix", prefix,
        "--tokenizer-name-or-path", corpus["tok"], "--json-keys", "text", "title", "--workers", 2, "--batch-size", 7, "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for key in ("text", "title"):
        ds = MMapIndexedDataset(f"{prefix}_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [tokenizer.encode(r[key]) for r in corpus["records"]]


def _save_parquet(records, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=33)


def _save_to_disk(records, path):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))


@pytest.mark.parametrize("fmt", ["jsonl.gz", "parquet", "save_to_disk"])
def test_other_input_formats_give_identical_output(corpus, tmp_path, fmt):
    records = corpus["records"]
    if fmt == "jsonl.gz":
        source = tmp_path / "corpus.jsonl.gz"
        with gzip.open(source, "wb") as f:
            f.write(corpus["jsonl"].read_bytes())
    elif fmt == "parquet":
        source = tmp_path / "corpus.parquet"
        _save_parquet(records, source)
    else:
        source = tmp_path / "corpus_arrow"
        _save_to_disk(records, source)
    reference, prefix = tmp_path / "ref", tmp_path / "out"
    common = ["--tokenizer-name-or-path", corpus["tok"], "--append-eod", "--workers", 2, "--batch-size", 16]
    assert run_tool("preprocess_data", "--input", corpus["jsonl"], "--output-prefix", reference, *common).returncode == 0
    result = run_tool("preprocess_data", "--input", source, "--output-prefix", prefix, *common)
    assert result.returncode == 0, result.stderr
    for suffix in (".bin", ".idx"):
        assert Path(f"{prefix}_text_document{suffix}").read_bytes() == Path(f"{reference}_text_document{suffix}").read_bytes()


# --- errors -----------------------------------------------------------------------------------
def _lines(corpus, n=30):
    return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in corpus["records"][:n]]


def test_malformed_line_names_file_and_line_and_leaves_nothing(corpus, tmp_path):
    lines = _lines(corpus, 60)
    lines[44] = b'{"text": "unterminated'
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    # Small chunks and 2 workers: the bad line sits in a late task, after .bin data was written.
    result = run_tool(
        "preprocess_data", "--input", source, "--output-prefix", tmp_path / "out",
        "--tokenizer-name-or-path", corpus["tok"], "--workers", 2, "--chunk-mb", "0.01",
    )  # fmt: skip
    assert_clean_error(result, f"{source}:45:", "malformed JSON", "--skip-bad-lines")
    assert leftovers(tmp_path, "out") == []


def test_skip_bad_lines_counts_and_keeps_the_rest(corpus, tokenizer, tmp_path):
    lines = _lines(corpus)
    lines[3] = b"not json at all"
    lines[10] = b'{"text": "caf\xe9"}'  # latin-1 byte, invalid UTF-8
    lines[20] = b'{"text": 42}'
    lines[25] = b'{"text": "lone \\ud800 surrogate"}'
    lines.insert(5, b"")  # blank lines are ignored, not bad
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    result = run_tool(
        "preprocess_data", "--input", source, "--output-prefix", tmp_path / "out",
        "--tokenizer-name-or-path", corpus["tok"], "--skip-bad-lines", "--workers", 2, "--chunk-mb", "0.01",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 4 bad lines" in result.stderr and f"{source}:4:" in result.stderr
    ds = MMapIndexedDataset(str(tmp_path / "out_text_document"))
    kept = [r["text"] for i, r in enumerate(corpus["records"][:30]) if i not in (3, 10, 20, 25)]
    assert [ds[i].tolist() for i in range(len(ds))] == [tokenizer.encode(t) for t in kept]


def test_lone_surrogate_names_the_line(corpus, tmp_path):
    lines = _lines(corpus, 5)
    lines[1] = b'{"text": "bad \\udc00 escape"}'
    source = tmp_path / "surrogate.jsonl"
    source.write_bytes(b"\n".join(lines))
    result = run_tool("preprocess_data", "--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-name-or-path", corpus["tok"])
    assert_clean_error(result, f"{source}:2:", "lone surrogate")


def test_missing_key_fails_before_work(corpus, tmp_path):
    result = run_tool(
        "preprocess_data", "--input", corpus["jsonl"], "--output-prefix", tmp_path / "out",
        "--tokenizer-name-or-path", corpus["tok"], "--json-keys", "body",
    )  # fmt: skip
    assert_clean_error(result, f"{corpus['jsonl']}:1:", "key 'body' is missing", "--json-keys")
    assert leftovers(tmp_path, "out") == []


def test_empty_input(corpus, tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_bytes(b"\n\n")
    result = run_tool("preprocess_data", "--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-name-or-path", corpus["tok"])
    assert_clean_error(result, str(source), "empty")


def test_bad_utf8_names_the_line(corpus, tmp_path):
    lines = _lines(corpus, 5)
    lines[2] = b'{"text": "\xff\xfe broken"}'
    source = tmp_path / "latin.jsonl"
    source.write_bytes(b"\n".join(lines))
    result = run_tool("preprocess_data", "--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-name-or-path", corpus["tok"])
    assert_clean_error(result, f"{source}:3:", "invalid UTF-8")
    assert leftovers(tmp_path, "out") == []


def test_missing_tokenizer_and_input_are_clear_errors(corpus, tmp_path):
    result = run_tool("preprocess_data", "--input", corpus["jsonl"], "--output-prefix", tmp_path / "out", "--tokenizer-name-or-path", tmp_path / "no_tok")
    assert_clean_error(result, "tokenizer not found", "no_tok")
    result = run_tool("preprocess_data", "--input", tmp_path / "absent.jsonl", "--output-prefix", tmp_path / "out", "--tokenizer-name-or-path", corpus["tok"])
    assert_clean_error(result, "absent.jsonl", "no such file")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_nothing_that_looks_finished(corpus, tmp_path, sig):
    source = tmp_path / "big.jsonl"
    gen = CorpusGenerator(seed=9)
    write_jsonl(source, [{"text": gen.document()[1]} for _ in range(4000)])  # ~11 MB: seconds, even when idle
    prefix = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "data_tools" / "preprocess_data.py"), "--input", str(source), "--output-prefix", str(prefix),
           "--tokenizer-name-or-path", str(corpus["tok"]), "--workers", "1", "--chunk-mb", "0.05"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not Path(f"{prefix}_text_document.bin.tmp").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # let some data reach the .bin
        # SIGKILL gives no chance to clean up (only the .tmp naming protects us); SIGTERM, as sent
        # by schedulers, should remove the partial files too.
        proc.send_signal(sig)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode != 0, "preprocessing finished before it could be killed: make the input larger"
    names = leftovers(tmp_path, "out")
    assert not any(n.endswith((".bin", ".idx")) for n in names), names
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and names == []
    with pytest.raises(IndexedDatasetError):
        MMapIndexedDataset(f"{prefix}_text_document")


# --- merge and inspect ------------------------------------------------------------------------
def test_merge_shards_equals_single_run(corpus, tmp_path):
    lines = corpus["jsonl"].read_bytes().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines[:50]))
    (tmp_path / "b.jsonl").write_bytes(b"".join(lines[50:]))
    common = ["--tokenizer-name-or-path", corpus["tok"], "--append-eod", "--workers", 1]
    for name in ("a", "b"):
        assert run_tool("preprocess_data", "--input", tmp_path / f"{name}.jsonl", "--output-prefix", tmp_path / name, *common).returncode == 0
    assert run_tool("preprocess_data", "--input", corpus["jsonl"], "--output-prefix", tmp_path / "whole", *common).returncode == 0
    result = run_tool("merge_datasets", "--input", tmp_path / "a_text_document", tmp_path / "b_text_document", "--output-prefix", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"whole_text_document{suffix}").read_bytes()
    result = run_tool("merge_datasets", "--input", tmp_path / "a_text_document", tmp_path / "missing", "--output-prefix", tmp_path / "m2")
    assert_clean_error(result, "missing.idx")
    assert leftovers(tmp_path, "m2") == []


def test_inspect_prints_documents(corpus, tmp_path):
    prefix = tmp_path / "out"
    run_tool("preprocess_data", "--input", corpus["jsonl"], "--output-prefix", prefix, "--tokenizer-name-or-path", corpus["tok"], "--append-eod")
    result = run_tool("inspect_data", "--data-prefix", f"{prefix}_text_document", "--tokenizer-name-or-path", corpus["tok"], "--index", 8, "--count", 2, "--ids")
    assert result.returncode == 0, result.stderr
    assert f"{N_DOCS} documents" in result.stdout
    # Record 9 rather than 8: text-mode pipes would turn record 8's "\r\n" into "\n".
    assert "=== document 8 " in result.stdout and "--- ids ---" in result.stdout
    assert corpus["records"][9]["text"] + "</s>" in result.stdout
