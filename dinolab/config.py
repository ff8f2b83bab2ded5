"""One configuration mechanism for every command: typed dataclasses, validated the same way wherever they come from.

Training (:class:`dinolab.train.config.TrainConfig`), curation (:class:`dinolab.curation.pipeline.PipelineConfig`)
and evaluation (``KnnConfig``, ``LinearConfig``, ...) are dataclasses whose fields carry their types. They are
built by :func:`from_dict` from a nested mapping (a JSON or TOML file read by :func:`read_config_file`, a recipe's
saved config, the options of a command line through :func:`from_namespace`), changed by ``section.key=value``
overrides (:func:`apply_overrides`) and written back by :func:`to_dict`. Every value is converted to its field's
type, unknown keys fail with the list of valid ones, and a value a config rejects fails with the key's full name:
all as :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")
_NONE_WORDS = ("none", "null")


class ConfigError(ValueError):
    """An invalid configuration value or key."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def from_dict(cls: type[ConfigT], data: dict[str, Any], prefix: str = "") -> ConfigT:
    """Build the config dataclass ``cls`` from a nested mapping, converting every value to its field's type."""
    types_ = _init_field_types(cls)
    unknown = sorted(set(data) - set(types_))
    check(
        not unknown,
        f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
        f"valid keys here: {', '.join(prefix + k for k in types_)}",
    )
    kwargs = {name: _coerce(value, types_[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from error


def to_dict(config: Any) -> Any:
    """A config as plain JSON/TOML values (sections as dicts, tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.json`` or ``.toml`` config file (TOML for anything that is not ``.json``)."""
    path = Path(path)
    check(path.is_file(), f"config file {path} not found")
    text = path.read_text()
    if path.suffix != ".json":
        try:
            import tomllib
        except ImportError as error:  # Python 3.10
            raise ConfigError(f"reading {path} needs Python >= 3.11 (tomllib); write the config as .json") from error
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as error:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"cannot read config file {path}: {error}") from error
    check(isinstance(data, dict), f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def apply_overrides(config: ConfigT, overrides: list[str]) -> ConfigT:
    """``config`` with ``section.key=value`` overrides (strings from the command line) applied, re-validated.

    A section that is absent (``None``) is created by the first override naming one of its keys."""
    data = to_dict(config)
    for override in overrides:
        check("=" in override, f"override {override!r} must look like section.key=value")
        key, value = override.split("=", 1)
        parts = key.strip().split(".")
        node, node_type = data, type(config)
        for depth, part in enumerate(parts[:-1]):
            section = _dataclass_of(_init_field_types(node_type).get(part))
            check(
                section is not None,
                f"unknown config section {'.'.join(parts[: depth + 1])!r} in override {override!r}",
            )
            if node.get(part) is None:
                node[part] = {}
            node, node_type = node[part], section
        valid = _init_field_types(node_type)
        check(parts[-1] in valid, f"unknown config key {key!r}; valid keys in this section: {', '.join(valid)}")
        node[parts[-1]] = value
    return from_dict(type(config), data)


def from_namespace(cls: type[ConfigT], args: argparse.Namespace, /, **values: Any) -> ConfigT:
    """The config ``cls`` from a command line's options: every field named like an option takes its value
    (``progress`` is the negation of ``--no-progress``); ``values`` give the fields whose option has another
    name or meaning. Validated and converted like any other config (lists become tuples, and so on)."""
    options = vars(args)
    if "no_progress" in options:
        options = {**options, "progress": not options["no_progress"]}
    data = {name: options[name] for name in _init_field_types(cls) if name in options and name not in values}
    return from_dict(cls, {**data, **values})


# ------------------------------------------------------------------------------------------------ conversion
def _init_field_types(cls: type | None) -> dict[str, Any]:
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass an annotation names (``Section`` or ``Section | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a JSON/TOML value or a command-line string to the field's declared type (``None`` is left to the
    config's own validation)."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        check(isinstance(value, dict), f"{key} must be a section (mapping), got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(inner) < len(typing.get_args(annotation))
        if optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
            return None
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    if origin in (tuple, list):
        return _coerce_sequence(value, annotation, key)
    return _coerce_scalar(value, annotation, key)


def _coerce_sequence(value: Any, annotation: Any, key: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(value, str):
        value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
    check(isinstance(value, list | tuple), f"{key} must be a list, got {value!r}")
    variable = origin is list or not args or (len(args) == 2 and args[1] is Ellipsis)
    if not variable:
        check(len(value) == len(args), f"{key} needs {len(args)} values, got {value!r}")
    item_types = [args[0] if args else str] * len(value) if variable else list(args)
    items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, annotation: Any, key: str) -> Any:
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                check(
                    lowered in ("true", "false", "1", "0", "yes", "no"), f"{key} must be true or false, got {value!r}"
                )
                return lowered in ("true", "1", "yes")
            return bool(value)
        if annotation is int:
            if isinstance(value, float):
                check(value.is_integer(), f"{key} must be an integer, got {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
        if annotation is Path:
            return Path(value)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: cannot read {value!r} as {annotation.__name__}") from error
    return value
