"""A remote GGUF's header read with Range requests (a few hundred KiB of multi-MiB files, counted by the test's
Hub), llama.cpp's memory projection from that header alone equal to the whole file's, and the quantisation
that fits: with a budget that admits Q4_K_M but not Q8_0, ``pyllama pull hf:org/repo`` takes Q4_K_M,
``--quant`` still wins, ``pyllama inspect fit`` shows the table and ``pyllama inspect model`` the metadata.
A real HTTP server on loopback (tests/hfserver.py); synthetic models (tests/synth.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hfserver import HFServer, server, store_env  # noqa: F401 - fixtures
from pyllama.fit import memory_projection
from pyllama.gguf_check import header_facts
from pyllama.store.remote import choose_quant, fit_candidates, read_header, sparse_copy
from synth import write_llama_model

SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 1024}
FILES = {"synth-F32.gguf": "f32", "synth-Q8_0.gguf": "q8_0", "synth-Q4_K_M.gguf": "q4_0"}


@pytest.fixture(scope="module")
def quants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quants")
    return {name: write_llama_model(d / name, dtype=dtype, **SHAPE) for name, dtype in FILES.items()}  # type: ignore[arg-type]


@pytest.fixture
def repo(server: HFServer, store_env: Path, quants: dict[str, Path]) -> HFServer:
    server.add_repo("org/synth", {name: p.read_bytes() for name, p in quants.items()})
    return server


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=300)


def test_the_header_alone(repo: HFServer, quants: dict[str, Path], tmp_path: Path) -> None:
    real = quants["synth-Q8_0.gguf"]
    h = read_header(f"{repo.url}/org/synth/resolve/main/synth-Q8_0.gguf")
    assert h.size == real.stat().st_size
    served = repo.bytes_served["/org/synth/resolve/main/synth-Q8_0.gguf"]
    assert h.fetched == served <= 512 << 10 < real.stat().st_size  # the header, not the file
    facts = header_facts(real)
    assert facts is not None and h.meta == facts and h.data == real.read_bytes()[: facts["data_offset"]]
    assert h.meta["architecture"] == "llama" and h.meta["block_count"] == SHAPE["n_layer"]
    assert memory_projection(sparse_copy(h, tmp_path), n_gpu_layers=0, n_ctx=2048) == \
        memory_projection(real, n_gpu_layers=0, n_ctx=2048)
    repo.ignore_range = True  # a server that sends the whole file: reading stops after the header anyway
    again = read_header(f"{repo.url}/org/synth/resolve/main/synth-Q8_0.gguf", first=64 << 10)
    assert again.meta == h.meta and again.fetched < real.stat().st_size


def test_the_largest_quantisation_that_fits(repo: HFServer, quants: dict[str, Path]) -> None:
    everything = fit_candidates("hf:org/synth", n_ctx=512, budget=1 << 40, margin=0)
    assert [c.quant for c in everything] == ["F32", "Q8_0", "Q4_K_M"]  # largest first
    assert all(c.fits for c in everything) and choose_quant(everything) is everything[0]
    assert all(c.fetched <= 512 << 10 < c.size for c in everything)
    need = {c.quant: c.host + c.gpu for c in everything}
    assert need["Q4_K_M"] < need["Q8_0"] < need["F32"]
    budget = (need["Q4_K_M"] + need["Q8_0"]) // 2
    cands = fit_candidates("hf:org/synth", n_ctx=512, budget=budget, margin=0)
    chosen = choose_quant(cands)
    assert chosen is not None and chosen.quant == "Q4_K_M"
    assert [c.fits for c in cands] == [False, False, True] and "budget" in cands[0].reason
    assert choose_quant(fit_candidates("hf:org/synth", n_ctx=512, budget=need["Q4_K_M"] // 2, margin=0)) is None


def test_the_command_line(repo: HFServer, quants: dict[str, Path], store_env: Path) -> None:
    need = {c.quant: c.host + c.gpu for c in fit_candidates("hf:org/synth", n_ctx=512, budget=1 << 40, margin=0)}
    budget = str((need["Q4_K_M"] + need["Q8_0"]) // 2)  # a budget is what may be used: no margin taken from it
    table = _cli("inspect", "fit", "hf:org/synth", "-c", "512", "--memory-budget", budget, "--json")
    assert table.returncode == 0, table.stderr
    data = json.loads(table.stdout)
    assert data["chosen"] == "Q4_K_M" and [c["quant"] for c in data["candidates"]] == ["F32", "Q8_0", "Q4_K_M"]
    per_device = _cli("inspect", "fit", "hf:org/synth", "-c", "512", "--memory-budget", f"host={budget}", "--json")
    assert json.loads(per_device.stdout)["chosen"] == "Q4_K_M", per_device.stderr
    unknown = _cli("inspect", "fit", "hf:org/synth", "--memory-budget", "host=1G,host=2G")
    assert unknown.returncode == 2 and "named twice" in unknown.stderr
    pulled = _cli("pull", "hf:org/synth", "-c", "512", "--memory-budget", budget)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().endswith("synth-Q4_K_M.gguf") and "-> Q4_K_M" in pulled.stderr.replace("->Q", "-> Q")
    assert not list(store_env.rglob("synth-Q8_0.gguf"))
    forced = _cli("pull", "-q", "hf:org/synth", "--quant", "Q8_0", "--memory-budget", budget)
    assert forced.returncode == 0 and forced.stdout.strip().endswith("synth-Q8_0.gguf"), forced.stderr
    none = _cli("pull", "-q", "hf:org/synth", "--memory-budget", "1K")
    assert none.returncode == 1 and "no quantisation of org/synth fits" in none.stderr
    meta = _cli("inspect", "model", "hf:org/synth:Q8_0", "--json")
    assert meta.returncode == 0, meta.stderr
    facts = json.loads(meta.stdout)
    assert facts["architecture"] == "llama" and facts["size"] == quants["synth-Q8_0.gguf"].stat().st_size
    assert facts["header_bytes_fetched"] < facts["size"]
    missing = _cli("inspect", "model", "hf:org/synth:Q5_K_M")
    assert missing.returncode == 1 and "available" in missing.stderr
