"""The scan's self-contained HTML report, its rebuild command, and how it renders in headless Chromium."""

import base64
import io
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import animated, encode, encode_clip, photo
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.cli import main
from aidetect_batch.report import page
from aidetect_batch.report.aggregate import RunFacts, write_report
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def scanned(ray_cluster, tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("report")
    images = root / "dump"
    for folder, count in (("a", 14), ("b", 9)):
        (images / folder).mkdir(parents=True)
        for i in range(count):
            big = photo(900, 700, seed=i + 1) if i == 0 else photo(120, 90, seed=i + 1)
            (images / folder / f"{i:02d}.jpg").write_bytes(encode(big, "JPEG", quality=90))
    (images / "b" / "broken.jpg").write_bytes(b"not an image at all")
    out = str(root / "out")
    result = run_scan(ScanConfig(sources=(str(images),), out=out, checkpoint=tiny_checkpoint, threshold=0.5))
    return result, out


def page_of(out: str) -> str:
    with open(os.path.join(out, schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        return handle.read()


def test_page_is_self_contained_and_complete(scanned):
    result, out = scanned
    html = page_of(out)
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:") for s in sources), "every image inline, nothing fetched"
    assert not re.search(r"https?://", html), "no network reference at all"
    assert 'id="histogram" src="data:image/png;base64,' in html
    thumbs = re.findall(r'class="thumb" src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(thumbs) == 2 * 23, "two grids of the 23 decodable images (fewer than 24)"
    assert max(len(t) for t in thumbs) < 40_000, "thumbnails are capped, the 900 px photo included"
    assert "broken.jpg" in html and "undecodable" in html, "top errors name the failure and an example"
    assert html.count("<tr>") >= 2 + 2 and 'class="sortable"' in html
    assert f"total <b>{result.summary.total}</b>" in html


def test_pick_rows_are_the_top_scores_and_nearest_the_threshold(scanned):
    import pyarrow.parquet as pq

    _, out = scanned
    table = pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pandas()
    ok = table[table.status == "ok"]
    picks = page.pick_rows(os.path.join(out, schema.SCORES_DIR), 5, 0.5)
    assert [r["score"] for r in picks["top_ai"]] == sorted(ok.score, reverse=True)[:5]
    nearest = np.sort(np.abs(ok.score.to_numpy(np.float64) - 0.5))[:5]
    assert np.allclose(sorted(abs(r["score"] - 0.5) for r in picks["near_threshold"]), nearest)


def test_report_command_rebuilds_the_page(scanned, tmp_path, capsys):
    _, out = scanned
    os.remove(os.path.join(out, schema.REPORT_DIR, "index.html"))
    assert main(["report", out, "--thumbnails", "3"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert len(re.findall(r'class="thumb"', page_of(out))) == 6
    assert main(["report", str(tmp_path)]) == 2, "a folder without a scan is a clear error"
    assert main(["report", out]) == 0


def test_thumbnail_of_a_vanished_file_is_a_placeholder(tmp_path):
    assert page.thumbnail(str(tmp_path / "gone.jpg")) is None
    path = tmp_path / "big.png"
    Image.new("RGB", (1200, 300), (10, 200, 10)).save(path)
    uri = page.thumbnail(str(path))
    assert uri.startswith("data:image/jpeg;base64,")


def rendered_dom(url: str) -> tuple[str, int, int]:
    """The page's DOM after headless Chromium ran its scripts, with how many images it has and how many decoded."""
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    return dom, images, int(re.search(r'data-images-rendered="(\d+)"', dom).group(1))


def screenshot(url: str, shot: Path, *, height: int) -> np.ndarray:
    """The page as headless Chromium paints it in a window 1200 px wide and ``height`` tall, as int RGB pixels."""
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--window-size=1200,{height}", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(scanned, tmp_path):
    _, out = scanned
    url = "file://" + os.path.join(out, schema.REPORT_DIR, "index.html")
    dom, images, rendered = rendered_dom(url)
    assert images == rendered == 1 + 2 * 23, "the histogram and every thumbnail decoded in the browser"

    pixels = screenshot(url, tmp_path / "shot.png", height=2600)

    def share(rgb: tuple[int, int, int]) -> float:
        return float((np.abs(pixels - np.array(rgb)).sum(axis=2) < 30).mean())

    assert share((76, 114, 176)) + share((221, 132, 82)) > 0.001, "the histogram's bars are on screen"
    assert pixels.std() > 20, "not a blank page"


def test_thumbnails_of_zip_and_tar_members_local_and_on_s3(s3_server, tmp_path):
    """A member's thumbnail is read back through its ``zip://``/``tar://`` URI: a zip by ranged reads, a tar
    streamed up to the member, from disk and from S3."""
    wanted = encode(photo(300, 200, seed=5), "JPEG")
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as archive:
        archive.writestr("other.jpg", encode(photo(64, 64, seed=1), "JPEG"))
        archive.writestr("media/a.jpg", wanted)
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        for name, data in (("000.jpg", encode(photo(64, 64, seed=1), "JPEG")), ("001.jpg", wanted)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fs = s3fs.S3FileSystem()
    fs.mkdir("thumbs")
    fs.put_file(str(tmp_path / "x.zip"), "thumbs/x.zip")
    fs.put_file(str(tmp_path / "x.tar.gz"), "thumbs/x.tar.gz")
    (tmp_path / "a.jpg").write_bytes(wanted)
    expected = page.thumbnail(str(tmp_path / "a.jpg"))
    assert expected.startswith("data:image/jpeg;base64,")
    for path in (
        f"zip://media/a.jpg::{tmp_path / 'x.zip'}",
        f"tar://001.jpg::{tmp_path / 'x.tar.gz'}",
        "zip://media/a.jpg::s3://thumbs/x.zip",
        "tar://001.jpg::s3://thumbs/x.tar.gz",
    ):
        assert page.thumbnail(path) == expected, path
    assert page.thumbnail("zip://gone.jpg::s3://thumbs/x.zip") is None, "a member gone since is a placeholder"


CLIP_FPS, CLIP_STEP = 8, 20  # frame i's red channel is CLIP_STEP * i
# A 1.5 s clip sampled at 4 frames: the middles of four slices show frames 1, 4, 7 and 10.
CLIP_TIMES = [0.125, 0.5, 0.875, 1.25]


@pytest.fixture(scope="module")
def clip_report(tmp_path_factory):
    """A report built straight from a scores table (no scan): a flagged video and animation whose frames are
    sampled again for their strips, a video gone since the scan, and a still."""
    root = tmp_path_factory.mktemp("clips")
    clip = str(root / "dump" / "clip.mp4")
    os.makedirs(os.path.dirname(clip))
    encode_clip(clip, "libx264", "mp4", frames=12, fps=CLIP_FPS, size=(64, 48), step=CLIP_STEP)
    (root / "dump" / "loop.gif").write_bytes(animated("GIF"))
    (root / "dump" / "still.jpg").write_bytes(encode(photo(120, 90, seed=3), "JPEG"))
    rows = [
        {schema.PATH: clip, schema.SCORE: 0.97, schema.SCORE_MAX: 0.99, schema.FORMAT: "MP4",
         schema.N_FRAMES: 4, schema.DURATION_S: 1.5, schema.FRAME_MAX_T: CLIP_TIMES[2]},
        {schema.PATH: str(root / "dump" / "loop.gif"), schema.SCORE: 0.9, schema.SCORE_MAX: 0.95,
         schema.FORMAT: "GIF", schema.N_FRAMES: 3, schema.DURATION_S: 0.15, schema.FRAME_MAX_T: 0.05},
        {schema.PATH: str(root / "dump" / "gone.mp4"), schema.SCORE: 0.8, schema.SCORE_MAX: 0.9,
         schema.FORMAT: "MP4", schema.N_FRAMES: 8, schema.DURATION_S: 3.0, schema.FRAME_MAX_T: 1.0},
        {schema.PATH: str(root / "dump" / "still.jpg"), schema.SCORE: 0.6, schema.FORMAT: "JPEG"},
    ]  # fmt: skip
    rows = [
        {**dict.fromkeys(schema.SCORE_COLUMNS), schema.SOURCE: str(root / "dump"), schema.STATUS: "ok",
         schema.LABEL: "ai", **r} for r in rows
    ]  # fmt: skip
    out = str(root / "out")
    os.makedirs(os.path.join(out, schema.SCORES_DIR))
    table = pa.Table.from_pylist(rows, schema=schema.SCORES_SCHEMA)
    pq.write_table(table, os.path.join(out, schema.SCORES_DIR, "part-0.parquet"))
    write_report(out, facts=RunFacts(threshold=0.5), thumbnails=4)
    return out


def strips(html: str) -> list[list[tuple[float, bool, str]]]:
    """Each strip on the page: its frames' (time, marked, JPEG data URI)."""
    frame = r'<div class="frame( top)?" data-t="([^"]+)"><img src="([^"]+)"'
    bodies = [b.split("<figcaption>")[0] for b in html.split('<div class="strip">')[1:]]
    return [[(float(t), bool(top), uri) for top, t, uri in re.findall(frame, body)] for body in bodies]


def red_index(uri: str) -> int:
    """The clip frame a strip's JPEG shows, from its red channel."""
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    return round(float(np.asarray(image)[..., 0].mean()) / CLIP_STEP)


def test_a_flagged_video_is_a_strip_of_its_frames_with_the_top_one_marked(clip_report):
    html = page_of(clip_report)
    found = strips(html)
    assert len(found) == 2 * 2, "the video and the animation, in both grids; the vanished video has no strip"
    video_strip, gif_strip = found[0], found[1]
    assert [t for t, _, _ in video_strip] == pytest.approx(CLIP_TIMES)
    assert [top for _, top, _ in video_strip] == [False, False, True, False], "the frame at frame_max_t"
    assert [red_index(uri) for _, _, uri in video_strip] == [round(t * CLIP_FPS) for t in CLIP_TIMES]
    assert all(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size == (64, 48) for *_, u in video_strip)
    assert [t for t, _, _ in gif_strip] == pytest.approx([0.0, 0.05, 0.1])
    assert [top for _, top, _ in gif_strip] == [False, True, False]
    assert "most AI-looking frame (0.990) at 0.88 s" in html and "MP4, 4 frames of 1.50 s" in html
    gone = html.split("gone.mp4")[0].rsplit("<figure", 1)[1]
    assert "not readable" in gone and "outlined" not in gone, "a video that cannot be read now keeps the placeholder"
    assert len(re.findall(r'class="thumb" src=', html)) == 2, "the still, in both grids"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_a_video_strip_renders_in_headless_chromium(clip_report, tmp_path):
    url = "file://" + os.path.join(clip_report, schema.REPORT_DIR, "index.html")
    dom, images, rendered = rendered_dom(url)
    assert images == rendered == 1 + 2 * (1 + 4 + 3), "the histogram, the still and every strip frame decoded"
    assert [len(s) for s in strips(dom)] == [4, 3, 3, 4], "by score, then by distance to the threshold"
    assert [t for s in strips(dom) for t, top, _ in s if top] == pytest.approx([0.875, 0.05, 0.05, 0.875])

    pixels = screenshot(url, tmp_path / "shot.png", height=2400)
    marker = (np.abs(pixels - np.array([214, 39, 40])).sum(axis=2) < 30).sum()
    assert marker > 4 * 3 * 60, "the marked frames' outlines are on screen"
