import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from one_process import env

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = Path(HERE).parents[1]

# The same session corpus as tests/training: a 1 MB corpus, its 1,000-token tokenizer and .bin/.idx.
_spec = importlib.util.spec_from_file_location("training_conftest", os.path.join(os.path.dirname(HERE), "training",
                                                                                  "conftest.py"))
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)
corpus = _training.corpus


def _tool(*args) -> None:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stderr


def _weights_only_checkpoint(out: Path, vocab_size: int, tp: int) -> None:
    """A native weights-only checkpoint (what convert_checkpoint.py hf-to-native writes) of MODEL."""
    import torch

    from megatron_bloom.checkpoint.native import expected_shapes, write_native_checkpoint
    from megatron_bloom.config.schema import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=vocab_size, seq_length=32)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in expected_shapes(cfg).items()}
    write_native_checkpoint(sd, cfg, str(out), tp)


@pytest.fixture(scope="module")
def p(tmp_path_factory) -> Dict[str, object]:
    """A tiny corpus, its tokenizer and dataset, paired (xP3) data, and native checkpoints, good and broken."""
    d = tmp_path_factory.mktemp("bad_inputs")
    jsonl = d / "corpus.jsonl"
    _tool("data_tools/make_corpus.py", "--output", jsonl, "--size-mb", "0.1", "--seed", "5")
    _tool("data_tools/train_tokenizer.py", "--input", jsonl, "--vocab-size", "400", "--output-dir", d / "tok")
    _tool("data_tools/preprocess_data.py", "--input", jsonl, "--output-prefix", d / "corpus",
          "--tokenizer-name-or-path", d / "tok", "--append-eod", "--workers", "1", "--quiet")
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(f'{{"inputs": "Question {i}?", "targets": "Answer {i}."}}\n' for i in range(40)))
    _tool("data_tools/preprocess_xp3.py", "--input", pairs, "--output-prefix", d / "xp3", "--tokenizer-name-or-path", d / "tok")

    from megatron_bloom.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(d / "tok")).vocab_size
    _weights_only_checkpoint(d / "ckpt_tp2", vocab, tp=2)
    # The same checkpoint with one layer file cut short (a copy interrupted, a full disk).
    shutil.copytree(d / "ckpt_tp2", d / "ckpt_truncated")
    layer = d / "ckpt_truncated" / "global_step0" / "layer_03-model_01-model_states.pt"
    layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    # ... and with its state file cut short.
    shutil.copytree(d / "ckpt_tp2", d / "ckpt_bad_state")
    state = d / "ckpt_bad_state" / "global_step0" / "megatron_bloom.pt"
    state.write_bytes(state.read_bytes()[:100])
    # A training checkpoint (not weights-only) saved at TP=2 under ZeRO-1: only its state file
    # matters for the layout decision, which is taken before any weight is read.
    import torch

    shutil.copytree(d / "ckpt_tp2", d / "ckpt_trained_tp2")
    state = d / "ckpt_trained_tp2" / "global_step0" / "megatron_bloom.pt"
    s = torch.load(state, weights_only=True)
    s.update(weights_only=False, layout={"tp": 2, "pp": 1, "dp": 1, "zero": 1})
    torch.save(s, state)
    # ... whose TP copies of one LayerNorm drifted apart (as BLOOM-176B's did in bf16).
    shutil.copytree(d / "ckpt_trained_tp2", d / "ckpt_drifted_tp2")
    layer = d / "ckpt_drifted_tp2" / "global_step0" / "layer_03-model_01-model_states.pt"
    sd = torch.load(layer, weights_only=True)
    sd["input_layernorm.weight"] = sd["input_layernorm.weight"] + 0.01
    torch.save(sd, layer)

    # .bin/.idx pairs that do not match: a .bin cut short, an .idx cut short, a .bin of another run.
    data = d / "corpus_text_document"
    for name, cut_bin, cut_idx in (("short_bin", True, False), ("short_idx", False, True)):
        b, i = data.with_suffix(".bin").read_bytes(), data.with_suffix(".idx").read_bytes()
        (d / f"{name}.bin").write_bytes(b[: len(b) // 2] if cut_bin else b)
        (d / f"{name}.idx").write_bytes(i[: len(i) - 8] if cut_idx else i)
    # Ten documents of tokens, then ten empty ones (what a filter that emptied them leaves).
    from megatron_bloom.data.indexed_dataset import MMapIndexedDatasetBuilder, data_file_path, index_file_path

    builder = MMapIndexedDatasetBuilder(data_file_path(str(d / "empty_docs")), dtype="uint16")
    for i in range(20):
        builder.add_item(list(range(1, 40)) if i < 10 else [])
        builder.end_document()
    builder.finalize(index_file_path(str(d / "empty_docs")))
    a_file = d / "a_file"
    a_file.write_text("not a folder\n")
    return {"d": d, "jsonl": jsonl, "tok": d / "tok", "data": data, "xp3": d / "xp3", "vocab": vocab, "file": a_file}


