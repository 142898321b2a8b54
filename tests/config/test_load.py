"""Tests for heft.config.load: YAML + dotted overrides -> one typed, frozen RunConfig; errors name field and fix."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from heft.config.load import apply_override, dump_yaml, from_dict, load, to_dict
from heft.config.schema import LoraConfig, PositionsConfig, RunConfig, StageConfig
from heft.config.suite import read_suite
from heft.errors import ConfigError

BASE = {
    "model": {"name_or_path": "/models/tiny"},
    "data": {"source": "local", "train_path": "train.jsonl", "eval_path": "validation.jsonl", "dev_size": 8},
    "stages": [{"method": "lora", "epochs": 1, "lr": 1.0e-3}, {"method": "reft", "epochs": 2}],
}


def _write(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _error(raw) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    return str(e.value)


# ----------------------------------------------------------------------------- resolving values


def test_yaml_plus_overrides_resolve_to_typed_values(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load(path, [
        ("stages.0.lr", "1e-4"),
        ("reft.layers", "[1,3]"),
        ("reft.positions.first", "3"),
        ("data.eval_size", "null"),
        ("lora.alpha", "32"),  # an int for a float field becomes a float
        ("stages.1.scheduler", "cosine"),
        ("length_bucketing", "false"),
    ])
    assert isinstance(cfg, RunConfig)
    assert type(cfg.stages[0].lr) is float and cfg.stages[0].lr == pytest.approx(1e-4)
    assert cfg.reft.layers == (1, 3) and isinstance(cfg.reft.layers, tuple)
    assert cfg.reft.positions == PositionsConfig(first=3, last=7)
    assert cfg.data.eval_size is None
    assert type(cfg.lora.alpha) is float and cfg.lora.alpha == 32.0
    assert cfg.stages[1].scheduler == "cosine"
    assert cfg.length_bucketing is False
    # untouched values come from the file, the rest from the defaults
    assert cfg.stages[0].method == "lora" and type(cfg.stages[0].epochs) is float and cfg.stages[0].epochs == 1.0
    assert cfg.stages[1] == StageConfig(method="reft", epochs=2.0, scheduler="cosine")
    assert cfg.data.dev_size == 8 and cfg.data.source == "local"
    assert cfg.lora.r == LoraConfig().r
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_lists_become_tuples():
    cfg = from_dict({**BASE, "lora": {"target_modules": ["q_proj", "v_proj"]}, "reft": {"layers": [0, 2]}})
    assert cfg.stages == (StageConfig("lora", epochs=1.0, lr=1e-3), StageConfig("reft", epochs=2.0))
    assert isinstance(cfg.stages, tuple)
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.reft.layers == (0, 2)
    assert from_dict({}).reft.layers == "all" and from_dict({}).lora.target_modules == "all-linear"


def test_override_creates_missing_sections_and_accepts_equals_form():
    from heft.cli import _split_overrides

    pairs = _split_overrides(["--reft.positions.last=0", "--stages.0.batch-size", "4"])
    assert pairs == [("reft.positions.last", "0"), ("stages.0.batch_size", "4")]
    raw: dict = {"stages": [{"method": "lora"}]}
    for k, v in pairs:
        apply_override(raw, k, v)
    cfg = from_dict(raw)
    assert cfg.reft.positions.last == 0 and cfg.stages[0].batch_size == 4


@pytest.mark.parametrize("text, expected", [
    ("1e-4", 1e-4),
    ("3.0e-4", 3e-4),
    ("2", 2),
    ("[2, 10]", [2, 10]),
    ("null", None),
    ("true", True),
    ("all", "all"),
    ("-1e-4", -1e-4),  # a signed exponent is a number too
    ("e1", "e1"),  # no digits before the exponent: text, not float('e1')
])
def test_override_values_parse_like_yaml(text, expected):
    raw: dict = {}
    apply_override(raw, "x", text)
    assert raw["x"] == expected and type(raw["x"]) is type(expected)


def test_string_override_that_looks_like_an_exponent_stays_a_string(tmp_path):
    # A stage may be named anything; `e1` must not be parsed as a number.
    cfg = load(_write(tmp_path, BASE), [("stages.0.name", "e1")])
    assert cfg.stages[0].name == "e1"


def test_yaml_file_exponent_without_dot_is_a_float(tmp_path):
    # `lr: 1e-4` is how everyone writes a learning rate; PyYAML (YAML 1.1) reads it as a string, and the CLI
    # override path already accepts `1e-4`, so the file path must too.
    path = tmp_path / "cfg.yaml"
    path.write_text("stages:\n  - {method: lora, lr: 1e-4}\n")
    cfg = load(path)
    assert cfg.stages[0].lr == pytest.approx(1e-4)


def test_yaml_1_1_words_are_read_as_the_option_a_field_lists(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans; a field whose options include the word gets the word, in a file and
    as an override, and the run folder's config.yaml reads back the same."""
    path = tmp_path / "cfg.yaml"
    path.write_text("frozen_prefix: off\nstages: [{method: lora}]\n")
    cfg = load(path)
    assert cfg.frozen_prefix == "off" and type(cfg.frozen_prefix) is str
    assert load(None, [("stages", "[]"), ("frozen_prefix", "off")]).frozen_prefix == "off"
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load(again) == cfg


def test_yaml_1_1_words_stay_booleans_elsewhere(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("lora: {merge: off, use_rslora: yes}\nstages: []\n")
    cfg = load(path)
    assert cfg.lora.merge is False and cfg.lora.use_rslora is True
    assert load(path, [("lora.merge", "On")]).lora.merge is True
    with pytest.raises(ConfigError) as e:
        load(path, [("stages", "[{method: lora, name: no}]")])
    assert "stages[0].name: expected str | None, got False" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(path, [("model.name_or_path", "yes")])
    assert "model.name_or_path: expected a string, got True" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(path, [("reft.layers", "on")])
    assert "reft.layers: expected list of int | 'all', got True" in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("Off", "frozen_prefix: must be one of 'cache' | 'recompute' | 'off', got 'Off'"),  # options match exactly
    ("false", "frozen_prefix: must be one of 'cache' | 'recompute' | 'off', got False"),  # not the word `off`
    ("yes", "frozen_prefix: must be one of 'cache' | 'recompute' | 'off', got 'yes'"),
])
def test_yaml_1_1_word_that_is_not_an_option_is_refused(tmp_path, text, message):
    for source in ("file", "override"):
        path = tmp_path / "cfg.yaml"
        path.write_text(f"frozen_prefix: {text}\nstages: []\n" if source == "file" else "stages: []\n")
        with pytest.raises(ConfigError) as e:
            load(path, [("frozen_prefix", text)] if source == "override" else [])
        assert str(e.value) == f"invalid configuration:\n  - {message}", source


def test_python_booleans_are_not_options():
    # a dict built in Python says what it means: False is not the word `off`
    with pytest.raises(ConfigError) as e:
        from_dict({"frozen_prefix": False})
    assert str(e.value) == "invalid configuration:\n  - frozen_prefix: must be one of 'cache' | 'recompute' | 'off', got False"


def test_suite_reads_yaml_1_1_words_as_options(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("common: {frozen_prefix: off, lora: {merge: no}}\n"
                    "strategies: {lora: [{method: lora}], base: []}\n")
    configs = read_suite(path, [])
    assert {c.frozen_prefix for c in configs.values()} == {"off"}
    assert {c.lora.merge for c in configs.values()} == {False}
    assert read_suite(path, [("frozen_prefix", "recompute")])["lora"].frozen_prefix == "recompute"


def test_to_dict_and_dump_yaml_round_trip():
    cfg = from_dict({
        **BASE,
        "strategy": "mine",
        "lora": {"r": 3, "alpha": 6, "target_modules": ["q_proj"], "use_rslora": True, "merge": False},
        "reft": {"kind": "direft", "rank": 2, "layers": [0, 3], "positions": {"first": 0, "last": 5}, "tied": True},
        "eval": {"method": "generate", "max_new_tokens": 2},
        "stages": [{"method": "joint", "epochs": 0.5, "lr": 1e-5, "name": "both", "max_length": 32}],
        "seed": 7,
        "precision": "fp32",
    })
    plain = to_dict(cfg)
    assert plain["reft"]["layers"] == [0, 3] and plain["stages"][0]["lr"] == 1e-5
    assert from_dict(plain) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(from_dict({})))) == from_dict({}) == RunConfig()


def test_load_round_trips_through_a_dumped_file(tmp_path):
    cfg = load(_write(tmp_path, BASE), [("reft.layers", "[1,3]"), ("stages.0.lr", "1e-5")])
    path = tmp_path / "again.yaml"
    path.write_text(dump_yaml(cfg))
    assert load(path) == cfg


# ----------------------------------------------------------------------------- errors


def test_unknown_key_lists_valid_fields():
    msg = _error({"lora": {"rank": 4}})
    assert "lora.rank: unknown field" in msg
    assert "valid fields: r, alpha, dropout, target_modules" in msg
    msg = _error({"reft": {"rnk": 4}})
    assert "reft.rnk" in msg and "rank" in msg
    assert "seed" in _error({"sed": 1})


def test_unknown_key_suggests_close_field():
    assert "did you mean positions" in _error({"reft": {"posit": {"first": 1}}})


@pytest.mark.parametrize("raw, needles", [
    ({"lora": {"r": "eight"}}, ["lora.r", "expected an integer", "'eight'"]),
    ({"lora": {"r": True}}, ["lora.r", "expected an integer"]),
    ({"stages": [{"method": "lora", "lr": "fast"}]}, ["stages[0].lr", "expected a number", "'fast'"]),
    ({"lora": {"merge": "yes"}}, ["lora.merge", "true/false"]),
    ({"model": {"name_or_path": 3}}, ["model.name_or_path", "expected a string"]),
    ({"stages": {"method": "lora"}}, ["stages", "expected a list"]),
    ({"data": ["a"]}, ["data", "expected a mapping"]),
    ({"reft": {"layers": "some"}}, ["reft.layers", "'all'", "'some'"]),
    ({"reft": {"layers": [0, "x"]}}, ["reft.layers", "'x'"]),
])
def test_wrong_type_names_field_and_value(raw, needles):
    msg = _error(raw)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_stage_without_method_is_reported():
    msg = _error({"stages": [{"method": "lora"}, {"epochs": 1}]})
    assert "stages[1].method: required field is missing" in msg
    assert "stages[0]" not in msg


def test_bad_literal_lists_the_options():
    msg = _error({"reft": {"kind": "foo"}})
    assert "reft.kind" in msg and "'foo'" in msg
    for option in ("'loreft'", "'direft'", "'noreft'"):
        assert option in msg
    msg = _error({"stages": [{"method": "prefix"}]})
    assert "stages[0].method" in msg and "'lora'" in msg and "'reft'" in msg and "'joint'" in msg


def test_several_errors_in_one_message():
    msg = _error({"lora": {"r": "eight", "bogus": 1}, "reft": {"kind": "foo"}, "stages": [{"lr": 1.0}]})
    assert msg.count("\n  - ") == 4
    for needle in ("lora.r", "lora.bogus", "reft.kind", "stages[0].method"):
        assert needle in msg
    msg = _error({"lora": {"dropout": 1.5}, "data": {"dev_size": -1}, "stages": [{"method": "lora", "epochs": -1, "lr": 0}]})
    assert msg.count("\n  - ") == 4
    for needle in ("lora.dropout", "data.dev_size", "stages[0].epochs", "stages[0].lr"):
        assert needle in msg


def test_override_index_out_of_range(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"--stages\.5\.lr: index 5 is out of range \(the list has 2 items\)"):
        load(path, [("stages.5.lr", "0.1")])
    with pytest.raises(ConfigError, match="out of range"):
        load(None, [("stages.0.lr", "0.1")])  # no stages at all


def test_override_into_a_scalar_is_a_config_error(tmp_path):
    path = _write(tmp_path, {**BASE, "lora": {"r": 4}})
    with pytest.raises(ConfigError, match="`lora.r` is not a section"):
        load(path, [("lora.r.x", "3")])
    # one level deeper must be the same ConfigError, not a TypeError from `key in 4`
    with pytest.raises(ConfigError, match="lora.r"):
        load(path, [("lora.r.x.y", "3")])


def test_override_unknown_key_is_reported_like_a_file_key(tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.rnk: unknown field"):
        load(_write(tmp_path, BASE), [("lora.rnk", "4")])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: no such file .*nope\.yaml"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, needle", [
    ("- a\n- b\n", "must hold a mapping of sections, got list"),
    ("just a string\n", "must hold a mapping of sections, got str"),
    ("stages: [unclosed\n", "is not valid YAML"),
])
def test_non_mapping_or_broken_yaml(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert needle in str(e.value) and "--config" in str(e.value) and str(path) in str(e.value)


def test_empty_or_stageless_yaml_is_refused(tmp_path):
    """An empty file (or one without `stages:`) would silently evaluate the base model: refused, naming the fix."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty; a run config needs at least `stages:`"):
        load(path)
    path.write_text("lora: {r: 4}\n")
    with pytest.raises(ConfigError, match="has no `stages:`.*`stages: \\[\\]` to evaluate the base model"):
        load(path)
    assert load(path, [("stages", "[]")]).lora.r == 4  # stages given on the command line
    path.write_text("stages: []\n")
    assert load(path) == RunConfig()  # explicit: the base model only
    path.write_text("\ufeffstages: []\n", encoding="utf-8")  # a BOM, as spreadsheets and some editors write
    assert load(path) == RunConfig()
