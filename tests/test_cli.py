"""The pyllama command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=300)


def test_inspect_devices_json_is_clean() -> None:
    out = _run("inspect", "devices", "--json")
    assert out.returncode == 0, out.stderr
    devices = json.loads(out.stdout)  # nothing but JSON on stdout
    assert any(d["type"] == "cpu" for d in devices)
    assert out.stderr == ""  # llama.cpp's logs never reach stderr unless asked


def test_inspect_build_and_gpu() -> None:
    build = json.loads(_run("inspect", "build", "--json").stdout)
    assert build["build"]["llama_commit"].startswith("0c1e5709")
    gpu = json.loads(_run("inspect", "gpu", "--json").stdout)
    assert "accelerators" in gpu and "devices" in gpu
    assert "llama.cpp 0c1e57098" in _run("inspect", "build").stdout


def test_run_greedy_matches_api(synth_model_path: Path) -> None:
    import pyllama

    out = _run("run", str(synth_model_path), "-p", "Hello world", "-n", "8", "--temp", "0", "-t", "1")
    assert out.returncode == 0, out.stderr
    with pyllama.Model(synth_model_path) as m, m.context(n_ctx=4096 if m.n_ctx_train >= 4096 else 512) as ctx:
        expected = pyllama.generate_text(ctx, "Hello world", max_tokens=8, parse_special=False)
    assert out.stdout == expected + "\n"


def test_run_bad_model_is_a_clear_error(tmp_path: Path) -> None:
    out = _run("run", str(tmp_path / "missing.gguf"), "-p", "x")
    assert out.returncode != 0 and "not found" in out.stderr
