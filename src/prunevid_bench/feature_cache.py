"""A vision-feature cache: per sample, the processor output and the vision tower's output are
computed once and reused by every later run of the same sample (the cells of a sweep), in
memory for the cache's lifetime and optionally on disk as safetensors (a folder that the workers
of ``--launcher local``/``slurm`` share: entries are written whole and renamed into place).

The key is what the features were computed from (``content_id.py``): each input file's content
(a sha256 of its bytes; frames given in memory are hashed), the question or messages, the
sampling policy and every ``video`` setting, the processor's config and chat template, the
model's weights (every weight file's size, mtime, safetensors header and sampled data; the
package version and a hash of the state dict for a built-in model), the dtype and the device
type. A disk entry stores a digest of its tensors, of its prompt and of the request it answers;
each is checked when it is read, and an entry that fails is recomputed with a one-line warning.
Nothing stale or foreign is served.

The folder is created 0700 and entries 0600. A folder, or an entry, owned by another user or
writable by others is refused: whoever can write there chooses the features this run uses, and
so its answers. ``--feature-cache-shared`` accepts such a folder (and writes entries readable by
the group) after saying so.

Timing stays honest: a run that used cached features did not run the vision tower, so its
measured TTFT lacks it. ``Served.account`` reports ``ttft_s`` = the vision time measured when the
features were computed + this run's measured post-vision time, and marks the result
``vision_cached``. Entries are held on the CPU (they would otherwise count in a CUDA run's peak
memory) and moved to the model's device for each run. The decoded frames themselves are not
kept: the processor output is what is reused; a cached ``Clip`` keeps its metadata and a
zero-stride placeholder of the frames' shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunevid_bench.content_id import file_digest, tensors_digest, weights_identity
from prunevid_bench.errors import PruneVidError

FORMAT = 3  # bump when an entry's layout changes: older files then miss instead of misreading
SHARED_RISK = ("anyone who can write to it can change the features, and so the answers, of this run "
               "(entries are still checked against their digests, which catches damage, not a forgery)")


def warn(message: str) -> None:
    """One line on stderr (under the CLI, the run goes on)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Entry:
    """One sample's reusable work, on the CPU."""

    inputs: dict[str, torch.Tensor]  # the processor output
    clips: list[dict[str, Any]]  # Clip fields without the frames, plus their shape
    prompt: str
    policy: str
    request: str  # sha256 of what was asked: the inputs' contents, the question or messages
    video_features: list[torch.Tensor] | None = None  # the tower's output, one [N_i, D] per video
    vision_s: float = 0.0  # the vision time measured when video_features were computed
    deepstack: list[list[torch.Tensor]] | None = None  # per video its DeepStack levels (Qwen3-VL), else None

    def nbytes(self) -> int:
        tensors = list(self.inputs.values()) + list(self.video_features or []) + [t for v in self.deepstack or [] for t in v]
        return sum(t.numel() * t.element_size() for t in tensors)


class FeatureCache:
    """``max_bytes`` bounds the entries held in memory (0: only the sample being run);
    ``directory`` (optional) keeps every complete entry on disk as well; ``shared`` accepts a
    folder and entries that other users can write (see the module docstring)."""

    def __init__(self, max_bytes: int, directory: Path | None = None, shared: bool = False):
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.shared = shared
        if self.directory is not None:
            try:
                self.directory.mkdir(mode=0o777 if shared else 0o700, parents=True, exist_ok=True)
                st = self.directory.stat()
            except OSError as exc:
                raise PruneVidError(f"--feature-cache {directory}: cannot create the folder ({exc.strerror})") from None
            why = foreign(st)
            if why and not shared:
                raise PruneVidError(f"--feature-cache {directory}: the folder is {why}, and whoever can write to it "
                                    "chooses this run's features (so its answers): use a folder of your own, or "
                                    "accept that with --feature-cache-shared")
            if shared:
                warn(f"--feature-cache-shared: {directory}: {SHARED_RISK}")
        self._memory: OrderedDict[str, Entry] = OrderedDict()
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0, "corrupt": 0, "rejected": 0, "write_errors": 0}

    @classmethod
    def from_options(cls, gigabytes: float | None, directory: Path | None, shared: bool = False) -> "FeatureCache | None":
        """The cache a run asked for, or None when neither memory nor disk is wanted."""
        if gigabytes is not None and not 0 <= gigabytes < float("inf"):  # NaN too
            raise PruneVidError(f"--feature-cache-gb must be >= 0, got {gigabytes}")
        if shared and directory is None:
            raise PruneVidError("--feature-cache-shared applies to a --feature-cache folder")
        if not gigabytes and directory is None:
            return None
        return cls(int((gigabytes or 0) * 2**30), directory, shared)

    # ----------------------------------------------------------- preparation
    def prepare(self, pipe, video, question, cfg, messages):
        """``pipe.prepare`` through the cache: a hit skips decoding and the processor."""
        key, request = sample_key(pipe, video, question, cfg, messages)
        entry = self._get(key, request)
        if entry is None:
            self.stats["misses"] += 1
            prepared = pipe._prepare(video, question, cfg, messages)
            if sample_key(pipe, video, question, cfg, messages)[0] != key:  # a file changed while it was read:
                return prepared  # use what was read, keep nothing under a key it may not match
            self._put(key, Entry(
                inputs={k: v.detach().cpu() for k, v in prepared.inputs.items() if isinstance(v, torch.Tensor)},
                clips=[_clip_fields(c) for c in prepared.clips], prompt=prepared.prompt, policy=prepared.policy,
                request=request,
            ), to_disk=False)  # written to disk once the features are known too
        else:
            pipe._check_length(int(entry.inputs["input_ids"].shape[1]), cfg.generation.max_new_tokens)
            prepared = _prepared_from(entry, pipe.device, next(pipe.model.parameters()).dtype)
        prepared.feature_key = key
        return prepared

    # ----------------------------------------------------------- running
    @contextlib.contextmanager
    def serve(self, model, prepared):
        """For one model call: inject the cached video features, or record them on the way."""
        entry = self._memory.get(prepared.feature_key) if prepared.feature_key else None
        served = Served(self, prepared.feature_key, entry)
        if entry is None:
            yield served
            return
        device = prepared.inputs["input_ids"].device
        cached = None if entry.video_features is None else [t.to(device) for t in entry.video_features]
        levels = None if entry.deepstack is None else [[t.to(device) for t in video] for video in entry.deepstack]
        with video_features_patch(model, cached, served.captured, levels):
            yield served

    # ----------------------------------------------------------- storage
    def _get(self, key: str, request: str) -> Entry | None:
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            self.stats["hits"] += 1
            return entry
        entry = self._read(key, request)
        if entry is not None:
            self.stats["disk_hits"] += 1
            self._put(key, entry, to_disk=False)
        return entry

    def _put(self, key: str, entry: Entry, to_disk: bool) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        if to_disk:
            self._write(key, entry)
        # Over the bound, the most recently used entry before the newest goes: a sweep asks for the
        # samples in the same order in every cell, so the oldest entries are the next ones needed
        # (dropping the least recently used would miss every time once the samples outgrow the
        # bound). The newest stays whatever its size (even with a bound of 0): its run has yet to
        # use it.
        held = sum(e.nbytes() for e in self._memory.values())
        while held > self.max_bytes and len(self._memory) > 1:
            newest = self._memory.popitem(last=True)
            held -= self._memory.popitem(last=True)[1].nbytes()
            self._memory[newest[0]] = newest[1]

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _write(self, key: str, entry: Entry) -> None:
        if self.directory is None or entry.video_features is None:
            return
        from safetensors.torch import save_file

        tensors = {f"input.{k}": v.contiguous() for k, v in entry.inputs.items()}
        tensors.update({f"video.{i}": t.contiguous() for i, t in enumerate(entry.video_features)})
        tensors.update({f"video.{i}.deepstack.{j}": t.contiguous() for i, lv in enumerate(entry.deepstack or []) for j, t in enumerate(lv)})
        meta = {"format": str(FORMAT), "key": key, "clips": json.dumps(entry.clips), "prompt": entry.prompt,
                "policy": entry.policy, "vision_s": repr(entry.vision_s), "n_videos": str(len(entry.video_features)),
                "deepstack_levels": str(len(entry.deepstack[0]) if entry.deepstack else 0),
                "request": entry.request, "prompt_sha256": _text_digest(entry.prompt),
                "tensors_sha256": tensors_digest(tensors)}
        tmp = None
        try:  # a unique name per writer (workers on several hosts may share the folder)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)  # mode 0600
            os.close(fd)
            save_file(tensors, tmp, metadata=meta)
            if self.shared:
                os.chmod(tmp, 0o664)
            os.replace(tmp, self._path(key))  # readers never see half a file
        except OSError:  # a full or read-only disk costs the reuse, not the sample
            self.stats["write_errors"] += 1
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _read(self, key: str, request: str) -> Entry | None:
        if self.directory is None or not os.path.lexists(self._path(key)):
            return None
        path = self._path(key)
        from safetensors import safe_open

        why = foreign(os.lstat(path))
        if why and not self.shared:
            return self._reject(path, f"{why}; it is not used (delete it, or accept it with --feature-cache-shared)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != str(FORMAT):
                    raise ValueError("an entry of another format")
                names = list(f.keys())
                tensors = {n: f.get_tensor(n) for n in names}
        except Exception:  # noqa: BLE001 - any damage (truncated, foreign, half-written): recompute
            self.stats["corrupt"] += 1
            return None
        try:
            entry = Entry({n[len("input."):]: t for n, t in tensors.items() if n.startswith("input.")},
                          json.loads(meta["clips"]), meta["prompt"], meta["policy"], meta["request"],
                          [tensors[f"video.{i}"] for i in range(int(meta["n_videos"]))], float(meta["vision_s"]))
            n = int(meta["deepstack_levels"])  # per video its levels (Qwen3-VL), or None
            entry.deepstack = [[tensors[f"video.{i}.deepstack.{j}"] for j in range(n)] for i in range(len(entry.video_features))] if n else None
        except (KeyError, ValueError, TypeError):
            return self._reject(path, "its metadata is incomplete; recomputed")
        checks = (("key", meta.get("key") == key), ("request", entry.request == request),
                  ("prompt", meta.get("prompt_sha256") == _text_digest(entry.prompt)),
                  ("tensors", meta.get("tensors_sha256") == tensors_digest(tensors)))
        failed = [name for name, ok in checks if not ok]
        if failed:
            return self._reject(path, f"its {' and '.join(failed)} digest does not match; recomputed")
        return entry

    def _reject(self, path: Path, why: str) -> None:
        self.stats["rejected"] += 1
        warn(f"feature cache entry {path}: {why}")
        return None


def foreign(st: os.stat_result) -> str | None:
    """Why a cache folder or entry cannot be trusted: another owner, writable by others, a link."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Served:
    """What one model call got from the cache; ``account`` turns the engine's output into the
    honest one."""

    def __init__(self, cache: FeatureCache, key: str | None, entry: Entry | None):
        self.cache, self.key, self.entry = cache, key, entry
        self.hit = entry is not None and entry.video_features is not None
        self.captured: list = []  # filled by the patch on a miss: the tower's output

    def account(self, out):
        """EngineOutput -> EngineOutput. On a hit, TTFT = the recorded vision time + this run's
        measured TTFT (which did not include the tower). On a miss, remember the features and
        their measured vision time (and write the entry to disk)."""
        if self.entry is None:
            return out
        if self.hit:
            vision = self.entry.vision_s
            return dataclasses.replace(out, ttft_s=vision + out.ttft_s, vision_encoder_s=vision, prefill_s=out.ttft_s)
        if self.captured:
            features, levels = self.captured[0]
            self.entry.video_features = [t.detach().cpu() for t in features]
            self.entry.deepstack = levels and [[t.detach().cpu() for t in video] for video in levels]
            self.entry.vision_s = out.vision_encoder_s
            self.cache._put(self.key, self.entry, to_disk=True)
        return out


# ----------------------------------------------------------------------------- model-specific
def video_features_patch(model, cached: list[torch.Tensor] | None, captured: list, levels: list | None = None):
    """For the duration of one call (a ``with`` block), wrap the instance's
    ``get_video_features`` (on the family's base model). With ``cached`` it returns them as the
    tower's output (``pooler_output``: one tensor per video) without running the tower; without,
    it runs the tower and appends its per-video output to ``captured`` (and its DeepStack levels
    per video, or None; ``levels``: the cached ones, given back with ``cached``). Wraps whatever is bound
    on the instance now (e.g. the PruneVid patch's own wrapper) and restores it afterwards."""
    from prunevid_bench.families import family_of
    from prunevid_bench.overrides import overriding

    family = family_of(model)
    base, merge = family.base(model), family.geometry(model.config).merge
    previous = base.get_video_features

    def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
        if cached is not None:
            sizes = (video_grid_thw.prod(-1) // merge**2).tolist()
            if sizes != [int(t.shape[0]) for t in cached]:
                raise RuntimeError("cached video features do not match the prompt's video grids")
            return family.vision_output(tuple(cached), levels)
        out = previous(pixel_values_videos, video_grid_thw, **kwargs)
        stacked = getattr(out, "deepstack_features", None)  # per level, per video
        captured.append((tuple(out.pooler_output), None if stacked is None else [list(v) for v in zip(*stacked)]))
        return out

    return overriding(base, "get_video_features", get_video_features)


# ----------------------------------------------------------------------------- keys and entries
def sample_key(pipe, video, question, cfg, messages) -> tuple[str, str]:
    """sha256 over everything the processor output and the tower's output depend on (the key),
    and over what was asked alone (the request an entry must answer)."""
    from prunevid_bench.models.loading import BUILTIN

    model = pipe.model
    vp = pipe.processor.video_processor
    inputs = _describe({"video": video, "question": question, "messages": messages})
    request = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=repr).encode("utf-8", "surrogatepass")).hexdigest()
    payload = {
        "format": FORMAT,
        "inputs": request,
        "policy": pipe.video_policy(cfg),
        "video": dataclasses.asdict(cfg.video),
        "processor": vp.to_dict() if hasattr(vp, "to_dict") else repr(vp),
        "image_processor": _to_dict(getattr(pipe.processor, "image_processor", None)),
        "chat_template": getattr(pipe.processor, "chat_template", None),
        "model": pipe.model_name,
        "model_path": getattr(model.config, "_name_or_path", None),
        "revision": getattr(model.config, "_commit_hash", None),
        "weights": weights_identity(model, pipe.model_name, builtin=pipe.model_name in BUILTIN),
        "dtype": str(next(model.parameters()).dtype),
        "device_type": pipe.device.type,
    }
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32], request


def _to_dict(obj) -> Any:
    return None if obj is None else (obj.to_dict() if hasattr(obj, "to_dict") else repr(obj))


def _describe(obj: Any) -> Any:
    """JSON-able identity of an input: files by their path and content, arrays and images by a hash."""
    from prunevid_bench.video import Clip

    path = str(obj)[7:] if isinstance(obj, str) and obj.startswith("file://") else obj
    if isinstance(path, (str, Path)) and str(path) and os.path.isfile(path):
        return {"file": os.path.abspath(path), "sha256": file_digest(path)}
    if isinstance(obj, Clip):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "frames"}
        return {"clip": _describe(obj.frames), **{k: _describe(v) for k, v in fields.items()}}
    if isinstance(obj, np.ndarray):
        return {"array": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest(), "shape": obj.shape,
                "dtype": str(obj.dtype)}
    if isinstance(obj, torch.Tensor):
        return _describe(obj.detach().cpu().numpy())
    if hasattr(obj, "tobytes") and hasattr(obj, "size") and hasattr(obj, "mode"):  # a PIL image
        return {"image": hashlib.sha256(obj.tobytes()).hexdigest(), "size": obj.size, "mode": obj.mode}
    if isinstance(obj, dict):
        return {str(k): _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_describe(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else repr(obj)


def _clip_fields(clip) -> dict[str, Any]:
    fields = {f.name: getattr(clip, f.name) for f in dataclasses.fields(clip) if f.name != "frames"}
    fields["frames_shape"] = list(clip.frames.shape)
    return json.loads(json.dumps(fields, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def _prepared_from(entry: Entry, device, dtype):
    from prunevid_bench.pipeline import Prepared
    from prunevid_bench.video import Clip

    clips = []
    for fields in entry.clips:
        fields = dict(fields)
        shape = fields.pop("frames_shape")
        frames = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=np.uint8), shape)  # metadata only
        clips.append(Clip(frames=frames, **fields))
    inputs = {}
    for key, value in entry.inputs.items():
        value = value.to(device)
        if value.is_floating_point() and key in ("pixel_values_videos", "pixel_values"):
            value = value.to(dtype)
        inputs[key] = value
    return Prepared(inputs, clips, entry.prompt, entry.policy)
