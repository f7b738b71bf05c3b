"""Filesystem access for local paths and ``s3://`` URIs through fsspec.

Credentials and endpoints come from the standard AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``), which botocore reads on every worker, plus explicit
``storage_options`` for S3-compatible stores.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from aidetect_batch.errors import ConfigError

# A stalled S3 request fails after these many seconds. botocore tries each request once and s3fs
# retries it up to 5 times, so a stalled object ends as an error after about 5-10 times
# READ_TIMEOUT_S instead of blocking a decode task forever (tests/test_faults.py measures it).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 20.0
_S3_PROTOCOLS = ("s3", "s3a")


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it (no scheme)."""
    if not is_remote(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    options = dict(storage_options or {})
    if uri.split("://", 1)[0] in _S3_PROTOCOLS:
        options["config_kwargs"] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": 1},
            **options.get("config_kwargs", {}),
        }
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


# How to install the filesystem a URI scheme needs, where fsspec's own hint is not enough.
_INSTALL_HINTS = {"hf": "pip install huggingface_hub (or 'aidetect-batch[hub]')"}


def check_filesystem(uri: str) -> None:
    """Refuse a URI whose scheme's fsspec filesystem is not installed (``hf://`` without huggingface_hub),
    before any work starts, saying what to install.

    Raises:
        ConfigError: the filesystem's package cannot be imported.
    """
    if not is_remote(uri):
        return
    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(protocol, str(exc))
        raise ConfigError(f"{uri}: reading {protocol}:// needs a package that is not installed: {hint}") from None
    except ValueError:
        raise ConfigError(f"{uri}: no filesystem reads {protocol}:// (a typo in the scheme?)") from None


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing name of ``path``: absolute for local files, ``s3://bucket/key`` for S3."""
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def join(base: str, *parts: str) -> str:
    """Join path components with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def write_json(uri: str, data: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` as indented JSON (numpy scalars and other objects as their value or text)."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "w") as handle:
        json.dump(data, handle, indent=2, default=_json_default)


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a JSON file written by :func:`write_json`."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "r") as handle:
        return json.load(handle)


def write_parquet(
    uri: str,
    rows: pa.Table | list[dict[str, Any]] | dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write a table, a list of row dicts or a dict of columns as one zstd Parquet file."""
    if isinstance(rows, pa.Table):
        table = rows
    else:
        table = pa.Table.from_pylist(rows) if isinstance(rows, list) else pa.table(rows)
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def output_entries(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names directly inside the output directory ``uri``; empty when it does not exist.

    Raises:
        NotADirectoryError: ``uri`` exists and is a file.
    """
    fs, root = filesystem(uri, storage_options)
    if not fs.exists(root):
        return []
    if not fs.isdir(root):
        raise NotADirectoryError(f"--out {uri!r} exists and is a file")
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=False)]
    return [n for n in names if n]


def claim_output(
    uri: str,
    own_entries: tuple[str, ...],
    overwrite: bool,
    *,
    storage_options: dict[str, Any] | None = None,
    keep_hint: str = "",
) -> None:
    """Refuse a non-empty output directory unless ``overwrite``; then remove only ``own_entries``.

    A job never deletes files it did not write: with foreign files present,
    even ``--overwrite`` is refused.

    Raises:
        ConfigError: the directory is a file, is not empty, or holds foreign files.
    """
    try:
        entries = output_entries(uri, storage_options)
    except NotADirectoryError as exc:
        raise ConfigError(str(exc)) from None
    if not entries:
        return
    if not overwrite:
        raise ConfigError(
            f"--out {uri!r} is not empty ({', '.join(sorted(entries)[:5])}); "
            f"choose a new directory{keep_hint} or pass --overwrite to replace it"
        )
    foreign = [e for e in entries if e not in own_entries]
    if foreign:
        raise ConfigError(
            f"--overwrite refuses to clear {uri!r}: it holds files this tool did not write "
            f"({', '.join(sorted(foreign)[:5])})"
        )
    fs, root = filesystem(uri, storage_options)
    for entry in entries:
        fs.rm(f"{root}/{entry}", recursive=True)
