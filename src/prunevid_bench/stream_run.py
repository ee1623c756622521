"""Scenario: play a video chunk by chunk through a StreamSession and ask questions at their times.

One video with ``--ask "SECONDS:question"`` pairs, or a JSONL dataset of timed questions (several
per video, as OVO-Bench and StreamingBench have them) evaluated for accuracy into a resumable run
folder. A chunk is appended once its last frame has arrived; a question at time t is answered
from every chunk complete by then. Each question's record holds its TTFT, the append time of
each chunk so far, the KV bytes, the visual tokens cached and the answer; ``compare_offline``
re-runs it offline on the frames seen so far and records the agreement and TTFT ratio.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from prunevid_bench.config import RunConfig
from prunevid_bench.errors import PruneVidError

QUESTIONS_FILE = "questions.jsonl"
CHUNKS_FILE = "chunks.jsonl"  # every appended chunk, written as it is appended: append time, tokens, KV bytes
STREAM_FILES = (QUESTIONS_FILE, "summary.json", CHUNKS_FILE, "kv.png", "config.json")  # what --force moves aside
NO_FRAME_CAP = 10**9  # a stream samples at its rate for the whole video: --max-frames caps it


@dataclass
class TimedQuestion:
    id: str
    time_s: float
    question: str
    options: list[str] = field(default_factory=list)
    answer: str | None = None  # the right option's letter


def parse_ask(text: str) -> tuple[float, str]:
    """``"2.0:What is moving?"`` (also ``t=2.0:...``) -> (2.0, "What is moving?")."""
    head, sep, question = text.partition(":")
    head = head.strip().removeprefix("t=")
    try:
        seconds = float(head)
    except ValueError:
        seconds = None
    if not sep or seconds is None or not math.isfinite(seconds) or seconds < 0 or not question.strip():
        raise PruneVidError(f"--ask takes SECONDS:QUESTION, e.g. --ask \"2.0:What is moving?\", got '{text}'")
    return seconds, question.strip()


def read_stream_dataset(path: Path, allow_outside_root: bool = False) -> dict[str, list[TimedQuestion]]:
    """JSONL rows ``{"video", "time", "question", "options", "answer"}`` grouped by video (paths
    relative to the file's folder, and confined to it unless ``allow_outside_root``); answer: a
    letter, a 0-based index or the option's text."""
    from prunevid_bench.choices import LETTERS

    if not path.is_file():
        raise PruneVidError(f"dataset not found: {path}")
    videos: dict[str, list[TimedQuestion]] = {}
    line_of: dict[str, int] = {}  # id -> the line that gave it
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PruneVidError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PruneVidError(f"{where} is not valid JSON ({exc.msg})") from None
        missing = [k for k in ("video", "time", "question", "options", "answer") if not isinstance(row, dict) or k not in row]
        if missing:
            raise PruneVidError(f"{where} lacks {', '.join(missing)} (rows need video, time, question, options, answer)")
        options = [str(o) for o in row["options"]] if isinstance(row["options"], list) else []
        if not 2 <= len(options) <= len(LETTERS):
            raise PruneVidError(f"{where}: options must be a list of 2 to {len(LETTERS)} choices")
        answer = _answer_letter(row["answer"], options)
        if answer is None:
            raise PruneVidError(f"{where}: answer '{row['answer']}' is not a letter, an index or one of the options")
        try:
            time_s = float(row["time"])
            if not math.isfinite(time_s) or time_s < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise PruneVidError(f"{where}: time must be seconds, got {row['time']!r}") from None
        video = str((path.parent / str(row["video"])).resolve()) if not Path(str(row["video"])).is_absolute() else str(row["video"])
        check_inside(video, path.parent, where, row["video"], allow_outside_root)
        qid = str(row.get("id", f"{Path(video).stem}-{number}"))
        if qid in line_of:
            raise PruneVidError(f"{where}: id '{qid}' repeats line {line_of[qid]}; give every question its own id")
        line_of[qid] = number
        videos.setdefault(video, []).append(TimedQuestion(qid, time_s, str(row["question"]), options, answer))
    if not videos:
        raise PruneVidError(f"{path}: no rows")
    return videos


def check_inside(video: str, root: Path, where: str, named: Any, allowed: bool) -> None:
    from prunevid_bench.confine import outside, refusal

    real = None if allowed else outside(video, root)
    if real is not None:
        raise PruneVidError(f"{where}: {refusal(f'video {named}', real, root, 'the dataset folder')}")


def _answer_letter(value: Any, options: list[str]) -> str | None:
    from prunevid_bench.choices import LETTERS

    if isinstance(value, int) and 0 <= value < len(options):
        return LETTERS[value]
    text = str(value).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return text.upper()
    return LETTERS[options.index(text)] if text in options else None


# ---------------------------------------------------------------- playing one video
def stream_request(pipe, cfg: RunConfig):
    """The video request of a stream: the one ``run`` uses (the model's default policy, ``qwen``
    for checkpoints, with its per-frame pixel bounds), except that the processor policy samples
    by rate for the whole video unless --max-frames caps it."""
    import dataclasses

    request = pipe.video_request(cfg)
    if request.policy == "processor" and request.max_frames is None:
        request = dataclasses.replace(request, max_frames=NO_FRAME_CAP)
    return request


def pixel_note(clip, request) -> dict[str, Any]:
    """What the record says of the frames' size: the policy, the size, and for the qwen-style
    policies how the whole-video pixel budget became a per-frame bound (a stream cannot know
    the video's length in advance: the budget is shared over the frames it plays)."""
    from prunevid_bench.video import video_pixel_bounds

    out: dict[str, Any] = {"video_policy": clip.policy, "frame_size": clip.frame_size}
    if request.resizes:
        _, most = video_pixel_bounds(request, clip.num_frames)
        budget = "video.total_pixels" if request.total_pixels is not None else "the policy's total pixel budget"
        out["pixels_per_frame"] = (f"{budget} replaced by its per-frame share over the {clip.num_frames} frames "
                                   f"streamed: at most {int(most)} pixels a frame")
    return out


def play_video(pipe, cfg: RunConfig, video: str | Path, questions: list[TimedQuestion], *, chunk_frames: int,
               cache_tokens: int | None, max_new_tokens: int, compare_offline: bool, done: set[str] | None = None,
               chunk_log: list | None = None, answer_mode: str = "generate"):
    """Stream one video and yield one record per question (those in ``done`` are skipped);
    each appended chunk's record is added to ``chunk_log``. ``answer_mode``: generate (parse the
    reply's letter) or logits (the best option letter's first-token logit), as ``run --dataset``."""
    from prunevid_bench.choices import LETTERS
    from prunevid_bench.streaming import StreamSession
    from prunevid_bench.video import load_clip

    request = stream_request(pipe, cfg)
    pending = sorted((q for q in questions if q.id not in (done or set())), key=lambda q: q.time_s)
    if not pending:
        return
    clip = load_clip(video, request=request)
    times = [i / clip.native_fps for i in clip.indices]
    chunks = [(s, min(s + chunk_frames, clip.num_frames)) for s in range(0, clip.num_frames, chunk_frames)]
    ready = [times[end - 1] for _, end in chunks]  # a chunk is appended once its last frame arrived
    for q in (q for q in pending if q.time_s < ready[0]):  # nothing cached yet: this row is skipped, not the run
        yield {"id": q.id, "video": str(video), "time_s": q.time_s, "question": q.question,
               "skipped": f"asked at {q.time_s:g} s, before the first chunk is complete ({ready[0]:.2f} s): "
                          "ask later or use a smaller --chunk-frames"}
    pending = [q for q in pending if q.time_s >= ready[0]]
    if not pending:
        return
    session = StreamSession(pipe, video_fps=clip.sampled_fps, chunk_frames=chunk_frames, config=cfg,
                            cache_tokens=cache_tokens, presized=clip.resized)
    pixels = pixel_note(clip, request)
    appended = 0
    for q in pending:
        while appended < len(chunks) and ready[appended] <= q.time_s:
            start, end = chunks[appended]
            chunk = session.append(clip.frames[start:end])
            if chunk_log is not None and chunk is not None:
                chunk_log.append({"video": str(video), "ready_s": ready[appended], **chunk.record()})
            appended += 1
        if q.options:
            answer = session.ask_choice(q.question, q.options, max_new_tokens if answer_mode == "generate" else None)
        else:
            answer = session.ask(q.question, max_new_tokens)
        record = {
            "id": q.id, "video": str(video), "time_s": q.time_s, "question": q.question,
            "answered_after_s": ready[appended - 1], "chunks_appended": appended,
            "append_s": [c.append_s for c in session.chunks], **answer.record(), "sampled_fps": clip.sampled_fps,
            **pixels,
        }
        if q.options:
            record.update(options=q.options, prediction=None if answer.choice is None else LETTERS[answer.choice])
            if q.answer is not None:
                record.update(answer=q.answer, correct=record["prediction"] == q.answer)
        if compare_offline:
            record.update(_offline(pipe, cfg, clip.frames[: session.frames_seen], clip.sampled_fps, q, answer,
                                   max_new_tokens, answer_mode))
        yield record


def _offline(pipe, cfg: RunConfig, frames, fps: float, q: TimedQuestion, answer, max_new_tokens: int,
             answer_mode: str) -> dict[str, Any]:
    """The same question offline on the frames the stream had seen: one full prefill. Agreement
    is on the chosen letter for choices, on the reply's text otherwise."""
    from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice
    from prunevid_bench.choices import letter_token_ids

    logits_mode = bool(q.options) and answer_mode == "logits"
    text = format_mc_prompt(q.question, q.options) if q.options else q.question
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": fps}, {"type": "text", "text": text}]}]
    run_cfg = cfg.to_dict()
    run_cfg["generation"]["max_new_tokens"] = 1 if logits_mode else max_new_tokens
    from prunevid_bench.config import from_dict

    ref = pipe.run(messages=messages, config=from_dict(run_cfg))
    if logits_mode:
        letters = letter_token_ids(pipe.processor.tokenizer, len(q.options))
        offline_answer, streamed = LETTERS[int(ref.first_token_logits[letters].argmax())], answer.text
    elif q.options:
        index, _ = parse_choice(ref.generated_text, len(q.options), q.options)
        offline_answer = None if index is None else LETTERS[index]
        streamed = None if answer.choice is None else LETTERS[answer.choice]
    else:
        offline_answer, streamed = ref.generated_text, answer.text
    return {
        "offline_answer": offline_answer,
        "offline_reply": ref.generated_text,
        "offline_agrees": offline_answer == streamed,
        "offline_ttft_s": ref.ttft_s,
        "offline_over_stream_ttft": ref.ttft_s / answer.ttft_s if answer.ttft_s > 0 else None,
        "offline_max_logit_diff": float((ref.first_token_logits - answer.first_logits).abs().max()),
    }


# ---------------------------------------------------------------- run folders
def check_stream_config(cfg: RunConfig, chunk_frames: int, cache_tokens: int | None) -> None:
    """Everything a stream refuses, before any work (no model loaded, no frame decoded)."""
    from prunevid_bench.stream_methods import check_stream_methods

    if cfg.model.mrope != "transformers":
        raise PruneVidError("a stream numbers its positions as the installed transformers does: set model.mrope=transformers")
    if chunk_frames <= 0 or chunk_frames % 2:
        raise PruneVidError(f"--chunk-frames must be a positive multiple of 2 (the temporal patch size), got {chunk_frames}")
    if cache_tokens is not None and cache_tokens <= 0:
        raise PruneVidError(f"--cache-tokens must be > 0, got {cache_tokens}")
    check_stream_methods(cfg, cache_tokens)


def run_stream(cfg: RunConfig, videos: dict[str, list[TimedQuestion]], *, chunk_frames: int, cache_tokens: int | None,
               compare_offline: bool, preset: str | None, results_dir: Path, label: str, source: str,
               answer_mode: str = "generate", force: bool = False, wait: bool = False,
               console: Console | None = None) -> tuple[Path, dict[str, Any]]:
    """Stream each video, write one record per question to ``questions.jsonl`` (a rerun of the
    same command resumes: questions already recorded are skipped; ``force`` moves the earlier
    results to ``backup-N/`` and starts over) and ``summary.json``. One process at a time holds
    the run folder (``harness.runlock``; ``wait`` waits for the holder instead of stopping)."""
    from prunevid_bench.harness.runlock import RunLock
    from prunevid_bench.harness.runs import back_up, read_samples
    from prunevid_bench.report import check_writable
    from prunevid_bench.video import check_video

    console = console or Console()
    check_stream_config(cfg, chunk_frames, cache_tokens)
    if answer_mode not in ("generate", "logits"):
        raise PruneVidError(f"--answer-mode is generate or logits, got '{answer_mode}'")
    for video in videos:
        check_video(video)
    check_writable(results_dir)
    run_dir = results_dir / label
    meta = {"scenario": "stream", "preset": preset, "source": source, "chunk_frames": chunk_frames,
            "cache_tokens": cache_tokens, "compare_offline": compare_offline, "answer_mode": answer_mode}
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, wait=wait, note=lambda text: console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)):
        done: dict[str, dict[str, Any]] = {}
        if force:
            backup = back_up(run_dir, STREAM_FILES)
            if backup is not None:
                console.print(f"--force: the earlier results of {run_dir} are kept in {backup.name}/", soft_wrap=True, highlight=False)
        elif (run_dir / "config.json").is_file():
            saved = json.loads((run_dir / "config.json").read_text())
            if {k: saved.get(k) for k in meta} != meta or saved.get("config") != cfg.to_dict():
                raise PruneVidError(f"{run_dir} holds a stream run with other settings: pass another --label, or --force")
            done = read_samples(run_dir / QUESTIONS_FILE, repair=True)
        return _run_stream_locked(cfg, videos, run_dir, meta, done, chunk_frames=chunk_frames, cache_tokens=cache_tokens,
                                  compare_offline=compare_offline, answer_mode=answer_mode, console=console)


def _run_stream_locked(cfg: RunConfig, videos: dict[str, list[TimedQuestion]], run_dir: Path, meta: dict[str, Any],
                       done: dict[str, dict[str, Any]], *, chunk_frames: int, cache_tokens: int | None, compare_offline: bool,
                       answer_mode: str, console: Console) -> tuple[Path, dict[str, Any]]:
    from prunevid_bench.harness.runs import SampleLog
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.report import write_json
    from prunevid_bench.single import write_run_header

    pipe = Pipeline.from_config(cfg)
    write_run_header(run_dir, cfg, pipe, meta)
    records = dict(done)
    replayed = {video for video, questions in videos.items() if any(q.id not in done for q in questions)}
    chunk_log = ChunkLog(run_dir / CHUNKS_FILE, replayed)
    with SampleLog(run_dir / QUESTIONS_FILE) as log:
        for video, questions in videos.items():
            for record in play_video(pipe, cfg, video, questions, chunk_frames=chunk_frames, cache_tokens=cache_tokens,
                                     max_new_tokens=cfg.generation.max_new_tokens, compare_offline=compare_offline,
                                     done=set(done), chunk_log=chunk_log, answer_mode=answer_mode):
                log.write(record)
                records[record["id"]] = record
                if record.get("skipped"):
                    console.print(f"[yellow]skipped[/] {escape(record['id'])}: {escape(record['skipped'])}",
                                  highlight=False, soft_wrap=True)
                    continue
                if "options" in record:
                    shown = record["prediction"] or f"no letter in '{record['text']}'"
                else:
                    shown = record["text"] or "(empty)"
                console.print(f"[bold]{record['time_s']:g} s[/] {escape(record['question'])} -> {escape(shown)} "
                              f"(TTFT {record['ttft_s'] * 1000:.1f} ms, {record['visual_tokens']} visual tokens)", highlight=False)
    summary = stream_summary(list(records.values()))
    write_json(run_dir / "summary.json", summary)
    if "eviction_note" in summary:
        console.print(f"note: {summary['eviction_note']}", soft_wrap=True, highlight=False)
    _draw_kv(run_dir)
    console.print(f"run folder: {run_dir}")
    return run_dir, summary


class ChunkLog(list):
    """``chunks.jsonl`` as it happens: a chunk's row is appended (and flushed) when the chunk is,
    so a killed stream keeps what it appended. Opening it drops the rows of the videos this run
    plays again (``replayed``: their chunks are appended anew) and keeps the others'."""

    def __init__(self, path: Path, replayed: set[str]):
        super().__init__()
        self.path = path
        kept = [c for c in read_chunks(path) if c["video"] not in replayed]
        path.write_text("".join(json.dumps(c) + "\n" for c in kept), encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_chunks(path: Path) -> list[dict[str, Any]]:
    """The rows of ``chunks.jsonl`` (none when absent; a line torn by a kill is left out)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and {"video", "ready_s", "kv_bytes"} <= row.keys():
            rows.append(row)
    return rows


def _draw_kv(run_dir: Path) -> None:
    """``kv.png``: KV bytes over each video's stream, up to its last question, from every row of
    ``chunks.jsonl`` (a resumed run draws the videos of earlier runs too)."""
    from prunevid_bench.stream_plot import plot_kv_over_stream

    series: dict[str, list[tuple[float, int]]] = {}
    for c in read_chunks(run_dir / CHUNKS_FILE):
        series.setdefault(Path(c["video"]).name, []).append((c["ready_s"], c["kv_bytes"]))
    if series:
        plot_kv_over_stream(dict(list(series.items())[:10]), run_dir / "kv.png")


def stream_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    skipped = [{"id": r["id"], "reason": r["skipped"]} for r in records if r.get("skipped")]
    records = [r for r in records if not r.get("skipped")]
    scored = [r for r in records if "correct" in r]
    compared = [r for r in records if "offline_agrees" in r]
    out: dict[str, Any] = {"questions": len(records), "skipped": skipped}
    if records:
        out["ttft_s_median"] = statistics.median(r["ttft_s"] for r in records)
        out["kv_bytes_max"] = max(r["kv_bytes"] for r in records)
        hybrid = [r for r in records if r.get("recurrent_state_bytes") and r.get("eviction_layers") is not None]
        if hybrid:  # Qwen3.5: what an eviction can and cannot drop
            out["eviction_layers"] = hybrid[0]["eviction_layers"]
            out["eviction_note"] = (f"eviction edits the full-attention layers' KV caches only (layers "
                                    f"{', '.join(map(str, out['eviction_layers']))}); the linear-attention layers' "
                                    "recurrent states keep every token")
    if scored:
        out.update(correct=sum(r["correct"] for r in scored), scored=len(scored),
                   accuracy=sum(r["correct"] for r in scored) / len(scored))
    if compared:
        out["offline_agreement"] = sum(r["offline_agrees"] for r in compared) / len(compared)
        ratios = [r["offline_over_stream_ttft"] for r in compared if r["offline_over_stream_ttft"]]
        if ratios:
            out["offline_over_stream_ttft_median"] = statistics.median(ratios)
    return out
