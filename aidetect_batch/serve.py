"""The upload page: score uploaded images over HTTP with Ray Serve (``aidetect-batch serve``).

The studies behind this project serve their detector on a web page; this is
that page, run the way the scan runs: the same decode (bomb guard, EXIF,
mode conversion, truncation check), the same preprocess policy and the same
:class:`~aidetect_batch.scan.classifier.Classifier`, so an upload scores exactly as
the file would in a scan. Concurrent uploads are scored in one forward pass
(``serve.batch``), and replicas take a GPU each when the cluster has one.

HTTP API (the page uses it; so can ``curl``):

- ``GET /``: the page. Pick or drop one or more images; each is posted on its own.
- ``POST /score?name=FILE``: the raw file as the body
  (``curl --data-binary @x.jpg 'http://127.0.0.1:8000/score?name=x.jpg'``).
  200 with the score, label and model; 413 for a body over the upload limit
  or an image over ``max_pixels``; 415 for a file that is not an image this
  build decodes; 422 for a truncated image. Failures carry a ``message``.
  With ``--token`` (or ``AIDETECT_TOKEN``) it needs ``Authorization: Bearer TOKEN``, else 401; the page
  asks for the token once per tab. Listening off loopback without a token is refused unless
  ``--insecure`` says the operator's own authentication sits in front.
- ``GET /healthz``: the model the replica loaded.

The replicas read the checkpoint themselves, so on a multi-node cluster it
must be an ``s3://`` URI or a path every node has. One HTTP proxy runs, on
the head node: the page has one address, and replicas anywhere serve it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import html
import json
import logging
import os
import time
from typing import Any

import numpy as np

from aidetect_batch import runtime, schema
from aidetect_batch.detectors import checkpoints, policies
from aidetect_batch.detectors.policies import check_policy
from aidetect_batch.media import provenance
from aidetect_batch.scan.classifier import Classifier
from aidetect_batch.serve_config import ServeConfig

_logger = logging.getLogger(__name__)

APP_NAME = "aidetect"
_STATUS_HTTP = {
    schema.Status.OK: 200,
    schema.Status.TOO_LARGE: 413,
    schema.Status.TRUNCATED: 422,
}


class UploadScorer:
    """The scan's per-file path for uploaded bytes: decode, preprocess, then score in batches.

    Args:
        cfg: The serve configuration (checkpoint, threshold, policy, limits).
        device: Force a torch device (tests); ``None`` picks CUDA when visible.
    """

    def __init__(self, cfg: ServeConfig, device: str | None = None) -> None:

        data = checkpoints.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options)
        self.classifier = Classifier(data, arch=cfg.arch, ai_class_index=cfg.ai_class_index, device=device)
        meta = self.classifier.checkpoint
        self.policy = cfg.preprocess or meta["preprocess"] or policies.DEFAULT_POLICY
        check_policy(self.policy, meta["arch"])
        self.framing = cfg.framing
        self.threshold = cfg.threshold if cfg.threshold is not None else meta["threshold"]
        self.classifier.threshold = self.threshold
        self.size = meta["input_size"]
        self.max_pixels = cfg.max_pixels
        self.model = {
            "arch": meta["arch"],
            "model_id": meta["model_id"],
            "checkpoint": os.path.basename(cfg.checkpoint.rstrip("/")),
            "preprocess": self.policy,
            "input_size": self.size,
            "threshold": self.threshold,
            "device": str(self.classifier.device),
            "untrained": bool(meta["info"].get("untrained")),
        }

    def decode(self, name: str, data: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
        """Decode and preprocess one upload: its result fields so far and the model input (``None`` on failure)."""
        start = time.perf_counter()
        result, view = policies.decode_and_preprocess(
            data, self.policy, self.max_pixels, size=self.size, framing=self.framing
        )
        row: dict[str, Any] = {
            "name": name,
            "bytes": len(data),
            "status": result.status.value,
            "error": result.error,
            "format": result.format,
            "width": result.width,
            "height": result.height,
            "t_decode_ms": (time.perf_counter() - start) * 1000.0,
        }
        found = provenance.inspect(data, provenance.Checks(max_pixels=self.max_pixels))
        row.update(provenance=found.kind, provenance_detail=found.detail)
        if view is None:
            row["message"] = failure_message(name, result.status, result.error)
            return row, None
        row["coverage"] = view.coverage
        return row, view.pixels

    def predict(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        """Scores of preprocessed uploads scored together: ``(S, S, 3)`` views in one forward pass, tiles and
        native images as the scan scores them (:meth:`Classifier.score_views`)."""
        if policies.get(self.policy).fixed:
            scores = self.classifier.predict(np.stack(images)).tolist()
            return [{"score": s, "score_max": s, "n_tiles": 1} for s in scores]
        scored = self.classifier.score_views(images)
        return [
            {"score": float(s), "score_max": float(m), "n_tiles": int(n)}
            for s, m, n in zip(scored.score, scored.score_max, scored.parts, strict=True)
        ]

    def finish(self, row: dict[str, Any], scored: dict[str, float] | None) -> dict[str, Any]:
        """Add the score (with its most AI-looking part and part count), label and model to a decoded row."""
        if scored is not None:
            row.update(scored)
            row["label"] = schema.LABEL_AI if scored["score"] >= self.threshold else schema.LABEL_REAL
        row["model"] = self.model
        return row


def failure_message(name: str, status: schema.Status, error: str | None) -> str:
    """What the page tells a person whose upload could not be scored."""
    detail = f" ({error})" if error else ""
    if status is schema.Status.TOO_LARGE:
        return f"{name} is too large to score{detail}."
    if status is schema.Status.TRUNCATED:
        return f"{name} is a damaged image: its data ends early{detail}."
    if status is schema.Status.EMPTY:
        return f"{name} is empty (0 bytes)."
    return (
        f"{name} is not an image this scanner can read{detail}. Upload a JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP or TIFF."
    )


def http_status(status: str) -> int:
    """HTTP status code of a decode status: 200, 413 (too large), 422 (truncated) or 415 (not an image)."""
    return _STATUS_HTTP.get(schema.Status(status), 415)


UNAUTHORISED = "this page needs its access token: ask whoever runs it"


def authorised(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries the bearer ``token`` (any request, when there is none);
    compared in constant time."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def read_limited(request: Any, limit: int) -> bytes | None:
    """The request body, or ``None`` as soon as it is known to exceed ``limit`` bytes (header or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _deployment() -> Any:
    from ray import serve
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse

    @serve.deployment(name="UploadPage")
    class UploadPage:
        """Ray Serve replica: the page, the scoring endpoint and a health check."""

        def __init__(self, cfg: ServeConfig) -> None:
            self.cfg = cfg
            self.scorer = UploadScorer(cfg)
            self.page = render_page(self.scorer.model, cfg.max_upload_bytes, token_required=cfg.token is not None)
            self._predict.set_max_batch_size(cfg.max_batch_size)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def _predict(self, images: list[np.ndarray]) -> list[dict[str, float]]:
            return await asyncio.to_thread(self.scorer.predict, images)

        async def __call__(self, request: Any) -> Any:
            path = request.url.path.rstrip("/")
            if request.method == "GET" and path in ("", "/index.html"):
                return HTMLResponse(self.page)
            if request.method == "GET" and path == "/healthz":
                return JSONResponse({"ok": True, "model": self.scorer.model})
            if path != "/score":
                return PlainTextResponse("not found", status_code=404)
            if request.method != "POST":
                return PlainTextResponse("POST the image file as the request body", status_code=405)
            name = request.query_params.get("name") or "upload"
            if not authorised(request.headers.get("authorization"), self.cfg.token):
                return JSONResponse(
                    {"name": name, "status": "unauthorized", "message": UNAUTHORISED},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            data = await read_limited(request, self.cfg.max_upload_bytes)
            if data is None:
                limit_mb = self.cfg.max_upload_bytes / 2**20
                message = f"{name} is larger than the {limit_mb:g} MiB upload limit."
                return JSONResponse({"name": name, "status": "too_large", "message": message}, status_code=413)
            row, image = await asyncio.to_thread(self.scorer.decode, name, data)
            scored = None if image is None else await self._predict(image)
            return JSONResponse(self.scorer.finish(row, scored), status_code=http_status(row["status"]))

    return UploadPage


def application(cfg: ServeConfig, gpus: float = 0.0) -> Any:
    """The Ray Serve application for ``cfg`` with ``gpus`` per replica."""
    return (
        _deployment()
        .options(
            num_replicas=cfg.replicas,
            max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
            ray_actor_options={"num_cpus": 1, "num_gpus": gpus},
        )
        .bind(cfg)
    )


def build_app(args: dict[str, str]) -> Any:
    """Application builder for ``serve run aidetect_batch.serve:build_app checkpoint=s3://b/model.pt``."""
    fields = {
        "threshold": float,
        "gpus_per_replica": float,
        "port": int,
        "ai_class_index": int,
        "max_pixels": int,
        "max_upload_bytes": int,
        "replicas": int,
        "max_batch_size": int,
        "native_max_pixels": int,
        "max_tiles": int,
    }
    values: dict[str, Any] = {k: fields.get(k, str)(v) for k, v in args.items()}
    if "insecure" in values:
        values["insecure"] = str(values["insecure"]).lower() in ("1", "true", "yes")
    values.setdefault("token", os.environ.get("AIDETECT_TOKEN") or None)
    cfg = ServeConfig(**values)
    return application(cfg, cfg.gpus_per_replica or 0.0)


def check(cfg: ServeConfig) -> checkpoints.Checkpoint:
    """Read, parse and build the checkpoint on the driver, so a bad one fails before Ray starts."""
    ckpt = checkpoints.parse_checkpoint(
        checkpoints.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options),
        arch=cfg.arch,
        ai_class_index=cfg.ai_class_index,
    )
    ckpt.build()
    check_policy(cfg.preprocess or ckpt.preprocess or policies.DEFAULT_POLICY, ckpt.arch)
    return ckpt


def start(cfg: ServeConfig) -> str:
    """Check the checkpoint, start Ray (or join ``RAY_ADDRESS``) and Serve, deploy; returns the page's URL."""
    from ray import serve

    if "://" not in cfg.checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=os.path.abspath(cfg.checkpoint))
    ckpt = check(cfg)
    if ckpt.info.get("untrained"):
        _logger.warning("checkpoint %s is UNTRAINED (random weights): its scores mean nothing", cfg.checkpoint)
    resources = runtime.start_ray()
    gpus = cfg.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg, gpus), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}/"


def render_page(info: dict[str, Any], max_upload_bytes: int, *, token_required: bool = False) -> str:
    """The self-contained upload page: no external scripts, styles or fonts. With ``token_required`` it
    asks for the access token once per tab; the token itself is never in the page."""
    model_line = html.escape(
        f"{info['arch']} · model {info['model_id']} ({info['checkpoint']}) · preprocess {info['preprocess']} "
        f"{info['input_size']} px · threshold {info['threshold']:.3f} · {info['device']}"
    )
    warning = (
        '<p class="warn">This checkpoint is untrained (random weights): its scores mean nothing.</p>'
        if info.get("untrained")
        else ""
    )
    return (
        _PAGE.replace("__MODEL__", model_line)
        .replace("__WARNING__", warning)
        .replace("__MAX_BYTES__", json.dumps(max_upload_bytes))
        .replace("__TOKEN_REQUIRED__", json.dumps(token_required))
        .replace("__DEFINITE_AI__", json.dumps(schema.DEFINITE_AI))
        .replace("__MODEL_NAME__", json.dumps(f"{info['arch']} {info['model_id']}"))
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aidetect-batch: real or AI?</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222;padding:0 1rem}
#drop{border:2px dashed #888;border-radius:8px;padding:2rem;text-align:center;background:#fafafa}
#drop.over{background:#eef5ff;border-color:#36c}
.model{color:#555;font-size:.9rem}.warn{color:#b00;font-weight:600}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(14rem,1fr));gap:1rem;margin-top:1.5rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem;font-size:.9rem;word-break:break-all}
.card img{width:100%;height:12rem;object-fit:contain;background:#eee}
.label{font-weight:700;font-size:1.1rem}.label.ai{color:#c0392b}.label.real{color:#1e7d32}
.card.failed{border-color:#c0392b;background:#fff5f5}.message{color:#c0392b}
.provenance{font-size:.85rem;color:#555}.provenance.definite{color:#c0392b;font-weight:600}
</style></head><body>
<h1>Real photograph or AI-generated?</h1>
<p class="model" id="model">__MODEL__</p>
__WARNING__
<div id="drop"><p>Drop images here, or</p>
<input type="file" id="files" multiple accept="image/*,.tif,.tiff,.webp,.heic,.heif,.avif">
<p class="model">Each file is scored on its own, with the scan's decode, preprocessing and model.
Scores are P(AI); calibrate the threshold on your own data before acting on them.</p></div>
<div id="results" data-done="0"></div>
<script>
const MAX_BYTES = __MAX_BYTES__, MODEL_NAME = __MODEL_NAME__, TOKEN_REQUIRED = __TOKEN_REQUIRED__;
const DEFINITE_AI = __DEFINITE_AI__;
function provenanceLine(r) {
  if (!r.provenance) return el("div", "provenance", "provenance: none found in the file");
  const definite = DEFINITE_AI.includes(r.provenance);
  return el("div", "provenance" + (definite ? " definite" : ""),
            "provenance: " + r.provenance + " (" + r.provenance_detail + ")");
}
function authHeaders() {
  if (!TOKEN_REQUIRED) return {};
  let token = sessionStorage.getItem("aidetect-token");
  if (!token) {
    token = window.prompt("Access token for this page") || "";
    sessionStorage.setItem("aidetect-token", token);
  }
  return {"Authorization": "Bearer " + token};
}
const results = document.getElementById("results");
function el(tag, cls, text) {
  const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e;
}
function finished() { results.dataset.done = String(Number(results.dataset.done) + 1); }
async function score(file) {
  const card = el("div", "card"); card.dataset.name = file.name;
  const img = el("img"); img.alt = file.name; img.src = URL.createObjectURL(file);
  img.onerror = () => { img.style.display = "none"; };
  card.append(img, el("div", "name", file.name));
  const state = el("div", "state", "scoring…"); card.append(state); results.prepend(card);
  try {
    if (file.size > MAX_BYTES) {
      throw new Error(file.name + " is larger than the " + (MAX_BYTES / 1048576) + " MiB upload limit.");
    }
    const resp = await fetch("score?name=" + encodeURIComponent(file.name),
                             {method: "POST", body: file, headers: authHeaders()});
    if (resp.status === 401) sessionStorage.removeItem("aidetect-token");
    const r = await resp.json();
    card.dataset.status = r.status;
    if (r.provenance) card.dataset.provenance = r.provenance;
    if (!resp.ok) throw new Error(r.message || ("HTTP " + resp.status));
    state.remove();
    card.append(el("div", "label " + r.label, r.label === "ai" ? "AI-generated" : "real"),
                el("div", "score", "P(AI) = " + r.score.toFixed(4)),
                provenanceLine(r),
                el("div", "dims", r.format + " " + r.width + "×" + r.height),
                el("div", "model", r.model.arch + " " + r.model.model_id));
  } catch (err) {
    card.classList.add("failed"); state.remove(); img.style.display = "none";
    card.append(el("div", "message", err.message), el("div", "model", MODEL_NAME));
  }
  finished();
}
function scoreAll(files) { for (const f of files) score(f); }
document.getElementById("files").addEventListener("change", e => scoreAll(e.target.files));
const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  scoreAll(e.dataTransfer.files); });
</script></body></html>
"""
