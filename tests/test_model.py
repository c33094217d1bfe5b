"""Model loading, metadata, lifetimes and clear errors."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

import pyllama


def test_load_and_facts(synth_model_path: Path) -> None:
    with pyllama.Model(synth_model_path) as m:
        assert m.architecture == "llama"
        assert m.n_layer == 2 and m.n_embd == 64 and m.n_ctx_train == 512
        assert m.n_params > 0 and m.size > 0
        assert m.metadata["general.architecture"] == "llama"
        assert "tokenizer.ggml.model" in m.metadata
        assert "im_start" in (m.chat_template() or "")
        assert m.n_gpu_layers == 0  # "auto" on a CPU-only machine


def test_progress_callback_and_cancel(synth_model_path: Path) -> None:
    seen: list[float] = []
    with pyllama.Model(synth_model_path, progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)
    with pytest.raises(pyllama.ModelLoadError, match="cancelled"):
        pyllama.Model(synth_model_path, progress=lambda v: False)


def test_progress_callback_error_is_reraised(synth_model_path: Path) -> None:
    def boom(_: float) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pyllama.Model(synth_model_path, progress=boom)


def test_kv_override_and_vocab_only(synth_model_path: Path) -> None:
    with pyllama.Model(synth_model_path, vocab_only=True, kv_overrides={"llama.context_length": 128}) as m:
        assert m.vocab.n_tokens == 590
        assert m.tokenize("hello").size > 0


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(pyllama.ModelLoadError, match="not found"):
        pyllama.Model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.Model(bad)


def test_closed_model_and_context_raise(synth_model_path: Path) -> None:
    m = pyllama.Model(synth_model_path)
    ctx = m.context(n_ctx=64)
    m.close()  # closes the context first
    assert ctx.closed and m.closed
    with pytest.raises(pyllama.ClosedError):
        m.tokenize("x")
    with pytest.raises(pyllama.ClosedError):
        ctx.logits()
    with pytest.raises(pyllama.ClosedError):
        pyllama.generate_text(ctx, "x", max_tokens=2)
    m.close()  # idempotent


def test_context_keeps_model_alive(synth_model_path: Path) -> None:
    ctx = pyllama.Model(synth_model_path).context(n_ctx=64)
    gc.collect()
    assert pyllama.generate_text(ctx, "Hello", max_tokens=3)
    ctx.close()


def test_bad_parameters(synth_model_path: Path) -> None:
    with pytest.raises(ValueError):
        pyllama.Model(synth_model_path, n_gpu_layers="many")  # type: ignore[arg-type]
    with pyllama.Model(synth_model_path) as m:
        with pytest.raises(ValueError):
            m.context(flash_attn="sometimes")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            m.context(type_k="q9_9")
        with pytest.raises(ValueError):
            m.context(n_seq_max=100000)
