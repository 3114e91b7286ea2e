"""What ZeRO and activation checkpointing save: per-rank state bytes by stage, activation bytes.

ZeRO: the same BLOOM trains a few steps at DP=2 (TP=PP=1) under ZeRO stages 0-3, and
``megatron_bloom.planning.measure`` counts the bytes each rank holds by kind (weights, gradients,
optimizer states, other) at the step's peaks. The ZeRO paper's formulas (Rajbhandari et al. 2020),
for Psi parameters, N_d data-parallel ranks and (w, g, K) bytes per parameter of weights, gradients
and optimizer states -- (2, 2, 12) in mixed precision, (4, 4, 8) in fp32 (Adam's m and v; the
weights are the fp32 master) -- give per rank:

    stage 0  (w + g + K) Psi        stage 2  w Psi + (g + K) Psi / N_d
    stage 1  (w + g) Psi + K Psi / N_d    stage 3  (w + g + K) Psi / N_d

Beside them, the planner's DeepSpeed-as-built figures (``planning/memory.py``), which add what
DeepSpeed really allocates (an fp32 partition copy in fp32 ZeRO >= 1, bf16's fp32 gradient
accumulation, ZeRO-3's gathered weights).

Activations: one process, one micro-batch, forward + backward, with and without
``checkpoint_activations``. "Saved" is what autograd keeps for backward at the end of the forward
pass (``saved_tensors_hooks``, deduplicated by storage, parameters excluded: deterministic).
"Peak" is the largest live allocation during forward + backward from torch's profiler (includes
the recomputed block, gradient temporaries and the parameter gradients' in-place accumulation
buffers). Megatron's per-layer formula s b h (34 + 5 a s / h) bytes is for half precision with
dropout; in fp32 without dropout (BLOOM's setting) it is s b h (64 + 4 a s / h) (see
``planning/memory.py``); with checkpointing a layer keeps only its input, 4 s b h bytes.

    python benchmarks/zero_memory.py                    # markdown tables (~1 min on 2 cores)
    python benchmarks/zero_memory.py --json --plot out  # ... a JSON object last, PNGs in out/
"""
from __future__ import annotations

import argparse
import itertools
from typing import Dict, List

from benchmarks.common import (
    add_model_args, add_output_args, finish, format_run_info, markdown_table, mib, pyplot, run_info, save_figure)
from megatron_bloom.errors import run_main

ZERO_KINDS = ("weights", "gradients", "optimizer_states")
PAPER_BYTES = {"fp32": (4, 4, 8), "fp16": (2, 2, 12), "bf16": (2, 2, 12)}
"""(w, g, K) bytes per parameter in the ZeRO paper's accounting."""


def model_config(args, zero_stage: int = 0, checkpoint_activations: bool = False, attention_impl: str = "sdpa"):
    from megatron_bloom.config import RunConfig
    from megatron_bloom.config.schema import ModelConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                            seq_length=args.seq_length, init_method_std=0.02,
                            checkpoint_activations=checkpoint_activations, attention_impl=attention_impl,
                            # Without dropout, as in the README's figures (with it, CPU adds its masks in
                            # the input dtype: see planning/memory.py).
                            hidden_dropout=0.0, attention_dropout=0.0)
    cfg.parallel.zero_stage = zero_stage
    cfg.parallel.distributed_backend = "gloo"
    t = cfg.training
    t.micro_batch_size, t.global_batch_size = args.micro_batch_size, args.micro_batch_size * args.data_parallel_size
    t.lr, t.train_iters, t.seed = 1e-4, 100, 1234
    t.bf16, t.fp16 = args.precision == "bf16", args.precision == "fp16"
    # fp16 starts at a loss scale of 2^32 and skips overflowing steps, which create no Adam state.
    t.initial_loss_scale = 2.0**8
    return cfg


def paper_bytes(precision: str, zero_stage: int, dp: int, parameters: int) -> Dict[str, float]:
    w, g, k = PAPER_BYTES[precision]
    return {"weights": parameters * w / (dp if zero_stage >= 3 else 1),
            "gradients": parameters * g / (dp if zero_stage >= 2 else 1),
            "optimizer_states": parameters * k / (dp if zero_stage >= 1 else 1)}


def zero_worker(args, zero_stage: int) -> dict:
    """One rank (run by ``run_distributed``): build, train ``--steps`` steps, count what it holds."""
    import torch.distributed as dist

    from megatron_bloom.config import validate_config
    from megatron_bloom.planning.measure import measure_engine

    cfg = model_config(args, zero_stage)
    validate_config(cfg, dist.get_world_size())
    measured = measure_engine(cfg, args.steps).to_dict()
    # Every rank leaves together: a ZeRO-3 engine torn down while a peer still runs can abort.
    dist.barrier()
    return measured


def measure_zero(args) -> List[dict]:
    from megatron_bloom.models.bloom.sizes import count_parameters
    from megatron_bloom.planning.memory import state_bytes_per_parameter
    from megatron_bloom.testing import run_distributed

    dp = args.data_parallel_size
    psi = count_parameters(model_config(args).model)
    rows = []
    for stage in args.zero_stages:
        ranks = run_distributed(zero_worker, dp, args, stage, timeout=args.timeout, env={"DS_ACCELERATOR": "cpu"})
        # The fullest rank sets the memory a layout needs.
        measured = {k: max(r["bytes"][k] for r in ranks) for k in (*ZERO_KINDS, "other")}
        planner = dict(zip(ZERO_KINDS, (psi * x for x in state_bytes_per_parameter(args.precision, stage, dp))))
        rows.append({"zero_stage": stage, "parameters": psi, "measured": measured,
                     "paper": paper_bytes(args.precision, stage, dp, psi), "planner": planner,
                     "ranks": [{"rank": r["rank"], "bytes": r["bytes"], "largest_other": r["largest_other"]}
                               for r in ranks]})
    return rows


class SavedTensorCounter:
    """Bytes autograd holds for backward right now, each storage once (parameters are weights)."""

    def __init__(self, parameters) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in parameters}
        self.live: Dict[int, List[int]] = {}  # storage -> [bytes, references]
        self.current = 0
        counter = self

        class Packed:
            """Held by the graph instead of the tensor; its end is the saved tensor's release."""

            def __init__(self, t):
                self.t = t
                storage = t.untyped_storage()
                self.key = None if storage.data_ptr() in counter.params else storage.data_ptr()
                if self.key is not None:
                    entry = counter.live.setdefault(self.key, [storage.nbytes(), 0])
                    if entry[1] == 0:
                        counter.current += entry[0]
                    entry[1] += 1

            def __del__(self):
                if self.key is not None:
                    entry = counter.live[self.key]
                    entry[1] -= 1
                    if entry[1] == 0:
                        counter.current -= entry[0]
                        del counter.live[self.key]

        self.packed = Packed

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.packed, lambda p: p.t)


def profiled_peak_bytes(step) -> int:
    """Largest live allocation (bytes above the start) while ``step()`` runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate((n for _, n in events), initial=0))


def measure_activations(args) -> List[dict]:
    import torch

    from megatron_bloom.models.bloom.pipeline import bloom_layer_specs
    from megatron_bloom.training.deepspeed_glue import BloomSequential
    from megatron_bloom.training.losses import PretrainingLoss
    from megatron_bloom.planning.measure import saved_activation_bytes
    from megatron_bloom.planning.memory import block_activation_bytes

    b, s, h, a, L = (args.micro_batch_size, args.seq_length, args.hidden_size, args.num_attention_heads,
                     args.num_layers)
    e = 4  # fp32
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (b, s + 1), generator=gen)
    ids, labels = tokens[:, :-1], (tokens[:, 1:], torch.ones(b, s))
    rows = []
    for impl in args.attention_impls:
        for recompute in (False, True):
            cfg = model_config(args, checkpoint_activations=recompute, attention_impl=impl)
            vp = cfg.model.padded_vocab_size(1)
            torch.manual_seed(0)
            model = BloomSequential(bloom_layer_specs(cfg.model, vp), PretrainingLoss(None, 0), cfg.training.seed)
            model(ids, labels).backward()  # gradients exist from here on: later backwards add into them
            model.zero_grad(set_to_none=False)
            counter = SavedTensorCounter(model.parameters())
            with counter.hooks():
                loss = model(ids, labels)
                saved = counter.current
                loss.backward()
            del loss

            def step():
                model(ids, labels).backward()

            peak = profiled_peak_bytes(step)
            block_full = block_activation_bytes(cfg.model, s, b, 1, "fp32", mask_in_input_dtype=True)  # s b h (64 + 4 a s / h)
            per_block = e * s * b * h if recompute else block_full
            # Outside the blocks: the embedding output (word_embeddings_layernorm's input), ln_f's and
            # the LM head's inputs, and the softmax the loss keeps ([b, s, Vp], fp32).
            ends = 3 * e * s * b * h + 4 * s * b * vp
            rows.append({"attention_impl": impl, "checkpoint_activations": recompute, "saved_bytes": saved,
                         "formula_bytes": L * per_block + ends, "peak_bytes": peak,
                         "block_measured_bytes": saved_activation_bytes(cfg, torch.float32),
                         "block_formula_bytes": block_full,
                         "megatron_half_precision_block_bytes": s * b * h * (34 + 5 * a * s / h)})
    return rows


def check_args(args) -> None:
    from megatron_bloom.errors import UserError

    if args.precision == "bf16" and 0 in args.zero_stages:
        raise UserError("bf16 with ZeRO stage 0 does not start in DeepSpeed (no fp32-accumulating bf16 path "
                        "without ZeRO); drop 0 from --zero-stages or use --precision fp16/fp32")
    if any(z not in (0, 1, 2, 3) for z in args.zero_stages):
        raise UserError(f"--zero-stages {args.zero_stages}: stages are 0, 1, 2 and 3")
    if args.data_parallel_size < 1:
        raise UserError("--data-parallel-size must be at least 1")
    if args.steps < 2:
        raise UserError(f"--steps {args.steps}: use at least 2 (Adam creates its state in the first optimizer step, "
                        "after that step's census)")
    if args.hidden_size % args.num_attention_heads:
        raise UserError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                        f"{args.num_attention_heads}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data-parallel-size", type=int, default=2, help="ranks of the ZeRO runs")
    p.add_argument("--precision", choices=sorted(PAPER_BYTES), default="fp32", help="of the ZeRO runs")
    p.add_argument("--zero-stages", type=int, nargs="*", default=[0, 1, 2, 3], help="none: skip the ZeRO runs")
    p.add_argument("--attention-impls", nargs="*", choices=["eager", "sdpa"], default=["eager", "sdpa"],
                   help="of the activation runs (eager is the attention Megatron's formula counts); none: skip")
    p.add_argument("--steps", type=int, default=2, help="training steps; the last one is counted (>= 2)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per ZeRO run before its ranks are killed")
    add_output_args(p)
    return p.parse_args(argv)


def print_report(result: dict) -> None:
    c = result["config"]
    print(f"BLOOM h={c['hidden_size']} L={c['num_layers']} heads={c['num_attention_heads']} vocab={c['vocab_size']} "
          f"seq={c['seq_length']} mbs={c['micro_batch_size']}\n{format_run_info(result['run'])}\n")
    if result["zero"]:
        psi = result["zero"][0]["parameters"]
        print(f"ZeRO at DP={c['data_parallel_size']}, {c['precision']}, Psi = {psi:,} parameters; MiB per rank "
              f"(fullest rank) as measured / ZeRO paper / planner (DeepSpeed as built):\n")
        rows = []
        for r in result["zero"]:
            cells = [f"{mib(r['measured'][k])} / {mib(r['paper'][k])} / {mib(r['planner'][k])}" for k in ZERO_KINDS]
            total_m = sum(r["measured"][k] for k in ZERO_KINDS)
            total_p = sum(r["paper"][k] for k in ZERO_KINDS)
            rows.append([r["zero_stage"], *cells, f"{mib(total_m)} / {mib(total_p)}", mib(r["measured"]["other"])])
        print(markdown_table(["ZeRO stage", "weights", "gradients", "optimizer states", "sum (measured / paper)",
                              "other (buckets)"], rows))
    if result["activations"]:
        print("\nActivations, one micro-batch, fp32, TP=1, forward + backward (MiB):\n")
        rows = []
        for r in result["activations"]:
            rows.append([r["attention_impl"], "yes" if r["checkpoint_activations"] else "no",
                         mib(r["saved_bytes"]), mib(r["formula_bytes"]), f"{r['saved_bytes'] / r['formula_bytes']:.3f}",
                         mib(r["peak_bytes"]), mib(r["block_measured_bytes"]), mib(r["block_formula_bytes"])])
        print(markdown_table(["attention", "checkpointing", "saved after forward", "formula", "ratio",
                              "peak during fwd+bwd (profiler)", "one block measured", "one block formula"], rows))
        r = result["activations"][0]
        print(f"\n(Megatron's half-precision-with-dropout block, s b h (34 + 5 a s / h): "
              f"{mib(r['megatron_half_precision_block_bytes'])} MiB)")


def plot(result: dict, directory: str) -> List[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if result["zero"]:
        ax = axes[0]
        stages = [r["zero_stage"] for r in result["zero"]]
        bottom_m, bottom_p = [0.0] * len(stages), [0.0] * len(stages)
        for kind, color in zip(ZERO_KINDS, ("C0", "C1", "C2")):
            mv = [r["measured"][kind] / 2**20 for r in result["zero"]]
            pv = [r["paper"][kind] / 2**20 for r in result["zero"]]
            ax.bar([x - 0.2 for x in stages], mv, 0.4, bottom=bottom_m, color=color, label=f"{kind} measured")
            ax.bar([x + 0.2 for x in stages], pv, 0.4, bottom=bottom_p, color=color, hatch="//", alpha=0.5,
                   label=f"{kind} paper")
            bottom_m = [b + v for b, v in zip(bottom_m, mv)]
            bottom_p = [b + v for b, v in zip(bottom_p, pv)]
        ax.set_xticks(stages)
        ax.set_xlabel("ZeRO stage")
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"model states per rank, DP={result['config']['data_parallel_size']}, "
                     f"{result['config']['precision']}: measured (left), paper (right)")
        ax.legend(fontsize=7)
    if result["activations"]:
        ax = axes[1]
        labels = [f"{r['attention_impl']}\n{'ckpt' if r['checkpoint_activations'] else 'no ckpt'}"
                  for r in result["activations"]]
        xs = range(len(labels))
        ax.bar([x - 0.27 for x in xs], [r["saved_bytes"] / 2**20 for r in result["activations"]], 0.27, label="saved")
        ax.bar(list(xs), [r["formula_bytes"] / 2**20 for r in result["activations"]], 0.27, label="formula")
        ax.bar([x + 0.27 for x in xs], [r["peak_bytes"] / 2**20 for r in result["activations"]], 0.27,
               label="peak (profiler)")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("MiB")
        ax.set_title("activations, one micro-batch")
        ax.legend()
    return [save_figure(fig, directory, "zero_memory.png")]


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    if args.plot:
        pyplot()  # fail now, not after the runs
    config = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size",
                                            "seq_length", "micro_batch_size", "data_parallel_size", "precision",
                                            "zero_stages", "attention_impls", "steps")}
    result = {"run": run_info(argv), "config": config, "zero": measure_zero(args) if args.zero_stages else [],
              "activations": measure_activations(args) if args.attention_impls else []}
    print_report(result)
    finish(result, args, plot)


if __name__ == "__main__":
    run_main(main)
