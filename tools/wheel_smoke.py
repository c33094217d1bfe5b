"""Smoke test for an installed pyllama wheel: import, devices, a short greedy generation.

    python tools/wheel_smoke.py [--model M.gguf ...] [--expect-backend cpu-all|cuda|vulkan|metal]
                                [--require-device Vulkan] [--tokens 8]

Run from a fresh virtual environment with the wheel installed (tools/build_wheel.sh,
tools/ci_vulkan.sh, cibuildwheel's test-command). It writes two synthetic models
with tests/synth.py (needs the ``gguf`` package) into a temporary directory, one
f32 and one Q4_0 (quantized matrices take other kernels: repacked, AVX-512 VNNI,
AMX), and generates with each, then with every --model given. It talks to the binding through pyllama's import seam
(``pyllama._ffi``: the package's backends are loaded on import), so it checks
the installed libraries themselves, not a particular high-level API.

It fails when: the import fails or needs LD_LIBRARY_PATH; no CPU device is
listed; the wheel was built for another backend than --expect-backend; a
``--require-device`` backend lists no device; or greedy generation does not
produce --tokens tokens. An accelerator wheel on a machine without that
accelerator passes (its backend library may fail to load: the CPU takes over),
which is exactly what users without the GPU get.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _seam() -> tuple[Any, Any, Path]:
    """ffi, lib and the package's lib/ directory, with every backend loaded."""
    import pyllama._cffi as cmod

    lib_dir = Path(os.path.abspath(cmod.__file__)).parent / "lib"
    try:
        from pyllama._ffi import ffi, lib  # the seam loads the package's backends
    except ModuleNotFoundError as exc:
        if exc.name != "pyllama._ffi":
            raise
        from pyllama._cffi import ffi, lib

        lib.llama_backend_init()
        lib.ggml_backend_load_all_from_path(str(lib_dir).encode())
    return ffi, lib, lib_dir


def _build_info(ffi: Any, lib: Any) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(ffi.string(lib.pyllama_build_info()).decode())
    return info


def _devices(ffi: Any, lib: Any) -> list[dict[str, str]]:
    import pyllama

    return [{"name": d.name, "description": d.description, "type": d.type, "backend": d.backend}
            for d in pyllama.devices()]


def _write_models(directory: Path) -> list[Path]:
    for cand in (HERE.parent / "tests", Path.cwd() / "tests"):
        if (cand / "synth.py").is_file():
            sys.path.insert(0, str(cand))
            import synth

            return [synth.write_llama_model(directory / f"synth-{dtype}.gguf", dtype=dtype)
                    for dtype in ("f32", "q4_0")]
    raise SystemExit("smoke: tests/synth.py not found")


def _generate(ffi: Any, lib: Any, model_path: Path, n_predict: int) -> list[int]:
    import numpy as np

    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0  # the CPU path every wheel has; accelerators are tested elsewhere
    model = lib.llama_model_load_from_file(str(model_path).encode(), mparams)
    if model == ffi.NULL:
        raise SystemExit(f"smoke: llama_model_load_from_file failed for {model_path}")
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = 128
    cparams.n_batch = 64
    cparams.n_threads = cparams.n_threads_batch = min(4, os.cpu_count() or 1)
    ctx = lib.llama_init_from_model(model, cparams)
    if ctx == ffi.NULL:
        raise SystemExit("smoke: llama_init_from_model failed")
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    text = b"Hello world"
    buf = ffi.new("llama_token[]", 64)
    n = lib.llama_tokenize(vocab, text, len(text), buf, 64, True, False)
    if n <= 0:
        raise SystemExit(f"smoke: llama_tokenize returned {n}")
    pending = [buf[i] for i in range(n)]
    out: list[int] = []
    for _ in range(n_predict):
        arr = ffi.new("llama_token[]", pending)
        rc = lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(pending)))
        if rc != 0:
            raise SystemExit(f"smoke: llama_decode returned {rc}")
        row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * n_vocab), dtype=np.float32)
        tok = int(np.argmax(row))
        out.append(tok)
        pending = [tok]
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="a further GGUF model to generate with (repeatable)")
    parser.add_argument("--expect-backend", default=os.environ.get("PYLLAMA_BACKEND") or None,
                        help="the PYLLAMA_BACKEND the wheel must have been built with (default: $PYLLAMA_BACKEND)")
    parser.add_argument("--require-device", action="append", default=[],
                        help="a backend name (Vulkan, CUDA, Metal) that must list a device")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)

    if os.environ.get("LD_LIBRARY_PATH"):
        print(f"smoke: note: LD_LIBRARY_PATH={os.environ['LD_LIBRARY_PATH']} is set", file=sys.stderr)
    t0 = time.perf_counter()
    import pyllama

    ffi, lib, lib_dir = _seam()
    print(f"smoke: imported pyllama from {Path(pyllama.__file__).parent} in {time.perf_counter() - t0:.2f}s")
    info = _build_info(ffi, lib)
    print(f"smoke: build: backend={info.get('backend')} libraries={info.get('backend_libraries')} "
          f"llama.cpp={str(info.get('llama_commit'))[:9]}")
    shipped = sorted(p.name for p in lib_dir.iterdir() if p.suffix in (".so", ".dylib", ".dll"))
    print(f"smoke: {lib_dir}: {' '.join(shipped)}")
    if args.expect_backend and info.get("backend") != args.expect_backend:
        raise SystemExit(f"smoke: wheel built for {info.get('backend')!r}, expected {args.expect_backend!r}")
    if not any("mtmd" in n for n in shipped) or ffi.string(lib.mtmd_default_marker()) != b"<__media__>":
        raise SystemExit("smoke: libmtmd (images and audio) is missing from the wheel")
    if info.get("backend") == "cpu-all" and not any(n.startswith(("libggml-cpu-", "ggml-cpu-")) for n in shipped):
        raise SystemExit("smoke: a cpu-all wheel without ggml-cpu-* variant modules")

    print(f"smoke: system info: {ffi.string(lib.llama_print_system_info()).decode().strip()}")
    devs = _devices(ffi, lib)
    for d in devs:
        print(f"smoke: device {d['name']:<10} {d['type']:<5} {d['backend']:<8} {d['description']}")
    if not any(d["type"] == "cpu" for d in devs):
        raise SystemExit("smoke: no CPU device listed (no ggml-cpu variant loaded?)")
    for backend in args.require_device:
        if not any(d["backend"].lower() == backend.lower() for d in devs):
            raise SystemExit(f"smoke: no {backend} device listed")

    with tempfile.TemporaryDirectory() as tmp:
        for model in _write_models(Path(tmp)) + args.model:
            t1 = time.perf_counter()
            toks = _generate(ffi, lib, model, args.tokens)
            print(f"smoke: {model.name}: greedy {len(toks)} tokens in {time.perf_counter() - t1:.2f}s: {toks}",
                  flush=True)
            if len(toks) != args.tokens:
                raise SystemExit(f"smoke: short generation with {model}")
    print("smoke: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
