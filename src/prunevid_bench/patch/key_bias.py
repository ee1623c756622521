"""Proportional attention (ToMe): log(size) of every prompt key added to every query's logit, in
every layer; in the keys' extra channels under SDPA without a mask, in the additive mask
otherwise."""

from __future__ import annotations

import torch

from prunevid_bench import splice
from prunevid_bench.overrides import MappingOverride

EXTRA_CHANNELS = 8  # proportional attention's extra q/k/v channels (two used; 8 keeps head dims kernel-friendly)


def with_key_bias(query, key, value, key_bias: torch.Tensor, scale: float):
    """(q', k', v') with ``EXTRA_CHANNELS`` more channels each, so that ``scale * q'.k'`` is
    ``scale * q.k + key_bias`` (key_bias [n_kv] float32, per key) and ``softmax(.) v'`` is the
    output followed by zeros: queries get two channels of 1, keys ``key_bias / scale`` in the
    first and what its rounding to the keys' dtype lost in the second, values zeros."""
    q_extra = query.new_zeros(*query.shape[:-1], EXTRA_CHANNELS)
    q_extra[..., :2] = 1
    k_extra = key.new_zeros(*key.shape[:-1], EXTRA_CHANNELS)
    target = key_bias / scale
    high = target.to(key.dtype)  # and what bf16/fp16 rounding lost, in a second channel
    k_extra[..., 0], k_extra[..., 1] = high, (target - high.float()).to(key.dtype)
    v_extra = value.new_zeros(*value.shape[:-1], EXTRA_CHANNELS)
    return torch.cat([query, q_extra], -1), torch.cat([key, k_extra], -1), torch.cat([value, v_extra], -1)


class KeyBias:
    """Mixed into ``ReductionHandle``."""

    def _wrap_sdpa(self, attention_ids: set[int]):
        """Proportional attention under SDPA without a mask: for this model's attention modules,
        transformers' ``sdpa`` attention function gets each query two more channels of 1 and each
        key two more holding log(size) / scaling (0 for text and generated tokens; the second
        holds what the first's rounding to bf16/fp16 lost), padded to 8 channels of which the rest
        are 0, and values 8 zero channels (dropped from the output).
        So ``scaling * q'.k'`` is ``scaling * q.k + log(size)``, exactly the biased logit, and
        the kernel stays causal: an explicit mask would make it compute the whole L x L. Any
        other model, a call with a mask (``_add_key_bias`` then biases the mask), or a sample
        without sizes goes to the function as it was. Returns an object with ``remove()``."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def sdpa_with_key_bias(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
            bias = self.state.key_log_size
            # not self._hooks: this handle was removed, but a later one wrapped this function
            if bias is None or not self._hooks or attention_mask is not None or id(module) not in attention_ids:
                return original(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
            dim, n_kv = query.shape[-1], key.shape[-2]
            scale = scaling if scaling is not None else dim**-0.5
            key_bias = torch.zeros(n_kv, device=key.device, dtype=torch.float32)
            key_bias[: min(n_kv, bias.numel())] = bias[:n_kv].to(key.device)
            out, weights = original(module, *with_key_bias(query, key, value, key_bias, scale), None, *args,
                                    scaling=scale, **kwargs)
            return out[..., :dim], weights

        return MappingOverride(ALL_ATTENTION_FUNCTIONS, "sdpa", sdpa_with_key_bias)

    def _add_key_bias(self, layer_idx: int, module, args, kwargs):
        """Proportional attention (ToMe) with a mask: the layer's additive mask becomes causal +
        log(size) of every prompt key (0 for text and generated tokens); prefill and decode alike.
        Query i of this call sits at sequence index past + i. Every layer of one forward gets the
        same mask, so it is built once per forward. Under SDPA with no mask of its own the layer
        is left alone: ``_wrap_sdpa`` puts the bias in the keys instead."""
        bias = self.state.key_log_size
        if bias is None:
            return None
        if kwargs.get("attention_mask") is None and self.attn_implementation == "sdpa":
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = splice.cache_kwarg(kwargs)
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        n_q, n_kv = hidden.shape[1], past + hidden.shape[1]
        mask = kwargs.get("attention_mask")
        shape = (past, n_q, hidden.dtype, hidden.device)
        built = self.state.key_bias_mask
        if built is None or built[0] is not mask or built[1] != shape:
            built = self.state.key_bias_mask = (mask, shape, self._key_bias_mask(bias, mask, past, n_q, n_kv, hidden))
        kwargs["attention_mask"] = built[2]
        return args, kwargs

    @staticmethod
    def _key_bias_mask(bias, mask, past: int, n_q: int, n_kv: int, hidden: torch.Tensor) -> torch.Tensor:
        key_bias = torch.zeros(n_kv, device=hidden.device)
        key_bias[: bias.numel()] = bias[:n_kv]
        lowest = torch.finfo(hidden.dtype).min
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # eager: already causal (and padding)
            base = mask if mask.is_floating_point() else torch.zeros(mask.shape, device=hidden.device).masked_fill(~mask, lowest)
            base = base[..., :n_kv].float()
        else:  # sdpa passes None and lets the kernel be causal
            future = torch.arange(n_kv, device=hidden.device)[None, :] > (past + torch.arange(n_q, device=hidden.device))[:, None]
            base = torch.zeros(n_q, n_kv, device=hidden.device).masked_fill(future, lowest)[None, None]
        return (base + key_bias).clamp(min=lowest).to(hidden.dtype)
