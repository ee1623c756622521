"""Console tables that fit the terminal: columns are dropped by rank, text columns fold.

A table is laid out when it is printed, for the width it is printed at (``options.max_width``):
every shown column gets at least its header's longest word, so a header word is never split
(rich would otherwise squeeze ``accuracy`` into ``accu racy``), and a folding column its
longest word up to the column's ``word_cap``. When even the narrowest layout is
too wide, the column of highest rank goes first; the caption names what was left out and where
the full table is (the CSV). Only console output is fitted: CSV and Markdown keep every column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table



@dataclass(frozen=True)
class Column:
    header: str  # short; a multi-word header may wrap, at its spaces only
    cell: Callable[[dict[str, Any]], str]  # plain text (escaped when rendered)
    rank: int = 0  # 0: always shown; higher ranks are dropped first when space runs out
    fold: bool = False  # long text (names, settings) that may take several lines
    word_cap: int = 24  # a folding column is at least as wide as its longest word, up to this; longer words fold
    note: str = ""  # what the column means, for the caption (only when the column is shown)
    justify: str = "right"


def _border_cells(n_columns: int) -> int:
    """What rich's default box adds around n columns: one space each side, n+1 rules."""
    return 3 * n_columns + 1


class FittedTable:
    """A rich renderable: the table with the columns that fit the width it is printed at."""

    def __init__(self, columns: list[Column], rows: list[dict[str, Any]], *, title: str = "", caption: str = "",
                 full_table: str = "") -> None:
        self.columns, self.title, self.caption, self.full_table = columns, title, caption, full_table
        self.cells = [[col.cell(row) for row in rows] for col in columns]

    def _widths(self, i: int) -> tuple[int, int]:
        """Column i's (narrowest, natural) width in cells."""
        col = self.columns[i]
        natural = max([cell_len(col.header)] + [cell_len(text) for text in self.cells[i]])
        if not col.fold:
            return natural, natural
        longest = max([cell_len(w) for w in col.header.split()] + [cell_len(w) for t in self.cells[i] for w in t.split()])
        return max(max(cell_len(w) for w in col.header.split()), min(longest, col.word_cap)), natural

    def layout(self, width: int) -> tuple[list[int], list[int]]:
        """(shown column indices, their widths) for a table at most ``width`` cells wide."""
        shown = list(range(len(self.columns)))
        sizes = {i: self._widths(i) for i in shown}

        def narrowest(cols: list[int]) -> int:
            return sum(sizes[i][0] for i in cols) + _border_cells(len(cols))

        while narrowest(shown) > width:
            droppable = [i for i in shown if self.columns[i].rank > 0]
            if not droppable:
                break  # only rank-0 columns left: rich folds what it must
            shown.remove(max(droppable, key=lambda i: (self.columns[i].rank, i)))
        widths = [sizes[i][0] for i in shown]
        spare = width - narrowest(shown)
        for k, i in enumerate(shown):  # spare cells widen folding columns, in order, up to their natural width
            grow = max(0, min(spare, sizes[i][1] - widths[k]))
            widths[k] += grow
            spare -= grow
        return shown, widths

    def table(self, width: int) -> Table:
        shown, widths = self.layout(width)
        hidden = [self.columns[i].header for i in range(len(self.columns)) if i not in shown]
        notes = [self.columns[i].note for i in shown if self.columns[i].note] + ([self.caption] if self.caption else [])
        if hidden:
            notes.append(f"not shown at {width} columns: {', '.join(hidden)}" + (f"; {self.full_table}" if self.full_table else ""))
        table = Table(title=escape(self.title) if self.title else None, caption=escape("; ".join(notes)) or None,
                      header_style="bold")
        for i, w in zip(shown, widths):
            col = self.columns[i]
            table.add_column(escape(col.header), justify=col.justify, width=w, no_wrap=not col.fold, overflow="fold")
        for r in range(len(self.cells[0]) if self.cells else 0):
            table.add_row(*(escape(self.cells[i][r]) for i in shown))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)
