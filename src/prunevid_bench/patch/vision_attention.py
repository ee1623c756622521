"""The vision tower's attention for the methods that rank visual tokens by it
(``Method.vision_attention``: cfg -> a rule of ``stages.vision_attention`` or None).

How it is obtained under SDPA or FlashAttention (no eager pass, no ``output_attentions``): a
pre-hook on the LAST vision block's attention module takes the rotary cos/sin the block is given,
a forward hook on its ``qkv`` projection takes q and k as the block computes them (nothing is
recomputed), rotates them with the vision rotary as the block does, and scores each temporal step's patches in
float32. The block then runs unchanged with its own kernel. The scores, one per merged token in
the merger's row order, are put in raster order (``Family.merger_order``: Qwen2.5-VL's window
order undone) and travel with each video as the per-token extra ``vision_<rule>``, so every
reduction applies to them like any other per-token tensor.

Only while videos are encoded (images are left alone). The steps are the video's temporal grid
steps, as the originals' last blocks see them (full attention per frame on the Qwen towers)."""

from __future__ import annotations

import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.stages.vision_attention import RULES, step_scores


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Qwen vision rotary (the same in Qwen2-VL, Qwen2.5-VL and Qwen3-VL): x [P, H, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class VisionAttention:
    """Mixed into ``ReductionHandle``."""

    def _vision_rules(self, enabled) -> dict[str, list[str]]:
        """rule -> the enabled methods that read it."""
        rules: dict[str, list[str]] = {}
        for method, cfg in enabled:
            rule = method.vision_attention(cfg) if method.vision_attention is not None else None
            if rule is not None:
                if rule not in RULES:
                    raise PruneVidError(f"method {method.name}: vision_attention must give one of {RULES}, got {rule!r}")
                rules.setdefault(rule, []).append(method.name)
        return rules

    def _install_vision_attention(self, add) -> None:
        attn = self.family.vision_encoder(self.model).blocks[-1].attn
        add(attn.register_forward_pre_hook(self._take_vision_rotary, with_kwargs=True))
        add(attn.qkv.register_forward_hook(self._score_vision_block))

    def _take_vision_rotary(self, module, args, kwargs):
        self._vision_rotary = (kwargs["position_embeddings"], module.num_heads)
        return None

    def _score_vision_block(self, module, args, output):
        """The block's own qkv output (nothing recomputed), rotated and scored."""
        grids = self._encoded_video_grid_thw
        if not self._encoding_videos or grids is None:
            return None
        start = self.clock.mark()
        (cos, sin), heads = self._vision_rotary
        patches = output.shape[0]
        qkv = output.reshape(patches, 3, heads, -1)
        q = _rotate(qkv[:, 0], cos, sin).transpose(0, 1)  # [H, P, d]
        k = _rotate(qkv[:, 1], cos, sin).transpose(0, 1)
        steps = [h * w for t, h, w in grids.tolist() for _ in range(t)]
        order = self.family.merger_order(self.model, grids)  # merger row j is raster token order[j]
        scores = {}
        for rule in self.vision_rules:
            in_rows = step_scores(q, k, steps, self.merge * self.merge, rule)
            raster = torch.empty_like(in_rows)
            raster[order] = in_rows
            scores[f"vision_{rule}"] = raster
        self._vision_scores = (scores, [(t, h * w // (self.merge * self.merge)) for t, h, w in grids.tolist()],
                               (start, self.clock.mark()))
        return None

    def supply_vision_scores(self, scores: dict, sizes: list[tuple[int, int]], marks: tuple) -> None:
        """Hand the next prefill the tower scores computed elsewhere, for a caller that skips the
        tower (benchmarks/bench_methods.py): {``vision_<rule>``: [sum t * n]} in raster order, each
        video's (t, n), the clock marks around their computation (counted as the methods' time)."""
        self._vision_scores = (scores, sizes, marks)

    def _take_vision_scores(self, n_videos: int) -> list[dict]:
        """Per video of this prefill, {``vision_<rule>``: [t * n]} from the last tower call."""
        if not self.vision_rules or n_videos == 0:
            return [{} for _ in range(n_videos)]
        taken, self._vision_scores = self._vision_scores, None
        if taken is None or len(taken[1]) != n_videos:
            names = ", ".join(sorted({n for names in self.vision_rules.values() for n in names}))
            raise PruneVidError(f"{names} needs the vision tower's attention, and the tower did not run for this "
                                f"prompt's {n_videos} video(s) (features given precomputed?): run the tower")
        scores, sizes, marks = taken
        for names in self.vision_rules.values():
            for name in names:
                self.state.method_marks.setdefault(name, []).append(marks)
        out, offset = [], 0
        for t, n in sizes:
            out.append({key: value[offset : offset + t * n] for key, value in scores.items()})
            offset += t * n
        return out
