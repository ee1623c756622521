"""Files named by a data file stay inside their root unless --allow-outside-root: a dataset's
rows (skipped, naming the row), a stream dataset's rows and a --messages file's media (one-line
errors naming the row or element). The dataset and messages loaders are tested in
test_datasets.py and test_messages.py; here, the command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prunevid_bench.cli import app
from prunevid_bench.errors import PruneVidError
from prunevid_bench.stream_run import read_stream_dataset

runner = CliRunner()


def test_a_dotdot_dataset_row_is_refused_and_allow_outside_root_admits_it(tmp_path, clip8, monkeypatch, tiny_pipe):
    from prunevid_bench.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "from_config", staticmethod(lambda *a, **k: tiny_pipe))
    (tmp_path / "data").mkdir()
    (tmp_path / "clip.mp4").write_bytes(clip8.read_bytes())
    data = tmp_path / "data" / "set.jsonl"
    data.write_text(json.dumps({"id": "up", "video": "../clip.mp4", "question": "?", "options": ["x", "y"],
                                "answer": "A"}) + "\n")
    args = ["run", "--dataset", str(data), "--model", "tiny", "--max-new-tokens", "1", "--num-frames", "4",
            "--results-dir", str(tmp_path / "out")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "up: video ../clip.mp4 resolves to" in res.output and "--allow-outside-root" in res.output
    res = runner.invoke(app, [*args, "--allow-outside-root"])
    assert res.exit_code in (0, 3), res.output
    (run_dir,) = (tmp_path / "out").iterdir()
    assert [json.loads(line)["id"] for line in (run_dir / "samples.jsonl").read_text().splitlines()] == ["up"]


@pytest.mark.parametrize("video", ["../clip.mp4", "ABSOLUTE", "link.mp4"])
def test_stream_rows_are_confined_to_the_dataset_folder(tmp_path, clip8, video):
    (tmp_path / "data").mkdir()
    outside = tmp_path / "clip.mp4"
    outside.write_bytes(clip8.read_bytes())
    (tmp_path / "data" / "link.mp4").symlink_to(outside)
    named = str(outside) if video == "ABSOLUTE" else video
    path = tmp_path / "data" / "stream.jsonl"
    path.write_text(json.dumps({"video": named, "time": 1, "question": "?", "options": ["x", "y"], "answer": 0}) + "\n")
    with pytest.raises(PruneVidError, match=rf"line 1: video {named} resolves to {outside}, outside the dataset folder"):
        read_stream_dataset(path)
    assert list(read_stream_dataset(path, allow_outside_root=True)) == [str(outside)]  # resolved
    res = runner.invoke(app, ["stream", "--dataset", str(path), "--model", "tiny"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "--allow-outside-root" in res.output
