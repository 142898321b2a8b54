"""The report's plots (matplotlib, an optional extra): accuracy vs epochs and vs estimated FLOPs with
min-max bands over seeds, and the learned ReFT edit per layer."""

from __future__ import annotations

from pathlib import Path

from heft.study.report_records import Report


def draw(folder: Path, report: Report) -> dict[str, str] | str:
    """PNG plots in `folder` (a study's plots/), paths relative to the study folder; the reason when they
    cannot be drawn (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'heft[plots]')"
    folder.mkdir(exist_ok=True)
    made: dict[str, str] = {}
    curves = {n: c for n, c in report.epochs.items() if c}
    base = next((c[0] for c in curves.values() if len(c) == 1 and c[0].epoch == 0), None)
    axes = (("epoch", "accuracy_vs_epoch.png", "training epochs (all stages)", lambda p: p.epoch),
            ("flops", "accuracy_vs_flops.png", "estimated training FLOPs", lambda p: p.flops))
    for kind, fname, xlabel, x_of in axes if curves else ():  # no per-epoch evaluations (--final-only): nothing to draw
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, curve in curves.items():
            if len(curve) == 1 and curve[0].epoch == 0:
                continue
            pts = ([base] if base is not None and curve[0].epoch > 0 else []) + curve
            x = [x_of(p) for p in pts]
            lo = [min(p.accuracy_per_seed) for p in pts]
            hi = [max(p.accuracy_per_seed) for p in pts]
            line, = ax.plot(x, [p.mean for p in pts], marker="o", label=name)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(report.majority_baseline, color="grey", linestyle="--", linewidth=1, label="majority baseline")
        if base is not None:
            ax.scatter([0], [base.mean], color="black", zorder=3, label="base model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy ({report.eval_split}, n={report.n})")
        ax.set_title(f"mean over seeds {report.seeds} (band: min-max)")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=120)
        plt.close(fig)
        made[kind] = f"{folder.name}/{fname}"
    if report.reft_edit_norms:
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
        for name, norms in report.reft_edit_norms.items():
            for group in sorted({r.group for r in norms.per_layer}):
                rows = [r for r in norms.per_layer if r.group == group]
                for ax, values in zip(axes, ([r.gain for r in rows], [r.offset for r in rows])):
                    ax.plot([r.layer for r in rows], values, marker=".", label=f"{name} ({group})")
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
        made["reft_edit_norms"] = f"{folder.name}/reft_edit_norms.png"
    return made
