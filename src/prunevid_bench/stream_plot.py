"""KV-cache bytes over a stream, one line per series (e.g. with and without a visual budget).
Uses the Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path


def plot_kv_over_stream(series: dict[str, list[tuple[float, int]]], path: Path, title: str = "KV cache over the stream") -> Path:
    """``series``: name -> [(seconds of video appended, cache bytes after that chunk)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, points in series.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, [y / 2**20 for y in ys], marker=".", label=name)
    ax.set_xlabel("video appended (s)")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
