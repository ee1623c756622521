"""ToMe (bipartite soft matching, size-weighted merging, proportional attention) on one video's
visual tokens before the LLM, with the intra-frame / inter-frame split of the video-retrieval
variant (TempMe). Pure tensor functions; facebookresearch/ToMe ``tome/merge.py`` (af95e4b) and
LunarShen/TempMe ``tvr/models/module_tome_*.py`` were read for the rules, the code is ours.

Shapes: T temporal grid steps, N tokens per step (Qwen2.5-VL layout: token (t, n) has flat index
``t * N + n``), C channels, n tokens in one matching round, M merged tokens.

Merged tokens are returned in ascending order of their representative's flat index (ToMe's
``merge`` returns ``[unmerged A, B]`` instead; in a ViT the order is irrelevant, in a causal LLM
it is not). The representative of a merged token is its destination (a B token), so the token
takes that token's M-RoPE id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prunevid_bench.errors import PruneVidError


@dataclass(frozen=True)
class MergeResult:
    """The merged tokens of one video.

      - merged: [M, C], the input's dtype; each row is the size-weighted mean of its members.
      - size: [M] float32, how many input tokens each merged token represents (sums to T * N).
      - representative: LongTensor [M], flat index of the input token whose M-RoPE id the merged
        token takes (its final destination). Strictly increasing.
      - token_to_merged: LongTensor [T * N], the row of ``merged`` each input token went into.
    """

    merged: Tensor
    size: Tensor
    representative: Tensor
    token_to_merged: Tensor


def bipartite_soft_matching(metric: Tensor, r: int) -> Tensor:
    """One ToMe round: which token each token merges into.

    metric [n, C], or [..., n, C]: each leading index one independent round. Alternate split
    (A = even positions, B = odd), cosine similarity of every A token to every B token, each A
    token's best B edge, the r best edges merge (r is capped at the size of A, ToMe's "at most
    50%"). Returns LongTensor [n] ([..., n]): the destination of each token, ``dst[i] == i`` for
    every token that stays. Ties: the lowest B index wins an A token's edge (``argmax``) and,
    among equal edges, the lower A index merges first (stable sort; ToMe's ``argsort`` is
    unstable, so it leaves tie order unspecified).
    """
    n = metric.shape[-2]
    dst = torch.arange(n, device=metric.device).expand(*metric.shape[:-2], n).clone()
    a_pos, b_pos = dst[..., 0::2], dst[..., 1::2]
    r = min(int(r), b_pos.shape[-1])
    if r <= 0:
        return dst
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[..., 0::2, :] @ unit[..., 1::2, :].transpose(-1, -2)  # [..., |A|, |B|]
    best_score, best_b = scores.max(dim=-1)
    order = torch.sort(-best_score, dim=-1, stable=True).indices
    src = order[..., :r]
    dst.scatter_(-1, a_pos.gather(-1, src), b_pos.gather(-1, best_b.gather(-1, src)))
    return dst


def merge_by_destination(x: Tensor, size: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Apply one round's destinations with size-weighted averaging (ToMe's ``merge_wavg``).

    x [n, C], size [n] float, dst [n] from ``bipartite_soft_matching``. Returns (x' [m, C],
    size' [m], kept [m] LongTensor: the positions in 0..n-1 that survive, ascending, and
    inverse [n]: the row of x' each position went into). ``x'[j] = sum(size_i x_i) / sum(size_i)``
    over the tokens merged into ``kept[j]``.
    """
    kept = torch.nonzero(dst == torch.arange(dst.numel(), device=dst.device)).flatten()
    slot = torch.full_like(dst, -1)
    slot[kept] = torch.arange(kept.numel(), device=dst.device)
    inverse = slot[dst]
    w = size.float()
    total = torch.zeros(kept.numel(), device=x.device).index_add_(0, inverse, w)
    summed = torch.zeros(kept.numel(), x.shape[1], device=x.device).index_add_(0, inverse, x.float() * w[:, None])
    return (summed / total[:, None]).to(x.dtype), total, kept, inverse


def tome_merge(
    x: Tensor, r: int, size: Tensor | None = None, rep: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Remove exactly r tokens from x [n, C] by repeated ToMe rounds, each at most half of the
    current tokens (as ToMe does per layer), the metric of a round being the current merged
    tokens (pre-LLM there are no keys to average).

    size [n] (default ones) and rep [n] (default 0..n-1) are carried along. Returns (x' [n-r, C],
    size' [n-r], rep' [n-r]: each survivor's own rep, which merged tokens take, token_to_out [n]).
    """
    n = x.shape[0]
    if not 0 <= r < max(n, 1):
        raise PruneVidError(f"ToMe cannot remove {r} of {n} tokens; ask for 0 <= r < {n}")
    size = torch.ones(n, device=x.device) if size is None else size.float()
    rep = torch.arange(n, device=x.device) if rep is None else rep
    token_to_out = torch.arange(n, device=x.device)
    while r > 0:
        step = min(r, x.shape[0] // 2)
        dst = bipartite_soft_matching(x, step)
        x, size, kept, inverse = merge_by_destination(x, size, dst)
        rep = rep[kept]
        token_to_out = inverse[token_to_out]
        r -= step
    return x, size, rep, token_to_out


def _merge_units(x, size, rep, bounds: list[tuple[int, int]], removals: Sequence[int]):
    """``tome_merge`` on each contiguous unit ``x[start:end]`` with its removal count; returns the
    concatenated (x, size, rep, row_map [len(x)]: old row -> new row) and the new bounds."""
    xs, sizes, reps, maps, new_bounds = [], [], [], [], []
    offset = 0
    for (start, end), r in zip(bounds, removals):
        mx, ms, mr, to_out = tome_merge(x[start:end], int(r), size[start:end], rep[start:end])
        xs.append(mx)
        sizes.append(ms)
        reps.append(mr)
        maps.append(to_out + offset)
        new_bounds.append((offset, offset + mx.shape[0]))
        offset += mx.shape[0]
    return torch.cat(xs), torch.cat(sizes), torch.cat(reps), torch.cat(maps), new_bounds


def clip_count(n_frames: int, clip_frames: int) -> int:
    """Number of inter-frame clips: consecutive groups of ``clip_frames`` steps, the last one
    possibly shorter (TempMe asserts divisibility; we accept any T)."""
    return -(-n_frames // clip_frames)


def tome_video(
    tokens: Tensor, intra_removals: Sequence[int], inter_removals: Sequence[int], clip_frames: int = 2
) -> MergeResult:
    """ToMe on one video, as the video-retrieval variant does: first intra-frame (each temporal
    step alone, ``intra_removals[t]`` tokens removed), then inter-frame (each clip of
    ``clip_frames`` neighbouring steps, its tokens concatenated in time order and matched
    together with the same alternate split, ``inter_removals[c]`` removed).

    tokens [T, N, C]; intra_removals: T counts; inter_removals: ceil(T / clip_frames) counts.
    All zeros returns the input unchanged, in order.
    """
    n_frames, per_frame, _ = tokens.shape
    if clip_frames < 1:
        raise PruneVidError(f"ToMe clip_frames must be >= 1, got {clip_frames}")
    n_clips = clip_count(n_frames, clip_frames)
    if len(intra_removals) != n_frames or len(inter_removals) != n_clips:
        raise PruneVidError(
            f"ToMe needs {n_frames} intra-frame and {n_clips} inter-frame removal counts, "
            f"got {len(intra_removals)} and {len(inter_removals)}"
        )
    x = tokens.reshape(n_frames * per_frame, -1)
    size = torch.ones(x.shape[0], device=x.device)
    rep = torch.arange(x.shape[0], device=x.device)
    frame_bounds = [(t * per_frame, (t + 1) * per_frame) for t in range(n_frames)]
    x, size, rep, to_intra, frame_bounds = _merge_units(x, size, rep, frame_bounds, intra_removals)
    clip_bounds = [
        (frame_bounds[c * clip_frames][0], frame_bounds[min(n_frames, (c + 1) * clip_frames) - 1][1])
        for c in range(n_clips)
    ]
    x, size, rep, to_inter, _ = _merge_units(x, size, rep, clip_bounds, inter_removals)
    return MergeResult(merged=x, size=size, representative=rep, token_to_merged=to_inter[to_intra])


def tome_video_removals(
    n_frames: int, per_frame: int, intra_ratio: float, inter_ratio: float, clip_frames: int = 2
) -> tuple[list[int], list[int]]:
    """TempMe's counts from its proportions: each frame loses ``int(N * intra_ratio)``, each clip
    ``int(n_clip * inter_ratio)`` of the ``n_clip`` tokens it holds after the intra-frame step
    (TempMe: ``int(patch_num * M_frame_num * proportion)``). Ratios in [0, 1)."""
    for name, value in (("intra_ratio", intra_ratio), ("inter_ratio", inter_ratio)):
        if not 0.0 <= value < 1.0:
            raise PruneVidError(f"ToMe {name} must be in [0, 1), got {value}")
    intra = [int(per_frame * intra_ratio)] * n_frames
    left = per_frame - intra[0]
    inter = [
        int(left * (min(n_frames, (c + 1) * clip_frames) - c * clip_frames) * inter_ratio)
        for c in range(clip_count(n_frames, clip_frames))
    ]
    return intra, inter


def spread_counts(total: int, capacities: Sequence[int]) -> list[int]:
    """Split ``total`` over units in proportion to their capacities (largest remainder, earlier
    units first on ties), never above a unit's capacity."""
    cap_sum = sum(capacities)
    total = min(total, cap_sum)
    if total == 0:
        return [0] * len(capacities)
    exact = [total * c / cap_sum for c in capacities]
    out = [min(c, int(e)) for c, e in zip(capacities, exact)]
    by_remainder = sorted(range(len(capacities)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    short = total - sum(out)
    while short > 0:
        for i in by_remainder:
            if short and out[i] < capacities[i]:
                out[i] += 1
                short -= 1
    return out


def tome_budget(
    n_frames: int, per_frame: int, budget: float, inter_share: float = 0.5, clip_frames: int = 2
) -> tuple[list[int], list[int], int]:
    """ToMe's knob for a kept fraction ``budget`` of the T * N tokens: removal counts, which ToMe
    takes directly, so the count is exact: ``round(budget * T * N)`` tokens remain, unless that
    is fewer than one per clip (then one per clip, the closest reachable).

    ``inter_share`` of the removals happen across frames, the rest within frames. Returns
    (intra_removals, inter_removals, achieved kept count).
    """
    if not 0.0 <= inter_share <= 1.0:
        raise PruneVidError(f"ToMe inter_share must be in [0, 1], got {inter_share}")
    total = n_frames * per_frame
    n_clips = clip_count(n_frames, clip_frames)
    target = max(n_clips, round(budget * total))
    removals = total - target
    inter_total = round(inter_share * removals)
    frame_caps = [per_frame - 1] * n_frames
    intra = spread_counts(removals - inter_total, frame_caps)
    # whatever the frames cannot absorb moves across frames, and vice versa
    clip_sizes = [
        sum(per_frame - intra[t] for t in range(c * clip_frames, min(n_frames, (c + 1) * clip_frames)))
        for c in range(n_clips)
    ]
    inter = spread_counts(removals - sum(intra), [s - 1 for s in clip_sizes])
    return intra, inter, total - sum(intra) - sum(inter)


def log_size_bias(size: Tensor) -> Tensor:
    """ToMe's proportional attention, as a bias on the keys: [L] sizes -> [L] float32 ``log(size)``
    (0 for a token of size 1, e.g. text), added to the attention logits of every query so a key
    of size s counts as s identical keys."""
    return size.float().log()


def proportional_attention_mask(key_size: Tensor, query_positions: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The additive SDPA mask [1, 1, Q, L]: causal (query at sequence index ``query_positions[q]``
    sees keys 0..that index) plus ``log(size)`` of every key.

    key_size [L] float, query_positions [Q] LongTensor. Pass as ``attn_mask`` to
    ``F.scaled_dot_product_attention`` (or as transformers' 4-D mask); no eager attention needed.
    """
    n_keys = key_size.numel()
    future = torch.arange(n_keys, device=key_size.device)[None, :] > query_positions[:, None]
    bias = log_size_bias(key_size)[None, :].expand(query_positions.numel(), n_keys)
    mask = bias.masked_fill(future, float("-inf"))
    return mask.to(dtype)[None, None]
