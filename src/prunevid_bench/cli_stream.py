"""`prunevid stream`: a video played chunk by chunk into a live KV cache (moved from cli.py).

Registered on cli_base's ``app``; heavy imports live inside the command body;
prunevid_bench.cli imports it where its commands belong in --help."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunevid_bench.cli_base import EXIT_HELP, app, emit_json, finish, guarded, human_console
from prunevid_bench.cli_options import (
    AllowOutsideRoot,
    AnswerMode,
    Attn,
    ConfigFile,
    Device,
    Dtype,
    JsonOut,
    MaxFrames,
    MaxNew,
    MaxPixels,
    Model,
    NumFrames,
    Preset,
    Quiet,
    ResultsDir,
    Sets,
    Threads,
    collect_overrides,
)
from prunevid_bench.errors import PruneVidError


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

