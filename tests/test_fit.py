"""Parameter fitting through llama.cpp's own common/fit.cpp (libpyllama-fit).

On a CPU-only build the device side of the fit has nothing to offload, so
these tests check what the CPU can show for real: the memory projection
against what a real load allocates, the fit's host-memory check (it fails for
an impossible margin, succeeds for a modest one), and that ``Model`` resolves
``n_gpu_layers="auto"`` without an accelerator. The device side runs against
a real Vulkan device in tests/test_vulkan.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import pyllama
from pyllama._ffi import lib
from pyllama.fit import fit_model_params


def test_projection_matches_a_real_context(synth_model_path: Path) -> None:
    rows = pyllama.memory_projection(synth_model_path, n_ctx=256, n_gpu_layers=0)
    assert rows[-1].device == "host"
    host = rows[-1]
    assert host.total > 0 and 0 < host.free <= host.total
    # f32 synthetic weights: the projection's model bytes are the file's tensor bytes, give or take alignment.
    size = synth_model_path.stat().st_size
    assert 0.5 * size < host.model <= size
    # The KV cache grows linearly with the context: f16 K and V, 2 layers, 32-wide KV heads.
    bigger = pyllama.memory_projection(synth_model_path, n_ctx=512, n_gpu_layers=0)[-1]
    kv_per_cell = 2 * 2 * 2 * 32  # layers * (K, V) * f16 bytes * n_embd_kv
    assert bigger.context - host.context == pytest.approx(256 * kv_per_cell, rel=0.05)
    # KV type matters too (q8_0 needs head sizes divisible by 32, which the synthetic model lacks).
    f32_kv = pyllama.memory_projection(synth_model_path, n_ctx=512, n_gpu_layers=0, type_k="f32", type_v="f32")[-1]
    assert f32_kv.context - bigger.context == pytest.approx(512 * kv_per_cell, rel=0.05)


def test_projection_rejects_bad_input(synth_model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pyllama.memory_projection(tmp_path / "missing.gguf")
    with pytest.raises(ValueError):
        pyllama.memory_projection(synth_model_path, n_ctx=0)
    with pytest.raises(ValueError):
        pyllama.memory_projection(synth_model_path, flash_attn="sometimes")
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"this is not a model")
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.memory_projection(not_gguf)


def test_fit_checks_host_memory(synth_model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyllama.llama")
    params = lib.llama_model_default_params()
    keep: list[object] = []
    ok = fit_model_params(synth_model_path, params, keep, margin_mib=64)
    assert ok.status == "fitted", ok
    assert any("host memory" in r.getMessage() for r in caplog.records), "the fit's account is not in the log"

    impossible = fit_model_params(synth_model_path, lib.llama_model_default_params(), [], margin_mib=1 << 30)
    assert impossible.status == "failed"
    assert "margin" in impossible.reason
    with pytest.raises(ValueError):
        fit_model_params(synth_model_path, lib.llama_model_default_params(), [], margin_mib=-1)


def test_fit_of_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    result = fit_model_params(bad, lib.llama_model_default_params(), [], margin_mib=64)
    assert result.status == "error"


@pytest.mark.may_skip  # the accelerator machines run tests/test_vulkan.py and tests/test_gpu.py
def test_auto_without_accelerator_stays_on_cpu(synth_model_path: Path) -> None:
    if pyllama.fit.has_accelerator():
        pytest.skip("this machine has an accelerator; tests/test_vulkan.py covers the device side")
    with pyllama.Model(synth_model_path) as model:
        assert model.fit.status == "skipped"
        assert model.n_gpu_layers == 0
        with model.context() as ctx:
            assert ctx.n_ctx == min(512, 4096)  # the synthetic model's training context
    assert pyllama.fit_params(synth_model_path).status == "skipped"
    with pyllama.Model(synth_model_path, n_gpu_layers=3) as model:
        assert model.fit.status == "skipped" and model.fit.reason == "n_gpu_layers given"


def test_bench_fits_again_for_every_test(synth_model_path: Path) -> None:
    """llama-bench refits (and reloads) per test when -fitt/-fitc are given: the fit depends on the test's context."""
    from pyllama.benchmark.params import parse_args
    from pyllama.benchmark.runner import ModelCache

    first, second = parse_args(["-m", str(synth_model_path), "-p", "16", "-n", "4", "-fitt", "64"]).instances()
    plain = parse_args(["-m", str(synth_model_path), "-p", "16", "-n", "4"]).instances()
    cache = ModelCache()
    try:
        m1 = cache.get(first)
        m2 = cache.get(second)
        assert m2 is not m1 and m1.closed
        m3 = cache.get(plain[0])
        assert cache.get(plain[1]) is m3  # without a fit, consecutive tests share the model
    finally:
        cache.close()


def test_a_memory_budget_in_all_and_per_device(synth_model_path: Path) -> None:
    """What the router and `pyllama pull` decide with: per device, a budget counts what is loaded
    against it, free memory already has it taken out, a total bounds the sum."""
    import argparse

    from pyllama.fit import MemoryBudget, free_memory, model_need

    need = model_need(synth_model_path, n_ctx=256)
    assert set(need) == {"host"} and need["host"] >= synth_model_path.stat().st_size
    n = need["host"]
    per = MemoryBudget.parse(f"host={3 * n}")
    assert per.shortfall(need, {"host": n}, margin=0) is None  # two fit
    why = per.shortfall(need, {"host": 2 * n + 1}, margin=0)
    assert why is not None and why.startswith("host: needs") and "loaded" in why and "budget" in why
    assert MemoryBudget.parse(f"host={n - 1}").shortfall(need, margin=0, free=False) is not None  # never
    total = MemoryBudget.parse(str(2 * n))
    assert total.shortfall(need, {"host": n}, margin=0) is None
    assert total.shortfall(need, {"host": n + 1}, margin=0) is not None
    # no budget: the host's free memory now, the margin kept, what is loaded not counted twice
    free = free_memory("host")
    assert MemoryBudget().shortfall(need, {"host": 1 << 50}, margin=0) is None
    assert MemoryBudget().shortfall({"host": free + (1 << 30)}, margin=0) is not None
    assert MemoryBudget.of(5) == MemoryBudget(5) and MemoryBudget.of(None) == MemoryBudget()
    mixed = MemoryBudget.parse("24G, CUDA1=6G")
    assert mixed.total == 24 << 30 and mixed.devices == (("CUDA1", 6 << 30),)
    for bad in ("", "8G,9G", "a=1G,a=2G", "=3G", "host=lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            MemoryBudget.parse(bad)
    with pytest.raises(ValueError, match="no device named CUDA7.*host"):
        MemoryBudget.parse("CUDA7=1G").check_devices()
    with pytest.raises(ValueError, match="no device named CPU"):  # the CPU's memory is the host's
        MemoryBudget.parse("CPU=1G").check_devices()
    MemoryBudget.parse("host=1G").check_devices()
