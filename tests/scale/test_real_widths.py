"""BLOOM's real widths at TP=2 x PP=2: train, save, export, load with transformers, and the planner's memory.

BLOOM-560m's width (hidden 1024, 16 heads) with BLOOM's 250,880-row embedding, on 2 blocks so four
fp32 ranks fit a 24 GB CI machine. The 250,880 rows come as BLOOM's came: a tokenizer (here a
300-token one trained on the spot, BLOOM's has 250,680) padded by ``--pad-vocab-size-to 250880``,
Megatron-DeepSpeed's flag in tr11-176B-ml. The padded rows are then part of the vocabulary, as in
the released bigscience/bloom (``vocab_size: 250880``), so the export keeps all of them. Each TP
rank holds 125,440 rows: 490 MiB of fp32 weights, the largest tensor of the run, on both stages
(the last stage holds the tied copy for the LM head).

fp32 and ZeRO-0 (tr11-176B-ml ran ZeRO-0): bf16 matmuls run at ~1 GFLOP/s on these CPUs, and
ZeRO-0 at DP=1 holds plain weights, gradients and Adam states, which RSS can be compared against.
The four ranks peak at ~3.3 GiB each (~13 GiB together); the run saves 5.3 GB of checkpoint.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_bloom.distributed import free_port
from megatron_bloom.testing.multiprocess import launcher_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "scale", "rss_worker.py")
TP, PP, VOCAB = 2, 2, 250880

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def env() -> dict:
    return launcher_env(REPO)


def run(*args, timeout=300, **extra_env) -> str:
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env={**env(), **extra_env},
                       cwd=REPO, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout + p.stderr


def flags(d) -> list:
    return [
        "--num-layers", "2", "--hidden-size", "1024", "--num-attention-heads", "16",
        "--seq-length", "64", "--max-position-embeddings", "64", "--init-method-std", "0.0048",
        "--tokenizer-name-or-path", d / "tok", "--pad-vocab-size-to", str(VOCAB),
        "--tensor-model-parallel-size", str(TP), "--pipeline-model-parallel-size", str(PP),
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "2", "--lr", "1e-4",
        "--zero-stage", "0", "--distributed-backend", "gloo", "--seed", "7", "--log-interval", "1",
        # Activations at s=64 are ~3 MiB a block; without dropout SDPA keeps no CPU-only fallback tensors.
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--data-path", d / "corpus_text_document", "--split", "100,0,0",
        "--save", d / "checkpoints", "--save-interval", "2",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_widths")
    run("data_tools/make_corpus.py", "--output", d / "corpus.jsonl", "--size-mb", "0.2", "--seed", "3")
    run("data_tools/train_tokenizer.py", "--input", d / "corpus.jsonl", "--vocab-size", "300", "--output-dir", d / "tok")
    run("data_tools/preprocess_data.py", "--input", d / "corpus.jsonl", "--output-prefix", d / "corpus",
        "--tokenizer-name-or-path", d / "tok", "--json-keys", "text", "--append-eod", "--workers", "1", "--quiet")
    (d / "rss").mkdir()
    # glibc serves allocations from 32 MiB down from its heap once a large block was freed (its mmap
    # threshold adapts), where freed memory stays resident; a fixed 256 KiB threshold gives every
    # tensor of that size its own mapping, returned at free, so RSS follows the live tensors.
    out = run("-m", "torch.distributed.run", "--nproc-per-node", TP * PP, "--master-addr", "127.0.0.1",
              "--master-port", free_port(), WORKER, d / "rss", *flags(d), timeout=400,
              MALLOC_MMAP_THRESHOLD_="262144")
    memory = [json.loads((d / "rss" / f"rank{r}.json").read_text()) for r in range(TP * PP)]
    return d, out, memory


def test_trains_and_saves_bloom_widths_at_tp2_pp2(trained):
    d, out, _ = trained
    assert "iteration        2/       2" in out
    assert (d / "checkpoints" / "latest").read_text().strip() == "global_step2"
    emb = torch.load(d / "checkpoints" / "global_step2" / "layer_01-model_01-model_states.pt", weights_only=True)
    assert emb["word_embeddings.weight"].shape == (VOCAB // TP, 1024)  # BLOOM's rows, split over TP=2


def test_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    import transformers

    from megatron_bloom.checkpoint.native import model_from_state_dict, read_native_checkpoint

    d, _, _ = trained
    hf_dir = tmp_path / "hf"
    run("launch/convert_checkpoint.py", "native-to-hf", "--load", d / "checkpoints", "--out", hf_dir,
        "--tokenizer", d / "tok")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert (hf.config.vocab_size, hf.config.hidden_size, hf.config.n_head, hf.config.n_layer) == (VOCAB, 1024, 16, 2)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("one two three quatre cinq")["input_ids"][:8]])  # 8 tokens x 250,880 logits
    cfg, sd = read_native_checkpoint(str(d / "checkpoints"))
    ours = model_from_state_dict(cfg, sd, attention_impl="eager").eval()
    with torch.no_grad():
        expected = ours(ids)
        got = hf(ids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], VOCAB)
    # Both fp32 with eager attention: the same computation up to summation order (observed 5e-7 on
    # logits up to 5); tokenizer rows shifted by one in the export moved them by 1.1.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def planned(d):
    """The planner's StageMemory per pipeline stage for the run's own flags, as launch/plan.py computes it."""
    from megatron_bloom.commands.plan import check_as_the_trainer, layout_of, trainer_config
    from megatron_bloom.planning import Cluster, accelerator, estimate

    cfg, _ = trainer_config([str(a) for a in flags(d)])
    cfg = check_as_the_trainer(cfg, TP * PP)
    e = estimate(cfg.model, Cluster(1, TP * PP, accelerator("cpu")), layout_of(cfg, TP * PP))
    assert not e.problems, e.problems
    return e.stages


def test_planner_memory_per_rank_matches_the_measured_resident_set(trained):
    """Per rank, the resident set (RSS) the trainer adds once it builds its engine, against the planner.

    CPU has no CUDA allocator to ask for allocated bytes. With glibc's mmap threshold fixed at
    256 KiB (see ``trained``) every tensor of that size or more is its own mapping, returned at
    free, so RSS follows the live tensors; the baseline is the RSS when the engine starts being
    built (libraries, process groups, tokenizer and dataset index are there already).

    - After the optimizer step a rank holds its weights and Adam states (the engine frees the
      gradients at the step): the planner's weights + optimizer states, to 10% as
      tests/unit/test_plan.py checks them on the engine's own tensors. Measured 1.06-1.08: the
      rest is the engine's non-tensor memory (DeepSpeed, gloo and pipeline buffers, Python objects).
    - The peak of the two training steps (before the checkpoint save, whose tensor clones the
      planner does not model) against the planner's total: weights, gradients, Adam states,
      activations and the flat copy of the gradients DeepSpeed's ``ReduceGrads`` makes even at
      DP = 1 (``planning/memory.py``, ``allreduce_flat_bytes``: 565 MB here, the step's peak).
      The bound 0.95-1.15 fails when a vocabulary-sized term is missed or counted twice (one 490
      MiB shard is ~20% of a rank). It caught two: that copy, and the NaN/Inf guard's old check,
      ``isfinite(grad).all()``, which held |grad| and two masks of the vocabulary-shard gradient
      (770 MB) in the backward pass; the guard now sums the gradient (``training/nonfinite.py``).
    """
    d, _, memory = trained
    stages = planned(d)
    for rank, m in enumerate(memory):
        s = stages[rank // TP]  # ranks 0, 1 are stage 0; 2, 3 stage 1 (TP innermost)
        states = m["after_step"] - m["before_model"]
        peak = m["peak_before_save"] - m["before_model"]
        print(f"rank {rank} stage {s.stage}: after the step {states / 2**20:,.0f} MiB (planned weights + Adam "
              f"{(s.weights + s.optimizer_states) / 2**20:,.0f}); training peak {peak / 2**20:,.0f} MiB (planned "
              f"{s.total / 2**20:,.0f}); with the save "
              f"{(m['peak'] - m['before_model']) / 2**20:,.0f} MiB")
        assert abs(states / (s.weights + s.optimizer_states) - 1) <= 0.10, (rank, states, s)
        assert 0.95 <= peak / s.total <= 1.15, (rank, peak, s.total, m["instructions"])
