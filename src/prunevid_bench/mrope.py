"""Which M-RoPE numbering a run uses (``model.mrope``).

- ``transformers`` (the default): the installed transformers' ``get_rope_index``, so a run equals
  vanilla ``generate``. transformers 5.24 starts what follows a vision span at the span's first
  id + max(H', W'), which for a video of many steps falls inside the video's time ids.
- ``qwen``: Qwen's own numbering, the one the checkpoints were trained with (and transformers up
  to 5.2): every segment (a text run, an image, a video) starts at the largest id before it + 1.
  The ids inside a vision span are transformers' own, so only the starts move.

``qwen_numbering`` is the pure rule; ``numbering(model, mode)`` applies it to a loaded model for
the duration of a run, by wrapping the base model's ``get_rope_index`` on that instance, so our
engine, ``generate`` and the patch all see the same ids. Decoding continues from the last prompt
id + 1, which under this numbering is the largest + 1, as Qwen's ``rope_deltas`` say.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import Tensor

from prunevid_bench.config import MROPE_MODES
from prunevid_bench.overrides import overriding

__all__ = ["MROPE_MODES", "numbering", "qwen_numbering"]


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


@contextlib.contextmanager
def numbering(model, mode: str):
    """For the duration of a run: the model's M-RoPE ids by ``mode`` (see the module docstring)."""
    if mode == "transformers":
        yield
        return
    from prunevid_bench.families import family_of

    base = family_of(model).base(model)
    original = base.get_rope_index
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_rope_index(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments  # called positionally and by keyword alike
        position_ids, _ = original(*args, **kwargs)
        return qwen_numbering(position_ids, given["mm_token_type_ids"], given.get("attention_mask"))

    with overriding(base, "get_rope_index", get_rope_index):
        yield
