"""PruneVid Stage 1 as a method: merge each video's static and similar tokens (``stages.stage1``)
before the LLM. Config section ``stage1`` (:class:`Stage1Config`).

``stage1.space`` says in which space: ``llm`` (the official place) on the visual tokens the
merger produced; ``vision`` on the vision tower's features before the merger, each LLM token
being its 2x2 patch features side by side. Both run the same algorithm on the rows they get;
in ``vision`` space the patch then projects only the merged rows through the merger."""

from __future__ import annotations

from dataclasses import dataclass

from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import UNIT, Method, Range, VideoTokens, VisualReduction, register_method
from prunevid_bench.methods.lines import register_line


SPACES = ("llm", "vision")


@dataclass
class Stage1Config:
    enabled: bool = False
    tau: float = 0.8  # a slot is static when its mean pairwise cosine over frames exceeds tau
    cluster_ratio: float = 0.5  # share of each token set kept as DPC-KNN cluster centres
    temporal_segment_ratio: float = 0.25  # segments = max(1, int(T * ratio))
    dpc_neighbours: int = 7  # DPC-KNN neighbours, self included (7 in the official code); formerly `k`
    min_cluster_tokens: int = 14  # sets this small are not clustered (14 in the official code)
    space: str = "llm"  # llm: on the LLM's visual tokens (official); vision: on the vision tower's patch features before its merger


def reduce(tokens: VideoTokens, cfg: Stage1Config) -> VisualReduction:
    from prunevid_bench.stages.stage1 import merge_video_tokens

    if not tokens.is_full_grid:
        raise PruneVidError("prunevid_stage1 needs each video's full token grid: run it before other visual-token methods")
    res = merge_video_tokens(
        tokens.embeds.reshape(tokens.t, tokens.n, -1),
        tau=cfg.tau,
        cluster_ratio=cfg.cluster_ratio,
        temporal_segment_ratio=cfg.temporal_segment_ratio,
        k=cfg.dpc_neighbours,
        min_cluster_tokens=cfg.min_cluster_tokens,
    )
    device = tokens.index.device
    return VisualReduction(
        dest=res.token_to_merged.to(device),
        group=res.group.to(device),
        representative=res.representative.to(device),
        embeds=res.merged,
        stats={"stage1_segments": res.n_segments, "stage1_static_tokens": res.n_static_tokens,
               "stage1_dynamic_tokens": res.n_dynamic_tokens},
    )


def _no_effect(key: str, cfg: Stage1Config) -> str | None:
    """Why sweeping ``key`` changed nothing: a set is clustered only when it holds more than
    min_cluster_tokens (14 in the official code), so two cluster ratios that keep the same
    counts never clustered a set."""
    if key in ("cluster_ratio", "dpc_neighbours"):
        return (f"every token set is at most stage1.min_cluster_tokens={cfg.min_cluster_tokens}, so no set "
                "was clustered (lower min_cluster_tokens, or give more tokens per frame)")
    return None


register_method(Method(
    name="prunevid_stage1",
    section="stage1",
    acts="visual_tokens",
    config=Stage1Config,
    departs="no density noise (ties by index); a merged token keeps its representative's M-RoPE id and tokens stay in position order; space: vision is ours (docs/algorithm.md, docs/methods.md)",
    summary="PruneVid Stage 1: merge static tokens over time, then cluster (DPC-KNN) and average similar ones",
    choices={"space": SPACES},
    placement=lambda cfg: "vision_encoder" if cfg.space == "vision" else "visual_tokens",
    keeps_everything={"tau": 1.0, "cluster_ratio": 1.0},  # nothing static, every token its own cluster
    ranges={"tau": UNIT, "cluster_ratio": UNIT, "temporal_segment_ratio": UNIT,
            "dpc_neighbours": Range(1), "min_cluster_tokens": Range(0)},
    record_fields=("tokens_before_stage1", "tokens_after_stage1", "stage1_segments", "stage1_static_tokens",
                   "stage1_dynamic_tokens", "stage1_s"),
    reduce=reduce,
    label=lambda v, layer: (f"S1 tau={v['tau']} c={v['cluster_ratio']} seg={v['temporal_segment_ratio']}"
                            + (f" space={v['space']}" if v.get("space", "llm") != "llm" else "")),  # the official space says nothing
    short_keys_first=True,  # the short names of the presets and sweeps written before the registry
    renamed_keys={"k": "dpc_neighbours"},  # `k` read like the pruning layer K
    no_effect=_no_effect,
))
# PruneVid as one line of a method grid: both stages (Stage 1 with the base's settings, the budget
# drives Stage 2), and the same with Stage 1 in the vision encoder's space.
register_line("prunevid", ("prunevid_stage1", "prunevid_stage2"))
register_line("prunevid-vision", ("prunevid_stage1", "prunevid_stage2"), {"stage1.space": "vision"})
