"""Chunked prefill (``prefill.chunk_tokens: N``): every decoder layer runs a long prefill in chunks
of N rows, each chunk attending to the layer's cache of the chunks before it (causal, exactly as
the whole prompt at once), so no layer's activations (the MLP's, above all) ever hold more than
N rows. Layer by layer: layer i has run on every chunk before layer i+1 starts, so the hooks
around a layer (layer K's method, DeepStack's adds, proportional attention's mask) see the whole
sequence as before; only what runs inside ``forward`` is cut, and layer K's queries and keys are
captured chunk by chunk and joined (``patch.layer``). After an LLM-layer method the later layers
run on the kept rows, in chunks too when those are longer than N.

Each chunk gets its rows of the rotary cos/sin and of the text position ids. Its attention is
causal with the queries at the end (bottom-right), which SDPA cannot infer from ``is_causal`` once
a cache holds earlier chunks (and transformers would cut the keys to the queries' count): eager
gets the layer's own 4D mask cut to its rows and the keys so far (a view); under SDPA the
language model's attention function is wrapped (``_wrap_chunk_sdpa``) so that a chunk's call
never holds a [N, keys] mask through the whole layer call nor repeats the keys over the heads: on
the CPU it is two flash calls joined by their log-sum-exps (``_split_attention``: the past keys
unmasked, its own causal), elsewhere (or with proportional attention's log-sizes) row blocks, each
with its own small additive mask, on SDPA's grouped-query path. Flash attention aligns bottom-right by itself. The per-phase
peak memory of a prefill is read here too (``_phase``).

On a hybrid model (Qwen3.5) only the full-attention layers run in chunks; the linear-attention
layers (Gated DeltaNet: a recurrent state, cost and memory linear in the rows) run on the whole
sequence, as unchunked."""

from __future__ import annotations

import torch

from prunevid_bench import splice
from prunevid_bench.overrides import InstanceOverride, MappingOverride

MASK_BLOCK_ELEMENTS = 1 << 22  # a chunk's SDPA call runs in row blocks whose mask holds at most this many entries
# torch's CPU flash attention, which returns each row's log-sum-exp (grouped-query heads too); a
# private op (torch >= 2.2): without it every chunk takes the masked row blocks
CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class ChunkedPrefill:
    """Mixed into ``ReductionHandle``."""

    def _install_chunking(self, layers, add) -> None:
        self._chunk_at = None  # the first query's index of the chunk an SDPA call belongs to (None: not a chunk)
        if not self.chunk_tokens:
            return
        attends = set(self.family.attention_layers(self.model.config))
        for i, layer in enumerate(layers):
            if i in attends:  # a hybrid's linear-attention layers run whole: linear in the rows already
                add(InstanceOverride(layer, "forward", self._chunked(i, layer.forward)))
        if self.attn_implementation == "sdpa":
            add(self._wrap_chunk_sdpa())

    def _chunked(self, layer_idx: int, forward):
        def chunked_forward(hidden_states, *args, **kwargs):
            n, length = self.chunk_tokens, hidden_states.shape[1]
            cache = splice.cache_kwarg(kwargs)
            if not self.state.prefill or length <= n or cache is None or args:
                return forward(hidden_states, *args, **kwargs)
            past = cache.get_seq_length(layer_idx)
            cos, sin = kwargs["position_embeddings"]
            mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
            out, rest = None, ()
            try:
                for start in range(0, length, n):
                    end = min(start + n, length)
                    part = dict(kwargs, position_embeddings=(cos[..., start:end, :], sin[..., start:end, :]))
                    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
                        part["attention_mask"] = mask[..., start:end, : past + end]
                    elif self.attn_implementation == "sdpa" and past + start > 0:
                        self._chunk_at = past + start  # _wrap_chunk_sdpa answers its attention
                    if isinstance(pos, torch.Tensor) and pos.shape[-1] == length:
                        part["position_ids"] = pos[..., start:end]
                    y = forward(hidden_states[:, start:end], **part)
                    rows, rest = (y[0], tuple(y[1:])) if isinstance(y, tuple) else (y, None)
                    if out is None:  # one buffer for the layer's output, filled chunk by chunk
                        out = rows.new_empty(rows.shape[0], length, *rows.shape[2:])
                    out[:, start:end] = rows
            finally:
                self._chunk_at = None
            return out if rest is None else (out, *rest)

        return chunked_forward

    def _wrap_chunk_sdpa(self):
        """transformers' ``sdpa`` attention function, answering a chunk's call itself (see the
        module's docstring); every other call goes through as it was. Returns an object with
        ``remove()``."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def sdpa_in_chunks(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
            at = self._chunk_at  # not self._hooks: this handle was removed, but a later one wrapped this function
            if at is None or attention_mask is not None or not self._hooks:
                return original(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
            n_q, n_kv = query.shape[-2], key.shape[-2]
            lowest = torch.finfo(query.dtype).min
            bias = self.state.key_log_size  # proportional attention: log(size) of every prompt key
            if bias is None and query.device.type == "cpu" and CPU_FLASH is not None:
                return self._split_attention(query, key, value, n_kv - n_q, scaling), None
            if bias is not None:
                key_bias = torch.zeros(n_kv, device=key.device)
                key_bias[: min(n_kv, bias.numel())] = bias[:n_kv].to(key.device)
            out = query.new_empty(query.shape[0], n_q, query.shape[1], value.shape[-1])  # [B, q, H, d], as transformers'
            step = max(1, MASK_BLOCK_ELEMENTS // n_kv)
            for s in range(0, n_q, step):
                e = min(n_q, s + step)
                mask = self._block_mask(at + s, e - s, n_kv, query)
                if bias is not None:
                    mask = (mask.float() + key_bias).clamp(min=lowest).to(query.dtype)
                rows = torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, s:e], key, value, attn_mask=mask[None, None], scale=scaling,
                    enable_gqa=query.shape[1] != key.shape[1])
                out[:, s:e] = rows.transpose(1, 2)
            return out, None

        return MappingOverride(ALL_ATTENTION_FUNCTIONS, "sdpa", sdpa_in_chunks)

    @staticmethod
    def _split_attention(query, key, value, past: int, scaling) -> torch.Tensor:
        """A chunk's causal attention on the CPU as two flash calls, no mask: its queries over the
        ``past`` keys before it (all visible), and over its own keys (causal, square), joined
        by their log-sum-exps: exactly the softmax over all of them, at the cost of the whole
        prefill's causal attention. Returns [B, q, H, d], as transformers' ``sdpa`` function."""
        out_past, lse_past = CPU_FLASH(query, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scaling)
        out_own, lse_own = CPU_FLASH(query, key[:, :, past:], value[:, :, past:], 0.0, True, scale=scaling)
        top = torch.maximum(lse_past, lse_own)
        w_past, w_own = (lse_past - top).exp().unsqueeze(-1), (lse_own - top).exp().unsqueeze(-1)
        out = (out_past.float() * w_past + out_own.float() * w_own) / (w_past + w_own)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    @staticmethod
    def _block_mask(first: int, n_q: int, n_kv: int, like: torch.Tensor) -> torch.Tensor:
        """[n_q, n_kv] additive causal mask of the queries at ``first``.. : key j > query's index is -inf."""
        lowest = torch.finfo(like.dtype).min
        return torch.full((n_q, n_kv), lowest, dtype=like.dtype, device=like.device).triu_(first + 1)

    def _phase(self, name: str) -> None:
        """Close a phase of the prefill: its peak memory, read and reset (``measure.PeakMemory``;
        a no-op unless the engine armed the handle's reader for this prefill)."""
        if self.state.prefill:
            self.memory.phase(name)
