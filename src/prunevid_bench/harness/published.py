"""Published tables as data: ``src/prunevid_bench/published/<name>.yaml``, one file per source.

A table names the model, the source's input setting (run-config keys), the benchmarks, and one
row per method at its budget with the published numbers (percent) and where they come from.
``benchmarks.yaml`` says where each benchmark's files lie under ``--data-root`` and how its
score is aggregated; ``models.yaml`` gives the shapes the GPU-hour estimate reads when the
checkpoint is not on this machine. Reading a table checks every field once, so a bad file fails
in one line naming the key; no number is computed or filled in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunevid_bench.errors import PruneVidError

PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "published"  # package data, like the presets
SHARED_FILES = ("benchmarks", "models")  # in the folder, but not tables
METRICS = ("accuracy", "task_mean")
FULL = "full"  # the row with every method off: the sweep's baseline cell


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    short: str  # for the 80-column table
    format: str  # a registered dataset format
    metric: str  # accuracy | task_mean
    files: tuple[tuple[str, str], ...]  # (question file, video folder), relative to --data-root
    release: str = ""
    subset: tuple[tuple[str, str], ...] = ()  # only the questions with these labels (QASample.meta)


@dataclass(frozen=True)
class PublishedRow:
    method: str  # "full", or a method as --methods names it
    budget: float | None  # kept fraction; None for the full row
    scores: dict[str, float]  # benchmark -> published percent (benchmarks it has no number for are absent)

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method} B={self.budget:g}"


@dataclass(frozen=True)
class PublishedTable:
    name: str
    path: Path
    title: str
    source: dict[str, str]
    model: str
    input: dict[str, Any]  # dotted run-config keys
    benchmarks: tuple[Benchmark, ...]
    rows: tuple[PublishedRow, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def budgets(self) -> tuple[float, ...]:
        return tuple(dict.fromkeys(r.budget for r in self.rows if r.budget is not None))


def table_names(folder: Path = PUBLISHED_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem not in SHARED_FILES)


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise PruneVidError(f"cannot read {path} ({str(err).splitlines()[0]}); fix the file") from None


def _need(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise PruneVidError(f"{where}: missing '{key}'")
    if not isinstance(data[key], kind):
        raise PruneVidError(f"{where}: '{key}' must be a {getattr(kind, '__name__', 'value')}")
    return data[key]


def load_benchmarks(path: Path = PUBLISHED_DIR / "benchmarks.yaml") -> dict[str, Benchmark]:
    from prunevid_bench.harness.datasets import format_names

    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise PruneVidError(f"{path}: expected a mapping of benchmarks")
    out = {}
    for name, spec in data.items():
        where = f"{path.name}: {name}"
        fmt, metric = _need(spec, "format", str, where), _need(spec, "metric", str, where)
        if fmt not in format_names():
            raise PruneVidError(f"{where}: unknown format '{fmt}'; use one of {', '.join(format_names())}")
        if metric not in METRICS:
            raise PruneVidError(f"{where}: metric must be one of {', '.join(METRICS)}, got '{metric}'")
        files = _need(spec, "files", dict, where)
        if not files:
            raise PruneVidError(f"{where}: 'files' names no question file")
        subset = spec.get("subset") or {}
        if not isinstance(subset, dict):
            raise PruneVidError(f"{where}: 'subset' must map a question label to its value (e.g. duration: short)")
        out[str(name)] = Benchmark(str(name), str(spec.get("title", name)), str(spec.get("short", name)), fmt, metric,
                                   tuple((str(f), str(v)) for f, v in files.items()), str(spec.get("release", "")),
                                   tuple((str(k), str(v)) for k, v in subset.items()))
    return out


def find_table(name: str) -> Path:
    """A shipped table by name, or a table file by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PruneVidError(f"published table file not found: {path}; check the path")
        return path
    if name in table_names():
        return PUBLISHED_DIR / f"{name}.yaml"
    from prunevid_bench.config import _suggest

    raise PruneVidError(f"unknown published table '{name}'{_suggest(name, table_names())}; "
                        "see `prunevid reproduce --list`")


def load_table(name: str) -> PublishedTable:
    from prunevid_bench.config import resolve_key

    path = find_table(name)
    data = _read_yaml(path)
    where = path.name
    if not isinstance(data, dict):
        raise PruneVidError(f"{where}: expected a mapping (title, source, model, input, benchmarks, rows)")
    known = {"title", "source", "model", "input", "benchmarks", "rows", "notes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PruneVidError(f"{where}: unknown key '{unknown[0]}'; a table has {', '.join(sorted(known))}")
    source = _need(data, "source", dict, where)
    if not source.get("cite"):
        raise PruneVidError(f"{where}: source needs 'cite' (the paper, README or log, and its table)")
    inputs = dict(_need(data, "input", dict, where))
    for key in inputs:
        resolve_key(str(key))  # unknown keys: did you mean
    shipped = load_benchmarks()
    names = _need(data, "benchmarks", list, where)
    for bench in names:
        if bench not in shipped:
            raise PruneVidError(f"{where}: unknown benchmark '{bench}'; benchmarks.yaml has {', '.join(shipped)}")
    rows = tuple(_row(raw, i, names, where) for i, raw in enumerate(_need(data, "rows", list, where), start=1))
    if not rows:
        raise PruneVidError(f"{where}: no rows")
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise PruneVidError(f"{where}: a method appears twice at one budget")
    return PublishedTable(path.stem, path, str(data.get("title", path.stem)), {k: str(v) for k, v in source.items()},
                          str(_need(data, "model", str, where)), inputs, tuple(shipped[b] for b in names), rows,
                          tuple(str(n) for n in data.get("notes") or ()))


def _row(raw: Any, index: int, benchmarks: list[str], where: str) -> PublishedRow:
    from prunevid_bench.methods import check_budget

    where = f"{where}: row {index}"
    method = str(_need(raw, "method", str, where))
    unknown = sorted(set(raw) - {"method", "budget", "scores"})
    if unknown:
        raise PruneVidError(f"{where}: unknown key '{unknown[0]}'; a row has method, budget and scores")
    budget = raw.get("budget")
    if method == FULL:
        if budget is not None:
            raise PruneVidError(f"{where}: the full row keeps every token; drop its budget")
    else:
        if not isinstance(budget, (int, float)) or isinstance(budget, bool):
            raise PruneVidError(f"{where}: {method} needs a budget (the kept fraction, e.g. 0.25)")
        check_budget(float(budget), f"{where}: budget")
        budget = float(budget)
    scores = raw.get("scores") or {}
    if not isinstance(scores, dict):
        raise PruneVidError(f"{where}: scores must map benchmark to percent")
    for bench, value in scores.items():
        if bench not in benchmarks:
            raise PruneVidError(f"{where}: a score for '{bench}', which the table does not list in benchmarks")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100 or math.isnan(value):
            raise PruneVidError(f"{where}: {bench} score {value!r} is not a percent in [0, 100]")
    return PublishedRow(method, budget, {str(b): float(v) for b, v in scores.items()})


def recorded_model_config(model: str, path: Path = PUBLISHED_DIR / "models.yaml") -> tuple[dict[str, Any], str] | None:
    """(config.json fields, their source) for a model models.yaml lists, else None."""
    data = _read_yaml(path) or {}
    entry = data.get(model)
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        return None
    return dict(entry["config"]), str(entry.get("source", "models.yaml"))
