"""``prunevid compare --by-type``: accuracy per question type, one column per run.

The counts are each run's own tallies (``answers.accuracy_summary``, overall and per category: the
numbers ``prunevid run`` prints under its accuracy), with Wilson 95% intervals
(``answers.wilson_interval``). A cell is marked ``*`` when its interval does not overlap the base
run's for the same type: a difference larger than either run's sampling noise, read per type
without pairing the questions (the main table's paired test covers the whole run).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table

from prunevid_bench.harness.answers import wilson_interval
from prunevid_bench.harness.compare import run_accuracy
from prunevid_bench.harness.runs import SavedRun
from prunevid_bench.harness.summary import fmt_pct

ALL = "all"  # the row of every question, below the types
FIELDS = ("run", "type", "correct", "n", "accuracy", "ci_low", "ci_high", "separated")  # compare_by_type.csv
TYPE_CAP = 14  # the type column folds names longer than this


def counts_by_type(accuracy: dict[str, Any] | None) -> dict[str, tuple[int, int]]:
    """(correct, n) per question type and for ``all``, from a run's accuracy summary (None: {})."""
    if not accuracy:
        return {}
    parts = {**accuracy.get("by_category", {}), ALL: accuracy}
    return {name: (part["correct"], part["n"]) for name, part in parts.items()}


def cell(correct: int, n: int, base: dict[str, Any] | None) -> dict[str, Any]:
    """One run's accuracy on one type; ``separated`` against the base run's cell (None: no base)."""
    low, high = wilson_interval(correct, n)
    separated = None
    if base is not None and n and base["n"]:
        separated = high < base["ci_low"] or low > base["ci_high"]
    return {"correct": correct, "n": n, "accuracy": correct / n if n else math.nan, "ci_low": low, "ci_high": high,
            "separated": separated}


@dataclass
class ByType:
    """The per-type view: ``cells[i][type]`` is run i's cell (absent: the run has no such question).
    A rich renderable: one table, or several (one under another, in run order) when the runs do not fit."""

    runs: list[str]  # run names, as in compare.csv
    labels: list[str]  # the names the main table shows (the base run's marked)
    types: list[str]  # sorted, then ``all``; empty when no run has a scored answer
    cells: list[dict[str, dict[str, Any]]]
    base: str | None  # the base run's name

    def long_rows(self) -> list[dict[str, Any]]:
        return [{"run": run, "type": t, **cells[t]} for run, cells in zip(self.runs, self.cells)
                for t in self.types if t in cells]

    def note(self) -> str:
        if not self.types:
            return "no run has scored answers: no accuracy by type"
        parts = ["cell: accuracy over correct/asked"]
        if self.types == [ALL]:
            parts.append("no run records a question type: only all")
        parts.append(f"*: Wilson 95% interval does not overlap the base run's ({self.base}) on that type" if self.base
                     else "no base run: nothing marked")
        return "; ".join(parts)

    def _text(self, i: int, t: str, one_line: bool = False) -> str:
        """``90.0%* (108/120)`` on one line (Markdown), or the count under the accuracy (console)."""
        c = self.cells[i].get(t)
        if c is None:
            return "-"
        acc, count = f"{fmt_pct(c['accuracy'])}{'*' if c['separated'] else ''}", f"{c['correct']}/{c['n']}"
        return f"{acc} ({count})" if one_line else f"{acc}\n{count}"

    def markdown(self) -> str:
        def line(parts: list[str]) -> str:
            return "| " + " | ".join(p.replace("|", "\\|") for p in parts) + " |"

        lines = [line(["type", *self.labels]), "|---|" + "---:|" * len(self.labels)]
        lines += [line([t, *(self._text(i, t, one_line=True) for i in range(len(self.runs)))]) for t in self.types]
        return "\n".join(lines) + f"\n\n{self.note()}\n"

    def groups(self, width: int) -> list[tuple[int, list[int], list[int]]]:
        """(type column width, run indices, their widths) of each table, at most ``width`` cells wide
        where a run column's accuracy and count fit: every run column is as wide as its two lines,
        and spare cells widen them towards their label's width so it takes fewer lines."""
        type_w = max(4, min(TYPE_CAP, max(cell_len(w) for t in self.types for w in t.split())))
        need = [max(cell_len(line) for t in self.types for line in self._text(i, t).split("\n"))
                for i in range(len(self.runs))]
        tables: list[list[int]] = [[]]
        for i in range(len(self.runs)):
            cols = tables[-1] + [i]
            if tables[-1] and type_w + sum(need[j] for j in cols) + 3 * (len(cols) + 1) + 1 > width:
                tables.append([i])
            else:
                tables[-1] = cols
        out = []
        for cols in tables:
            widths = [need[i] for i in cols]
            spare = width - type_w - sum(widths) - 3 * (len(cols) + 1) - 1
            while spare > 0 and any(w < cell_len(self.labels[i]) for w, i in zip(widths, cols)):
                for k, i in enumerate(cols):
                    if spare > 0 and widths[k] < cell_len(self.labels[i]):
                        widths[k], spare = widths[k] + 1, spare - 1
            out.append((type_w, cols, widths))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.types:
            yield escape(self.note())
            return
        groups = self.groups(options.max_width)
        for type_w, cols, widths in groups:
            part = f" (runs {cols[0] + 1}-{cols[-1] + 1} of {len(self.runs)})" if len(groups) > 1 else ""
            table = Table(title=f"Accuracy by question type{part}", header_style="bold")
            table.add_column("type", width=type_w, overflow="fold")
            for i, w in zip(cols, widths):
                table.add_column(escape(self.labels[i]), justify="right", width=w, overflow="fold")
            for r, t in enumerate(self.types):  # a rule above ``all``
                table.add_row(escape(t), *(escape(self._text(i, t)) for i in cols),
                              end_section=r == len(self.types) - 2)
            yield table
        yield escape(self.note())  # under the last table, wrapped at the console's width


def by_type(runs: list[SavedRun], labels: list[str], reference: SavedRun | None) -> ByType:
    """The per-type view of ``runs`` (``labels``: their names as the main table shows them)."""
    counts = [counts_by_type(run_accuracy(run)) for run in runs]
    named = sorted({t for c in counts for t in c} - {ALL})
    types = [*named, ALL] if any(counts) else []
    base = {t: cell(*ct, None) for t, ct in counts_by_type(run_accuracy(reference)).items()} if reference else {}
    cells = [{t: (base[t] if run is reference else cell(*ct, base.get(t)))
              for t, ct in c.items()} for run, c in zip(runs, counts)]
    return ByType([run.name for run in runs], labels, types, cells, reference.name if reference else None)


def write_csv(view: ByType, out: Path) -> Path:
    path = Path(out) / "compare_by_type.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(view.long_rows())
    return path
