"""One way to load the tokenizer named by `--tokenizer-name-or-path`, for every tool and trainer.

`load_tokenizer` accepts
  * a local folder holding `tokenizer.json` (what `data_tools/train_tokenizer.py` writes, or a
    downloaded bigscience/bloom tokenizer), or a bare `tokenizer.json` file;
  * a local folder with only a slow tokenizer (vocab.json + merges.txt), converted by transformers;
  * a Hugging Face Hub name such as `bigscience/bloom`, from the local cache or, when online, the Hub.

Folders with a `tokenizer.json` are read with the `tokenizers` library alone: importing transformers
costs ~2.5 s (it pulls in torch) in every preprocessing worker, and the Rust tokenizer is what does
the work anyway. A name that is neither a local path nor reachable on the Hub fails at once with
`TokenizerLoadError` instead of waiting on network retries.

The same loader serves generation and evaluation: `Tokenizer` also answers the part of
transformers' tokenizer interface they use (`tok(texts)["input_ids"]`, `encode`, `decode`,
`bos_token_id`/`eos_token_id`/`pad_token_id`, `model_max_length`, `len`).
"""
from __future__ import annotations

import json
import os
import re
import socket
from urllib.parse import urlparse

import numpy as np
import tokenizers

from megatron_bloom.errors import UserError

# Hub repo ids: "name" or "org/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# BLOOM's special tokens, in its id order; used when a folder's config does not name them.
DEFAULT_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


class TokenizerLoadError(UserError, ValueError):
    """The tokenizer could not be found or read; the message names the path and the fix."""


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub endpoint accepts a TCP connection within `timeout` seconds.

    Checked before any Hub call because huggingface_hub retries for a long time on machines with
    no route out, and a training job should fail in seconds, not minutes.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".json", ".txt", ".model"))


class Tokenizer:
    """A Rust `tokenizers.Tokenizer` plus the special-token ids the data pipeline needs.

    ids never include special tokens added by a post-processor: the pipeline decides where EOD goes.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str], name_or_path: str,
                 model_max_length: int | None = None):
        self.backend = backend
        self.name_or_path = name_or_path
        self.model_max_length = model_max_length
        """tokenizer_config.json's `model_max_length` (None when not set)."""
        self.special_tokens = dict(special_tokens)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._token_id("eos_token")
        self.bos_id = self._token_id("bos_token")
        self.unk_id = self._token_id("unk_token")
        # No pad token is common in GPT-style vocabularies; padding with EOD is the usual stand-in.
        pad_id = self._token_id("pad_token")
        self.pad_id = pad_id if pad_id is not None else self.eod_id

    def _token_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    # transformers' names of the special ids. pad_token_id is the configured pad token only (None
    # without one), so callers choose their own fallback; pad_id above falls back to EOD.
    @property
    def bos_token_id(self) -> int | None:
        return self.bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self.eod_id

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        """`{"input_ids": ids}` for one text or a list, as a transformers tokenizer returns it."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        encoded = self.backend.encode_batch_fast(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets, which the pipeline never uses.
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_batch_numpy(self, texts: list[str], dtype=np.int32, append_eod: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize `texts` and return (all ids concatenated, ids per text) as numpy arrays.

        Each text's id list becomes an array in C (np.array on a list of ints); the only Python
        loop is per document, never per token.
        """
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if append_eod:
            if self.eod_id is None:
                raise TokenizerLoadError(f"{self.name_or_path}: no eos token, so --append-eod has nothing to append")
            for doc in ids:
                doc.append(self.eod_id)
            lengths += 1
        flat = np.concatenate([np.asarray(d, dtype=dtype) for d in ids]) if ids else np.empty(0, dtype)
        return flat, lengths

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of one id or a sequence of ids."""
        ids = [ids] if isinstance(ids, int) else ids
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        """Serialized tokenizer, to rebuild it in worker processes without touching disk or network."""
        return self.backend.to_str()

    @classmethod
    def from_str(cls, serialized: str, special_tokens: dict[str, str], name_or_path: str,
                 model_max_length: int | None = None) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(serialized), special_tokens, name_or_path, model_max_length)


def _one_line(e: Exception) -> str:
    # Library errors often span lines; the CLI contract is one `error: ...` line.
    return " ".join(f"{type(e).__name__}: {e}".split())


def _token_content(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_configs(folder: str) -> tuple[dict[str, str], int | None]:
    """(special tokens, model_max_length) named by the folder's tokenizer configs."""
    found: dict[str, str] = {}
    max_length = None
    for name in reversed(_CONFIG_FILES):  # tokenizer_config.json wins over special_tokens_map.json
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerLoadError(f"{path}: cannot read ({_one_line(e)}); fix or delete the file") from None
        for role in DEFAULT_SPECIAL_TOKENS:
            token = _token_content(config.get(role))
            if token is not None:
                found[role] = token
        if isinstance(config.get("model_max_length"), int):
            max_length = config["model_max_length"]
    return found, max_length


def _special_tokens_for(backend: tokenizers.Tokenizer, configured: dict[str, str]) -> dict[str, str]:
    """Configured special tokens, else BLOOM's names when the vocabulary has them."""
    special = dict(configured)
    for role, token in DEFAULT_SPECIAL_TOKENS.items():
        if role not in special and backend.token_to_id(token) is not None:
            special[role] = token
    if "eos_token" not in special and backend.token_to_id("<|endoftext|>") is not None:
        special["eos_token"] = "<|endoftext|>"  # GPT-2 style vocabularies
    return special


def _from_tokenizer_json(json_path: str, folder: str | None, name_or_path: str) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(json_path)
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise TokenizerLoadError(f"{json_path}: not a valid tokenizer.json ({_one_line(e)}); re-create it with data_tools/train_tokenizer.py") from None
    configured, max_length = _read_configs(folder) if folder else ({}, None)
    return Tokenizer(backend, _special_tokens_for(backend, configured), name_or_path, max_length)


def _from_transformers(name_or_path: str, **kwargs) -> Tokenizer:
    # Slow-only folders and Hub repos without tokenizer.json: let transformers convert to fast.
    from transformers import AutoTokenizer  # deferred: ~2.5 s import, only needed here

    try:
        hf = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception as e:
        raise TokenizerLoadError(f"{name_or_path}: transformers could not load a tokenizer ({_one_line(e)})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerLoadError(f"{name_or_path}: only a slow (Python) tokenizer is available; save a fast one with tokenizer.json")
    configured = {role: tok for role in DEFAULT_SPECIAL_TOKENS if isinstance(tok := getattr(hf, role, None), str)}
    max_length = getattr(hf, "model_max_length", None)
    return Tokenizer(backend, _special_tokens_for(backend, configured), name_or_path,
                     max_length if isinstance(max_length, int) else None)


def _from_hub(name: str) -> Tokenizer:
    from huggingface_hub import hf_hub_download

    def fetch(filename: str, local_only: bool) -> str | None:
        try:
            return hf_hub_download(name, filename, local_files_only=local_only)
        except Exception:  # missing file, missing repo, or not cached
            return None

    # The local cache first: a machine that downloaded the tokenizer once works offline after.
    local_only = True
    json_path = fetch("tokenizer.json", True)
    if json_path is None:
        if not hub_is_reachable():
            raise TokenizerLoadError(
                f"tokenizer '{name}' is not a local folder and the Hugging Face Hub is unreachable (offline); "
                f"pass a folder containing tokenizer.json (e.g. from data_tools/train_tokenizer.py, or '{name}' "
                f"downloaded on a machine with network access)"
            )
        local_only = False
        json_path = fetch("tokenizer.json", False)
        if json_path is None:
            return _from_transformers(name)
    for config_name in _CONFIG_FILES:
        fetch(config_name, local_only)  # lands next to tokenizer.json in the snapshot folder
    return _from_tokenizer_json(json_path, os.path.dirname(json_path), name)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """Load the tokenizer from a local folder, a tokenizer.json file, or a Hub name (see module doc)."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        json_path = os.path.join(path, "tokenizer.json")
        if os.path.isfile(json_path):
            return _from_tokenizer_json(json_path, path, name_or_path)
        if any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "tokenizer_config.json", "tokenizer.model")):
            return _from_transformers(path)
        raise TokenizerLoadError(
            f"{path}: folder has no tokenizer.json; pass the folder written by data_tools/train_tokenizer.py "
            f"or a downloaded Hugging Face tokenizer folder"
        )
    if os.path.isfile(path):
        if path.endswith(".json"):
            return _from_tokenizer_json(path, os.path.dirname(path), name_or_path)
        raise TokenizerLoadError(f"{path}: is a file, not a tokenizer folder; pass the folder that contains tokenizer.json")
    if looks_like_hub_id(str(name_or_path)):
        return _from_hub(str(name_or_path))
    raise TokenizerLoadError(
        f"tokenizer not found: {path}: no such folder; pass a folder containing tokenizer.json "
        f"(create one with data_tools/train_tokenizer.py) or a Hugging Face Hub name such as bigscience/bloom"
    )
