"""Fitting a model to the machine's device memory: GPU layers, tensor split, context size.

``Model(path)`` (``n_gpu_layers="auto"``) asks llama.cpp's own parameter
fitting (``common/fit.cpp`` of the vendored tree, the code behind
``llama-server --fit``) how much to offload: it loads the model without
allocating, measures what weights, KV cache and compute buffers would take on
each device, and lowers the context size (down to ``min_ctx``), then the
number of offloaded layers and the split across devices, until every device
keeps ``margin_mib`` free. For mixture-of-experts models it may keep expert
weights in host memory instead (``Fit.overrides``).

Without an accelerator nothing is fitted (the model runs on the CPU). Where
llama.cpp's fit fails, pyllama falls back to a size estimate and says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._ffi import ffi, lib
from .context_params import set_memory_params
from .devices import devices

logger = logging.getLogger("pyllama")

DEFAULT_MARGIN_MIB = 1024  # llama.cpp's default --fit-target
DEFAULT_MIN_CTX = 4096  # llama.cpp's default --fit-ctx
_ACCEL_TYPES = ("gpu", "igpu", "accel")
_STATUS = {0: "fitted", 1: "failed", 2: "error"}
# common_fit_params swaps llama.cpp's global logger while it runs: one at a time.
_lock = threading.Lock()


@dataclass(frozen=True)
class Fit:
    """What parameter fitting chose for one model on this machine.

    ``status``: "fitted" (parameters chosen, or nothing needed changing),
    "failed" (llama.cpp could not meet the margin; a fallback was used),
    "error" (llama.cpp could not measure, e.g. an unreadable file; fallback used)
    or "skipped" (no accelerator, or the caller fixed ``n_gpu_layers``).
    """

    status: Literal["fitted", "failed", "error", "skipped"]
    n_gpu_layers: int  # as passed to llama.cpp: -1 = all
    n_ctx: int  # the context size the fit allows; 0 = the model's training context
    tensor_split: tuple[float, ...]  # per device; empty = llama.cpp's default split
    overrides: tuple[tuple[str, str], ...]  # (tensor-name regex, buffer type) kept off the GPU
    margin_mib: int
    seconds: float
    reason: str = ""


@dataclass(frozen=True)
class DeviceMemory:
    """Projected memory use of a model and context on one device (or the host)."""

    device: str  # device name; "host" for system memory
    total: int  # bytes
    free: int
    model: int
    context: int  # KV cache and other per-context state
    compute: int  # compute buffers


def available_host_memory() -> int:
    """Bytes of RAM the system could give now (Linux's MemAvailable: free memory plus caches it can drop)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def has_accelerator() -> bool:
    """Whether any loaded backend offers a GPU-like device to offload to."""
    return any(d.type in _ACCEL_TYPES for d in devices())


def _margins(margin_mib: int) -> Any:
    if margin_mib < 0:
        raise ValueError(f"margin_mib must be >= 0, not {margin_mib}")
    n = int(lib.llama_max_devices())
    return ffi.new("size_t[]", [margin_mib << 20] * n)


def _log_level() -> int:
    # llama.cpp's logs below ERROR during the fit's throw-away model loads go to
    # DEBUG (as llama-bench does), so a warning the real load repeats is not
    # logged three times; the fit's own account stays at INFO.
    return int(lib.GGML_LOG_LEVEL_ERROR)


def _context_params(*, n_ctx: int = 0, **knobs: Any) -> Any:
    """A ``llama_context_params *`` with the Context knobs that change memory use (n_ctx 0: the fit's choice)."""
    c = ffi.new("struct llama_context_params *", lib.llama_context_default_params())
    set_memory_params(c, n_ctx=n_ctx, **knobs)
    return c


def fit_model_params(path: Path, params: Any, keep: list[Any], *, margin_mib: int = DEFAULT_MARGIN_MIB,
                     min_ctx: int = DEFAULT_MIN_CTX, context: Mapping[str, Any] | None = None) -> Fit:
    """Fit ``params`` (a ``llama_model_params`` cdata) in place; buffers it points to go into ``keep``.

    Only fields still at llama.cpp's defaults are changed (n_gpu_layers,
    tensor_split, tensor_buft_overrides), as llama.cpp's fit promises.
    ``context``: the Context knobs to fit for (see :func:`memory_projection`);
    without ``n_ctx`` the fit lowers the context before it lowers the layers.
    """
    if min_ctx < 0:
        raise ValueError(f"min_ctx must be >= 0, not {min_ctx}")
    margins = _margins(margin_mib)
    cparams_copy = _context_params(**(context or {}))
    split = ffi.new("float[]", int(lib.llama_max_devices()))
    overrides = ffi.new("struct llama_model_tensor_buft_override[]", int(lib.llama_max_tensor_buft_overrides()))
    mparams = ffi.new("struct llama_model_params *", params)
    t0 = time.perf_counter()
    with _lock:
        rc = lib.pyllama_fit_params(os.fsencode(path), mparams, cparams_copy, split, overrides, margins,
                                    min_ctx, _log_level())
    seconds = time.perf_counter() - t0
    status = _STATUS.get(int(rc), "error")
    if status != "fitted":
        return Fit(status, int(params.n_gpu_layers), 0, (), (), margin_mib, seconds,  # type: ignore[arg-type]
                   "llama.cpp's fit could not meet the margin" if status == "failed"
                   else "llama.cpp's fit could not measure the model (see the 'pyllama.llama' log)")
    params.n_gpu_layers = mparams.n_gpu_layers
    params.tensor_split = mparams.tensor_split
    params.tensor_buft_overrides = mparams.tensor_buft_overrides
    keep.extend((split, overrides))
    n_dev = int(lib.llama_max_devices())
    split_t = tuple(float(split[i]) for i in range(n_dev)) if mparams.tensor_split == split else ()
    while split_t and split_t[-1] == 0.0:
        split_t = split_t[:-1]
    ovr = []
    if mparams.tensor_buft_overrides == overrides:
        for i in range(int(lib.llama_max_tensor_buft_overrides())):
            o = overrides[i]
            if o.pattern == ffi.NULL:
                break
            name = lib.ggml_backend_buft_name(o.buft) if o.buft != ffi.NULL else ffi.NULL
            ovr.append((ffi.string(o.pattern).decode(), ffi.string(name).decode() if name != ffi.NULL else ""))
    return Fit("fitted", int(params.n_gpu_layers), int(cparams_copy.n_ctx), split_t, tuple(ovr), margin_mib, seconds)


def fit_params(path: str | os.PathLike[str], *, margin_mib: int = DEFAULT_MARGIN_MIB, min_ctx: int = DEFAULT_MIN_CTX,
               context: Mapping[str, Any] | None = None) -> Fit:
    """What ``Model(path)`` would offload on this machine, without loading the weights."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    params = lib.llama_model_default_params()
    if not has_accelerator():
        return Fit("skipped", 0, 0, (), (), margin_mib, 0.0, "no accelerator device")
    return fit_model_params(p, params, [], margin_mib=margin_mib, min_ctx=min_ctx, context=context)


def memory_projection(path: str | os.PathLike[str], *, n_gpu_layers: int = -1, n_ctx: int = 4096,
                      **context: Any) -> list[DeviceMemory]:
    """Projected memory use per device, then the host, for these settings (nothing is allocated).

    ``context``: the :class:`~pyllama.Context` knobs that change memory use:
    ``n_batch``, ``n_ubatch``, ``n_seq_max``, ``flash_attn``, ``type_k``,
    ``type_v``, ``kv_unified``, ``offload_kqv``, ``swa_full``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    if n_ctx == 0:  # 0 would mean "the training context" to llama.cpp: say a size
        raise ValueError("n_ctx must be >= 1 for a projection")
    mparams = ffi.new("struct llama_model_params *", lib.llama_model_default_params())
    mparams.n_gpu_layers = n_gpu_layers
    cparams = _context_params(n_ctx=n_ctx, **context)
    n_rows = int(lib.llama_max_devices()) + 1
    out = ffi.new("int64_t[]", 5 * n_rows)
    devs = ffi.new("ggml_backend_dev_t[]", n_rows)
    with _lock:
        n = lib.pyllama_fit_memory(os.fsencode(p), mparams, cparams, out, devs, n_rows, _log_level())
    if n < 0:
        from .errors import ModelLoadError

        raise ModelLoadError(f"llama.cpp could not measure {p} (see the 'pyllama.llama' log)")
    rows = []
    for i in range(n):
        name = ffi.string(lib.ggml_backend_dev_name(devs[i])).decode() if devs[i] != ffi.NULL else "host"
        total, free, weights, kv, compute = (int(out[5 * i + k]) for k in range(5))
        rows.append(DeviceMemory(name, total, free, weights, kv, compute))
    return rows


def estimate_gpu_layers(path: Path) -> int:
    """pyllama's fallback when llama.cpp's fit fails: file size against the largest accelerator's free memory."""
    accel = [d for d in devices() if d.type in _ACCEL_TYPES]
    if not accel:
        return 0
    best = max(accel, key=lambda d: d.memory_free)
    budget = best.memory_free * 0.85 - (512 << 20)
    size = path.stat().st_size
    if size <= budget:
        return -1
    n_layer = _n_layers(path)
    if n_layer <= 0 or budget <= 0:
        return 0
    return max(0, min(n_layer, int(budget // (size / (n_layer + 1)))))


def _n_layers(path: Path) -> int:
    params = lib.llama_model_default_params()
    params.vocab_only = True
    ptr = lib.llama_model_load_from_file(os.fsencode(path), params)
    if ptr == ffi.NULL:
        return 0
    try:
        return int(lib.llama_model_n_layer(ptr))
    finally:
        lib.llama_model_free(ptr)


HOST = "host"  # the name memory_projection gives system memory


def model_need(path: str | os.PathLike[str], *, n_ctx: int, file_size: int | None = None,
               **context: Any) -> dict[str, int]:
    """Bytes a model needs loaded, per device (``"host"`` for RAM), by llama.cpp's projection: every layer
    on the accelerators when there are some, else on the CPU, where the weights are the mapped file
    (``file_size``: the file's size when ``path`` is a stand-in such as a header-only copy)."""
    gpu = has_accelerator()
    rows = memory_projection(path, n_gpu_layers=-1 if gpu else 0, n_ctx=max(1, n_ctx), **context)
    need: dict[str, int] = {}
    for r in rows:
        weights = r.model if gpu or r.device != HOST else (file_size if file_size is not None else
                                                            Path(path).stat().st_size)
        need[r.device] = need.get(r.device, 0) + weights + r.context + r.compute
    return need


def free_memory(device: str) -> int:
    """Bytes free now on ``device`` (a ggml device name such as ``CUDA0``, or ``"host"``: MemAvailable)."""
    if device == HOST:
        return available_host_memory()
    return next((d.memory_free for d in devices() if d.name == device), 0)


@dataclass(frozen=True)
class MemoryBudget:
    """The memory models may take: ``total`` bytes across the host and every device, and/or a budget per
    device (``"host"``, ``"CUDA0"``, ...). A device without one is held to its free memory now, less a
    margin — unless ``total`` is given, which then bounds it. Written ``8G``, ``host=16G,CUDA0=20G`` or
    ``24G,CUDA1=6G`` on the command line (:meth:`parse`)."""

    total: int | None = None
    devices: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MemoryBudget:
        """``SIZE`` and/or ``DEVICE=SIZE`` entries, comma-separated; an argparse type."""
        import argparse

        from ._units import byte_size

        total: int | None = None
        per: dict[str, int] = {}
        for entry in text.split(","):
            name, sep, size = entry.strip().rpartition("=")
            if sep:
                name = name.strip()
                if not name or name in per:
                    raise argparse.ArgumentTypeError(f"{'a device named twice' if name else 'no device name'} "
                                                     f"in {text!r} (e.g. host=16G,CUDA0=20G)")
                per[name] = byte_size(size)
            elif total is not None:
                raise argparse.ArgumentTypeError(f"two totals in {text!r}: one SIZE, then DEVICE=SIZE entries")
            else:
                total = byte_size(size)
        return cls(total, tuple(per.items()))

    @classmethod
    def of(cls, budget: MemoryBudget | int | None) -> MemoryBudget:
        """``budget`` as a MemoryBudget (a number: a total; None: each device's free memory)."""
        return budget if isinstance(budget, MemoryBudget) else cls(budget)

    def check_devices(self) -> None:
        """Raise ValueError naming a device budgeted that this machine does not have."""
        known = [HOST, *(d.name for d in devices() if d.type != "cpu")]  # the CPU's memory is the host's
        unknown = [name for name, _ in self.devices if name not in known]
        if unknown:
            raise ValueError(f"no device named {', '.join(unknown)} here; the devices are {', '.join(known)}")

    def shortfall(self, need: Mapping[str, int], held: Mapping[str, int] | None = None, *, margin: int,
                  free: bool = True) -> str | None:
        """Why ``need`` (bytes per device) does not fit beside ``held`` (what the models already loaded
        take, per device), or None when it fits. A budget is what the caller allows, held counted against
        it; free memory already excludes what is loaded, and ``margin`` stays free. ``free=False`` checks
        the budgets alone (whether the model could ever fit)."""
        held = held or {}
        per = dict(self.devices)
        for device, n in need.items():
            if n <= 0:
                continue
            cap = per.get(device)
            if cap is not None:
                have = held.get(device, 0)
                if have + n > cap:
                    return f"{device}: needs {_gib(n)}{_beside(have)}; its budget is {_gib(cap)}"
            elif free and self.total is None:
                avail = free_memory(device)
                if n + margin > avail:
                    return f"{device}: needs {_gib(n)} and {_gib(margin)} to spare; {_gib(avail)} free"
        if self.total is not None:
            n, have = sum(need.values()), sum(held.values())
            if have + n > self.total:
                return f"needs {_gib(n)}{_beside(have)}; the budget is {_gib(self.total)}"
        return None

    def __str__(self) -> str:
        parts = [] if self.total is None else [_gib(self.total)]
        return ", ".join(parts + [f"{name} {_gib(n)}" for name, n in self.devices]) or "free memory"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 1 << 27 else f"{n / 2**20:.1f} MiB"


def _beside(held: int) -> str:
    return f" beside {_gib(held)} loaded" if held else ""


__all__ = ["Fit", "DeviceMemory", "MemoryBudget", "fit_params", "fit_model_params", "memory_projection",
           "model_need", "free_memory", "available_host_memory", "has_accelerator", "estimate_gpu_layers",
           "DEFAULT_MARGIN_MIB", "DEFAULT_MIN_CTX", "HOST"]
