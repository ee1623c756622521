"""Clocks and memory readings that are honest on both CUDA and the CPU.

On CUDA, time is read from CUDA events recorded on the stream (no host sync inside the timed
region); ``Clock.elapsed`` synchronises before reading them. On the CPU, ``perf_counter``.
"""

from __future__ import annotations

import resource
import sys
import time

import torch


class Clock:
    """Makes time marks on one device; ``elapsed(a, b)`` gives seconds between two marks."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def start(self):
        """A mark for the start of a timed region: on CUDA, previous work is drained first."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.mark()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def elapsed(self, start, end) -> float:
        if start is None or end is None:
            return 0.0
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


def wall_and_cpu_at_exit(ratios: str) -> None:
    """Have a benchmark script print, when it ends, its wall time beside its CPU time (process
    time, every thread) and which of the two its ratios use: under load the wall time grows while
    the CPU time stays put, so a reader can tell a slow run from a busy machine."""
    import atexit

    wall, cpu = time.perf_counter(), time.process_time()
    atexit.register(lambda: print(f"\nwall {time.perf_counter() - wall:.1f} s, CPU {time.process_time() - cpu:.1f} s "
                                  f"(process time, torch threads: {torch.get_num_threads()}); {ratios}", flush=True))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``runtime.threads``; None leaves torch's default, one per
    core) and return the count in effect, which every record carries."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM on Linux (resettable, see below), else
    ``ru_maxrss`` (Linux reports KiB, macOS bytes)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_cpu_peak_rss() -> bool:
    """Linux resets the peak RSS (VmHWM) to the current RSS when "5" is written to
    /proc/self/clear_refs; returns False where that is not possible (the peak is then the
    process's running maximum)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of one phase. CUDA: reset the peak, read ``max_memory_allocated``.
    CPU: the process's peak RSS, reset per phase where the kernel allows it."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.phases: dict[str, int] | None = None  # peaks of the phases closed since reset(phases=True)

    def reset(self, phases: bool = False) -> None:
        """Start a phase; ``phases``: the phases of a prefill will be closed by ``phase`` (the
        patch's hooks), and ``read`` still gives the peak since this reset."""
        self.phases = {} if phases else None
        self._reset_device()

    def _reset_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_cpu_peak_rss():
            self.kind = "cpu_peak_rss_lifetime"

    def phase(self, name: str) -> None:
        """Close the phase ``name`` (its peak since the last phase, or the reset) and start the
        next one; nothing unless armed by ``reset(phases=True)``."""
        if self.phases is not None:
            self.phases[name] = max(self.phases.get(name, 0), self._read_device())
            self._reset_device()

    def read(self) -> int:
        """The peak since ``reset``, over every phase closed since."""
        return max([self._read_device(), *(self.phases or {}).values()])

    def take_phases(self) -> dict[str, int]:
        """The phases closed since ``reset(phases=True)`` (the last one, still open: ``lm_head``,
        the final norm and the first token's logits);
        disarms."""
        phases = self.phases or {}
        if phases:
            phases["lm_head"] = self._read_device()
        self.phases = None
        return phases

    def _read_device(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return cpu_peak_rss_bytes()


def cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache's key and value tensors, read off the tensors."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def state_bytes(cache) -> int:
    """Bytes held by a hybrid cache's linear-attention layers (their conv and recurrent states,
    fixed-size whatever the prompt's length), read off the tensors; 0 for a cache without them."""
    total = 0
    for layer in getattr(cache, "layers", []) if cache is not None else []:
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for tensor in (states or {}).values():
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
    return total


def cache_lengths(cache) -> list[int]:
    """Sequence length held by each layer of the cache."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers if getattr(layer, "keys", None) is not None]
