"""Shared pieces of the benchmarks: what they ran on, markdown tables, and the JSON/plot options.

Every benchmark records the machine (CPU model and core count, no host name), the Python, torch
and DeepSpeed versions, the UTC date and the exact command line, so a table pasted elsewhere can
be traced back to how it was made.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from typing import Dict, List, Optional, Sequence


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(argv: Optional[Sequence[str]] = None, program: Optional[str] = None) -> Dict[str, object]:
    """Machine, versions, date and command of this run (JSON-serialisable).

    ``program`` names another program this process ran with ``argv`` (a benchmark timing someone
    else's tool in the same Python); by default the command is this process's own."""
    import torch

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(shlex.quote(a) for a in [program or os.path.relpath(sys.argv[0]), *args]),
    }


def format_run_info(info: Dict[str, object]) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, {info['os']}; python {info['python']}, torch {info['torch']}, "
            f"deepspeed {info['deepspeed']}; {info['date_utc']}\n`{info['command']}`")


def markdown_table(headers: Sequence[str], rows: List[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: float) -> str:
    return f"{n / 2**20:,.3f}"


def add_model_args(parser, hidden_size: int = 256, num_layers: int = 4, num_attention_heads: int = 8,
                   vocab_size: int = 1024, seq_length: int = 128, micro_batch_size: int = 2) -> None:
    """The model-shape flags every benchmark takes, under pretrain.py's names; defaults per benchmark."""
    for flag, default in (("--hidden-size", hidden_size), ("--num-layers", num_layers),
                          ("--num-attention-heads", num_attention_heads), ("--vocab-size", vocab_size),
                          ("--seq-length", seq_length), ("--micro-batch-size", micro_batch_size)):
        parser.add_argument(flag, type=int, default=default)


def add_output_args(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots into DIR (needs matplotlib)")


def pyplot():
    """matplotlib's pyplot without a display (the ``bench`` extra installs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        from megatron_bloom.errors import UserError

        raise UserError("--plot needs matplotlib; install it with: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str, name: str) -> str:
    """Lay out ``fig``, write it to ``out_dir/name`` (PNG, 100 dpi), close it and return the path."""
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish(result: Dict, args, plot) -> None:
    """The end every benchmark shares: ``--plot DIR`` PNGs (named in the output), ``--json`` last."""
    import json

    if args.plot:
        result["plots"] = plot(result, args.plot)
        print("\nplots: " + ", ".join(result["plots"]))
    if args.json:
        print(json.dumps(result))


