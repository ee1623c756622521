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
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn.functional as F

from prunevid_bench.models.tiny import IM_END_ID, PAD_ID, VOCAB_SIZE, TinySizes, build_config, byte_token_id
from prunevid_bench.toy.model import toy_words
from prunevid_bench.toy.world import COLOURS, DIRECTIONS, LETTERS, SHAPES

# Byte tokens (the toy tokenizer keeps the byte ids): "(", ")" and "A" (B, C, D follow).
OPEN_ID, CLOSE_ID, LETTER_A_ID = (byte_token_id(c) for c in "()A")

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


def toy_config(attn_implementation: str = "sdpa"):
    config = build_config(TOY_SIZES, attn_implementation)
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
    # One torch thread: on the shared 2-core box a second thread spin-waits whenever another
    # process holds a core (measured 3x slower per step), and one thread gives the same bits on
    # any machine.
    threads: int = 1
    eval_every: int = 100  # steps between validation logs
    # Processes that render and encode the clips while the main one decodes them and runs the
    # processor (the samples do not depend on how many).
    prep_workers: int = 2


# The video prompts built for every training scene; only "mc" is ever evaluated.
#   mc:   the question with its four options, as `prunevid run --dataset` asks it; target: "word (letter)"
#   easy: the same, but the three distractors are words of other kinds (a shape and two directions
#         among colours, ...), so the text alone names the answer: it teaches pointing from the
#         right option to its letter before the model can see anything
FORMS = ("mc", "easy")
# Text-only prompts (no video) for the warm-up steps, which are ten times cheaper than video ones:
#   text_mc:    the question without its video: the word cannot be known, but its letter can
#   text_named: "Which option is <answer>?" with the real options: pointing at a named option
TEXT_FORMS = ("text_mc", "text_named")
ANSWER_WORDS = (*COLOURS, *SHAPES, *DIRECTIONS)
# Per visual token: which object covers most of it, as five label kinds (0 = no object).
AUX_HEADS = {"colour": 9, "shape": 5, "motion": 6, "row": 4, "col": 4}


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [L + A] the prompt, then the A answer tokens
    position_ids: torch.Tensor  # [4, L + A] text row + M-RoPE rows; the answer from the engine's first decode position on
    mm_token_type_ids: torch.Tensor  # [L + A]
    prompt_length: int  # L
    options: torch.Tensor | None = None  # [4] positions of the option words (multiple-choice forms)
    correct: int = -1  # which of them is the answer
    letter_at: int = -1  # the position that predicts the answer's letter (multiple-choice forms)
    anchor: int = -1  # the question word that names the object asked about (video forms; see anchor_position)
    naming: tuple[int, int] = (-1, -1)  # the two words that name the object asked about (see naming_positions)
    naming_level: int = 0  # the TrainConfig.naming_guide from which they are guided (0: never)

    @property
    def final(self) -> int:
        """The prompt's last position: it predicts the first answer token."""
        return self.prompt_length - 1


@dataclass
class Sample:
    """One prepared scene: its pixels and labels, and its question in every form of FORMS."""

    prompts: dict[str, Prompt]
    pixels: torch.Tensor  # [P, C * 2 * 14 * 14] uint8, the processor's pixel_values_videos before normalisation
    video_grid_thw: torch.Tensor  # [1, 3]
    second_per_grid_ts: torch.Tensor  # [1]
    labels: torch.Tensor  # [V, len(AUX_HEADS) + 1] per merged visual token (t, row, col order), see token_labels
    target: int  # the object the question asks about (index into the scene's objects)
    answer_word: int  # the answer as an index into ANSWER_WORDS
    category: str


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


def easy_options(options: tuple[str, ...], answer: str, rng) -> tuple[list[str], str]:
    """The options with the three distractors swapped for words of other kinds, the answer at a
    fresh random place. Returns (options, letter)."""
    correct = options[LETTERS.index(answer)]
    kinds = [tuple(COLOURS), SHAPES, DIRECTIONS]
    others = [w for k in kinds if correct not in k for w in k]
    distractors = [others[i] for i in rng.permutation(len(others))[:3]]
    position = int(rng.integers(4))
    return distractors[:position] + [correct] + distractors[position:], LETTERS[position]


def token_labels(spec, grid_thw: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """[V, 6] labels of the merged visual tokens of a rendered scene: the five of AUX_HEADS, then
    which object it shows (1 + its index in ``statics + movers``, 0 for none).

    A token covers 2 frames x 28 x 28 pixels; it is labelled with the object that covers most of
    it when that is at least a tenth of its pixels, else as background (0 in every object kind).
    """
    from prunevid_bench.toy.world import render_labels

    t, h, w = (int(x) for x in grid_thw)
    cell = size // (w // 2)
    ids = torch.from_numpy(render_labels(spec, frames, size).astype("int64")) + 1  # 0 = background
    blocks = ids.view(t, frames // t, h // 2, cell, w // 2, cell).permute(0, 2, 4, 1, 3, 5).reshape(-1, (frames // t) * cell * cell)
    objects = spec.statics + spec.movers
    counts = F.one_hot(blocks, len(objects) + 1)[..., 1:].sum(1)  # [V, objects]
    best = counts.argmax(1)
    covered = counts.max(1).values >= blocks.shape[1] // 10
    colour = torch.tensor([1 + list(COLOURS).index(o.colour) for o in objects])[best]
    shape = torch.tensor([1 + SHAPES.index(o.shape) for o in objects])[best]
    motion = torch.tensor([1 if o.direction is None else 2 + DIRECTIONS.index(o.direction) for o in objects])[best]
    zero = torch.zeros_like(best)
    cells = torch.arange(t * (h // 2) * (w // 2))
    row, col = (cells // (w // 2)) % (h // 2), cells % (w // 2)
    return torch.stack([torch.where(covered, colour, zero), torch.where(covered, shape, zero),
                        torch.where(covered, motion, zero), row, col, torch.where(covered, best + 1, zero)], dim=1)


def answer_tokens(tokenizer, word: str, letter: str) -> torch.Tensor:
    """The toy model's answer: the word, then its letter (ANSWER_FORMAT)."""
    from prunevid_bench.toy.model import ANSWER_FORMAT

    return torch.tensor(tokenizer.encode(ANSWER_FORMAT.format(word=word, letter=letter), add_special_tokens=False))


def make_prompt(prompt_ids: torch.Tensor, positions: torch.Tensor, mm_types: torch.Tensor, answer: torch.Tensor) -> Prompt:
    """A prompt [L] (positions [4, L]) with its answer tokens appended; the answer continues the
    positions one per token in every row, as the engine decodes."""
    n, a = prompt_ids.shape[0], answer.shape[0]
    steps = torch.arange(1, a + 1).view(1, a)
    return with_options(Prompt(
        input_ids=torch.cat([prompt_ids, answer]),
        position_ids=torch.cat([positions, positions[:, -1:] + steps], dim=1),
        mm_token_type_ids=torch.cat([mm_types, torch.zeros(a, dtype=torch.long)]),
        prompt_length=n,
    ))


def text_prompt(processor, text: str, answer: torch.Tensor) -> Prompt:
    """A prompt without video, in the same chat layout; its M-RoPE ids are the text positions."""
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    ids = torch.tensor(processor.tokenizer.encode(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))
    n = ids.shape[0]
    return make_prompt(ids, torch.arange(n).expand(4, n).clone(), torch.zeros(n, dtype=torch.long), answer)


def with_options(prompt: Prompt) -> Prompt:
    """Fill in where a multiple-choice prompt's option words are ("(", letter, ")", word), which
    is the answer and where its letter is predicted; other prompts are returned as they are."""
    ids = prompt.input_ids
    n = prompt.prompt_length
    letters = torch.tensor([ord(c) - ord("A") + LETTER_A_ID for c in LETTERS])
    close = torch.nonzero(ids[:n] == CLOSE_ID).flatten()
    close = close[(close >= 2) & (ids[close - 2] == OPEN_ID) & torch.isin(ids[close - 1], letters)]
    in_answer = torch.nonzero(torch.isin(ids[n:], letters)).flatten()
    if len(close) != len(LETTERS) or not len(in_answer):
        return prompt
    prompt.options = close + 1
    prompt.letter_at = n + int(in_answer[0]) - 1
    prompt.correct = int(ids[prompt.letter_at + 1]) - LETTER_A_ID
    return prompt


def anchor_position(tokenizer, input_ids: torch.Tensor) -> int:
    """The question word that singles out the object asked about: "moving" (the moving object),
    "corner" (after the corner's name) or the shape before "move" ("the green circle move")."""
    ids = input_ids.tolist()
    for word, offset in ((" moving", 0), (" corner", 0), (" move", -1)):
        token = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
        if len(token) == 1 and token[0] in ids:
            return ids.index(token[0]) + offset
    raise ValueError("no anchor word in the question")


def naming_positions(tokenizer, input_ids: torch.Tensor, anchor: int) -> tuple[tuple[int, int], int]:
    """The two words that name the object asked about, by the anchor, and the naming_guide level
    that guides them: a corner's name before " corner" ("top" "-" "left" "corner", level 1), or
    the colour and the shape itself in "the green circle move" (level 2); "the moving object"
    names none ((-1, -1), 0)."""
    def token(word: str) -> int:
        return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))[0]

    if int(input_ids[anchor]) == token(" corner"):
        return (anchor - 3, anchor - 1), 1
    if anchor + 1 < len(input_ids) and int(input_ids[anchor + 1]) == token(" move"):
        return (anchor - 1, anchor), 2
    return (-1, -1), 0


def encoded_clip(task: tuple[int, int, str]):
    """(mp4 path, frame count, scene, question) of example ``index`` of the set drawn with
    ``seed``, rendered and written in ``tmp`` byte for byte as `prunevid toy-data` writes it.
    Runs in a worker process: encoding is most of the preparation's time."""
    from prunevid_bench.toy.world import encode_mp4, render_video, sample_example

    seed, index, tmp = task
    spec, question = sample_example(seed, index)
    path = Path(tmp) / f"clip-{index}.mp4"
    frames = render_video(spec)
    encode_mp4(frames, path)
    return path, len(frames), spec, question


def swap_options(prompt: Prompt, tokenizer, options: list[str], answer: torch.Tensor) -> Prompt:
    """The same multiple-choice prompt with other option words (one token each, so the length
    and positions stay) and another answer: what the processor gives for that text, without
    running it on the video again."""
    ids = prompt.input_ids[:prompt.prompt_length].clone()
    words = [tokenizer.encode(f" {w}", add_special_tokens=False) for w in options]
    if any(len(w) != 1 for w in words):
        raise ValueError(f"an option of {options} is not one token")
    ids[prompt.options] = torch.tensor([w[0] for w in words])
    swapped = make_prompt(ids, prompt.position_ids[:, :prompt.prompt_length], prompt.mm_token_type_ids[:prompt.prompt_length], answer)
    swapped.anchor, swapped.naming, swapped.naming_level = prompt.anchor, prompt.naming, prompt.naming_level
    return swapped


def prepare_samples(pipe, codec: PixelCodec, n: int, seed: int, label: str, forms=FORMS + TEXT_FORMS,
                    workers: int = 1) -> list[Sample]:
    """Render, encode, decode and process n scenes of the toy set drawn with ``seed``. ``workers``
    processes render and encode (the samples do not depend on how many)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from prunevid_bench.engine import prefill_position_ids
    from prunevid_bench.choices import format_mc_prompt
    from prunevid_bench.toy.model import NAMED_QUESTION
    from prunevid_bench.toy.world import _check_set
    from prunevid_bench.video import load_clip

    _check_set(n, seed)
    tokenizer = pipe.processor.tokenizer
    rng = np.random.default_rng([seed, 1])
    samples = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        clips = pool.map(encoded_clip, [(seed, i, tmp) for i in range(n)], chunksize=8)
        for i, (path, frames, spec, question) in enumerate(clips):
            clip = load_clip(path, num_frames=frames)
            path.unlink()
            word = question.answer_text
            easy_opts, easy_letter = easy_options(question.options, question.answer, rng)
            mc_text = format_mc_prompt(question.question, question.options)
            mc_answer = answer_tokens(tokenizer, word, question.answer)
            inputs = pipe.prepare(clip, mc_text).inputs
            positions = prefill_position_ids(pipe.model, inputs)[:, 0]  # [4, L]
            mc = make_prompt(inputs["input_ids"][0], positions, inputs["mm_token_type_ids"][0], mc_answer)
            mc.anchor = anchor_position(tokenizer, mc.input_ids)
            mc.naming, mc.naming_level = naming_positions(tokenizer, mc.input_ids, mc.anchor)
            builders = {
                "mc": lambda: mc,
                "easy": lambda: swap_options(mc, tokenizer, easy_opts, answer_tokens(tokenizer, word, easy_letter)),
                "text_mc": lambda: text_prompt(pipe.processor, mc_text, mc_answer),
                "text_named": lambda: text_prompt(
                    pipe.processor, format_mc_prompt(NAMED_QUESTION.format(answer=word), question.options), mc_answer),
            }
            grid = inputs["video_grid_thw"]
            samples.append(Sample(
                prompts={form: builders[form]() for form in forms},
                pixels=codec.encode(inputs["pixel_values_videos"]),
                video_grid_thw=grid,
                second_per_grid_ts=inputs["second_per_grid_ts"],
                labels=token_labels(spec, grid[0], len(clip.frames), clip.frames.shape[1]),
                target=question.target,
                answer_word=ANSWER_WORDS.index(word),
                category=question.category,
            ))
            if (i + 1) % 500 == 0 or i + 1 == n:
                print(f"  {label}: {i + 1}/{n} prepared ({time.perf_counter() - start:.0f} s)", flush=True)
    return samples


def collate(batch: list[tuple[Sample, str]], codec: PixelCodec, noise_std: float = 0.0, generator=None):
    """Right-padded model inputs for (sample, form) pairs and the (row, index, target) of every
    supervised token. Right padding needs no attention mask: under the causal mask no real token
    sees a pad."""
    prompts = [s.prompts[form] for s, form in batch]
    length = max(p.input_ids.shape[0] for p in prompts)
    input_ids = torch.full((len(batch), length), PAD_ID, dtype=torch.long)
    mm_types = torch.zeros((len(batch), length), dtype=torch.long)
    # Pads continue every position row by one per token (the text row stays arange(length)).
    positions = torch.arange(length).view(1, 1, length).repeat(4, len(batch), 1)
    for row, p in enumerate(prompts):
        n = p.input_ids.shape[0]
        input_ids[row, :n] = p.input_ids
        mm_types[row, :n] = p.mm_token_type_ids
        positions[:, row, :n] = p.position_ids
        positions[1:, row, n:] += p.position_ids[1:, -1:] - (n - 1)
    inputs = dict(input_ids=input_ids, position_ids=positions, mm_token_type_ids=mm_types)
    samples = [s for s, form in batch if form not in TEXT_FORMS]
    if samples:
        assert len(samples) == len(batch), "a batch is all video prompts or all text prompts"
        inputs.update(
            pixel_values_videos=torch.cat([codec.decode(s.pixels, noise_std, generator) for s in samples]),
            video_grid_thw=torch.cat([s.video_grid_thw for s in samples]),
            second_per_grid_ts=torch.cat([s.second_per_grid_ts for s in samples]),
        )
    rows, index, targets = [], [], []
    for row, p in enumerate(prompts):
        # Each position from the prompt's last on predicts the next answer token; the last answer
        # token predicts <|im_end|>.
        answer = p.input_ids[p.prompt_length:].tolist()
        rows += [row] * (len(answer) + 1)
        index += list(range(p.final, p.final + len(answer) + 1))
        targets += answer + [IM_END_ID]
    with_opts = [(row, p) for row, p in enumerate(prompts) if p.options is not None]
    options = Options(
        torch.tensor([row for row, _ in with_opts], dtype=torch.long),
        torch.stack([p.options for _, p in with_opts]) if with_opts else torch.zeros(0, len(LETTERS), dtype=torch.long),
        torch.tensor([p.correct for _, p in with_opts], dtype=torch.long),
        torch.tensor([p.letter_at for _, p in with_opts], dtype=torch.long),
    )
    if samples:  # video prompts: where the visual tokens are, and which show the object asked about
        visual = torch.stack([torch.nonzero(p.mm_token_type_ids == 2).flatten() for p in prompts])
        target = torch.stack([s.labels[:, -1] == s.target + 1 for s in samples])
    else:
        visual = target = torch.zeros(len(batch), 0, dtype=torch.long)
    return inputs, Supervision(torch.tensor(rows), torch.tensor(index), torch.tensor(targets), options,
                               torch.tensor([p.final for p in prompts]),
                               torch.tensor([p.anchor for p in prompts]), torch.tensor([p.naming for p in prompts]),
                               torch.tensor([p.naming_level for p in prompts]), visual, target.bool(),
                               torch.tensor([s.answer_word for s, _ in batch]))


class Options(NamedTuple):
    rows: torch.Tensor  # [N] batch rows of the multiple-choice prompts
    positions: torch.Tensor  # [N, 4] their option words
    correct: torch.Tensor  # [N] index of the answer among them
    letter_at: torch.Tensor  # [N] the position that predicts the answer letter


class Supervision(NamedTuple):
    rows: torch.Tensor  # [M] batch row of each supervised token
    index: torch.Tensor  # [M] the position whose logits predict it
    targets: torch.Tensor  # [M]
    options: Options
    final: torch.Tensor  # [B] the prompt's last position, which predicts the answer word
    anchor: torch.Tensor  # [B] the question word naming the object asked about (-1 in text-only batches)
    naming: torch.Tensor  # [B, 2] the words naming the object asked about (-1 where none do)
    naming_level: torch.Tensor  # [B] from which TrainConfig.naming_guide they are guided (0: never)
    visual: torch.Tensor  # [B, V] positions of the visual tokens (V = 0 in a text-only batch)
    target: torch.Tensor  # [B, V] the visual tokens of the object the question asks about
    answer_word: torch.Tensor  # [B] the answer, index into ANSWER_WORDS


class VisualTap:
    """Keeps the vision tower's merged output (the LLM's visual embeddings) of the last forward."""

    def __init__(self, model):
        self.features = None
        self._hook = model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = output.pooler_output

    def remove(self):
        self._hook.remove()


def training_losses(model, option_head, word_head, inputs, sup: Supervision, naming_guide: int):
    """(answer loss, option loss, guide loss).

    The answer loss is on the supervised tokens (the LM head never sees the rest). The option
    loss asks each option word's final hidden state whether it is the answer (a softmax over
    the four). The attention loss guides five heads (``ATTENTION_GUIDES``): each option word
    looks back at its letter; the question word that names the object reads the words naming it
    ("top" "left" before "corner"; with ``naming_guide`` 2 also "green" in "the green circle");
    the same word (see anchor_position) looks at that object's visual tokens; the answer position looks at that question word, then
    at the option word that is the answer. The guide loss also asks the answer position for the
    answer word before the last layer (``word_head``). What to take from the object, and how to
    match it to an option, is left to learn.
    """
    out = model.model(**inputs, use_cache=False, output_attentions=True, output_hidden_states=True)
    hidden, attentions = out.last_hidden_state, out.attentions
    answer = F.cross_entropy(model.lm_head(hidden[sup.rows, sup.index]).float(), sup.targets)

    def attention(guide: str, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        layer, head = ATTENTION_GUIDES[guide]
        rows = rows.view(-1, *([1] * (queries.dim() - 1)))
        return attentions[layer][rows, head, queries].float()  # [N, ..., L]

    eps = 1e-6
    losses = []
    o = sup.options
    option = hidden.new_zeros(())
    if len(o.rows):
        scores = option_head(hidden[o.rows[:, None], o.positions]).squeeze(-1).float()  # [N, 4]
        option = F.cross_entropy(scores, o.correct)
        to_letter = attention("letter", o.rows, o.positions).gather(-1, (o.positions - 2)[..., None]).squeeze(-1)
        to_option = attention("answer", o.rows, o.letter_at).gather(-1, o.positions.gather(1, o.correct[:, None])).squeeze(-1)
        losses += [-(to_letter + eps).log().mean(), -(to_option + eps).log().mean()]
    shown = sup.target.any(-1)
    if shown.any():
        rows = torch.arange(len(sup.final))
        look = attention("object", rows, sup.anchor).gather(-1, sup.visual)  # [B, V]
        losses.append(-((look * sup.target).sum(-1)[shown] + eps).log().mean())
        to_anchor = attention("question", rows, sup.final).gather(-1, sup.anchor[:, None]).squeeze(-1)
        losses.append(-(to_anchor + eps).log().mean())
        # What the answer position holds before the last layer matches it to an option: the answer word.
        middle = out.hidden_states[ATTENTION_GUIDES["answer"][0]][rows, sup.final]
        losses.append(F.cross_entropy(word_head(middle).float(), sup.answer_word))
    named = (sup.naming_level > 0) & (sup.naming_level <= naming_guide)
    if named.any():  # the anchor reads the words that name its object
        rows = torch.nonzero(named).flatten()
        to_name = attention("naming", rows, sup.anchor[rows]).gather(-1, sup.naming[rows])  # [N, 2]
        losses.append(-(to_name + eps).log().mean())
    return answer, option, sum(losses) / max(1, len(losses))


# Guided heads as (layer, head).
ATTENTION_GUIDES = {"letter": (0, 1), "naming": (0, 2), "object": (1, 0), "question": (2, 0), "answer": (3, 0)}


@torch.no_grad()
def letter_accuracy(model, samples: list[Sample], codec: PixelCodec, batch_size: int) -> dict[str, float]:
    """Teacher-forced accuracy of the "mc" form: the answer word (the first generated token) and
    the letter after the right word, overall and per category (the log's view; the real test
    is `prunevid run --dataset`)."""
    model.eval()
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for i in range(0, len(samples), batch_size):
        batch = [(s, "mc") for s in samples[i:i + batch_size]]
        inputs, sup = collate(batch, codec)
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        rows = torch.arange(len(batch))
        ids = inputs["input_ids"]
        word = model.lm_head(hidden[rows, sup.final]).argmax(-1) == ids[rows, sup.final + 1]
        at = sup.options.letter_at
        letter = model.lm_head(hidden[rows, at]).argmax(-1) == ids[rows, at + 1]
        for (s, _), w, l in zip(batch, word.tolist(), letter.tolist()):
            hits[s.category].append((w, l))
            hits["all"].append((w, l))
    model.train()
    return {k: (sum(w for w, _ in v) / len(v), sum(w and l for w, l in v) / len(v)) for k, v in sorted(hits.items())}


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


def aux_loss(heads: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the per-token scene labels, one linear head per label kind."""
    logits = heads(features.float()).split(list(AUX_HEADS.values()), dim=-1)
    return sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits)) / len(AUX_HEADS)


def linear_patch_embedding(model) -> None:
    """Compute the vision tower's patch embedding as the matrix product it is (its Conv3d's kernel
    is its stride, one output per patch): the same result up to float rounding, where the CPU's
    convolution took a fifth of a training step. Training only; the saved weights are unchanged."""
    embed = model.model.visual.patch_embed

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = embed.proj.weight
        return F.linear(hidden_states.to(weight.dtype).view(-1, weight[0].numel()), weight.view(weight.shape[0], -1))

    embed.forward = forward


def train(cfg: TrainConfig) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from prunevid_bench.config import RunConfig
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.toy.model import build_toy_processor

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.init_seed)
    t0 = time.perf_counter()
    config = toy_config("eager")  # training reads attention weights (see training_losses)
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = cfg.init_std
    model = Qwen2_5_VLForConditionalGeneration(config)
    linear_patch_embedding(model)
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    # Training-only heads, not saved: the per-token scene labels, and "is this option the answer".
    heads = torch.nn.Linear(TOY_SIZES.hidden_size, sum(AUX_HEADS.values()))
    option_head = torch.nn.Linear(TOY_SIZES.hidden_size, 1)
    word_head = torch.nn.Linear(TOY_SIZES.hidden_size, len(ANSWER_WORDS))
    processor = build_toy_processor()
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    # The inference pipeline itself builds the prompts and runs the processor.
    pipe = Pipeline(LoadedModel(model, processor, "toy", video_policy="processor"), RunConfig())
    codec = PixelCodec(processor)
    print(f"toy model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    train_set = prepare_samples(pipe, codec, cfg.n_train, cfg.train_seed, "train", workers=cfg.prep_workers)
    val_set = prepare_samples(pipe, codec, cfg.n_val, cfg.val_seed, "val", forms=("mc",), workers=cfg.prep_workers)
    t_prep = time.perf_counter() - t0
    print(f"prepared {len(train_set)} training scenes ({'/'.join(FORMS)}) + {len(val_set)} val questions "
          f"in {t_prep:.0f} s", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n] + [heads.weight, option_head.weight, word_head.weight]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n] + [heads.bias, option_head.bias, word_head.bias]
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
        answer, option, guide = training_losses(model, option_head, word_head, inputs, sup, cfg.naming_guide)
        update(answer + cfg.option_weight * option + cfg.attention_weight * guide, step)
        losses = smooth(step, loss=answer)
        if (step + 1) % cfg.eval_every == 0:
            print(f"text step {step + 1}/{cfg.text_steps} {losses} {time.perf_counter() - t_train:.0f} s", flush=True)
    order: list[int] = []
    video_steps = cfg.steps + cfg.tail_steps
    for step in range(video_steps):
        batch = [(train_set[i], form) for i, form in zip(draw(order, cfg.batch_size), batch_forms(cfg, step))]
        inputs, sup = collate(batch, codec, cfg.noise_std, generator)
        answer, option, guide = training_losses(model, option_head, word_head, inputs, sup, cfg.naming_guide)
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
