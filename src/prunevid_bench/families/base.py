"""What a model family tells the rest of the code. Defaults fit the Qwen-VL layout of
transformers 5.x (``model.model.language_model``, ``model.model.visual``); a family whose
modules sit elsewhere overrides the accessor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class PatchGeometry:
    """How pixels become visual tokens: ``patch`` px square patches, ``temporal`` frames per
    temporal patch, ``merge`` x ``merge`` patches merged into one LLM token."""

    patch: int
    temporal: int
    merge: int

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this (one merged token's side in pixels)."""
        return self.patch * self.merge


@dataclass(frozen=True)
class Family:
    model_type: str  # the checkpoint's config.model_type
    model_class: str  # transformers class that loads a checkpoint
    processor_class: str  # transformers processor class of the family
    rope_inputs: tuple[str, ...]  # processor outputs the family's get_rope_index reads
    apply_rotary: Callable  # (q, k, cos, sin) -> (q, k), the family's own rotary
    build_tiny: Callable[..., Any] | None = None  # (seed, attn_implementation) -> random-weight model
    # how a video's placeholders lie in the prompt: "video" one run per video (Qwen2/2.5-VL),
    # "step" one run per temporal grid step with text between them (Qwen3-VL's timestamps)
    video_layout: str = "video"

    # --------------------------------------------------------------- where things are
    def base(self, model):
        """The multimodal model below the LM head (placeholder scatter + M-RoPE ids happen here)."""
        return model.model

    def language_model(self, model):
        return model.model.language_model

    def decoder_layers(self, model):
        return self.language_model(model).layers

    def attention(self, layer):
        """The attention module of a decoder layer (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``)."""
        return layer.self_attn

    def query_key(self, attention):
        """The modules whose outputs are a layer's q and k right before rotary (a scorer captures
        them): the projections here; a family with QK-norm (Qwen3) names its norms."""
        return attention.q_proj, attention.k_proj

    def attention_layers(self, config) -> list[int]:
        """The decoder layers with softmax attention and a KV cache (an LLM-layer method can score
        only there): every layer here; a hybrid family (Qwen3.5) names its full-attention ones."""
        return list(range(config.get_text_config().num_hidden_layers))

    def is_hybrid(self, model) -> bool:
        """Whether some decoder layers are not softmax attention (Qwen3.5's linear-attention layers
        hold every token in a recurrent state)."""
        return len(self.attention_layers(model.config)) < len(self.decoder_layers(model))

    def deepstack_levels(self, model) -> int:
        """How many DeepStack levels the tower hands the LLM (level i added after decoder layer i;
        the patch then owns the add, ``patch.deepstack``). None here."""
        return 0

    def vision_output(self, pooler: tuple, deepstack: list | None):
        """The tower's output type rebuilt from cached per-video features (the feature cache);
        ``deepstack``: per video its levels, for a family that has them."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=pooler)

    def vision_encoder(self, model):
        return model.model.visual

    def vision_merger(self, model):
        """The module turning patch features into LLM tokens: its input is the vision encoder's
        output before the merger ([patches, C_vision]), its output the visual tokens."""
        return model.model.visual.merger

    def merger_order(self, model, grid_thw: torch.Tensor) -> torch.Tensor:
        """[U] for the merger's input of one tower call over grids ``grid_thw``: row j's
        merge x merge patch group is LLM token ``order[j]`` of the call (raster order, video after
        video). The tower puts the merger's output back in raster order itself. Identity here:
        patch groups reach the merger in raster order (Qwen2-VL)."""
        m = self.geometry(model.config).merge
        return torch.arange(int((grid_thw.prod(-1) // (m * m)).sum()), device=grid_thw.device)

    def video_token_id(self, model) -> int:
        return model.config.video_token_id

    def vision_end_token_id(self, model) -> int:
        return model.config.vision_end_token_id

    def video_runs(self, model, input_ids: torch.Tensor, grids: list) -> list[list[tuple[int, int]]]:
        """Each video's placeholder runs in the prompt ``input_ids`` [L], as (start, end) pairs in
        prompt order: the video of grid (t, h, w) holds t * h * w / merge^2 tokens, frame-major, in
        its runs (``splice.assign_runs``)."""
        from prunevid_bench import splice

        merge = self.geometry(model.config).merge
        sizes = [(t, h * w // (merge * merge)) for t, h, w in grids]
        runs = splice.runs(input_ids == self.video_token_id(model))
        return splice.assign_runs(runs, sizes, per_step=self.video_layout == "step")

    def visual_extras(self, model, kwargs: dict, runs: list) -> list[dict]:
        """Per video, the per-token tensors other than the embeddings that the language model's
        input carries for its visual tokens (e.g. Qwen3-VL's DeepStack levels, read off the
        language model's ``kwargs``), as ``{name: [t * n, ...]}`` in grid order; ``runs`` are the
        videos' placeholder runs. Every reduction applies to them. None in this family."""
        return [{} for _ in runs]

    def put_visual_extras(self, model, kwargs: dict, videos: list, rows: list) -> None:
        """Hand the reduced extras back to the language model's input: ``videos`` each video's
        ``VideoTokens`` as it enters the LLM, ``rows`` its rows in the LLM input. Nothing here."""

    def geometry(self, config) -> PatchGeometry:
        vision = config.vision_config
        return PatchGeometry(int(vision.patch_size), int(vision.temporal_patch_size), int(vision.spatial_merge_size))

    # --------------------------------------------------------------- positions
    def prefill_position_ids(self, model, inputs: dict) -> torch.Tensor:
        """Position ids ``(4, 1, L)`` of the full, unpruned prompt as ``generate`` builds them (a
        text row ``arange(L)`` and the three M-RoPE rows); also sets the base model's
        ``rope_deltas``."""
        input_ids = inputs["input_ids"]
        base = self.base(model)
        rope_kwargs = {k: inputs[k] for k in self.rope_inputs if k in inputs}
        mrope, deltas = base.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            attention_mask=inputs.get("attention_mask"),
            **rope_kwargs,
        )
        base.rope_deltas = deltas
        text = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)
        return torch.cat([text, mrope.to(input_ids.device)], dim=0)

    def lmms_video(self, request) -> dict:
        """What lmms-eval's model of this family asks of qwen-vl-utils by default, as
        ``VideoRequest`` fields (the ``lmms-eval`` policy fills the ones a run leaves unset in
        ``request``, the run's own); empty: its ``qwen2_5_vl`` model's, which ``video_sampling`` holds."""
        return {}

    def video_metadata(self, clip) -> dict:
        """What the processor is told about a sampled clip (``video.Clip``). Here the sampled
        frames at the sampled rate: Qwen2/2.5-VL's time ids read seconds per grid step from it."""
        return {"total_num_frames": clip.num_frames, "fps": clip.sampled_fps, "frames_indices": list(range(clip.num_frames))}

    def rotate(self, q: torch.Tensor, k: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a layer's (already M-RoPE-merged) rotary cos/sin [1, L, d] to q [H, L, d], k [H_kv, L, d]."""
        cos, sin = position_embeddings
        q_rot, k_rot = self.apply_rotary(q.unsqueeze(0), k.unsqueeze(0), cos, sin)
        return q_rot[0], k_rot[0]

    def vision_shape(self, config):
        """The vision encoder's shape for ``flops`` (Qwen2.5-VL's config layout by default)."""
        from prunevid_bench.flops import VisionShape

        return VisionShape.from_config(config)

    # --------------------------------------------------------------- loading
    def load_pretrained(self, name: str, **kwargs):
        import transformers

        return getattr(transformers, self.model_class).from_pretrained(name, **kwargs)
