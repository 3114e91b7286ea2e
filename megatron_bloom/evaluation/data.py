"""Evaluation data from jsonl (or jsonl.gz): documents for perplexity, rows for multiple choice.

Every problem is a ``UserError`` naming ``file:line`` and what to change, so the CLI prints one line.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from megatron_bloom.errors import UserError


@dataclass
class Document:
    text: str
    language: Optional[str]
    line: int


@dataclass
class ChoiceExample:
    context: str
    choices: List[str]
    label: int
    task: Optional[str]
    language: Optional[str]
    line: int


def read_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; raises on a missing/empty file or bad line."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path} does not exist or is not a file")
    opener = gzip.open if path.endswith(".gz") else open
    seen = False
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    reason = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg  # "Invalid control character at"
                    raise UserError(f"{path}:{number}: not valid JSON ({reason} at column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: a line must hold a JSON object, got {type(row).__name__}")
                seen = True
                yield number, row
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not seen:
        raise UserError(f"{path} holds no rows (empty file)")


def _key(path: str, number: int, row: Dict[str, Any], key: str, flag: str) -> Any:
    if key not in row:
        keys = ", ".join(sorted(row)) or "none"
        raise UserError(f"{path}:{number}: no '{key}' key (keys: {keys}); name the right one with {flag}")
    return row[key]


def _optional_str(path: str, number: int, row: Dict[str, Any], key: Optional[str]) -> Optional[str]:
    if not key or row.get(key) is None:
        return None
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{path}:{number}: '{key}' must be a string, got {type(value).__name__}")
    return value


def read_documents(path: str, text_key: str = "text", language_key: Optional[str] = "language") -> List[Document]:
    """Documents for perplexity; ``language_key`` is optional per row (no value: overall only)."""
    docs = []
    for number, row in read_rows(path):
        text = _key(path, number, row, text_key, "--text-key")
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: '{text_key}' must be a string, got {type(text).__name__}")
        docs.append(Document(text, _optional_str(path, number, row, language_key), number))
    return docs


def read_choice_examples(
    path: str,
    context_key: str = "context",
    choices_key: str = "choices",
    label_key: str = "label",
    task_key: Optional[str] = "task",
    language_key: Optional[str] = "language",
) -> List[ChoiceExample]:
    """Multiple-choice rows: a context string, at least two non-empty choice strings, a label index."""
    examples = []
    for number, row in read_rows(path):
        where = f"{path}:{number}"
        context = _key(path, number, row, context_key, "--context-key")
        if not isinstance(context, str):
            raise UserError(f"{where}: '{context_key}' must be a string, got {type(context).__name__}")
        choices = _key(path, number, row, choices_key, "--choices-key")
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError(f"{where}: '{choices_key}' must be a list of at least 2 strings")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice:
                raise UserError(f"{where}: {choices_key}[{i}] must be a non-empty string, got {choice!r}")
        label = _key(path, number, row, label_key, "--label-key")
        if isinstance(label, bool) or not isinstance(label, int):
            raise UserError(f"{where}: '{label_key}' must be an integer index into '{choices_key}', got {label!r}")
        if not 0 <= label < len(choices):
            raise UserError(f"{where}: '{label_key}' is {label} but there are {len(choices)} choices "
                            f"(valid: 0..{len(choices) - 1})")
        examples.append(ChoiceExample(context, list(choices), label, _optional_str(path, number, row, task_key),
                                      _optional_str(path, number, row, language_key), number))
    return examples
