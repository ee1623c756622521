"""Token-reduction methods on a loaded model, applied with hooks (no copied forward).

``apply_methods(model, config) -> ReductionHandle`` installs the hooks for the run's enabled
methods (``prunevid_bench.methods``); ``handle.remove()`` restores the model, so the baseline and
the pruned runs share one loaded model. ``apply_prunevid(model, stage1, stage2)`` is the same for
PruneVid's stages. Works with our engine and with ``model.generate`` alike, because both pass
explicit position ids that continue the unpruned numbering (see ``Family.prefill_position_ids``).
Every module is reached through the model's family (``prunevid_bench.families``); the splicing
itself is family-agnostic (``prunevid_bench.splice``).

Where the hooks sit (transformers 5.x Qwen2-VL / Qwen2.5-VL):
- base model pre-hook: a prefill starts; remember ``input_ids`` (the text model gets
  ``input_ids=None``) and the video grids.
- language model pre-hook: runs after the placeholder ``masked_scatter`` and after the M-RoPE
  ids of the UNPRUNED prompt are computed. The ``visual_tokens`` methods (PruneVid Stage 1)
  reduce each video here; the position ids are index-selected by the kept tokens (never
  renumbered, unless a reduction sets ``positions_after``: then the M-RoPE ids after that video
  move, and every decode step's by what makes decoding continue from the largest prompt id + 1).
  It also records which positions are visual and their groups.
- layer K: forward hooks on ``q_proj``/``k_proj`` keep the pre-rotary query rows and keys; the
  layer's forward hook asks the ``llm_layer`` method (PruneVid Stage 2) which visual tokens to
  keep, drops the others from its output and from the KV cache of layers 0..K (Stage 3).
- layers K+1..: pre-hooks slice the shared rotary cos/sin, the 4D mask (eager) and the text
  position ids to the kept tokens. Prefill only; decoding never re-scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from prunevid_bench import splice
from prunevid_bench.config import RunConfig, Stage1Config, Stage2Config, resolve_layer
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import family_of
from prunevid_bench.measure import Clock, cache_bytes
from prunevid_bench.methods import LayerContext, VideoTokens, all_methods, call_method, check_indices, check_reduction
from prunevid_bench.overrides import InstanceOverride, MappingOverride
from prunevid_bench.stages import stage2 as s2


@dataclass
class SampleState:
    """What one sample's prefill learned; reset when the next prefill starts."""

    input_ids: torch.Tensor | None = None  # [L] unpruned prompt
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    prefill: bool = False
    tokens_before_stage1: int = 0  # visual tokens before the visual-token methods
    tokens_after_stage1: int = 0  # ... and after them
    method_stats: dict = field(default_factory=dict)  # record fields the visual-token methods reported
    method_tokens: dict = field(default_factory=dict)  # method name -> [tokens in, tokens out]
    method_marks: dict = field(default_factory=dict)  # method name -> [(start mark, end mark), ...]
    source_index: torch.Tensor | None = None  # [L1] original prompt index of each post-Stage-1 token
    visual_positions: torch.Tensor | None = None  # [V] positions (post Stage 1) of visual tokens
    visual_groups: torch.Tensor | None = None  # [V] Stage-2 group of each visual token
    query_start: int | None = None  # first position (post Stage 1) after the last video's <|vision_end|>
    scores: torch.Tensor | None = None  # [V] Stage-2 importance (PruneVid's scoring), when the method keeps one
    keep_index: torch.Tensor | None = None  # [L2] positions (post Stage 1) that survive Stage 2
    kept_visual: torch.Tensor | None = None  # [V'] indices into visual_positions
    tokens_before: int = 0  # visual tokens entering the LLM-layer method (Stage 2)
    tokens_after: int = 0  # ... and leaving it
    kv_bytes_layers_0_to_k: int = 0  # before compaction, read off the tensors
    scored_rows: int = 0  # query rows the LLM-layer method scored (analytic FLOPs)
    merger_rows_skipped: int = 0  # video tokens the merger did not project (a vision-encoder method merged them)
    key_log_size: torch.Tensor | None = None  # [L1] log(size) of each prompt key (proportional attention), else None
    key_bias_mask: tuple | None = None  # (the layer's own mask, shape, the mask built from it): proportional attention, per forward
    prompt_max_id: int | None = None  # largest M-RoPE id of the prompt, when a reduction renumbered it (positions_after)
    decode_position_shift: int = 0  # then added to the M-RoPE rows of a caller's explicit decode positions
    captured: dict = field(default_factory=dict)


@dataclass
class _BeforeMerger:
    """What the ``vision_encoder`` methods did in one tower call: per video (kept token indices
    into its full grid, their groups, the number of groups), their record, and the merger rows
    not computed. Made when the tower runs (inside the prefill, or before it under ``generate``)
    and taken over by the next prefill."""

    videos: list
    record: SampleState
    rows_skipped: int


EXTRA_CHANNELS = 8  # proportional attention's extra q/k/v channels (two used; 8 keeps head dims kernel-friendly)


class ReductionHandle:
    def __init__(self, model, config: RunConfig):
        self.model = model
        self.family = family_of(model)
        self.state = SampleState()
        self._encoded_video_grid_thw = None  # grids of the last get_video_features call (see _remember_video_grids)
        self.clock = Clock(next(model.parameters()).device)
        self._hooks: list = []
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.video_token_id = self.family.video_token_id(model)
        self.vision_end_token_id = self.family.vision_end_token_id(model)
        self.merge = self.family.geometry(model.config).merge
        text = model.config.get_text_config()
        self.attn_implementation = str(getattr(text, "_attn_implementation", None) or
                                       getattr(model.config, "_attn_implementation", ""))
        enabled = [(m, config.section(m.section)) for m in all_methods() if config.section(m.section).enabled]
        self.encoder_methods = [(m, c) for m, c in enabled if m.where(c) == "vision_encoder"]
        self.visual_methods = [(m, c) for m, c in enabled if m.where(c) == "visual_tokens"]
        self._encoding_videos = False  # inside get_video_features: the merger is projecting video tokens
        self._before_merger: _BeforeMerger | None = None  # what the encoder methods did in the last video pass
        layer = [(m, c) for m, c in enabled if m.where(c) == "llm_layer"]
        if len(layer) > 1:
            raise PruneVidError("one LLM-layer method per run; disable all but one")
        self.layer_method = layer[0] if layer else None
        # The absolute layer K, resolved here once (an index or "K/N"); everything downstream reads this.
        self.pruning_layer_spec = self.layer_method[0].pruning_layer(self.layer_method[1]) if layer else None
        self.pruning_layer = (
            resolve_layer(self.pruning_layer_spec, self.num_layers, f"{layer[0][0].section}.pruning_layer") if layer else None
        )

    @property
    def methods(self) -> list:
        """(method, config) of each enabled method, in the order they run."""
        return self.encoder_methods + self.visual_methods + ([self.layer_method] if self.layer_method else [])

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        fam, model = self.family, self.model
        base, lm = fam.base(model), fam.language_model(model)
        add = self._hooks.append
        add(base.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        add(self._remember_video_grids(base))
        if self.encoder_methods:
            add(self._wrap_merger(fam.vision_merger(model)))
        add(lm.register_forward_pre_hook(self._on_llm_input, with_kwargs=True))
        add(lm.register_forward_hook(self._on_llm_output))
        if self.visual_methods:  # proportional attention, when a method's reduction asks for it
            for i, layer in enumerate(fam.decoder_layers(model)):
                add(layer.register_forward_pre_hook(functools.partial(self._add_key_bias, i), with_kwargs=True))
            add(self._wrap_sdpa({id(fam.attention(layer)) for layer in fam.decoder_layers(model)}))
        if self.layer_method is not None:
            layers = fam.decoder_layers(model)
            k = self.pruning_layer
            layer = layers[k]
            attn = fam.attention(layer)
            add(attn.q_proj.register_forward_hook(self._capture("q")))
            add(attn.k_proj.register_forward_hook(self._capture("k")))
            add(layer.register_forward_pre_hook(self._capture_layer_inputs, with_kwargs=True))
            add(layer.register_forward_hook(self._prune_after_layer_k, with_kwargs=True))
            for later in layers[k + 1 :]:
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
            full = torch.arange(t * n, device=x.device)
            tokens, n_groups, size, after = self._reduce_video(
                VideoTokens(raster[offset : offset + t * n], full, full // n, t, n, w // self.merge), t, self.encoder_methods, record)
            if size is not None or after is not None:
                raise PruneVidError("a method inside the vision encoder can set neither sizes (proportional attention) "
                                    "nor positions_after")
            videos.append((offset, tokens, n_groups))
            offset += t * n
        projected = project(torch.cat([v.embeds for _, v, _ in videos]).reshape(-1, x.shape[-1]).to(x.dtype))
        out = projected.new_zeros(rows.shape[0], projected.shape[-1])
        out[torch.cat([start + v.index for start, v, _ in videos])] = projected
        self._before_merger = _BeforeMerger([(v.index, v.group, g) for _, v, g in videos], record,
                                            rows.shape[0] - projected.shape[0])
        return out[order]

    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        cache = splice.cache_kwarg(kwargs)
        if input_ids is not None and input_ids.shape[1] > 1 and (cache is None or cache.get_seq_length() == 0):
            if input_ids.shape[0] != 1:
                raise PruneVidError("PruneVid runs one sample per forward (batch size 1); shard the dataset instead")
            grids = kwargs.get("video_grid_thw")
            if grids is None and (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None:
                grids = self._encoded_video_grid_thw  # generate(): the tower already ran
            self.state = SampleState(input_ids=input_ids[0], video_grid_thw=grids, prefill=True)
            return None
        shift, pos = self.state.decode_position_shift, kwargs.get("position_ids")
        if shift and pos is not None and cache is not None and cache.get_seq_length() > 0:
            # A caller's explicit decode positions continue the unpruned numbering (the engine
            # and generate alike); loops that leave them to the model get it from rope_deltas.
            kwargs["position_ids"] = splice.shift_positions(pos, 0, shift)
            return args, kwargs
        return None

    def _on_llm_output(self, module, args, output):
        st = self.state
        if st.prefill and st.source_index is not None:
            # Decode loops that let the model derive positions (position_ids=None) use
            # cache length + rope_deltas; the cache is shorter by the dropped tokens, so the delta
            # grows by as much and decoding continues the unpruned numbering. Our engine and
            # generate() pass explicit positions and never read it.
            final_len = st.keep_index.numel() if st.keep_index is not None else st.source_index.numel()
            base = self.family.base(self.model)
            deltas = getattr(base, "rope_deltas", None)
            if deltas is not None and st.prompt_max_id is not None:  # renumbered: continue after its largest id
                base.rope_deltas = torch.full_like(deltas, st.prompt_max_id + 1 - final_len)
            elif deltas is not None:
                base.rope_deltas = deltas + (st.input_ids.shape[0] - final_len)
        st.prefill = False  # whatever follows is decoding
        st.captured.clear()
        return None

    # ------------------------------------------------------------------ visual-token methods
    def _reduce_video(self, tokens: VideoTokens, n_groups: int, methods, st: SampleState
                      ) -> tuple[VideoTokens, int, torch.Tensor | None, int | None]:
        """Run ``methods`` on one video (its tokens in ``n_groups`` groups) in order, recording
        into ``st``; returns the tokens, the number of groups they are in, their sizes when a
        method asked for proportional attention and the renumbering of what follows the video
        (``VisualReduction.positions_after``)."""
        size, after = None, None
        for method, cfg in methods:
            start = self.clock.mark()
            red = call_method(method, "reduce", (tokens, cfg),
                              lambda out: check_reduction(method, out, int(tokens.index.numel())))
            keep = red.keep.to(tokens.index.device)
            counts = st.method_tokens.setdefault(method.name, [0, 0])
            counts[0] += int(tokens.index.numel())
            counts[1] += int(keep.numel())
            for key, value in red.stats.items():
                st.method_stats[key] = st.method_stats.get(key, 0) + int(value)
            if red.size is not None:
                if size is not None:
                    raise PruneVidError("one proportional-attention method per run: sizes of two merges do not compose here")
                size = red.size.float()
            elif size is not None:
                size = size[keep]
            after = red.positions_after if red.positions_after is not None else after
            tokens = VideoTokens(red.embeds, tokens.index[keep], red.group.to(keep.device), tokens.t, tokens.n, tokens.w)
            n_groups = int(red.group.max()) + 1 if red.group.numel() else 0
            st.method_marks.setdefault(method.name, []).append((start, self.clock.mark()))
        return tokens, n_groups, size, after

    def _take_before_merger(self, n_videos: int) -> _BeforeMerger | None:
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
        st.merger_rows_skipped = encoded.rows_skipped
        return encoded

    def _on_llm_input(self, module, args, kwargs):
        st = self.state
        embeds = kwargs.get("inputs_embeds")
        if not st.prefill or embeds is None or st.input_ids is None or embeds.shape[1] != st.input_ids.shape[0]:
            return None
        ids = st.input_ids
        is_video = ids == self.video_token_id
        st.tokens_before_stage1 = int(is_video.sum())
        grids = st.video_grid_thw.tolist() if st.video_grid_thw is not None else []
        spans = splice.split_spans(splice.runs(is_video), grids, self.merge)
        encoded = self._take_before_merger(len(grids))
        pieces, visual_flags, groups, reduced, sizes, shifts = [], [], [], [], [], []
        cursor, group_offset = 0, 0
        for i, ((start, end), (t, h, w)) in enumerate(zip(spans, grids)):
            n_per_frame = (h // self.merge) * (w // self.merge)
            pieces.append(torch.arange(cursor, start, device=ids.device))
            visual_flags.append(torch.zeros(start - cursor, dtype=torch.bool, device=ids.device))
            full = torch.arange(end - start, device=ids.device)
            # Before any method, each temporal grid step of each video is one group.
            tokens = VideoTokens(embeds[0, start:end], full, full // n_per_frame, t, n_per_frame, w // self.merge)
            n_groups, after = t, None
            if encoded is not None:  # the encoder methods chose these tokens; the merger projected only them
                index, group, n_groups = encoded.videos[i]
                tokens = VideoTokens(tokens.embeds[index], index, group, t, n_per_frame, tokens.w)
            if self.visual_methods:
                tokens, n_groups, size, after = self._reduce_video(tokens, n_groups, self.visual_methods, st)
                reduced.append((sum(p.numel() for p in pieces), tokens.embeds))
                if size is not None:
                    sizes.append((reduced[-1][0], size))
            pieces.append(start + tokens.index)
            groups.append(tokens.group + group_offset)
            group_offset += n_groups
            visual_flags.append(torch.ones(len(pieces[-1]), dtype=torch.bool, device=ids.device))
            if after is not None:  # where the video ends now, its first id, what it adds for the next token
                shifts.append((sum(p.numel() for p in pieces), start, end, after))
            cursor = end
        pieces.append(torch.arange(cursor, ids.shape[0], device=ids.device))
        visual_flags.append(torch.zeros(ids.shape[0] - cursor, dtype=torch.bool, device=ids.device))
        source = torch.cat(pieces)
        visual = torch.cat(visual_flags)

        unpruned = kwargs.get("position_ids")
        if reduced or encoded is not None:  # the encoder methods' tokens are already in place
            new_embeds = embeds[:, source]  # a copy (index-selected), so written in place below
            for offset, merged in reduced:
                new_embeds[0, offset : offset + merged.shape[0]] = merged.to(new_embeds.dtype)
            splice.select_llm_inputs(kwargs, source, new_embeds)
        if shifts:
            self._renumber_after_videos(kwargs, shifts, unpruned)
        st.source_index = source
        if sizes:
            if self.layer_method is not None:
                raise PruneVidError("proportional attention cannot be combined with an LLM-layer method yet; turn one off")
            if "flash" in self.attn_implementation:
                raise PruneVidError("proportional attention needs an additive mask: use --attn-implementation sdpa or eager")
            st.key_log_size = torch.zeros(source.numel(), device=ids.device)
            for offset, size in sizes:
                st.key_log_size[offset : offset + size.numel()] = size.to(ids.device).log()
        st.visual_positions = torch.nonzero(visual).flatten()
        st.visual_groups = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long, device=ids.device)
        st.tokens_after_stage1 = int(st.visual_positions.numel())
        st.tokens_before = st.tokens_after = st.tokens_after_stage1
        st.query_start = splice.query_start(ids[source], visual, self.vision_end_token_id)
        if self.layer_method is not None and st.tokens_after_stage1 > 0:
            if st.query_start is None or st.query_start >= source.numel():
                raise PruneVidError(
                    f"{self.layer_method[0].name} needs text after the video (the question); the prompt ends with the video"
                )
        return args, kwargs

    def _renumber_after_videos(self, kwargs, shifts, unpruned) -> None:
        """Apply the reductions' ``positions_after``: shifts [(index after the video in the LLM
        input, the video's start and end in the prompt, n)]; unpruned (4 or 3, 1, L) ids. Each
        move is read off the unpruned ids, so later moves add to earlier ones unchanged."""
        st, ids = self.state, unpruned[-3:, 0]
        pos = kwargs["position_ids"]
        for new_end, start, end, after in shifts:
            if end < ids.shape[1]:
                pos = splice.shift_positions(pos, new_end, int(ids[0, start]) + after - int(ids[0, end]))
        kwargs["position_ids"] = pos
        # Decoding continues from the largest id + 1 (vLLM's mrope_position_delta); callers pass
        # positions continuing the unpruned last id + 1 (the engine, generate), so they move by this.
        st.prompt_max_id = int(pos[-3:].max())
        st.decode_position_shift = st.prompt_max_id - int(ids[:, -1].max())

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
            q_extra = query.new_zeros(*query.shape[:-1], EXTRA_CHANNELS)
            q_extra[..., :2] = 1
            k_extra = key.new_zeros(*key.shape[:-1], EXTRA_CHANNELS)
            target = key_bias / scale
            high = target.to(key.dtype)  # and what bf16/fp16 rounding lost, in a second channel
            k_extra[..., 0], k_extra[..., 1] = high, (target - high.float()).to(key.dtype)
            v_extra = value.new_zeros(*value.shape[:-1], EXTRA_CHANNELS)
            out, weights = original(module, torch.cat([query, q_extra], -1), torch.cat([key, k_extra], -1),
                                    torch.cat([value, v_extra], -1), None, *args, scaling=scale, **kwargs)
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

    # ------------------------------------------------------------------ LLM-layer method (Stages 2 + 3)
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
        method, cfg = self.layer_method
        start = self.clock.mark()
        attn = self.family.attention(module)
        seq_len = hidden.shape[1]
        hd = attn.head_dim
        q = st.captured["q"][0].view(seq_len, -1, hd).transpose(0, 1)  # [H, L, d], before rotary
        k = st.captured["k"][0].view(seq_len, -1, hd).transpose(0, 1)  # [H_kv, L, d]
        position_embeddings = st.captured.get("position_embeddings")
        ctx = LayerContext(
            q=q, k=k, rotate=lambda q_, k_: self.family.rotate(q_, k_, position_embeddings),
            visual=st.visual_positions, groups=st.visual_groups, query_start=st.query_start,
            scaling=attn.scaling, seq_len=seq_len, original_visual=st.tokens_before_stage1,
        )
        kept = call_method(method, "select", (ctx, cfg),
                           lambda out: check_indices(method, "kept indices", out, int(st.visual_positions.numel())))
        keep_index = splice.drop_index(seq_len, st.visual_positions, kept)
        cache = splice.cache_kwarg(kwargs)
        st.kv_bytes_layers_0_to_k = cache_bytes(cache) if cache is not None else 0
        if cache is not None:
            s2.compact_cache_layers(cache, range(self.pruning_layer + 1), keep_index)
        st.scores, st.scored_rows = ctx.scores, ctx.scored_rows
        st.kept_visual, st.keep_index = kept, keep_index
        st.tokens_after = int(kept.numel())
        st.method_tokens[method.name] = [st.tokens_before, st.tokens_after]
        st.captured.clear()
        hidden = hidden[:, keep_index]
        st.method_marks[method.name] = [(start, self.clock.mark())]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _slice_layer_inputs(self, module, args, kwargs):
        st = self.state
        keep = st.keep_index
        if not st.prefill or keep is None or args[0].shape[1] != keep.numel():
            return None
        splice.slice_layer_kwargs(kwargs, keep)
        return args, kwargs

    # ------------------------------------------------------------------ report
    def seconds(self, name: str) -> float:
        """Seconds the method ``name`` took in the last prefill (all videos)."""
        return sum(self.clock.elapsed(a, b) for a, b in self.state.method_marks.get(name, []))

    def report(self) -> dict[str, Any]:
        st = self.state
        names = [m.name for m, _ in self.methods]
        return {
            "tokens_before_stage1": st.tokens_before_stage1,
            "tokens_after_stage1": st.tokens_after_stage1,
            **st.method_stats,
            "tokens_before": st.tokens_before,
            "tokens_after": st.tokens_after,
            "llm_prefill_tokens": int(st.source_index.numel()) if st.source_index is not None else 0,
            "kv_bytes_layers_0_to_k": st.kv_bytes_layers_0_to_k,
            "scored_rows": st.scored_rows,
            "merger_rows_skipped": st.merger_rows_skipped,
            "methods": {n: {"tokens": list(st.method_tokens.get(n, [0, 0])), "seconds": self.seconds(n)} for n in names},
        }


def apply_methods(model, config: RunConfig) -> ReductionHandle:
    """Install the hooks for the run's enabled methods on a loaded model; returns the handle."""
    handle = ReductionHandle(model, config)
    handle._install()
    return handle


def apply_prunevid(model, stage1: Stage1Config, stage2: Stage2Config) -> ReductionHandle:
    """PruneVid's stages (Stage 1, Stages 2+3) on a loaded model; returns the handle."""
    return apply_methods(model, RunConfig(stage1=stage1, stage2=stage2))
