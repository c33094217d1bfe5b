"""bench/render.py: results from several machines merged into one table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import bench_scripts

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def render() -> ModuleType:
    return bench_scripts.load("render")


def _rec(binding: str, n_prompt: int, n_gen: int, ts: list[float], *, machine: str, gpu: str = "",
         backends: str = "CPU", threads: int = 2, depth: int = 0, time: str = "2025-01-01T00:00:00Z",
         ratio: tuple[float, float, float] | None = None) -> dict[str, Any]:
    n = n_prompt + n_gen
    ns = [int(1e9 * n / t) for t in ts]
    r: dict[str, Any] = {
        "build_commit": "0c1e57098", "build_number": 0, "cpu_info": "Test CPU 9000", "gpu_info": gpu,
        "backends": backends, "model_filename": "/models/gemma-3-270m-it-Q4_K_M.gguf",
        "model_type": "gemma3 270M Q4_K - Medium", "model_size": 253_000_000, "model_n_params": 268_000_000,
        "n_batch": 2048, "n_ubatch": 512, "n_threads": threads, "type_k": "f16", "type_v": "f16",
        "n_gpu_layers": -1 if gpu else 0, "flash_attn": -1, "n_prompt": n_prompt, "n_gen": n_gen,
        "n_depth": depth, "test_time": time, "avg_ns": sum(ns) // len(ns), "stddev_ns": 0,
        "avg_ts": sum(ts) / len(ts), "stddev_ts": 1.5, "samples_ns": ns, "samples_ts": ts,
        "binding": binding, "machine": machine,
    }
    if ratio:
        r.update(native_ratio=ratio[0], native_ratio_min=ratio[1], native_ratio_max=ratio[2])
    return r


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    cpu = [
        _rec("pyllama", 512, 0, [990.0, 1010.0], machine="laptop", ratio=(0.98, 0.96, 1.01)),
        _rec("llama.cpp", 512, 0, [1000.0, 1020.0], machine="laptop"),
        _rec("pyllama", 0, 128, [95.0, 97.0], machine="laptop", ratio=(0.95, 0.93, 0.97)),
        _rec("llama.cpp", 0, 128, [100.0, 102.0], machine="laptop"),
        # an older repeat of the same test is superseded by the newer one above
        _rec("pyllama", 512, 0, [10.0], machine="laptop", time="2024-01-01T00:00:00Z"),
        _rec("pyllama", 512, 128, [300.0], machine="laptop", depth=4096),
    ]
    gpu = [
        _rec("pyllama", 512, 0, [25000.0], machine="h100", gpu="NVIDIA H100 80GB HBM3", backends="CUDA"),
        _rec("pyllama", 0, 128, [400.0], machine="h100", gpu="NVIDIA H100 80GB HBM3", backends="CUDA"),
    ]
    (d / "laptop.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cpu))
    (d / "h100.jsonl").write_text("\n".join(json.dumps(r) for r in gpu) + "\n\n")
    return d


def test_table_and_plots(render: ModuleType, results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    md = render.render(results, out)
    assert (out / "README.md").read_text() == md
    assert (out / "throughput.png").stat().st_size > 1000
    assert (out / "ratio.png").stat().st_size > 1000
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = md.split("## Prompt processing and generation")[1].split("## Every test")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "Machine" not in line]
    assert len(rows) == 2
    h100 = next(r for r in rows if r.startswith("| h100 "))
    laptop = next(r for r in rows if r.startswith("| laptop "))
    cells = [c.strip() for c in laptop.strip("|").split("|")]
    assert cells[:6] == ["laptop", "Test CPU 9000", "CPU", "gemma3 270M Q4_K - Medium (gemma-3-270m-it-Q4_K_M.gguf)",
                         "2", "—"]
    assert cells[6:9] == ["1000.00 ± 1.50", "1010.00 ± 1.50", "0.980 (0.960–1.010)"]
    assert cells[9:12] == ["96.00 ± 1.50", "101.00 ± 1.50", "0.950 (0.930–0.970)"]
    hc = [c.strip() for c in h100.strip("|").split("|")]
    assert hc[1:3] == ["NVIDIA H100 80GB HBM3", "CUDA"] and hc[4] == "—"
    assert hc[6:9] == ["25000.00 ± 1.50", "—", "—"]

    detail = md.split("## Every test")[1]
    assert "| pp512+tg128 @ d4096 |" in detail
    assert "![ratio](ratio.png)" in md and "![throughput](throughput.png)" in md


def test_sampled_generation_rows_and_plot(render: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    recs = []
    for mode, py, c in (("host", 76.0, 77.0), ("argmax", 80.0, 80.5), ("backend", 72.0, 71.0)):
        a = _rec("pyllama", 0, 128, [py], machine="vm", ratio=(py / c, py / c - 0.01, py / c + 0.01))
        b = _rec("llama.cpp C loop", 0, 128, [c], machine="vm")
        a["sampling"] = b["sampling"] = mode
        recs += [a, b]
    recs.append(_rec("pyllama", 0, 128, [81.0], machine="vm"))  # llama-bench's tg128, no sampling
    (d / "vm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    md = render.render(d, out)
    detail = md.split("## Every test")[1]
    for mode, py, c in (("host", "76.00", "77.00"), ("argmax", "80.00", "80.50"), ("backend", "72.00", "71.00")):
        line = next(x for x in detail.splitlines() if f"| tg128 {mode} |" in x)
        assert f"| {py} ± 1.50 | {c} ± 1.50 |" in line, line
    assert "| tg128 | 81.00 ± 1.50 | — |" in detail  # the plain tg128 is its own row
    assert (out / "sampling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![sampling](sampling.png)" in md


def test_plain_llama_bench_jsonl_is_accepted(render: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    rec = _rec("x", 512, 0, [500.0], machine="x")
    del rec["binding"], rec["machine"]
    (d / "desktop.jsonl").write_text(json.dumps(rec) + "\n")
    md = render.render(d, plots=False)
    assert "| desktop | Test CPU 9000 | CPU |" in md
    assert "500.00 ± 1.50" in md  # a native record: shown in the native column


def test_readme_block_is_replaced(render: ModuleType, results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{render.BEGIN}\nold\n{render.END}\n\nafter\n")
    render.main(["--results", str(results), "--out", str(tmp_path / "o"), "--no-plots", "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| laptop |" in text and text.endswith("after\n")
