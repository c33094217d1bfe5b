"""The Vulkan variant, proven without a GPU on Mesa's lavapipe (a Vulkan device on the CPU).

Runs only against a pyllama built with ``PYLLAMA_BACKEND=vulkan`` (see
tools/ci_vulkan.sh, which builds that wheel, installs it in a fresh virtual
environment and runs this file there); any other build skips with the reason.

ggml-vulkan hides CPU-type Vulkan devices such as lavapipe unless
``GGML_VK_VISIBLE_DEVICES`` names them: the variable is a comma- or
space-separated list of indices into the loader's list of physical devices
(an index past its end is a hard error), read once, when the backend
registers, i.e. when pyllama is imported. So every check runs in a child
interpreter whose environment selects the device before the import; that also
keeps a crash in a driver from taking the test session down with it.

Equality: greedy tokens must match exactly, and logits to within 0.03
absolute. Bitwise equality is not expected although the synthetic model is
f32: ggml-vulkan's shaders take activations through f16 (matrix-vector
products, the f16 KV cache, flash attention) and accumulate in another order
than the CPU kernels. On lavapipe the largest difference seen over 16 steps x
590 logits was 0.0076, against a smallest top-1/top-2 gap of 0.06 in the CPU
run, so the tolerance has room and rounding of that size cannot flip a greedy
pick; a failure prints both token lists and the largest difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROMPT = "The quick brown fox"
N_PREDICT = 16
LOGIT_ATOL = 3e-2
BACKEND_CYCLES = 6
FIT_CTX = 262144  # tokens of context the fit test fits for
CHILD_TIMEOUT_S = 900  # lavapipe compiles every pipeline on first use: slow, not stuck

# the CPU build skips them; tools/ci_vulkan.sh runs them on its Vulkan build (lavapipe compiles slowly)
pytestmark = [pytest.mark.may_skip, pytest.mark.timeout(CHILD_TIMEOUT_S + 300)]


def _build_info() -> dict[str, Any]:
    import pyllama

    info = getattr(pyllama, "build_info", None)
    if callable(info):
        return dict(info())
    from pyllama._cffi import ffi, lib  # the binding's own stamp, before the API existed

    raw: dict[str, Any] = json.loads(ffi.string(lib.pyllama_build_info()).decode())
    raw["backend_libraries"] = str(raw.get("backend_libraries", "")).split()
    return raw


def _libraries(info: dict[str, Any]) -> list[str]:
    libs = info.get("backend_libraries", [])
    return libs.split() if isinstance(libs, str) else list(libs)


@pytest.fixture(scope="module")
def vulkan_build() -> dict[str, Any]:
    info = _build_info()
    if info.get("backend") != "vulkan" and "ggml-vulkan" not in _libraries(info):
        pytest.skip(
            f"this pyllama was built for backend {info.get('backend')!r} "
            f"({' '.join(_libraries(info)) or 'no backend libraries'}), not vulkan: "
            "build it with PYLLAMA_BACKEND=vulkan (tools/ci_vulkan.sh)"
        )
    return info


def _child_env(visible: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GGML_VK_VISIBLE_DEVICES", None)
    if visible is not None:
        env["GGML_VK_VISIBLE_DEVICES"] = visible
    return env


def _run_child(mode: str, *args: str, visible: str | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, *args]
    proc = subprocess.run(
        cmd, env=_child_env(visible), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    if proc.returncode != 0:
        pytest.fail(
            f"child `{mode}` exited with {proc.returncode} (GGML_VK_VISIBLE_DEVICES={visible}):\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    # The last stdout line is the child's JSON; nothing else may be printed there.
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"the child printed more than its JSON on stdout:\n{proc.stdout[-2000:]}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


@pytest.fixture(scope="module")
def visible_devices(vulkan_build: dict[str, Any]) -> str:
    """The GGML_VK_VISIBLE_DEVICES value under which a Vulkan device is listed."""
    preset = os.environ.get("GGML_VK_VISIBLE_DEVICES")
    if preset:
        return preset
    # A real GPU is listed without the variable; lavapipe only when selected.
    if _run_child("devices", visible=None)["vulkan"]:
        return ""
    return "0"


def test_vulkan_device_is_listed(visible_devices: str) -> None:
    result = _run_child("devices", visible=visible_devices or None)
    assert "Vulkan" in result["backends"], result
    assert result["vulkan"], f"no Vulkan device listed: {result['devices']}"
    dev = result["vulkan"][0]
    assert dev["name"].startswith("Vulkan"), dev
    assert dev["description"], dev
    # The CPU backend is still there for the layers and ops that stay on the host.
    assert any(d["type"] == "cpu" for d in result["devices"]), result["devices"]


def test_without_a_device_the_cpu_takes_over_and_says_why(vulkan_build: dict[str, Any]) -> None:
    result = _run_child("devices", visible=None)  # lavapipe stays hidden without the variable
    if result["vulkan"]:
        pytest.skip("a Vulkan GPU is visible here without GGML_VK_VISIBLE_DEVICES")
    assert [u["backend"] for u in result["unavailable"]] == ["Vulkan"], result
    assert "found no device" in result["unavailable"][0]["reason"], result
    assert any(d["type"] == "cpu" for d in result["devices"]), result["devices"]


def test_greedy_generation_matches_cpu(visible_devices: str, synth_model_path: Path) -> None:
    cpu = _run_child("generate", str(synth_model_path), "cpu", visible=visible_devices or None)
    vk = _run_child("generate", str(synth_model_path), "vulkan", visible=visible_devices or None)

    n_layer = vk["n_layer"]
    if vk["offload_line"] is not None:  # the line llama.cpp logs, when pyllama routes its logs
        assert f"offloaded {n_layer + 1}/{n_layer + 1} layers" in vk["offload_line"], vk["offload_line"]
    assert vk["device"].startswith("Vulkan"), vk["device"]

    assert len(cpu["tokens"]) == N_PREDICT
    assert vk["tokens"] == cpu["tokens"], (
        f"greedy tokens differ (cpu: {cpu['tokens']}, vulkan on {vk['description']}: {vk['tokens']})"
    )
    # Same tokens, so the logits compare position by position.
    worst = max(abs(a - b) for la, lb in zip(cpu["logits"], vk["logits"]) for a, b in zip(la, lb))
    assert worst <= LOGIT_ATOL, f"logits differ by up to {worst:.3g} (> {LOGIT_ATOL})"


def test_image_prompt_matches_cpu(visible_devices: str, tmp_path: Path) -> None:
    """libmtmd in the Vulkan wheel: the projector's tower and the model on the device give the CPU's tokens."""
    import synth

    files = [str(synth.write_llama_model(tmp_path / "text.gguf")), str(synth.write_projector(tmp_path / "proj.gguf")),
             str(synth.write_image(tmp_path / "a.png", seed=1))]
    cpu = _run_child("media", *files, "cpu", visible=visible_devices or None)
    vk = _run_child("media", *files, "vulkan", visible=visible_devices or None)
    assert vk["projector_gpu"] and not cpu["projector_gpu"] and vk["n_media_tokens"] == 16
    assert len(cpu["tokens"]) == N_PREDICT and vk["tokens"] == cpu["tokens"]


def test_argmax_host_and_backend_sampling_match_cpu_greedy(visible_devices: str, synth_model_path: Path,
                                                          tmp_path: Path) -> None:
    """Greedy tokens chosen on the host, by argmax over the logits and inside the Vulkan graph (backend
    sampling, attached and detached once per generation, generations of every kind interleaved on one
    context: the cycles that crash Mesa's lavapipe before 25.0) all equal the CPU's, for one sequence,
    generate_parallel and the engine. Backend sampling is refused, with the reason and nothing lost, where
    the driver is known to break, and for several sequences where a row of logits is off the device's
    alignment (the synthetic 590-token vocabulary; a model padded to 1024 tokens serves those cases).
    tools/ci_vulkan.sh provides a fixed lavapipe and sets PYLLAMA_REQUIRE_VULKAN_BACKEND_SAMPLING=1, so CI
    never takes the driver-refusal branch."""
    import synth

    padded = synth.write_llama_model(tmp_path / "padded.gguf", n_vocab=1024)
    res = _run_child("sampling", str(synth_model_path), str(padded), visible=visible_devices or None)
    want, want_padded = res["cpu_host"], res["cpu_host_padded"]
    assert len(want) == N_PREDICT and len(want_padded) == N_PREDICT
    for key in ("vulkan_host", "vulkan_argmax", "vulkan_auto", "vulkan_parallel_argmax", "after_backend"):
        assert res[key] == want, (key, res)
    if res["driver_blocks"]:
        assert "lavapipe" in res["backend_refused"] and "Mesa 25.0" in res["backend_refused"], res
        assert not os.environ.get("PYLLAMA_REQUIRE_VULKAN_BACKEND_SAMPLING"), (
            f"backend sampling was refused on {res['driver']}: {res['backend_refused']}")
        return
    assert not res["backend_refused"], res
    assert len(res["vulkan_backend"]) == BACKEND_CYCLES
    for i, tokens in enumerate(res["vulkan_backend"]):
        assert tokens == want, (f"cycle {i}", res)
    assert "alignment" in res["misaligned_refused"], res  # 590 x 4 bytes per row, two sequences
    assert res["parallel_backend_padded"] == [want_padded, want_padded], res
    assert res["engine_backend_padded"] == [want_padded, want_padded], res


def test_auto_offload_uses_llama_cpp_fit(visible_devices: str, tmp_path: Path) -> None:
    """n_gpu_layers="auto" on a real Vulkan device: llama.cpp's fit decides, pyllama applies it.

    The model is fitted for a long context (FIT_CTX tokens: tens of MiB of KV cache) so that the
    tight case has room to spare against the drift of lavapipe's free memory, which is the host's
    and moves by a few MiB between two readings."""
    import synth

    path = synth.write_llama_model(tmp_path / "long.gguf", n_ctx_train=FIT_CTX)
    roomy = _run_child("fit", str(path), "1024", visible=visible_devices or None)
    assert roomy["status"] == "fitted", roomy
    n_all = roomy["n_layer"] + 1
    # Everything fits: the default (all layers) stands, and the load really offloads them.
    assert roomy["n_gpu_layers"] in (-1, n_all), roomy
    assert f"offloaded {n_all}/{n_all} layers" in (roomy["offload_line"] or ""), roomy
    row = roomy["vulkan_rows"][0]
    assert row["model"] > 0 and row["context"] > 0, roomy
    need_mib = (row["model"] + row["context"] + row["compute"]) >> 20
    assert need_mib >= 24, roomy  # the tight case below leaves half of it usable

    # A margin that leaves half of what the whole model needs usable (read in the child right
    # before it fits): the fit must keep some layers on the CPU, and the load must follow it.
    tight = _run_child("fit", str(path), f"usable:{need_mib // 2}", visible=visible_devices or None)
    assert tight["status"] == "fitted", tight
    assert 0 <= tight["n_gpu_layers"] < n_all, tight
    assert f"offloaded {tight['n_gpu_layers']}/{n_all} layers" in (tight["offload_line"] or ""), tight
    # Same greedy tokens with the model split between Vulkan and the CPU.
    assert tight["tokens"] == roomy["tokens"], (tight["tokens"], roomy["tokens"])


def test_the_router_budgets_the_device(visible_devices: str, tmp_path: Path) -> None:
    """`pyllama serve` of three models with a budget on the Vulkan device that holds two: the third load
    unloads the least recently used; a budget below one model's need on the device is a clear 507."""
    import httpx
    import synth
    from server_fixture import router, statuses

    for i, name in enumerate("abc"):
        synth.write_llama_model(tmp_path / f"{name}.gguf", seed=100 + i)
    need = _run_child("need", str(tmp_path / "a.gguf"), "256", visible=visible_devices or None)
    vk = [d for d in need if d.startswith("Vulkan")]
    assert len(vk) == 1 and need[vk[0]] > 0 and set(need) == {vk[0], "host"}, need
    env = {"GGML_VK_VISIBLE_DEVICES": visible_devices} if visible_devices else {}

    def complete(s: Any, model: str) -> httpx.Response:
        return httpx.post(s.url_for("completion"), json={"model": model, "prompt": "hello", "n_predict": 2,
                                                         "temperature": 0}, timeout=CHILD_TIMEOUT_S)

    srv = router("--models-dir", str(tmp_path), "--memory-budget", f"{vk[0]}={int(need[vk[0]] * 2.5)}",
                 "-np", "1", "-c", "256")
    srv.env.update(env)
    with srv as s:
        for name in "abc":
            assert complete(s, name).status_code == 200
        assert statuses(s) == {"a": "unloaded", "b": "loaded", "c": "loaded"}  # a, least recent, made room
        cards = {m["id"]: m for m in httpx.get(s.url_for("models"), timeout=10).json()["data"]}
        assert cards["c"]["memory"] == need
    srv = router("--models-dir", str(tmp_path), "--memory-budget", f"{vk[0]}={need[vk[0]] // 2}", "-np", "1",
                 "-c", "256")
    srv.env.update(env)
    with srv as s:
        r = complete(s, "a")
        assert r.status_code == 507 and f"{vk[0]}: needs" in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------------------
# The child: imports pyllama under the environment the parent chose, prints one
# JSON line on stdout.


def _seam() -> tuple[Any, Any]:
    """ffi and lib with every backend in the package loaded."""
    try:
        from pyllama._ffi import ffi, lib  # loads the package's backends on import

        return ffi, lib
    except ModuleNotFoundError as exc:
        if exc.name != "pyllama._ffi":
            raise
    from pyllama import _cffi
    from pyllama._cffi import ffi, lib

    lib.llama_backend_init()
    if lib.ggml_backend_dev_count() == 0:
        lib.ggml_backend_load_all_from_path(str(Path(_cffi.__file__).parent / "lib").encode())
    return ffi, lib


def _devices(ffi: Any, lib: Any) -> list[dict[str, Any]]:
    import pyllama

    return [{"name": d.name, "description": d.description, "type": d.type, "backend": d.backend}
            for d in pyllama.devices()]


def _child_devices() -> dict[str, Any]:
    ffi, lib = _seam()
    devs = _devices(ffi, lib)
    backends = [ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))).decode()
                for i in range(lib.ggml_backend_reg_count())]
    import pyllama

    return {"backends": backends, "devices": devs, "vulkan": [d for d in devs if d["backend"] == "Vulkan"],
            "unavailable": [u.as_dict() for u in pyllama.unavailable_backends()]}


def _child_generate(model_path: str, where: str) -> dict[str, Any]:
    import logging

    import numpy as np

    ffi, lib = _seam()
    offload: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "layers to GPU" in msg:
                offload.append(msg)

    native = logging.getLogger("pyllama.llama")
    native.addHandler(_Grab())
    native.setLevel(logging.INFO)

    device = description = ""
    mparams = lib.llama_model_default_params()
    if where == "cpu":
        devs = ffi.new("ggml_backend_dev_t[1]")  # an empty list: no accelerator at all
        mparams.n_gpu_layers = 0
    else:
        vk = None
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            if ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev))) == b"Vulkan":
                vk = dev
                break
        if vk is None:
            raise SystemExit("no Vulkan device is listed")
        devs = ffi.new("ggml_backend_dev_t[2]")
        devs[0] = vk
        device = ffi.string(lib.ggml_backend_dev_name(vk)).decode()
        description = ffi.string(lib.ggml_backend_dev_description(vk)).decode()
        mparams.n_gpu_layers = -1  # every layer, and the output head
    mparams.devices = devs
    model = lib.llama_model_load_from_file(model_path.encode(), mparams)
    if model == ffi.NULL:
        raise SystemExit(f"llama_model_load_from_file failed for {model_path} on {where}")
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = 128
    cparams.n_batch = 64
    cparams.n_ubatch = 64
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    if ctx == ffi.NULL:
        raise SystemExit(f"llama_init_from_model failed on {where}")
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    text = PROMPT.encode()
    buf = ffi.new("llama_token[]", 256)
    n = lib.llama_tokenize(vocab, text, len(text), buf, 256, True, False)
    if n <= 0:
        raise SystemExit(f"llama_tokenize returned {n}")
    pending = [buf[i] for i in range(n)]
    tokens: list[int] = []
    logits: list[list[float]] = []
    for _ in range(N_PREDICT):
        arr = ffi.new("llama_token[]", pending)
        rc = lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(pending)))
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc} on {where}")
        row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * n_vocab), dtype=np.float32)
        tok = int(np.argmax(row))
        tokens.append(tok)
        logits.append([float(x) for x in row])
        pending = [tok]
    result = {
        "where": where,
        "device": device,
        "description": description,
        "n_layer": int(lib.llama_model_n_layer(model)),
        "offload_line": offload[-1] if offload else None,
        "tokens": tokens,
        "logits": logits,
    }
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return result


def _child_fit(model_path: str, margin_mib: str) -> dict[str, Any]:
    import logging

    import pyllama

    offload: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "layers to GPU" in record.getMessage():
                offload.append(record.getMessage())

    native = logging.getLogger("pyllama.llama")
    native.addHandler(_Grab())
    native.setLevel(logging.INFO)
    rows = pyllama.memory_projection(model_path, n_ctx=FIT_CTX)
    vk = [d for d in pyllama.devices() if d.backend == "Vulkan"]
    if margin_mib.startswith("usable:"):  # leave this much of what is free now usable
        margin_mib = str((vk[0].memory_free >> 20) - int(margin_mib.split(":")[1]))
    with pyllama.Model(model_path, fit_margin_mib=int(margin_mib), fit_min_ctx=FIT_CTX,
                       fit_context={"n_ctx": FIT_CTX}) as model:
        with model.context(n_ctx=128, n_threads=2) as ctx:
            tokens = [e.token for e in pyllama.generate(ctx, PROMPT, max_tokens=4)]
        fit = model.fit
        n_layer = model.n_layer
    return {
        "status": fit.status, "n_gpu_layers": fit.n_gpu_layers, "n_ctx": fit.n_ctx, "reason": fit.reason,
        "n_layer": n_layer, "offload_line": offload[-1] if offload else None, "tokens": tokens,
        "vulkan_free_mib": vk[0].memory_free >> 20 if vk else 0,
        "vulkan_rows": [r.__dict__ for r in rows if r.device.startswith("Vulkan")],
    }


def _child_sampling(model_path: str, padded_path: str) -> dict[str, Any]:
    import pyllama
    from pyllama.devices import drivers_of
    from pyllama.backend_sampling import driver_blocks_backend_sampling

    def run(ctx: pyllama.Context, mode: str) -> list[int]:
        with pyllama.generate(ctx, PROMPT, max_tokens=N_PREDICT, sampling=mode, reuse_prefix=False) as gen:
            list(gen)
        return [int(t) for t in gen.tokens]

    out: dict[str, Any] = {}
    for key, path in (("cpu_host", model_path), ("cpu_host_padded", padded_path)):
        with pyllama.Model(path, n_gpu_layers=0) as cpu, cpu.context(n_ctx=256, n_threads=2) as ctx:
            out[key] = run(ctx, "host")
    vk_dev = next(d for d in pyllama.devices() if d.backend == "Vulkan")
    out["driver"] = vk_dev.driver
    out["driver_blocks"] = any(driver_blocks_backend_sampling(d.driver_id, d.driver_info) for d in drivers_of(vk_dev))
    out["backend_refused"] = out["misaligned_refused"] = ""
    with pyllama.Model(model_path, n_gpu_layers="all") as vk:
        with vk.context(n_ctx=256, n_threads=2) as ctx:
            for mode in ("host", "argmax", "auto"):
                out[f"vulkan_{mode}"] = run(ctx, mode)
            out["vulkan_backend"] = []
            try:
                # attach, generate, detach: each cycle rebuilds the scheduler's buffers; host generations between
                for i in range(BACKEND_CYCLES):
                    out["vulkan_backend"].append(run(ctx, "backend"))
                    run(ctx, "argmax" if i % 2 else "host")
            except ValueError as exc:
                out["backend_refused"] = str(exc)
            out["after_backend"] = run(ctx, "auto")
        with vk.context(n_ctx=256, n_threads=2, n_seq_max=2) as ctx:
            out["vulkan_parallel_argmax"] = pyllama.generate_parallel_tokens(
                ctx, [PROMPT], max_tokens=N_PREDICT, sampling="argmax")[0].tokens
            try:
                pyllama.generate_parallel_tokens(ctx, [PROMPT, PROMPT], max_tokens=N_PREDICT, sampling="backend")
            except ValueError as exc:
                out["misaligned_refused"] = str(exc)
    if out["backend_refused"]:
        return out
    with pyllama.Model(padded_path, n_gpu_layers="all") as vk:
        with vk.context(n_ctx=512, n_threads=2, n_seq_max=2) as ctx:
            both = pyllama.generate_parallel_tokens(ctx, [PROMPT, PROMPT], max_tokens=N_PREDICT, sampling="backend")
            out["parallel_backend_padded"] = [r.tokens for r in both]
        from pyllama.engine import Engine

        with Engine(vk, n_slots=2, n_ctx=256, n_threads=2, sampling="backend") as engine:
            reqs = [engine.submit(PROMPT, max_tokens=N_PREDICT) for _ in range(2)]
            out["engine_backend_padded"] = [[int(e.token) for e in r if e.token >= 0] for r in reqs]
    return out


def _child_media(text: str, proj: str, image: str, where: str) -> dict[str, Any]:
    import pyllama

    gpu = where == "vulkan"
    with pyllama.Model(text, n_gpu_layers="all" if gpu else 0) as model:
        p = model.projector(proj, use_gpu=gpu)
        with model.context(n_ctx=256) as ctx:
            mp = p.tokenize(["<|im_start|>user\n", pyllama.Image(image), "describe<|im_end|>\n<|im_start|>assistant\n"])
            with pyllama.generate(ctx, mp, max_tokens=N_PREDICT) as gen:
                tokens = [ev.token for ev in gen]
        return {"tokens": tokens, "projector_gpu": p.use_gpu, "n_media_tokens": mp.n_media_tokens}


def _child_need(model_path: str, n_ctx: str) -> dict[str, Any]:
    from pyllama.fit import model_need

    return dict(model_need(model_path, n_ctx=int(n_ctx)))


def _child_main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "devices":
        result = _child_devices()
    elif mode == "generate":
        result = _child_generate(argv[1], argv[2])
    elif mode == "fit":
        result = _child_fit(argv[1], argv[2])
    elif mode == "sampling":
        result = _child_sampling(argv[1], argv[2])
    elif mode == "media":
        result = _child_media(argv[1], argv[2], argv[3], argv[4])
    elif mode == "need":
        result = _child_need(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
