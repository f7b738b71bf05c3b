"""Test helpers shared by the test modules: generated images, the hostile corpus, tiny models, ports, Ray.

Fixtures stay in ``conftest.py``; everything here is a plain function or constant that tests import.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import av
import numpy as np
from PIL import Image

from aidetect_batch.bench.credentials import IPTC_TYPES
from aidetect_batch.bench.demo import png_header_only
from aidetect_batch.detectors.checkpoints import build_model
from aidetect_batch.schema import Status

RAY_FOR_TESTS = {"address": "local", "num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR"}
_shared_ray = {"gcs_address": None}


def start_ray(**overrides):
    """Start a fresh local Ray instance, replacing whatever this process had running."""
    import ray

    ray.shutdown()
    ray.init(**{**RAY_FOR_TESTS, **overrides})
    return ray


@contextlib.contextmanager
def own_ray(**overrides):
    """A Ray instance for modules that need their own (a dashboard, a GPU, workers that inherit moto's env)."""
    ray = start_ray(**overrides)
    try:
        yield ray
    finally:
        ray.shutdown()


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth, noisy RGB test image (photo-like statistics, so JPEG behaves as on photos)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            128 + 100 * np.sin(x / (7 + seed)),
            128 + 100 * np.cos(y / (11 + seed)),
            128 + 60 * np.sin((x + y) / 13),
        ],
        axis=-1,
    )
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 64x32 JPEG whose EXIF says 'rotate 90° CW to display' (orientation 6)."""
    img = photo(64, 32, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def png_16bit() -> bytes:
    arr = (np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def palette_with_transparency() -> bytes:
    img = photo(40, 40, seed=4).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def animated(fmt: str) -> bytes:
    frames = [photo(48, 48, seed=s) for s in (5, 6, 7)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


# Clips made by encode_clip: frame ``i`` is one colour whose red channel is ``CLIP_STEP * i``, at ``CLIP_FPS``.
CLIP_FPS = 8
CLIP_STEP = 10


def encode_clip(
    path: str,
    codec: str,
    fmt: str,
    *,
    frames: int = 24,
    fps: int = CLIP_FPS,
    size: tuple[int, int] = (96, 64),
    gop: int = 6,
    step: int = CLIP_STEP,
    seed: int = 0,
) -> bytes:
    """A clip of noisy frames of one colour each at ``fps``: frame ``i``'s red channel is ``step * i``, so the
    frame a decoder returns can be read back from its pixels; ``seed`` varies the noise, so clips of one recipe
    differ in bytes. MP4s keep their index at the front (faststart), as web MP4s do, so a truncated one still
    opens."""
    width, height = size
    options = {"movflags": "faststart"} if fmt == "mp4" else {}
    with av.open(path, "w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        rng = np.random.default_rng(seed)
        for i in range(frames):
            noise = rng.integers(-16, 17, (height, width, 3))
            pixels = np.clip(np.array([step * i, 255 - step * i, 128]) + noise, 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    with open(path, "rb") as handle:
        return handle.read()


def truncated_png() -> bytes:
    data = encode(photo(200, 150, seed=8), "PNG")
    return data[: len(data) // 2]


def heic_like() -> bytes:
    return struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic" + b"\x00" * 64


def mp4_like() -> bytes:
    return struct.pack(">I", 24) + b"ftypisom" + b"\x00" * 4 + b"isomiso2" + b"\x00" * 64


def corrupt_png_crc() -> bytes:
    data = bytearray(encode(photo(30, 30, seed=9), "PNG"))
    data[40:60] = b"\xff" * 20
    return bytes(data)


# (relative path, bytes factory, expected status); listed by default unless noted in HIDDEN/NO_EXT.
CORPUS = [
    ("jpeg/photo.jpg", lambda: encode(photo(), "JPEG", quality=90), Status.OK),
    ("jpeg/UPPER.JPEG", lambda: encode(photo(seed=1), "JPEG"), Status.OK),
    ("png/rgb.png", lambda: encode(photo(seed=2), "PNG"), Status.OK),
    ("png/rgba.png", lambda: encode(photo(seed=2).convert("RGBA"), "PNG"), Status.OK),
    ("png/gray_alpha.png", lambda: encode(photo(seed=2).convert("LA"), "PNG"), Status.OK),
    ("png/palette_transparent.png", palette_with_transparency, Status.OK),
    ("png/sixteen_bit.png", png_16bit, Status.OK),
    ("png/one_pixel.png", lambda: encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), Status.OK),
    ("other/photo.webp", lambda: encode(photo(seed=3), "WEBP"), Status.OK),
    ("other/animated.gif", lambda: animated("GIF"), Status.OK),
    ("other/animated.webp", lambda: animated("WEBP"), Status.OK),
    ("other/photo.tiff", lambda: encode(photo(seed=4), "TIFF"), Status.OK),
    ("other/photo.bmp", lambda: encode(photo(seed=5), "BMP"), Status.OK),
    ("other/cmyk.jpg", lambda: encode(photo(seed=6).convert("CMYK"), "JPEG"), Status.OK),
    ("other/exif_rotated.jpg", exif_rotated_jpeg, Status.OK),
    ("broken/huge_header.png", lambda: png_header_only(12_000, 12_000), Status.TOO_LARGE),
    ("broken/giant_header.png", lambda: png_header_only(60_000, 60_000), Status.TOO_LARGE),
    ("broken/truncated.jpg", lambda: encode(photo(400, 300, seed=7), "JPEG")[:3000], Status.TRUNCATED),
    ("broken/truncated.png", truncated_png, Status.TRUNCATED),
    ("broken/corrupt.png", corrupt_png_crc, Status.UNDECODABLE),
    ("broken/zero.jpg", lambda: b"", Status.EMPTY),
    ("broken/text.jpg", lambda: b"hello, I am plain text pretending to be a JPEG\n", Status.UNDECODABLE),
    ("broken/phone.heic", heic_like, Status.UNDECODABLE),
    ("broken/truncated.heic", lambda: encode(photo(300, 200, seed=11), "HEIF")[:-2000], Status.TRUNCATED),
    ("phone/photo.heic", lambda: encode(photo(seed=12), "HEIF"), Status.OK),
    ("phone/renamed_heic.jpg", lambda: encode(photo(seed=13), "HEIF"), Status.OK),
    ("other/photo.avif", lambda: encode(photo(seed=14), "AVIF"), Status.OK),
]
# Files the default listing skips: no image extension, or hidden.
NO_EXT = [("misc/no_extension", lambda: encode(photo(seed=10), "JPEG"), Status.OK)]
NOT_IMAGE_EXT = [
    ("misc/readme.txt", lambda: b"notes", Status.UNDECODABLE),
    # An MP4 header and nothing else: a video FFmpeg cannot open, so corrupt (unsupported under --video-frames 0).
    ("misc/clip.mp4", mp4_like, Status.UNDECODABLE),
]
HIDDEN = [(".hidden/photo.jpg", lambda: encode(photo(), "JPEG")), ("jpeg/.DS_Store", lambda: b"\x00\x00\x00\x01Bud1")]


def write_files(root: str, entries) -> dict[str, Status]:
    expected = {}
    for entry in entries:
        relative, factory = entry[0], entry[1]
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(factory())
        if len(entry) > 2:
            expected[os.path.abspath(path)] = entry[2]
    return expected


def tiny_model(num_logits: int = 1, seed: int = 0):
    """A seeded resnet_tiny whose head is scaled and centred so scores spread over (0, 1) on test photos."""
    import torch

    torch.manual_seed(seed)
    model = build_model("resnet_tiny", num_logits).eval()
    pixels = np.stack([np.array(photo(224, 224, seed=s)) for s in range(4)]).astype(np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    probe = torch.from_numpy((pixels - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
        model.fc.bias.sub_(model(probe).mean(0))
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def blocky(side: int = 64, seed: int = 0) -> Image.Image:
    """A photo-like image rendered at half resolution and upsampled by pixel repetition.

    Its 2×2 blocks are constant: a high-frequency statistic (like a generator's
    upsampling artifact) that separates it from :func:`photo` at the same size.
    """
    return photo(side // 2, side // 2, seed=seed).resize((side, side), Image.NEAREST)


def write_labelled_set(root: str, per_class: int, side: int = 64, layout: str = "flat") -> dict[str, str]:
    """``real/`` photos and ``ai/`` blocky images, same size and format, names without labels.

    ``layout="groups"`` adds a subject level above the class (``faces/real/...``, ``scenes/ai/...``).
    Returns path → label.
    """
    labels = {}
    for i in range(per_class):
        for label, img in (("real", photo(side, side, seed=1000 + i)), ("ai", blocky(side, seed=2000 + i))):
            name = hashlib.sha1(f"{label}{i}".encode()).hexdigest()[:12] + ".png"
            group = ("faces", "scenes")[i % 2]
            relative = f"{group}/{label}/{name}" if layout == "groups" else f"{label}/{name}"
            path = os.path.join(root, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            img.save(path, "PNG")
            labels[os.path.abspath(path)] = label
    return labels


# --- provenance fixtures --------------------------------------------------------------------------

A1111_PARAMETERS = (
    "a lighthouse at dusk, volumetric light\nNegative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 31e35c80fc, "
    "Model: sd_xl_base_1.0"
)
COMFY_PROMPT = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
}


def xmp_packet(source_type: str) -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{IPTC_TYPES}{source_type}"/></rdf:RDF></x:xmpmeta>'
    )


def png_with_text(**chunks: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value) if key.startswith("XML:") else info.add_text(key, value)
    return encode(photo(seed=31), "PNG", pnginfo=info)


def jpeg_with_exif(*, software: str | None = None, user_comment: str | None = None) -> bytes:
    """A JPEG whose EXIF says ``software`` and carries ``user_comment`` the way piexif writes it (UNICODE)."""
    exif = Image.Exif()
    if software:
        exif[0x0131] = software
    if user_comment:
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + user_comment.encode("utf-16-be")
    return encode(photo(seed=32), "JPEG", exif=exif)


def jpeg_with_xmp(source_type: str) -> bytes:
    return encode(photo(seed=33), "JPEG", xmp=xmp_packet(source_type).encode())


def png_with_xmp(source_type: str) -> bytes:
    return png_with_text(**{"XML:com.adobe.xmp": xmp_packet(source_type)})


def c2pa_signed_jpeg(source_type: str, agent: str = "TestDiffusion 2.1") -> bytes:
    """A JPEG with an embedded C2PA manifest declaring ``source_type``, signed under a chain made here."""
    from aidetect_batch.bench.credentials import sign_jpeg

    return sign_jpeg(encode(photo(seed=34), "JPEG"), source_type, agent)


def tampered(data: bytes) -> bytes:
    """``data`` with one bit flipped inside the JPEG's entropy-coded image data."""
    changed = bytearray(data)
    changed[data.rfind(b"\xff\xda") + 64] ^= 0x01
    return bytes(changed)


def watermarked_png(message: bytes | None = b"StableDiffusionV1") -> bytes:
    """A photograph (512×512), with the Stable Diffusion reference scripts' dwtDct watermark when ``message``."""
    from aidetect_batch.bench.demo import photo_bytes

    rgb = np.asarray(Image.open(io.BytesIO(photo_bytes("astronaut.jpg"))).convert("RGB"))
    if message is not None:
        from imwatermark import WatermarkEncoder

        encoder = WatermarkEncoder()
        encoder.set_watermark("bytes", message)
        rgb = encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]
    return encode(Image.fromarray(np.ascontiguousarray(rgb)), "PNG")


# (relative path, bytes factory, expected provenance): provenance fixtures, all decodable.
PROVENANCE = [
    ("provenance/a1111.png", lambda: png_with_text(parameters=A1111_PARAMETERS), "generator_params"),
    (
        "provenance/comfyui.png",
        lambda: png_with_text(prompt=json.dumps(COMFY_PROMPT), workflow=json.dumps({"nodes": []})),
        "generator_params",
    ),
    ("provenance/a1111_exif.jpg", lambda: jpeg_with_exif(user_comment=A1111_PARAMETERS), "generator_params"),
    ("provenance/iptc.jpg", lambda: jpeg_with_xmp("trainedAlgorithmicMedia"), "iptc_ai"),
    ("provenance/iptc.png", lambda: png_with_xmp("trainedAlgorithmicMedia"), "iptc_ai"),
    ("provenance/camera.jpg", lambda: jpeg_with_exif(software="Canon EOS R5 Firmware Version 1.8.1"), None),
    ("provenance/edited.jpg", lambda: jpeg_with_exif(software="Adobe Photoshop 25.4 (Windows)"), "software_hint"),
    ("provenance/c2pa_ai.jpg", lambda: c2pa_signed_jpeg("trainedAlgorithmicMedia"), "c2pa_ai"),
    ("provenance/c2pa_tampered.jpg", lambda: tampered(c2pa_signed_jpeg("trainedAlgorithmicMedia")), "c2pa_invalid"),
    ("provenance/c2pa_camera.jpg", lambda: c2pa_signed_jpeg("digitalCapture", "CameraApp 3"), "c2pa_other"),
]


def scan_killed_after_commits(args: list[str], scores_dir: str, *, commits: int = 1, env: dict | None = None) -> None:
    """Run ``aidetect-batch scan ARGS`` in a session of its own and kill -9 the whole of it (the driver and its local
    Ray) once ``commits`` scores files are committed in ``scores_dir``, as a crash would."""
    argv = [sys.executable, "-m", "aidetect_batch", "scan", *args]
    proc = subprocess.Popen(argv, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(glob.glob(os.path.join(scores_dir, "part-*.parquet"))) >= commits:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the scan ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
