import os

import pytest

from aidetect_batch import schema
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS, SourceError, list_sources


def listed(*sources, all_files=False):
    table = list_sources(tuple(sources), DEFAULT_EXTENSIONS, all_files=all_files)
    paths = table.column(schema.PATH).to_pylist()
    assert len(paths) == len(set(paths))
    return dict(zip(paths, table.column(schema.SOURCE).to_pylist(), strict=True))


def test_folder_is_walked_recursively_with_extension_filter(corpus):
    found = listed(corpus["root"])
    assert set(found) == set(corpus["default"])
    assert set(found.values()) == {corpus["root"]}
    assert not any("/." in p for p in found), "hidden files must be skipped"


def test_all_files_sends_everything_but_hidden(corpus):
    found = listed(corpus["root"], all_files=True)
    assert set(found) == set(corpus["all_files"])
    assert any(p.endswith("no_extension") for p in found)


def test_single_files_globs_and_overlaps_are_deduplicated(corpus):
    root = corpus["root"]
    single = os.path.join(root, "misc", "no_extension")
    found = listed(os.path.join(root, "png", "*.png"), os.path.join(root, "png"), single)
    pngs = {p for p in corpus["default"] if "/png/" in p}
    assert set(found) == pngs | {single}, "an explicitly named file is scanned whatever its extension"


def test_extension_match_is_case_insensitive(corpus):
    assert any(p.endswith("UPPER.JPEG") for p in listed(corpus["root"]))


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        listed(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="matches nothing"):
        listed(str(tmp_path / "*.jpg"))


def test_folder_without_images_is_an_error_that_mentions_all_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="--all-files"):
        listed(str(tmp_path))


def test_glob_source_root_is_the_folder_before_the_first_wildcard(corpus):
    root = corpus["root"]
    found = listed(os.path.join(root, "p?g", "rgb.png"))
    assert found == {os.path.join(root, "png", "rgb.png"): root}
