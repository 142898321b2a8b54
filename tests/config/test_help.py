"""Tests for heft.config.help_text: every config field is documented, and the CLI help lists it with type and default."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass

import pytest

from heft.config import load as config_load, schema
from heft.config.help_text import FieldDoc, field_docs, field_docstrings, render, suite_epilog, train_epilog


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    """Every field path, walked independently of confighelp: sections are paths too, list items are `name[]`."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], prefix + f.name
        paths.append(path)
        if dataclasses.is_dataclass(tp):
            paths += _all_paths(tp, path + ".")
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            paths += _all_paths(typing.get_args(tp)[0], path + "[].")
    return paths


def _by_path() -> dict[str, FieldDoc]:
    return {d.path: d for d in field_docs()}


def test_paths_cover_every_field_exactly_once():
    paths = [d.path for d in field_docs()]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(_all_paths(schema.RunConfig))
    assert "stages[].lr" in paths and "reft.positions.first" in paths and "model.name_or_path" in paths


@pytest.mark.parametrize("path", _all_paths(schema.RunConfig))
def test_every_field_has_a_docstring(path):
    doc = _by_path()[path].doc
    assert doc.strip(), f"{path}: add a docstring under this field in src/heft/config/schema.py"
    assert "\n" not in doc and "  " not in doc  # one paragraph


def test_every_config_dataclass_is_reached():
    """A config dataclass that field_docs never visits would escape the docstring check above."""
    reached = set()

    def walk(cls):
        reached.add(cls)
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t) and t not in reached:
                    walk(t)

    walk(schema.RunConfig)
    defined = {v for v in vars(schema).values()
               if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == schema.__name__}
    assert reached == defined == {schema.RunConfig, schema.ModelConfig, schema.DataConfig, schema.LoraConfig,
                                  schema.ReftConfig, schema.PositionsConfig, schema.StageConfig, schema.EvalConfig,
                                  schema.TaskConfig}


@dataclass(frozen=True)
class _Sample:
    documented: int = 1
    """First line,
        continued and indented."""
    bare: str = "x"
    after_bare: float | None = None
    """Belongs to after_bare only."""


def test_docstring_extraction_attaches_each_literal_to_its_own_field():
    # A field without a docstring must come out empty (so the test above fails), not borrow its neighbour's.
    assert field_docstrings(_Sample) == {"documented": "First line, continued and indented.",
                                         "after_bare": "Belongs to after_bare only."}
    docs = {d.path: d for d in field_docs(_Sample)}
    assert docs["bare"].doc == ""
    assert (docs["after_bare"].type, docs["after_bare"].default) == ("float | None", "null")
    assert (docs["bare"].type, docs["bare"].default) == ("str", "'x'")


def test_known_types_and_defaults():
    d = _by_path()
    assert (d["lora.r"].type, d["lora.r"].default) == ("int", "8")
    assert (d["lora.alpha"].type, d["lora.alpha"].default) == ("float", "16.0")
    assert (d["reft.layers"].type, d["reft.layers"].default) == ("list of int | 'all'", "'all'")
    assert (d["stages[].method"].type, d["stages[].method"].default) == ("'lora' | 'reft' | 'joint'", "required")
    assert (d["stages[].lr"].type, d["stages[].lr"].default) == ("float", "0.001")
    assert (d["model.revision"].type, d["model.revision"].default) == ("str | None", "null")
    assert (d["model.name_or_path"].type, d["model.name_or_path"].default) == ("str", "'smollm2-135m'")
    assert d["lora.target_modules"].default == "'all-linear'"
    assert d["lora.merge"].default == "true" and d["model.trust_remote_code"].default == "false"
    assert d["stages"].default == "[]" and d["stages"].type == "list of StageConfig"
    assert d["reft.positions"].type == "section"


def test_defaults_match_the_dataclasses():
    """Every rendered default reads back (as YAML) to the dataclass default, so help can't drift from code."""
    defaults = config_load.to_dict(schema.RunConfig())
    for d in field_docs():
        if d.type == "section" or d.default == "required" or "[]" in d.path:
            continue
        node = defaults
        for key in d.path.split("."):
            node = node[key]
        assert config_load.read_yaml(d.default) == node, d.path
    stage = config_load.to_dict(schema.StageConfig(method="lora"))
    task = config_load.to_dict(schema.TaskConfig(name="arc_easy"))
    for d in field_docs():
        if d.path.startswith("stages[].") and d.default != "required":
            assert config_load.read_yaml(d.default) == stage[d.path.removeprefix("stages[].")], d.path
        if d.path.startswith("data.tasks[].") and d.default != "required":
            assert config_load.read_yaml(d.default) == task[d.path.removeprefix("data.tasks[].")], d.path


def test_render_lists_every_field_grouped_by_section():
    docs = field_docs()
    text = render(docs, width=100)
    for d in docs:
        if d.type == "section":
            assert f"\n{d.path}:\n" in text
        elif d.path.startswith("stages[]."):
            assert f"  --stages.I.{d.path.removeprefix('stages[].')} " in text
        else:
            assert f"  --{d.path.replace('[]', '.I')} " in text, d.path
    assert "  --model.name_or_path STR (default: 'smollm2-135m')\n" in text
    assert "  --stages.I.method 'lora' | 'reft' | 'joint' (required)\n" in text
    assert "  --model.revision STR | null (default: null)\n" in text
    assert "\nstages[]:\n" in text and "\nreft.positions:\n" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith("  --")) <= 100  # docs wrap; flags don't


def test_epilogs_in_argparse_keep_their_layout():
    for epilog, flag in ((train_epilog(), "--stages.I.lr"), (suite_epilog(), "--strategies.NAME.I.lr")):
        p = argparse.ArgumentParser(prog="heft x", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        assert epilog in p.format_help()
        assert f"  {flag} FLOAT (default: 0.001)\n" in epilog
        assert "  --lora.r INT (default: 8)\n" in epilog
    suite = suite_epilog()
    assert "common" in suite and "--strategies.NAME.I.FIELD" in suite
    assert "  --stages " not in suite and "  --strategy " not in suite  # set per strategy, not overridable in common


def test_import_does_not_load_torch():
    code = ("import sys, heft.config.help_text as h; h.train_epilog(); h.suite_epilog(); "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
