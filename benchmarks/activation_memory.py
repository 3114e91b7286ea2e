"""Peak memory of one micro-batch's forward + backward: the LM loss at BLOOM's vocabulary, and ALiBi.

Two cases, each run in a fresh process so that nothing of another run is resident:

* ``loss``: the LM head (``F.linear`` of hidden states ``[b, s, h]`` on a ``[V, h]`` matrix) and
  ``vocab_parallel_cross_entropy`` over the ``[b, s, V]`` logits, at the padded vocabulary of
  BLOOM's tokenizer (250,880) by default. The logits are the caller's for the whole step, as under
  DeepSpeed's pipeline engine, which holds a stage's output until its backward. With
  ``--logits-dtype bf16``, bf16 logits are given (no LM head).
* ``alibi``: a ``BloomForCausalLM`` of a few layers at a long sequence (small vocabulary, so the
  loss does not dominate), causal or packed (two segments per row: the bias then has a batch
  dimension). Each layer attends with the ``[b|1, heads, s, s]`` ALiBi bias.

Two peaks, both bytes above what was resident before the step (inputs and weights built, one small
warm-up step run so that lazily loaded kernels are not counted):

* ``rss``: the process's maximum resident set during the step (``getrusage``'s ``ru_maxrss``,
  its high-water mark reset through ``/proc/self/clear_refs`` just before, so building the inputs
  does not count) minus its resident set before the step; glibc serves large tensors from
  ``mmap``, so freed ones leave at once. Linux only; "-" where the reset is not allowed;
* ``torch``: the largest sum of live torch CPU allocations during a second, identical step, from
  the profiler's allocation events (counts only tensors, exactly).

float32 unless ``--logits-dtype bf16`` (bf16 matmuls run at ~1 GFLOP/s on CPUs without native
support; the bf16 loss case has no matmul).

    python benchmarks/activation_memory.py                            # both cases, default sizes
    python benchmarks/activation_memory.py --cases loss --micro-batch-size 2 --seq-length 1024
    python benchmarks/activation_memory.py --cases loss --logits-dtype bf16
    python benchmarks/activation_memory.py --cases alibi --packed --attention-impl eager --json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
from typing import Callable, Dict, List

from benchmarks.common import format_run_info, markdown_table, mib, run_info
from megatron_bloom.errors import run_main
from megatron_bloom.models.bloom.sizes import BLOOM_PADDED_VOCAB


def resident_bytes() -> int:
    """The process's resident set now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> bool:
    """Reset the resident high-water mark (``ru_maxrss``) to the resident set now (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def profiled_peak_bytes(step: Callable[[], None]) -> int:
    """Largest live torch allocation (bytes above the start) while ``step()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate((n for _, n in events), initial=0))


def loss_step(case: Dict, scale: float = 1.0) -> Callable[[], None]:
    """Vocab-parallel cross-entropy forward and backward (``scale`` shrinks the tokens).

    fp32: behind the LM head (``F.linear``), whose weight gradient ``[V, h]`` is part of the peak.
    bf16: on bf16 logits given as the input (the caller's), without the LM head, whose bf16 matmul
    would take minutes on a CPU without native bf16.
    """
    import torch
    import torch.nn.functional as F

    from megatron_bloom.layers import vocab_parallel_cross_entropy

    b, s, h, v = case["micro_batch_size"], max(1, int(case["seq_length"] * scale)), case["hidden_size"], case["vocab"]
    torch.manual_seed(0)
    target = torch.randint(0, v, (b, s))
    if case["logits_dtype"] == "bf16":
        given = torch.randn(b, s, v, dtype=torch.bfloat16, requires_grad=True)

        def step():
            given.grad = None
            vocab_parallel_cross_entropy(given, target).mean().backward()

        return step

    hidden = torch.randn(b, s, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_(True)

    def step():
        hidden.grad = weight.grad = None
        logits = F.linear(hidden, weight)  # [b, s, V], alive until the step ends
        vocab_parallel_cross_entropy(logits, target).mean().backward()

    return step


def alibi_step(case: Dict, scale: float = 1.0) -> Callable[[], None]:
    """A few BLOOM layers, forward and backward (``scale`` shrinks the sequence)."""
    import torch

    from megatron_bloom.config.schema import ModelConfig
    from megatron_bloom.models.bloom.model import BloomForCausalLM, causal_lm_loss

    b, s = case["micro_batch_size"], max(2, int(case["seq_length"] * scale))
    cfg = ModelConfig(num_layers=case["num_layers"], hidden_size=case["hidden_size"],
                      num_attention_heads=case["num_attention_heads"], vocab_size=case["vocab"], seq_length=s,
                      init_method_std=0.02, attention_impl=case["attention_impl"], hidden_dropout=0.0,
                      attention_dropout=0.0, checkpoint_activations=case["checkpoint_activations"])
    torch.manual_seed(0)
    model = BloomForCausalLM(cfg).train()
    tokens = torch.randint(0, case["vocab"], (b, s + 1))
    kwargs = {}
    if case["packed"]:
        segment_ids = torch.ones(b, s, dtype=torch.long)
        segment_ids[:, s // 2:] = 2  # two samples per row
        kwargs["segment_ids"] = segment_ids

    def step():
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(tokens[:, :-1], **kwargs), tokens[:, 1:]).backward()

    return step


STEPS = {"loss": loss_step, "alibi": alibi_step}


def worker(case: Dict) -> Dict:
    """In a fresh process: warm up small, then the step's RSS peak, then its profiled torch peak."""
    import gc

    import megatron_bloom

    STEPS[case["case"]](case, scale=1 / 16)()
    step = STEPS[case["case"]](case)
    gc.collect()
    reset = reset_peak_resident()
    before = resident_bytes()
    step()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before if reset else None  # Linux: KiB
    return {"rss_peak_bytes": rss_peak, "torch_peak_bytes": profiled_peak_bytes(step),
            "code": os.path.dirname(os.path.dirname(os.path.abspath(megatron_bloom.__file__)))}


def run_case(case: Dict) -> Dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return dict(case, **json.loads(p.stdout.strip().splitlines()[-1]))


def cases(args) -> List[Dict]:
    common = {"micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length}
    found = []
    if "loss" in args.cases:
        found.append(dict(common, case="loss", hidden_size=args.hidden_size, vocab=args.vocab_size,
                          logits_dtype=args.logits_dtype))
    if "alibi" in args.cases:
        found.append(dict(common, case="alibi", hidden_size=args.hidden_size, vocab=args.alibi_vocab_size,
                          num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                          attention_impl=args.attention_impl, packed=args.packed,
                          checkpoint_activations=args.checkpoint_activations))
    return found


def reference_bytes(row: Dict) -> Dict[str, int]:
    """The sizes to read the peaks against: one fp32 copy of the logits, one ALiBi bias."""
    b, s = row["micro_batch_size"], row["seq_length"]
    if row["case"] == "loss":
        return {"fp32 logits": 4 * b * s * row["vocab"]}  # also for bf16 logits: what the old loss copied them to
    return {"one bias": 4 * (b if row["packed"] else 1) * row["num_attention_heads"] * s * s}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(STEPS), default=["loss", "alibi"])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=BLOOM_PADDED_VOCAB, help="of the loss case")
    p.add_argument("--logits-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="loss case: fp32 behind an fp32 LM head, or bf16 logits given as input (no LM head)")
    p.add_argument("--alibi-vocab-size", type=int, default=1024, help="of the alibi case (small: its loss is not measured)")
    p.add_argument("--num-layers", type=int, default=4, help="of the alibi case")
    p.add_argument("--num-attention-heads", type=int, default=16, help="of the alibi case")
    p.add_argument("--attention-impl", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--packed", action="store_true", help="alibi case: two packed samples per row (segment ids)")
    p.add_argument("--checkpoint-activations", action="store_true", help="alibi case: recompute the layers")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    info = run_info(argv)
    rows = [run_case(case) for case in cases(args)]
    print(format_run_info(info))
    print(f"megatron_bloom from {rows[0]['code'] if rows else '-'}\n")
    table = []
    for r in rows:
        hidden = f" h={r['hidden_size']}" if r["case"] == "alibi" or r["logits_dtype"] == "fp32" else ""
        shape = (f"b={r['micro_batch_size']} s={r['seq_length']}{hidden} V={r['vocab']}"
                 + (f" {r['logits_dtype']} logits" if r["case"] == "loss" else "")
                 + (f" L={r['num_layers']} heads={r['num_attention_heads']} {r['attention_impl']}"
                    f"{' packed' if r['packed'] else ''}{' recompute' if r['checkpoint_activations'] else ''}"
                    if r["case"] == "alibi" else ""))
        (ref_name, ref), = reference_bytes(r).items()
        rss = "-" if r["rss_peak_bytes"] is None else mib(r["rss_peak_bytes"])
        table.append([r["case"], shape, rss, mib(r["torch_peak_bytes"]), f"{ref_name} {mib(ref)}",
                      f"{r['torch_peak_bytes'] / ref:.2f}"])
    print(markdown_table(["case", "shape", "peak RSS above start (MiB)", "peak torch allocations (MiB)",
                          "reference (MiB)", "torch peak / reference"], table))
    if args.json:
        print(json.dumps({"run": info, "rows": rows}))


if __name__ == "__main__":
    run_main(main)
