"""The machine a benchmark ran on: devices, backend versions, CPU, memory, OS, Python, build.

Collected once per run and stored in every record (``environment``), so a
results file is self-describing when files from many machines are merged.
Everything here is best effort: a probe that fails leaves its key out.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .params import cpu_get_num_math


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def cpu_model() -> str:
    """The processor's marketing name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out.strip()
    return platform.processor() or platform.machine()


def ram_total() -> int | None:
    """Physical memory in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        if out and out.strip().isdigit():
            return int(out.strip())
    return None


def _nvidia() -> dict[str, Any] | None:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    if not out:
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2],
                         "compute_capability": parts[3] if len(parts) > 3 else None})
    info: dict[str, Any] = {"gpus": gpus}
    if gpus:
        info["driver"] = gpus[0]["driver"]
    head = _run(["nvidia-smi"]) or ""
    m = re.search(r"CUDA Version:\s*([\d.]+)", head)
    if m:
        info["cuda_driver_api"] = m.group(1)
    nvcc = _run(["nvcc", "--version"]) or ""
    m = re.search(r"release ([\d.]+)", nvcc)
    if m:
        info["cuda_toolkit"] = m.group(1)
    return info


def _vulkan() -> dict[str, Any] | None:
    out = _run(["vulkaninfo", "--summary"])
    if not out:
        return None
    info: dict[str, Any] = {}
    m = re.search(r"Vulkan Instance Version:\s*([\d.]+)", out)
    if m:
        info["instance_version"] = m.group(1)
    devs = []
    for block in re.split(r"\nGPU\d+:", out)[1:]:
        d = {}
        for key in ("deviceName", "apiVersion", "driverVersion", "driverName", "driverInfo", "deviceType"):
            mm = re.search(rf"{key}\s*=\s*(.+)", block)
            if mm:
                d[key] = mm.group(1).strip()
        devs.append(d)
    info["devices"] = devs
    return info


def _rocm() -> dict[str, Any] | None:
    out = _run(["rocm-smi", "--showdriverversion"])
    if not out:
        return None
    m = re.search(r"Driver version:\s*(\S+)", out)
    return {"driver": m.group(1)} if m else {"raw": out.strip()[-200:]}


def backend_versions(backends: list[str]) -> dict[str, Any]:
    """Runtime and driver versions of the accelerator backends that loaded."""
    out: dict[str, Any] = {}
    names = {b.lower() for b in backends}
    if "cuda" in names:
        v = _nvidia()
        if v:
            out["CUDA"] = v
    if "vulkan" in names:
        v = _vulkan()
        if v:
            out["Vulkan"] = v
    if "rocm" in names or "hip" in names:
        v = _rocm()
        if v:
            out["ROCm"] = v
    if "metal" in names or "mtl" in names:
        out["Metal"] = {"macos": platform.mac_ver()[0]}
    return out


def default_label() -> str:
    """A short machine label: the host name without its domain."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname().split(".")[0]) or "machine"


def collect(label: str | None = None) -> dict[str, Any]:
    """The environment block stored in every record."""
    import pyllama

    devs = pyllama.devices()
    backends = pyllama.backends()
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    env: dict[str, Any] = {
        "machine": label or default_label(),
        "devices": [d.as_dict() for d in devs],
        "backends": backends,
        "backend_versions": backend_versions(backends),
        "cpu_model": cpu_model(),
        "cpu_cores_physical": cpu_get_num_math(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_total": ram_total(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyllama_version": getattr(pyllama, "__version__", None),
        "build": pyllama.build_info(),
        "system_info": pyllama.system_info(),
    }
    return env


__all__ = ["collect", "cpu_model", "ram_total", "backend_versions", "default_label"]
