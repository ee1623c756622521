"""The questions a dataset run asks: the dataset read, ``--limit`` sampled (seeded, ids
recorded) and preflighted once (missing or undecodable videos are listed, reported and skipped
BEFORE the model is loaded). A sweep shares one plan across its cells."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.datasets import QASample, load_dataset, preflight, sample_rows
from prunevid_bench.harness.specs import DatasetSpec
from prunevid_bench.harness.summary import shown


@dataclass
class DatasetPlan:
    """The questions a run will ask: read, sampled and preflighted once (a sweep shares it)."""

    name: str
    format: str
    path: Path
    selected: list[QASample]  # after --limit, in file order
    runnable: list[QASample]  # selected and passed preflight
    skipped: list[dict[str, str]]  # {"id", "reason", "stage": "dataset" | "preflight"}
    limit: int | float | None
    seed: int
    n_usable: int | None = None  # rows of the file that parsed into questions (None: all selected)
    sample: str = "random"  # how --limit chose: random (seeded) | first
    offset: int = 0

    def counts(self) -> dict[str, int]:
        """How the rows divide, so that every figure shown adds up: rows = usable + unusable,
        selected (of the usable, after --limit) = ready + skipped in preflight."""
        unusable = sum(1 for s in self.skipped if s["stage"] == "dataset")
        usable = len(self.selected) if self.n_usable is None else self.n_usable
        return {"rows": usable + unusable, "unusable": unusable, "selected": len(self.selected),
                "ready": len(self.runnable), "skipped_preflight": len(self.skipped) - unusable}

    def identity(self) -> dict[str, Any]:
        """What decides which questions are asked: part of every run's fingerprint."""
        content = [
            [s.id, s.question, list(s.options), s.answer_index, s.video.name, s.start, s.end] for s in self.selected
        ]
        digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
        ident = {"name": self.name, "format": self.format, "limit": self.limit, "seed": self.seed,
                 "n_selected": len(self.selected), "questions_sha256": digest}
        if (self.sample, self.offset) != ("random", 0):  # named only when used: earlier folders keep their names
            ident.update(sample=self.sample, offset=self.offset)
        return ident


def plan_dataset(
    dataset: DatasetSpec,
    *,
    check: Callable[[Path], Any] | None = None,
    console: Console | None = None,
) -> DatasetPlan:
    """Read, sample and preflight a dataset; print what was skipped and why."""
    from prunevid_bench.video import check_video

    console = console or Console()
    ds = load_dataset(dataset.path, video_root=dataset.video_root, answers=dataset.answers, format=dataset.format,
                      allow_outside_root=dataset.allow_outside_root)
    limit, seed = dataset.limit, dataset.seed
    selected = sample_rows(ds.samples, limit, seed, dataset.sample, dataset.offset)
    runnable, problems = preflight(selected, check or check_video)
    skipped = [{"id": i, "reason": r, "stage": "dataset"} for i, r in ds.skipped]
    skipped += [{"id": i, "reason": r, "stage": "preflight"} for i, r in problems]
    plan = DatasetPlan(ds.name, ds.format, ds.path, selected, runnable, skipped, limit, seed, n_usable=len(ds),
                       sample=dataset.sample, offset=dataset.offset)
    console.print(f"dataset {escape(ds.name)} ({ds.format}): {counts_line(plan)}", highlight=False, soft_wrap=True)
    for item in skipped[:10]:
        console.print(f"  [yellow]skipped[/] {shown(item['id'])} ({item['stage']}): {shown(item['reason'])}",
                      highlight=False, soft_wrap=True)
    if len(skipped) > 10:
        console.print(f"  ... and {len(skipped) - 10} more (all listed in summary.json)")
    if not runnable:
        raise PruneVidError(f"no question of {ds.name} passed preflight; check the videos and --video-root")
    return plan


def counts_line(plan: DatasetPlan) -> str:
    """``5 rows, 1 unusable; 4 selected; preflight: 2 ready, 2 skipped``."""
    c = plan.counts()
    rows = f"{c['rows']} rows" + (f", {c['unusable']} unusable" if c["unusable"] else "")
    start = f" from row {plan.offset}" if plan.offset else ""
    if c["selected"] < c["rows"] - c["unusable"]:
        sampled = f" (the first{start})" if plan.sample == "first" else f" (seeded sample{start}, seed {plan.seed})"
    else:
        sampled = ""
    skipped = f", {c['skipped_preflight']} skipped" if c["skipped_preflight"] else ""
    return f"{rows}; {c['selected']} selected{sampled}; preflight: {c['ready']} ready{skipped}"
