"""``prunevid sweep --interleave``: question i through every cell back to back, on one model.

A serial sweep runs cell after cell, minutes apart: a change of load on the machine (another
job, thermal throttling, a cold cache) lands on some cells and not others, and the ratio of their
median TTFTs credits it to the method. Interleaved, each question is answered by every cell
within a second or two, so the per-question ratio TTFT(cell) / TTFT(baseline) is measured under
the same load; the table reports its median and interquartile range beside the ratio of medians
(``paired_speedup``).

The methods are hooks on the one loaded model (``Pipeline.run`` applies each cell's), so
switching cells costs nothing. Each cell keeps its own run folder and log, exactly as in a serial
sweep: an interrupted interleaved sweep resumes interleaved or serially, and the records (answers,
token counts) are the same either way. The first ``--warmup`` questions go through every cell
once, untimed, before anything is logged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from prunevid_bench.harness.evaluate import (
    EvalResult,
    letter_token_ids,
    needs_retry,
    open_for_samples,
    run_sample,
    say_if_busy,
    summarize_run,
    warm_up,
)
from prunevid_bench.harness.runlock import RunLock
from prunevid_bench.harness.runs import SampleLog, spread


def run_interleaved(cells: list, plan, get_pipe, folders: dict[str, Path], options, meta_of, console: Console,
                    ) -> dict[str, EvalResult]:
    """Every cell of ``cells`` over ``plan``, question by question; ``folders``: cell name -> its
    run folder; ``meta_of(cell)``: its header. Returns each cell's result, as ``evaluate_plan`` does."""
    names = [c.name for c in cells]
    with contextlib.ExitStack() as stack:
        note = lambda text: console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)  # noqa: E731
        for cell in cells:
            stack.enter_context(RunLock(folders[cell.name], wait=options.wait, note=note))
        done, logs = {}, {}
        for cell in cells:
            done[cell.name], log_path = open_for_samples(cell.config, plan, get_pipe, folders[cell.name], meta_of(cell),
                                                         options.answer_mode, options.force, console)
            logs[cell.name] = stack.enter_context(SampleLog(log_path))
        todo = {n: {s.id for s in plan.runnable if s.id not in done[n] or needs_retry(done[n][s.id])} for n in names}
        pending = [s for s in plan.runnable if any(s.id in todo[n] for n in names)]
        ran = {n: 0 for n in names}
        if pending:
            pipe = get_pipe()
            letter_ids = (letter_token_ids(pipe.processor.tokenizer, max(len(s.options) for s in pending))
                          if options.answer_mode == "logits" else None)
            say_if_busy(console, "at the start")
            for cell in cells:
                warm_up(pipe, cell.config, pending[:options.warmup], options.answer_mode, letter_ids)
            for i, sample in enumerate(pending, start=1):
                for cell in cells:
                    if sample.id in todo[cell.name]:
                        record = run_sample(pipe, cell.config, sample, options.answer_mode, letter_ids)
                        logs[cell.name].write(record)
                        ran[cell.name] += 1
                console.print(f"  question {i}/{len(pending)} through {len(cells)} cells", highlight=False,
                              soft_wrap=True)
            say_if_busy(console, "at the end")
    results: dict[str, EvalResult] = {}
    baseline = None
    for cell in cells:  # the baseline cell comes first: the others' agreement is with it
        summary, records = summarize_run(folders[cell.name], baseline)
        results[cell.name] = EvalResult(folders[cell.name], summary, records, ran[cell.name])
        if cell.kind == "baseline":
            baseline = records
    return results


def paired_speedup(records: list[dict[str, Any]], base_records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per question answered by both without error, TTFT(baseline) / TTFT(cell): the median with
    its quartiles (``spread``), and beside it the ratio of the two median TTFTs. None without pairs."""
    base = {str(r["id"]): r for r in base_records if not r.get("error") and r.get("ttft_s")}
    pairs = [(base[str(r["id"])]["ttft_s"], r["ttft_s"]) for r in records
             if not r.get("error") and r.get("ttft_s") and str(r["id"]) in base]
    if not pairs:
        return None
    ratios = spread(b / c for b, c in pairs)
    of_medians = spread(b for b, _ in pairs)["median"] / spread(c for _, c in pairs)["median"]
    return {"n": ratios["n"], "median": ratios["median"], "p25": ratios["p25"], "p75": ratios["p75"],
            "ratio_of_medians": of_medians}
