"""Generation with our KV cache against transformers' generate and log-softmax."""
import json

import pytest
import torch
import transformers

from interop_helpers import run_cli, save_tokenizer, tiny_hf_model
from megatron_bloom.checkpoint.hf import read_hf_checkpoint
from megatron_bloom.checkpoint.native import write_native_checkpoint
from megatron_bloom.generation import _next_tokens, generate, load_model, prompt_logprobs

PROMPTS = ["The quick brown fox", "Tensor parallelism splits", "La capitale de la France est", "Once"]
NEW = 12
# fp32 log-probs, ours (sdpa kernel, fused GeLU) vs transformers (baddbmm): observed differences up
# to ~8e-6 on log-probs of magnitude up to ~20 (relative ~4e-7), float32 summation order only; a
# wrong slope, mask or cache position moves them by 1e-2 or more.
LOGPROB_ATOL = 1e-5
LOGPROB_RTOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(str(folder))
    return folder


def _hf_folder(tmp_path, tokenizer_dir, seed, n_head, hidden):
    vocab = transformers.AutoTokenizer.from_pretrained(tokenizer_dir).vocab_size
    hf = tiny_hf_model(seed=seed, vocab_size=vocab, hidden_size=hidden, n_head=n_head, n_layer=2, scale=0.5)
    folder = tmp_path / f"hf{seed}"
    hf.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return hf, folder


def _hf_greedy(hf, ids, new=NEW):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=new, pad_token_id=3)
    return out[0, len(ids):].tolist()


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("seed, n_head, hidden", [(0, 3, 24), (1, 6, 48), (2, 12, 48)])
def test_greedy_and_logprobs_match_transformers(tmp_path, tokenizer_dir, seed, n_head, hidden):
    hf, folder = _hf_folder(tmp_path, tokenizer_dir, seed, n_head, hidden)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    loaded = load_model(str(folder))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    want = [_hf_greedy(hf, ids) for ids in prompts]
    # One prompt at a time, and all of them as one left-padded batch.
    assert [generate(loaded.model, [ids], NEW, eos_token_id=2)[0] for ids in prompts] == want
    assert generate(loaded.model, prompts, NEW, eos_token_id=2, pad_token_id=3) == want
    for ids in prompts:
        got = torch.tensor(prompt_logprobs(loaded.model, ids))
        torch.testing.assert_close(got, _hf_logprobs(hf, ids), atol=LOGPROB_ATOL, rtol=LOGPROB_RTOL)


def test_cli_json_from_transformers_folder_and_native_checkpoint(tmp_path, tokenizer_dir):
    hf, folder = _hf_folder(tmp_path, tokenizer_dir, 3, 6, 48)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg, sd = read_hf_checkpoint(str(folder))
    native = tmp_path / "native"
    write_native_checkpoint(sd, cfg, str(native), tp=2, tokenizer_dir=str(folder), special_tokens={"eos": 2})
    prompt = PROMPTS[0]
    ids = tok(prompt)["input_ids"]
    want = _hf_greedy(hf, ids, 10)
    for load in (folder, native):
        proc = run_cli("generate.py", "--load", load, "--prompt", prompt, "--max-new-tokens", 10, "--greedy", "--json")
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        assert record["prompt_ids"] == ids and record["generated_ids"] == want
        assert len(record["prompt_logprobs"]) == len(ids) - 1
        torch.testing.assert_close(torch.tensor(record["prompt_logprobs"]), _hf_logprobs(hf, ids),
                                   atol=LOGPROB_ATOL, rtol=LOGPROB_RTOL)
        assert record["text"] == tok.decode(want, skip_special_tokens=True)
    # Plain output is the continuation text; --device names where it runs (the default, cpu, here).
    proc = run_cli("generate.py", "--load", native, "--prompt", prompt, "--max-new-tokens", 10, "--device", "cpu")
    assert proc.returncode == 0 and proc.stdout.strip() == tok.decode(want, skip_special_tokens=True).strip()


def test_stops_at_eos(tmp_path, tokenizer_dir):
    """EOS ends a sequence (and is kept); in a batch the others go on."""
    hf, folder = _hf_folder(tmp_path, tokenizer_dir, 5, 6, 48)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = load_model(str(folder)).model
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    free = [_hf_greedy(hf, ids) for ids in prompts]
    eos = free[0][3]  # pretend the 4th token of the first continuation is EOS
    want = [hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=3)[0, len(ids):].tolist() for ids in prompts]
    assert want[0] == free[0][: free[0].index(eos) + 1] and any(len(w) == NEW for w in want)
    assert generate(model, prompts, NEW, eos_token_id=eos, pad_token_id=3) == want


def test_sampling(tmp_path, tokenizer_dir):
    _, folder = _hf_folder(tmp_path, tokenizer_dir, 4, 6, 48)
    model = load_model(str(folder)).model
    prompt = [[40, 41, 42, 43]]
    greedy = generate(model, prompt, 16)
    a = generate(model, prompt, 16, temperature=1.0, seed=7)
    assert a == generate(model, prompt, 16, temperature=1.0, seed=7)  # the seed fixes the sample
    assert any(generate(model, prompt, 16, temperature=1.0, seed=s) != a for s in range(8, 12))
    # A tiny nucleus keeps only the most likely token: sampling becomes greedy.
    assert generate(model, prompt, 16, temperature=0.7, top_p=1e-6, seed=3) == greedy


def test_padded_rows_are_never_sampled():
    logits = torch.zeros(4, 384)
    logits[:, 300:] = 50.0  # rows past vocab_size=300 that a broken head could have left large
    for temperature in (0.0, 1.0):
        tokens = _next_tokens(logits, 300, temperature, 1.0, torch.Generator().manual_seed(0))
        assert int(tokens.max()) < 300
