"""`heft export RUN OUT`: a finished run as a Hugging Face model folder, with its ReFT beside the weights.

LoRA changes weights, so it can be merged into them (W + (alpha / r) B A) and any tool that reads a
Hugging Face folder computes it. ReFT edits hidden states at each prompt's own first and last positions,
which no weight can hold: those edits stay heft files, applied by `heft.load(OUT)` and `heft serve OUT`.
Loaded with transformers alone, OUT computes the base model with the LoRA stages merged, without ReFT;
`heft export` measures what that costs on the run's own evaluation rows and writes it in the card.

    OUT/config.json, generation_config.json, model.safetensors, tokenizer files
                                  the base model with every LoRA stage merged (also one the run kept as an
                                  adapter, lora.merge: false), in the dtype the run computed in; a GGUF base is
                                  written as ordinary safetensors
    OUT/README.md                 the model card: what needs heft, the base model, the stages, both accuracies
    OUT/heft/config.yaml          the run's config, model.name_or_path pointed at OUT (heft.load uses the folder
                                  where it finds it, so OUT may move); its LoRA stages are merged already
    OUT/heft/meta.json            the run's meta.json: its prompt format, versions and original base model
    OUT/heft/reft/                the ReFT stage's reft_config.json + reft.safetensors (a run that trained ReFT)
    OUT/heft/export.json          `ExportRecord`: the source run, which stages are merged, the fingerprint of the
                                  exported weights (checked on loading), the two accuracies

`ExportFolder` owns this layout. The folder is written next to OUT and renamed into place at the end, so a
failed export leaves nothing; `--overwrite` replaces only an earlier export.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heft import __version__
from heft.config.schema import RunConfig
from heft.errors import CheckpointError, ConfigError
from heft.run import atomic
from heft.run.folder import RunFolder
from heft.run.records import Record, optional

logger = logging.getLogger(__name__)

__all__ = ["ExportFolder", "ExportRecord", "export_run", "load_export", "export_command"]


@dataclass(frozen=True)
class ExportRecord(Record):
    """`OUT/heft/export.json`: what was exported from where, and how well each view of it does."""

    heft_version: str
    source: str
    """The run folder exported (as given to `heft export`)."""
    strategy: str
    base_model: str
    """The run's base model (model.name_or_path before the export)."""
    merged_stages: list[int]
    """Indices of the stages whose LoRA is merged into OUT's weights."""
    reft_stage: int | None
    """Index of the stage whose ReFT interventions are in OUT/heft/reft (None: the run has no ReFT)."""
    dtype: str
    """The dtype of the exported weights: the one the run's base model computed in."""
    fingerprint: dict[str, str]
    """heft.methods.model.fingerprint of OUT as heft loads it: heft.load refuses other weights under it."""
    created: str
    evaluation: dict[str, Any] | None = optional()
    """{eval_split, n, plain: {accuracy, correct}, full: {accuracy, correct}, run_accuracy}; None with --no-eval."""


@dataclass
class ExportFolder:
    """Paths, readers and writers of an export folder (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def heft_dir(self) -> Path:
        return self.path / "heft"

    @property
    def config_path(self) -> Path:
        return self.heft_dir / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.heft_dir / "meta.json"

    @property
    def record_path(self) -> Path:
        return self.heft_dir / "export.json"

    @property
    def reft_dir(self) -> Path:
        return self.heft_dir / "reft"

    @property
    def card_path(self) -> Path:
        return self.path / "README.md"

    def is_export(self) -> bool:
        """Written by `heft export` (its record is the last file written before the folder is renamed into place)."""
        return self.record_path.is_file()

    def read_config(self) -> RunConfig:
        """The run's config with model.name_or_path pointed at this folder, wherever it is now."""
        from heft.config.load import load

        cfg = load(self.config_path)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(self.path.resolve())))

    def write_config(self, cfg: RunConfig, merged: list[int]) -> None:
        from heft.config.load import dump_yaml

        note = (f"# written by heft export: the LoRA of stage{'s' if len(merged) > 1 else ''} "
                f"{', '.join(map(str, merged))} is merged into the weights of this folder's parent; heft applies only "
                "the ReFT files in reft/\n" if merged else "")
        atomic.write_text(self.config_path, note + dump_yaml(cfg))

    def read_meta(self) -> dict[str, Any]:
        return atomic.read_json(self.meta_path) if self.meta_path.is_file() else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic.write_json(self.meta_path, meta)

    def read_record(self) -> ExportRecord:
        try:
            return ExportRecord.from_json(atomic.read_json(self.record_path))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.record_path}: cannot read the export record ({e}); export the run again") from None

    def write_record(self, record: ExportRecord) -> None:
        atomic.write_json(self.record_path, record.to_json())


# ----------------------------------------------------------------------------- loading


def load_export(path: str | Path, *, allow_other_base: bool = False) -> tuple[Any, RunConfig]:
    """(Session, config) of an export folder: its weights (LoRA merged), then the ReFT interventions if any.

    The weights must be the ones exported (their fingerprint in export.json); `allow_other_base` accepts others
    of the same shape."""
    from heft.methods.model import fingerprint, fingerprint_differences

    folder = ExportFolder(Path(path))
    record = folder.read_record()
    s, cfg = _open(folder, record.reft_stage)
    differ = fingerprint_differences(record.fingerprint, fingerprint(s.model, s.tokenizer))
    if differ and not allow_other_base:
        raise CheckpointError(f"{folder.path}: its model files differ from the ones heft export wrote "
                              f"({', '.join(differ)} differ); export the run again, or pass --allow-other-base to "
                              "apply its ReFT to these weights anyway")
    return s, cfg


def _open(folder: ExportFolder, reft_stage: int | None) -> tuple[Any, RunConfig]:
    """The folder's model through heft's loader (as a run's base model), with the ReFT interventions hooked on."""
    from heft.run.session import Session

    cfg = folder.read_config()
    s = Session(cfg)
    if reft_stage is not None:
        s.add_reft().load_weights(folder.reft_dir)
    s.top.requires_grad_(False)
    return s, cfg


# ----------------------------------------------------------------------------- exporting


def export_run(run: str | Path, out: str | Path, *, overwrite: bool = False, evaluate: bool = True,
               allow_other_base: bool = False) -> ExportRecord:
    """Write the export folder `out` of the finished run `run` (see the module docstring); returns its record."""
    from heft.hub import resolve
    from heft.run.lock import FolderLock

    source, out = resolve(run), Path(out)
    src = RunFolder(source)
    src.require_finished()
    _check_out(out, source, overwrite)
    cfg = src.read_config()
    if cfg.model.quantization != "none":
        raise ConfigError(f"{source}: trained on a {cfg.model.quantization} quantized base (model.quantization); its "
                          "LoRA cannot be merged into quantized weights, so heft export cannot write it")
    with FolderLock(out, "export folder"), atomic.atomic_dir(out) as tmp:
        record = _write(src, cfg, str(run), ExportFolder(tmp), out, evaluate, allow_other_base)
    logger.info("heft export: wrote %s", out)
    return record


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """OUT can be written: not a file, not the run itself, new or empty, or (--overwrite) an earlier export."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT: {out} is a file; give a new or empty folder")
    there, run = out.resolve(), source.resolve()
    if there == run or run in there.parents:
        raise ConfigError(f"OUT: {out} is inside the run folder {source}; give a folder outside it")
    if out.is_dir() and any(not atomic.is_partial(p) for p in out.iterdir()):
        held = "an earlier export" if ExportFolder(out).is_export() else "files heft export did not write"
        if not overwrite:
            raise ConfigError(f"OUT: {out} is not empty (it holds {held}); choose a new folder"
                              + (", or pass --overwrite to replace it" if ExportFolder(out).is_export() else ""))
        if not ExportFolder(out).is_export():
            raise ConfigError(f"--overwrite: {out} holds files heft export did not write (no heft/export.json); heft "
                              "replaces only its own exports: remove it yourself or choose another folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("/"))
    if not parent.is_dir():
        raise ConfigError(f"OUT: {parent} is a file, so {out} cannot be created under it; choose another folder")


def _write(src: RunFolder, cfg: RunConfig, source: str, dest: ExportFolder, final: Path, evaluate: bool,
           allow_other_base: bool) -> ExportRecord:
    """Fill `dest` (the temporary folder that becomes `final`): weights, tokenizer, heft files; then reload it to
    fingerprint and score it."""
    from heft.methods.model import unwrap
    from heft.methods.reft import REFT_CONFIG, REFT_WEIGHTS
    from heft.run.pipeline import load_run

    merged = [i for i, st in enumerate(cfg.stages) if st.trains_lora]
    reft_stage = next((i for i, st in enumerate(cfg.stages) if st.trains_reft), None)
    s, _ = load_run(src.path, allow_other_base=allow_other_base, merge_lora=True)
    model = unwrap(s.model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.use_cache = True  # heft's loader turns the cache off for training; generation wants it
    model.save_pretrained(dest.path)
    s.tokenizer.save_pretrained(dest.path)
    if not (dest.path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(model.config).save_pretrained(dest.path)
    del s, model
    gc.collect()

    dest.write_config(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name_or_path=str(final.resolve()), init="pretrained",
                                       revision=None),
        lora=dataclasses.replace(cfg.lora, merge=True)), merged)
    dest.write_meta(src.read_meta())
    if reft_stage is not None:
        stage_dir = src.stage_dir(reft_stage, cfg.stages[reft_stage])
        dest.reft_dir.mkdir(parents=True)
        for name in (REFT_CONFIG, REFT_WEIGHTS):
            shutil.copy2(stage_dir / name, dest.reft_dir / name)

    from heft.methods.model import fingerprint

    s, _ = _open(dest, reft_stage)
    record = ExportRecord(
        heft_version=__version__, source=source, strategy=cfg.label(), base_model=cfg.model.name_or_path,
        merged_stages=merged, reft_stage=reft_stage, dtype=dtype, fingerprint=fingerprint(s.model, s.tokenizer),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        evaluation=_evaluate(s, cfg, src) if evaluate else None)
    atomic.write_text(dest.card_path, model_card(record, cfg, final.name))
    dest.write_record(record)  # last: marks the folder an export
    return record


def _evaluate(s: Any, cfg: RunConfig, src: RunFolder) -> dict[str, Any]:
    """Accuracy on the run's evaluation rows of the full run (the export with ReFT, as heft loads it) and of the plain
    model (the same weights without ReFT: what transformers alone computes), through the run's own evaluation."""
    from heft.data.rows import load_splits
    from heft.evaluation.evaluate import accuracy

    rows = load_splits(cfg.data, with_train=False).eval
    encoded = s.encode_eval(rows)
    full = accuracy(s.evaluate(rows, encoded))
    if s.reft is not None:
        s.reft.remove()  # the hooks come off: the model computes exactly what it did before them
        s.reft = None
        plain = accuracy(s.evaluate(rows, encoded))
    else:
        plain = full
    keep = ("accuracy", "correct")
    return {"eval_split": cfg.data.eval_split, "n": full["n"], "plain": {k: plain[k] for k in keep},
            "full": {k: full[k] for k in keep}, "run_accuracy": src.read_metrics().accuracy}


# ----------------------------------------------------------------------------- the card and the command


def accuracy_line(record: ExportRecord) -> str:
    """The two accuracies and their difference, in one line (`heft export` prints it; the card repeats it)."""
    e = record.evaluation
    if e is None:
        return "not measured (exported with --no-eval)"

    def pct(part: dict[str, Any]) -> str:
        return f"{100 * part['accuracy']:.1f}% ({part['correct']}/{e['n']})"

    if record.reft_stage is None:
        return f"plain transformers (LoRA merged) computes the whole run (no ReFT stage): {pct(e['full'])}"
    cost = 100 * (e["full"]["accuracy"] - e["plain"]["accuracy"])
    return (f"plain transformers (LoRA merged, no ReFT): {pct(e['plain'])}  full run (heft): {pct(e['full'])}; "
            f"dropping ReFT {'costs' if cost >= 0 else 'gains'} {abs(cost):.1f} points")


def model_card(record: ExportRecord, cfg: RunConfig, name: str) -> str:
    """README.md: what the folder computes with transformers alone and with heft, how it was trained, how well."""
    base = record.base_model
    hub_base = base if "/" in base and not base.startswith((".", "/", "~")) else None
    stages = "\n".join(
        f"- stage {i}: `{st.method}`, {st.epochs:g} epoch(s), lr {st.lr:g}"
        + (": LoRA merged into these weights" if i in record.merged_stages else "")
        + ("; ReFT interventions in `heft/reft/` (need heft)" if i == record.reft_stage else "")
        for i, st in enumerate(cfg.stages)) or "- no training stage: the base model"
    reft = cfg.reft
    if record.reft_stage is not None:
        what = (f"This run also trained ReFT interventions (LoReFT family `{reft.kind}`, rank {reft.rank}, on the first "
                f"{reft.positions.first} and last {reft.positions.last} prompt tokens). They edit hidden states at each "
                "prompt's own positions, which no weight can hold, so **transformers alone does not apply them**: "
                "`AutoModelForCausalLM.from_pretrained` on this folder computes the base model with the LoRA stages "
                "merged, without ReFT. To run the whole model, load it with heft:")
    else:
        what = ("This run has no ReFT stage: `AutoModelForCausalLM.from_pretrained` on this folder computes the whole "
                "trained model. heft loads it too, with the run's prompt format:")
    e = record.evaluation
    split = f" on the run's `{e['eval_split']}` rows ({e['n']})" if e else ""
    front = "\n".join(["---", *([f"base_model: {hub_base}"] if hub_base else []), "library_name: transformers",
                       "tags:", "- heft", "- lora", *(["- reft"] if record.reft_stage is not None else []), "---"])
    return f"""{front}

# {name}: heft run `{record.strategy}` on {base}

Exported by `heft export` (heft {record.heft_version}) from the run `{record.source}`: hierarchical
parameter-efficient fine-tuning, LoRA stages merged into the weights (LoRA, arXiv 2106.09685) and
ReFT interventions on prompt positions (ReFT, arXiv 2404.03592; HEFT, arXiv 2509.09801).

Base model: `{base}`. Weights: `{record.dtype}` safetensors.

Stages:
{stages}

## What runs where

{what}

```python
import heft
model, tokenizer = heft.load("{name}")      # the weights, then the ReFT hooks from heft/
heft.generate(model, tokenizer, ["..."], max_new_tokens=32)
```

```bash
heft serve {name}      # an OpenAI-compatible server that applies ReFT to every request's prompt
```

With transformers alone:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## Accuracy{split}

{accuracy_line(record)}

Measured by `heft export` with the run's own evaluation (`heft/config.yaml`, section `eval`); `heft/export.json`
holds the numbers.

License: the base model and the training data keep their own licenses.
"""


def export_command(args: Any) -> int:
    """`heft export RUN OUT [--overwrite] [--no-eval] [--allow-other-base]`."""
    record = export_run(args.run, args.out, overwrite=args.overwrite, evaluate=not args.no_eval,
                        allow_other_base=args.allow_other_base)
    merged = ", ".join(map(str, record.merged_stages)) or "none"
    reft = f"ReFT of stage {record.reft_stage} in {Path(args.out) / 'heft' / 'reft'}" if record.reft_stage is not None \
        else "no ReFT"
    print(f"heft export: wrote {args.out} (LoRA stages merged: {merged}; {reft})")
    if record.evaluation is not None:
        e = record.evaluation
        print(f"accuracy on the run's {e['eval_split']} rows: {accuracy_line(record)}")
        if abs(e["full"]["accuracy"] - e["run_accuracy"]) > 1e-12:
            print(f"note: the run recorded {100 * e['run_accuracy']:.1f}% when it finished; the export's scores differ in "
                  "their last digits (a LoRA the run kept as an adapter is merged now, or this machine rounds differently)")
    return 0
