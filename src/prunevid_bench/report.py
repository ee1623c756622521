"""The run record (one sample's measurements) and the run folder it is written to."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunevid_bench.config import PROJECT_ROOT, RunConfig
from prunevid_bench.errors import PruneVidError

if TYPE_CHECKING:
    import torch


@dataclass
class Reduction:
    """What one token-reduction method did in one run (``RunResult.reductions``, in run order).
    Tokens are visual tokens; KV bytes are the prefill's cache with the prompt as it entered and
    left the method (measured for an LLM-layer method, per-token bytes times length otherwise)."""

    method: str
    acts: str  # vision_encoder | visual_tokens | llm_layer | decode (tokens: in the cache -> attended per step, mean;
    # KV bytes: read by every layer over the decoding steps, without -> with the method)
    tokens_in: int
    tokens_out: int
    seconds: float
    kv_bytes_before: int
    kv_bytes_after: int


# Old record names, kept beside the new ones for one release: old -> new. The record names
# places, not PruneVid's stages: the prompt, before the LLM (after the visual-token methods),
# after the LLM-layer method. The old names are written beside the new ones for this release,
# and read (``record_get``, ``with_place_names``) only where an old run folder lacks the new ones.
RECORD_ALIASES = {
    "tokens_before": "tokens_after_visual_methods",
    "tokens_after": "visual_tokens_kept",
    "total_compression_ratio": "visual_tokens_kept_ratio",
    "tokens_before_stage1": "visual_tokens",
    "tokens_after_stage1": "tokens_after_visual_methods",
    "stage2_tokens_before": "tokens_after_visual_methods",
    "stage2_tokens_after": "visual_tokens_kept",
    "stage1_s": "visual_methods_s",
    "stage2_s": "layer_method_s",
}


def record_get(record: dict[str, Any], name: str, default: Any = None) -> Any:
    """A record's field by its place name; a record of an old run folder may hold it only under
    an old name (``RECORD_ALIASES``)."""
    if name in record:
        return record[name]
    return next((record[old] for old, new in RECORD_ALIASES.items() if new == name and old in record), default)


def with_place_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """A summary's metrics, with those an old run folder wrote under old names also under the new."""
    out = dict(metrics)
    for old, new in RECORD_ALIASES.items():
        if old in metrics and new not in out:
            out[new] = metrics[old]
    return out


@dataclass
class RunResult:
    """What one sample's run measured. Token counts are read off tensors, never inferred."""

    generated_text: str
    generated_tokens: int
    prompt_tokens: int  # the full, unpruned prompt
    visual_tokens: int  # video placeholder tokens in the prompt (before any method)
    video_grid_thw: list[list[int]]
    num_frames: int
    sampled_fps: float
    video_backend: str
    ttft_s: float
    vision_encoder_s: float
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float | None
    peak_memory_bytes: int
    prefill_peak_memory_bytes: int
    decode_peak_memory_bytes: int
    memory_kind: str
    kv_cache_bytes: int  # after prefill (after the LLM-layer method's KV compaction when on)
    kv_cache_bytes_uncompressed: int  # the same cache before that compaction (= kv_cache_bytes when none)
    tokens_after_visual_methods: int  # visual tokens entering the LLM (after the vision-encoder and visual-token methods)
    visual_methods_s: float  # time of the vision-encoder and visual-token methods
    layer_method_s: float  # time of the LLM-layer method (scoring and compaction)
    visual_tokens_kept_ratio: float  # visual tokens kept by all methods / in the prompt
    llm_prefill_tokens: int  # sequence length the LLM's first layer saw
    prefill_chunk_tokens: int = 0  # prefill.chunk_tokens: the decoder layers ran in chunks of this many rows (0: whole)
    # peak memory of each prefill phase the patch closed: before_llm (vision encoder, visual-token
    # methods), layers_0_to_k, method, layers_after_k (or llm_layers without an LLM-layer method), lm_head
    prefill_peak_memory_by_phase: dict[str, int] = field(default_factory=dict)
    video_policy: str = "processor"  # how the frames were chosen and sized (video.policy, resolved)
    frame_indices: list[int] = field(default_factory=list)  # source frame of each sampled frame (first video)
    frame_size: list[int] = field(default_factory=list)  # [h, w] fed to the model, after any resize (first video)
    decoded_size: list[int] = field(default_factory=list)  # [h, w] as decoded, before any resize (first video)
    second_per_grid_ts: list[float] = field(default_factory=list)  # seconds per temporal grid step, per video
    videos: list[dict[str, Any]] | None = None  # per video, when the prompt has several
    visual_tokens_kept: int | None = None  # after the LLM-layer method (every method); 0 when every visual token was pruned
    visual_methods: list[str] = field(default_factory=list)  # the methods acting before the LLM, in order
    layer_method: str | None = None  # the LLM-layer method, if any
    pruning_layer: int | None = None  # the absolute layer K the LLM-layer method pruned at (None when off)
    pruning_layer_spec: int | str | None = None  # K as configured: an index or "K/N" (None when off)
    # hybrid models (Qwen3.5): kv_cache_bytes counts the full-attention layers' keys and values only
    pruning_layer_requested: int | None = None  # K as the spec names it, before it moved to a full-attention layer
    recurrent_state_bytes: int | None = None  # the linear layers' conv + recurrent states after prefill
    linear_layers_0_to_k: int | None = None  # linear layers that ran on every token (LLM-layer method on)
    tokens_absorbed_by_linear_layers: int | None = None  # the dropped visual tokens folded into their states
    absorbed_share: float | None = None  # ... as a share of the rows that entered the LLM
    model_family: str | None = None  # the checkpoint's model_type (qwen2_5_vl, qwen2_vl)
    methods: list[str] = field(default_factory=list)  # the reduction methods applied, in order
    reductions: list[Reduction] = field(default_factory=list)  # one per method, in order
    method_fields: dict[str, Any] = field(default_factory=dict)  # fields other methods add to the record
    prefill_flops: int | None = None  # analytic (flops.py): vision encoder + LLM prefill of this run
    prefill_flops_baseline: int | None = None  # the same input with no reduction
    ideal_speedup: float | None = None  # prefill_flops_baseline / prefill_flops: if time followed FLOPs
    prefill_flops_fraction: float | None = None  # prefill_flops / prefill_flops_baseline: what the run paid
    visual_tokens_per_layer: float | None = None  # visual tokens each LLM layer's prefill saw, mean over layers
    generated_token_ids: list[int] = field(default_factory=list)
    # the vision tower's output came from a feature cache: vision_encoder_s is the time measured
    # when it was computed, and ttft_s = that time + this run's measured post-vision time
    vision_cached: bool = False
    vision_mergers_s: float = 0.0  # of vision_encoder_s: the patch merger(s); the rest is the blocks (and patch embedding)
    first_token_logits: Any = field(default=None, repr=False)  # tensor; not serialised

    def __getattr__(self, name: str) -> Any:
        """The old names (``RECORD_ALIASES``, for one release) and the methods' own record fields."""
        if name in RECORD_ALIASES:
            return getattr(self, RECORD_ALIASES[name])
        fields = self.__dict__.get("method_fields") or {}
        if name in fields:
            return fields[name]
        raise AttributeError(f"{type(self).__name__} has no field '{name}'")

    def to_dict(self) -> dict[str, Any]:
        skip = ("first_token_logits", "method_fields")
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        data["reductions"] = [dataclasses.asdict(r) for r in self.reductions]
        data.update(self.method_fields)
        for old, new in RECORD_ALIASES.items():
            data[old] = data[new]
        return data


CSV_EXCLUDE = {"generated_token_ids", "videos"}


def environment(cfg: RunConfig, model: Any, device: torch.device) -> dict[str, Any]:
    import torch  # here, not at the top: commands that only read run folders import no torch
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),  # what this run used
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_cuda_build": torch.version.cuda,  # the CUDA torch was built for; set on a CPU run too
        "cuda_device_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "packages": package_versions(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


# Not declared by us but deciding results: tokenisation, numerics, image handling, Hub access.
TRANSITIVE_PACKAGES = ("numpy", "tokenizers", "huggingface-hub", "pillow", "accelerate")


def package_versions() -> dict[str, str | None]:
    """Installed version of every declared dependency (and a few transitive ones); None when absent."""
    from importlib import metadata

    names = [*_declared_dependencies(), *TRANSITIVE_PACKAGES]
    versions: dict[str, str | None] = {}
    for name in dict.fromkeys(names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _declared_dependencies() -> list[str]:
    """Names from this checkout's pyproject.toml, else from the installed package's metadata."""
    from importlib import metadata

    pyproject = PROJECT_ROOT / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"]
        specs = [*project.get("dependencies", []), *(s for extra in project.get("optional-dependencies", {}).values() for s in extra)]
    else:
        try:
            specs = metadata.requires("prunevid-bench") or []
        except metadata.PackageNotFoundError:
            specs = []
    return [re.split(r"[\s\[;<>=!~(]", spec, maxsplit=1)[0] for spec in specs]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:limit] or "run"


def check_writable(folder: Path) -> None:
    """Refuse a results folder that cannot be written before any model time is spent; creates nothing."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PruneVidError(f"{existing} is a file, not a folder; pass another --results-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PruneVidError(f"cannot write to {existing} (read-only or not yours); pass a writable --results-dir")


def new_run_dir(root: Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{slug(label)}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        tmp.replace(path)  # atomic: a killed run never leaves half a file
    except OSError:  # a full or read-only disk: the old file stays whole, drop the partial copy
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, fix: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object from a run folder; a damaged one (truncated, edited, a list) is a one-line
    error ending in ``fix``, what the user should do about it."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PruneVidError(f"{path} is damaged (not valid JSON: {exc}); {fix}") from None
    if not isinstance(data, dict):
        raise PruneVidError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); {fix}")
    missing = [key for key in required if key not in data]
    if missing:
        raise PruneVidError(f"{path} is damaged (no '{missing[0]}'); {fix}")
    return data


def _jsonable(value: Any) -> Any:
    if type(value).__module__.startswith("torch") and hasattr(value, "tolist"):  # a tensor (torch is not imported here)
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv_row(path: Path, row: dict[str, Any]) -> None:
    flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items() if k not in CSV_EXCLUDE}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)
