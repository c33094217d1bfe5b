"""Quantized weights run through the CPU backend's quantized kernels and stay close to f32.

The f32 synthetic model exercises only float matrix products. Q8_0 and Q4_0
matrices take other code: repacked layouts, AVX-512 VNNI and, on processors
with AMX (as this build machine's), the AMX tile kernels, which a GCC 12
miscompilation once turned into SIGILL (see CMakeLists.txt). A crash there
kills the test process; a wrong kernel shows as logits far from f32's.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import pytest

import pyllama
import synth

PROMPT = "Hello world, this is a test of the quantized kernels in the people of the world."


@pytest.fixture(scope="module")
def models(synth_dir: Path) -> dict[str, Path]:
    return {dtype: synth.write_llama_model(synth_dir / f"llama-{dtype}.gguf", dtype=dtype)
            for dtype in ("f32", "q8_0", "q4_0")}


def _prompt_logits(path: Path, n_threads: int) -> npt.NDArray[np.float32]:
    with pyllama.Model(path) as model, model.context(n_ctx=128, n_batch=128, n_threads=n_threads) as ctx:
        tokens = model.vocab.tokenize(PROMPT)
        assert tokens.size > 16  # enough rows for the multi-row (tile) kernels, not only the 1-row path
        ctx.decode(pyllama.Batch.from_tokens(tokens, logits="all"))
        return np.array(ctx.logits_all())


def test_quantized_files_hold_quantized_matrices(models: dict[str, Path]) -> None:
    for dtype, qtype in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)):
        reader = gguf.GGUFReader(models[dtype])
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == qtype
        assert types["blk.1.ffn_down.weight"] == qtype
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("n_threads", [1, 2])
def test_q8_0_logits_match_f32(models: dict[str, Path], n_threads: int) -> None:
    ref = _prompt_logits(models["f32"], n_threads)
    got = _prompt_logits(models["q8_0"], n_threads)
    assert got.shape == ref.shape
    # Q8_0 keeps ~0.4 % of each weight; over two layers that moves logits of
    # spread ~3 by about 0.1 (measured 0.12). 0.5 leaves room for kernel
    # summation order and still catches any broken kernel.
    assert np.abs(got - ref).max() < 0.5
    np.testing.assert_array_equal(got.argmax(axis=1), ref.argmax(axis=1))


def test_q4_0_logits_follow_f32(models: dict[str, Path]) -> None:
    ref = _prompt_logits(models["f32"], 2)
    got = _prompt_logits(models["q4_0"], 2)
    # 4-bit weights are coarse (measured correlation 0.995), so compare shape,
    # not values: a broken kernel gives uncorrelated logits.
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.98
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() > 0.8


def test_quantized_generation_is_deterministic(models: dict[str, Path]) -> None:
    runs = []
    for _ in range(2):
        with pyllama.Model(models["q4_0"]) as model, model.context(n_ctx=128, n_threads=2) as ctx:
            runs.append([e.token for e in pyllama.generate(ctx, PROMPT, max_tokens=16)])
    assert len(runs[0]) == 16
    assert runs[0] == runs[1]
