"""Zero-shot multiple choice: rank each row's choices by log-likelihood given its context.

The prompt template is the data's: a choice is appended to the context as is (put the separating
space at the end of the context or the start of each choice; trailing whitespace of the context
moves to the choice, as in lm-evaluation-harness). The score of a choice is
``log p(choice | context)`` summed over its tokens (``scoring.encode_pair``; an empty context is
conditioned on BOS). Three predictions, each the first index with the highest value:

* ``acc``: the raw log-likelihood;
* ``acc_norm``: log-likelihood per character of the choice string (lm-eval's ``acc_norm``; it does
  not depend on the tokenizer);
* ``acc_per_token``: log-likelihood per token of the choice.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence

from megatron_bloom.errors import UserError
from megatron_bloom.evaluation.data import ChoiceExample
from megatron_bloom.evaluation.loading import EvalModel
from megatron_bloom.evaluation.scoring import encode_pair, score_requests

MC_METRICS = ("acc", "acc_norm", "acc_per_token")
"""Metrics ``--metric`` can pick for multiple choice."""


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima


@dataclass
class ChoiceScores:
    logprobs: List[float]
    tokens: List[int]
    """Continuation tokens scored per choice."""
    chars: List[int]
    """Characters per choice string."""
    label: int

    def prediction(self, metric: str) -> int:
        if metric == "acc":
            return _argmax(self.logprobs)
        if metric == "acc_norm":
            return _argmax([lp / n for lp, n in zip(self.logprobs, self.chars)])
        if metric == "acc_per_token":
            return _argmax([lp / n for lp, n in zip(self.logprobs, self.tokens)])
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(MC_METRICS)}")


def score_choices(
    em: EvalModel, examples: Sequence[ChoiceExample], max_length: int, batch_size: int = 1, prefix: str = "bos"
) -> List[ChoiceScores]:
    """Log-likelihood of every choice of every example."""
    prefix_id = em.prefix_id(prefix)

    def encode(text: str) -> List[int]:
        return em.tokenizer(text, add_special_tokens=False)["input_ids"]

    requests = []
    for ex in examples:
        for choice in ex.choices:
            ctx, cont = encode_pair(encode, ex.context, choice, prefix_id)
            if len(cont) > max_length:
                raise UserError(f"line {ex.line}: a choice of {len(cont)} tokens does not fit --max-length {max_length}")
            requests.append((ctx, cont))
    scores = score_requests(em.model, requests, max_length, batch_size)
    out, i = [], 0
    for ex in examples:
        n = len(ex.choices)
        out.append(ChoiceScores([s for s, _ in scores[i : i + n]], [len(r[1]) for r in requests[i : i + n]],
                                [len(c) for c in ex.choices], ex.label))
        i += n
    return out


def accuracy(examples: Sequence[ChoiceExample], scores: Sequence[ChoiceScores]) -> Dict[str, Dict]:
    """``{"overall": {...}, "per_task": {task: {...}}, "per_language": {lang: {...}}}`` where each
    ``{...}`` is ``{"examples": n, "acc": ..., "acc_norm": ..., "acc_per_token": ...}``."""
    groups: Dict[str, Dict[str, List[ChoiceScores]]] = {"overall": defaultdict(list), "per_task": defaultdict(list),
                                                        "per_language": defaultdict(list)}
    for ex, sc in zip(examples, scores):
        groups["overall"]["all"].append(sc)
        if ex.task is not None:
            groups["per_task"][ex.task].append(sc)
        if ex.language is not None:
            groups["per_language"][ex.language].append(sc)

    def summary(items: List[ChoiceScores]) -> Dict[str, float]:
        row: Dict[str, float] = {"examples": len(items)}
        for metric in MC_METRICS:
            row[metric] = sum(sc.prediction(metric) == sc.label for sc in items) / len(items)
        return row

    return {"overall": summary(groups["overall"]["all"]),
            "per_task": {k: summary(v) for k, v in sorted(groups["per_task"].items())},
            "per_language": {k: summary(v) for k, v in sorted(groups["per_language"].items())}}
