"""Progress over a dataset run: a rich bar on a terminal, plain periodic lines in a log file.

Under nohup, SLURM or a pipe a live bar prints nothing useful, so there a line like::

    progress base-data-1a2b3c4d: 12/40 (30%), accuracy so far 58.3% (7/12), 0.80 samples/s, ETA 35 s

is printed every ``PLAIN_EVERY_S`` seconds or every ``PLAIN_EVERY_FRACTION`` of the run,
whichever comes first, and once at the end. Counts include samples finished by earlier runs of
the same folder; the rate and ETA are those of this process.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

PLAIN_EVERY_S = 30.0
PLAIN_EVERY_FRACTION = 0.05


def progress_for(console: Console, name: str, total: int, done: int, correct: int):
    """The progress reporter for ``console``: ``RichProgress`` on a terminal, else ``PlainProgress``."""
    cls = RichProgress if console.is_terminal else PlainProgress
    return cls(console, name, total, done, correct)


class _Progress:
    def __init__(self, console: Console, name: str, total: int, done: int, correct: int):
        self.console, self.name, self.total = console, name, total
        self.done, self.correct = done, correct
        self.ran, self.start = 0, time.monotonic()

    def advance(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.ran += 1
        self.correct += bool(record.get("correct"))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class PlainProgress(_Progress):
    def __init__(self, *args):
        super().__init__(*args)
        self._last_time, self._last_done = self.start, self.done

    def advance(self, record: dict[str, Any]) -> None:
        super().advance(record)
        now = time.monotonic()
        step = max(1, int(self.total * PLAIN_EVERY_FRACTION))
        if now - self._last_time >= PLAIN_EVERY_S or self.done - self._last_done >= step or self.done == self.total:
            self._last_time, self._last_done = now, self.done
            self.console.print(self.line(now - self.start), highlight=False, soft_wrap=True, markup=False)

    def line(self, elapsed: float) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        acc = f"{100 * self.correct / self.done:.1f}% ({self.correct}/{self.done})" if self.done else "-"
        rate = self.ran / elapsed if elapsed > 0 else None
        left = self.total - self.done
        eta = "-" if not rate else _duration(left / rate)
        rate_text = "-" if rate is None else f"{rate:.2f} samples/s"
        return f"progress {self.name}: {self.done}/{self.total} ({pct:.0f}%), accuracy so far {acc}, {rate_text}, ETA {eta}"


class RichProgress(_Progress):
    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        self._bar = Progress(*columns, console=self.console, transient=False)
        self._bar.__enter__()
        self._task = self._bar.add_task(self.name, total=self.total, completed=self.done)
        return self

    def advance(self, record: dict[str, Any]) -> None:
        super().advance(record)
        self._bar.update(self._task, advance=1, description=f"{self.name} · correct {self.correct}")

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
