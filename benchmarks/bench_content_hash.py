"""What the feature cache's content keys cost (``prunevid_bench.content_id``): hashing a long
video's bytes (once per file per process; later keys hit the memo), a checkpoint folder's
weight identity, a built-in model's state-dict hash, and one whole sample key.

    PYTHONPATH=src python benchmarks/bench_content_hash.py [--mb 1024]

The "long video" is a file of ``--mb`` MiB of random bytes: sha256 costs the same per byte
whatever the bytes are (an hour of 1080p H.264 at 2-3 Mbit/s is 0.9-1.4 GB). It is written
first, so it is read from the page cache: a cold disk adds its read time, which decoding the
video pays anyway. Wall and CPU time of this process are both given.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def timed(fn, repeat: int = 1):
    """(median wall s, median CPU s, result) of ``repeat`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the long video stand-in, MiB")
    args = parser.parse_args()

    from prunevid_bench import content_id
    from prunevid_bench.models.tiny import build_tiny
    from prunevid_bench.toy.model import ASSET_DIR

    print(f"machine: {platform.platform()} | {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "long.mp4"
        with open(video, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(2**20))
        wall, cpu, _ = timed(lambda: content_id.file_digest(video))
        print(f"long video, {args.mb} MiB: first hash {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"({args.mb / 1024 / wall:.2f} GiB/s wall)")
        wall, cpu, _ = timed(lambda: content_id.file_digest(video), repeat=1000)
        print(f"  later keys of the same file (memo hit: stat + lookup): {wall * 1e6:.0f} us wall, {cpu * 1e6:.0f} us CPU")

    files = sorted(ASSET_DIR.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files) / 2**20
    wall, cpu, _ = timed(lambda: [content_id.weight_file_identity(p) for p in files], repeat=20)
    print(f"checkpoint folder ({len(files)} weight file, {size:.1f} MiB): {wall * 1e3:.2f} ms wall, {cpu * 1e3:.2f} ms CPU "
          "(header + 16 x 64 KiB sampled: independent of the checkpoint's size)")
    model, _ = build_tiny()
    wall, cpu, _ = timed(lambda: content_id.tensors_digest(model.state_dict()), repeat=5)
    params = sum(p.numel() for p in model.parameters())
    print(f"built-in 'tiny' state dict ({params / 1e6:.2f} M parameters): {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU "
          "(once per loaded model)")

    from prunevid_bench.feature_cache import sample_key
    from prunevid_bench.pipeline import load_pipeline
    from prunevid_bench.toy.world import generate_dataset

    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        video = next(generate_dataset(Path(tmp), 1, seed=0).parent.glob("**/*.mp4"))
        first, _, _ = timed(lambda: sample_key(pipe, str(video), "Q", pipe.config, None))
        wall, cpu, _ = timed(lambda: sample_key(pipe, str(video), "Q", pipe.config, None), repeat=50)
    print(f"one sample key (tiny, a toy video): first {first * 1e3:.1f} ms (hashes the weights and the file), "
          f"then {wall * 1e3:.2f} ms wall, {cpu * 1e3:.2f} ms CPU per key")


if __name__ == "__main__":
    main()
