"""Results as a console table and as TensorBoard scalars beside the training curves.

TensorBoard tags are ``eval/<metric>/<group>``: ``<group>`` is ``all`` for the whole file, a
language code, or ``task/<name>`` for a multiple-choice task. The step is the checkpoint's
training iteration, the x axis of the training curves (Megatron's convention for tags without
`` vs samples`` / `` vs tokens``), so an evaluated checkpoint lands where it was saved.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"
    return str(value)


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], first: str) -> str:
    """A fixed-width table: one row per group (in the given order), the given metric columns."""
    header = [first, *columns]
    body = [[name, *(_cell(metrics.get(c, "-")) for c in columns)] for name, metrics in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def tensorboard_scalars(groups: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> Dict[str, float]:
    """``{"eval/<metric>/<group>": value}`` for the chosen metrics that a group has."""
    out: Dict[str, float] = {}
    for group, values in groups.items():
        for metric in metrics:
            if metric in values:
                out[f"eval/{metric}/{group}"] = float(values[metric])
    return out


def write_tensorboard(log_dir: str, scalars: Mapping[str, float], step: int) -> List[str]:
    """Append ``scalars`` at ``step`` to the event files in ``log_dir``; returns the tags written."""
    from megatron_bloom.monitoring.tensorboard import TensorBoardWriter

    writer = TensorBoardWriter(log_dir)
    try:
        writer.log(dict(scalars), iteration=step)
    finally:
        writer.close()
    return sorted(scalars)
