"""The seam between a model family and the rest of the package.

A ``ModelSpec`` gathers what training, checkpointing, generation, evaluation and planning need
from one model family: its configuration class and named sizes, the single-device build, the
pipeline layer specs, tensor parallelism with its sharding table, and the Hugging Face adapter.
Code outside ``megatron_bloom/models`` reaches a family only through ``get_model_spec``.

This module imports nothing heavy: the configuration is resolved before torch is needed, and a
family's spec builds its torch modules only when one of its functions is called.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping

DEFAULT_MODEL = "bloom"
"""The family a run configuration's ``model`` section describes."""

FAMILIES = ("bloom",)
"""Packages under ``megatron_bloom/models`` that register a spec when imported."""


@dataclass(frozen=True)
class ModelSpec:
    """One model family, as the rest of the package sees it."""

    name: str
    config_cls: type
    """Dataclass of the architecture (the run configuration's ``model`` section)."""
    named_configs: Mapping[str, Mapping[str, Any]]
    """Named size -> field values of ``config_cls``."""
    build_model: Callable[..., Any]
    """``(cfg, padded_vocab_size=None)`` -> the single-device model (logits from ``forward``)."""
    layer_specs: Callable[..., List[Any]]
    """``(cfg, padded_vocab_size, tp_group=None, tracker=None, half_precision=False)`` -> DeepSpeed layer specs, in pipeline order."""
    build_block: Callable[..., Any]
    """``(cfg, layer_number)`` -> one pipeline transformer block (TP = 1)."""
    parallelize: Callable[..., Any]
    """``(model, tp_group, tracker=None)`` -> the model sharded in place for the calling TP rank."""
    partition: Any
    """The cut of the layer specs into pipeline stages (``layer_names``, ``partition``, ``max_stages``, ...)."""
    sharding: Any
    """The family's sharding table (``kinds``, ``split_dim``, ``tp_duplicated``, ...)."""
    hf: Any
    """Hugging Face adapter: ``config_from_hf``, ``to_hf_config``, ``hf_key``."""

    def named_config(self, name: str, **overrides: Any) -> Any:
        """``config_cls`` of a named size; ``overrides`` replace single fields."""
        if name not in self.named_configs:
            raise KeyError(f"unknown model_name {name!r}; known: {', '.join(self.named_configs)}")
        return self.config_cls(model_name=name, **dict(self.named_configs[name], **overrides))


_SPECS: Dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"model spec {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def get_model_spec(name: str = DEFAULT_MODEL) -> ModelSpec:
    """The registered spec of family ``name`` (its package is imported on first use)."""
    if name not in _SPECS and name in FAMILIES:
        # By name, so that this module does not depend on the families it serves.
        importlib.import_module(f"{__package__}.{name}")
    if name not in _SPECS:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return _SPECS[name]
