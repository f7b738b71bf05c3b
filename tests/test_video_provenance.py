"""Provenance and reposts of videos: a C2PA manifest in an MP4, the container's tags in the cheap checks, and
the PDQ of the middle sampled frame under ``--phash``."""

from __future__ import annotations

import io

import av
import numpy as np
import pyarrow as pa
import pytest
from helpers import encode_clip
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.bench.credentials import sign
from aidetect_batch.bench.demo import photo_bytes
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.media import pdq, provenance, video
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch


def tagged_clip(path: str, *, comment: str, handler: str) -> bytes:
    """A tiny H.264 MP4 whose container ``comment`` and video stream ``handler_name`` say what is given."""
    with av.open(path, "w", format="mp4") as out:
        out.metadata["comment"] = comment
        stream = out.add_stream("h264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.metadata["handler_name"] = handler
        for i in range(8):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    with open(path, "rb") as handle:
        return handle.read()


def photo_clip(path: str, codec: str, fmt: str) -> bytes:
    """Two seconds of a real photograph (scikit-image's coffee, CC0: bench/demo_data/LICENSES.md) panning
    slowly: content PDQ can see, unlike the noise of the timing clips."""
    still = np.asarray(Image.open(io.BytesIO(photo_bytes("coffee.jpg"))).convert("RGB").resize((160, 120)))
    with av.open(path, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in range(16):
            view = np.ascontiguousarray(still[i : i + 96, i : i + 128])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(view, format="rgb24")))
        out.mux(stream.encode())
    with open(path, "rb") as handle:
        return handle.read()


def rows_of(paths: list[str], **options) -> dict[str, dict]:
    listing = pa.table({schema.PATH: paths, schema.SOURCE: ["t"] * len(paths)})
    table = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=DEFAULT_MAX_PIXELS, **options))
    return {r[schema.PATH]: r for r in table.drop_columns([schema.PIXELS]).to_pylist()}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return encode_clip(str(tmp_path_factory.mktemp("clip") / "a.mp4"), "h264", "mp4")


def test_a_c2pa_manifest_in_an_mp4_is_read_before_the_model(clip, tmp_path):
    signed = sign(clip, "video/mp4", "trainedAlgorithmicMedia", agent="Sora")
    (tmp_path / "signed.mp4").write_bytes(signed)
    (tmp_path / "plain.mp4").write_bytes(clip)
    rows = rows_of([str(tmp_path / "signed.mp4"), str(tmp_path / "plain.mp4")], video_frames=4)
    found = rows[str(tmp_path / "signed.mp4")]
    assert found[schema.PROVENANCE] == "c2pa_ai" and "Sora" in found[schema.PROVENANCE_DETAIL]
    assert found[schema.STATUS] == "ok" and found[schema.N_FRAMES] == 4, "the signed clip still decodes"
    assert rows[str(tmp_path / "plain.mp4")][schema.PROVENANCE] is None
    cut = signed[: len(signed) - 200]
    assert provenance.inspect(cut).kind == "c2pa_invalid", "a manifest whose video no longer matches it"


def test_container_tags_that_name_a_generator_or_an_editor_are_hints(tmp_path):
    made = tagged_clip(str(tmp_path / "g.mp4"), comment="Generated with Runway Gen-3 Alpha", handler="VideoHandler")
    edited = tagged_clip(str(tmp_path / "e.mp4"), comment="holiday", handler="Adobe Premiere Pro")
    plain = tagged_clip(str(tmp_path / "p.mp4"), comment="holiday", handler="VideoHandler")
    assert provenance.inspect(made) == provenance.Provenance(
        "software_hint", "video comment 'Generated with Runway Gen-3 Alpha' names a generator"
    )
    assert provenance.inspect(edited).detail == "video handler_name 'Adobe Premiere Pro' names an editor"
    assert provenance.inspect(plain).kind is None, "FFmpeg's own encoder tag (Lavf) is no evidence"
    assert provenance.inspect(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40).kind is None, "a broken header: no tags"


def test_under_phash_a_clip_hashes_as_its_middle_sampled_frame_so_a_reencoded_repost_matches(tmp_path):
    clip = photo_clip(str(tmp_path / "a.mp4"), "h264", "mp4")
    photo_clip(str(tmp_path / "repost.webm"), "vp9", "webm")
    rows = rows_of([str(tmp_path / "a.mp4"), str(tmp_path / "repost.webm")], video_frames=8, phash=True)
    frames = video.sample(clip, 8, max_pixels=DEFAULT_MAX_PIXELS).frames
    middle = pdq.pdq_of(frames[len(frames) // 2].image)
    original, repost = rows[str(tmp_path / "a.mp4")], rows[str(tmp_path / "repost.webm")]
    assert (original[schema.PDQ], original[schema.PDQ_QUALITY]) == (middle.hash, middle.quality)
    bits = np.unpackbits(np.frombuffer(original[schema.PDQ], np.uint8) ^ np.frombuffer(repost[schema.PDQ], np.uint8))
    assert repost[schema.PDQ_QUALITY] >= pdq.MIN_QUALITY and int(bits.sum()) <= pdq.MATCH_DISTANCE, "it groups"
