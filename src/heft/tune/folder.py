"""The on-disk layout of a tune folder (`heft tune --out OUT`), owned here and nowhere else.

    OUT/tune-study.json   which study the folder belongs to: its name, and its storage (written by the first worker)
    OUT/optuna.journal    the study itself, when no --storage is given
    OUT/trial-K/          trial K's run folder: an ordinary heft run (config.yaml, stages, epochs.jsonl on
                          the dev split, metrics.json once finished); a retried trial continues its folder
    OUT/tune.json         the report: the search space, every trial (state, values, dev accuracy per epoch)
    OUT/tune.md           the same for people
    OUT/best.yaml         the best trial's config, with the evaluation as the tuned config had it: `heft train --config`
    OUT/plots/*.png       optimisation history, parameter importances, dev accuracy per epoch and vs each searched value

Several workers write into one tune folder (each its own trials); the report files are written whole
(atomically) by whichever worker sees the study finished, and equal the same study's report from any worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from heft.errors import ConfigError
from heft.run import atomic


class TuneFolder:
    """Paths, readers and writers of one tune folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def trial(self, run: str) -> Path:
        """The run folder of a trial, by its name (`trial-K`)."""
        return self.path / run

    @property
    def journal_path(self) -> Path:
        return self.path / "optuna.journal"

    @property
    def binding_path(self) -> Path:
        return self.path / "tune-study.json"

    @property
    def report_path(self) -> Path:
        return self.path / "tune.json"

    @property
    def markdown_path(self) -> Path:
        return self.path / "tune.md"

    @property
    def best_path(self) -> Path:
        return self.path / "best.yaml"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def check(self, study: str) -> None:
        """Refuse a folder that holds another study's trials (their folders would collide) or files heft did not
        write; reads only. The storage is not compared: machines may mount a shared journal at different paths."""
        if self.binding_path.is_file():
            held = atomic.read_json(self.binding_path)
            if held.get("study") != study:
                raise ConfigError(f"--out: {self.path} holds the trials of study {held.get('study')!r} (in "
                                  f"{held.get('storage')}), not of {study!r}; choose another --out, or pass "
                                  f"--study-name {held.get('study')}")
        elif self.path.exists() and any(p.name != self.journal_path.name and not p.name.startswith(".")
                                        for p in self.path.iterdir()):
            raise ConfigError(f"--out: {self.path} is not empty and holds no tune study; choose a new or empty folder")

    def bind(self, study: str, storage: str) -> None:
        """Record that this folder holds the trials of `study` in `storage` (after `check`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.binding_path.is_file():
            atomic.write_json(self.binding_path, {"study": study, "storage": storage})

    def write_report(self, report: dict[str, Any], markdown: str) -> None:
        atomic.write_json(self.report_path, report)
        atomic.write_text(self.markdown_path, markdown)

    def read_report(self) -> dict[str, Any]:
        return atomic.read_json(self.report_path)

    def write_best(self, text: str) -> None:
        atomic.write_text(self.best_path, text)
