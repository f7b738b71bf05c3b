"""Archives through whole scans: every member exactly once across a resume (after lost files, and after kill -9),
``--dedup`` and ``reposts`` on members, a rewritten archive refused on resume, per-archive report rows and
member thumbnails in the HTML page.

One scan (with ``--dedup --phash``) and one resume serve every default-suite test here; the kill -9 test is slow.
"""

from __future__ import annotations

import dataclasses
import glob
import html
import io
import json
import os
import re
import tarfile
import zipfile
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from helpers import encode, photo, scan_killed_after_commits
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.bench.demo import PHOTOS, photo_bytes
from aidetect_batch.cli import main
from aidetect_batch.errors import ConfigError
from aidetect_batch.report import page
from aidetect_batch.scan import runner
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.scan.sink import committed_work

IMAGES = (".jpg", ".png")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    return encode(image, "JPEG", quality=quality)


def picture(index: int, side: int = 160) -> Image.Image:
    """One of the bundled photographs (real pictures, so PDQ hashes them with full quality)."""
    return Image.open(io.BytesIO(photo_bytes(PHOTOS[index]))).convert("RGB").resize((side, side * 3 // 4))


def write_shard(path, samples: dict[str, bytes]) -> None:
    """A WebDataset shard as img2dataset writes one: ``key.jpg``, ``key.txt`` and ``key.json`` side by side."""
    with tarfile.open(path, "w:gz" if str(path).endswith(".gz") else "w") as tar:
        for key, data in samples.items():
            meta = json.dumps({"url": f"https://example.com/{key}.jpg", "key": key}).encode()
            for name, payload in (
                (f"{key}.jpg", data),
                (f"{key}.txt", f"caption {key}".encode()),
                (f"{key}.json", meta),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def listed_members(root: str) -> set[str]:
    """Every row a scan of ``root`` must write, from zipfile, tarfile and the folder itself, not the scanner."""
    expected = set()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".zip"):
                with zipfile.ZipFile(path) as archive:
                    expected |= {f"zip://{n}::{path}" for n in archive.namelist() if n.lower().endswith(IMAGES)}
            elif name.endswith((".tar", ".tar.gz")):
                with tarfile.open(path) as tar:
                    expected |= {f"tar://{n}::{path}" for n in tar.getnames() if n.lower().endswith(IMAGES)}
            elif name.lower().endswith(IMAGES):
                expected.add(path)
    return expected


@dataclasses.dataclass
class Corpus:
    root: str
    family: list[str]  # one photograph re-encoded three times: a tar member, a zip member, a loose file
    copies: list[tuple[str, str]]  # identical bytes: (tar member, zip member), (zip member, loose file)


def shard_name(s: int) -> str:
    """Shards 0 and 1 are plain tars; shard 2 is gzipped, so a compressed tar is streamed end to end too."""
    return f"{s:05d}.tar.gz" if s == 2 else f"{s:05d}.tar"


def write_corpus(root, *, shards: int, per_shard: int, side: int = 160) -> Corpus:
    """Tar shards, an Instagram-like export zip, a WhatsApp-like flat zip and loose files, with near and exact
    copies across them."""
    base, copy, twin = picture(0, side), jpeg(picture(2, side)), jpeg(picture(3, side))
    os.makedirs(root / "shards")
    for s in range(shards):
        samples = {
            f"{s:05d}{i:04d}": jpeg(photo(side, side * 3 // 4, seed=s * per_shard + i)) for i in range(per_shard)
        }
        if s == 0:
            samples[f"{s:05d}{per_shard:04d}"] = jpeg(base, 50)
        if s == 1 % shards:
            samples[f"{s:05d}{per_shard + 1:04d}"] = copy
        write_shard(root / "shards" / shard_name(s), samples)
    export = {"media/posts/202401/repost.jpg": jpeg(base, 95), "media/stories/same.jpg": copy}
    export["media/posts/202402/other.png"] = encode(picture(1, side), "PNG")
    write_zip(root / "export.zip", export)
    write_zip(root / "whatsapp.zip", {"IMG-0001.jpg": jpeg(picture(4, side)), "IMG-0002.jpg": twin})
    (root / "loose").mkdir()
    (root / "loose" / "repost_small.jpg").write_bytes(jpeg(base.resize((side // 2, side * 3 // 8))))
    (root / "loose" / "IMG-0002.jpg").write_bytes(twin)
    tar_name = f"{0:05d}{per_shard:04d}.jpg"
    return Corpus(
        root=str(root),
        family=[
            f"tar://{tar_name}::{root / 'shards' / '00000.tar'}",
            f"zip://media/posts/202401/repost.jpg::{root / 'export.zip'}",
            str(root / "loose" / "repost_small.jpg"),
        ],
        copies=[
            (f"tar://{1 % shards:05d}{per_shard + 1:04d}.jpg::{root / 'shards' / f'{1 % shards:05d}.tar'}",)
            + (f"zip://media/stories/same.jpg::{root / 'export.zip'}",),
            (f"zip://IMG-0002.jpg::{root / 'whatsapp.zip'}", str(root / "loose" / "IMG-0002.jpg")),
        ],
    )


def scores(out: str) -> list[dict]:
    return pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()


def assert_exactly_once(out: str, expected: set[str]) -> list[dict]:
    rows = scores(out)
    paths = [r[schema.PATH] for r in rows]
    assert len(paths) == len(set(paths)), "no member twice"
    assert set(paths) == expected, f"missing {expected - set(paths)}, extra {set(paths) - expected}"
    return rows


@pytest.fixture(scope="module")
def scanned(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """Scan the corpus in shards of two archives, lose two committed files, resume, then run ``reposts``."""
    corpus = write_corpus(tmp_path_factory.mktemp("members"), shards=3, per_shard=3)
    out = str(tmp_path_factory.mktemp("member_scan") / "out")
    cfg = ScanConfig(
        sources=(corpus.root,), out=out, checkpoint=tiny_checkpoint, dedup=True, phash=True,
        rows_per_file=1, commit_every_s=0.0, batch_size=4, decode_batch_size=2,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "block_size", lambda total, cpus, batch_size=None: 2)
        first = run_scan(cfg)
    expected = listed_members(corpus.root)
    assert_exactly_once(out, expected)
    files = sorted(glob.glob(os.path.join(out, schema.SCORES_DIR, "part-*.parquet")))
    assert len(files) == 4, "seven units in shards of two, each committed alone"
    lost = [files[0], files[2]]
    lost_rows = sum(pq.read_metadata(f).num_rows for f in lost)
    for path in lost:
        os.remove(path)
    resumed = run_scan(replace(cfg, resume=True))
    assert resumed.run["attempts"][-1]["rows_scored"] == lost_rows
    assert main(["reposts", out]) == 0
    return corpus, cfg, first, resumed, expected


def test_every_member_has_exactly_one_row_after_a_resume(scanned):
    """The default-suite form of the kill -9 test: committed files lost, as after a crash, then --resume."""
    corpus, cfg, first, resumed, expected = scanned
    rows = assert_exactly_once(cfg.out, expected)
    assert len(expected) == 18 and first.run["inputs"] == 7
    assert resumed.run["attempts"][-1]["rows_kept"] + resumed.run["attempts"][-1]["rows_scored"] == len(expected)
    assert all(r[schema.STATUS] in ("ok", "duplicate") for r in rows)
    assert set(first.run["identity"][runner.CONTAINER_STAMPS]) == {
        os.path.join(corpus.root, n)
        for n in ("export.zip", "whatsapp.zip", *(f"shards/{shard_name(s)}" for s in range(3)))
    }, "every archive stamped, no loose file"


def test_copies_of_members_are_duplicates_of_the_first_members_path(scanned):
    corpus, cfg, *_ = scanned
    rows = {r[schema.PATH]: r for r in scores(cfg.out)}
    for pair in corpus.copies:
        statuses = sorted(rows[p][schema.STATUS] for p in pair)
        assert statuses == ["duplicate", "ok"], pair
        copy = next(rows[p] for p in pair if rows[p][schema.STATUS] == "duplicate")
        original = next(p for p in pair if rows[p][schema.STATUS] == "ok")
        assert copy[schema.DUPLICATE_OF] == original and copy[schema.SHA256] == rows[original][schema.SHA256]
    assert sum(r[schema.STATUS] == "duplicate" for r in rows.values()) == 2


def test_reposts_group_members_by_pdq(scanned):
    corpus, cfg, *_ = scanned
    members = {
        r[schema.PATH]: r
        for r in pq.read_table(os.path.join(cfg.out, schema.REPOSTS_DIR, "members.parquet")).to_pylist()
    }
    family = {members[p]["group_id"] for p in corpus.family}
    assert len(family) == 1 and None not in family, "a tar member, a zip member and a loose file: one group"
    assert {p for p, m in members.items() if m["group_id"] in family} == set(corpus.family)
    for pair in corpus.copies:
        assert members[pair[0]]["group_id"] == members[pair[1]]["group_id"] is not None, "an exact copy joins"
    groups = pq.read_table(os.path.join(cfg.out, schema.REPOSTS_DIR, schema.REPOST_GROUPS_FILE)).to_pylist()
    by_id = {g["group_id"]: g for g in groups}
    assert by_id[family.pop()]["prefixes"] == ["export.zip", "loose", "shards/00000.tar"], "archives are prefixes"


def test_the_report_counts_every_archive_by_status_and_label(scanned):
    corpus, cfg, _, resumed, _ = scanned
    want: dict[str, dict[str, int]] = {}
    for row in scores(cfg.out):
        where = row[schema.CONTAINER] or os.path.dirname(row[schema.PATH])
        counts = want.setdefault(
            os.path.relpath(where, corpus.root), dict.fromkeys(("files", "ok", "duplicates", "ai"), 0)
        )
        counts["files"] += 1
        counts["ok"] += row[schema.STATUS] == "ok"
        counts["duplicates"] += row[schema.STATUS] == "duplicate"
        counts["ai"] += row[schema.LABEL] == "ai"
    got = {p["prefix"]: {k: p[k] for k in ("files", "ok", "duplicates", "ai")} for p in resumed.summary.prefixes}
    assert got == want
    assert set(got) == {
        "export.zip",
        "whatsapp.zip",
        "loose",
        "shards/00000.tar",
        "shards/00001.tar",
        "shards/00002.tar.gz",
    }
    with open(os.path.join(cfg.out, schema.REPORT_DIR, schema.SUMMARY_FILE)) as handle:
        assert {p["prefix"] for p in json.load(handle)["prefixes"]} == set(want)


def test_the_page_shows_zip_and_tar_members_read_through_their_uri(scanned):
    _, cfg, *_ = scanned
    with open(os.path.join(cfg.out, schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        text = handle.read()
    shown = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,[^"]+" alt="([^"]+)">', text)
    members = [html.unescape(p) for p in shown if "::" in p]
    assert any(p.startswith("zip://") for p in members) and any(p.startswith("tar://") for p in members)
    assert "thumb missing" not in text, "every member reopened"
    for path in (next(p for p in members if p.startswith(kind)) for kind in ("zip://", "tar://")):
        assert f'src="{page.thumbnail(path)}" alt="{html.escape(path)}"' in text


def test_resume_refuses_a_rewritten_archive_before_ray_starts(scanned, monkeypatch):
    corpus, cfg, *_ = scanned
    loose = os.path.join(corpus.root, "loose", "IMG-0002.jpg")
    os.utime(loose, ns=(0, os.stat(loose).st_mtime_ns + 10**9))
    again = run_scan(replace(cfg, resume=True))
    assert again.run["attempts"][-1]["rows_scored"] == 0, "a loose file is not stamped: touching it changes nothing"
    archive = os.path.join(corpus.root, "shards", "00001.tar")
    mtime = os.stat(archive).st_mtime_ns
    monkeypatch.setattr(runner.runtime, "start_ray", lambda: pytest.fail("Ray started before the refusal"))
    os.utime(archive, ns=(0, mtime + 10**9))
    try:
        with pytest.raises(ConfigError, match=r"1 archive\(s\) changed .*--overwrite") as refused:
            run_scan(replace(cfg, resume=True))
    finally:
        os.utime(archive, ns=(0, mtime))
    assert archive in str(refused.value) and "export.zip" not in str(refused.value)


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_scan_of_shards_and_zips_then_resume_gives_every_member_once(
    ray_cluster, tiny_checkpoint, tmp_path
):
    """kill -9 the whole scan (driver and its local Ray) after some shards of archives were committed; --resume
    then writes every member exactly once and keeps the committed files as they were."""
    corpus = write_corpus(tmp_path / "in", shards=60, per_shard=4, side=200)
    expected = listed_members(corpus.root)
    out = str(tmp_path / "out")
    args = [corpus.root, "--out", out, "--checkpoint", tiny_checkpoint, "--commit-every", "0", "--rows-per-file", "1"]
    args += ["--batch-size", "8", "--decode-batch-size", "2"]
    scores_dir = os.path.join(out, schema.SCORES_DIR)
    scan_killed_after_commits(args, scores_dir, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    kept = committed_work(scores_dir)
    assert 0 < kept.rows < len(expected), "killed part-way"
    before = {f: open(f, "rb").read() for f in kept.files}
    result = run_scan(ScanConfig(sources=(corpus.root,), out=out, checkpoint=tiny_checkpoint, resume=True))
    assert_exactly_once(out, expected)
    assert {f: open(f, "rb").read() for f in kept.files} == before, "committed files are kept as they were"
    assert result.run["attempts"][-1]["rows_scored"] == len(expected) - kept.rows
