"""A cached model's multimodal projector: which one it is, and the command line taking it.

:func:`pull` fetches a Hugging Face repository's projector with the model (llama.cpp's ``-hf`` rule,
:func:`pyllama.store.refs.pick_mmproj`) and records it in the model's cache record;
:func:`projector_for` reads that record back.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from . import cache
from .errors import NotCachedError, StoreError
from .refs import HfRef, is_reference, parse_reference, split_parts

log = logging.getLogger("pyllama.store")


def projector_for(model: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The projector pulled with a cached model, or None.

    ``model`` is a reference (``hf:org/repo[:QUANT]``, ``hf:org/repo/file.gguf[@revision]``) or the path
    of a cached model file (what :func:`resolve` returns). None when the repository has no projector, the
    model was pulled with ``mmproj=False``, or it is not a Hugging Face model of the cache (a local file,
    a URL). A reference that is not in the cache raises :class:`NotCachedError` (pull it first)::

        model = pyllama.Model(ref, mmproj=pyllama.store.projector_for(pyllama.store.pull(ref)))
    """
    if is_reference(model):
        parsed = parse_reference(model)
        if not isinstance(parsed, HfRef):
            return None
        root = cache.store_root(cache_dir)
        files = cache.lookup(root, parsed)
        if files is None:
            raise NotCachedError(f"{model} is not in the model cache ({root}): pull it first "
                                 f"(pyllama pull {model})")
        first = files[0]
    else:
        first = Path(model)
        parts = split_parts(first.name)
        if parts:
            first = first.with_name(parts[0])  # the record of a split set is its first part's
    proj = cache.projector_of(first)
    if proj is None:
        name = cache.recorded_projector(first)
        if name is not None:
            log.warning("%s: its projector %s is no longer in the cache (pulling the model again fetches it)",
                        first.name, name)
    return proj


def cli_projector(model: object, mmproj: str | None, no_mmproj: bool = False,
                  logger: logging.Logger | None = None) -> str | None:
    """The projector a command loads: ``--mmproj``'s file when given; none with ``--no-mmproj``; else, for a
    model named by a Hugging Face reference (already resolved), the projector pulled with it, logged at INFO."""
    if mmproj is not None or no_mmproj or not is_reference(model):
        return mmproj
    try:
        proj = projector_for(model)
    except StoreError as exc:
        (logger or log).warning("no projector for %s: %s", model, exc)
        return None
    if proj is not None:
        (logger or log).info("multimodal projector %s, pulled with %s (--no-mmproj loads none)", proj, model)
    return str(proj) if proj is not None else None


class NoProjector(argparse.Action):
    """``--no-mmproj``: load no projector, neither the one ``--mmproj`` named before it nor the one pulled with
    an ``hf:`` model (a later ``--mmproj FILE`` still names one). Sets ``dest`` (False by default) and
    ``mmproj=None``."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", False)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)
        namespace.mmproj = None


__all__ = ["projector_for", "cli_projector", "NoProjector"]
