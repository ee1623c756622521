"""``prunevid reproduce --list`` and ``--dry-run``: the tables, and what a reproduction would run
and need (weights, data files, GPU hours) without loading a model.

The GPU-hour figure is an estimate from the analytic FLOPs model (``flops.py``): every question
is taken as a 1280x720 video under the table's input setting (the policy's frames and pixel
bounds), with ``TEXT_TOKENS`` of question, options and template; a cell at budget B is counted as
if B of the visual tokens entered the first LLM layer (a method that keeps every token in its
early layers costs more); decoding is left out. FLOPs become seconds at ``ASSUMED_FLOPS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from prunevid_bench.harness.published import load_table, recorded_model_config, table_names
from prunevid_bench.harness.reproduce import Plan, unavailable_lines
from prunevid_bench.harness.tables import Column, FittedTable

# An H100 SXM's dense bf16 peak is 989 TFLOP/s; a batch-1 video prefill sustains well under it.
# We assume 40% of it: the estimate's one free constant, printed with every estimate.
ASSUMED_FLOPS = 0.4 * 989e12
ASSUMED_GPU = "an H100 at 40% of its 989 TFLOP/s bf16 peak"
NOMINAL_VIDEO = (720, 1280)  # height, width
TEXT_TOKENS = 100


def list_tables(console: Console) -> list[dict[str, Any]]:
    rows = []
    for name in table_names():
        table = load_table(name)
        rows.append({"name": name, "model": table.model, "benchmarks": ", ".join(b.short for b in table.benchmarks),
                     "rows": str(len(table.rows)), "source": table.source["cite"]})
    columns = [Column("name", lambda r: r["name"], justify="left", fold=True),
               Column("model", lambda r: r["model"], justify="left", fold=True),
               Column("benchmarks", lambda r: r["benchmarks"], justify="left", fold=True),
               Column("rows", lambda r: r["rows"]),
               Column("source", lambda r: r["source"], justify="left", fold=True, rank=1)]
    console.print(FittedTable(columns, rows, title="Published tables (prunevid reproduce NAME)"))
    return rows


def model_config(name: str) -> tuple[Any | None, str]:
    """(the model's transformers config, where it came from) without loading weights where possible."""
    from prunevid_bench.models.loading import BUILTIN

    if name in BUILTIN:
        from prunevid_bench.models.loading import _load_builtin

        return _load_builtin(name, "sdpa").model.config, "built in"
    from transformers import AutoConfig

    try:
        where = "local folder" if Path(name).is_dir() else "found in the Hugging Face cache"
        return AutoConfig.from_pretrained(name, local_files_only=True), where
    except (OSError, ValueError):
        pass
    recorded = recorded_model_config(name)
    if recorded is None:
        return None, "not on this machine, and models.yaml has no shape for it"
    fields, source = recorded
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields), f"not on this machine; shapes from {source}"


def estimate(plan: Plan, config, questions: int) -> dict[str, Any]:
    """Visual tokens and prefill FLOPs per question at the input setting, and GPU hours for the grid."""
    from prunevid_bench.families import family_for_type
    from prunevid_bench.flops import TextShape, llm_prefill_flops, vision_encoder_flops
    from prunevid_bench.video_sampling import VideoRequest, smart_resize, video_pixel_bounds

    vision = family_for_type(config.model_type).vision_shape(config)
    text = TextShape.from_config(config)
    factor = vision.patch_size * vision.spatial_merge_size
    video = plan.config.video
    policy = video.policy if video.policy != "auto" else ("processor" if plan.config.model.name in _builtin() else "qwen")
    frames = video.num_frames or (32 if policy == "lmms-eval" else 16)
    request = VideoRequest.from_config(video, policy, factor)
    if request.resizes:
        low, high = video_pixel_bounds(request, frames)
    else:  # the processor's own bounds are not known without it: the frame as it is, within the config's
        low, high = video.min_pixels or factor * factor, video.max_pixels or NOMINAL_VIDEO[0] * NOMINAL_VIDEO[1]
    h, w = smart_resize(*NOMINAL_VIDEO, factor, low, high)
    grid = (max(1, frames // vision.temporal_patch_size), h // vision.patch_size, w // vision.patch_size)
    visual = grid[0] * (h // factor) * (w // factor)
    encoder = vision_encoder_flops(vision, [grid]).total
    fractions = [1.0] + [b for _ in plan.methods for b in plan.budgets]  # the baseline cell, then the grid

    def prefill(b: float) -> int:
        return encoder + llm_prefill_flops(text, [TEXT_TOKENS + round(b * visual)] * text.num_layers).total

    per_question = sum(prefill(b) for b in fractions)
    return {"visual_tokens": visual, "grid": grid, "frames": frames, "policy": policy, "cells": len(fractions),
            "baseline_tflops": prefill(1.0) / 1e12, "gpu_hours": questions * per_question / ASSUMED_FLOPS / 3600,
            "gpu_hours_per_1000": 1000 * per_question / ASSUMED_FLOPS / 3600}


def _builtin() -> dict[str, str]:
    from prunevid_bench.models.loading import BUILTIN

    return BUILTIN


def count_questions(bench, path: Path, videos: Path) -> int:
    from prunevid_bench.harness.datasets import load_dataset

    return len(load_dataset(path, video_root=videos if videos.is_dir() else None, format=bench.format))


def dry_run(plan: Plan, console: Console) -> dict[str, Any]:
    """Print what ``reproduce`` would run and what it needs; run nothing."""
    table, cfg = plan.table, plan.config
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"[bold]{escape(table.name)}[/]: {escape(table.title)}")
    say(f"source: {escape(table.source['cite'])}" + (f" ({escape(table.source['url'])})" if "url" in table.source else ""))
    config, where = model_config(cfg.model.name)
    say(f"model: {escape(cfg.model.name)} ({escape(where)})")
    if where.startswith("not on this machine"):
        say(f"  weights: downloaded on first run, or beforehand: huggingface-cli download {escape(cfg.model.name)}")
    say("input: " + escape(" ".join(f"{k}={v}" for k, v in table.input.items())))
    cells = ["full"] + [f"{m} B={b:g}" for m in plan.methods for b in plan.budgets]
    say(f"cells per benchmark file: {', '.join(cells)}")
    for line in unavailable_lines(plan):
        say(f"[yellow]skipped:[/] {escape(line)}")
    for note in table.notes:
        say(f"note: {escape(note)}")
    questions, missing, seen = 0, [], set()
    for bench in table.benchmarks:
        if bench.subset:  # scored on another benchmark's runs: nothing more to run or fetch
            labels = " ".join(f"{k}={v}" for k, v in bench.subset)
            say(f"data {escape(bench.title)}: the questions with {escape(labels)} of the same files")
            continue
        found = [(f, v) for f, v in plan.files(bench) if f.is_file()]
        missing += [f for f, _ in plan.files(bench) if not f.is_file() and f not in seen]
        counted = sum(count_questions(bench, f, v) for f, v in found)
        questions += sum(count_questions(bench, f, v) for f, v in found if f not in seen)
        seen.update(f for f, _ in plan.files(bench))
        state = (f"{len(found)} of {len(bench.files)} files, {counted} questions" if found
                 else f"missing ({len(bench.files)} file{'s' * (len(bench.files) > 1)})")
        say(f"data {escape(bench.title)}: {state}; from {escape(bench.release)}")
    if missing and plan.data_root == Path("."):
        say("  (no --data-root: looked in the current folder)")
    for path in missing[:3]:
        say(f"  missing: {escape(str(path))}")
    if len(missing) > 3:
        say(f"  ... and {len(missing) - 3} more missing files")
    result: dict[str, Any] = {"table": table.name, "model": cfg.model.name, "model_config": where, "cells": cells,
                              "unavailable": unavailable_lines(plan), "questions_found": questions,
                              "missing": [str(p) for p in missing]}
    if config is None:
        say("GPU hours: no estimate (the model's shapes are unknown here)")
        return result
    est = estimate(plan, config, questions)
    result["estimate"] = {**est, "assumed_flops_per_s": ASSUMED_FLOPS, "assumed_gpu": ASSUMED_GPU}
    say(f"per question: {est['visual_tokens']} visual tokens ({est['frames']} frames, {est['policy']} policy, "
        f"a {NOMINAL_VIDEO[1]}x{NOMINAL_VIDEO[0]} video), {est['baseline_tflops']:.1f} TFLOP of prefill unreduced")
    found_text = (f"{est['gpu_hours']:.2f} GPU-hours for the {questions} questions found"
                  if questions else "no questions found yet")
    say(f"GPU hours: {found_text}; {est['gpu_hours_per_1000']:.2f} per 1000 questions over the "
        f"{est['cells']} cells, at {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s ({ASSUMED_GPU}; prefill only)")
    return result
