"""The Classifier stage: a callable class for ``map_batches`` on an actor pool.

Each actor parses the checkpoint and builds the model once. It picks CUDA
when the actor can see a GPU and falls back to CPU otherwise: GPUs are
logical resources in Ray, so an actor granted ``num_gpus=1`` may still land
on a machine without one. On CUDA the batch goes in channels_last, through
pinned memory with a non-blocking copy, under bf16/fp16 autocast when asked.
Rows that failed earlier pass through with a NaN score and a null label.

With ``--gpu-decode`` the decode stage only reads bytes, and the actor
decodes them with :class:`aidetect_batch.device_decode.DeviceDecoder`;
images it decoded on the GPU are fed to the model without leaving it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from aidetect_batch import schema
from aidetect_batch.device_decode import DeviceDecoder, OnDevice
from aidetect_batch.model import parse_checkpoint, scores_from_logits
from aidetect_batch.prepare import PrepareOptions

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
        self.decoder = None
        if decode_options is not None:
            on_device = self.cuda if torch_decode is None else torch_decode
            self.decoder = DeviceDecoder(decode_options, self.device, torch_decode=on_device)
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
        on_device = None
        if schema.DATA in batch.column_names:
            assert self.decoder is not None, "a batch with _data needs decode_options"
            batch, images, on_device = self.decoder.decode(batch)
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
