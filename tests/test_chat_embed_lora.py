"""Chat templates and sessions, embeddings, LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bench_scripts
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


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.timeout(1800)  # the first use of the native tools builds them (bench/native.py)
@pytest.mark.parametrize("pooling", [None, "cls", "last"])
def test_embeddings_equal_llama_embedding(synth_embedding_model_path: Path, pooling: str | None) -> None:
    """An independent reference: llama.cpp's own llama-embedding on the same model and texts."""
    native = bench_scripts.load("native")
    texts = ["Hello world", "The quick brown fox jumps", "a"]
    cmd = [str(native.native_tool("llama-embedding")), "-m", str(synth_embedding_model_path), "-p", "\n".join(texts),
           "--embd-output-format", "json", "-t", "1", *(["--pooling", pooling] if pooling else [])]
    out = native.run_logged(cmd, lambda o: _is_json(o.stdout))  # its JSON printed whole
    want = np.array([d["embedding"] for d in json.loads(out.stdout)["data"]], dtype=np.float32)
    with pyllama.Model(synth_embedding_model_path) as m:
        got = pyllama.embed(m, texts, pooling=pooling, n_threads=1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)  # llama-embedding prints 7 decimals


def test_embed_token_inputs(synth_embedding_model_path: Path) -> None:
    with pyllama.Model(synth_embedding_model_path) as m:
        toks = m.tokenize("Hello world")
        text, ids, listed = pyllama.embed(m, ["Hello world", toks, toks.tolist()])
        assert np.allclose(text, ids, atol=1e-6) and np.allclose(text, listed, atol=1e-6)
        assert pyllama.embed(m, toks).shape == (m.n_embd,)  # one token sequence is one input
        with pytest.raises(pyllama.TokenizationError, match="outside the vocabulary"):
            pyllama.embed(m, [toks, [1, m.vocab.n_tokens]])
        with pytest.raises(ValueError, match="no tokens"):
            pyllama.embed(m, ["Hello", np.zeros(0, dtype=np.int32)])


def test_rerank(synth_reranker_path: Path, synth_embedding_model_path: Path) -> None:
    from pyllama.rerank import rerank_tokens

    docs = ["A machine", "Learning is", "Paris"]
    with pyllama.Model(synth_reranker_path) as m:
        scores = pyllama.rerank(m, "Machine learning is", docs)
        assert scores.shape == (3,) and scores.dtype == np.float32 and len(set(scores.tolist())) == 3
        toks = rerank_tokens(m, "Machine learning is", "A machine")
        # llama-server's sequence when the model has no rerank template: [BOS] query [EOS] [SEP] doc [EOS],
        # each special token as the vocabulary adds it (this one adds BOS only)
        expect = [m.vocab.bos, *m.tokenize("Machine learning is", add_special=False),
                  *m.tokenize("A machine", add_special=False)]
        assert toks.tolist() == expect
        # a score is the rank-pooled output of that sequence, in any context with rank pooling
        with m.context(embeddings=True, pooling="rank", n_ctx=256) as ctx:
            assert pyllama.embed(ctx, toks).tolist() == pytest.approx([scores[0]], abs=1e-5)
            assert pyllama.rerank(ctx, "Machine learning is", docs) == pytest.approx(scores, abs=1e-5)
        with pytest.raises(ValueError, match="non-empty"):
            pyllama.rerank(m, "q", [])
        with pytest.raises(TypeError):
            pyllama.rerank(m, "q", "one document")  # type: ignore[arg-type]
    with pyllama.Model(synth_embedding_model_path) as e, e.context(embeddings=True, n_ctx=256) as ctx:
        with pytest.raises(ValueError, match="rank"):
            pyllama.rerank(ctx, "q", ["a"])


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
