"""The `prunevid` command line. Heavy imports live inside command bodies so `--help` is instant.

Every user error is a PruneVidError, printed on one line with a non-zero exit (no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunevid_bench.cli_base import (  # noqa: F401  (moved to cli_base; importable from here as before)
    EXIT_HELP,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    app,
    console,
    emit_json,
    err_console,
    fail,
    finish,
    guarded,
    human_console,
    methods_app,
    presets_app,
    quiet_libraries,
)

# The options run and sweep share are defined once, as groups (cli_options).
from prunevid_bench.cli_options import (
    ConfigFlags,
    DatasetFlags,
    EvalFlags,
    JsonOut,
    LaunchFlags,
    OutputFlags,
    Quiet,
    with_groups,
)
from prunevid_bench.errors import PruneVidError

# `run` options that only mean something with --dataset: refused for one video rather than ignored.
DATASET_ONLY = ("limit", "seed", "sample", "offset", "answer_mode", "baseline", "force", "wait", "video_root", "answers",
                "dataset_format", "feature_cache", "feature_cache_gb", "feature_cache_shared")


def main() -> None:
    """Console-script entry. Commands are wrapped by ``guarded``; this is the last line of defence."""
    try:
        app()
    except PruneVidError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_USAGE) from None


# ---------------------------------------------------------------- run
@app.command(epilog=EXIT_HELP)
@guarded
@with_groups(flags=ConfigFlags, data=DatasetFlags, evaluation=EvalFlags, output=OutputFlags)
def run(
    ctx: typer.Context,
    video: Annotated[Optional[Path], typer.Argument(help="Video file.", show_default=False)] = None,
    question: Annotated[Optional[str], typer.Argument(help="Question about the video.", show_default=False)] = None,
    *,
    flags: ConfigFlags,
    label: Annotated[Optional[str], typer.Option("--label", help="Name for the run folder.", rich_help_panel="Output")] = None,
    messages_file: Annotated[Optional[Path], typer.Option("--messages", help="Qwen chat messages as JSON instead of VIDEO QUESTION: a system prompt, several videos, images, text in any order.", rich_help_panel="Config")] = None,
    options: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="A multiple-choice option (repeatable): the question is asked with lettered choices and the letter is parsed.", rich_help_panel="Config")] = None,
    answer: Annotated[Optional[str], typer.Option("--answer", help="With --option: the right option's letter; the run says whether the model chose it.", rich_help_panel="Config")] = None,
    dataset: Annotated[Optional[Path], typer.Option("--dataset", help="Evaluate a multiple-choice dataset instead of one video.", rich_help_panel="Dataset")] = None,
    data: DatasetFlags,
    evaluation: EvalFlags,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A baseline run folder: report agreement with it.", rich_help_panel="Dataset")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo samples already finished in the run folder (earlier results move to backup-N/).", rich_help_panel="Dataset")] = False,
    output: OutputFlags,
    repeats: Annotated[int, typer.Option("--repeats", help="Timing mode: measure one video N times.", rich_help_panel="Timing")] = 1,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="Discarded warm-up runs: of the video in timing mode (default 0), or the first N questions of --dataset, run untimed and unlogged first (default 1).", rich_help_panel="Timing", show_default=False)] = None,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Keep this fraction (0, 1] of the original visual tokens: the enabled method's own knob is set to reach it (PruneVid: Stage 2's total).", rich_help_panel="Config")] = None,
    match: Annotated[str, typer.Option("--match", help="What --budget matches: tokens (the kept fraction of the visual tokens) | flops (the knob is solved per sample so the prefill FLOPs, vision encoder + LLM, are that fraction of the unreduced run's).", rich_help_panel="Config")] = "tokens",
    save_kept: Annotated[bool, typer.Option("--save-kept", help="The record holds, per method, the (t, h, w) grid coordinates of the tokens it kept and what each merged token stands for.", rich_help_panel="Output")] = False,
    show_kept: Annotated[bool, typer.Option("--show-kept", help="One video: draw kept.png in the run folder, the sampled frames with each method's kept patches outlined and merged groups shaded alike (implies --save-kept).", rich_help_panel="Output")] = False,
) -> None:
    """Run one video and question, or a whole dataset with --dataset."""
    given = [name for name in ctx.params if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")]
    if dataset is None:
        refused = [_flag(ctx, name) for name in DATASET_ONLY if name in given]
        if refused:
            raise PruneVidError(f"{', '.join(refused)} only apply to --dataset; drop them for a single video")
    json_out, preset = output.json_out, flags.preset
    human = human_console(json_out, output.quiet)
    from prunevid_bench.budget import with_budget

    if match == "flops" and budget is None:
        raise PruneVidError("--match flops needs --budget B (the fraction of the baseline's prefill FLOPs)")
    cfg = with_budget(flags.build(), budget, match)
    if save_kept or show_kept:
        cfg.runtime.save_kept = True
    if dataset is not None:
        if show_kept:
            raise PruneVidError("--show-kept draws one video; use --save-kept with --dataset")
        if video is not None or messages_file is not None:
            raise PruneVidError("give either VIDEO QUESTION (or --messages) or --dataset, not both")
        if repeats != 1:
            raise PruneVidError("--repeats times one video; it does not apply to --dataset")
        if options:
            raise PruneVidError("--option is for one video; a dataset brings its own options")
        if answer is not None:
            raise PruneVidError("--answer marks one video's --option answer; a dataset's rows carry their own answers")
        from prunevid_bench.harness.evaluate import evaluate_dataset
        from prunevid_bench.harness.runs import shortfall

        run_options = evaluation.options(preset, label=label, baseline=baseline, force=force,
                                         warmup=1 if warmup is None else warmup)
        result = evaluate_dataset(cfg, data.spec(dataset), run_options, console=human)
        if json_out:
            emit_json({"run_dir": str(result.run_dir), **result.summary})
        from prunevid_bench.harness.shard import Shard

        if Shard.from_env().rank == 0:  # rank 0 speaks for a split run: another rank's exit 3 would stop the launch
            finish(shortfall(result.summary), human)
        return
    messages = None
    if messages_file is not None:
        if video is not None or question is not None:
            raise PruneVidError("give either VIDEO QUESTION or --messages, not both")
        from prunevid_bench.single import read_messages

        messages = read_messages(messages_file, data.allow_outside_root)
    elif video is None or question is None:
        raise PruneVidError("give a VIDEO and a QUESTION (or --messages FILE, or --dataset PATH)")
    import json

    from prunevid_bench.single import run_single

    run_dir = run_single(
        cfg, video, question, options=options or [], answer=answer, preset=preset, results_dir=evaluation.results_dir, label=label,
        repeats=repeats, warmup=warmup or 0, console=human, messages=messages, show_kept=show_kept,
    )
    record = json.loads((run_dir / "result.json").read_text())
    if json_out:
        emit_json({"run_dir": str(run_dir), **record})
    finish([f"1 {record['parse_status']}"] if options and record.get("parse_status") != "parsed" else [], human)


def _flag(ctx: typer.Context, name: str) -> str:
    """The command-line spelling of a parameter (``answer_mode`` -> ``--answer-mode``)."""
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


# ---------------------------------------------------------------- sweep
@app.command(epilog=EXIT_HELP)
@guarded
@with_groups(data=DatasetFlags, evaluation=EvalFlags, output=OutputFlags, flags=ConfigFlags, launching=LaunchFlags)
def sweep(
    params: Annotated[Optional[list[str]], typer.Argument(help="Parameters to sweep, short (tau) or dotted (tome.budget); default: all given values.", show_default=False)] = None,
    values: Annotated[Optional[list[str]], typer.Option("--values", "-v", help="name=v1,v2,... (repeatable), e.g. tau=0.7,0.8,0.9.", rich_help_panel="Sweep")] = None,
    sweep_file: Annotated[Optional[Path], typer.Option("--sweep-file", help="A grid YAML, or a shipped one by name (sweeps/*.yaml; see the README; --values win over it).", rich_help_panel="Sweep")] = None,
    controls: Annotated[Optional[list[str]], typer.Option("--controls", help="random (cells whose LLM-layer method scores, rerun with random scores) | frames (baseline with fewer frames at each cell's kept tokens); repeatable.", rich_help_panel="Sweep")] = None,
    metric: Annotated[str, typer.Option("--metric", help="Plot and Pareto front on: accuracy | agreement (with the baseline cell).", rich_help_panel="Sweep")] = "accuracy",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and their status; run nothing.", rich_help_panel="Sweep")] = False,
    status: Annotated[bool, typer.Option("--status", help="Show each cell's state (new, running, k/n done, done, failed) and job; run nothing.", rich_help_panel="Sweep")] = False,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Matched budgets: methods to compare, e.g. prunevid,tome,evs,vidcom2,fastv (with --budgets); prunevid-vision is PruneVid merging in the vision encoder's space.", rich_help_panel="Sweep")] = None,
    budgets: Annotated[Optional[str], typer.Option("--budgets", help="Kept fractions of the visual tokens for --methods, e.g. 0.1,0.25,0.5.", rich_help_panel="Sweep")] = None,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Every cell keeps this fraction (0, 1] of the visual tokens (as run --budget).", rich_help_panel="Sweep")] = None,
    match: Annotated[str, typer.Option("--match", help="What --budget/--budgets match: tokens (kept fraction) | flops (each cell's knob solved per sample so its prefill FLOPs are that fraction of the baseline's).", rich_help_panel="Sweep")] = "tokens",
    dataset: Annotated[Optional[Path], typer.Option("--dataset", help="The dataset every cell evaluates.", rich_help_panel="Dataset")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo cells already finished (earlier results move to backup-N/).", rich_help_panel="Dataset")] = False,
    warmup: Annotated[int, typer.Option("--warmup", help="Each cell first runs this many questions untimed and unlogged (the cold start is nobody's).", rich_help_panel="Sweep")] = 1,
    interleave: Annotated[bool, typer.Option("--interleave", help="Run question i through every cell back to back on the one loaded model, so each question gives a TTFT ratio measured under the same load (the table's paired speed-up); resumable like a serial sweep.", rich_help_panel="Sweep")] = False,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Tabulate cells whose recorded inputs differ (e.g. resumed under another transformers version) instead of refusing.", rich_help_panel="Sweep")] = False,
    *,
    data: DatasetFlags,
    evaluation: EvalFlags,
    output: OutputFlags,
    flags: ConfigFlags,
    label: Annotated[Optional[str], typer.Option("--label", help="Name for the sweep folder (default: the swept names or the sweep file).", rich_help_panel="Output")] = None,
    launching: LaunchFlags,
) -> None:
    """Sweep parameters over a dataset: a baseline cell plus a grid, each a resumable run.

    Sweeping a method's parameter switches that method on in the grid cells.

    Ends with one table (summary.csv) and pareto.png. Restart the same command to resume.
    """
    if dataset is None:
        raise PruneVidError("a sweep needs --dataset PATH")
    human = human_console(output.json_out, output.quiet)
    from prunevid_bench.budget import with_budget
    from prunevid_bench.harness.sweep import SweepGrid, parse_method_grid, run_sweep

    if budget is not None and methods is not None:
        raise PruneVidError("--budget fixes one budget; with --methods give --budgets instead")
    if match == "flops" and budget is None and budgets is None:
        raise PruneVidError("--match flops needs --budget B, or --methods with --budgets")
    cfg = with_budget(flags.build(), budget, match)
    method_names, budget_values = parse_method_grid(methods, budgets)
    grid = SweepGrid(tuple(params or ()), tuple(values or ()), sweep_file, tuple(controls or ()), metric, dry_run,
                     status=status, methods=method_names, budgets=budget_values)
    sweep_options = evaluation.options(flags.preset, label=label, force=force, warmup=warmup, allow_mixed=allow_mixed,
                                       interleave=interleave)
    result = run_sweep(cfg, data.spec(dataset), grid, sweep_options, console=human, launch=launching.launch())
    if output.json_out:
        cells = [{"name": c.name, "kind": c.kind, "overrides": c.overrides} for c in result.cells]
        emit_json({"sweep_dir": str(result.sweep_dir), "dry_run": dry_run, "cells": cells, "rows": result.rows,
                   "failed": result.failed})
    from prunevid_bench.harness.runs import shortfall

    finish([f"cell {name}: {', '.join(shortfall(summary))}" for name, summary in result.summaries.items()
            if shortfall(summary)] + [f"cell {name} {why}" for name, why in result.failed.items()], human)


# ---------------------------------------------------------------- summarize
@app.command(epilog=EXIT_HELP)
@guarded
def summarize(
    run_dir: Annotated[Path, typer.Argument(help="A dataset run folder (or a sweep cell, or a stream folder).", show_default=False)],
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Summarise a dataset run from every log in its folder: at any time, also while ranks still run."""
    from prunevid_bench.harness.evaluate import summarize_run, summary_table
    from prunevid_bench.harness.runs import shortfall

    human = human_console(json_out, quiet)
    if (run_dir / "questions.jsonl").is_file():  # a stream folder (prunevid stream)
        from prunevid_bench.harness.runs import read_samples
        from prunevid_bench.stream_run import stream_summary

        summary = stream_summary(list(read_samples(run_dir / "questions.jsonl").values()))
        human.print(stream_summary_line(summary), highlight=False, soft_wrap=True)
        if json_out:
            emit_json({"run_dir": str(run_dir), **summary})
        finish([f"{len(summary['skipped'])} skipped"] if summary["skipped"] else [], human)
        return
    summary, _ = summarize_run(run_dir)
    human.print(summary_table(summary, title=run_dir.name))
    if not summary["complete"]:
        human.print(f"{summary['counts']['evaluated']} of {summary['counts']['ready']} questions evaluated so far; "
                    "rerun the run's command to finish it", soft_wrap=True, highlight=False)
    if json_out:
        emit_json({"run_dir": str(run_dir), **summary})
    finish(shortfall(summary), human)


# ---------------------------------------------------------------- stream (cli_stream.py)
from prunevid_bench.cli_stream import stream, stream_summary_line  # noqa: E402,F401  (registers `stream` here, in --help order)


# ---------------------------------------------------------------- compare
@app.command()
@guarded
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders or sweep folders (a sweep expands to its cells).", show_default=False)],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="The run deltas are taken against (default: the first with every stage off).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write compare.csv and compare.md into this folder.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown instead of a rich table.")] = False,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", "--allow-mismatch", help="Compare runs on different questions or inputs (model, weights, dtype, device, attention, video policy, pixels, frames, prompt, transformers) anyway; the differing fields are shown as columns marked ≠.")] = False,
    by_type: Annotated[bool, typer.Option("--by-type", help="Also a table of accuracy per question type, one column per run; * marks a Wilson 95% interval apart from the base run's (--out adds compare_by_type.csv).")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """One table across saved runs: tokens per stage, TTFT, decode speed, memory, KV, accuracy, deltas."""
    from prunevid_bench.harness.compare import compare_runs

    result = compare_runs(runs, baseline=baseline, out=out, markdown=markdown, allow_mixed=allow_mixed,
                          by_type=by_type, console=human_console(json_out, quiet))
    if json_out:
        emit_json(result)


# ---------------------------------------------------------------- presets, methods, toy data (cli_catalog.py)
from prunevid_bench.cli_catalog import export_toy, methods, methods_show, presets, presets_show, toy_data  # noqa: E402,F401


# ---------------------------------------------------------------- reproduce (cli_reproduce.py)
from prunevid_bench.cli_reproduce import reproduce  # noqa: E402,F401


# ---------------------------------------------------------------- verify (prunevid_bench.verify.command)
from prunevid_bench.verify.command import register as _register_verify  # noqa: E402

_register_verify(app, guarded)


if __name__ == "__main__":
    main()
