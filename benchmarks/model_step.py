"""Training-step throughput of our BLOOM against transformers' BloomForCausalLM, one process.

Both models get the same weights and the same batches, the same loss function and AdamW. Steps
alternate A/B so drift of the machine (thermal, other load) hits both alike; the median of the
timed steps after warmup is reported.

    python benchmarks/model_step.py                 # markdown table
    python benchmarks/model_step.py --json          # ... and one JSON object as the last line
    python benchmarks/model_step.py --dtype bf16    # torch.autocast(bfloat16) for both
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bloom.config.schema import ModelConfig  # noqa: E402
from megatron_bloom.models.bloom.model import BloomForCausalLM, causal_lm_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention-impl", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


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


def make_step(model, is_hf, autocast_dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(ids, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids, use_cache=False).logits if is_hf else model(ids)
            loss = causal_lm_loss(logits, labels)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, hf = build_models(args)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    steps = {"ours": make_step(ours, False, autocast_dtype), "hf": make_step(hf, True, autocast_dtype)}
    b, s = args.micro_batch_size, args.seq_length
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
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

    result = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "vocab_size": args.vocab_size,
        "seq_length": s,
        "micro_batch_size": b,
        "dtype": args.dtype,
        "attention_impl": args.attention_impl,
        "threads": torch.get_num_threads(),
        "timed_steps": args.steps,
    }
    print(
        f"BLOOM training step, h={args.hidden_size} L={args.num_layers} heads="
        f"{args.num_attention_heads} vocab={args.vocab_size} seq={s} mbs={b} {args.dtype}, "
        f"ours attention={args.attention_impl}, torch threads={torch.get_num_threads()}\n"
    )
    print("| model | median step (s) | min step (s) | tokens/s | first / last loss |")
    print("|---|---|---|---|---|")
    for name, label in (("ours", "megatron_bloom"), ("hf", "transformers")):
        med = statistics.median(times[name])
        tps = b * s / med
        result[f"{name}_median_step_s"] = med
        result[f"{name}_tokens_per_s"] = tps
        print(
            f"| {label} | {med:.3f} | {min(times[name]):.3f} | {tps:,.0f} | "
            f"{losses[name][0]:.4f} / {losses[name][-1]:.4f} |"
        )
    result["speedup"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    print(f"\nours / transformers: {result['speedup']:.2f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
