"""The sweep plot: accuracy (or agreement with the baseline) against kept tokens and TTFT.

Two panels share the y axis. Every cell is a point (marker by kind: grid, baseline, random and
frames controls); the Pareto front (lower cost, higher quality) is drawn as a step line through
its points and circled. Uses the Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STYLE = {  # kind -> (marker, colour, legend label)
    "grid": ("o", "tab:blue", "PruneVid cells"),
    "baseline": ("*", "black", "baseline (no pruning)"),
    "control_random": ("x", "tab:orange", "random scores (same budget)"),
    "control_frames": ("s", "tab:green", "fewer frames (same budget)"),
}


def plot_pareto(rows: list[dict[str, Any]], metric: str, out: Path, title: str = "") -> Path:
    """Write the two-panel PNG; ``rows`` are sweep rows with ``pareto_<cost>`` flags set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("kept_tokens", "kept visual tokens (median)", 1.0), ("ttft_s", "TTFT, median (ms)", 1000.0))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (cost, xlabel, scale) in zip(axes, panels):
        usable = [r for r in rows if r[cost] is not None and r[metric] is not None and r[metric] == r[metric]]
        for kind, (marker, colour, label) in STYLE.items():
            pts = [r for r in usable if r["kind"] == kind]
            if pts:
                ax.scatter([r[cost] * scale for r in pts], [100 * r[metric] for r in pts], marker=marker, c=colour,
                           s=60 if kind == "baseline" else 30, label=label, zorder=3)
        front = sorted((r for r in usable if r.get(f"pareto_{cost}")), key=lambda r: r[cost])
        if front:
            xs, ys = [r[cost] * scale for r in front], [100 * r[metric] for r in front]
            ax.step(xs, ys, where="post", color="tab:red", lw=1.2, label="Pareto front", zorder=2)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="tab:red", zorder=4)
        for r in usable:
            ax.annotate(r["cell"], (r[cost] * scale, 100 * r[metric]), fontsize=6, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("agreement with baseline (%)" if metric == "agreement" else "accuracy (%)")
    axes[0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
