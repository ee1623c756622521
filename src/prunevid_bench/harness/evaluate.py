"""Scenario: evaluate a multiple-choice video QA dataset into a resumable run folder.

Flow: read the dataset -> seeded ``--limit`` sample (ids recorded) -> preflight: missing or
undecodable videos are listed, reported and skipped BEFORE the model is loaded -> per sample:
lettered prompt, one run, a prediction, one flushed line in ``samples.jsonl`` -> summary.

The steps live in their own modules: the plan (``harness.plan``), running the questions and
predicting (``harness.samples``), the summary (``harness.summary``); this one opens and locks
the run folder and ties them together.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from prunevid_bench.config import RunConfig
from prunevid_bench.errors import PruneVidError
from prunevid_bench.choices import letter_token_ids
from prunevid_bench.harness.plan import DatasetPlan, counts_line, plan_dataset  # noqa: F401
from prunevid_bench.harness.runlock import RunLock, held_locks, meta_lock
from prunevid_bench.harness.runs import (
    CONFIG_FILE,
    PLAN_FILE,
    back_up,
    diff_keys,
    fingerprint_hash,
    identity_config,
    needs_retry,
    read_run_samples,
    run_files,
)
from prunevid_bench.harness.samples import (  # noqa: F401 - importable from here too
    RESULT_EXCLUDE,
    _first_line,
    _run_samples,
    _video_input,
    is_transient,
    run_sample,
    say_if_busy,
    warm_up,
)
from prunevid_bench.harness.shard import (
    Shard,
    record_rank_environment,
    wait_for_other_ranks,
    world_of_lock,
)
from prunevid_bench.harness.specs import DatasetSpec, EvalOptions
from prunevid_bench.harness.summary import (  # noqa: F401 - importable from here too
    _int,
    fmt_pct,
    load_baseline,
    model_of,
    shown,
    summarize_run,
    summary_table,
)
from prunevid_bench.report import read_json, slug, write_json


@dataclass
class EvalResult:
    run_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    ran: int  # samples run by this call (0 when everything was already logged)


def run_fingerprint(cfg: RunConfig, plan: DatasetPlan, answer_mode: str) -> dict[str, Any]:
    return {"config": identity_config(cfg.to_dict()), "answer_mode": answer_mode, "dataset": plan.identity()}


def default_run_dir(results_dir: Path, label: str | None, preset: str | None, plan: DatasetPlan,
                    fingerprint: dict[str, Any]) -> Path:
    return Path(results_dir) / f"{slug(label or preset or 'custom')}-{slug(plan.name)}-{fingerprint_hash(fingerprint)}"


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


