"""The upload page: Ray Serve on 127.0.0.1 scores uploads exactly as the scan does, enforces the limits,
explains failures, and works from a real browser."""

import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request

import pyarrow as pa
import pytest
from helpers import A1111_PARAMETERS, encode, free_port, photo, png_with_text
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.cli import main
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.detectors.policies import POLICIES, Framing
from aidetect_batch.errors import ConfigError
from aidetect_batch.scan.classifier import Classifier
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.serve import UploadScorer, build_app
from aidetect_batch.serve_config import ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "test-token-5f1c"
MAX_PIXELS = 1_000_000
MAX_UPLOAD = 2 * 2**20


def images() -> dict[str, bytes]:
    return {
        "street.jpg": encode(photo(400, 300, seed=3), "JPEG", quality=92),
        "portrait.png": encode(photo(180, 260, seed=5), "PNG"),
        "tiny.webp": encode(photo(64, 48, seed=7), "WEBP", quality=90),
        "generated.png": png_with_text(parameters=A1111_PARAMETERS),
    }


@pytest.fixture(scope="module")
def scan_scores(tmp_path_factory, tiny_checkpoint) -> dict[str, float]:
    """What the scan's own two stages (the decode task's ``prepare_batch``, then the ``Classifier``) say."""
    root = tmp_path_factory.mktemp("serve")
    for name, data in images().items():
        (root / name).write_bytes(data)
    listing = pa.table({schema.PATH: [str(root / n) for n in images()], schema.SOURCE: [str(root)] * len(images())})
    decoded = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=DEFAULT_MAX_PIXELS))
    with open(tiny_checkpoint, "rb") as handle:
        scored = Classifier(handle.read(), threshold=0.5)(decoded)
    paths, scores = scored[schema.PATH].to_pylist(), scored[schema.SCORE].to_pylist()
    return {os.path.basename(p): s for p, s in zip(paths, scores, strict=True)}


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_checkpoint):
    """The page deployed the way `serve run aidetect_batch.serve:build_app key=value ...` deploys it (string
    arguments); the `aidetect-batch serve` command itself is tested on a two-node cluster in test_multinode."""
    from ray import serve

    port = free_port()
    args = {
        "checkpoint": tiny_checkpoint,
        "max_pixels": str(MAX_PIXELS),
        "max_upload_bytes": str(MAX_UPLOAD),
        "token": TOKEN,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="aidetect", route_prefix="/")
    yield f"http://127.0.0.1:{port}/"
    serve.shutdown()


def post(url: str, name: str, data: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(
        f"{url}score?name={urllib.parse.quote(name)}", data=data, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_uploads_score_exactly_as_the_scan(server, scan_scores):
    for name, data in images().items():
        code, body = post(server, name, data)
        assert code == 200, body
        assert body["status"] == "ok" and body["name"] == name
        assert body["score"] == pytest.approx(scan_scores[name], abs=1e-6), "same decode, preprocess and model"
        assert body["label"] == ("ai" if body["score"] >= 0.5 else "real")
        assert body["model"]["arch"] == "resnet_tiny" and len(body["model"]["model_id"]) == 16
        assert body["model"]["preprocess"] == "resize" and body["model"]["device"] == "cpu"
        assert body["provenance"] == ("generator_params" if name == "generated.png" else None)
    code, body = post(server, "IMG_0001.jpg", encode(photo(300, 200, seed=8), "HEIF"))
    assert code == 200 and body["status"] == "ok" and body["format"] == "HEIF", body


@pytest.mark.parametrize("policy", POLICIES)
def test_the_upload_path_scores_as_the_scan_for_every_policy(tmp_path, tiny_checkpoint, policy):
    """The page's decode and predict against the scan's two stages, under each preprocess policy."""
    framing = Framing(native_max_pixels=60_000, max_tiles=4)
    for name, data in images().items():
        (tmp_path / name).write_bytes(data)
    listing = pa.table(
        {schema.PATH: [str(tmp_path / n) for n in images()], schema.SOURCE: [str(tmp_path)] * len(images())}
    )
    options = PrepareOptions(policy=policy, max_pixels=DEFAULT_MAX_PIXELS, framing=framing)
    with open(tiny_checkpoint, "rb") as handle:
        scanned = Classifier(handle.read(), threshold=0.5, device="cpu")(prepare_batch(listing, options))
    scorer = UploadScorer(
        ServeConfig(checkpoint=tiny_checkpoint, preprocess=policy, native_max_pixels=60_000, max_tiles=4), device="cpu"
    )
    decoded = [scorer.decode(name, data) for name, data in images().items()]
    scores = scorer.predict([view for _, view in decoded])
    uploads = [scorer.finish(row, scored) for (row, _), scored in zip(decoded, scores, strict=True)]
    for row, upload in zip(scanned.to_pylist(), uploads, strict=True):
        assert upload["score"] == pytest.approx(row[schema.SCORE], abs=1e-6), (policy, upload["name"])
        assert upload["score_max"] == pytest.approx(row[schema.SCORE_MAX], abs=1e-6)
        assert upload["n_tiles"] == row[schema.N_TILES] and upload["coverage"] == pytest.approx(row[schema.COVERAGE])
    if policy == "tiles":
        assert max(u["n_tiles"] for u in uploads) == 4


def test_bad_uploads_get_a_status_code_and_a_message(server):
    bomb = encode(Image.new("RGB", (1200, 1000), "white"), "PNG")
    cut = encode(photo(300, 200), "JPEG")
    cases = {
        "notes.txt": (b"meeting notes, definitely not pixels\n" * 20, 415, "undecodable", "not an image"),
        "paper.pdf": (b"%PDF-1.7\n" + bytes(200), 415, "unsupported", "PDF document"),
        "empty.jpg": (b"", 415, "empty", "empty"),
        "cut.jpg": (cut[: len(cut) // 2], 422, "truncated", "damaged"),
        "bomb.png": (bomb, 413, "too_large", "exceeds max_pixels=1000000"),
        "huge.jpg": (os.urandom(MAX_UPLOAD + 1), 413, "too_large", "2 MiB upload limit"),
    }
    for name, (data, want_code, want_status, words) in cases.items():
        code, body = post(server, name, data)
        assert (code, body["status"]) == (want_code, want_status), (name, body)
        assert words in body["message"] and name in body["message"], body["message"]
        assert "score" not in body


def test_the_scoring_endpoint_needs_the_token_and_the_page_never_holds_it(server):
    data = encode(photo(120, 90, seed=2), "PNG")
    assert post(server, "a.png", data, token=None)[0] == 401
    code, body = post(server, "a.png", data, token="wrong-token")
    assert code == 401 and body["status"] == "unauthorized" and "score" not in body
    assert post(server, "a.png", data)[0] == 200
    page = urllib.request.urlopen(server, timeout=30).read().decode()
    assert TOKEN not in page and "TOKEN_REQUIRED = true" in page


def test_the_page_is_not_opened_to_the_network_without_a_token(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--insecure"):
        ServeConfig(checkpoint="x.pt", host="0.0.0.0")
    assert ServeConfig(checkpoint="x.pt", host="0.0.0.0", insecure=True).insecure
    secured = ServeConfig(checkpoint="x.pt", host="0.0.0.0", token="s3cret-value")
    assert "s3cret-value" not in repr(secured) and secured.to_json()["token"] == "***"
    assert main(["serve", "--checkpoint", str(tmp_path / "m.pt"), "--host", "0.0.0.0"]) == 2
    assert "no --token" in capsys.readouterr().err


def test_health_and_routes(server):
    with urllib.request.urlopen(server + "healthz", timeout=30) as resp:
        assert json.loads(resp.read())["model"]["arch"] == "resnet_tiny"
    page = urllib.request.urlopen(server, timeout=30).read().decode()
    assert "resnet_tiny" in page and 'type="file"' in page and not any(s in page for s in ("http://", "https://")), (
        "the page is self-contained"
    )
    for path, method, code in (("nothing", "GET", 404), ("score", "GET", 405)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(server + path, method=method), timeout=30)
        assert err.value.code == code


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_upload_in_a_real_browser(server, scan_scores, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    files = images()
    uploads = [{"name": n, "mimeType": "application/octet-stream", "buffer": d} for n, d in files.items()]
    uploads.append({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello, not an image\n" * 10})
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page()
            asked = []
            page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(TOKEN)))
            page.goto(server)
            assert "resnet_tiny" in page.text_content("#model")
            page.set_input_files("#files", uploads)
            page.wait_for_selector(f'#results[data-done="{len(uploads)}"]', timeout=60_000)
            page.screenshot(path=str(tmp_path / "upload.png"))
            cards = page.eval_on_selector_all(
                ".card",
                """cards => cards.map(c => ({
                    name: c.dataset.name, failed: c.classList.contains('failed'),
                    text: c.innerText, preview: c.querySelector('img').naturalWidth}))""",
            )
        finally:
            browser.close()
    by_name = {c["name"]: c for c in cards}
    assert set(by_name) == {*files, "notes.txt"}
    assert asked == ["Access token for this page"], "the page asks for the token once"
    for name in files:
        card = by_name[name]
        assert not card["failed"] and card["preview"] > 0, card
        assert f"P(AI) = {scan_scores[name]:.4f}" in card["text"]
        assert ("AI-generated" if scan_scores[name] >= 0.5 else "real") in card["text"]
        assert "resnet_tiny" in card["text"]
        provenance = "provenance: generator_params (A1111" if name == "generated.png" else "provenance: none found"
        assert provenance in card["text"], card
    assert by_name["notes.txt"]["failed"] and "not an image" in by_name["notes.txt"]["text"]
    shot = Image.open(tmp_path / "upload.png").convert("RGB")
    assert len(shot.getcolors(1 << 20) or range(1 << 20)) > 500, "the previews rendered, not a blank page"


def test_serve_arguments_fail_before_ray_starts(tmp_path, capsys):
    assert main(["serve"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        ServeConfig(checkpoint="x.pt", port=70000)
    with pytest.raises(ConfigError):
        ServeConfig(checkpoint="x.pt", max_upload_bytes=0)
    with pytest.raises(ConfigError, match="--threshold"):
        build_app({"checkpoint": "x.pt", "threshold": "1.5"})
