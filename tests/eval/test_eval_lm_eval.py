"""lm-eval's own ``hf`` model and our ``megatron_bloom`` give the same per-sample results
(``--log_samples``) on local tasks: multiple_choice, loglikelihood_rolling and generate_until.

Both run through ``launch/lm_eval_harness.py`` (which also proves the wrapper leaves lm-eval's built-in
models in place), at the same small max_length so contexts are cut and documents need several
rolling windows, with the same batch size, at the same time (one per core).
"""
import glob
import json
import os
import subprocess
import sys

import pytest

from eval_helpers import REPO_ROOT, SENTENCES, write_jsonl

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it (the lm-eval[hf] extra)

MAX_LENGTH = 24
MAX_GEN_TOKS = 10
BATCH = 3
# float32 rounding between the implementations (see test_eval_perplexity.py); lm-eval logs its
# floats as strings with full precision, so this is the only slack.
LL_RTOL, LL_ATOL = 1e-5, 1e-4

MC_ROWS = [
    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0},
    {"context": "La capitale de la France est ", "choices": ["Paris", "Rome"], "label": 0},
    {"context": "", "choices": ["Tensor parallelism", "Pipeline stages"], "label": 1},
    {"context": " ".join(SENTENCES[:3]), "choices": [" one two", " three four five"], "label": 0},  # > MAX_LENGTH
]
DOCS = [{"text": s} for s in SENTENCES[:5]] + [{"text": " ".join(SENTENCES * 2)}]  # the last needs many windows
PROMPTS = [{"prompt": "The quick brown fox"}, {"prompt": "La capitale de la France"}, {"prompt": "Once"},
           {"prompt": " ".join(SENTENCES[:2])}]  # longer than MAX_LENGTH - MAX_GEN_TOKS: cut on the left


def _task_yaml(name, data, output_type, body):
    # Absolute data_files: lm-eval resolves relative ones against the current directory.
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}")


def _greedy_probes(tiny):
    """A stop string our greedy continuation of the first prompt contains, so `until` really cuts;
    and a multiple-choice row whose first choice is the greedy next token, so is_greedy is True."""
    from megatron_bloom.generation import generate, load_model

    tok = tiny["tokenizer"]
    model = load_model(str(tiny["hf"])).model
    ids = tok(PROMPTS[0]["prompt"])["input_ids"]
    text = tok.decode(generate(model, [ids], MAX_GEN_TOKS, eos_token_id=2)[0], skip_special_tokens=True)
    candidates = [c for c in text[2:-1] if c.isascii() and c.isprintable()]
    stop = candidates[0] if candidates else "."
    for sentence in SENTENCES:
        context = sentence[: len(sentence) // 2].rstrip()
        ctx = tok(context)["input_ids"]
        nxt = generate(model, [ctx], 1)[0]
        choice = tok.decode(nxt)
        if "\ufffd" not in choice and tok(context + choice)["input_ids"] == ctx + nxt:
            return stop, {"context": context, "choices": [choice, " zzz"], "label": 0}
    return stop, None


def _samples(out_dir, task):
    (path,) = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    with open(path, encoding="utf-8") as fh:
        return sorted((json.loads(line) for line in fh), key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_per_sample_results_equal_lm_eval_hf(tiny, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    stop, greedy_row = _greedy_probes(tiny)
    mc_rows = MC_ROWS + ([greedy_row] if greedy_row else [])
    (tasks / "mc.yaml").write_text(_task_yaml(
        "tiny_mc", write_jsonl(tmp_path / "mc.jsonl", mc_rows), "multiple_choice",
        'doc_to_text: "{{context}}"\ntarget_delimiter: ""\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    (tasks / "roll.yaml").write_text(_task_yaml(
        "tiny_roll", write_jsonl(tmp_path / "docs.jsonl", DOCS), "loglikelihood_rolling",
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: byte_perplexity\n'
        "  - metric: word_perplexity\n"))
    (tasks / "gen.yaml").write_text(_task_yaml(
        "tiny_gen", write_jsonl(tmp_path / "gen.jsonl", PROMPTS), "generate_until",
        f'doc_to_text: "{{{{prompt}}}}"\ndoc_to_target: ""\ngeneration_kwargs:\n  until: {json.dumps([stop])}\n'
        f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"))

    common = ["--tasks", "tiny_mc,tiny_roll,tiny_gen", "--include_path", str(tasks), "--batch_size", str(BATCH),
              "--device", "cpu", "--log_samples"]
    runs = {"hf": ["--model", "hf", "--model_args", f"pretrained={tiny['hf']},max_length={MAX_LENGTH}"],
            "ours": ["--model", "megatron_bloom", "--model_args", f"load={tiny['hf']},max_length={MAX_LENGTH}"]}
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "launch", "lm_eval_harness.py"), *args, *common,
                                     "--output_path", str(tmp_path / name)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for name, args in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"

    hf, ours = (tmp_path / "hf"), (tmp_path / "ours")
    flags = []
    for a, b in zip(_samples(hf, "tiny_mc"), _samples(ours, "tiny_mc"), strict=True):
        want = [(float(ll), flag) for ll, flag in a["filtered_resps"]]
        got = [(float(ll), flag) for ll, flag in b["filtered_resps"]]
        assert [f for _, f in got] == [f for _, f in want]
        flags += [f for _, f in got]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=LL_RTOL, abs=LL_ATOL)
        assert (b["acc"], b["acc_norm"]) == (a["acc"], a["acc_norm"])
    assert "True" in flags and "False" in flags
    rolls = list(zip(_samples(hf, "tiny_roll"), _samples(ours, "tiny_roll"), strict=True))
    for a, b in rolls:
        assert float(b["filtered_resps"][0]) == pytest.approx(float(a["filtered_resps"][0]), rel=LL_RTOL, abs=LL_ATOL)
    assert len(rolls) == len(DOCS)
    # evaluate.py's perplexity at stride = max_length uses the same windows as lm-eval's rolling
    # log-likelihood, so its per-document NLL is lm-eval's too.
    from megatron_bloom.evaluation.data import Document
    from megatron_bloom.evaluation.loading import load_for_eval
    from megatron_bloom.evaluation.perplexity import evaluate_perplexity

    ppl = evaluate_perplexity(load_for_eval(str(tiny["hf"])), [Document(d["text"], None, 0) for d in DOCS],
                              MAX_LENGTH, MAX_LENGTH, batch_size=BATCH)
    assert [-nll for nll in ppl.document_nll] == pytest.approx([float(a["filtered_resps"][0]) for a, _ in rolls],
                                                               rel=LL_RTOL, abs=LL_ATOL)
    gens = list(zip(_samples(hf, "tiny_gen"), _samples(ours, "tiny_gen"), strict=True))
    assert [b["filtered_resps"] for _, b in gens] == [a["filtered_resps"] for a, _ in gens]
    assert stop not in gens[0][1]["filtered_resps"][0]  # cut at the stop string


def test_model_args(tiny):
    import torch

    from megatron_bloom.errors import UserError
    from megatron_bloom.evaluation.harness import MegatronBloomLM

    cli = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm-eval's CLI passes by default
    lm = MegatronBloomLM.create_from_arg_string(f"load={tiny['native']},batch_size=3,max_length=20", cli)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # no CUDA: falls back to the CPU as hf does
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks, str(lm.device)) == (3, 20, 256, device)
    assert (lm.prefix_token_id, lm.eot_token_id) == (1, 2)  # <s>, </s> of the checkpoint's own tokenizer
    assert MegatronBloomLM.create_from_arg_string(f"load={tiny['hf']}", {"batch_size": 4}).max_length == 2048
    with pytest.raises(UserError, match="unknown model_args for megatron_bloom: pretrained"):
        MegatronBloomLM.create_from_arg_string(f"load={tiny['hf']},pretrained=x", cli)
    with pytest.raises(UserError, match="integer batch size, not 'auto'"):
        MegatronBloomLM.create_from_arg_string(f"load={tiny['hf']}", {"batch_size": "auto"})
