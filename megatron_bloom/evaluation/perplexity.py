"""Token perplexity and byte perplexity of documents, overall and per language.

Each document is scored on its own: its tokens (``add_special_tokens=False``) are conditioned on
one prefix token, BOS by default (EOS/EOD with ``prefix="eos"``; a tokenizer without BOS falls back
to EOS, as lm-eval does), which is context only and never scored. Nothing is appended: the EOD
after a document is not scored. So every token of the text is scored exactly once, and the bytes
of the text are exactly what the scored tokens spell. Long documents are scored with
``sliding_windows`` (``max_length`` tokens per forward pass, a new window every ``stride`` tokens).

Metrics, from the summed negative log-likelihood ``nll`` (natural log) of a set of documents:

* ``token_nll = nll / tokens`` and ``ppl = exp(token_nll)``;
* ``byte_ppl = exp(nll / bytes)`` with bytes = UTF-8 bytes of the texts (how the BLOOM model card
  reports flores), ``bits_per_byte = nll / bytes / ln 2``. These do not depend on the tokenizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_bloom.errors import UserError
from megatron_bloom.evaluation.data import Document
from megatron_bloom.evaluation.loading import EvalModel
from megatron_bloom.evaluation.scoring import score_requests, sliding_windows

PPL_METRICS = ("ppl", "byte_ppl", "bits_per_byte", "token_nll")
"""Metrics ``--metric`` can pick for perplexity."""

DOCS_PER_CHUNK = 256
"""Documents windowed and scored together (bounds memory on large files; batches form inside)."""


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


@dataclass
class Totals:
    """Running sums over the documents scored; ``metrics`` turns them into perplexities."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes of the text scored, for byte perplexity
    nll: float = 0.0  # nats, summed over tokens

    def add(self, tokens: int, n_bytes: int, nll: float) -> None:
        self.documents += 1
        self.tokens += tokens
        self.bytes += n_bytes
        self.nll += nll

    def metrics(self) -> Dict[str, float]:
        out: Dict[str, float] = {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                                 "nll": self.nll}
        if self.tokens:
            out["token_nll"] = self.nll / self.tokens
            out["ppl"] = _exp(out["token_nll"])
        if self.bytes:
            out["byte_ppl"] = _exp(self.nll / self.bytes)
            out["bits_per_byte"] = self.nll / self.bytes / math.log(2)
        return out


@dataclass
class PerplexityResult:
    overall: Totals
    per_language: Dict[str, Totals]
    document_nll: List[float] = field(default_factory=list)
    """Summed NLL of each document, in input order."""
    document_tokens: List[int] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        return {"overall": self.overall.metrics(),
                "per_language": {k: v.metrics() for k, v in sorted(self.per_language.items())}}


def evaluate_perplexity(
    em: EvalModel,
    docs: Sequence[Document],
    max_length: int,
    stride: Optional[int] = None,
    batch_size: int = 1,
    prefix: str = "bos",
) -> PerplexityResult:
    """Score ``docs`` (see the module docstring); ``stride`` defaults to ``max_length``."""
    stride = max_length if stride is None else stride
    if max_length < 1:
        raise UserError(f"--max-length must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise UserError(f"--stride must be in [1, --max-length={max_length}], got {stride}")
    prefix_id = em.prefix_id(prefix)
    result = PerplexityResult(Totals(), {})
    for start in range(0, len(docs), DOCS_PER_CHUNK):
        chunk = docs[start : start + DOCS_PER_CHUNK]
        ids = em.tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]
        requests, owner = [], []
        for i, tokens in enumerate(ids):
            windows = sliding_windows(tokens, prefix_id, max_length, stride)
            requests.extend(windows)
            owner.extend([i] * len(windows))
        scores = score_requests(em.model, requests, max_length, batch_size)
        nll = [0.0] * len(chunk)
        for i, (logprob, _) in zip(owner, scores):
            nll[i] -= logprob
        for doc, tokens, doc_nll in zip(chunk, ids, nll):
            n_bytes = len(doc.text.encode("utf-8"))
            result.overall.add(len(tokens), n_bytes, doc_nll)
            if doc.language is not None:
                result.per_language.setdefault(doc.language, Totals()).add(len(tokens), n_bytes, doc_nll)
            result.document_nll.append(doc_nll)
            result.document_tokens.append(len(tokens))
    if result.overall.tokens == 0:
        raise UserError("no tokens to score: every document is empty")
    return result
