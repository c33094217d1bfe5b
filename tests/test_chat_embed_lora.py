"""Chat templates and sessions, embeddings, LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pyllama



MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_apply_template_jinja_and_legacy_agree_on_chatml(model: pyllama.Model) -> None:
    text = pyllama.apply_template(model, MESSAGES)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    from pyllama.chat import _apply_builtin

    # llama.cpp's legacy renderer (the fallback) writes ChatML the same way
    assert _apply_builtin(model.chat_template() or "", MESSAGES, True) == text


def test_unknown_template_uses_jinja(model: pyllama.Model) -> None:
    tmpl = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"
    assert pyllama.apply_template(model, MESSAGES, template=tmpl) == "[system]Be brief.[user]Hello[bot]"
    with pytest.raises(pyllama.TemplateError):
        pyllama.apply_template(model, MESSAGES, template="{{ raise_exception('no system') }}")


def test_chat_session_reuses_kv_between_turns(model: pyllama.Model) -> None:
    with model.context(n_ctx=512) as ctx:
        chat = pyllama.ChatSession(ctx, system="Be brief.", max_tokens=8)
        first = chat.ask("Hello")
        assert first and chat.messages[-1] == {"role": "assistant", "content": first}
        cached = ctx.cached_tokens(0)
        assert cached is not None and cached.size > 0
        ctx.reset_perf()
        streamed = "".join(ev.text for ev in chat.stream("And then?"))
        perf = ctx.perf()
        # Only the new turn's tokens were evaluated, not the whole conversation again.
        total_prompt = model.tokenize(pyllama.apply_template(model, chat.messages[:-1]), add_special=False,
                                      parse_special=True).size
        assert perf.n_p_eval < total_prompt
        assert streamed == chat.messages[-1]["content"]


def test_embeddings(synth_embedding_model_path: Path) -> None:
    with pyllama.Model(synth_embedding_model_path) as m:
        vecs = pyllama.embed(m, ["Hello world", "Le café", "Hello world"])
        assert vecs.shape == (3, m.n_embd) and vecs.dtype == np.float32
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        assert np.allclose(vecs[0], vecs[2], atol=1e-6)
        assert not np.allclose(vecs[0], vecs[1])
        one = pyllama.embed(m, "Hello world", normalize=False)
        assert one.shape == (m.n_embd,)
        assert np.allclose(one / np.linalg.norm(one), vecs[0], atol=1e-5)
        with m.context(embeddings=True, pooling="mean") as ctx:
            assert np.allclose(pyllama.embed(ctx, "Hello world"), vecs[0], atol=1e-5)


def test_lora_apply_scale_remove(model: pyllama.Model, synth_lora_path: Path) -> None:
    toks = model.tokenize("Hello world")

    def logits(ctx: pyllama.Context) -> np.ndarray:
        ctx.kv.clear()
        ctx.decode(pyllama.Batch.from_tokens(toks))
        return np.array(ctx.logits(-1))

    with model.lora(synth_lora_path) as adapter, model.context(n_ctx=256) as ctx:
        base = logits(ctx)
        ctx.set_lora(adapter, 1.0)
        full = logits(ctx)
        ctx.set_lora(adapter, 0.5)
        half = logits(ctx)
        ctx.remove_lora(adapter)
        again = logits(ctx)
    assert not np.allclose(base, full, atol=1e-3)
    assert not np.allclose(half, full, atol=1e-3)
    assert np.allclose(again, base, atol=1e-5)


def test_lora_for_missing_file(model: pyllama.Model, tmp_path: Path) -> None:
    with pytest.raises(pyllama.ModelLoadError):
        model.lora(tmp_path / "none.gguf")
