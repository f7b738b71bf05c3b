"""User-facing errors that any module may raise, in a module that imports nothing of the package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing argument error, reported before any work starts."""


class SourceError(ValueError):
    """A source that does not exist or cannot be listed."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the architecture."""
