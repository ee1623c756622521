"""DeepStack (Qwen3-VL): the tower's extra levels of every visual token, level i added to the
hidden states after decoder layer i. transformers adds them with a mask of the full prompt, which
no reduction can follow, so the patch owns the add: it takes ``visual_pos_masks`` and
``deepstack_visual_embeds`` off the language model's call, makes each video's levels extras of its
``VideoTokens`` (a drop gathers them, a merge averages them like the embeddings; with
``model.deepstack: representative`` a merged row takes its representative's own levels), and
adds each level itself after layers 0..D-1 at the rows where those tokens are now, following an
LLM-layer method's drop or merge at K < D-1 as well. Images' rows pass through as they were."""

from __future__ import annotations

import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.tokens import weighted_rows

EXTRA = "deepstack.{}"  # the name of level i among a video's extras


class DeepStack:
    """Mixed into ``ReductionHandle``."""

    def _install_deepstack(self, layers, add) -> None:
        for i in range(self.family.deepstack_levels(self.model)):
            # first among layer i's forward hooks: the level belongs to the layer's output, before
            # an LLM-layer method at K = i reduces it (transformers adds it after the hooks)
            add(layers[i].register_forward_hook(lambda m, a, out, i=i: self._add_level(i, out), prepend=True))

    def _take_deepstack(self, kwargs) -> tuple | None:
        """Remove the DeepStack arguments from the language model's call: (the prompt positions
        [V] the levels' rows belong to, the levels [D] of [V, C]), or None."""
        levels = kwargs.pop("deepstack_visual_embeds", None)
        mask = kwargs.pop("visual_pos_masks", None)
        if levels is None or mask is None:
            return None
        return torch.nonzero(mask[0]).flatten(), list(levels)

    def _video_levels(self, taken, place: torch.Tensor) -> dict:
        """A video's levels as ``VideoTokens`` extras, its tokens at prompt positions ``place``."""
        if taken is None:
            return {}
        positions, levels = taken
        rows = torch.searchsorted(positions, place)
        if rows.numel() and (int(rows.max()) >= positions.numel() or not torch.equal(positions[rows], place)):
            raise PruneVidError("DeepStack's visual mask does not cover this video's placeholders")
        return {EXTRA.format(i): level[rows] for i, level in enumerate(levels)}

    def _set_deepstack(self, taken, source: torch.Tensor, videos, rows) -> None:
        """What layers 0..D-1 add, in LLM-input rows: images' levels at their rows, every video's
        at its tokens' rows (``videos``: (prompt positions, VideoTokens) as they enter the LLM)."""
        st = self.state
        if taken is None:
            st.deepstack = None
            return
        positions, levels = taken
        other = st.input_ids[positions] != self.video_token_id  # images: untouched by every method
        all_rows = [torch.searchsorted(source, positions[other]), *rows]
        # merge: the operators' means, carried as extras; representative: each row's own token's levels
        own = [tokens.extras if self.deepstack_mode == "merge" else self._video_levels(taken, place)
               for place, tokens in videos]
        per_level = [torch.cat([level[other], *(extras[EXTRA.format(i)] for extras in own)])
                     for i, level in enumerate(levels)]
        order = torch.argsort(torch.cat(all_rows))
        st.deepstack = (torch.cat(all_rows)[order], [lv[order] for lv in per_level], source.numel())

    def _add_level(self, i: int, output):
        st = self.state
        ds = st.deepstack
        hidden = output[0] if isinstance(output, tuple) else output
        if ds is None or not st.prefill or hidden.shape[1] <= 1:
            return None
        if hidden.shape[1] != ds[2]:
            ds = st.deepstack = self._follow_layer_reduction(ds, hidden.shape[1])
        rows, levels, _ = ds
        hidden = hidden.clone()  # transformers' own arithmetic: h[mask] = h[mask] + level
        hidden[0, rows] = hidden[0, rows] + levels[i].to(hidden.device, hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _follow_layer_reduction(self, ds, length: int):
        """The levels after the LLM-layer method's reduction at K < D-1: a kept token's own rows at
        its new row; a merge (``merge_into``) averages the merged tokens' levels into their kept
        row by size, as it does the hidden states (``representative``: the kept row's own)."""
        st = self.state
        rows, levels, before = ds
        keep = st.keep_index
        if keep is None or keep.numel() != length:
            raise PruneVidError(f"DeepStack: the hidden states have {length} rows, its levels were made for {before}")
        new_row = torch.full((before,), -1, dtype=torch.long, device=rows.device)
        new_row[keep] = torch.arange(keep.numel(), device=rows.device)
        if st.merged_into is None or self.deepstack_mode == "representative":
            dest = new_row[rows]
            went = dest >= 0
            return dest[went], [lv[went] for lv in levels], length
        dest = self._row_operator(before, keep, st.kept_visual, st.merged_into)[rows]
        went = dest >= 0
        out_rows, inverse = torch.unique(dest[went], return_inverse=True)
        sizes = st.row_sizes[rows[went]]
        merged = [weighted_rows(lv[went], inverse, sizes, out_rows.numel()) for lv in levels]
        return out_rows, merged, length

