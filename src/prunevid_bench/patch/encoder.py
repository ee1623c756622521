"""The vision encoder's side: remember the grids the tower encodes (``generate`` runs it before
the prefill), and let the ``vision_encoder`` methods reduce the merger's input so that only the
rows they return are projected."""

from __future__ import annotations

import functools

import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.overrides import InstanceOverride
from prunevid_bench.patch.state import BeforeMerger, SampleState
from prunevid_bench.tokens import VideoTokens


class EncoderSide:
    """Mixed into ``ReductionHandle``."""

    def _remember_video_grids(self, base):
        """``generate`` (transformers 5.23 ``_prepare_multimodal_encoder_kwargs_for_generation``)
        runs the vision tower before the first forward and then calls the model with
        ``mm_encoder_outputs`` and ``video_grid_thw=None``; the grids are only seen by
        ``get_video_features``, so wrap it on this instance. Returns an object with ``remove()``."""
        original = base.get_video_features

        @functools.wraps(original)
        def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
            self._encoded_video_grid_thw = video_grid_thw
            self._encoding_videos = True
            try:
                return original(pixel_values_videos, video_grid_thw, **kwargs)
            finally:
                self._encoding_videos = False

        return InstanceOverride(base, "get_video_features", get_video_features)

    def _wrap_merger(self, merger):
        """Wrap the merger's ``forward`` on this instance: while videos are encoded, the
        ``vision_encoder`` methods reduce its input and only what they return is projected.
        Returns an object with ``remove()``."""
        original = merger.forward

        @functools.wraps(original)
        def forward(x, *args, **kwargs):
            if not self._encoding_videos or self._encoded_video_grid_thw is None:
                return original(x, *args, **kwargs)  # an image, or a call outside get_video_features
            return self._reduce_before_merger(lambda rows: original(rows, *args, **kwargs), x, self._encoded_video_grid_thw)

        return InstanceOverride(merger, "forward", forward)

    def _reduce_before_merger(self, project, x: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """The merger's input ``x`` [U * merge^2, C] of one tower call over the videos ``grids``
        -> its output [U, D], computed for the tokens the encoder methods keep; the others get
        zero rows, dropped before the LLM (``_on_llm_input`` reads ``self._before_merger``)."""
        unit = self.merge * self.merge
        order = self.family.merger_order(self.model, grids)  # merger row j is raster token order[j]
        rows = x.reshape(-1, x.shape[-1] * unit)
        raster = torch.empty_like(rows)
        raster[order] = rows
        record = SampleState()  # the stats, counts and clock marks of this pass, taken over at prefill
        videos, offset = [], 0
        for t, h, w in grids.tolist():
            n = (h // self.merge) * (w // self.merge)
            tokens = self._with_extras(VideoTokens.full_grid(raster[offset : offset + t * n], t, n, w // self.merge))
            tokens, n_groups, proportional, after = self._reduce_video(tokens, t, self.encoder_methods, record)
            if proportional or after is not None:
                raise PruneVidError("a method inside the vision encoder can ask for neither proportional attention "
                                    "nor positions_after")
            videos.append((offset, tokens, n_groups))
            offset += t * n
        projected = project(torch.cat([v.embeds for _, v, _ in videos]).reshape(-1, x.shape[-1]).to(x.dtype))
        out = projected.new_zeros(rows.shape[0], projected.shape[-1])
        out[torch.cat([start + v.index for start, v, _ in videos])] = projected
        self._before_merger = BeforeMerger([(v, g) for _, v, g in videos], record, rows.shape[0] - projected.shape[0])
        return out[order]

    def _take_before_merger(self, n_videos: int) -> BeforeMerger | None:
        """The encoder methods' work for this prefill's videos, moved into the sample's state."""
        encoded, self._before_merger = self._before_merger, None
        if not self.encoder_methods or n_videos == 0:
            return None
        if encoded is None or len(encoded.videos) != n_videos:
            names = ", ".join(m.name for m, _ in self.encoder_methods)
            raise PruneVidError(f"{names} acts inside the vision encoder, which did not run for this prompt's "
                                f"{n_videos} video(s) (features given precomputed?): run the tower, or disable it")
        st = self.state
        st.method_stats.update(encoded.record.method_stats)
        st.method_tokens.update(encoded.record.method_tokens)
        st.method_marks.update(encoded.record.method_marks)
        st.kept_by_method.update(encoded.record.kept_by_method)
        st.merger_rows_skipped = encoded.rows_skipped
        return encoded
