"""Build a ``RunConfig`` from defaults, a named model, a YAML file and Megatron-style flags.

Precedence, lowest first: dataclass defaults < ``model_name``'s values < YAML < command-line flags.
Flags are the field names with dashes (``--num-layers``); booleans are switches that turn a field
on (``--bf16``) or off (``--no-bf16``, e.g. over a YAML's ``bf16: true``); list fields take several
values (``--data-path 0.7 en 0.3 fr``). Megatron-DeepSpeed's own spellings of two flags are
accepted as well (``FLAG_ALIASES``), and integers may carry its scripts' underscores (``220_000_000``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from megatron_bloom.atomic import atomic_write_text

from .docs import field_docs
from megatron_bloom.errors import UserError
from megatron_bloom.models.spec import get_model_spec
from .schema import FLAG_ALIASES, SECTIONS, RunConfig

# Flags that launchers add on their own; accepted and ignored (the rank comes from the env).
_LAUNCHER_FLAGS = ("--local_rank", "--local-rank")



class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad value or a missing argument as one ``error:`` line, without its usage."""

    def error(self, message: str):
        raise UserError(f"{message} (--help lists every flag)")


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> Tuple[Any, bool]:
    """(element type, is_list) of an annotation such as Optional[List[int]]."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, List):
        return typing.get_args(tp)[0], True
    return tp, False


def _flag_index() -> Dict[str, Tuple[str, str]]:
    """Map every field name to (section, field); names are unique across sections."""
    index: Dict[str, Tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config field {f.name} appears in two sections"
            index[f.name] = (section, f.name)
    return index


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a YAML value against a field's annotation; ints are accepted where floats are."""
    if value is None:
        return None
    elem, is_list = _base_type(tp)
    if is_list:
        if not isinstance(value, list):
            value = str(value).split() if isinstance(value, str) else [value]
        return [_coerce(v, elem, where) for v in value]
    if elem is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if elem is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if elem is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    wrong_type = elem in (int, float, str) and not isinstance(value, elem)
    if wrong_type or isinstance(value, bool):  # YAML's `yes` must not pass as the integer 1
        raise UserError(f"{where} must be of type {elem.__name__}, got {value!r}")
    return value


def load_yaml(path: str) -> Dict[str, Dict[str, Any]]:
    """Read a sectioned YAML file strictly: unknown sections or keys are errors naming the closest."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of sections ({', '.join(SECTIONS)})")
    out: Dict[str, Dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"{path}: unknown section '{section}'{_closest(section, SECTIONS)}")
        cls = SECTIONS[section]
        names = [f.name for f in dataclasses.fields(cls)]
        types = _field_types(cls)
        if not isinstance(values, dict):
            raise UserError(f"{path}: section '{section}' must be a mapping of keys to values")
        out[section] = {}
        for key, value in values.items():
            if key not in names:
                raise UserError(f"{path}: unknown key '{section}.{key}'{_closest(key, names)}")
            out[section][key] = _coerce(value, types[key], f"{path}: {section}.{key}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; unset flags stay absent (SUPPRESS)."""
    parser = _Parser(
        description="megatron-bloom run configuration (YAML via --config, Megatron-DeepSpeed flags override it)",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a typo must not silently select a longer flag
    )
    parser.add_argument("--config", help="YAML file with sections " + ", ".join(SECTIONS))
    for flag in _LAUNCHER_FLAGS:
        parser.add_argument(flag, type=int, help=argparse.SUPPRESS, dest="_launcher_local_rank")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        docs = field_docs(cls)
        types = _field_types(cls)
        for f in dataclasses.fields(cls):
            flags = ["--" + f.name.replace("_", "-"), *FLAG_ALIASES.get(f.name, ())]
            elem, is_list = _base_type(types[f.name])
            kwargs: Dict[str, Any] = {"dest": f.name, "help": docs.get(f.name, "")}
            if elem is bool:
                group.add_argument(*flags, action="store_true", **kwargs)
                if not f.name.startswith("no_"):
                    group.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", dest=f.name,
                                       help=argparse.SUPPRESS)
                continue
            if is_list:
                kwargs["nargs"] = "+"
            kwargs["type"] = elem
            group.add_argument(*flags, **kwargs)
    return parser


def _apply(cfg: RunConfig, values: Dict[str, Dict[str, Any]]) -> None:
    for section, kv in values.items():
        target = getattr(cfg, section)
        for key, value in kv.items():
            setattr(target, key, value)


def _named_model_values(name: str) -> Dict[str, Any]:
    named = get_model_spec().named_configs
    if name not in named:
        raise UserError(f"unknown model_name '{name}'{_closest(name, named)}")
    return dict(named[name])


def parse_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Resolve the run configuration from ``argv`` (defaults to sys.argv[1:]).

    Raises UserError for an unknown flag or key, a bad value or a missing file.
    """
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next(u for u in unknown if u.startswith("-")) if any(u.startswith("-") for u in unknown) else unknown[0]
        flags = [a for action in parser._actions for a in action.option_strings]
        raise UserError(f"unknown argument '{bad}'{_closest(bad.split('=')[0], flags)}")
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    yaml_values = load_yaml(given.pop("config")) if "config" in given else {}

    index = _flag_index()
    cli_values: Dict[str, Dict[str, Any]] = {}
    for name, value in given.items():
        section, key = index[name]
        cli_values.setdefault(section, {})[key] = value

    cfg = RunConfig()
    model_name = cli_values.get("model", {}).get("model_name") or yaml_values.get("model", {}).get("model_name")
    if model_name:
        _apply(cfg, {"model": _named_model_values(model_name)})
    _apply(cfg, yaml_values)
    _apply(cfg, cli_values)
    return cfg


def config_to_dict(cfg: RunConfig) -> Dict[str, Dict[str, Any]]:
    return dataclasses.asdict(cfg)


def save_resolved_config(cfg: RunConfig, directory: str, name: str = "config.yaml") -> str:
    """Write the resolved configuration next to the run's outputs; returns the file path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def config_from_dict(values: Dict[str, Dict[str, Any]]) -> RunConfig:
    """Inverse of config_to_dict (used when a checkpoint carries its configuration)."""
    cfg = RunConfig()
    _apply(cfg, values)
    return cfg


def explicit_keys(argv: Optional[Sequence[str]] = None) -> Dict[str, set]:
    """``{section: field names}`` that ``argv`` sets by flag or through its --config YAML.

    Lets a caller apply its own defaults only where the user gave nothing (defaults and
    ``model_name``'s values do not count as given).
    """
    ns, _ = build_parser().parse_known_args(argv)
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    out: Dict[str, set] = {section: set() for section in SECTIONS}
    if "config" in given:
        for section, values in load_yaml(given.pop("config")).items():
            out[section].update(values)
    index = _flag_index()
    for name in given:
        section, key = index[name]
        out[section].add(key)
    return out
