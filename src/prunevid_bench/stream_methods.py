"""Which methods a stream runs, and the visual-token methods on one chunk.

A stream runs every enabled ``visual_tokens`` method on each chunk's tokens as it arrives
(PruneVid Stage 1, ToMe, EVS, VidCom2, a plug-in: each sees the chunk's frames as a video of
``t`` temporal steps; EVS also sees the previous chunk's last step, ``VideoTokens.previous``, so
a chunk's first step is compared with it) and the LLM-layer method it has a question-time
implementation for (``Method.stream_eviction``). Anything else is refused in one
line before any work (``check_stream_methods``): a method placed inside the vision encoder, an
LLM-layer method without a stream implementation, and a reduction the stream cannot carry into
its cache (token sizes for proportional attention, positions renumbered after the video), found
by running each visual-token method once on a small synthetic grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunevid_bench.errors import PruneVidError


@dataclass
class ChunkReduction:
    """The visual-token methods' result on one chunk: ``embeds`` [M, C]; ``keep`` [M] the index
    among the chunk's ``t * n`` tokens whose M-RoPE ids each takes; ``groups`` [M] numbered within
    the chunk (what an LLM-layer method keeps a share of); ``methods`` the names that acted."""

    embeds: torch.Tensor
    keep: torch.Tensor
    groups: torch.Tensor
    methods: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # the chunk's per-token extras (DeepStack levels), reduced alike


def enabled_methods(cfg) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """(visual-token, LLM-layer, vision-encoder) methods enabled in ``cfg``, each with its section."""
    from prunevid_bench.methods import get_method

    places: dict[str, list] = {"visual_tokens": [], "llm_layer": [], "vision_encoder": []}
    for name in cfg.enabled_methods:
        method = get_method(name)
        section = cfg.section(method.section)
        places[method.where(section)].append((method, section))
    return places["visual_tokens"], places["llm_layer"], places["vision_encoder"]


def check_stream_methods(cfg, cache_tokens: int | None = None) -> None:
    """Refuse, in one line and before any work, what a stream cannot run as it says."""
    from prunevid_bench.methods import all_methods

    visual, layer, encoder = enabled_methods(cfg)
    for method, section in visual + layer:
        if len(method.acts_at(section)) > 1:
            raise PruneVidError(f"{method.name} acts at {' and '.join(method.acts_at(section))} with this config; a stream "
                                f"runs it at {method.where(section)} only: turn its other place off")
    for method, _ in encoder:
        raise PruneVidError(f"a stream runs visual-token methods on each chunk's LLM tokens; {method.name} acts "
                            f"inside the vision encoder with this config: place it on the LLM's tokens or turn it off")
    for method, section in layer:
        if method.stream_eviction is None:
            able = ", ".join(m.name for m in all_methods() if m.stream_eviction is not None)
            raise PruneVidError(f"{method.name} cannot run in a stream yet (question-time eviction there is "
                                f"{able}'s): turn it off")
        method.stream_eviction().check(section)
    if cache_tokens is not None and visual:
        raise PruneVidError(f"--cache-tokens and a visual-token method per chunk ({visual[0][0].name}) cannot be combined "
                            "yet; choose one")
    for method, section in visual:
        if method.vision_attention is not None and method.vision_attention(section) is not None:
            raise PruneVidError(f"{method.name} reads the vision tower's attention, which a stream does not capture "
                                "yet: turn it off")
        _probe(method, section)


def _probe(method, section) -> None:
    """Run one visual-token method on a synthetic 2-step grid of 4 x 4 tokens: a reduction that
    asks for proportional attention or renumbers what follows the video is refused."""
    from prunevid_bench.methods import VideoTokens

    generator = torch.Generator().manual_seed(0)
    t, n = 2, 16
    tokens = VideoTokens(embeds=torch.randn(t * n, 8, generator=generator), index=torch.arange(t * n),
                         group=torch.arange(t * n) // n, t=t, n=n, w=4)
    try:
        out = method.reduce(tokens, section)
    except Exception:  # noqa: BLE001 - a probe only: the real chunks will tell, with the method's own message
        return
    if getattr(out, "proportional_attention", False):
        raise PruneVidError(f"{method.name} asks for proportional attention (token sizes on the keys), which a "
                            "stream's cache cannot carry yet: turn that option off")
    if getattr(out, "positions_after", None) is not None:
        raise PruneVidError(f"{method.name} renumbers the positions after the video, which a stream cannot know "
                            "before the video ends: keep the unpruned positions")


def reduce_chunk(visual: list[tuple[Any, Any]], features: torch.Tensor, t: int, n: int, w: int,
                 previous: torch.Tensor | None, extras: dict | None = None) -> ChunkReduction:
    """The visual-token methods, in the order they run offline, on one chunk's features
    ``[t * n, C]`` (t-major); ``previous`` [n, C]: the stream's step before the chunk (None for
    the first chunk); ``extras`` {name: [t * n, ...]}: per-token tensors every reduction applies to
(a drop gathers them, a merge averages them). Without methods every token stays and each
temporal step is a group."""
    from prunevid_bench.tokens import VideoTokens, apply_reduction

    tokens = VideoTokens.full_grid(features, t, n, w, extras=extras)
    names, stats = [], {}
    for method, section in visual:
        tokens.previous = previous
        out = method.reduce(tokens, section)
        tokens = apply_reduction(tokens, out, method.name)
        names.append(method.name)
        for key, value in out.stats.items():
            stats[key] = stats.get(key, 0) + int(value)
    return ChunkReduction(tokens.embeds.to(features.dtype), tokens.index, tokens.group.to(features.device), names, stats,
                          dict(tokens.extras))
