"""pyllama's own accelerator build on a real GPU (CUDA first; any ``gpu``-type ggml device).

Run by tools/gpu_check.sh on a machine with a GPU, in the environment where it installed
the CUDA variant; on a machine without one every test skips, saying so. The rehearsal of
that script (``tools/gpu_check.sh --cpu``) sets ``PYLLAMA_GPU_TESTS_ON_CPU=1``: then the
same checks run with the CPU as "the device", so their code has run before a GPU minute
is spent on it.

What is compared, all on the device: greedy ids against ``llama-simple`` built from the
same CMake tree (``PYLLAMA_NATIVE_BIN``, set by the script); greedy picked on the host, by
argmax over the logits and inside the graph (backend sampling), which must agree;
``generate_parallel`` and the engine against one sequence alone; ``n_gpu_layers="auto"``
through llama.cpp's fit; ``pyllama inspect gpu`` naming the device and its memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pyllama
from bounded import tokens_on_threads

pytestmark = [pytest.mark.gpu, pytest.mark.may_skip]

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning the", "A cat and a dog"]
N_PREDICT = 32


@pytest.fixture(scope="module")
def device() -> pyllama.Device | None:
    """The GPU the tests run on; None means the CPU stands in (the script's rehearsal)."""
    gpus = [d for d in pyllama.devices() if d.type in ("gpu", "igpu")]
    if gpus:
        return gpus[0]
    if os.environ.get("PYLLAMA_GPU_TESTS_ON_CPU") == "1":
        return None
    pytest.skip(f"no GPU device (devices: {[d.name for d in pyllama.devices()]}); "
                "tools/gpu_check.sh runs these on one")


@pytest.fixture(scope="module")
def ngl(device: pyllama.Device | None) -> int | str:
    return 0 if device is None else "all"


@pytest.fixture(scope="module")
def gpu_model(synth_model_path: Path, ngl: int | str) -> Any:
    with pyllama.Model(synth_model_path, n_gpu_layers=ngl) as model:
        yield model


def _greedy(ctx: pyllama.Context, prompt: str, mode: str) -> list[int]:
    with pyllama.generate(ctx, prompt, max_tokens=N_PREDICT, sampling=mode, reuse_prefix=False) as gen:
        list(gen)
    return [int(t) for t in gen.tokens]


def test_greedy_ids_equal_llama_simple(gpu_model: Any, synth_model_path: Path, ngl: int | str) -> None:
    """The same greedy continuation as llama.cpp's minimal program from the same build, on the device."""
    where = os.environ.get("PYLLAMA_NATIVE_BIN")
    if not where:
        pytest.skip("PYLLAMA_NATIVE_BIN is not set (tools/gpu_check.sh sets it to the build's tools)")
    exe = Path(where) / "llama-simple"
    layers = "0" if ngl == 0 else "99"
    proc = subprocess.run([str(exe), "-m", str(synth_model_path), "-n", str(N_PREDICT), "-ngl", layers, PROMPTS[0]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with gpu_model.context(n_ctx=256, n_threads=2) as ctx:
        with pyllama.generate(ctx, PROMPTS[0], max_tokens=N_PREDICT, sampling="host") as gen:
            text = "".join(e.text for e in gen)
    # llama-simple prints the prompt's pieces, then each generated piece, then a newline.
    assert len(gen.tokens) == N_PREDICT and text.strip()
    assert proc.stdout.rstrip("\n").endswith(text), (proc.stdout[-400:], text)


def test_host_argmax_and_backend_sampling_agree(gpu_model: Any, device: pyllama.Device | None) -> None:
    with gpu_model.context(n_ctx=256, n_threads=2) as ctx:
        want = _greedy(ctx, PROMPTS[0], "host")
        assert len(want) == N_PREDICT
        assert _greedy(ctx, PROMPTS[0], "argmax") == want
        assert _greedy(ctx, PROMPTS[0], "auto") == want
        if device is not None:  # the CPU backend samples in the graph too, but that is tested elsewhere
            for _ in range(3):  # attach, generate, detach, with host generations between
                assert _greedy(ctx, PROMPTS[0], "backend") == want
                assert _greedy(ctx, PROMPTS[1], "host")


def test_parallel_and_engine_equal_alone(gpu_model: Any) -> None:
    with gpu_model.context(n_ctx=256, n_threads=2) as ctx:
        alone = [_greedy(ctx, p, "host") for p in PROMPTS]
    with gpu_model.context(n_ctx=1024, n_seq_max=len(PROMPTS), n_threads=2) as ctx:
        results = pyllama.generate_parallel_tokens(ctx, PROMPTS, max_tokens=N_PREDICT)
    assert [[int(t) for t in r.tokens] for r in results] == alone

    with pyllama.Engine(gpu_model, n_slots=len(PROMPTS), n_ctx=256, n_threads=2) as engine:
        reqs = [engine.submit(p, max_tokens=N_PREDICT, ignore_eos=True) for p in PROMPTS]
        got = tokens_on_threads(reqs, 120)
        stats = engine.stats()
    assert got == alone
    assert stats.max_requests_in_step == len(PROMPTS)


def test_auto_offload_fits(synth_model_path: Path, device: pyllama.Device | None) -> None:
    if device is None:
        pytest.skip("fitting needs a device with its own memory")
    with pyllama.Model(synth_model_path, n_gpu_layers="auto") as model:
        fit = model.fit
        assert fit.status == "fitted", fit
        assert fit.n_gpu_layers in (-1, model.n_layer + 1), fit
        with model.context(n_ctx=128, n_threads=2) as ctx:
            assert len(_greedy(ctx, PROMPTS[0], "host")) == N_PREDICT


def test_inspect_gpu_names_the_device(device: pyllama.Device | None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pyllama", "inspect", "gpu", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    accel = data["accelerators"]
    if device is None:
        assert accel == [] and any(d["type"] == "cpu" for d in data["devices"]), data
        return
    assert any(a["name"] == device.name and a["memory_total"] > 0 for a in accel), accel
