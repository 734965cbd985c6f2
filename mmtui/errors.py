"""Exceptions of the core. Each carries one line a person can act on: what failed and what to do."""

from __future__ import annotations


class MmtuiError(Exception):
    """Base of every error the core raises on purpose; its message is shown to the user as is."""


class ImageError(MmtuiError):
    """One image could not be read; the run goes on without it."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class ImageDirError(MmtuiError):
    """The image folder itself is missing, empty or unreadable."""


class StackError(MmtuiError):
    """A model, encoder, projection or preset could not be loaded."""


class ProjectionError(StackError):
    """A projection file has the wrong format or shape."""


class TargetError(MmtuiError):
    """A target word or caption file cannot be used."""


class StoreError(MmtuiError):
    """The cache database cannot be used."""


class StoreLockedError(StoreError):
    """Another process holds the write lock for longer than we wait."""


class StoreCorruptError(StoreError):
    """The cache file is damaged (SQLite: database disk image is malformed); nothing more is written to it."""


class StoreTooNewError(StoreError):
    """The database was written by a newer mmtui (an unknown migration is applied)."""


class NotFoundError(MmtuiError):
    """A neuron, image or run asked for is not in the store."""


def is_database_error(error: BaseException) -> bool:
    """Whether this is sqlite3's DatabaseError (or a subclass), told without importing sqlite3: only the store
    imports it (an import-linter contract)."""
    return any(k.__module__ == "sqlite3" and k.__name__ == "DatabaseError" for k in type(error).__mro__)


def is_corruption(error: BaseException) -> bool:
    """Whether an SQLite error says the cache file is damaged (not locked, not a wrong query)."""
    text = str(error).lower()
    return is_database_error(error) and ("malformed" in text or "corrupt" in text)
