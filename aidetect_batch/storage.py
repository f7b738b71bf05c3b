"""Filesystem access for local paths and ``s3://`` URIs through fsspec.

Credentials and endpoints come from the standard AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``), which botocore reads on every worker, plus explicit
``storage_options`` for S3-compatible stores.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it (no scheme)."""
    if not is_remote(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


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
