"""The model store: pull models by reference into pyllama's cache, resumable and verified.

References: ``hf:org/repo:Q4_K_M`` (the quantisation picked among the repository's GGUF files),
``hf:org/repo/path/file.gguf[@revision]``, and plain ``https://`` URLs. ``HF_ENDPOINT`` and
``HF_TOKEN`` are honoured; ``PYLLAMA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` resolve from the cache only.

    path = pyllama.store.pull("hf:org/repo:Q4_K_M", progress=lambda p: print(p.done, p.total, p.rate))
    model = pyllama.Model("hf:org/repo:Q4_K_M")    # the cache first, a pull when absent

A repository's multimodal projector (``mmproj*.gguf``) is pulled with its model, chosen as llama.cpp's
``-hf`` chooses it (``pull(..., mmproj=False)`` leaves it); :func:`projector_for` names it::

    model = pyllama.Model(ref, mmproj=pyllama.store.projector_for(ref))
"""

from .cache import CachedModel, PartialDownload, is_offline
from .errors import (
    ChecksumError,
    DownloadCancelledError,
    DownloadError,
    InsufficientSpaceError,
    InvalidReferenceError,
    ModelNotFoundError,
    NotCachedError,
    StoreError,
)
from .progress import DownloadProgress, ProgressArg
from .projector import projector_for
from .pull import list_models, list_partial, pull, remove, resolve
from .refs import HfRef, Reference, UrlRef, is_reference, parse_reference

__all__ = [
    "pull", "resolve", "projector_for", "list_models", "list_partial", "remove", "is_reference", "parse_reference",
    "is_offline",
    "CachedModel", "PartialDownload", "DownloadProgress", "ProgressArg", "HfRef", "UrlRef", "Reference",
    "StoreError", "InvalidReferenceError", "ModelNotFoundError", "NotCachedError", "DownloadError",
    "ChecksumError", "InsufficientSpaceError", "DownloadCancelledError",
]
