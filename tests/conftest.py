"""Shared fixtures: the offline tiny model (loaded once per session) and generated clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the tiny models are latency-bound; more threads only contend

# The checkout the tests run from (benchmarks/, examples/, docs/): the package itself may be
# installed elsewhere (`pip install .`), where prunevid_bench.config.PROJECT_ROOT is not the checkout.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_clip(path: Path, n_frames: int, size: tuple[int, int] = (112, 112), fps: int = 4, seed: int = 0) -> Path:
    """An mp4 with exactly ``n_frames`` frames of seeded noise blocks (PyAV, libx264 or mpeg4)."""
    import av

    rng = np.random.default_rng(seed)
    h, w = size
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "18"}
        except Exception:  # noqa: BLE001 - codec availability differs between FFmpeg builds
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for _ in range(n_frames):
            blocks = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="session")
def clip8(clip_dir) -> Path:
    return write_clip(clip_dir / "clip8.mp4", 8)


@pytest.fixture(scope="session")
def tiny_pipe():
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="float32")  # exact comparisons, also on a GPU machine
    yield pipe
    pipe.remove_stages()


@pytest.fixture(scope="session")
def tiny_qwen2vl_pipe():
    """The second family's tiny model (Qwen2-VL), like ``tiny_pipe``."""
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline("tiny-qwen2vl", device="cpu", dtype="float32")
    yield pipe
    pipe.remove_stages()


def _pipe(name: str):
    from prunevid_bench.pipeline import load_pipeline

    pipe = load_pipeline(name, device="cpu", dtype="float32")
    yield pipe
    pipe.remove_stages()


@pytest.fixture(scope="session")
def tiny_qwen3vl_pipe():
    """The Qwen3-VL family's tiny model (DeepStack on two layers), like ``tiny_pipe``."""
    yield from _pipe("tiny-qwen3vl")


@pytest.fixture(scope="session")
def tiny_qwen3vl_moe_pipe():
    """The Qwen3-VL-MoE family's tiny model, like ``tiny_pipe``."""
    yield from _pipe("tiny-qwen3vl-moe")


@pytest.fixture
def frames8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
