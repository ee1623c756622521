"""vLLM's Efficient Video Sampling (EVS) as pure tensor functions: the retention mask, its token
count, the pruning rate for a budget, and the two ways to number the positions afterwards.

Read for the rules (the code is ours): vLLM ``vllm/multimodal/evs.py`` (``compute_retained_
tokens_count``, ``compute_retention_mask``, ``compute_mrope_for_media``,
``recompute_mrope_positions``) and ``vllm/model_executor/models/qwen2_5_vl.py``
(``_postprocess_video_embeds_evs``).

Shapes: T temporal grid steps, N = H' * W' merged tokens per step (row-major), C channels,
L sequence length, V visual tokens of one video; M-RoPE ids ``(3, L)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prunevid_bench.errors import PruneVidError

FIRST_STEP_SCORE = 255.0  # vLLM's sentinel: larger than any 1 - cosine (<= 2), so step 0 stays


def _check_rate(pruning_rate: float) -> None:
    if not 0.0 <= pruning_rate < 1.0:
        raise PruneVidError(f"EVS video_pruning_rate must be in [0, 1), got {pruning_rate}")


def evs_retained_count(tokens_per_frame: int, n_frames: int, pruning_rate: float) -> int:
    """vLLM's count: ``max(N, int(T * N * (1 - q)))``, so at least one full step survives."""
    _check_rate(pruning_rate)
    return max(tokens_per_frame, int(tokens_per_frame * n_frames * (1 - pruning_rate)))


def evs_dissimilarity(tokens: Tensor, previous: Tensor | None = None) -> Tensor:
    """tokens [T, N, C] -> [T, N]: ``1 - cos`` of each token to the token at the same spatial
    position one temporal step earlier; step 0 gets 255, or, given the step before it
    (``previous`` [N, C]: a stream's previous chunk's last step), its ``1 - cos`` to that step.
    Computed in the input's dtype, as vLLM does (``F.cosine_similarity``)."""
    similarity = F.cosine_similarity(tokens[1:], tokens[:-1], dim=-1)
    if previous is None:
        first = torch.full_like(tokens[:1, :, 0], FIRST_STEP_SCORE)
    else:
        first = 1 - F.cosine_similarity(tokens[:1], previous.to(tokens.dtype).unsqueeze(0), dim=-1)
    return torch.cat([first, 1 - similarity], dim=0)


def evs_retention_mask(tokens: Tensor, pruning_rate: float, previous: Tensor | None = None) -> Tensor:
    """The EVS keep mask, bool [T * N] (t-major): a global top-k of ``evs_dissimilarity`` (step 0
    compared with ``previous`` when given) with k = ``evs_retained_count``; ties go to the lower
    flat index (vLLM's stable descending sort). Rate 0 keeps every token."""
    n_frames, per_frame, _ = tokens.shape
    k = evs_retained_count(per_frame, n_frames, pruning_rate)
    flat = evs_dissimilarity(tokens, previous).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=tokens.device)
    mask[order[:k]] = True
    return mask


def evs_budget(tokens_per_frame: int, n_frames: int, budget: float) -> tuple[float, int]:
    """EVS's knob for a kept fraction ``budget``: the pruning rate q whose count is
    ``round(budget * T * N)``, exact unless that is below one step (EVS keeps at least N, the
    closest reachable). Returns (q, achieved count)."""
    total = tokens_per_frame * n_frames
    target = max(tokens_per_frame, round(budget * total))
    q = max(0.0, 1.0 - target / total)
    while q > 0.0 and int(total * (1 - q)) < target:  # float rounding: step q down ulp by ulp
        q = max(0.0, math.nextafter(q, -1.0))
    return q, evs_retained_count(tokens_per_frame, n_frames, q)


def evs_position_ids(
    position_ids: Tensor, video_index: Tensor, keep: Tensor, grid_w: int, mode: str = "original"
) -> Tensor:
    """M-RoPE ids of the sequence after EVS dropped some of one video's tokens.

    position_ids (3, L): the unpruned sequence's ids (``get_rope_index``); video_index [V]: the
    sequence positions of the video's tokens (contiguous, t-major); keep [V] bool; grid_w: W'.
    Returns (3, L - dropped).

    - ``original``: every kept token keeps its unpruned (t, h, w) id and the text keeps its ids
      (what PruneVid and most Qwen ports do; decode continues from the unpruned length).
    - ``vllm``: as vLLM's ``recompute_mrope_positions`` for Qwen2.5-VL: kept video tokens keep
      their (t, h, w) ids, but the first token after the video gets ``base + W'`` (base = the
      vision-start id + 1) and the rest follow it, where the unpruned numbering gives it
      ``base + max(H', W')`` (transformers 5.24's ``get_rope_index``; older versions and vLLM
      without EVS: the video's largest id + 1). Everything after the video moves by that one shift, so
      with several videos, call once per video, first video first, on the previous result's
      numbering (indices of later videos are then those of the shortened sequence). Decoding
      then continues from the largest id of the result + 1 (vLLM's ``mrope_position_delta``
      is ``max + 1 - N``), which can be a video token's id when little text follows the video.
    """
    if mode not in ("original", "vllm"):
        raise PruneVidError(f"EVS position mode must be 'original' or 'vllm', got {mode!r}")
    n = position_ids.shape[1]
    keep_seq = torch.ones(n, dtype=torch.bool, device=position_ids.device)
    keep_seq[video_index] = keep
    out = position_ids.clone()
    if mode == "vllm":
        end = int(video_index[-1]) + 1
        base = int(position_ids[0, int(video_index[0]) - 1]) + 1
        if end < n:  # a shift, so a later video's grid ids stay relative to its own start
            out[:, end:] += base + grid_w - position_ids[0, end]
    return out[:, keep_seq]

