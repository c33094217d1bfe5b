"""The ggml devices and backends that loaded, and how the binary was built."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._ffi import LIB_DIR, build_info, ffi, lib

_DEVICE_TYPES = {
    lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    lib.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


@dataclass(frozen=True)
class Device:
    """One ggml device (the Python counterpart of node-llama-cpp's getLlama() detection)."""

    index: int
    name: str
    description: str
    type: str  # "cpu", "gpu", "igpu" or "accel"
    backend: str  # the backend registry that provides it ("CPU", "Vulkan", "CUDA", ...)
    memory_free: int  # bytes
    memory_total: int  # bytes
    endpoint: str | None = None  # an RPC device's server, "ip:port" (its memory is 0 while unreachable)
    driver: str | None = None  # a Vulkan device's driver and its version, e.g. "llvmpipe: Mesa 25.0.7 (LLVM 15.0.6)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VulkanDriver:
    """A Vulkan physical device and its driver as the Vulkan loader reports them (ggml names only the device)."""

    index: int  # in the loader's list (what GGML_VK_VISIBLE_DEVICES indexes)
    device_name: str  # what ggml-vulkan gives as the device's description
    api_version: str
    # ggml-vulkan aborts on an op whose input view starts off this alignment (bytes)
    min_storage_buffer_offset_alignment: int
    driver_id: int | None  # VkDriverId (13: Mesa's lavapipe); None for a Vulkan 1.0/1.1 device
    driver_name: str | None
    driver_info: str | None  # the driver's version text, e.g. "Mesa 25.0.7-2~bpo12+1 (LLVM 15.0.6)"

    @property
    def label(self) -> str:
        return f"{self.driver_name}: {self.driver_info}" if self.driver_name else f"Vulkan {self.api_version}"


@functools.lru_cache(maxsize=1)
def vulkan_drivers() -> tuple[VulkanDriver, ...]:
    """Every Vulkan device the loader lists, with its driver (empty where this build has no Vulkan
    backend or the machine no Vulkan loader). Queried once per process."""
    if "Vulkan" not in backends():
        return ()
    raw = lib.pyllama_vulkan_drivers()
    if raw == ffi.NULL:
        return ()
    try:
        rows = json.loads(ffi.string(raw).decode("utf-8", "replace"))
    finally:
        lib.pyllama_free_string(raw)
    return tuple(VulkanDriver(**row) for row in rows)


def drivers_of(device: Device) -> list[VulkanDriver]:
    """The Vulkan drivers that may back ``device`` (matched by name; none for other backends)."""
    return _drivers(device.backend, device.description)


def _drivers(backend: str, description: str) -> list[VulkanDriver]:
    if backend != "Vulkan":
        return []
    return [d for d in vulkan_drivers() if d.device_name == description]


def _str(ptr: Any) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def devices() -> list[Device]:
    """Every device of every backend that loaded, in ggml's order."""
    from .rpc import RpcError, device_endpoint, ensure_reachable

    out = []
    free = ffi.new("size_t *")
    total = ffi.new("size_t *")
    reachable: dict[str, bool] = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        endpoint = device_endpoint(i)
        if endpoint is not None and endpoint not in reachable:
            # ggml's memory query aborts the process on a server it cannot reach.
            try:
                ensure_reachable([endpoint])
                reachable[endpoint] = True
            except RpcError as exc:
                reachable[endpoint] = False
                logging.getLogger("pyllama").warning("%s", exc)
        free[0] = total[0] = 0
        if endpoint is None or reachable[endpoint]:
            lib.ggml_backend_dev_memory(dev, free, total)
        reg = lib.ggml_backend_dev_backend_reg(dev)
        backend = _str(lib.ggml_backend_reg_name(reg)) if reg != ffi.NULL else ""
        description = _str(lib.ggml_backend_dev_description(dev))
        drivers = [d.label for d in _drivers(backend, description)]
        out.append(
            Device(
                index=i,
                name=_str(lib.ggml_backend_dev_name(dev)),
                description=description,
                type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=backend,
                memory_free=int(free[0]),
                memory_total=int(total[0]),
                endpoint=endpoint,
                driver=" / ".join(dict.fromkeys(drivers)) or None,
            )
        )
    return out


@dataclass(frozen=True)
class UnavailableBackend:
    """An accelerator backend shipped in this build that gives no device here, and why."""

    backend: str  # "CUDA", "Vulkan", "Metal"
    library: str  # the backend module in pyllama/lib
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Accelerator backend modules -> the names their registries take.
_ACCELERATORS = {"ggml-cuda": ("CUDA", ("CUDA",)), "ggml-vulkan": ("Vulkan", ("Vulkan",)),
                 "ggml-metal": ("Metal", ("MTL", "Metal"))}


def unavailable_backends() -> list[UnavailableBackend]:
    """Accelerators this build ships that did not give a device (so the CPU runs instead), and why."""
    return list(_UNAVAILABLE)


def _dlopen_error(path: Path) -> str:
    import ctypes

    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        return str(exc)
    return ""


def _check_accelerators(lib_dir: Path) -> tuple[UnavailableBackend, ...]:
    """After the backends loaded: which shipped accelerator gives no device (the CPU takes over), and why;
    each is logged."""
    unavailable: list[UnavailableBackend] = []
    loaded = {_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))): lib.ggml_backend_reg_get(i)
              for i in range(lib.ggml_backend_reg_count())}
    for module in build_info().get("backend_libraries", []):
        if module not in _ACCELERATORS:
            continue
        name, reg_names = _ACCELERATORS[module]
        files = sorted(p for p in lib_dir.glob(f"*{module}.*") if p.suffix in (".so", ".dll", ".dylib"))
        reg = next((loaded[n] for n in reg_names if n in loaded), None)
        if reg is not None and lib.ggml_backend_reg_dev_count(reg) > 0:
            continue
        if not files:
            reason = f"{module} is missing from {lib_dir}"
        elif reg is not None:
            reason = f"the {name} backend loaded but found no device"
            if name == "Vulkan":
                reason += (" (no Vulkan driver, or only CPU-type devices such as lavapipe, which ggml hides "
                           "unless GGML_VK_VISIBLE_DEVICES selects them)")
        else:
            err = _dlopen_error(files[0])
            reason = (f"{files[0].name} could not be loaded: {err}" if err else
                      f"the {name} backend reports this system as unsupported (no driver or device)")
        unavailable.append(UnavailableBackend(name, files[0].name if files else module, reason))
        logging.getLogger("pyllama").warning("%s unavailable, running on the CPU: %s", name, reason)
    return tuple(unavailable)


def backends() -> list[str]:
    """Names of the ggml backend registries that loaded."""
    return [_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))) for i in range(lib.ggml_backend_reg_count())]


def system_info() -> str:
    """llama.cpp's system line: the instruction sets and features each backend uses."""
    return _str(lib.llama_print_system_info())


def supports_gpu_offload() -> bool:
    return bool(lib.llama_supports_gpu_offload())


# Once per process, when pyllama loads (its __init__ imports this module right after _ffi loaded the backends).
_UNAVAILABLE = _check_accelerators(LIB_DIR)


__all__ = ["Device", "VulkanDriver", "UnavailableBackend", "devices", "vulkan_drivers", "drivers_of", "backends",
           "unavailable_backends", "system_info", "supports_gpu_offload", "build_info"]
