import os

import pyarrow as pa
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.scan.sink import ScoreWriter, to_scores_table


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
