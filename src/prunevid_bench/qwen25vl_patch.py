"""PruneVid's three stages on transformers 5.x Qwen2.5-VL, applied with hooks (no copied forward).

``apply_prunevid(model, stage1, stage2) -> PruneVidHandle``; ``handle.remove()`` restores the
model, so the baseline and the pruned runs share one loaded model. Works with our engine and
with ``model.generate`` alike, because both pass explicit position ids that continue the
unpruned numbering (see ``engine.prefill_position_ids``).

Where the hooks sit (line refs: transformers 5.23 ``modeling_qwen2_5_vl.py``):
- ``Qwen2_5_VLModel`` pre-hook: a prefill starts; remember ``input_ids`` (the text model gets
  ``input_ids=None``) and the video grids.
- ``language_model`` pre-hook: runs after the placeholder validation and ``masked_scatter`` and
  after the M-RoPE ids of the UNPRUNED prompt are computed. Stage 1 merges each video here and
  index-selects the position ids by the merged tokens' representatives (never renumbered); it
  also records which positions are visual and their Stage-2 groups.
- layer K: forward hooks on ``q_proj``/``k_proj`` keep the pre-rotary query rows and keys; the
  layer's forward hook scores, selects (Stage 2), drops the pruned tokens from its output and
  from the KV cache of layers 0..K (Stage 3).
- layers K+1..: pre-hooks slice the shared rotary cos/sin, the 4D mask (eager) and the text
  position ids to the kept tokens. Prefill only; decoding never re-scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from prunevid_bench.config import Stage1Config, Stage2Config, resolve_layer
from prunevid_bench.errors import PruneVidError
from prunevid_bench.measure import Clock, cache_bytes
from prunevid_bench.stages import stage2 as s2


@dataclass
class SampleState:
    """What one sample's prefill learned; reset when the next prefill starts."""

    input_ids: torch.Tensor | None = None  # [L] unpruned prompt
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    prefill: bool = False
    tokens_before_stage1: int = 0
    tokens_after_stage1: int = 0
    stage1_segments: int | None = None
    stage1_static_tokens: int | None = None
    stage1_dynamic_tokens: int | None = None
    source_index: torch.Tensor | None = None  # [L1] original prompt index of each post-Stage-1 token
    visual_positions: torch.Tensor | None = None  # [V] positions (post Stage 1) of visual tokens
    visual_groups: torch.Tensor | None = None  # [V] Stage-2 group of each visual token
    query_start: int | None = None  # first position (post Stage 1) after the last video's <|vision_end|>
    position_ids: torch.Tensor | None = None  # (4|3, 1, L1) ids entering the LLM
    scores: torch.Tensor | None = None  # [V] Stage-2 importance
    keep_index: torch.Tensor | None = None  # [L2] positions (post Stage 1) that survive Stage 2
    kept_visual: torch.Tensor | None = None  # [V'] indices into visual_positions
    tokens_before: int = 0
    tokens_after: int = 0
    kv_bytes_layers_0_to_k: int = 0  # before compaction, read off the tensors
    captured: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)


class PruneVidHandle:
    def __init__(self, model, stage1: Stage1Config, stage2: Stage2Config):
        self.model = model
        self.stage1 = stage1
        self.stage2 = stage2
        self.state = SampleState()
        self._encoded_video_grid_thw = None  # grids of the last get_video_features call (see _remember_video_grids)
        self.clock = Clock(next(model.parameters()).device)
        self._hooks: list = []
        text_cfg = model.config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.video_token_id = model.config.video_token_id
        self.vision_end_token_id = model.config.vision_end_token_id
        self.merge = model.config.vision_config.spatial_merge_size
        # The absolute layer K, resolved here once (an index or "K/N"); everything downstream reads this.
        self.pruning_layer = resolve_layer(stage2.pruning_layer, self.num_layers) if stage2.enabled else None

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        lm = self.model.model.language_model
        add = self._hooks.append
        add(self.model.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        add(self._remember_video_grids(self.model.model))
        add(lm.register_forward_pre_hook(self._on_llm_input, with_kwargs=True))
        add(lm.register_forward_hook(self._on_llm_output))
        if self.stage2.enabled:
            k = self.pruning_layer
            layer = lm.layers[k]
            add(layer.self_attn.q_proj.register_forward_hook(self._capture("q")))
            add(layer.self_attn.k_proj.register_forward_hook(self._capture("k")))
            add(layer.register_forward_pre_hook(self._capture_layer_inputs, with_kwargs=True))
            add(layer.register_forward_hook(self._prune_after_layer_k, with_kwargs=True))
            for later in lm.layers[k + 1 :]:
                add(later.register_forward_pre_hook(self._slice_layer_inputs, with_kwargs=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _remember_video_grids(self, base):
        """``generate`` (transformers 5.23 ``_prepare_multimodal_encoder_kwargs_for_generation``)
        runs the vision tower before the first forward and then calls the model with
        ``mm_encoder_outputs`` and ``video_grid_thw=None``; the grids are only seen by
        ``get_video_features``, so wrap it on this instance. Returns an object with ``remove()``."""
        original = base.get_video_features

        @functools.wraps(original)
        def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
            self._encoded_video_grid_thw = video_grid_thw
            return original(pixel_values_videos, video_grid_thw, **kwargs)

        base.get_video_features = get_video_features

        class _Restore:
            def remove(_):
                if base.__dict__.get("get_video_features") is get_video_features:
                    del base.get_video_features

        return _Restore()

    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        cache = _cache_kwarg(kwargs)
        if input_ids is not None and input_ids.shape[1] > 1 and (cache is None or cache.get_seq_length() == 0):
            if input_ids.shape[0] != 1:
                raise PruneVidError("PruneVid runs one sample per forward (batch size 1); shard the dataset instead")
            grids = kwargs.get("video_grid_thw")
            if grids is None and (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None:
                grids = self._encoded_video_grid_thw  # generate(): the tower already ran
            self.state = SampleState(input_ids=input_ids[0], video_grid_thw=grids, prefill=True)
        return None

    def _on_llm_output(self, module, args, output):
        st = self.state
        if st.prefill and st.source_index is not None:
            # Decode loops that let the model derive positions (position_ids=None) use
            # cache length + rope_deltas; the cache is shorter by the dropped tokens, so the delta
            # grows by as much and decoding continues the unpruned numbering. Our engine and
            # generate() pass explicit positions and never read it.
            final_len = st.keep_index.numel() if st.keep_index is not None else st.source_index.numel()
            deltas = getattr(self.model.model, "rope_deltas", None)
            if deltas is not None:
                self.model.model.rope_deltas = deltas + (st.input_ids.shape[0] - final_len)
        st.prefill = False  # whatever follows is decoding
        st.captured.clear()
        return None

    # ------------------------------------------------------------------ Stage 1
    def _on_llm_input(self, module, args, kwargs):
        st = self.state
        embeds = kwargs.get("inputs_embeds")
        if not st.prefill or embeds is None or st.input_ids is None or embeds.shape[1] != st.input_ids.shape[0]:
            return None
        ids = st.input_ids
        is_video = ids == self.video_token_id
        st.tokens_before_stage1 = int(is_video.sum())
        spans = _runs(is_video)
        grids = st.video_grid_thw.tolist() if st.video_grid_thw is not None else []
        spans = _split_spans(spans, grids, self.merge)
        st.marks["stage1_start"] = self.clock.mark()
        pieces, visual_flags, groups = [], [], []
        merged_embeds = []
        cursor, group_offset = 0, 0
        segs = static = dynamic = 0
        for (start, end), (t, h, w) in zip(spans, grids):
            n_per_frame = (h // self.merge) * (w // self.merge)
            pieces.append(torch.arange(cursor, start, device=ids.device))
            visual_flags.append(torch.zeros(start - cursor, dtype=torch.bool, device=ids.device))
            video = embeds[0, start:end]
            if self.stage1.enabled:
                from prunevid_bench.stages.stage1 import merge_video_tokens

                res = merge_video_tokens(
                    video.reshape(t, n_per_frame, -1),
                    tau=self.stage1.tau,
                    cluster_ratio=self.stage1.cluster_ratio,
                    temporal_segment_ratio=self.stage1.temporal_segment_ratio,
                    k=self.stage1.k,
                    min_cluster_tokens=self.stage1.min_cluster_tokens,
                )
                rep = res.representative.to(ids.device)
                merged_embeds.append((sum(p.numel() for p in pieces), res.merged))
                pieces.append(start + rep)
                groups.append(res.group.to(ids.device) + group_offset)
                group_offset += len(res.group_kind)
                segs += res.n_segments
                static += res.n_static_tokens
                dynamic += res.n_dynamic_tokens
            else:
                pieces.append(torch.arange(start, end, device=ids.device))
                # Without Stage 1, each temporal grid step of each video is one group.
                groups.append(torch.arange(end - start, device=ids.device) // n_per_frame + group_offset)
                group_offset += t
            visual_flags.append(torch.ones(len(pieces[-1]), dtype=torch.bool, device=ids.device))
            cursor = end
        pieces.append(torch.arange(cursor, ids.shape[0], device=ids.device))
        visual_flags.append(torch.zeros(ids.shape[0] - cursor, dtype=torch.bool, device=ids.device))
        source = torch.cat(pieces)
        visual = torch.cat(visual_flags)

        if self.stage1.enabled and merged_embeds:
            new_embeds = embeds[:, source].clone()
            for offset, merged in merged_embeds:
                new_embeds[0, offset : offset + merged.shape[0]] = merged.to(new_embeds.dtype)
            kwargs["inputs_embeds"] = new_embeds
            pos = kwargs.get("position_ids")
            if pos is None:
                raise PruneVidError("Stage 1 needs the M-RoPE position ids: pass the processor's mm_token_type_ids")
            pos = pos[..., source]  # the representatives' original (t, h, w) ids: never renumbered
            if pos.shape[0] == 4:  # text row: contiguous, so no packed-sequence mask is inferred
                pos = torch.cat([torch.arange(pos.shape[-1], device=pos.device).view(1, 1, -1), pos[1:]])
            kwargs["position_ids"] = pos
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.ndim == 2:
                kwargs["attention_mask"] = mask[:, source]
            st.stage1_segments, st.stage1_static_tokens, st.stage1_dynamic_tokens = segs, static, dynamic
        st.marks["stage1_end"] = self.clock.mark()
        st.source_index = source
        st.visual_positions = torch.nonzero(visual).flatten()
        st.visual_groups = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long, device=ids.device)
        st.tokens_after_stage1 = int(st.visual_positions.numel())
        st.tokens_before = st.tokens_after = st.tokens_after_stage1
        st.position_ids = kwargs.get("position_ids")
        st.query_start = _query_start(ids[source], visual, self.vision_end_token_id)
        if self.stage2.enabled and st.tokens_after_stage1 > 0:
            if st.query_start is None or st.query_start >= source.numel():
                raise PruneVidError("Stage 2 needs text after the video (the question); the prompt ends with the video")
        return args, kwargs

    # ------------------------------------------------------------------ Stage 2 + 3
    def _active(self, hidden: torch.Tensor) -> bool:
        st = self.state
        return st.prefill and st.visual_positions is not None and st.visual_positions.numel() > 0 and hidden.shape[1] > 1

    def _capture(self, name):
        def hook(module, args, output):
            if self._active(args[0]):
                self.state.captured[name] = output
            return None

        return hook

    def _capture_layer_inputs(self, module, args, kwargs):
        if self._active(args[0]):
            self.state.captured["position_embeddings"] = kwargs.get("position_embeddings")
        return None

    def _prune_after_layer_k(self, module, args, kwargs, output):
        st = self.state
        hidden = output[0] if isinstance(output, tuple) else output
        if not self._active(hidden) or "q" not in st.captured:
            return None
        st.marks["stage2_start"] = self.clock.mark()
        attn = module.self_attn
        seq_len = hidden.shape[1]
        hd = attn.head_dim
        q = st.captured["q"][0].view(seq_len, -1, hd).transpose(0, 1)  # [H, L, d], before rotary
        k = st.captured["k"][0].view(seq_len, -1, hd).transpose(0, 1)  # [H_kv, L, d]
        rows = torch.arange(st.query_start, seq_len, device=hidden.device)
        visual = st.visual_positions
        mode = self.stage2.score
        if mode == "prunevid":
            # Official score: q, k BEFORE rotary, no causal mask, softmax over all keys.
            scores = s2.max_max_scores(q[:, rows], k, visual, attn.scaling)
        elif mode in ("attention", "last_token"):
            q_rot, k_rot = rotate(q, k, st.captured["position_embeddings"])
            if mode == "attention":
                scores = s2.max_max_scores(q_rot[:, rows], k_rot, visual, attn.scaling, query_positions=rows)
            else:
                scores = s2.last_token_scores(q_rot[:, -1:], k_rot, visual, attn.scaling, seq_len - 1)
        else:
            scores = s2.random_scores(visual.numel(), self.stage2.seed, hidden.device)
        kept = s2.stratified_keep(scores, st.visual_groups, self.stage2.keep_ratio)
        is_dropped = torch.zeros(seq_len, dtype=torch.bool, device=hidden.device)
        is_dropped[visual] = True
        is_dropped[visual[kept]] = False
        keep_index = torch.nonzero(~is_dropped).flatten()
        cache = _cache_kwarg(kwargs)
        st.kv_bytes_layers_0_to_k = cache_bytes(cache) if cache is not None else 0
        if cache is not None:
            s2.compact_cache_layers(cache, range(self.pruning_layer + 1), keep_index)
        st.scores, st.kept_visual, st.keep_index = scores, kept, keep_index
        st.tokens_after = int(kept.numel())
        st.captured.clear()
        hidden = hidden[:, keep_index]
        st.marks["stage2_end"] = self.clock.mark()
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _slice_layer_inputs(self, module, args, kwargs):
        st = self.state
        keep = st.keep_index
        if not st.prefill or keep is None or args[0].shape[1] != keep.numel():
            return None
        cos, sin = kwargs["position_embeddings"]
        if cos.shape[-2] != keep.numel():
            kwargs["position_embeddings"] = (cos.index_select(-2, keep), sin.index_select(-2, keep))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] != keep.numel():
            kwargs["attention_mask"] = mask.index_select(-2, keep).index_select(-1, keep)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.shape[-1] != keep.numel():
            kwargs["position_ids"] = torch.arange(keep.numel(), device=pos.device).view(1, -1)
        return args, kwargs

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        st, clock = self.state, self.clock
        stage1_s = clock.elapsed(st.marks.get("stage1_start"), st.marks.get("stage1_end")) if self.stage1.enabled else 0.0
        stage2_s = clock.elapsed(st.marks.get("stage2_start"), st.marks.get("stage2_end"))
        return {
            "tokens_before_stage1": st.tokens_before_stage1,
            "tokens_after_stage1": st.tokens_after_stage1,
            "stage1_segments": st.stage1_segments,
            "stage1_static_tokens": st.stage1_static_tokens,
            "stage1_dynamic_tokens": st.stage1_dynamic_tokens,
            "stage1_s": stage1_s,
            "tokens_before": st.tokens_before,
            "tokens_after": st.tokens_after,
            "stage2_s": stage2_s,
            "llm_prefill_tokens": int(st.source_index.numel()) if st.source_index is not None else 0,
            "kv_bytes_layers_0_to_k": st.kv_bytes_layers_0_to_k,
        }


def rotate(q: torch.Tensor, k: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the layer's (already M-RoPE-merged) rotary cos/sin [1, L, d] to q [H, L, d], k [H_kv, L, d]."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb(q.unsqueeze(0), k.unsqueeze(0), cos, sin)
    return q_rot[0], k_rot[0]


def _cache_kwarg(kwargs: dict):
    """The KV cache a hooked forward was called with. transformers 5.24 renamed the keyword
    ``past_key_values`` to ``cache`` (the old name is deprecated, to be removed in 5.40) and its
    outer forwards pass ``cache=`` inward even when the user wrote the old name; 5.23 only knows
    ``past_key_values``. Reading the old name alone on 5.24 finds no cache, so Stage 3 would skip
    compacting layers 0..K and decoding would see the dropped tokens there."""
    return kwargs["cache"] if "cache" in kwargs else kwargs.get("past_key_values")


def _query_start(ids: torch.Tensor, visual: torch.Tensor, vision_end_id: int) -> int | None:
    """First position after the ``<|vision_end|>`` that closes the last video (not the last
    image): Stage 2's query rows are the text that follows the videos. None without a video."""
    video_positions = torch.nonzero(visual).flatten()
    if video_positions.numel() == 0:
        return None
    ends = torch.nonzero(ids[int(video_positions[-1]) :] == vision_end_id).flatten()
    return int(video_positions[-1]) + int(ends[0]) + 1 if ends.numel() else None


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor, as (start, end) pairs."""
    padded = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).int()
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def _split_spans(spans, grids, merge) -> list[tuple[int, int]]:
    """Two videos whose placeholder runs touch form one run; split runs by the grids' sizes.
    Raises when the grids do not cover the placeholders exactly (e.g. no grids were seen), so a
    video is never silently left unpruned."""
    sizes = [t * h * w // (merge * merge) for t, h, w in grids]
    out, i = [], 0
    for start, end in spans:
        while start < end and i < len(sizes):
            out.append((start, start + sizes[i]))
            start += sizes[i]
            i += 1
    if len(out) != len(grids) or sum(e - s for s, e in out) != sum(e - s for s, e in spans):
        raise PruneVidError(
            f"the {sum(e - s for s, e in spans)} video placeholder tokens do not match the video grids "
            f"{[list(g) for g in grids]}; pass video_grid_thw with the inputs"
        )
    return out


def apply_prunevid(model, stage1: Stage1Config, stage2: Stage2Config) -> PruneVidHandle:
    """Install the hooks for the enabled stages on a loaded Qwen2.5-VL; returns the handle."""
    handle = PruneVidHandle(model, stage1, stage2)
    handle._install()
    return handle
