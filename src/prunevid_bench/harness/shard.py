"""A dataset run split over processes: which rank this process is, and what it takes.

Launched by ``torchrun`` or ``accelerate launch``, each process reads ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` from its environment (both launchers set them). Rank ``r`` of ``n`` takes every
n-th selected question starting at ``r`` (the questions in file order, as lmms-eval hands out
documents), runs them on its own device and appends to its own ``samples.rank-<r>.jsonl`` in the
one run folder. No collective communication: the ranks meet only in the file system.

- The shard is taken over all runnable questions, never over "what is left": every rank reads
  the logs at a slightly different moment, so a shard of the remainder could give one question
  to two ranks or to none. Finished questions are then skipped, whichever log holds them, so a
  rerun with another world size resumes every finished sample.
- Device: ``--device auto`` (or ``cuda``) becomes ``cuda:LOCAL_RANK`` where CUDA is present, and
  that device is made current, so clocks and memory readings are those of the rank's own GPU.
  An explicit ``cuda:N`` or ``cpu`` is kept as given.
- Lock: each rank holds ``.lock.rank-<r>-of-<n>`` of the run folder; a process that finds a lock
  of another world size held (a plain run's ``.lock`` counts as world size 1) refuses to start,
  so two launches never run the same questions at once.

See docs/scale-out.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from prunevid_bench.errors import PruneVidError
from prunevid_bench.harness.runlock import LOCK_FILE, held_locks, lock_holder, meta_lock, pid_alive

T = TypeVar("T")

RANK_LOG = "samples.rank-{rank}.jsonl"
RANK_LOG_PATTERN = re.compile(r"samples\.rank-(\d+)\.jsonl")
RANK_LOCK_PATTERN = re.compile(r"\.lock\.rank-(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Shard:
    """This process's place in a launch: rank ``rank`` of ``world_size`` (1: not split)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard:
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return cls()
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise PruneVidError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers; launch with torchrun "
                                "or accelerate launch, or unset them") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise PruneVidError(f"RANK {rank} does not fit WORLD_SIZE {world}; launch with torchrun or "
                                "accelerate launch, or unset them")
        return cls(rank, world, local)

    @property
    def split(self) -> bool:
        return self.world_size > 1

    def take(self, items: Sequence[T]) -> list[T]:
        """Every ``world_size``-th item from ``rank`` on: deterministic, disjoint, covering."""
        return list(items[self.rank::self.world_size])

    @property
    def log_name(self) -> str:
        from prunevid_bench.harness.runs import SAMPLES_FILE

        return RANK_LOG.format(rank=self.rank) if self.split else SAMPLES_FILE

    @property
    def lock_name(self) -> str:
        return f"{LOCK_FILE}.rank-{self.rank}-of-{self.world_size}" if self.split else LOCK_FILE

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    def device(self, configured: str) -> str:
        """The device this rank loads the model on (see the module docstring)."""
        if not self.split or configured not in ("auto", "cuda"):
            return configured
        import torch

        if not torch.cuda.is_available():
            return "cpu" if configured == "auto" else configured
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise PruneVidError(f"LOCAL_RANK {self.local_rank} but only {count} GPUs are visible; "
                                f"launch at most {count} processes per node")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"


def world_of_lock(name: str) -> int | None:
    """The world size a lock file belongs to: 1 for a plain run's ``.lock``; None: not a run lock."""
    if name == LOCK_FILE:
        return 1
    match = RANK_LOCK_PATTERN.fullmatch(name)
    return int(match.group(2)) if match else None


def rank_summary(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Which process ran how many samples, on which device: ``[{"world_size", "rank", "device",
    "n"}, ...]`` from the rows of a split run (rows of an unsplit run carry no rank)."""
    counts: dict[tuple[int, int, str], int] = {}
    for r in records:
        if "rank" in r:
            key = (int(r["world_size"]), int(r["rank"]), str(r.get("device")))
            counts[key] = counts.get(key, 0) + 1
    return [{"world_size": w, "rank": k, "device": d, "n": n} for (w, k, d), n in sorted(counts.items())]


def record_rank_environment(run_dir: Path, shard: Shard, pipe) -> None:
    """environment.json records the launch: its world size and each rank's device."""
    import platform

    import torch

    from prunevid_bench.report import read_json, write_json

    path = run_dir / "environment.json"
    with meta_lock(run_dir):
        env = read_json(path, "delete it; the next run writes it again") if path.is_file() else {}
        shards = env.get("shards") or {}
        if shards.get("world_size") != shard.world_size:  # a new launch with another size: its own ranks only
            shards = {"world_size": shard.world_size, "ranks": {}}
        device = pipe.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        shards["ranks"][str(shard.rank)] = {"local_rank": shard.local_rank, "device": str(device),
                                            "device_name": name, "host": platform.node()}
        write_json(path, {**env, "shards": shards})


def wait_for_other_ranks(run_dir: Path, shard: Shard, console: Console, exit_wait_s: float = 30.0) -> None:
    """Rank 0 summarises the whole launch: it waits while another rank of it holds its lock, and
    then, when every rank runs on this host, until those processes have exited too (at most
    ``exit_wait_s``): torchrun stops the launch as soon as rank 0 exits with a non-zero code
    (3, incomplete), and would kill a rank that had released its lock but not yet exited."""
    holders: set[int] = set()

    def others() -> list[str]:
        names = [n for n in held_locks(run_dir, shard.lock_name) if world_of_lock(n) == shard.world_size]
        holders.update(pid for pid in (lock_holder(Path(run_dir) / n) for n in names) if pid is not None)
        return names

    if others():
        console.print(f"waiting for the other ranks ({len(others())} still running)", soft_wrap=True)
    while others():
        time.sleep(0.5)
    if os.environ.get("LOCAL_WORLD_SIZE") != str(shard.world_size):
        return  # ranks on other hosts: their process ids mean nothing here
    deadline = time.monotonic() + exit_wait_s
    while any(pid_alive(pid) for pid in holders) and time.monotonic() < deadline:
        time.sleep(0.1)


def missing_samples(run_dir: Path, runnable: list[str], done) -> dict[str, Any]:
    """The runnable ids not logged yet (``missing``) and, for a split launch, the ranks that were
    to run them (``missing_ranks``: rank r of n takes every n-th runnable question from r)."""
    missing = [i for i in runnable if i not in done]
    if not missing:
        return {}
    env_path = run_dir / "environment.json"
    try:
        world = int(json.loads(env_path.read_text())["shards"]["world_size"]) if env_path.is_file() else 1
    except (ValueError, KeyError, TypeError):
        world = 1
    out: dict[str, Any] = {"missing": missing}
    if world > 1:
        position = {sample_id: n for n, sample_id in enumerate(runnable)}
        out["missing_ranks"] = sorted({position[i] % world for i in missing})
        out["world_size"] = world
    return out
