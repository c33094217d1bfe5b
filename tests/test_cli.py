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


def test_run_speculative_matches_plain(synth_model_path: Path, tmp_path: Path) -> None:
    import synth

    args = ["run", str(synth_model_path), "-p", "the cat and the dog and the cat", "-n", "60", "--temp", "0",
            "-t", "1", "-c", "512"]
    plain = _run(*args)
    draft_model = synth.write_llama_model(tmp_path / "draft.gguf", dtype="q8_0")
    for draft in ("ngram", str(draft_model)):
        out = _run(*args, "--draft", draft, "--draft-max", "6", "-v")
        assert out.returncode == 0, out.stderr
        assert out.stdout == plain.stdout
        assert "drafts:" in out.stderr
    bad = _run(*args, "--draft", "lookahead")
    assert bad.returncode != 0 and "--draft" in bad.stderr


def test_run_bad_model_is_a_clear_error(tmp_path: Path) -> None:
    out = _run("run", str(tmp_path / "missing.gguf"), "-p", "x")
    assert out.returncode != 0 and "not found" in out.stderr


def test_inspect_fit(synth_model_path: Path, tmp_path: Path) -> None:
    import pyllama

    out = _run("inspect", "fit", str(synth_model_path), "--json", "-c", "256")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    data = json.loads(out.stdout)
    expected = pyllama.fit_params(synth_model_path)
    assert data["fit"]["status"] == expected.status
    assert data["fit"]["n_gpu_layers"] == expected.n_gpu_layers
    host = data["memory"][-1]
    assert host["device"] == "host"
    assert host == pyllama.memory_projection(synth_model_path, n_ctx=256,
                                             n_gpu_layers=expected.n_gpu_layers)[-1].__dict__ | {"free": host["free"]}
    text = _run("inspect", "fit", str(synth_model_path))
    assert text.returncode == 0 and "projected memory" in text.stdout
    missing = _run("inspect", "fit", str(tmp_path / "missing.gguf"))
    assert missing.returncode == 1
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr
