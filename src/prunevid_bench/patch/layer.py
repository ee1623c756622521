"""Layer K: the ``llm_layer`` method scores after the last layer that runs on every token (layer
K, or K-1 for a method that prunes before K), and its reduction (a drop, or a merge of rows into
kept rows) is applied to the hidden states, the later layers' positions and the KV cache of the
layers that ran on every token alike. Prefill only; decoding never re-scores."""

from __future__ import annotations

import torch

from prunevid_bench import splice
from prunevid_bench.kept import layer_origins
from prunevid_bench.measure import cache_bytes
from prunevid_bench.methods import LayerContext, LayerReduction, call_method, check_indices
from prunevid_bench.tokens import weighted_rows


def merge_along(x: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """``x`` with its axis ``dim`` reduced by the operator ``dest`` (size-weighted means)."""
    moved = x.movedim(dim, 0)
    return weighted_rows(moved, dest, weight, n_out).movedim(0, dim)


class LayerMethod:
    """Mixed into ``ReductionHandle``."""

    def _active(self, hidden: torch.Tensor) -> bool:
        st = self.state
        return st.prefill and st.visual_positions is not None and st.visual_positions.numel() > 0 and hidden.shape[1] > 1

    def _capture(self, name):
        def hook(module, args, output):
            st = self.state  # no length check: a chunked prefill's last chunk may be one row
            if st.prefill and st.visual_positions is not None and st.visual_positions.numel() > 0:
                st.captured.setdefault(name, []).append(output)  # one part per chunk (patch.chunked)
            return None

        return hook

    def _capture_layer_inputs(self, module, args, kwargs):
        if self._active(args[0]):
            self.state.captured["position_embeddings"] = kwargs.get("position_embeddings")
        return None

    def _reduce_at_layer(self, module, args, kwargs, output):
        st = self.state
        hidden = output[0] if isinstance(output, tuple) else output
        if not self._active(hidden) or "q" not in st.captured:
            return None
        method, cfg = self.layer_method
        self._phase("layers_0_to_k")
        start = self.clock.mark()
        attn = self.family.attention(module)
        seq_len = hidden.shape[1]
        hd = attn.head_dim
        # a chunked prefill's parts joined, and let go at once (patch.chunked)
        q, k = (parts[0] if len(parts) == 1 else torch.cat(parts, 1) for parts in (st.captured.pop("q"), st.captured.pop("k")))
        q = q[0].view(seq_len, -1, hd).transpose(0, 1)  # [H, L, d], before rotary
        k = k[0].view(seq_len, -1, hd).transpose(0, 1)  # [H_kv, L, d]
        position_embeddings = st.captured.get("position_embeddings")
        ctx = LayerContext(
            q=q, k=k, rotate=lambda q_, k_: self.family.rotate(q_, k_, position_embeddings),
            visual=st.visual_positions, groups=st.visual_groups, query_start=st.query_start,
            scaling=attn.scaling, seq_len=seq_len, original_visual=st.tokens_in_prompt, hidden=hidden[0],
        )
        red = call_method(method, "select", (ctx, cfg), lambda out: check_indices(
            method, "kept indices", out.keep if isinstance(out, LayerReduction) else out, int(st.visual_positions.numel())))
        red = red if isinstance(red, LayerReduction) else LayerReduction(keep=red)
        kept = red.keep
        keep_index = splice.drop_index(seq_len, st.visual_positions, kept)
        cache = splice.cache_kwarg(kwargs)
        st.kv_bytes_layers_0_to_k = cache_bytes(cache) if cache is not None else 0
        st.compacted = red.compact_cache
        dest = self._row_operator(seq_len, keep_index, kept, red.merge_into)
        st.merge_weights = st.row_sizes
        if red.merge_weights is not None:  # the method's own weights at the visual rows (HoliTom's halving)
            st.merge_weights = st.row_sizes.clone()
            st.merge_weights[st.visual_positions] = red.merge_weights.to(st.row_sizes)
        if cache is not None and red.compact_cache:  # the tensors really get shorter (new, smaller ones)
            # the full-attention layers 0..K: a hybrid model's linear layers hold a recurrent and a
            # conv state instead, which keep the dropped tokens folded in (docs/methods.md)
            for layer in (cache.layers[i] for i in self.attention_layers if i <= self.score_layer):
                if dest is None:
                    layer.keys = layer.keys.index_select(-2, keep_index)
                    layer.values = layer.values.index_select(-2, keep_index)
                else:
                    layer.keys = merge_along(layer.keys, dest, st.merge_weights, keep_index.numel(), -2)
                    layer.values = merge_along(layer.values, dest, st.merge_weights, keep_index.numel(), -2)
        st.scores, st.scored_rows = ctx.scores, ctx.scored_rows
        st.kept_visual, st.keep_index, st.merged_into = kept, keep_index, red.merge_into
        st.kept_by_method[self.layer_key] = layer_origins(st.videos, kept, red.merge_into)
        st.tokens_after = int(kept.numel())
        st.method_tokens[self.layer_key] = [st.tokens_before, st.tokens_after]
        st.captured.clear()
        hidden = hidden[:, keep_index] if dest is None else merge_along(hidden, dest, st.merge_weights, keep_index.numel(), 1)
        st.method_marks[self.layer_key] = [(start, self.clock.mark())]
        self._phase("method")
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _row_operator(self, seq_len: int, keep_index: torch.Tensor, kept: torch.Tensor, merge_into) -> torch.Tensor | None:
        """None for a drop; for a merge, [L] the output row of every row (-1: dropped): text and
        kept rows their own, a merged visual token its kept row's."""
        if merge_into is None:
            return None
        st = self.state
        dest = torch.full((seq_len,), -1, dtype=torch.long, device=keep_index.device)
        dest[keep_index] = torch.arange(keep_index.numel(), device=keep_index.device)
        into = merge_into.to(keep_index.device)
        goes = into >= 0
        dest[st.visual_positions[goes]] = dest[st.visual_positions[kept][into[goes]]]
        return dest

    def _slice_layer_inputs(self, layer_idx: int, module, args, kwargs):
        st = self.state
        keep = st.keep_index
        if keep is None:
            return None
        if st.prefill and args[0].shape[1] == keep.numel():
            splice.slice_layer_kwargs(kwargs, keep)
            return args, kwargs
        mask = kwargs.get("attention_mask")
        if not st.prefill and not st.compacted and isinstance(mask, torch.Tensor) and mask.ndim == 4:
            # decoding with the early layers' cache left whole: a mask built for layer 0's length
            # loses the dropped prompt columns in the shorter layers
            cache = splice.cache_kwarg(kwargs)
            n_kv = (cache.get_seq_length(layer_idx) if cache is not None else 0) + args[0].shape[1]
            if mask.shape[-1] != n_kv:
                full = st.source_index.numel()
                columns = torch.cat([keep, torch.arange(full, mask.shape[-1], device=keep.device)])
                kwargs["attention_mask"] = mask.index_select(-1, columns)
                return args, kwargs
        return None
