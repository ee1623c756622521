"""The run record (one sample's measurements) and the run folder it is written to."""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunevid_bench.config import PROJECT_ROOT, RunConfig


@dataclass
class RunResult:
    """What one sample's run measured. Token counts are read off tensors, never inferred."""

    generated_text: str
    generated_tokens: int
    prompt_tokens: int  # the full, unpruned prompt
    visual_tokens: int  # video placeholder tokens in the prompt (= before Stage 1)
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
    kv_cache_bytes: int  # after prefill (after Stage 3 when on)
    kv_cache_bytes_uncompressed: int  # the same cache before Stage 3 (= kv_cache_bytes when off)
    tokens_before_stage1: int
    tokens_after_stage1: int
    stage1_segments: int | None
    stage1_static_tokens: int | None
    stage1_dynamic_tokens: int | None
    stage1_s: float
    tokens_before: int  # visual tokens entering Stage 2
    tokens_after: int  # visual tokens leaving Stage 2
    stage2_s: float
    total_compression_ratio: float  # visual tokens after all stages / before Stage 1
    llm_prefill_tokens: int  # sequence length the LLM's first layer saw
    video_policy: str = "processor"  # how the frames were chosen and sized (video.policy, resolved)
    frame_indices: list[int] = field(default_factory=list)  # source frame of each sampled frame (first video)
    frame_size: list[int] = field(default_factory=list)  # [h, w] given to the processor (first video)
    second_per_grid_ts: list[float] = field(default_factory=list)  # seconds per temporal grid step, per video
    videos: list[dict[str, Any]] | None = None  # per video, when the prompt has several
    visual_tokens_kept: int | None = None  # = tokens_after; 0 when every visual token was pruned
    pruning_layer: int | None = None  # the absolute layer K Stage 2 pruned after (None when off)
    pruning_layer_spec: int | str | None = None  # K as configured: an index or "K/N" (None when off)
    generated_token_ids: list[int] = field(default_factory=list)
    first_token_logits: Any = field(default=None, repr=False)  # tensor; not serialised

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "first_token_logits"}
        return data


CSV_EXCLUDE = {"generated_token_ids", "videos"}


def environment(cfg: RunConfig, model: Any, device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


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
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)  # atomic: a killed run never leaves half a file


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
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
