"""The corpora benchmark's own plumbing, at toy sizes: every kind yields every photograph once, and the
memory probe streams archives of two sizes in fresh interpreters."""

from __future__ import annotations

import dataclasses

import pytest

from aidetect_batch.bench import corpora, measure
from aidetect_batch.scan import cpu_stage
from aidetect_batch.scan.config import ScanConfig


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(measure, "PHOTO_SIZES", ((64, 48), (40, 40)))
    yield corpora.write_corpus(str(tmp_path_factory.mktemp("corpus")), 6)
    monkeypatch.undo()


def test_each_input_kind_of_the_corpus_yields_every_photograph_once(small_corpus):
    defaults = ScanConfig(sources=("x",), out="o", checkpoint="c")
    options = cpu_stage.PrepareOptions(policy="resize", max_pixels=10**8, containers=defaults.containers)
    rates = corpora.stage_rates(small_corpus, options)
    assert {kind: r["rows"] for kind, r in rates.items()} == {"loose": 6, "tar": 6, "zip": 6, "parquet": 6}
    assert rates["loose"]["vs_loose"] == 1.0 and all(r["rows_per_s"] > 0 for r in rates.values())
    watched = corpora.stage_rates(small_corpus, dataclasses.replace(options, decode_timeout=60.0))
    assert {kind: r["rows"] for kind, r in watched.items()} == {"loose": 6, "tar": 6, "zip": 6, "parquet": 6}
    lines = corpora.corpora_lines(
        {
            "cpu_stage": rates,
            "cpu_stage_watched": watched,
            "end_to_end": {k: {"rows_per_s": 1.0, "steady_rows_per_s": 1.0} for k in rates},
            "archive_memory": [],
            "watchdog": {"ms_per_file_on": 2.0, "ms_per_file_off": 1.0, "ms_added": 1.0, "files": 6, "start_ms": 9},
        }
    )
    assert len(lines) == 5 and lines[1].startswith("corpora tar")


def test_the_watchdog_cost_is_timed_with_it_off_on_and_off_again(small_corpus):
    options = cpu_stage.PrepareOptions(policy="resize", max_pixels=10**8)
    cost = corpora.watchdog_cost(small_corpus.loose, options, 60.0)
    assert cost["files"] == 6 and cost["ms_per_file_on"] > 0 and cost["ms_per_file_off"] > 0
    assert cost["ms_added"] == cost["ms_per_file_on"] - cost["ms_per_file_off"]


@pytest.mark.slow  # five fresh interpreters that import torch: about 15 s
def test_the_memory_probe_streams_archives_of_two_sizes(small_corpus, tmp_path):
    found = corpora.archive_memory(str(tmp_path), small_corpus.loose[:2], 0.0004)
    assert [m["kind"] for m in found] == ["tar", "zip", "tar", "zip"]
    small, large = found[0]["rows"], found[2]["rows"]
    assert large > small > 0 and found[1]["rows"] == small, "the larger archive holds more members, all read"
    assert all(m["stream_peak_rss_mb"] >= m["imports_peak_rss_mb"] > 0 for m in found)
