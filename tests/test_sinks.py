import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aidetect_batch import schema
from aidetect_batch.inputs import item, stamps
from aidetect_batch.inputs.manifest import shard_digest
from aidetect_batch.scan.sink import UNITS_METADATA_KEY, ScoreWriter, committed_work, to_scores_table


def rows(start: int, n: int) -> pa.Table:
    data = {name: [None] * n for name in schema.SCORE_COLUMNS}
    data[schema.PATH] = [f"/d/{i}.jpg" for i in range(start, start + n)]
    data[schema.STATUS] = ["ok"] * n
    data[schema.SCORE] = [0.5] * n
    data[schema.WIDTH] = [10] * n
    data["extra_column_dropped"] = [1] * n
    return pa.table(data)


def test_rolls_files_and_commits_atomically(tmp_path):
    out = str(tmp_path / "scores")
    writer = ScoreWriter(out, rows_per_file=40_000, run_id="r1")
    for i in range(0, 100_000, 7_000):
        writer.write(rows(i, min(7_000, 100_000 - i)))
        assert all(
            not name.startswith("part-") or name in {os.path.basename(f) for f in writer.files}
            for name in os.listdir(out)
        ), "only committed files carry the part- name"
    files = writer.close()
    assert [os.path.basename(f) for f in files] == [f"part-r1-{i:05d}.parquet" for i in range(3)]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(f) for f in files)
    assert [pq.read_metadata(f).num_rows for f in files] == [40_000, 40_000, 20_000]
    table = pq.read_table(out)
    assert table.schema.equals(schema.SCORES_SCHEMA)
    assert table.num_rows == 100_000 and len(set(table.column(schema.PATH).to_pylist())) == 100_000


def test_unfinished_file_stays_hidden(tmp_path):
    out = str(tmp_path / "scores")
    writer = ScoreWriter(out, rows_per_file=50_000)
    writer.write(rows(0, 20_000))
    visible = [n for n in os.listdir(out) if not n.startswith((".", "_"))]
    assert visible == []
    assert pq.ParquetDataset(out).files == []


def test_cast_keeps_nullable_integers():
    table = to_scores_table(rows(0, 3))
    assert table.schema.field(schema.WIDTH).type == pa.int32()
    assert "extra_column_dropped" not in table.column_names


class _Members:
    """A minimal input kind, so that ``bundle://<member>::<file>`` paths name their file."""

    name = "bundle"
    views = False

    def accepts(self, unit):
        return False


def unit_rows(paths: list[str], counts: list[int], shard: int = 0) -> pa.Table:
    table = rows(0, len(paths)).set_column(0, schema.PATH, pa.array(paths, pa.string()))
    table = table.append_column(schema.SHARD, pa.array([shard] * len(paths), pa.int64()))
    return table.append_column(item.UNIT_ROWS, pa.array(counts, pa.int64()))


def test_a_shard_is_whole_when_every_unit_and_all_its_rows_arrived(tmp_path):
    out = str(tmp_path / "scores")
    archive = "/d/x.bundle"
    members = [f"bundle://{name}::{archive}" for name in ("a.jpg", "b.jpg", "c.jpg")]
    item.register(_Members())
    try:
        writer = ScoreWriter(out, rows_per_file=1, run_id="u", shard_rows={0: 2, 1: 1})
        writer.write(unit_rows(members[1:], [0, 0]))
        writer.write(unit_rows(["/d/loose.jpg"], [1]))
        assert writer.files == [] and writer.shards_in_flight == 1, "the archive's first row has not arrived"
        writer.write(unit_rows(members[:1], [3]))
        writer.write(unit_rows(["/d/other.jpg"], [1], shard=1))
        writer.close()
        found = committed_work(out)
    finally:
        item.unregister(_Members.name)
    assert (found.rows, found.units, writer.units_written) == (5, 3, 3)
    assert found.shards == {0: shard_digest([archive, "/d/loose.jpg"]), 1: shard_digest(["/d/other.jpg"])}
    first, second = (pq.read_metadata(f).metadata for f in writer.files)
    assert first[UNITS_METADATA_KEY] == b"2" and UNITS_METADATA_KEY not in second, "one row per unit: no key"


def test_a_unit_with_more_rows_than_it_announced_is_refused(tmp_path):
    writer = ScoreWriter(str(tmp_path / "scores"), shard_rows={0: 1})
    writer.write(unit_rows(["/d/b"], [0]))
    with pytest.raises(RuntimeError, match="more rows than its 1 inputs yielded"):
        writer.write(unit_rows(["/d/a", "/d/c"], [2, 0]))


def test_a_shard_digest_covers_the_stamps_of_its_archives(tmp_path):
    """A streamed listing's ``_stamp`` column reaches the digest the sink commits, so a resumed listing sees a
    rewritten archive; rows without the column (a listing on the driver) keep digests of paths only."""
    out = str(tmp_path / "scores")
    table = unit_rows(["zip://a.jpg::/d/x.zip", "/d/loose.jpg"], [1, 1])
    writer = ScoreWriter(out, rows_per_file=1, run_id="s", shard_rows={0: 2, 1: 2})
    writer.write(table.append_column(stamps.COLUMN, pa.array(["3:1", None], pa.string())))
    writer.write(unit_rows(["zip://a.jpg::/d/y.zip", "/d/other.jpg"], [1, 1], shard=1))
    writer.close()
    assert committed_work(out).shards == {
        0: shard_digest(["/d/x.zip", "/d/loose.jpg"], ["3:1", None]),
        1: shard_digest(["/d/y.zip", "/d/other.jpg"]),
    }


def with_frames(table: pa.Table, times: list[list[float] | None], scores: list[list[float] | None]) -> pa.Table:
    """Result rows as the Classifier hands them on: a scored video's frame times and frame scores, null for a still."""
    table = table.append_column(schema.FRAME_TIMES, pa.array(times, schema.HIDDEN_TYPES[schema.FRAME_TIMES]))
    return table.append_column(schema.FRAME_SCORES, pa.array(scores, schema.HIDDEN_TYPES[schema.FRAME_SCORES]))


def test_frame_rows_are_committed_with_their_shard_under_the_scores_file_name(tmp_path):
    scores_dir, frames_dir = str(tmp_path / "scores"), str(tmp_path / "frames")
    writer = ScoreWriter(scores_dir, rows_per_file=1, run_id="f", shard_rows={0: 3, 1: 1}, frames_directory=frames_dir)
    writer.write(with_frames(unit_rows(["/d/a.mp4", "/d/still.jpg"], [1, 1]), [[0.5, 1.5], None], [[0.25, 0.75], None]))
    assert not os.path.exists(frames_dir), "nothing before the shard is whole"
    writer.write(with_frames(unit_rows(["/d/b.gif"], [1]), [[0.0, 0.25, 2.0]], [[0.5, 0.125, 0.5]]))
    writer.write(unit_rows(["/d/only_stills.jpg"], [1], shard=1))
    writer.close()
    assert len(writer.files) == 2
    assert os.listdir(frames_dir) == [os.path.basename(writer.files[0])], "a file of stills has no frames file"
    assert pq.read_table(scores_dir).schema.equals(schema.SCORES_SCHEMA), "the hidden columns are not written"
    frames = pq.read_table(frames_dir)
    assert frames.schema.equals(schema.FRAMES_SCHEMA)
    assert [tuple(r.values()) for r in frames.to_pylist()] == [
        ("/d/a.mp4", 0, 0.5, 0.25),
        ("/d/a.mp4", 1, 1.5, 0.75),
        ("/d/b.gif", 0, 0.0, 0.5),
        ("/d/b.gif", 1, 0.25, 0.125),
        ("/d/b.gif", 2, 2.0, 0.5),
    ]


def test_a_resume_deletes_frames_a_stopped_run_left_without_their_scores_file(tmp_path):
    """A run killed between a frames file and its scores file leaves frame rows of shards not committed: the
    resume rescores those shards, so their old frame rows must go (and unfinished temporary files too)."""
    scores_dir, frames_dir = str(tmp_path / "scores"), str(tmp_path / "frames")
    writer = ScoreWriter(scores_dir, rows_per_file=1, run_id="k", shard_rows={0: 1, 1: 1}, frames_directory=frames_dir)
    for shard in (0, 1):
        writer.write(with_frames(unit_rows([f"/d/{shard}.mp4"], [1], shard=shard), [[1.0]], [[0.5]]))
    writer.close()
    kept, lost = writer.files
    os.remove(lost)
    (tmp_path / "frames" / ".part-k-00002.parquet.tmp").write_bytes(b"half")
    found = committed_work(scores_dir, frames_directory=frames_dir)
    assert found.files == [kept] and set(found.shards) == {0}
    assert os.listdir(frames_dir) == [os.path.basename(kept)]
    assert pq.read_table(frames_dir).column(schema.PATH).to_pylist() == ["/d/0.mp4"]
