"""The library entry point: ``load_pipeline("tiny").run("video.mp4", "What is happening?")``.

A Pipeline owns one loaded model and processor. It prepares a sample (decode, sample, process),
switches the PruneVid hooks to the run's stage settings, calls the engine and assembles the
:class:`RunResult`. Changing stage settings between runs never reloads the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunevid_bench.config import RunConfig, build_config, from_dict
from prunevid_bench.engine import run_greedy
from prunevid_bench.errors import PruneVidError
from prunevid_bench.report import RunResult
from prunevid_bench.video import Clip, load_clip


@dataclass
class Prepared:
    inputs: dict[str, torch.Tensor]
    clip: Clip
    prompt: str


class Pipeline:
    def __init__(self, loaded, config: RunConfig):
        self.model = loaded.model
        self.processor = loaded.processor
        self.model_name = loaded.name
        self.config = config
        self.device = next(self.model.parameters()).device
        self._handle = None
        self._handle_key = None

    # ----------------------------------------------------------- preparation
    def build_prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare(self, video: str | Path | Clip | np.ndarray, question: str, config: RunConfig | None = None) -> Prepared:
        """Decode and sample the video (unless frames are given) and run the processor."""
        cfg = config or self.config
        if not question or not question.strip():
            raise PruneVidError("the question is empty")
        if isinstance(video, Clip):
            clip = video
        elif isinstance(video, np.ndarray):
            clip = Clip(video, list(range(len(video))), 2.0, len(video), 2.0, "array")
        else:
            v = cfg.video
            clip = load_clip(video, num_frames=v.num_frames if v.fps is None else None, fps=v.fps, max_frames=v.max_frames)
        prompt = self.build_prompt(question)
        n = clip.num_frames
        metadata = {"total_num_frames": n, "fps": clip.sampled_fps, "frames_indices": list(range(n))}
        kwargs: dict[str, Any] = {}
        if cfg.video.max_pixels or cfg.video.min_pixels:
            size = dict(self.processor.video_processor.size)
            if cfg.video.max_pixels:
                size["longest_edge"] = cfg.video.max_pixels
            if cfg.video.min_pixels:
                size["shortest_edge"] = cfg.video.min_pixels
            kwargs["size"] = size
        inputs = self.processor(
            text=[prompt],
            videos=[clip.frames],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
            **kwargs,
        )
        self._check_length(int(inputs["input_ids"].shape[1]), cfg.generation.max_new_tokens)
        dtype = next(self.model.parameters()).dtype
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point() and key == "pixel_values_videos":
                    value = value.to(dtype)
            moved[key] = value
        return Prepared(moved, clip, prompt)

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt the model has no positions for before running it: a huge question
        would otherwise run for minutes, then be meaningless."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and prompt_tokens + max_new_tokens > limit:
            raise PruneVidError(
                f"the prompt is {prompt_tokens} tokens (video included) and {max_new_tokens} more may be generated, "
                f"but the model's max_position_embeddings is {limit}: shorten the question or sample fewer frames"
            )

    # ----------------------------------------------------------- stages
    def _apply_stages(self, cfg: RunConfig):
        from prunevid_bench.qwen25vl_patch import apply_prunevid

        key = (dataclasses.astuple(cfg.stage1), dataclasses.astuple(cfg.stage2))
        if self._handle_key == key:
            return self._handle
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._handle_key = None
        if cfg.stage1.enabled or cfg.stage2.enabled:
            self._handle = apply_prunevid(self.model, cfg.stage1, cfg.stage2)
        self._handle_key = key
        return self._handle

    def remove_stages(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._handle_key = None, None

    # ----------------------------------------------------------- running
    def run(
        self,
        video: str | Path | Clip | np.ndarray | Prepared,
        question: str | None = None,
        config: RunConfig | None = None,
        **overrides: Any,
    ) -> RunResult:
        """Run one sample. ``overrides`` are dotted or short config keys, e.g. ``keep_ratio=0.3``
        or ``{"stage1.enabled": True}`` passed as ``**{...}``."""
        cfg = config or self.config
        if overrides:
            cfg = _with_overrides(cfg.to_dict(), overrides)
        prepared = video if isinstance(video, Prepared) else self.prepare(video, question or "", cfg)
        handle = self._apply_stages(cfg)
        out = run_greedy(self.model, prepared.inputs, cfg.generation.max_new_tokens, clock=handle.clock if handle else None)
        text = self.processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        stages = handle.report() if handle else {}
        visual = out.visual_tokens
        before1 = stages.get("tokens_before_stage1", visual)
        after1 = stages.get("tokens_after_stage1", visual)
        tokens_before = stages.get("tokens_before", after1)
        tokens_after = stages.get("tokens_after", after1)
        kv_uncompressed = out.kv_cache_bytes
        if cfg.stage2.enabled and stages.get("kv_bytes_layers_0_to_k"):
            # Layers 0..K were read just before compaction; every layer holds the same length.
            n_layers = self.model.config.get_text_config().num_hidden_layers
            kv_uncompressed = stages["kv_bytes_layers_0_to_k"] * n_layers // (handle.pruning_layer + 1)
        grid = prepared.inputs.get("video_grid_thw")
        return RunResult(
            generated_text=text.strip(),
            generated_tokens=len(out.token_ids),
            prompt_tokens=out.prompt_tokens,
            visual_tokens=visual,
            video_grid_thw=grid.tolist() if grid is not None else [],
            num_frames=prepared.clip.num_frames,
            sampled_fps=round(prepared.clip.sampled_fps, 6),
            video_backend=prepared.clip.backend,
            ttft_s=out.ttft_s,
            vision_encoder_s=out.vision_encoder_s,
            prefill_s=out.prefill_s,
            decode_s=out.decode_s,
            decode_tokens_per_s=out.decode_tokens_per_s,
            peak_memory_bytes=max(out.prefill_peak_memory_bytes, out.decode_peak_memory_bytes),
            prefill_peak_memory_bytes=out.prefill_peak_memory_bytes,
            decode_peak_memory_bytes=out.decode_peak_memory_bytes,
            memory_kind=out.memory_kind,
            kv_cache_bytes=out.kv_cache_bytes,
            kv_cache_bytes_uncompressed=kv_uncompressed,
            tokens_before_stage1=before1,
            tokens_after_stage1=after1,
            stage1_segments=stages.get("stage1_segments"),
            stage1_static_tokens=stages.get("stage1_static_tokens"),
            stage1_dynamic_tokens=stages.get("stage1_dynamic_tokens"),
            stage1_s=stages.get("stage1_s", 0.0),
            tokens_before=tokens_before,
            tokens_after=tokens_after,
            stage2_s=stages.get("stage2_s", 0.0),
            total_compression_ratio=(tokens_after / before1) if before1 else 1.0,
            llm_prefill_tokens=stages.get("llm_prefill_tokens") or out.prompt_tokens,
            pruning_layer=handle.pruning_layer if cfg.stage2.enabled else None,
            pruning_layer_spec=cfg.stage2.pruning_layer if cfg.stage2.enabled else None,
            generated_token_ids=out.token_ids,
            first_token_logits=out.first_logits,
        )


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
    """Load a model once and return a Pipeline. ``model_options``: dtype, device, attn_implementation."""
    from prunevid_bench.models.loading import load_model

    over = dict(overrides or {})
    if model is not None:
        over["model.name"] = model
    for key, value in model_options.items():
        over[f"model.{key}"] = value
    cfg = build_config(preset, Path(config_file) if config_file else None, over)
    m = cfg.model
    loaded = load_model(m.name, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation)
    return Pipeline(loaded, cfg)
