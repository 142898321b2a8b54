"""Suites: several strategies under one shared setup, as `heft run` and `heft compare` read them.

A suite YAML has a `common:` section (any RunConfig field but `stages`) and `strategies:`, a
mapping from a strategy name to its list of stages (`[]` is the base model, evaluated as is), or
to a mapping with `stages:` plus sections that override `common` for that strategy alone
(e.g. `reft: {init: random}`), and `search:` (a `heft tune` search space, read only by `heft compare --tune`;
without it that strategy is tuned in its method's default space).
Overrides `--section.field value` change `common`; `--strategies.NAME.I.field value` changes a stage.
"""

from __future__ import annotations

import copy
from pathlib import Path


from heft.config.schema import RunConfig
from heft.config.load import apply_override, as_bool, from_dict, read_config_file
from heft.errors import ConfigError


def default_suite_path() -> Path:
    return Path(__file__).parent / "suites" / "default.yaml"


def embedded_suites() -> list[str]:
    """Names of the suites shipped with heft (`heft run --suite NAME`)."""
    return sorted(p.stem for p in (Path(__file__).parent / "suites").glob("*.yaml"))


def suite_path(config: str | None, suite: str | None) -> Path:
    """The suite file from --config FILE or --suite NAME (neither: the default BoolQ suite)."""
    if config and suite:
        raise ConfigError("--config and --suite: give one (a suite file, or the name of an embedded suite)")
    if suite:
        if suite not in embedded_suites():
            import difflib

            close = difflib.get_close_matches(suite, embedded_suites(), n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"--suite: no embedded suite {suite!r}{hint}; embedded: {', '.join(embedded_suites())}")
        return Path(__file__).parent / "suites" / f"{suite}.yaml"
    return Path(config) if config else default_suite_path()


def read_suite(path: Path, overrides: list[tuple[str, str]]) -> dict[str, RunConfig]:
    """Strategy name -> resolved RunConfig."""
    return {name: body for name, (body, _) in _read(path, overrides).items()}


def suite_searches(path: Path, overrides: list[tuple[str, str]]) -> dict[str, object]:
    """Strategy name -> its `search:` section as written (None where it has none), for `heft compare --tune`."""
    return {name: search for name, (_, search) in _read(path, overrides).items()}


def _read(path: Path, overrides: list[tuple[str, str]]) -> dict[str, tuple[RunConfig, object]]:
    raw = read_config_file(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold `common:` and `strategies:`, got {type(as_bool(raw)).__name__}")
    unknown = set(raw) - {"common", "strategies"}
    if unknown or not isinstance(raw.get("strategies"), dict):
        raise ConfigError(f"{path}: a suite has `common:` and `strategies:` (name -> list of stages); found {sorted(raw)}")
    common, strategies = raw.get("common") or {}, raw["strategies"]
    for key, value in overrides:
        if key.startswith("strategies."):
            apply_override(raw, key, value)
        else:
            apply_override(common, key, value)
    out = {}
    for name, spec in strategies.items():
        body = copy.deepcopy(common)
        own = dict(spec) if isinstance(spec, dict) else {"stages": spec}
        search = own.pop("search", None)
        _deep_merge(body, own)
        body.update(strategy=name, stages=own.get("stages") or [])
        try:
            out[name] = (from_dict(body), search)
        except ConfigError as e:
            raise ConfigError(f"strategy {name!r}: {e}") from None
    return out


def _deep_merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def select(configs: dict[str, RunConfig], only: list[str] | None) -> dict[str, RunConfig]:
    if not only:
        return configs
    missing = [n for n in only if n not in configs]
    if missing:
        raise ConfigError(f"--only: unknown strategies {missing}; this suite has {list(configs)}")
    return {n: c for n, c in configs.items() if n in only}
