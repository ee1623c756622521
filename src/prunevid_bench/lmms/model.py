"""The lmms-eval model ``prunevid``: each request's own chat messages through our pipeline.

A chat model (``is_simple = False``): for each request lmms-eval hands over the task's
``doc_to_messages``, which we call on the document and feed to ``Pipeline.run(messages=...)`` in
its own order (system prompt, videos, images, text). The task's ``generation_kwargs`` decide
the reply length (``max_new_tokens``; our config's ``generation.max_new_tokens`` when the task
sets none) and its stop strings cut the reply, as lmms-eval's own models do.

Refused in one line (the process exits 1; before any request runs where it can be known then):
``--batch_size`` other than 1, sampling (``temperature > 0``, ``do_sample``, beams), and
``loglikelihood`` / multi-round requests. A request the pipeline refuses (an unreadable video,
a prompt longer than the model) ends the run with a one-line error naming the task and doc.
lmms-eval itself catches every other exception, prints it and exits 0: check its output files.

``video.policy: auto`` here means lmms-eval's policy for a checkpoint (frames, pixel bounds and
system prompt as its ``qwen2_5_vl`` model) and ``processor`` for the built-in toy/tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages

from prunevid_bench.errors import PruneVidError
from prunevid_bench.lmms.args import check_generation, cut_at_stop, parse_model_args, stop_strings
from prunevid_bench.lmms.records import (
    THROUGHPUT_FIELDS,
    RunRecords,
    default_records_dir,
    output_path_from_argv,
    sample_fields,
    throughput,
)


@dataclass
class PruneVidTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts, plus our measurements (under ``prunevid``)."""

    prunevid: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "prunevid": self.prunevid}


def refuse(exc: Exception) -> SystemExit:
    """One line and exit 1. lmms-eval catches ``Exception`` (and then exits 0); SystemExit is not one."""
    return SystemExit(f"prunevid: {exc}")


class PruneVidLMM(lmms):
    is_simple = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from prunevid_bench.config import build_config
        from prunevid_bench.pipeline import Pipeline

        try:
            args = parse_model_args(kwargs)
            self.system_prompt = self._resolve_system_prompt(args.system_prompt)
            self._rank, self._world_size, local = _process_place()
            if self._world_size > 1 and args.overrides.get("model.device") != "cpu":
                args.overrides["model.device"] = f"cuda:{local}"  # one GPU per process, as lmms-eval's models do
            cfg = build_config(args.preset, args.config_file, args.overrides)
            self.pipe = Pipeline.from_config(cfg)
            if cfg.video.policy == "auto" and self.pipe.default_policy == "qwen":
                self.pipe.config.video.policy = "lmms-eval"
            self._folder = args.records or default_records_dir(args.label, args.preset, output_path_from_argv())
            self._shared_folder = args.records is not None
            self._meta = {"label": args.label, "preset": args.preset, "model_args": {k: str(v) for k, v in kwargs.items()}}
            self._records: RunRecords | None = None
        except PruneVidError as exc:
            raise refuse(exc) from None

    @property
    def records(self) -> RunRecords:
        """Made on first use: by then lmms-eval has joined the processes, so every rank can take
        rank 0's folder name (each would otherwise stamp its own start time)."""
        if self._records is None:
            folder = self._folder if self._shared_folder else _from_rank0(self._folder)
            self._records = RunRecords(folder, self.pipe.config, self.pipe, self._meta, self.rank, self.world_size)
        return self._records

    @property
    def device(self):
        return self.pipe.device

    # ----------------------------------------------------------- requests
    def generate_until(self, requests) -> list[GenerationResult]:
        try:
            for req in requests:  # refuse before anything runs
                if len(req.args) != 6 or not isinstance(req.args[2], dict):
                    raise PruneVidError(f"task {req.task_name}: its requests are not chat requests (messages, "
                                        "generation kwargs, doc); prunevid runs lmms-eval's chat tasks")
                check_generation(req.args[2], f"task {req.args[4]}")
        except PruneVidError as exc:
            raise refuse(exc) from None
        results, records = [], []
        for req in requests:
            _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            where = f"task {task}, doc {doc_id}"
            try:
                messages = qwen_messages(doc_to_messages(self.task_dict[task][split][doc_id]), where)
                messages = self._apply_system_prompt(messages, self.system_prompt)
                cfg = self._config(int(gen_kwargs.get("max_new_tokens") or self.pipe.config.generation.max_new_tokens))
                prepared = self.pipe.prepare(messages=messages, config=cfg)
                result = self.pipe.run(prepared, config=cfg)
            except PruneVidError as exc:
                self.records.write_summary()
                raise refuse(f"{where}: {exc}") from None
            reply = cut_at_stop(result.generated_text, stop_strings(gen_kwargs))
            record = self.records.add(task, doc_id, split, prepared.prompt, reply, result)
            records.append(record)
            counts = PruneVidTokenCounts(input_tokens=result.prompt_tokens, output_tokens=result.generated_tokens,
                                         prunevid=sample_fields(record))
            results.append(GenerationResult(text=reply, token_counts=counts))
        self.records.write_summary()
        everyone = _gather(records)  # results.json is rank 0's: its means must cover every rank's samples
        if everyone and self.rank == 0:
            log_metrics(**throughput(everyone))
        return results

    def _config(self, max_new_tokens: int):
        from prunevid_bench.config import from_dict, merge_into

        cfg = self.pipe.config
        if cfg.generation.max_new_tokens == max_new_tokens:
            return cfg
        return from_dict(merge_into(cfg.to_dict(), {"generation": {"max_new_tokens": max_new_tokens}}, "task"))

    def loglikelihood(self, requests):
        raise refuse("loglikelihood requests (multiple-choice by option likelihood) are not supported; "
                     "use the task's generate_until variant")

    def generate_until_multi_round(self, requests):
        raise refuse("multi-round generation is not supported; prunevid answers one turn per request")


def qwen_messages(raw: Any, where: str) -> list[dict[str, Any]]:
    """lmms-eval's chat messages (``url`` per media item) as the Qwen messages our pipeline reads
    (``video`` / ``image`` per item), order kept."""
    try:
        chat = ChatMessages(messages=raw)
    except Exception as exc:  # noqa: BLE001 - pydantic's validation error: one line of it
        raise PruneVidError(f"the task's messages are not lmms-eval chat messages: {str(exc).splitlines()[0]}") from None
    out = []
    for message in chat.messages:
        parts = []
        for content in message.content:
            if content.type == "text":
                parts.append({"type": "text", "text": content.text})
            elif content.type == "image":
                parts.append({"type": "image", "image": content.url})
            elif content.type == "video":
                parts.append(_video_part(content))
            else:
                raise PruneVidError(f"{content.type} input is not supported (video, image and text are)")
        out.append({"role": message.role, "content": parts})
    return out


def _video_part(content) -> dict[str, Any]:
    """A video item: a path (or frames), or a dict with its path and ``video_start`` / ``video_end``."""
    url, part = content.url, {"type": "video"}
    if isinstance(url, dict):
        part["video"] = url.get("url") or url.get("path") or url.get("video")
        for key in ("video_start", "video_end"):
            if url.get(key) is not None:
                part[key] = float(url[key])
    else:
        part["video"] = url
    if content.start_time is not None:
        part["video_start"] = float(content.start_time)
    if content.end_time is not None:
        part["video_end"] = float(content.end_time)
    return part


def _from_rank0(value):
    """Rank 0's ``value`` on every process, when several run in one process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records (the fields the throughput needs) on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return records
    mine = [{k: r.get(k) for k in ("generated_tokens", "ttft_s", "decode_s", *THROUGHPUT_FIELDS)} for r in records]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return [r for part in parts for r in part]


def _process_place() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment ``torchrun`` and ``accelerate launch``
    set (``harness.shard.Shard``, which checks them); lmms-eval's evaluator reads the same variables."""
    from prunevid_bench.harness.shard import Shard

    shard = Shard.from_env()
    return shard.rank, shard.world_size, shard.local_rank
