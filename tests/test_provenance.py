"""Provenance read from the bytes: generator text chunks, EXIF, IPTC XMP, C2PA (signed here), the SD watermark.

Every fixture is made by the test: PNG text chunks and EXIF through Pillow, a C2PA manifest signed with
``c2pa-python`` under a certificate chain generated in the test, the watermark with ``invisible-watermark``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from helpers import (
    A1111_PARAMETERS,
    COMFY_PROMPT,
    PROVENANCE,
    c2pa_signed_jpeg,
    encode,
    jpeg_with_exif,
    photo,
    png_with_text,
    tampered,
    watermarked_png,
)

from aidetect_batch import schema
from aidetect_batch.media import provenance
from aidetect_batch.media.provenance import Checks, inspect
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch


@pytest.mark.parametrize("relative,factory,expected", PROVENANCE, ids=[p[0] for p in PROVENANCE])
def test_each_fixture_reads_as_its_kind(relative, factory, expected):
    found = inspect(factory())
    assert found.kind == expected, found
    assert (found.detail is None) == (expected is None)


def test_details_name_the_generator():
    assert "sd_xl_base_1.0" in inspect(png_with_text(parameters=A1111_PARAMETERS)).detail
    comfy = inspect(png_with_text(prompt=json.dumps(COMFY_PROMPT)))
    assert comfy.kind == "generator_params" and "flux1-dev.safetensors" in comfy.detail
    exif = inspect(jpeg_with_exif(user_comment=A1111_PARAMETERS))
    assert "EXIF UserComment" in exif.detail and "DPM++ 2M Karras" in exif.detail


def test_text_that_is_not_comfyui_json_is_not_evidence():
    assert inspect(png_with_text(prompt="a photo of my cat", Title="holiday")).kind is None


def test_the_strongest_signal_wins_and_every_signal_is_kept():
    data = png_with_text(
        parameters=A1111_PARAMETERS,
        Software="Adobe Photoshop 25.0",
        **{"XML:com.adobe.xmp": _xmp("trainedAlgorithmicMedia")},
    )
    found = inspect(data)
    assert found.kind == "iptc_ai"
    assert "A1111" in found.detail and "Photoshop" in found.detail


def _xmp(source_type: str) -> str:
    from helpers import xmp_packet

    return xmp_packet(source_type)


def test_c2pa_signed_here_is_read_with_its_validation_state():
    found = inspect(c2pa_signed_jpeg("trainedAlgorithmicMedia", agent="TestDiffusion 2.1"))
    assert found.kind == "c2pa_ai"
    assert "TestDiffusion 2.1" in found.detail
    assert "signature valid" in found.detail and "not on a trust list" in found.detail


def test_one_tampered_byte_turns_proof_into_a_failed_validation():
    signed = c2pa_signed_jpeg("trainedAlgorithmicMedia")
    found = inspect(tampered(signed))
    assert found.kind == "c2pa_invalid"
    assert "fails validation" in found.detail and "dataHash.mismatch" in found.detail
    assert "trainedAlgorithmicMedia" in found.detail


def test_composite_and_non_ai_manifests():
    assert inspect(c2pa_signed_jpeg("compositeWithTrainedAlgorithmicMedia")).kind == "c2pa_ai_composite"
    other = inspect(c2pa_signed_jpeg("digitalCapture", agent="CameraApp 3"))
    assert other.kind == "c2pa_other" and "declares no AI source" in other.detail


def test_c2pa_is_read_only_where_its_marker_is(monkeypatch):
    calls = []
    monkeypatch.setattr(provenance, "c2pa_signals", lambda data: calls.append(data) or [])
    inspect(encode(photo(), "JPEG"))
    assert calls == []
    inspect(c2pa_signed_jpeg("trainedAlgorithmicMedia"))
    assert len(calls) == 1
    calls.clear()
    inspect(c2pa_signed_jpeg("trainedAlgorithmicMedia"), Checks(c2pa=False))
    assert calls == []


def test_a_damaged_manifest_is_never_proof():
    signed = bytearray(c2pa_signed_jpeg("trainedAlgorithmicMedia"))
    claim = signed.find(b"c2pa.claim")
    signed[claim + 40 : claim + 48] = b"\x00" * 8
    found = inspect(bytes(signed))
    assert found.kind == "c2pa_invalid", found


def test_a_forged_marker_is_no_evidence_and_no_crash():
    plain = encode(photo(), "JPEG")
    junk = b"\xff\xeb\x00\x20JP\x00\x01\x00\x00\x00\x01jumb\x00\x00\x00\x10jumdc2pa" + b"\x00" * 6
    assert inspect(plain[:2] + junk + plain[2:]).kind in (None, "c2pa_invalid")


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"not an image at all", b"jumbc2pa"])
def test_hostile_bytes_give_no_signal_and_no_exception(data):
    assert inspect(data, Checks(watermark=True)).kind in (None, "c2pa_invalid")


def test_watermark_is_read_only_when_asked():
    marked, plain = watermarked_png(), watermarked_png(None)
    assert inspect(marked).kind is None
    found = inspect(marked, Checks(watermark=True))
    assert found.kind == "watermark_sd" and "StableDiffusionV1" in found.detail
    assert inspect(plain, Checks(watermark=True)).kind is None


def test_the_cpu_stage_fills_the_columns_for_every_read_file(tmp_path):
    files = {
        "a1111.png": png_with_text(parameters=A1111_PARAMETERS),
        "marked.png": watermarked_png(),
        "plain.jpg": encode(photo(), "JPEG"),
        "truncated_a1111.png": png_with_text(parameters=A1111_PARAMETERS)[:-500],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    batch = pa.table({schema.PATH: paths, schema.SOURCE: [str(tmp_path)] * len(paths)})
    options = PrepareOptions(policy="resize", max_pixels=10**8, checks=Checks(watermark=True))
    out = prepare_batch(batch, options).to_pydict()
    assert out[schema.PROVENANCE] == ["generator_params", "watermark_sd", None, "generator_params"]
    assert out[schema.STATUS] == ["ok", "ok", "ok", "truncated"]
    assert np.all([d is None or len(d) <= provenance.DETAIL_CHARS for d in out[schema.PROVENANCE_DETAIL]])


def test_vocabulary_is_the_schemas():
    assert set(schema.DEFINITE_AI) < set(schema.PROVENANCE_KINDS)
    assert {kind for _, _, kind in PROVENANCE if kind} <= set(schema.PROVENANCE_KINDS)
