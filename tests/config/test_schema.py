"""Tests for heft.config.schema: each section's range checks, the checks across sections, labels and defaults."""

from __future__ import annotations

import dataclasses

import pytest

from heft.config.load import apply_override, from_dict
from heft.config.schema import (DataConfig, EvalConfig, LoraConfig, ModelConfig, PositionsConfig, ReftConfig, RunConfig,
                                StageConfig, TaskConfig, check_ranges)
from heft.errors import ConfigError
from heft.run.folder import stage_dir_name


def _error(raw) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    return str(e.value)


def _checked(cfg: RunConfig) -> list[str]:
    errors: list[str] = []
    check_ranges(cfg, errors)
    return errors


# ----------------------------------------------------------------------------- range checks


@pytest.mark.parametrize("raw, needles", [
    ({"stages": [{"method": "lora", "epochs": -1}]}, ["stages[0].epochs", "must be positive", "-1"]),
    ({"stages": [{"method": "lora", "batch_size": 0}]}, ["stages[0].batch_size", "must be positive"]),
    ({"stages": [{"method": "lora", "max_length": 8}]}, ["stages[0].max_length", ">= 16"]),
    ({"lora": {"dropout": 1.5}}, ["lora.dropout", "[0, 1)", "1.5"]),
    ({"reft": {"dropout": -0.1}}, ["reft.dropout", "[0, 1)"]),
    ({"data": {"dev_size": -1}}, ["data.dev_size", ">= 0", "-1"]),
    ({"data": {"train_size": 0}}, ["data.train_size", "positive"]),
    ({"data": {"eval_size": 0}}, ["data.eval_size", "positive"]),
    ({"data": {"max_length": 8}}, ["data.max_length", ">= 16"]),
    ({"lora": {"r": 0}}, ["lora.r", "positive"]),
    ({"reft": {"rank": -2}}, ["reft.rank", "positive"]),
    ({"reft": {"layers": [1, 3, 1]}}, ["reft.layers", "duplicate", "[1, 3, 1]"]),
    ({"reft": {"layers": [-1]}}, ["reft.layers", ">= 0"]),
    ({"reft": {"layers": []}}, ["reft.layers", "`all`"]),
    ({"reft": {"positions": {"first": 0, "last": 0}}}, ["reft.positions", "first + last must be > 0"]),
    ({"reft": {"positions": {"first": -1}}}, ["reft.positions", ">= 0"]),
    ({"log_every": 0}, ["log_every", "positive"]),
    ({"data": {"source": "local"}, "stages": [{"method": "lora"}]}, ["data.train_path", "data.eval_path"]),
    ({"stages": [{"method": "lora", "name": "a"}, {"method": "reft", "name": "a"}]}, ["stages", "distinct `name`s"]),
    ({"lora": {"merge": False}, "stages": [{"method": "lora"}, {"method": "joint"}]}, ["stages[1].method", "lora.merge: true"]),
])
def test_out_of_range_names_field_and_fix(raw, needles):
    msg = _error(raw)
    for needle in needles:
        assert needle in msg, (needle, msg)


FOLDER_NAME = "must be a plain folder name (letters, digits, `.`, `_`, `-`; no `/`)"


def test_every_message_word_for_word():
    """One config breaking every rule it can at once: each section's messages in order, then the stages', then
    those spanning sections."""
    cfg = RunConfig(
        stages=(StageConfig("lora", epochs=0, lr=0, batch_size=0, grad_accum=0, warmup_steps=-1, weight_decay=-1.0,
                            max_length=8, name="a/b"),
                StageConfig("joint", name="a/b")),
        model=ModelConfig(init="random", quantization="4bit"),
        data=DataConfig(source="local", format="chat", max_length=8, dev_size=-1, train_size=0, eval_size=0),
        lora=LoraConfig(r=0, dropout=1.0, layers=()),
        reft=ReftConfig(rank=0, dropout=-0.1, layers=(1, 1, -1), positions=PositionsConfig(first=-1, last=20)),
        eval=EvalConfig(batch_size=0, extractor="regex"),
        log_every=0, prefix_cache_gb=-1.0, checkpoint_every=-1,
    )
    assert _checked(cfg) == [
        "data.max_length: must be >= 16, got 8",
        "data.dev_size: must be >= 0, got -1",
        "data.train_size: must be positive or null, got 0",
        "data.eval_size: must be positive or null, got 0",
        "data.eval_path: required when data.source is 'local'",
        "eval.batch_size: must be positive, got 0",
        "eval.pattern: required with eval.extractor: regex",
        "model.init: random weights cannot be loaded in 4-bit; set model.quantization: none with model.init: random",
        "lora.r: must be positive, got 0",
        "lora.dropout: must be in [0, 1), got 1.0",
        "lora.layers: an empty list adapts nothing; use `all` or list layer indices",
        "reft.rank: must be positive, got 0",
        "reft.dropout: must be in [0, 1), got -0.1",
        "reft.positions: first and last must be >= 0, got first=-1 last=20",
        "reft.layers: duplicate layer indices in [1, 1, -1]",
        "reft.layers: indices must be >= 0, got [1, 1, -1]",
        "log_every: must be positive, got 0",
        "prefix_cache_gb: must be >= 0 (0: keep nothing), got -1.0",
        "checkpoint_every: must be >= 0 (0: epoch ends only), got -1",
        "stages[0].epochs: must be positive, got 0",
        "stages[0].lr: must be positive, got 0",
        "stages[0].batch_size: must be positive, got 0",
        "stages[0].grad_accum: must be positive, got 0",
        "stages[0].warmup_steps: must be >= 0, got -1",
        "stages[0].weight_decay: must be >= 0, got -1.0",
        "stages[0].max_length: must be >= 16, got 8",
        f"stages[0].name: 'a/b' {FOLDER_NAME}",
        f"stages[1].name: 'a/b' {FOLDER_NAME}",
        "data.train_path: required when data.source is 'local' and there are training stages",
        "lora.merge: a LoRA stage cannot be merged into 4-bit weights; set lora.merge: false with model.quantization: 4bit",
        "reft.positions: first + last = 19 positions do not fit in max_length 8 tokens; lower them",
        "stages: two stages share the folder name ['a/b', 'a/b']; set distinct `name`s",
    ]
    tasks = DataConfig(format="chat", columns={"a": "b"},
                       tasks=(TaskConfig("arc_easy", train_size=0, eval_size=0), TaskConfig("arc_easy")))
    stages = (StageConfig("lora"), StageConfig("reft"), StageConfig("joint"))
    assert _checked(RunConfig(stages=stages, data=tasks, lora=LoraConfig(merge=False))) == [
        "data.tasks: read with data.source: builtin (offline) or hub (official splits)",
        "data.tasks[0].train_size: must be positive or null",
        "data.tasks[0].eval_size: must be positive or null",
        "data.tasks: a task is listed twice in ['arc_easy', 'arc_easy']",
        "data.format / data.columns: describe local files; set data.source: local (or remove them)",
        "stages[2].method: a second LoRA stage needs lora.merge: true (the earlier adapter is merged first)",
    ]
    assert _checked(RunConfig(data=DataConfig(source="builtin"))) == [
        "data.tasks: list the built-in tasks with data.source: builtin, e.g. `[{name: arc_easy}]`"]
    assert _checked(RunConfig(reft=ReftConfig(positions=PositionsConfig(first=0, last=0)))) == [
        "reft.positions: first + last must be > 0 (no position to edit)"]
    assert _checked(RunConfig()) == []


def test_each_section_checks_only_its_own_fields_under_their_full_names():
    errors: list[str] = []
    StageConfig("lora", lr=0, max_length=8).check(errors, "stages[3]")
    TaskConfig("arc_esy", eval_size=0).check(errors, "data.tasks[1]")
    PositionsConfig(first=-1).check(errors)
    assert errors[:2] == ["stages[3].lr: must be positive, got 0", "stages[3].max_length: must be >= 16, got 8"]
    assert errors[2].startswith("data.tasks[1].name: unknown task 'arc_esy' (did you mean arc_easy")
    assert errors[3:] == ["data.tasks[1].eval_size: must be positive or null",
                          "reft.positions: first and last must be >= 0, got first=-1 last=7"]
    # the top level checks its own fields, not its sections' (check_ranges runs those)
    errors = []
    RunConfig(log_every=0, lora=LoraConfig(r=0), stages=(StageConfig("lora", lr=0),)).check(errors)
    assert errors == ["log_every: must be positive, got 0"]
    # max_length: 16 passes the stage's own check; against reft.positions it is checked across sections
    assert _checked(RunConfig(stages=(StageConfig("reft", max_length=16),), reft=ReftConfig(
        positions=PositionsConfig(first=8, last=8)))) == [
        "reft.positions: first + last = 16 positions do not fit in max_length 16 tokens; lower them"]


# ----------------------------------------------------------------------------- labels and names


@pytest.mark.parametrize("methods, label", [
    ([], "base"),
    (["lora"], "lora"),
    (["lora", "lora"], "lora"),
    (["reft"], "reft"),
    (["lora", "reft"], "heft"),
    (["joint"], "joint"),
    (["lora", "joint"], "joint"),
])
def test_label(methods, label):
    cfg = RunConfig(stages=tuple(StageConfig(m) for m in methods))
    assert cfg.label() == label
    assert dataclasses.replace(cfg, strategy="custom").label() == "custom"


def test_stage_folder_names_and_their_collisions_follow_one_rule():
    """The run folder names stage folders; the schema refuses two stages sharing one with a copy of that rule."""
    assert stage_dir_name(0, StageConfig("lora")) == "00-lora"
    assert stage_dir_name(11, StageConfig("reft")) == "11-reft"
    assert stage_dir_name(1, StageConfig("reft", name="mine")) == "mine"
    # a chosen name equal to another stage's default name
    assert "stages: two stages share the folder name ['01-reft', '01-reft']; set distinct `name`s" in _error(
        {"stages": [{"method": "lora", "name": "01-reft"}, {"method": "reft"}]})
    assert from_dict({"stages": [{"method": "lora", "name": "00-reft"}, {"method": "reft"}]}).stages[0].name == "00-reft"


def test_defaults_are_valid_and_documented_types():
    """Each field's default, written back as the override `--help` documents (`--path DEFAULT`), passes
    validation and changes nothing: not even its type (repr tells `16` from `16.0` and `[]` from `()`), so a
    default outside its own annotation (an int for a float field, a list for a tuple) or its range fails here.
    (That every field has a docstring is test_help.py's job.)"""
    from heft.config.help_text import field_docs

    assert from_dict({}) == RunConfig()
    base, stage = RunConfig(), StageConfig(method="lora")
    checked = []
    for d in field_docs():
        if d.type == "section" or d.default == "required" or d.path.startswith("data.tasks[]."):
            continue  # a task's fields: checked through `data.tasks` (default [])
        if d.path.startswith("stages[]."):
            raw: dict = {"stages": [{"method": "lora"}]}
            apply_override(raw, "stages.0." + d.path.removeprefix("stages[]."), d.default)
            got, want = from_dict(raw).stages, (stage,)
        else:
            raw = {}
            apply_override(raw, d.path, d.default)
            got, want = from_dict(raw), base
        assert got == want and repr(got) == repr(want), f"{d.path}: default {d.default} ({d.type})"
        checked.append(d.path)
    assert {"lora.alpha", "reft.layers", "reft.positions.first", "stages", "stages[].lr", "stages[].max_length"} <= set(checked)
