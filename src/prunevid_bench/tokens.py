"""The visual tokens of one video as one object, and a reduction as an operator on it (ToMe's
design: a matching is computed once and applied to every aligned tensor).

A visual-token method returns :class:`VisualReduction`: which output row each input token went
to (``dest``, -1 for a dropped token) and whose position each output row takes
(``representative``). :func:`apply_reduction` applies that one operator to everything that
travels with the tokens: embeddings, M-RoPE positions, sizes and every extra per-token tensor a
family or method adds (a drop gathers, a merge takes the size-weighted mean). No method touches
positions or extras itself.

Shapes: V input tokens, M output rows, C channels, T * N the video's full grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a tensor is made: `prunevid methods` lists methods without it
    from torch import Tensor

from prunevid_bench.errors import PruneVidError


@dataclass
class VideoTokens:
    """One video's visual tokens.

    ``embeds`` [V, C]; ``index`` [V]: each token's place in the video's full grid (t * n tokens,
    frame-major; a merged token's is its representative's); ``group`` [V]: the group an LLM-layer
    method keeps a share of (a temporal grid step until a method says otherwise); ``t``, ``n``:
    temporal grid steps and tokens per step of the full grid; ``w``: the full grid's width in
    tokens (n = H' * w). Carried along (the patch fills them; methods only read them):
    ``positions`` [R, V] the M-RoPE ids (None inside the vision encoder, where there are none
    yet), ``sizes`` [V] how many grid tokens each stands for, ``extras`` {name: [V, ...]} the
    other per-token tensors, ``origin`` [T * N] the row each grid token is now in (-1: dropped).
    ``previous`` [n, C]: the temporal step just before these tokens when there is one (a stream's
    previous chunk's last step; None offline), for methods that compare a step with the one
    before (EVS)."""

    embeds: Any
    index: Any
    group: Any
    t: int
    n: int
    w: int = 0
    positions: Any = None
    sizes: Any = None
    extras: dict = field(default_factory=dict)
    origin: Any = None
    previous: Any = None

    @property
    def is_full_grid(self) -> bool:
        return self.index.numel() == self.t * self.n

    @classmethod
    def full_grid(cls, embeds: Tensor, t: int, n: int, w: int, positions=None, extras=None) -> VideoTokens:
        """A video as the encoder gives it: every grid token, one group per temporal step, size 1."""
        import torch

        full = torch.arange(t * n, device=embeds.device)
        return cls(embeds, full, full // n, t, n, w, positions=positions,
                   sizes=torch.ones(t * n, device=embeds.device), extras=dict(extras or {}), origin=full)


@dataclass
class VisualReduction:
    """What a ``visual_tokens`` (or ``vision_encoder``) method returns: an operator.

    ``dest`` [V] the output row of each input token (-1: dropped); ``group`` [M] the output rows'
    groups numbered from 0; ``representative`` [M] (ascending) the input token whose position
    and grid index each row takes (by default its first member); ``embeds`` [M, C] (optional)
    the method's own arithmetic for the merged rows (e.g. ToMe's round by round), which must
    equal the operator applied to the input's embeddings up to rounding; ``stats`` record fields
    (summed over videos).

    ``proportional_attention`` (ToMe): add log(size) of every output row to every query's
    attention logit for that key, in every layer. ``positions_after`` (None, the default: every
    id stays as it was): a method that renumbers what follows the video sets it to n. The first
    token after the video then gets the video's first M-RoPE id + n, and every later token
    (text, later videos) moves by as much, on the M-RoPE rows (the text row stays the contiguous
    index); with several videos the moves add up, first video first. Decoding then continues
    from the prompt's largest M-RoPE id + 1, the rule of vLLM's ``mrope_position_delta`` and of
    transformers' ``rope_deltas``."""

    dest: Any
    group: Any
    representative: Any = None
    embeds: Any = None
    stats: dict[str, int] = field(default_factory=dict)
    proportional_attention: bool = False
    positions_after: int | None = None

    @classmethod
    def keep(cls, keep: Tensor, n_in: int, group: Tensor, **kwargs) -> VisualReduction:
        """A drop: the input tokens ``keep`` [M] (ascending) stay, the others go."""
        import torch

        dest = torch.full((n_in,), -1, dtype=torch.long, device=keep.device)
        dest[keep] = torch.arange(keep.numel(), device=keep.device)
        return cls(dest=dest, group=group, representative=keep, **kwargs)

    @property
    def n_out(self) -> int:
        return int(self.group.numel())


def members_first(dest: Tensor, n_out: int) -> Tensor:
    """[M] the lowest input index that went into each output row."""
    import torch

    first = torch.full((n_out,), dest.numel(), dtype=torch.long, device=dest.device)
    went = dest >= 0
    return first.scatter_reduce(0, dest[went], torch.nonzero(went).flatten(), "amin")


def weighted_rows(x: Tensor, dest: Tensor, weight: Tensor, n_out: int) -> Tensor:
    """x [V, ...] -> [M, ...]: row m is the ``weight``-weighted mean of the inputs sent to it
    (float32 maths, cast back); a row with one member is that member, exactly (a gather)."""
    import torch

    went = dest >= 0
    count = torch.zeros(n_out, device=dest.device, dtype=torch.long).index_add_(0, dest[went], torch.ones_like(dest[went]))
    first = members_first(dest, n_out)
    if bool((count == 1).all()):
        return x[first]
    w = weight.float().to(x.device)[went]
    flat = x[went].reshape(int(went.sum()), -1).float()
    total = torch.zeros(n_out, device=x.device).index_add_(0, dest[went].to(x.device), w)
    summed = torch.zeros(n_out, flat.shape[1], device=x.device).index_add_(0, dest[went].to(x.device), flat * w[:, None])
    out = (summed / total[:, None]).to(x.dtype).reshape(n_out, *x.shape[1:])
    single = (count == 1).to(x.device)
    out[single] = x[first[single]]
    return out


def check_reduction(red: VisualReduction, n_in: int, name: str) -> Tensor:
    """The reduction's representatives [M], after checking that it is an operator on ``n_in``
    tokens: every output row has members, each representative is one of its row's members, the
    rows are in ascending order of their representatives."""
    import torch

    dest, m = red.dest, red.n_out
    if dest.numel() != n_in or (m and (int(dest.max()) >= m or int(dest.min()) < -1)):
        raise PruneVidError(f"{name} returned a reduction that is not an operator on its {n_in} tokens "
                            f"(dest must give each token an output row in [0, {m}) or -1)")
    rep = members_first(dest, m) if red.representative is None else red.representative.to(dest.device)
    if rep.numel() != m or (m and (bool((rep >= n_in).any()) or not torch.equal(dest[rep], torch.arange(m, device=dest.device)))):
        raise PruneVidError(f"{name}: every output row needs members, and its representative must be one of them")
    if bool((rep[1:] <= rep[:-1]).any()):
        raise PruneVidError(f"{name}: output rows must be in ascending order of their representatives")
    if red.embeds is not None and red.embeds.shape[0] != m:
        raise PruneVidError(f"{name} returned {red.embeds.shape[0]} embeddings for {m} output rows")
    return rep


def apply_reduction(tokens: VideoTokens, red: VisualReduction, name: str = "a method") -> VideoTokens:
    """The one operator ``red`` applied to everything ``tokens`` carries: embeddings (the
    method's own rows when it gave them), sizes (summed), positions and grid index (the
    representative's), every extra (size-weighted mean; a drop gathers) and the origin map."""
    import torch

    dest = red.dest.to(tokens.index.device)
    rep = check_reduction(replace(red, dest=dest), tokens.index.numel(), name)
    m = red.n_out
    sizes = tokens.sizes if tokens.sizes is not None else torch.ones(tokens.index.numel(), device=dest.device)
    went = dest >= 0
    new_sizes = torch.zeros(m, device=sizes.device).index_add_(0, dest[went].to(sizes.device), sizes.float()[went.to(sizes.device)])
    embeds = red.embeds if red.embeds is not None else weighted_rows(tokens.embeds, dest, sizes, m)
    origin = None
    if tokens.origin is not None:
        origin = torch.where(tokens.origin >= 0, dest[tokens.origin.clamp(min=0)], tokens.origin)
    return VideoTokens(
        embeds=embeds, index=tokens.index[rep], group=red.group.to(dest.device), t=tokens.t, n=tokens.n, w=tokens.w,
        positions=tokens.positions[:, rep.to(tokens.positions.device)] if tokens.positions is not None else None,
        sizes=new_sizes,
        extras={key: weighted_rows(value, dest.to(value.device), sizes, m) for key, value in tokens.extras.items()},
        origin=origin,
    )
