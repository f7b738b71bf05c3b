"""The Classifier stage: a callable class for ``map_batches`` on an actor pool.

Each actor parses the checkpoint and builds the model once. It picks CUDA
when the actor can see a GPU and falls back to CPU otherwise: GPUs are
logical resources in Ray, so an actor granted ``num_gpus=1`` may still land
on a machine without one. On CUDA the batch goes in channels_last, through
pinned memory with a non-blocking copy, under bf16/fp16 autocast when asked.
Rows that failed earlier pass through with a NaN score and a null label.
A video row's frame scores go on with its frame times, in the hidden
``_frame_scores`` and ``_frame_times`` columns, to the sink's frames table.

With ``--gpu-decode`` the decode stage only reads bytes, and the actor
decodes them with :class:`aidetect_batch.scan.device_decode.DeviceDecoder`;
images it decoded on the GPU are fed to the model without leaving it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from aidetect_batch import schema
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.checkpoints import log_odds_from_logits, parse_checkpoint, scores_from_logits
from aidetect_batch.scan.cpu_stage import PrepareOptions, pixels_of
from aidetect_batch.scan.device_decode import DeviceDecoder, OnDevice

_logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# glibc serves allocations over 32 MiB (its largest mmap threshold) with fresh pages from mmap
# and unmaps them on free, so on CPU every activation of a large batch is page-faulted in again.
# ResNet50 at batch 64 on one thread spent 43% of its time in the kernel (17M minor faults in
# 94 s) and ran at 5.0 img/s, against 7.7 at batch 8, whose largest activation (26 MB) stays
# on the heap. On CPU the Classifier therefore runs each batch in chunks of this many 224 px
# images, fewer for larger inputs. CUDA has its own caching allocator and takes the whole batch.
CPU_CHUNK_224 = 8
# Views of other shapes (tiles, native images) go through CUDA in passes of at most this many
# pixels, the pixels of a 64-image batch at 224 px, so a batch of large images cannot exhaust it.
CUDA_PIXELS_PER_PASS = 64 * 224 * 224


def cpu_chunk(size: int) -> int:
    """Images per forward pass on CPU for ``size`` px inputs: the activations of ``CPU_CHUNK_224``
    images at 224 px, so they stay under glibc's mmap threshold."""
    return max(1, round(CPU_CHUNK_224 * (224 / size) ** 2))


@dataclasses.dataclass(frozen=True)
class ClassifierPlan:
    """How the scan sizes the Classifier pool and the CPU decode pool (``scan.runner.plan_classifier``).

    Attributes:
        device: ``cuda`` when the cluster has GPUs, else ``cpu``.
        actors: ``(min, max)`` Classifier actors.
        num_gpus: GPUs per actor.
        num_cpus: CPUs per actor.
        cpu_threads: Torch threads per actor on CPU; ``None`` on CUDA.
        decode_tasks: Concurrent CPU decode tasks.
        decode_cpus_per_actor: Decode CPUs feeding each Classifier actor.
    """

    device: str
    actors: tuple[int, int]
    num_gpus: int
    num_cpus: int
    cpu_threads: int | None
    decode_tasks: int
    decode_cpus_per_actor: float

    def to_json(self) -> dict[str, Any]:
        """The plan as ``_run.json`` records it under ``resolved.classifier``."""
        return {**dataclasses.asdict(self), "actors": list(self.actors)}


@dataclasses.dataclass(frozen=True)
class ViewScores:
    """Per row: P(AI) from the mean of its groups' log-odds, P(AI) of its most AI-looking group, parts scored,
    and which group that is. A group is one part (a tile) of a still, and one frame (its view, or its tiles)
    of a video, whose log-odds are the mean of its parts': what the frame scores as a still.

    Attributes:
        groups: Per row, P(AI) of each of its groups in order (a video's frames); from :class:`Classifier`,
            a video row's only (``None`` for a still or a failure).
    """

    score: np.ndarray
    score_max: np.ndarray
    parts: np.ndarray
    top: np.ndarray | None = None
    groups: list[np.ndarray | None] | None = None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def split_even(length: int, most: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the fewest near-equal pieces of ``length`` that are at most ``most`` long."""
    pieces = max(1, -(-length // most))
    edges = [round(i * length / pieces) for i in range(pieces + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class Classifier:
    """Scores preprocessed uint8 images with a detector checkpoint.

    Args:
        checkpoint: The checkpoint's bytes, or a Ray ObjectRef to them.
        arch: Architecture for plain state dicts.
        ai_class_index: AI logit for two-logit plain state dicts.
        threshold: Scores at or above it are labelled ``ai``.
        precision: ``fp32``, ``bf16`` or ``fp16``; reduced precision applies on CUDA only.
        cpu_threads: Torch intra-op threads when running on CPU.
        device: Force a device (tests); ``None`` picks CUDA when visible.
        decode_options: ``--gpu-decode``: how the CPU stage would have decoded the ``_data`` column,
            which is decoded here instead.
        torch_decode: Decode JPEGs with torchvision on this actor's device; default: only on CUDA.
        compile: ``torch.compile`` the model (CUDA graphs and fused kernels; the first batches are slow).
        entry: The registry entry of the checkpoint's architecture, as the driver resolved it: registered
            in this actor's process, so an entry added at run time (a plugin, a test) scores here too.
    """

    def __init__(
        self,
        checkpoint: Any,
        arch: str | None = None,
        ai_class_index: int | None = None,
        *,
        threshold: float = 0.5,
        precision: str = "fp32",
        cpu_threads: int | None = None,
        device: str | None = None,
        decode_options: PrepareOptions | None = None,
        torch_decode: bool | None = None,
        compile: bool = False,
        entry: registry.Arch | None = None,
    ) -> None:
        if entry is not None:
            registry.register(entry)
        if not isinstance(checkpoint, bytes):
            checkpoint = ray.get(checkpoint)
        ckpt = parse_checkpoint(checkpoint, arch=arch, ai_class_index=ai_class_index)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if not self.cuda and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.autocast_dtype = _AUTOCAST_DTYPES.get(precision) if self.cuda else None
        if precision != "fp32" and not self.cuda:
            _logger.warning("precision %s applies on CUDA only; this actor runs fp32 on CPU", precision)
        self.model = ckpt.build().to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)
        self.decoder = None
        if decode_options is not None:
            on_device = self.cuda if torch_decode is None else torch_decode
            self.decoder = DeviceDecoder(decode_options, self.device, torch_decode=on_device)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(ckpt.mean, device=self.device).view(shape) * 255.0
        self.std = torch.tensor(ckpt.std, device=self.device).view(shape) * 255.0
        self.ai_class_index = ckpt.ai_class_index
        self.native_tiles = registry.get(ckpt.arch).native_tiles
        self.threshold = threshold
        self.model_id = ckpt.model_id
        self.checkpoint = ckpt.metadata()
        _logger.info("Classifier ready: %s (%s) on %s", ckpt.arch, ckpt.model_id, self.device)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """P(AI) for an ``(N, H, W, 3)`` uint8 array, as float32."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self._forward(x.permute(0, 3, 1, 2))

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        """P(AI) for an ``(N, 3, H, W)`` uint8 tensor already on this actor's device; on CPU in
        chunks of :func:`cpu_chunk` images."""
        step = x.shape[0] if self.cuda else cpu_chunk(x.shape[-1])
        scores = [scores_from_logits(z, self.ai_class_index).cpu().numpy() for z in self._logits(x, step)]
        return np.concatenate(scores).astype(np.float32) if scores else np.empty(0, np.float32)

    def _logits(self, x: torch.Tensor, step: int) -> Any:
        """The model's logits for ``x`` (uint8, NCHW, on this device), ``step`` images per pass."""
        with torch.inference_mode():
            for part in x.split(max(step, 1)):
                part = (part.float() - self.mean) / self.std
                part = part.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
                if self.autocast_dtype is not None:
                    with torch.autocast("cuda", dtype=self.autocast_dtype):
                        yield self.model(part)
                else:
                    yield self.model(part)

    def score_views(self, views: list[np.ndarray], frames: Sequence[int | None] | None = None) -> ViewScores:
        """Score ``tiles`` views (``(n, S, S, 3)``: every tile) and ``native`` ones (``(H, W, 3)``: the
        whole image, or the architecture's native tiles when it is larger than their threshold).

        ``frames``: per row, how many frames its views are (a video's, in equal stacks of tiles); ``None``
        or 0: a still, each of whose parts is a group of its own.
        """
        parts: list[np.ndarray] = []
        spans: list[tuple[int, int, int]] = []
        for row, view in enumerate(views):
            pieces = list(view) if view.ndim == 4 else self._native_parts(view)
            spans.append((len(parts), len(parts) + len(pieces), (frames[row] if frames else None) or len(pieces)))
            parts += pieces
        z = self._log_odds(parts)
        groups = [z[start:stop].reshape(count, -1).mean(axis=1) for start, stop, count in spans]
        mean = np.array([g.mean() if g.size else 0.0 for g in groups])
        top = np.array([g.argmax() if g.size else 0 for g in groups], np.int64)
        best = np.array([g[t] if g.size else -np.inf for g, t in zip(groups, top, strict=True)])
        counts = np.array([stop - start for start, stop, _ in spans], np.int32)
        return ViewScores(_sigmoid(mean), _sigmoid(best), counts, top, [_sigmoid(g) for g in groups])

    def _native_parts(self, image: np.ndarray) -> list[np.ndarray]:
        """The image, or near-equal pieces of at most the tile side when a side exceeds the threshold."""
        if self.native_tiles is None or max(image.shape[:2]) <= self.native_tiles[0]:
            return [image]
        most = self.native_tiles[1]
        rows, cols = split_even(image.shape[0], most), split_even(image.shape[1], most)
        return [image[top:bottom, left:right] for top, bottom in rows for left, right in cols]

    def _log_odds(self, parts: list[np.ndarray]) -> np.ndarray:
        """Log-odds of AI per part; parts of one shape go through the model together, others alone."""
        z = np.zeros(len(parts), np.float64)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, part in enumerate(parts):
            by_shape.setdefault(part.shape, []).append(i)
        for shape, members in by_shape.items():
            pixels = shape[0] * shape[1]
            step = max(1, CUDA_PIXELS_PER_PASS // pixels) if self.cuda else cpu_chunk(round(pixels**0.5))
            done = []
            for start in range(0, len(members), step):
                chunk = torch.from_numpy(np.stack([parts[i] for i in members[start : start + step]]))
                if self.cuda:
                    chunk = chunk.pin_memory().to(self.device, non_blocking=True)
                for logits in self._logits(chunk.permute(0, 3, 1, 2), step):
                    done.append(log_odds_from_logits(logits, self.ai_class_index).double().cpu().numpy())
            z[members] = np.concatenate(done)
        return z

    def _predict_mixed(self, images: np.ndarray, ok: np.ndarray, on_device: OnDevice) -> np.ndarray:
        """P(AI) of the ``ok`` rows when some were decoded on the device (``--gpu-decode``): those stay
        there, and only the rows decoded on the CPU are copied over."""
        rows, crops = on_device
        size = images.shape[1]
        x = torch.empty((len(ok), 3, size, size), dtype=torch.uint8, device=self.device)
        if rows:
            x[rows] = crops
        decoded_here = set(rows)
        host = [i for i in np.flatnonzero(ok).tolist() if i not in decoded_here]
        if host:
            chunk = torch.from_numpy(np.ascontiguousarray(images[host]))
            if self.cuda:
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            x[host] = chunk.permute(0, 3, 1, 2)
        return self._forward(x[torch.from_numpy(ok).to(self.device)])

    def __call__(self, batch: pa.Table) -> pa.Table:
        on_device, images = None, None
        if schema.DATA in batch.column_names:
            assert self.decoder is not None, "a batch with _data needs decode_options"
            batch, images, on_device = self.decoder.decode(batch)
        ok = np.asarray(pc.equal(batch.column(schema.STATUS), schema.Status.OK.value).to_numpy(zero_copy_only=False))
        n = len(ok)
        scored = ViewScores(
            np.full(n, np.nan, np.float32),
            np.full(n, np.nan, np.float32),
            np.zeros(n, np.int32),
            np.zeros(n, np.int64),
            [None] * n,
        )
        infer_ms = np.full(n, np.nan, dtype=np.float32)
        if ok.any():
            start = time.perf_counter()
            self._score_rows(batch, ok, out=scored, on_device=on_device, images=images)
            infer_ms[ok] = (time.perf_counter() - start) * 1000.0 / int(ok.sum())
        frame_max_t = _top_times(batch, ok, scored.top)
        batch = batch.drop_columns(
            [c for c in (schema.IMAGE, schema.PIXELS, schema.PIXEL_SHAPE) if c in batch.column_names]
        )
        labels = [
            (schema.LABEL_AI if s >= self.threshold else schema.LABEL_REAL) if good else None
            for s, good in zip(scored.score.tolist(), ok.tolist(), strict=True)
        ]
        out = batch.append_column(schema.SCORE, pa.array(scored.score, pa.float32()))
        out = out.append_column(schema.SCORE_MAX, pa.array(scored.score_max, pa.float32()))
        out = out.append_column(schema.FRAME_MAX_T, pa.array(frame_max_t, pa.float32()))
        out = out.append_column(schema.N_TILES, pa.array(scored.parts, pa.int32(), mask=~ok))
        out = out.append_column(schema.LABEL, pa.array(labels, pa.string()))
        out = out.append_column(schema.MODEL_ID, pa.array([self.model_id] * n, pa.string()))
        out = out.append_column(schema.FRAME_SCORES, pa.array(scored.groups, schema.HIDDEN_TYPES[schema.FRAME_SCORES]))
        return out.append_column(schema.T_INFER_MS, pa.array(infer_ms, pa.float32()))

    def _score_rows(
        self, batch: pa.Table, ok: np.ndarray, *, out: ViewScores, on_device: OnDevice | None, images: Any
    ) -> None:
        """Fill ``out`` for the ``ok`` rows from whichever view the batch carries."""
        if schema.PIXELS in batch.column_names:
            views, rows = pixels_of(batch), np.flatnonzero(ok)
            frames = batch.column(schema.N_FRAMES).to_pylist() if schema.N_FRAMES in batch.column_names else None
            scored = self.score_views([views[i] for i in rows], frames and [frames[i] for i in rows])
            out.score[ok], out.score_max[ok], out.parts[ok] = scored.score, scored.score_max, scored.parts
            out.top[ok] = scored.top
            if frames:
                for row, group in zip(rows.tolist(), scored.groups, strict=True):
                    out.groups[row] = group if frames[row] else None
            return
        if on_device is not None:
            out.score[ok] = self._predict_mixed(images, ok, on_device)
        else:
            out.score[ok] = self.predict(batch.column(schema.IMAGE).combine_chunks().to_numpy()[ok])
        out.score_max[ok] = out.score[ok]
        out.parts[ok] = 1


def _top_times(batch: pa.Table, ok: np.ndarray, top: np.ndarray) -> list[float | None]:
    """Each scored video row's time of its most AI-looking frame (``top``); ``None`` for stills and failures."""
    if schema.FRAME_TIMES not in batch.column_names:
        return [None] * len(ok)
    times = batch.column(schema.FRAME_TIMES).to_pylist()
    return [t[int(k)] if good and t else None for t, k, good in zip(times, top, ok.tolist(), strict=True)]
