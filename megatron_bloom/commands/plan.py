"""Plan a training command before asking for nodes: parameters, memory per GPU, bubble, traffic, speed.

plan.py takes the trainer's own flags, exactly as ``launch/pretrain.py`` and ``launch/finetune.py``
take them (``--config FILE`` and ``--model-name`` included), plus where the run goes:

    python launch/plan.py --nodes 48 --gpus-per-node 8 --gpu a100-80g --model-name bloom-176b \
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 12 --micro-batch-size 2 \
        --global-batch-size 2048 --bf16 --zero-stage 0 --checkpoint-activations
    python launch/plan.py --nodes 8 --gpus-per-node 8 --model-name bloom-7b1 --global-batch-size 512 --fp16 --search
    python launch/plan.py --nodes 8 --gpus-per-node 8 --finetune --config configs/bloomz-7b1.yaml
    python launch/plan.py --published bloom-176b            # BigScience's own layout

The world size is nodes x gpus-per-node, and the command is checked by the trainer's own
``validate_config`` for that world size (with ``for_training`` when it gives a schedule), so the plan
and the trainer cannot disagree. Paths in trainer flags (--save, --data-path, --pretrained, ...)
belong to the cluster and need not exist here; only what the plan reads must (--config,
--deepspeed_config, and --pretrained under --finetune when no flag names the architecture; a
tokenizer folder is read for the vocabulary when it exists here). The exit code is 0 when the
command fits, 2 with one ``error:`` line when it is invalid or does not fit, so sbatch scripts call
this first (slurm/launcher.sh hands it the trainer's own arguments). ``--json`` ends the output with
one JSON object. ``--measure`` (under torchrun or alone, on CPU) also builds the engine for the
layout and prints the bytes it holds next to the prediction.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Set

from megatron_bloom.errors import EXIT_USER_ERROR, ArgumentParser, UserError, run_main

_RENAMED = {
    "--model": "--model-name NAME or --config FILE",
    "--tp": "--tensor-model-parallel-size",
    "--pp": "--pipeline-model-parallel-size",
    "--precision": "--bf16 or --fp16 (neither is fp32)",
}
"""plan.py's own names before it took the trainer's flags -> the trainer's flag to use instead."""


class _HelpAction(argparse.Action):
    """``--help``: plan.py's own flags, then every trainer flag it accepts."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from megatron_bloom.config.loader import build_parser as trainer_parser

        trainer = trainer_parser().format_help()
        print(parser.format_help())
        print("trainer flags (launch/pretrain.py, launch/finetune.py):")
        print(trainer[trainer.index("  --config"):])
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """plan.py's own flags; every other argument is the trainer's and goes to ``parse_config``."""
    p = ArgumentParser(prog="launch/plan.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       add_help=False, usage="%(prog)s --nodes N --gpus-per-node G [--gpu KIND] [plan flags] "
                                             "TRAINER FLAGS...",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action=_HelpAction, help="show plan.py's flags and the trainer's, then exit")
    where = p.add_argument_group("where the run goes")
    where.add_argument("--nodes", type=int)
    where.add_argument("--gpus-per-node", type=int)
    where.add_argument("--gpu", help="a100-40g, a100-80g (default), h100-80g, h200, v100-16g, v100-32g or cpu")
    what = p.add_argument_group("what is planned")
    what.add_argument("--finetune", action="store_true",
                      help="plan launch/finetune.py's command: packed samples, BLOOMZ's defaults, and the "
                           "architecture of --pretrained when no flag names it")
    what.add_argument("--published", help="start from BigScience's published layout for this run "
                                          "(bloom-560m ... bloom-176b, bloomz-7b1, bloomz-176b: slurm/NAME.slurm's); "
                                          "trainer flags override it")
    what.add_argument("--search", action="store_true",
                      help="rank every feasible layout (the layout flags given fix their values)")
    what.add_argument("--top", type=int, default=15, help="layouts shown by --search")
    what.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    what.add_argument("--measure", action="store_true",
                      help="also build the engine here (CPU, gloo; world size from torchrun) and compare its bytes")
    g = p.add_argument_group("assumptions")
    g.add_argument("--mfu", type=float, default=0.5, help="fraction of peak FLOPs the matmuls reach (0.5)")
    g.add_argument("--memory-headroom", type=float, default=0.1, help="fraction of device memory kept free (0.1)")
    g.add_argument("--gpu-memory-gib", type=float, help="override the device memory")
    g.add_argument("--intra-node-gbps", type=float, help="override NVLink GB/s per GPU")
    g.add_argument("--inter-node-gbps", type=float, help="override network GB/s per GPU")
    return p


def _published(name: str):
    from megatron_bloom.planning import PUBLISHED

    if name not in PUBLISHED:
        raise UserError(f"unknown --published '{name}'; known: {', '.join(PUBLISHED)}")
    return PUBLISHED[name]


def published_flags(name: str, given: Dict[str, Set[str]]) -> List[str]:
    """The trainer flags of a published run's layout, but for the fields ``given`` names (set by flag or YAML)."""
    pub = _published(name)
    values = (
        ("model", "model_name", pub.model_name),
        ("parallel", "tensor_model_parallel_size", pub.tensor_model_parallel_size),
        ("parallel", "pipeline_model_parallel_size", pub.pipeline_model_parallel_size),
        ("parallel", "zero_stage", pub.zero_stage),
        ("training", "micro_batch_size", pub.micro_batch_size),
        ("training", "global_batch_size", pub.global_batch_size),
    )
    flags = [f"--{key.replace('_', '-')}={value}" for section, key, value in values if key not in given[section]]
    if pub.rampup_batch_size and "rampup_batch_size" not in given["training"]:
        flags += ["--rampup-batch-size", *map(str, pub.rampup_batch_size)]
    if pub.checkpoint_activations and "checkpoint_activations" not in given["model"]:
        flags.append("--checkpoint-activations")
    if pub.precision != "fp32" and not {"bf16", "fp16"} & given["training"]:
        flags.append("--" + pub.precision)
    return flags


def trainer_config(argv: Sequence[str], finetune: bool = False, published: Optional[str] = None):
    """(RunConfig, {section: fields set by flag or YAML}) the trainer resolves from ``argv``, away from its data.

    ``published`` adds the trainer flags of that run's layout where ``argv`` sets nothing. Tokenizers
    and --pretrained are read only when they exist here (and --pretrained only when no
    --model-name names the architecture).
    """
    from megatron_bloom.config import parse_config
    from megatron_bloom.config.loader import explicit_keys
    from megatron_bloom.training.sources import fill_from_sources

    argv = list(argv)
    for arg in argv:
        if arg.split("=")[0] in _RENAMED:
            raise UserError(f"plan.py takes the trainer's flags now: instead of {arg.split('=')[0]} give "
                            f"{_RENAMED[arg.split('=')[0]]}")
    given = explicit_keys(argv)
    if published:
        argv = published_flags(published, given) + argv
    if finetune:
        from megatron_bloom.training.finetune import finetune_run_config

        named = parse_config(argv)
        pretrained = named.finetune.pretrained
        if pretrained and not named.model.model_name and not os.path.isdir(pretrained):
            raise UserError(f"--pretrained {pretrained} is not a folder here: the architecture is read from it "
                            f"unless --model-name names it (give --model-name to plan without the checkpoint)")
        return finetune_run_config(argv, read_tokenizer=False), given
    cfg = parse_config(argv)
    fill_from_sources(cfg, explicit_keys(argv), read_tokenizer=False)
    return cfg, given


def check_as_the_trainer(cfg, world_size: int, finetune: bool = False):
    """The trainer's checks of ``cfg`` for ``world_size`` ranks, on a copy that is returned filled in.

    ``cli.check_config`` (with its training checks when the command gives a schedule, --train-iters
    or --train-samples) and launch/pretrain.py's own refusals. The output folders (--save,
    --tensorboard-dir) are the cluster's and are not checked here.
    """
    from megatron_bloom.cli import check_config, check_pretrain_config

    checked = copy.deepcopy(cfg)
    checked.checkpoint.save = checked.logging.tensorboard_dir = None
    t = checked.training
    check_config(checked, world_size, for_training=t.train_iters is not None or t.train_samples is not None)
    if not finetune:
        check_pretrain_config(checked)
    return checked


def _cluster(args, published_cluster: Dict[str, object]):
    from megatron_bloom.planning import Cluster, accelerator

    nodes = args.nodes if args.nodes is not None else published_cluster.get("nodes")
    gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None else published_cluster.get("gpus_per_node")
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is None:
            raise UserError(f"give {flag} (the world size is nodes x gpus-per-node)")
        if value < 1:
            raise UserError(f"{flag} {value} must be >= 1")
    kind = args.gpu or published_cluster.get("gpu") or "a100-80g"
    memory = args.gpu_memory_gib
    if kind == "cpu" and memory is None:
        memory = accelerator("cpu").memory_gib / gpus_per_node  # ranks of a node share its RAM
    try:
        acc = accelerator(kind, memory, args.intra_node_gbps, args.inter_node_gbps)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    return Cluster(nodes, gpus_per_node, acc)


def layout_of(cfg, world_size: int, packed_samples: bool = False):
    """The planner's Layout of a (checked or not) trainer configuration."""
    from megatron_bloom.planning import Layout

    p, t = cfg.parallel, cfg.training
    tp, pp, mbs = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, t.micro_batch_size
    gbs = t.global_batch_size
    if gbs is None:  # the trainer's default: no accumulation
        gbs = mbs * max(world_size // max(tp * pp, 1), 1)
    return Layout(tp, pp, mbs, gbs, p.zero_stage, cfg.model.checkpoint_activations,
                  "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32", p.pp_partition_method,
                  tuple(t.rampup_batch_size) if t.rampup_batch_size else None, packed_samples)


def _search(model, cluster, layout, assumptions, given: Dict[str, Set[str]]):
    """Every feasible layout; the layout fields the command sets by flag or YAML stay fixed."""
    from megatron_bloom.planning import search

    def fixed(section: str, key: str) -> bool:
        return key in given[section]

    return search(
        model, cluster, layout.global_batch_size, assumptions, precision=layout.precision,
        tp=layout.tensor_model_parallel_size if fixed("parallel", "tensor_model_parallel_size") else None,
        pp=layout.pipeline_model_parallel_size if fixed("parallel", "pipeline_model_parallel_size") else None,
        micro_batch_sizes=[layout.micro_batch_size] if fixed("training", "micro_batch_size") else None,
        zero_stages=[layout.zero_stage] if fixed("parallel", "zero_stage") else None,
        recompute=[layout.checkpoint_activations] if fixed("model", "checkpoint_activations") else None,
        pp_partition_method=layout.pp_partition_method,
    )


def plan(argv: Optional[Sequence[str]] = None) -> int:
    """The report; exit code 0 when the command fits, 2 when it does not (the reason on stderr)."""
    from megatron_bloom.planning import Assumptions, PUBLISHED, estimate
    from megatron_bloom.planning.report import layout_key, model_label, search_table, text, to_dict

    args, trainer_argv = build_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    pub = _published(args.published) if args.published else None
    args.finetune = args.finetune or bool(pub and pub.finetune)
    cfg, given = trainer_config(trainer_argv, finetune=args.finetune, published=args.published)
    cluster = _cluster(args, dict(nodes=pub.nodes, gpus_per_node=pub.gpus_per_node, gpu=pub.gpu) if pub else {})
    gbs_given = cfg.training.global_batch_size is not None
    try:
        cfg = check_as_the_trainer(cfg, cluster.world_size, finetune=args.finetune)
    except UserError:
        if not args.search:
            raise
        # --search explores layouts: the one given may be invalid; estimate() says why below.
    if args.search and not gbs_given:
        name = cfg.model.model_name
        if name not in PUBLISHED:
            raise UserError("--search needs --global-batch-size")
        cfg.training.global_batch_size = PUBLISHED[name].global_batch_size

    layout = layout_of(cfg, cluster.world_size, packed_samples=args.finetune)
    assumptions = Assumptions(mfu=args.mfu, memory_headroom=args.memory_headroom)
    result = estimate(cfg.model, cluster, layout, assumptions)
    out = to_dict(result)
    print(text(result))
    code = 0 if result.feasible else EXIT_USER_ERROR
    if args.search:
        found = _search(cfg.model, cluster, layout, assumptions, given)
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
        print(f"error: {model_label(result)} on {cluster.nodes} x {cluster.gpus_per_node} "
              f"{cluster.accelerator.name}: {reason}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[List[str]] = None) -> None:
    """``launch/plan.py`` and ``megatron-bloom-plan``: an invalid command ends with one ``error:`` line, exit 2."""
    run_main(plan, argv)
