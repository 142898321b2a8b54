"""The search space of `heft tune`: the `search:` section of a run config, parsed and checked.

Each key is a dotted path, as the CLI's overrides write it (`stages.1.lr`, `reft.rank`,
`reft.positions.last`), and each value names one distribution:

    stages.0.lr:     {log_uniform: [1.0e-4, 3.0e-3]}   a float, uniform in log space
    lora.dropout:    {uniform: [0.0, 0.1]}             a float
    stages.1.epochs: {int: [1, 3]}                     an integer, both ends included
    lora.r:          {log_int: [2, 32]}                an integer, uniform in log space
    reft.layers:     {choice: [all, [8, 16]]}          one of the listed values (any YAML value)

A sampled value reaches the run config through heft.config.load.apply_override, the path the CLI's
`--a.b value` takes, so a trial's config is validated like any other. Checking happens before any
trial runs and reports every problem at once: a path that names no field (with the fields there), an
empty range, a distribution the field's type cannot take, and each end of a range (each choice) that
the config's own checks refuse. Without `search:`, `default_space` gives each stage's learning rate
and each trained method's rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from heft.config.load import apply_override, from_dict, to_dict
from heft.config.schema import RunConfig
from heft.errors import ConfigError

Kind = Literal["uniform", "log_uniform", "int", "log_int", "choice"]
KINDS: tuple[str, ...] = typing.get_args(Kind)

# What every trial of a study shares, so their scores compare: the rows they are scored on.
FIXED = {"data.eval_split": "every trial is scored on the dev split",
         "data.dev_size": "every trial is scored on the same dev rows",
         "eval.every_epoch": "trials are evaluated after every epoch for pruning"}

# Learning-rate ranges of the default space: about a decade and a half around what heft's dev-split runs used
# (LoRA 3e-4, ReFT 1e-3 to 5e-3; docs/results.md), wide enough to contain a collapse and a stall.
DEFAULT_LR = {"lora": (1.0e-4, 3.0e-3), "reft": (1.0e-4, 1.0e-2), "joint": (1.0e-4, 3.0e-3)}
DEFAULT_RANKS = {"lora.r": [4, 8, 16], "reft.rank": [2, 4, 8]}


def yaml_text(value: Any) -> str:
    """A value as one line of YAML, the text an override `--a.b TEXT` carries."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


@dataclass(frozen=True)
class Param:
    """One searched field: its dotted path and distribution (`low`/`high` for ranges, `choices` otherwise)."""

    key: str
    kind: Kind
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def log(self) -> bool:
        return self.kind in ("log_uniform", "log_int")

    def suggest(self, trial: Any) -> Any:
        """This field's value for an Optuna trial (a retried trial gets its fixed value back)."""
        if self.kind in ("uniform", "log_uniform"):
            return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)
        if self.kind in ("int", "log_int"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return self.value_of(trial.suggest_categorical(self.key, list(self.labels())))

    def labels(self) -> tuple[Any, ...]:
        """The choices as Optuna stores them: scalars as they are, lists and mappings as their YAML text."""
        return tuple(c if c is None or isinstance(c, (bool, int, float, str)) else yaml_text(c) for c in self.choices)

    def value_of(self, label: Any) -> Any:
        """The choice an Optuna label stands for."""
        return self.choices[self.labels().index(label)]

    def corners(self) -> tuple[Any, ...]:
        """The values checked before any trial runs: both ends of a range, every choice."""
        if self.kind == "choice":
            return self.choices
        if self.kind in ("int", "log_int"):
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))

    def to_json(self) -> dict[str, Any]:
        spec: Any = list(self.choices) if self.kind == "choice" else [self.low, self.high]
        return {self.kind: spec}


@dataclass(frozen=True)
class SearchSpace:
    """The searched fields, in the order the config lists them."""

    params: tuple[Param, ...]

    def to_json(self) -> dict[str, Any]:
        """`search:` as plain data (what a study records, and compares with a joining worker's)."""
        return {p.key: p.to_json() for p in self.params}

    def sample(self, trial: Any) -> dict[str, Any]:
        """Dotted path -> value for one trial."""
        return {p.key: p.suggest(trial) for p in self.params}

    def values_of(self, optuna_params: dict[str, Any]) -> dict[str, Any]:
        """Dotted path -> value from a finished trial's Optuna params (choices turned back into their values)."""
        by_key = {p.key: p for p in self.params}
        return {k: by_key[k].value_of(v) if k in by_key and by_key[k].kind == "choice" else v
                for k, v in optuna_params.items()}


def apply(base: RunConfig, values: dict[str, Any], **fixed: Any) -> RunConfig:
    """`base` with each dotted path set to its value (through the CLI's override path), then the dotted
    `fixed` settings (`fixed={"data.eval_split": "dev"}`), validated as one config."""
    raw = to_dict(base)
    for key, value in list(values.items()) + list(fixed.items()):
        apply_override(raw, key, yaml_text(value))
    return from_dict(raw)


def parse(raw: Any, base: RunConfig) -> SearchSpace:
    """The `search:` section checked against `base`: every problem in one ConfigError, one line each."""
    errors: list[str] = []
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search: expected a mapping of dotted field paths to distributions "
                          f"(e.g. `stages.0.lr: {{log_uniform: [1.0e-4, 3.0e-3]}}`), got {raw!r}")
    params = []
    for key, spec in raw.items():
        where = f"search.{key}"
        before = len(errors)
        annotation = _field_type(base, str(key), where, errors)
        param = _param(str(key), spec, errors)
        if param is None or len(errors) > before:
            continue
        _check_type(param, annotation, where, errors)
        if len(errors) == before:
            _check_corners(base, param, where, errors)
        params.append(param)
    if errors:
        raise ConfigError("invalid search space:\n  - " + "\n  - ".join(errors))
    return SearchSpace(tuple(params))


def default_space(base: RunConfig) -> SearchSpace:
    """Without `search:`: each stage's learning rate (log-uniform, by method) and the rank of each method trained."""
    if not base.stages:
        raise ConfigError("stages: [] trains nothing, so there is nothing to tune; list the training stages")
    params = [Param(f"stages.{i}.lr", "log_uniform", *DEFAULT_LR[s.method]) for i, s in enumerate(base.stages)]
    if any(s.trains_lora for s in base.stages):
        params.append(Param("lora.r", "choice", choices=tuple(DEFAULT_RANKS["lora.r"])))
    if any(s.trains_reft for s in base.stages):
        params.append(Param("reft.rank", "choice", choices=tuple(DEFAULT_RANKS["reft.rank"])))
    return SearchSpace(tuple(params))


# ----------------------------------------------------------------------------- checking one entry


def _param(key: str, spec: Any, errors: list[str]) -> Param | None:
    where = f"search.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        errors.append(f"{where}: expected one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}, got {spec!r}")
        return None
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(values, list) or len(values) < 2:
            errors.append(f"{where}: `choice` needs a list of at least 2 values, got {values!r}")
            return None
        texts = [yaml_text(v) for v in values]
        if len(set(texts)) != len(texts):
            errors.append(f"{where}: `choice` lists a value twice in {values!r}")
            return None
        return Param(key, "choice", choices=tuple(values))
    integer = kind in ("int", "log_int")
    number = (int,) if integer else (int, float)
    if (not isinstance(values, list) or len(values) != 2
            or any(isinstance(v, bool) or not isinstance(v, number) for v in values)):
        errors.append(f"{where}: `{kind}` needs [low, high] as two {'integers' if integer else 'numbers'}, got {values!r}")
        return None
    low, high = values
    if not all(math.isfinite(v) for v in values):
        errors.append(f"{where}: `{kind}` needs finite ends, got {values!r}")
    elif low >= high:
        errors.append(f"{where}: the range [{low}, {high}] is empty{' (a single value)' if low == high else ''}; "
                      "give low < high, or set the value in the config instead of searching it")
    elif kind.startswith("log") and low <= 0:
        errors.append(f"{where}: `{kind}` needs low > 0 (a log scale), got {low}; use `{kind.removeprefix('log_')}` "
                      "for ranges that reach 0")
    else:
        return Param(key, kind, low, high)
    return None


def _field_type(base: RunConfig, key: str, where: str, errors: list[str]) -> Any:
    """The annotation of the field `key` names in `base` (None after appending why it names none)."""
    if key in FIXED:
        errors.append(f"{where}: cannot be searched ({FIXED[key]})")
        return None
    node: Any = base
    tp: Any = RunConfig
    done: list[str] = []
    for part in key.split("."):
        here = ".".join(done) or "the config"
        if isinstance(node, tuple):
            if not part.isdigit() or int(part) >= len(node):
                errors.append(f"{where}: {here} has {len(node)} item(s), so `{part}` names none of them "
                              f"(indices 0-{len(node) - 1})" if node else f"{where}: {here} is empty")
                return None
            node, tp = node[int(part)], typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(type(node))
            if part not in hints:
                close = difflib.get_close_matches(part, list(hints), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                errors.append(f"{where}: {here} has no field `{part}`{hint}; its fields: {', '.join(hints)}")
                return None
            node, tp = getattr(node, part), hints[part]
        else:
            errors.append(f"{where}: `{here}` is a value, not a section")
            return None
        done.append(part)
    if dataclasses.is_dataclass(node) or (isinstance(node, tuple) and node and dataclasses.is_dataclass(node[0])):
        errors.append(f"{where}: names a whole section; search one of its fields")
        return None
    return tp


def _check_type(param: Param, annotation: Any, where: str, errors: list[str]) -> None:
    """A range needs a numeric field; an integer distribution suits int and float fields, a float one float fields."""
    if param.kind == "choice":
        return
    options = set(typing.get_args(annotation)) or {annotation}
    takes = {float} if param.kind in ("uniform", "log_uniform") else {int, float}
    if not options & takes:
        kind = "integers" if int in options else "a fixed set of values"
        errors.append(f"{where}: the field takes {kind}, not a `{param.kind}` range; use "
                      f"{'{int: [low, high]} or ' if int in options else ''}{{choice: [...]}}")


def _check_corners(base: RunConfig, param: Param, where: str, errors: list[str]) -> None:
    """Each end of the range (each choice) must make a valid config on its own."""
    for value in param.corners():
        try:
            apply(base, {param.key: value})
        except ConfigError as e:
            for line in _lines(e):
                errors.append(f"{where}: {yaml_text(value)} is refused: {line}")


def _lines(e: ConfigError) -> list[str]:
    """The messages inside one of heft.config.load's ConfigErrors (a header line, then `  - ` items)."""
    text = str(e)
    return text.split("\n  - ")[1:] if "\n  - " in text else [text]
