"""Tiny transformers BLOOMs and a tiny tokenizer, built offline for the interop tests."""
import os
import subprocess
import sys

import torch
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BLOOM is a multilingual language model trained on many languages.",
    "Tensor parallelism splits every weight matrix across ranks.",
    "Pipeline stages pass activations from one to the next.",
    "La capitale de la France est Paris, et celle de l'Italie est Rome.",
    "Once upon a time there was a tiny model that learned to count: one two three four five.",
]


def tiny_hf_model(seed=0, vocab_size=250, hidden_size=48, n_head=6, n_layer=3, scale=0.1):
    """A random transformers BloomForCausalLM; LayerNorms and biases randomised too, so a mix-up
    between, say, input_layernorm and post_attention_layernorm would change the outputs."""
    cfg = transformers.BloomConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, n_layer=n_layer, n_head=n_head,
        initializer_range=scale, hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = transformers.BloomForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tokenizer(folder, vocab_size=300):
    """Byte-level BPE like BLOOM's (<unk> <s> </s> <pad> at ids 0-3) as a transformers folder;
    returns its real vocabulary size (a few sentences may give fewer merges than asked for)."""
    from tokenizers import pre_tokenizers, trainers

    from data_tools.train_tokenizer import SPECIAL_TOKENS, build_tokenizer, save

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    save(tok, folder)
    return tok.get_vocab_size()


def run_cli(script, *args, timeout=180):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch", script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
