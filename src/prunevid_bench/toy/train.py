"""Train the ``toy`` model: a tiny Qwen2.5-VL learnt from scratch on the toy world, on a CPU.

    python -m prunevid_bench.toy.train --out src/prunevid_bench/assets/toy

Every training sample goes through the inference path: the rendered clip is written as an mp4
and decoded by ``load_clip`` (so the model learns the codec's colour error), then
``Pipeline.prepare`` builds the prompt and runs the processor, and ``prefill_position_ids`` gives
the M-RoPE ids the engine uses. The answer ("up (C)", see ``ANSWER_FORMAT``) is appended at the
engine's first decode position; the loss is on its tokens and the ``<|im_end|>`` after them, plus
the training-only losses of ``training_losses`` and ``aux_loss`` (recipe: docs/toy-model.md).

All samples are prepared once and kept in memory (pixels as exact uint8, a quarter of float32).
Seeds fix the data, the initialisation, the batch order and the noise, and the clips' bytes are
reproducible (`encode_mp4`), so a run on the same machine and thread count reproduces the weights
bit for bit (two short runs gave identical weights).

The data: ``toy.train_data``; the batches and losses: ``toy.train_losses``; here the model, the
schedule and the loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prunevid_bench.models.tiny import IM_END_ID, PAD_ID, VOCAB_SIZE, TinySizes, build_config
from prunevid_bench.toy.model import toy_model_class, toy_words
from prunevid_bench.toy.world import LETTERS
from prunevid_bench.toy.train_data import (  # noqa: F401 - the data's names are importable from here too
    ANSWER_WORDS,
    AUX_HEADS,
    CLOSE_ID,
    FORMS,
    LETTER_A_ID,
    OPEN_ID,
    TEXT_FORMS,
    PixelCodec,
    Prompt,
    Sample,
    anchor_position,
    answer_tokens,
    easy_options,
    encoded_clip,
    make_prompt,
    naming_positions,
    prepare_samples,
    swap_options,
    text_prompt,
    token_labels,
    with_options,
)
from prunevid_bench.toy.train_losses import (  # noqa: F401 - and the losses'
    ATTENTION_GUIDES,
    OBJECT_LOOKS,
    Options,
    Supervision,
    VisualTap,
    aux_loss,
    collate,
    guides_for,
    hold_pointer,
    pointer_heads,
    letter_accuracy,
    training_losses,
)

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
    vocab_size=VOCAB_SIZE + len(toy_words()),  # bytes, special tokens, then one token per toy word
)
# One attention window per 112-px frame (Qwen's default 112 px window, in pixels). The ViT then
# attends within each frame in every block, as its full-attention block does anyway.
VISION_WINDOW = 112


def toy_config(attn_implementation: str = "sdpa", layers: int = 4, world: str = "v1", family: str = "qwen2.5-vl",
               vision_depth: int = TOY_SIZES.vision_depth):
    """The toy's config; ``toy8`` is the same shape with 8 layers and the v2 world's words, and
    ``toy-qwen3vl`` the same LLM in a Qwen3-VL (``tiny-qwen3vl``'s vision tower at the toy's
    width: patch 16, three blocks, DeepStack features from the first two added after LLM layers
    0 and 1; no attention windows)."""
    sizes = dataclasses.replace(TOY_SIZES, num_hidden_layers=layers, vision_depth=vision_depth,
                                vocab_size=VOCAB_SIZE + len(toy_words(world, family)))
    if family == "qwen3-vl":
        from prunevid_bench.models.tiny_qwen3vl import build_qwen3vl_config

        return build_qwen3vl_config(sizes, attn_implementation)
    config = build_config(sizes, attn_implementation)
    config.vision_config.window_size = VISION_WINDOW
    return config


@dataclass
class TrainConfig:
    out: str = "src/prunevid_bench/assets/toy"  # where config.json and model.safetensors go
    train_seed: int = 1000  # toy-world seed of the training set (held-out sets use other seeds)
    n_train: int = 3000  # distinct training scenes (each prepared once, reused every epoch)
    val_seed: int = 999  # toy-world seed of the validation set logged during training
    n_val: int = 100  # validation questions (teacher-forced letter accuracy, for the log only)
    steps: int = 1000  # optimiser steps on video prompts
    # Then tail_steps more video steps, their learning rate a second cosine from tail_lr_ratio * lr
    # (the main schedule, and so the run up to there, is the same with or without them).
    tail_steps: int = 400
    tail_lr_ratio: float = 0.3
    batch_size: int = 16
    lr: float = 2e-3  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    noise_std: float = 2.0  # Gaussian pixel noise on top of the codec's, in 0-255 units
    # The batch mixes the forms of each question (see FORMS): the share of "easy" falls from
    # easy_start to easy_end over the first easy_steps steps, "mc" is the rest.
    easy_start: float = 0.25
    easy_end: float = 0.0
    easy_steps: int = 300
    aux_weight: float = 1.0  # weight of the per-token scene losses on the vision tower's output
    option_weight: float = 1.0  # weight of the "which option word is the answer" loss in the text warm-up
    video_option_weight: float = 0.0  # the same in the video steps
    attention_weight: float = 1.0  # weight of the guided-attention loss (see training_losses)
    # Guide the anchor to the words that name the object in layer 0 (ATTENTION_GUIDES["naming"]):
    # 0 never, 1 in corner questions ("top", "left"), 2 also in direction questions ("green", "circle").
    naming_guide: int = 2
    text_steps: int = 400  # warm-up steps on text-only prompts (TEXT_FORMS) before the video steps
    text_batch_size: int = 32
    init_seed: int = 0  # model initialisation, batch order and noise
    # Weight init std (Qwen's 0.02 leaves a 128-wide model's attention uniform for hundreds of
    # steps: pointing from an option to its letter was learnt at 0.08, not at 0.02).
    init_std: float = 0.08
    # The LLM layers' residual-branch outputs (o_proj, down_proj) start at this times init_std
    # (GPT-2's 1/sqrt(2 x layers) keeps the token embeddings from drowning in 8 layers' noise).
    residual_init_scale: float = 1.0
    # In this many first layers the text after the video is trained not to read the visual tokens
    # (train_losses.late_reading_loss), except through the "select" head, a pointer whose output is
    # held at zero (hold_pointer): 0 never; 4 on toy8 keeps all reading after layer 3, where the
    # presets' "10/28" prunes, so which tokens survive decides the answer.
    late_reading: int = 0
    # Above 0: the anchor, right after the "object" layer, is also asked for its object's colour,
    # shape and motion (train_losses.OBJECT_LOOKS), a guide on what that head reads, not only where
    # it looks; this many times one guide's weight.
    looks_weight: float = 0.0
    # Above 0 (toy8 only): the prompt's last position is guided, in a layer-0 head held at zero
    # like the select head, to look at every object (train_losses "glance"): the salience that
    # FastV's layer-0 score (K = 1 on 8 layers) can read; this many times one guide's weight.
    glance_weight: float = 0.0
    # Above 0: in the tail steps only, each option word, at the input of the layer whose "answer"
    # head reads it, is also asked for its own letter (a linear head): the letter the answer head
    # copies must still be there after the layers that read the video; this many times one
    # guide's weight. The run up to the tail is the same bits with or without it.
    tail_letter_weight: float = 0.0
    # One torch thread: on the shared 2-core box a second thread spin-waits whenever another
    # process holds a core (measured 3x slower per step), and one thread gives the same bits on
    # any machine.
    threads: int = 1
    eval_every: int = 100  # steps between validation logs
    # Processes that render and encode the clips while the main one decodes them and runs the
    # processor (the samples do not depend on how many).
    prep_workers: int = 2
    vision_depth: int = TOY_SIZES.vision_depth  # ViT blocks (Qwen2.5-VL family; the last one is its full-attention block)
    layers: int = 4  # LLM layers: 4 for ``toy``, 8 for ``toy8`` (guides_for places the guided heads)
    world: str = "v1"  # toy world of the training and validation scenes: v1, or v2 for ``toy8``
    family: str = "qwen2.5-vl"  # the model family: qwen2.5-vl (``toy``, ``toy8``) or qwen3-vl (``toy-qwen3vl``)
    save_dtype: str = "float32"  # dtype of the saved weights (``toy8`` ships float16: half the size)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, a cosine from lr to min_lr_ratio * lr over the text and video steps, then
    over the tail steps a second cosine from tail_lr_ratio * lr down to the same floor."""
    def cosine(top: float, progress: float) -> float:
        return cfg.lr * (cfg.min_lr_ratio + (top - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    main = cfg.text_steps + cfg.steps
    if step < main:
        return cosine(1.0, (step - cfg.warmup_steps) / max(1, main - cfg.warmup_steps))
    return cosine(cfg.tail_lr_ratio, (step - main) / max(1, cfg.tail_steps))


def save(model, out: Path) -> None:
    from safetensors.torch import save_file

    from prunevid_bench.toy.model import CONFIG_FILE, WEIGHTS_FILE

    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(out / CONFIG_FILE), use_diff=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def easy_share(cfg: TrainConfig, step: int) -> float:
    progress = min(1.0, step / max(1, cfg.easy_steps))
    return cfg.easy_start + (cfg.easy_end - cfg.easy_start) * progress


def batch_forms(cfg: TrainConfig, step: int) -> list[str]:
    n_easy = round(cfg.batch_size * easy_share(cfg, step))
    return ["easy"] * n_easy + ["mc"] * (cfg.batch_size - n_easy)


@torch.no_grad()
def scale_residual_init(model, scale: float) -> None:
    """Scale the initial weights of what each LLM layer adds to the residual stream (attention's
    o_proj, the MLP's down_proj); 1.0 leaves the model as it is."""
    if scale != 1.0:
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)


def linear_patch_embedding(model) -> None:
    """Compute the vision tower's patch embedding as the matrix product it is (its Conv3d's kernel
    is its stride, one output per patch; Qwen3-VL's has a bias): the same result up to float
    rounding, where the CPU's convolution took a fifth of a training step. Training only; the
    saved weights are unchanged."""
    embed = model.model.visual.patch_embed

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = embed.proj.weight
        return F.linear(hidden_states.to(weight.dtype).view(-1, weight[0].numel()), weight.view(weight.shape[0], -1),
                        embed.proj.bias)

    embed.forward = forward


def train(cfg: TrainConfig) -> None:
    from prunevid_bench.config import RunConfig
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.toy.model import build_toy_processor

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.init_seed)
    t0 = time.perf_counter()
    config = toy_config("eager", cfg.layers, cfg.world, cfg.family, cfg.vision_depth)  # training reads attention weights (see training_losses)
    guides = guides_for(cfg.layers)
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = cfg.init_std
    model = toy_model_class(cfg.family)(config)
    scale_residual_init(model, cfg.residual_init_scale)
    if cfg.late_reading:
        for pointer in pointer_heads(guides, cfg.glance_weight):
            hold_pointer(model, pointer)
    linear_patch_embedding(model)
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    # Training-only heads, not saved: the per-token scene labels, and "is this option the answer".
    heads = torch.nn.Linear(TOY_SIZES.hidden_size, sum(AUX_HEADS.values()))
    option_head = torch.nn.Linear(TOY_SIZES.hidden_size, 1)
    word_head = torch.nn.Linear(TOY_SIZES.hidden_size, len(ANSWER_WORDS))
    # Made only when asked for, so that the default run draws the same random numbers as before.
    looks_head = torch.nn.Linear(TOY_SIZES.hidden_size, sum(AUX_HEADS[k] for k in OBJECT_LOOKS)) if cfg.looks_weight else None
    letter_head = None
    if cfg.tail_letter_weight:
        with torch.random.fork_rng():  # its own seed: the global random stream stays as without it
            torch.manual_seed(cfg.init_seed)
            letter_head = torch.nn.Linear(TOY_SIZES.hidden_size, len(LETTERS))
    processor = build_toy_processor(cfg.world, cfg.family)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    # The inference pipeline itself builds the prompts and runs the processor.
    pipe = Pipeline(LoadedModel(model, processor, "toy", video_policy="processor"), RunConfig())
    codec = PixelCodec(processor)
    print(f"toy model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    train_set = prepare_samples(pipe, codec, cfg.n_train, cfg.train_seed, "train", workers=cfg.prep_workers, world=cfg.world)
    val_set = prepare_samples(pipe, codec, cfg.n_val, cfg.val_seed, "val", forms=("mc",), workers=cfg.prep_workers,
                              world=cfg.world)
    t_prep = time.perf_counter() - t0
    print(f"prepared {len(train_set)} training scenes ({'/'.join(FORMS)}) + {len(val_set)} val questions "
          f"in {t_prep:.0f} s", flush=True)

    extra = [heads, option_head, word_head] + [h for h in (looks_head, letter_head) if h is not None]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n] + [h.weight for h in extra]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n] + [h.bias for h in extra]
    params = decay + no_decay
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    generator = torch.Generator().manual_seed(cfg.init_seed)
    tap = VisualTap(model)

    def draw(order: list[int], k: int) -> list[int]:
        """The next k scenes of a seeded epoch order (a new epoch when it runs short)."""
        if len(order) < k:
            order += torch.randperm(len(train_set), generator=generator).tolist()
        picked = order[:k]
        del order[:k]
        return picked

    def update(loss: torch.Tensor, step: int) -> None:
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimiser.step()

    model.train()
    t_train = time.perf_counter()
    running: dict[str, float] = {}

    def smooth(step: int, **values: torch.Tensor) -> str:
        for name, value in values.items():
            running[name] = value.item() if step == 0 else 0.95 * running[name] + 0.05 * value.item()
        return " ".join(f"{name} {running[name]:.3f}" for name in values)

    text_order: list[int] = []
    for step in range(cfg.text_steps):  # warm-up: text-only prompts, no vision tower
        picked = draw(text_order, cfg.text_batch_size)
        inputs, sup = collate([(train_set[i], TEXT_FORMS[k % len(TEXT_FORMS)]) for k, i in enumerate(picked)], codec)
        answer, option, guide = training_losses(model, option_head, word_head, inputs, sup, cfg.naming_guide, guides)
        update(answer + cfg.option_weight * option + cfg.attention_weight * guide, step)
        losses = smooth(step, loss=answer)
        if (step + 1) % cfg.eval_every == 0:
            print(f"text step {step + 1}/{cfg.text_steps} {losses} {time.perf_counter() - t_train:.0f} s", flush=True)
    order: list[int] = []
    video_steps = cfg.steps + cfg.tail_steps
    for step in range(video_steps):
        batch = [(train_set[i], form) for i, form in zip(draw(order, cfg.batch_size), batch_forms(cfg, step))]
        inputs, sup = collate(batch, codec, cfg.noise_std, generator)
        tail = step >= cfg.steps
        answer, option, guide = training_losses(model, option_head, word_head, inputs, sup, cfg.naming_guide, guides,
                                                cfg.late_reading, looks_head, cfg.looks_weight, cfg.glance_weight,
                                                letter_head if tail else None, cfg.tail_letter_weight)
        scene = aux_loss(heads, tap.features, torch.cat([s.labels for s, _ in batch]))
        update(answer + cfg.video_option_weight * option + cfg.attention_weight * guide + cfg.aux_weight * scene,
               cfg.text_steps + step)
        losses = smooth(step, loss=answer, option=option, guide=guide, scene=scene)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == video_steps:
            acc = letter_accuracy(model, val_set, codec, 2 * cfg.batch_size)
            per_type = " ".join(f"{k}={w:.2f}/{b:.2f}" for k, (w, b) in acc.items() if k != "all")
            elapsed = time.perf_counter() - t_train
            print(f"step {step + 1}/{video_steps} {losses} val word/both {acc['all'][0]:.2f}/{acc['all'][1]:.2f} "
                  f"({per_type}) {elapsed:.0f} s", flush=True)
    tap.remove()
    model.eval()
    save(model.to(getattr(torch, cfg.save_dtype)), Path(cfg.out))
    total = time.perf_counter() - t0
    print(f"saved to {cfg.out}: prepare {t_prep:.0f} s, train {time.perf_counter() - t_train:.0f} s, "
          f"total {total:.0f} s", flush=True)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.family == "qwen3-vl" and cfg.vision_depth != TOY_SIZES.vision_depth:
        parser.error("--vision-depth applies to the qwen2.5-vl family; qwen3-vl's tower is tiny-qwen3vl's (3 blocks)")
    if cfg.glance_weight and not (cfg.layers == 8 and cfg.late_reading):
        parser.error("--glance-weight guides a layer-0 head of toy8's recipe: it needs --layers 8 and --late-reading")
    return cfg


if __name__ == "__main__":
    train(parse_args())
