"""The `prunevid` command line. Heavy imports live inside command bodies so `--help` is instant.

Every user error is a PruneVidError, printed on one line with a non-zero exit (no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

# The options run and sweep share are defined once, as groups (cli_options).
from prunevid_bench.cli_options import (
    AllowOutsideRoot,
    AnswerMode,
    Attn,
    ConfigFile,
    ConfigFlags,
    DatasetFlags,
    Device,
    Dtype,
    EvalFlags,
    JsonOut,
    LaunchFlags,
    MaxFrames,
    MaxNew,
    MaxPixels,
    Model,
    NumFrames,
    OutputFlags,
    Preset,
    Quiet,
    ResultsDir,
    Sets,
    Threads,
    collect_overrides,
    with_groups,
)
from prunevid_bench.errors import PruneVidError, describe_os_error

# Exit codes, for scripts: named in --help (EXIT_HELP) and returned by run, sweep and compare.
EXIT_OK = 0  # every selected sample produced a parsed answer
EXIT_USAGE = 2  # a usage or input error: nothing was run (or a run stopped on an error it names)
EXIT_INCOMPLETE = 3  # the run finished, but some samples were skipped, errored or gave no parsed answer
EXIT_INTERRUPTED = 130
EXIT_HELP = (
    "Exit codes: 0 every selected sample gave a parsed answer; 3 finished, but samples were skipped, "
    "errored, unparsed or not evaluated (a rank died; summarize of an unfinished run); 2 usage or input error; 130 interrupted (rerun to resume)."
)

app = typer.Typer(
    name="prunevid",
    help="Benchmark PruneVid's visual-token reduction on Qwen2.5-VL: tokens, TTFT, memory, accuracy.",
    epilog=EXIT_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
presets_app = typer.Typer(help="List presets, or show one resolved.", invoke_without_command=True)
app.add_typer(presets_app, name="presets")
methods_app = typer.Typer(help="List the token-reduction methods, or show one's keys.", invoke_without_command=True)
app.add_typer(methods_app, name="methods")
console = Console()
err_console = Console(stderr=True)

# `run` options that only mean something with --dataset: refused for one video rather than ignored.
DATASET_ONLY = ("limit", "seed", "sample", "offset", "answer_mode", "baseline", "force", "wait", "video_root", "answers",
                "dataset_format", "feature_cache", "feature_cache_gb", "feature_cache_shared")


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    from prunevid_bench.terminal import printable

    # Messages quote ids, paths and texts from data files: escapes and markup stay inert.
    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry. Commands are wrapped by ``guarded``; this is the last line of defence."""
    try:
        app()
    except PruneVidError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_USAGE) from None


def _version(value: bool) -> None:
    if value:
        from prunevid_bench import __version__

        typer.echo(f"prunevid-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Benchmark PruneVid's visual-token reduction on Qwen2.5-VL: tokens, TTFT, memory, accuracy."""


def quiet_libraries() -> None:
    """-q: transformers' and the Hub's progress bars ("Loading weights") and info messages too."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub when imported
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    import sys

    if "transformers" in sys.modules:  # already imported (in-process callers): switch them off now
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging

        disable_progress_bars()
        logging.disable_progress_bar()
        logging.set_verbosity_error()


def human_console(json_out: bool, quiet: bool) -> Console:
    """Where a command's text for people goes: stdout, stderr when stdout carries --json, or nowhere."""
    if quiet:
        quiet_libraries()
        return Console(quiet=True)
    return Console(stderr=True) if json_out else console


def emit_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


def finish(problems: list[str], human: Console) -> None:
    """Exit 3 when some selected samples got no parsed answer, saying why on stderr."""
    if problems:
        if not human.quiet:
            err_console.print(f"[yellow]incomplete:[/] {', '.join(problems)} (exit code {EXIT_INCOMPLETE})",
                              highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INCOMPLETE)


def guarded(fn):
    """Wrap a command so PruneVidError becomes a one-line error also under CliRunner."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PruneVidError as exc:
            fail(str(exc))
        except OSError as exc:  # a full or read-only disk: one line; other OSErrors are bugs
            message = describe_os_error(exc)
            if message is None:
                raise
            fail(message)
        except KeyboardInterrupt:
            fail("interrupted; finished samples are saved: rerun the same command to resume", EXIT_INTERRUPTED)

    return wrapper


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

    cfg = with_budget(flags.build(), budget)
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
    params: Annotated[Optional[list[str]], typer.Argument(help="Parameters to sweep, short (tau) or dotted (stage1.tau); default: all given values.", show_default=False)] = None,
    values: Annotated[Optional[list[str]], typer.Option("--values", "-v", help="name=v1,v2,... (repeatable), e.g. tau=0.7,0.8,0.9.", rich_help_panel="Sweep")] = None,
    sweep_file: Annotated[Optional[Path], typer.Option("--sweep-file", help="A grid YAML, or a shipped one by name: stage1, stage2 (sweeps/*.yaml; --values win over it).", rich_help_panel="Sweep")] = None,
    controls: Annotated[Optional[list[str]], typer.Option("--controls", help="random (Stage-2 cells rerun with random scores) | frames (baseline with fewer frames at each cell's kept tokens); repeatable.", rich_help_panel="Sweep")] = None,
    metric: Annotated[str, typer.Option("--metric", help="Plot and Pareto front on: accuracy | agreement (with the baseline cell).", rich_help_panel="Sweep")] = "accuracy",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and their status; run nothing.", rich_help_panel="Sweep")] = False,
    status: Annotated[bool, typer.Option("--status", help="Show each cell's state (new, running, k/n done, done, failed) and job; run nothing.", rich_help_panel="Sweep")] = False,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Matched budgets: methods to compare, e.g. prunevid,tome,evs,vidcom2,fastv (with --budgets); prunevid-vision is PruneVid with stage1.space=vision.", rich_help_panel="Sweep")] = None,
    budgets: Annotated[Optional[str], typer.Option("--budgets", help="Kept fractions of the visual tokens for --methods, e.g. 0.1,0.25,0.5.", rich_help_panel="Sweep")] = None,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Every cell keeps this fraction (0, 1] of the visual tokens (as run --budget).", rich_help_panel="Sweep")] = None,
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

    Sweeping a Stage-1 parameter switches Stage 1 on in the grid cells (a Stage-2 parameter, Stage 2).

    Ends with one table (summary.csv) and pareto.png. Restart the same command to resume.
    """
    if dataset is None:
        raise PruneVidError("a sweep needs --dataset PATH")
    human = human_console(output.json_out, output.quiet)
    from prunevid_bench.budget import with_budget
    from prunevid_bench.harness.sweep import SweepGrid, parse_method_grid, run_sweep

    if budget is not None and methods is not None:
        raise PruneVidError("--budget fixes one budget; with --methods give --budgets instead")
    cfg = with_budget(flags.build(), budget)
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


# ---------------------------------------------------------------- stream
@app.command(epilog=EXIT_HELP)
@guarded
def stream(
    video: Annotated[Optional[Path], typer.Argument(help="Video file, played chunk by chunk.", show_default=False)] = None,
    asks: Annotated[Optional[list[str]], typer.Option("--ask", "-a", help="SECONDS:QUESTION, asked once every chunk complete by then is cached (repeatable).", rich_help_panel="Stream")] = None,
    options: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="A multiple-choice option (repeatable) for every --ask; the letter is parsed (or see --answer-mode).", rich_help_panel="Stream")] = None,
    chunk_frames: Annotated[int, typer.Option("--chunk-frames", help="Frames per chunk (a multiple of 2, the temporal patch).", rich_help_panel="Stream")] = 4,
    cache_tokens: Annotated[Optional[int], typer.Option("--cache-tokens", help="Keep at most N visual tokens cached, evicting those most like the previous step (question-agnostic).", rich_help_panel="Stream")] = None,
    old_budget: Annotated[Optional[str], typer.Option("--budget", hidden=True)] = None,
    compare_offline: Annotated[bool, typer.Option("--compare-offline", help="Also answer each question offline on the frames seen so far; record agreement and the TTFT ratio.", rich_help_panel="Stream")] = False,
    dataset: Annotated[Optional[Path], typer.Option("--dataset", help="JSONL of timed questions: video, time, question, options, answer (several per video).", rich_help_panel="Dataset")] = None,
    allow_outside_root: AllowOutsideRoot = False,
    answer_mode: AnswerMode = "generate",
    preset: Preset = None,
    config: ConfigFile = None,
    sets: Sets = None,
    model: Model = None,
    dtype: Dtype = None,
    device: Device = None,
    attn_implementation: Attn = None,
    num_frames: NumFrames = None,
    fps: Annotated[Optional[float], typer.Option("--fps", help="Sampling rate of the stream (default 2; --num-frames samples that many instead).", rich_help_panel="Video")] = None,
    max_frames: MaxFrames = None,
    max_pixels: MaxPixels = None,
    max_new_tokens: MaxNew = None,
    threads: Threads = None,
    results_dir: ResultsDir = Path("results"),
    label: Annotated[Optional[str], typer.Option("--label", help="Name for the run folder; rerun with the same one to resume.", rich_help_panel="Output")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start the run folder over (earlier results move to backup-N/).", rich_help_panel="Output")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="If another process holds the run folder, wait for it instead of stopping.", rich_help_panel="Output")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Play a video as a stream: chunks are appended to a live KV cache and each question is
    answered from it at its time, without re-encoding. The preset's visual-token methods (PruneVid
    Stage 1, ToMe, EVS, VidCom2) act on each chunk as it arrives; PruneVid Stage 2 evicts cached
    visual tokens for each answer by the question's layer-K scores; anything else is refused."""
    from prunevid_bench.config import build_config
    from prunevid_bench.stream_run import TimedQuestion, parse_ask, read_stream_dataset, run_stream

    human = human_console(json_out, quiet)
    if old_budget is not None:
        raise PruneVidError("stream --budget is now --cache-tokens N (a cap on the visual tokens cached); "
                            "--budget means a kept fraction in run and sweep")
    if fps is None and num_frames is None:
        fps = 2.0
    overrides = collect_overrides(sets, model, dtype, device, attn_implementation, num_frames, fps, max_frames, max_pixels, max_new_tokens,
                                  threads)
    cfg = build_config(preset, config, overrides)
    if dataset is not None:
        if video is not None or asks or options:
            raise PruneVidError("give either VIDEO with --ask, or --dataset, not both")
        videos = read_stream_dataset(dataset, allow_outside_root)
        source = str(dataset)
        default_label = f"stream-{dataset.stem}"
    else:
        if video is None or not asks:
            raise PruneVidError("give a VIDEO and at least one --ask SECONDS:QUESTION (or --dataset FILE)")
        if options is not None and len(options) < 2:
            raise PruneVidError("give at least 2 --option values")
        questions = [TimedQuestion(f"q{i}", *parse_ask(text), options=list(options or [])) for i, text in enumerate(asks)]
        videos = {str(video): questions}
        source = str(video)
        default_label = f"stream-{video.stem}"
    run_dir, summary = run_stream(cfg, videos, chunk_frames=chunk_frames, cache_tokens=cache_tokens, compare_offline=compare_offline,
                                  preset=preset, results_dir=results_dir, label=label or default_label, source=source,
                                  answer_mode=answer_mode, force=force, wait=wait, console=human)
    human.print(stream_summary_line(summary), highlight=False, soft_wrap=True)
    if json_out:
        emit_json({"run_dir": str(run_dir), **summary})
    finish([f"{len(summary['skipped'])} skipped"] if summary.get("skipped") else [], human)


def stream_summary_line(summary: dict) -> str:
    """A stream's accuracy and its offline comparison, as its summary.json has them."""
    from prunevid_bench.harness.answers import wilson_interval

    parts = [f"{summary['questions']} questions answered"]
    if summary.get("scored"):
        low, high = wilson_interval(summary["correct"], summary["scored"])
        parts.append(f"accuracy {100 * summary['accuracy']:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%] "
                     f"({summary['correct']}/{summary['scored']})")
    if "offline_agreement" in summary:
        ratio = summary.get("offline_over_stream_ttft_median")
        parts.append(f"offline agreement {100 * summary['offline_agreement']:.1f}%"
                     + (f", offline/stream TTFT median {ratio:.2f}×" if ratio else ""))
    if summary.get("skipped"):
        parts.append(f"{len(summary['skipped'])} skipped")
    return "; ".join(parts)


# ---------------------------------------------------------------- compare
@app.command()
@guarded
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders or sweep folders (a sweep expands to its cells).", show_default=False)],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="The run deltas are taken against (default: the first with every stage off).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write compare.csv and compare.md into this folder.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown instead of a rich table.")] = False,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", "--allow-mismatch", help="Compare runs on different questions or inputs (model, weights, dtype, device, attention, video policy, pixels, frames, prompt, transformers) anyway; the differing fields are shown as columns marked ≠.")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """One table across saved runs: tokens per stage, TTFT, decode speed, memory, KV, accuracy, deltas."""
    from prunevid_bench.harness.compare import compare_runs

    rows = compare_runs(runs, baseline=baseline, out=out, markdown=markdown, allow_mixed=allow_mixed,
                        console=human_console(json_out, quiet))
    if json_out:
        emit_json({"runs": rows})


# ---------------------------------------------------------------- presets
@presets_app.callback()
@guarded
def presets(ctx: typer.Context) -> None:
    """List the presets with one line each: the method sections each switches on."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from prunevid_bench.config import build_config, load_yaml, preset_names, preset_path
    from prunevid_bench.methods import get_method

    table = Table(title="Presets", show_lines=False)
    for col in ("name", "methods on", "description"):
        table.add_column(col)
    for name in preset_names():
        sections = [get_method(m).section for m in build_config(name).enabled_methods]  # what --set names
        table.add_row(name, ", ".join(sections) or "none", str(load_yaml(preset_path(name)).get("description", "")))
    console.print(table)


@presets_app.command("show")
@guarded
def presets_show(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Print a preset's fully resolved config (defaults filled in) as YAML."""
    import yaml

    from prunevid_bench.config import build_config

    cfg = build_config(name)
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), highlight=False, end="")


# ---------------------------------------------------------------- methods
@methods_app.callback()
@guarded
def methods(ctx: typer.Context) -> None:
    """List the registered token-reduction methods, one line each: where it acts, its section and keys."""
    if ctx.invoked_subcommand is not None:
        return
    from prunevid_bench.methods import all_methods

    for m in all_methods():
        keys = ", ".join(k for k, *_ in m.keys())
        console.print(f"{m.name} [{'|'.join(m.places())}] {m.section}: {keys} - {m.summary}", highlight=False, markup=False, soft_wrap=True)



@methods_app.command("show")
@guarded
def methods_show(name: Annotated[str, typer.Argument(help="Method name (see `prunevid methods`).")]) -> None:
    """A method's keys with their types, defaults and allowed values; set them as SECTION.KEY."""
    from prunevid_bench.methods import get_method

    m = get_method(name)
    console.print(f"{m.name} ({'|'.join(m.places())}): {m.summary}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"section: {m.section} (e.g. --set {m.section}.enabled=true)", highlight=False, markup=False)
    for key, kind, default, allowed in m.keys():
        extra = f"  {allowed}" if allowed else ""
        console.print(f"  {m.section}.{key}: {kind} = {default!r}{extra}", highlight=False, markup=False, soft_wrap=True)
    if m.record_fields:
        console.print(f"record fields: {', '.join(m.record_fields)}", highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------- verify (prunevid_bench.verify.command)
from prunevid_bench.verify.command import register as _register_verify  # noqa: E402

_register_verify(app, guarded)


# ---------------------------------------------------------------- toy data
@app.command("toy-data")
@guarded
def toy_data(
    out: Annotated[Path, typer.Option("--out", help="Output folder (videos/ and data.jsonl).")],
    n: Annotated[int, typer.Option("--n", help="Number of questions.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (the toy model trained on seeds >= 1000).")] = 7,
) -> None:
    """Write synthetic toy-world videos and multiple-choice questions (our JSONL format)."""
    from prunevid_bench.toy.world import generate_dataset

    path = generate_dataset(out, n, seed)
    console.print(f"wrote {n} questions to {path}")


@app.command("export-toy")
@guarded
def export_toy(
    out: Annotated[Path, typer.Argument(help="New folder for the checkpoint.", show_default=False)],
) -> None:
    """Write the built-in toy model as a standard checkpoint folder (weights, config, tokenizer, processor)."""
    from prunevid_bench.toy.export import export_toy as write

    path = write(out)
    console.print(f"wrote the toy checkpoint to {path}; prunevid loads it with the toy's own video policy "
                  f"(processor: the frames the toy was trained on), as {path}/prunevid.json says; another tool "
                  "must sample the frames that way too, not Qwen's (which gives ~9x the tokens and random answers)",
                  soft_wrap=True, highlight=False)


if __name__ == "__main__":
    main()
