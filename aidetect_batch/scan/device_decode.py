"""``--gpu-decode``: the Classifier actor decodes the ``_data`` bytes itself, on its device when it can.

Baseline JPEGs go through one batched ``torchvision.io.decode_jpeg`` call on
the actor's device (nvJPEG on CUDA), are resized and cropped there with
torchvision's antialiased bilinear resize, and stay on the device for the
model. Everything else (other formats, CMYK, files without an end marker,
images over ``max_pixels``, perturbation sweeps, a batch the decoder
rejects, and every file when the device is a CPU) goes through the CPU
stage's own per-file code (:func:`aidetect_batch.scan.cpu_stage.decode_into`), so
statuses are the same as without ``--gpu-decode``.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from aidetect_batch import schema
from aidetect_batch.detectors import policies
from aidetect_batch.media import pdq, perturb
from aidetect_batch.scan.cpu_stage import PrepareOptions, decode_into

_logger = logging.getLogger(__name__)

OnDevice = tuple[list[int], torch.Tensor]


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG that ends with its end-of-image marker; truncated ones go to the CPU path, which flags them."""
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00").endswith(b"\xff\xd9")


class DeviceDecoder:
    """Decodes a batch's ``_data`` column for a Classifier actor.

    Args:
        options: How the CPU stage would have decoded these files.
        device: The actor's device.
        torch_decode: Batch-decode JPEGs with torchvision on ``device`` (on by default only on CUDA;
            the tests turn it on on the CPU).
    """

    def __init__(self, options: PrepareOptions, device: torch.device, *, torch_decode: bool) -> None:
        self.options = options
        self.device = device
        self.cuda = device.type == "cuda"
        self.torch_decode = torch_decode

    def decode(self, batch: pa.Table) -> tuple[pa.Table, np.ndarray, OnDevice]:
        """Decode the ``_data`` bytes (``--gpu-decode``): the batch with its decode columns filled, the
        CPU-decoded images, and the rows decoded on the device with their ``(K, 3, S, S)`` crops there."""
        opts = self.options
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
            decode_into(cols, i, data[i], images=images, options=opts.file_options, change=change)
        out = batch.drop_columns([schema.DATA])
        for name, values in cols.items():
            out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, out.schema.field(name).type))
        return out, images, on_device

    def _torch_decode(self, idx: list[int], data: list[Any], cols: dict[str, list[Any]]) -> OnDevice:
        """Batch-decode baseline JPEGs with torchvision on this actor's device: the rows it handled and
        their preprocessed ``(K, 3, S, S)`` uint8 crops, left on the device."""
        opts = self.options
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
        if opts.phash:
            _hash_on_host(decoded, chosen, cols)
        crops = []
        for img in decoded:
            if policies.get(policy).resamples:
                height, width = policies.resized_size(img.shape[-2], img.shape[-1], size)
                if (height, width) != tuple(img.shape[-2:]):
                    img = F.resize(img, [height, width], antialias=True)
            crops.append(F.center_crop(img, [size, size]))
        stacked = torch.stack(crops)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        each_ms = (time.perf_counter() - start) * 1000.0 / len(chosen)
        for i, (mode, width, height) in zip(chosen, headers, strict=True):
            cols[schema.FORMAT][i], cols[schema.MODE][i] = "JPEG", mode
            cols[schema.WIDTH][i], cols[schema.HEIGHT][i] = width, height
            cols[schema.COVERAGE][i] = policies.fixed_coverage(policy, height, width, size)
            cols[schema.STATUS][i], cols[schema.ERROR][i] = schema.Status.OK.value, None
            cols[schema.T_DECODE_MS][i] = each_ms
        return chosen, stacked


def _hash_on_host(decoded: list[torch.Tensor], rows: list[int], cols: dict[str, list[Any]]) -> None:
    """``--phash`` for device-decoded rows: PDQ needs the full decoded image, so each comes back to the host."""
    for i, img in zip(rows, decoded, strict=True):
        hashed = pdq.pdq_of(Image.fromarray(img.permute(1, 2, 0).cpu().numpy()))
        cols[schema.PDQ][i], cols[schema.PDQ_QUALITY][i] = hashed.hash, hashed.quality
