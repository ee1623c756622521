"""``prunevid compare``: one table across saved runs, with deltas against a baseline run.

Accepts dataset run folders, single-video run folders and sweep folders (a sweep expands to its
cells, in its own order). The baseline is ``--baseline`` or else the first run with every stage
off. Runs must share the same questions and inputs (``harness.inputs``: model and weights, family,
dtype, device, attention, video policy, pixel budgets, frames, prompt template, transformers), or
the numbers are not comparable; that is refused, naming the fields, unless ``--allow-mixed``, which
shows each differing field as a column marked ≠. A sweep's frames controls change the frame count
on purpose and are exempt from the frame check.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rich.console import Console

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.answers import accuracy_summary, agreement, paired_difference, paired_short, paired_text
from prunevid_bench.harness.evaluate import fmt_pct
from prunevid_bench.harness.inputs import check_same_inputs, identity, model_text
from prunevid_bench.harness.runs import SavedRun, load_run
from prunevid_bench.harness.tables import Column, FittedTable
from prunevid_bench.report import read_json
from prunevid_bench.single import fmt_seconds, human_bytes, layer_text

ALLOW = "pass --allow-mixed to compare anyway"


def expand(paths: list[Path]) -> list[SavedRun]:
    """Run folders as given; a sweep folder becomes its finished cells."""
    runs: list[SavedRun] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise PruneVidError(f"not a folder: {path}")
        sweep_file = path / "sweep.json"
        if sweep_file.is_file():
            cells = read_json(sweep_file, "rerun the sweep's command to rewrite it", ("cells",))["cells"]
            found = [path / c["folder"] for c in cells if (path / c["folder"] / "summary.json").is_file()]
            if not found:
                raise PruneVidError(f"sweep {path} has no finished cell yet; rerun its command")
            runs += [load_run(p) for p in found]
        else:
            runs.append(load_run(path))
    if not runs:
        raise PruneVidError("give at least one run or sweep folder")
    return runs


def stages_text(cfg: dict[str, Any], pruning_layer: int | str | None = None) -> str:
    """The methods' settings in a few words, in config order, each as its method names them
    (``Method.describe``). The layer is the one the run actually pruned at (``pruning_layer``),
    with the configured relative depth beside it when it was one: ``L=1 (10/28)``."""
    from prunevid_bench.methods import describe_settings, method_for_section

    parts = []
    for section, values in cfg.items():
        if section in NOT_METHODS or not isinstance(values, dict) or not values.get("enabled"):
            continue
        layer = layer_text(pruning_layer, values["pruning_layer"]) if "pruning_layer" in values else ""
        method = method_for_section(section)  # None: a plug-in this install lacks, named by its section
        parts.append(method.describe(values, layer) if method else describe_settings(section, values, layer))
    return " + ".join(parts) or "off"


NOT_METHODS = ("model", "video", "generation")


def question_set(run: SavedRun) -> frozenset[str]:
    ids = run.meta.get("sample_ids")
    return frozenset(ids) if ids is not None else run.question_ids


def check_comparable(runs: list[SavedRun], reference: SavedRun, allow_mixed: bool = False) -> list[str]:
    """Refuse runs whose questions or inputs differ from the reference's (``allow_mixed``: return
    the differing input fields instead, for the table to mark)."""
    ref_q = question_set(reference)
    for run in runs:
        q = question_set(run)
        if q != ref_q and not allow_mixed:
            raise PruneVidError(
                f"{run.name} asked different questions than {reference.name} ({len(q)} vs {len(ref_q)}, "
                f"{len(q & ref_q)} shared); {ALLOW}"
            )
    return check_same_inputs(runs, reference, allow_mixed)


def answered(run: SavedRun) -> list[dict[str, Any]]:
    """The run's answered questions: a dataset run's rows, or a single-video run's one record when
    it was asked with ``--option`` (scored too when ``--answer`` was given)."""
    if run.result is None:
        return list(run.records.values())
    if "prediction" not in run.result:
        return []
    (question,) = run.question_ids
    return [{**run.result, "id": question}]


def run_accuracy(run: SavedRun) -> dict[str, Any] | None:
    if run.summary is not None:
        return run.summary.get("accuracy")
    if run.result is not None and "correct" in run.result:
        return accuracy_summary(answered(run))  # one question: 0% or 100%, with its (wide) Wilson interval
    return None


def compare_rows(runs: list[SavedRun], reference: SavedRun | None) -> list[dict[str, Any]]:
    """One flat row per run; deltas and agreement against ``reference`` (None: left empty)."""
    rows = []
    for run in runs:
        acc = run_accuracy(run)
        tokens_in = run.metric("visual_tokens")
        kept = run.metric("visual_tokens_kept")
        row: dict[str, Any] = {
            "run": run.name,
            "path": str(run.path),
            **identity(run),  # model, weights, ..., transformers: what the model saw and how it ran
            "stages": stages_text(run.config, run.pruning_layer),
            "n": acc["n"] if acc else 1,
            "tokens_in": tokens_in,
            "tokens_after_visual_methods": run.metric("tokens_after_visual_methods"),
            "visual_tokens_kept": kept,
            "compression": (kept / tokens_in) if kept is not None and tokens_in else None,
            "flops_fraction": run.metric("prefill_flops_fraction") or _fraction(run.metric("ideal_speedup")),
            "tokens_per_layer": run.metric("visual_tokens_per_layer"),
            "llm_prefill_tokens": run.metric("llm_prefill_tokens"),
            "ttft_s": run.metric("ttft_s"),
            "ideal_speedup": run.metric("ideal_speedup"),  # analytic (FLOPs), beside the measured ttft_speedup
            "decode_tokens_per_s": run.metric("decode_tokens_per_s"),
            "peak_memory_bytes": run.metric("peak_memory_bytes"),
            "kv_cache_bytes": run.metric("kv_cache_bytes"),
            "accuracy": acc["accuracy"] if acc else None,
            "ci_low": acc["ci_low"] if acc else None,
            "ci_high": acc["ci_high"] if acc else None,
            "unparsed": acc["unparsed"] if acc else None,
            "is_baseline": run is reference,
        }
        row.update(_deltas(run, reference, row))
        rows.append(row)
    return rows


def _deltas(run: SavedRun, reference: SavedRun | None, row: dict[str, Any]) -> dict[str, Any]:
    out = {"delta_accuracy": None, "ttft_speedup": None, "kv_ratio": None, "agreement": None,
           "paired_n": None, "paired_difference": None, "paired_ci_low": None, "paired_ci_high": None,
           "mcnemar_p": None, "gained": None, "lost": None}
    if reference is None:
        return out
    ref_acc = run_accuracy(reference)
    if row["accuracy"] is not None and ref_acc:
        out["delta_accuracy"] = row["accuracy"] - ref_acc["accuracy"]
    ref_ttft, ref_kv = reference.metric("ttft_s"), reference.metric("kv_cache_bytes")
    if row["ttft_s"] and ref_ttft:
        out["ttft_speedup"] = ref_ttft / row["ttft_s"]
    if row["kv_cache_bytes"] and ref_kv:
        out["kv_ratio"] = row["kv_cache_bytes"] / ref_kv
    mine, theirs = answered(run), answered(reference)
    if mine and theirs and all("prediction" in r for r in mine + theirs):  # lmms-eval records: it scores them
        out["agreement"] = agreement(mine, theirs)["agreement"]
        if all("correct" in r for r in mine + theirs):  # scored: the paired test over the shared questions
            paired = paired_difference(mine, theirs)
            out.update(paired_n=paired["n"], paired_difference=paired["difference"], paired_ci_low=paired["ci_low"],
                       paired_ci_high=paired["ci_high"], mcnemar_p=paired["p"], gained=paired["gained"],
                       lost=paired["lost"])
    return out


def _paired(r: dict[str, Any]) -> dict[str, Any] | None:
    if r.get("paired_n") is None:
        return None
    return {"n": r["paired_n"], "difference": r["paired_difference"], "ci_low": r["paired_ci_low"],
            "ci_high": r["paired_ci_high"], "p": r["mcnemar_p"]}


def _paired_short(r: dict[str, Any]) -> str:
    return paired_short(r["paired_difference"], r["mcnemar_p"])


# ---------------------------------------------------------------------------------------------
# Output

TOKEN_PLACES = ("tokens_in", "tokens_after_visual_methods", "visual_tokens_kept")  # in the prompt, entering the LLM, kept
COLUMNS = (  # header, formatter of a row
    ("run", lambda r: r["run"] + (" (base)" if r["is_baseline"] and r["run"] != "baseline" else "")),
    ("stages", lambda r: r["stages"]),
    ("model", lambda r: model_text(r["model"])),
    ("n", lambda r: str(r["n"])),
    ("tokens in → LLM → kept", lambda r: " → ".join(_num(r[k]) for k in TOKEN_PLACES)),
    ("kept", lambda r: fmt_pct(r["compression"])),
    ("TTFT (median)", lambda r: fmt_seconds(r["ttft_s"])),
    ("decode tok/s", lambda r: _num(r["decode_tokens_per_s"], 1)),
    ("peak memory", lambda r: human_bytes(r["peak_memory_bytes"])),
    ("KV cache", lambda r: human_bytes(r["kv_cache_bytes"])),
    ("accuracy [95% CI]", lambda r: "-" if r["accuracy"] is None else f"{fmt_pct(r['accuracy'])} [{fmt_pct(r['ci_low'])}, {fmt_pct(r['ci_high'])}]"),
    ("Δ accuracy", lambda r: "-" if r["delta_accuracy"] is None else f"{100 * r['delta_accuracy']:+.1f} pt"),
    ("paired Δ [95% CI] McNemar p", lambda r: paired_text(_paired(r))),
    ("TTFT speed-up", lambda r: "-" if r["ttft_speedup"] is None else f"{r['ttft_speedup']:.2f}×"),
    ("KV vs base", lambda r: fmt_pct(r["kv_ratio"])),
    ("agreement", lambda r: fmt_pct(r["agreement"])),
    # what the run paid (analytic): last, so the tables written before keep their columns
    ("prefill FLOPs vs base", lambda r: fmt_pct(r.get("flops_fraction"))),
    ("visual tokens per layer", lambda r: _num(r.get("tokens_per_layer"), 1)),
)


def _num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if digits or not float(x).is_integer() else f"{x:.0f}"


def _fraction(speedup: float | None) -> float | None:
    """A run folder from before the FLOPs fraction was recorded: the inverse of its ideal speed-up."""
    return 1 / speedup if speedup else None


def _ci_text(r: dict[str, Any]) -> str:
    if r["accuracy"] is None:
        return "-"
    return f"{100 * r['accuracy']:.1f} ({100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f})"


FORMAT = dict(COLUMNS)  # header -> formatter

# The console table: the Markdown columns under short names, fitted to the terminal (dropped from
# the highest rank up, the caption says which); --markdown and --out keep every column.
CONSOLE_COLUMNS = (
    Column("run", FORMAT["run"], rank=0, fold=True, justify="left", word_cap=16),  # folder names fold
    Column("model", FORMAT["model"], rank=0, fold=True, justify="left", word_cap=12),
    Column("acc % (CI)", _ci_text, rank=0, note="acc: accuracy, 95% CI"),
    Column("kept", FORMAT["kept"], rank=1, note="kept: visual tokens left after every method"),
    Column("FLOPs", FORMAT["prefill FLOPs vs base"], rank=1,
           note="FLOPs: prefill FLOPs (vision encoder + LLM, analytic) over the unreduced run's: what it paid"),
    Column("tok/L", FORMAT["visual tokens per layer"], rank=3, note="tok/L: visual tokens per LLM layer (mean)"),
    Column("TTFT", FORMAT["TTFT (median)"], rank=2, note="TTFT: median"),
    Column("Δacc (p)", _paired_short, rank=1,
           note="Δacc: paired accuracy difference in points on the shared questions, p: exact McNemar"),
    Column("speed-up", FORMAT["TTFT speed-up"], rank=2, note="Δ and speed-up: against the base run (TTFT medians)"),
    Column("in→LLM→kept", lambda r: "→".join(_num(r[k]) for k in TOKEN_PLACES), rank=4),
    Column("agree", FORMAT["agreement"], rank=5, note="agree: same choice as the base run"),
    Column("stages", FORMAT["stages"], rank=6, fold=True, justify="left"),
    Column("KV/base", FORMAT["KV vs base"], rank=7),
    Column("KV", FORMAT["KV cache"], rank=8),
    Column("n", FORMAT["n"], rank=9),
    Column("dec tok/s", FORMAT["decode tok/s"], rank=10),
    Column("peak mem", FORMAT["peak memory"], rank=11),
)


def mixed_columns(mixed: list[str]) -> list[tuple[str, Any]]:
    """(header, formatter) of each input field that differs between the runs (``--allow-mixed``)."""
    return [(f"{label}≠", lambda r, label=label: "-" if r[label] is None else str(r[label])) for label in mixed]


def rich_table(rows: list[dict[str, Any]], mixed: list[str] = ()) -> FittedTable:
    """The comparison for the console, laid out for the width it is printed at."""
    columns = list(CONSOLE_COLUMNS)
    for k, (header, fmt) in enumerate(mixed_columns(list(mixed))):
        note = "≠: differs between these runs (--allow-mixed): the comparison is not like for like" if k == 0 else ""
        columns.insert(2 + k, Column(header, fmt, rank=1, fold=True, justify="left", word_cap=14, note=note))
    return FittedTable(columns, rows, title="Comparison",
                       full_table="every column: --markdown, or --out DIR for compare.csv")


def markdown_table(rows: list[dict[str, Any]], mixed: list[str] = ()) -> str:
    columns = [*COLUMNS[:3], *mixed_columns(list(mixed)), *COLUMNS[3:]]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" if h in ("run", "stages", "model") or h.endswith("≠") else "---:" for h, _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row).replace("|", "\\|") for _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict[str, Any]], out: Path, mixed: list[str] = ()) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "compare.csv", out / "compare.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, mixed))
    return csv_path, md_path


def compare_runs(
    paths: list[Path],
    *,
    baseline: Path | None = None,
    out: Path | None = None,
    markdown: bool = False,
    allow_mixed: bool = False,
    by_type: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """The comparison ``{"runs": rows}`` (and ``"by_type"``: its long rows, with ``by_type``),
    printed to ``console`` and written under ``out``."""
    console = console or Console()
    runs = expand(paths)
    reference = None
    if baseline is not None:
        wanted = Path(baseline).resolve()
        reference = next((r for r in runs if r.path.resolve() == wanted), None)
        if reference is None:
            reference = load_run(Path(baseline))
            runs.insert(0, reference)
    else:
        reference = next((r for r in runs if r.stages_off), None)
    mixed = check_comparable(runs, reference or runs[0], allow_mixed)
    rows = compare_rows(runs, reference)
    for row in rows:
        row["differs_in"] = ";".join(mixed)
    if markdown:
        console.print(markdown_table(rows, mixed), end="", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(rich_table(rows, mixed))
    if reference is None:
        console.print("no run with every stage off and no --baseline: deltas are left empty")
    view = None
    if by_type:  # harness.compare_by_type: accuracy per question type, one column per run
        from prunevid_bench.harness.compare_by_type import by_type as by_type_view

        view = by_type_view(runs, [FORMAT["run"](row) for row in rows], reference)
        if markdown:
            console.print("\n" + view.markdown(), end="", markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(view)
    if out is not None:
        csv_path, md_path = write_outputs(rows, Path(out), mixed)
        console.print(f"wrote {csv_path} and {md_path}")
        if view is not None:
            from prunevid_bench.harness.compare_by_type import write_csv

            console.print(f"wrote {write_csv(view, Path(out))}")
    return {"runs": rows, **({"by_type": view.long_rows()} if view is not None else {})}
