"""Plots of evaluation results (matplotlib, written atomically as PNG)."""
from __future__ import annotations

from pathlib import Path

from .fileutil import atomic_path

__all__ = ["plot_robustness_curve"]


def plot_robustness_curve(report, path: str | Path) -> Path:
    """Robust accuracy (%) against ε for every model variant and attack of an ``EvalReport``.

    Solid lines: the worst case over all attacks; thin dashed lines: each attack alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, v in enumerate(report.variants):
        color = f"C{i}"
        attacks = sorted({r["attack"] for r in report.results if r["model"] == v and r["check"] is None})
        for a in attacks:
            pts = sorted((r["eps"], r["robust_acc"]) for r in report.results
                         if r["model"] == v and r["attack"] == a and r["check"] is None and r["source"] == "direct")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color=color, lw=0.9, alpha=0.7, label=f"{v}: {a}")
        worst = report.worst(v)
        ax.plot(list(worst), list(worst.values()), "-o", color=color, lw=2, ms=4, label=f"{v}: worst over all")
    ax.set_xlabel(f"ε ({report.threat_model})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report.architecture} on {report.dataset}, n = {report.n}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
