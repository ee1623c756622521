"""The options `run` and `sweep` share, defined once as groups.

Each group is a dataclass whose fields are Typer options; ``with_groups`` adds the fields to a
command's signature (so ``--help`` and parsing are Typer's own) and hands the command one filled
instance per group. The groups turn into what the harness takes: ``ConfigFlags.build()`` into the
RunConfig, ``DatasetFlags.spec(path)`` into a DatasetSpec, ``EvalFlags`` into EvalOptions.
Nothing heavy is imported here: ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

Preset = Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (see `prunevid presets`).", rich_help_panel="Config")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="Your own YAML config (overrides the preset).", rich_help_panel="Config")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key, e.g. tome.budget=0.5 (repeatable).", rich_help_panel="Config")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="toy (default; trained on the toy world), toy8 (8 layers, toy world v2), toy-qwen3vl (a Qwen3-VL on the toy world), tiny (random weights), tiny-qwen2vl (Qwen2-VL, random weights), a Hugging Face id, or a local Qwen2.5-VL / Qwen2-VL directory.", rich_help_panel="Model")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.", rich_help_panel="Model")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel="Model")]
Attn = Annotated[Optional[str], typer.Option("--attn-implementation", help="sdpa | eager | flash_attention_2.", rich_help_panel="Model")]
NumFrames = Annotated[Optional[int], typer.Option("--num-frames", help="Frames sampled uniformly (default: the policy's, 16; lmms-eval 32). More than the clip holds is refused, never capped. Policy: --set video.policy=qwen|lmms-eval|processor.", rich_help_panel="Video")]
Fps = Annotated[Optional[float], typer.Option("--fps", help="Sample at this rate instead of --num-frames.", rich_help_panel="Video")]
MaxFrames = Annotated[Optional[int], typer.Option("--max-frames", help="Cap on frames when sampling by --fps only (default: qwen 768, processor 64).", rich_help_panel="Video")]
MaxPixels = Annotated[Optional[int], typer.Option("--max-pixels", help="Upper bound on pixels per frame after resizing (default: the policy's).", rich_help_panel="Video")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="torch intra-op threads (runtime.threads; default: torch's own, one per core). On a busy machine fewer threads than cores avoid contention; recorded in every record.", rich_help_panel="Model")]
ChunkTokens = Annotated[Optional[int], typer.Option("--chunk-tokens", help="Run the prefill's decoder layers in chunks of N tokens (prefill.chunk_tokens; 0, the default: in one piece): the same logits, a lower peak memory; recorded per run.", rich_help_panel="Model")]
MaxNew = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Greedy decode length.", rich_help_panel="Generation")]
ResultsDir = Annotated[Path, typer.Option("--results-dir", help="Where run folders are written.", rich_help_panel="Output")]
VideoRoot = Annotated[Optional[Path], typer.Option("--video-root", help="Folder the dataset's videos are relative to.", rich_help_panel="Dataset")]
AllowOutsideRoot = Annotated[bool, typer.Option("--allow-outside-root", help="Read videos that resolve outside --video-root (a dataset, a stream dataset) or outside a --messages file's folder; refused by default.", rich_help_panel="Dataset")]
AnswersFile = Annotated[Optional[Path], typer.Option("--answers", help="EgoSchema answers file.", rich_help_panel="Dataset")]
DatasetFormat = Annotated[Optional[str], typer.Option("--format", help="egoschema | longvideobench | mlvu | mvbench | videomme | jsonl (auto-detected).", rich_help_panel="Dataset")]
Limit = Annotated[Optional[float], typer.Option("--limit", help="Evaluate N rows, or a fraction of them when below 1 (0.1: a tenth, rounded up, as lmms-eval); which ones: --sample.", rich_help_panel="Dataset", show_default=False)]
Sample = Annotated[str, typer.Option("--sample", help="How --limit chooses: random (a seeded sample, in file order) | first (the first N, as lmms-eval).", rich_help_panel="Dataset")]
Offset = Annotated[int, typer.Option("--offset", help="Skip this many rows before --limit applies (as lmms-eval's --offset).", rich_help_panel="Dataset")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for --limit sampling.", rich_help_panel="Dataset")]
AnswerMode = Annotated[str, typer.Option("--answer-mode", help="generate (parse the letter) | logits (best option letter's first-token logit).", rich_help_panel="Dataset")]
Wait = Annotated[bool, typer.Option("--wait", help="If another process holds the run folder, wait for it instead of stopping.", rich_help_panel="Dataset")]
FeatureCacheDir = Annotated[Optional[Path], typer.Option("--feature-cache", help="Keep each sample's processor output and vision-tower output on disk here (safetensors), so a rerun or resumed run skips decoding and the tower.", rich_help_panel="Dataset")]
FeatureCacheShared = Annotated[bool, typer.Option("--feature-cache-shared", help="Accept a --feature-cache folder that other users can write to (they could change this run's features, and so its answers).", rich_help_panel="Dataset")]
FeatureCacheGb = Annotated[Optional[float], typer.Option("--feature-cache-gb", help="Memory for the vision-feature cache shared by a sweep's cells (default: 4 for a sweep, 0 for a dataset run; 0 turns it off).", rich_help_panel="Dataset")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout; everything else goes to stderr.", rich_help_panel="Output")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and the --json result).", rich_help_panel="Output")]


def collect_overrides(
    sets: list[str] | None,
    model: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    attn: str | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    max_pixels: int | None = None,
    max_new_tokens: int | None = None,
    threads: int | None = None,
    chunk_tokens: int | None = None,
) -> dict:
    """Flags and --set pairs as one dotted-key dict; --set wins over the dedicated flags."""
    from prunevid_bench.config import parse_override

    flags = {
        "model.name": model,
        "model.dtype": dtype,
        "model.device": device,
        "model.attn_implementation": attn,
        "video.num_frames": num_frames,
        "video.fps": fps,
        "video.max_frames": max_frames,
        "video.max_pixels": max_pixels,
        "generation.max_new_tokens": max_new_tokens,
        "runtime.threads": threads,
        "prefill.chunk_tokens": chunk_tokens,
    }
    out = {k: v for k, v in flags.items() if v is not None}
    if fps is not None and num_frames is None:
        out["video.num_frames"] = None  # --fps alone means: sample by rate
    for text in sets or []:
        key, value = parse_override(text)
        out[key] = value
    return out


@dataclass
class ConfigFlags:
    """The run's config: preset < --config < the dedicated flags < --set."""

    preset: Preset = None
    config: ConfigFile = None
    sets: Sets = None
    model: Model = None
    dtype: Dtype = None
    device: Device = None
    attn_implementation: Attn = None
    num_frames: NumFrames = None
    fps: Fps = None
    max_frames: MaxFrames = None
    max_pixels: MaxPixels = None
    max_new_tokens: MaxNew = None
    threads: Threads = None
    chunk_tokens: ChunkTokens = None

    def target(self):
        """The model flags as a RunTarget (None: as the preset or config file says)."""
        from prunevid_bench.harness.specs import RunTarget

        return RunTarget(self.model, self.device, self.dtype, self.attn_implementation)

    def build(self):
        """The validated RunConfig, with the RunTarget merged into its model section."""
        from prunevid_bench.config import build_config

        target = self.target().overrides()
        video = collect_overrides(self.sets, num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames,
                                  max_pixels=self.max_pixels, max_new_tokens=self.max_new_tokens, threads=self.threads,
                                  chunk_tokens=self.chunk_tokens)
        return build_config(self.preset, self.config, {**target, **video})  # --set (in video) wins


@dataclass
class DatasetFlags:
    """Which questions of the --dataset file."""

    video_root: VideoRoot = None
    answers: AnswersFile = None
    dataset_format: DatasetFormat = None
    limit: Limit = None
    seed: Seed = 0
    sample: Sample = "random"
    offset: Offset = 0
    allow_outside_root: AllowOutsideRoot = False

    def spec(self, path: Path):
        from prunevid_bench.harness.specs import DatasetSpec

        limit = int(self.limit) if self.limit is not None and self.limit >= 1 and float(self.limit).is_integer() else self.limit
        return DatasetSpec(path, self.video_root, self.answers, self.dataset_format, limit, self.seed, self.sample, self.offset,
                           self.allow_outside_root)


@dataclass
class EvalFlags:
    """How a dataset run runs (the command adds its own --force, --label and --baseline)."""

    answer_mode: AnswerMode = "generate"
    wait: Wait = False
    results_dir: ResultsDir = Path("results")
    feature_cache: FeatureCacheDir = None
    feature_cache_gb: FeatureCacheGb = None
    feature_cache_shared: FeatureCacheShared = False

    def options(self, preset: str | None, **more):
        from prunevid_bench.harness.specs import EvalOptions

        return EvalOptions(answer_mode=self.answer_mode, wait=self.wait, results_dir=self.results_dir, preset=preset,
                           feature_cache=self.feature_cache, feature_cache_gb=self.feature_cache_gb,
                           feature_cache_shared=self.feature_cache_shared, **more)


Launcher = Annotated[str, typer.Option("--launcher", help="Where the cells run: serial (here, one after another) | local (--workers processes) | slurm (one job array); local and slurm need prunevid-bench\\[slurm].", rich_help_panel="Launch")]
Workers = Annotated[int, typer.Option("--workers", help="--launcher local: parallel processes, one GPU each.", rich_help_panel="Launch")]
SlurmPartition = Annotated[Optional[str], typer.Option("--slurm-partition", help="--launcher slurm: the partition (default: the cluster's).", rich_help_panel="Launch")]
SlurmGpus = Annotated[int, typer.Option("--slurm-gpus-per-cell", help="--launcher slurm: GPUs per cell.", rich_help_panel="Launch")]
SlurmTime = Annotated[str, typer.Option("--slurm-time", help="--launcher slurm: time limit per cell, e.g. 4:00:00.", rich_help_panel="Launch")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="Return once the cells are submitted; follow with --status.", rich_help_panel="Launch")]


@dataclass
class LaunchFlags:
    """Where a sweep's cells run (harness.launch)."""

    launcher: Launcher = "serial"
    workers: Workers = 1
    slurm_partition: SlurmPartition = None
    slurm_gpus_per_cell: SlurmGpus = 1
    slurm_time: SlurmTime = "4:00:00"
    no_wait: NoWait = False

    def launch(self):
        from prunevid_bench.harness.launch import Launch

        return Launch(self.launcher, self.workers, self.slurm_partition, self.slurm_gpus_per_cell, self.slurm_time,
                      wait=not self.no_wait)


@dataclass
class OutputFlags:
    json_out: JsonOut = False
    quiet: Quiet = False


def with_groups(**groups: type):
    """Put the fields of each group dataclass among the command's options, where its keyword-only
    placeholder parameter stands (``data: DatasetFlags``), so help panels keep the command's order;
    the command receives one filled instance per group under that keyword."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # Typer reads the annotations as objects
        parameters = []
        for param in signature.parameters.values():
            if param.name not in groups:
                parameters.append(param)
                continue
            cls = groups[param.name]
            hints = typing.get_type_hints(cls, include_extras=True)
            parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                             annotation=hints[f.name]) for f in dataclasses.fields(cls)]
        missing = set(groups) - set(signature.parameters)
        names = [p.name for p in parameters]
        if missing or len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: a group has no placeholder, or an option is defined twice")

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            for key, cls in groups.items():
                kwargs[key] = cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)})
            return command(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        return wrapper

    return decorate
