"""Exceptions raised by packds.

Every exception a user can cause derives from :class:`PackdsError` or from the built-in
:class:`OSError` (with ``errno`` and ``filename`` set), and carries a ``hint`` attribute: what to
do about it, or ``None``.
"""

from __future__ import annotations

__all__ = [
    "PackdsError",
    "FormatError",
    "ChecksumError",
    "NoSpaceError",
    "UsageError",
    "SourceChangedError",
    "UnsafePathError",
    "DuplicateKeyError",
]


class PackdsError(Exception):
    """Base class of packds' own errors."""

    hint: str | None = None


class FormatError(PackdsError, ValueError):
    """A file is not a valid packds dataset, or it is damaged or incomplete."""


class ChecksumError(FormatError):
    """Stored bytes do not match their recorded checksum (``.key``, ``.shard``)."""

    key: str | None = None
    shard: str | None = None


class NoSpaceError(PackdsError, OSError):
    """The disk or quota filled up (errno ENOSPC)."""


class UsageError(PackdsError, ValueError):
    """Bad arguments or an existing output: nothing was changed."""


class SourceChangedError(PackdsError):
    """A source file changed (size, type) or vanished while it was packed."""


class UnsafePathError(FormatError):
    """An archive member would be written outside the destination (absolute, ``..``, symlink)."""


class DuplicateKeyError(UsageError, KeyError):
    """A sample key given twice to one :class:`packds.Writer` (``.key``); nothing was written
    for the second one."""

    key: str | None = None

    def __str__(self) -> str:  # a KeyError would quote the whole message
        return Exception.__str__(self)
