"""What each video policy feeds the model for a 16-frame request on a 1080p clip.

Frames, frame size and visual tokens under ``qwen``, ``lmms-eval`` and ``processor``, with a
processor configured with Qwen2.5-VL-7B-Instruct's pixel bounds (min 3,136 / max 12,845,056),
through the same ``Pipeline.prepare`` a run uses (the tiny model stands in for the 7B: the
counts depend only on the processor's patch geometry, which is the same).

    python benchmarks/video_policies.py [--frames 48] [--fps 24]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def write_1080p(path: Path, frames: int, fps: int) -> Path:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        for _ in range(frames):
            blocks = rng.integers(0, 255, (1080 // 40 + 1, 1920 // 40 + 1, 3), dtype=np.uint8)
            image = np.kron(blocks, np.ones((40, 40, 1), dtype=np.uint8))[:1080, :1920]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48, help="frames in the generated clip")
    parser.add_argument("--fps", type=int, default=24)
    args = parser.parse_args()

    from prunevid_bench.config import build_config
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.models.tiny import build_processor, build_tiny_model
    from prunevid_bench.pipeline import Pipeline

    processor = build_processor(min_pixels=3136, max_pixels=12845056)
    model = build_tiny_model()
    model.config.get_text_config().max_position_embeddings = 128000  # the 7B's
    pipe = Pipeline(LoadedModel(model, processor, "7B bounds"), build_config())
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_1080p(Path(tmp) / "1080p.mp4", args.frames, args.fps)
        print(f"clip: 1920x1080, {args.frames} frames at {args.fps} fps; request: 16 frames (lmms-eval: its default 32 unless told)")
        print("| policy | frames | first indices | frame size (h x w) | visual tokens per step | visual tokens |")
        print("|---|---:|---|---:|---:|---:|")
        for policy, frames in (("qwen", 16), ("lmms-eval", 16), ("lmms-eval", None), ("processor", 16)):
            cfg = build_config(overrides={"video.policy": policy, "video.num_frames": frames})
            prepared = pipe.prepare(clip, "Q", cfg)
            t, h, w = prepared.inputs["video_grid_thw"][0].tolist()
            c = prepared.clip
            label = policy if frames else f"{policy} (default frames)"
            print(f"| {label} | {c.num_frames} | {c.indices[:6]} | {c.frame_size[0]} x {c.frame_size[1]} | {h * w // 4} | {t * h * w // 4} |")
        # Qwen3-VL: the same qwen policy with its 32-pixel factor (qwen-vl-utils' image_patch_size=16)
        from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_processor, build_tiny_qwen3vl_model

        model3 = build_tiny_qwen3vl_model()
        model3.config.get_text_config().max_position_embeddings = 128000
        pipe3 = Pipeline(LoadedModel(model3, build_qwen3vl_processor(), "Qwen3-VL"), build_config())
        prepared = pipe3.prepare(clip, "Q", build_config(overrides={"video.policy": "qwen", "video.num_frames": 16}))
        t, h, w = prepared.inputs["video_grid_thw"][0].tolist()
        c = prepared.clip
        print(f"| qwen (Qwen3-VL) | {c.num_frames} | {c.indices[:6]} | {c.frame_size[0]} x {c.frame_size[1]} | {h * w // 4} | {t * h * w // 4} |")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("it reports token counts, no ratios of time")
    main()
