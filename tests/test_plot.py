"""The sweep plot: error bars at the Wilson intervals, numbered labels that never overlap, a key
naming every cell, and the title it is given."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from prunevid_bench.harness.plot import pareto_figure, plot_pareto
from prunevid_bench.harness.sweep import mark_pareto


def row(cell, kind, acc, kept, ttft):
    return {"cell": cell, "kind": kind, "accuracy": acc, "ci_low": acc - 0.12, "ci_high": min(1.0, acc + 0.08),
            "agreement": min(1.0, acc + 0.05), "agreement_ci_low": acc - 0.05, "agreement_ci_high": min(1.0, acc + 0.1),
            "kept_tokens": kept, "ttft_s": ttft}


@pytest.fixture
def crowded():
    """An 18-cell Stage-1 grid with random controls: many points at the same or nearly the same spot."""
    rng = random.Random(0)
    rows = [row("baseline", "baseline", 1.0, 128, 0.09)]
    rows[0].update(ci_low=0.6097, ci_high=0.9999999999999999)  # Wilson's interval for 6 of 6, as computed
    for tau, ratio, seg in itertools.product((0.7, 0.8, 0.9), (0.3, 0.5, 0.7), (0.25, 0.5)):
        rows.append(row(f"tau={tau},cluster_ratio={ratio},seg={seg}", "grid", 0.8 + rng.uniform(-0.03, 0.03),
                        int(128 * ratio * 0.8) + rng.choice((0, 0, 1)), 0.08 + rng.uniform(-0.004, 0.004)))
    rows += [row(r["cell"] + "+random", "control_random", r["accuracy"] - 0.1, r["kept_tokens"], r["ttft_s"])
             for r in rows[1:10]]
    rows.append(row("frames=4", "control_frames", 0.7, 64, 0.05))
    rows.append(row("frames=2", "control_frames", 0.7, 64, 0.05))  # exactly on top of frames=4
    mark_pareto(rows, "accuracy")
    return rows


def labels(ax):
    return [t for t in ax.texts if t.get_text()]


def test_labels_never_overlap_and_every_cell_is_numbered(crowded):
    fig = pareto_figure(crowded, "accuracy", "t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = fig.axes[:2]
    for ax in panels:
        boxes = [t.get_window_extent(renderer) for t in labels(ax)]
        assert not [pair for pair in itertools.combinations(boxes, 2) if pair[0].overlaps(pair[1])]
        assert all(ax.get_window_extent(renderer).contains(b.x0, b.y0) for b in boxes)  # inside the panel
        numbers = [int(n) for t in labels(ax) for n in t.get_text().split(",")]
        assert sorted(numbers) == list(range(1, len(crowded) + 1))  # each cell once, coincident cells share a label
    assert any(t.get_text() == f"{len(crowded) - 1},{len(crowded)}" for t in labels(panels[0]))  # the two frames cells
    key = "\n".join(t.get_text() for t in fig.axes[2].texts)
    for i, r in enumerate(crowded, start=1):
        assert f"{i:>2}  {r['cell']}\n" in key + "\n"


@pytest.mark.parametrize("metric,prefix", [("accuracy", ""), ("agreement", "agreement_")])
def test_error_bars_span_the_wilson_interval(crowded, metric, prefix):
    fig = pareto_figure(crowded, metric)
    for ax, cost, scale in zip(fig.axes[:2], ("kept_tokens", "ttft_s"), (1, 1000)):
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
        segments = [seg for c in bars for seg in c.lines[2][0].get_segments()]
        assert len(segments) == len(crowded)
        wanted = sorted((r[cost] * scale, 100 * r[f"{prefix}ci_low"], 100 * r[f"{prefix}ci_high"]) for r in crowded)
        got = sorted((seg[0][0], seg[0][1], seg[1][1]) for seg in segments)
        assert np.allclose(got, wanted)


def test_the_title_is_the_one_given(crowded, tmp_path):
    title = "Sweep of tau {0.7, 0.8, 0.9} × cluster_ratio {0.3, 0.5, 0.7} on data (30 questions)"
    assert pareto_figure(crowded, "accuracy", title)._suptitle.get_text() == title
    out = plot_pareto(crowded, "accuracy", tmp_path / "p.png", title)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_twelve_method_lines_are_told_apart_and_the_legend_clears_the_x_labels():
    """Each method's line has its own colour and style, and the legend under the panels sits
    below every panel's x label (it overlapped the middle one with three legend rows)."""
    rows = [row("baseline", "baseline", 0.6, 128, 0.02)]
    for m in range(12):
        for b in (0.1, 0.25, 0.5):
            rows.append({**row(f"m{m},budget={b}", "method", 0.3 + 0.02 * m + b / 4, 128 * b, 0.01 + b / 100),
                         "method": f"m{m}"})
    mark_pareto(rows, "accuracy")
    fig = pareto_figure(rows, "accuracy")
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("m")]
    assert len({(ln.get_color(), ln.get_linestyle()) for ln in lines}) == 12
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_top = fig.legends[0].get_window_extent(renderer).y1
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 2  # kept tokens and TTFT (these rows have no FLOPs)
    assert all(ax.xaxis.label.get_window_extent(renderer).y0 > legend_top for ax in panels)
