"""pyllama bench's JSON against the native llama-bench's, key by key, on the same tiny model.

The native llama-bench is built from the vendored tree by bench/native.py (cached
in build/native/, so only the first run compiles). The comparison:

* the same keys, except pyllama's own keys, which must be exactly the documented
  ones (``PYLLAMA_FIELDS``);
* the same JSON type for every key (and for the elements of the sample arrays);
* equal values for every key that describes the configuration, the build, the
  machine or the model (everything but the timings).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bench_scripts

from pyllama.benchmark import main
from pyllama.benchmark.record import LLAMA_BENCH_FIELDS, NATIVE_FIELDS, PYLLAMA_FIELDS, SAMPLE_FIELDS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(1800)  # the first native comparison builds llama-bench (bench/native.py)
ARGS = ["-p", "8", "-n", "4", "-r", "1", "-o", "json"]
TIMING_KEYS = {"test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts"}


def _native_bench() -> Path:
    if not (ROOT / "vendor" / "llama.cpp" / "tools" / "llama-bench").is_dir():
        pytest.skip("vendor/llama.cpp/tools is missing: the native llama-bench cannot be built here")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is needed to build the native llama-bench")
    return Path(bench_scripts.load("native").native_tool("llama-bench"))


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "int" if isinstance(v, int) else "float"
    return type(v).__name__


def _pyllama_json(model: Path, capsys: pytest.CaptureFixture[str], extra: list[str] = ()) -> list[dict[str, Any]]:
    capsys.readouterr()
    rc = main(["-m", str(model), *ARGS, *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    records: list[dict[str, Any]] = json.loads(out)
    return records


def _native_json(exe: Path, model: Path, extra: list[str] = ()) -> list[dict[str, Any]]:
    res = subprocess.run([str(exe), "-m", str(model), *ARGS, *extra], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    records: list[dict[str, Any]] = json.loads(res.stdout)
    return records


def test_pyllama_records_have_llama_bench_keys_and_types(synth_model_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Without the native tool: the key order and declared types of llama-bench.cpp's printers."""
    from pyllama.benchmark.record import BOOL_FIELDS, FLOAT_FIELDS, INT_FIELDS

    recs = _pyllama_json(synth_model_path, capsys)
    assert [(r["n_prompt"], r["n_gen"]) for r in recs] == [(8, 0), (0, 4)]
    for r in recs:
        keys = list(r)
        assert keys[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
        assert keys[len(LLAMA_BENCH_FIELDS): len(LLAMA_BENCH_FIELDS) + 2] == list(SAMPLE_FIELDS)
        assert set(keys[len(LLAMA_BENCH_FIELDS) + 2:]) == set(PYLLAMA_FIELDS)
        for k in LLAMA_BENCH_FIELDS:
            want = "bool" if k in BOOL_FIELDS else "int" if k in INT_FIELDS else "float" if k in FLOAT_FIELDS else "str"
            assert _json_kind(r[k]) == want, k
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 1
        assert r["avg_ns"] == r["samples_ns"][0] and r["stddev_ns"] == 0
        assert r["binding"] == "pyllama"
        assert {"devices", "cpu_model", "ram_total", "os", "python", "build"} <= set(r["environment"])


@pytest.mark.slow
def test_json_matches_native_llama_bench_key_by_key(synth_model_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    exe = _native_bench()
    ours = _pyllama_json(synth_model_path, capsys)
    theirs = _native_json(exe, synth_model_path)
    assert len(ours) == len(theirs) == 2
    for mine, ref in zip(ours, theirs):
        extra = set(mine) - set(ref)
        assert extra == set(PYLLAMA_FIELDS), f"undocumented extra keys: {extra - set(PYLLAMA_FIELDS)}"
        assert set(ref) - set(mine) == set(), "keys of llama-bench missing from pyllama's record"
        for k, v in ref.items():
            if k in SAMPLE_FIELDS:
                assert isinstance(mine[k], list) and len(mine[k]) == len(v), k
                # llama-bench prints samples_ts with 6 significant digits: an integral value reads as int
                assert all(_json_kind(x) in ("int", "float") for x in mine[k]), k
                if k == "samples_ns":
                    assert all(isinstance(x, int) for x in mine[k] + v)
                continue
            assert _json_kind(mine[k]) == _json_kind(v), f"{k}: {mine[k]!r} vs native {v!r}"
            if k not in TIMING_KEYS:
                assert mine[k] == v, f"{k}: pyllama {mine[k]!r} != native {v!r}"


@pytest.mark.slow
def test_non_default_settings_match_native(synth_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sweep-style settings are applied and reported as llama-bench reports them."""
    exe = _native_bench()
    extra = ["-t", "1", "-b", "64", "-ub", "32", "-fa", "on", "-ctk", "bf16", "-ctv", "bf16", "-d", "16",
             "-ngl", "0", "-lm", "mmap", "-nkvo", "1", "--repack", "0", "--poll", "0", "-C", "0x1", "--cpu-strict", "1"]
    ours = _pyllama_json(synth_model_path, capsys, extra)
    theirs = _native_json(exe, synth_model_path, extra)
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs):
        for k, v in ref.items():
            if k not in TIMING_KEYS:
                assert mine[k] == v, f"{k}: pyllama {mine[k]!r} != native {v!r}"


@pytest.mark.slow
def test_native_comparison_records(synth_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--native: each pyllama record is followed by llama-bench's, and carries the paired ratio."""
    exe = _native_bench()
    capsys.readouterr()
    rc = main(["-m", str(synth_model_path), "-p", "16", "-n", "4", "-r", "2", "-t", "1", "-o", "jsonl",
               "--native", "--native-bin", str(exe)])
    out = capsys.readouterr().out
    assert rc == 0, out
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["binding"] for r in recs] == ["pyllama", "llama.cpp"] * 2
    for py, nat in zip(recs[::2], recs[1::2]):
        assert set(nat) == set(py) - set(NATIVE_FIELDS) | {"interleave"}
        assert len(nat["samples_ns"]) == len(py["samples_ns"]) == 2
        ratios = [a / b for a, b in zip(py["samples_ts"], nat["samples_ts"])]
        assert py["native_ratio_min"] == pytest.approx(min(ratios))
        assert py["native_ratio_max"] == pytest.approx(max(ratios))
        assert py["native_avg_ts"] == pytest.approx(nat["avg_ts"])
        assert py["interleave"] == nat["interleave"] == "rep"
        for k in LLAMA_BENCH_FIELDS:
            if k not in TIMING_KEYS:
                assert py[k] == nat[k], k


def test_sampled_generation_against_the_c_loop(synth_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--sampling: tg tests sample every token (one record per mode); --native pairs them with the C loop."""
    capsys.readouterr()
    rc = main(["-m", str(synth_model_path), "-p", "0", "-n", "8", "-r", "2", "-t", "1", "-o", "jsonl",
               "--sampling", "host,argmax,backend", "--native"])
    out = capsys.readouterr().out
    assert rc == 0, out
    recs = [json.loads(line) for line in out.splitlines()]
    assert [(r["binding"], r["sampling"]) for r in recs] == [
        (b, m) for m in ("host", "argmax", "backend") for b in ("pyllama", "llama.cpp C loop")]
    for py, c in zip(recs[::2], recs[1::2]):
        assert py["n_gen"] == c["n_gen"] == 8 and len(py["samples_ns"]) == len(c["samples_ns"]) == 2
        ratios = [a / b for a, b in zip(py["samples_ts"], c["samples_ts"])]
        assert py["native_ratio_min"] == pytest.approx(min(ratios))
    assert main(["-m", str(synth_model_path), "--sampling", "gpu"]) == 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
