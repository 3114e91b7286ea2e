"""Training-step throughput of our BLOOM against transformers' BloomForCausalLM, one process.

Both models get the same weights and the same batches, the same loss function and fused AdamW, and
denormal floats flushed to zero (as our trainer sets at start-up; ALiBi makes them frequent). Steps
alternate A/B so drift of the machine (thermal, other load) hits both alike; the median of the
timed steps after warmup is reported.

    python benchmarks/model_step.py                 # markdown table
    python benchmarks/model_step.py --json          # ... and one JSON object as the last line
    python benchmarks/model_step.py --dtype bf16    # torch.autocast(bfloat16) for both
    python benchmarks/model_step.py --dropout 0.1   # both with BLOOM's training dropout
    python benchmarks/model_step.py --plot bench_out  # ... and a PNG bar chart
    python benchmarks/model_step.py --keep-denormals  # torch's default: denormals not flushed
    python benchmarks/model_step.py --profile 3       # ... and where 3 more steps of each spend their time

Model FLOPs use Megatron's formula (the one in the training logs); MFU is achieved model FLOP/s
over this machine's dense matmul peak, measured in the same run (the best of large square
matmuls in the step's dtype on the same threads, sampled between the steps), so "peak" means
what this CPU and torch's BLAS actually reach, not a datasheet number.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import add_model_args, format_run_info, pyplot, run_info, save_figure
from megatron_bloom.errors import fail, run_main
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.distributed.init import flush_denormals
from megatron_bloom.models.bloom.model import BloomForCausalLM, causal_lm_loss
from megatron_bloom.training.engine import emulated_cpu_half_precision
from megatron_bloom.training.flops import flops_per_iteration


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p, hidden_size=512, num_layers=8, vocab_size=8192, seq_length=512, micro_batch_size=4)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention-impl", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="hidden and attention dropout of both models (0.1 is what BLOOM trained with)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero (torch's default; the trainer flushes them)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, profile N more steps of each model with torch.profiler and print "
                        "where a step's time goes (matmuls, attention, elementwise, optimizer, ...)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n x n matmuls that measure the peak")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="DIR", default=None, help="write a PNG bar chart into DIR")
    return p.parse_args(argv)


def matmul_peak_flops(n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul in ``dtype`` (2 n^3 FLOPs each), after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def build_models(args):
    from megatron_bloom.checkpoint.hf import bloom_config_from_model_config

    import transformers

    cfg = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
        attention_impl=args.attention_impl,
        init_method_std=0.02,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
    )
    hcfg = bloom_config_from_model_config(cfg, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    ours = BloomForCausalLM(cfg)
    hf = transformers.BloomForCausalLM(hcfg)
    # Same weights in both, so both see the same activations (and the same denormals, if any).
    state = dict(ours.state_dict())
    rows = hf.transformer.word_embeddings.weight.shape[0]
    for key in ("transformer.word_embeddings.weight", "lm_head.weight"):
        state[key] = state[key][:rows]
    hf.load_state_dict(state, strict=True)
    return ours.train(), hf.train()


def make_optimizer(model, is_hf):
    """Each side's own default: ours is the trainer's optimizer (training/optimizer.py: fused AdamW,
    no decay on biases and LayerNorms); transformers' Trainer defaults to torch's fused AdamW
    ("adamw_torch_fused" with torch >= 2.8), likewise without decay on biases and LayerNorms."""
    if not is_hf:
        from megatron_bloom.config.schema import TrainingConfig
        from megatron_bloom.training.optimizer import build_optimizer

        return build_optimizer(model, TrainingConfig(lr=1e-4, weight_decay=0.1))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, fused=True)


def make_step(model, is_hf, autocast_dtype):
    opt = make_optimizer(model, is_hf)

    def step(ids, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids, use_cache=False).logits if is_hf else model(ids)
            loss = causal_lm_loss(logits, labels)
        loss.backward()
        opt.step()
        return loss.item()

    return step


# Where a step's time goes: torch.profiler's self CPU time of each aten op, by what the op does.
# Names are matched in order; the first category whose pattern is in the op's name wins.
PROFILE_CATEGORIES = (
    ("dense matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")),
    ("attention kernel (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("softmax", ("aten::_softmax", "aten::softmax")),
    ("GELU", ("aten::gelu",)),
    ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("LayerNorm", ("layer_norm",)),
    ("optimizer", ("adam", "aten::_foreach")),
    ("copies", ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::cat", "aten::contiguous")),
)
OTHER = "elementwise and the rest"


def op_category(name: str) -> str:
    for category, patterns in PROFILE_CATEGORIES:
        if any(pattern in name for pattern in patterns):
            return category
    return OTHER


def profile_steps(step, batches) -> dict:
    """Seconds per step by category (self CPU time of each op), and the dense matmuls' FLOPs per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        for ids, labels in batches:
            step(ids, labels)
        wall = time.perf_counter() - t0
    n = len(batches)
    seconds = {category: 0.0 for category, _ in PROFILE_CATEGORIES}
    seconds[OTHER] = 0.0
    matmul_flops = 0
    rest = {}
    for event in prof.key_averages():
        category = op_category(event.key)
        seconds[category] += event.self_cpu_time_total / 1e6 / n
        if category == "dense matmuls":
            matmul_flops += event.flops / n
        elif category == OTHER:
            rest[event.key] = event.self_cpu_time_total / 1e6 / n
    largest_rest = dict(sorted(rest.items(), key=lambda kv: -kv[1])[:4])
    return {"wall_s": wall / n, "seconds": seconds, "matmul_flops": matmul_flops, "largest_rest": largest_rest}


def print_profile(profiles: dict, args, peak: float, medians: dict) -> None:
    b, s, h, layers = args.micro_batch_size, args.seq_length, args.hidden_size, args.num_layers
    # The attention kernel's model FLOPs: QK^T and PV forward (4 b s^2 h per layer), twice that backward.
    attention_flops = 12 * b * s * s * h * layers
    labels = {"ours": "megatron_bloom", "hf": "transformers"}
    print(f"\nWhere a step goes (torch.profiler, self CPU time of each op, mean of {args.profile} steps per model):\n")
    print("| category | " + " | ".join(f"{labels[name]} s/step | share" for name in profiles) + " |")
    print("|---|" + "---|---|" * len(profiles))
    categories = [category for category, _ in PROFILE_CATEGORIES] + [OTHER]
    for category in categories:
        cells = []
        for prof in profiles.values():
            total = sum(prof["seconds"].values())
            cells.append(f"{prof['seconds'][category]:.3f} | {prof['seconds'][category] / total:.0%}")
        print(f"| {category} | " + " | ".join(cells) + " |")
    cells = [f"{sum(p['seconds'].values()):.3f} (wall {p['wall_s']:.3f}) | 100%" for p in profiles.values()]
    print("| all ops | " + " | ".join(cells) + " |")
    print("profiled step wall vs the timed median (what profiling itself costs, and how far to trust the split): "
          + ", ".join(f"{labels[name]} {prof['wall_s']:.3f} s vs {medians[name]:.3f} s "
                      f"({prof['wall_s'] / medians[name] - 1:+.0%})" for name, prof in profiles.items()))
    for name, prof in profiles.items():
        mm_s = prof["seconds"]["dense matmuls"]
        line = (f"{labels[name]}: dense matmuls {prof['matmul_flops'] / 1e9:,.1f} GFLOP per step in {mm_s:.3f} s = "
                f"{prof['matmul_flops'] / mm_s / 1e9:,.1f} GFLOP/s, {prof['matmul_flops'] / mm_s / peak:.0%} of the "
                f"measured peak (at peak: {prof['matmul_flops'] / peak:.3f} s)")
        attn_s = prof["seconds"]["attention kernel (SDPA)"]
        if attn_s > 0:
            line += (f"; attention kernel {attention_flops / 1e9:,.1f} GFLOP (12 b s^2 h L) in {attn_s:.3f} s = "
                     f"{attention_flops / attn_s / peak:.0%} of the peak")
        print(line)
        print(f"{labels[name]}: largest in '{OTHER}': "
              + ", ".join(f"{op} {sec:.3f} s" for op, sec in prof["largest_rest"].items()))


def main(argv=None):
    args = parse_args(argv)
    if args.dtype == "bf16" and emulated_cpu_half_precision("bf16"):
        fail("--dtype bf16: this CPU has no native bf16 matmul kernels and torch emulates them (tens of times "
             "slower than fp32), so the run would take hours and time the emulation; use --dtype fp32 here, or a CPU "
             "with AVX-512 or AMX")
    if args.threads:
        torch.set_num_threads(args.threads)
    # As the trainer does at start-up (init_distributed), for both models: one process, one setting.
    denormals_flushed = False if args.keep_denormals else flush_denormals()
    ours, hf = build_models(args)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    steps = {"ours": make_step(ours, False, autocast_dtype), "hf": make_step(hf, True, autocast_dtype)}
    b, s = args.micro_batch_size, args.seq_length
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    peak_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peaks = [matmul_peak_flops(args.peak_size, peak_dtype)]
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab_size, (b, s + 1), generator=g)
        ids, labels = tokens[:, :-1], tokens[:, 1:]  # [b, s] each
        # A/B, then B/A on the next step, so neither model always runs on a "warm" machine.
        order = ["ours", "hf"] if i % 2 == 0 else ["hf", "ours"]
        for name in order:
            t0 = time.perf_counter()
            losses[name].append(steps[name](ids, labels))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        peaks.append(matmul_peak_flops(args.peak_size, peak_dtype, repeats=2))
    # The best over samples taken around every step: a busy moment lowers one sample, not the peak.
    peak = max(peaks)
    step_flops = flops_per_iteration(b, s, args.num_layers, args.hidden_size, args.vocab_size, recompute=False)

    result = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "vocab_size": args.vocab_size,
        "seq_length": s,
        "micro_batch_size": b,
        "dtype": args.dtype,
        "attention_impl": args.attention_impl,
        "dropout": args.dropout,
        "threads": torch.get_num_threads(),
        "denormals_flushed": denormals_flushed,
        "timed_steps": args.steps,
        "model_flops_per_step": step_flops,
        "matmul_peak_flops": peak,
        "run": run_info(argv),
    }
    print(
        f"BLOOM training step, h={args.hidden_size} L={args.num_layers} heads="
        f"{args.num_attention_heads} vocab={args.vocab_size} seq={s} mbs={b} {args.dtype} dropout={args.dropout}, "
        f"ours attention={args.attention_impl}, torch threads={torch.get_num_threads()}, "
        f"denormals flushed to zero (both models): {'yes' if denormals_flushed else 'no'}\n"
    )
    print("| model | median step (s) | min step (s) | tokens/s | model GFLOP/s | MFU | first / last loss |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("ours", "megatron_bloom"), ("hf", "transformers")):
        med = statistics.median(times[name])
        tps = b * s / med
        result[f"{name}_median_step_s"] = med
        result[f"{name}_tokens_per_s"] = tps
        result[f"{name}_mfu"] = step_flops / med / peak
        print(
            f"| {label} | {med:.3f} | {min(times[name]):.3f} | {tps:,.0f} | {step_flops / med / 1e9:,.1f} | "
            f"{result[f'{name}_mfu']:.1%} | {losses[name][0]:.4f} / {losses[name][-1]:.4f} |"
        )
    result["speedup"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    print(f"\nours / transformers: {result['speedup']:.2f}x")
    print(f"MFU = model FLOP/s (Megatron's formula, {step_flops / 1e9:,.1f} GFLOP per step) / matmul peak "
          f"{peak / 1e9:,.1f} GFLOP/s ({args.peak_size}^3 {args.dtype} matmul, sampled around every step, best)")
    if args.profile:
        profiles = {}
        for name in ("ours", "hf"):
            batches = []
            for _ in range(args.profile):
                tokens = torch.randint(0, args.vocab_size, (b, s + 1), generator=g)
                batches.append((tokens[:, :-1], tokens[:, 1:]))
            profiles[name] = profile_steps(steps[name], batches)
        result["profile"] = profiles
        print_profile(profiles, args, peak, {name: result[f"{name}_median_step_s"] for name in profiles})
    print(f"\n{format_run_info(result['run'])}")
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))


def plot(result: dict, out_dir: str) -> str:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    labels, colors = ["megatron_bloom", "transformers"], ["tab:blue", "tab:gray"]
    ax1.bar(labels, [result["ours_tokens_per_s"], result["hf_tokens_per_s"]], color=colors)
    ax1.set_ylabel("tokens / s (training step)")
    ax1.set_title(f"{result['dtype']}: {result['speedup']:.2f}x")
    ax2.bar(labels, [100 * result["ours_mfu"], 100 * result["hf_mfu"]], color=colors)
    ax2.set_ylabel("MFU (% of measured matmul peak)")
    ax2.set_title(f"h={result['hidden_size']} L={result['num_layers']} s={result['seq_length']} b={result['micro_batch_size']}")
    path = save_figure(fig, out_dir, f"model_step_{result['dtype']}_h{result['hidden_size']}.png")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_main(main)
