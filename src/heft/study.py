"""`heft compare`: every strategy of a suite under several seeds, evaluated after every epoch, and a report.

    DIR/compare.json           what was asked: suite file, overrides, seeds, strategies
    DIR/seed-S/NAME/           one run folder per strategy and seed (see heft.pipeline)
    DIR/seedless/NAME/         strategies with no training (the base model): evaluated once
    DIR/report.md, report.json the comparison; DIR/plots/*.png when matplotlib is installed

Run folders that already hold a finished run of the same config are reused, so an interrupted
study continues where it stopped, and a finished one only rebuilds its report. Within a seed,
identical stage prefixes are trained once (see heft.suite).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .config import RunConfig, stage_dir_name
from .errors import ConfigError, HeftError
from .tracking import read_epochs
from .stats import mcnemar_exact, mean_interval, paired_bootstrap
from .suite import read_suite, select, train_strategies

logger = logging.getLogger(__name__)


def run_compare(path: Path, seeds: list[int], out: Path, overrides: list[tuple[str, str]], *, only: list[str] | None = None,
                overwrite: bool = False, tensorboard: bool = False, targets: list[float] | None = None) -> dict[str, Any]:
    """Train (or reuse) every strategy for every seed, then write the report. Returns report.json's content."""
    if not seeds:
        raise ConfigError("--seeds: give at least one seed (3 or more for an interval over seeds)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: duplicates in {seeds}")
    configs = select(read_suite(path, overrides), only)
    configs = {n: dataclasses.replace(c, eval=dataclasses.replace(c.eval, every_epoch=True),
                                      tensorboard=tensorboard or c.tensorboard) for n, c in configs.items()}
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    asked = {"suite": str(path), "overrides": [list(o) for o in overrides], "seeds": seeds, "strategies": list(configs)}
    io.write_json(out / "compare.json", asked)
    seedless = {n: c for n, c in configs.items() if not c.stages}
    if seedless:
        train_strategies(seedless, out / "seedless")  # scoring is deterministic: one evaluation serves every seed
    for seed in seeds:
        logger.info("seed %d: %s", seed, ", ".join(n for n in configs if configs[n].stages))
        train_strategies({n: dataclasses.replace(c, seed=seed) for n, c in configs.items() if c.stages}, out / f"seed-{seed}")
    report = build_report(out, configs, seeds, targets or [])
    io.write_json(out / "report.json", report)
    io.write_text(out / "report.md", report_markdown(report))
    return report


def run_folder(out: Path, name: str, cfg: RunConfig, seed: int) -> Path:
    return out / "seedless" / name if not cfg.stages else out / f"seed-{seed}" / name


def _predictions(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines() if x.strip()]


def _correct(preds: list[dict[str, Any]]) -> list[bool]:
    return [p["pred"] is not None and p["pred"] == p["label"] for p in preds]


def _budget(cfg: RunConfig) -> str:
    if not cfg.stages:
        return "no training"
    return " + ".join(f"{s.method} {s.epochs:g} ep @ {s.lr:g}" for s in cfg.stages)


def build_report(out: Path, configs: dict[str, RunConfig], seeds: list[int], targets: list[float]) -> dict[str, Any]:
    """Everything in report.json, computed from the run folders alone."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for name, cfg in configs.items():
        runs[name] = {}
        for seed in seeds:
            folder = run_folder(out, name, cfg, seed)
            if not (folder / "metrics.json").is_file():
                raise HeftError(f"{folder}: no finished run (metrics.json missing); run heft compare again to finish it")
            preds = _predictions(folder)
            runs[name][seed] = {"folder": folder, "metrics": io.read_json(folder / "metrics.json"), "preds": preds,
                                "correct": _correct(preds), "epochs": read_epochs(folder)}
    ref_name = next(iter(configs))
    ref_idx = [p["idx"] for p in runs[ref_name][seeds[0]]["preds"]]
    for name in configs:
        for seed in seeds:
            if [p["idx"] for p in runs[name][seed]["preds"]] != ref_idx:
                raise HeftError(f"{runs[name][seed]['folder']}: evaluated on different rows than "
                                f"{runs[ref_name][seeds[0]]['folder']}; paired comparisons need the same evaluation set")
    first = runs[ref_name][seeds[0]]["metrics"]
    trained = [m["metrics"] for r in runs.values() for m in r.values() if m["metrics"]["train_rows"]]
    majority = (trained or [first])[0]
    report: dict[str, Any] = {
        "seeds": seeds, "n": len(ref_idx), "eval_split": first["eval_split"],
        "model": configs[ref_name].model.name_or_path, "train_rows": majority["train_rows"],
        "majority_label": "yes" if majority["majority_label"] else "no", "majority_baseline": majority["majority_baseline"],
        "strategies": {}, "pairs": [], "epochs": {}, "targets": [], "shared_stages": {}, "reft_edit_norms": {},
    }
    for name, cfg in configs.items():
        ms = [runs[name][s]["metrics"] for s in seeds]
        accs = [m["accuracy"] for m in ms]
        summary = mean_interval(accs)
        report["strategies"][name] = {
            "budget": _budget(cfg), "accuracy_per_seed": dict(zip(map(str, seeds), accs)), **summary,
            "single_run_ci95": ms[0]["ci95"] if len(seeds) == 1 else None,
            "above_majority": (summary["ci95"][0] > report["majority_baseline"]) if summary["ci95"] else None,
            "trainable_params": ms[0]["trainable_params"], "epochs": ms[0]["epochs"],
            "train_tokens": float(np.mean([m.get("train_tokens", 0) for m in ms])),
            "train_seconds": float(np.mean([m["train_seconds"] for m in ms])),
            "train_flops": float(np.mean([m.get("train_flops", 0.0) for m in ms])),
        }
        shared = {str(s): st["reused_from"] for s in seeds for st in runs[name][s]["metrics"]["stages"] if "reused_from" in st}
        if shared:
            saved = float(np.mean([st["train_seconds"] for s in seeds for st in runs[name][s]["metrics"]["stages"]
                                   if "reused_from" in st]))
            report["shared_stages"][name] = {"from": sorted(set(shared.values())), "seconds_not_retrained": saved}
    names = list(configs)
    for j, b in enumerate(names):  # A is the later strategy of the suite (e.g. heft - lora, lora - base)
        for a in names[j + 1:]:
            ca = np.array([runs[a][s]["correct"] for s in seeds])
            cb = np.array([runs[b][s]["correct"] for s in seeds])
            report["pairs"].append({
                "a": a, "b": b, "bootstrap": paired_bootstrap(ca, cb),
                "mcnemar": {str(s): mcnemar_exact(runs[a][s]["correct"], runs[b][s]["correct"]) for s in seeds},
            })
    majority_label = bool(majority["majority_label"])
    for name in names:  # each strategy against always answering the training majority, on the same rows
        if not configs[name].stages:
            continue
        ca = np.array([runs[name][s]["correct"] for s in seeds])
        cm = np.array([[p["label"] == majority_label for p in runs[name][s]["preds"]] for s in seeds])
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
    report["run_folders"] = {n: {str(s): str(runs[n][s]["folder"].relative_to(out)) for s in seeds} for n in names}
    report["plots"] = _plots(out, report)
    return report


def _epoch_curve(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Seed-mean accuracy (and FLOPs) at each cumulative epoch every seed was evaluated at."""
    by_epoch: dict[float, list[dict[str, Any]]] = {}
    for recs in per_seed:
        for r in recs:
            by_epoch.setdefault(r["epoch"], []).append(r)
    points = []
    for epoch in sorted(by_epoch):
        recs = by_epoch[epoch]
        if len(recs) != len(per_seed):
            continue  # a seed without this point (should not happen with equal budgets)
        accs = [r["accuracy"] for r in recs]
        points.append({"epoch": epoch, "accuracy_per_seed": accs, **mean_interval(accs),
                       "flops": float(np.mean([r["flops"] for r in recs])),
                       "train_seconds": float(np.mean([r["train_seconds"] for r in recs])),
                       "stage": recs[0]["stage"], "method": recs[0]["method"]})
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


def _edit_norms(tensors: dict[str, Any], key: str) -> tuple[float, float]:
    """(||A||_F, ||c||) of an intervention's edit A h + c."""
    import torch

    w, b = tensors[f"{key}.weight"].double(), tensors[f"{key}.bias"].double()
    if f"{key}.rotation" in tensors:  # LoReFT / NoReFT: R^T ((W - R) h + b)
        r = tensors[f"{key}.rotation"].double()
        a, c = r.T @ (w - r), r.T @ b
    else:  # DiReFT: W2^T (W1 h + b)
        up = tensors[f"{key}.up"].double()
        a, c = up.T @ w, up.T @ b
    return float(torch.linalg.matrix_norm(a)), float(torch.linalg.vector_norm(c))


def _reft_norms(cfg: RunConfig, folders: list[Path]) -> dict[str, Any]:
    """Per layer and position group, the learned edit's size averaged over seeds."""
    from safetensors.torch import load_file

    i = next((k for k, s in enumerate(cfg.stages) if s.method in ("reft", "joint")), None)
    if i is None:
        return {}
    acc: dict[str, list[tuple[float, float]]] = {}
    layers: dict[str, tuple[int, str]] = {}
    for folder in folders:
        tensors = load_file(str(folder / "stages" / stage_dir_name(i, cfg.stages[i]) / "reft.safetensors"))
        for key in sorted({k.rsplit(".", 1)[0] for k in tensors}):
            layer, group = key[1:].split("_", 1)
            layers[key] = (int(layer), group)
            acc.setdefault(key, []).append(_edit_norms(tensors, key))
    rows = [{"layer": layers[k][0], "group": layers[k][1], "gain": float(np.mean([v[0] for v in vals])),
             "offset": float(np.mean([v[1] for v in vals]))} for k, vals in acc.items()]
    return {"kind": cfg.reft.kind, "init": cfg.reft.init, "per_layer": sorted(rows, key=lambda r: (r["layer"], r["group"]))}


def _plots(out: Path, report: dict[str, Any]) -> dict[str, str] | str:
    """PNG plots under DIR/plots (matplotlib, optional); the reason when they cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'heft[plots]')"
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    made: dict[str, str] = {}
    curves = {n: c for n, c in report["epochs"].items() if c}
    base = next((c[0] for c in curves.values() if len(c) == 1 and c[0]["epoch"] == 0), None)
    for xkey, fname, xlabel in (("epoch", "accuracy_vs_epoch.png", "training epochs (all stages)"),
                                ("flops", "accuracy_vs_flops.png", "estimated training FLOPs")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, curve in curves.items():
            if len(curve) == 1 and curve[0]["epoch"] == 0:
                continue
            pts = ([base] if base is not None and curve[0]["epoch"] > 0 else []) + curve
            x = [p[xkey] for p in pts]
            lo = [min(p["accuracy_per_seed"]) for p in pts]
            hi = [max(p["accuracy_per_seed"]) for p in pts]
            line, = ax.plot(x, [p["mean"] for p in pts], marker="o", label=name)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(report["majority_baseline"], color="grey", linestyle="--", linewidth=1, label="majority baseline")
        if base is not None:
            ax.scatter([0], [base["mean"]], color="black", zorder=3, label="base model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy ({report['eval_split']}, n={report['n']})")
        ax.set_title(f"mean over seeds {report['seeds']} (band: min-max)")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=120)
        plt.close(fig)
        made[xkey] = f"plots/{fname}"
    if report["reft_edit_norms"]:
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
        for name, norms in report["reft_edit_norms"].items():
            for group in sorted({r["group"] for r in norms["per_layer"]}):
                rows = [r for r in norms["per_layer"] if r["group"] == group]
                for ax, key in zip(axes, ("gain", "offset")):
                    ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker=".", label=f"{name} ({group})")
        axes[0].set_title("edit gain ||A||_F (edit = A h + c)")
        axes[1].set_title("edit offset ||c||")
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("decoder layer")
            ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.savefig(folder / "reft_edit_norms.png", dpi=120)
        plt.close(fig)
        made["reft_edit_norms"] = "plots/reft_edit_norms.png"
    return made


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "< 1e-4" if p == 0 else f"{p:.3g}"  # 10,000 resamples: 0 means below their resolution


def _sci(x: float) -> str:
    return f"{x:.2e}" if x else "0"


def report_markdown(r: dict[str, Any]) -> str:
    seeds = r["seeds"]
    many = len(seeds) > 1
    lines = [
        f"# Strategy comparison: {r['model']}, {len(seeds)} seed(s) {seeds}", "",
        f"Evaluation: {r['n']} rows of the {r['eval_split']} split; {r['train_rows']} training rows. "
        f"Majority baseline (always \"{r['majority_label']}\", the training majority): {_pct(r['majority_baseline'])}.", "",
        "## Final accuracy", "",
        "| strategy | budget | accuracy, mean ± std | 95% CI of the mean | per seed | above majority? | trainable params "
        "| train tokens | train s | est. train FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["strategies"].items():
        std = f" ± {100 * s['std']:.1f}" if s["std"] is not None else ""
        if s["ci95"]:  # shown clipped to [0, 1]; report.json keeps the t interval as computed
            ci = f"{_pct(max(0.0, s['ci95'][0]))} - {_pct(min(1.0, s['ci95'][1]))}"
        else:
            ci = f"(one run, Wilson) {_pct(s['single_run_ci95'][0])} - {_pct(s['single_run_ci95'][1])}" if s["single_run_ci95"] else "n/a"
        above = {True: "yes", False: "no", None: "n/a"}[s["above_majority"]]
        per = ", ".join(_pct(v) for v in s["accuracy_per_seed"].values())
        lines.append(f"| {name} | {s['budget']} | {_pct(s['mean'])}{std} | {ci} | {per} | {above} | {s['trainable_params']:,} "
                     f"| {s['train_tokens']:,.0f} | {s['train_seconds']:.0f} | {_sci(s['train_flops'])} |")
    lines += ["", "\"above majority?\": the lower end of the 95% interval of the mean over seeds is above the majority "
              "baseline. Budgets are per strategy and listed in epochs of the training rows at the stated learning rate."]
    if r["shared_stages"]:
        lines += [""]
        for name, sh in r["shared_stages"].items():
            lines.append(f"- {name}: its first stage was not trained again but taken from {', '.join(sh['from'])} of the same "
                         f"seed (identical stage, constant learning-rate schedule, bit-identical weights). Its cost still counts "
                         f"in {name}'s tokens, time and FLOPs above; {sh['seconds_not_retrained']:.0f} s per seed were saved.")
    lines += ["", "## Paired comparisons (same evaluation rows)", "",
              "| A | B | A - B (mean over seeds) | bootstrap 95% CI | bootstrap p | McNemar exact per seed: A-only / B-only, p |",
              "|---|---|---|---|---|---|"]
    for p in r["pairs"]:
        bs = p["bootstrap"]
        mc = "; ".join(f"seed {s}: {m['a_only']}/{m['b_only']}, p={m['p']:.3g}" for s, m in p["mcnemar"].items())
        lines.append(f"| {p['a']} | {p['b']} | {100 * bs['diff']:+.1f} pts | {100 * bs['ci95'][0]:+.1f} to {100 * bs['ci95'][1]:+.1f} "
                     f"| {_p(bs['p'])} | {mc} |")
    lines += ["", "The bootstrap resamples evaluation rows (10,000 times, all seeds of a row together) and so measures "
              "how much the difference depends on which questions were asked; McNemar's test counts the rows only one "
              "strategy gets right, per seed. Neither corrects for the number of pairs compared. B = `majority` is "
              "the majority baseline as a predictor (always the training majority label) on the same rows."]
    lines += ["", "## Accuracy after each epoch (mean over seeds)", "", "| strategy | " + " | ".join(
        ["epoch", "stage", "accuracy", "per seed", "est. FLOPs", "train s"]) + " |", "|---|---|---|---|---|---|---|"]
    for name, curve in r["epochs"].items():
        for p in curve:
            std = f" ± {100 * p['std']:.1f}" if p["std"] is not None else ""
            lines.append(f"| {name} | {p['epoch']:g} | {p['stage']} ({p['method'] or 'base'}) | {_pct(p['mean'])}{std} | "
                         f"{', '.join(_pct(a) for a in p['accuracy_per_seed'])} | {_sci(p['flops'])} | {p['train_seconds']:.0f} |")
    if r["targets"]:
        lines += ["", "## Epochs to reach a target (seed-mean accuracy)", ""]
        for t in r["targets"]:
            if t["epoch"] is None:
                lines.append(f"- {t['strategy']} does not reach {t['target']} ({_pct(t['target_accuracy'])}) within its "
                             f"{t['budget_epochs']:g} epochs.")
            else:
                lines.append(f"- {t['strategy']} reaches {t['target']} ({_pct(t['target_accuracy'])}) after {t['epoch']:g} "
                             f"epoch(s) ({_sci(t['flops'])} FLOPs).")
    plots = r["plots"]
    lines += ["", "## Plots", ""]
    if isinstance(plots, str):
        lines.append(f"Plots {plots}.")
    else:
        captions = {"epoch": "Validation accuracy vs training epochs", "flops": "Validation accuracy vs estimated training FLOPs",
                    "reft_edit_norms": "Learned ReFT edit per layer (mean over seeds)"}
        for key, path in plots.items():
            lines += [f"![{captions[key]}]({path})", ""]
    if r["reft_edit_norms"]:
        lines += ["", "ReFT edit sizes: each intervention adds A h + c to the residual stream at its positions "
                  "(LoReFT: A = R^T (W - R), c = R^T b); with identity init both start at 0."]
    lines += ["", "## How these numbers are computed", "",
              f"- Accuracy: answer log-likelihood scoring on the same {r['n']} rows for every run; the interval of the mean "
              "uses Student's t over seeds" + (" (one seed: the Wilson interval of that run)." if not many else "."),
              "- FLOPs are estimated, not measured: (2 + 2 f) N per training token, N the base model's non-embedding "
              "parameters and f the share of layers gradients flow through (heft.flops).",
              "- Every number here is recomputed from the run folders listed in report.json (`run_folders`)."]
    return "\n".join(lines) + "\n"
