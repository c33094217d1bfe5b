"""Saved state is untrusted input: truncated, bit-flipped or foreign state gives StateError, never a crash.

The mutants are made from a real saved state (whole context and one sequence,
bytes and files). They run in a child process so that a regression fails the
test instead of killing the test run; the child reports every outcome.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pyllama
import synth
from pyllama._ffi import ffi, lib
from pyllama.state import _HEADER

PROMPT = "Hello world, the people of the world"


def _mutants(blob: bytes, n_flips: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = [("empty", b"")]
    cuts = sorted({1, 4, 7, 8, 12, _HEADER.size - 1, _HEADER.size, _HEADER.size + 1, len(blob) - 1,
                   *(rng.randrange(1, len(blob)) for _ in range(40))})
    out += [(f"truncate@{c}", blob[:c]) for c in cuts if c < len(blob)]
    out.append(("padded", blob + b"\0"))
    for i in range(n_flips):
        b = bytearray(blob)
        # Half the flips in the header and llama.cpp's metadata, half anywhere.
        pos = rng.randrange(min(len(b), _HEADER.size + 64)) if i % 2 else rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        out.append((f"flip@{pos}", bytes(b)))
    return out


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyllama
    model_path, corpus_dir = sys.argv[1], sys.argv[2]
    names = json.load(open(corpus_dir + "/index.json"))
    results = {}
    with pyllama.Model(model_path, n_gpu_layers=0) as m, m.context(n_ctx=64, n_seq_max=2, n_threads=1) as ctx:
        toks = m.tokenize(%(prompt)r)
        for name, kind in names:
            path = corpus_dir + "/" + name
            data = open(path, "rb").read()
            try:
                if kind == "bytes":
                    ctx.state.load(data)
                elif kind == "seq_bytes":
                    ctx.state.load_seq(data, 1)
                elif kind == "file":
                    ctx.state.load_file(path)
                else:
                    ctx.state.load_seq_file(path, 1)
                outcome = "loaded"
            except pyllama.StateError:
                outcome = "StateError"
            except Exception as exc:
                outcome = "other:" + type(exc).__name__ + ": " + str(exc)
            results[name] = outcome
            # The context must stay usable whatever happened.
            ctx.kv.clear()
            ctx.evaluate(toks)
            pyllama.generate_text(ctx, toks, max_tokens=2)
    print(json.dumps(results))
""") % {"prompt": PROMPT}


def _run_child(model_path: Path, corpus: Path) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model_path), str(corpus)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert proc.returncode == 0, f"child died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def saved(synth_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("state")
    with pyllama.Model(synth_model_path) as m, m.context(n_ctx=64, n_seq_max=2, n_threads=1) as ctx:
        toks = m.tokenize(PROMPT)
        ctx.evaluate(toks)
        ctx.state.save_file(d / "ctx.state", toks)
        ctx.state.save_seq_file(d / "seq.state", 0, toks)
        # llama.cpp's own session files, as other tools write them
        lib.llama_state_save_file(ctx._p(), os.fsencode(d / "llama.session"), ffi.from_buffer("llama_token[]", toks),
                                  toks.size)
        lib.llama_state_seq_save_file(ctx._p(), os.fsencode(d / "llama.seq"), 0,
                                      ffi.from_buffer("llama_token[]", toks), toks.size)
        return {"bytes": ctx.state.save(), "seq_bytes": ctx.state.save_seq(0),
                "file": (d / "ctx.state").read_bytes(), "seq_file": (d / "seq.state").read_bytes(),
                "llama_file": (d / "llama.session").read_bytes(), "llama_seq_file": (d / "llama.seq").read_bytes()}


def test_mutated_pyllama_state_is_always_refused(saved: dict[str, bytes], synth_model_path: Path,
                                                 tmp_path: Path) -> None:
    index = []
    for kind in ("bytes", "seq_bytes", "file", "seq_file"):
        for i, (name, data) in enumerate(_mutants(saved[kind], n_flips=60, seed=len(kind))):
            fname = f"{kind}-{i:03d}-{name}"
            (tmp_path / fname).write_bytes(data)
            index.append((fname, kind))
        (tmp_path / f"{kind}-intact").write_bytes(saved[kind])
        index.append((f"{kind}-intact", kind))
    (tmp_path / "index.json").write_text(json.dumps(index))
    results = _run_child(synth_model_path, tmp_path)
    assert len(results) == len(index)
    for kind in ("bytes", "seq_bytes", "file", "seq_file"):
        assert results.pop(f"{kind}-intact") == "loaded"
    # Every truncation and every bit flip is caught: the container has a checksum.
    assert {v for v in results.values()} == {"StateError"}, {k: v for k, v in results.items() if v != "StateError"}


def test_mutated_llama_cpp_state_never_crashes(saved: dict[str, bytes], synth_model_path: Path,
                                               tmp_path: Path) -> None:
    """llama.cpp's own formats carry no checksum: a flipped KV value may load, but nothing crashes."""
    raw = saved["bytes"][_HEADER.size:]  # the llama.cpp payload inside the container
    raw_seq = saved["seq_bytes"][_HEADER.size:]
    index = []
    for kind, label, blob in (("bytes", "raw", raw), ("seq_bytes", "raw_seq", raw_seq),
                              ("file", "llama_file", saved["llama_file"]),
                              ("seq_file", "llama_seq_file", saved["llama_seq_file"])):
        for i, (name, data) in enumerate(_mutants(blob, n_flips=60, seed=7)):
            fname = f"{label}-{i:03d}-{name}"
            (tmp_path / fname).write_bytes(data)
            index.append((fname, kind))
        (tmp_path / f"{label}-intact").write_bytes(blob)
        index.append((f"{label}-intact", kind))
    (tmp_path / "index.json").write_text(json.dumps(index))
    results = _run_child(synth_model_path, tmp_path)
    for label in ("raw", "raw_seq", "llama_file", "llama_seq_file"):
        assert results.pop(f"{label}-intact") == "loaded", label
    others = {k: v for k, v in results.items() if v not in ("StateError", "loaded")}
    assert not others
    truncated = {k: v for k, v in results.items() if "truncate" in k or "empty" in k}
    assert set(truncated.values()) == {"StateError"}, truncated


def test_state_from_another_shape_is_refused(saved: dict[str, bytes], synth_model_path: Path, tmp_path: Path) -> None:
    with pyllama.Model(synth_model_path) as m:
        with m.context(n_ctx=64, n_seq_max=2, type_k="f32", n_threads=1) as ctx:
            with pytest.raises(pyllama.StateError, match="K cache type"):
                ctx.state.load(saved["bytes"])
        with m.context(n_ctx=64, n_seq_max=1, n_threads=1) as ctx:
            with pytest.raises(pyllama.StateError, match="n_seq_max"):
                ctx.state.load(saved["bytes"])
            with pytest.raises(pyllama.StateError, match="n_seq_max"):  # llama.cpp: one KV stream per sequence
                ctx.state.load_seq(saved["seq_bytes"], 0)
        with m.context(n_ctx=1024, n_seq_max=2, n_threads=1) as big:  # 512 cells per sequence
            big.decode(pyllama.Batch.from_tokens(m.tokenize(PROMPT), 400))
            far = big.state.save_seq(0)
        with m.context(n_ctx=512, n_seq_max=2, n_threads=1) as ctx:  # 256 cells per sequence
            with pytest.raises(pyllama.StateError, match="positions up to 4"):
                ctx.state.load_seq(far, 0)
            with pytest.raises(pyllama.StateError, match="whole-context"):
                ctx.state.load_seq(saved["bytes"], 0)
    other_path = synth.write_llama_model(tmp_path / "other.gguf", n_embd=32, n_ff=64)
    with pyllama.Model(other_path) as other, other.context(n_ctx=64, n_seq_max=2, n_threads=1) as ctx:
        with pytest.raises(pyllama.StateError, match="parameter count|embedding size"):
            ctx.state.load(saved["bytes"])


def test_llama_cpp_session_files_still_load(saved: dict[str, bytes], synth_model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(saved["llama_file"])
    (tmp_path / "q").write_bytes(saved["llama_seq_file"])
    with pyllama.Model(synth_model_path) as m, m.context(n_ctx=64, n_seq_max=2, n_threads=1) as ctx:
        toks = m.tokenize(PROMPT)
        assert np.array_equal(ctx.state.load_file(tmp_path / "s"), toks)
        assert np.array_equal(ctx.state.load_seq_file(tmp_path / "q", 1), toks)
        assert ctx.kv.pos_range(1) == (0, toks.size - 1)
