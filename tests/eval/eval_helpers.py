"""Helpers of the evaluation tests: a tiny random transformers BLOOM with its own tokenizer and a
TP=2 native checkpoint of it (offline, seconds), jsonl writing, running launch/ scripts, and the
direct transformers log-probabilities the tests compare against."""
import json
import os
import subprocess
import sys

import torch
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Several scripts, so byte perplexity (bytes != characters != tokens) means something.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BLOOM is a multilingual language model trained on many languages.",
    "Tensor parallelism splits every weight matrix across ranks.",
    "La capitale de la France est Paris, et celle de l'Italie est Rome.",
    "Él habló con la niña en español durante la mañana.",
    "大型语言模型可以生成文本。",
    "النموذج اللغوي الكبير يتعلم من النصوص.",
    "Once upon a time there was a tiny model that learned to count: one two three four five.",
]
CHECKPOINT_ITERATION = 7
"""Iteration recorded in the native checkpoint (the TensorBoard step of its results)."""


def _save_tokenizer(folder):
    from tokenizers import pre_tokenizers, trainers

    from data_tools.train_tokenizer import SPECIAL_TOKENS, build_tokenizer, save

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    save(tok, str(folder))


def build_tiny(root):
    """``{"hf": folder, "native": TP=2 checkpoint dir, "model": transformers model, "tokenizer"}``."""
    from megatron_bloom.checkpoint.hf import read_hf_checkpoint
    from megatron_bloom.checkpoint.native import write_native_checkpoint

    hf_dir = root / "hf"
    _save_tokenizer(hf_dir)
    vocab = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
    cfg = transformers.BloomConfig(vocab_size=vocab, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.3,
                                   hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases random too, so a swapped one would show
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(hf_dir)
    mcfg, sd = read_hf_checkpoint(str(hf_dir))
    native = root / "native"
    write_native_checkpoint(sd, mcfg, str(native), tp=2, iteration=CHECKPOINT_ITERATION, tokenizer_dir=str(hf_dir),
                            special_tokens={"bos": 1, "eos": 2, "pad": 3})
    return {"hf": hf_dir, "native": native, "model": model,
            "tokenizer": transformers.AutoTokenizer.from_pretrained(hf_dir)}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def run_launch(script, *args, timeout=300):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@torch.no_grad()
def hf_token_logprobs(model, ids):
    """``log p(ids[i] | ids[:i])`` for i >= 1 from one transformers forward pass, float64 out."""
    logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
