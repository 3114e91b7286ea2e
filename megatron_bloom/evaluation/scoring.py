"""Log-likelihoods of token continuations: the one scorer behind ``evaluate.py`` and the lm-eval model.

A *request* is ``(context_ids, continuation_ids)``; its score is ``sum_t log p(cont[t] | ctx,
cont[:t])`` and whether every continuation token is the argmax. Perplexity windows, multiple-choice
options and lm-eval's requests all become requests, so one batched loop computes them all.

The conventions are lm-evaluation-harness's (``--model hf``), so per-request numbers agree with it:

* the model reads ``(ctx + cont)[-(max_length + 1):][:-1]``: one forward pass, at most
  ``max_length`` tokens, the context cut from the left when too long;
* requests are sorted longest first (ties by token ids) and batched RIGHT-padded without an
  attention mask: attention is causal, so padding after a row's last token never reaches it;
* log-softmax in float32 over the real vocabulary rows (the TP padding rows are dropped first).

Batches are made on the model's device (``generation.model_device``), and each batch's scores come
back to the host in one copy.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_bloom.generation import model_device

Request = Tuple[Sequence[int], Sequence[int]]
"""``(context_ids, continuation_ids)``; both non-empty."""


def sliding_windows(tokens: Sequence[int], prefix_id: int, max_length: int, stride: int) -> List[Request]:
    """Requests that score every token of a document exactly once, for perplexity.

    The sequence is ``[prefix_id] + tokens``; the prefix (BOS or EOD) is only context, so the first
    real token is scored too. Window ``k`` feeds the model ``max_length`` tokens ending at
    ``end_k = min(k * stride + max_length, n)`` (n = number of tokens) and scores the positions it
    predicts that no earlier window scored. The last window is pulled back so that it is full
    length, so every token gets as much context as the window allows: the token at position ``p``
    (the prefix is position 0) reads at least ``min(p, max_length - stride + 1)`` tokens.

    Worked example, tokens ``t1..t9``, prefix B, max_length 4::

        stride 4 (disjoint; equals lm-eval's loglikelihood_rolling windows)
            reads B  t1 t2 t3   scores t1 t2 t3 t4
            reads t4 t5 t6 t7   scores t5 t6 t7 t8
            reads t5 t6 t7 t8   scores t9            (last window pulled back to full length)
        stride 2
            reads B  t1 t2 t3   scores t1 t2 t3 t4
            reads t2 t3 t4 t5   scores t5 t6
            reads t4 t5 t6 t7   scores t7 t8
            reads t5 t6 t7 t8   scores t9

    Stride 1 scores every token from exactly ``min(position, max_length)`` tokens of context.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    seq = [prefix_id, *tokens]
    last = len(seq) - 1  # position of the last token to score
    requests: List[Request] = []
    scored = 0  # every position <= scored is done (position 0 is the prefix)
    k = 0
    while scored < last:
        end = min(k * stride + max_length, last)
        begin = max(0, end - max_length)
        # The model reads seq[begin:end] and predicts positions begin+1..end; keep the new ones.
        requests.append((seq[begin : scored + 1], seq[scored + 1 : end + 1]))
        scored = end
        k += 1
    return requests


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> List[int]:
    """What the model reads for a request: the last ``max_length`` tokens before the final one."""
    return [*context, *continuation][-(max_length + 1) : -1]


@torch.no_grad()
def score_requests(
    model: torch.nn.Module,
    requests: Sequence[Request],
    max_length: int,
    batch_size: int = 1,
    progress: Optional[Callable[[int], None]] = None,
) -> List[Tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each request, in the order given, on the model's device.

    ``model`` is our ``BloomForCausalLM`` (logits ``[b, s, padded_vocab]``). ``progress`` is called
    with the number of requests finished after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab_size = model.config.vocab_size
    device = model_device(model)
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")

    def sort_key(i: int):
        full = [*requests[i][0], *requests[i][1]]
        return -len(full), tuple(full)

    order = sorted(range(len(requests)), key=sort_key)
    results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = [model_input(requests[i][0], requests[i][1], max_length) for i in chunk]
        width = max(len(x) for x in inputs)
        batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in inputs], dtype=torch.long,
                             device=device)  # [b, s], right-padded with id 0
        logits = model(batch)[..., :vocab_size]  # [b, s, vocab]
        logp = F.log_softmax(logits.float(), dim=-1)  # [b, s, vocab]
        sums, greedy = [], []
        for row, i in enumerate(chunk):
            cont = torch.tensor(list(requests[i][1]), dtype=torch.long, device=device)  # [c]
            n_in = len(inputs[row])
            scored = logp[row, n_in - len(cont) : n_in]  # [c, vocab]: the positions predicting cont
            sums.append(scored.gather(-1, cont[:, None]).sum())
            greedy.append((scored.argmax(-1) == cont).all())
        for i, logprob, is_greedy in zip(chunk, torch.stack(sums).tolist(), torch.stack(greedy).tolist()):
            results[i] = (logprob, is_greedy)
        if progress is not None:
            progress(len(chunk))
    return results  # type: ignore[return-value]


def split_trailing_space(context: str, continuation: str) -> Tuple[str, str]:
    """Move the context's trailing whitespace to the continuation (lm-eval's convention: word
    boundaries belong to the continuation, so ``"is " + "Paris"`` scores ``" Paris"``)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_pair(
    encode: Callable[[str], List[int]], context: str, continuation: str, prefix_id: int
) -> Tuple[List[int], List[int]]:
    """Token ids of ``(context, continuation)`` as lm-evaluation-harness makes them.

    An empty context becomes the prefix token (BOS). Otherwise the context's trailing whitespace
    moves to the continuation, ``context + continuation`` is encoded whole (so tokens may merge
    across the boundary as they do in running text), and the continuation is what follows the
    context's own encoding.
    """
    if context.strip() == "":
        # (lm-eval would fail on a whitespace-only context; it is conditioned on the prefix here)
        cont = encode(context + continuation)
        if cont and cont[0] == prefix_id:  # the text already starts with the prefix token
            return cont[:1], cont[1:]
        return [prefix_id], cont
    context, continuation = split_trailing_space(context, continuation)
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]
