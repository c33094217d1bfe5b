"""The ggml devices and backends that loaded, and how the binary was built."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ._ffi import build_info, ffi, lib

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _str(ptr: Any) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def devices() -> list[Device]:
    """Every device of every backend that loaded, in ggml's order."""
    out = []
    free = ffi.new("size_t *")
    total = ffi.new("size_t *")
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        reg = lib.ggml_backend_dev_backend_reg(dev)
        out.append(
            Device(
                index=i,
                name=_str(lib.ggml_backend_dev_name(dev)),
                description=_str(lib.ggml_backend_dev_description(dev)),
                type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=_str(lib.ggml_backend_reg_name(reg)) if reg != ffi.NULL else "",
                memory_free=int(free[0]),
                memory_total=int(total[0]),
            )
        )
    return out


def backends() -> list[str]:
    """Names of the ggml backend registries that loaded."""
    return [_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))) for i in range(lib.ggml_backend_reg_count())]


def system_info() -> str:
    """llama.cpp's system line: the instruction sets and features each backend uses."""
    return _str(lib.llama_print_system_info())


def supports_gpu_offload() -> bool:
    return bool(lib.llama_supports_gpu_offload())


__all__ = ["Device", "devices", "backends", "system_info", "supports_gpu_offload", "build_info"]
