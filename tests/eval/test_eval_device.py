"""Generation and evaluation run on the device they are given: ids, masks, the KV cache and the
sampling generator, in ``generation.py``, the evaluation scorers and the lm-eval model.

This machine has one real device, the CPU, so a tensor or generator made without ``device=`` would
land on the model's device by luck. Four spies make that luck visible:

* ``made_elsewhere_is_meta``: the default device becomes "meta" around the code under test, so a
  tensor made without ``device=`` is a meta tensor (no data): handed to the model it fails
  ``OnItsDevice``'s check, copied anywhere it raises;
* ``OnItsDevice``: a model wrapper asserting that the ids, the mask and every KV-cache tensor it is
  handed are on the device of its weights, and counting the calls (so the check provably ran);
* ``generators``: ``torch.Generator`` records the device it was made for (``None`` when none was
  named, which is the CPU whatever the model's device is);
* ``moves``: ``nn.Module.to`` records where each module was sent, so loading provably moves the
  model to the device asked for (on this machine the model starts there anyway).
"""
import json
import logging
from contextlib import contextmanager

import pytest
import torch

from megatron_bloom.cli import entry_point
from megatron_bloom.errors import UserError
from megatron_bloom.generation import decode, generate, load_model, prompt_logprobs

CPU = torch.device("cpu")
PROMPTS = ["The quick brown fox", "Once", "La capitale de la France"]  # lengths differ: the masked path
NEW = 5
UNUSABLE = "meta"
"""A device name torch knows that no machine can generate on (it holds no data)."""


class OnItsDevice(torch.nn.Module):
    """``model`` behind a check that everything handed to it lives on the device of its weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls = 0
        self.cache_tensors = 0

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        device = next(self.model.parameters()).device
        cache = [t for layer in past_key_values or () for t in layer]
        handed = {"input_ids": input_ids, "attention_mask": attention_mask,
                  **{f"cache[{i}]": t for i, t in enumerate(cache)}}
        wrong = {k: str(t.device) for k, t in handed.items() if t is not None and t.device != device}
        assert not wrong, f"handed to a model on {device}: {wrong}"
        self.calls += 1
        self.cache_tensors += len(cache)
        return self.model(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                          use_cache=use_cache)


@contextmanager
def made_elsewhere_is_meta():
    """Tensors made without ``device=`` land on "meta" (see the module docstring)."""
    with torch.device("meta"):
        yield


@pytest.fixture
def generators(monkeypatch):
    """Devices the ``torch.Generator``s made during the test were created for (``None``: not named)."""
    made = []
    real = torch.Generator

    def spy(*args, **kwargs):
        named = kwargs.get("device", args[0] if args else None)
        made.append(None if named is None else torch.device(named))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", spy)
    return made


@pytest.fixture
def moves(monkeypatch):
    """``(module, device)`` of every ``nn.Module.to`` call that names a device."""
    sent = []
    real = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            sent.append((self, device))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    return sent


@pytest.fixture
def no_weights_read(monkeypatch):
    """Reading any checkpoint fails the test: a refusal must come before the weights."""
    import megatron_bloom.checkpoint.hf as hf
    import megatron_bloom.checkpoint.native as native

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were read before the device was checked")

    monkeypatch.setattr(hf, "read_hf_checkpoint", refuse)
    monkeypatch.setattr(native, "read_native_checkpoint", refuse)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(str(tiny["hf"]), with_tokenizer=True, device="cpu")


def _ids(loaded):
    return [loaded.tokenizer.encode(p) for p in PROMPTS]


# ---- generation.py ------------------------------------------------------------------------------------


def test_load_model_moves_the_model_to_the_device(tiny, moves):
    loaded = load_model(str(tiny["hf"]), device="cpu")
    assert loaded.device == CPU
    assert any(module is loaded.model and device == CPU for module, device in moves)


def test_greedy_and_seeded_sampling_run_on_the_model_device(loaded, generators):
    ids = _ids(loaded)
    want_greedy = generate(loaded.model, ids, NEW, pad_token_id=3)
    want_sample = generate(loaded.model, ids, NEW, temperature=1.0, seed=11, pad_token_id=3)
    want_logprobs = prompt_logprobs(loaded.model, ids[0])
    generators.clear()
    model = OnItsDevice(loaded.model)
    with made_elsewhere_is_meta():
        greedy = generate(model, ids, NEW, pad_token_id=3)
        sample = generate(model, ids, NEW, temperature=1.0, seed=11, pad_token_id=3)
        logprobs = prompt_logprobs(model, ids[0])
    assert (greedy, sample, logprobs) == (want_greedy, want_sample, want_logprobs)
    assert sample != greedy  # the seeded path really sampled
    assert generators == [CPU]  # one generator, for the seeded run, on the model's device
    # Per generate: the prompt, then NEW - 1 steps fed with the cache (2 tensors per layer); then
    # prompt_logprobs' one pass.
    assert model.calls == 2 * NEW + 1
    assert model.cache_tensors == 2 * (NEW - 1) * 2 * loaded.config.num_layers


def test_decode_seed_draws_from_a_generator_on_the_model_device(loaded, generators):
    ids = _ids(loaded)
    want = decode(loaded.model, ids, NEW, None, 3, temperature=1.0, seed=5)
    generators.clear()
    model = OnItsDevice(loaded.model)
    with made_elsewhere_is_meta():
        assert decode(model, ids, NEW, None, 3, temperature=1.0, seed=5) == want
    assert generators == [CPU] and model.calls == NEW


def _generate_cli(*args):
    from megatron_bloom.commands.generate import generate_command

    return entry_point(generate_command)([str(a) for a in args])


def test_generate_cli_loads_on_device_and_seeds_a_generator_there(tiny, loaded, generators, moves, capsys):
    ids = _ids(loaded)[:2]
    want = generate(loaded.model, ids, NEW, temperature=1.0, seed=3, eos_token_id=loaded.ids.eos,
                    pad_token_id=loaded.ids.pad)
    generators.clear()
    with pytest.raises(SystemExit) as exc:
        _generate_cli("--load", tiny["hf"], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", NEW,
                      "--temperature", 1.0, "--seed", 3, "--device", "cpu", "--json")
    assert exc.value.code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["generated_ids"] for r in records] == want
    assert generators == [CPU]
    assert any(device == CPU and type(module).__name__ == "BloomForCausalLM" for module, device in moves)


@pytest.mark.parametrize("device, message", [
    (UNUSABLE, "error: device 'meta' cannot be used on this machine ("),
    ("cuda:99", "error: device 'cuda:99' cannot be used on this machine ("),  # no machine has 100 GPUs
    ("gpu0", "error: device 'gpu0' is not a torch device name ("),
])
def test_generate_cli_refuses_a_device_before_reading_weights(tiny, no_weights_read, capsys, device, message):
    with pytest.raises(SystemExit) as exc:
        _generate_cli("--load", tiny["hf"], "--prompt", "Once", "--device", device)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and err.startswith(message)


def test_generate_and_evaluate_name_device_alike():
    from megatron_bloom.commands.generate import build_parser as generate_parser
    from megatron_bloom.evaluation.cli import build_parser as evaluate_parser

    def device_flag(parser):
        (action,) = [a for a in parser._actions if "--device" in a.option_strings]
        return action.default, action.help

    default, help_text = device_flag(generate_parser())
    assert device_flag(evaluate_parser()) == (default, help_text)
    assert default == "cpu" and help_text.endswith("(default cpu)")


# ---- evaluation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def em(tiny):
    from megatron_bloom.evaluation.loading import load_for_eval

    return load_for_eval(str(tiny["hf"]), device="cpu")


def test_load_for_eval_moves_the_model_to_the_device(tiny, moves):
    from megatron_bloom.evaluation.loading import load_for_eval

    em = load_for_eval(str(tiny["hf"]), device="cpu")
    assert em.device == CPU
    assert any(module is em.model and device == CPU for module, device in moves)


def test_perplexity_and_multiple_choice_batches_are_made_on_the_model_device(em):
    from dataclasses import replace

    from eval_helpers import SENTENCES
    from megatron_bloom.evaluation.data import ChoiceExample, Document
    from megatron_bloom.evaluation.multiple_choice import score_choices
    from megatron_bloom.evaluation.perplexity import evaluate_perplexity

    docs = [Document(s, None, i) for i, s in enumerate(SENTENCES[:3])]
    examples = [ChoiceExample("The capital of France is", [" Paris", " Rome"], 0, None, None, 1),
                ChoiceExample("", ["one two", "three"], 1, None, None, 2)]
    want_ppl = evaluate_perplexity(em, docs, 8, 4, batch_size=2).document_nll
    want_mc = [s.logprobs for s in score_choices(em, examples, 8, batch_size=3)]
    checked = replace(em, model=OnItsDevice(em.model))
    with made_elsewhere_is_meta():
        ppl = evaluate_perplexity(checked, docs, 8, 4, batch_size=2).document_nll
        mc = [s.logprobs for s in score_choices(checked, examples, 8, batch_size=3)]
    assert (ppl, mc) == (want_ppl, want_mc)
    assert checked.model.calls > len(docs)


def test_evaluate_cli_refuses_a_device_before_reading_weights(tiny, tmp_path, no_weights_read, capsys):
    from eval_helpers import write_jsonl
    from megatron_bloom.evaluation.cli import main

    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello"}])
    with pytest.raises(SystemExit) as exc:
        entry_point(main)(["--load", str(tiny["hf"]), "--data", str(data), "--device", UNUSABLE])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err
    assert err.startswith("error: device 'meta' cannot be used on this machine (")


# ---- the lm-eval model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny):
    pytest.importorskip("lm_eval")
    from megatron_bloom.evaluation.harness import MegatronBloomLM

    return MegatronBloomLM(load=str(tiny["hf"]), device="cpu", batch_size=2, max_length=24, max_gen_toks=NEW)


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_harness_requests_run_on_the_model_device(lm, generators, monkeypatch):
    sampled = {"until": ["\n\n\n"], "do_sample": True, "temperature": 1.0, "seed": 9, "max_gen_toks": NEW}
    greedy = {"until": ["\n\n\n"], "do_sample": False, "max_gen_toks": NEW}
    gen = _requests("generate_until", [(p, kw) for kw in (sampled, greedy) for p in PROMPTS[:2]])
    ll = _requests("loglikelihood", [("The capital of France is", " Paris"), ("", "Once upon a time")])
    roll = _requests("loglikelihood_rolling", [(" ".join(PROMPTS * 3),)])

    def run():
        return (lm.generate_until(gen, disable_tqdm=True), lm.loglikelihood(ll, disable_tqdm=True),
                lm.loglikelihood_rolling(roll, disable_tqdm=True))

    want = run()
    generators.clear()
    checked = OnItsDevice(lm.em.model)
    monkeypatch.setattr(lm.em, "model", checked)
    with made_elsewhere_is_meta():
        got = run()
    assert got == want
    assert generators == [CPU]  # the sampled batch's generator, on the model's device
    assert checked.calls > NEW and checked.cache_tensors > 0


def test_harness_falls_back_from_a_device_it_cannot_use(tiny, caplog):
    pytest.importorskip("lm_eval")
    from megatron_bloom.evaluation.harness import MegatronBloomLM

    fallback = torch.accelerator.current_accelerator(check_available=True) or CPU  # what lm-eval's hf model does
    with caplog.at_level(logging.WARNING, logger="megatron_bloom.evaluation.harness"):
        lm = MegatronBloomLM(load=str(tiny["hf"]), device=UNUSABLE)
    assert lm.device == fallback == next(lm.em.model.parameters()).device
    assert "device 'meta' cannot be used on this machine" in caplog.text and f"running on {fallback}" in caplog.text
    with pytest.raises(UserError, match="device 'gpu0' is not a torch device name"):
        MegatronBloomLM(load=str(tiny["hf"]), device="gpu0")
