"""Content identities for the vision-feature cache (``feature_cache.py``): what a file or a
model's weights *are*, not where they sit.

- A file (a video, an image) is the sha256 of its bytes. Hashing is memoised in this process by
  (path, size, mtime, inode, device, ctime): only an accelerator, never the identity (a same-size
  swap with its mtime kept, as ``cp -p``, ``rsync -a`` or ``tar`` do, changes the ctime, so it is
  hashed again). docs/benchmarks.md gives the cost per gigabyte.
- A checkpoint's weights are, per weight file of its folder: its name, size and mtime, the sha256
  of its safetensors header (names, dtypes, shapes, offsets) and a sha256 of 16 blocks of 64 KiB
  spread over its data (a retrained checkpoint keeps its header byte for byte; its values change
  everywhere, so the sampled blocks change too, even when the mtime was kept).
- A built-in model (``tiny``, ``toy``...) is the package version and the sha256 of its loaded
  state dict (they are small: the ``toy`` weights hash in milliseconds); so is a model whose
  folder cannot be found (built in code).
"""

from __future__ import annotations

import hashlib
import os
import struct
import weakref
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SAMPLED_BLOCKS, BLOCK = 16, 64 * 1024
_CHUNK = 4 * 2**20

_file_digests: dict[tuple, str] = {}
_model_ids: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised by path, size, mtime, inode, device and ctime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    memo = (real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)
    digest = _file_digests.get(memo)
    if digest is None:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = _file_digests[memo] = h.hexdigest()
    return digest


def weight_file_identity(path: Path) -> dict[str, Any]:
    """A weight file's identity: size, mtime, the safetensors header's hash and sampled blocks."""
    st = os.stat(path)
    size = st.st_size
    with open(path, "rb") as f:
        header = b""
        data_start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length <= size:
                header = f.read(length)
                data_start = 8 + length
        blocks = hashlib.sha256()
        span = max(size - data_start - BLOCK, 0)
        for i in range(SAMPLED_BLOCKS):
            f.seek(data_start + span * i // max(SAMPLED_BLOCKS - 1, 1))
            blocks.update(f.read(BLOCK))
    return {"name": path.name, "size": size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": hashlib.sha256(header).hexdigest(), "sampled_sha256": blocks.hexdigest()}


def weights_identity(model, name: str, builtin: bool) -> dict[str, Any]:
    """The identity of the weights ``model`` was loaded from (memoised per model object)."""
    known = _model_ids.get(model)
    if known is None:
        known = _builtin_identity(model) if builtin else _checkpoint_identity(model, name)
        _model_ids[model] = known
    return known


def _builtin_identity(model) -> dict[str, Any]:
    from prunevid_bench import __version__

    return {"package": __version__, "state_dict_sha256": tensors_digest(model.state_dict())}


def tensors_digest(tensors) -> str:
    """sha256 over named tensors: each one's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checkpoint_identity(model, name: str) -> dict[str, Any]:
    """Every weight file of the checkpoint's folder (a local folder, or the Hub snapshot the
    model came from); a model with no folder to find (built in code, or its folder gone) is
    hashed whole, as a built-in one."""
    folder = checkpoint_folder(getattr(model.config, "_name_or_path", None) or name)
    if folder is None:
        return _builtin_identity(model)
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {"folder": str(folder), "files": [weight_file_identity(p) for p in files]}


def checkpoint_folder(name: str) -> Path | None:
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    try:  # a Hub id: the snapshot folder in the local cache (files there link to content-named blobs)
        from transformers.utils import cached_file

        config = cached_file(name, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - not cached, or not a Hub id: the revision stands alone
        return None
    return Path(config).parent if config else None
