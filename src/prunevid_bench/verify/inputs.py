"""The ``inputs`` check: what ``prepare`` feeds the model for a video file equals what Qwen's own
``qwen-vl-utils`` (``fetch_video``) and the model's processor give for the same request: the
token ids, the grid, the M-RoPE ids, and the pixels within 1e-5 (the processor, told not to resize
qwen-vl-utils' frames, as under the qwen policy). It needs the file (``--video``),
the ``qwen`` video policy (the one qwen-vl-utils implements; built-in models use ``processor``),
and qwen-vl-utils with a reader it can use (decord or torchcodec)."""

from __future__ import annotations

import importlib.util
import os

import torch

from prunevid_bench.families import family_of
from prunevid_bench.verify.checks import Check

PIXEL_TOLERANCE = 1e-5


def inputs_check(pipe, prepared, video_path: str | None) -> Check:
    def not_run(why: str) -> Check:
        return Check("inputs", "none", None, None, None, why)

    if video_path is None:
        return not_run("needs --video: qwen-vl-utils reads a file")
    if prepared.policy != "qwen":
        return not_run(f"video policy '{prepared.policy}': qwen-vl-utils implements 'qwen'")
    if importlib.util.find_spec("qwen_vl_utils") is None:
        return not_run("qwen-vl-utils is not installed")
    reader = next((name for name in ("decord", "torchcodec") if importlib.util.find_spec(name)), None)
    if reader is None:
        return not_run("qwen-vl-utils needs decord or torchcodec to read a video")
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", reader)
    from qwen_vl_utils import vision_process

    clip = prepared.clip
    request = pipe.video_request()
    element = {"video": str(video_path)}
    element.update({"fps": request.fps} if request.fps is not None else {"nframes": len(clip.indices)})
    element.update({k: v for k, v in (("min_pixels", request.min_pixels), ("max_pixels", request.max_pixels),
                                      ("total_pixels", request.total_pixels)) if v is not None})
    (video, metadata), _ = vision_process.fetch_video(element, return_video_sample_fps=True, return_video_metadata=True)
    # qwen-vl-utils sized the frames: the processor is told not to resize them, as under the qwen policy
    theirs = pipe.processor(text=[prepared.prompt], videos=[video], video_metadata=[metadata], do_resize=False,
                            return_tensors="pt")
    ours = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}
    model = pipe.model
    problems = []
    if not torch.equal(ours["input_ids"], theirs["input_ids"]):
        problems.append("token ids")
    if ours["video_grid_thw"].tolist() != theirs["video_grid_thw"].tolist():
        problems.append(f"grid {ours['video_grid_thw'].tolist()} against {theirs['video_grid_thw'].tolist()}")
    diff = None
    if not problems:
        diff = float((ours["pixel_values_videos"].float() - theirs["pixel_values_videos"].float()).abs().max())
        family = family_of(model)
        on_device = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in theirs.items()}
        if not torch.equal(family.prefill_position_ids(model, prepared.inputs).cpu(),
                           family.prefill_position_ids(model, on_device).cpu()):
            problems.append("M-RoPE ids")
    passed = not problems and diff is not None and diff <= PIXEL_TOLERANCE
    note = "differ: " + ", ".join(problems) if problems else f"qwen-vl-utils {element_text(element)}"
    return Check("inputs", "none", diff, PIXEL_TOLERANCE, passed, note)


def element_text(element: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in element.items() if k != "video")
