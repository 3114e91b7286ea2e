"""Zero-shot multiple choice: choice log-likelihoods and accuracies equal a transformers reference."""
import json

import pytest
import torch

from eval_helpers import hf_token_logprobs, run_launch, write_jsonl
from megatron_bloom.evaluation.data import read_choice_examples
from megatron_bloom.evaluation.loading import load_for_eval
from megatron_bloom.evaluation.multiple_choice import accuracy, score_choices

BOS = 1
ROWS = [
    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0,
     "task": "capitals", "language": "en"},
    {"context": "La capitale de la France est ", "choices": ["Paris", "Rome", "Madrid"], "label": 0,
     "task": "capitals", "language": "fr"},
    {"context": "One two three", "choices": [" four", " five", " fox"], "label": 0, "task": "count",
     "language": "en"},
    {"context": "", "choices": ["Tensor parallelism", "Pipeline"], "label": 1, "task": "count"},
    {"context": "大型语言模型可以", "choices": ["生成文本。", "学习"], "label": 0, "language": "zh"},
    {"context": "Once upon a time there was a tiny model that learned to", "choices": [" count", " sing in the evening"],
     "label": 1},
    {"context": "Él habló con la niña en", "choices": [" español", " inglés", " la mañana"], "label": 0,
     "task": "count", "language": "es"},
]
# See test_eval_perplexity.py: float32 rounding differences between the two implementations.
LL_RTOL, LL_ATOL = 1e-5, 1e-4


def _reference(model, tok, rows, max_length):
    """log p(choice | context) per choice, written from lm-eval's description of its convention:
    trailing context whitespace joins the choice, the pair is encoded whole and split after the
    context's tokens, an empty context is BOS, too long inputs lose tokens on the left."""
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    out, truncated = [], False
    for row in rows:
        lls, ntoks = [], []
        for choice in row["choices"]:
            context = row["context"]
            if not context.strip():
                ctx, cont = [BOS], ids(context + choice)
            else:
                stripped = context.rstrip()
                ctx = ids(stripped)
                cont = ids(stripped + context[len(stripped):] + choice)[len(ctx):]
            truncated |= len(ctx) + len(cont) > max_length + 1
            full = [*ctx, *cont][-(max_length + 1):]
            lls.append(float(hf_token_logprobs(model, full)[-len(cont):].sum()))
            ntoks.append(len(cont))
        out.append((lls, ntoks))
    return out, truncated


def _first_argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _reference_accuracy(rows, ref):
    preds = {"acc": [], "acc_norm": [], "acc_per_token": []}
    for row, (lls, ntoks) in zip(rows, ref):
        preds["acc"].append(_first_argmax(lls))
        preds["acc_norm"].append(_first_argmax([ll / len(c) for ll, c in zip(lls, row["choices"])]))
        preds["acc_per_token"].append(_first_argmax([ll / n for ll, n in zip(lls, ntoks)]))

    def summary(idx):
        out = {"examples": len(idx)}
        for metric, p in preds.items():
            out[metric] = sum(p[i] == rows[i]["label"] for i in idx) / len(idx)
        return out

    groups = lambda key: sorted({r[key] for r in rows if key in r})  # noqa: E731
    return {"overall": summary(range(len(rows))),
            "per_task": {t: summary([i for i, r in enumerate(rows) if r.get("task") == t]) for t in groups("task")},
            "per_language": {g: summary([i for i, r in enumerate(rows) if r.get("language") == g])
                             for g in groups("language")}}


@pytest.mark.parametrize("max_length", [2048, 16])  # 16 cuts the longer contexts from the left
def test_choice_loglikelihoods_and_accuracy_equal_transformers(tiny, tmp_path, max_length):
    data = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    examples = read_choice_examples(str(data))
    em = load_for_eval(str(tiny["hf"]))
    scores = score_choices(em, examples, max_length, batch_size=4)
    ref, truncated = _reference(tiny["model"], tiny["tokenizer"], ROWS, max_length)
    assert truncated == (max_length == 16)
    for sc, (lls, ntoks) in zip(scores, ref):
        torch.testing.assert_close(torch.tensor(sc.logprobs, dtype=torch.float64),
                                   torch.tensor(lls, dtype=torch.float64), rtol=LL_RTOL, atol=LL_ATOL)
        assert sc.tokens == ntoks
        # The accuracies below compare argmaxes: make sure no two choices are within the tolerance.
        ordered = sorted(lls)
        assert all(b - a > 1e-3 for a, b in zip(ordered, ordered[1:]))
    want = _reference_accuracy(ROWS, ref)
    assert accuracy(examples, scores) == want

    proc = run_launch("evaluate.py", "--load", tiny["native"], "--data", data, "--task", "mc", "--max-length",
                      max_length, "--batch-size", 3, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"multiple choice: {len(ROWS)} examples; max_length {max_length}"
    assert [line.split()[0] for line in lines[2:-1]] == ["all", "task/capitals", "task/count", "en", "es", "fr", "zh"]
    record = json.loads(lines[-1])
    assert {k: record[k] for k in want} == want
