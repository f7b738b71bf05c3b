"""Image perturbations for the robustness sweep: what a platform does to an upload.

Published detectors collapse under re-compression and resizing, so
``evaluate --perturb`` rescores the labelled set under each perturbation.
A perturbation applies to the decoded image at full resolution, before the
preprocess policy, exactly where a platform's re-encoding would have acted.

- ``jpeg:Q``: re-encode as JPEG at quality Q (1-100, 4:2:0 subsampling as
  most platforms use).
- ``blur:S``: Gaussian blur with standard deviation S pixels.
- ``downscale:F``: scale both sides by F (0 < F < 1), bilinear with antialiasing.
"""

from __future__ import annotations

import dataclasses
import io

from PIL import Image, ImageFilter

KINDS = ("jpeg", "blur", "downscale")


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """One perturbation, e.g. ``jpeg:75``."""

    kind: str
    value: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def apply(self, img: Image.Image) -> Image.Image:
        """Return the perturbed RGB image."""
        if self.kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(self.value))
            buf.seek(0)
            return Image.open(buf).convert("RGB")
        if self.kind == "blur":
            return img.filter(ImageFilter.GaussianBlur(radius=self.value))
        width, height = img.size
        size = (max(1, round(width * self.value)), max(1, round(height * self.value)))
        return img.resize(size, Image.BILINEAR, reducing_gap=None)


def parse(spec: str) -> Perturbation:
    """Parse one ``kind:value`` (e.g. ``blur:2``); raises ``ValueError`` naming the valid form."""
    kind, _, raw = spec.partition(":")
    if kind not in KINDS or not raw:
        raise ValueError(f"perturbation {spec!r}: use {', '.join(k + ':VALUE' for k in KINDS)}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"perturbation {spec!r}: {raw!r} is not a number") from None
    if kind == "jpeg" and not (1 <= value <= 100 and value == int(value)):
        raise ValueError(f"perturbation {spec!r}: JPEG quality is an integer from 1 to 100")
    if kind == "blur" and not value > 0:
        raise ValueError(f"perturbation {spec!r}: blur sigma must be above 0")
    if kind == "downscale" and not 0 < value < 1:
        raise ValueError(f"perturbation {spec!r}: downscale factor must be between 0 and 1")
    return Perturbation(kind, value)


def parse_sweep(specs: list[str] | tuple[str, ...]) -> list[Perturbation]:
    """Parse ``--perturb`` arguments: ``jpeg:95,75,50 blur:1,2 downscale:0.5``."""
    found: list[Perturbation] = []
    for spec in specs:
        kind, _, values = spec.partition(":")
        for value in values.split(",") if values else [""]:
            item = parse(f"{kind}:{value}")
            if item not in found:
                found.append(item)
    return found
