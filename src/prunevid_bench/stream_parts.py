"""The pieces a stream is built from (``streaming.StreamSession``): the model reached through its
family (the chunk encoder, the prompt's M-RoPE ids), the cache edits, and the records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.families import family_of

VIDEO_MARK = "<|video_pad|>"  # the chat template's single video placeholder, split on below


# ============================================================ the model, through its family
def encode_chunk(pipe, frames: np.ndarray, fps: float, presized: bool = False) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Vision features ``[t * n, C]`` (t-major) and the grid ``(t, h, w)`` of one chunk of frames,
    resized as offline (``messages.processor_size_kwargs``: not at all when ``presized``, the
    policy having sized the frames; else the processor's per-frame rule, never by the chunk's
    length)."""
    from prunevid_bench.messages import processor_size_kwargs

    vp = pipe.processor.video_processor
    kwargs = processor_size_kwargs(vp, pipe.config.video, presized)
    meta = [{"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}]
    out = vp(videos=[frames], video_metadata=meta, do_sample_frames=False, return_tensors="pt", **kwargs)
    dtype = next(pipe.model.parameters()).dtype
    pixels = out["pixel_values_videos"].to(pipe.device, dtype)
    grid = out["video_grid_thw"].to(pipe.device)
    features = family_of(pipe.model).base(pipe.model).get_video_features(pixels, grid).pooler_output[0]
    return features, tuple(int(x) for x in grid[0].tolist())


def temporal_patch(pipe) -> int:
    """Frames per temporal grid step."""
    return family_of(pipe.model).geometry(pipe.model.config).temporal


def merge_size(pipe) -> int:
    """Patches merged per LLM token along each side."""
    return family_of(pipe.model).geometry(pipe.model.config).merge


def prompt_positions(pipe, ids: list[int], n_video: int, video_at: int, grid: tuple[int, int, int],
                          fps: float) -> torch.Tensor:
    """M-RoPE ids ``(3, L)`` of the prompt ``ids[:video_at] + n_video video tokens + ids[video_at:]``,
    as ``get_rope_index`` gives them offline (``second_per_grid_ts`` as the processor sets it, read
    by the families whose M-RoPE follows time)."""
    model = pipe.model
    base = family_of(model).base(model)
    video_id = model.config.video_token_id
    full = ids[:video_at] + [video_id] * n_video + ids[video_at:]
    input_ids = torch.tensor([full], device=pipe.device)
    inputs: dict[str, Any] = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == video_id).long() * 2}
    if n_video:
        inputs["video_grid_thw"] = torch.tensor([grid], device=pipe.device)
        inputs["second_per_grid_ts"] = torch.tensor([temporal_patch(pipe) / fps], device=pipe.device)
    saved = getattr(base, "rope_deltas", None)
    positions = prefill_position_ids(model, inputs)[1:, 0]
    base.rope_deltas = saved  # prefill_position_ids sets it; the session keeps its own state
    return positions


# ============================================================ cache edits (one place)
def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` tokens of every layer (views: no copy)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def select_cache(cache, index: torch.Tensor) -> None:
    """Keep the tokens at ``index`` (ascending) in every layer."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, index.to(layer.values.device))


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


# ============================================================ records
@dataclass
class ChunkRecord:
    """One appended chunk."""

    index: int
    first_frame: int  # index of its first frame in the stream
    frames: int
    tokens_in: int  # the chunk's visual tokens before any method
    tokens_cached: int  # visual tokens it added to the cache (after the visual-token methods)
    evicted: int  # visual tokens --cache-tokens evicted while appending it
    append_s: float  # processor + vision tower + visual-token methods + LLM prefill
    vision_s: float
    visual_tokens: int  # in the cache after this chunk (and any eviction)
    kv_bytes: int  # the cache's bytes after this chunk
    methods: list[str] = field(default_factory=list)  # the visual-token methods that acted on it
    method_stats: dict[str, int] = field(default_factory=dict)  # their record fields, for this chunk

    def record(self) -> dict[str, Any]:
        """As written to ``chunks.jsonl``: the fields, and ``tokens_in`` under the record's old
        names of the visual tokens before any method (``report.RECORD_ALIASES``, one release)."""
        from prunevid_bench.report import RECORD_ALIASES

        return {**asdict(self), **{old: self.tokens_in for old, new in RECORD_ALIASES.items() if new == "visual_tokens"}}


@dataclass
class StreamAnswer:
    text: str
    token_ids: list[int]
    first_logits: torch.Tensor = field(repr=False)  # [V] float32 on CPU
    ttft_s: float  # from the question's arrival (tokenising included) to the first token
    decode_s: float
    question_tokens: int  # tokens prefilled for the question (<|vision_end|> to the assistant prefix)
    kv_bytes: int  # cache bytes after the question's prefill
    extra_kv_bytes: int  # cache bytes the ask added at its peak (question + generated tokens)
    cached_tokens: int  # cache length before the ask (video and prefix)
    visual_tokens: int  # visual tokens in the cache
    frames_seen: int
    visual_tokens_kept: int | None = None  # question-time eviction: visual tokens this answer kept
    choice: int | None = None  # ask_choice: the chosen option's index
    parse_status: str | None = None  # ask_choice: "logits", or the letter parser's status

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("first_logits")
        return out


class _Layers:
    """Some cache layers as a cache, so ``cache_bytes`` counts them alone."""

    def __init__(self, layers):
        self.layers = list(layers)
