"""Console tables fit the terminal: no line wider than the console, no header word split, the
most telling columns kept and the dropped ones named; CSV and Markdown keep every column."""

from __future__ import annotations

import pytest
from rich.console import Console

from prunevid_bench.harness.compare import COLUMNS, CONSOLE_COLUMNS, markdown_table, rich_table
from prunevid_bench.harness.sweep import mark_pareto, sweep_table
from prunevid_bench.harness.tables import Column, FittedTable


def compare_row(name, stages, tokens, acc, ttft, baseline=False):
    """A row as compare_rows makes it, with the README's kind of values (long names and stages)."""
    return {"run": name, "path": "", "stages": stages, "model": "toy", "n": 200, "tokens_in": tokens[0],
            "tokens_after_visual_methods": tokens[1], "visual_tokens_kept": tokens[2], "compression": tokens[2] / tokens[0],
            "llm_prefill_tokens": None, "ttft_s": ttft, "decode_tokens_per_s": 245.8, "peak_memory_bytes": 857_499_648,
            "kv_cache_bytes": 166_912, "accuracy": acc, "ci_low": acc - 0.05, "ci_high": acc + 0.03, "unparsed": 0,
            "is_baseline": baseline, "delta_accuracy": acc - 0.94, "ttft_speedup": 0.0908 / ttft, "kv_ratio": 0.427,
            "agreement": 0.91, "paired_n": 200, "paired_difference": acc - 0.94, "paired_ci_low": acc - 0.98,
            "paired_ci_high": acc - 0.9, "mcnemar_p": 0.031}


COMPARE_ROWS = [
    compare_row("toy-baseline-data-1e7ab461", "off", (128, 128, 128), 0.94, 0.0908, baseline=True),
    compare_row("toy-default-data-8308aa78", "S1 tau=0.8 c=0.5 seg=0.25 + S2 keep=0.4 L=1 (10/28) prunevid",
                (128, 54, 19), 0.89, 0.07756),
    compare_row("toy-aggressive-data-7d42175e", "S1 tau=0.7 c=0.3 seg=0.25 + S2 keep=0.3 L=1 (8/28) prunevid",
                (128, 44, 10), 0.76, 0.06776),
]


def sweep_rows():
    rows = []
    for i, cell in enumerate(["baseline"] + [f"tau={t},cluster_ratio={c}" for t in (0.7, 0.9) for c in (0.3, 0.7)]
                             + ["tau=0.7,cluster_ratio=0.3+random", "frames=4"]):
        kind = "baseline" if i == 0 else "control_random" if "random" in cell else "control_frames" if "frames" in cell else "grid"
        rows.append({"cell": cell, "kind": kind, "n": 30, "accuracy": 0.9 - i / 20, "ci_low": 0.7 - i / 20,
                     "ci_high": 0.97 - i / 20, "agreement": 1 - i / 30, "kept_tokens": 128 - 10 * i,
                     "retention": (128 - 10 * i) / 128, "ttft_s": 0.09 - i / 500, "decode_tokens_per_s": 240.0,
                     "peak_memory_bytes": 857_499_648, "kv_cache_bytes": 166_912, "model": "toy",
                     "paired_difference": -i / 20, "mcnemar_p": 0.5})
    mark_pareto(rows, "accuracy")
    return rows


def render(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text().splitlines()


def headers_as_shown(lines: list[str]) -> list[str]:
    """Each column's header with its lines joined: 'accu' over 'racy' reads back as 'accu racy'."""
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    rule = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    stacked = [line.strip("┃").split("┃") for line in lines[top + 1:rule]]
    return [" ".join(part.strip() for part in column if part.strip()) for column in zip(*stacked)]


def caption_text(lines: list[str]) -> str:
    bottom = max(i for i, line in enumerate(lines) if line.startswith("└"))
    return " ".join(line.strip() for line in lines[bottom + 1:])


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_compare_table_fits_and_keeps_header_words_whole(width):
    lines = render(rich_table(COMPARE_ROWS), width)
    assert max(map(len, lines)) <= width
    shown = headers_as_shown(lines)
    all_headers = [c.header for c in CONSOLE_COLUMNS]
    assert all(h in all_headers for h in shown), shown  # every header reads back whole
    assert shown[:3] == ["run", "model", "acc % (CI)"]  # rank 0 is always there
    hidden = [h for h in all_headers if h not in shown]
    assert hidden and f"not shown at {width} columns: {', '.join(hidden)}" in caption_text(lines)


def test_compare_table_at_80_columns_keeps_the_headline_columns():
    shown = headers_as_shown(render(rich_table(COMPARE_ROWS), 80))
    assert shown == ["run", "model", "acc % (CI)", "kept", "FLOPs", "Δacc (p)"]  # what each line paid beside its kept share
    assert [h for h in headers_as_shown(render(rich_table(COMPARE_ROWS), 300))] == [c.header for c in CONSOLE_COLUMNS]


def test_a_wide_console_shows_every_column_and_no_note():
    lines = render(rich_table(COMPARE_ROWS), 300)
    text = "\n".join(lines)
    assert "not shown" not in text and "89.0 (84-92)" in text and "128→54→19" in text
    assert "S1 tau=0.8 c=0.5 seg=0.25 + S2 keep=0.4 L=1 (10/28) prunevid" in text  # stages on one line


def test_markdown_keeps_every_column_whatever_the_console():
    md = markdown_table(COMPARE_ROWS).splitlines()
    assert md[0] == "| " + " | ".join(h for h, _ in COLUMNS) + " |"
    assert md[0].startswith("| run | stages | model | n | tokens in → LLM → kept | kept | TTFT (median) |")
    assert "| 89.0% [84.0%, 92.0%] | -5.0 pt | -5.0 pt [-9, -1] p=0.03 |" in md[3]


@pytest.mark.parametrize("width", [60, 80, 140])
def test_sweep_table_fits_and_keeps_header_words_whole(width):
    rows = sweep_rows()
    lines = render(sweep_table(rows, "accuracy", title="Sweep of tau {0.7, 0.9} × cluster_ratio {0.3, 0.7}"), width)
    assert max(map(len, lines)) <= width
    shown = headers_as_shown(lines)
    assert {"cell", "acc (CI)"} <= set(shown) and (width < 140 or "model" in shown) and (width < 80 or {"tokens", "TTFT", "front"} <= set(shown))
    assert all(h in ("cell", "model", "acc (CI)", "tokens", "FLOPs", "tok/L", "TTFT", "speed-up", "Δacc (p)", "agree", "front", "kept", "n", "KV",
                     "dec tok/s", "peak mem")
               for h in shown), shown
    text = "\n".join(lines)
    assert "tau=0.7+random" not in text  # the names are whole words: they wrap after their commas
    assert "cluster_ratio=0.3+random" in text and "tau=0.7," in text


def test_a_folding_column_is_as_wide_as_its_longest_word_up_to_its_cap():
    rows = [{"a": "short words only", "b": "x" * 30}]
    table = FittedTable([Column("a", lambda r: r["a"], fold=True), Column("b", lambda r: r["b"], fold=True, word_cap=10)], rows)
    shown, widths = table.layout(20)  # too narrow for anything but the narrowest layout
    assert shown == [0, 1] and widths == [5, 10]
    shown, widths = table.layout(200)
    assert widths == [len("short words only"), 30]
    droppable = FittedTable([Column("a", lambda r: r["a"], fold=True), Column("b", lambda r: r["b"], rank=1)], rows)
    assert droppable.layout(30)[0] == [0]  # 30 x's cannot fold: the column goes
