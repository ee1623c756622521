"""What a Pipeline run records beside its answer: per-method reductions and fields, fed sizes, videos (moved from pipeline.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from prunevid_bench.report import RECORD_ALIASES, Reduction, RunResult
from prunevid_bench.video import Clip


def _seconds(stages: dict, method: str) -> float:
    return stages.get("methods", {}).get(method, {}).get("seconds", 0.0)


def _reductions(handle, stages: dict, prompt_tokens: int, llm_prefill_tokens: int, kv_after: int, kv_uncompressed: int) -> list[Reduction]:
    """One typed entry per applied method. The prompt shrinks by each method's dropped tokens;
    a visual-token method's KV bytes are the final cache's bytes per token times the prompt
    length before and after it (every layer holds the same length), an LLM-layer method's are
    the cache measured before and after compaction."""
    if handle is None:
        return []
    dropped_in_llm = stages.get("tokens_before", 0) - stages.get("tokens_after", 0)
    final_len = llm_prefill_tokens - dropped_in_llm
    per_token = kv_after // final_len if final_len else 0
    out, length = [], prompt_tokens
    from prunevid_bench.methods import place_key

    for method, cfg, acts in handle.placed:
        info = stages.get("methods", {}).get(place_key(method, acts, cfg), {"tokens": [0, 0], "seconds": 0.0})
        tokens_in, tokens_out = info["tokens"]
        if acts == "decode":  # the key/value bytes read while decoding; visual tokens: in the cache -> attended per step
            attended, cached = stages.get("decode_attended_per_step") or [], stages.get("decode_cached_per_step") or []
            hidden = sum(c - a for a, c in zip(attended, cached)) / len(cached) if cached else 0
            tokens_in, tokens_out = stages.get("tokens_after", 0), round(stages.get("tokens_after", 0) - hidden)
            out.append(Reduction(method.name, acts, tokens_in, tokens_out, info["seconds"],
                                 stages.get("decode_kv_bytes_full", 0), stages.get("decode_kv_bytes_attended", 0)))
            continue
        if acts == "llm_layer":
            before, after = kv_uncompressed, kv_after
        else:
            before, after = per_token * length, per_token * (length - (tokens_in - tokens_out))
        length -= tokens_in - tokens_out
        out.append(Reduction(method.name, acts, tokens_in, tokens_out, info["seconds"], before, after))
    return out


def _method_fields(handle, stages: dict) -> dict[str, Any]:
    """The record fields of applied methods that RunResult does not name itself."""
    if handle is None:
        return {}
    own = {f.name for f in dataclasses.fields(RunResult)} | set(RECORD_ALIASES)  # aliases are the record's own
    fields = {key: stages.get(key) for method, _ in handle.methods for key in method.record_fields if key not in own}
    return fields


def _hybrid_fields(model, handle, state_bytes: int, dropped: int, llm_prefill_tokens: int) -> dict[str, Any]:
    """A hybrid model's record (none for another): its linear layers' state bytes, and with an
    LLM-layer method the layer asked for, and the linear layers 0..K with the dropped tokens they
    absorbed (those stay folded into their recurrent and conv states; docs/methods.md)."""
    from prunevid_bench.families import family_of

    n_layers = model.config.get_text_config().num_hidden_layers
    attention = family_of(model).attention_layers(model.config)
    if len(attention) == n_layers:
        return {}
    fields: dict[str, Any] = {"recurrent_state_bytes": state_bytes}
    if handle is not None and handle.layer_method is not None:
        linear = sum(1 for i in range(handle.score_layer + 1) if i not in attention)
        fields.update(pruning_layer_requested=handle.requested_layer, linear_layers_0_to_k=linear,
                      tokens_absorbed_by_linear_layers=dropped if linear else 0,
                      absorbed_share=round(dropped / llm_prefill_tokens, 6) if linear and llm_prefill_tokens else 0.0)
    return fields


def _as_rows(value) -> list:
    if value is None:
        return []
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _as_list(value) -> list:
    if value is None:
        return []
    return value.flatten().tolist() if isinstance(value, torch.Tensor) else list(value)


def _fed_sizes(grid: torch.Tensor, model) -> list[list[int]]:
    """``[h, w]`` of each video as the model was fed it (after the processor's resize): its grid's
    rows and columns of patches times the patch size."""
    from prunevid_bench.families import family_of

    patch = family_of(model).geometry(model.config).patch
    return [[int(h) * patch, int(w) * patch] for _, h, w in grid.tolist()]


def _video_entry(clip: Clip, fed: list[int]) -> dict[str, Any]:
    """One video of a several-video prompt, for the record."""
    return {"path": clip.path, "frame_indices": list(clip.indices), "frame_size": fed,
            "decoded_size": clip.decoded_size or clip.frame_size, "num_frames": clip.num_frames, "sampled_fps": round(clip.sampled_fps, 6), "backend": clip.backend}

