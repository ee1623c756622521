"""The cells of a sweep: the grid of swept values (``--values``, ``--sweep-file``, the shipped
grids), the baseline and the controls (every method off; fewer frames; chance in place of a
score), and the matched-budget cells (``--methods/--budgets``). ``harness.sweep`` runs them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunevid_bench.config import RunConfig, from_dict, load_yaml, merge_into, overrides_to_layer, resolve_key
from prunevid_bench.errors import PruneVidError

SWEEP_DIR = Path(__file__).resolve().parents[1] / "sweeps"  # package data, like the presets (config.PRESET_DIR)

CONTROLS = ("random", "frames")


@dataclass
class Cell:
    name: str
    kind: str  # baseline | grid | control_random | control_frames
    overrides: dict[str, Any]  # dotted keys applied to the base config
    config: RunConfig
    matches: list[str] = field(default_factory=list)  # frames control: the cells whose budget it matches
    method: str | None = None  # matched-budget cells: the method and the asked budget
    budget: float | None = None



# ---------------------------------------------------------------------------------------------
# The grid


def short_name(key: str) -> str:
    """``tome.budget`` -> ``budget`` when the short name is unambiguous, else the dotted key."""
    short = key.split(".", 1)[1]
    try:
        return short if resolve_key(short) == key else key
    except PruneVidError:
        return key


def parse_values(specs: list[str]) -> dict[str, list[Any]]:
    """``["tau=0.7,0.8", "tome.budget=0.25,0.5"]`` -> {dotted key: [values]} (YAML-typed)."""
    out: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise PruneVidError(f"--values expects name=v1,v2,..., got '{spec}'")
        name, raw = spec.split("=", 1)
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise PruneVidError(f"--values {name}: no values given")
        out[resolve_key(name.strip())] = values
    return out


def load_sweep_file(path: Path) -> dict[str, list[Any]]:
    """A sweep file: ``grid: {name: [values], ...}`` (short or dotted names), plus a description.

    A name that is not a file but names a shipped sweep (``sweeps/<name>.yaml``) reads that one, so a wheel
    install, which has no ``sweeps/`` folder to point at, can use them too."""
    shipped = SWEEP_DIR / f"{path}.yaml"
    if not Path(path).is_file() and Path(path).name == str(path) and shipped.is_file():
        path = shipped
    data = load_yaml(Path(path))
    grid = data.get("grid") if isinstance(data, dict) else None
    if not isinstance(grid, dict) or not grid:
        raise PruneVidError(f"{path}: expected a 'grid' mapping of parameter: [values]")
    out = {}
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PruneVidError(f"{path}: grid.{name} must be a non-empty list of values")
        out[resolve_key(str(name))] = values
    return out


def shipped_values(key: str) -> list[Any] | None:
    """Values for ``key`` from the sweep files shipped in ``sweeps/`` (alphabetical order), so
    ``prunevid sweep tau cluster_ratio`` works without ``--values``."""
    for path in sorted(SWEEP_DIR.glob("*.yaml")):
        grid = load_sweep_file(path)
        if key in grid:
            return grid[key]
    return None


def dedupe_values(key: str, values: list[Any], notes: list[str] | None = None) -> list[Any]:
    """``values`` without repeats, in order (two equal values would share one cell folder). Each
    repeat dropped is said in ``notes``. ``True`` and ``1`` are different values here."""
    kept: list[Any] = []
    for value in values:
        if any(isinstance(v, bool) == isinstance(value, bool) and v == value for v in kept):
            if notes is not None:
                notes.append(f"{short_name(key)}={value_text(value)} is given more than once; it runs once")
            continue
        kept.append(value)
    return kept


def grid_spec(params: list[str], values: list[str] | None, sweep_file: Path | None,
              notes: list[str] | None = None) -> dict[str, list[Any]]:
    """The swept keys and their values: a sweep file overlaid by ``--values``, restricted to
    PARAMS when given. Repeated values are dropped, with a line in ``notes``."""
    spec = load_sweep_file(sweep_file) if sweep_file else {}
    given = parse_values(values or [])
    spec.update(given)
    if params:
        keys = [resolve_key(p) for p in params]
        extra = [k for k in given if k not in keys]
        if extra:
            raise PruneVidError(f"--values given for {', '.join(extra)}, which is not among the swept PARAMs")
        missing = [k for k in keys if k not in spec]
        for key in missing[:]:  # no values given: take them from the first shipped sweep file listing the key
            shipped = shipped_values(key)
            if shipped is not None:
                spec[key] = shipped
                missing.remove(key)
        if missing:
            raise PruneVidError(f"no values for {missing[0]}: give --values {short_name(missing[0])}=v1,v2 or a --sweep-file that lists it")
        spec = {k: spec[k] for k in keys}
    if not spec:
        raise PruneVidError("nothing to sweep: name PARAMs with --values name=v1,v2, or give --sweep-file")
    for key in spec:
        if key.startswith("model."):
            raise PruneVidError(f"{key} cannot be swept: a sweep loads one model; run one sweep per model")
        if key.startswith("runtime."):
            raise PruneVidError(f"{key} cannot be swept: it is set once per process (--threads)")
    return {key: dedupe_values(key, vals, notes) for key, vals in spec.items()}


def with_overrides(base: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    return from_dict(merge_into(base.to_dict(), overrides_to_layer(overrides), "sweep"))


def value_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def methods_off(base: RunConfig) -> dict[str, bool]:
    """The overrides that switch off every method the base config has on: the baseline cell and
    every frames control start from these, so no method (ToMe, EVS, ...) stays on in them."""
    from prunevid_bench.methods import method_sections

    return {f"{s}.enabled": False for s in method_sections() if base.section(s).enabled}


def expand_cells(base: RunConfig, spec: dict[str, list[Any]], controls: list[str] | None = None) -> list[Cell]:
    """The baseline, every grid cell and the random controls (frames controls come later)."""
    controls = list(dict.fromkeys(controls or []))  # a control named twice runs once
    for control in controls:
        if control not in CONTROLS:
            raise PruneVidError(f"unknown control '{control}'; use {' or '.join(CONTROLS)}")
    from prunevid_bench.methods import method_sections

    sections = method_sections()
    off = methods_off(base)
    cells = [Cell("baseline", "baseline", off, with_overrides(base, off))]
    switch_on = {f"{k.split('.')[0]}.enabled": True for k in spec
                 if k.split(".")[0] in sections and not k.endswith(".enabled")}
    for combo in itertools.product(*spec.values()):
        chosen = dict(zip(spec, combo))
        overrides = {**switch_on, **chosen}  # an explicitly swept .enabled wins
        name = ",".join(f"{short_name(k)}={value_text(v)}" for k, v in chosen.items())
        cells.append(Cell(name, "grid", overrides, with_overrides(base, overrides)))
    if "random" in (controls or []):
        for cell in [c for c in cells if c.kind == "grid"]:
            key = _score_key(cell.config)
            if key is not None:
                overrides = {**cell.overrides, key: "random"}
                cells.append(Cell(f"{cell.name}+random", "control_random", overrides, with_overrides(base, overrides)))
    return cells


def _score_key(cfg: RunConfig) -> str | None:
    """The dotted ``score`` key of the cell's LLM-layer method when it scores (and not by chance
    already): its random control keeps the same tokens' count, chosen by chance."""
    from prunevid_bench.methods import get_method

    for method in (get_method(name) for name in cfg.enabled_methods):
        section = cfg.section(method.section)
        if method.where(section) == "llm_layer" and "random" in method.choices.get("score", ()) and section.score != "random":
            return f"{method.section}.score"
    return None


def method_budget_cells(base: RunConfig, methods: list[str], budgets: list[float]) -> list[Cell]:
    """Matched budgets: the baseline (every method off) and one cell per method and budget, with
    only that method on (or a line's methods, ``methods.lines.register_line``: e.g. ``prunevid``, its
    stages together) and its knob set to keep the fraction B (``budget.budget_overrides``)."""
    from prunevid_bench.budget import budget_overrides
    from prunevid_bench.methods import all_methods
    from prunevid_bench.methods.lines import method_line

    if not budgets:
        raise PruneVidError("--methods needs --budgets B1,B2,... (kept fractions in (0, 1])")
    off = {f"{m.section}.enabled": False for m in all_methods()}
    cells = [Cell("baseline", "baseline", off, with_overrides(base, off))]
    for name in dict.fromkeys(methods):
        line, settings = method_line(name)
        on = {**off, **{f"{m.section}.enabled": True for m in line}, **settings}
        for budget in dict.fromkeys(budgets):
            overrides = {**on, **budget_overrides(with_overrides(base, on), float(budget))}
            cells.append(Cell(f"{name},budget={value_text(budget)}", "method", overrides, with_overrides(base, overrides),
                              method=name, budget=float(budget)))
    return cells


def parse_method_grid(methods: str | None, budgets: str | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``--methods a,b --budgets 0.1,0.5`` -> (names, fractions), each checked."""
    if methods is None:
        if budgets is not None:
            raise PruneVidError("--budgets needs --methods (e.g. --methods prunevid,tome)")
        return (), ()
    from prunevid_bench.methods.lines import method_line

    names = tuple(n.strip() for n in methods.split(",") if n.strip())
    for name in names:
        method_line(name)  # unknown names: did you mean
    try:
        values = tuple(float(b) for b in (budgets or "").split(",") if b.strip())
    except ValueError:
        raise PruneVidError(f"--budgets expects fractions like 0.1,0.25,0.5, got '{budgets}'") from None
    from prunevid_bench.methods import check_budget

    for value in values:
        check_budget(value, "--budgets values")
    return names, values


def frames_controls(base: RunConfig, cells: list[Cell], results: dict[str, Any]) -> list[Cell]:
    """Baseline runs with fewer frames, one per distinct count matching a grid cell's kept tokens
    (``results``: each cell's ``EvalResult`` by name)."""
    baseline = results["baseline"].summary["metrics"]
    if "visual_tokens" not in baseline or "num_frames" not in baseline:
        return []
    frames_now = baseline["num_frames"]["median"]
    per_step = baseline["visual_tokens"]["median"] / max(1.0, frames_now / 2)  # tokens per 2 frames
    wanted: dict[int, list[str]] = {}
    for cell in cells:
        metrics = results[cell.name].summary["metrics"] if cell.name in results else {}
        if cell.kind != "grid" or "visual_tokens_kept" not in metrics:
            continue
        frames = 2 * max(1, round(metrics["visual_tokens_kept"]["median"] / per_step))
        if frames < frames_now:
            wanted.setdefault(frames, []).append(cell.name)
    out = []
    for frames in sorted(wanted):
        overrides = {**methods_off(base), "video.num_frames": frames, "video.fps": None}
        out.append(Cell(f"frames={frames}", "control_frames", overrides, with_overrides(base, overrides), wanted[frames]))
    return out
