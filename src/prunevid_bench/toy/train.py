"""Train the ``toy`` model: a tiny Qwen2.5-VL learnt from scratch on the toy world, on a CPU.

    python -m prunevid_bench.toy.train --out src/prunevid_bench/assets/toy

Every training sample goes through the inference path: the rendered clip is written as an mp4
and decoded by ``load_clip`` (so the model learns the codec's colour error), then
``Pipeline.prepare`` builds the prompt and runs the processor, and ``prefill_position_ids`` gives
the M-RoPE ids the engine uses. The answer letter is appended at the engine's first decode
position. The loss is on that letter and the ``<|im_end|>`` after it, nothing else.

All samples are prepared once and kept in memory (pixels as exact uint8, a quarter of float32).
Seeds fix the data, the initialisation, the batch order and the noise, so a run on the same
machine and thread count reproduces the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prunevid_bench.models.tiny import IM_END_ID, PAD_ID, TinySizes, build_config

# The model shape. 1.4 M parameters, about 5.5 MB of float32 weights.
TOY_SIZES = TinySizes(
    hidden_size=128,  # LLM width
    intermediate_size=512,  # LLM MLP width (4x)
    num_hidden_layers=4,  # >= 4, so PruneVid has intermediate layers to prune at
    num_attention_heads=4,  # head_dim 32
    num_key_value_heads=2,  # GQA as in Qwen2.5-VL
    mrope_section=(4, 6, 6),  # 16 rotary pairs split time/height/width in Qwen's 16:24:24 ratio
    vision_depth=2,  # ViT blocks
    vision_hidden_size=64,  # ViT width
    vision_intermediate_size=256,  # ViT MLP width (4x)
    vision_heads=2,  # ViT head_dim 32
    # 16 frames at 8 fps: a temporal grid step (2 frames) lasts 0.25 s, and its time id is
    # int(step * tokens_per_second * 0.25). With Qwen's 2 the 8 steps collapse pairwise to
    # [0, 0, 1, 1, ...]; with 4 every step gets its own id.
    tokens_per_second=4,
)
# One attention window per 112-px frame (Qwen's default 112 px window, in pixels). The ViT then
# attends within each frame in every block, as its full-attention block does anyway.
VISION_WINDOW = 112


def toy_config(attn_implementation: str = "sdpa"):
    config = build_config(TOY_SIZES, attn_implementation)
    config.vision_config.window_size = VISION_WINDOW
    return config


@dataclass
class TrainConfig:
    out: str = "src/prunevid_bench/assets/toy"  # where config.json and model.safetensors go
    train_seed: int = 1000  # toy-world seed of the training set (held-out sets use other seeds)
    n_train: int = 3000  # distinct training questions (each prepared once, reused every epoch)
    val_seed: int = 999  # toy-world seed of the validation set logged during training
    n_val: int = 100  # validation questions (teacher-forced letter accuracy, for the log only)
    steps: int = 700  # optimiser steps
    batch_size: int = 16
    lr: float = 2e-3  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    noise_std: float = 2.0  # Gaussian pixel noise on top of the codec's, in 0-255 units
    init_seed: int = 0  # model initialisation, batch order and noise
    # One torch thread: on the shared 2-core box a second thread spin-waits whenever another
    # process holds a core (measured 3x slower per step), and one thread gives the same bits on
    # any machine.
    threads: int = 1
    eval_every: int = 100  # steps between validation logs


@dataclass
class Sample:
    """One prepared question: the processor's output plus the answer, ready to batch."""

    input_ids: torch.Tensor  # [L + 1] prompt, then the answer letter
    position_ids: torch.Tensor  # [4, L + 1] text row + M-RoPE rows; the letter at the engine's first decode position
    mm_token_type_ids: torch.Tensor  # [L + 1]
    pixels: torch.Tensor  # [P, C * 2 * 14 * 14] uint8, the processor's pixel_values_videos before normalisation
    video_grid_thw: torch.Tensor  # [1, 3]
    second_per_grid_ts: torch.Tensor  # [1]
    category: str

    @property
    def answer_index(self) -> int:
        """Position of the letter in ``input_ids``; its logits come from the token before it."""
        return self.input_ids.shape[0] - 1


class PixelCodec:
    """Exact uint8 <-> pixel_values_videos, using the processor's own rescale and normalisation.

    The toy frames are already 112 px, so the processor only rescales and normalises: the values
    map back to integers exactly (checked on every sample).
    """

    def __init__(self, processor):
        vp = processor.video_processor
        channels = len(vp.image_mean)
        self.mean = torch.tensor(vp.image_mean).view(1, channels, 1)
        self.std = torch.tensor(vp.image_std).view(1, channels, 1)
        self.scale = 1.0 / vp.rescale_factor
        self.channels = channels

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.view(pixel_values.shape[0], self.channels, -1)
        raw = (x * self.std + self.mean) * self.scale
        if (raw - raw.round()).abs().max() > 1e-2:
            raise RuntimeError("the processor resized the frames; the uint8 cache would not be exact")
        return raw.round().clamp(0, 255).to(torch.uint8).view_as(pixel_values)

    def decode(self, pixels: torch.Tensor, noise_std: float = 0.0, generator=None) -> torch.Tensor:
        x = pixels.view(pixels.shape[0], self.channels, -1).float()
        if noise_std > 0:
            x = (x + noise_std * torch.randn(x.shape, generator=generator)).clamp(0, 255)
        return ((x / self.scale - self.mean) / self.std).view(pixels.shape)


def prepare_samples(pipe, codec: PixelCodec, n: int, seed: int, label: str) -> list[Sample]:
    """Render, encode, decode and process n questions of the toy set drawn with ``seed``."""
    from prunevid_bench.engine import prefill_position_ids
    from prunevid_bench.harness.answers import format_mc_prompt
    from prunevid_bench.toy.world import encode_mp4, iter_examples

    tokenizer = pipe.processor.tokenizer
    letter_ids = {letter: tokenizer.encode(letter, add_special_tokens=False) for letter in "ABCD"}
    assert all(len(ids) == 1 for ids in letter_ids.values()), letter_ids
    samples = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        clip_path = Path(tmp) / "clip.mp4"
        for i, example in enumerate(iter_examples(n, seed)):
            encode_mp4(example.frames, clip_path)
            prepared = pipe.prepare(clip_path, format_mc_prompt(example.question, example.options))
            inputs = prepared.inputs
            positions = prefill_position_ids(pipe.model, inputs)[:, 0]  # [4, L]
            letter = torch.tensor(letter_ids[example.answer])
            samples.append(Sample(
                input_ids=torch.cat([inputs["input_ids"][0], letter]),
                # The engine decodes the first generated token at the last prompt position + 1, every row.
                position_ids=torch.cat([positions, positions[:, -1:] + 1], dim=1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"][0], torch.zeros(1, dtype=torch.long)]),
                pixels=codec.encode(inputs["pixel_values_videos"]),
                video_grid_thw=inputs["video_grid_thw"],
                second_per_grid_ts=inputs["second_per_grid_ts"],
                category=example.category,
            ))
            if (i + 1) % 500 == 0 or i + 1 == n:
                print(f"  {label}: {i + 1}/{n} prepared ({time.perf_counter() - start:.0f} s)", flush=True)
    return samples


def collate(batch: list[Sample], codec: PixelCodec, noise_std: float = 0.0, generator=None):
    """Right-padded model inputs and the (row, index, target) of every supervised token.

    Right padding needs no attention mask: under the causal mask no real token sees a pad.
    """
    length = max(s.input_ids.shape[0] for s in batch)
    input_ids = torch.full((len(batch), length), PAD_ID, dtype=torch.long)
    mm_types = torch.zeros((len(batch), length), dtype=torch.long)
    # Pads continue every position row by one per token (the text row stays arange(length)).
    positions = torch.arange(length).view(1, 1, length).repeat(4, len(batch), 1)
    for row, s in enumerate(batch):
        n = s.input_ids.shape[0]
        input_ids[row, :n] = s.input_ids
        mm_types[row, :n] = s.mm_token_type_ids
        positions[:, row, :n] = s.position_ids
        positions[1:, row, n:] += s.position_ids[1:, -1:] - (n - 1)
    inputs = dict(
        input_ids=input_ids,
        position_ids=positions,
        mm_token_type_ids=mm_types,
        pixel_values_videos=torch.cat([codec.decode(s.pixels, noise_std, generator) for s in batch]),
        video_grid_thw=torch.cat([s.video_grid_thw for s in batch]),
        second_per_grid_ts=torch.cat([s.second_per_grid_ts for s in batch]),
    )
    rows, index, targets = [], [], []
    for row, s in enumerate(batch):
        a = s.answer_index
        rows += [row, row]
        index += [a - 1, a]  # the prompt's last token predicts the letter; the letter predicts <|im_end|>
        targets += [int(s.input_ids[a]), IM_END_ID]
    return inputs, torch.tensor(rows), torch.tensor(index), torch.tensor(targets)


def supervised_logits(model, inputs, rows, index):
    """Logits [N, V] at the supervised positions only (the LM head never sees the rest)."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    return model.lm_head(hidden[rows, index])


@torch.no_grad()
def letter_accuracy(model, samples: list[Sample], codec: PixelCodec, batch_size: int) -> dict[str, float]:
    """Share of samples whose first greedy token is the answer letter, overall and per category."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        inputs, rows, index, targets = collate(batch, codec)
        logits = supervised_logits(model, inputs, rows[::2], index[::2])
        for s, ok in zip(batch, (logits.argmax(-1) == targets[::2]).tolist()):
            hits[s.category].append(ok)
            hits["all"].append(ok)
    model.train()
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, out: Path) -> None:
    from safetensors.torch import save_file

    from prunevid_bench.toy.model import CONFIG_FILE, WEIGHTS_FILE

    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(out / CONFIG_FILE), use_diff=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def train(cfg: TrainConfig) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from prunevid_bench.config import RunConfig
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.toy.model import build_toy_processor

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.init_seed)
    t0 = time.perf_counter()
    model = Qwen2_5_VLForConditionalGeneration(toy_config())
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    processor = build_toy_processor()
    # The inference pipeline itself builds the prompts and runs the processor.
    pipe = Pipeline(LoadedModel(model, processor, "toy", True), RunConfig())
    codec = PixelCodec(processor)
    print(f"toy model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    train_set = prepare_samples(pipe, codec, cfg.n_train, cfg.train_seed, "train")
    val_set = prepare_samples(pipe, codec, cfg.n_val, cfg.val_seed, "val")
    t_prep = time.perf_counter() - t0
    print(f"prepared {len(train_set)} + {len(val_set)} samples in {t_prep:.0f} s", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    generator = torch.Generator().manual_seed(cfg.init_seed)
    order: list[int] = []
    model.train()
    running, t_train = 0.0, time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # a new epoch in a fresh seeded order
            order += torch.randperm(len(train_set), generator=generator).tolist()
        batch, order = [train_set[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        inputs, rows, index, targets = collate(batch, codec, cfg.noise_std, generator)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss = F.cross_entropy(supervised_logits(model, inputs, rows, index).float(), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimiser.step()
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = letter_accuracy(model, val_set, codec, 2 * cfg.batch_size)
            per_type = " ".join(f"{k}={v:.2f}" for k, v in acc.items() if k != "all")
            elapsed = time.perf_counter() - t_train
            print(f"step {step + 1}/{cfg.steps} loss {running:.3f} val {acc['all']:.2f} ({per_type}) {elapsed:.0f} s",
                  flush=True)
    model.eval()
    save(model, Path(cfg.out))
    total = time.perf_counter() - t0
    print(f"saved to {cfg.out}: prepare {t_prep:.0f} s, train {time.perf_counter() - t_train:.0f} s, "
          f"total {total:.0f} s", flush=True)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    train(parse_args())
