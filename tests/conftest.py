"""Shared fixtures: one Ray instance per module, a generated corpus, tiny checkpoints, moto S3."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct

import numpy as np
import pytest
from PIL import Image

from aidetect_batch.demo import png_header_only
from aidetect_batch.model import build_model, save_checkpoint
from aidetect_batch.schema import Status


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shared = {item.module.__name__ for item in items if "ray_cluster" in item.fixturenames}
    items.sort(key=lambda item: item.module.__name__ in shared)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance shared by every module that needs nothing special.

    Starting Ray and warming its workers costs about 8 s, so the instance outlives the module:
    collection runs these modules last and together, and the session's end shuts it down."""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().gcs_address == _shared_ray["gcs_address"]):
        start_ray()
        _shared_ray["gcs_address"] = ray.get_runtime_context().gcs_address
    yield ray


@pytest.fixture(scope="module")
def ray_after_moto(s3_server):
    """Ray started after the AWS environment points at moto, so its workers inherit it."""
    with own_ray() as ray:
        yield ray


def pytest_sessionfinish(session: pytest.Session) -> None:
    import ray

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


def truncated_png() -> bytes:
    data = encode(photo(200, 150, seed=8), "PNG")
    return data[: len(data) // 2]


def heic_like() -> bytes:
    return struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic" + b"\x00" * 64


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
    ("broken/phone.heic", heic_like, Status.UNSUPPORTED),
]
# Files the default listing skips: no image extension, or hidden.
NO_EXT = [("misc/no_extension", lambda: encode(photo(seed=10), "JPEG"), Status.OK)]
NOT_IMAGE_EXT = [("misc/readme.txt", lambda: b"notes", Status.UNDECODABLE)]
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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A folder of good and broken images with expected statuses.

    Returns a dict with ``root``, ``default`` (path → status for the default listing)
    and ``all_files`` (path → status with ``--all-files``).
    """
    root = str(tmp_path_factory.mktemp("corpus"))
    listed = write_files(root, CORPUS)
    extra = write_files(root, NO_EXT + NOT_IMAGE_EXT)
    write_files(root, HIDDEN)
    os.makedirs(os.path.join(root, "empty_dir", "nested_empty"))
    default = {p: s for p, s in listed.items() if not p.endswith(".heic")}
    return {"root": root, "default": default, "all_files": {**listed, **extra}}


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A resnet_tiny detector in the project's own format (1 logit, threshold 0.5)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(path, tiny_model(), "resnet_tiny", info={"purpose": "tests"})
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API), with the AWS environment pointing at it.

    fsspec caches filesystem instances, endpoint included, so the cache is cleared on both sides:
    a module's server never answers for another's."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


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
    import hashlib

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
