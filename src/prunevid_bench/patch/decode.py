"""The ``decode`` place: at every decoding step, after layer l - 1 has run on the new token, the
decode method sees that token's query and that layer's cached keys and names the visual tokens
the layers from l attend to at this step. Those layers get a view of the cache that stores the
new key and value as usual and hands attention only the kept positions (every text and generated
position, and the kept visual ones): the cache itself is never shortened (DyCoke's
``PrunableDynamicCache``). Each step's cost is recorded: positions attended by those layers,
positions cached, and the key/value bytes all layers read."""

from __future__ import annotations

import torch

from prunevid_bench import splice
from prunevid_bench.config import resolve_layer
from prunevid_bench.errors import PruneVidError
from prunevid_bench.methods import DecodeContext, call_method, check_indices


class KeptPositions:
    """A KV cache as the layers from l see it at one step: ``update`` stores the new key and
    value in the real cache, then returns only the ``kept`` positions; the rest is the cache's."""

    def __init__(self, cache, kept: torch.Tensor):
        self._cache, self._kept = cache, kept

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self._cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        return keys.index_select(-2, self._kept), values.index_select(-2, self._kept)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def decode_layer(method, cfg, num_layers: int) -> int:
    """l as configured: an index >= 1, or "K/N" (a depth too shallow for the model: layer 1)."""
    spec = method.decode_layer(cfg)
    key = f"{method.section}.decode_layer"
    layer = resolve_layer(spec, num_layers, key)
    if isinstance(spec, str) and "/" in spec:
        layer = max(1, layer)
    if layer < 1:
        raise PruneVidError(f"{key} must be >= 1: {method.name} scores with layer l-1 while decoding, got {spec}")
    return layer


class DecodeMethod:
    """Mixed into ``ReductionHandle``."""

    def _check_decode(self) -> None:
        """Refusals and l, before any hook is installed (a refusal then leaves the model as it was)."""
        method, cfg = self.decode_method
        if self.layer_method is not None:
            raise PruneVidError(f"{method.name}'s decoding stage cannot run with an LLM-layer method ({self.layer_method[0].name}) "
                                "yet: the layers' caches differ in length; turn one off")
        if self.family.is_hybrid(self.model):
            raise PruneVidError(f"{method.name}'s decoding stage cannot run on {self.family.model_type}: its linear-attention "
                                "layers hold every token in a recurrent state, so a step cannot leave visual tokens out; "
                                f"set {method.section}.kv_prune=false")
        self.decode_at = decode_layer(method, cfg, self.num_layers)

    def _install_decode(self, layers, add) -> None:
        scored = layers[self.decode_at - 1]
        q_at, _ = self.family.query_key(self.family.attention(scored))
        add(q_at.register_forward_hook(self._decode_capture_q))
        add(scored.register_forward_pre_hook(self._decode_capture_rotary, with_kwargs=True))
        add(scored.register_forward_hook(self._decode_select, with_kwargs=True))
        for later in layers[self.decode_at :]:
            add(later.register_forward_pre_hook(self._decode_view, with_kwargs=True))

    def _decoding(self, hidden: torch.Tensor) -> bool:
        st = self.state
        return not st.prefill and hidden.shape[1] == 1 and st.visual_positions is not None and st.visual_positions.numel() > 0

    def _decode_capture_q(self, module, args, output):
        if self._decoding(args[0]):
            self.state.captured["decode_q"] = output
        return None

    def _decode_capture_rotary(self, module, args, kwargs):
        if self._decoding(args[0]):
            self.state.captured["decode_rotary"] = kwargs.get("position_embeddings")
        return None

    def _decode_select(self, module, args, kwargs, output):
        st = self.state
        st.decode_kept = None
        if not self._decoding(args[0]) or "decode_q" not in st.captured:
            return None
        method, cfg = self.decode_method
        if st.key_log_size is not None:
            raise PruneVidError(f"proportional attention cannot be combined with {method.name}'s decoding stage yet; turn one off")
        start = self.clock.mark()
        attn, cache = self.family.attention(module), splice.cache_kwarg(kwargs)
        layer = cache.layers[self.decode_at - 1]
        q = st.captured.pop("decode_q")[0].view(1, -1, attn.head_dim).transpose(0, 1)  # [H, 1, d], before rotary
        q, _ = self.family.rotate(q, q, st.captured.pop("decode_rotary"))
        keys = layer.keys[0]  # [H_kv, S, d], rotary applied, the new token's last
        ctx = DecodeContext(q=q, k=keys, visual=st.visual_positions, scaling=attn.scaling,
                            step=len(st.decode_attended), memory=st.decode_memory)
        kept = call_method(method, "decode", (ctx, cfg), lambda out: out is None or check_indices(
            method, "kept visual tokens", out, int(st.visual_positions.numel())))
        cached = keys.shape[-2]
        if kept is not None:
            keep = torch.ones(cached, dtype=torch.bool, device=keys.device)
            keep[st.visual_positions] = False
            keep[st.visual_positions[kept]] = True
            st.decode_kept = torch.nonzero(keep).flatten()
        attended = cached if st.decode_kept is None else int(st.decode_kept.numel())
        st.decode_attended.append(attended)
        st.decode_cached.append(cached)
        st.decode_kept_steps.append(st.decode_kept)
        per_position = 2 * keys.shape[0] * keys.shape[-1] * keys.element_size()  # K and V, one layer
        n_layers = len(cache.layers)
        st.decode_kv_bytes_full += per_position * cached * n_layers
        st.decode_kv_bytes_attended += per_position * (cached * self.decode_at + attended * (n_layers - self.decode_at))
        st.method_marks.setdefault(self.decode_key, []).append((start, self.clock.mark()))
        return None

    def _decode_view(self, module, args, kwargs):
        st = self.state
        if st.decode_kept is None or not self._decoding(args[0]):
            return None
        name = "cache" if "cache" in kwargs else "past_key_values"
        kwargs[name] = KeptPositions(kwargs[name], st.decode_kept)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] == st.decode_cached[-1]:
            kwargs["attention_mask"] = mask.index_select(-1, st.decode_kept)
        return args, kwargs
