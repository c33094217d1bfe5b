"""`pyllama pull / ls / rm` and `pyllama run REF`, end to end as subprocesses against a local Hub-like server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hfserver import HFServer, fake_gguf, server, store_env  # noqa: F401 - fixtures


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def test_pull_ls_rm(server: HFServer, store_env: Path) -> None:
    server.add_repo("org/tiny", {"tiny-Q4_K_M.gguf": fake_gguf(300_000, seed=1),
                                 "tiny-Q8_0.gguf": fake_gguf(500_000, seed=2)})
    url = server.add_file("x/plain.gguf", fake_gguf(100_000, seed=3), sha256_file=True)

    out = _cli("pull", "hf:org/tiny:Q8_0")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.name == "tiny-Q8_0.gguf" and path.stat().st_size == 500_000 and path.is_relative_to(store_env)
    assert "pull hf:org/tiny:Q8_0" in out.stderr  # the progress bar's label, on stderr
    assert _cli("pull", "-q", url).returncode == 0

    listing = _cli("ls")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "REVISION", "SIZE", "FILES", "SOURCE"]
    (hf_line,) = [ln for ln in lines if "tiny-Q8_0.gguf" in ln]
    commit = path.parent.name
    assert hf_line.split() == ["hf:org/tiny/tiny-Q8_0.gguf", "main", f"({commit[:10]})", "488.3", "KiB", "1",
                               f"{server.url}/org/tiny"]
    rows = json.loads(_cli("ls", "--json").stdout)
    assert {r["size"] for r in rows if r["ref"] == url} == {100_000}
    assert all(r["verified"] for r in rows)

    gone = _cli("rm", "hf:org/tiny:Q8_0", url)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.count("removed ") == 2
    assert not path.exists()
    assert not [r for r in json.loads(_cli("ls", "--json").stdout) if r["ref"] != "starter"]
    again = _cli("rm", "hf:org/tiny:Q8_0")
    assert again.returncode == 1 and "is not in the model cache" in again.stderr

    missing = _cli("pull", "hf:org/tiny:Q5_K_M")
    assert missing.returncode == 1 and "available: Q4_K_M, Q8_0" in missing.stderr
    offline = subprocess.run([sys.executable, "-m", "pyllama", "pull", "hf:org/tiny:Q8_0"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYLLAMA_OFFLINE": "1"})
    assert offline.returncode == 1 and "offline" in offline.stderr


def test_run_accepts_a_reference(server: HFServer, store_env: Path, synth_model_path: Path) -> None:
    server.add_repo("org/synth", {"synth-F32.gguf": synth_model_path.read_bytes()})
    args = ["-p", "Hello world", "-n", "6", "--temp", "0", "-t", "1", "-c", "256"]
    by_ref = _cli("run", "hf:org/synth:F32", *args)
    assert by_ref.returncode == 0, by_ref.stderr
    by_path = _cli("run", str(synth_model_path), *args)
    assert by_path.returncode == 0, by_path.stderr
    assert by_ref.stdout == by_path.stdout and by_ref.stdout.strip()
