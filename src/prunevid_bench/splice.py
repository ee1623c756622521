"""Generic splicing of a prefill: find the visual spans, remove or reorder tokens in what enters
the LLM (embeddings, position ids, 2D mask), slice what a later decoder layer receives (rotary
cos/sin, 4D mask, text position ids). Family-agnostic: tensors in, tensors out."""

from __future__ import annotations

import torch

from prunevid_bench.errors import PruneVidError


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor, as (start, end) pairs."""
    padded = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).int()
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def assign_runs(runs, sizes, per_step: bool = False) -> list[list[tuple[int, int]]]:
    """Placeholder ``runs`` [(start, end)] in prompt order -> each video's runs. ``sizes``: per
    video (t, n), t temporal steps of n tokens. A video takes runs until it holds t * n tokens;
    two videos whose runs touch share one run, which is split. ``per_step``: the family writes
    one run per temporal step (text between the steps), so every run must hold n tokens. Raises
    when the grids do not cover the placeholders exactly (e.g. no grids were seen), so a video
    is never silently left unpruned."""
    out, queue = [], list(runs)
    total = sum(e - s for s, e in runs)
    for t, n in sizes:
        need, mine = t * n, []
        while need > 0 and queue:
            start, end = queue.pop(0)
            take = min(need, end - start)
            if per_step and take != n:
                break
            mine.append((start, start + take))
            if start + take < end:
                queue.insert(0, (start + take, end))
            need -= take
        if need:
            break
        out.append(mine)
    if len(out) != len(sizes) or queue:
        raise PruneVidError(
            f"the {total} video placeholder tokens do not match the videos' grids "
            f"({', '.join(f'{t} x {n}' for t, n in sizes) or 'none'} tokens); pass video_grid_thw with the inputs"
        )
    return out


def run_positions(runs, device=None) -> torch.Tensor:
    """[t * n] the prompt position of each token of a video's grid, frame-major, from its runs."""
    return torch.cat([torch.arange(s, e, device=device) for s, e in runs])


def text_start(ids: torch.Tensor, visual: torch.Tensor, vision_end_id: int) -> int | None:
    """First position after the ``<|vision_end|>`` that closes the last video (not the last
    image): the question an LLM-layer method needs. None without a video."""
    video_positions = torch.nonzero(visual).flatten()
    if video_positions.numel() == 0:
        return None
    ends = torch.nonzero(ids[int(video_positions[-1]) :] == vision_end_id).flatten()
    return int(video_positions[-1]) + int(ends[0]) + 1 if ends.numel() else None


def cache_kwarg(kwargs: dict):
    """The KV cache a hooked forward was called with. transformers 5.24 renamed the keyword
    ``past_key_values`` to ``cache`` (the old name is deprecated, to be removed in 5.40) and its
    outer forwards pass ``cache=`` inward even when the user wrote the old name; 5.23 only knows
    ``past_key_values``. Reading the old name alone on 5.24 finds no cache, so an LLM-layer
    method would skip compacting layers 0..K and decoding would see the dropped tokens there."""
    return kwargs["cache"] if "cache" in kwargs else kwargs.get("past_key_values")


def kv_length(cache) -> int:
    """Tokens held by the cache's attention layers (their keys). A hybrid cache's plain
    ``get_seq_length()`` asks layer 0: transformers 5.24 then went to the first attention layer,
    5.25 answers from a linear-attention layer 0 the count of every token it has taken in, which
    an eviction or a pruning at layer K leaves longer than the keys."""
    layers = getattr(cache, "layers", None) or []
    first = next((i for i, layer in enumerate(layers) if not hasattr(layer, "recurrent_states")), 0)
    return int(cache.get_seq_length(first))


def select_llm_inputs(kwargs: dict, source: torch.Tensor, embeds: torch.Tensor) -> None:
    """Make the language model's input the tokens ``source`` [L1] of the prompt (in that order),
    with ``embeds`` [1, L1, D]. The M-RoPE ids are index-selected (the kept tokens keep their
    original ids: never renumbered); a text row (4-row ids) becomes contiguous again, so that no
    packed-sequence mask is inferred from it."""
    kwargs["inputs_embeds"] = embeds
    pos = kwargs.get("position_ids")
    if pos is None:
        raise PruneVidError("token reduction needs the M-RoPE position ids: pass the processor's mm_token_type_ids")
    pos = pos[..., source]
    if pos.shape[0] == 4:
        pos = torch.cat([torch.arange(pos.shape[-1], device=pos.device).view(1, 1, -1), pos[1:]])
    kwargs["position_ids"] = pos
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        kwargs["attention_mask"] = mask[:, source]


def shift_positions(pos: torch.Tensor, start: int, shift: int) -> torch.Tensor:
    """``pos`` (4 or 3, B, L) with ``shift`` added to the M-RoPE rows of the tokens from
    ``start`` on; a text row (4-row ids) stays the contiguous index. A new tensor: callers such
    as ``generate`` extend the one they passed."""
    out = pos.clone()
    out[-3:, :, start:] += shift
    return out


def slice_layer_kwargs(kwargs: dict, keep: torch.Tensor) -> None:
    """A decoder layer after the pruning layer sees only the tokens ``keep``: slice the shared
    rotary cos/sin, the 4D mask (eager) and the text position ids computed for the full length."""
    cos, sin = kwargs["position_embeddings"]
    if cos.shape[-2] != keep.numel():
        kwargs["position_embeddings"] = (cos.index_select(-2, keep), sin.index_select(-2, keep))
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] != keep.numel():
        kwargs["attention_mask"] = mask.index_select(-2, keep).index_select(-1, keep)
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.shape[-1] != keep.numel():
        kwargs["position_ids"] = torch.arange(keep.numel(), device=pos.device).view(1, -1)


def drop_index(seq_len: int, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Positions [L'] that survive when only ``visual[kept]`` of the visual positions stay."""
    is_dropped = torch.zeros(seq_len, dtype=torch.bool, device=visual.device)
    is_dropped[visual] = True
    is_dropped[visual[kept]] = False
    return torch.nonzero(~is_dropped).flatten()
