"""The Classifier stage: a callable class for ``map_batches`` on an actor pool.

Each actor parses the checkpoint and builds the model once. It picks CUDA
when the actor can see a GPU and falls back to CPU otherwise: GPUs are
logical resources in Ray, so an actor granted ``num_gpus=1`` may still land
on a machine without one. On CUDA the batch goes in channels_last, through
pinned memory with a non-blocking copy, under bf16/fp16 autocast when asked.
Rows that failed earlier pass through with a NaN score and a null label.

With ``--gpu-decode`` the decode stage only reads bytes, and the actor
decodes: baseline JPEGs in one batched ``torchvision.io.decode_jpeg`` call
on the GPU (nvJPEG), resized and cropped there with torchvision's
antialiased bilinear resize, and fed to the model without leaving the GPU;
everything else (other formats, CMYK, files
without an end marker, images over ``max_pixels``, perturbation sweeps, a
batch nvJPEG rejects, and every file when no GPU is visible) per file on
the CPU with the decode stage's own code, so statuses are the same.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from aidetect_batch import perturb, preprocess, schema
from aidetect_batch.model import parse_checkpoint, scores_from_logits
from aidetect_batch.prepare import PrepareOptions, decode_into

_logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# glibc serves allocations over 32 MiB (its largest mmap threshold) with fresh pages from mmap
# and unmaps them on free, so on CPU every activation of a large batch is page-faulted in again.
# ResNet50 at batch 64 on one thread spent 43% of its time in the kernel (17M minor faults in
# 94 s) and ran at 5.0 img/s, against 7.7 at batch 8, whose largest activation (26 MB) stays
# on the heap. On CPU the Classifier therefore runs each batch in chunks of this many 224 px
# images, fewer for larger inputs. CUDA has its own caching allocator and takes the whole batch.
CPU_CHUNK_224 = 8


def cpu_chunk(size: int) -> int:
    """Images per forward pass on CPU for ``size`` px inputs: the activations of ``CPU_CHUNK_224``
    images at 224 px, so they stay under glibc's mmap threshold."""
    return max(1, round(CPU_CHUNK_224 * (224 / size) ** 2))


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG that ends with its end-of-image marker; truncated ones go to the CPU path, which flags them."""
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00").endswith(b"\xff\xd9")


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
    ) -> None:
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
        self.decode_options = decode_options
        self.torch_decode = self.cuda if torch_decode is None else torch_decode
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(ckpt.mean, device=self.device).view(shape) * 255.0
        self.std = torch.tensor(ckpt.std, device=self.device).view(shape) * 255.0
        self.ai_class_index = ckpt.ai_class_index
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
        scores = []
        with torch.inference_mode():
            for part in x.split(max(step, 1)):
                part = (part.float() - self.mean) / self.std
                part = part.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
                if self.autocast_dtype is not None:
                    with torch.autocast("cuda", dtype=self.autocast_dtype):
                        logits = self.model(part)
                else:
                    logits = self.model(part)
                scores.append(scores_from_logits(logits, self.ai_class_index).cpu().numpy())
        return np.concatenate(scores).astype(np.float32) if scores else np.empty(0, np.float32)

    def _predict_mixed(
        self, images: np.ndarray, ok: np.ndarray, on_device: tuple[list[int], torch.Tensor]
    ) -> np.ndarray:
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

    def _decode(self, batch: pa.Table) -> tuple[pa.Table, np.ndarray, tuple[list[int], torch.Tensor]]:
        """Decode the ``_data`` bytes (``--gpu-decode``): the batch with its decode columns filled, the
        CPU-decoded images, and the rows decoded on the device with their ``(K, 3, S, S)`` crops there."""
        opts = self.decode_options
        assert opts is not None, "a batch with _data needs decode_options"
        size = opts.size
        data = batch.column(schema.DATA).to_pylist()
        n = len(data)
        cols = {c: batch.column(c).to_pylist() for c in schema.DECODED_COLUMNS}
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        pending = [i for i in range(n) if data[i] is not None]
        on_device: tuple[list[int], torch.Tensor] = ([], torch.empty(0))
        if self.torch_decode and not opts.perturbation:
            on_device = self._torch_decode([i for i in pending if _plain_jpeg(data[i])], data, cols)
        change = perturb.parse(opts.perturbation) if opts.perturbation else None
        done = set(on_device[0])
        for i in pending:
            if i in done:
                continue
            decode_into(cols, i, data[i], images=images, options=opts, change=change)
        out = batch.drop_columns([schema.DATA])
        for name, values in cols.items():
            out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, out.schema.field(name).type))
        return out, images, on_device

    def _torch_decode(
        self, idx: list[int], data: list[Any], cols: dict[str, list[Any]]
    ) -> tuple[list[int], torch.Tensor]:
        """Batch-decode baseline JPEGs with torchvision on this actor's device: the rows it handled and
        their preprocessed ``(K, 3, S, S)`` uint8 crops, left on the device."""
        opts = self.decode_options
        assert opts is not None
        size, policy = opts.size, opts.policy
        chosen, tensors, headers = [], [], []
        for i in idx:
            try:
                header = Image.open(io.BytesIO(data[i]))
            except (OSError, ValueError):
                continue
            width, height = header.size
            if width * height > opts.max_pixels or header.mode not in ("RGB", "L"):
                continue
            chosen.append(i)
            headers.append((header.mode, width, height))
            tensors.append(torch.frombuffer(bytearray(data[i]), dtype=torch.uint8))
        if not tensors:
            return [], torch.empty(0)
        start = time.perf_counter()
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError as exc:
            _logger.warning("batched JPEG decode failed (%s); decoding these %d files on the CPU", exc, len(tensors))
            return [], torch.empty(0)
        short = preprocess.resize_short_side(size)
        crops = []
        for img in decoded:
            if policy == "resize":
                img = F.resize(img, [short], antialias=True)
            crops.append(F.center_crop(img, [size, size]))
        stacked = torch.stack(crops)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        each_ms = (time.perf_counter() - start) * 1000.0 / len(chosen)
        for i, (mode, width, height) in zip(chosen, headers, strict=True):
            cols[schema.FORMAT][i], cols[schema.MODE][i] = "JPEG", mode
            cols[schema.WIDTH][i], cols[schema.HEIGHT][i] = width, height
            cols[schema.STATUS][i], cols[schema.ERROR][i] = schema.Status.OK.value, None
            cols[schema.T_DECODE_MS][i] = each_ms
        return chosen, stacked

    def __call__(self, batch: pa.Table) -> pa.Table:
        on_device = None
        if schema.DATA in batch.column_names:
            batch, images, on_device = self._decode(batch)
        ok = np.asarray(pc.equal(batch.column(schema.STATUS), schema.Status.OK.value).to_numpy(zero_copy_only=False))
        n = len(ok)
        scores = np.full(n, np.nan, dtype=np.float32)
        infer_ms = np.full(n, np.nan, dtype=np.float32)
        if ok.any():
            start = time.perf_counter()
            if on_device is not None:
                scores[ok] = self._predict_mixed(images, ok, on_device)
            else:
                scores[ok] = self.predict(batch.column(schema.IMAGE).combine_chunks().to_numpy()[ok])
            infer_ms[ok] = (time.perf_counter() - start) * 1000.0 / int(ok.sum())
        if on_device is None:
            batch = batch.drop_columns([schema.IMAGE])
        labels = [
            (schema.LABEL_AI if s >= self.threshold else schema.LABEL_REAL) if good else None
            for s, good in zip(scores.tolist(), ok.tolist(), strict=True)
        ]
        out = batch.append_column(schema.SCORE, pa.array(scores, pa.float32()))
        out = out.append_column(schema.LABEL, pa.array(labels, pa.string()))
        out = out.append_column(schema.MODEL_ID, pa.array([self.model_id] * n, pa.string()))
        return out.append_column(schema.T_INFER_MS, pa.array(infer_ms, pa.float32()))
