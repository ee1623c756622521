"""Which M-RoPE numbering a run uses (``model.mrope``).

- ``transformers`` (the default): the installed transformers' ``get_rope_index``, so a run equals
  vanilla ``generate``. transformers 5.24 starts what follows a vision span at the span's first
  id + max(H', W'), which for a video of many steps falls inside the video's time ids.
- ``qwen``: Qwen's own numbering, the one the checkpoints were trained with (and transformers 4.x):
  every segment (a text run, an image, a video) starts at the largest id before it + 1, and a
  video's time ids are ``step * int(seconds per step) * tokens_per_second`` after its first id.

Seconds per step: transformers 4.57 turns a video's ``second_per_grid_t`` into an integer tensor
before scaling (``torch.as_tensor(second_per_grid_t, dtype=range_tensor.dtype)`` with an int64
``arange``), and vLLM's EVS does the same on purpose (``second_per_grid_ts.long()``, "to match the
original code"); transformers 5.x keeps the fraction (``floor(step * seconds * tokens_per_second)``).
With 16 frames sampled from a clip nearly every step is fractional (0.5 s, 2/3 s, 1.25 s, ...), so
the two differ: ``integer_second_time_ids`` rewrites a video's time ids by the integer rule, for
``model.mrope: qwen`` and for a method that asks for it (``Method.integer_seconds``: EVS with
``positions: vllm``).

``qwen_numbering`` is the pure rule for the starts; ``numbering(model, mode, integer_seconds)``
applies the rules to a loaded model for the duration of a run, by wrapping the base model's
``get_rope_index`` on that instance, so our engine, ``generate`` and the patch all see the same
ids. Decoding continues from the last prompt id + 1, which under this numbering is the largest
+ 1, as Qwen's ``rope_deltas`` say.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import Tensor

from prunevid_bench.config import MROPE_MODES
from prunevid_bench.overrides import overriding

__all__ = ["MROPE_MODES", "integer_second_time_ids", "integer_seconds_wanted", "numbering", "qwen_numbering"]


def integer_second_time_ids(position_ids: Tensor, mm_token_type_ids: Tensor, video_grid_thw: Tensor, seconds: Tensor,
                            tokens_per_second: float, merge: int, attention_mask: Tensor | None = None) -> Tensor:
    """position_ids (3, B, L) -> the same with each video's time row (row 0) renumbered as
    transformers 4.57 and vLLM do: the video's first id + ``step * int(seconds) * tokens_per_second``
    for the tokens of temporal step ``step``. video_grid_thw (n_videos, 3) and seconds (n_videos,)
    in prompt order (rows first, as ``get_rope_index`` reads them); the height and width rows and
    every other token are left as they are (padded positions, ``attention_mask`` 0, too)."""
    out = position_ids.clone()
    grids, per_step = iter(video_grid_thw.tolist()), iter(seconds.tolist())
    for row in range(position_ids.shape[1]):
        valid = torch.ones_like(mm_token_type_ids[row], dtype=torch.bool) if attention_mask is None \
            else attention_mask[row].bool()
        index = torch.nonzero(valid).flatten()
        video = index[mm_token_type_ids[row, index] == 2]
        done = 0
        while done < video.numel():  # the videos' tokens in order, one grid after the other
            t, h, w = next(grids)
            n = (h // merge) * (w // merge)
            tokens = video[done : done + t * n]
            steps = torch.arange(t, device=out.device).repeat_interleave(n)
            out[0, row, tokens] = out[0, row, tokens[0]] + (steps * int(next(per_step)) * tokens_per_second).long()
            done += t * n
    return out


def qwen_numbering(position_ids: Tensor, mm_token_type_ids: Tensor, attention_mask: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """position_ids (3, B, L) as transformers numbered them, mm_token_type_ids (B, L) (0 text,
    1 image, 2 video) -> (position ids, rope deltas (B, 1)) with every segment after the first
    moved to start at the largest id before it + 1 (padded positions, ``attention_mask`` 0, are
    left as they were). Deltas are ``largest id + 1 - valid length``."""
    out = position_ids.clone()
    deltas = []
    for row in range(position_ids.shape[1]):
        valid = torch.ones_like(mm_token_type_ids[row], dtype=torch.bool) if attention_mask is None \
            else attention_mask[row].bool()
        index = torch.nonzero(valid).flatten()
        pos, kinds = out[:, row, index], mm_token_type_ids[row, index]
        edges = torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1
        starts = [0, *edges.tolist()]
        ends = [*edges.tolist(), kinds.numel()]
        top = -1
        for start, end in zip(starts, ends):
            segment = pos[:, start:end]
            if start > 0:
                segment = segment + (top + 1 - int(segment.min()))
                pos[:, start:end] = segment
            top = max(top, int(segment.max()))
        out[:, row, index] = pos
        deltas.append(top + 1 - index.numel())
    return out, torch.tensor(deltas, device=position_ids.device).unsqueeze(1)


def _deltas(position_ids: Tensor, mm_token_type_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, 1): largest id + 1 - valid length, per row (``get_rope_index``'s rope deltas)."""
    valid = torch.ones_like(mm_token_type_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    deltas = [int(position_ids[:, row, valid[row]].max()) + 1 - int(valid[row].sum()) for row in range(valid.shape[0])]
    return torch.tensor(deltas, device=position_ids.device).unsqueeze(1)


def integer_seconds_wanted(cfg) -> bool:
    """Whether an enabled method numbers video time ids with integer seconds per step (vLLM's EVS)."""
    from prunevid_bench.methods import get_method

    methods = [get_method(name) for name in cfg.enabled_methods]
    return any(m.integer_seconds(cfg.section(m.section)) for m in methods if m.integer_seconds is not None)


@contextlib.contextmanager
def numbering(model, mode: str, integer_seconds: bool = False):
    """For the duration of a run: the model's M-RoPE ids by ``mode`` (see the module docstring);
    ``integer_seconds`` (implied by ``qwen``): a video's time ids by the integer-seconds rule."""
    cast = mode == "qwen" or integer_seconds
    if mode == "transformers" and not cast:
        yield
        return
    from prunevid_bench.families import family_of

    base = family_of(model).base(model)
    original = base.get_rope_index
    signature = inspect.signature(original)
    vision = model.config.vision_config

    @functools.wraps(original)
    def get_rope_index(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments  # called positionally and by keyword alike
        position_ids, deltas = original(*args, **kwargs)
        kinds, mask = given["mm_token_type_ids"], given.get("attention_mask")
        seconds = given.get("second_per_grid_ts")
        if cast and seconds is not None and given.get("video_grid_thw") is not None:  # Qwen2-VL: one id a step
            position_ids = integer_second_time_ids(position_ids, kinds, given["video_grid_thw"], seconds,
                                                   vision.tokens_per_second, vision.spatial_merge_size, mask)
            deltas = _deltas(position_ids, kinds, mask)
        if mode == "qwen":
            return qwen_numbering(position_ids, kinds, mask)
        return position_ids, deltas

    with overriding(base, "get_rope_index", get_rope_index):
        yield
