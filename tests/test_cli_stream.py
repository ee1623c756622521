"""`prunevid stream` through typer's CliRunner: per-question records, the offline comparison, datasets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from tests.conftest import write_clip

runner = CliRunner()
TINY = ("--model", "tiny", "--dtype", "float32", "--device", "cpu", "--fps", "4")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def clip16(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("stream") / "clip16.mp4", 16, fps=4, seed=2)  # 4 s


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "questions.jsonl").read_text().splitlines()]


def test_stream_asks_at_times_and_matches_offline(clip16, tmp_path):
    res = invoke("stream", clip16, "--chunk-frames", "4", "--ask", "1.0:What is moving?", "--ask", "t=3.9:What now?",
                 "--compare-offline", "--max-new-tokens", "4", *TINY, "--results-dir", tmp_path, "--label", "s")
    assert res.exit_code == 0, res.output
    first, last = records(tmp_path / "s")
    # Frames at 0, 0.25, ... s: the first chunk is complete at 0.75 s, the last at 3.75 s.
    assert (first["chunks_appended"], first["answered_after_s"], first["frames_seen"]) == (1, 0.75, 4)
    assert (last["chunks_appended"], last["frames_seen"]) == (4, 16) and len(last["append_s"]) == 4
    for r in (first, last):
        assert r["offline_agrees"] and r["offline_max_logit_diff"] <= 1e-4
        assert r["ttft_s"] > 0 and r["kv_bytes"] > 0 and r["visual_tokens"] == r["frames_seen"] // 2 * 16
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["questions"] == 2 and summary["offline_agreement"] == 1.0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["scenario"] == "stream"
    chunks = [json.loads(line) for line in (tmp_path / "s" / "chunks.jsonl").read_text().splitlines()]
    assert [c["ready_s"] for c in chunks] == [0.75, 1.75, 2.75, 3.75]
    assert [c["visual_tokens"] for c in chunks] == [32, 64, 96, 128] and chunks[-1]["kv_bytes"] > chunks[0]["kv_bytes"]
    assert (tmp_path / "s" / "kv.png").stat().st_size > 0


def test_stream_options_pick_a_letter_and_the_cache_cap_holds(clip16, tmp_path):
    res = invoke("stream", clip16, "--ask", "3.9:Which?", "-o", "red", "-o", "blue", "--cache-tokens", "40", "--chunk-frames", "2",
                 "--answer-mode", "logits",
                 "--compare-offline", *TINY, "--results-dir", tmp_path, "--label", "b")
    assert res.exit_code == 0, res.output
    (r,) = records(tmp_path / "b")
    assert r["prediction"] in ("A", "B") and r["parse_status"] == "logits" and r["visual_tokens"] == 40
    assert "offline_agrees" in r


def test_stream_dataset_scores_and_resumes(clip16, tmp_path):
    rows = [
        {"video": clip16.name, "time": 1.0, "question": "Colour?", "options": ["red", "blue"], "answer": "A"},
        {"video": clip16.name, "time": 3.0, "question": "Shape?", "options": ["round", "square", "none"], "answer": 2},
    ]
    data = clip16.parent / "timed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ("stream", "--dataset", data, "--chunk-frames", "4", *TINY, "--results-dir", tmp_path, "--label", "d", "--json", "--quiet",
            "--compare-offline", "--max-new-tokens", "4")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    done = records(tmp_path / "d")
    assert summary["scored"] == 2 and summary["correct"] == sum(r["correct"] for r in done)
    shown = invoke(*[a for a in args if a not in ("--json", "--quiet")])  # resumed: the summary line again
    assert f"accuracy {100 * summary['accuracy']:.1f}%" in shown.output and "offline agreement 100.0%" in shown.output
    for r in done:  # generate mode: the reply's letter is parsed, offline's the same way
        assert r["parse_status"] != "logits" and r["offline_agrees"] and r["offline_reply"] == r["text"]
    again = invoke(*args)
    assert again.exit_code == 0 and len(records(tmp_path / "d")) == 2  # nothing redone
    read = invoke("summarize", tmp_path / "d")  # a stream folder is a run like any other
    assert read.exit_code == 0 and f"accuracy {100 * summary['accuracy']:.1f}%" in read.output
    other_folder = invoke("stream", "--dataset", data, "--chunk-frames", "4", *TINY, "--results-dir", tmp_path,
                          "--label", "d2", "--max-new-tokens", "4", "--quiet")
    assert other_folder.exit_code == 0, other_folder.output
    compared = invoke("compare", tmp_path / "d", tmp_path / "d2", "--out", tmp_path / "cmp")
    assert compared.exit_code == 0, compared.output
    import csv

    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert [float(r["accuracy"]) for r in rows] == [summary["accuracy"]] * 2 and rows[1]["agreement"] == "1.0"
    import statistics

    assert float(rows[0]["tokens_in"]) == statistics.median(r["visual_tokens"] for r in done)
    other = invoke(*args[:4], "2", *args[5:])
    assert other.exit_code == 2 and "other settings" in other.output


def test_stream_force_keeps_the_earlier_results_and_a_held_folder_is_refused(clip16, tmp_path):
    from prunevid_bench.harness.runlock import RunLock

    args = ("stream", clip16, "--ask", "1.0:What?", "--chunk-frames", "4", "--max-new-tokens", "2", *TINY,
            "--results-dir", tmp_path, "--label", "f")
    assert invoke(*args).exit_code == 0
    first = records(tmp_path / "f")
    other = invoke(*args, "--cache-tokens", "40")  # other settings: refused without --force ...
    assert other.exit_code == 2 and "--force" in other.output
    forced = invoke(*args, "--cache-tokens", "40", "--force")  # ... and started over with it
    assert forced.exit_code == 0, forced.output
    assert "backup-1/" in forced.output
    assert [json.loads(line) for line in (tmp_path / "f" / "backup-1" / "questions.jsonl").read_text().splitlines()] == first
    assert records(tmp_path / "f")[0]["visual_tokens"] == 32  # the new run (cap 40 after 2 chunks of 16)
    assert json.loads((tmp_path / "f" / "config.json").read_text())["cache_tokens"] == 40
    with RunLock(tmp_path / "f"):  # another process (here: this one) holds the folder
        held = invoke(*args, "--cache-tokens", "40")
    assert held.exit_code == 2 and "is in use by" in held.output and len(held.output.strip().splitlines()) == 1


def test_a_question_before_the_first_chunk_is_skipped_with_its_reason(clip16, tmp_path):
    res = invoke("stream", clip16, "--ask", "0.2:Too early?", "--ask", "2:What now?", *TINY, "--results-dir", tmp_path,
                 "--label", "e")
    assert res.exit_code == 3, res.output  # finished, one row skipped
    assert "skipped q0: asked at 0.2 s, before the first chunk is complete" in " ".join(res.output.split())
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["questions"] == 1 and summary["skipped"][0]["id"] == "q0"
    assert "1 questions answered" in res.output and "1 skipped" in res.output


def test_stream_with_stage1_and_stage2_records_the_kept_tokens(clip16, tmp_path):
    res = invoke("stream", clip16, "--ask", "3.9:What now?", "--set", "stage1.enabled=true", "--set", "stage2.enabled=true",
                 "--set", "stage2.pruning_layer=1", "--compare-offline", "--max-new-tokens", "3", *TINY,
                 "--results-dir", tmp_path, "--label", "p")
    assert res.exit_code == 0, res.output
    (r,) = records(tmp_path / "p")
    assert 0 < r["visual_tokens_kept"] < r["visual_tokens"] < 8 * 16  # Stage 1 merged, Stage 2 kept fewer
    assert isinstance(r["offline_agrees"], bool) and r["offline_max_logit_diff"] >= 0


@pytest.mark.parametrize("extra, message", [
    (("--chunk-frames", "3"), "multiple of 2"),
    (("--ask", "soon:What?"), "SECONDS:QUESTION"),
    (("--set", "stage2.enabled=true", "--set", "stage2.score=random"), "stage2.score=prunevid only"),
    (("--budget", "40"), "stream --budget is now --cache-tokens N"),
    (("--set", "fastv.enabled=true"), "fastv cannot run in a stream yet"),
    (("--set", "random.enabled=true"), "random cannot run in a stream yet"),
    (("--preset", "evs-75"), "evs renumbers the positions after the video"),
    (("--preset", "tome-50", "--set", "tome.proportional_attention=true"), "tome asks for proportional attention"),
    (("--preset", "stage1_only", "--set", "stage1.space=vision"), "acts inside the vision encoder"),
    (("--preset", "tome-50", "--cache-tokens", "40"), "--cache-tokens and a visual-token method per chunk (tome)"),
])
def test_stream_user_errors_are_one_line(clip16, tmp_path, extra, message):
    ask = () if "--ask" in extra else ("--ask", "2:What?")
    res = invoke("stream", clip16, *ask, *extra, *TINY, "--results-dir", tmp_path)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    if "before the first chunk" not in message:  # known only once the clip is decoded
        assert not (tmp_path / "stream-clip16").exists()  # refused before any work


@pytest.mark.parametrize("preset, method, field", [("tome-50", "tome", "tome_merged_tokens"),
                                                   ("evs-75", "evs", "evs_dropped_tokens"),
                                                   ("vidcom2-25", "vidcom2", "vidcom2_dropped_tokens"),
                                                   ("stage1_only", "prunevid_stage1", "stage1_segments")])
def test_stream_runs_each_visual_token_method_per_chunk(clip16, tmp_path, preset, method, field):
    extra = ("--set", "evs.positions=original") if method == "evs" else ()
    res = invoke("stream", clip16, "--ask", "3.9:What now?", "--preset", preset, *extra, "--chunk-frames", "4",
                 "--max-new-tokens", "2", *TINY, "--results-dir", tmp_path, "--label", "m")
    assert res.exit_code == 0, res.output
    chunks = [json.loads(line) for line in (tmp_path / "m" / "chunks.jsonl").read_text().splitlines()]
    assert len(chunks) == 4
    for c in chunks:
        assert c["methods"] == [method] and c["tokens_in"] == c["tokens_before_stage1"] == 32
        assert c["tokens_cached"] < c["tokens_in"] and field in c["method_stats"]
    if method == "tome":  # 0.5 of each chunk's 32 tokens, exactly
        assert [c["tokens_cached"] for c in chunks] == [16] * 4
    (r,) = records(tmp_path / "m")
    assert r["visual_tokens"] == sum(c["tokens_cached"] for c in chunks)


def test_stream_stage2_budget_keeps_its_share_of_the_original_tokens(clip16, tmp_path):
    res = invoke("stream", clip16, "--ask", "3.9:What now?", "--set", "stage2.enabled=true", "--set", "stage2.pruning_layer=1",
                 "--set", "stage2.budget=0.25", "--max-new-tokens", "2", *TINY, "--results-dir", tmp_path, "--label", "b")
    assert res.exit_code == 0, res.output
    (r,) = records(tmp_path / "b")
    assert (r["visual_tokens"], r["visual_tokens_kept"]) == (128, 32)  # round(0.25 * 128), not int(n * keep_ratio) per step


def test_a_stream_and_a_run_of_a_checkpoint_see_the_same_frames(clip16, tmp_path):
    """A checkpoint's default policy is qwen: its per-frame pixel bounds apply in a stream as in
    `run`, so the same 16 frames are the same visual tokens (the processor policy would give 128)."""
    ckpt = tmp_path / "toy-ckpt"
    assert runner.invoke(app, ["export-toy", str(ckpt)]).exit_code == 0
    (ckpt / "prunevid.json").unlink()  # the toy's own policy note: without it, a checkpoint like any other (qwen policy)
    common = ("--model", ckpt, "--num-frames", "16", "--max-new-tokens", "2", "--results-dir", tmp_path)
    ran = invoke("run", clip16, "What is moving?", *common, "--json", "-q")
    assert ran.exit_code == 0, ran.output
    offline = json.loads(ran.stdout)
    res = invoke("stream", clip16, "--ask", "3.9:What is moving?", "--chunk-frames", "4", *common, "--label", "c")
    assert res.exit_code == 0, res.output
    (r,) = records(tmp_path / "c")
    assert offline["video_policy"] == r["video_policy"] == "qwen" and r["frames_seen"] == 16
    assert r["visual_tokens"] == offline["visual_tokens"] != 8 * 16
    assert r["frame_size"] == offline["frame_size"] and "per-frame share over the 16 frames" in r["pixels_per_frame"]
