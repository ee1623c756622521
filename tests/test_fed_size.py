"""Records say what was fed: ``frame_size`` is the size the model saw (after the processor's
resize), ``decoded_size`` the decoded one; a --messages element's own pixel bounds apply under
the processor policy too."""

from __future__ import annotations

import pytest


def video_message(clip, **bounds):
    return [{"role": "user", "content": [{"type": "video", "video": str(clip), "nframes": 4, **bounds},
                                         {"type": "text", "text": "What is happening?"}]}]


def test_frame_size_is_the_size_after_the_processor_resize(tiny_pipe, clip8):
    tiny_pipe.feature_cache = None
    plain = tiny_pipe.run(str(clip8), "Q", **{"video.num_frames": 4, "generation.max_new_tokens": 1})
    assert plain.video_policy == "processor" and plain.frame_size == plain.decoded_size == [112, 112]
    small = tiny_pipe.run(str(clip8), "Q", **{"video.num_frames": 4, "video.max_pixels": 28 * 28,
                                              "generation.max_new_tokens": 1})
    assert small.video_grid_thw == [[2, 2, 2]]  # the processor fed 28 x 28 frames (2 x 2 patches of 14)
    assert small.frame_size == [28, 28] and small.decoded_size == [112, 112]
    assert small.visual_tokens == 2


@pytest.mark.parametrize("bounds, fed, grid", [
    ({"max_pixels": 28 * 28}, [28, 28], [2, 2, 2]),
    ({"min_pixels": 224 * 224}, [224, 224], [2, 16, 16]),
    ({}, [112, 112], [2, 8, 8]),
])
def test_a_message_elements_pixel_bounds_apply_under_the_processor_policy(tiny_pipe, clip8, bounds, fed, grid):
    tiny_pipe.feature_cache = None
    result = tiny_pipe.run(messages=video_message(clip8, **bounds), **{"generation.max_new_tokens": 1})
    assert result.video_policy == "processor"
    assert result.video_grid_thw == [grid] and result.frame_size == fed and result.decoded_size == [112, 112]


def test_two_videos_each_record_their_fed_size(tiny_pipe, clip8):
    tiny_pipe.feature_cache = None
    messages = video_message(clip8, max_pixels=56 * 56)
    messages[0]["content"].insert(1, {"type": "video", "video": str(clip8), "nframes": 4})
    result = tiny_pipe.run(messages=messages, **{"generation.max_new_tokens": 1})
    assert result.video_grid_thw == [[2, 4, 4], [2, 8, 8]]
    assert [v["frame_size"] for v in result.videos] == [[56, 56], [112, 112]]
    assert [v["decoded_size"] for v in result.videos] == [[112, 112], [112, 112]]
