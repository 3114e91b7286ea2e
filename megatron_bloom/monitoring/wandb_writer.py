"""Weights & Biases with the same metric names as TensorBoard.

wandb has one step axis per run, so everything is logged at step = iteration together with the
consumed samples and tokens (under Megatron's ``steps-vs-samples``/``steps-vs-tokens`` names), and
each `` vs samples`` / `` vs tokens`` metric is declared with ``define_metric`` to be plotted
against those instead: the same curves as TensorBoard.

wandb is an optional extra (``pip install 'megatron_bloom[wandb]'``) and is imported only when a
run asks for it. ``WANDB_MODE=offline`` logs to local files without network (``wandb sync``
uploads them later); ``WANDB_RUN_ID`` + ``WANDB_RESUME=allow`` continue one run across requeues.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

from megatron_bloom.errors import UserError
from megatron_bloom.monitoring.tensorboard import axis_of

SAMPLES_AXIS = "steps-vs-samples/y=samples,x=steps"
TOKENS_AXIS = "steps-vs-tokens/y=tokens,x=steps"


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError(
            "logging.wandb_project is set but wandb is not installed; "
            "pip install 'megatron_bloom[wandb]' (or unset wandb_project)"
        ) from None
    return wandb


class WandbWriter:
    def __init__(self, project: str, directory: Optional[str] = None, config: Optional[Dict[str, Any]] = None,
                 name: Optional[str] = None):
        wandb = import_wandb()
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        try:
            self.run = wandb.init(project=project, dir=directory, config=config, name=name)
        except Exception as exc:  # wandb's errors (no API key, no network) are user-fixable
            msg = str(exc).strip().replace("\n", " ")
            raise UserError(f"wandb.init failed: {msg} (WANDB_MODE=offline logs without network)") from None
        self._declared = set()

    def _declare(self, tag: str) -> None:
        if tag in self._declared:
            return
        self._declared.add(tag)
        axis = axis_of(tag)
        if axis == "samples":
            self.run.define_metric(tag, step_metric=SAMPLES_AXIS)
        elif axis == "tokens":
            self.run.define_metric(tag, step_metric=TOKENS_AXIS)

    def log(self, values: Mapping[str, float], iteration: int, samples: Optional[int] = None,
            tokens: Optional[int] = None) -> None:
        data: Dict[str, Any] = {}
        for tag, value in values.items():
            self._declare(tag)
            data[tag] = value
        if samples is not None:
            data[SAMPLES_AXIS] = samples
        if tokens is not None:
            data[TOKENS_AXIS] = tokens
        # Several calls at one iteration merge into one wandb step (it must never go back).
        self.run.log(data, step=iteration)

    def add_text(self, tag: str, markdown: str, iteration: int = 0) -> None:
        """The resolved config already went to wandb.init(config=...); text is not duplicated."""

    def flush(self) -> None:
        pass  # wandb streams to its service process; finish() in close() waits for it

    def close(self) -> None:
        self.run.finish()
