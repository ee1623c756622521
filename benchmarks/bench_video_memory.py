"""Peak memory of decoding 16 frames from a long clip: decord, the PyAV fallback, the preflight probe.

    PYTHONPATH=src python benchmarks/bench_video_memory.py                 # 1500 frames of 640x480
    PYTHONPATH=src python benchmarks/bench_video_memory.py --frames 300 --clip /tmp/c.mp4

Each measurement runs in its own Python process, so one backend's buffers never count against
the other: the child imports what it needs, records its resident set (RSS), resets the kernel's
high-water mark (``/proc/self/clear_refs``), decodes, and reports the peak (``VmHWM``). The
preflight is measured twice: as it runs normally (decord) and with decord unavailable (PyAV).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "decord": "load_clip(path, num_frames=16, backend='decord')",
    "pyav": "load_clip(path, num_frames=16, backend='pyav')",
    "preflight": "check_video(path)",
    "preflight-pyav": "check_video(path) with decord unavailable",
}


def write_clip(path: Path, frames: int, width: int, height: int, fps: int) -> None:
    """A moving gradient with a bouncing square: cheap to encode, every frame different."""
    import av
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[..., 0] = (xx + 3 * i) % 256
            img[..., 1] = (yy + 2 * i) % 256
            img[..., 2] = 128
            side = max(1, min(64, width // 4, height // 4))  # the square fits any frame size
            x, y = (7 * i) % max(1, width - side), (5 * i) % max(1, height - side)
            img[y : y + side, x : x + side] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, path: str) -> None:
    """Runs in a fresh interpreter: one decode, then print its memory figures as JSON."""
    if mode == "preflight-pyav":
        sys.modules["decord"] = None  # import decord now fails, as when it is not installed
    import numpy  # noqa: F401  (imported before the baseline, as by any caller)

    from prunevid_bench import video

    if mode in ("decord", "pyav"):
        __import__("decord" if mode == "decord" else "av")
    else:
        import av  # noqa: F401
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if mode in ("decord", "pyav"):
        clip = video.load_clip(path, num_frames=16, backend=mode)
        shape, total = list(clip.frames.shape), clip.total_frames
    else:
        video.check_video(path)
        shape, total = None, None
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "rss_before_kib": before, "peak_kib": rss_kib("VmHWM"),
                      "seconds": seconds, "frames_shape": shape, "total_frames": total}))


def measure(mode: str, clip: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(clip)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr}")
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--clip", type=Path, help="reuse (or write) the clip here instead of a temporary file")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import av
    import decord
    import numpy

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or Path(tmp) / "long.mp4"
        if not clip.is_file():
            write_clip(clip, args.frames, args.width, args.height, args.fps)
        print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()}")
        print(f"python {platform.python_version()} | numpy {numpy.__version__} | av {av.__version__} "
              f"| decord {decord.__version__}")
        print(f"clip: {args.frames} frames of {args.width}x{args.height} at {args.fps} fps, "
              f"{clip.stat().st_size / 2**20:.1f} MiB; 16 frames sampled")
        print(f"one decoded frame is {args.width * args.height * 3 / 2**20:.2f} MiB; "
              f"all of them {args.frames * args.width * args.height * 3 / 2**20:.0f} MiB")
        results = {mode: measure(mode, clip) for mode in MODES}
    for mode, r in results.items():
        peak, before = r["peak_kib"] / 1024, r["rss_before_kib"] / 1024
        print(f"{mode:15s} peak RSS {peak:7.1f} MiB  (+{peak - before:6.1f} over {before:.1f} after imports)  "
              f"{r['seconds']:.2f} s  -- {MODES[mode]}")
    ratio = results["pyav"]["peak_kib"] / results["decord"]["peak_kib"]
    print(f"pyav / decord peak RSS: {ratio:.2f}x")


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its ratio is of peak memory, its times wall-clock")
    main()
