"""Chunked prefill (``prefill.chunk_tokens: N``): every decoder layer runs a long prefill in chunks
of N rows, each chunk attending to the layer's cache of the chunks before it (causal, exactly as
the whole prompt at once), so no layer's activations (the MLP's, above all) ever hold more than
N rows. Layer by layer: layer i has run on every chunk before layer i+1 starts, so the hooks
around a layer (layer K's method, DeepStack's adds, proportional attention's mask) see the whole
sequence as before; only what runs inside ``forward`` is cut, and layer K's queries and keys are
captured chunk by chunk and joined (``patch.layer``). After an LLM-layer method the later layers
run on the kept rows, in chunks too when those are longer than N.

Each chunk gets its rows of the rotary cos/sin and of the text position ids; its mask is the
layer's own 4D mask cut to its rows and the keys so far (eager, or proportional attention's),
else built here: causal with the queries at the end (bottom-right), which SDPA cannot infer
from ``is_causal`` once a cache holds earlier chunks (transformers would even cut the keys to
the queries' count). Its cost: a [N, keys so far] mask per call, and the keys and values
repeated over the query heads (transformers uses SDPA's grouped-query path only without a mask). Flash attention aligns that way by
itself (no mask). The per-phase peak memory of a prefill is read here too (``_phase``)."""

from __future__ import annotations

import torch

from prunevid_bench import splice
from prunevid_bench.overrides import InstanceOverride


class ChunkedPrefill:
    """Mixed into ``ReductionHandle``."""

    def _install_chunking(self, layers, add) -> None:
        if not self.chunk_tokens:
            return
        for i, layer in enumerate(layers):
            add(InstanceOverride(layer, "forward", self._chunked(i, layer.forward)))

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
            for start in range(0, length, n):
                end = min(start + n, length)
                part = dict(kwargs, position_embeddings=(cos[..., start:end, :], sin[..., start:end, :]),
                            attention_mask=self._chunk_mask(mask, past, start, end, hidden_states))
                if isinstance(pos, torch.Tensor) and pos.shape[-1] == length:
                    part["position_ids"] = pos[..., start:end]
                y = forward(hidden_states[:, start:end], **part)
                rows, rest = (y[0], tuple(y[1:])) if isinstance(y, tuple) else (y, None)
                if out is None:  # one buffer for the layer's output, filled chunk by chunk
                    out = rows.new_empty(rows.shape[0], length, *rows.shape[2:])
                out[:, start:end] = rows
            return out if rest is None else (out, *rest)

        return chunked_forward

    def _chunk_mask(self, mask, past: int, start: int, end: int, hidden: torch.Tensor):
        """The mask of the queries ``start:end`` (of a call whose cache held ``past`` rows) over
        the keys ``0 : past + end``."""
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            return mask[..., start:end, : past + end]
        if "flash" in self.attn_implementation or (past == 0 and start == 0):
            return mask  # flash: bottom-right causal by itself; the first chunk: causal as a whole prompt
        n_q, n_kv = end - start, past + end
        if self.state.key_log_size is not None:  # proportional attention under SDPA: causal + log(size)
            return self._key_bias_mask(self.state.key_log_size, None, past + start, n_q, n_kv, hidden)
        # additive, in the model's dtype: SDPA turns a bool mask into one like it anyway (a copy)
        future = torch.full((n_q, n_kv), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
        return future.triu_(past + start + 1)[None, None]  # key j > query i's position: -inf

    def _phase(self, name: str) -> None:
        """Close a phase of the prefill: its peak memory, read and reset (``measure.PeakMemory``;
        a no-op unless the engine armed the handle's reader for this prefill)."""
        if self.state.prefill:
            self.memory.phase(name)
