"""CLI help generated from the config dataclasses: every field's path, type, default and docstring.

As in litgpt, the docstring literal written under each field in heft.config.schema is the one place a
field is documented; `heft train --help` and `heft run/compare --help` list them all. Docstrings are read
from the source with `ast` (Python keeps no reference to them at runtime), so this module needs nothing
but the schema and never imports torch.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from heft.config.schema import RunConfig
from heft.config.load import type_name

STAGES_ITEM = "stages[]"  # the path prefix of a stage's fields: `stages[].lr`


@dataclass(frozen=True)
class FieldDoc:
    """One config field as the help shows it."""

    path: str
    """Dotted path, e.g. `model.name_or_path`, `reft.positions.first`, `stages[].lr`."""
    type: str
    """Readable type: `int`, `float | None`, `'lora' | 'reft' | 'joint'`, `list of int | 'all'`."""
    default: str
    """The default as YAML shows it (`null`, `true`, `'all-linear'`, `[]`), or `required`."""
    doc: str
    """The field's docstring as one paragraph."""


# ----------------------------------------------------------------------------- reading the dataclasses


@functools.cache
def field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string statement right after the field), from `cls`'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: help without descriptions rather than no help
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def yaml_value(value: Any) -> str:
    """A default value as YAML shows it: `null`, `true`, `'all-linear'`, `[]`, `[2, 10]`, `0.001`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return repr(value)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else yaml_value(value)
    return "required"


def _stage_item(tp: Any) -> type | None:
    """The dataclass of a `tuple[SomeConfig, ...]` field (a list of sections such as `stages`), else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[FieldDoc]:
    """Every field of `cls` and of the dataclasses nested in it, with its type, default and docstring.

    A class's plain fields come first, then each nested section (its own entry, then its fields), so
    the fields of one section stay together; the items of a list of sections (`stages`) are documented
    once as `stages[].FIELD`.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    plain: list[FieldDoc] = []
    nested: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        path, tp = prefix + f.name, hints[f.name]
        entry = FieldDoc(path, type_name(tp), _default(f), docs.get(f.name, ""))
        item = _stage_item(tp)
        if dataclasses.is_dataclass(tp):
            nested += [entry, *field_docs(tp, path + ".")]
        elif item is not None:
            plain.append(dataclasses.replace(entry, type=f"list of {item.__name__}"))
            nested += field_docs(item, f"{path}[].")
        else:
            plain.append(entry)
    return plain + nested


# ----------------------------------------------------------------------------- rendering


def _metavar(type_: str) -> str:
    """`float | None` -> `FLOAT | null`; quoted choices stay as they are."""
    parts = re.split(r"('[^']*')", type_)  # keep Literal choices untouched
    out = []
    for part in parts:
        if not part.startswith("'"):
            part = re.sub(r"\b(int|float|str|bool)\b", lambda m: m.group(1).upper(), part).replace("None", "null")
        out.append(part)
    return "".join(out)


def _section(path: str) -> str:
    return path.rpartition(".")[0]


def render(docs: list[FieldDoc], width: int = 100, *, stage_flag: str = "stages.I") -> str:
    """The fields as a help text, one block per section (`model:`, `reft.positions:`, `stages[]:`).

    Each field reads `  --model.name_or_path STR (default: 'smollm2-135m')` and its docstring, wrapped
    to `width` and indented. Fields under `stages[]` are shown as `--{stage_flag}.FIELD`.
    Meant for an argparse epilog with `RawDescriptionHelpFormatter`.
    """
    sections = {d.path for d in docs if d.type == "section"}
    lines: list[str] = []
    current = None
    for d in docs:
        if d.path in sections:
            continue  # a section is its heading, written with its first field
        section = _section(d.path)
        if section != current:
            current = section
            lines += ["", f"{section or 'top level'}:"]
            head = next((s for s in docs if s.path == section and s.doc), None)
            if head is not None:
                lines += textwrap.wrap(head.doc, width, initial_indent="  ", subsequent_indent="  ")
        flag = d.path.replace(STAGES_ITEM, stage_flag, 1) if d.path.startswith(STAGES_ITEM) else d.path.replace("[]", ".I")
        default = "required" if d.default == "required" else f"default: {d.default}"
        lines.append(f"  --{flag} {_metavar(d.type)} ({default})")
        if d.doc:
            lines += textwrap.wrap(d.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).lstrip("\n")


def train_epilog(width: int = 100) -> str:
    """The epilog of `heft train --help`: how overrides work, then every config field."""
    intro = textwrap.fill(
        "Every config field can be set in the --config YAML (sections as mappings, `stages` as a list) or "
        "overridden on the command line as --section.field VALUE; values are read as YAML (`1e-4`, `null`, "
        "`[2, 10, 18]`). A stage's field is --stages.I.FIELD, with I its index in `stages` (from 0), "
        "e.g. --lora.r 16 --stages.0.lr 1e-4.", width)
    return f"{intro}\n\nconfig fields:\n\n{render(field_docs(), width)}"


def suite_epilog(width: int = 100) -> str:
    """The epilog of `heft run/compare --help`: `common` and per-strategy overrides, then the fields."""
    intro = "\n".join([
        textwrap.fill(
            "A suite YAML has `common:` (any field below except `stages` and `strategy`) and `strategies:` (a name "
            "-> its list of stages, or a mapping with `stages:` plus sections overriding `common` for that "
            "strategy alone). Values are read as YAML (`1e-4`, `null`, `[2, 10, 18]`).", width),
        "",
        textwrap.fill("--section.field VALUE overrides `common` for every strategy, e.g. --lora.r 16 --model.dtype float32.",
                      width),
        textwrap.fill(
            "--strategies.NAME.I.FIELD VALUE changes stage I (from 0) of strategy NAME, e.g. --strategies.heft.1.lr 1e-4 "
            "(--strategies.NAME.stages.I.FIELD when that strategy is written as a mapping).", width),
    ])
    docs = [d for d in field_docs() if d.path not in ("stages", "strategy")]
    return f"{intro}\n\nconfig fields:\n\n{render(docs, width, stage_flag='strategies.NAME.I')}"
