"""Plots of evaluation results (matplotlib, written atomically as PNG)."""
from __future__ import annotations

from pathlib import Path

from robust_surgery._files import atomic_path
from robust_surgery.evaluation.kinds import Source

__all__ = ["figure", "plot_curves", "plot_robustness_curve", "save_figure"]


def figure(*args, **kwargs):
    """``(fig, axes)`` of ``plt.subplots(*args, **kwargs)`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` as PNG atomically (temporary name, then rename), close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _axes():
    return figure(figsize=(6.4, 4.2), dpi=120)


def _save(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, legend_size: int) -> Path:
    """Label the axes (accuracy from 0 to 100 %), add the legend and write ``path`` atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return save_figure(fig, path)


def plot_robustness_curve(report, path: str | Path) -> Path:
    """Robust accuracy (%) against ε for every model variant and attack of an ``EvalReport``.

    Solid lines: the worst case over all attacks; thin dashed lines: each attack alone.
    """
    fig, ax = _axes()
    for i, v in enumerate(report.variants):
        color = f"C{i}"
        attacks = sorted({r["attack"] for r in report.results if r["model"] == v and r["check"] is None})
        for a in attacks:
            pts = sorted((r["eps"], r["robust_acc"]) for r in report.results
                         if r["model"] == v and r["attack"] == a and r["check"] is None and r["source"] == Source.DIRECT)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color=color, lw=0.9, alpha=0.7, label=f"{v}: {a}")
        worst = report.worst(v)
        ax.plot(list(worst), list(worst.values()), "-o", color=color, lw=2, ms=4, label=f"{v}: worst over all")
    return _save(fig, ax, Path(path), xlabel=f"ε ({report.threat_model})", ylabel="robust accuracy (%)",
                 title=f"{report.architecture} on {report.dataset}, n = {report.n}", legend_size=7)


def plot_curves(curves: dict[str, dict[float, float]], path: str | Path, *, title: str,
                xlabel: str = "ε (L∞)") -> Path:
    """One line per name: accuracy (%, the values) against ε (the keys, ε = 0 for clean accuracy).

    For comparing models, e.g. the worst-case robust accuracy of every row of a paradigm table.
    """
    fig, ax = _axes()
    for i, (name, pts) in enumerate(curves.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "-o", color=f"C{i}", lw=2, ms=4, label=name)
    return _save(fig, ax, Path(path), xlabel=xlabel, ylabel="accuracy (%), worst case over the attacks",
                 title=title, legend_size=8)
