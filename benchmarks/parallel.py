"""What each parallel dimension costs: step time, bytes communicated by kind, pipeline bubble.

Every layout trains the same BLOOM (fp32, ZeRO-0 by default) at the same global batch on
spawned gloo ranks. ``torch.distributed``'s collectives are wrapped before the engine exists
(DeepSpeed's comm layer and our TP layers both end there), and the bytes each rank hands to them
are counted per kind and per process group during the timed steps after warm-up:

    all_reduce, broadcast, reduce, send, recv: the tensor; all_gather: the gathered output;
    reduce_scatter, all_to_all: the input (the "size" of nccl-tests; a ring moves 2(n-1)/n of an
    all-reduce's size per rank, (n-1)/n of a gather's or scatter's).

Analytic volume per step and rank (elements x 4 bytes; b micro batch, s sequence, h hidden, m
micro-batches per step per DP rank, Vp padded vocabulary, t TP, N parameters on the rank):

    tp   m (4 b s h per block on the stage: Megatron's 2 all-reduces forward + 2 backward
           + b s h on the first stage: vocab-parallel embedding, forward
           + b s h on the last stage: LM-head input gradient, backward
           + 3 b s on the last stage: max, target logit and sum of exp of the vocab-parallel loss)
    pp   send: m b s h activations forward from every stage but the last, m b s h gradients
         backward from every stage but the first; embedding group: Vp h / t, the tied-embedding
         gradient all-reduced between the first and the last stage. With TP > 1 DeepSpeed's
         pipeline partitions what it sends ("pipe_partitioned"): each TP rank sends 1/t of it
         (plus a small meta tensor) and the receiver all-gathers it over TP (pp_gather: b s h per
         received activation or gradient, and again in backward for each output a stage kept
         partitioned: m (2 [not last stage] + [not first stage]) b s h)
    dp   ZeRO-0: N (gradient all-reduce); ZeRO-1: N reduce(-scatter) + N all-gather of the
         updated parameters

The bubble runs PP=2 (TP=DP=1) with m micro-batches and times DeepSpeed's pipeline instructions
on each stage: bubble = 1 - (the stage's forward + backward time) / (the step's 1F1B window, from
the first instruction on any stage to the last stage reaching the gradient reduction), against the
ideal (p - 1) / (m + p - 1) of equal stages and free communication.

    python benchmarks/parallel.py                    # markdown tables (~2-3 min on 2 cores)
    python benchmarks/parallel.py --json --plot out  # ... a JSON object last, PNGs in out/
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from benchmarks.common import (
    add_model_args, add_output_args, finish, format_run_info, markdown_table, mib, pyplot, run_info, save_figure)
from megatron_bloom.errors import run_main

DEFAULT_LAYOUTS = "1,1,1 2,1,1 1,2,1 1,1,2 2,2,1"
ELEMENT_BYTES = 4  # fp32

# torch.distributed function -> (kind, argument whose bytes count, whether it is a list, peer argument)
COLLECTIVES = {
    "all_reduce": ("all_reduce", "tensor", False, None),
    "all_reduce_coalesced": ("all_reduce", "tensors", True, None),
    "reduce": ("reduce", "tensor", False, None),
    "broadcast": ("broadcast", "tensor", False, None),
    "all_gather": ("all_gather", "tensor_list", True, None),
    "all_gather_into_tensor": ("all_gather", "output_tensor", False, None),
    "_all_gather_base": ("all_gather", "output_tensor", False, None),
    "reduce_scatter": ("reduce_scatter", "input_list", True, None),
    "reduce_scatter_tensor": ("reduce_scatter", "input", False, None),
    "_reduce_scatter_base": ("reduce_scatter", "input", False, None),
    "all_to_all_single": ("all_to_all", "input", False, None),
    "all_to_all": ("all_to_all", "input_tensor_list", True, None),
    "send": ("send", "tensor", False, "dst"),
    "isend": ("send", "tensor", False, "dst"),
    "recv": ("recv", "tensor", False, "src"),
    "irecv": ("recv", "tensor", False, "src"),
}


class CommCounter:
    """Wraps the collectives of ``torch.distributed``; counts bytes per (kind, group) while ``on``.

    Groups are named by their ranks: ``tp``, ``pp``, ``dp``, ``embedding`` (first + last stage),
    ``mp`` (TP x PP) or ``world``; a one-rank group communicates nothing and is not counted.
    DeepSpeed builds its own groups, so they are recognised by their rank sets, not by identity.
    """

    def __init__(self) -> None:
        self.on = False
        self.state = None
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        self._names: Dict[int, str] = {}

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def install(self) -> None:
        """Must run before DeepSpeed's comm backend exists: it keeps references to some functions."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, spec in COLLECTIVES.items():
            owner = dist if hasattr(dist, name) else c10d
            setattr(owner, name, self._wrap(getattr(owner, name), *spec))

    def _wrap(self, fn, kind, arg, is_list, peer_arg):
        import functools

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.on:
                bound = signature.bind_partial(*args, **kwargs).arguments
                tensors = bound[arg] if is_list else [bound[arg]]
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                group = self._group_name(bound.get("group"), bound.get(peer_arg) if peer_arg else None)
                if group is not None:
                    self.bytes[f"{kind}/{group}"] += nbytes
                    self.calls[f"{kind}/{group}"] += 1
            return fn(*args, **kwargs)

        return counted

    def _group_name(self, group, peer) -> Optional[str]:
        import torch.distributed as dist

        s = self.state
        if peer is not None:  # point to point: which of our groups holds both ends
            me = dist.get_rank()
            for name in ("pp", "tp", "dp"):
                ranks = getattr(s, f"{name}_ranks")
                if me in ranks and peer in ranks:
                    return name
            return "other"
        if group is None or group is dist.GroupMember.WORLD:
            return "world" if dist.get_world_size() > 1 else None
        key = id(group)
        if key not in self._names:
            ranks = sorted(dist.get_process_group_ranks(group))
            named = {name: sorted(getattr(s, f"{name}_ranks")) for name in ("tp", "pp", "dp", "embedding")}
            named["mp"] = sorted(set(s.tp_ranks) | set(s.pp_ranks)) if s.dims.tp * s.dims.pp > 1 else [-1]
            named["world"] = list(range(dist.get_world_size()))
            match = next((n for n, r in named.items() if r == ranks), "other")
            self._names[key] = None if len(ranks) == 1 else match
        return self._names[key]


class InstructionTimer:
    """Times DeepSpeed's pipeline instructions on this stage (ForwardPass, RecvGrad, ...)."""

    def __init__(self, ds_engine) -> None:
        self.total: Dict[str, float] = defaultdict(float)
        self.first_start: Optional[float] = None
        self.pipelined_end: Optional[float] = None
        table = dict(type(ds_engine)._INSTRUCTION_MAP)
        for cls, fn in list(table.items()):
            table[cls] = self._wrap(cls.__name__, fn)
        ds_engine._INSTRUCTION_MAP = table

    def reset(self) -> None:
        self.total.clear()
        self.first_start = self.pipelined_end = None

    def _wrap(self, name, fn):
        def timed(engine, *args, **kwargs):
            t0 = time.perf_counter()
            if self.first_start is None:
                self.first_start = t0
            if name in ("ReduceTiedGrads", "ReduceGrads") and self.pipelined_end is None:
                self.pipelined_end = t0  # the 1F1B part of the step ends here
            out = fn(engine, *args, **kwargs)
            self.total[name] += time.perf_counter() - t0
            return out

        return timed

    def record(self) -> Dict[str, float]:
        """This stage's part of the step; ``bubble_of_stages`` puts the stages on one clock."""
        return {"start": self.first_start, "end": self.pipelined_end,
                "busy_s": self.total["ForwardPass"] + self.total["BackwardPass"],
                "recv_s": self.total["RecvActivation"] + self.total["RecvGrad"],
                "send_s": self.total["SendActivation"] + self.total["SendGrad"]}


def bubble_of_stages(records: List[Dict[str, float]]) -> List[Dict[str, float]]:
    """Idle share of each stage over the step's 1F1B window: from the first instruction of any stage
    to the last stage reaching the gradient reduction. ``time.perf_counter`` is CLOCK_MONOTONIC on
    Linux, one clock for every process of the machine, so stages' timestamps compare."""
    window = max(r["end"] for r in records) - min(r["start"] for r in records)
    return [{"window_s": window, "busy_s": r["busy_s"], "bubble": 1 - r["busy_s"] / window,
             "recv_wait": r["recv_s"] / window, "send": r["send_s"] / window} for r in records]


def analytic_bytes(blocks: int, first: bool, last: bool, tp: int, pp: int, dp: int, m: int, b: int, s: int,
                   h: int, padded_vocab: int, parameters: int, zero_stage: int) -> Dict[str, int]:
    """Expected bytes per step of one rank, by kind (see the module docstring)."""
    e = ELEMENT_BYTES
    out = {"tp": 0, "pp_send": 0, "pp_gather": 0, "pp_tied": 0, "dp": 0}
    if tp > 1:
        per_micro = 4 * blocks * b * s * h + (b * s * h if first else 0) + (b * s * h if last else 0)
        out["tp"] = m * (per_micro * e + (3 * b * s * 4 if last else 0))  # the loss reductions are fp32
    if pp > 1:
        out["pp_send"] = m * b * s * h * e * ((0 if last else 1) + (0 if first else 1)) // tp
        if tp > 1:
            out["pp_gather"] = m * b * s * h * e * ((0 if last else 2) + (0 if first else 1))
        out["pp_tied"] = padded_vocab * h // tp * e if (first or last) else 0
    if dp > 1:
        out["dp"] = parameters * e * (2 if zero_stage == 1 else 1)
    return out


def measured_kinds(counted: Dict[str, int]) -> Dict[str, int]:
    """Counted bytes grouped like ``analytic_bytes`` (collectives on the matching group), + the rest."""
    out = {"tp": 0, "pp_send": 0, "pp_gather": 0, "pp_tied": 0, "dp": 0, "other": 0}
    for key, n in counted.items():
        kind, group = key.split("/")
        if group == "tp" and kind == "all_reduce":
            out["tp"] += n
        elif group == "pp" and kind == "send":
            out["pp_send"] += n
        elif group == "tp" and kind == "all_gather":
            out["pp_gather"] += n
        elif group in ("embedding", "pp") and kind == "all_reduce":
            # The tied-embedding gradient (at PP=2, TP=DP=1 the embedding group is the pipeline group).
            out["pp_tied"] += n
        elif group == "dp" and kind in ("all_reduce", "reduce", "reduce_scatter", "all_gather"):
            out["dp"] += n
        elif kind != "recv":  # a receive is the other end of a send already counted
            out["other"] += n
    return out


def model_config(args, tp: int, pp: int, global_batch_size: int):
    from megatron_bloom.config import RunConfig
    from megatron_bloom.config.schema import ModelConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                            seq_length=args.seq_length, init_method_std=0.02)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.parallel.zero_stage = args.zero_stage
    t = cfg.training
    t.micro_batch_size, t.global_batch_size = args.micro_batch_size, global_batch_size
    t.clip_grad, t.lr, t.train_iters, t.seed = 1.0, 1e-4, 100, 1234
    return cfg


def layout_worker(args, tp: int, pp: int, global_batch_size: int) -> dict:
    """One rank of one layout (run by ``run_distributed``): warm up, then time and count steps."""
    import torch
    import torch.distributed as dist

    counter = CommCounter()
    counter.install()  # before DeepSpeed's comm backend captures any function

    from megatron_bloom.config import validate_config
    from megatron_bloom.distributed import init_distributed
    from megatron_bloom.models.bloom.pipeline import EmbeddingPipe, ParallelTransformerLayerPipe
    from megatron_bloom.training.engine import BloomEngine

    cfg = model_config(args, tp, pp, global_batch_size)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, pp, backend="gloo")
    counter.state = state
    engine = BloomEngine(cfg, state)
    timer = InstructionTimer(engine.engine) if engine.is_pipeline and pp > 1 else None
    m, b, s = engine.gradient_accumulation_steps, args.micro_batch_size, args.seq_length
    gen = torch.Generator().manual_seed(state.dp_rank)

    def batches():
        if not engine.reads_data:
            return []
        out = []
        for _ in range(m):
            tokens = torch.randint(0, args.vocab_size, (b, s + 1), generator=gen)
            out.append((tokens[:, :-1], (tokens[:, 1:], torch.ones(b, s))))
        return out

    for _ in range(args.warmup):
        engine.train_step(batches())
    times, counts, bubbles = [], [], []
    for _ in range(args.steps):
        data = batches()
        dist.barrier()  # every rank starts the step together (not counted: barrier is not wrapped)
        counter.reset()
        if timer:
            timer.reset()
        counter.on = True
        t0 = time.perf_counter()
        engine.train_step(data)
        times.append(time.perf_counter() - t0)
        counter.on = False
        counts.append(dict(counter.bytes))
        if timer:
            bubbles.append(timer.record())
    module = engine.engine.module
    blocks = sum(isinstance(x, ParallelTransformerLayerPipe) for x in module.modules())
    has_embedding = any(isinstance(x, EmbeddingPipe) for x in module.modules())
    parameters = sum(p.numel() for p in module.parameters())
    first, last = state.is_first_stage, state.is_last_stage
    analytic = analytic_bytes(blocks, first and has_embedding, last and has_embedding, tp, pp, state.dims.dp, m, b, s,
                              args.hidden_size, engine.padded_vocab_size, parameters, args.zero_stage)
    return {"rank": dist.get_rank(), "stage": state.pp_rank, "step_s": times, "counted": counts,
            "calls": dict(counter.calls), "analytic": analytic, "bubble": bubbles, "parameters": parameters}


def run_layout(args, tp: int, pp: int, dp: int, global_batch_size: int) -> dict:
    from megatron_bloom.testing import run_distributed

    ranks = run_distributed(layout_worker, tp * pp * dp, args, tp, pp, global_batch_size, timeout=args.timeout,
                            env={"DS_ACCELERATOR": "cpu"})
    steps = len(ranks[0]["step_s"])
    # A step lasts as long as its slowest rank.
    step_s = statistics.median(max(r["step_s"][i] for r in ranks) for i in range(steps))
    # Per step, summed over ranks; the counted steps must agree (same schedule every step).
    per_step = [defaultdict(int) for _ in range(steps)]
    for r in ranks:
        for i, counted in enumerate(r["counted"]):
            for k, v in measured_kinds(counted).items():
                per_step[i][k] += v
    measured = dict(per_step[-1])
    analytic = defaultdict(int)
    for r in ranks:
        for k, v in r["analytic"].items():
            analytic[k] += v
    raw = defaultdict(int)
    for r in ranks:
        for k, v in r["counted"][-1].items():
            raw[k] += v
    calls = defaultdict(int)
    for r in ranks:
        for k, v in r["calls"].items():  # the last step's
            calls[k] += v
    out = {"tp": tp, "pp": pp, "dp": dp, "processes": tp * pp * dp, "global_batch_size": global_batch_size,
           "micro_batches": global_batch_size // (args.micro_batch_size * dp), "step_s": step_s,
           "tokens_per_s": global_batch_size * args.seq_length / step_s, "measured_bytes": measured,
           "analytic_bytes": dict(analytic), "bytes_by_kind_and_group": dict(raw),
           "calls_by_kind_and_group": dict(calls),
           "steps_agree": all(dict(p) == dict(per_step[0]) for p in per_step)}
    if pp > 1 and tp * dp == 1:
        # Per step, every stage on the step's common window; then the median over steps.
        by_step = [bubble_of_stages([r["bubble"][i] for r in sorted(ranks, key=lambda r: r["stage"])])
                   for i in range(steps)]
        out["stages"] = [{"stage": st, **{k: statistics.median(step[st][k] for step in by_step)
                                          for k in by_step[0][st]}} for st in range(pp)]
    return out


def parse_layouts(text: str) -> List[Tuple[int, int, int]]:
    from megatron_bloom.errors import UserError

    layouts = []
    for item in text.split():
        try:
            tp, pp, dp = (int(x) for x in item.split(","))
        except ValueError:
            raise UserError(f"--layouts item {item!r} is not TP,PP,DP (e.g. \"1,1,1 2,1,1\")") from None
        layouts.append((tp, pp, dp))
    return layouts


def check_args(args) -> None:
    """Every layout and micro-batch count is checked before any process starts."""
    from megatron_bloom.errors import UserError

    args.layout_list = parse_layouts(args.layouts)
    if args.zero_stage not in (0, 1):
        raise UserError(f"--zero-stage {args.zero_stage}: layouts with PP > 1 run DeepSpeed's pipeline engine, "
                        "which takes ZeRO 0 or 1; use --zero-stage 0 or 1")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    for tp, pp, dp in args.layout_list:
        if args.num_attention_heads % tp:
            raise UserError(f"layout {tp},{pp},{dp}: num_attention_heads={args.num_attention_heads} is not "
                            f"divisible by TP={tp}")
        if pp > args.num_layers:
            raise UserError(f"layout {tp},{pp},{dp}: PP={pp} is more than --num-layers {args.num_layers}")
        if args.global_batch_size % (args.micro_batch_size * dp):
            raise UserError(f"layout {tp},{pp},{dp}: --global-batch-size {args.global_batch_size} is not divisible "
                            f"by micro batch x DP = {args.micro_batch_size * dp}")
    if any(m < 1 for m in args.bubble_micro_batches):
        raise UserError("--bubble-micro-batches must be positive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="space-separated TP,PP,DP triples")
    add_model_args(p)
    p.add_argument("--global-batch-size", type=int, default=8, help="the same for every layout")
    p.add_argument("--zero-stage", type=int, default=0, help="0 or 1 (the pipeline engine's stages)")
    p.add_argument("--bubble-micro-batches", type=int, nargs="*", default=[2, 4, 8],
                   help="micro-batches per step of the PP=2 bubble runs (none: skip them)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first step allocates)")
    p.add_argument("--steps", type=int, default=5, help="timed and counted steps (median time reported)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per layout before its ranks are killed")
    add_output_args(p)
    return p.parse_args(argv)


def ratio(measured: int, analytic: int) -> str:
    return "-" if analytic == 0 and measured == 0 else "inf" if analytic == 0 else f"{measured / analytic:.4f}"


def print_report(result: dict) -> None:
    c = result["config"]
    print(f"BLOOM h={c['hidden_size']} L={c['num_layers']} heads={c['num_attention_heads']} vocab={c['vocab_size']} "
          f"seq={c['seq_length']} mbs={c['micro_batch_size']} gbs={c['global_batch_size']} fp32 "
          f"ZeRO-{c['zero_stage']}, one thread per rank\n{format_run_info(result['run'])}\n")
    rows = []
    for r in result["layouts"]:
        mb, ab = r["measured_bytes"], r["analytic_bytes"]
        rows.append([f"({r['tp']},{r['pp']},{r['dp']})", r["processes"], r["micro_batches"], f"{r['step_s']:.3f}",
                     f"{r['tokens_per_s']:,.0f}",
                     *[f"{mib(mb[k])} / {mib(ab[k])}" for k in ("tp", "pp_send", "pp_gather", "pp_tied", "dp")],
                     f'{mb["other"]:,}'])
    print("Per step, summed over ranks; MiB as measured / analytic:\n")
    print(markdown_table(["(TP,PP,DP)", "ranks", "m", "step (s)", "tokens/s", "TP all-reduce", "PP send",
                          "PP all-gather over TP", "PP tied-embedding", "DP gradients", "other (bytes)"], rows))
    if result["bubble"]:
        print("\nPipeline bubble at PP=2 (TP=DP=1), per stage; ideal (p-1)/(m+p-1):\n")
        rows = []
        for r in result["bubble"]:
            for st in r["stages"]:
                rows.append([r["micro_batches"], st["stage"], f"{r['step_s']:.3f}", f"{st['busy_s']:.3f}",
                             f"{st['window_s']:.3f}", f"{st['bubble']:.3f}", f"{st['recv_wait']:.3f}",
                             f"{st['send']:.3f}",
                             f"{r['ideal_bubble']:.3f}"])
        print(markdown_table(["m", "stage", "step (s)", "fwd+bwd (s)", "1F1B window (s)", "bubble measured",
                              "recv share", "send share", "ideal"], rows))


def plot(result: dict, directory: str) -> List[str]:
    plt = pyplot()
    paths = []
    kinds = ("tp", "pp_send", "pp_gather", "pp_tied", "dp", "other")
    labels = [f"({r['tp']},{r['pp']},{r['dp']})" for r in result["layouts"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom_m, bottom_a = [0.0] * len(labels), [0.0] * len(labels)
    xs = range(len(labels))
    for i, kind in enumerate(kinds):
        mv = [r["measured_bytes"][kind] / 2**20 for r in result["layouts"]]
        av = [r["analytic_bytes"].get(kind, 0) / 2**20 for r in result["layouts"]]
        ax.bar([x - 0.2 for x in xs], mv, 0.4, bottom=bottom_m, color=f"C{i}", label=f"{kind} measured")
        ax.bar([x + 0.2 for x in xs], av, 0.4, bottom=bottom_a, color=f"C{i}", hatch="//", alpha=0.5,
               label=f"{kind} analytic")
        bottom_m = [b + v for b, v in zip(bottom_m, mv)]
        bottom_a = [b + v for b, v in zip(bottom_a, av)]
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("(TP, PP, DP)")
    ax.set_ylabel("MiB per step (all ranks)")
    ax.set_title("communication: measured (left) vs analytic (right)")
    ax.legend(fontsize=7, ncol=2)
    ax2.bar(labels, [r["step_s"] for r in result["layouts"]])
    ax2.set_xlabel("(TP, PP, DP)")
    ax2.set_ylabel("seconds per step")
    ax2.set_title(f"step time at global batch {result['config']['global_batch_size']}")
    paths.append(save_figure(fig, directory, "parallel_costs.png"))
    if result["bubble"]:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ms = [r["micro_batches"] for r in result["bubble"]]
        for st in range(len(result["bubble"][0]["stages"])):
            ax.plot(ms, [r["stages"][st]["bubble"] for r in result["bubble"]], "o-", label=f"stage {st} measured")
        ax.plot(ms, [r["ideal_bubble"] for r in result["bubble"]], "k--", label="(p-1)/(m+p-1)")
        ax.set_xlabel("micro-batches per step (m)")
        ax.set_ylabel("idle fraction of the 1F1B span")
        ax.set_title("pipeline bubble, PP=2")
        ax.legend()
        paths.append(save_figure(fig, directory, "pipeline_bubble.png"))
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    if args.plot:
        pyplot()  # fail now, not after the runs
    config = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size",
                                            "seq_length", "micro_batch_size", "global_batch_size", "zero_stage",
                                            "warmup", "steps")}
    result = {"run": run_info(argv), "config": config, "layouts": [], "bubble": []}
    for tp, pp, dp in args.layout_list:
        result["layouts"].append(run_layout(args, tp, pp, dp, args.global_batch_size))
    for m in args.bubble_micro_batches:
        r = run_layout(args, 1, 2, 1, m * args.micro_batch_size)
        r["ideal_bubble"] = (2 - 1) / (m + 2 - 1)
        result["bubble"].append(r)
    print_report(result)
    finish(result, args, plot)


if __name__ == "__main__":
    run_main(main)
