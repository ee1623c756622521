"""What a dataset run or a sweep is asked to do, as three small values the CLI builds once:

- ``DatasetSpec``: which questions (the file, its videos, its answers, the seeded ``--limit`` sample);
- ``RunTarget``: which model, on which device, in which dtype, with which attention;
- ``EvalOptions``: how the run runs and where it writes (answer mode, baseline, force, wait, folder).

The stage settings stay in the ``RunConfig``; a ``RunTarget`` is merged into its ``model`` section
(``overrides``), the one place the loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunevid_bench.config import RunConfig
from prunevid_bench.errors import PruneVidError

ANSWER_MODES = ("generate", "logits")


@dataclass(frozen=True)
class DatasetSpec:
    path: Path
    video_root: Path | None = None  # the folder the rows' videos are relative to (default: the file's)
    answers: Path | None = None  # EgoSchema's separate answers file
    format: str | None = None  # a registered row format; None: recognised from the rows
    limit: int | float | None = None  # this many questions (a fraction when below 1); None: all
    seed: int = 0
    sample: str = "random"  # random: a seeded sample of them | first: the first ones (lmms-eval's --limit)
    offset: int = 0  # rows skipped before sampling (lmms-eval's --offset)
    allow_outside_root: bool = False  # read rows whose videos resolve outside the video root


@dataclass(frozen=True)
class RunTarget:
    """The model a run loads; None leaves a field as the preset or config file has it."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    attention: str | None = None

    def overrides(self) -> dict[str, Any]:
        keys = {"model.name": self.model, "model.device": self.device, "model.dtype": self.dtype,
                "model.attn_implementation": self.attention}
        return {key: value for key, value in keys.items() if value is not None}

    @classmethod
    def of(cls, cfg: RunConfig) -> RunTarget:
        m = cfg.model
        return cls(m.name, m.device, m.dtype, m.attn_implementation)


@dataclass(frozen=True)
class EvalOptions:
    answer_mode: str = "generate"  # generate: parse the reply's letter | logits: best letter's first-token logit
    baseline: Path | None = None  # a dataset run folder to report agreement with
    force: bool = False  # redo what is already logged (earlier results move to backup-N/)
    wait: bool = False  # queue behind another process holding the run folder instead of stopping
    results_dir: Path = Path("results")
    label: str | None = None  # the run (or sweep) folder's name; default from the preset
    preset: str | None = None  # the preset the config came from: names the folder, kept in the record
    feature_cache: Path | None = None  # a folder for the vision-feature cache on disk (feature_cache.py)
    feature_cache_gb: float | None = None  # its memory bound; None: the scenario's default
    feature_cache_shared: bool = False  # accept a cache folder other users can write to
    warmup: int = 1  # untimed, unlogged samples run first (a cold first forward costs about 2x)
    allow_mixed: bool = False  # a sweep table over cells whose recorded inputs differ (harness.inputs)
    interleave: bool = False  # a sweep: question i through every cell back to back (harness.interleave)

    def __post_init__(self) -> None:
        if self.answer_mode not in ANSWER_MODES:
            raise PruneVidError(f"--answer-mode must be one of {', '.join(ANSWER_MODES)}, got '{self.answer_mode}'")
        if self.warmup < 0:
            raise PruneVidError(f"--warmup must be >= 0, got {self.warmup}")
        if self.feature_cache_gb is not None and not 0 <= self.feature_cache_gb < float("inf"):  # NaN too
            raise PruneVidError(f"--feature-cache-gb must be >= 0 (0 turns the memory cache off), got {self.feature_cache_gb}")
