"""The scan's self-contained HTML report, its rebuild command, and how it renders in headless Chromium."""

import io
import os
import re
import shutil
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest
import s3fs
from helpers import encode, photo
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.cli import main
from aidetect_batch.report import page
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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(scanned, tmp_path):
    _, out = scanned
    url = "file://" + os.path.join(out, schema.REPORT_DIR, "index.html")
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    rendered = int(re.search(r'data-images-rendered="(\d+)"', dom).group(1))
    assert images == rendered == 1 + 2 * 23, "the histogram and every thumbnail decoded in the browser"

    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, "--window-size=1200,2600", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)

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
