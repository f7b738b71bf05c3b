"""The video suite: keyframe seeking against decoding every frame, and the scan's videos per second.

Clips are made here with PyAV: a camera pan over a photo-like field (the benchmark photographs' smooth colour
fields and noise), 30 fps, a keyframe every 2 s, as H.264 in MP4 and VP9 in WebM at 1280x720 and 1920x1080.

- Per codec and resolution, on one decode thread and from the clip's bytes in memory: frames per second
  decoding every frame, against :func:`aidetect_batch.media.video.sample` taking N frames by seeking to the
  keyframe before each; the speed-up, and how many frames of decoding one sampled frame costs.
- PyAV against torchcodec, when torchcodec is installed: seconds to sample the same N frames of each clip.
- What sampling videos costs a scan of stills: with ``--video-frames`` above 0 every row travels as a stack of
  views, so the CPU stage and the Classifier are timed on stills with it 0 and 8.
- Videos per second of an end-to-end scan (``--video-frames N``) of copies of the clips with the tiny CNN
  (random weights), and the frames it scores per second as a share of the bare model's ceiling measured on
  the same machine in the same run: how far decoding, not the model, bounds a scan of videos.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aidetect_batch import runtime, schema
from aidetect_batch.bench import measure
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.checkpoints import build_model, read_checkpoint_bytes, save_checkpoint
from aidetect_batch.media import video
from aidetect_batch.media.decode import to_rgb
from aidetect_batch.scan.classifier import Classifier
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import plan_classifier, run_scan

FPS = 30
KEYFRAME_S = 2.0
SIZES = ((1280, 720), (1920, 1080))
# Timings are the best of this many rounds: other work on the machine only lengthens a run.
REPEATS = 2
# The camera pans this many pixels per frame and sways up and down by up to SWAY_PX over SWAY_S seconds.
PAN_PX = 2
SWAY_PX = 24
SWAY_S = 4.0


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How one codec's clips are written.

    Attributes:
        codec: The stream's codec as FFmpeg's decoder names it (``h264``, ``vp9``).
        encoder: The FFmpeg encoder.
        container: The FFmpeg muxer, also the file's extension.
        options: Encoder options.
    """

    codec: str
    encoder: str
    container: str
    options: dict[str, str]


ENCODINGS = (
    # superfast keeps what a decoder pays for (CABAC, B-frames, deblocking) and saves the encoder's search, which
    # is not measured; without scene cuts every keyframe is one of the fixed interval.
    Encoding("h264", "libx264", "mp4", {"preset": "superfast", "x264-params": "scenecut=0"}),
    Encoding("vp9", "libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"}),
)


@dataclasses.dataclass(frozen=True)
class BenchClip:
    """One clip the suite made."""

    path: str
    codec: str
    width: int
    height: int
    seconds: float

    @property
    def name(self) -> str:
        return f"{self.codec} {self.width}x{self.height}"


def write_clip(path: str, encoding: Encoding, *, width: int, height: int, seconds: float, seed: int = 0) -> BenchClip:
    """A ``seconds`` long clip at :data:`FPS` with a keyframe every :data:`KEYFRAME_S`: the camera pans across
    a photo-like field and sways up and down, so every frame moves as a handheld shot does."""
    frames = max(1, round(seconds * FPS))
    sway = min(SWAY_PX, height // 4)
    field = measure.photo_pixels(width + PAN_PX * frames, height + 2 * sway, np.random.default_rng(seed))
    with av.open(path, "w", format=encoding.container) as out:
        stream = out.add_stream(encoding.encoder, rate=FPS, options=encoding.options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = round(KEYFRAME_S * FPS)
        for i in range(frames):
            top = sway + round(sway * math.sin(2 * math.pi * i / (SWAY_S * FPS)))
            pixels = field[top : top + height, PAN_PX * i : PAN_PX * i + width]
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels.copy(), format="rgb24")))
        out.mux(stream.encode())
    return BenchClip(path, encoding.codec, width, height, frames / FPS)


def write_clips(root: str, seconds: float, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[BenchClip]:
    """One clip per encoding and size, in ``root``."""
    os.makedirs(root, exist_ok=True)
    return [
        write_clip(
            os.path.join(root, f"{encoding.codec}-{height}p.{encoding.container}"),
            encoding,
            width=width,
            height=height,
            seconds=seconds,
        )
        for encoding in ENCODINGS
        for width, height in sizes
    ]


def decode_every_frame(data: bytes) -> tuple[int, int]:
    """Decode every frame of a clip's first video stream on one thread, as the scan's decoder runs; returns
    the frames and the keyframes it holds."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = keys = 0
        for packet in container.demux(stream):
            keys += packet.is_keyframe
            frames += len(packet.decode())
    return frames, keys


def rgb_seconds(data: bytes, *, times: int = 8) -> float:
    """Seconds to convert one decoded frame of the clip to RGB as sampling does (best of ``times``)."""
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
    best = math.inf
    for _ in range(times):
        start = time.perf_counter()
        to_rgb(frame.to_image())
        best = min(best, time.perf_counter() - start)
    return best


def decode_rates(clips: list[BenchClip], frames: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per clip: frames per second decoding every frame, against sampling each of ``frames`` by seeking.

    Both read the clip's bytes from memory on one thread, each timed :data:`REPEATS` times in turn (so a
    disturbance of the shared box falls on all of them), the best counting. Sampling converts its N frames
    to RGB, as the scan needs them; the speed-up is against decoding every frame and converting the same N
    (the conversion timed apart), so it counts only what seeking saves.
    """
    return [_clip_rates(clip, frames) for clip in clips]


def _clip_rates(clip: BenchClip, frames: tuple[int, ...]) -> dict[str, Any]:
    """One clip's row of :func:`decode_rates`."""
    with open(clip.path, "rb") as handle:
        data = handle.read()
    timed: dict[Any, Callable[[], Any]] = {"every": lambda: decode_every_frame(data)}
    timed.update({n: lambda n=n: video.sample(data, n, max_pixels=DEFAULT_MAX_PIXELS) for n in frames})
    best = _best_of(timed)
    every_s, (decoded, keys) = best["every"]
    rgb_s = rgb_seconds(data)
    return {
        "clip": clip.name,
        "codec": clip.codec,
        "width": clip.width,
        "height": clip.height,
        "seconds": clip.seconds,
        "mbit_per_s": len(data) * 8 / 1e6 / clip.seconds,
        "frames": decoded,
        "keyframes": keys,
        "every_frame_s": every_s,
        "every_frame_fps": decoded / every_s,
        "rgb_ms": rgb_s * 1000,
        "seek": [_seek_row(n, *best[n], every_s=every_s, every_fps=decoded / every_s, rgb_s=rgb_s) for n in frames],
    }


def _seek_row(
    n: int, seconds: float, clip: video.Clip, *, every_s: float, every_fps: float, rgb_s: float
) -> dict[str, Any]:
    """Sampling ``n`` frames by seeking against decoding every frame and converting as many."""
    got = len(clip.frames)
    return {
        "n": n,
        "frames": got,
        "seconds": seconds,
        "fps": got / seconds,
        "every_frame_and_rgb_s": every_s + got * rgb_s,
        "speedup": (every_s + got * rgb_s) / seconds,
        "decoded_frames_per_sample": max(seconds - got * rgb_s, 0.0) * every_fps / max(got, 1),
    }


def _best_of(timed: dict[Any, Callable[[], Any]]) -> dict[Any, tuple[float, Any]]:
    """Each call's shortest time over :data:`REPEATS` rounds that call each in turn, and what it returned."""
    best: dict[Any, tuple[float, Any]] = {}
    for _ in range(REPEATS):
        for key, fn in timed.items():
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
            if key not in best or seconds < best[key][0]:
                best[key] = (seconds, result)
    return best


def scan_rates(clips: list[BenchClip], root: str, frames: tuple[int, ...], *, copies: int) -> dict[str, Any]:
    """At each of ``frames``: videos per second of end-to-end scans of one copy and of ``copies`` of each clip,
    with the tiny CNN and the scan's defaults, and the frames scored per second as a share of the bare model's
    ceiling. The difference between the two scans gives the rate past the scan's fixed start-up (Ray workers,
    the model, the first batch), which the few videos here cannot amortise. The ceiling is measured as the
    scan suite does (the Classifier's threads and batch, once before and once after the scans, the higher
    counting) and multiplied by the Classifier actors."""
    corpora = [_corpus(clips, os.path.join(root, f"corpus-{k}"), k) for k in sorted({1, copies})]
    checkpoint = os.path.join(root, "tiny.pt")
    save_checkpoint(
        checkpoint,
        build_model(registry.TINY_ARCH, 1),
        registry.TINY_ARCH,
        info={"untrained": True, "purpose": "benchmark"},
    )
    base = ScanConfig(sources=(corpora[-1],), out=os.path.join(root, "out"), checkpoint=checkpoint)
    plan = plan_classifier(base, runtime.start_ray())
    threads = plan.cpu_threads or 1
    ceilings = [measure.model_ceiling(registry.TINY_ARCH, base.batch_size, threads, precision=base.precision)]
    runs = [_scan_pair(base, corpora, n) for n in frames]
    ceilings.append(measure.model_ceiling(registry.TINY_ARCH, base.batch_size, threads, precision=base.precision))
    per_actor = max(c["images_per_s"] for c in ceilings)
    total = per_actor * plan.actors[1]
    for run in runs:
        run["share_of_ceiling"] = run["frames_per_s"] / total
        marginal = run["marginal_videos_per_s"]
        run["marginal_share_of_ceiling"] = None if marginal is None else marginal * run["frames_per_video"] / total
    return {
        "videos": len(clips) * copies,
        "ceiling": {
            **ceilings[0],
            "images_per_s": per_actor,
            "measured_images_per_s": [c["images_per_s"] for c in ceilings],
            "actors": plan.actors[1],
            "decode_cpus": plan.decode_cpus_per_actor * plan.actors[1],
        },
        "runs": runs,
    }


def _corpus(clips: list[BenchClip], folder: str, copies: int) -> str:
    """A folder of ``copies`` hard links to each clip, so the scan reads distinct files."""
    os.makedirs(folder)
    for k in range(copies):
        for clip in clips:
            os.link(clip.path, os.path.join(folder, f"{k:03d}-{os.path.basename(clip.path)}"))
    return folder


def _scan_pair(base: ScanConfig, corpora: list[str], n: int) -> dict[str, Any]:
    """The scans of the smallest and the largest corpus at ``n`` frames: the largest one's figures, and the
    rate of the videos the largest adds (``None`` with one corpus, or when noise makes it no slower)."""
    small, large = (
        _scan_run(dataclasses.replace(base, sources=(folder,), out=f"{folder}-out-{n}", video_frames=n))
        for folder in (corpora[0], corpora[-1])
    )
    extra_videos, extra_s = large["videos"] - small["videos"], large["wall_seconds"] - small["wall_seconds"]
    return {
        **large,
        "small_videos": small["videos"],
        "small_wall_seconds": small["wall_seconds"],
        "marginal_videos_per_s": extra_videos / extra_s if extra_videos and extra_s > 0 else None,
    }


def _scan_run(cfg: ScanConfig) -> dict[str, Any]:
    """One scan's videos per second over its whole run, and the frames it scored."""
    result = run_scan(cfg)
    table = pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR), columns=[schema.STATUS, schema.N_FRAMES])
    videos = table.num_rows
    scored = pc.sum(table[schema.N_FRAMES]).as_py() or 0
    wall = result.run["wall_seconds"]
    return {
        "n": cfg.video_frames,
        "videos": videos,
        "ok": pc.sum(pc.equal(table[schema.STATUS], schema.Status.OK.value)).as_py() or 0,
        "frames_scored": scored,
        "frames_per_video": scored / max(videos, 1),
        "wall_seconds": wall,
        "first_result_seconds": result.summary.facts.first_result_seconds,
        "videos_per_s": videos / wall,
        "frames_per_s": scored / wall,
    }


def torchcodec_rates(clips: list[BenchClip], frames: tuple[int, ...]) -> list[dict[str, Any]] | None:
    """Per clip, seconds for torchcodec to sample each of ``frames`` at the same times as
    :func:`aidetect_batch.media.video.sample` (exact seeking, one FFmpeg thread, RGB frames out), beside PyAV's:
    the measurement behind choosing PyAV. ``None`` when torchcodec is not installed (it needs FFmpeg from the
    system, so it is not a dependency)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: PLC0415 - optional, for this comparison only
    except (ImportError, RuntimeError):
        return None

    def sampled(data: bytes, n: int) -> Any:
        decoder = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        return decoder.get_frames_played_at(seconds=video.targets(0.0, decoder.metadata.duration_seconds, n))

    rows = []
    for clip in clips:
        with open(clip.path, "rb") as handle:
            data = handle.read()
        timed: dict[Any, Callable[[], Any]] = {}
        for n in frames:
            timed[("torchcodec", n)] = lambda n=n, data=data: sampled(data, n)
            timed[("pyav", n)] = lambda n=n, data=data: video.sample(data, n, max_pixels=DEFAULT_MAX_PIXELS)
        best = _best_of(timed)
        rows.append({"clip": clip.name, **{f"{lib}_{n}_s": best[(lib, n)][0] for lib, n in timed}})
    return rows


def stills_as_views(
    root: str, *, photos: int = 64, rounds: int = 3, sizes: tuple[tuple[int, int], ...] = ((1024, 768), (1536, 1024))
) -> dict[str, Any]:
    """Ms per still through the CPU stage and the Classifier, in this process, with ``--video-frames 0`` (one
    ``image`` tensor column) and 8 (every row a stack of views in ``_pixels``, as any row may be a video): what
    sampling videos costs a scan of stills. Best of ``rounds``, the two settings timed in turn."""
    paths = measure.write_jpegs(os.path.join(root, "stills"), photos, sizes)
    checkpoint = os.path.join(root, "stills.pt")
    save_checkpoint(checkpoint, build_model(registry.TINY_ARCH, 1), registry.TINY_ARCH, info={"purpose": "benchmark"})
    classifier = Classifier(read_checkpoint_bytes(checkpoint), device="cpu")
    listing = pa.table({schema.PATH: paths, schema.SOURCE: ["bench"] * len(paths)})
    best: dict[int, dict[str, float]] = {}
    for _ in range(rounds):
        for frames in (0, video.DEFAULT_FRAMES):
            options = PrepareOptions(policy="resize", max_pixels=DEFAULT_MAX_PIXELS, video_frames=frames)
            start = time.perf_counter()
            batches = [prepare_batch(listing.slice(k, 16), options) for k in range(0, photos, 16)]
            prepared = time.perf_counter()
            for batch in batches:
                classifier(batch)
            timing = {"cpu_ms": prepared - start, "classifier_ms": time.perf_counter() - prepared}
            timing = {k: v * 1000 / photos for k, v in timing.items()}
            kept = best.setdefault(frames, timing)
            best[frames] = {k: min(kept[k], timing[k]) for k in timing}
    return {"photos": photos, "images": best[0], "views": best[video.DEFAULT_FRAMES]}


def _ns(row: dict[str, Any]) -> list[int]:
    """The N of a :func:`torchcodec_rates` row, from its keys."""
    return sorted(int(k.split("_")[1]) for k in row if k.startswith("torchcodec_"))


def run_video(seconds: float, copies: int, frames: tuple[int, ...]) -> dict[str, Any]:
    """The video suite (module docstring): clips of ``seconds``, scans of ``copies`` of each clip."""
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        clips = write_clips(os.path.join(root, "clips"), seconds)
        made = time.perf_counter() - start
        return {
            "pyav": av.__version__,
            "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "fps": FPS,
            "keyframe_s": KEYFRAME_S,
            "clip_seconds": seconds,
            "encode_seconds": made,
            "decode": decode_rates(clips, frames),
            "scan": scan_rates(clips, root, frames, copies=copies),
            "stills": stills_as_views(root),
            "torchcodec": torchcodec_rates(clips, frames),
        }


def video_lines(section: dict[str, Any]) -> list[str]:
    """The video suite as printed lines."""
    lines = [
        f"video clips: {section['clip_seconds']:g} s at {section['fps']} fps, a keyframe every "
        f"{section['keyframe_s']:g} s; PyAV {section['pyav']} (libavcodec {section['libavcodec']}), one decode thread"
    ]
    for row in section["decode"]:
        lines.append(
            f"video {row['clip']:<15} {row['mbit_per_s']:4.1f} Mbit/s, {row['keyframes']} keyframes: every frame "
            f"{row['every_frame_fps']:6.1f} fps ({row['every_frame_s']:.2f} s); RGB {row['rgb_ms']:.1f} ms a frame"
        )
        lines += [
            f"      N={k['n']:<3} by seeking {k['seconds']:5.2f} s ({k['fps']:5.1f} frames/s): {k['speedup']:.2f}x "
            f"every frame + RGB ({k['every_frame_and_rgb_s']:.2f} s); {k['decoded_frames_per_sample']:.0f} frames' "
            "worth of decoding per sampled frame"
            for k in row["seek"]
        ]
    stills = section["stills"]
    for row in section.get("torchcodec") or []:
        lines.append(
            f"video {row['clip']:<15} sampled by torchcodec / PyAV: "
            + ", ".join(f"N={n} {row[f'torchcodec_{n}_s']:.2f} / {row[f'pyav_{n}_s']:.2f} s" for n in _ns(row))
        )
    views, images = stills["views"], stills["images"]
    lines.append(
        f"video stills as views: {stills['photos']} stills, CPU stage {views['cpu_ms']:.2f} ms each with "
        f"--video-frames 8 vs {images['cpu_ms']:.2f} with 0; Classifier {views['classifier_ms']:.2f} "
        f"vs {images['classifier_ms']:.2f} ms"
    )
    scan, ceiling = section["scan"], section["scan"]["ceiling"]
    lines.append(
        f"video scan of {scan['videos']} clips, tiny CNN: ceiling {ceiling['images_per_s']:.1f} frames/s per actor "
        f"x {ceiling['actors']} actor(s), {ceiling['decode_cpus']:g} decode CPU(s)"
    )
    for r in scan["runs"]:
        marginal = r["marginal_videos_per_s"]
        past_start = (
            f"; past start-up {marginal:.2f} videos/s = {r['marginal_share_of_ceiling']:.1%} "
            f"(scan of {r['small_videos']} took {r['small_wall_seconds']:.1f} s)"
            if marginal is not None
            else ""
        )
        lines.append(
            f"video scan N={r['n']:<3} {r['videos_per_s']:5.2f} videos/s over {r['wall_seconds']:.1f} s, "
            f"{r['frames_per_s']:5.1f} frames/s = {r['share_of_ceiling']:.1%} of the model ceiling{past_start}; "
            f"{r['ok']}/{r['videos']} ok"
        )
    return lines
