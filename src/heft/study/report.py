"""The comparison report of a study: statistics computed from the run folders alone, rendered as
report.json, report.md, the console table and (for `heft run`) summary.json / summary.md.

Every table, in files and on the console, goes through `markdown_table`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from heft.study import plots
from heft.methods import reft
from heft.config.schema import RunConfig
from heft.errors import HeftError
from heft.run.folder import RunFolder, StudyFolder
from heft.evaluation.stats import mcnemar_exact, mean_interval, paired_bootstrap

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- numbers


def _budget(cfg: RunConfig) -> str:
    if not cfg.stages:
        return "no training"
    return " + ".join(f"{s.method} {s.epochs:g} ep @ {s.lr:g}" for s in cfg.stages)


def _correct(preds: list[dict[str, Any]]) -> list[bool]:
    from heft.evaluation.evaluate import is_correct

    return [is_correct(p) for p in preds]


def _majority_of(majority: Any, pred: dict[str, Any]) -> Any:
    """The majority predictor's answer for one row: BoolQ's one label, or its task's."""
    return majority.get(pred.get("task")) if isinstance(majority, dict) else majority


def _per_task(ms: list[Any]) -> dict[str, Any] | None:
    """Per task, over seeds: mean accuracy (and acc_norm), n, baselines, comparability."""
    if not ms[0].tasks:
        return None
    out = {}
    for task, first in ms[0].tasks.items():
        accs = [m.tasks[task]["accuracy"] for m in ms]
        row = {"accuracy_per_seed": accs, **mean_interval(accs), "n": first["n"], "chance": first["chance"],
               "majority_baseline": first["majority_baseline"], "comparable": first.get("comparable"), "note": first.get("note")}
        if "acc_norm" in first:
            row["acc_norm"] = float(np.mean([m.tasks[task]["acc_norm"] for m in ms]))
        if "unparseable" in first:
            row["unparseable"] = float(np.mean([m.tasks[task]["unparseable"] for m in ms]))
        out[task] = row
    return out


def build_report(study: StudyFolder, configs: dict[str, RunConfig], seeds: list[int], targets: list[float]) -> dict[str, Any]:
    """Everything in report.json, computed from the run folders alone."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for name, cfg in configs.items():
        runs[name] = {}
        for seed in seeds:
            folder = study.run(name, cfg, seed)
            if not folder.is_finished():
                raise HeftError(f"{folder.path}: no finished run (metrics.json missing); run the command again to finish it")
            preds = folder.read_predictions()
            runs[name][seed] = {"folder": folder, "metrics": folder.read_metrics(), "preds": preds,
                                "correct": _correct(preds), "epochs": folder.read_epochs()}
    ref_name = next(iter(configs))
    ref_idx = [p["idx"] for p in runs[ref_name][seeds[0]]["preds"]]
    for name in configs:
        for seed in seeds:
            if [p["idx"] for p in runs[name][seed]["preds"]] != ref_idx:
                raise HeftError(f"{runs[name][seed]['folder'].path}: evaluated on different rows than "
                                f"{runs[ref_name][seeds[0]]['folder'].path}; paired comparisons need the same evaluation set")
    first = runs[ref_name][seeds[0]]["metrics"]
    trained = [m["metrics"] for r in runs.values() for m in r.values() if m["metrics"].train_rows]
    majority = (trained or [first])[0]
    report: dict[str, Any] = {
        "seeds": seeds, "n": len(ref_idx), "eval_split": first.eval_split,
        "model": configs[ref_name].model.name_or_path, "train_rows": majority.train_rows,
        "majority_label": ({True: "yes", False: "no"}[majority.majority_label] if isinstance(majority.majority_label, bool)
                           else majority.majority_label), "majority_baseline": majority.majority_baseline,
        "strategies": {}, "pairs": [], "epochs": {}, "targets": [], "shared_stages": {}, "reft_edit_norms": {},
    }
    for name, cfg in configs.items():
        ms = [runs[name][s]["metrics"] for s in seeds]
        accs = [m.accuracy for m in ms]
        summary = mean_interval(accs)
        report["strategies"][name] = {
            "budget": _budget(cfg), "accuracy_per_seed": dict(zip(map(str, seeds), accs)), **summary,
            "single_run_ci95": ms[0].ci95 if len(seeds) == 1 else None,
            "above_majority": (summary["ci95"][0] > report["majority_baseline"]) if summary["ci95"] else None,
            "trainable_params": ms[0].trainable_params, "epochs": ms[0].epochs,
            "train_tokens": float(np.mean([m.train_tokens for m in ms])),
            "train_seconds": float(np.mean([m.train_seconds for m in ms])),
            "train_flops": float(np.mean([m.train_flops for m in ms])),
        }
        tasks = _per_task(ms)
        if tasks is not None:
            macro = [m.macro_accuracy for m in ms]
            report["strategies"][name].update(tasks=tasks, macro_per_seed=macro, macro=float(np.mean(macro)))
        reused = [st for m in ms for st in m.stages if st.reused_from]
        if reused:
            report["shared_stages"][name] = {"from": sorted({st.reused_from for st in reused}),
                                             "seconds_not_retrained": float(np.mean([st.train_seconds for st in reused]))}
    names = list(configs)
    for j, b in enumerate(names):  # A is the later strategy of the suite (e.g. heft - lora, lora - base)
        for a in names[j + 1:]:
            ca = np.array([runs[a][s]["correct"] for s in seeds])
            cb = np.array([runs[b][s]["correct"] for s in seeds])
            report["pairs"].append({
                "a": a, "b": b, "bootstrap": paired_bootstrap(ca, cb),
                "mcnemar": {str(s): mcnemar_exact(runs[a][s]["correct"], runs[b][s]["correct"]) for s in seeds},
            })
    tasks = [p.get("task") for p in runs[ref_name][seeds[0]]["preds"]]
    if len(set(tasks)) > 1:  # several tasks: each pair's difference on each task's rows too
        for pair in report["pairs"]:
            ca = np.array([runs[pair["a"]][s]["correct"] for s in seeds])
            cb = np.array([runs[pair["b"]][s]["correct"] for s in seeds])
            pair["by_task"] = {t: paired_bootstrap(ca[:, [k for k, x in enumerate(tasks) if x == t]],
                                                   cb[:, [k for k, x in enumerate(tasks) if x == t]])
                               for t in dict.fromkeys(tasks)}
    for name in names:  # each strategy against always answering the training majority, on the same rows
        if not configs[name].stages:
            continue
        ca = np.array([runs[name][s]["correct"] for s in seeds])
        cm = np.array([[p["label"] == _majority_of(majority.majority_label, p) for p in runs[name][s]["preds"]] for s in seeds])
        report["pairs"].append({
            "a": name, "b": "majority", "bootstrap": paired_bootstrap(ca, cm),
            "mcnemar": {str(s): mcnemar_exact(list(ca[k]), list(cm[k])) for k, s in enumerate(seeds)},
        })
    for name in names:
        report["epochs"][name] = _epoch_curve([runs[name][s]["epochs"] for s in seeds])
    report["targets"] = _targets(report, names, targets)
    for name, cfg in configs.items():
        norms = _reft_norms(cfg, [runs[name][s]["folder"] for s in seeds])
        if norms:
            report["reft_edit_norms"][name] = norms
    report["run_folders"] = {n: {str(s): str(runs[n][s]["folder"].path.relative_to(study.path)) for s in seeds} for n in names}
    report["plots"] = plots.draw(study.plots_dir, report)
    return report


def _epoch_curve(per_seed: list[list[Any]]) -> list[dict[str, Any]]:
    """Seed-mean accuracy (and FLOPs) at each cumulative epoch every seed was evaluated at."""
    by_epoch: dict[float, list[Any]] = {}
    for recs in per_seed:
        for r in recs:
            by_epoch.setdefault(r.epoch, []).append(r)
    points = []
    for epoch in sorted(by_epoch):
        recs = by_epoch[epoch]
        if len(recs) != len(per_seed):
            continue  # a seed without this point (should not happen with equal budgets)
        accs = [r.accuracy for r in recs]
        points.append({"epoch": epoch, "accuracy_per_seed": accs, **mean_interval(accs),
                       "flops": float(np.mean([r.flops for r in recs])),
                       "train_seconds": float(np.mean([r.train_seconds for r in recs])),
                       "stage": recs[0].stage, "method": recs[0].method})
    return points


def _targets(report: dict[str, Any], names: list[str], extra: list[float]) -> list[dict[str, Any]]:
    """For each strategy and each other strategy's final mean accuracy (and each --target): the first
    epoch at which the strategy's seed-mean accuracy reached it, or None within its budget."""
    out = []
    goals = [(f"{n}'s final accuracy", n, report["strategies"][n]["mean"]) for n in names
             if report["epochs"][n] and report["epochs"][n][-1]["epoch"] > 0]
    goals += [(f"{t:.1%}", None, t) for t in extra]
    for label, owner, value in goals:
        for name in names:
            curve = report["epochs"][name]
            if name == owner or not curve or curve[-1]["epoch"] == 0:
                continue
            hit = next((p for p in curve if p["mean"] >= value - 1e-12), None)
            out.append({"strategy": name, "target": label, "target_accuracy": value,
                        "epoch": hit["epoch"] if hit else None, "flops": hit["flops"] if hit else None,
                        "budget_epochs": curve[-1]["epoch"]})
    return out


def _reft_norms(cfg: RunConfig, folders: list[RunFolder]) -> dict[str, Any]:
    """Per layer and position group, the learned edit's size averaged over seeds."""
    i = next((k for k, s in enumerate(cfg.stages) if s.trains_reft), None)
    if i is None:
        return {}
    acc: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for folder in folders:
        for row in reft.edit_norms(reft.load_tensors(folder.stage_dir(i, cfg.stages[i]))):
            acc.setdefault((row["layer"], row["group"]), []).append((row["gain"], row["offset"]))
    rows = [{"layer": layer, "group": group, "gain": float(np.mean([v[0] for v in vals])),
             "offset": float(np.mean([v[1] for v in vals]))} for (layer, group), vals in sorted(acc.items())]
    return {"kind": cfg.reft.kind, "init": cfg.reft.init, "per_layer": rows}


def summary_view(report: dict[str, Any]) -> dict[str, Any]:
    """`heft run`'s summary.json: the one-seed report in the schema it has always had."""
    return {
        "majority_baseline": report["majority_baseline"], "majority_label": report["majority_label"],
        "eval_split": report["eval_split"],
        "strategies": {n: {"accuracy": s["mean"], "ci95": s["single_run_ci95"], "n": report["n"],
                           "trainable_params": s["trainable_params"], "train_seconds": s["train_seconds"], "epochs": s["epochs"]}
                       for n, s in report["strategies"].items()},
        "shared_stages": {n: ", ".join(sh["from"]) for n, sh in report["shared_stages"].items()},
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


def _interval(s: dict[str, Any]) -> str:
    """The 95% interval of a strategy's accuracy: of the mean over seeds (Student's t, clipped to [0, 1] for
    display; report.json keeps it as computed), or of the one run (Wilson)."""
    if s["ci95"]:
        return f"{_pct(max(0.0, s['ci95'][0]))} - {_pct(min(1.0, s['ci95'][1]))}"
    if s["single_run_ci95"]:
        return f"(one run, Wilson) {_pct(s['single_run_ci95'][0])} - {_pct(s['single_run_ci95'][1])}"
    return "n/a"


def _accuracy(s: dict[str, Any]) -> str:
    return _pct(s["mean"]) + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else "")


def console_table(r: dict[str, Any]) -> str:
    """The short table `heft run` and `heft compare` print."""
    seeds = r["seeds"]
    title = (f"Accuracy on {r['n']} {r['eval_split']} rows" + (f", mean ± std over seeds {seeds}" if len(seeds) > 1 else "")
             + f" (majority baseline {_pct(r['majority_baseline'])})")
    tasks = "macro" in next(iter(r["strategies"].values()))
    rows = [[n, _accuracy(s), _interval(s)] + ([_pct(s["macro"])] if tasks else [])
            + [f"{s['trainable_params']:,}", f"{s['epochs']:g}", f"{s['train_seconds']:.0f}"] for n, s in r["strategies"].items()]
    header = ["strategy", "accuracy (all rows)" if tasks else "accuracy", "95% CI"] + (["macro average"] if tasks else []) + \
        ["trainable params", "epochs", "train s"]
    return "\n".join([title, ""] + markdown_table(header, rows) + _task_section(r))


def summary_markdown(r: dict[str, Any]) -> str:
    """summary.md: the console table and where shared stages came from."""
    lines = [console_table(r)]
    for name, sh in r["shared_stages"].items():
        lines.append(f"\n{name}: first stage(s) taken from {', '.join(sh['from'])} (identical stage prefix, trained once).")
    return "\n".join(lines) + "\n"


def _task_section(r: dict[str, Any]) -> list[str]:
    """Per-task accuracy of every strategy, with the tasks' baselines, and the macro average."""
    first = next(iter(r["strategies"].values()))
    if "tasks" not in first:
        return []
    tasks = list(first["tasks"])
    lines = ["", "## Per task (accuracy: lm-eval's acc, mean over seeds; acc_norm where the task reports it)", ""]
    header = ["strategy"] + tasks + ["macro average"]
    rows = [[name] + [_pct(s["tasks"][t]["mean"]) + (f" (norm {_pct(s['tasks'][t]['acc_norm'])})" if "acc_norm" in s["tasks"][t]
                                                     else "") for t in tasks] + [_pct(s["macro"])]
            for name, s in r["strategies"].items()]
    rows.append(["chance"] + [_pct(first["tasks"][t]["chance"]) for t in tasks] + [""])
    rows.append(["majority"] + [_pct(first["tasks"][t]["majority_baseline"]) for t in tasks] + [""])
    rows.append(["rows"] + [str(first["tasks"][t]["n"]) for t in tasks] + [""])
    lines += markdown_table(header, rows)
    not_comparable = [t for t in tasks if not first["tasks"][t].get("comparable")]
    if not_comparable:
        lines += ["", f"Not comparable to published numbers: {', '.join(not_comparable)}. The offline copies hold no "
                  "training split of these tasks, so heft trains on a fixed half of the evaluated split and scores the "
                  "other half" + "".join(f"; {t}: {first['tasks'][t]['note']}" for t in not_comparable if first["tasks"][t].get("note"))
                  + " (heft.data.tasks)."]
    return lines


def report_markdown(r: dict[str, Any]) -> str:
    seeds = r["seeds"]
    many = len(seeds) > 1
    lines = [
        f"# Strategy comparison: {r['model']}, {len(seeds)} seed(s) {seeds}", "",
        f"Evaluation: {r['n']} rows of the {r['eval_split']} split; {r['train_rows']} training rows. " +
        (f"Majority baseline (always \"{r['majority_label']}\", the training majority): {_pct(r['majority_baseline'])}."
         if isinstance(r["majority_label"], str) else
         f"Majority baseline (each task's most frequent training answer), mean over tasks: {_pct(r['majority_baseline'])}."), "",
        "## Final accuracy", "",
    ]
    lines += markdown_table(
        ["strategy", "budget", "accuracy, mean ± std", "95% CI of the mean", "per seed", "above majority?", "trainable params",
         "train tokens", "train s", "est. train FLOPs"],
        [[name, s["budget"], _accuracy(s), _interval(s), ", ".join(_pct(v) for v in s["accuracy_per_seed"].values()),
          {True: "yes", False: "no", None: "n/a"}[s["above_majority"]], f"{s['trainable_params']:,}",
          f"{s['train_tokens']:,.0f}", f"{s['train_seconds']:.0f}", _sci(s["train_flops"])]
         for name, s in r["strategies"].items()])
    lines += _task_section(r)
    lines += ["", "\"above majority?\": the lower end of the 95% interval of the mean over seeds is above the majority "
              "baseline. Budgets are per strategy and listed in epochs of the training rows at the stated learning rate."]
    if r["shared_stages"]:
        lines += [""]
        for name, sh in r["shared_stages"].items():
            lines.append(f"- {name}: its first stage(s) were not trained again but taken from {', '.join(sh['from'])} of the "
                         f"same seed (identical stage prefix; within a stage, a constant learning-rate schedule makes the "
                         f"first epochs exact; bit-identical weights). Their cost still counts in {name}'s tokens, time and "
                         f"FLOPs above; {sh['seconds_not_retrained']:.0f} s per seed were saved.")
    lines += ["", "## Paired comparisons (same evaluation rows)", ""]
    lines += markdown_table(
        ["A", "B", "A - B (mean over seeds)", "bootstrap 95% CI", "bootstrap p", "McNemar exact per seed: A-only / B-only, p"],
        [[p["a"], p["b"], f"{100 * p['bootstrap']['diff']:+.1f} pts",
          f"{100 * p['bootstrap']['ci95'][0]:+.1f} to {100 * p['bootstrap']['ci95'][1]:+.1f}", _p(p["bootstrap"]["p"]),
          "; ".join(f"seed {s}: {m['a_only']}/{m['b_only']}, p={m['p']:.3g}" for s, m in p["mcnemar"].items())]
         for p in r["pairs"]])
    by_task = [p for p in r["pairs"] if "by_task" in p]
    if by_task:
        tasks = list(by_task[0]["by_task"])
        lines += ["", "Per task: A - B in points, with the paired bootstrap 95% interval over that task's rows.", ""]
        lines += markdown_table(["A - B"] + tasks, [[f"{p['a']} - {p['b']}"] + [
            f"{100 * p['by_task'][t]['diff']:+.1f} ({100 * p['by_task'][t]['ci95'][0]:+.0f} to {100 * p['by_task'][t]['ci95'][1]:+.0f})"
            for t in tasks] for p in by_task])
    lines += ["", "The bootstrap resamples evaluation rows (10,000 times, all seeds of a row together) and so measures "
              "how much the difference depends on which questions were asked; McNemar's test counts the rows only one "
              "strategy gets right, per seed. Neither corrects for the number of pairs compared. B = `majority` is "
              "the majority baseline as a predictor (always the training majority label) on the same rows."]
    if any(r["epochs"].values()):
        lines += ["", "## Accuracy after each epoch (mean over seeds)", ""]
    lines += [] if not any(r["epochs"].values()) else markdown_table(
        ["strategy", "epoch", "stage", "accuracy", "per seed", "est. FLOPs", "train s"],
        [[name, f"{p['epoch']:g}", f"{p['stage']} ({p['method'] or 'base'})", _accuracy(p),
          ", ".join(_pct(a) for a in p["accuracy_per_seed"]), _sci(p["flops"]), f"{p['train_seconds']:.0f}"]
         for name, curve in r["epochs"].items() for p in curve])
    if r["targets"]:
        lines += ["", "## Epochs to reach a target (seed-mean accuracy)", ""]
        for t in r["targets"]:
            if t["epoch"] is None:
                lines.append(f"- {t['strategy']} does not reach {t['target']} ({_pct(t['target_accuracy'])}) within its "
                             f"{t['budget_epochs']:g} epochs.")
            else:
                lines.append(f"- {t['strategy']} reaches {t['target']} ({_pct(t['target_accuracy'])}) after {t['epoch']:g} "
                             f"epoch(s) ({_sci(t['flops'])} FLOPs).")
    lines += ["", "## Plots", ""]
    if isinstance(r["plots"], str):
        lines.append(f"Plots {r['plots']}.")
    else:
        captions = {"epoch": "Validation accuracy vs training epochs", "flops": "Validation accuracy vs estimated training FLOPs",
                    "reft_edit_norms": "Learned ReFT edit per layer (mean over seeds)"}
        for key, path in r["plots"].items():
            lines += [f"![{captions[key]}]({path})", ""]
    if r["reft_edit_norms"]:
        lines += ["", "ReFT edit sizes: each intervention adds A h + c to the residual stream at its positions "
                  "(LoReFT: A = R^T (W - R), c = R^T b); with identity init both start at 0."]
    lines += ["", "## How these numbers are computed", "",
              f"- Accuracy: answer log-likelihood scoring on the same {r['n']} rows for every run; the interval of the mean "
              "uses Student's t over seeds" + (" (one seed: the Wilson interval of that run)." if not many else "."),
              "- FLOPs are estimated, not measured: (2 + 2 f) N per training token, N the base model's non-embedding "
              "parameters and f the share of layers gradients flow through (heft.train.cost).",
              "- Every number here is recomputed from the run folders listed in report.json (`run_folders`)."]
    return "\n".join(lines) + "\n"
