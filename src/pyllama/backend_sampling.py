"""Where a sampler chain may run inside the compute graph (llama_set_sampler): the measured policy.

``sampling="auto"`` runs a plain greedy chain in the graph only where that measured faster
(:func:`backend_sampling_pays`), and no chain runs there on a Vulkan driver known to corrupt memory
when chains are attached and detached (:func:`driver_blocks_backend_sampling`). The context asks
both about the devices its output layer runs on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: GPU backends on which choosing the greedy token inside the graph measured faster than on the host:
#: CUDA (bench/backend_sampling.c on an H200, a 262,144-token vocabulary: 1134 µs per token against
#: 1444 with argmax over the copied logits and 1564 with llama.cpp's host sampler; and 12 runs of its
#: attach/generate/detach cycles, what pyllama does per generation, all clean). On the CPU it is slower
#: (ggml-cpu's argmax runs on one thread, scalar). On Vulkan/lavapipe it measured even (the starter:
#: 165.4 ms per token against 168.5 with argmax and 165.8 with the host sampler, within the noise), so
#: "auto" leaves it off there; "backend" may be asked for where the driver is not known to break.
BACKEND_SAMPLING_FASTER = frozenset({"CUDA"})

#: VK_DRIVER_ID_MESA_LLVMPIPE: lavapipe, Mesa's Vulkan driver on the CPU.
LAVAPIPE_DRIVER_ID = 13
#: lavapipe before this Mesa release frees memory twice in its queue thread once sampler chains have been
#: attached and detached a few times (every llama_set_sampler rebuilds the scheduler's buffers): with Mesa
#: 22.3.6 (Debian 12) 2 to 3 of 6-8 runs of bench/backend_sampling.c 'cycles' crashed or hung, with no error
#: from the Khronos validation layer (core and synchronisation checks); with 25.0.7 (bookworm-backports) 20
#: runs of 8-16 cycles were clean. The release that fixed it lies between the two; 25.0 is the first seen clean.
LAVAPIPE_BACKEND_SAMPLING_FROM = (25, 0)
_MESA_VERSION = re.compile(r"\bMesa (\d+)\.(\d+)")


def driver_blocks_backend_sampling(driver_id: int | None, driver_info: str | None) -> str | None:
    """Why a Vulkan driver must not run sampler chains in the graph, or None."""
    if driver_id != LAVAPIPE_DRIVER_ID:
        return None
    m = _MESA_VERSION.search(driver_info or "")
    version = (int(m.group(1)), int(m.group(2))) if m else None
    if version is not None and version >= LAVAPIPE_BACKEND_SAMPLING_FROM:
        return None
    want = ".".join(map(str, LAVAPIPE_BACKEND_SAMPLING_FROM))
    return (f"lavapipe {driver_info or '(version unknown)'} corrupts memory when sampler chains are attached and "
            f"detached (fixed by Mesa {want}; on Debian 12: mesa-vulkan-drivers from bookworm-backports)")


def backend_sampling_pays(gpu_backends: Sequence[str], fully_offloaded: bool) -> bool:
    """Whether "auto" samples a greedy chain in the graph: every layer on GPUs, all of a backend where it
    measured faster."""
    return fully_offloaded and bool(gpu_backends) and set(gpu_backends) <= BACKEND_SAMPLING_FASTER


__all__ = ["BACKEND_SAMPLING_FASTER", "LAVAPIPE_DRIVER_ID", "LAVAPIPE_BACKEND_SAMPLING_FROM",
           "driver_blocks_backend_sampling", "backend_sampling_pays"]
