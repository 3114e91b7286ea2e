"""Plan a BLOOM layout before asking for nodes: parameters, memory per GPU, bubble, traffic, speed.

    python launch/plan.py --model bloom-176b --nodes 48 --gpus-per-node 8 --gpu a100-80g \
        --tp 4 --pp 12 --micro-batch-size 2 --global-batch-size 2048 --zero-stage 1 --checkpoint-activations
    python launch/plan.py --model bloom-176b --nodes 48 --gpus-per-node 8 --global-batch-size 2048 --search
    python launch/plan.py --published bloom-176b            # BigScience's own layout
    python launch/plan.py --model configs/bloom-176b.yaml --nodes 48 --gpus-per-node 8

``--model`` is a name from NAMED_MODELS or a YAML config (its parallel/training sections give the
defaults; flags override). The layout is checked with the trainer's own ``validate_config``; the
exit code is 0 when it fits, 2 with one ``error:`` line when it is invalid or does not fit, so
sbatch scripts call this first. ``--json`` ends the output with one JSON object.
``--measure`` (under torchrun or alone, on CPU) also builds the engine for the layout and prints
the bytes it holds next to the prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_bloom.errors import EXIT_USER_ERROR, UserError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="NAMED_MODELS name (bloom-560m ... bloom-176b, tiny) or a YAML config file")
    p.add_argument("--published", help="start from BigScience's published layout for this run "
                                       "(bloom-560m ... bloom-176b, bloomz-7b1); other flags override it")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--gpu", help="a100-40g, a100-80g (default), h100-80g, h200, v100-16g, v100-32g or cpu")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--rampup-batch-size", type=int, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="batch-size ramp-up, checked like the trainer checks it")
    p.add_argument("--zero-stage", type=int)
    p.add_argument("--checkpoint-activations", action="store_true", default=None)
    p.add_argument("--no-checkpoint-activations", dest="checkpoint_activations", action="store_false")
    p.add_argument("--seq-length", type=int)
    arch = p.add_argument_group("architecture overrides (the trainer's flags; applied to --model)")
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size", "--vocab-size"):
        arch.add_argument(flag, type=int)
    for flag in ("--hidden-dropout", "--attention-dropout"):
        arch.add_argument(flag, type=float, help="activation memory counts dropout masks when > 0 (default 0.1)")
    arch.add_argument("--attention-impl", choices=["sdpa", "eager"])
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    p.add_argument("--pp-partition-method")
    p.add_argument("--search", action="store_true", help="rank every feasible layout (fixed flags narrow it)")
    p.add_argument("--top", type=int, default=15, help="layouts shown by --search")
    p.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    g = p.add_argument_group("assumptions")
    g.add_argument("--mfu", type=float, default=0.5, help="fraction of peak FLOPs the matmuls reach (0.5)")
    g.add_argument("--memory-headroom", type=float, default=0.1, help="fraction of device memory kept free (0.1)")
    g.add_argument("--gpu-memory-gib", type=float, help="override the device memory")
    g.add_argument("--intra-node-gbps", type=float, help="override NVLink GB/s per GPU")
    g.add_argument("--inter-node-gbps", type=float, help="override network GB/s per GPU")
    p.add_argument("--measure", action="store_true",
                   help="also build the engine here (CPU, gloo; world size from torchrun) and compare its bytes")
    return p


def _resolve(args):
    """(model config, cluster, layout, assumptions, search options) from flags, YAML and the published table."""
    from megatron_bloom.config import parse_config
    from megatron_bloom.models.spec import get_model_spec
    from megatron_bloom.planning import PUBLISHED, Assumptions, Cluster, Layout, accelerator

    spec = get_model_spec()
    NAMED_MODELS, named_model_config = spec.named_configs, spec.named_config

    base = {}
    model = None
    if args.published:
        if args.published not in PUBLISHED:
            raise UserError(f"unknown --published '{args.published}'; known: {', '.join(PUBLISHED)}")
        pub = PUBLISHED[args.published]
        base = dict(nodes=pub.nodes, gpus_per_node=pub.gpus_per_node, gpu=pub.gpu,
                    tp=pub.tensor_model_parallel_size, pp=pub.pipeline_model_parallel_size,
                    micro_batch_size=pub.micro_batch_size, global_batch_size=pub.global_batch_size,
                    zero_stage=pub.zero_stage, checkpoint_activations=pub.checkpoint_activations,
                    precision=pub.precision, rampup_batch_size=pub.rampup_batch_size)
        model = named_model_config(pub.model_name)
    if args.model:
        if args.model in NAMED_MODELS:
            model = named_model_config(args.model)
        elif os.path.isfile(args.model):
            cfg = parse_config(["--config", args.model])
            model = cfg.model
            p, t = cfg.parallel, cfg.training
            base.update(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                        zero_stage=p.zero_stage, checkpoint_activations=cfg.model.checkpoint_activations,
                        precision="bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
                        pp_partition_method=p.pp_partition_method, rampup_batch_size=t.rampup_batch_size)
        else:
            raise UserError(f"--model '{args.model}' is neither a known name ({', '.join(NAMED_MODELS)}) "
                              f"nor an existing YAML file")
    if model is None:
        raise UserError("give --model NAME|CONFIG or --published NAME")
    given = {k: v for k, v in vars(args).items() if v is not None}
    merged = {**base, **given}
    for required in ("nodes", "gpus_per_node"):
        if required not in merged:
            raise UserError(f"give --{required.replace('_', '-')}")
    for name in ("seq_length", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                 "hidden_dropout", "attention_dropout", "attention_impl"):
        if name in merged:
            setattr(model, name, merged[name])
    memory = merged.get("gpu_memory_gib")
    if merged.get("gpu") == "cpu" and memory is None:
        memory = accelerator("cpu").memory_gib / merged["gpus_per_node"]  # ranks of a node share its RAM
    try:
        acc = accelerator(merged.get("gpu", "a100-80g"), memory, merged.get("intra_node_gbps"),
                          merged.get("inter_node_gbps"))
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    cluster = Cluster(merged["nodes"], merged["gpus_per_node"], acc)
    tp, pp, mbs = merged.get("tp", 1), merged.get("pp", 1), merged.get("micro_batch_size", 1)
    gbs = merged.get("global_batch_size")
    if gbs is None and args.search:
        name = model.model_name
        gbs = PUBLISHED[name].global_batch_size if name in PUBLISHED else None
        if gbs is None:
            raise UserError("--search needs --global-batch-size")
    if gbs is None:
        world = cluster.world_size
        gbs = mbs * max(world // max(tp * pp, 1), 1)  # no accumulation
    layout = Layout(tp, pp, mbs, gbs, merged.get("zero_stage", 1), bool(merged.get("checkpoint_activations", False)),
                    merged.get("precision", "bf16" if acc.supports_bf16 else "fp16"),
                    merged.get("pp_partition_method", "type:transformer|embedding"),
                    tuple(merged["rampup_batch_size"]) if merged.get("rampup_batch_size") else None)
    assumptions = Assumptions(mfu=args.mfu, memory_headroom=args.memory_headroom)
    return model, cluster, layout, assumptions


def _search(args, model, cluster, layout, assumptions):
    from megatron_bloom.planning import search

    fixed = lambda name: name in vars(args) and getattr(args, name) is not None  # noqa: E731
    return search(
        model, cluster, layout.global_batch_size, assumptions, precision=layout.precision,
        tp=layout.tensor_model_parallel_size if fixed("tp") else None,
        pp=layout.pipeline_model_parallel_size if fixed("pp") else None,
        micro_batch_sizes=[layout.micro_batch_size] if fixed("micro_batch_size") else None,
        zero_stages=[layout.zero_stage] if fixed("zero_stage") else None,
        recompute=[layout.checkpoint_activations] if fixed("checkpoint_activations") else None,
        pp_partition_method=layout.pp_partition_method,
    )


def plan(argv=None) -> int:
    """The report; exit code 0 when the layout fits, 2 when it does not (the reason on stderr)."""
    from megatron_bloom.planning import estimate
    from megatron_bloom.planning.report import layout_key, search_table, text, to_dict

    args = build_parser().parse_args(argv)
    model, cluster, layout, assumptions = _resolve(args)
    result = estimate(model, cluster, layout, assumptions)
    out = to_dict(result)
    print(text(result))
    code = 0 if result.feasible else EXIT_USER_ERROR
    if args.search:
        found = _search(args, model, cluster, layout, assumptions)
        print(search_table(found, args.top))
        out["search"] = [layout_key(e) for e in found]
        if not found:
            code = EXIT_USER_ERROR
    if args.measure:
        from megatron_bloom.planning.compare import measure_and_compare

        out["measured"] = measure_and_compare(result)
        if out["measured"] is None:  # not rank 0
            return 0
    if args.json:
        print(json.dumps(out))
    if code:
        reason = "; ".join(result.problems) if result.problems else "no feasible layout found"
        print(f"error: {model.model_name or 'model'} on {cluster.nodes} x {cluster.gpus_per_node} "
              f"{cluster.accelerator.name}: {reason}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> None:
    """``launch/plan.py`` and ``megatron-bloom-plan``: an invalid layout ends with one ``error:`` line, exit 2."""
    run_main(plan, argv)
