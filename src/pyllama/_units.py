"""Sizes as people write them on a command line (``32M``, ``1.5G``, ``4096``)."""

from __future__ import annotations

import argparse


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


__all__ = ["byte_size"]
