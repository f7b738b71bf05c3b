"""Videos and animations → a few RGB frames with their times, on CPU workers. Never raises on data.

A clip is sampled, not decoded whole: ``n`` target times sit at the middles of ``n`` equal slices of its
duration (TSN's segment centres), and each takes the frame shown at that time, reached by seeking to the
keyframe at or before it and decoding forward. A target nearer the frame last decoded than the longest run
seen between keyframes is decoded to without seeking.

- Containers (MP4, MOV/M4V, WebM, Matroska, AVI) are found by their magic bytes, whatever the file is called,
  and decoded with PyAV, whose wheels bundle FFmpeg (so ``pip install`` needs no system library), on one
  thread: a decode task holds one CPU.
- Animated GIF, WebP and APNG are read with Pillow, whose frames are already composited (disposal and
  blending applied); their times come from the frames' durations.
- Every frame passes the stills' pixel guard (``max_pixels``, from the stream header, before any decode).
- ``budget_s`` caps the decode time of one clip: past it, sampling stops and the frames decoded so far are
  kept, so a ten-hour stream with one keyframe, or a hostile file, costs no more than the budget. Targets
  that did not decode (a truncated file, a corrupt packet, the budget) are counted in :attr:`Clip.failed`.
"""

from __future__ import annotations

import dataclasses
import io
import time
import warnings
from collections.abc import Iterator
from typing import IO, Any

import av
import numpy as np
from PIL import Image

from aidetect_batch.media.decode import to_rgb
from aidetect_batch.schema import Status

DEFAULT_FRAMES = 8
# Extensions a folder walk lists as videos (content decides what a file is read as, whatever its name).
EXTENSIONS = ("mp4", "mov", "m4v", "webm", "mkv", "avi")
# The containers :func:`container_of` names: a row of one of these formats is a video, decoded or not.
CONTAINERS = ("MP4", "MOV", "WEBM", "MKV", "AVI")
# Seconds of decoding one clip may take before sampling stops with what it has.
DEFAULT_BUDGET_S = 60.0
# Frame duration browsers give a GIF frame that declares 0 ms.
_ZERO_DELAY_S = 0.1
# Timestamps are exact multiples of a time base; this absorbs the rounding of a target into one.
_EPSILON_S = 1e-6

# ISO base media brands (bytes 8-12 after ``ftyp``) that are still images, decoded by Pillow/pillow-heif.
_IMAGE_BRANDS = frozenset((b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis", b"hevc", b"heim", b"heis"))
_QUICKTIME_BRAND = b"qt  "
_EBML = b"\x1aE\xdf\xa3"
_ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")


@dataclasses.dataclass(frozen=True)
class Frame:
    """One sampled frame: its presentation time in seconds from the start, and its RGB pixels."""

    t: float
    image: Image.Image


@dataclasses.dataclass
class Clip:
    """The sampled frames of one video or animation, and what its header says.

    Attributes:
        status: ``ok`` when at least one frame decoded; else why none did.
        error: The failure, or on an ``ok`` clip how many targets did not decode.
        frames: The decoded frames in time order.
        failed: Targets that did not decode (corrupt or truncated data, the decode budget).
        format: Container (``MP4``, ``MOV``, ``WEBM``, ``MKV``, ``AVI``) or image format (``GIF``, ``WEBP``, ``PNG``).
        mode: The stream's pixel format (``yuv420p``) or the image mode.
        codec: The video codec (``h264``, ``vp9``) or the image format in lower case.
        width: Frame width in pixels.
        height: Frame height in pixels.
        duration_s: Length in seconds, from the header (videos) or the frame durations (animations).
        fps: Average frames per second.
    """

    status: Status
    error: str | None = None
    frames: list[Frame] = dataclasses.field(default_factory=list)
    failed: int = 0
    format: str | None = None
    mode: str | None = None
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    fps: float | None = None


def container_of(data: bytes) -> str | None:
    """The video container ``data`` starts like (``MP4``, ``MOV``, ``WEBM``, ``MKV``, ``AVI``), or ``None``.
    An ISO file with an image brand (HEIC, AVIF) is a still, not a video."""
    head = data[:64]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_BRANDS:
            return None
        return "MOV" if brand == _QUICKTIME_BRAND else "MP4"
    if head.startswith(_EBML):
        return "WEBM" if b"webm" in head else "MKV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    return None


def is_animated(data: bytes) -> bool:
    """Whether ``data`` is a GIF, WebP or PNG (APNG) with more than one frame; read from its headers."""
    if not data.startswith((b"GIF8", b"\x89PNG")) and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.format in _ANIMATED_FORMATS and bool(getattr(img, "is_animated", False))
        except Exception:  # noqa: BLE001 - a broken header is the still decoder's to report
            return False


def is_motion(data: bytes) -> bool:
    """Whether ``data`` is sampled as frames: a video container or an animated image."""
    return container_of(data) is not None or is_animated(data)


def tags_of(source: bytes | IO[bytes]) -> list[tuple[str, str]]:
    """A video's (its bytes, or a seekable file) container tags, then its first video stream's, as
    ``(key, value)`` with lower-case keys (``encoder``, ``handler_name``, ``comment``); none when FFmpeg
    cannot open it."""
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r") as container:
            streams = container.streams.video[:1]
            found = [*container.metadata.items(), *(kv for s in streams for kv in s.metadata.items())]
    except Exception:  # noqa: BLE001 - FFmpeg raises many error types on malformed containers: no tags
        return []
    return [(str(key).lower(), str(value)) for key, value in found]


def targets(start: float, duration: float, n: int) -> list[float]:
    """``n`` times spread evenly over ``[start, start + duration)``: the middles of ``n`` equal slices."""
    return [start + (k + 0.5) * duration / n for k in range(n)]


def sample(source: bytes | IO[bytes], n: int, *, max_pixels: int, budget_s: float = DEFAULT_BUDGET_S) -> Clip:
    """Sample ``n`` frames of a video (``source``: its bytes, or a seekable file) or an animated image.

    The frames are RGB, as a still of the same pixels would decode (:func:`aidetect_batch.media.decode.to_rgb`).
    """
    data = source if isinstance(source, bytes) else None
    if data is not None and container_of(data) is None:
        return _sample_animation(data, n, max_pixels=max_pixels, budget_s=budget_s)
    return _sample_video(io.BytesIO(data) if data is not None else source, n, max_pixels=max_pixels, budget_s=budget_s)


def _sample_video(handle: IO[bytes], n: int, *, max_pixels: int, budget_s: float) -> Clip:
    head = handle.read(64)
    handle.seek(0)
    fmt = container_of(head)
    try:
        container = av.open(handle, mode="r")
    except Exception as exc:  # noqa: BLE001 - FFmpeg raises many error types on malformed containers
        return Clip(Status.UNDECODABLE, f"{fmt or 'video'} that FFmpeg could not open: {_message(exc)}", format=fmt)
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            return Clip(Status.UNSUPPORTED, f"{fmt} with no video stream ({', '.join(kinds)} only)", format=fmt)
        stream = container.streams.video[0]
        clip = _header(stream, container, fmt)
        if (clip.width or 0) * (clip.height or 0) > max_pixels:
            clip.status = Status.TOO_LARGE
            clip.error = f"{clip.width}x{clip.height} frames exceed max_pixels={max_pixels}"
            return clip
        stream.codec_context.thread_count = 1
        start = _seconds(stream.start_time, stream.time_base) or 0.0
        wanted = targets(start, clip.duration_s or 0.0, n) if clip.duration_s else [start]
        distinct = _decode_targets(
            container, stream, wanted, clip, deadline=time.monotonic() + budget_s, max_pixels=max_pixels
        )
    return _settled(clip, distinct)


def _header(stream: Any, container: Any, fmt: str | None) -> Clip:
    """What the stream's header says: size, codec, pixel format, duration and frame rate."""
    ctx = stream.codec_context
    duration = _seconds(stream.duration, stream.time_base)
    if duration is None and container.duration is not None:
        duration = container.duration / av.time_base
    rate = stream.average_rate or stream.guessed_rate
    return Clip(
        Status.OK,
        format=fmt,
        mode=ctx.format.name if ctx.format is not None else None,
        codec=ctx.name,
        width=ctx.width or None,
        height=ctx.height or None,
        duration_s=duration if duration and duration > 0 else None,
        fps=float(rate) if rate else None,
    )


class _Cursor:
    """Where decoding stands in one stream: the last frame and keyframe decoded, the frames shown at and read
    past the last target, and a lower bound of the distance between keyframes (the longest run decoded forward
    of one). A target further past the frame last decoded than that bound may have a keyframe between, so it is
    sought; a nearer one is decoded to: at most one keyframe lies between, and a seek would cost its own restart
    of the decoder, and might land on the keyframe already passed and decode its run again."""

    def __init__(self, container: Any, stream: Any, period: float) -> None:
        self.container, self.stream, self.period = container, stream, period
        self.frames: Iterator[Any] | None = None
        self.ahead: Any = None  # the frame decoded past the last target
        self.shown: Any = None  # the frame shown at the last target
        self.last = -float("inf")
        self.last_key: float | None = None
        self.position = -float("inf")  # the time of the frame last decoded
        self.gap = 0.0

    def frame_at(self, target: float, deadline: float) -> Any:
        """The frame shown at ``target``: the last one starting at or before it (the first decoded, when a seek
        lands past it). ``None`` when the data or the budget runs out before it."""
        shown = self.shown
        if self.frames is None or self.last_key is None or target - self.position > self.gap:
            self.container.seek(int(target / self.stream.time_base), stream=self.stream, backward=True)
            self.frames, self.ahead, self.last_key, shown = self._decoded(), None, None, None
        while time.monotonic() <= deadline:
            frame, self.ahead = self.ahead if self.ahead is not None else next(self.frames, None), None
            if frame is None:
                break
            t = self.position = _time(frame)
            if frame.key_frame or self.last_key is None:
                self.last_key = t
            self.gap = max(self.gap, t - self.last_key)
            if t > target + _EPSILON_S and shown is not None:
                self.ahead, self.shown = frame, shown
                return shown
            shown = frame
        self.frames, self.shown = None, None
        return shown if shown is not None and target < _time(shown) + self.period + _EPSILON_S else None

    def _decoded(self) -> Iterator[Any]:
        """The stream's frames from where it was sought. A packet the decoder refuses (corrupt, or cut short
        by a truncation) costs only the frames that need it; the demuxer's end flushes the decoder's buffer."""
        for packet in self.container.demux(self.stream):
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                continue


def _decode_targets(
    container: Any, stream: Any, wanted: list[float], clip: Clip, *, deadline: float, max_pixels: int
) -> int:
    """Decode the frame shown at each wanted time into ``clip.frames``; a target whose decode fails, runs out
    of data or gives a frame over ``max_pixels`` (a stream whose header said no size) is skipped. Returns how
    many distinct frames were wanted (two targets inside one frame's span of a short clip want the same one)."""
    cursor = _Cursor(container, stream, 1.0 / clip.fps if clip.fps else 0.0)
    repeats = 0
    for target in wanted:
        if time.monotonic() > deadline:
            break
        try:
            frame = cursor.frame_at(target, deadline)
        except Exception:  # noqa: BLE001 - a corrupt packet costs its target; the next seek may recover
            cursor.frames, frame = None, None
        if frame is None or frame.width * frame.height > max_pixels:
            continue
        t = _time(frame)
        if t == cursor.last:
            repeats += 1
            continue
        cursor.last = t
        clip.frames.append(Frame(t, to_rgb(frame.to_image())))
    return len(wanted) - repeats


def _sample_animation(data: bytes, n: int, *, max_pixels: int, budget_s: float) -> Clip:
    """Composited frames of an animated GIF, WebP or APNG at the wanted times, read in one pass."""
    deadline = time.monotonic() + budget_s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
            count = int(getattr(img, "n_frames", 1))
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on malformed data
            return Clip(Status.UNDECODABLE, f"animation that could not be opened: {_message(exc)}")
        clip = Clip(Status.OK, format=img.format, mode=img.mode, codec=(img.format or "").lower() or None)
        clip.width, clip.height = img.size
        if img.width * img.height > max_pixels:
            clip.status, clip.error = (
                Status.TOO_LARGE,
                f"{img.width}x{img.height} frames exceed max_pixels={max_pixels}",
            )
            return clip
        starts, total = _frame_starts(img, count, deadline)
        clip.duration_s = total
        clip.fps = len(starts) / total if total else None
        indices = sorted({_frame_at(starts, t) for t in targets(0.0, total, n)})
        for index in indices:
            if time.monotonic() > deadline:
                break
            try:
                img.seek(index)
                clip.frames.append(Frame(starts[index], to_rgb(img.copy())))
            except Exception:  # noqa: BLE001 - a truncated frame costs its target
                break
    return _settled(clip, len(indices))


def _frame_starts(img: Image.Image, count: int, deadline: float) -> tuple[list[float], float]:
    """Each readable frame's start time, and the animation's length, from the frames' durations."""
    starts: list[float] = []
    total = 0.0
    for index in range(count):
        if time.monotonic() > deadline:
            break
        try:
            img.seek(index)
            if img.format == "WEBP":
                img.load()  # Pillow reads an animated WebP frame's duration only when it decodes the frame
        except Exception:  # noqa: BLE001 - frames past a truncation are not there
            break
        starts.append(total)
        duration = img.info.get("duration") or 0
        total += duration / 1000.0 if duration > 0 else _ZERO_DELAY_S
    return starts or [0.0], total or _ZERO_DELAY_S


def _frame_at(starts: list[float], t: float) -> int:
    """The frame shown at time ``t``."""
    return max(0, int(np.searchsorted(starts, t, side="right")) - 1)


def _settled(clip: Clip, wanted: int) -> Clip:
    """The clip's status and failure count once its targets are done: none decoded is ``undecodable``."""
    clip.failed = max(0, wanted - len(clip.frames))
    if not clip.frames:
        clip.status = Status.UNDECODABLE
        clip.error = f"none of {wanted} sampled frames decoded (corrupt, truncated or over the decode budget)"
    elif clip.failed:
        clip.error = f"{clip.failed} of {wanted} sampled frames did not decode (corrupt, truncated or over budget)"
    return clip


def _time(frame: Any) -> float:
    return float(frame.time or 0.0)


def _seconds(value: int | None, time_base: Any) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]
