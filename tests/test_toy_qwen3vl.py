"""``toy-qwen3vl``: the toy recipe on a Qwen3-VL (DeepStack, timestamps in the prompt): its words,
its pixel cache, a short training run whose weights load and answer through the CLI, and, with
the shipped weights, its accuracy on held-out questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.choices import format_mc_prompt
from prunevid_bench.cli import app
from prunevid_bench.config import RunConfig
from prunevid_bench.errors import PruneVidError
from prunevid_bench.models.loading import LoadedModel
from prunevid_bench.pipeline import Pipeline
from prunevid_bench.toy.model import TOY_QWEN3VL_DIR, build_toy_processor, load_toy_model, toy_words
from prunevid_bench.toy.train import TrainConfig, linear_patch_embedding, toy_config, toy_model_class, train
from prunevid_bench.toy.train_data import PixelCodec
from prunevid_bench.toy.world import encode_mp4, generate_dataset, render_video, sample_example
from prunevid_bench.video import load_clip

HELD_OUT_SEED = 5  # training uses 1000, its validation 999
QWEN3 = "qwen3-vl"


def test_qwen3_words_extend_the_toy_vocabulary_with_its_timestamps():
    v1, q3 = toy_words(), toy_words("v1", QWEN3)
    assert q3[:len(v1)] == v1 and len(q3) > len(v1)  # the shipped toy's ids are unchanged
    tokenizer = build_toy_processor("v1", QWEN3).tokenizer
    assert tokenizer.tokenize("<1.9 seconds>") == ["<", "1", ".", "9", "Ġseconds", ">"]
    config = toy_config("sdpa", 4, "v1", QWEN3)
    assert config.model_type == "qwen3_vl" and config.text_config.vocab_size == len(tokenizer)
    assert config.vision_config.deepstack_visual_indexes == [0, 1]
    with pytest.raises(ValueError, match="unknown toy family"):
        build_toy_processor("v1", "qwen9")


@pytest.fixture(scope="module")
def clip_inputs(tmp_path_factory):
    """A toy clip through the Qwen3-VL toy processor, as inference prepares it."""
    spec, question = sample_example(HELD_OUT_SEED, 0, "v1")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    frames = render_video(spec)
    encode_mp4(frames, path)
    processor = build_toy_processor("v1", QWEN3)
    model = toy_model_class(QWEN3)(toy_config("sdpa", 4, "v1", QWEN3)).eval()
    pipe = Pipeline(LoadedModel(model, processor, "toy-qwen3vl", video_policy="processor"), RunConfig())
    inputs = pipe.prepare(load_clip(path, num_frames=len(frames)), format_mc_prompt(question.question, question.options)).inputs
    return processor, model, inputs


def test_the_prompt_has_a_timestamp_before_each_step_and_4x4_tokens_per_step(clip_inputs):
    processor, _, inputs = clip_inputs
    assert inputs["video_grid_thw"].tolist() == [[8, 8, 8]]  # 112 px resized to 128: 8 x 8 patches of 16
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert tokens.count("Ġseconds") == 8 and tokens.count("<|video_pad|>") == 8 * 16
    assert "second_per_grid_ts" not in inputs  # Qwen3-VL's time is in the text


def test_the_resized_pixels_are_integers_so_the_uint8_cache_is_exact(clip_inputs):
    processor, _, inputs = clip_inputs
    pixels = inputs["pixel_values_videos"]
    codec = PixelCodec(processor)  # raises if a value is not a grey level: Qwen3-VL resizes the uint8 frames
    cached = codec.encode(pixels)
    assert cached.dtype == torch.uint8
    torch.testing.assert_close(codec.decode(cached), pixels, rtol=0, atol=1e-6)


def test_linear_patch_embedding_keeps_qwen3s_bias(clip_inputs):
    _, model, inputs = clip_inputs
    embed = model.model.visual.patch_embed
    assert embed.proj.bias is not None
    torch.nn.init.normal_(embed.proj.bias)  # a bias the linear form would lose if it dropped it
    conv = embed(inputs["pixel_values_videos"])
    linear_patch_embedding(model)
    torch.testing.assert_close(embed(inputs["pixel_values_videos"]), conv, rtol=1e-5, atol=1e-5)


def test_a_short_qwen3_run_saves_weights_that_load_as_qwen3vl(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "toy-qwen3vl"), family=QWEN3, n_train=8, n_val=8, steps=2, tail_steps=0,
                      text_steps=1, batch_size=4, text_batch_size=4, eval_every=2, prep_workers=1,
                      save_dtype="float16")
    train(cfg)
    model, processor = load_toy_model(asset_dir=tmp_path / "toy-qwen3vl")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and type(processor).__name__ == "Qwen3VLProcessor"
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert next(model.parameters()).dtype == torch.float32


def test_missing_weights_name_their_make_target(tmp_path):
    with pytest.raises(PruneVidError, match="run `make toy-qwen3vl-model`"):
        load_toy_model(asset_dir=tmp_path / "toy-qwen3vl")


@pytest.mark.skipif(not (TOY_QWEN3VL_DIR / "model.safetensors").is_file(), reason="toy-qwen3vl weights not trained")
def test_toy_qwen3vl_answers_held_out_questions(tmp_path):
    """At least 85% on 40 questions from a seed training never used (chance 25%), at least 5 of
    the 8 of every type, through the CLI a user runs: a broken timestamp, DeepStack add or
    position id shows here as lost accuracy."""
    assert (TOY_QWEN3VL_DIR / "model.safetensors").stat().st_size <= 8 * 2**20
    data = generate_dataset(tmp_path / "data", 40, seed=HELD_OUT_SEED)
    res = CliRunner().invoke(app, ["run", "--dataset", str(data), "--model", "toy-qwen3vl", "--device", "cpu",
                                   "--max-new-tokens", "6", "--results-dir", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    (run_dir,) = Path(tmp_path / "results").iterdir()
    accuracy = json.loads((run_dir / "summary.json").read_text())["accuracy"]
    assert accuracy["n"] == 40 and accuracy["accuracy"] >= 0.85, accuracy
    assert all(c["accuracy"] >= 5 / 8 for c in accuracy["by_category"].values()), accuracy["by_category"]
