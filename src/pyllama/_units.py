"""Sizes as people write them on a command line (``32M``, ``1.5G``, ``4096``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fit import MemoryBudget


def byte_size(text: str) -> int:
    """``text`` in bytes (binary units: K, M, G, T; a trailing B or iB is allowed); an argparse type."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        n = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1048576, 512K, 32M, 8G)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the size must be positive, not {text!r}")
    return n


def memory_budget(text: str) -> MemoryBudget:
    """``8G``, ``host=16G,CUDA0=20G`` or both as a :class:`~pyllama.fit.MemoryBudget`; an argparse type."""
    from .fit import MemoryBudget  # the native library loads only when a budget is given

    return MemoryBudget.parse(text)


__all__ = ["byte_size", "memory_budget"]
