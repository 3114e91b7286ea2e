"""What denormal floats cost one layer's attention: SDPA forward+backward with BLOOM's ALiBi bias.

ALiBi adds ``slope * key_position`` to every score, so within a row the scores of distant keys sit
far below the row's maximum and their ``exp`` lands in float32's denormal range (1e-45 to 1e-38),
which x86 computes many times more slowly. This times one ``F.scaled_dot_product_attention`` call
as our attention makes it (the bias from ``make_alibi_mask``, the model's scale), forward and
backward, for three cases:

- ``alibi``: the ALiBi bias, denormals kept (torch's default);
- ``causal``: the same bias with every slope 0, i.e. a plain causal mask as a float bias of the
  same shape (the same kernel, masked keys and memory traffic, without the underflow);
- ``alibi-flushed``: the ALiBi bias with denormals flushed to zero, as the trainer sets at
  start-up (``megatron_bloom.distributed.init.flush_denormals``).

torch's worker threads copy the flush setting when they are created, so each case runs in a
fresh process of its own; the cases alternate over ``--rounds`` rounds and the median per case is
reported. The eager softmax of the same scores gives the share of attention probabilities that
are denormal (in the unflushed processes).

    python benchmarks/denormals.py                       # 4 x 8 heads x 512 tokens, head dim 64
    python benchmarks/denormals.py --json --plot DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

CASES = ("alibi", "causal", "alibi-flushed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=10, help="timed forward+backward calls per process")
    p.add_argument("--rounds", type=int, default=3, help="processes per case, alternating between the cases")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--worker", choices=CASES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots into DIR (needs matplotlib)")
    args = p.parse_args(argv)
    for flag in ("micro_batch_size", "num_attention_heads", "seq_length", "head_dim", "iters", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def worker(args) -> dict:
    """One case in this process: median milliseconds of forward+backward, and the denormal share."""
    import torch
    import torch.nn.functional as F

    from megatron_bloom.distributed.init import flush_denormals
    from megatron_bloom.models.bloom.alibi import alibi_slopes, make_alibi_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    # Before torch's first parallel op: the worker threads copy the setting when they are created.
    flushed = flush_denormals() if args.worker == "alibi-flushed" else False
    b, heads, s, hn = args.micro_batch_size, args.num_attention_heads, args.seq_length, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, s, hn, generator=g).requires_grad_() for _ in range(3))  # [b, np, s, hn]
    grad = torch.randn(b, heads, s, hn, generator=g)
    slopes = torch.zeros(heads) if args.worker == "causal" else alibi_slopes(heads)
    bias = make_alibi_mask(s).bias(slopes)  # [1, np, s, s]: slope * key position, finfo.min on masked keys
    scale = 1.0 / math.sqrt(hn)

    def call():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    for _ in range(2):
        call()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        probs = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)  # [b, np, s, s]
        tiny = torch.finfo(torch.float32).tiny
        denormal = int(((probs > 0) & (probs < tiny)).sum())
    return {"case": args.worker, "ms": 1e3 * statistics.median(times), "flushed": flushed,
            "denormal_share": denormal / probs.numel(), "threads": torch.get_num_threads()}


def run_case(case: str, argv) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", case]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        from megatron_bloom.errors import UserError

        raise UserError(f"the {case} case failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from benchmarks.common import finish, format_run_info, markdown_table, run_info

    child_argv = [a for a in argv if a != "--json"]
    if args.plot:
        i = child_argv.index("--plot")
        del child_argv[i:i + 2]
    runs = {case: [] for case in CASES}
    for r in range(args.rounds):
        # Rotate the order so that no case always runs first on a cold or warm machine.
        for case in CASES[r % len(CASES):] + CASES[:r % len(CASES)]:
            runs[case].append(run_case(case, child_argv))
    result = {"micro_batch_size": args.micro_batch_size, "num_attention_heads": args.num_attention_heads,
              "seq_length": args.seq_length, "head_dim": args.head_dim, "iters": args.iters, "rounds": args.rounds,
              "threads": runs["alibi"][0]["threads"], "run": run_info(argv), "cases": {}}
    for case in CASES:
        ms = [run["ms"] for run in runs[case]]
        result["cases"][case] = {"median_ms": statistics.median(ms), "per_process_ms": ms,
                                 "flushed": all(run["flushed"] for run in runs[case]),
                                 "denormal_share": runs[case][0]["denormal_share"]}
    base = result["cases"]["causal"]["median_ms"]
    rows = []
    for case in CASES:
        c = result["cases"][case]
        share = f"{c['denormal_share']:.1%}" if not c["flushed"] else "0 (flushed)"
        rows.append([case, f"{c['median_ms']:.1f}", " / ".join(f"{ms:.1f}" for ms in c["per_process_ms"]),
                     f"{c['median_ms'] / base:.2f}x", share])
    print(f"SDPA forward+backward, fp32, b={args.micro_batch_size} heads={args.num_attention_heads} "
          f"s={args.seq_length} head dim={args.head_dim}, torch threads={result['threads']}, median of "
          f"{args.iters} calls per process, {args.rounds} processes per case\n")
    print(markdown_table(["case", "median ms", "per process ms", "vs causal", "denormal probabilities"], rows))
    print(f"\n{format_run_info(result['run'])}")
    finish(result, args, plot)


def plot(result: dict, out_dir: str) -> list:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(CASES), [result["cases"][c]["median_ms"] for c in CASES], color=["tab:red", "tab:gray", "tab:blue"])
    ax.set_ylabel("ms per forward+backward")
    ax.set_title(f"SDPA, b={result['micro_batch_size']} heads={result['num_attention_heads']} s={result['seq_length']}")
    return [save_figure(fig, out_dir, "denormals_sdpa.png")]


if __name__ == "__main__":
    from megatron_bloom.errors import run_main

    run_main(main)
