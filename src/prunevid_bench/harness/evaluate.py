"""Scenario: evaluate a multiple-choice video QA dataset into a resumable run folder.

Flow: read the dataset -> seeded ``--limit`` sample (ids recorded) -> preflight: missing or
undecodable videos are listed, reported and skipped BEFORE the model is loaded -> per sample:
lettered prompt, one run, a prediction, one flushed line in ``samples.jsonl`` -> summary.

Predictions: ``generate`` parses the reply with the letter parser (unparsed counts as wrong and
is reported); ``logits`` takes the option letter whose token has the highest first-token logit
(each letter must be one token of the processor's tokenizer).

Resume design: the run folder name is ``<label or preset>-<dataset stem>-<hash>`` where the hash
covers the resolved config, the answer mode and the exact questions selected (ids, options,
answers: so ``--limit``/``--seed`` are in it). No timestamp, so restarting the same command
lands in the same folder and skips every sample already logged; a sample that ended in an error
is retried. ``--force`` starts the folder over: the old log and its summaries move to a new
``backup-<N>/`` (never overwritten). A folder whose stored config differs (possible with an
explicit folder, e.g. a sweep cell) is refused rather than mixed. The summary is recomputed from
the whole log at the end. One process at a time holds a run folder (``runlock``); a second one is
refused, or with ``wait`` queues behind the first.

Split over processes (``torchrun``/``accelerate launch``, see ``harness.shard``): each rank runs
its shard into its own log under its own lock; the summary merges every log, written by each rank
as it ends (rank 0 waits for the others first), or at any time by ``prunevid summarize``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunevid_bench.config import RunConfig
from prunevid_bench.errors import PruneVidError
from prunevid_bench.choices import LETTERS, format_mc_prompt, letter_token_ids, parse_choice
from prunevid_bench.harness.datasets import QASample, load_dataset, preflight, sample_rows
from prunevid_bench.harness.progress import progress_for
from prunevid_bench.harness.runlock import RunLock, held_locks, meta_lock
from prunevid_bench.harness.runs import (
    CONFIG_FILE,
    PLAN_FILE,
    SUMMARY_FILE,
    SampleLog,
    back_up,
    diff_keys,
    fingerprint_hash,
    flat_row,
    identity_config,
    needs_retry,
    read_run_samples,
    run_files,
    sample_logs,
    summarise,
)
from prunevid_bench.harness.shard import (
    Shard,
    missing_samples,
    rank_summary,
    record_rank_environment,
    wait_for_other_ranks,
    world_of_lock,
)
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.report import read_json, slug, write_csv_row, write_json
from prunevid_bench.terminal import printable

RESULT_EXCLUDE = {"generated_token_ids", "first_token_logits"}


@dataclass
class DatasetPlan:
    """The questions a run will ask: read, sampled and preflighted once (a sweep shares it)."""

    name: str
    format: str
    path: Path
    selected: list[QASample]  # after --limit, in file order
    runnable: list[QASample]  # selected and passed preflight
    skipped: list[dict[str, str]]  # {"id", "reason", "stage": "dataset" | "preflight"}
    limit: int | float | None
    seed: int
    n_usable: int | None = None  # rows of the file that parsed into questions (None: all selected)
    sample: str = "random"  # how --limit chose: random (seeded) | first
    offset: int = 0

    def counts(self) -> dict[str, int]:
        """How the rows divide, so that every figure shown adds up: rows = usable + unusable,
        selected (of the usable, after --limit) = ready + skipped in preflight."""
        unusable = sum(1 for s in self.skipped if s["stage"] == "dataset")
        usable = len(self.selected) if self.n_usable is None else self.n_usable
        return {"rows": usable + unusable, "unusable": unusable, "selected": len(self.selected),
                "ready": len(self.runnable), "skipped_preflight": len(self.skipped) - unusable}

    def identity(self) -> dict[str, Any]:
        """What decides which questions are asked: part of every run's fingerprint."""
        content = [
            [s.id, s.question, list(s.options), s.answer_index, s.video.name, s.start, s.end] for s in self.selected
        ]
        digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
        ident = {"name": self.name, "format": self.format, "limit": self.limit, "seed": self.seed,
                 "n_selected": len(self.selected), "questions_sha256": digest}
        if (self.sample, self.offset) != ("random", 0):  # named only when used: earlier folders keep their names
            ident.update(sample=self.sample, offset=self.offset)
        return ident


@dataclass
class EvalResult:
    run_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    ran: int  # samples run by this call (0 when everything was already logged)


def plan_dataset(
    dataset: DatasetSpec,
    *,
    check: Callable[[Path], Any] | None = None,
    console: Console | None = None,
) -> DatasetPlan:
    """Read, sample and preflight a dataset; print what was skipped and why."""
    from prunevid_bench.video import check_video

    console = console or Console()
    ds = load_dataset(dataset.path, video_root=dataset.video_root, answers=dataset.answers, format=dataset.format,
                      allow_outside_root=dataset.allow_outside_root)
    limit, seed = dataset.limit, dataset.seed
    selected = sample_rows(ds.samples, limit, seed, dataset.sample, dataset.offset)
    runnable, problems = preflight(selected, check or check_video)
    skipped = [{"id": i, "reason": r, "stage": "dataset"} for i, r in ds.skipped]
    skipped += [{"id": i, "reason": r, "stage": "preflight"} for i, r in problems]
    plan = DatasetPlan(ds.name, ds.format, ds.path, selected, runnable, skipped, limit, seed, n_usable=len(ds),
                       sample=dataset.sample, offset=dataset.offset)
    console.print(f"dataset {escape(ds.name)} ({ds.format}): {counts_line(plan)}", highlight=False, soft_wrap=True)
    for item in skipped[:10]:
        console.print(f"  [yellow]skipped[/] {shown(item['id'])} ({item['stage']}): {shown(item['reason'])}",
                      highlight=False, soft_wrap=True)
    if len(skipped) > 10:
        console.print(f"  ... and {len(skipped) - 10} more (all listed in summary.json)")
    if not runnable:
        raise PruneVidError(f"no question of {ds.name} passed preflight; check the videos and --video-root")
    return plan


def counts_line(plan: DatasetPlan) -> str:
    """``5 rows, 1 unusable; 4 selected; preflight: 2 ready, 2 skipped``."""
    c = plan.counts()
    rows = f"{c['rows']} rows" + (f", {c['unusable']} unusable" if c["unusable"] else "")
    start = f" from row {plan.offset}" if plan.offset else ""
    if c["selected"] < c["rows"] - c["unusable"]:
        sampled = f" (the first{start})" if plan.sample == "first" else f" (seeded sample{start}, seed {plan.seed})"
    else:
        sampled = ""
    skipped = f", {c['skipped_preflight']} skipped" if c["skipped_preflight"] else ""
    return f"{rows}; {c['selected']} selected{sampled}; preflight: {c['ready']} ready{skipped}"


def run_fingerprint(cfg: RunConfig, plan: DatasetPlan, answer_mode: str) -> dict[str, Any]:
    return {"config": identity_config(cfg.to_dict()), "answer_mode": answer_mode, "dataset": plan.identity()}


def default_run_dir(results_dir: Path, label: str | None, preset: str | None, plan: DatasetPlan,
                    fingerprint: dict[str, Any]) -> Path:
    return Path(results_dir) / f"{slug(label or preset or 'custom')}-{slug(plan.name)}-{fingerprint_hash(fingerprint)}"


def load_baseline(baseline: Path | None) -> list[dict[str, Any]] | None:
    if baseline is None:
        return None
    if not sample_logs(Path(baseline)):
        raise PruneVidError(f"--baseline {baseline} is not a dataset run folder (no samples.jsonl)")
    return list(read_run_samples(Path(baseline)).values())


def evaluate_dataset(
    cfg: RunConfig,
    dataset: DatasetSpec,
    options: EvalOptions = EvalOptions(),
    *,
    console: Console | None = None,
    pipeline=None,
) -> EvalResult:
    """``prunevid run --dataset``: plan, preflight, then load the model (unless given) and run.
    Under torchrun or accelerate launch, this process's shard only (``harness.shard``)."""
    console = console or Console()
    shard = Shard.from_env()
    if shard.split and options.force:
        raise PruneVidError("--force cannot be split over processes (the ranks would move each other's logs); "
                            "run it once with one process, or delete the run folder")
    if shard.rank != 0:
        console = Console(quiet=True)  # rank 0 speaks for the launch; every rank's rows are in its log
    plan = plan_dataset(dataset, console=console)
    baseline_records = load_baseline(options.baseline)
    fingerprint = run_fingerprint(cfg, plan, options.answer_mode)
    run_dir = default_run_dir(options.results_dir, options.label, options.preset, plan, fingerprint)
    if pipeline is None:  # the folder's name and config keep the device as given; the rank loads on its own
        device = shard.device(cfg.model.device)
        pipeline = pipeline_loader(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device)))
    pipeline = with_feature_cache(pipeline, options, default_gb=0)
    meta = {"scenario": "dataset", "label": options.label, "preset": options.preset,
            "baseline": str(options.baseline) if options.baseline else None}
    try:
        return evaluate_plan(cfg, plan, pipeline, run_dir, options, meta=meta, baseline_records=baseline_records,
                             console=console, shard=shard)
    finally:
        pipeline.detach()  # the caller's pipeline does not keep this run's cache


def pipeline_loader(cfg: RunConfig) -> Callable[[], Any]:
    """Load the model on first use only: a finished run that is rerun never loads it."""
    loaded: list[Any] = []

    def get():
        if not loaded:
            from prunevid_bench.pipeline import Pipeline

            loaded.append(Pipeline.from_config(cfg))
        return loaded[0]

    return get


def with_feature_cache(pipe, options: EvalOptions, default_gb: float) -> Callable[[], Any]:
    """``pipe`` (a Pipeline or a function returning one) as a function that returns it with this
    run's vision-feature cache attached (or none: a pipeline shared with an earlier sweep must not
    keep that sweep's cache)."""
    from prunevid_bench.feature_cache import FeatureCache

    gigabytes = default_gb if options.feature_cache_gb is None else options.feature_cache_gb
    cache = FeatureCache.from_options(gigabytes, options.feature_cache, options.feature_cache_shared)
    get_pipe = pipe if callable(pipe) else (lambda: pipe)

    attached = []

    def get():
        loaded = get_pipe()
        loaded.feature_cache = cache
        attached.append(loaded)
        return loaded

    def detach() -> None:
        """Take this cache off every pipeline it was attached to (a caller's pipeline outlives the run)."""
        for loaded in attached:
            if loaded.feature_cache is cache:
                loaded.feature_cache = None
        attached.clear()

    get.detach = detach
    return get


def evaluate_plan(
    cfg: RunConfig,
    plan: DatasetPlan,
    pipe,
    run_dir: Path,
    options: EvalOptions = EvalOptions(),
    *,
    meta: dict[str, Any] | None = None,
    baseline_records: list[dict[str, Any]] | None = None,
    console: Console | None = None,
    quiet: bool = False,
    shard: Shard = Shard(),
) -> EvalResult:
    """Run every planned question of ``shard`` not yet logged in ``run_dir``; write and return
    the summary (of every log of the folder).

    ``pipe`` is a Pipeline or a function returning one, called only when something must run.
    Of ``options``, the answer mode, ``force`` and ``wait`` apply (the folder is given). The run
    folder (for a rank: its own lock in it) is locked throughout (``wait``: queue behind another
    process holding it).
    """
    console = console or Console()
    with RunLock(run_dir, wait=options.wait, name=shard.lock_name,
                 note=lambda text: console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)):
        other = [n for n in held_locks(run_dir, shard.lock_name) if world_of_lock(n) not in (None, shard.world_size)]
        if other:
            raise PruneVidError(f"{run_dir} is being run by another launch ({other[0]} is held); wait for it to "
                                "finish before starting one with another number of processes")
        return _evaluate_locked(cfg, plan, pipe, run_dir, meta=meta, answer_mode=options.answer_mode,
                                baseline_records=baseline_records, force=options.force, console=console, quiet=quiet,
                                shard=shard, warmup=options.warmup)


def _evaluate_locked(cfg, plan, pipe, run_dir, *, meta, answer_mode, baseline_records, force, console, quiet,
                     shard, warmup=1) -> EvalResult:
    get_pipe = pipe if callable(pipe) else (lambda: pipe)
    done, own_log = open_for_samples(cfg, plan, get_pipe, run_dir, meta, answer_mode, force, console, shard)
    mine = shard.take(plan.runnable)
    todo = [s for s in mine if s.id not in done or needs_retry(done[s.id])]
    if done and not quiet:
        part = f" ({shard.label}: {len(mine) - len(todo)} of its {len(mine)})" if shard.split else ""
        finished = sum(1 for s in plan.runnable if s.id in done and not needs_retry(done[s.id]))
        console.print(f"resuming {run_dir}: {finished} of {len(plan.runnable)} questions already done{part}",
                      soft_wrap=True)
    if todo:
        pipe = get_pipe()
        pipe._apply_stages(cfg)  # a stage setting the model cannot take fails here, not once per sample
        letter_ids = letter_token_ids(pipe.processor.tokenizer, max(len(s.options) for s in todo)) if answer_mode == "logits" else None
        where = {}
        if shard.split:  # each row says which process ran it, on which device
            where = {"rank": shard.rank, "world_size": shard.world_size, "device": str(pipe.device)}
            record_rank_environment(run_dir, shard, pipe)
        logged = {s.id: done[s.id] for s in mine if s.id in done}
        say_if_busy(console, "at the start")
        _run_samples(pipe, cfg, todo, logged, own_log, answer_mode, letter_ids, console, len(mine), where, warmup)
        say_if_busy(console, "at the end")
    if shard.split and shard.rank == 0:
        wait_for_other_ranks(run_dir, shard, console)
    summary, records = summarize_run(run_dir, baseline_records)
    if not quiet:
        console.print(summary_table(summary, title=run_dir.name))
        console.print(f"run folder: {run_dir}", soft_wrap=True)
    return EvalResult(run_dir, summary, records, len(todo))


def open_for_samples(cfg: RunConfig, plan: DatasetPlan, get_pipe, run_dir: Path, meta: dict[str, Any] | None,
                     answer_mode: str, force: bool, console: Console | None, shard: Shard = Shard(),
                     ) -> tuple[dict[str, dict[str, Any]], Path]:
    """Start or resume ``run_dir`` for this run (header, plan) and return the records already
    logged by every process, with the log this process appends to."""
    fingerprint = run_fingerprint(cfg, plan, answer_mode)
    header = {
        **(meta or {}),
        "run": run_dir.name,
        "answer_mode": answer_mode,
        "dataset": {**plan.identity(), "path": str(plan.path)},
        "sample_ids": [s.id for s in plan.selected],
        "fingerprint": fingerprint_hash(fingerprint),
    }
    own_log = run_dir / shard.log_name
    with meta_lock(run_dir) if shard.split else contextlib.nullcontext():  # ranks create the folder once
        open_run_dir(run_dir, cfg, get_pipe, header, fingerprint, force, console)
        write_json(run_dir / PLAN_FILE, {"runnable": [s.id for s in plan.runnable], "skipped": plan.skipped,
                                         "counts": plan.counts(), "n_selected": len(plan.selected)})
    return read_run_samples(run_dir, own=own_log), own_log


def summarize_run(run_dir: Path, baseline_records: list[dict[str, Any]] | None = None,
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary of every log of ``run_dir`` (whichever process wrote it), written to
    summary.json and summary.csv; returned with the records it counted. Without
    ``baseline_records``, agreement is with the run's ``--baseline`` folder, or for a sweep cell
    with its sweep's baseline cell, as the sweep reported it."""
    run_dir = Path(run_dir)
    again = "rerun the run's command (finished samples are kept)"
    if not (run_dir / CONFIG_FILE).is_file():
        raise PruneVidError(f"{run_dir} is not a dataset run folder (no {CONFIG_FILE})")
    meta = read_json(run_dir / CONFIG_FILE, "restore it, or rerun with --force to start this run folder over", ("config",))
    if not (run_dir / PLAN_FILE).is_file():
        raise PruneVidError(f"{run_dir} has no {PLAN_FILE} (written by an older version, or not a dataset run); {again}")
    plan = read_json(run_dir / PLAN_FILE, again, ("runnable", "skipped", "counts", "n_selected"))
    kinds = {"runnable": list, "skipped": list, "counts": dict, "n_selected": int}
    wrong = [key for key, kind in kinds.items() if not isinstance(plan[key], kind) or isinstance(plan[key], bool)]
    if wrong or not all(isinstance(i, str) for i in plan["runnable"]):
        raise PruneVidError(f"{run_dir / PLAN_FILE}: {(wrong or ['runnable'])[0]} has the wrong type; {again}")
    mismatch = None
    if meta.get("baseline"):  # --baseline: no agreement with a run that saw other inputs
        from prunevid_bench.harness.inputs import baseline_mismatch

        mismatch = baseline_mismatch(run_dir, Path(meta["baseline"]))
        if mismatch:
            baseline_records = None
        elif baseline_records is None:
            baseline_records = load_baseline(Path(meta["baseline"]))
    elif baseline_records is None and meta.get("scenario") == "sweep-cell" and meta.get("kind") != "baseline":
        sibling = run_dir.parent / "baseline"  # sweep.cell_folder("baseline")
        baseline_records = load_baseline(sibling) if sample_logs(sibling) else None
    with meta_lock(run_dir):  # the last rank to end reads every finished log
        done = read_run_samples(run_dir)
        records = [done[i] for i in plan["runnable"] if i in done]
        summary = {
            "run": run_dir.name,
            "model": model_of(run_dir, meta),
            "complete": len(records) == len(plan["runnable"]) and not any(r.get("error") for r in records),
            "n_selected": plan["n_selected"],
            "counts": {**plan["counts"], "evaluated": len(records)},
            **summarise(records, plan["skipped"], baseline_records),
        }
        ranks = rank_summary(records)
        if ranks:
            summary["ranks"] = ranks
        summary.update(missing_samples(run_dir, plan["runnable"], done))
        if mismatch:
            summary["baseline_mismatch"] = mismatch
        write_json(run_dir / SUMMARY_FILE, summary)
        write_csv_row(run_dir / "summary.csv", flat_row(meta, summary, meta["config"]))
    return summary, records


def model_of(run_dir: Path, meta: dict[str, Any]) -> str | None:
    """The model that ran: as environment.json recorded it when loaded, else the config's name."""
    env_path = Path(run_dir) / "environment.json"
    env = read_json(env_path, "restore it, or rerun with --force") if env_path.is_file() else {}
    return env.get("model_name") or meta["config"]["model"]["name"]


def open_run_dir(run_dir: Path, cfg: RunConfig, get_pipe, header: dict[str, Any], fingerprint: dict[str, Any],
                 force: bool, console: Console | None = None) -> None:
    """Start or resume a run folder: check that it holds this run, or write its header."""
    from prunevid_bench.single import write_run_header

    config_path = run_dir / CONFIG_FILE
    if config_path.is_file() and not force:
        old = read_json(config_path, "restore it, or rerun with --force to start this run folder over", ("config",))
        old_fp = {"config": identity_config(old.get("config")), "answer_mode": old.get("answer_mode"),
                  "dataset": {k: old.get("dataset", {}).get(k) for k in fingerprint["dataset"]}}
        changed = diff_keys(old_fp, fingerprint)
        if changed:
            raise PruneVidError(
                f"{run_dir} holds a run with different settings ({', '.join(changed[:4])}); "
                "use another --label or --results-dir, or --force to start it over"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    backup = back_up(run_dir, run_files(run_dir))  # --force: every earlier answer is kept; no stale summary stays behind
    if backup is not None and console is not None:
        console.print(f"--force: the earlier results of {run_dir} are kept in {backup.name}/", soft_wrap=True, highlight=False)
    write_run_header(run_dir, cfg, get_pipe(), header)


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


def shown(text: str) -> str:
    """Data-file text (ids, reasons quoting questions or paths) for the console: escape
    sequences and rich markup are printed, not obeyed."""
    return escape(printable(text))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def summary_table(summary: dict[str, Any], title: str = "Summary") -> Table:
    """Accuracy, skips and the medians of one dataset run, for people."""
    from prunevid_bench.single import fmt_seconds, human_bytes

    acc = summary["accuracy"]
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def row(name: str, value: str) -> None:
        table.add_row(shown(name), shown(value))  # "[p25, p75]" is text, not rich markup; categories come from the data

    if summary.get("model"):
        row("model", summary["model"])
    counts = summary.get("counts")
    if counts:  # selected = evaluated + skipped in preflight; skipped = unusable rows + preflight
        pre = f"; {counts['skipped_preflight']} skipped in preflight" if counts["skipped_preflight"] else ""
        row("questions evaluated", f"{acc['n']} (of {counts['selected']} selected{pre})")
    else:  # folders written before counts were recorded
        row("questions evaluated", f"{acc['n']} (of {summary['n_selected']} selected)")
    row("accuracy [95% CI]", f"{fmt_pct(acc['accuracy'])} [{fmt_pct(acc['ci_low'])}, {fmt_pct(acc['ci_high'])}]  ({acc['correct']}/{acc['n']})")
    row("unparsed replies (counted wrong)", str(acc["unparsed"]))
    row("errors (counted wrong)", str(acc["errors"]))
    skipped = str(len(summary["skipped"]))
    if counts and counts["unusable"] and counts["skipped_preflight"]:
        skipped += f" ({counts['unusable']} unusable rows, {counts['skipped_preflight']} in preflight)"
    elif counts and counts["unusable"]:
        skipped += " (unusable rows)"
    row("skipped (not evaluated)", skipped)
    if "agreement" in summary:
        ag = summary["agreement"]
        row("agreement with baseline", f"{fmt_pct(ag['agreement'])} [{fmt_pct(ag['ci_low'])}, {fmt_pct(ag['ci_high'])}] on {ag['n']}")
    if summary.get("baseline_mismatch"):
        row("agreement with baseline", f"not computed: {summary['baseline_mismatch']}")
    if summary.get("paired"):
        from prunevid_bench.harness.answers import paired_text

        row("Δ accuracy vs baseline, paired [95% CI], McNemar p", paired_text(summary["paired"]))
    for name, cat in summary["accuracy"].get("by_category", {}).items():
        row(f"  {name}", f"{fmt_pct(cat['accuracy'])}  ({cat['correct']}/{cat['n']})")
    m = summary["metrics"]

    def med(name, fmt=str):
        return fmt(m[name]["median"]) if name in m else "-"

    row("visual tokens: prompt → LLM → kept (median)",
                  f"{med('tokens_before_stage1', _int)} → {med('tokens_after_stage1', _int)} → {med('tokens_after', _int)}")
    if "ttft_s" in m:
        t = m["ttft_s"]
        row("TTFT median [p25, p75]", f"{fmt_seconds(t['median'])} [{fmt_seconds(t['p25'])}, {fmt_seconds(t['p75'])}]")
    row("decode speed (median)", med("decode_tokens_per_s", lambda v: f"{v:.1f} tok/s"))
    row("peak memory (median)", med("peak_memory_bytes", human_bytes))
    row("KV cache after prefill (median)", med("kv_cache_bytes", human_bytes))
    return table


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _int(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
