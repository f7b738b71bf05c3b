"""The video benchmark's own plumbing, at toy sizes: the clips it makes are what it says (codec, size, length,
keyframe interval, moving content), every frame and each N by seeking are timed and printed, and a scan of its
clips reports videos per second as a share of the model's ceiling."""

from __future__ import annotations

import sys

import av
import numpy as np
import pytest

from aidetect_batch.bench import video as bench_video
from aidetect_batch.bench.config import BenchmarkConfig
from aidetect_batch.bench.suites import SUITES
from aidetect_batch.errors import ConfigError

SECONDS = 2.5  # two keyframes: at 0 s and 2 s
FRAMES = round(SECONDS * bench_video.FPS)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return bench_video.write_clips(str(tmp_path_factory.mktemp("clips")), SECONDS, ((64, 48),))


def _frames(path: str) -> list[np.ndarray]:
    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_clips_have_their_codec_size_length_and_keyframe_interval(clips):
    assert [(c.codec, c.width, c.height, c.seconds) for c in clips] == [
        ("h264", 64, 48, SECONDS),
        ("vp9", 64, 48, SECONDS),
    ]
    for clip in clips:
        with av.open(clip.path) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.average_rate) == (clip.codec, bench_video.FPS)
        with open(clip.path, "rb") as handle:
            assert bench_video.decode_every_frame(handle.read()) == (FRAMES, 2)
        frames = _frames(clip.path)
        moved = [np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:], strict=False)]
        assert min(moved) > 1, "the camera moves every frame"


def test_every_frame_and_each_n_by_seeking_are_timed_and_printed(clips, monkeypatch):
    monkeypatch.setattr(bench_video, "REPEATS", 1)
    rows = bench_video.decode_rates(clips, (4, 8))
    assert [(r["codec"], r["frames"], r["keyframes"]) for r in rows] == [("h264", FRAMES, 2), ("vp9", FRAMES, 2)]
    for row in rows:
        assert row["every_frame_fps"] == pytest.approx(FRAMES / row["every_frame_s"]) and row["rgb_ms"] > 0
        assert [(k["n"], k["frames"]) for k in row["seek"]] == [(4, 4), (8, 8)]
        for k in row["seek"]:
            assert k["speedup"] == pytest.approx(k["every_frame_and_rgb_s"] / k["seconds"])
            assert k["every_frame_and_rgb_s"] > row["every_frame_s"] and k["decoded_frames_per_sample"] >= 0
    section = {
        "clip_seconds": SECONDS,
        "fps": 30,
        "keyframe_s": 2.0,
        "pyav": av.__version__,
        "libavcodec": "62",
        "decode": rows,
        "scan": {"videos": 2, "ceiling": {"images_per_s": 10.0, "actors": 1, "decode_cpus": 1.0}, "runs": []},
        "stills": {
            "photos": 4,
            "images": {"cpu_ms": 1.0, "classifier_ms": 2.0},
            "views": {"cpu_ms": 1.5, "classifier_ms": 2.5},
        },
    }
    lines = bench_video.video_lines(section)
    assert len(lines) == 1 + 2 * 3 + 2 and lines[1].startswith("video h264 64x48") and "N=8" in lines[3]
    assert lines[-2] == (
        "video stills as views: 4 stills, CPU stage 1.50 ms each with --video-frames 8 vs 1.00 with 0; "
        "Classifier 2.50 vs 2.00 ms"
    )


def test_stills_are_timed_as_images_and_as_views(tmp_path):
    found = bench_video.stills_as_views(str(tmp_path), photos=4, rounds=1, sizes=((64, 48),))
    assert found["photos"] == 4
    for timing in (found["images"], found["views"]):
        assert timing["cpu_ms"] > 0 and timing["classifier_ms"] > 0


def test_the_suite_is_registered_with_its_options():
    suite = SUITES["video"]
    assert suite.options == ("video_seconds", "video_copies", "video_frames") and not suite.in_all
    cfg = BenchmarkConfig(suite="video")
    assert (cfg.video_seconds, cfg.video_frames) == (20.0, (8, 32))
    with pytest.raises(ConfigError, match="--video-frames"):
        BenchmarkConfig(suite="video", video_frames=(0,))
    with pytest.raises(ConfigError, match="--video-seconds"):
        BenchmarkConfig(suite="video", video_seconds=0.0)


@pytest.mark.slow  # four end-to-end scans on Ray: about 40 s here
def test_scans_of_the_clips_report_videos_per_second_against_the_ceiling(clips, ray_cluster, tmp_path, monkeypatch):
    ceiling = {"arch": "resnet_tiny", "device": "cpu", "images_per_s": 50.0}
    monkeypatch.setattr(bench_video.measure, "model_ceiling", lambda *args, **kwargs: dict(ceiling))
    scan = bench_video.scan_rates(clips, str(tmp_path), (2, 4), copies=2)
    assert scan["videos"] == 4 and scan["ceiling"]["images_per_s"] == 50.0
    found = [(r["n"], r["small_videos"], r["videos"], r["ok"], r["frames_scored"]) for r in scan["runs"]]
    assert found == [(2, 2, 4, 4, 8), (4, 2, 4, 4, 16)], "one copy and two copies of each clip"
    for run in scan["runs"]:
        assert run["videos_per_s"] == pytest.approx(4 / run["wall_seconds"])
        assert run["share_of_ceiling"] == pytest.approx(run["frames_per_s"] / (50.0 * scan["ceiling"]["actors"]))
        extra = run["wall_seconds"] - run["small_wall_seconds"]
        assert run["marginal_videos_per_s"] == (pytest.approx(2 / extra) if extra > 0 else None)
    lines = bench_video.video_lines(
        {
            "clip_seconds": SECONDS,
            "fps": 30,
            "keyframe_s": 2.0,
            "pyav": "x",
            "libavcodec": "y",
            "decode": [],
            "scan": scan,
        }
    )
    assert [line.split(" videos/s")[0] for line in lines[2:]] == [
        f"video scan N={r['n']:<3} {r['videos_per_s']:5.2f}" for r in scan["runs"]
    ]


def test_torchcodec_is_compared_when_installed_and_left_out_when_not(clips, monkeypatch):
    monkeypatch.setattr(bench_video, "REPEATS", 1)
    rows = bench_video.torchcodec_rates(clips[:1], (4,))
    if rows is None:
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
        assert bench_video.torchcodec_rates(clips[:1], (4,)) is None
        return
    assert rows[0]["torchcodec_4_s"] > 0 and rows[0]["pyav_4_s"] > 0
