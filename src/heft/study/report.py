"""The comparison report of a study, computed from the run folders alone as typed records
(heft.study.report_records), rendered as report.json, report.md, the console table and (for `heft run`)
summary.json / summary.md.

`build_report` reads every run, then computes each part in its own step: final accuracies, paired
comparisons (between strategies, and each trained one against the training majority), accuracy after
each epoch, epochs to reach targets, ReFT edit sizes. "Above majority" is the verdict of the paired
test against the majority the report prints. Intervals are shown as computed in report.json and
report.md alike: Student's t over few seeds can reach past 0% or 100%, and clipping in one file only
would make the two disagree.

Every table, in files and on the console, goes through `markdown_table`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from heft.config.schema import RunConfig
from heft.errors import HeftError
from heft.evaluation.stats import mcnemar_exact, mean_interval, paired_bootstrap
from heft.methods import reft
from heft.run.folder import RunFolder, StudyFolder
from heft.run.records import EpochRecord, Metrics
from heft.study import plots
from heft.study.report_records import (
    MAJORITY, Bootstrap, EditNorm, EpochPoint, McNemar, Pair, ReftNorms, Report, SharedStages, StrategySummary,
    Target, TaskSummary, Tuning,
)

# ----------------------------------------------------------------------------- reading the runs


@dataclass(frozen=True)
class SeedRun:
    """One finished run of a strategy under one seed, as the report needs it."""

    folder: RunFolder
    metrics: Metrics
    preds: list[dict[str, Any]]
    correct: list[bool]
    epochs: list[EpochRecord]


def _read_runs(study: StudyFolder, configs: dict[str, RunConfig], seeds: list[int]) -> dict[str, list[SeedRun]]:
    """Strategy -> its runs in seed order; every run finished and evaluated on the same rows."""
    from heft.evaluation.evaluate import is_correct

    runs: dict[str, list[SeedRun]] = {}
    for name, cfg in configs.items():
        runs[name] = []
        for seed in seeds:
            folder = study.run(name, cfg, seed)
            if not folder.is_finished():
                raise HeftError(f"{folder.path}: no finished run (metrics.json missing); run the command again to finish it")
            preds = folder.read_predictions()
            runs[name].append(SeedRun(folder, folder.read_metrics(), preds, [is_correct(p) for p in preds],
                                      folder.read_epochs()))
    ref = next(iter(runs.values()))[0]
    ref_idx = [p["idx"] for p in ref.preds]
    for run in (r for rs in runs.values() for r in rs):
        if [p["idx"] for p in run.preds] != ref_idx:
            raise HeftError(f"{run.folder.path}: evaluated on different rows than {ref.folder.path}; "
                            "paired comparisons need the same evaluation set")
    return runs


def _correct(runs: list[SeedRun]) -> np.ndarray:
    """(seeds, rows) correctness."""
    return np.array([r.correct for r in runs])


# ----------------------------------------------------------------------------- numbers


def build_report(study: StudyFolder, configs: dict[str, RunConfig], seeds: list[int], targets: list[float],
                 tuning: dict[str, Tuning] | None = None) -> Report:
    """Everything in report.json, computed from the run folders (plots drawn into the study folder) and, for a tuned
    suite, how each strategy was tuned."""
    runs = _read_runs(study, configs, seeds)
    first = next(iter(runs.values()))[0]
    trained = [r.metrics for rs in runs.values() for r in rs if r.metrics.train_rows]
    majority = (trained or [first.metrics])[0]  # the training majority of a run that read training rows
    names = list(configs)
    pairs = _strategy_pairs(runs, names, seeds, [p.get("task") for p in first.preds])
    pairs += _majority_pairs(runs, [n for n in names if configs[n].stages], seeds, majority.majority_label)
    verdicts = {p.a: p.bootstrap.ci95[0] > 0 for p in pairs if p.b == MAJORITY}
    strategies = {name: _strategy(cfg, runs[name], seeds, verdicts.get(name)) for name, cfg in configs.items()}
    epochs = {name: _epoch_curve([r.epochs for r in runs[name]]) for name in names}
    norms = {name: _reft_norms(cfg, [r.folder for r in runs[name]]) for name, cfg in configs.items()}
    report = Report(
        seeds=seeds, n=len(first.preds), eval_split=first.metrics.eval_split, model=configs[names[0]].model.name_or_path,
        train_rows=majority.train_rows, majority_label=_label_text(majority.majority_label),
        majority_baseline=majority.majority_baseline, strategies=strategies, pairs=pairs, epochs=epochs,
        targets=_targets(strategies, epochs, targets), shared_stages=_shared_stages(runs),
        reft_edit_norms={n: v for n, v in norms.items() if v is not None},
        run_folders={n: {str(s): str(r.folder.path.relative_to(study.path)) for s, r in zip(seeds, runs[n])} for n in names},
        plots={}, tuning=tuning,
    )
    return dataclasses.replace(report, plots=plots.draw(study.plots_dir, report))


def _label_text(label: Any) -> Any:
    """BoolQ's majority answer as report.json writes it ("yes"/"no"); general tasks' per-task labels as they are."""
    return {True: "yes", False: "no"}[label] if isinstance(label, bool) else label


def _budget(cfg: RunConfig) -> str:
    if not cfg.stages:
        return "no training"
    return " + ".join(f"{s.method} {s.epochs:g} ep @ {s.lr:g}" for s in cfg.stages)


def _strategy(cfg: RunConfig, runs: list[SeedRun], seeds: list[int], above_majority: bool | None) -> StrategySummary:
    """Final accuracy over seeds, the verdict against the majority (from its paired test) and the cost."""
    ms = [r.metrics for r in runs]
    accs = [m.accuracy for m in ms]
    tasks = _per_task(ms)
    macro = [m.macro_accuracy for m in ms] if tasks is not None else None
    return StrategySummary(
        budget=_budget(cfg), accuracy_per_seed=dict(zip(map(str, seeds), accs)), **mean_interval(accs),
        single_run_ci95=ms[0].ci95 if len(seeds) == 1 else None, above_majority=above_majority,
        trainable_params=ms[0].trainable_params, epochs=ms[0].epochs,
        train_tokens=float(np.mean([m.train_tokens for m in ms])),
        train_seconds=float(np.mean([m.train_seconds for m in ms])),
        train_flops=float(np.mean([m.train_flops for m in ms])),
        tasks=tasks, macro_per_seed=macro, macro=None if macro is None else float(np.mean(macro)),
    )


def _per_task(ms: list[Metrics]) -> dict[str, TaskSummary] | None:
    """Per task, over seeds: mean accuracy (and acc_norm), n, baselines, comparability."""
    if not ms[0].tasks:
        return None
    out = {}
    for task, first in ms[0].tasks.items():
        accs = [m.tasks[task]["accuracy"] for m in ms]
        out[task] = TaskSummary(
            accuracy_per_seed=accs, **mean_interval(accs), n=first["n"], chance=first["chance"],
            majority_baseline=first["majority_baseline"], comparable=first.get("comparable"), note=first.get("note"),
            acc_norm=float(np.mean([m.tasks[task]["acc_norm"] for m in ms])) if "acc_norm" in first else None,
            unparseable=float(np.mean([m.tasks[task]["unparseable"] for m in ms])) if "unparseable" in first else None,
        )
    return out


def _strategy_pairs(runs: dict[str, list[SeedRun]], names: list[str], seeds: list[int],
                    row_tasks: list[str | None]) -> list[Pair]:
    """Every pair of strategies, A the later one of the suite (heft - lora, lora - base); with several tasks,
    each pair's difference on each task's rows too."""
    columns = {t: [k for k, x in enumerate(row_tasks) if x == t] for t in dict.fromkeys(row_tasks)}
    pairs = []
    for j, b in enumerate(names):
        for a in names[j + 1:]:
            ca, cb = _correct(runs[a]), _correct(runs[b])
            by_task = ({t: Bootstrap(**paired_bootstrap(ca[:, cols], cb[:, cols])) for t, cols in columns.items()}
                       if len(columns) > 1 else None)
            pairs.append(Pair(a=a, b=b, bootstrap=Bootstrap(**paired_bootstrap(ca, cb)),
                              mcnemar={str(s): McNemar(**mcnemar_exact(ra.correct, rb.correct))
                                       for s, ra, rb in zip(seeds, runs[a], runs[b])},
                              by_task=by_task))
    return pairs


def _majority_pairs(runs: dict[str, list[SeedRun]], names: list[str], seeds: list[int], label: Any) -> list[Pair]:
    """Each strategy in `names` against always answering the training majority, on the same rows."""
    pairs = []
    for name in names:
        ca = _correct(runs[name])
        cm = np.array([[p["label"] == _majority_of(label, p) for p in r.preds] for r in runs[name]])
        pairs.append(Pair(a=name, b=MAJORITY, bootstrap=Bootstrap(**paired_bootstrap(ca, cm)),
                          mcnemar={str(s): McNemar(**mcnemar_exact(list(ca[k]), list(cm[k]))) for k, s in enumerate(seeds)}))
    return pairs


def _majority_of(majority: Any, pred: dict[str, Any]) -> Any:
    """The majority predictor's answer for one row: BoolQ's one label, or its task's."""
    return majority.get(pred.get("task")) if isinstance(majority, dict) else majority


def _shared_stages(runs: dict[str, list[SeedRun]]) -> dict[str, SharedStages]:
    """Strategies whose first stages were taken from another strategy, and the training time that saved."""
    out = {}
    for name, rs in runs.items():
        reused = [st for r in rs for st in r.metrics.stages if st.reused_from]
        if reused:
            out[name] = SharedStages(sources=sorted({st.reused_from for st in reused}),
                                     seconds_not_retrained=float(np.mean([st.train_seconds for st in reused])))
    return out


def _epoch_curve(per_seed: list[list[EpochRecord]]) -> list[EpochPoint]:
    """Seed-mean accuracy (and FLOPs) at each cumulative epoch every seed was evaluated at."""
    by_epoch: dict[float, list[EpochRecord]] = {}
    for recs in per_seed:
        for r in recs:
            by_epoch.setdefault(r.epoch, []).append(r)
    points = []
    for epoch in sorted(by_epoch):
        recs = by_epoch[epoch]
        if len(recs) != len(per_seed):
            continue  # a seed without this point (should not happen with equal budgets)
        accs = [r.accuracy for r in recs]
        points.append(EpochPoint(epoch=epoch, accuracy_per_seed=accs, **mean_interval(accs),
                                 flops=float(np.mean([r.flops for r in recs])),
                                 train_seconds=float(np.mean([r.train_seconds for r in recs])),
                                 stage=recs[0].stage, method=recs[0].method))
    return points


def _targets(strategies: dict[str, StrategySummary], epochs: dict[str, list[EpochPoint]], extra: list[float]) -> list[Target]:
    """For each strategy and each other strategy's final mean accuracy (and each --target): the first
    epoch at which the strategy's seed-mean accuracy reached it, or None within its budget."""
    trained = {n: c for n, c in epochs.items() if c and c[-1].epoch > 0}
    goals = [(f"{n}'s final accuracy", n, strategies[n].mean) for n in trained]
    goals += [(f"{t:.1%}", None, t) for t in extra]
    out = []
    for label, owner, value in goals:
        for name, curve in trained.items():
            if name == owner:
                continue
            hit = next((p for p in curve if p.mean >= value - 1e-12), None)
            out.append(Target(strategy=name, target=label, target_accuracy=value, epoch=hit.epoch if hit else None,
                              flops=hit.flops if hit else None, budget_epochs=curve[-1].epoch))
    return out


def _reft_norms(cfg: RunConfig, folders: list[RunFolder]) -> ReftNorms | None:
    """Per layer and position group, the learned edit's size averaged over seeds (None: no ReFT stage)."""
    i = next((k for k, s in enumerate(cfg.stages) if s.trains_reft), None)
    if i is None:
        return None
    acc: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for folder in folders:
        for row in reft.edit_norms(reft.load_tensors(folder.stage_dir(i, cfg.stages[i]))):
            acc.setdefault((row["layer"], row["group"]), []).append((row["gain"], row["offset"]))
    rows = [EditNorm(layer=layer, group=group, gain=float(np.mean([v[0] for v in vals])),
                     offset=float(np.mean([v[1] for v in vals]))) for (layer, group), vals in sorted(acc.items())]
    return ReftNorms(kind=cfg.reft.kind, init=cfg.reft.init, per_layer=rows)


def summary_view(report: Report) -> dict[str, Any]:
    """`heft run`'s summary.json: the one-seed report in the schema it has always had."""
    return {
        "majority_baseline": report.majority_baseline, "majority_label": report.majority_label,
        "eval_split": report.eval_split,
        "strategies": {n: {"accuracy": s.mean, "ci95": s.single_run_ci95, "n": report.n,
                           "trainable_params": s.trainable_params, "train_seconds": s.train_seconds, "epochs": s.epochs}
                       for n, s in report.strategies.items()},
        "shared_stages": {n: ", ".join(sh.sources) for n, sh in report.shared_stages.items()},
    }


# ----------------------------------------------------------------------------- rendering


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "< 1e-4" if p == 0 else f"{p:.3g}"  # 10,000 resamples: 0 means below their resolution


def _sci(x: float) -> str:
    return f"{x:.2e}" if x else "0"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a Markdown table (also what the console shows)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _interval(s: StrategySummary) -> str:
    """The 95% interval of a strategy's accuracy as report.json holds it: of the mean over seeds (Student's t,
    not clipped), none where the seeds do not differ, or of the one run (Wilson)."""
    if s.ci95:
        return f"{_pct(s.ci95[0])} to {_pct(s.ci95[1])}"
    if s.std is not None:  # several seeds, one value: mean_interval gives no interval
        return "none (all seeds equal)"
    if s.single_run_ci95:
        return f"(one run, Wilson) {_pct(s.single_run_ci95[0])} to {_pct(s.single_run_ci95[1])}"
    return "n/a"


def _accuracy(s: StrategySummary | EpochPoint) -> str:
    return _pct(s.mean) + (f" ± {100 * s.std:.1f}" if s.std is not None else "")


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "n/a"}[value]


def console_table(r: Report) -> str:
    """The short table `heft run` and `heft compare` print."""
    title = (f"Accuracy on {r.n} {r.eval_split} rows" + (f", mean ± std over seeds {r.seeds}" if len(r.seeds) > 1 else "")
             + f" (majority baseline {_pct(r.majority_baseline)})")
    tasks = r.many_tasks
    rows = [[n, _accuracy(s), _interval(s)] + ([_pct(s.macro)] if tasks else [])
            + [f"{s.trainable_params:,}", f"{s.epochs:g}", f"{s.train_seconds:.0f}"] for n, s in r.strategies.items()]
    header = ["strategy", "accuracy (all rows)" if tasks else "accuracy", "95% CI"] + (["macro average"] if tasks else []) + \
        ["trainable params", "epochs", "train s"]
    return "\n".join([title, ""] + markdown_table(header, rows) + _task_section(r))


def summary_markdown(r: Report) -> str:
    """summary.md: the console table and where shared stages came from."""
    lines = [console_table(r)]
    for name, sh in r.shared_stages.items():
        lines.append(f"\n{name}: first stage(s) taken from {', '.join(sh.sources)} (identical stage prefix, trained once).")
    return "\n".join(lines) + "\n"


def _task_section(r: Report) -> list[str]:
    """Per-task accuracy of every strategy, with the tasks' baselines, and the macro average."""
    if not r.many_tasks:
        return []
    first = next(iter(r.strategies.values())).tasks
    tasks = list(first)
    lines = ["", "## Per task (accuracy: lm-eval's acc, mean over seeds; acc_norm where the task reports it)", ""]
    header = ["strategy"] + tasks + ["macro average"]
    rows = [[name] + [_pct(s.tasks[t].mean) + (f" (norm {_pct(s.tasks[t].acc_norm)})" if s.tasks[t].acc_norm is not None
                                              else "") for t in tasks] + [_pct(s.macro)]
            for name, s in r.strategies.items()]
    rows.append(["chance"] + [_pct(first[t].chance) for t in tasks] + [""])
    rows.append(["majority"] + [_pct(first[t].majority_baseline) for t in tasks] + [""])
    rows.append(["rows"] + [str(first[t].n) for t in tasks] + [""])
    lines += markdown_table(header, rows)
    not_comparable = [t for t in tasks if not first[t].comparable]
    if not_comparable:
        lines += ["", f"Not comparable to published numbers: {', '.join(not_comparable)}. The offline copies hold no "
                  "training split of these tasks, so heft trains on a fixed half of the evaluated split and scores the "
                  "other half" + "".join(f"; {t}: {first[t].note}" for t in not_comparable if first[t].note)
                  + " (heft.data.tasks)."]
    return lines


def report_markdown(r: Report) -> str:
    """report.md, rendered from the typed report alone."""
    lines = [f"# Strategy comparison: {r.model}, {len(r.seeds)} seed(s) {r.seeds}", "", _evaluation_line(r), ""]
    lines += _final_section(r) + _task_section(r) + _final_notes(r) + _tuning_section(r)
    lines += _pairs_section(r) + _epochs_section(r) + _targets_section(r) + _plots_section(r) + _method_notes(r)
    return "\n".join(lines) + "\n"


def _evaluation_line(r: Report) -> str:
    baseline = (f"Majority baseline (always \"{r.majority_label}\", the training majority): {_pct(r.majority_baseline)}."
                if isinstance(r.majority_label, str) else
                f"Majority baseline (each task's most frequent training answer), mean over tasks: {_pct(r.majority_baseline)}.")
    return f"Evaluation: {r.n} rows of the {r.eval_split} split; {r.train_rows} training rows. " + baseline


def _final_section(r: Report) -> list[str]:
    return ["## Final accuracy", ""] + markdown_table(
        ["strategy", "budget", "accuracy, mean ± std", "95% CI of the mean", "per seed", "above majority?", "trainable params",
         "train tokens", "train s", "est. train FLOPs"],
        [[name, s.budget, _accuracy(s), _interval(s), ", ".join(_pct(v) for v in s.accuracy_per_seed.values()),
          _yes_no(s.above_majority), f"{s.trainable_params:,}", f"{s.train_tokens:,.0f}", f"{s.train_seconds:.0f}",
          _sci(s.train_flops)]
         for name, s in r.strategies.items()])


def _final_notes(r: Report) -> list[str]:
    lines = ["", "\"above majority?\": yes when the paired bootstrap 95% interval of the strategy minus the majority "
             "predictor (the rows with B = `majority` below) lies above 0, no otherwise; n/a for a strategy without "
             "training, which is not compared with the majority. \"95% CI of the mean\": Student's t over seeds, as "
             "computed and as report.json holds it (not clipped: with few seeds it can reach below 0% or above 100%); "
             "none when the seeds scored the same, since equal values give no estimate of the spread. Budgets are per "
             "strategy and listed in epochs of the training rows at the stated learning rate."]
    if r.shared_stages:
        lines += [""]
        for name, sh in r.shared_stages.items():
            lines.append(f"- {name}: its first stage(s) were not trained again but taken from {', '.join(sh.sources)} of the "
                         f"same seed (identical stage prefix; within a stage, a constant learning-rate schedule makes the "
                         f"first epochs exact; bit-identical weights). Their cost still counts in {name}'s tokens, time and "
                         f"FLOPs above; {sh.seconds_not_retrained:.0f} s per seed were saved.")
    return lines


def _tuning_section(r: Report) -> list[str]:
    if not r.tuning:
        return []
    trials = next(iter(r.tuning.values())).trials
    return ["", "## Tuning on the dev split", "",
            f"Each trained strategy's config was chosen by `heft compare --tune {trials}`: the same {trials} trials each, "
            "at the budget above, every trial scored on the dev split (rows carved from the training rows, never the "
            "evaluated ones); the seeds above trained each strategy's best config.", ""] + tuning_table(r.tuning)


def tuning_table(tuning: dict[str, Tuning]) -> list[str]:
    """Per tuned strategy: what was searched, what its trials came to, the best dev accuracy and values."""
    from heft.tune.space import yaml_text

    def value(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else yaml_text(v)

    return markdown_table(
        ["strategy", "searched", "trials: complete / pruned / failed", "best dev accuracy", "best values", "trials"],
        [[name, ", ".join(f"`{k}` {next(iter(d))} {yaml_text(next(iter(d.values())))}" for k, d in t.searched.items()),
          f"{t.complete} / {t.pruned} / {t.failed}", f"{t.best_dev_accuracy:.2%} (trial {t.best_trial})",
          ", ".join(f"`{k}` = {value(v)}" for k, v in t.best_values.items()),
          f"[{t.tune_folder}/tune.md]({t.tune_folder}/tune.md)"] for name, t in tuning.items()])


def _pairs_section(r: Report) -> list[str]:
    lines = ["", "## Paired comparisons (same evaluation rows)", ""]
    lines += markdown_table(
        ["A", "B", "A - B (mean over seeds)", "bootstrap 95% CI", "bootstrap p", "McNemar exact per seed: A-only / B-only, p"],
        [[p.a, p.b, f"{100 * p.bootstrap.diff:+.1f} pts",
          f"{100 * p.bootstrap.ci95[0]:+.1f} to {100 * p.bootstrap.ci95[1]:+.1f}", _p(p.bootstrap.p),
          "; ".join(f"seed {s}: {m.a_only}/{m.b_only}, p={m.p:.3g}" for s, m in p.mcnemar.items())]
         for p in r.pairs])
    by_task = [p for p in r.pairs if p.by_task is not None]
    if by_task:
        tasks = list(by_task[0].by_task)
        lines += ["", "Per task: A - B in points, with the paired bootstrap 95% interval over that task's rows.", ""]
        lines += markdown_table(["A - B"] + tasks, [[f"{p.a} - {p.b}"] + [
            f"{100 * p.by_task[t].diff:+.1f} ({100 * p.by_task[t].ci95[0]:+.0f} to {100 * p.by_task[t].ci95[1]:+.0f})"
            for t in tasks] for p in by_task])
    lines += ["", "The bootstrap resamples evaluation rows (10,000 times, all seeds of a row together) and so measures "
              "how much the difference depends on which questions were asked; McNemar's test counts the rows only one "
              "strategy gets right, per seed. Neither corrects for the number of pairs compared. B = `majority` is "
              "the majority baseline as a predictor (always the training majority label) on the same rows."]
    return lines


def _epochs_section(r: Report) -> list[str]:
    if not any(r.epochs.values()):
        return []
    return ["", "## Accuracy after each epoch (mean over seeds)", ""] + markdown_table(
        ["strategy", "epoch", "stage", "accuracy", "per seed", "est. FLOPs", "train s"],
        [[name, f"{p.epoch:g}", f"{p.stage} ({p.method or 'base'})", _accuracy(p),
          ", ".join(_pct(a) for a in p.accuracy_per_seed), _sci(p.flops), f"{p.train_seconds:.0f}"]
         for name, curve in r.epochs.items() for p in curve])


def _targets_section(r: Report) -> list[str]:
    if not r.targets:
        return []
    lines = ["", "## Epochs to reach a target (seed-mean accuracy)", ""]
    for t in r.targets:
        if t.epoch is None:
            lines.append(f"- {t.strategy} does not reach {t.target} ({_pct(t.target_accuracy)}) within its "
                         f"{t.budget_epochs:g} epochs.")
        else:
            lines.append(f"- {t.strategy} reaches {t.target} ({_pct(t.target_accuracy)}) after {t.epoch:g} "
                         f"epoch(s) ({_sci(t.flops)} FLOPs).")
    return lines


def _plots_section(r: Report) -> list[str]:
    lines = ["", "## Plots", ""]
    if isinstance(r.plots, str):
        lines.append(f"Plots {r.plots}.")
    else:
        captions = {"epoch": "Validation accuracy vs training epochs", "flops": "Validation accuracy vs estimated training FLOPs",
                    "reft_edit_norms": "Learned ReFT edit per layer (mean over seeds)"}
        for key, path in r.plots.items():
            lines += [f"![{captions[key]}]({path})", ""]
    if r.reft_edit_norms:
        lines += ["", "ReFT edit sizes: each intervention adds A h + c to the residual stream at its positions "
                  "(LoReFT: A = R^T (W - R), c = R^T b); with identity init both start at 0."]
    return lines


def _method_notes(r: Report) -> list[str]:
    return ["", "## How these numbers are computed", "",
            f"- Accuracy: answer log-likelihood scoring on the same {r.n} rows for every run; the interval of the mean "
            "uses Student's t over seeds" + (" (one seed: the Wilson interval of that run)." if len(r.seeds) == 1 else "."),
            "- FLOPs are estimated, not measured, from what each stage runs: 2 N forward and 2 G backward per training "
            "token (N: non-embedding parameters, G: those gradients flow through), less what a speed path computes "
            "once (heft.training.cost).",
            "- Every number here is recomputed from the run folders listed in report.json (`run_folders`)."]
