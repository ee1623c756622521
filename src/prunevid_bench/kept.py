"""Which tokens each method kept, as grid coordinates, and a picture of it.

``kept_record(handle)`` -> per method (in the order they ran), per video: the grid ``[T, H', W']``
of LLM tokens, ``kept`` the (t, h, w) of every token the method left (a merged token's is its
representative's), and ``origin`` the row each grid token went into after that method (-1:
dropped), so tokens sharing a row were merged into one. ``--save-kept`` writes it to the record
(``kept``); ``--show-kept`` draws it (``draw_kept``): the sampled frames, one per temporal step,
with the kept patches outlined and each merged group shaded alike, one row per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def layer_origins(videos: list, kept_visual: torch.Tensor, merged_into: torch.Tensor | None) -> list[tuple]:
    """After an LLM-layer method: each video's (grid index [M'], origin [T * N]) from the
    videos as they entered the LLM, the kept visual slots [V'] (over all videos' slots, in
    order) and the kept slot each slot was merged into (or None: a drop)."""
    n_slots = sum(v.index.numel() for v in videos)
    device = kept_visual.device
    to_kept = torch.full((n_slots,), -1, dtype=torch.long, device=device)
    to_kept[kept_visual] = torch.arange(kept_visual.numel(), device=device)
    if merged_into is not None:
        to_kept = merged_into.to(device).clone()
    out, start, kept_before = [], 0, 0
    for video in videos:
        n = video.index.numel()
        rows = to_kept[start : start + n]
        mine = kept_visual[(kept_visual >= start) & (kept_visual < start + n)] - start
        local = torch.where(rows >= 0, rows - kept_before, rows)
        origin = video.origin.to(device)
        out.append((video.index.to(device)[mine], torch.where(origin >= 0, local[origin.clamp(min=0)], origin)))
        start, kept_before = start + n, kept_before + mine.numel()
    return out


def kept_record(handle) -> dict:
    """Per method, per video: ``{"grid": [T, H', W'], "kept": [[t, h, w], ...], "origin": [...]}``."""
    st = handle.state
    grids = st.video_grid_thw.tolist() if st.video_grid_thw is not None else []
    out = {}
    for name, videos in st.kept_by_method.items():
        entries = []
        for (index, origin), (t, h, w) in zip(videos, grids):
            hh, ww = h // handle.merge, w // handle.merge
            index = index.cpu()
            coords = torch.stack([index // (hh * ww), index % (hh * ww) // ww, index % ww], dim=1)
            entries.append({"grid": [t, hh, ww], "kept": coords.tolist(), "origin": origin.cpu().tolist()})
        out[name] = entries
    return out


def draw_kept(kept: dict, frames: np.ndarray, path: Path, temporal: int = 2, cell: int = 24) -> Path:
    """The first video of ``kept`` (``kept_record``) over its sampled ``frames`` [F, H, W, 3]: one
    row per method, one column per temporal step (its first frame, resized to H' x W' cells of
    ``cell`` px). Dropped patches are dimmed, kept ones outlined, each merged group (several grid
    tokens in one row) tinted with one colour."""
    from PIL import Image, ImageDraw

    names = list(kept)
    t, hh, ww = kept[names[0]][0]["grid"]
    width, height, pad = ww * cell, hh * cell, 4
    canvas = Image.new("RGB", (t * (width + pad) + pad, len(names) * (height + pad) + pad), (255, 255, 255))
    palette = np.random.default_rng(0).integers(40, 255, (max(1, t * hh * ww), 3))
    for r, name in enumerate(names):
        video = kept[name][0]
        origin = np.array(video["origin"]).reshape(t, hh, ww)
        reps = {tuple(c) for c in video["kept"]}
        members = np.bincount(origin[origin >= 0].ravel(), minlength=1)
        for step in range(t):
            frame = frames[min(step * temporal, len(frames) - 1)]
            tile = np.asarray(Image.fromarray(frame).resize((width, height))).astype(np.float32)
            for i in range(hh):
                for j in range(ww):
                    box = (slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell))
                    row = origin[step, i, j]
                    if row < 0:
                        tile[box] *= 0.25
                    elif members[row] > 1:
                        tile[box] = 0.55 * tile[box] + 0.45 * palette[row]
            image = Image.fromarray(tile.clip(0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for (ts, i, j) in reps:
                if ts == step:
                    draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], outline=(255, 220, 0), width=2)
            canvas.paste(image, (pad + step * (width + pad), pad + r * (height + pad)))
    path = Path(path)
    canvas.save(path)
    return path
