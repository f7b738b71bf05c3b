"""Near-duplicate groups: PDQ in the scan (--phash), `aidetect-batch reposts`, and the planted families.

The photographs are scikit-image's bundled pictures (CC0 / public domain, see
aidetect_batch/demo_data/LICENSES.md). Each family is one photograph re-encoded as JPEG at quality 50
and 95, resized to 0.5 and 0.9, cropped by 1% a side (4% of its area), saved as PNG and given a small
text overlay. A crop of 5% of the area (1.27% a side) measured 16-32 bits from the original on these
five photographs, one past the default distance of 31: PDQ tolerates crops of about 1% a side.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode
from PIL import Image, ImageDraw

from aidetect_batch import datasets, groups, phash, schema
from aidetect_batch.cli import main
from aidetect_batch.config import ScanConfig
from aidetect_batch.demo import PHOTOS, photo_bytes
from aidetect_batch.pipeline import run_scan
from aidetect_batch.prepare import PrepareOptions, prepare_batch


def photograph(name: str) -> Image.Image:
    return Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")


def family(base: Image.Image) -> dict[str, bytes]:
    """One photograph as a dump holds it: re-encoded, resized, cropped, converted and overlaid."""
    w, h = base.size
    edge_x, edge_y = round(w * 0.01), round(h * 0.01)
    overlay = base.copy()
    ImageDraw.Draw(overlay).text((8, h - 16), "repost via @someone", fill=(255, 255, 255))
    return {
        "q50.jpg": encode(base, "JPEG", quality=50),
        "q95.jpg": encode(base, "JPEG", quality=95),
        "half.jpg": encode(base.resize((w // 2, h // 2), Image.BILINEAR), "JPEG", quality=90),
        "x09.jpg": encode(base.resize((int(w * 0.9), int(h * 0.9)), Image.BICUBIC), "JPEG", quality=90),
        "crop.jpg": encode(base.crop((edge_x, edge_y, w - edge_x, h - edge_y)), "JPEG", quality=90),
        "copy.png": encode(base, "PNG"),
        "overlay.jpg": encode(overlay, "JPEG", quality=90),
    }


def reference_pdq(rgb: np.ndarray) -> np.ndarray:
    """PDQ written from ThreatExchange's description, independently of the ``pdqhash`` binding: luminance,
    two passes of a box filter of ceil(side/128) on each axis, 64×64 samples at cell centres, the 16×16
    DCT without its constant row, and one bit per coefficient above the median. Bit k = 16·row + column."""
    y = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    for _ in range(2):
        for axis in (1, 0):
            y = _box(y, max(1, math.ceil(y.shape[axis] / 128)), axis)
    rows = [int((i + 0.5) * y.shape[0] / 64) for i in range(64)]
    cols = [int((j + 0.5) * y.shape[1] / 64) for j in range(64)]
    a = y[np.ix_(rows, cols)]
    i, j = np.meshgrid(np.arange(1, 17), np.arange(64), indexing="ij")
    dct = math.sqrt(2 / 64) * np.cos(math.pi / 128 * i * (2 * j + 1))
    b = dct @ a @ dct.T
    return (b > np.median(b)).astype(np.uint8).ravel()


def _box(a: np.ndarray, window: int, axis: int) -> np.ndarray:
    """Mean over a window reaching (window-1)//2 samples back, clipped at the edges."""
    n = a.shape[axis]
    back = (window - 1) // 2
    cumulative = np.cumsum(np.insert(a, 0, 0.0, axis=axis), axis=axis)
    lo = np.clip(np.arange(n) - back, 0, n)
    hi = np.clip(np.arange(n) + window - back, 0, n)
    shape = [1, 1]
    shape[axis] = n
    sums = np.take(cumulative, hi, axis=axis) - np.take(cumulative, lo, axis=axis)
    return sums / (hi - lo).reshape(shape)


@pytest.mark.parametrize("name", PHOTOS)
def test_pdq_equals_an_independent_implementation_of_the_algorithm(name):
    for image in (photograph(name), photograph(name).resize((333, 251))):
        stored = phash.pdq_of(image)
        bit = np.array([(int.from_bytes(stored.hash, "big") >> k) & 1 for k in range(256)], np.uint8)
        differing = int(np.sum(bit != reference_pdq(np.asarray(image))))
        assert differing <= 2, f"{name}: {differing} bits differ (0 measured)"
        assert stored.quality == 100 and len(stored.hash) == phash.PDQ_BYTES


def test_near_pairs_are_exact_at_the_distance():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (2000, 32), dtype=np.uint8)
    for row, flips in ((1, 31), (3, 32), (5, 0), (7, 12)):
        bits = np.unpackbits(codes[0])
        bits[rng.choice(256, flips, replace=False)] ^= 1
        codes[row] = np.packbits(bits)
    found = {tuple(p) for p in groups.near_pairs(codes, 31).tolist()}
    assert found == {(0, 1), (0, 5), (0, 7), (1, 5), (5, 7), (1, 7)} - {
        (a, b) for a, b in ((1, 5), (1, 7), (5, 7)) if phash.distance(codes[a].tobytes(), codes[b].tobytes()) > 31
    }
    assert (0, 3) not in found


def test_each_planted_family_is_one_group_and_none_merge():
    hashes, families = [], []
    for index, name in enumerate(PHOTOS):
        for data in family(photograph(name)).values():
            hashes.append(phash.pdq_of(Image.open(io.BytesIO(data)).convert("RGB")).hash)
            families.append(index)
    found = groups.components(len(hashes), groups.near_pairs(phash.unpack(hashes), phash.MATCH_DISTANCE))
    families = np.array(families)
    for index in range(len(PHOTOS)):
        assert len(set(found[families == index])) == 1, f"{PHOTOS[index]} split: {found[families == index]}"
    assert len(set(found)) == len(PHOTOS), "no two families merge"


def test_a_flat_image_has_low_quality():
    flat = Image.new("RGB", (200, 200), (128, 128, 128))
    nearly = Image.fromarray((128 + np.random.default_rng(0).normal(0, 1, (200, 200, 3))).clip(0, 255).astype(np.uint8))
    assert phash.pdq_of(flat).quality < phash.MIN_QUALITY
    assert phash.pdq_of(nearly).quality < phash.MIN_QUALITY


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """Two families in folders of two "users", an exact copy, two flat images and a broken file, listed in a
    manifest with the time each was posted."""
    root = tmp_path_factory.mktemp("reposts")
    rows, start = [], datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    files = {}
    for name in PHOTOS[:2]:
        for n, (variant, data) in enumerate(family(photograph(name)).items()):
            files[f"user{n % 2}/{name[:-4]}_{variant}"] = data
    files["user1/astronaut_exact_copy.jpg"] = files["user0/astronaut_q50.jpg"]
    files["user0/flat.png"] = encode(Image.new("RGB", (120, 90), (90, 90, 90)), "PNG")
    files["user1/flat.png"] = encode(Image.new("RGB", (120, 90), (91, 91, 91)), "PNG")
    files["user1/broken.jpg"] = b"\xff\xd8\xff not really"
    for n, (relative, data) in enumerate(sorted(files.items())):
        path = root / relative
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        rows.append({"path": str(path), "posted_at": start + datetime.timedelta(hours=n)})
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return root, manifest, rows


@pytest.fixture(scope="module")
def grouped(ray_cluster, dump, tiny_checkpoint, tmp_path_factory):
    root, manifest, _ = dump
    out = str(tmp_path_factory.mktemp("scan") / "out")
    cfg = ScanConfig(
        sources=(), manifest=str(manifest), out=out, checkpoint=tiny_checkpoint, phash=True, dedup=True,
        rows_per_file=4, commit_every_s=0.0, batch_size=4, decode_batch_size=4,
    )  # fmt: skip
    run_scan(cfg)
    assert main(["reposts", out]) == 0
    return cfg, out


def _members(out: str) -> dict[str, dict]:
    table = pq.read_table(os.path.join(out, schema.REPOSTS_DIR, "members.parquet"))
    return {
        os.path.basename(os.path.dirname(r["path"])) + "/" + os.path.basename(r["path"]): r for r in table.to_pylist()
    }


def test_the_scan_hashes_ok_rows_only(grouped):
    cfg, out = grouped
    rows = pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()
    for row in rows:
        if row[schema.STATUS] == "ok":
            assert len(row[schema.PDQ]) == 32 and 0 <= row[schema.PDQ_QUALITY] <= 100
        else:
            assert row[schema.PDQ] is None and row[schema.PDQ_QUALITY] is None


def test_reposts_groups_families_and_joins_exact_copies(grouped):
    _, out = grouped
    members = _members(out)
    groups = {}
    for key, row in members.items():
        groups.setdefault(key.split("/")[1].split("_")[0], set()).add(row["group_id"])
    assert len(groups["astronaut"]) == 1 and len(groups["chelsea"]) == 1
    assert groups["astronaut"] != groups["chelsea"]
    assert members["user1/astronaut_exact_copy.jpg"]["group_id"] == members["user0/astronaut_q50.jpg"]["group_id"]
    for nothing in ("user0/flat.png", "user1/flat.png", "user1/broken.jpg"):
        assert members[nothing]["group_id"] is None, nothing


def test_groups_carry_size_prefixes_scores_agreement_and_times(grouped, dump):
    _, out = grouped
    _, _, rows = dump
    table = pq.read_table(os.path.join(out, schema.REPOSTS_DIR, schema.REPOST_GROUPS_FILE)).to_pylist()
    assert sorted(g["size"] for g in table) == [7, 8]
    scores = {r[schema.PATH]: r for r in pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()}
    posted = {r["path"]: r["posted_at"] for r in rows}
    members = pq.read_table(os.path.join(out, schema.REPOSTS_DIR, "members.parquet")).to_pylist()
    for group in table:
        paths = [m["path"] for m in members if m["group_id"] == group["group_id"]]
        ok = [scores[p][schema.SCORE] for p in paths if scores[p][schema.STATUS] == "ok"]
        assert group["score_min"] == pytest.approx(min(ok)) and group["score_max"] == pytest.approx(max(ok))
        assert group["score_median"] == pytest.approx(float(np.median(ok)), abs=1e-6)
        assert group["prefixes"] == ["user0", "user1"] and group["n_prefixes"] == 2
        assert group["first_seen"] == min(posted[p] for p in paths)
        assert group["last_seen"] == max(posted[p] for p in paths)
        labels = [scores[p][schema.LABEL] for p in paths if scores[p][schema.LABEL]]
        majority = max(labels.count("ai"), labels.count("real"))
        assert group["label_agreement"] == pytest.approx(majority / len(labels))
        assert group["disagree"] == (len(set(labels)) == 2)
        assert group["representative"] == min(paths)
    summary = json.load(open(os.path.join(out, schema.REPOSTS_DIR, schema.SUMMARY_FILE)))
    assert summary["groups"] == 2 and summary["grouped_rows"] == 15 and summary["time_column"] == "posted_at"
    assert summary["low_quality"] == 2


def test_the_report_shows_the_repost_groups(grouped):
    _, out = grouped
    with open(os.path.join(out, schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    section = page[page.index("<h2>Reposts (2 groups") :]
    assert "Groups whose copies disagree" in section
    assert section.count('class="thumb" src="data:image/jpeg;base64,') >= 1


def test_pdq_columns_survive_resume(grouped, tiny_checkpoint):
    cfg, out = grouped
    parts = sorted(f for f in os.listdir(os.path.join(out, schema.SCORES_DIR)) if f.endswith(".parquet"))
    assert len(parts) > 1
    before = {r[schema.PATH]: r[schema.PDQ] for r in pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()}
    os.remove(os.path.join(out, schema.SCORES_DIR, parts[-1]))
    run_scan(ScanConfig(**{**cfg.__dict__, "resume": True}))
    after = {r[schema.PATH]: r[schema.PDQ] for r in pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()}
    assert after == before


def test_reposts_refuses_a_scan_without_hashes(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photograph(PHOTOS[0]), "PNG"))
    out = str(tmp_path / "out")
    run_scan(ScanConfig(sources=(str(tmp_path / "in"),), out=out, checkpoint=tiny_checkpoint))
    assert main(["reposts", out]) == 2
    assert "--phash" in capsys.readouterr().err


def test_splits_keep_each_near_duplicate_group_together(tmp_path):
    """Families spread over classes' folders and subject groups: none crosses splits, and a family carrying
    both labels is left out and counted like identical bytes with both labels."""
    files = []
    for index, name in enumerate(PHOTOS):
        label = "ai" if index % 2 else "real"
        for n, (variant, data) in enumerate(family(photograph(name)).items()):
            conflicting = name == PHOTOS[0] and variant == "overlay.jpg"
            folder = tmp_path / ("faces", "scenes")[n % 2] / ("ai" if conflicting else label)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name[:-4]}_{variant}").write_bytes(data)
            files.append((str(folder / f"{name[:-4]}_{variant}"), "ai" if conflicting else label, name))
    listing = pa.table(
        {
            schema.PATH: [f[0] for f in files],
            schema.SOURCE: [str(tmp_path)] * len(files),
            schema.TRUE_LABEL: [f[1] for f in files],
            schema.GROUP: [f[0].split("/")[-3] for f in files],
            schema.SPLIT: pa.array([None] * len(files), pa.string()),
        }
    )
    decoded = prepare_batch(listing, PrepareOptions(policy="center-crop", max_pixels=10**8, phash=True))
    split, record = datasets.assign_splits(decoded, (0.6, 0.2, 0.2), seed=3)
    by_family: dict[str, set] = {}
    for (_, _, name), chosen in zip(files, split.to_pylist(), strict=True):
        by_family.setdefault(name, set()).add(chosen)
    assert by_family[PHOTOS[0]] == {None}, "the family with both labels is not used"
    assert all(len(chosen) == 1 and None not in chosen for name, chosen in by_family.items() if name != PHOTOS[0])
    assert record["near_duplicate_groups"] == len(PHOTOS)
    assert (
        record["near_duplicate_conflict_files"]
        == record["conflicting_label_files"]
        == len(family(photograph(PHOTOS[0])))
    )
    plain, plain_record = datasets.assign_splits(
        decoded.drop_columns([schema.PDQ, schema.PDQ_QUALITY]), (0.6, 0.2, 0.2), 3
    )
    assert plain_record["near_duplicate_groups"] == 0 and plain_record["conflicting_label_files"] == 0
    spread = {}
    for (_, _, name), chosen in zip(files, plain.to_pylist(), strict=True):
        spread.setdefault(name, set()).add(chosen)
    assert any(len(chosen) > 1 for chosen in spread.values()), "by bytes alone, reposts leak across splits"
