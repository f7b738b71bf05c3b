"""What a file says about its own origin, read from its bytes before any model sees it.

Cheap checks run on every file that was read: EXIF ``Software`` and ``UserComment``, the XMP packet's
IPTC ``DigitalSourceType``, and the text chunks that generator front-ends write (AUTOMATIC1111's
``parameters``, ComfyUI's ``prompt`` and ``workflow``). A C2PA manifest is read, and its signature
validated, only when the bytes carry a JUMBF ``c2pa`` box. The Stable Diffusion invisible watermark is
costly and off unless asked for. Every check is defensive: a malformed block yields no signal, never
an exception.

The strongest signal becomes ``provenance`` (vocabulary and order in :data:`schema.PROVENANCE_KINDS`);
every signal found goes into ``provenance_detail``. The model's score is left alone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.media import decode, video

DETAIL_CHARS = 400
TRAINED = "trainedAlgorithmicMedia"
COMPOSITE = "compositeWithTrainedAlgorithmicMedia"
_EXIF_IFD = 0x8769
_SOFTWARE = 0x0131
_USER_COMMENT = 0x9286
_XMP_PACKET = re.compile(rb"<x:xmpmeta.*?</x:xmpmeta>", re.DOTALL)
_SOURCE_TYPE = re.compile(r"DigitalSourceType(?:\s*=\s*[\"']|>\s*|[^>]*?rdf:resource\s*=\s*[\"'])([^\"'<\s]+)")
_PARAMETER_FIELDS = re.compile(r"\b(Steps|Sampler|CFG scale|Seed|Model hash|Model):\s*([^,\n]+)")
# Generator front-ends' PNG text keys whose presence alone names the tool.
_GENERATOR_KEYS = {
    "invokeai_metadata": "InvokeAI",
    "sd-metadata": "InvokeAI",
    "Dream": "InvokeAI",
    "fooocus_scheme": "Fooocus",
}
_GENERATORS = re.compile(
    r"\b(midjourney|dall[-·\s]?e|stable\s?diffusion|novelai|firefly|imagen|comfyui|automatic1111|invokeai|"
    r"fooocus|leonardo\.?ai|nightcafe|dreamstudio|craiyon|ideogram|flux\.\d|bing image creator|chatgpt|"
    r"sora|runway\s?ml|runway gen-?\d|pika\s?labs|kling|veo\s?\d|dream machine|hailuo|synthesia|heygen)\b",
    re.IGNORECASE,
)
_EDITORS = re.compile(
    r"\b(photoshop|lightroom|gimp|affinity|pixelmator|paint\.net|canva|snapseed|picsart|facetune|capture one|"
    r"darktable|luminar|premiere|final cut|davinci resolve|capcut|imovie|after effects)\b",
    re.IGNORECASE,
)
_MIME = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_BMFF_MIME = {b"avif": "image/avif", b"avis": "image/avif", b"heic": "image/heic", b"heix": "image/heic"}
# Video containers c2pa reads manifests from (WebM and Matroska have no C2PA binding).
_VIDEO_MIME = {"MP4": "video/mp4", "MOV": "video/quicktime", "AVI": "video/x-msvideo"}
# Network off: a scan is offline, and a file must not make the worker fetch a remote manifest or OCSP.
_C2PA_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
# Messages the Stable Diffusion reference scripts embed with invisible-watermark's dwtDct.
_SD_MARKS = (
    ("StableDiffusionV1", "bytes", np.unpackbits(np.frombuffer(b"StableDiffusionV1", np.uint8))),
    ("SDV2", "bytes", np.unpackbits(np.frombuffer(b"SDV2", np.uint8))),
    ("SDXL", "bits", np.array([int(b) for b in "101100111110110010010000011110111011000110011110"], np.uint8)),
)
WATERMARK_MIN_SIDE = 256
WATERMARK_BIT_AGREEMENT = 0.9


@dataclasses.dataclass(frozen=True)
class Checks:
    """Which provenance checks run: the cheap ones always; C2PA when a marker is present; the watermark on request."""

    c2pa: bool = True
    watermark: bool = False
    max_pixels: int = 178_956_970


@dataclasses.dataclass(frozen=True)
class Signal:
    """One piece of evidence: its kind (a :data:`schema.PROVENANCE_KINDS` entry) and what it says."""

    kind: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Provenance:
    """A file's provenance columns: the strongest kind found (or ``None``) and all the evidence."""

    kind: str | None = None
    detail: str | None = None

    @classmethod
    def of(cls, signals: list[Signal]) -> Provenance:
        """The strongest signal's kind, and every signal's detail strongest first."""
        if not signals:
            return cls()
        ranked = sorted(signals, key=lambda s: schema.PROVENANCE_KINDS.index(s.kind))
        detail = "; ".join(dict.fromkeys(s.detail for s in ranked))
        return cls(ranked[0].kind, detail[:DETAIL_CHARS])


def inspect(data: bytes, checks: Checks = Checks()) -> Provenance:
    """Every provenance signal in ``data``, reduced to the provenance columns. Never raises on data."""
    container = video.container_of(data)
    signals = video_tag_signals(data) if container else _metadata_signals(data)
    if checks.c2pa and has_c2pa_marker(data):
        signals.extend(c2pa_signals(data))
    if checks.watermark:
        signals.extend(watermark_signals(data, checks.max_pixels))
    return Provenance.of(signals)


def _metadata_signals(data: bytes) -> list[Signal]:
    info: dict[str, Any] = {}
    exif = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
            info = dict(img.info)
            exif = img.getexif()
        except Exception:  # noqa: BLE001 - unreadable metadata is no evidence, not a failure (PNG's EXIF may need
            pass  # the pixel data, so a truncated PNG keeps the text chunks read before it)
    return [*text_signals(info), *xmp_signals(_xmp_of(info, data)), *exif_signals(exif)]


# Container and stream tags of a video that name the software that wrote it (FFmpeg's names for them).
VIDEO_TAGS = ("encoder", "handler_name", "comment", "title", "description", "software", "encoded_by", "artist")


def video_tag_signals(data: bytes) -> list[Signal]:
    """A video's container and video-stream tags (``encoder``, ``handler_name``, ...) that name a generator or
    an editor, and an XMP packet's declared source anywhere in the file (MP4 keeps it in a ``uuid`` box)."""
    return [*tag_signals(video.tags_of(data)), *xmp_signals(_xmp_of({}, data))]


def tag_signals(tags: list[tuple[str, str]]) -> list[Signal]:
    """The :data:`VIDEO_TAGS` among a video's tags that name a generator or an editor."""
    return [s for key, value in tags if key in VIDEO_TAGS for s in _software_signal(value, f"video {key}")]


def has_c2pa_marker(data: bytes) -> bool:
    """Whether ``data`` holds a JUMBF superbox labelled ``c2pa`` (where every embedded manifest store lives)."""
    return b"jumb" in data and b"c2pa" in data


# --- text chunks ---------------------------------------------------------------------------------


def text_signals(info: dict[str, Any]) -> list[Signal]:
    """Generator parameters in PNG text chunks: A1111's ``parameters``, ComfyUI's ``prompt``/``workflow``."""
    signals = []
    parameters = info.get("parameters")
    if isinstance(parameters, str) and parameters.strip():
        signals.append(Signal("generator_params", f"A1111 parameters ({_parameter_summary(parameters)})"))
    comfy = [key for key in ("prompt", "workflow") if _json_object(info.get(key)) is not None]
    if comfy:
        checkpoint = _comfy_checkpoint(_json_object(info.get("prompt")))
        named = f", checkpoint {checkpoint}" if checkpoint else ""
        signals.append(Signal("generator_params", f"ComfyUI {' and '.join(comfy)} JSON{named}"))
    for key, tool in _GENERATOR_KEYS.items():
        if info.get(key):
            signals.append(Signal("generator_params", f"{tool} metadata in PNG text '{key}'"))
    software = info.get("Software")
    if isinstance(software, str):
        signals.extend(_software_signal(software, "PNG text Software"))
    return signals


def _parameter_summary(text: str) -> str:
    fields = dict(_PARAMETER_FIELDS.findall(text))
    named = [f"{k.lower()} {fields[k].strip()}" for k in ("Model", "Model hash", "Sampler", "Steps") if k in fields]
    return ", ".join(named) if named else f"{len(text)} characters"


def _json_object(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _comfy_checkpoint(prompt: dict[str, Any] | None) -> str | None:
    for node in (prompt or {}).values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("ckpt_name"), str):
            return inputs["ckpt_name"]
    return None


# --- XMP -----------------------------------------------------------------------------------------


def _xmp_of(info: dict[str, Any], data: bytes) -> str | None:
    packet = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if packet is None:
        found = _XMP_PACKET.search(data)
        packet = found.group(0) if found else None
    if isinstance(packet, bytes):
        packet = packet.decode("utf-8", "replace")
    return packet


def xmp_signals(xmp: str | None) -> list[Signal]:
    """IPTC ``DigitalSourceType`` declaring trained algorithmic media, in the XMP packet."""
    if not xmp:
        return []
    signals = []
    for uri in _SOURCE_TYPE.findall(xmp):
        term = uri.rstrip("/").rsplit("/", 1)[-1]
        if term in (TRAINED, COMPOSITE):
            signals.append(Signal("iptc_ai", f"XMP Iptc4xmpExt:DigitalSourceType {term}"))
    return signals


# --- EXIF ----------------------------------------------------------------------------------------


def exif_signals(exif: Image.Exif) -> list[Signal]:
    """Generator parameters in EXIF ``UserComment``; a generator or editor named in EXIF ``Software``."""
    signals = []
    try:
        comment = _user_comment(exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT))
        software = exif.get(_SOFTWARE)
    except Exception:  # noqa: BLE001 - a broken EXIF block carries no evidence
        return []
    if comment and ("Steps:" in comment or "Negative prompt:" in comment):
        summary = _parameter_summary(comment)
        signals.append(Signal("generator_params", f"A1111 parameters in EXIF UserComment ({summary})"))
    if isinstance(software, str):
        signals.extend(_software_signal(software, "EXIF Software"))
    return signals


def _user_comment(value: Any) -> str | None:
    """EXIF ``UserComment``: an 8-byte character-code prefix, then the text (UTF-16 for ``UNICODE``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or len(value) < 8:
        return None
    code, body = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        candidates = [body.decode(enc, "ignore") for enc in ("utf-16-be", "utf-16-le")]
        return max(candidates, key=lambda t: sum(c.isascii() and c.isprintable() for c in t))
    return body.decode("utf-8" if code.startswith(b"ASCII") else "latin-1", "ignore").strip("\x00")


def _software_signal(software: str, where: str) -> list[Signal]:
    name = software.strip()[:80]
    if _GENERATORS.search(name):
        return [Signal("software_hint", f"{where} {name!r} names a generator")]
    if _EDITORS.search(name):
        return [Signal("software_hint", f"{where} {name!r} names an editor")]
    return []


# --- C2PA ----------------------------------------------------------------------------------------

_C2PA_CONTEXT: Any = None


def _c2pa_context() -> Any:
    """One offline reading context per process (contexts hold native handles and cannot be pickled)."""
    global _C2PA_CONTEXT
    if _C2PA_CONTEXT is None:
        import c2pa  # noqa: PLC0415 - its native library loads only in processes that meet a manifest

        _C2PA_CONTEXT = c2pa.Context.from_dict(_C2PA_SETTINGS)
    return _C2PA_CONTEXT


def c2pa_signals(data: bytes) -> list[Signal]:
    """Read and validate the embedded C2PA manifest store; one signal, or none when there is no store."""
    import c2pa  # noqa: PLC0415 - see _c2pa_context

    try:
        reader = c2pa.Reader.try_create(_mime_of(data), io.BytesIO(data), context=_c2pa_context())
        if reader is None:
            return []
        with reader:
            store = json.loads(reader.json())
    except Exception as exc:  # noqa: BLE001 - a malformed manifest is evidence of tampering, not a crash
        return [Signal("c2pa_invalid", f"C2PA manifest unreadable: {type(exc).__name__}: {str(exc)[:120]}")]
    return [manifest_signal(store)]


def _mime_of(data: bytes) -> str:
    head = data[:16]
    for magic, mime in _MIME:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    container = video.container_of(data)
    if container is not None:
        return _VIDEO_MIME.get(container, "")
    if head[4:8] == b"ftyp":
        return _BMFF_MIME.get(head[8:12], "image/heif")
    return ""


def manifest_signal(store: dict[str, Any]) -> Signal:
    """Classify a C2PA manifest store (``Reader.json()``) by what it declares and whether it validated."""
    manifests = store.get("manifests") or {}
    active = manifests.get(store.get("active_manifest"), {})
    source, agent = _declared_source(active)
    if source is None:
        derived = [_declared_source(m) for label, m in manifests.items() if label != store.get("active_manifest")]
        if any(s in (TRAINED, COMPOSITE) for s, _ in derived):
            source, agent = COMPOSITE, agent or next((a for s, a in derived if a), None)
    claim = f"declares {source}" if source else "declares no AI source"
    by = f" by {agent}" if agent else ""
    state = store.get("validation_state") or "unknown"
    if state == "Invalid":
        codes = _failure_codes(store)
        return Signal("c2pa_invalid", f"C2PA manifest fails validation ({codes}); it {claim}{by}")
    trust = "signature trusted" if state == "Trusted" else "signature valid, signer not on a trust list"
    kind = {TRAINED: "c2pa_ai", COMPOSITE: "c2pa_ai_composite"}.get(source or "", "c2pa_other")
    return Signal(kind, f"C2PA {claim}{by}; {trust}")


def _declared_source(manifest: dict[str, Any]) -> tuple[str | None, str | None]:
    """The manifest's strongest declared digital source type among its actions, and the agent behind it."""
    found: tuple[str | None, str | None] = (None, None)
    for assertion in manifest.get("assertions") or []:
        if not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            term = str(action.get("digitalSourceType") or "").rstrip("/").rsplit("/", 1)[-1]
            if term == TRAINED or (term == COMPOSITE and found[0] != TRAINED):
                found = (term, _agent_name(action.get("softwareAgent")) or _generator_name(manifest))
    return found


def _agent_name(agent: Any) -> str | None:
    if isinstance(agent, dict):
        return " ".join(str(agent[k]) for k in ("name", "version") if agent.get(k)) or None
    return str(agent) if agent else None


def _generator_name(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info") or []
    return _agent_name(info[0]) if info else manifest.get("claim_generator")


def _failure_codes(store: dict[str, Any]) -> str:
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    codes = [f.get("code") for f in results.get("failure") or [] if f.get("code") != "signingCredential.untrusted"]
    codes = codes or [f.get("code") for f in store.get("validation_status") or []]
    return ", ".join(str(c) for c in dict.fromkeys(codes) if c) or "no reason given"


# --- invisible watermark -------------------------------------------------------------------------


def watermark_signals(data: bytes, max_pixels: int) -> list[Signal]:
    """The Stable Diffusion reference scripts' dwtDct watermark, read from the full-resolution pixels."""
    from imwatermark import WatermarkDecoder  # noqa: PLC0415 - optional extra, imported only under --watermark

    decoded = decode.decode_image(data, max_pixels)
    if decoded.image is None or min(decoded.image.size) < WATERMARK_MIN_SIDE:
        return []
    bgr = np.ascontiguousarray(np.asarray(decoded.image)[:, :, ::-1])
    for name, mode, expected in _SD_MARKS:
        try:
            found = WatermarkDecoder(mode, len(expected)).decode(bgr, "dwtDct")
        except Exception:  # noqa: BLE001 - the decoder rejects odd shapes; that is no watermark
            continue
        bits = np.unpackbits(np.frombuffer(found, np.uint8)) if mode == "bytes" else np.asarray(found, np.uint8)
        agreement = float(np.mean(bits[: len(expected)] == expected))
        if agreement >= WATERMARK_BIT_AGREEMENT:
            return [Signal("watermark_sd", f"invisible watermark {name} ({agreement:.0%} of bits)")]
    return []
