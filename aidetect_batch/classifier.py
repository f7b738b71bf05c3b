"""The Classifier stage: a callable class for ``map_batches`` on an actor pool.

Each actor parses the checkpoint and builds the model once. It picks CUDA
when the actor can see a GPU and falls back to CPU otherwise: GPUs are
logical resources in Ray, so an actor granted ``num_gpus=1`` may still land
on a machine without one. On CUDA the batch goes in channels_last, through
pinned memory with a non-blocking copy, under bf16/fp16 autocast when asked.
Rows that failed earlier pass through with a NaN score and a null label.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from aidetect_batch import schema
from aidetect_batch.model import parse_checkpoint, scores_from_logits

_logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    """

    def __init__(
        self,
        checkpoint: Any,
        arch: str | None = None,
        ai_class_index: int | None = None,
        threshold: float = 0.5,
        precision: str = "fp32",
        cpu_threads: int | None = None,
        device: str | None = None,
    ) -> None:
        if not isinstance(checkpoint, bytes):
            import ray

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
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(ckpt.mean, device=self.device).view(shape) * 255.0
        self.std = torch.tensor(ckpt.std, device=self.device).view(shape) * 255.0
        self.ai_class_index = ckpt.ai_class_index
        self.threshold = threshold
        self.model_id = ckpt.model_id
        _logger.info("Classifier ready: %s (%s) on %s", ckpt.arch, ckpt.model_id, self.device)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """P(AI) for an ``(N, H, W, 3)`` uint8 array, as float32."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast("cuda", dtype=self.autocast_dtype):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            return scores_from_logits(logits, self.ai_class_index).cpu().numpy().astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(pc.equal(batch.column(schema.STATUS), schema.Status.OK.value).to_numpy(zero_copy_only=False))
        n = len(ok)
        scores = np.full(n, np.nan, dtype=np.float32)
        infer_ms = np.full(n, np.nan, dtype=np.float32)
        if ok.any():
            images = batch.column(schema.IMAGE).combine_chunks().to_numpy()
            start = time.perf_counter()
            scores[ok] = self.predict(images[ok])
            infer_ms[ok] = (time.perf_counter() - start) * 1000.0 / int(ok.sum())
        labels = [
            (schema.LABEL_AI if s >= self.threshold else schema.LABEL_REAL) if good else None
            for s, good in zip(scores.tolist(), ok.tolist(), strict=True)
        ]
        out = batch.drop_columns([schema.IMAGE])
        out = out.append_column(schema.SCORE, pa.array(scores, pa.float32()))
        out = out.append_column(schema.LABEL, pa.array(labels, pa.string()))
        out = out.append_column(schema.MODEL_ID, pa.array([self.model_id] * n, pa.string()))
        return out.append_column(schema.T_INFER_MS, pa.array(infer_ms, pa.float32()))
