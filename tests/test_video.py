"""Videos and animations: sampled frames scored as views of one row (``--video-frames``).

Clips are encoded here with PyAV: frame ``i`` is one colour (with noise, so frames are not all tiny) whose red
channel is ``10 * i``, so the frame a sample landed on, and so its time, can be read back from its pixels.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import zipfile

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CLIP_FPS, CLIP_STEP, animated, encode, encode_clip, heic_like, photo, scan_killed_after_commits
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.detectors.checkpoints import read_checkpoint_bytes
from aidetect_batch.errors import ConfigError
from aidetect_batch.media import video
from aidetect_batch.scan import runner
from aidetect_batch.scan.classifier import Classifier
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.scan.sink import committed_work

FPS = CLIP_FPS
FRAMES = 24  # 3 seconds
WIDTH, HEIGHT = 96, 64  # encode_clip's default size
STEP = CLIP_STEP  # red channel per frame index
CLIP = {"frames": FRAMES, "fps": FPS, "size": (WIDTH, HEIGHT), "step": STEP}


def encode_audio_only(path: str) -> bytes:
    """An MP4 (M4A) holding one AAC stream and no video."""
    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000, layout="mono")
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with open(path, "rb") as handle:
        return handle.read()


def frame_index(image) -> int:
    """The frame a decoded frame is, from its red channel."""
    return round(float(np.asarray(image)[..., 0].mean()) / STEP)


def expected_times(n: int, frames: int = FRAMES) -> list[float]:
    """The frame shown at the middle of each of ``n`` equal slices of the clip."""
    duration = frames / FPS
    return [math.floor((k + 0.5) * duration / n * FPS) / FPS for k in range(n)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("clips")
    mp4 = encode_clip(str(root / "a.mp4"), "libx264", "mp4", **CLIP)
    return {
        "mp4": mp4,
        "webm": encode_clip(str(root / "a.webm"), "libvpx-vp9", "webm", **CLIP),
        "audio": encode_audio_only(str(root / "a.m4a")),
        "gif": animated("GIF"),
        "webp": animated("WEBP"),
        "truncated": mp4[: len(mp4) * 2 // 3],
    }


@pytest.mark.parametrize("name,codec,fmt", [("mp4", "h264", "MP4"), ("webm", "vp9", "WEBM")])
def test_frames_are_spread_evenly_with_their_times(clips, name, codec, fmt):
    clip = video.sample(clips[name], 8, max_pixels=DEFAULT_MAX_PIXELS)
    assert clip.status is schema.Status.OK and clip.error is None and clip.failed == 0
    assert (clip.format, clip.codec, clip.mode, clip.width, clip.height) == (fmt, codec, "yuv420p", WIDTH, HEIGHT)
    assert clip.fps == FPS and clip.duration_s == pytest.approx(FRAMES / FPS, abs=1 / FPS)
    times = [f.t for f in clip.frames]
    assert times == pytest.approx(expected_times(8))
    assert [frame_index(f.image) for f in clip.frames] == [round(t * FPS) for t in times]
    assert all(f.image.mode == "RGB" and f.image.size == (WIDTH, HEIGHT) for f in clip.frames)


def test_more_frames_asked_than_the_clip_has_gives_each_frame_once(clips):
    clip = video.sample(clips["mp4"], 64, max_pixels=DEFAULT_MAX_PIXELS)
    indices = [frame_index(f.image) for f in clip.frames]
    assert clip.status is schema.Status.OK and clip.failed == 0
    assert indices == sorted(set(indices)) and len(indices) == FRAMES


def test_videos_are_found_by_content_not_name(clips):
    assert video.container_of(clips["mp4"]) == "MP4" and video.container_of(clips["webm"]) == "WEBM"
    assert video.is_motion(clips["gif"]) and video.is_motion(clips["webp"])
    assert not video.is_motion(encode(photo(32, 32), "JPEG")) and not video.is_motion(encode(photo(32, 32), "GIF"))
    assert video.container_of(heic_like()) is None, "a HEIC is an ISO file but a still"


@pytest.mark.parametrize("name", ["gif", "webp"])
def test_animations_give_composited_frames_at_their_times(clips, name):
    clip = video.sample(clips[name], 8, max_pixels=DEFAULT_MAX_PIXELS)
    assert clip.status is schema.Status.OK and clip.failed == 0
    assert [f.t for f in clip.frames] == pytest.approx([0.0, 0.05, 0.1]), "three 50 ms frames, each once"
    assert clip.duration_s == pytest.approx(0.15) and clip.fps == pytest.approx(20.0)
    assert all(f.image.mode == "RGB" and f.image.size == (48, 48) for f in clip.frames)
    first, last = (np.asarray(f.image, np.int16) for f in (clip.frames[0], clip.frames[-1]))
    assert np.abs(first - last).mean() > 10, "the frames differ"


def test_truncated_video_scores_what_decoded_and_says_how_many_failed(clips):
    clip = video.sample(clips["truncated"], 8, max_pixels=DEFAULT_MAX_PIXELS)
    assert clip.status is schema.Status.OK and 0 < len(clip.frames) < 8 and clip.failed == 8 - len(clip.frames)
    assert f"{clip.failed} of 8 sampled frames did not decode" in clip.error
    assert video.sample(clips["mp4"][:600], 8, max_pixels=DEFAULT_MAX_PIXELS).status is schema.Status.UNDECODABLE


def test_audio_only_is_unsupported_and_caps_hold(clips):
    audio = video.sample(clips["audio"], 8, max_pixels=DEFAULT_MAX_PIXELS)
    assert audio.status is schema.Status.UNSUPPORTED and "no video stream (audio only)" in audio.error
    big = video.sample(clips["mp4"], 8, max_pixels=WIDTH * HEIGHT - 1)
    assert big.status is schema.Status.TOO_LARGE and not big.frames
    spent = video.sample(clips["webm"], 8, max_pixels=DEFAULT_MAX_PIXELS, budget_s=0.0)
    assert spent.status is schema.Status.UNDECODABLE and "budget" in spent.error


def scan_folder(root, checkpoint: str, policy: str = "resize", **options) -> dict[str, dict]:
    """Every file of ``root`` through the CPU stage and the Classifier, in this process: path → row."""
    paths = sorted(str(p) for p in root.iterdir())
    listing = pa.table({schema.PATH: paths, schema.SOURCE: [str(root)] * len(paths)})
    prepared = prepare_batch(listing, PrepareOptions(policy=policy, max_pixels=DEFAULT_MAX_PIXELS, **options))
    scored = Classifier(read_checkpoint_bytes(checkpoint), device="cpu")(prepared)
    return {row[schema.PATH]: row for row in scored.to_pylist()}


@pytest.fixture(scope="module")
def dump(tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("dump")
    for name in ("mp4", "webm", "gif", "truncated", "audio"):
        (root / f"clip_{name}.{ {'truncated': 'mp4', 'audio': 'm4a'}.get(name, name) }").write_bytes(clips[name])
    (root / "really_a_video.jpg").write_bytes(clips["mp4"])
    (root / "still.png").write_bytes(encode(photo(80, 60), "PNG"))
    with zipfile.ZipFile(root / "pack.zip", "w") as archive:
        archive.writestr("inner/clip.mp4", clips["mp4"])
    return root


@pytest.mark.parametrize("timeout", [0.0, 60.0], ids=["in-task", "watched"])
def test_a_video_is_one_row_whose_frames_are_views(dump, tiny_checkpoint, timeout):
    rows = scan_folder(dump, tiny_checkpoint, video_frames=8, decode_timeout=timeout)
    assert len(rows) == 8, "one row per file, the zip's one member in its place"
    for name in ("clip_mp4.mp4", "clip_webm.webm", "really_a_video.jpg"):
        row = rows[str(dump / name)]
        assert row[schema.STATUS] == "ok" and row[schema.ERROR] is None
        assert (row[schema.N_FRAMES], row[schema.N_TILES], row[schema.WIDTH], row[schema.HEIGHT]) == (8, 8, 96, 64)
        assert row[schema.FPS] == FPS and row[schema.DURATION_S] == pytest.approx(3.0, abs=0.2)
        assert row[schema.FRAME_MAX_T] in expected_times(8)
        assert row[schema.SCORE] <= row[schema.SCORE_MAX]
        assert len(row[schema.FRAME_SCORES]) == 8 and max(row[schema.FRAME_SCORES]) == row[schema.SCORE_MAX]
    assert rows[str(dump / "clip_webm.webm")][schema.CODEC] == "vp9"
    assert rows[str(dump / "really_a_video.jpg")][schema.CODEC] == "h264"
    member = rows[f"zip://inner/clip.mp4::{dump / 'pack.zip'}"]
    assert member[schema.STATUS] == "ok" and member[schema.N_FRAMES] == 8
    gif = rows[str(dump / "clip_gif.gif")]
    assert (gif[schema.STATUS], gif[schema.N_FRAMES], gif[schema.CODEC]) == ("ok", 3, "gif")
    cut = rows[str(dump / "clip_truncated.mp4")]
    assert cut[schema.STATUS] == "ok" and 0 < cut[schema.N_FRAMES] < 8 and "did not decode" in cut[schema.ERROR]
    audio = rows[str(dump / "clip_audio.m4a")]
    assert audio[schema.STATUS] == "unsupported" and audio[schema.N_FRAMES] is None
    still = rows[str(dump / "still.png")]
    assert still[schema.STATUS] == "ok" and still[schema.N_FRAMES] is None and still[schema.FRAME_MAX_T] is None
    assert still[schema.SCORE] == still[schema.SCORE_MAX] and still[schema.FRAME_SCORES] is None


def test_no_frames_keeps_videos_unsupported(dump, tiny_checkpoint):
    rows = scan_folder(dump, tiny_checkpoint, video_frames=0)
    assert rows[str(dump / "clip_mp4.mp4")][schema.STATUS] == "unsupported"
    assert rows[str(dump / "really_a_video.jpg")][schema.STATUS] == "unsupported"
    gif = rows[str(dump / "clip_gif.gif")]
    assert gif[schema.STATUS] == "ok" and gif[schema.N_FRAMES] is None, "an animation's first frame, as a still"


def independent_frames(data: bytes, times: list[float]) -> list[np.ndarray]:
    """The clip's frames at ``times``, decoded start to end with PyAV alone (no seeking, no sampling code)."""
    with av.open(io.BytesIO(data)) as container:
        decoded = {round(f.time, 6): f.to_ndarray(format="rgb24") for f in container.decode(video=0)}
    return [decoded[round(t, 6)] for t in times]


@pytest.mark.parametrize("policy,size,tiles", [("resize", 224, 1), ("tiles", 48, 4)])
def test_a_frame_scores_as_the_same_pixels_saved_as_a_png(clips, tiny_checkpoint, tmp_path, policy, size, tiles):
    clip_dir, still_dir = tmp_path / "clip", tmp_path / "stills"
    clip_dir.mkdir(), still_dir.mkdir()
    (clip_dir / "a.mp4").write_bytes(clips["mp4"])
    row = next(iter(scan_folder(clip_dir, tiny_checkpoint, policy, size=size, video_frames=8).values()))
    assert (row[schema.N_FRAMES], row[schema.N_TILES]) == (8, 8 * tiles), "a frame's tiles are one group"
    times = expected_times(8)
    for i, pixels in enumerate(independent_frames(clips["mp4"], times)):
        (still_dir / f"{i}.png").write_bytes(encode(Image.fromarray(pixels), "PNG"))
    stills = scan_folder(still_dir, tiny_checkpoint, policy, size=size)
    scores = np.array([stills[str(still_dir / f"{i}.png")][schema.SCORE] for i in range(8)], np.float64)
    log_odds = np.log(scores / (1 - scores))
    assert row[schema.SCORE_MAX] == pytest.approx(scores.max(), abs=1e-6)
    assert row[schema.FRAME_MAX_T] == pytest.approx(times[int(scores.argmax())])
    assert row[schema.SCORE] == pytest.approx(1 / (1 + math.exp(-log_odds.mean())), abs=1e-5)


def test_video_frames_option(tmp_path):
    base = {"sources": (str(tmp_path),), "out": str(tmp_path / "out"), "checkpoint": "x.pt"}
    assert "mp4" in ScanConfig(**base).media_extensions
    assert ScanConfig(**base, video_frames=0).media_extensions == ScanConfig(**base).extensions
    assert ScanConfig(**base, decode_timeout=30).video_budget_s == 15
    with pytest.raises(ConfigError, match="--video-frames"):
        ScanConfig(**base, video_frames=-1)


@pytest.fixture(scope="module")
def resumed_scan(ray_cluster, dump, tiny_checkpoint, tmp_path_factory):
    """A Ray scan of the dump in shards of two files, one committed file holding a video lost while its frames
    file stays (as when a scan dies between the two commits), then ``--resume``."""
    root = tmp_path_factory.mktemp("video_scan")
    source = root / "src"
    shutil.copytree(dump, source)
    cfg = ScanConfig(
        sources=(str(source),), out=str(root / "out"), checkpoint=tiny_checkpoint, video_frames=4,
        rows_per_file=1, commit_every_s=0.0,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "block_size", lambda total, cpus, batch_size=None: 2)
        run_scan(cfg)
    frames_dir = os.path.join(cfg.out, schema.FRAMES_DIR)
    lost = sorted(os.listdir(frames_dir))[0]
    lost_rows = pq.read_metadata(os.path.join(cfg.out, schema.SCORES_DIR, lost)).num_rows
    os.remove(os.path.join(cfg.out, schema.SCORES_DIR, lost))
    resumed = run_scan(dataclasses.replace(cfg, resume=True))
    assert resumed.run["attempts"][-1]["rows_scored"] == lost_rows
    return source, cfg


def test_a_scan_writes_one_row_per_video(resumed_scan):
    source, cfg = resumed_scan
    table = pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR))
    rows = {row[schema.PATH]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows == 7, "one row per file and the zip's member; no .m4a without --all-files"
    clip = rows[str(source / "clip_webm.webm")]
    assert (clip[schema.STATUS], clip[schema.N_FRAMES], clip[schema.CODEC]) == ("ok", 4, "vp9")
    assert clip[schema.FRAME_MAX_T] in expected_times(4)
    assert rows[str(source / "still.png")][schema.N_FRAMES] is None


def test_the_frames_table_holds_every_scored_frame_once(resumed_scan):
    """``OUT/frames/``: a video's frames at its sampled times, whose top frame and mean log-odds give its row's
    ``score_max``, ``frame_max_t`` and ``score``; nothing for a still, nothing twice after the resume."""
    source, cfg = resumed_scan
    rows = {row[schema.PATH]: row for row in pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()}
    frames = pq.read_table(os.path.join(cfg.out, schema.FRAMES_DIR))
    assert frames.schema.equals(schema.FRAMES_SCHEMA)
    by_path: dict[str, list[dict]] = {}
    for frame in frames.to_pylist():
        by_path.setdefault(frame[schema.PATH], []).append(frame)
    assert set(by_path) == {p for p, r in rows.items() if r[schema.N_FRAMES]} and len(by_path) == 6
    for path, found in by_path.items():
        row = rows[path]
        assert [f[schema.FRAME_INDEX] for f in found] == list(range(row[schema.N_FRAMES])), path
        times = [f[schema.FRAME_T] for f in found]
        scores = np.array([f[schema.SCORE] for f in found], np.float64)
        assert max(scores) == row[schema.SCORE_MAX]
        assert found[times.index(row[schema.FRAME_MAX_T])][schema.SCORE] == row[schema.SCORE_MAX]
        log_odds = np.log(scores / (1 - scores)).mean()
        assert row[schema.SCORE] == pytest.approx(1 / (1 + math.exp(-log_odds)), abs=1e-6)
        if path.endswith(".gif"):
            assert times == pytest.approx([0.0, 0.05, 0.1])
        elif "truncated" in path:
            assert 0 < len(times) < 4 and set(times) <= set(expected_times(4)), "the frames that decoded"
        else:
            assert times == expected_times(4), path
    assert f"zip://inner/clip.mp4::{source / 'pack.zip'}" in by_path, "a member's frames name the member"


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_video_corpus_then_resume_writes_each_video_and_its_frames_once(
    ray_cluster, clips, tiny_checkpoint, tmp_path
):
    """kill -9 the whole scan (driver and its local Ray) after some shards of videos were committed; --resume
    then writes every video once in the scores, its frames once in ``frames/``, and keeps committed files."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    short = {
        "mp4": encode_clip(str(tmp_path / "s.mp4"), "libx264", "mp4", frames=12, size=(64, 48)),
        "webm": encode_clip(str(tmp_path / "s.webm"), "libvpx-vp9", "webm", frames=12, size=(64, 48)),
        "gif": clips["gif"],
    }
    for i in range(48):
        ext = ("mp4", "webm", "gif")[i % 3]
        (corpus / f"clip_{i:02d}.{ext}").write_bytes(short[ext])
    for i in range(8):
        (corpus / f"still_{i}.png").write_bytes(encode(photo(64, 48, seed=i), "PNG"))
    expected = {str(p) for p in corpus.iterdir()}
    out = str(tmp_path / "out")
    args = [str(corpus), "--out", out, "--checkpoint", tiny_checkpoint, "--commit-every", "0", "--rows-per-file", "1"]
    args += ["--batch-size", "8", "--video-frames", "4"]
    scores_dir, frames_dir = os.path.join(out, schema.SCORES_DIR), os.path.join(out, schema.FRAMES_DIR)
    scan_killed_after_commits(args, scores_dir, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    kept = committed_work(scores_dir)
    assert 0 < kept.rows < len(expected), "killed part-way"
    with_videos = [f for f in kept.files if any(pq.read_table(f, columns=[schema.N_FRAMES]).column(0).to_pylist())]
    kept_frames = [os.path.join(frames_dir, os.path.basename(f)) for f in with_videos]
    assert kept_frames and all(os.path.exists(f) for f in kept_frames), "a committed file's frames are committed"
    before = {f: open(f, "rb").read() for f in [*kept.files, *kept_frames]}
    cfg = ScanConfig(sources=(str(corpus),), out=out, checkpoint=tiny_checkpoint, video_frames=4, resume=True)
    result = run_scan(cfg)
    assert result.run["attempts"][-1]["rows_scored"] == len(expected) - kept.rows
    rows = pq.read_table(scores_dir).to_pylist()
    assert sorted(r[schema.PATH] for r in rows) == sorted(expected), "every file exactly once"
    frames = pq.read_table(frames_dir).to_pylist()
    want = sorted((r[schema.PATH], i) for r in rows if r[schema.N_FRAMES] for i in range(r[schema.N_FRAMES]))
    assert sorted((f[schema.PATH], f[schema.FRAME_INDEX]) for f in frames) == want, "every frame exactly once"
    assert {p for p, _ in want} == {p for p in expected if "clip_" in p}
    assert {f: open(f, "rb").read() for f in before} == before, "committed files are kept as they were"


def test_a_resume_with_other_video_frames_is_refused(tmp_path):
    base = ScanConfig(sources=(str(tmp_path),), out=str(tmp_path / "out"), checkpoint="x.pt")
    stopped = {"identity": {"expansion": {"video_frames": 4}}}
    runner.check_resumable(stopped, {"expansion": runner._expansion(dataclasses.replace(base, video_frames=4))})
    with pytest.raises(ConfigError, match="video_frames"):
        runner.check_resumable(stopped, {"expansion": runner._expansion(base)})
