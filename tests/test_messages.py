"""Qwen chat messages as input: several videos, an image and a system prompt through every
stage, against a per-video reference; Stage 2's query rows; bad elements; ``--messages``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.engine import prefill_position_ids
from prunevid_bench.errors import PruneVidError
from prunevid_bench.models.tiny import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID
from prunevid_bench.pipeline import load_pipeline
from prunevid_bench.stages.stage1 import merge_video_tokens
from tests.test_stage2 import STAGE1, reference_for, run_traced, stage2, video_frames

SYSTEM = "You answer questions about two clips."


def two_videos_and_an_image() -> list[dict]:
    rng = np.random.default_rng(5)
    second = rng.integers(0, 256, (4, 112, 84, 3), dtype=np.uint8)
    second[:, :28] = second[0, :28]  # static strip: a static group in the second video too
    image = rng.integers(0, 256, (56, 112, 3), dtype=np.uint8)
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [
            {"type": "text", "text": "First clip:"},
            {"type": "video", "video": video_frames(), "fps": 2},
            {"type": "text", "text": "A still:"},
            {"type": "image", "image": image},
            {"type": "video", "video": list(second), "fps": 4},
            {"type": "text", "text": "What differs between the two clips?"},
        ]},
    ]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("tiny", device="cpu", dtype="float32", overrides={"generation.max_new_tokens": 5})
    yield pipe
    pipe.remove_stages()


def video_spans(input_ids: torch.Tensor, grids: list[list[int]]) -> list[tuple[int, int]]:
    positions = torch.nonzero(input_ids[0] == VIDEO_PAD_ID).flatten().tolist()
    spans, at = [], 0
    for t, h, w in grids:
        n = t * h * w // 4
        spans.append((positions[at], positions[at] + n))
        at += n
    return spans


def test_two_videos_an_image_and_a_system_prompt_equal_the_per_video_reference(pipe):
    prepared = pipe.prepare(messages=two_videos_and_an_image())
    assert prepared.prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert len(prepared.clips) == 2 and prepared.inputs["video_grid_thw"].tolist() == [[4, 8, 8], [2, 8, 6]]
    assert int((prepared.inputs["input_ids"] == IMAGE_PAD_ID).sum()) == 8  # 56x112 -> 2x4 merged tokens

    vanilla = run_traced(pipe, prepared)  # the LLM input with no stage on
    over = {**stage2(k=1, keep=0.4, stage1=True), **{k: v for k, v in STAGE1.items()}}
    traced = run_traced(pipe, prepared, **over)
    st = traced.state

    # Stage 1, one video at a time: the merged tokens replace each video's span in place, with
    # their representatives' original M-RoPE ids; text and image tokens pass untouched.
    ids = prepared.inputs["input_ids"]
    grids = prepared.inputs["video_grid_thw"].tolist()
    full = prefill_position_ids(pipe.model, prepared.inputs)
    pieces, embeds, cursor = [], [], 0
    for (start, end), (t, h, w) in zip(video_spans(ids, grids), grids):
        res = merge_video_tokens(vanilla.embeds[0, start:end].reshape(t, h * w // 4, -1), tau=0.8, cluster_ratio=0.5,
                                 temporal_segment_ratio=0.25, k=7, min_cluster_tokens=4)
        pieces += [torch.arange(cursor, start), start + res.representative]
        embeds += [vanilla.embeds[0, cursor:start], res.merged]
        cursor = end
    pieces.append(torch.arange(cursor, ids.shape[1]))
    embeds.append(vanilla.embeds[0, cursor:])
    source = torch.cat(pieces)
    assert torch.equal(st.source_index, source)
    torch.testing.assert_close(traced.embeds[0], torch.cat(embeds), rtol=0, atol=1e-6)
    assert torch.equal(traced.position_ids[1:], full[1:, :, source])

    # Stage 2 scores from the text after the second video; the image is never pruned.
    merged_ids = ids[0, source]
    last_video = int(torch.nonzero(merged_ids == VIDEO_PAD_ID).flatten()[-1])
    assert st.query_start == last_video + 1 and merged_ids[st.query_start] == VISION_END_ID  # <|vision_end|> is a query row
    kept_ids = merged_ids[st.keep_index]
    assert int((kept_ids == IMAGE_PAD_ID).sum()) == 8
    assert 0 < st.tokens_after < st.tokens_before == st.tokens_after_stage1

    # ... and the whole run equals the cache-free layer-by-layer reference.
    ref = reference_for(pipe, prepared, traced)  # Stage 2 after layer 1 (the handle's score layer)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)
    record = traced.result
    assert record.videos is not None and [v["num_frames"] for v in record.videos] == [8, 4]
    assert record.second_per_grid_ts == [1.0, 0.5] and record.frame_size == [112, 112]


def test_query_rows_start_after_the_last_video_not_after_an_image(pipe):
    messages = [{"role": "user", "content": [
        {"type": "video", "video": video_frames()},
        {"type": "image", "image": np.zeros((56, 56, 3), dtype=np.uint8)},
        {"type": "text", "text": "What happens?"},
    ]}]
    prepared = pipe.prepare(messages=messages)
    traced = run_traced(pipe, prepared, **stage2(k=1, keep=0.5))
    ids = prepared.inputs["input_ids"][0]
    video_end = int(torch.nonzero(ids == VISION_END_ID)[0])
    image_end = int(torch.nonzero(ids == VISION_END_ID)[1])
    assert traced.state.query_start == video_end < image_end  # the video's <|vision_end|> row on
    ref = reference_for(pipe, prepared, traced)  # Stage 2 after layer 1 (the handle's score layer)
    torch.testing.assert_close(traced.logits, ref, rtol=0, atol=1e-4)


def test_no_visual_token_left_is_recorded_not_refused(pipe):
    prepared = pipe.prepare(video_frames(), "What happens?")
    result = pipe.run(prepared, **stage2(k=0, keep=0.05))  # int(16 * 0.05) = 0 in every frame
    assert result.visual_tokens_kept == result.tokens_after == 0 and result.generated_tokens >= 1


@pytest.mark.parametrize(
    "messages,message",
    [
        ([], "non-empty list"),
        ([{"role": "user"}], r"messages\[0\]: expected a mapping with 'role' and 'content'"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]: role must be one of"),
        ([{"role": "user", "content": [{"type": "video", "video": "nope.mp4"}]}], r"messages\[0\].content\[0\]: video not found"),
        ([{"role": "user", "content": [{"type": "vidoe", "video": "a.mp4"}]}], r"messages\[0\].content\[0\]: type must be"),
        ([{"role": "user", "content": [{"type": "video", "video": "a.mp4", "nframe": 8}]}], "did you mean 'nframes'"),
        ([{"role": "user", "content": [{"type": "video", "video": "a.mp4", "nframes": 8, "fps": 2}]}], "nframes or fps, not both"),
        ([{"role": "user", "content": [{"type": "video", "video": np.zeros((4, 8, 8))}]}], "uint8|shape"),
        ([{"role": "user", "content": [{"type": "image", "image": "nope.png"}, {"type": "text", "text": "Q"}]}], r"content\[0\]: image not found"),
        ([{"role": "user", "content": [{"type": "text", "text": "no video"}]}], "hold no video"),
    ],
)
def test_bad_elements_are_one_line_errors_naming_them(pipe, messages, message):
    with pytest.raises(PruneVidError, match=message):
        pipe.prepare(messages=messages)


def test_cli_messages_file(tmp_path, clip8):
    from PIL import Image

    Image.fromarray(np.full((56, 56, 3), 128, dtype=np.uint8)).save(tmp_path / "still.png")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "video", "video": str(clip8), "nframes": 8},
            {"type": "image", "image": str(tmp_path / "still.png")},
            {"type": "video", "video": str(clip8), "nframes": 4},
            {"type": "text", "text": "Which is longer?"},
        ]},
    ]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    runner = CliRunner()
    args = ["run", "--messages", str(path), "--model", "tiny", "--preset", "default", "--max-new-tokens", "2",
            "--results-dir", str(tmp_path / "r")]
    res = runner.invoke(app, args)  # clip8 lies outside the messages file's folder
    assert res.exit_code == 2 and res.output.startswith("error: messages[1].content[0]: video "), res.output
    assert "outside the messages file folder" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    res = runner.invoke(app, [*args, "--allow-outside-root"])
    assert res.exit_code == 0, res.output
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    assert [v["num_frames"] for v in record["videos"]] == [8, 4] and record["video_policy"] == "processor"
    assert record["tokens_after"] < record["tokens_before_stage1"]

    path.write_text("[{bad")
    res = runner.invoke(app, ["run", "--messages", str(path), "--model", "tiny", "--results-dir", str(tmp_path / "r2")])
    assert res.exit_code == 2 and res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["run", str(clip8), "Q", "--messages", str(path), "--model", "tiny"])
    assert res.exit_code == 2 and "not both" in res.output, res.output
