"""``launch/evaluate.py``: perplexity or zero-shot multiple choice of one checkpoint on a jsonl file.

    python launch/evaluate.py --load CKPT --data flores.jsonl --metric ppl,byte_ppl --json
    python launch/evaluate.py --load CKPT --data xcopa.jsonl --task mc --tensorboard-dir runs/tb

``--load`` is a native checkpoint at any TP/PP (merged into this one process) or a transformers
folder. ``--task ppl`` (default) reads ``{"text": ..., "language": ...}`` rows (see
``perplexity.py`` for the windowing and the BOS prefix); ``--task mc`` reads
``{"context", "choices", "label", "task"?, "language"?}`` rows (see ``multiple_choice.py``).
``--device`` (default cpu) is where the model is loaded and every batch is scored; a device this
machine cannot use is refused before any weight is read. Prints a table, and with ``--json`` one
JSON object as the last line. Bad input ends with one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

from megatron_bloom.errors import ArgumentParser, UserError
from megatron_bloom.evaluation.multiple_choice import MC_METRICS
from megatron_bloom.evaluation.perplexity import PPL_METRICS
from megatron_bloom.generation import DEVICE_HELP


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="native checkpoint directory or transformers folder")
    p.add_argument("--data", required=True, help="jsonl (or jsonl.gz) file")
    p.add_argument("--task", choices=["ppl", "mc"], default="ppl", help="perplexity or multiple choice")
    p.add_argument("--metric", default=None,
                   help=f"comma-separated; ppl: {','.join(PPL_METRICS)} (default ppl,byte_ppl); "
                        f"mc: {','.join(MC_METRICS)} (default all)")
    p.add_argument("--text-key", default="text", help="ppl: field holding the document")
    p.add_argument("--language-key", default="language", help="field naming the language ('' to ignore)")
    p.add_argument("--context-key", default="context", help="mc: field holding the prompt")
    p.add_argument("--choices-key", default="choices", help="mc: field holding the list of choices")
    p.add_argument("--label-key", default="label", help="mc: field holding the correct choice's index")
    p.add_argument("--task-key", default="task", help="mc: field naming the task ('' to ignore)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per forward pass (default: the tokenizer's model_max_length, else the "
                        "checkpoint's seq_length)")
    p.add_argument("--stride", type=int, default=None, help="ppl: tokens between window starts (default: --max-length)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--prefix-token", choices=["bos", "eos"], default="bos",
                   help="token conditioning a document's (or an empty context's) first token")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's own)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="run in this dtype (default: stored)")
    p.add_argument("--attention-impl", choices=["sdpa", "eager"], default=None, help="attention kernel")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    p.add_argument("--tensorboard-dir", default=None, help="also write eval/<metric>/<group> scalars here")
    p.add_argument("--tensorboard-step", type=int, default=None,
                   help="step of those scalars (default: the checkpoint's iteration, 0 for a transformers folder)")
    return p


def _metrics(arg: Optional[str], allowed: Sequence[str], default: Sequence[str]) -> List[str]:
    if arg is None:
        return list(default)
    chosen = [m.strip() for m in arg.split(",") if m.strip()]
    bad = [m for m in chosen if m not in allowed]
    if bad or not chosen:
        raise UserError(f"--metric {arg!r}: choose from {', '.join(allowed)}")
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.task == "ppl":
        metrics = _metrics(args.metric, PPL_METRICS, ("ppl", "byte_ppl"))
    else:
        metrics = _metrics(args.metric, MC_METRICS, MC_METRICS)
        if args.stride is not None:
            raise UserError("--stride applies to --task ppl only")
    # Read the data before the (slower) model, so a bad file fails fast.
    from megatron_bloom.evaluation import data

    language_key = args.language_key or None
    if args.task == "ppl":
        rows = data.read_documents(args.data, args.text_key, language_key)
    else:
        rows = data.read_choice_examples(args.data, args.context_key, args.choices_key, args.label_key,
                                         args.task_key or None, language_key)

    import torch

    from megatron_bloom.distributed.init import flush_denormals

    flush_denormals()  # before the model's first parallel op: ALiBi scores underflow (see init.py)
    with torch.no_grad():  # scoped: an in-process caller keeps its own grad mode
        return _evaluate(args, rows, metrics)


def _evaluate(args, rows, metrics) -> int:
    from megatron_bloom.evaluation.loading import load_for_eval

    em = load_for_eval(args.load, args.tokenizer, args.dtype, args.attention_impl, args.device)
    max_length = args.max_length if args.max_length is not None else em.default_max_length()
    if max_length < 1:
        raise UserError(f"--max-length must be >= 1, got {max_length}")
    settings = {"task": args.task, "load": args.load, "data": args.data, "max_length": max_length,
                "batch_size": args.batch_size, "prefix_token_id": em.prefix_id(args.prefix_token)}

    if args.task == "ppl":
        from megatron_bloom.evaluation.perplexity import evaluate_perplexity

        stride = args.stride if args.stride is not None else max_length
        result = evaluate_perplexity(em, rows, max_length, stride, args.batch_size, args.prefix_token).to_dict()
        settings["stride"] = stride
        groups: Dict[str, Dict] = {"all": result["overall"], **result["per_language"]}
        title = (f"perplexity: {len(rows)} documents, {result['overall']['tokens']} tokens, "
                 f"{result['overall']['bytes']} bytes; max_length {max_length}, stride {stride}")
        columns = ["documents", "tokens", "bytes", *metrics]
        first = "language"
    else:
        from megatron_bloom.evaluation.multiple_choice import accuracy, score_choices

        result = accuracy(rows, score_choices(em, rows, max_length, args.batch_size, args.prefix_token))
        groups = {"all": result["overall"], **{f"task/{k}": v for k, v in result["per_task"].items()},
                  **result["per_language"]}
        title = f"multiple choice: {len(rows)} examples; max_length {max_length}"
        columns = ["examples", *metrics]
        first = "group"

    from megatron_bloom.evaluation.report import format_table, tensorboard_scalars, write_tensorboard

    print(title)
    print(format_table(groups, columns, first), flush=True)
    record = {**settings, **result}
    if args.tensorboard_dir:
        step = args.tensorboard_step if args.tensorboard_step is not None else em.iteration
        tags = write_tensorboard(args.tensorboard_dir, tensorboard_scalars(groups, metrics), step)
        record["tensorboard"] = {"dir": args.tensorboard_dir, "step": step, "tags": tags}
        print(f"wrote {len(tags)} scalars at step {step} to {args.tensorboard_dir}", file=sys.stderr)
    if args.json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def console_main(argv: Optional[Sequence[str]] = None) -> None:
    """``launch/evaluate.py`` and ``megatron-bloom-evaluate``: one ``error:`` line and exit 2 on bad input."""
    from megatron_bloom.cli import entry_point

    entry_point(main)(argv)
