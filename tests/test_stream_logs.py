"""A stream dataset's logs: duplicate ids are refused naming both lines; chunks.jsonl is written
as chunks are appended (a killed stream keeps them), and a resumed run replaces only the rows of
the videos it plays again and draws kv.png from everything there."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.errors import PruneVidError
from prunevid_bench.stream_run import read_stream_dataset
from tests.conftest import write_clip

runner = CliRunner()
TINY = ("--model", "tiny", "--dtype", "float32", "--device", "cpu", "--fps", "4", "--max-new-tokens", "1")


def row(video, time_s, **more):
    return json.dumps({"video": video, "time": time_s, "question": "Colour?", "options": ["red", "blue"],
                       "answer": "A", **more})


def test_duplicate_ids_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "timed.jsonl"
    path.write_text("\n".join([row("a.mp4", 1, id="q1"), row("a.mp4", 2, id="q2"), row("b.mp4", 1, id="q1")]) + "\n")
    with pytest.raises(PruneVidError, match=r"line 3: id 'q1' repeats line 1; give every question its own id"):
        read_stream_dataset(path)
    res = runner.invoke(app, ["stream", "--dataset", str(path), *TINY])
    assert res.exit_code == 2 and "repeats line 1" in res.output and len(res.output.strip().splitlines()) == 1


def chunks(run_dir):
    return [json.loads(line) for line in (run_dir / "chunks.jsonl").read_text().splitlines()]


def test_a_killed_stream_keeps_its_chunks_and_a_rerun_completes_them(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, seed in (("a.mp4", 1), ("b.mp4", 2)):
        write_clip(folder / name, 16, fps=4, seed=seed)  # 4 s each: 4 chunks of 4 frames
    data = folder / "timed.jsonl"
    data.write_text("\n".join([row("a.mp4", 3.9, id="a1"), row("b.mp4", 1.0, id="b1"), row("b.mp4", 3.9, id="b2")]) + "\n")
    args = ["stream", "--dataset", str(data), "--chunk-frames", "4", *TINY, "--results-dir", str(tmp_path), "--label", "s"]

    from prunevid_bench.streaming import StreamSession

    original, asked = StreamSession.ask_choice, []

    def dies_on_the_third_question(self, *a, **k):
        asked.append(1)
        if len(asked) == 3:
            raise KeyboardInterrupt  # killed while b2 runs: b's first chunks are already appended
        return original(self, *a, **k)

    monkeypatch.setattr(StreamSession, "ask_choice", dies_on_the_third_question)
    killed = runner.invoke(app, args)
    assert killed.exit_code == 130, killed.output
    run_dir = tmp_path / "s"
    before = chunks(run_dir)
    assert [(c["video"].rsplit("/", 1)[-1], c["ready_s"]) for c in before] == \
        [("a.mp4", 0.75), ("a.mp4", 1.75), ("a.mp4", 2.75), ("a.mp4", 3.75), ("b.mp4", 0.75), ("b.mp4", 1.75),
         ("b.mp4", 2.75), ("b.mp4", 3.75)]
    assert not (run_dir / "kv.png").exists()

    monkeypatch.setattr(StreamSession, "ask_choice", original)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    after = chunks(run_dir)
    assert after[:4] == before[:4]  # video a was not played again: its rows stay as they were
    assert [c["ready_s"] for c in after[4:]] == [0.75, 1.75, 2.75, 3.75]  # b's rows once, from the replay
    assert all(c["video"].endswith("b.mp4") for c in after[4:])
    assert [json.loads(line)["id"] for line in (run_dir / "questions.jsonl").read_text().splitlines()] == ["a1", "b1", "b2"]
    assert (run_dir / "kv.png").stat().st_size > 0

    (run_dir / "kv.png").unlink()  # lost (say, killed while drawing): a rerun with nothing to do draws it again
    assert runner.invoke(app, args).exit_code == 0 and (run_dir / "kv.png").stat().st_size > 0
    assert chunks(run_dir) == after
