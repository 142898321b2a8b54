"""The `search:` section: every distribution parsed and sampled into a valid config through the CLI's override
path, every bad entry reported at once (one line each, word for word), and the default space per method."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from heft.config.load import from_dict  # noqa: E402
from heft.errors import ConfigError  # noqa: E402
from heft.tune.space import Param, default_space, parse  # noqa: E402

HEFT = {"stages": [{"method": "lora", "epochs": 1, "lr": 3e-4}, {"method": "reft", "epochs": 2, "lr": 1e-3}]}


def test_each_distribution_is_sampled_into_the_config():
    base = from_dict(HEFT)
    space = parse({"stages.0.lr": {"log_uniform": [1.0e-4, 3.0e-3]}, "lora.dropout": {"uniform": [0.0, 0.1]},
                   "stages.1.epochs": {"int": [1, 3]}, "lora.r": {"log_int": [2, 32]},
                   "reft.layers": {"choice": ["all", [1, 2]]}, "reft.positions.last": {"choice": [3, 7]}}, base)
    assert [p.kind for p in space.params] == ["log_uniform", "uniform", "int", "log_int", "choice", "choice"]
    layers = space.params[4]
    assert layers.labels() == ("all", "[1, 2]")  # a list choice is stored in Optuna as its YAML text
    trial = optuna.trial.FixedTrial({"stages.0.lr": 5.0e-4, "lora.dropout": 0.05, "stages.1.epochs": 3, "lora.r": 16,
                                     "reft.layers": "[1, 2]", "reft.positions.last": 3})
    values = space.sample(trial)
    assert values == {"stages.0.lr": 5.0e-4, "lora.dropout": 0.05, "stages.1.epochs": 3, "lora.r": 16,
                      "reft.layers": [1, 2], "reft.positions.last": 3}
    from heft.tune.space import apply

    cfg = apply(base, values, **{"data.eval_split": "dev"})
    assert (cfg.stages[0].lr, cfg.lora.dropout, cfg.stages[1].epochs, cfg.lora.r) == (5.0e-4, 0.05, 3.0, 16)
    assert (cfg.reft.layers, cfg.reft.positions.last, cfg.data.eval_split) == ((1, 2), 3, "dev")
    assert cfg.stages[1].lr == base.stages[1].lr and cfg.reft.rank == base.reft.rank  # unsearched fields stay
    assert space.values_of({"reft.layers": "[1, 2]", "lora.r": 8}) == {"reft.layers": [1, 2], "lora.r": 8}


def test_every_bad_entry_is_reported_at_once_one_line_each():
    with pytest.raises(ConfigError) as e:
        parse({"reft.rnk": {"choice": [2, 4]},
               "stages.2.lr": {"log_uniform": [1.0e-4, 1.0e-3]},
               "stages.0.lr": {"log_uniform": [3.0e-3, 1.0e-4]},
               "stages.1.lr": {"log_uniform": [0.0, 1.0e-3]},
               "lora.alpha": {"uniform": [8, 8]},
               "lora.r": {"uniform": [2, 16]},
               "lora.dropout": {"uniform": [0.0, 1.5]},
               "reft.kind": {"choice": []},
               "seed": {"range": [0, 3]},
               "data.eval_split": {"choice": ["dev", "validation"]},
               "reft": {"choice": [1, 2]}}, from_dict(HEFT))
    assert str(e.value).split("\n") == [
        "invalid search space:",
        "  - search.reft.rnk: reft has no field `rnk` (did you mean rank?); its fields: kind, rank, layers, positions, tied, "
        "init, dropout, offset",
        "  - search.stages.2.lr: stages has 2 item(s), so `2` names none of them (indices 0-1)",
        "  - search.stages.0.lr: the range [0.003, 0.0001] is empty; give low < high, or set the value in the config "
        "instead of searching it",
        "  - search.stages.1.lr: `log_uniform` needs low > 0 (a log scale), got 0.0; use `uniform` for ranges that reach 0",
        "  - search.lora.alpha: the range [8, 8] is empty (a single value); give low < high, or set the value in the "
        "config instead of searching it",
        "  - search.lora.r: the field takes integers, not a `uniform` range; use {int: [low, high]} or {choice: [...]}",
        "  - search.lora.dropout: 1.5 is refused: lora.dropout: must be in [0, 1), got 1.5",
        "  - search.reft.kind: `choice` needs a list of at least 2 values, got []",
        "  - search.seed: expected one of {uniform: ...}, {log_uniform: ...}, {int: ...}, {log_int: ...}, {choice: ...}, "
        "got {'range': [0, 3]}",
        "  - search.data.eval_split: cannot be searched (every trial is scored on the dev split)",
        "  - search.reft: names a whole section; search one of its fields",
    ]


def test_a_choice_the_field_cannot_take_names_the_value():
    with pytest.raises(ConfigError) as e:
        parse({"precision": {"choice": ["fp32", "fp8"]}, "stages.0.method": {"choice": ["lora", "joint"]}}, from_dict(HEFT))
    assert str(e.value).split("\n")[1:] == [
        "  - search.precision: fp8 is refused: precision: must be one of 'auto' | 'fp32' | 'bf16', got 'fp8'"]


def test_default_space_tunes_each_stage_lr_by_method_and_each_rank():
    space = default_space(from_dict(HEFT))
    assert space.params == (Param("stages.0.lr", "log_uniform", 1.0e-4, 3.0e-3), Param("stages.1.lr", "log_uniform", 1.0e-4, 1.0e-2),
                            Param("lora.r", "choice", choices=(4, 8, 16)), Param("reft.rank", "choice", choices=(2, 4, 8)))
    lora_only = default_space(from_dict({"stages": [{"method": "lora"}]}))
    assert [p.key for p in lora_only.params] == ["stages.0.lr", "lora.r"]
    with pytest.raises(ConfigError, match=r"stages: \[\] trains nothing"):
        default_space(from_dict({"stages": []}))
