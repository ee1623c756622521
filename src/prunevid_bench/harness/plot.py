"""The sweep plot: accuracy (or agreement with the baseline) against kept tokens, prefill FLOPs
(analytic, a fraction of the baseline's: what each line paid; when the rows have it) and TTFT.

The panels share the y axis. Every cell is a point (marker by kind: grid, baseline, random and
frames controls) with its 95% Wilson interval as an error bar; the Pareto front (lower cost,
higher quality) is drawn as a step line through its points and circled. Points carry numbers,
not names: the key beside the panels maps each number to its cell, cells drawn at the same spot
share one label ("2,5"), and each label is placed where it overlaps no other label (moved
further out, with a leader line, when the spot next to its point is taken). Uses the Agg
backend: no display needed.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

STYLE = {  # kind -> (marker, colour, legend label)
    "grid": ("o", "tab:blue", "PruneVid cells"),
    "baseline": ("*", "black", "baseline (no pruning)"),
    "control_random": ("x", "tab:orange", "random scores (same budget)"),
    "control_frames": ("s", "tab:green", "fewer frames (same budget)"),
    "method": ("o", "0.35", "method at a budget"),
}
# One colour per method line (not the front's red); after a full round the lines are dashed.
METHOD_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "navy",
                  "goldenrod", "teal", "darkmagenta")
PANELS = (("kept_tokens", "kept visual tokens (median)", 1.0),
          ("flops_fraction", "prefill FLOPs, % of the baseline's (median)", 100.0),
          ("ttft_s", "TTFT, median (ms)", 1000.0))
KEY_LINES = 30  # cells per column of the numbered key
KEY_FONT = 7  # points; a monospace character is about 0.6 of that wide
PANEL_WIDTH = 5.0  # inches per panel
RINGS = (6, 11, 17, 24, 32, 42)  # label distances from the point (points), nearest first
# Where a label may go: (ring, dx, dy), eight directions per ring, the diagonals first.
OFFSETS = [(r, round(r * math.cos(a * math.pi / 4)), round(r * math.sin(a * math.pi / 4)))
           for r in RINGS for a in (1, 3, 7, 5, 0, 2, 4, 6)]


LEGEND_COLUMNS = 8  # entries per row of the legend under the panels
LEGEND_ROW = 0.04  # the height of one legend row, as a share of the figure's


def _ci(row: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    prefix = "" if metric == "accuracy" else f"{metric}_"
    return row.get(f"{prefix}ci_low"), row.get(f"{prefix}ci_high")


def _usable(rows: list[dict[str, Any]], cost: str, metric: str) -> list[tuple[int, dict[str, Any]]]:
    return [(i, r) for i, r in enumerate(rows, start=1)
            if r.get(cost) is not None and r[metric] is not None and r[metric] == r[metric]]


def pareto_figure(rows: list[dict[str, Any]], metric: str, title: str = ""):
    """The figure; ``rows`` are sweep rows with ``pareto_<cost>`` flags set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if p[0] != "flops_fraction" or any(r.get(p[0]) is not None for r in rows)]
    key_columns = max(1, math.ceil(len(rows) / KEY_LINES))
    key_width = key_columns * (max(map(len, _key_lines(rows)), default=0) * 0.6 * KEY_FONT + 14) / 72  # inches
    fig = plt.figure(figsize=(len(panels) * PANEL_WIDTH + 1 + key_width, 5.2))
    grid = fig.add_gridspec(1, len(panels) + 1, width_ratios=(*(PANEL_WIDTH,) * len(panels), key_width))
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[0, j], sharey=axes[0]) for j in range(1, len(panels))]
    for ax, (cost, xlabel, scale) in zip(axes, panels):
        usable = _usable(rows, cost, metric)
        for kind, (marker, colour, label) in STYLE.items():
            pts = [r for _, r in usable if r["kind"] == kind]
            if not pts:
                continue
            xs, ys = [r[cost] * scale for r in pts], [100 * r[metric] for r in pts]
            ax.scatter(xs, ys, marker=marker, c=colour, s=60 if kind == "baseline" else 30, label=label, zorder=3)
            bars = [(x, y, *_ci(r, metric)) for x, y, r in zip(xs, ys, pts) if None not in _ci(r, metric)]
            if bars:
                bx, by, low, high = zip(*bars)
                # max(): Wilson's upper bound at 100% comes out as 1 - 1e-16, a "negative" error
                below = [max(0.0, y - 100 * lo) for y, lo in zip(by, low)]
                above = [max(0.0, 100 * hi - y) for y, hi in zip(by, high)]
                ax.errorbar(bx, by, yerr=[below, above], fmt="none", ecolor=colour, elinewidth=0.8, alpha=0.5,
                            capsize=2, zorder=2)
        for j, name in enumerate(dict.fromkeys(r["method"] for _, r in usable if r.get("method"))):
            line = sorted((r for _, r in usable if r.get("method") == name), key=lambda r: r[cost])
            ax.plot([r[cost] * scale for r in line], [100 * r[metric] for r in line],
                    "-" if j < len(METHOD_COLOURS) else "--", color=METHOD_COLOURS[j % len(METHOD_COLOURS)], lw=1.2,
                    label=name, zorder=2)  # one line per method, through its budgets
        front = sorted((r for _, r in usable if r.get(f"pareto_{cost}")), key=lambda r: r[cost])
        if front:
            xs, ys = [r[cost] * scale for r in front], [100 * r[metric] for r in front]
            ax.step(xs, ys, where="post", color="tab:red", lw=1.2, label="Pareto front", zorder=2)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="tab:red", zorder=4)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.margins(0.12)
    axes[0].set_ylabel("agreement with baseline (%)" if metric == "agreement" else "accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        plt.setp(ax.get_yticklabels(), visible=False)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    columns = min(len(labels), LEGEND_COLUMNS)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=7, frameon=False)
    _draw_key(fig.add_subplot(grid[0, len(panels)]), rows, key_columns)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 130)), fontsize=9)
    # Room under the panels for the legend's rows, so it stays clear of the x labels.
    fig.tight_layout(rect=(0, LEGEND_ROW * math.ceil(len(labels) / max(1, columns)) + 0.01, 1, 1))
    for ax, (cost, _, scale) in zip(axes, panels):
        _place_labels(fig, ax, [(i, r[cost] * scale, 100 * r[metric]) for i, r in _usable(rows, cost, metric)])
    return fig


def _key_lines(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{i:>2}  {r['cell']}" for i, r in enumerate(rows, start=1)]


def _draw_key(ax, rows: list[dict[str, Any]], columns: int) -> None:
    """The numbered key: one line per cell, ``KEY_LINES`` to a column, columns side by side."""
    ax.axis("off")
    lines = _key_lines(rows)
    for c in range(columns):
        ax.text(c / columns, 1.0, "\n".join(lines[c * KEY_LINES:(c + 1) * KEY_LINES]), transform=ax.transAxes,
                va="top", ha="left", fontsize=KEY_FONT, family="monospace")


def _place_labels(fig, ax, points: list[tuple[int, float, float]]) -> None:
    """Number each point (one label for points drawn at the same spot), each where no label is
    and, when there is room, no marker either."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    spots: dict[tuple[int, int], list[int]] = {}
    where = {}
    for number, x, y in points:
        px, py = ax.transData.transform((x, y))
        spot = (round(px), round(py))
        spots.setdefault(spot, []).append(number)
        where[spot] = (x, y)
    half = 3 * fig.dpi / 72  # half a marker, in pixels
    markers = [Bbox.from_extents(px - half, py - half, px + half, py + half) for px, py in spots]
    frame = ax.get_window_extent(renderer)
    placed: list = []

    def attempt(text, xy, ring, dx, dy, avoid):
        label = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=6.5, zorder=5,
                            ha="left" if dx > 0 else "right" if dx < 0 else "center",
                            va="bottom" if dy > 0 else "top" if dy < 0 else "center")
        box = label.get_window_extent(renderer).expanded(1.1, 1.2)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        if inside and not any(box.overlaps(other) for other in avoid):
            return label, box
        label.remove()
        return None

    for spot, numbers in sorted(spots.items(), key=lambda item: item[1][0]):  # in cell order
        text, xy = ",".join(map(str, numbers)), where[spot]
        found = None
        for avoid in (placed + markers, placed):  # free of markers too if possible, else of labels only
            found = next((((ring, dx, dy), hit) for ring, dx, dy in OFFSETS
                          if (hit := attempt(text, xy, ring, dx, dy, avoid))), None)
            if found:
                break
        if found is None:  # nowhere free (never seen in practice): the nearest spot, overlapping
            ring, dx, dy = OFFSETS[0]
            label = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=6.5, zorder=5)
            found = ((ring, dx, dy), (label, label.get_window_extent(renderer)))
        (ring, dx, dy), (label, box) = found
        if ring > RINGS[0]:  # moved away from its point: a leader line back to it
            ax.annotate("", xy, xytext=(dx, dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5", "shrinkA": 0, "shrinkB": 2})
        placed.append(box)


def plot_pareto(rows: list[dict[str, Any]], metric: str, out: Path, title: str = "") -> Path:
    """Write the PNG (see ``pareto_figure``)."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, metric, title)
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
