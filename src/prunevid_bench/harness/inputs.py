"""What a run fed the model and how it ran it: recorded when a run starts, checked before runs
are set side by side.

Two runs are comparable only when the same model (name and weights), family, dtype, device,
attention implementation, video policy, pixel budgets, frame sampling, decoder, prompt template
and transformers version produced them; otherwise a difference in accuracy or time may come from the
inputs, not from the method. ``compare``, ``summarize`` (against its baseline), the sweep table
and the lmms-eval records read the same fields; a mismatch is refused with the fields named
unless the user passes ``--allow-mixed``, and then the differing fields are shown as columns.

This module imports no torch: the readers run in commands that only read run folders.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from prunevid_bench.errors import PruneVidError

FRAME_KEYS = ("num_frames", "fps", "max_frames")
PIXEL_KEYS = ("max_pixels", "min_pixels", "total_pixels")


# ---------------------------------------------------------------------------------------------
# Recording (at run start, from the loaded pipeline)


def file_sha256(path: Path, limit: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:limit]


def weights_identity(name: str, model: Any) -> str:
    """Which weights: a built-in model by name (the shipped toy with its file's hash), a local
    checkpoint by its absolute path, a Hub id with the commit it was downloaded at when known."""
    from prunevid_bench.models.loading import BUILTIN

    from prunevid_bench.toy.model import TOY_DIRS, WEIGHTS_FILE

    if name in TOY_DIRS:
        return f"{name} sha256:{file_sha256(TOY_DIRS[name] / WEIGHTS_FILE)}"
    if name in BUILTIN:
        return f"{name} (built in code, seeded)"
    if Path(name).exists():
        return str(Path(name).resolve())
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"{name}@{commit}" if commit else name


def prompt_template_id(processor: Any) -> str:
    """A short hash of the chat template and of our multiple-choice wording: what turns a
    question into the prompt's text."""
    from prunevid_bench.choices import format_mc_prompt

    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    text = f"{template}\n{format_mc_prompt('Q?', ['a', 'b'])}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def busy_note(load: list[float] | None) -> str | None:
    """A warning when the machine is busier than its cores: timings then measure the queue."""
    cores = os.cpu_count() or 1
    if load is None or load[0] <= cores:
        return None
    return (f"load average {load[0]:.1f} exceeds the {cores} cores: other processes compete for them, "
            "so timings are inflated; rerun on a quiet machine or with --threads 1")


def recorded_identity(pipe: Any, cfg: Any = None) -> dict[str, Any]:
    """The fields environment.json adds for the comparability check (beside dtype, device,
    attention and the transformers version, which it records already)."""
    model = pipe.model
    return {
        "model_name": pipe.model_name,  # what was loaded (a pipeline passed in may not be cfg.model.name)
        "model_weights": weights_identity(pipe.model_name, model),
        "model_family": getattr(getattr(model, "config", None), "model_type", None),
        "prompt_template": prompt_template_id(pipe.processor),
        "video_policy": pipe.video_policy(cfg),
        "load_average_start": load_average(),
        "cpu_count": os.cpu_count(),
    }


# ---------------------------------------------------------------------------------------------
# Reading back and checking


def _first_record(run) -> dict[str, Any]:
    if run.result is not None:
        return run.result
    return next((r for r in run.records.values() if not r.get("error")), {})


def _device(env: dict[str, Any]) -> str | None:
    device = env.get("device")
    if device is None:
        return None
    kind = str(device).split(":")[0]
    return kind if kind == "cpu" else f"{kind} {env.get('device_name') or ''}".strip()  # cuda:0 ~ cuda:1 of one GPU kind


def _video(run, keys: tuple[str, ...]) -> str:
    video = run.config.get("video", {})
    return " ".join(f"{k}={video.get(k)}" for k in keys if video.get(k) is not None) or "policy default"


# label -> reader(run) -> a value, or None when the run did not record it (older folders)
FIELDS: dict[str, Callable[[Any], Any]] = {
    "model": lambda run: run.environment.get("model_name") or run.config.get("model", {}).get("name"),
    "weights": lambda run: run.environment.get("model_weights"),
    "family": lambda run: run.environment.get("model_family") or _first_record(run).get("model_family"),
    "dtype": lambda run: run.environment.get("dtype"),
    "device": lambda run: _device(run.environment),
    "attention": lambda run: run.environment.get("attn_implementation") or run.config.get("model", {}).get("attn_implementation"),
    "policy": lambda run: _first_record(run).get("video_policy") or run.environment.get("video_policy"),
    "pixels": lambda run: _video(run, PIXEL_KEYS),
    "frames": lambda run: _video(run, FRAME_KEYS),
    "decoder": lambda run: _first_record(run).get("video_backend"),
    "prompt": lambda run: run.environment.get("prompt_template"),
    "transformers": lambda run: run.environment.get("transformers"),
}
# A sweep's frames control samples fewer frames on purpose, and a sweep cell changes the keys it
# sweeps on purpose (its "overrides"): those fields are not held against it.
EXEMPT = {"control_frames": ("frames",)}
KEY_FIELDS = {**{f"video.{k}": "frames" for k in FRAME_KEYS}, **{f"video.{k}": "pixels" for k in PIXEL_KEYS},
              "video.policy": "policy", "video.decoder": "decoder"}


def _exempt(run) -> set[str]:
    return {*EXEMPT.get(run.meta.get("kind"), ()), *(KEY_FIELDS[k] for k in run.meta.get("overrides") or {} if k in KEY_FIELDS)}


def identity(run) -> dict[str, Any]:
    """The run's value of every field (None: not recorded)."""
    return {label: read(run) for label, read in FIELDS.items()}


def differing(runs: list, reference) -> list[str]:
    """The fields on which some run differs from ``reference`` (unrecorded values are skipped)."""
    ref = identity(reference)
    out: set[str] = set()
    for run in runs:
        mine, exempt = identity(run), _exempt(run) | _exempt(reference)
        out |= {label for label in FIELDS if label not in exempt and None not in (mine[label], ref[label])
                and mine[label] != ref[label]}
    return [label for label in FIELDS if label in out]  # in FIELDS order


def check_same_inputs(runs: list, reference, allow_mixed: bool = False, what: str = "compare") -> list[str]:
    """The differing fields; a refusal naming them (and one example) unless ``allow_mixed``."""
    fields = differing(runs, reference)
    if fields and not allow_mixed:
        ref = identity(reference)
        other = next(r for r in runs if any(identity(r)[f] not in (None, ref[f]) for f in fields))
        first = next(f for f in fields if identity(other)[f] not in (None, ref[f]))  # one it differs in
        raise PruneVidError(
            f"cannot {what}: {other.name} and {reference.name} differ in {', '.join(fields)} "
            f"({first} {identity(other)[first]} vs {ref[first]}): the model saw different inputs or ran "
            "differently; pass --allow-mixed to compare anyway")
    return fields


def folder_inputs(path: Path):
    """A run folder's recorded inputs, finished or not (its config, environment and logs), as an
    object ``identity`` reads."""
    from prunevid_bench.harness.runs import SavedRun, read_run_samples
    from prunevid_bench.report import read_json

    meta = read_json(path / "config.json", "restore it, or rerun with --force", ("config",))
    env_path = path / "environment.json"
    env = read_json(env_path, "restore it, or rerun with --force") if env_path.is_file() else {}
    config = meta.pop("config")
    return SavedRun(Path(path), meta, config, {}, None, read_run_samples(path), env)


def baseline_mismatch(run_dir: Path, baseline: Path) -> str | None:
    """Why ``baseline`` cannot be agreed with (the fields in which its inputs differ), or None."""
    try:
        check_same_inputs([folder_inputs(Path(run_dir))], folder_inputs(Path(baseline)), what="compare with --baseline")
    except PruneVidError as exc:
        return str(exc).removesuffix("; pass --allow-mixed to compare anyway")
    return None


def model_text(name: str | None) -> str:
    """A model's name for a table column: a path or Hub id by its last part."""
    return "-" if not name else Path(str(name).rstrip("/")).name or str(name)
