"""Loading a config: YAML plus dotted CLI overrides -> one resolved, frozen `RunConfig` (heft.config.schema).

The loader walks the dataclasses' annotations: each value is checked against its field's type and converted
(lists -> tuples, ints -> floats), unknown fields are named with the valid ones, and then the schema's range
checks run. Every problem found on the way is collected and raised together in one `ConfigError`.
YAML is read as YAML 1.2 reads numbers (`1e-4` is a float); the YAML 1.1 words on/off/yes/no keep their text
where a field's options include it (`frozen_prefix: off`) and are booleans everywhere else.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from heft.config.schema import RunConfig, check_ranges
from heft.errors import ConfigError


def type_name(tp: Any) -> str:
    """A type annotation as a user reads it: `float | None`, `'auto' | 'fp32'`, `list of int | 'all'`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping of {} to {}".format(*(type_name(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return "None"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


class BoolWord(str):
    """A YAML 1.1 boolean word (`on`, `off`, `yes`, `no`, in any of YAML's cases) as written in a file or an
    override. YAML 1.1 reads it as a boolean, so `frozen_prefix: off` would arrive as False; kept as its text,
    `_coerce` gives the field the word where the field's options include it, and the boolean everywhere else."""

    @property
    def boolean(self) -> bool:
        return self.lower() in ("yes", "on")


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples, ints -> floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        for option in options:
            sub: list[str] = []
            out = _coerce(value, option, where, sub)
            if not sub:
                return out
        errors.append(f"{where}: expected {type_name(tp)}, got {as_bool(value)!r}")
        return value
    if origin is Literal:
        if isinstance(value, BoolWord) and str(value) in typing.get_args(tp):
            return str(value)
        if value not in typing.get_args(tp):
            errors.append(f"{where}: must be one of {type_name(tp)}, got {value!r}")
        return value
    value = as_bool(value)
    if tp is type(None):
        if value is not None:
            errors.append(f"{where}: expected null, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return value
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{where} key", errors): _coerce(v, val_tp, f"{where}.{k}", errors) for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # internal: a field type we forgot


def as_bool(value: Any) -> Any:
    """`value` with a YAML 1.1 word turned into the boolean YAML 1.1 reads (what every non-option field gets)."""
    return value.boolean if isinstance(value, BoolWord) else value


def _build(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where or 'config'}: expected a mapping of fields, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            errors.append(f"{path}: unknown field{hint}; valid fields: {', '.join(fields)}")
            continue
        kwargs[key] = _coerce(value, hints[key], path, errors)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}.{name}: required field is missing")
    if errors:
        return None
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from plain data; raise one ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _build(RunConfig, raw, "", errors)
    if cfg is not None:
        check_ranges(cfg, errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain data (lists, dicts, scalars) for YAML/JSON, the inverse of `from_dict`."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but reading `1e-4` as a number as YAML 1.2 does (YAML 1.1 wants `1.0e-4`), and
    on/off/yes/no as `BoolWord`s, so the schema decides between the word and its boolean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_bool(loader: _Loader, node: yaml.ScalarNode) -> bool | BoolWord:
    text = loader.construct_scalar(node)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return BoolWord(text)


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def read_yaml(text: str) -> Any:
    """YAML text as plain data, read as `_Loader` says (the raw input of `from_dict`)."""
    return yaml.load(text, Loader=_Loader)


def _parse_scalar(text: str) -> Any:
    """A CLI value as YAML would read it (`1e-4` -> float, `[2, 10]` -> list, `null` -> None)."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. an unbalanced bracket): keep the text; type checks report it


def apply_override(raw: dict[str, Any], dotted: str, text: str) -> None:
    """Set `a.b.c` (or `stages.0.lr`) in nested plain data from a CLI string value."""
    keys = dotted.split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        nxt_is_index = keys[i + 1].isdigit()
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--{dotted}: `{'.'.join(keys[:i])}` is not a section, it is {node!r}")
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--{dotted}: index {key} is out of range (the list has {len(node)} items)")
            node = node[int(key)]
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt_is_index else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--{dotted}: index {last} is out of range (the list has {len(node)} items)")
        node[int(last)] = _parse_scalar(text)
    elif isinstance(node, dict):
        node[last] = _parse_scalar(text)
    else:
        raise ConfigError(f"--{dotted}: `{'.'.join(keys[:-1])}` is not a section, it is {node!r}")


def read_config_file(path: Path) -> Any:
    """The YAML document of a `--config` file, or a ConfigError naming the file and what is wrong with it."""
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        return read_yaml(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None


def load(path: str | Path | None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply `--a.b value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        raw = read_config_file(p)
        if raw is None:
            raise ConfigError(f"--config: {p} is empty; a run config needs at least `stages:` (e.g. "
                              "`stages: [{method: lora, epochs: 1}]`, or `stages: []` to evaluate the base model)")
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of sections, got {type(as_bool(raw)).__name__}")
        if "stages" not in raw and not any(k == "stages" or k.startswith("stages.") for k, _ in overrides):
            raise ConfigError(f"--config: {p} has no `stages:`; list the training stages (e.g. "
                              "`stages: [{method: lora, epochs: 1}]`), or write `stages: []` to evaluate the base model only")
    for dotted, text in overrides:
        apply_override(raw, dotted, text)
    return from_dict(raw)


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (what every run folder stores as `config.yaml`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
