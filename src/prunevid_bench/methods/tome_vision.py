"""ToMe inside the vision tower's blocks (the seed's video-retrieval ToMe): in every block, after
attention, bipartite soft matching on the block's keys merges ``r`` tokens of each frame into
others (size-weighted means), the later blocks attend with ToMe's proportional attention; at the
``merge_layers`` blocks tokens also merge across each clip of ``clip_frames`` frames. The work is
``patch.tower`` on the tower's blocks; the algorithm ``stages.tome_vision``.

``merger``: ``unmerge`` (default) hands the patch mergers the full grid back (ToMe's unmerge:
the time saved is the blocks', the LLM sees every token, so any LLM-side method can follow);
``groups`` matches and merges whole merge x merge patch groups, and the merger projects one row
per merged group: the LLM sees fewer tokens (this module's ``reduce`` hands that operator over)."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, BudgetKnob, Method, Range, VideoTokens, VisualReduction, register_method

BELOW_ONE = Range(0, 1, hi_open=True)


@dataclass
class ToMeVisionConfig:
    enabled: bool = False
    r: int = 8  # tokens (patches, or 2x2 groups with merger: groups) merged per frame in each block (0: none)
    schedule: str = "constant"  # r in every block, or ToMe's "decreasing" line from 1.5 r to 0.5 r
    merge_layers: str | None = None  # blocks (0-based, "3,6,9") that merge across frames instead of r within them
    clip_frames: int = 2  # temporal steps matched together at those blocks (the seed's merge_frame_nums)
    inter_proportion: float = 0.25  # at those blocks: share of each clip's tokens merged across its frames
    intra_proportion: float = 0.0  # ... and, first, share of each frame's tokens merged within it
    proportional_attention: bool = True  # ToMe's log(size) on the keys' logits in the tower's attention
    merger: str = "unmerge"  # unmerge: full grid to the mergers; groups: merge whole 2x2 groups, fewer LLM tokens
    budget: float | None = None  # kept fraction of each video's units at the last block; replaces r and schedule


def install(handle, cfg: ToMeVisionConfig):
    from prunevid_bench.patch.tower import TowerMerging

    tower = TowerMerging(handle, cfg)
    _TOWERS[id(cfg)] = tower
    tower.on_remove = lambda: _TOWERS.pop(id(cfg), None)
    return tower


_TOWERS: dict[int, object] = {}  # config object -> its installed TowerMerging (the groups mode's reduce reads it)


def reduce(tokens: VideoTokens, cfg: ToMeVisionConfig) -> VisualReduction:
    """``merger: groups``: the merges the tower made, as an operator on the video's merger
    rows (raster order; the mergers' pre-hook gave every member its merged group's row, so the
    operator's size-weighted mean is that row). The tower pass holds the groups in tower order
    (Qwen2.5-VL: window by window), so ``order`` (the family's ``merger_order``) maps them to
    raster order. (On Qwen3-VL the handle refuses this mode: DeepStack.)"""
    import torch

    tower = _TOWERS.get(id(cfg))
    p = (tower.active or tower.last) if tower is not None else None  # the merger runs inside the pass
    if p is None or tower.video_rows is None:
        raise PruneVidError("tome_vision found no tower pass for this video; is the vision tower running?")
    order, start = tower.video_rows.pop(0)
    n = tokens.t * tokens.n
    mine = (p.tokens.pos >= start) & (p.tokens.pos < start + n)
    rows = torch.nonzero(mine).flatten()
    order = order.to(p.tokens.pos.device)
    raster_rep = order[p.tokens.pos[rows]] - start  # window_index keeps each video's groups together
    ranked = torch.argsort(raster_rep)
    new_row = torch.empty_like(ranked)
    new_row[ranked] = torch.arange(ranked.numel(), device=ranked.device)
    to_current = p.tokens.to_current[start : start + n] - rows[0]  # tower order -> the video's merged rows
    raster_of_tower = order[start : start + n] - start
    dest = torch.empty(n, dtype=torch.long, device=to_current.device)
    dest[raster_of_tower] = new_row[to_current]
    rep = raster_rep[ranked]
    return VisualReduction(dest=dest.to(tokens.index.device), group=tokens.group[rep.to(tokens.group.device)].unique(
        return_inverse=True)[1], representative=rep.to(tokens.index.device),
        stats={"tome_vision_merged_groups": int(n - rows.numel())})


UNMERGE_TOKENS = ("tome_vision with merger: unmerge hands the LLM every visual token, so a token budget does not "
                  "apply: match it by FLOPs (--match flops), or set tome_vision.merger=groups")


def budget_knob(cfg: ToMeVisionConfig, fraction: float) -> BudgetKnob:
    """``budget``: each video keeps ``round(B T U)`` of its T x U units at the tower's last block
    (``stages.tome_vision.frame_keeps``: whole frames' shares, one more in the first frames), the
    removals spread over the blocks within ToMe's cap (``budget_removal``). ``groups``: units are
    the LLM's tokens, and the promise is that count (a tower too shallow for the cap to allow it
    keeps more, and the record says so); ``unmerge``: units are patches, the LLM's tokens do not
    change (the promise is all of them, and only a FLOPs budget applies)."""
    from prunevid_bench.stages import tome_vision as tv

    groups = cfg.merger == "groups"

    def promise(grids):
        return sum(sum(tv.frame_keeps(t, n, fraction)) if groups else t * n for t, n in grids)

    def tower_blocks(vision, grids):
        """The plan's counts in every block; a window block's pairs are the full grid's shrunk by
        the frame's kept share squared (which window a merged token stays in follows the content)."""
        from prunevid_bench.flops import frame_pairs

        unit = vision.spatial_merge_size**2 if groups else 1
        blocks = [[0, 0, 0] for _ in range(vision.depth)]
        for t, h, w in grids:
            n = h * w // unit
            for keep in tv.frame_keeps(t, n, fraction):
                length = n
                for b, counts in enumerate(blocks):
                    gone = tv.budget_removal(length, keep, vision.depth - b)
                    counts[0] += length * unit
                    counts[1] += round(frame_pairs(vision, h, w, b) * (length / n) ** 2)
                    counts[2] += (length - gone) * unit
                    length -= gone
        return [tuple(c) for c in blocks]

    return BudgetKnob({"budget": fraction}, promise, tower_blocks, "" if groups else UNMERGE_TOKENS)


register_method(Method(
    name="tome_vision",
    acts="vision_encoder",
    config=ToMeVisionConfig,
    summary="ToMe in the vision tower's blocks: r tokens merged per frame per block, across frames at chosen blocks",
    departs="merged tokens keep their representative's frame, window and rotary position; the inter-frame step "
            "matches on the survivors' keys; per-frame r (docs/methods.md)",
    ranges={"r": Range(0), "clip_frames": Range(1), "inter_proportion": BELOW_ONE, "intra_proportion": BELOW_ONE,
            "budget": UNIT},
    choices={"schedule": ("constant", "decreasing"), "merger": ("unmerge", "groups")},
    record_fields=("tome_vision_block_patches", "tome_vision_tower_tokens_out", "tome_vision_merged_groups"),
    reduce=reduce,
    tower=install,
    reduces_merger_input=lambda cfg: cfg.merger == "groups",
    keeps_everything={"r": 0},
    budget_knob=budget_knob,
))
