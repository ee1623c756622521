"""The shipped ``toy`` model: its tokenizer, its training labels, and real accuracy on held-out questions.

The accuracy check runs the CLI a user would run (`prunevid run --dataset`, greedy generation and
the letter parser) on questions generated here with a seed that training never used, so a broken
position id, decode loop or processor change shows as lost accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.errors import PruneVidError
from prunevid_bench.choices import format_mc_prompt
from prunevid_bench.models.tiny import SPECIAL_TOKENS, VOCAB_SIZE, build_processor
from prunevid_bench.toy.model import ASSET_DIR, build_toy_processor, load_toy_model, toy_words
from prunevid_bench.toy.train import (
    AUX_HEADS, CLOSE_ID, LETTER_A_ID, OPEN_ID, TOY_SIZES, PixelCodec, answer_tokens, linear_patch_embedding,
    prepare_samples, text_prompt, token_labels, toy_config,
)
from prunevid_bench.toy.world import COLOURS, DIRECTIONS, SHAPES, ObjectSpec, VideoSpec, generate_dataset

runner = CliRunner()
HELD_OUT_SEED = 5  # training uses 1000, its validation 999


def test_every_toy_word_is_one_token_and_bytes_keep_their_ids():
    toy, tiny = build_toy_processor().tokenizer, build_processor().tokenizer
    assert len(toy) == VOCAB_SIZE + len(toy_words()) == TOY_SIZES.vocab_size
    for word in [*COLOURS, *SHAPES, *DIRECTIONS]:
        assert len(toy.encode(word)) == 1 and len(toy.encode(f" {word}")) == 1, word
    for token in [*SPECIAL_TOKENS, "A", "B", "C", "D"]:
        assert toy.convert_tokens_to_ids(token) == tiny.convert_tokens_to_ids(token)
    prompt = format_mc_prompt("In which direction does the green circle move?", ["left", "up", "down", "right"])
    ids = toy.encode(prompt)
    assert toy.decode(ids) == prompt and len(ids) < len(tiny.encode(prompt)) / 3
    # Text outside the toy vocabulary still round-trips, one byte per token.
    assert toy.decode(toy.encode("Wie heißt das? 42")) == "Wie heißt das? 42"


def test_token_labels_of_a_hand_built_scene():
    # A red square filling the top-left merged token, a blue circle moving right along row 2.
    still = ObjectSpec("red", "square", 28 / 112, (14 / 112, 14 / 112), (14 / 112, 14 / 112), corner="top-left")
    mover = ObjectSpec("blue", "circle", 28 / 112, (14 / 112, 70 / 112), (98 / 112, 70 / 112), direction="right")
    spec = VideoSpec((30, 30, 30), (0.0, 0.0, 0.0, 0.0), (still,), (mover,))
    labels = token_labels(spec, torch.tensor([8, 8, 8]), frames=16, size=112).view(8, 4, 4, len(AUX_HEADS) + 1)
    red, blue = 1 + list(COLOURS).index("red"), 1 + list(COLOURS).index("blue")
    assert labels[:, 0, 0].tolist() == [[red, 1 + SHAPES.index("square"), 1, 0, 0, 1]] * 8  # static: motion 1
    assert labels[0, 2, 0, :3].tolist() == [blue, 1 + SHAPES.index("circle"), 2 + DIRECTIONS.index("right")]
    assert labels[7, 2, 3, :3].tolist() == [blue, 1 + SHAPES.index("circle"), 2 + DIRECTIONS.index("right")]
    assert labels[0, 2, 3, :3].tolist() == [0, 0, 0]  # not there yet: background
    assert labels[:, 3, 3, :3].eq(0).all()  # never covered
    assert labels[3, 1, 2, 3:].tolist() == [1, 2, 0]  # row, col, no object
    assert labels[0, 2, 0, 5] == labels[7, 2, 3, 5] == 2  # the mover is object 2 (after the static)


def test_option_words_and_what_they_name():
    processor = build_toy_processor()
    assert processor.tokenizer.convert_tokens_to_ids(["(", ")", "A"]) == [OPEN_ID, CLOSE_ID, LETTER_A_ID]
    prompt = format_mc_prompt("What colour is the moving object?", ["red", "up", "circle", "blue"])
    answer = answer_tokens(processor.tokenizer, "blue", "D")
    assert processor.tokenizer.decode(answer) == "blue (D)" and len(answer) == 4  # blue, " (", D, )
    p = text_prompt(processor, prompt, answer)
    words = [processor.tokenizer.decode([int(p.input_ids[i])]) for i in p.options]
    assert words == [" red", " up", " circle", " blue"] and p.correct == 3
    # Option k's letter two tokens before it: what the "letter" guide and the tail letter loss ask for.
    assert [processor.tokenizer.decode([int(p.input_ids[i - 2])]) for i in p.options] == ["A", "B", "C", "D"]
    assert p.input_ids[p.final + 1] == answer[0] and p.input_ids[p.letter_at + 1] == LETTER_A_ID + 3
    assert text_prompt(processor, "What colour?", answer).options is None


def toy_pipeline(world: str = "v1", layers: int = 4, attn_implementation: str = "sdpa"):
    """An untrained toy-shaped pipeline (seed 0) and its pixel codec: ``toy``'s shape by default,
    ``toy8``'s with ``world="v2", layers=8``."""
    from prunevid_bench.config import RunConfig
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.pipeline import Pipeline
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    processor = build_toy_processor(world)
    model = Qwen2_5_VLForConditionalGeneration(toy_config(attn_implementation, layers, world)).eval()
    return Pipeline(LoadedModel(model, processor, "toy", video_policy="processor"), RunConfig()), PixelCodec(processor)


def test_prepared_samples_are_what_inference_sees_whatever_the_workers():
    """The "easy" form swaps option words into the processed "mc" prompt instead of running the
    processor again: its ids must be the processor's for that text. The words naming the object
    are found, and the number of encoding processes changes nothing."""
    from prunevid_bench.toy.train import easy_options
    from prunevid_bench.toy.world import iter_specs
    import numpy as np

    pipe, codec = toy_pipeline()
    tokenizer = pipe.processor.tokenizer
    one, two = (prepare_samples(pipe, codec, 6, HELD_OUT_SEED, "t", workers=w) for w in (1, 2))
    rng = np.random.default_rng([HELD_OUT_SEED, 1])  # the draws prepare_samples makes
    for a, b, (_, _, question) in zip(one, two, iter_specs(6, HELD_OUT_SEED)):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels)
        for form in a.prompts:
            assert torch.equal(a.prompts[form].input_ids, b.prompts[form].input_ids), form
        options, letter = easy_options(question.options, question.answer, rng)
        expected = pipe.prepare(np.zeros((16, 112, 112, 3), np.uint8), format_mc_prompt(question.question, options))
        easy = a.prompts["easy"]
        assert torch.equal(easy.input_ids[:easy.prompt_length], expected.inputs["input_ids"][0])
        assert tokenizer.decode(easy.input_ids[easy.prompt_length:]) == f"{question.answer_text} ({letter})"
        assert torch.equal(easy.position_ids, a.prompts["mc"].position_ids)
        naming = [tokenizer.decode([int(easy.input_ids[i])]) for i in easy.naming if i >= 0]
        if question.category.startswith("corner"):
            top, left = naming
            assert f"{top.strip()}-{left} corner" in question.question and easy.naming_level == 1
        elif question.category == "direction":
            colour, shape = naming
            assert f"the{colour}{shape} move?" in question.question and easy.naming_level == 2
        else:
            assert easy.naming == (-1, -1) and easy.naming_level == 0


def test_looks_are_the_asked_objects_colour_shape_and_motion():
    """``Supervision.looks`` (what looks_head asks the anchor for) is the object the question names,
    read from the scene's spec, not from any other object on screen."""
    from prunevid_bench.toy.train_losses import collate
    from prunevid_bench.toy.world import iter_specs

    pipe, codec = toy_pipeline()
    samples = prepare_samples(pipe, codec, 6, HELD_OUT_SEED, "t", workers=1)
    _, sup = collate([(s, "mc") for s in samples], codec)
    for looks, (_, video, question) in zip(sup.looks.tolist(), iter_specs(6, HELD_OUT_SEED)):
        obj = (video.statics + video.movers)[question.target]
        motion = 1 if obj.direction is None else 2 + DIRECTIONS.index(obj.direction)
        assert looks == [1 + list(COLOURS).index(obj.colour), 1 + SHAPES.index(obj.shape), motion]


def test_tail_steps_add_a_second_cosine_after_an_unchanged_schedule():
    from prunevid_bench.toy.train import TrainConfig, learning_rate

    plain, tailed = TrainConfig(tail_steps=0), TrainConfig(tail_steps=400, tail_lr_ratio=0.3)
    main = plain.text_steps + plain.steps
    assert all(learning_rate(plain, s) == learning_rate(tailed, s) for s in range(main))
    assert learning_rate(tailed, plain.warmup_steps - 1) == tailed.lr
    assert learning_rate(tailed, main - 1) == pytest.approx(tailed.min_lr_ratio * tailed.lr, rel=1e-3)
    assert learning_rate(tailed, main) == pytest.approx(0.3 * tailed.lr)
    assert learning_rate(tailed, main + 399) == pytest.approx(tailed.min_lr_ratio * tailed.lr, rel=1e-3)


def test_linear_patch_embedding_is_the_convolution():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(toy_config())
    pixels = torch.randn(64, 3 * 2 * 14 * 14)
    conv = model.model.visual.patch_embed(pixels)
    linear_patch_embedding(model)
    torch.testing.assert_close(model.model.visual.patch_embed(pixels), conv, rtol=1e-5, atol=1e-5)


def test_vision_depth_option_builds_a_deeper_tower_and_refuses_qwen3vl():
    from prunevid_bench.toy.train import parse_args

    cfg = parse_args(["--vision-depth", "4", "--layers", "8"])
    vision = toy_config(layers=cfg.layers, vision_depth=cfg.vision_depth).vision_config
    assert (vision.depth, vision.fullatt_block_indexes) == (4, [3])
    assert toy_config().vision_config.depth == TOY_SIZES.vision_depth == parse_args([]).vision_depth
    with pytest.raises(SystemExit):
        parse_args(["--family", "qwen3-vl", "--vision-depth", "4"])


def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(PruneVidError, match="run `make toy-model`"):
        load_toy_model(asset_dir=tmp_path)


@pytest.mark.skipif(not (ASSET_DIR / "model.safetensors").is_file(), reason="toy weights not trained")
def test_shipped_weights_are_small_and_match_the_tokenizer():
    weights = ASSET_DIR / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    model, processor = load_toy_model()
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_toy_model_answers_held_out_questions(tmp_path):
    """At least 85% on 40 questions from an unseen seed (chance is 25%; the shipped model scores
    95%, the issue asks for 70%), and at least 5 of the 8 questions of every category."""
    data = generate_dataset(tmp_path / "data", 40, seed=HELD_OUT_SEED)
    res = runner.invoke(app, ["run", "--dataset", str(data), "--model", "toy", "--device", "cpu",
                              "--max-new-tokens", "6", "--results-dir", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "results").iterdir()
    accuracy = json.loads((run_dir / "summary.json").read_text())["accuracy"]
    assert accuracy["n"] == 40 and accuracy["accuracy"] >= 0.85, accuracy
    assert all(c["accuracy"] >= 5 / 8 for c in accuracy["by_category"].values()), accuracy["by_category"]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["parse_status"] == "parsed" for r in rows)
