"""Token NLL and byte perplexity equal a direct transformers computation; native TP=2 = its source folder."""
import json
import math

import pytest
import torch

from eval_helpers import CHECKPOINT_ITERATION, SENTENCES, hf_token_logprobs, run_launch, write_jsonl
from megatron_bloom.evaluation.data import Document
from megatron_bloom.evaluation.loading import load_for_eval
from megatron_bloom.evaluation.perplexity import evaluate_perplexity
from megatron_bloom.evaluation.scoring import sliding_windows

LANGS = ["en", "en", "en", "fr", "es", "zh", "ar", "en"]
BOS = 1
# Our model (sdpa attention, torch's tanh GeLU) vs transformers' BLOOM (baddbmm, BLOOM's explicit
# tanh formula) differ by float32 rounding only: up to ~1e-5 per token log-prob, observed ~1e-5 on
# document sums of a few hundred nats. A wrong window, a missing BOS or a token scored twice moves a
# document's NLL by at least one token's log-prob, i.e. by nats.
NLL_RTOL, NLL_ATOL = 1e-5, 1e-4


def _docs():
    docs = [Document(s, lang, i + 1) for i, (s, lang) in enumerate(zip(SENTENCES, LANGS))]
    long_text = " ".join(SENTENCES[:4] * 2)  # ~100 tokens: several windows at max_length 16
    docs.append(Document(long_text, "en", 9))
    docs.append(Document("", None, 10))  # empty: a document with nothing to score, no language
    return docs


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _reference_whole(model, tok, docs):
    """One transformers forward over [BOS] + tokens per document."""
    return [0.0 if not d.text else -float(hf_token_logprobs(model, [BOS, *_ids(tok, d.text)]).sum()) for d in docs]


def _reference_full_window(model, tok, docs, max_length):
    """Stride 1: token p is predicted from exactly the max_length tokens before it (or all of them)."""
    out = []
    for d in docs:
        seq = [BOS, *_ids(tok, d.text)]
        nll = 0.0
        for p in range(1, len(seq)):
            ctx = seq[max(0, p - max_length) : p]
            nll -= float(hf_token_logprobs(model, [*ctx, seq[p]])[-1])
        out.append(nll)
    return out


def _reference_windows(model, tok, docs, max_length, stride):
    """Each of our window requests run alone through transformers (checks batching and slicing)."""
    out = []
    for d in docs:
        nll = 0.0
        for ctx, cont in sliding_windows(_ids(tok, d.text), BOS, max_length, stride):
            full = [*ctx, *cont][-(max_length + 1):]
            nll -= float(hf_token_logprobs(model, full)[-len(cont):].sum())
        out.append(nll)
    return out


@pytest.mark.parametrize("max_length, stride, reference", [
    (256, 256, "whole"),   # every document fits one window
    (16, 1, "full"),       # every token reads a full window of context
    (16, 6, "windows"),    # overlapping windows, the last pulled back
    (16, 16, "windows"),   # disjoint windows (lm-eval's rolling layout)
])
def test_nll_and_byte_perplexity_equal_transformers(tiny, max_length, stride, reference):
    docs = _docs()
    if reference == "full":
        # brute force is one forward per token: keep it short, but longer than one window
        docs = [docs[5], Document(" ".join(SENTENCES[:2]), "en", 1)]
    em = load_for_eval(str(tiny["hf"]))
    result = evaluate_perplexity(em, docs, max_length, stride, batch_size=3)
    model, tok = tiny["model"], tiny["tokenizer"]
    want = {"whole": lambda: _reference_whole(model, tok, docs),
            "full": lambda: _reference_full_window(model, tok, docs, max_length),
            "windows": lambda: _reference_windows(model, tok, docs, max_length, stride)}[reference]()
    torch.testing.assert_close(torch.tensor(result.document_nll, dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=NLL_RTOL, atol=NLL_ATOL)
    assert result.document_tokens == [len(_ids(tok, d.text)) for d in docs]

    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    n_tokens = sum(result.document_tokens)
    metrics = result.to_dict()["overall"]
    assert metrics["bytes"] == n_bytes and metrics["tokens"] == n_tokens and metrics["documents"] == len(docs)
    assert metrics["byte_ppl"] == pytest.approx(math.exp(sum(want) / n_bytes), rel=1e-5)
    assert metrics["token_nll"] == pytest.approx(sum(want) / n_tokens, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(sum(want) / n_tokens), rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(sum(want) / n_bytes / math.log(2), rel=1e-5)
    for lang, values in result.to_dict()["per_language"].items():
        idx = [i for i, d in enumerate(docs) if d.language == lang]
        lang_bytes = sum(len(docs[i].text.encode("utf-8")) for i in idx)
        assert values["byte_ppl"] == pytest.approx(math.exp(sum(want[i] for i in idx) / lang_bytes), rel=1e-5)


def test_cli_native_tp2_equals_transformers_folder_and_logs_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "docs.jsonl",
                       [{"text": d.text, **({"language": d.language} if d.language else {})} for d in _docs()])
    common = ["--data", data, "--max-length", 16, "--stride", 8, "--batch-size", 4,
              "--metric", "ppl,byte_ppl,bits_per_byte,token_nll", "--json"]
    runs = {}
    for name in ("hf", "native"):
        proc = run_launch("evaluate.py", "--load", tiny[name], *common, "--tensorboard-dir", tmp_path / f"tb_{name}")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert lines[0].startswith("perplexity: 10 documents")
        assert lines[1].split() == ["language", "documents", "tokens", "bytes", "ppl", "byte_ppl", "bits_per_byte",
                                    "token_nll"]
        assert [line.split()[0] for line in lines[2:-1]] == ["all", "ar", "en", "es", "fr", "zh"]
        runs[name] = json.loads(lines[-1])
    # The TP=2 shards merge back to exactly the folder's tensors and run through the same code, so
    # the numbers are identical, not just close.
    for key in ("overall", "per_language"):
        assert runs["native"][key] == runs["hf"][key]
    assert runs["hf"]["stride"] == 8 and runs["hf"]["max_length"] == 16 and runs["hf"]["prefix_token_id"] == BOS

    em = load_for_eval(str(tiny["hf"]))
    api = evaluate_perplexity(em, _docs(), 16, 8, batch_size=4).to_dict()
    assert runs["hf"]["overall"]["byte_ppl"] == pytest.approx(api["overall"]["byte_ppl"], rel=1e-6)

    # TensorBoard: eval/<metric>/<language>, at the checkpoint's iteration (0 for a transformers folder).
    for name, step in (("native", CHECKPOINT_ITERATION), ("hf", 0)):
        acc = EventAccumulator(str(tmp_path / f"tb_{name}"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"eval/ppl/all", "eval/byte_ppl/all", "eval/byte_ppl/zh", "eval/token_nll/en"} <= tags
        (event,) = acc.Scalars("eval/byte_ppl/fr")
        assert event.step == step
        assert event.value == pytest.approx(runs[name]["per_language"]["fr"]["byte_ppl"], rel=1e-6)
        assert runs[name]["tensorboard"]["step"] == step


def test_default_max_length(tiny, tmp_path):
    """The tokenizer's model_max_length, else the folder's seq_length, else 2048 (lm-eval's default)."""
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(tiny["hf"], folder)
    assert load_for_eval(str(folder)).default_max_length() == 2048  # tokenizer_config.json says so
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.pop("model_max_length")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert load_for_eval(str(folder)).default_max_length() == 2048  # nothing set: lm-eval's default
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "seq_length": 64}))
    assert load_for_eval(str(folder)).default_max_length() == 64
