"""Fuzzing the command line with malformed input ("nothing lost, ever").

Hypothesis feeds `heft.cli.main` broken data rows, broken configs and broken argument lists. Every
example is built to be certainly invalid (at least one thing is always broken, checked after the
round trip through the file), so the one right answer is a refusal:

- exit code 2 (`main` returns 2 with a `heft: error:` line, or argparse raises SystemExit(2) with
  its usage line);
- the message names the input: the data file and line, the config file or every broken field, the
  flag or token;
- no `Traceback` in stdout, stderr or the log;
- every existing run folder byte-identical afterwards (a finished run, an unfinished one, a folder of
  the user's own files), no lock or swap folder left next to them, and a new --out never created.

The reference folders are trained and copied once per module; every example reruns `heft train`
against them, `--overwrite` included, so a refusal must come before the old run is touched.
Examples are derandomized (the same ones on every run) and bounded to keep the module fast.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import shutil
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml
from conftest import boolq_rows, tiny_config, write_jsonl
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from heft.cli import main
from heft.config.schema import (DataConfig, TaskConfig, EvalConfig, LoraConfig, ModelConfig, PositionsConfig, ReftConfig, RunConfig, StageConfig)
from heft.config.load import read_yaml

_FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])


def fuzz(examples: int) -> settings:
    return settings(_FUZZ, max_examples=examples)


REF_STAGES = [{"method": "lora", "epochs": 1, "batch_size": 8}]
SIZES = {"train_size": 8, "eval_size": 8}
N_TRAIN, N_EVAL = 12, 10  # rows of the fuzzed files (dev_size 8 leaves 4 training rows)


# ----------------------------------------------------------------------------- the folders that must survive


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, hidden ones included."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


class World:
    """The folders every example must leave as they are (a plain class: hypothesis prints its repr on failure)."""

    def __init__(self, runs: Path, fresh_parent: Path, config: Path, model_dir: Path, files: tuple[Path, Path]):
        self.runs = runs  # ref/ (finished), partial/ (unfinished), mine/ (not heft's); nothing else may appear here
        self.before = snapshot(runs)
        self.fresh_parent = fresh_parent  # new --out folders go here; it must stay empty
        self.config = config  # a valid run config (the reference one)
        self.model_dir, self.files = model_dir, files

    @property
    def ref(self) -> Path:
        return self.runs / "ref"

    def __repr__(self) -> str:
        return f"World({self.runs})"


@pytest.fixture(scope="module")
def world(tiny_model_dir, boolq_files, tmp_path_factory) -> World:
    """One finished run trained through the CLI, an unfinished copy of it, and a folder of user files."""
    root = tmp_path_factory.mktemp("fuzz")
    runs = root / "runs"
    cfg = root / "ref.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, boolq_files, REF_STAGES, data=SIZES), sort_keys=False))
    assert main(["train", "--config", str(cfg), "--out", str(runs / "ref")]) == 0
    shutil.copytree(runs / "ref", runs / "partial")
    for name in ("metrics.json", "predictions.jsonl"):  # as a run interrupted before its evaluation leaves it
        (runs / "partial" / name).unlink()
    (runs / "mine").mkdir()
    (runs / "mine" / "notes.txt").write_text("my own notes\n")
    (root / "fresh").mkdir()
    w = World(runs, root / "fresh", cfg, tiny_model_dir, boolq_files)
    assert {"ref/metrics.json", "ref/config.yaml", "partial/config.yaml", "mine/notes.txt"} <= set(w.before)
    return w


def run_cli(argv: list[str], capsys, caplog) -> tuple[int, str, str]:
    """(exit code, stdout + log, stderr) of `heft ...`; SystemExit (argparse) counts as its code."""
    capsys.readouterr()
    caplog.clear()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out + caplog.text, err


def assert_refused(world: World, argv: list[str], names: list[str], capsys, caplog, fresh: Path | None = None) -> str:
    """`heft argv` exits 2, says which input is wrong (one of `names`), and leaves every folder as it was."""
    code, out, err = run_cli(argv, capsys, caplog)
    try:
        event(err[err.find("error:"):][:40])  # `pytest --hypothesis-show-statistics` shows which checks the examples reach
    except Exception:  # hypothesis.errors.InvalidArgument: called from a plain test, not a hypothesis example
        pass
    assert "Traceback" not in out + err, f"{argv}\n{out}\n{err}"
    assert code == 2, f"exit {code} for {argv}\n{err}"
    if "heft: error:" not in err:
        assert "usage: heft" in err and "error:" in err, f"{argv}: neither a heft error nor a usage error\n{err}"
    message = err[err.find("error:"):]
    assert any(n in message for n in names), f"{argv}: the message names none of {names}\n{err}"
    assert snapshot(world.runs) == world.before, f"{argv} changed a run folder (or left a lock / swap folder)"
    assert not any(world.fresh_parent.iterdir()), f"{argv} left {sorted(world.fresh_parent.rglob('*'))}"
    if fresh is not None:
        assert not fresh.exists()
    return err


# ----------------------------------------------------------------------------- (a) malformed data rows


def _valid_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return True
    if name == "label" and isinstance(value, int) and value in (0, 1):
        return True
    return isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
no_newline_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1, max_size=40)


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return bool(text.strip())
    return False


@st.composite
def broken_row(draw) -> tuple[bytes, str]:
    """One jsonl line that no reader may accept, and what is wrong with it (for the failure message)."""
    base = boolq_rows(1, offset=draw(st.integers(0, 11)), google=draw(st.booleans()))[0]
    kind = draw(st.sampled_from(["not json", "truncated", "bad utf-8", "not an object", "text field", "label", "no label"]))
    if kind == "not json":
        return draw(no_newline_text.filter(_not_json)).encode(), kind
    if kind == "truncated":  # a row cut short, as by a full disk
        text = json.dumps(base)
        return text[: draw(st.integers(1, len(text) - 1))].encode(), kind
    if kind == "bad utf-8":
        clean = st.binary(max_size=12).map(lambda b: bytes(c & 0x7F for c in b).replace(b"\n", b"").replace(b"\r", b""))
        bad = draw(st.sampled_from([b"\x80", b"\xbf", b"\xc0\xaf", b"\xc3", b"\xed\xa0\x80", b"\xf5", b"\xff", b"\xfe"]))
        return draw(clean) + bad + draw(clean), kind
    if kind == "not an object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode(), kind
    row = dict(base)
    row.update(draw(st.dictionaries(st.sampled_from(["idx", "extra", "title"]), json_scalars, max_size=2)))
    if kind == "text field":
        name = draw(st.sampled_from(["question", "passage"]))
        if draw(st.booleans()):
            del row[name]
        else:
            row[name] = draw(st.one_of(json_values, st.text(" \t\u00a0\u2003\u3000", max_size=4))
                             .filter(lambda v: not isinstance(v, str) or not v.strip()))
    elif kind == "label":
        name = "answer" if "answer" in row else "label"
        row[name] = draw(json_values.filter(lambda v: not _valid_bool(v, name)))
    else:
        row.pop("answer", None)
        row.pop("label", None)
    return json.dumps(row, ensure_ascii=draw(st.booleans())).encode(), kind


def _lines(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


@st.composite
def broken_data(draw) -> dict:
    """A train/eval pair with exactly one unusable file: a bad jsonl line, a bad .json file, an empty or garbage
    file, or a row too long for the token budget; `where` is what the error must name."""
    target = draw(st.sampled_from(["train", "eval"]))
    kind = draw(st.sampled_from(["jsonl"] * 4 + ["json", "empty", "parquet", "too long"]))
    good = {"train": _lines(boolq_rows(N_TRAIN)), "eval": _lines(boolq_rows(N_EVAL, offset=5, google=True))}
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    bom = codecs.BOM_UTF8 if draw(st.booleans()) else b""
    files = {k: (f"{k}.jsonl", bom + eol.join(v) + eol) for k, v in good.items()}
    if kind == "jsonl":
        line, why = draw(broken_row())
        lines = list(good[target])
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, line)
        files[target] = (f"{target}.jsonl", bom + eol.join(lines) + eol)
        return {"files": files, "target": target, "line": at + 1, "why": why}
    if kind == "json":
        rows = boolq_rows(4)
        bad = draw(st.sampled_from(["not json", "not a list", "bad item"]))
        if bad == "not json":
            text = draw(no_newline_text.filter(_not_json))
        elif bad == "not a list":
            text = json.dumps(draw(json_values.filter(lambda v: not isinstance(v, list)
                                                      and not (isinstance(v, dict) and "data" in v))))
        else:
            rows.insert(draw(st.integers(0, 4)), draw(json_values.filter(lambda v: not isinstance(v, dict))))
            text = json.dumps({"data": rows} if draw(st.booleans()) else rows)
        files[target] = (f"{target}.json", bom + text.encode())
        return {"files": files, "target": target, "line": None, "why": f".json {bad}"}
    if kind == "empty":
        files[target] = (f"{target}.jsonl", bom + draw(st.sampled_from([b"", b"\n", b"  \n\t\r\n", b"\r\r"])))
        return {"files": files, "target": target, "line": None, "why": "no rows"}
    if kind == "parquet":
        files[target] = (f"{target}.parquet", draw(st.binary(max_size=64)))
        return {"files": files, "target": target, "line": None, "why": "not parquet"}
    # a question of 80 unknown words: 80 tokens before the answer, over data.max_length 64; only the
    # evaluated rows are tokenized, so it goes into the first eval_size rows of the eval file
    rows = boolq_rows(N_EVAL, offset=5, google=True)
    at = draw(st.integers(0, SIZES["eval_size"] - 1))
    rows[at]["question"] = " ".join(draw(st.lists(st.sampled_from(["zork", "plugh", "xyzzy", "frob"]), min_size=80, max_size=90)))
    files["eval"] = ("eval.jsonl", eol.join(_lines(rows)) + eol)
    return {"files": files, "target": "eval", "line": at + 1, "why": "too long"}


@fuzz(200)
@given(case=broken_data(), out=st.sampled_from(["ref", "partial", "fresh"]))
def test_malformed_data_rows_are_refused_before_any_write(world, tmp_path, capsys, caplog, case, out):
    folder = tmp_path / "data"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    paths = {}
    for split, (name, content) in case["files"].items():
        paths[split] = folder / name
        paths[split].write_bytes(content)
    cfg = folder / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(world.model_dir, (paths["train"], paths["eval"]), REF_STAGES, data=SIZES)))
    event(case["why"])
    bad = str(paths[case["target"]])
    name = f"{bad}:{case['line']}" if case["line"] else bad  # the file and the line
    if out.startswith("fresh"):
        target = world.fresh_parent / "run"
        argv = ["train", "--config", str(cfg), "--out", str(target)]
    else:
        target = None
        argv = ["train", "--config", str(cfg), "--out", str(world.runs / out), "--overwrite"]
    err = assert_refused(world, argv, [name], capsys, caplog, fresh=target)
    assert f"heft: error: {name}" in err, f"{case['why']}: {err}"


# ----------------------------------------------------------------------------- (b) malformed configs


SECTIONS = {"": RunConfig, "model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "reft": ReftConfig,
            "reft.positions": PositionsConfig, "eval": EvalConfig, "stages.0": StageConfig}
DATACLASSES = tuple(SECTIONS.values()) + (TaskConfig,)


def _matches(value: Any, tp: Any) -> bool:
    """Does `value` (as read back from YAML) have the annotated type? Independent of heft's own checks."""
    origin = typing.get_origin(tp)
    if origin is Union or isinstance(tp, type(int | None)):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict:
        key, val = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, val) for k, v in value.items())
    if tp in DATACLASSES:
        return value is None or isinstance(value, dict)  # what is inside is checked field by field
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    assert tp is str, tp
    return isinstance(value, str)


FIELDS = [(section, f.name, typing.get_type_hints(cls)[f.name])
          for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _path(section: str, name: str) -> tuple:
    return tuple(int(k) if k.isdigit() else k for k in section.split(".") if k) + (name,)


def _shown(path: tuple) -> str:
    """A field path as heft's messages write it: `lora.r`, `stages[0].lr`."""
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


# Known fields set to values of the right type but out of range: each must be refused.
OUT_OF_RANGE = [
    (("lora", "r"), st.integers(-5, 0)),
    (("lora", "dropout"), st.one_of(st.floats(1.0, 5.0), st.floats(-5.0, -0.01), st.just(float("nan")))),
    (("reft", "rank"), st.integers(-5, 0)),
    (("reft", "dropout"), st.one_of(st.floats(1.0, 5.0), st.floats(-5.0, -0.01))),
    (("reft", "layers"), st.one_of(st.just([]), st.just([1, 1]), st.lists(st.integers(-9, -1), min_size=1, max_size=3))),
    (("reft", "positions", "first"), st.integers(-9, -1)),  # reported as `reft.positions`
    (("data", "max_length"), st.integers(-5, 15)),
    (("data", "dev_size"), st.integers(-9, -1)),
    (("data", "train_size"), st.integers(-9, 0)),
    (("data", "eval_size"), st.integers(-9, 0)),
    (("eval", "batch_size"), st.integers(-9, 0)),
    (("log_every",), st.integers(-9, 0)),
    (("checkpoint_every",), st.integers(-9, -1)),
    (("stages", 0, "epochs"), st.one_of(st.floats(-5.0, 0.0), st.just(float("nan")))),
    (("stages", 0, "lr"), st.one_of(st.floats(-1.0, 0.0), st.just(float("nan")))),
    (("stages", 0, "batch_size"), st.integers(-9, 0)),
    (("stages", 0, "grad_accum"), st.integers(-9, 0)),
    (("stages", 0, "warmup_steps"), st.integers(-9, -1)),
    (("stages", 0, "weight_decay"), st.one_of(st.floats(-5.0, -0.001), st.just(float("nan")))),
    (("stages", 0, "max_length"), st.integers(-5, 15)),
]


def _get(raw: Any, path: tuple) -> Any:
    for k in path:
        raw = raw[k]
    return raw


def _set(raw: dict, path: tuple, value: Any) -> None:
    node = raw
    for k in path[:-1]:
        if isinstance(node, dict) and node.get(k) is None:
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


@st.composite
def mutation(draw) -> tuple[str, tuple, Any]:
    """(phase, path, value): `type` and `unknown` errors are found while building the config, `range` ones after."""
    kind = draw(st.sampled_from(["type", "type", "unknown", "range", "missing method"]))
    if kind == "type":
        section, name, tp = draw(st.sampled_from(FIELDS))
        value = draw(st.one_of(json_scalars, st.just(float("nan")), st.lists(json_scalars, max_size=3),
                               st.dictionaries(st.text(max_size=5), json_scalars, max_size=2)).filter(lambda v: not _matches(v, tp)))
        return "type", _path(section, name), value
    if kind == "unknown":
        section = draw(st.sampled_from(list(SECTIONS)))
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        key = draw(st.one_of(st.sampled_from(["rank", "lr", "name_or_path", "learning_rate", "lora_r", "layer", "batchsize"]),
                             st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=10))
                   .filter(lambda k: k not in known))
        return "unknown", _path(section, key), draw(json_scalars)
    if kind == "range":
        path, values = draw(st.sampled_from(OUT_OF_RANGE))
        return "range", path, draw(values)
    return "missing method", ("stages", 0, "method"), None


def _still_broken(raw: Any, phase: str, path: tuple, value: Any) -> bool:
    """Is the mutation still there after the YAML round trip (PyYAML may turn a string into a number)?"""
    try:
        parent = _get(raw, path[:-1])
    except (KeyError, IndexError, TypeError):
        return False
    if phase == "missing method":
        return isinstance(parent, dict) and path[-1] not in parent
    if phase == "unknown":
        return isinstance(parent, dict) and path[-1] in parent
    got = parent.get(path[-1], "absent") if isinstance(parent, dict) else "absent"
    if phase == "type":
        section = ".".join(map(str, path[:-1]))
        return not _matches(got, typing.get_type_hints(SECTIONS[section])[path[-1]])
    return got == got and got == value or (got != got and value != value)  # range: the same value (nan included)


@st.composite
def broken_config(draw, model_dir: Path, files) -> dict:
    """YAML text of a config that must be refused, and the names the error must mention (all of them)."""
    kind = draw(st.sampled_from(["fields"] * 8 + ["not a mapping", "not yaml", "not utf-8", "no stages", "late"]))
    raw = tiny_config(model_dir, files, [dict(s) for s in REF_STAGES], data=SIZES)
    if kind == "fields":
        muts, taken = [], []
        for m in draw(st.lists(mutation(), min_size=1, max_size=4)):
            path = m[1]
            if any(path[:len(t)] == t or t[:len(path)] == path for t in taken):
                continue  # one mutation per field (a section replaced by a scalar has no fields left to break)
            taken.append(path)
            muts.append(m)
        for phase, path, value in muts:
            if phase == "missing method":
                _get(raw, path[:-1]).pop("method")
            else:
                _set(raw, path, value)
        text = yaml.safe_dump(raw, allow_unicode=draw(st.booleans()), sort_keys=draw(st.booleans()))
        back = read_yaml(text)
        if not all(_still_broken(back, *m) for m in muts):
            reject()
        building = [m for m in muts if m[0] != "range"]
        # range checks run only on a config that was built: then every range error is listed
        names = [_shown(p[:2] if p[:2] == ("reft", "positions") else p) for _, p, _ in (building or muts)]
        return {"text": text.encode(), "names": names, "all": True}
    if kind == "not a mapping":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        if isinstance(read_yaml(yaml.safe_dump(value)), dict):
            reject()
        return {"text": yaml.safe_dump(value).encode(), "names": [], "all": True}
    if kind == "not yaml":
        text = draw(st.one_of(st.text(max_size=40), st.sampled_from(["stages: [", "a: b: c", "{x", "- a\nb: c", "\t- x", "@x"])))
        try:
            if isinstance(read_yaml(text), dict):
                reject()
        except yaml.YAMLError:
            pass
        return {"text": text.encode(), "names": [], "all": True}
    if kind == "not utf-8":
        text = yaml.safe_dump(raw).encode()
        at = draw(st.integers(0, len(text)))
        return {"text": text[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80"])) + text[at:],
                "names": [], "all": True}
    if kind == "no stages":
        del raw["stages"]
        return {"text": yaml.safe_dump(raw).encode(), "names": [], "all": True}
    # late: found after the config is built, when the data is read (still before anything is written)
    which = draw(st.sampled_from(["dev_size", "train_path", "eval_path"]))
    if which == "dev_size":
        raw["data"]["dev_size"] = draw(st.integers(48, 500))  # the fixture train file has 48 rows
        names = ["data.dev_size"]
    else:
        missing = str(files[0].parent / draw(st.sampled_from(["nope.jsonl", "train.json", "missing/x.parquet"])))
        raw["data"][which] = missing
        names = [missing]
    return {"text": yaml.safe_dump(raw).encode(), "names": names, "all": True}


@fuzz(300)
@given(data=st.data(), out=st.sampled_from(["ref", "partial", "fresh"]))
def test_malformed_configs_are_refused_naming_every_field(world, tmp_path, capsys, caplog, data, out):
    case = data.draw(broken_config(world.model_dir, world.files))
    cfg = tmp_path / "broken.yaml"
    cfg.write_bytes(case["text"])
    if out == "fresh":
        target = world.fresh_parent / "run"
        argv = ["train", "--config", str(cfg), "--out", str(target)]
    else:
        target = None
        argv = ["train", "--config", str(cfg), "--out", str(world.runs / out), "--overwrite"]
    names = case["names"] or [str(cfg)]
    err = assert_refused(world, argv, names, capsys, caplog, fresh=target)
    missing = [n for n in names if n not in err]
    assert not missing, f"the message misses {missing} ({len(names)} broken fields):\n{case['text']!r}\n{err}"


# ----------------------------------------------------------------------------- (c) malformed argument lists


STRAY = ["stray", "lora.r", "train", "0.5", "naïve", "x=1", "-x"]  # never a valid value for a lone override flag
LONE_FLAGS = {"--lora.r": "lora.r", "--stages.0.batch_size": "stages[0].batch_size", "--reft.tied": "reft.tied",
              "--model.dtype": "model.dtype"}  # an int, bool or enum field: no stray word is a valid value
BAD_OVERRIDES = [  # (argument tokens, names the message may use)
    (["--lora.r", "-3"], ["lora.r"]), (["--lora.r=zero"], ["lora.r"]), (["--stages.0.lr", "-1e-3"], ["stages[0].lr"]),
    (["--stages.7.lr", "1"], ["--stages.7.lr"]), (["--nosuch.field", "1"], ["nosuch"]), (["--lora.r.x", "1"], ["--lora.r.x"]),
    (["--stages.x", "1"], ["--stages.x"]), (["--data.max-length", "8"], ["data.max_length"]),
    (["--model.dtype=float64"], ["model.dtype"]), (["--stages", "5"], ["stages"]), (["--stages.0", "x"], ["stages"]),
    (["--reft.layers", "[1, 1]"], ["reft.layers"]), (["--reft.positions", "first=7"], ["reft.positions"]),
    (["--stages.0.lr", "[1e-3"], ["stages[0].lr"]), (["--eval.method", "vote"], ["eval.method"]),
    (["--stages.0.method="], ["stages[0].method"]), ([""], ["''"]),
]
GOOD_UNITS = [["--overwrite"], ["--resume"], ["--resume", "auto"], ["--resume=yes"], ["--lora.alpha", "8"], ["--lora.alpha=4"],
              ["--stages.0.epochs", "1"], ["--seed", "3"], ["--eval.batch_size", "4"], ["--log-every", "2"],
              ["--data.eval_size", "8"], ["--overw"]]


@st.composite
def broken_argv(draw, world: World, tmp: Path) -> tuple[list[str], list[str]]:
    """`heft ... train ...` with at least one fatal unit; each unit is whole (a flag with its value), so no
    unit can swallow another's token, and no fatal unit can be undone by a later one."""
    file = tmp / "a-file.txt"
    file.write_text("not a folder\n")
    broken = tmp / "broken.yaml"
    broken.write_text("stages: [\n")
    config_ok, out_ok = ["--config", str(world.config)], ["--out", str(draw(st.sampled_from(
        [world.ref, world.runs / "partial", world.fresh_parent / "run"])))]
    poisons = st.sampled_from(["stray", "lone flag", "bad override", "resume and overwrite", "resume bogus", "config missing",
                               "config broken", "config dir", "out file", "out under file", "out mine", "no out",
                               "no config", "command"]).flatmap(lambda kind: {
        "stray": st.sampled_from(STRAY).map(lambda w: ([w], [w])),
        "lone flag": st.sampled_from(sorted(LONE_FLAGS)).map(lambda f: ([f], [f, LONE_FLAGS[f]])),
        "bad override": st.sampled_from(BAD_OVERRIDES).map(lambda b: (b[0], b[1] + [b[0][0].split("=")[0]])),
        "resume and overwrite": st.just((["--resume", "--overwrite"], ["--resume", "--overwrite"])),
        "resume bogus": st.just((["--resume", "bogus"], ["--resume"])),
    }.get(kind, st.just(kind)))
    chosen = draw(st.lists(poisons, min_size=1, max_size=draw(st.sampled_from([1, 1, 1, 2, 3]))))
    lone = [p for p in chosen if isinstance(p, tuple) and p[0][0] in LONE_FLAGS]
    chosen = [p for p in chosen if p not in lone] + lone[:1]
    units = [list(u) for u in draw(st.lists(st.sampled_from(GOOD_UNITS), max_size=4))]
    names = ["--overwrite", "--resume"]
    config, out, command = config_ok, out_ok, ["train"]
    for p in chosen:
        if p in lone:
            continue
        if isinstance(p, tuple):
            units.append(list(p[0]))
            names += p[1]
        elif p.startswith("config"):
            path = {"config missing": str(tmp / "nope.yaml"), "config broken": str(broken), "config dir": str(tmp)}[p]
            config = ["--config", path]
            names += ["--config", path]
        elif p.startswith("out"):
            path = {"out file": str(file), "out under file": str(file / "run"), "out mine": str(world.runs / "mine")}[p]
            out = ["--out", path]
            names += ["--out", path]
        elif p == "no out":
            out = []
            names += ["--out"]
        elif p == "no config":  # ... and not resuming a run folder: --config is needed
            config = []
            out = ["--out", str(world.fresh_parent / "run")]
            units = [u for u in units if u[0] not in ("--resume", "--resume=yes")]
            names += ["--config"]
        else:
            command = [draw(st.sampled_from(["trian", "Train", "fit", "--train"]))]
            names += ["invalid choice", "required"]
    units += [config, out] if config or out else []
    order = draw(st.permutations(range(len(units))))
    # a lone override flag goes last, where it lacks a value; elsewhere it would take the next override flag as
    # its value and the message would blame the token after that (test_override_without_value_is_named)
    last = lone[0][0] if lone else []
    names += lone[0][1] if lone else []
    argv = (["-v"] if draw(st.booleans()) else []) + command + [t for i in order for t in units[i]] + last
    return argv, names


@fuzz(400)
@given(data=st.data())
def test_malformed_argument_lists_are_refused(world, tmp_path, capsys, caplog, data):
    argv, names = data.draw(broken_argv(world, tmp_path))
    assert_refused(world, argv, names, capsys, caplog, fresh=world.fresh_parent / "run")


def test_override_without_value_is_named(world, capsys, caplog):
    argv = ["train", "--config", str(world.config), "--out", str(world.fresh_parent / "run"), "--lora.r", "--lora.alpha", "8"]
    err = assert_refused(world, argv, ["--lora.r"], capsys, caplog)
    assert "heft: error: --lora.r" in err


def test_row_with_unpaired_surrogate_is_refused(world, tmp_path, capsys, caplog):
    rows = boolq_rows(N_EVAL, offset=5, google=True)
    rows[0]["question"] = "is it \ud800 blue"  # json.dumps writes the escape `\ud800`, json.loads reads it back
    bad = write_jsonl(tmp_path / "eval.jsonl", rows)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(world.model_dir, (world.files[0], bad), REF_STAGES, data=SIZES)))
    err = assert_refused(world, ["train", "--config", str(cfg), "--out", str(world.ref), "--overwrite"], [f"{bad}:1"],
                         capsys, caplog)
    assert f"heft: error: {bad}:1" in err
