"""Labelled dataset layouts, manifests, and content-grouped stratified splits."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aidetect_batch import schema
from aidetect_batch.inputs.sources import SourceError
from aidetect_batch.train import datasets


@pytest.mark.parametrize(
    "relative,expected",
    [
        ("real/a.jpg", ("real", None, None)),
        ("ai/a.jpg", ("ai", None, None)),
        ("fake/a.jpg", ("ai", None, None)),
        ("REAL/a.jpg", ("real", None, None)),
        ("FAKE/a.jpg", ("ai", None, None)),
        ("0_real/a.jpg", ("real", None, None)),
        ("1_fake/a.jpg", ("ai", None, None)),
        ("human/real/a.jpg", ("real", "human", None)),
        ("real/human/a.jpg", ("real", "human", None)),
        ("sdv14/1_fake/a.png", ("ai", "sdv14", None)),
        ("train/REAL/a.jpg", ("real", None, "train")),
        ("test/FAKE/a.jpg", ("ai", None, "test")),
        ("validation/animal/fake/a.jpg", ("ai", "animal", "val")),
        ("train/car/0_real/a.png", ("real", "car", "train")),
        ("test/progan/airplane/1_fake/a.png", ("ai", "progan/airplane", "test")),
        ("train/real/deep/er/a.png", ("real", "deep", "train")),
        ("misc/a.jpg", (None, None, None)),
        ("real_photo_001.jpg", (None, None, None)),
    ],
)
def test_layouts_give_label_group_and_split(relative, expected):
    assert datasets.parse_path(relative) == expected


def touch(root, relative, data=b"x"):
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_tree_listing_labels_every_file_and_counts_unlabelled(tmp_path):
    files = {
        "train/human/real/1.jpg": ("real", "human", "train"),
        "train/human/fake/2.jpg": ("ai", "human", "train"),
        "test/sdv14/1_fake/3.png": ("ai", "sdv14", "test"),
        "test/0_real/4.png": ("real", None, "test"),
    }
    for relative in files:
        touch(tmp_path, relative)
    touch(tmp_path, "notes/readme.jpg")
    touch(tmp_path, "real/.DS_Store")
    table, described = datasets.list_labelled(str(tmp_path))
    got = {
        os.path.relpath(r[schema.PATH], tmp_path): (r[schema.TRUE_LABEL], r[schema.GROUP], r[schema.SPLIT])
        for r in table.to_pylist()
    }
    assert got == files
    assert described.unlabelled_files == 1 and described.unlabelled_examples[0].endswith("readme.jpg")
    assert described.labels == {"real": 2, "ai": 2}
    assert table.schema == schema.LABELLED_SCHEMA


def test_csv_manifest_with_relative_paths_and_numeric_labels(tmp_path):
    a = touch(tmp_path, "imgs/a.jpg")
    b = touch(tmp_path, "imgs/b.jpg")
    (tmp_path / "labels.csv").write_text("path,label,group\nimgs/a.jpg,0,faces\nimgs/b.jpg,FAKE,faces\n")
    table, described = datasets.list_labelled(str(tmp_path / "labels.csv"))
    rows = table.to_pylist()
    assert [(r[schema.PATH], r[schema.TRUE_LABEL], r[schema.GROUP]) for r in rows] == [
        (a, "real", "faces"),
        (b, "ai", "faces"),
    ]
    assert described.layout == "manifest"


def test_parquet_manifest_with_splits(tmp_path):
    a = touch(tmp_path, "a.jpg")
    pq.write_table(pa.table({"path": [a], "true_label": ["ai"], "split": ["validation"]}), tmp_path / "m.parquet")
    table, _ = datasets.list_labelled(str(tmp_path / "m.parquet"))
    assert table.to_pylist()[0][schema.SPLIT] == "val"


def test_manifest_errors_name_the_row(tmp_path):
    (tmp_path / "bad.csv").write_text("path,label\na.jpg,real\nb.jpg,maybe\n")
    with pytest.raises(SourceError, match="row 2.*'maybe'"):
        datasets.list_labelled(str(tmp_path / "bad.csv"))
    (tmp_path / "nolabel.csv").write_text("path\na.jpg\n")
    with pytest.raises(SourceError, match="lacks the column"):
        datasets.list_labelled(str(tmp_path / "nolabel.csv"))


def test_a_tree_without_class_folders_is_refused_with_the_layouts(tmp_path):
    touch(tmp_path, "real_001.jpg")
    touch(tmp_path, "fake_001.jpg")
    with pytest.raises(SourceError, match="no labelled images.*manifest"):
        datasets.list_labelled(str(tmp_path))


def split_table(rows):
    """rows: (label, group, own_split, sha, status)."""
    return pa.table(
        {
            schema.PATH: [f"/d/{i}.png" for i in range(len(rows))],
            schema.TRUE_LABEL: [r[0] for r in rows],
            schema.GROUP: [r[1] for r in rows],
            schema.SPLIT: pa.array([r[2] for r in rows], pa.string()),
            schema.SHA256: [r[3] for r in rows],
            schema.STATUS: [r[4] for r in rows],
        }
    )


def test_random_split_is_stratified_seeded_and_never_splits_identical_bytes():
    rows = []
    for label, n in (("real", 400), ("ai", 200)):
        for i in range(n):
            # Every tenth image has an exact copy (same bytes) elsewhere in the set.
            sha = f"{label}-{i - i % 2 if i % 10 < 2 else i}"
            rows.append((label, "g1" if i % 3 else "g2", None, sha, "ok"))
    rows.append(("real", None, None, "broken", "truncated"))
    table = split_table(rows)
    split, record = datasets.assign_splits(table, seed=3)
    assert split == datasets.assign_splits(table, seed=3)[0]
    assert split != datasets.assign_splits(table, seed=4)[0]
    assert record["mode"] == "random"
    values = split.to_pylist()
    assert values[-1] is None
    by_sha = {}
    for sha, s in zip(table.column(schema.SHA256).to_pylist(), values, strict=True):
        by_sha.setdefault(sha, set()).add(s)
    assert all(len(found) == 1 for found in by_sha.values())
    labelled = table.append_column("assigned", split)
    for label, n in (("real", 400), ("ai", 200)):
        chosen = [
            s for lab, s in zip(labelled.column(schema.TRUE_LABEL).to_pylist(), values, strict=True) if lab == label
        ]
        test_share = chosen.count("test") / n
        val_share = chosen.count("val") / n
        assert abs(test_share - 0.15) < 0.03 and abs(val_share - 0.1275) < 0.03


def test_conflicting_labels_for_identical_bytes_are_excluded_and_counted():
    rows = [("real", None, None, "same", "ok"), ("ai", None, None, "same", "ok")]
    rows += [("real", None, None, f"r{i}", "ok") for i in range(20)] + [
        ("ai", None, None, f"a{i}", "ok") for i in range(20)
    ]
    split, record = datasets.assign_splits(split_table(rows))
    assert split.to_pylist()[:2] == [None, None]
    assert record["conflicting_label_files"] == 2


def test_own_splits_are_kept_val_is_carved_from_train_and_leaks_removed():
    rows = [("real", None, "train", f"r{i}", "ok") for i in range(40)]
    rows += [("ai", None, "train", f"a{i}", "ok") for i in range(40)]
    rows += [("real", None, "test", "r0", "ok"), ("ai", None, "test", "t1", "ok")]
    split, record = datasets.assign_splits(split_table(rows))
    values = split.to_pylist()
    assert record["mode"] == "dataset" and record["carved_from_train"] == ["val"]
    assert values[0] is None and record["train_copies_of_heldout_removed"] == 1
    assert values[-2:] == ["test", "test"]
    assert 0 < values.count("val") < values.count("train")


def test_fingerprint_follows_content_not_names():
    base = split_table([("real", None, None, "a", "ok"), ("ai", None, None, "b", "ok")])
    base = base.set_column(base.schema.get_field_index(schema.SPLIT), schema.SPLIT, pa.array(["train", "val"]))
    renamed = base.set_column(0, schema.PATH, pa.array(["/elsewhere/x.png", "/elsewhere/y.png"]))
    relabelled = base.set_column(
        base.schema.get_field_index(schema.TRUE_LABEL), schema.TRUE_LABEL, pa.array(["ai", "ai"])
    )
    assert datasets.fingerprint(base) == datasets.fingerprint(renamed) != datasets.fingerprint(relabelled)


def test_scan_and_training_resolve_a_manifests_relative_paths_by_one_rule(tmp_path):
    """``./a`` and ``x/../a`` are joined to the manifest's folder and normalised, the same for both readers."""
    from aidetect_batch.inputs import manifest

    (tmp_path / "m").mkdir()
    labels = tmp_path / "m" / "labels.csv"
    labels.write_text("path,label\n./real/a.png,real\nsub/../ai/b.png,ai\n/abs/c.png,real\n")
    want = [str(tmp_path / "m" / "real" / "a.png"), str(tmp_path / "m" / "ai" / "b.png"), "/abs/c.png"]
    assert manifest.read_manifest(str(labels)).column(schema.PATH).to_pylist() == want
    assert datasets._read_manifest(str(labels), {}).column(schema.PATH).to_pylist() == want
