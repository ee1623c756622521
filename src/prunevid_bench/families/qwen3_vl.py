"""Qwen3-VL, dense and MoE (transformers 5.x ``modeling_qwen3_vl``, ``modeling_qwen3_vl_moe``).

What differs from Qwen2/2.5-VL: every temporal step of a video is its own placeholder run,
``<t seconds><|vision_start|>`` + n pads + ``<|vision_end|>`` (``video_layout = "step"``);
attention normalises q and k per head (``q_norm``/``k_norm``) before rotary, so a scorer takes
them there; the tower also returns DeepStack features from some of its blocks, one level per
block, added after LLM layers 0..D-1 at the visual positions (the patch owns that add so that it
follows every reduction: ``patch.deepstack``); full attention per step in the tower, learned
position embeddings, 1 + D patch mergers per token.
"""

from __future__ import annotations

import dataclasses

from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from prunevid_bench import splice
from prunevid_bench.errors import PruneVidError
from prunevid_bench.families import register_family
from prunevid_bench.families.base import Family


def _tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny_qwen3vl import build_tiny_qwen3vl_model

    return build_tiny_qwen3vl_model(seed=seed, attn_implementation=attn_implementation)


def _tiny_moe(seed: int = 0, attn_implementation: str = "sdpa"):
    from prunevid_bench.models.tiny_qwen3vl import build_tiny_qwen3vl_model

    return build_tiny_qwen3vl_model(seed=seed, attn_implementation=attn_implementation, moe=True)


class Qwen3VLFamily(Family):
    def video_runs(self, model, input_ids, grids: list) -> list[list[tuple[int, int]]]:
        """One run of exactly n = h * w / merge^2 pads per temporal step, t runs per video, in
        prompt order; any other layout is refused (never guessed: a wrong split would prune
        timestamp text)."""
        merge = self.geometry(model.config).merge
        runs = splice.runs(input_ids == self.video_token_id(model))
        out, at = [], 0
        for t, h, w in grids:
            n = h * w // (merge * merge)
            mine = runs[at : at + t]
            if len(mine) != t or any(e - s != n for s, e in mine):
                found = ", ".join(str(e - s) for s, e in mine) or "none"
                raise PruneVidError(f"{self.model_type}: a video of grid {t}x{h}x{w} needs {t} placeholder runs of {n} "
                                    f"tokens (one per temporal step), the prompt has {found}; is its template the model's?")
            out.append(mine)
            at += t
        if at != len(runs):
            raise PruneVidError(f"{self.model_type}: the prompt has {len(runs) - at} video placeholder runs beyond its "
                                "videos' grids; pass video_grid_thw with the inputs")
        return out

    def video_metadata(self, clip) -> dict:
        """The source's frame rate and the sampled frames' source indices, so each step's
        ``<t seconds>`` is its true time in the file (a clip that starts late reads so)."""
        return {"total_num_frames": clip.total_frames, "fps": clip.native_fps, "frames_indices": list(clip.indices)}

    def lmms_video(self, request) -> dict:
        """lmms-eval 0.7.3's ``qwen3_vl`` model (``_build_video_kwargs``): its ``qwen2_5_vl``
        model's frame count and pixel bounds (``video_sampling``), but a frame rate is capped at
        32 frames (``max_frames``), and a total pixel budget with neither a count nor a rate
        samples at qwen-vl-utils' default rate (2 fps), capped at 32 frames."""
        from prunevid_bench.video_sampling import LMMS_MAX_NUM_FRAMES, QWEN_DEFAULT_FPS

        rate = request.total_pixels is not None and request.fps is None and request.num_frames is None
        return {"max_frames": LMMS_MAX_NUM_FRAMES, **({"fps": QWEN_DEFAULT_FPS} if rate else {})}

    def query_key(self, attention):
        return attention.q_norm, attention.k_norm

    def deepstack_levels(self, model) -> int:
        return len(model.config.vision_config.deepstack_visual_indexes)

    def vision_output(self, pooler: tuple, deepstack: list | None):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        if deepstack is None:
            raise PruneVidError(f"cached {self.model_type} features lack their DeepStack levels; clear the feature cache")
        levels = [tuple(video[j] for video in deepstack) for j in range(len(deepstack[0]))]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=levels)

    def vision_shape(self, config):
        """Qwen3-VL's tower: full attention within each temporal step in every block, a 2-matmul
        GELU MLP, the main merger and one DeepStack merger per level on every token."""
        from prunevid_bench.flops import VisionShape

        v = config.vision_config
        return VisionShape(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads, depth=v.depth,
            out_hidden_size=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            in_channels=v.in_channels, spatial_merge_size=v.spatial_merge_size,
            fullatt_block_indexes=tuple(range(v.depth)), mlp_matmuls=2, mergers=1 + len(v.deepstack_visual_indexes),
        )


QWEN3_VL = register_family(Qwen3VLFamily(
    model_type="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    rope_inputs=("video_grid_thw", "image_grid_thw"),
    apply_rotary=apply_rotary_pos_emb,
    build_tiny=_tiny,
    video_layout="step",
))
# The MoE variant: the same family, with its own model class and tiny model.
QWEN3_VL_MOE = register_family(dataclasses.replace(
    QWEN3_VL, model_type="qwen3_vl_moe", model_class="Qwen3VLMoeForConditionalGeneration", build_tiny=_tiny_moe,
))
