"""The model store's exceptions: one family under :class:`pyllama.LlamaError`."""

from __future__ import annotations

from ..errors import LlamaError


class StoreError(LlamaError):
    """Base class of the model store's errors."""


class InvalidReferenceError(StoreError, ValueError):
    """The text is not a model reference (``hf:org/repo:QUANT``, ``hf:org/repo/file.gguf[@rev]``, a URL)."""


class ModelNotFoundError(StoreError, LookupError):
    """The repository, revision, file or quantisation does not exist on the server."""


class NotCachedError(StoreError, FileNotFoundError):
    """Offline, and the reference is not in the cache."""


class DownloadError(StoreError, OSError):
    """The download failed (HTTP error, connection lost after every retry, refused access)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected sha256 (or size); the partial data was deleted."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InsufficientSpaceError(DownloadError):
    """Not enough free disk space in the cache for the download."""


class DownloadCancelledError(DownloadError):
    """The progress callback returned ``False``; the partial data is kept for a later resume."""


__all__ = [
    "StoreError", "InvalidReferenceError", "ModelNotFoundError", "NotCachedError", "DownloadError",
    "ChecksumError", "InsufficientSpaceError", "DownloadCancelledError",
]
