"""The ``qwen`` and ``lmms-eval`` video policies against qwen-vl-utils itself (0.0.14, installed
as a test dependency): the same frames, sizes, pixels, grids, time steps and M-RoPE ids."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from prunevid_bench.errors import PruneVidError
from prunevid_bench.video import VideoRequest, clip_from_frames, load_clip, smart_resize
from tests.conftest import write_clip

from prunevid_bench.decoders import installed  # noqa: E402

# qwen-vl-utils decodes with decord or torchcodec (an optional extra here): the test needs one.
READER = next((name for name in ("decord", "torchcodec") if installed(name)), None)
if READER is None:
    pytest.skip("qwen-vl-utils needs decord or torchcodec to read videos", allow_module_level=True)
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", READER)
vision_process = pytest.importorskip("qwen_vl_utils.vision_process")

BOUNDS_7B = (3136, 12845056)  # Qwen2.5-VL-7B-Instruct's processor: min / max pixels
SHAPES = {"wide": (720, 1280), "tall": (640, 360), "small": (48, 64)}
REQUESTS = [{"nframes": 8}, {"nframes": 15}, {"nframes": 16}, {"nframes": 32}, {"fps": 2.0}]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy-clips")
    return {name: write_clip(folder / f"{name}.mp4", 48, size=size, fps=8, seed=3) for name, size in SHAPES.items()}


def theirs(path, **element):
    """qwen-vl-utils' own output: frames [T, C, H, W] float, metadata, sample fps."""
    (video, metadata), fps = vision_process.fetch_video(
        {"video": str(path), **element}, return_video_sample_fps=True, return_video_metadata=True
    )
    return video, metadata, fps


def ours_request(policy: str, element: dict) -> VideoRequest:
    return VideoRequest(policy, num_frames=element.get("nframes"), fps=element.get("fps"),
                        min_pixels=element.get("min_pixels"), max_pixels=element.get("max_pixels"))


def assert_same_clip(clip, video, metadata, fps):
    assert clip.indices == list(metadata["frames_indices"])
    assert clip.frame_size == list(video.shape[-2:])
    assert clip.sampled_fps == pytest.approx(fps, rel=1e-12)
    assert torch.equal(torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float(), video)  # pixel for pixel


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("element", REQUESTS, ids=lambda e: "-".join(f"{k}{v}" for k, v in e.items()))
def test_qwen_policy_equals_fetch_video(clips, shape, element):
    clip = load_clip(clips[shape], request=ours_request("qwen", element))
    assert_same_clip(clip, *theirs(clips[shape], **element))
    assert clip.num_frames % 2 == 0 and clip.policy == "qwen" and clip.resized


def test_qwen_policy_frame_rules(clips):
    """The issue's cases, read off qwen-vl-utils: linspace frames, 15 -> 16, 1280x720 -> 720 tokens/step."""
    assert load_clip(clips["wide"], request=VideoRequest("qwen", num_frames=16)).indices[:5] == [0, 3, 6, 9, 13]
    assert load_clip(clips["wide"], request=VideoRequest("qwen", num_frames=15)).num_frames == 16
    clip = load_clip(clips["wide"], request=VideoRequest("qwen", num_frames=16))
    assert clip.frame_size == [560, 1008] and 560 * 1008 // 28**2 == 720
    fps_clip = load_clip(clips["wide"], request=VideoRequest("qwen", num_frames=None, fps=2.0))  # 6 s at 2 fps
    assert fps_clip.num_frames == 12


def test_qwen_policy_overrides_and_window(clips):
    element = {"nframes": 8, "min_pixels": 64 * 28 * 28, "max_pixels": 200 * 28 * 28}
    assert_same_clip(load_clip(clips["wide"], request=ours_request("qwen", element)), *theirs(clips["wide"], **element))
    total = {"nframes": 16, "total_pixels": 16 * 100 * 28 * 28}  # a budget of 200 tokens per temporal step
    request = VideoRequest("qwen", num_frames=16, total_pixels=total["total_pixels"])
    assert_same_clip(load_clip(clips["wide"], request=request), *theirs(clips["wide"], **total))
    window = load_clip(clips["tall"], request=VideoRequest("qwen", num_frames=6), start=1.3, end=4.2)
    assert_same_clip(window, *theirs(clips["tall"], nframes=6, video_start=1.3, video_end=4.2))


def test_lmms_eval_policy_equals_what_lmms_eval_asks_of_qwen_vl_utils(clips, tmp_path):
    # lmms-eval 0.7.3's qwen2_5_vl chat model: nframes = min(32, frames in the file) floored to
    # even, min_pixels 256*28*28, max_pixels 1605632 (its defaults), passed to fetch_video.
    lmms = {"min_pixels": 256 * 28 * 28, "max_pixels": 1605632}
    for shape in SHAPES:
        clip = load_clip(clips[shape], request=VideoRequest("lmms-eval", num_frames=None))
        assert_same_clip(clip, *theirs(clips[shape], nframes=32, **lmms))
    short = write_clip(tmp_path / "short.mp4", 13, size=(64, 64), fps=8)
    clip = load_clip(short, request=VideoRequest("lmms-eval", num_frames=None))
    assert clip.num_frames == 12  # min(32, 13) floored to even
    assert_same_clip(clip, *theirs(short, nframes=12, **lmms))


@pytest.mark.parametrize("element", [{"nframes": 64}, {"nframes": 1}])
def test_requests_qwen_vl_utils_refuses_are_refused_in_one_line(clips, element):
    with pytest.raises(ValueError):  # its frame-count rule (fetch_video would retry with torchvision)
        vision_process.smart_nframes(element, total_frames=48, video_fps=8.0)
    with pytest.raises(PruneVidError, match="cannot be sampled from a clip of 48 frames"):
        load_clip(clips["small"], request=ours_request("qwen", element))


def test_smart_resize_equals_qwen_vl_utils_on_many_shapes():
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = (int(x) for x in rng.integers(20, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 300)) * 784
        hi = lo + int(rng.integers(0, 3000)) * 784
        assert smart_resize(h, w, 28, lo, hi) == vision_process.smart_resize(h, w, 28, lo, hi)
    with pytest.raises(PruneVidError, match="aspect ratio"):
        smart_resize(16, 4096, 28, 3136, 12845056)


def test_frames_in_memory_are_padded_to_whole_steps():
    frames = np.random.default_rng(1).integers(0, 255, (5, 60, 80, 3), dtype=np.uint8)
    clip = clip_from_frames(list(frames), VideoRequest("processor"))
    assert clip.num_frames == 6 and clip.indices == [0, 1, 2, 3, 4, 4] and clip.sampled_fps == 2.0
    assert np.array_equal(clip.frames[5], frames[4])
    sized = clip_from_frames(frames, VideoRequest("qwen"), fps=4.0)
    assert sized.frame_size == list(smart_resize(60, 80, 28, 128 * 784, 768 * 784)) and sized.sampled_fps == 4.0


# ------------------------------------------------------------------ through the processor and M-RoPE
@pytest.fixture(scope="module")
def pipe_7b_bounds():
    """The tiny model behind a processor with the 7B checkpoint's pixel bounds (policy auto = qwen)."""
    from prunevid_bench.config import build_config
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.models.tiny import build_processor, build_tiny_model
    from prunevid_bench.pipeline import Pipeline

    processor = build_processor(min_pixels=BOUNDS_7B[0], max_pixels=BOUNDS_7B[1])
    model = build_tiny_model()
    model.config.get_text_config().max_position_embeddings = 128000  # the 7B's: 720p clips are long prompts
    return Pipeline(LoadedModel(model, processor, "tiny-7b-bounds"), build_config())


@pytest.mark.parametrize("shape,element", [("wide", {"nframes": 16}), ("tall", {"nframes": 15}), ("small", {"fps": 2.0}),
                                           ("wide", {"nframes": 8})])
def test_prepared_prompt_equals_qwen_vl_utils_through_the_processor(pipe_7b_bounds, clips, shape, element):
    from prunevid_bench.config import build_config
    from prunevid_bench.engine import prefill_position_ids

    pipe = pipe_7b_bounds
    over = {"video.num_frames": element.get("nframes"), "video.fps": element.get("fps")}
    cfg = build_config(overrides=over)
    prepared = pipe.prepare(clips[shape], "What happens?", cfg)
    assert prepared.policy == "qwen"

    video, metadata, _ = theirs(clips[shape], **element)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = pipe.processor(text=[text], videos=[video], video_metadata=[metadata], return_tensors="pt")

    assert torch.equal(prepared.inputs["input_ids"], reference["input_ids"])
    assert prepared.inputs["video_grid_thw"].tolist() == reference["video_grid_thw"].tolist()
    assert torch.equal(torch.as_tensor(prepared.inputs["second_per_grid_ts"]), torch.as_tensor(reference["second_per_grid_ts"]))
    torch.testing.assert_close(prepared.inputs["pixel_values_videos"], reference["pixel_values_videos"], rtol=0, atol=1e-5)
    assert torch.equal(prefill_position_ids(pipe.model, prepared.inputs), prefill_position_ids(pipe.model, reference))


def test_processor_policy_keeps_the_checkpoint_bounds(pipe_7b_bounds, clips):
    """The old behaviour, selectable: bin centres and the processor's own (7B) resize."""
    from prunevid_bench.config import build_config

    cfg = build_config(overrides={"video.policy": "processor", "video.num_frames": 16})
    prepared = pipe_7b_bounds.prepare(clips["wide"], "Q", cfg)
    assert prepared.clip.indices[:4] == [1, 4, 7, 10] and prepared.clip.frame_size == [720, 1280]
    t, h, w = prepared.inputs["video_grid_thw"][0].tolist()
    assert (t, h * w // 4) == (8, 26 * 46)  # 720x1280 -> 728x1288: 1196 tokens per step
