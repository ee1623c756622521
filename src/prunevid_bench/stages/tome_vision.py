"""ToMe inside the vision tower's blocks: the merge schedule across blocks and one block's merge
step on the tower's sequence. Pure tensor functions; the matching and the size-weighted merge are
``stages.tome``'s (ToMe's ``bipartite_soft_matching`` / ``merge_wavg``), the schedule follows
facebookresearch/ToMe ``tome/utils.py`` ``parse_r`` (af95e4b) and the intra/inter-frame split
the video-retrieval variant's (TempMe's ``merge_layers`` / ``merge_token_proportions``); the
code is ours.

A *unit* is what is matched and merged: one patch, or (``unit = merge^2``) one whole 2x2 patch
group, the patch merger's input row, merged patch by patch. Shapes: U units in the current
sequence, U0 in the tower's input, u patches per unit, C channels. Units are kept in ascending
order of their representative's index in the tower's input, so every frame and every window
stays one contiguous run of the sequence (the tower's ``cu_seqlens`` then only shrink).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.tome import bipartite_soft_matching, merge_by_destination

DECREASING_INFLECT = -0.5  # ToMe's parse_r inflection for its "decreasing" schedule (its README)


def block_removals(r: int, depth: int, schedule: str = "constant") -> list[int]:
    """Units removed per frame in each of ``depth`` blocks. ``constant``: r in every block;
    ``decreasing``: ToMe's ``parse_r`` with inflection -0.5, a line from int(1.5 r) down to
    about 0.5 r (the same total up to rounding)."""
    if schedule == "constant" or depth <= 1:
        return [int(r)] * depth
    if schedule != "decreasing":
        raise PruneVidError(f"tome_vision.schedule must be constant or decreasing, got '{schedule}'")
    low = int(r * (1.0 - DECREASING_INFLECT))
    high = 2 * r - low
    step = (high - low) / (depth - 1)
    return [int(low + step * i) for i in range(depth)]


def frame_keeps(t: int, n: int, fraction: float) -> list[int]:
    """A budget's units kept in each frame of a video of ``t`` frames of ``n`` units:
    ``round(B t n)`` in all (at least one a frame), the first frames one more where t does not
    divide it."""
    total = max(t, min(t * n, round(fraction * t * n)))
    k, extra = divmod(total, t)
    return [k + 1 if i < extra else k for i in range(t)]


def fewest_after(length: int, blocks: int) -> int:
    """The fewest units ``blocks`` merging blocks can leave of ``length``: ToMe's cap (at most
    half, ``bipartite_soft_matching``) in each."""
    for _ in range(blocks):
        length -= length // 2
    return length


def budget_removal(length: int, keep: int, blocks_left: int) -> int:
    """A frame of ``length`` units that should keep ``keep`` after ``blocks_left`` blocks (this
    one included): this block removes an even share of what is left to remove (rounded up), more
    where ToMe's cap would leave the later blocks short of it, and never more than the cap."""
    need, cap = length - keep, length // 2
    if need <= 0 or blocks_left <= 0:
        return 0
    x = min(cap, -(-need // blocks_left))
    while x < cap and fewest_after(length - x, blocks_left - 1) > keep:
        x += 1
    return x


def block_specs(text: str) -> list[int | str]:
    """``"3,6,9"`` -> [3, 6, 9]: the blocks (0-based) where inter-frame merging happens; an entry
    ``"K/N"`` stays a string, the block at the same relative depth as block K of an N-block
    tower (the patch resolves it for its tower: ``patch.tower.merge_blocks``)."""
    text = str(text or "").replace(" ", "")
    specs: list[int | str] = []
    for part in (p for p in text.split(",") if p):
        try:
            specs.append(part if "/" in part else int(part))
        except ValueError:
            raise PruneVidError(f"tome_vision.merge_layers must be block indices or depths like '3,6,9' or "
                                f"'8/32,16/32', got '{text}'") from None
    return specs


def runs(labels: Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of equal consecutive labels [U]."""
    if labels.numel() == 0:
        return []
    change = torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1
    edges = [0, *change.tolist(), labels.numel()]
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class TowerTokens:
    """The tower's sequence during one pass, in units: ``x`` [U, u * C] (a view of the block's
    hidden states), ``size`` [U] float (input units each stands for), ``pos`` [U] its
    representative's index among the input's units (its rotary position, frame and window),
    ``to_current`` [U0] the unit each input unit went into."""

    x: Tensor
    size: Tensor
    pos: Tensor
    to_current: Tensor


def merge_runs(tokens: TowerTokens, metric: Tensor, labels: Tensor, removals) -> TowerTokens:
    """One ToMe merge on the tower's sequence: within each run of equal ``labels`` [U] (a frame,
    or a clip of frames), bipartite soft matching on ``metric`` [U, D] (the block's keys, averaged
    over heads, side by side for a unit of several patches) removes ``removals(n, label)`` of its
    n units (at most half: ToMe's cap), each merge a size-weighted mean. A merged unit keeps its
    destination's ``pos``. Returns the shorter sequence, still in ascending ``pos``."""
    dest = torch.arange(tokens.x.shape[0], device=tokens.x.device)
    spans = runs(labels)
    firsts = labels[[start for start, _ in spans]].tolist() if spans else []
    batches: dict[tuple[int, int], list[int]] = {}
    for (start, end), label in zip(spans, firsts):
        r = int(removals(end - start, label))
        if r > 0:
            batches.setdefault((end - start, r), []).append(start)
    for (length, r), starts in batches.items():  # runs of one length and r matched together, one batch
        at = torch.tensor(starts, device=dest.device)[:, None] + torch.arange(length, device=dest.device)
        dest[at] = bipartite_soft_matching(metric[at], r) + at[:, :1]
    if bool((dest == torch.arange(dest.numel(), device=dest.device)).all()):
        return tokens
    x, size, kept, inverse = merge_by_destination(tokens.x, tokens.size, dest)
    return TowerTokens(x=x, size=size, pos=tokens.pos[kept], to_current=inverse[tokens.to_current])


def current_seqlens(cu_input: Tensor, patch_pos: Tensor) -> Tensor:
    """The tower's ``cu_seqlens`` for the current sequence: ``cu_input`` [S + 1] segments the
    input's patches (frames, or windows); a current patch at input index ``patch_pos`` [L] lies
    in its representative's segment. Empty segments are left out."""
    segment = torch.bucketize(patch_pos, cu_input.to(patch_pos.device), right=True) - 1
    counts = torch.bincount(segment, minlength=cu_input.numel() - 1)
    cu = torch.cat([counts.new_zeros(1), counts[counts > 0].cumsum(0)])
    return cu.to(dtype=cu_input.dtype, device=cu_input.device)


def patch_positions(pos: Tensor, unit: int) -> Tensor:
    """[U] unit indices -> [U * unit] the input patch indices of their patches."""
    if unit == 1:
        return pos
    return (pos[:, None] * unit + torch.arange(unit, device=pos.device)).flatten()
