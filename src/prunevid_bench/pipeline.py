"""The library entry point: ``load_pipeline("tiny").run("video.mp4", "What is happening?")``.

A Pipeline owns one loaded model and processor. It prepares a sample (decode, sample, process),
switches the hooks to the run's token-reduction methods (``prunevid_bench.methods``), calls the
engine and assembles the :class:`RunResult`. Changing method settings between runs never
reloads the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunevid_bench.config import RunConfig, build_config, from_dict
from prunevid_bench.engine import run_greedy
from prunevid_bench.errors import PruneVidError
from prunevid_bench.mrope import integer_seconds_wanted, numbering
from prunevid_bench.pipeline_records import _hybrid_fields, _as_list, _as_rows, _fed_sizes, _method_fields, _reductions, _seconds, _video_entry
from prunevid_bench.report import RunResult
from prunevid_bench.messages import lmms_system_prompt, prepare_media, processor_size_kwargs, single_video_messages
from prunevid_bench.video import Clip, VideoRequest


@dataclass
class Prepared:
    inputs: dict[str, torch.Tensor]
    clips: list[Clip]  # one per video, in prompt order
    prompt: str
    policy: str = "processor"
    feature_key: str | None = None  # set when it came through a FeatureCache (prunevid_bench.feature_cache)

    @property
    def clip(self) -> Clip:
        return self.clips[0]


class Pipeline:
    def __init__(self, loaded, config: RunConfig):
        self.model = loaded.model
        self.processor = loaded.processor
        self.model_name = loaded.name
        self.default_policy = loaded.video_policy
        self.config = config
        self.device = next(self.model.parameters()).device
        self._handle = None
        self._handle_key = None
        self.feature_cache = None  # a FeatureCache shared by the runs of a sweep or dataset run

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Pipeline":
        """Load ``cfg.model`` once; ``cfg`` is the default config of every later call."""
        from prunevid_bench.measure import apply_threads
        from prunevid_bench.models.loading import load_model

        apply_threads(cfg.runtime.threads)
        m = cfg.model
        return cls(load_model(m.name, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation), cfg)

    # ----------------------------------------------------------- preparation
    def video_policy(self, cfg: RunConfig | None = None) -> str:
        """The sampling policy a run uses: ``auto`` is the model's own default (qwen for
        checkpoints, processor for the built-in models, which were trained and tested with it)."""
        policy = (cfg or self.config).video.policy
        return self.default_policy if policy == "auto" else policy

    def video_request(self, cfg: RunConfig | None = None) -> VideoRequest:
        cfg = cfg or self.config
        from prunevid_bench.families import family_of

        policy = self.video_policy(cfg)
        if policy == "processor" and cfg.video.total_pixels is not None:
            raise PruneVidError("video.total_pixels applies to the qwen and lmms-eval policies (the processor policy has no total budget)")
        family = family_of(self.model)
        request = VideoRequest.from_config(cfg.video, policy, factor=family.geometry(self.model.config).factor)
        return request.with_lmms_defaults(family.lmms_video(request)) if policy == "lmms-eval" else request

    def build_prompt(self, question: str) -> str:
        return self._template(single_video_messages(None, question))

    def _template(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare(
        self,
        video: str | Path | Clip | np.ndarray | list | None = None,
        question: str | None = None,
        config: RunConfig | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> Prepared:
        """Decode, sample and resize the videos as the run's policy does, load any images, and
        run the processor. Give one ``video`` and a ``question``, or Qwen chat ``messages``
        (see ``prunevid_bench.messages``). With a ``feature_cache``, a sample seen before is
        served from it."""
        if self.feature_cache is not None:
            return self.feature_cache.prepare(self, video, question, config or self.config, messages)
        return self._prepare(video, question, config, messages)

    def _prepare(self, video, question, config, messages) -> Prepared:
        cfg = config or self.config
        given = messages is not None
        if not given:
            if video is None:
                raise PruneVidError("give a video and a question, or messages")
            messages = single_video_messages(video, question or "")
        elif video is not None or question:
            raise PruneVidError("give either a video and a question, or messages, not both")
        request = self.video_request(cfg)
        media = prepare_media(messages, request, lmms_system_prompt(request.policy), name_elements=given)
        prompt = self._template(media.template_messages)
        kwargs = processor_size_kwargs(self.processor.video_processor, cfg.video, request.resizes)
        if not request.resizes:  # an element's own pixel bounds apply under this policy too (messages.Media)
            edges = [dict(getattr(p, "size", None) or {}) for p in (self.processor.video_processor,
                                                                    getattr(self.processor, "image_processor", None))]
            edges[0] = kwargs.get("size", edges[0])
            if media.size_for_processor(*[(e.get("shortest_edge"), e.get("longest_edge")) for e in edges], request.factor):
                kwargs = {"do_resize": False}
        from prunevid_bench.families import family_of

        metadata = [family_of(self.model).video_metadata(clip) for clip in media.clips]
        try:
            inputs = self.processor(
                text=[prompt],
                images=media.images or None,
                videos=[clip.frames for clip in media.clips],
                video_metadata=metadata,
                do_sample_frames=False,
                return_tensors="pt",
                **kwargs,
            )
        except ValueError as exc:  # e.g. frames too extreme for the processor's resize rule
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PruneVidError(f"the processor refused the input: {first}") from None
        self._check_length(int(inputs["input_ids"].shape[1]), cfg.generation.max_new_tokens)
        dtype = next(self.model.parameters()).dtype
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point() and key in ("pixel_values_videos", "pixel_values"):
                    value = value.to(dtype)
            moved[key] = value
        return Prepared(moved, media.clips, prompt, request.policy)

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt the model has no positions for before running it: a huge question
        would otherwise run for minutes, then be meaningless."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and prompt_tokens + max_new_tokens > limit:
            raise PruneVidError(
                f"the prompt is {prompt_tokens} tokens (video included) and {max_new_tokens} more may be generated, "
                f"but the model's max_position_embeddings is {limit}: shorten the question or sample fewer frames"
            )

    # ----------------------------------------------------------- methods
    def _apply_stages(self, cfg: RunConfig):
        from prunevid_bench.methods import all_methods
        from prunevid_bench.patch import apply_methods

        key = (cfg.model.deepstack, cfg.prefill.chunk_tokens, *((m.name, dataclasses.astuple(cfg.section(m.section))) for m in all_methods()))
        if self._handle_key == key:
            return self._handle
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._handle_key = None
        if cfg.enabled_methods or cfg.prefill.chunk_tokens:  # a chunked baseline: the handle chunks, no method
            self._handle = apply_methods(self.model, cfg)
        self._handle_key = key
        return self._handle

    def remove_stages(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._handle_key = None, None

    # ----------------------------------------------------------- running
    def run(
        self,
        video: str | Path | Clip | np.ndarray | list | Prepared | None = None,
        question: str | None = None,
        config: RunConfig | None = None,
        messages: list[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> RunResult:
        """Run one sample: a video and a question, Qwen chat ``messages`` (several videos,
        images, a system prompt), or a ``Prepared`` input. ``overrides`` are dotted or short
        config keys, e.g. ``keep_ratio=0.3`` or ``{"tome.enabled": True}`` passed as ``**{...}``."""
        cfg = config or self.config
        if overrides:
            cfg = _with_overrides(cfg.to_dict(), overrides)
        if isinstance(video, Prepared):
            prepared = video
        else:
            prepared = self.prepare(video, question, cfg, messages=messages)
        if cfg.budget.match == "flops":  # the knob solved for this sample's FLOPs (runs it at the solution)
            from prunevid_bench.budget import match_flops

            return match_flops(self, prepared, cfg)
        handle = self._apply_stages(cfg)
        with self._served_features(prepared, handle) as served, numbering(self.model, cfg.model.mrope, integer_seconds_wanted(cfg)):
            out = run_greedy(self.model, prepared.inputs, cfg.generation.max_new_tokens, clock=handle.clock if handle else None,
                             memory=handle.memory if handle else None)
        out = served.account(out) if served else out  # a cached tower: its recorded time is in ttft_s
        text = self.processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        stages = handle.report() if handle else {}
        visual = out.visual_tokens
        before1 = stages.get("tokens_in_prompt", visual)
        after1 = stages.get("tokens_after_visual", visual)
        tokens_before = stages.get("tokens_before", after1)
        tokens_after = stages.get("tokens_after", after1)
        kv_uncompressed = out.kv_cache_bytes
        layer_method = handle.layer_method if handle else None
        if layer_method and stages.get("kv_bytes_layers_0_to_k"):
            # The layers that ran on all tokens were read just before pruning; each held the prompt.
            attention = handle.attention_layers  # the layers with a KV cache (a hybrid model's full-attention ones)
            through_k = sum(1 for i in attention if i <= handle.score_layer)
            kv_uncompressed = stages["kv_bytes_layers_0_to_k"] * len(attention) // through_k
        llm_prefill_tokens = stages.get("llm_prefill_tokens") or out.prompt_tokens
        reductions = _reductions(handle, stages, out.prompt_tokens, llm_prefill_tokens, out.kv_cache_bytes, kv_uncompressed)
        method_fields = _method_fields(handle, stages)
        method_fields.update(self._budget_fields(cfg, prepared, tokens_after))
        if handle is not None and cfg.runtime.save_kept:
            from prunevid_bench.kept import kept_record

            method_fields["kept"] = kept_record(handle)
        flops, flops_base = self._flops(prepared, out.prompt_tokens, llm_prefill_tokens, handle, tokens_before - tokens_after,
                                        stages.get("scored_rows", 0), stages.get("merger_rows_skipped", 0),
                                        stages.get("tower_blocks"))
        grid = prepared.inputs.get("video_grid_thw")
        seconds = prepared.inputs.get("second_per_grid_ts")
        clip = prepared.clip
        fed = _fed_sizes(grid, self.model) if grid is not None and len(grid) == len(prepared.clips) else []
        return RunResult(
            generated_text=text.strip(),
            generated_tokens=len(out.token_ids),
            prompt_tokens=out.prompt_tokens,
            visual_tokens=visual,
            video_grid_thw=grid.tolist() if grid is not None else [],
            num_frames=clip.num_frames,
            sampled_fps=round(clip.sampled_fps, 6),
            video_backend=clip.backend,
            video_policy=prepared.policy,
            frame_indices=list(clip.indices),
            frame_size=fed[0] if fed else clip.frame_size,
            decoded_size=clip.decoded_size or clip.frame_size,
            second_per_grid_ts=[round(float(x), 6) for x in _as_list(seconds)],
            videos=[_video_entry(c, s) for c, s in zip(prepared.clips, fed)] if len(prepared.clips) > 1 else None,
            ttft_s=out.ttft_s,
            vision_encoder_s=out.vision_encoder_s,
            vision_mergers_s=out.vision_mergers_s,
            prefill_s=out.prefill_s,
            decode_s=out.decode_s,
            decode_tokens_per_s=out.decode_tokens_per_s,
            peak_memory_bytes=max(out.prefill_peak_memory_bytes, out.decode_peak_memory_bytes),
            prefill_peak_memory_bytes=out.prefill_peak_memory_bytes,
            decode_peak_memory_bytes=out.decode_peak_memory_bytes,
            memory_kind=out.memory_kind,
            kv_cache_bytes=out.kv_cache_bytes,
            kv_cache_bytes_uncompressed=kv_uncompressed,
            prefill_chunk_tokens=cfg.prefill.chunk_tokens,
            prefill_peak_memory_by_phase=out.prefill_peak_by_phase,
            tokens_after_visual_methods=after1,
            visual_methods_s=sum(r.seconds for r in reductions if r.acts in ("vision_encoder", "visual_tokens")),
            layer_method_s=_seconds(stages, handle.layer_key) if layer_method else 0.0,
            visual_tokens_kept=tokens_after,
            visual_tokens_kept_ratio=(tokens_after / before1) if before1 else 1.0,
            visual_methods=[r.method for r in reductions if r.acts in ("vision_encoder", "visual_tokens")],
            layer_method=layer_method[0].name if layer_method else None,
            llm_prefill_tokens=llm_prefill_tokens,
            pruning_layer=handle.pruning_layer if layer_method else None,
            pruning_layer_spec=handle.pruning_layer_spec if layer_method else None,
            **_hybrid_fields(self.model, handle, out.state_bytes, tokens_before - tokens_after, llm_prefill_tokens),
            model_family=self.model.config.model_type,
            methods=[m.name for m, _ in handle.methods] if handle else [],
            reductions=reductions,
            method_fields=method_fields,
            prefill_flops=flops.total,
            prefill_flops_baseline=flops_base.total,
            ideal_speedup=round(flops_base.total / flops.total, 6) if flops.total else None,
            prefill_flops_fraction=round(flops.total / flops_base.total, 6) if flops_base.total else None,
            visual_tokens_per_layer=self._visual_per_layer(handle, after1, tokens_after),
            generated_token_ids=out.token_ids,
            first_token_logits=out.first_logits,
            vision_cached=bool(served and served.hit),
        )

    def _budget_fields(self, cfg: RunConfig, prepared: Prepared, kept: int) -> dict[str, Any]:
        """A run with a budget: the asked fraction, the method whose knob it set, the visual
        tokens that knob promised (``Method.budget_knob``) beside those kept (``visual_tokens_kept``),
        and a note when the two differ."""
        from prunevid_bench.budget import budget_method
        from prunevid_bench.families import family_of

        method = budget_method(cfg)
        if method is None:
            return {}
        section = cfg.section(method.section)
        merge = family_of(self.model).geometry(self.model.config).merge
        grids = [(t, (h // merge) * (w // merge)) for t, h, w in _as_rows(prepared.inputs.get("video_grid_thw"))]
        promised = method.budget_knob(section, section.budget).promise(grids)
        out = {"budget": section.budget, "budget_method": method.name, "budget_promised_tokens": promised}
        if promised != kept:
            out["budget_note"] = f"{method.name} kept {kept} visual tokens, not the {promised} its budget promised"
        return out

    def _visual_per_layer(self, handle, entered: int, kept: int) -> float:
        """Visual tokens in each LLM layer's prefill, mean over layers: ``entered`` up to the last
        layer on every token, ``kept`` after it (the cost a kept fraction alone does not show)."""
        n = self.model.config.get_text_config().num_hidden_layers
        k = handle.score_layer if handle is not None and handle.layer_method else n - 1
        return round(((k + 1) * entered + (n - k - 1) * kept) / n, 3)

    def _served_features(self, prepared: Prepared, handle):
        """The feature cache's tower output for this run, unless a method changes the tower's
        output or reads its attention (it then runs, and what it gives is not kept either)."""
        if self.feature_cache is None or prepared.feature_key is None or (handle is not None and (handle.encoder_methods or handle.tower_methods or handle.vision_rules)):
            return contextlib.nullcontext()
        return self.feature_cache.serve(self.model, prepared)


    def _flops(self, prepared: Prepared, prompt_tokens: int, llm_prefill_tokens: int, handle, dropped: int, scored_rows: int,
               merger_rows_skipped: int, tower_blocks=None):
        from prunevid_bench.families import family_of
        from prunevid_bench.flops import run_flops

        grids = [list(map(int, g)) for key in ("video_grid_thw", "image_grid_thw")
                 for g in _as_rows(prepared.inputs.get(key))]
        vision = family_of(self.model).vision_shape(self.model.config)
        layer = handle.score_layer if handle is not None and handle.layer_method else None  # the last on all tokens
        if _as_rows(prepared.inputs.get("image_grid_thw")):
            tower_blocks = None  # the counts are the videos' pass; images ran unmerged in their own
        return run_flops(self.model.config, vision, grids, prompt_tokens, llm_prefill_tokens, layer,
                         dropped if layer is not None else 0, scored_rows, merger_rows_skipped, tower_blocks)


def _with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    from prunevid_bench.config import merge_into, overrides_to_layer

    return from_dict(merge_into(base, overrides_to_layer(overrides), "overrides"))


def load_pipeline(
    model: str | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    **model_options: Any,
) -> Pipeline:
    """Load a model once and return a Pipeline. ``model_options``: dtype, device, attn_implementation.

    The convenience form of ``Pipeline.from_config(build_config(preset, config_file, overrides))``."""
    over = dict(overrides or {})
    if model is not None:
        over["model.name"] = model
    for key, value in model_options.items():
        over[f"model.{key}"] = value
    return Pipeline.from_config(build_config(preset, Path(config_file) if config_file else None, over))
