"""Run configuration: dataclasses, strict YAML + Megatron flag loading, validation."""
from .loader import config_from_dict, config_to_dict, parse_config, save_resolved_config
from .schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
)
from .validate import validate_config

__all__ = [
    "RunConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "parse_config",
    "validate_config",
    "save_resolved_config",
    "config_to_dict",
    "config_from_dict",
]
