"""A video over ``--max-file-mb`` is sampled by seeking in the file, local or on S3, instead of being refused:
only the ranges around its sampled frames are fetched."""

from __future__ import annotations

import av
import numpy as np
import pyarrow as pa
import pytest

from aidetect_batch import schema
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.inputs import sources
from aidetect_batch.scan import cpu_stage
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch

FRAMES = 8


def prepared(paths: list[str], **options) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Rows (path → row) and views (path → stack) of ``paths`` through the CPU stage in this process."""
    listing = pa.table({schema.PATH: paths, schema.SOURCE: ["t"] * len(paths)})
    chosen = PrepareOptions(policy="resize", max_pixels=DEFAULT_MAX_PIXELS, video_frames=FRAMES, **options)
    table = prepare_batch(listing, chosen)
    views = dict(zip(table.column(schema.PATH).to_pylist(), cpu_stage.pixels_of(table), strict=True))
    return {r[schema.PATH]: r for r in table.drop_columns([schema.PIXELS]).to_pylist()}, views


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> bytes:
    """30 s at 8 fps of strong noise (incompressible, so the file is long in bytes too: about 2 MB), a keyframe
    every 2 s, its index at the front as web MP4s keep it."""
    path = str(tmp_path_factory.mktemp("long") / "long.mp4")
    rng = np.random.default_rng(0)
    with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("h264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.codec_context.gop_size = 16
        for i in range(240):
            pixels = np.clip(rng.integers(-64, 65, (120, 160, 3)) + 4 * (i % 32) + 64, 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("timeout", [0.0, 60.0], ids=["in-task", "watched"])
def test_a_video_over_the_cap_is_sampled_by_ranges_as_it_would_be_whole(long_clip, tmp_path, timeout):
    (tmp_path / "long.mp4").write_bytes(long_clip)
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(len(long_clip)))
    (tmp_path / "fake.mp4").write_bytes(bytes(len(long_clip)))
    paths = [str(tmp_path / n) for n in ("long.mp4", "big.png", "fake.mp4")]
    whole, whole_views = prepared(paths[:1])
    capped, capped_views = prepared(paths, max_file_bytes=len(long_clip) // 4, decode_timeout=timeout)
    ranged, read = capped[paths[0]], whole[paths[0]]
    assert ranged[schema.STATUS] == "ok" and ranged[schema.N_FRAMES] == FRAMES
    assert ranged[schema.FILE_SIZE] == len(long_clip) and ranged[schema.SHA256] is None, "never read whole to hash"
    same = (schema.N_FRAMES, schema.DURATION_S, schema.FPS, schema.CODEC, schema.WIDTH, schema.HEIGHT)
    assert [ranged[c] for c in same] == [read[c] for c in same]
    assert np.array_equal(capped_views[paths[0]], whole_views[paths[0]]), "the same frames, framed alike"
    assert capped[paths[1]][schema.STATUS] == "too_large", "a still over the cap is still refused"
    assert capped[paths[2]][schema.STATUS] == "too_large", "so is a file named .mp4 that is not a video"


def test_on_s3_only_the_ranges_around_the_sampled_frames_are_fetched(s3_server, long_clip, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("clips")
    fs.pipe_file("clips/long.mp4", long_clip)
    fetched: list[int] = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        fetched.append(end - start)
        return real_fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    monkeypatch.setattr(sources, "RANGED_BLOCK_BYTES", 16 << 10)
    rows, _ = prepared(["s3://clips/long.mp4"], max_file_bytes=len(long_clip) // 4)
    row = rows["s3://clips/long.mp4"]
    assert row[schema.STATUS] == "ok" and row[schema.N_FRAMES] == FRAMES
    assert sum(fetched) < len(long_clip) / 2, f"fetched {sum(fetched)} of {len(long_clip)} bytes"
