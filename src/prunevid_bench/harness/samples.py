"""Running a dataset run's questions: one sample's prompt, run and prediction (``run_sample``:
any exception becomes the row's ``error``), the untimed warm-up, and the loop that appends each
record to the log as it finishes.

Predictions: ``generate`` parses the reply with the letter parser (unparsed counts as wrong and
is reported); ``logits`` takes the option letter whose token has the highest first-token logit
(each letter must be one token of the processor's tokenizer)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from prunevid_bench.config import RunConfig
from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice
from prunevid_bench.harness.datasets import QASample
from prunevid_bench.harness.progress import progress_for
from prunevid_bench.harness.runs import SampleLog
from prunevid_bench.harness.summary import shown


RESULT_EXCLUDE = {"generated_token_ids", "first_token_logits"}


def is_transient(exc: BaseException) -> bool:
    """Memory pressure, file-system hiccups and a failed GPU (a device assert poisons every later
    sample of the process) may pass; anything else recurs on every rerun."""
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError, OSError, torch.AcceleratorError)):
        return True
    return isinstance(exc, RuntimeError) and "CUDA" in str(exc)


def say_if_busy(console: Console, when: str) -> None:
    """A warning when the load average exceeds the cores (each record keeps its own)."""
    from prunevid_bench.harness.inputs import busy_note, load_average

    note = busy_note(load_average())
    if note:
        console.print(f"[yellow]warning:[/] {when}: {escape(note)}", highlight=False, soft_wrap=True)


def warm_up(pipe, cfg: RunConfig, samples: list[QASample], answer_mode: str, letter_ids: list[int] | None) -> None:
    """Run ``samples`` once, untimed and unlogged, so the first logged one does not pay the cold
    start (allocator, kernels, caches: about 2x on the CPU). Greedy decoding is deterministic, so
    the logged answers and token counts are the same with or without it. The feature cache is
    off meanwhile: a cached cold vision time would otherwise reach the first logged TTFT."""
    cache, pipe.feature_cache = getattr(pipe, "feature_cache", None), None
    try:
        for sample in samples:
            run_sample(pipe, cfg, sample, answer_mode, letter_ids)
    finally:
        pipe.feature_cache = cache


def _run_samples(pipe, cfg, todo, done, log_path, answer_mode, letter_ids, console, total, where, warmup=0) -> None:
    correct = sum(1 for r in done.values() if r.get("correct"))  # an errored row is never correct
    with SampleLog(log_path) as log, progress_for(console, log_path.parent.name, total, total - len(todo), correct) as progress:
        warm_up(pipe, cfg, todo[:warmup], answer_mode, letter_ids)
        for sample in todo:
            record = {**run_sample(pipe, cfg, sample, answer_mode, letter_ids), **where}
            log.write(record)
            done[sample.id] = record
            if record.get("error"):
                console.print(f"[red]error[/] on {shown(sample.id)}: {shown(record['error'])}",
                              highlight=False, soft_wrap=True)
            progress.advance(record)


def run_sample(pipe, cfg: RunConfig, sample: QASample, answer_mode: str, letter_ids: list[int] | None) -> dict[str, Any]:
    """One question: prompt, run, predict. Any exception becomes the row's ``error``."""
    import torch

    record: dict[str, Any] = {
        "id": sample.id,
        "video": sample.video.name,
        "category": sample.category,
        "answer": sample.answer_letter,
        "n_options": len(sample.options),
        "prediction": None,
        "correct": False,
        "parse_status": None,
        "error": None,
        # What was asked and answered, so a failure can be read from the log alone.
        "question": sample.question,
        "options": list(sample.options),
        "prompt": None,  # the full chat-templated prompt text the model saw
        "reply_raw": None,  # the reply with its special tokens (generated_text has them stripped)
    }
    start = time.perf_counter()
    from prunevid_bench.harness.inputs import load_average

    record["torch_threads"] = torch.get_num_threads()
    try:
        prepared = pipe.prepare(_video_input(sample, cfg, pipe), format_mc_prompt(sample.question, sample.options), cfg)
        record["prompt"] = prepared.prompt
        record["prepare_s"] = time.perf_counter() - start
        result = pipe.run(prepared, config=cfg)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()  # free what the failed sample held so the next one can run
        record["error"] = f"CUDA out of memory: {_first_line(exc)}"
        record["error_transient"] = True
        return record
    except Exception as exc:  # noqa: BLE001 - one bad sample must not end a long run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        record["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        record["error_transient"] = is_transient(exc)
        return record
    if answer_mode == "logits":
        n = len(sample.options)
        logits = result.first_token_logits[letter_ids[:n]].float()
        index, status = int(logits.argmax()), "parsed"
        record["option_logits"] = [round(float(x), 6) for x in logits]
    else:
        index, status = parse_choice(result.generated_text, len(sample.options), sample.options)
    prediction = None if index is None else LETTERS[index]
    record.update(prediction=prediction, correct=prediction == sample.answer_letter, parse_status=status)
    record.update({k: v for k, v in result.to_dict().items() if k not in RESULT_EXCLUDE})
    record["reply_raw"] = pipe.processor.tokenizer.decode(result.generated_token_ids, skip_special_tokens=False)
    record["sample_s"] = time.perf_counter() - start
    record["load_average"] = load_average()  # 1, 5, 15 minutes, as the sample ended
    return record


def _video_input(sample: QASample, cfg: RunConfig, pipe):
    """The path, or for a question with clip bounds (MVBench) the frames sampled inside them
    under the run's video policy."""
    if sample.start is None and sample.end is None:
        return sample.video
    from prunevid_bench.video import load_clip

    return load_clip(sample.video, request=pipe.video_request(cfg), start=sample.start, end=sample.end)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
