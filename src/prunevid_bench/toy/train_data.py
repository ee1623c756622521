"""The toy model's training data: every scene rendered, encoded as an mp4, decoded by
``load_clip`` and prepared once through ``Pipeline.prepare`` (``prepare_samples``), with its
question in every prompt form (``FORMS``, ``TEXT_FORMS``), its per-token scene labels
(``token_labels``) and its pixels cached as exact uint8 (``PixelCodec``)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prunevid_bench.models.tiny import byte_token_id
from prunevid_bench.toy.world import COLOURS, DIRECTIONS, LETTERS, SHAPES


# Byte tokens (the toy tokenizer keeps the byte ids): "(", ")" and "A" (B, C, D follow).
OPEN_ID, CLOSE_ID, LETTER_A_ID = (byte_token_id(c) for c in "()A")


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
    second_per_grid_ts: torch.Tensor | None  # [1]; None for Qwen3-VL (its timestamps are in the prompt)
    labels: torch.Tensor  # [V, len(AUX_HEADS) + 1] per merged visual token (t, row, col order), see token_labels
    target: int  # the object the question asks about (index into the scene's objects)
    answer_word: int  # the answer as an index into ANSWER_WORDS
    category: str


class PixelCodec:
    """Exact uint8 <-> pixel_values_videos, using the processor's own rescale and normalisation.

    The toy frames are already 112 px, so a Qwen2.5-VL processor only rescales and normalises;
    Qwen3-VL's resizes them to 128 px (see ``toy.model.QWEN3VL_MAX_PIXELS``) on the uint8
    frames, before rescaling. Either way the values map back to integers exactly (checked on
    every sample).
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
    "corner" (after the corner's name), the shape before "move" ("the green circle move") or
    "briefly" (world v2's "What appears briefly in the middle?")."""
    ids = input_ids.tolist()
    for word, offset in ((" moving", 0), (" corner", 0), (" move", -1), (" briefly", 0)):
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


def encoded_clip(task: tuple[int, int, str, str]):
    """(mp4 path, frame count, scene, question) of example ``index`` of the set drawn with
    ``seed``, rendered and written in ``tmp`` byte for byte as `prunevid toy-data` writes it.
    Runs in a worker process: encoding is most of the preparation's time."""
    from prunevid_bench.toy.world import encode_mp4, render_video, sample_example

    seed, index, tmp, world = task
    spec, question = sample_example(seed, index, world)
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
                    workers: int = 1, world: str = "v1") -> list[Sample]:
    """Render, encode, decode and process n scenes of the toy set drawn with ``seed`` in ``world``.
    ``workers`` processes render and encode (the samples do not depend on how many)."""
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
        clips = pool.map(encoded_clip, [(seed, i, tmp, world) for i in range(n)], chunksize=8)
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
                second_per_grid_ts=inputs.get("second_per_grid_ts"),
                labels=token_labels(spec, grid[0], len(clip.frames), clip.frames.shape[1]),
                target=question.target,
                answer_word=ANSWER_WORDS.index(word),
                category=question.category,
            ))
            if (i + 1) % 500 == 0 or i + 1 == n:
                print(f"  {label}: {i + 1}/{n} prepared ({time.perf_counter() - start:.0f} s)", flush=True)
    return samples
