"""The corpora suite: the same photographs read as loose files, from WebDataset tar shards, from one zip and
from a Parquet image column; a decode task's peak memory on archives of two sizes; the watchdog's cost.

- Rows per second through the CPU stage (``cpu_stage.prepare_stream``) on one core, per input kind, each
  batch as the scan forms it (16 loose files, or one archive, or one Parquet file), and as a share of the
  loose rate: what reading members costs or saves against opening files.
- Rows per second of an end-to-end scan of each corpus with the tiny CNN, steady state (20-90% of rows).
- Peak RSS of a fresh interpreter that streams one tar and one zip of ``gb / 4`` and ``gb`` GiB through the
  CPU stage: a flat figure shows the task holds a chunk of rows, not the archive.
- The watchdog: ms per file through the CPU stage with ``--decode-timeout`` on and off, and each kind's rows
  per second with it on (archives and Parquet files are then read in a child process too).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.bench import measure
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.checkpoints import build_model, save_checkpoint
from aidetect_batch.scan import cpu_stage
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan

SHARDS = 4
LOOSE_BATCH = 16
# Hugging Face's Image feature, as `datasets` writes it in the Parquet schema metadata.
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
_PEAK_RSS_MB = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One set of photographs stored four ways; each entry is the listing of that input kind."""

    loose: list[str]
    tars: list[str]
    zips: list[str]
    parquets: list[str]

    def kinds(self) -> dict[str, list[str]]:
        return {"loose": self.loose, "tar": self.tars, "zip": self.zips, "parquet": self.parquets}


def write_corpus(root: str, photos: int) -> Corpus:
    """``photos`` benchmark JPEGs as loose files, as WebDataset tar shards, as one zip and as Parquet."""
    loose = measure.write_jpegs(os.path.join(root, "loose"), photos, measure.PHOTO_SIZES)
    blobs = [(os.path.basename(p), open(p, "rb").read()) for p in loose]
    shards = [blobs[i::SHARDS] for i in range(SHARDS)]
    tars = [write_shard(os.path.join(root, f"{i:05d}.tar"), shard) for i, shard in enumerate(shards)]
    zips = [write_zip(os.path.join(root, "export.zip"), blobs)]
    parquets = [write_parquet(os.path.join(root, f"train-{i:05d}.parquet"), s) for i, s in enumerate(shards[:2])]
    parquets += [write_parquet(os.path.join(root, "train-00002.parquet"), [b for s in shards[2:] for b in s])]
    return Corpus(loose, tars, zips, parquets)


def write_shard(path: str, blobs: list[tuple[str, bytes]]) -> str:
    """A WebDataset shard as img2dataset writes it: ``key.jpg``, ``key.txt`` and ``key.json`` per sample."""
    with tarfile.open(path, "w") as tar:
        for name, data in blobs:
            key = name.rsplit(".", 1)[0]
            sidecar = json.dumps({"url": f"https://example.org/{name}", "key": key}).encode()
            for member, payload in ((f"{key}.jpg", data), (f"{key}.txt", b"a photo"), (f"{key}.json", sidecar)):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_zip(path: str, blobs: list[tuple[str, bytes]], *, repeat: int = 1) -> str:
    """A deflated zip, as social-media exports are, of ``blobs`` (``repeat`` times, under distinct names)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for r in range(repeat):
            for name, data in blobs:
                archive.writestr(f"data/media/{r}-{name}", data)
    return path


def write_parquet(path: str, blobs: list[tuple[str, bytes]]) -> str:
    """A Hugging Face image dataset file: ``image`` as ``struct<bytes, path>``, declared in the metadata."""
    image = pa.array([{"bytes": data, "path": name} for name, data in blobs], HF_IMAGE)
    table = pa.table({"image": image, "caption": ["a photo"] * len(blobs)})
    pq.write_table(table.replace_schema_metadata(HF_METADATA), path, row_group_size=max(1, len(blobs) // 2))
    return path


def stage_rates(corpus: Corpus, options: cpu_stage.PrepareOptions) -> dict[str, Any]:
    """Rows per second through the CPU stage on one core, per input kind, and each against the loose rate.
    With ``decode_timeout`` set, one unit of each kind goes through first, so no rate pays for starting the
    watchdog's processes (once per worker in a scan)."""
    if options.decode_timeout:
        for units in corpus.kinds().values():
            listing = pa.table({schema.PATH: units[:1], schema.SOURCE: ["bench"]})
            list(cpu_stage.prepare_stream(listing, options))
    rates: dict[str, Any] = {}
    for kind, units in corpus.kinds().items():
        batches = [units[i : i + LOOSE_BATCH] for i in range(0, len(units), LOOSE_BATCH)] if kind == "loose" else []
        batches = batches or [[unit] for unit in units]
        start, rows = time.perf_counter(), 0
        for batch in batches:
            listing = pa.table({schema.PATH: batch, schema.SOURCE: ["bench"] * len(batch)})
            rows += sum(t.num_rows for t in cpu_stage.prepare_stream(listing, options))
        rates[kind] = {"rows": rows, "rows_per_s": rows / (time.perf_counter() - start)}
    for kind in rates:
        rates[kind]["vs_loose"] = rates[kind]["rows_per_s"] / rates["loose"]["rows_per_s"]
    return rates


def scan_rates(corpus: Corpus, root: str) -> dict[str, Any]:
    """End-to-end rows per second of a scan of each corpus with the tiny CNN (random weights)."""
    checkpoint = os.path.join(root, "tiny.pt")
    model = build_model(registry.TINY_ARCH, 1)
    save_checkpoint(checkpoint, model, registry.TINY_ARCH, info={"untrained": True, "purpose": "benchmark"})
    rates: dict[str, Any] = {}
    for kind, units in corpus.kinds().items():
        cfg = ScanConfig(sources=tuple(units), out=os.path.join(root, f"out-{kind}"), checkpoint=checkpoint)
        result = run_scan(cfg)
        rates[kind] = {
            "rows": result.summary.total,
            "rows_per_s": result.run["outputs"]["rows"] / result.run["wall_seconds"],
            "steady_rows_per_s": measure.steady_rate(result.deliveries),
        }
    return rates


_STREAM = f"""
import json, sys
import pyarrow as pa
from aidetect_batch import schema
from aidetect_batch.scan import cpu_stage
from aidetect_batch.scan.config import ScanConfig
containers = ScanConfig(sources=("x",), out="o", checkpoint="c").containers
options = cpu_stage.PrepareOptions(policy="resize", max_pixels=10**9, containers=containers)
listing = pa.table({{schema.PATH: [sys.argv[1]], schema.SOURCE: ["bench"]}})
rows = 0
if sys.argv[2] == "stream":
    for table in cpu_stage.prepare_stream(listing, options):
        rows += table.num_rows
print(json.dumps({{"rows": rows, "peak_rss_mb": {_PEAK_RSS_MB}}}))
"""


def archive_memory(root: str, photos: list[str], gb: float) -> list[dict[str, Any]]:
    """Peak RSS of a fresh interpreter streaming a tar and a zip of ``gb / 4`` and ``gb`` GiB through the
    CPU stage, beside the same interpreter's RSS after imports alone. Linux only: it reads ``/proc``."""
    blobs = [(os.path.basename(p), open(p, "rb").read()) for p in photos]
    per_copy = sum(len(data) for _, data in blobs)
    imports = _peak(photos[0], "imports")["peak_rss_mb"]
    rows = []
    for size in (gb / 4, gb):
        repeat = max(1, round(size * 2**30 / per_copy))
        tar_path = os.path.join(root, f"big-{size:g}.tar")
        write_shard(tar_path, [(f"{r}-{name}", data) for r in range(repeat) for name, data in blobs])
        zip_path = write_zip(os.path.join(root, f"big-{size:g}.zip"), blobs, repeat=repeat)
        for kind, path in (("tar", tar_path), ("zip", zip_path)):
            streamed = _peak(path, "stream")
            rows.append(
                {
                    "kind": kind,
                    "gib": os.path.getsize(path) / 2**30,
                    "rows": streamed["rows"],
                    "stream_peak_rss_mb": streamed["peak_rss_mb"],
                    "imports_peak_rss_mb": imports,
                }
            )
            os.remove(path)
    return rows


def _peak(path: str, mode: str) -> dict[str, Any]:
    """Rows and peak RSS of a fresh interpreter that streams ``path`` (``stream``) or only imports (``imports``)."""
    run = subprocess.run([sys.executable, "-c", _STREAM, path, mode], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def watchdog_cost(paths: list[str], options: cpu_stage.PrepareOptions, timeout: float) -> dict[str, Any]:
    """Ms per loose file through the CPU stage with the decode watchdog off, on (twice: the first pass pays
    for starting its process, once per worker) and off again."""
    listing = pa.table({schema.PATH: paths, schema.SOURCE: ["bench"] * len(paths)})
    timings = {}
    for name, seconds in (("off", 0.0), ("on_first", timeout), ("on", timeout), ("off_again", 0.0)):
        chosen = dataclasses.replace(options, decode_timeout=seconds, chunk_rows=LOOSE_BATCH)
        start = time.perf_counter()
        for k in range(0, len(paths), LOOSE_BATCH):
            list(cpu_stage.prepare_stream(listing.slice(k, LOOSE_BATCH), chosen))
        timings[name] = 1000 * (time.perf_counter() - start) / len(paths)
    off = min(timings["off"], timings["off_again"])
    return {
        "files": len(paths),
        "ms_per_file_off": off,
        "ms_per_file_on": timings["on"],
        "ms_added": timings["on"] - off,
        "start_ms": (timings["on_first"] - timings["on"]) * len(paths),
    }


def run_corpora(photos: int, gb: float) -> dict[str, Any]:
    """The corpora suite (module docstring), on ``photos`` benchmark photographs and archives of ``gb`` GiB."""
    defaults = ScanConfig(sources=("x",), out="o", checkpoint="c")
    options = cpu_stage.PrepareOptions(policy="resize", max_pixels=10**9, containers=defaults.containers)
    watched = dataclasses.replace(options, decode_timeout=defaults.watchdog_timeout)
    with tempfile.TemporaryDirectory() as root:
        corpus = write_corpus(root, photos)
        return {
            "photos": photos,
            "cpu_stage": stage_rates(corpus, options),
            "watchdog": watchdog_cost(corpus.loose, options, defaults.watchdog_timeout),
            "cpu_stage_watched": stage_rates(corpus, watched),
            "end_to_end": scan_rates(corpus, root),
            "archive_memory": archive_memory(root, corpus.loose[: len(measure.PHOTO_SIZES)], gb),
        }


def corpora_lines(section: dict[str, Any]) -> list[str]:
    """The corpora suite as printed lines."""
    stage, scans, dog = section["cpu_stage"], section["end_to_end"], section["watchdog"]
    watched = section["cpu_stage_watched"]
    lines = [
        f"corpora {kind:<8} CPU stage {r['rows_per_s']:7.1f} rows/s/core ({r['vs_loose']:.2f}x loose), "
        f"{watched[kind]['rows_per_s']:7.1f} watched ({watched[kind]['rows_per_s'] / r['rows_per_s']:.2f}x); "
        f"scan {scans[kind]['steady_rows_per_s']:7.1f} rows/s steady, {scans[kind]['rows_per_s']:.1f} overall"
        for kind, r in stage.items()
    ]
    lines += [
        f"corpora memory {m['kind']} {m['gib']:.2f} GiB: peak RSS {m['stream_peak_rss_mb']:.0f} MB "
        f"({m['imports_peak_rss_mb']:.0f} MB after imports), {m['rows']} rows"
        for m in section["archive_memory"]
    ]
    lines.append(
        f"corpora watchdog: {dog['ms_per_file_on']:.2f} ms/file on vs {dog['ms_per_file_off']:.2f} off "
        f"({dog['ms_added']:+.2f} ms) over {dog['files']} files; starting its process {dog['start_ms']:.0f} ms once"
    )
    return lines
