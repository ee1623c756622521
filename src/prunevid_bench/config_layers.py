"""A model layer as a config names it: an index or a relative depth "K/N" (moved from config.py)."""

from __future__ import annotations

import re
from typing import Any

from prunevid_bench.errors import PruneVidError


LAYER_FORMS = "a 0-based layer index (e.g. 10) or a relative depth 'K/N' with 0 <= K < N (e.g. '10/28': layer 10 of 28)"


def parse_layer(key: str, value: Any) -> int | str:
    """A layer as written: an absolute index (``10``, ``"10"``) -> int, a relative depth
    (``"10/28"``, ``" 10 / 28 "``) -> ``"10/28"``; anything else raises naming the key."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+)\s*(?:/\s*([0-9]+)\s*)?", value)
        if match and match[2] is None:
            return int(match[1])
        if match and int(match[1]) < int(match[2]):
            return f"{int(match[1])}/{int(match[2])}"
    raise PruneVidError(f"{key} must be {LAYER_FORMS}, got {value!r}")


def resolve_layer(spec: int | str, num_layers: int, key: str = "pruning_layer") -> int:
    """The absolute 0-based layer that ``spec`` names in a model of ``num_layers`` layers.

    An int is taken as is and must exist in the model. ``"K/N"`` is the layer at the same relative
    depth as layer K of an N-layer model: ``K * L / N`` rounded half up, clamped to [0, L-1]. So
    the paper's ``"10/28"`` (Qwen2.5-VL-7B) is 10 on 28 layers, 13 on 36 (3B), 23 on 64 (32B),
    29 on 80 (72B) and 1 on the 4-layer toy model.
    """
    spec = parse_layer(key, spec)
    if isinstance(spec, str):
        k, n = map(int, spec.split("/"))
        return min(num_layers - 1, (2 * k * num_layers + n) // (2 * n))  # floor(k*L/n + 1/2) in integers
    if spec >= num_layers:
        raise PruneVidError(
            f"{key} must be in [0, {num_layers - 1}] for this model ({num_layers} layers), got {spec}; "
            f"or give a relative depth such as '10/28'"
        )
    return spec


def method_layers(method, spec, num_layers: int, attention: list[int]) -> tuple[int, int, int]:
    """(K as the method means it, the last layer that runs on every token: the one scored, K as
    the spec names it). On a hybrid model the scored layer must be a full-attention layer
    (``attention``): a relative depth moves down to the nearest one (the shallowest when none is
    at or below it); an absolute K that would score a linear layer is refused."""
    key = f"{method.section}.pruning_layer"
    k = resolve_layer(spec, num_layers, key)
    requested, shift = k, int(method.prunes_before)
    if method.prunes_before:
        if isinstance(spec, str) and "/" in spec:
            k = max(1, k)  # a relative depth too shallow for this model: the shallowest K there is
        if k < 1:
            raise PruneVidError(f"{key} must be >= 1: {method.name} scores with layer K-1's attention and prunes "
                                f"before layer K, got {spec}")
    if k - shift not in attention:
        if not (isinstance(spec, str) and "/" in spec):
            valid = [a + shift for a in attention if a + shift < num_layers]
            nearest = sorted(valid, key=lambda a: (abs(a - k), a))[:2]
            scored = f"layer K-1 = {k - 1}" if shift else f"layer {k}"
            raise PruneVidError(f"{key} = {spec}: {method.name} would score at {scored}, a linear-attention layer of "
                                f"this hybrid model (no attention to score); the nearest K that scores a full-attention "
                                f"layer: {' or '.join(map(str, sorted(nearest)))}")
        below = [a for a in attention if a <= k - shift]
        k = (below[-1] if below else attention[0]) + shift
        if k >= num_layers:  # FastV on a model whose only full-attention layer is its last
            raise PruneVidError(f"{key} = {spec}: {method.name} prunes after the layer it scores, and this hybrid "
                                "model has no full-attention layer before its last")
    return k, k - shift, requested
