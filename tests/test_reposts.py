"""Near-duplicate groups: PDQ in the scan (--phash), `aidetect-batch reposts`, and the planted families.

The photographs are scikit-image's bundled pictures (CC0 / public domain, see
aidetect_batch/bench/demo_data/LICENSES.md). Each family is one photograph re-encoded as JPEG at quality 50
and 95, resized to 0.5 and 0.9, cropped by 1% a side (4% of its area), saved as PNG and given a small
text overlay. A crop of 5% of the area (1.27% a side) measured 16-32 bits from the original on these
five photographs, one past the default distance of 31: PDQ tolerates crops of about 1% a side.
"""

from __future__ import annotations

import datetime
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode
from PIL import Image, ImageDraw

from aidetect_batch import schema
from aidetect_batch.bench.demo import PHOTOS, photo_bytes
from aidetect_batch.cli import main
from aidetect_batch.media import pdq
from aidetect_batch.report import groups
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.train import datasets


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


# Known answers: the reference C++ (pdqhash 0.2.8, ThreatExchange's code) on the bundled photographs, as
# shipped, resized to 333×251 with Pillow's default filter, and rotated by 90°: (photo, variant, hex, quality).
REFERENCE = [
    ("astronaut.jpg", "as shipped", "2d6f1af3a956c529c79ca3d2526fa834d4196c81cedd04de0a26b855fc99b724", 100),
    ("astronaut.jpg", "333x251", "6d6b1af3ac56c729679ca3d2526fa814d4196c81c6fd04de2a26b851fc99b724", 100),
    ("astronaut.jpg", "rotated 90", "25a7651dad4fbd78e14e470c5e2963fe4c7219cbd22992c99ab654c2e7182d19", 100),
    ("chelsea.jpg", "as shipped", "5feb5321f01da156898e2b7629a5d3438412cdbd23f48942464526317db33ffd", 100),
    ("chelsea.jpg", "333x251", "5fab5331f05da156c98e2b7629a5d2430412edbd23f48942464522317db33ffd", 100),
    ("chelsea.jpg", "rotated 90", "39509eb576671efdce537f34c52d288c8a63eac6c667cb18b841c1969d921cb0", 100),
    ("coffee.jpg", "as shipped", "8c629e779a663698b9a33866c026726c21a679f61eb6e1f8c79ba7e23c8299e0", 100),
    ("coffee.jpg", "333x251", "8c629e7692663698b9a33866c126726c21a679f61eb6e1f8c79ba7e63c8299e0", 100),
    ("coffee.jpg", "rotated 90", "ea1d74a51dd6029cec630fd0712cf50218fd0aaaeff5ae831118881beeee1577", 100),
    ("rocket.jpg", "as shipped", "8792786c87937064bf1bc0e43f1fc0e03f1cc2e33da4c2537cec821b2ce4f376", 100),
    ("rocket.jpg", "333x251", "c793386c879370648f1bc0e43f1bc0e03f1cc2e33dacc2537cec831b2ce4f376", 100),
    ("rocket.jpg", "rotated 90", "ad552aa25aabad544aa85555aad5555ea56aaaa4556b556a4aaca954aa55d5ab", 100),
    ("camera.jpg", "as shipped", "dc9c9d3b746978f888f40ce6e5c3f70f7266623e8d989cb99f21f2010841e1c7", 100),
    ("camera.jpg", "333x251", "9c9c9d3b746978fc88f40ce7e5c3f70f7266221e8d989cb99fe1f2010841e0c7", 100),
    ("camera.jpg", "rotated 90", "c93dcc7233c70e63fc1c18c703ccbcd39e39c1747c98278ff170623e47c19ce0", 100),
]


def _variant(name: str, variant: str) -> Image.Image:
    image = photograph(name)
    return {"as shipped": image, "333x251": image.resize((333, 251)), "rotated 90": image.rotate(90, expand=True)}[
        variant
    ]


@pytest.mark.parametrize("name,variant,expected,quality", REFERENCE, ids=[f"{r[0]}-{r[1]}" for r in REFERENCE])
def test_pdq_equals_the_reference_implementation(name, variant, expected, quality):
    found = pdq.pdq_of(_variant(name, variant))
    assert found.hash.hex() == expected and found.quality == quality


def test_pdq_equals_the_reference_live_on_odd_images():
    """Where pdqhash (the reference C++, built from source) is installed: low-contrast and tiny images too."""
    pdqhash = pytest.importorskip("pdqhash")
    rng = np.random.default_rng(0)
    for k in range(1, 8):
        pixels = (rng.random((50 + 30 * k, 70 + 20 * k, 3)) * (k * 10 + 1) + 100).astype(np.uint8)
        bits, quality = pdqhash.compute(pixels)
        found = pdq.pdq_of(Image.fromarray(pixels))
        assert found.hash == np.packbits(bits.astype(np.uint8)).tobytes() and found.quality == quality


def test_near_pairs_are_exact_at_the_distance():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (2000, 32), dtype=np.uint8)
    for row, flips in ((1, 31), (3, 32), (5, 0), (7, 12)):
        bits = np.unpackbits(codes[0])
        bits[rng.choice(256, flips, replace=False)] ^= 1
        codes[row] = np.packbits(bits)
    found = {tuple(p) for p in groups.near_pairs(codes, 31).tolist()}
    assert found == {(0, 1), (0, 5), (0, 7), (1, 5), (5, 7), (1, 7)} - {
        (a, b) for a, b in ((1, 5), (1, 7), (5, 7)) if pdq.distance(codes[a].tobytes(), codes[b].tobytes()) > 31
    }
    assert (0, 3) not in found


def test_each_planted_family_is_one_group_and_none_merge():
    hashes, families = [], []
    for index, name in enumerate(PHOTOS):
        for data in family(photograph(name)).values():
            hashes.append(pdq.pdq_of(Image.open(io.BytesIO(data)).convert("RGB")).hash)
            families.append(index)
    found = groups.components(len(hashes), groups.near_pairs(pdq.unpack(hashes), pdq.MATCH_DISTANCE))
    families = np.array(families)
    for index in range(len(PHOTOS)):
        assert len(set(found[families == index])) == 1, f"{PHOTOS[index]} split: {found[families == index]}"
    assert len(set(found)) == len(PHOTOS), "no two families merge"


def test_a_flat_image_has_low_quality():
    flat = Image.new("RGB", (200, 200), (128, 128, 128))
    nearly = Image.fromarray((128 + np.random.default_rng(0).normal(0, 1, (200, 200, 3))).clip(0, 255).astype(np.uint8))
    assert pdq.pdq_of(flat).quality < pdq.MIN_QUALITY
    assert pdq.pdq_of(nearly).quality < pdq.MIN_QUALITY


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
    both labels (a photograph and its edit) is counted, and kept together in one split."""
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
    assert all(len(chosen) == 1 and None not in chosen for chosen in by_family.values()), by_family
    assert record["near_duplicate_groups"] == len(PHOTOS)
    assert record["near_duplicate_conflict_files"] == len(family(photograph(PHOTOS[0])))
    assert record["conflicting_label_files"] == 0, "no identical bytes carry both labels"
    plain, plain_record = datasets.assign_splits(
        decoded.drop_columns([schema.PDQ, schema.PDQ_QUALITY]), (0.6, 0.2, 0.2), 3
    )
    assert plain_record["near_duplicate_groups"] == 0 and plain_record["conflicting_label_files"] == 0
    spread = {}
    for (_, _, name), chosen in zip(files, plain.to_pylist(), strict=True):
        spread.setdefault(name, set()).add(chosen)
    assert any(len(chosen) > 1 for chosen in spread.values()), "by bytes alone, reposts leak across splits"
