"""The tune report: every trial of the study (state, sampled values, dev accuracy after each epoch), the best
config as a YAML ready for `heft train`, and the plots people look at after a search: the optimisation
history, the parameters' importances (Optuna's fANOVA), dev accuracy per epoch (what the pruner saw) and
dev accuracy against each searched value. Read from the study's storage, so any worker writes the same one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from heft.config.load import dump_yaml
from heft.run import atomic
from heft.run.records import Record
from heft.tune.folder import TuneFolder
from heft.tune.objective import Tuned
from heft.tune.space import yaml_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRow(Record):
    """One trial as tune.json holds it. `dev`: dev accuracy after each epoch (the pruner's steps), at the
    cumulative epochs `epochs`; `value`: the final dev accuracy (a pruned trial: its last reported one)."""

    number: int
    state: str
    value: float | None
    values: dict[str, Any]
    dev: list[float]
    epochs: list[float]
    run: str | None
    seconds: float | None
    worker: str | None = None
    retry_of: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class TuneReport(Record):
    """tune.json: the study, its space, its trials and the best one."""

    study: str
    storage: str
    strategy: str
    trials: int
    space: dict[str, Any]
    counts: dict[str, int]
    best: dict[str, Any] | None
    rows: list[TrialRow] = field(default_factory=list)
    plots: dict[str, str] | str = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "rows": [r.to_json() for r in self.rows]}

    @property
    def finished(self) -> bool:
        """Every trial accounted for: as many complete, pruned or finally failed trials as the study's total."""
        return self.counts["complete"] + self.counts["pruned"] + self.counts["failed"] == self.trials


def rows_of(study: Any, tuned: Tuned) -> list[TrialRow]:
    """The study's trials as rows, in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        worker = t.user_attrs.get("heft_worker")
        rows.append(TrialRow(
            number=t.number, state=t.state.name.lower(), value=t.value, values=tuned.space.values_of(t.params),
            dev=[t.intermediate_values[s] for s in steps], epochs=list(t.user_attrs.get("heft_epochs", []))[:len(steps)],
            run=t.user_attrs.get("heft_run"), seconds=None if seconds is None else round(seconds, 1),
            worker=f"{worker['host']}:{worker['pid']}" if worker else None, retry_of=t.user_attrs.get("heft_retry_of"),
            error=t.user_attrs.get("heft_error")))
    return rows


def count(rows: list[TrialRow]) -> dict[str, int]:
    """complete, pruned, failed (tried, not retried), retried (failed as their worker stopped), running, waiting."""
    retried = {r.retry_of for r in rows if r.retry_of is not None}
    states = [("retried" if r.number in retried else "failed") if r.state == "fail" else r.state for r in rows]
    return {k: states.count(k) for k in ("complete", "pruned", "failed", "retried", "running", "waiting")}


def write_report(study: Any, tuned: Tuned, folder: TuneFolder, storage: str) -> dict[str, Any]:
    """tune.json, tune.md, best.yaml (once a trial completed) and plots/*.png; tune.json's content."""
    rows = rows_of(study, tuned)
    complete = [r for r in rows if r.state == "complete"]
    best = max(complete, key=lambda r: (r.value, -r.number)) if complete else None
    best_info = None
    if best is not None:
        cfg = tuned.final_config(best.values)
        folder.write_best(f"# The best of the {tuned.trials} trials of study {study.study_name!r}: trial {best.number}, "
                          f"dev accuracy {best.value:.2%} ({folder.trial(best.run)}).\n"
                          f"# heft train --config {folder.best_path} --out runs/best\n" + dump_yaml(cfg))
        best_info = {"number": best.number, "value": best.value, "values": best.values, "run": best.run,
                     "config": str(folder.best_path)}
    report = TuneReport(study=study.study_name, storage=storage, strategy=tuned.base.label(), trials=tuned.trials,
                        space=tuned.space.to_json(), counts=count(rows), best=best_info, rows=rows,
                        plots=draw(folder, study, tuned, rows))
    folder.write_report(report.to_json(), markdown(report, tuned))
    return report.to_json()


# ----------------------------------------------------------------------------- tune.md


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return yaml_text(v)


def markdown(report: TuneReport, tuned: Tuned) -> str:
    """tune.md: the setup, the space, the best trial, every trial, the plots."""
    c = report.counts
    budget = " + ".join(f"{s.epochs:g} {s.method}" for s in tuned.base.stages)
    lines = [f"# Tuning `{report.strategy}`: study `{report.study}`", "",
             f"- storage: `{report.storage}`",
             f"- budget per trial (fixed): {budget} epoch(s); scored on the dev split ({tuned.base.data.dev_size} rows carved "
             "from train, never the evaluated split), after every epoch for pruning",
             f"- trials: {report.trials} in all: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
             + (f"; {c['retried']} more stopped with their worker and were retried" if c["retried"] else "")
             + (f"; {c['running']} running, {c['waiting']} waiting" if c["running"] or c["waiting"] else ""), "",
             "## Search space", "", "| field | distribution | values |", "|---|---|---|"]
    for key, spec in report.space.items():
        kind, values = next(iter(spec.items()))
        shown = ", ".join(_value(v) for v in values) if kind == "choice" else f"[{_value(values[0])}, {_value(values[1])}]"
        lines.append(f"| `{key}` | {kind} | {shown} |")
    lines += ["", "## Best", ""]
    if report.best is None:
        lines.append("No trial has completed yet.")
    else:
        b = report.best
        lines += [f"Trial {b['number']}: dev accuracy **{b['value']:.2%}**, with "
                  + ", ".join(f"`{k}` = {_value(v)}" for k, v in b["values"].items()) + ".", "",
                  f"Its config: `{b['config']}`; train it with `heft train --config {b['config']} --out runs/best`."]
    keys = list(report.space)
    lines += ["", "## Trials", "", "| # | state | dev accuracy | after each epoch | " + " | ".join(f"`{k}`" for k in keys)
              + " | run | note |", "|---" * (6 + len(keys)) + "|"]
    for r in report.rows:
        acc = "" if r.value is None else f"{r.value:.2%}"
        per_epoch = " ".join(f"{a:.1%}" for a in r.dev)
        note = (f"retry of {r.retry_of}; " if r.retry_of is not None else "") + (r.error or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.number} | {r.state} | {acc} | {per_epoch} | "
                     + " | ".join(_value(r.values[k]) if k in r.values else "" for k in keys)
                     + f" | {r.run or ''} | {note[:200]} |")
    lines += ["", "## Plots", ""]
    if isinstance(report.plots, str):
        lines.append(report.plots)
    else:
        lines += [f"![{name}]({path})" for name, path in report.plots.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def draw(folder: TuneFolder, study: Any, tuned: Tuned, rows: list[TrialRow]) -> dict[str, str] | str:
    """PNGs in OUT/plots, paths relative to OUT; the reason when none can be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'heft[plots]')"
    scored = [r for r in rows if r.state in ("complete", "pruned") and r.value is not None]
    if not scored:
        return "not drawn: no trial has a dev accuracy yet"
    folder.plots_dir.mkdir(exist_ok=True)
    made: dict[str, str] = {}

    def save(fig: Any, name: str, title: str) -> None:
        fig.tight_layout()
        tmp = atomic.atomic_file(folder.plots_dir / name)  # workers finishing together each write whole files
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, folder.plots_dir / name)
        plt.close(fig)
        made[title] = f"{folder.plots_dir.name}/{name}"

    complete = [r for r in scored if r.state == "complete"]
    pruned = [r for r in scored if r.state == "pruned"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r.number for r in complete], [r.value for r in complete], label="complete", zorder=3)
    ax.scatter([r.number for r in pruned], [r.value for r in pruned], facecolors="none", edgecolors="grey",
               label="pruned (last dev accuracy)", zorder=3)
    best_x, best_y, best = [], [], None
    for r in sorted(complete, key=lambda r: r.number):
        best = r.value if best is None else max(best, r.value)
        best_x.append(r.number)
        best_y.append(best)
    ax.step(best_x, best_y, where="post", color="black", linewidth=1, label="best so far")
    ax.set(xlabel="trial", ylabel="dev accuracy", title="Optimisation history")
    ax.legend(fontsize=8)
    save(fig, "history.png", "optimisation history")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in scored:
        ax.plot(r.epochs or list(range(1, len(r.dev) + 1)), r.dev, marker="o", markersize=3, alpha=0.7,
                linestyle="--" if r.state == "pruned" else "-")
    ax.set(xlabel="epoch (all stages)", ylabel="dev accuracy", title="Dev accuracy after each epoch (dashed: pruned)")
    save(fig, "epochs.png", "dev accuracy per epoch")

    for p in tuned.space.params:
        have = [r for r in scored if p.key in r.values]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if p.kind == "choice":
            labels = [yaml_text(c) for c in p.choices]
            xs = [labels.index(yaml_text(r.values[p.key])) for r in have]
            ax.set_xticks(range(len(labels)), labels)
        else:
            xs = [r.values[p.key] for r in have]
            if p.log:
                ax.set_xscale("log")
        ax.scatter(xs, [r.value for r in have], c=["C0" if r.state == "complete" else "grey" for r in have])
        ax.set(xlabel=p.key, ylabel="dev accuracy", title=f"Dev accuracy vs {p.key} (grey: pruned)")
        save(fig, f"vs_{p.key.replace('.', '_')}.png", f"dev accuracy vs {p.key}")

    importances = _importances(study)
    if isinstance(importances, dict):
        fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.5 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA, share of the dev accuracy's variance)", title="Parameter importances")
        save(fig, "importances.png", "parameter importances")
    else:
        made["parameter importances"] = importances
    return made


def _importances(study: Any) -> dict[str, float] | str:
    """Optuna's fANOVA importances over the complete trials, or why there are none."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return "not drawn: parameter importances need at least 2 complete trials"
    try:  # fANOVA, seeded: the same trials give the same importances
        return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as e:  # e.g. every complete trial sampled the same values
        return f"not drawn: {e}"
