"""GPU-layer fitting for ``n_gpu_layers="auto"``.

The vendored llama.h offers no parameter-fitting entry point, so the estimate
is ours: offload as many layers as fit the largest accelerator's free memory,
keeping a margin for the KV cache and compute buffers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .devices import devices

logger = logging.getLogger("pyllama")

MARGIN_FRACTION = 0.15  # of free memory, kept for KV cache and compute buffers
MARGIN_BYTES = 512 << 20


def _n_layers(path: Path) -> int:
    from ._ffi import ffi, lib

    params = lib.llama_model_default_params()
    params.vocab_only = True
    ptr = lib.llama_model_load_from_file(str(path).encode(), params)
    if ptr == ffi.NULL:
        return 0
    try:
        return int(lib.llama_model_n_layer(ptr))
    finally:
        lib.llama_model_free(ptr)


def auto_gpu_layers(path: Path) -> int:
    """How many layers to offload: 0 without an accelerator, -1 (all) when the file fits."""
    accel = [d for d in devices() if d.type in ("gpu", "igpu", "accel")]
    if not accel:
        return 0
    best = max(accel, key=lambda d: d.memory_free)
    budget = best.memory_free * (1 - MARGIN_FRACTION) - MARGIN_BYTES
    size = path.stat().st_size
    if size <= budget:
        logger.info("n_gpu_layers=auto: all layers fit on %s (%d MiB free)", best.name, best.memory_free >> 20)
        return -1
    n_layer = _n_layers(path)
    if n_layer <= 0 or budget <= 0:
        logger.info("n_gpu_layers=auto: nothing fits on %s; running on the CPU", best.name)
        return 0
    per_layer = size / (n_layer + 1)  # +1: embeddings and output head
    n = max(0, min(n_layer, int(budget // per_layer)))
    logger.info("n_gpu_layers=auto: offloading %d of %d layers to %s", n, n_layer, best.name)
    return n
