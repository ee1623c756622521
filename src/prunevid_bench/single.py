"""Scenario: one video and one question (optionally repeated for timing), written to a run folder."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunevid_bench.config import RunConfig
from prunevid_bench.report import RECORD_ALIASES, RunResult, check_writable, environment, new_run_dir, write_csv_row, write_json

TIMED_FIELDS = ("ttft_s", "prefill_s", "vision_encoder_s", "visual_methods_s", "layer_method_s", "decode_tokens_per_s")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.2f} ms" if s < 1 else f"{s:.3f} s"


def measurement_table(result: dict[str, Any], title: str = "Measurements") -> Table:
    """A person-readable table of one run record."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    before = ", ".join(result.get("visual_methods") or []) or "no method"
    layer = result.get("layer_method") or "no method"
    rows = [
        ("visual tokens in the prompt", result["visual_tokens"]),
        (f"entering the LLM ({before})", result["tokens_after_visual_methods"]),
        (f"after the LLM layer ({layer})", result["visual_tokens_kept"]),
        ("visual tokens kept ratio", f"{result['visual_tokens_kept_ratio']:.3f}"),
        ("prompt tokens (unpruned)", result["prompt_tokens"]),
        ("LLM prefill tokens (layer 0)", result["llm_prefill_tokens"]),
        ("generated tokens", result["generated_tokens"]),
        ("TTFT", fmt_seconds(result["ttft_s"])),
        ("  vision encoder", fmt_seconds(result["vision_encoder_s"])),
        ("    blocks / merger(s)", f"{fmt_seconds(result['vision_encoder_s'] - result.get('vision_mergers_s', 0.0))} / "
                                   f"{fmt_seconds(result.get('vision_mergers_s', 0.0))}"),
        (f"  methods before the LLM ({before})", fmt_seconds(result["visual_methods_s"])),
        (f"  LLM-layer method ({layer})", fmt_seconds(result["layer_method_s"])),
        ("  prefill after vision", fmt_seconds(result["prefill_s"])),
        ("decode speed", f"{result['decode_tokens_per_s']:.1f} tok/s" if result["decode_tokens_per_s"] else "-"),
        (f"peak memory ({result['memory_kind']})", human_bytes(result["peak_memory_bytes"])),
        ("KV cache after prefill", human_bytes(result["kv_cache_bytes"])),
        ("KV cache before compaction", human_bytes(result["kv_cache_bytes_uncompressed"])),
        ("model (family)", f"{result.get('model') or '-'} ({result.get('model_family') or '-'})"),
        ("video grid (t, h, w)", str(result["video_grid_thw"])),
        ("video policy / frame size", f"{result.get('video_policy', '-')} / {'x'.join(map(str, result.get('frame_size') or [])) or '-'}"),
        ("frames / sampled fps / backend", f"{result['num_frames']} / {result['sampled_fps']:.3g} / {result['video_backend']}"),
        ("LLM-layer method's layer K", layer_text(result.get("pruning_layer"), result.get("pruning_layer_spec"))),
    ]
    if "ttft_s_median" in result:
        rows.insert(8, ("  TTFT median / p90 over repeats", f"{fmt_seconds(result['ttft_s_median'])} / {fmt_seconds(result['ttft_s_p90'])}"))
    # every method applied, in order: tokens in -> out and its own time
    for i, red in enumerate(result.get("reductions") or []):
        rows.insert(4 + i, (f"  method {red['method']} ({red['acts']})",
                            f"{red['tokens_in']} → {red['tokens_out']} in {fmt_seconds(red['seconds'])}"))
    phases = result.get("prefill_peak_memory_by_phase") or {}
    if phases:  # a method or a chunked prefill: the peak of each phase of the prefill
        chunk = result.get("prefill_chunk_tokens") or 0
        rows.append((f"  prefill peak by phase{f' (chunks of {chunk})' if chunk else ''}",
                     ", ".join(f"{name} {human_bytes(value)}" for name, value in phases.items())))
    if result.get("budget_note"):
        rows.append(("budget", result["budget_note"]))
    if result.get("ideal_speedup") is not None:
        rows.append(("ideal speed-up (prefill FLOPs)", f"{result['ideal_speedup']:.2f}×"))
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def layer_text(layer: int | None, spec: int | str | None) -> str:
    """An LLM-layer method's layer K: ``1 (10/28)`` when resolved from a relative depth, ``10`` for an index."""
    if layer is None or layer == spec:
        return "-" if spec is None else str(spec)
    return f"{layer} ({spec})"


def timing_summary(results: list[RunResult]) -> dict[str, Any]:
    """Median, p90 and spread of the timed fields over repeats."""
    out: dict[str, Any] = {"repeats": len(results)}
    for name in TIMED_FIELDS:
        values = sorted(v for v in (getattr(r, name) for r in results) if v is not None)
        if not values:
            continue
        out[f"{name}_median"] = statistics.median(values)
        out[f"{name}_p90"] = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
        out[f"{name}_min"] = values[0]
        out[f"{name}_max"] = values[-1]
    return out


NOISY_SPREAD = 1.5  # p90 over median of TTFT beyond which repeats disagree too much to trust one number


def timing_note(record: dict[str, Any]) -> str | None:
    """A warning when repeated TTFTs spread too widely (a busy machine), else None."""
    median, p90 = record.get("ttft_s_median"), record.get("ttft_s_p90")
    if not median or p90 is None or p90 <= NOISY_SPREAD * median:
        return None
    return (f"TTFT varied widely over the repeats (p90 {p90 / median:.1f}x the median): the machine is busy, "
            "so compare timings with care; rerun on a quiet machine or with more --repeats")


def write_run_header(run_dir: Path, cfg: RunConfig, pipe, meta: dict[str, Any]) -> None:
    """The resolved config and the environment: every run folder starts with these."""
    write_json(run_dir / "config.json", {**meta, "config": cfg.to_dict()})
    from prunevid_bench.harness.inputs import recorded_identity

    write_json(run_dir / "environment.json", {**environment(cfg, pipe.model, pipe.device), **recorded_identity(pipe, cfg)})


def read_messages(path: Path, allow_outside_root: bool = False) -> list[dict[str, Any]]:
    """A ``--messages`` file: Qwen chat messages as JSON (checked element by element later),
    whose files must lie in the file's own folder unless ``allow_outside_root``."""
    import json

    from prunevid_bench.errors import PruneVidError
    from prunevid_bench.messages import confine_media

    if not Path(path).is_file():
        raise PruneVidError(f"messages file not found: {path}")
    try:
        messages = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PruneVidError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise PruneVidError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise PruneVidError(f"{path}: nested too deeply to be chat messages") from None
    if not allow_outside_root:
        confine_media(messages, Path(path).parent)
    return messages


def _message_video_paths(messages: Any) -> list[str]:
    """The video files named in ``--messages`` (frames given in memory have no file to probe;
    a malformed message is left for ``prepare_media`` to name)."""
    paths = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            value = part.get("video") if isinstance(part, dict) else None
            if isinstance(value, str):
                paths.append(value[7:] if value.startswith("file://") else value)
    return paths


def run_single(
    cfg: RunConfig,
    video: Path | None,
    question: str | None,
    *,
    messages: list[dict[str, Any]] | None = None,
    options: list[str] | None = None,
    answer: str | None = None,
    preset: str | None,
    results_dir: Path,
    label: str | None,
    repeats: int = 1,
    warmup: int = 0,
    console: Console | None = None,
    show_kept: bool = False,
) -> Path:
    from prunevid_bench.errors import PruneVidError
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.video import check_video

    console = console or Console()
    if repeats < 1 or warmup < 0:
        raise PruneVidError("--repeats must be >= 1 and --warmup >= 0")
    from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice

    options = list(options or [])
    if len(options) == 1 or len(options) > len(LETTERS):
        raise PruneVidError(f"give between 2 and {len(LETTERS)} --option values, got {len(options)}")
    if messages is not None and options:
        raise PruneVidError("--option builds the question's choices; with --messages write them into the text")
    if answer is not None:
        answer = answer.strip().upper()
        if not options:
            raise PruneVidError("--answer is the letter of the right --option: give the options too")
        if answer not in LETTERS[:len(options)]:
            raise PruneVidError(f"--answer must be one of {', '.join(LETTERS[:len(options)])} (the --option letters), got '{answer}'")
    if show_kept and not cfg.enabled_methods:
        raise PruneVidError("--show-kept needs a method that reduces the visual tokens; none is enabled")
    prompt_question = format_mc_prompt(question, options) if options else question
    # Before any model time: a video the processor would refuse, a folder that cannot be written.
    for path in [video] if messages is None else _message_video_paths(messages):
        check_video(path)
    check_writable(results_dir)
    pipe = Pipeline.from_config(cfg)
    if messages is not None:
        prepared = pipe.prepare(messages=messages)  # decode once: timing mode measures the model
        video = Path(prepared.clip.path or "messages")
    else:
        prepared = pipe.prepare(video, prompt_question)
    for _ in range(warmup):
        pipe.run(prepared)
    results = [pipe.run(prepared) for _ in range(repeats)]
    record = results[0].to_dict()
    record.update(video=str(video), question=question, model=pipe.model_name, preset=preset)
    if options:
        index, status = parse_choice(record["generated_text"], len(options), options)
        record.update(options=options, prediction=None if index is None else LETTERS[index], parse_status=status)
        if answer is not None:
            record.update(answer=answer, correct=record["prediction"] == answer)
    if repeats > 1:
        record.update(timing_summary(results))
        for name in TIMED_FIELDS:  # every timing shown (and compared) is the median, not the first repeat
            if f"{name}_median" in record:
                record[name] = record[f"{name}_median"]
        record.update({old: record[new] for old, new in RECORD_ALIASES.items() if new in TIMED_FIELDS})
    run_dir = new_run_dir(results_dir, label or f"{preset or 'custom'}-{Path(video).stem}")
    meta = {"scenario": "single", "preset": preset, "video": str(video), "question": question}
    if messages is not None:
        meta["prompt"] = prepared.prompt
    write_run_header(run_dir, cfg, pipe, meta)
    write_json(run_dir / "result.json", record)
    write_csv_row(run_dir / "result.csv", record)
    console.print(f"[bold]answer:[/] {escape(record['generated_text']) or '(empty)'}", highlight=False)
    if options:
        choice = record["prediction"]
        shown = f"({choice}) {escape(options[LETTERS.index(choice)])}" if choice else f"none ({record['parse_status']})"
        if answer is not None:
            right = f"({answer}) {escape(options[LETTERS.index(answer)])}"
            shown += " — [green]correct[/]" if record["correct"] else f" — [red]wrong[/], the answer is {right}"
        console.print(f"[bold]choice:[/] {shown}", highlight=False)
    if record["visual_tokens_kept"] == 0:
        console.print("[yellow]note:[/] every visual token was pruned (visual_tokens_kept: 0): the answer saw the text alone",
                      highlight=False)
    timed = f"timings: median of {repeats} runs after {warmup} warm-up{'s' * (warmup != 1)}" if repeats > 1 else ""
    console.print(measurement_table(record, title=f"Measurements ({timed})" if timed else "Measurements"))
    note = timing_note(record)
    if note:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if show_kept:
        from prunevid_bench.kept import draw_kept

        console.print(f"kept tokens: {draw_kept(record['kept'], prepared.clip.frames, run_dir / 'kept.png')}")
    console.print(f"run folder: {run_dir}")
    return run_dir

