"""Corpus readers for the data tools: jsonl, jsonl.gz, parquet, `datasets.save_to_disk` folders, Hub names.

Preprocessing splits an input into *tasks* that worker processes turn into documents:

  * plain jsonl  -> ("range", start, end): byte ranges cut at line ends; each worker reads its own
                    range, so the parent process never touches the text (it has a core to share);
  * jsonl.gz     -> ("lines", bytes): gzip cannot seek, so the parent decompresses and ships lines;
  * parquet, save_to_disk folders, Hub datasets -> ("records", {key: [str, ...]}).

Workers call `parse_jsonl` / `check_records`, which report problems as (line or row within the
task, reason); the parent, which sees results in input order, turns them into `file:line` messages.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".txt")


class InputError(ValueError):
    """The input cannot be read as asked (missing, empty, wrong key, bad line); the message says why."""


@dataclass
class ParsedTask:
    """What a worker got out of one task: the texts per key, and any skipped or fatal problem."""

    columns: dict[str, list[str]]
    n_units: int  # lines (jsonl) or rows (records) the task covered, to number later lines
    n_bytes: int  # input bytes the task covered (jsonl) or UTF-8 bytes of its texts (records)
    units: list[int] = field(default_factory=list)  # 0-based unit in the task of each kept document
    bad: list[tuple[int, str]] = field(default_factory=list)  # (0-based unit in task, reason), skipped
    fatal: tuple[int, str] | None = None  # first bad unit when bad ones are not skipped

    def take(self, unit: int, reason: str | None, skip_bad: bool, row: dict[str, str] | None) -> bool:
        """Keep ``row`` (key -> text) of ``unit``, or record why it is bad; False when that ends the task."""
        if reason is not None:
            if not skip_bad:
                self.fatal = (unit, reason)
                return False
            self.bad.append((unit, reason))
            return True
        for key, text in row.items():
            self.columns[key].append(text)
        self.units.append(unit)
        return True


def make_output_dir(prefix: str, flag: str = "--output-prefix") -> str:
    """Create the folder an output prefix writes into; an InputError names the prefix if it cannot be."""
    from megatron_bloom.config.validate import output_dir_problem

    folder = os.path.dirname(os.path.abspath(prefix))
    problem = output_dir_problem(folder)
    if problem is None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise InputError(f"{flag} {prefix}: cannot write there ({problem}); choose a writable folder")
    return folder


def detect_format(path: str) -> str:
    """'jsonl', 'jsonl.gz', 'parquet', 'arrow_dir' or 'hub'; raises InputError when nothing fits."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "arrow_dir"
        raise InputError(f"{path}: folder is not a datasets.save_to_disk folder (no state.json); pass a jsonl/parquet file or such a folder")
    if os.path.isfile(path):
        if path.endswith(".gz"):
            return "jsonl.gz"
        if path.endswith(".parquet"):
            return "parquet"
        return "jsonl"
    from megatron_bloom.data.tokenizer import looks_like_hub_id

    if looks_like_hub_id(path) and not path.endswith(JSONL_SUFFIXES + (".gz", ".parquet")):
        return "hub"
    raise InputError(f"{path}: no such file or folder; pass a jsonl, jsonl.gz or parquet file, or a save_to_disk folder")


def jsonl_ranges(path: str, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes` that start and end on line boundaries."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            end = start + chunk_bytes
            if end >= size:
                end = size
            else:
                f.seek(end)
                end += len(f.readline())  # move the cut to just after the next newline
            yield start, end
            start = end


def read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def gzip_line_blocks(path: str, chunk_bytes: int) -> Iterator[bytes]:
    """Decompressed blocks of whole lines, about `chunk_bytes` each."""
    with gzip.open(path, "rb") as f:
        while True:
            try:
                lines = f.readlines(chunk_bytes)
            except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt archive
                raise InputError(f"{path}: gzip data is corrupt or truncated ({e}); re-create the archive") from None
            if not lines:
                return
            yield b"".join(lines)


def _text_problem(key, value) -> str | None:
    if value is None:
        return f"key {key!r} is null"
    if not isinstance(value, str):
        return f"key {key!r} is a {type(value).__name__}, expected a string"
    try:
        # JSON escapes such as "\ud800" decode to lone surrogates, which no tokenizer accepts;
        # catching them here names the line instead of failing a whole batch later.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"key {key!r} contains a lone surrogate (an unpaired \\uD800-\\uDFFF escape), not valid Unicode"
    return None


def _check_record(obj, keys) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key in keys:
        if key not in obj:
            return f"key {key!r} is missing (keys: {', '.join(map(str, obj)) or 'none'})"
        problem = _text_problem(key, obj[key])
        if problem:
            return problem
    return None


def parse_jsonl(data: bytes, keys: list[str], skip_bad: bool) -> ParsedTask:
    """Parse whole jsonl lines; blank lines are ignored, bad ones recorded or fatal."""
    columns: dict[str, list[str]] = {k: [] for k in keys}
    lines = data.split(b"\n")
    n_lines = len(lines) - 1 if data.endswith(b"\n") else len(lines)
    task = ParsedTask(columns, n_lines if data else 0, len(data))
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            reason = _check_record(obj, keys)
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8 (byte {e.start} of the line); re-encode the file as UTF-8"
        except json.JSONDecodeError as e:
            reason = f"malformed JSON: {e.msg} at column {e.colno}"
        row = None if reason is not None else {key: obj[key] for key in keys}
        if not task.take(i, reason, skip_bad, row):
            return task
    return task


def check_records(columns: dict[str, list], keys: list[str], skip_bad: bool) -> ParsedTask:
    """Validate a block of rows from a columnar source (parquet, arrow, Hub)."""
    n_rows = len(columns[keys[0]]) if keys else 0
    out: dict[str, list[str]] = {k: [] for k in keys}
    task = ParsedTask(out, n_rows, 0)
    for i in range(n_rows):
        reason = None
        for key in keys:
            reason = _text_problem(key, columns[key][i])
            if reason:
                break
        row = None if reason is not None else {key: columns[key][i] for key in keys}
        if not task.take(i, reason, skip_bad, row):
            return task
    task.n_bytes = sum(len(t.encode("utf-8")) for k in keys for t in out[k])
    return task


class CorpusReader:
    """Opens one input; checks it before any expensive work; yields preprocessing tasks."""

    def __init__(self, path: str, keys: list[str], chunk_bytes: int = 4 << 20, batch_size: int = 1000):
        self.path, self.keys = str(path), list(keys)
        self.chunk_bytes, self.batch_size = chunk_bytes, batch_size
        self.format = detect_format(self.path)
        self.unit = "line" if self.format in ("jsonl", "jsonl.gz") else "row"
        self._dataset = None

    # --- checks ------------------------------------------------------------------------------
    def total_bytes(self) -> int | None:
        """Size the progress bar can count towards, when the input has one."""
        return os.path.getsize(self.path) if self.format == "jsonl" else None

    def total_rows(self) -> int | None:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        if self.format == "arrow_dir":
            return len(self._open_dataset())
        return None

    def check(self) -> None:
        """Fail fast: empty input, or a first record without the requested keys."""
        if self.format in ("jsonl", "jsonl.gz"):
            first = self._first_jsonl_line()
            if first is None:
                raise InputError(f"{self.path}: input is empty (no non-blank lines)")
            line_no, raw = first
            task = parse_jsonl(raw, self.keys, skip_bad=False)
            if task.fatal and "is missing" in task.fatal[1]:
                raise InputError(f"{self.path}:{line_no}: {task.fatal[1]}; choose keys with --json-keys")
            return
        names = self._column_names()
        if self.format == "hub" and not names:
            return  # streaming datasets may not know their columns before the first row
        missing = [k for k in self.keys if k not in names]
        if missing:
            raise InputError(f"{self.path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}); choose keys with --json-keys")
        if self.total_rows() == 0:
            raise InputError(f"{self.path}: input is empty (0 rows)")

    def _first_jsonl_line(self) -> tuple[int, bytes] | None:
        opener = gzip.open if self.format == "jsonl.gz" else open
        try:
            with opener(self.path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if raw.strip():
                        return line_no, raw
        except (OSError, EOFError) as e:  # gzip raises these on truncated or non-gzip data
            raise InputError(f"{self.path}: cannot read ({e})") from None
        return None

    def _column_names(self) -> list[str]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(self.path).schema_arrow.names)
        if self.format == "arrow_dir":
            return list(self._open_dataset().column_names)
        return list(self._open_dataset().column_names or [])  # hub streaming may not know columns

    def _open_dataset(self):
        if self._dataset is not None:
            return self._dataset
        import datasets  # deferred: ~1 s import, only for these formats

        if self.format == "arrow_dir":
            ds = datasets.load_from_disk(self.path)
        else:
            from megatron_bloom.data.tokenizer import hub_is_reachable

            if not hub_is_reachable():
                raise InputError(f"{self.path}: not a local file and the Hugging Face Hub is unreachable (offline); download the dataset and pass the file")
            ds = datasets.load_dataset(self.path, split="train", streaming=True)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise InputError(f"{self.path}: holds splits {', '.join(ds)} but no 'train'; pass the split's folder")
            ds = ds["train"]
        self._dataset = ds
        return ds

    # --- tasks -------------------------------------------------------------------------------
    def tasks(self) -> Iterator[tuple]:
        if self.format == "jsonl":
            for start, end in jsonl_ranges(self.path, self.chunk_bytes):
                yield ("range", self.path, start, end)
        elif self.format == "jsonl.gz":
            for block in gzip_line_blocks(self.path, self.chunk_bytes):
                yield ("lines", block)
        elif self.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path)
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=self.keys):
                yield ("records", {k: batch.column(k).to_pylist() for k in self.keys})
        else:
            ds = self._open_dataset()
            for batch in ds.iter(batch_size=self.batch_size):
                yield ("records", {k: batch[k] for k in self.keys})


def iter_texts(path: str, key: str = "text", limit_bytes: int | None = None) -> Iterator[str]:
    """Texts of one key, in order, skipping bad lines; for tokenizer training (no workers)."""
    reader = CorpusReader(path, [key])
    reader.check()
    seen = 0
    for task in reader.tasks():
        kind = task[0]
        if kind == "range":
            parsed = parse_jsonl(read_range(*task[1:]), [key], skip_bad=True)
        elif kind == "lines":
            parsed = parse_jsonl(task[1], [key], skip_bad=True)
        else:
            parsed = check_records(task[1], [key], skip_bad=True)
        for text in parsed.columns[key]:
            yield text
            seen += len(text)
            if limit_bytes is not None and seen >= limit_bytes:
                return
