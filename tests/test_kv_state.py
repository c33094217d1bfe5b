"""KV-cache edits and state save/restore reproduce a fresh evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pyllama



def _fresh_logits(model: pyllama.Model, tokens: np.ndarray) -> np.ndarray:
    with model.context(n_ctx=256, n_seq_max=2) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(tokens))
        return np.array(ctx.logits(-1))


def _greedy(model: pyllama.Model, ctx: pyllama.Context, n: int, seq: int = 0) -> list[int]:
    out = []
    pos = ctx.kv.next_pos(seq)
    chain = pyllama.SamplerChain([pyllama.Greedy()], model)
    for _ in range(n):
        tok = chain.sample(ctx, -1)
        out.append(tok)
        ctx.decode(pyllama.Batch.from_tokens([tok], pos, seq))
        pos += 1
    chain.close()
    return out


def test_remove_then_generate_matches_fresh(model: pyllama.Model) -> None:
    a = model.tokenize("Hello world the cat")
    b = model.tokenize("Hello world", add_special=True)
    tail = model.tokenize(" über café", add_special=False)
    with model.context(n_ctx=256) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(a))
        ctx.kv.remove(0, b.size, -1)  # keep "Hello world"
        assert ctx.kv.pos_range(0) == (0, b.size - 1)
        ctx.decode(pyllama.Batch.from_tokens(tail, b.size, 0))
        got = np.array(ctx.logits(-1))
        gen = _greedy(model, ctx, 6)
    full = np.concatenate([b, tail])
    assert np.allclose(got, _fresh_logits(model, full), atol=1e-4)
    with model.context(n_ctx=256) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(full))
        assert _greedy(model, ctx, 6) == gen


def test_copy_sequence_matches_fresh(model: pyllama.Model) -> None:
    toks = model.tokenize("Le café est très bon")
    more = model.tokenize(" the", add_special=False)
    with model.context(n_ctx=256, n_seq_max=2, kv_unified=True) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(toks, 0, 0))
        ctx.kv.copy(0, 1)
        assert ctx.kv.pos_range(1) == ctx.kv.pos_range(0)
        ctx.kv.keep(1)
        assert ctx.kv.pos_range(0) is None
        ctx.decode(pyllama.Batch.from_tokens(more, toks.size, 1))
        got = np.array(ctx.logits(-1))
    assert np.allclose(got, _fresh_logits(model, np.concatenate([toks, more])), atol=1e-4)


def test_shift_matches_fresh(model: pyllama.Model) -> None:
    """Tokens evaluated at an offset and shifted back behave like a fresh evaluation.

    (Dropping a middle span and shifting the rest is llama.cpp's approximate
    context shift: the kept tokens were computed attending to the dropped ones,
    so only a whole-sequence shift can match a fresh evaluation exactly.)
    """
    toks = model.tokenize("Hello world the cat sat")
    offset = 37
    with model.context(n_ctx=256) as ctx:
        assert ctx.kv.can_shift
        ctx.decode(pyllama.Batch.from_tokens(toks, offset, 0))
        ctx.kv.shift(0, offset, -1, -offset)
        assert ctx.kv.pos_range(0) == (0, toks.size - 1)
        nxt = model.tokenize(" as", add_special=False)
        ctx.decode(pyllama.Batch.from_tokens(nxt, toks.size, 0))
        got = np.array(ctx.logits(-1))
        gen = _greedy(model, ctx, 5)
    fresh_tokens = np.concatenate([toks, nxt])
    assert np.allclose(got, _fresh_logits(model, fresh_tokens), atol=2e-3)
    with model.context(n_ctx=256) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(fresh_tokens))
        assert _greedy(model, ctx, 5) == gen


def test_divide_and_bad_sequence_ids(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(model.tokenize("Hello world the cat")))
        n = ctx.kv.next_pos(0)
        ctx.kv.divide(0, 0, -1, 2)
        assert ctx.kv.pos_range(0)[1] == (n - 1) // 2
        with pytest.raises(ValueError):
            ctx.kv.remove(5)
        with pytest.raises(ValueError):
            ctx.kv.copy(0, 7)
        with pytest.raises(ValueError):
            ctx.kv.pos_range(-3)


def test_state_bytes_and_file_restore_next_logits(model: pyllama.Model, tmp_path: Path) -> None:
    toks = model.tokenize("Hello world the cat")
    with model.context(n_ctx=256) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(toks))
        expected = np.array(ctx.logits(-1))
        blob = ctx.state.save()
        ctx.state.save_file(tmp_path / "ctx.state", toks)
        seq_blob = ctx.state.save_seq(0)
        ctx.state.save_seq_file(tmp_path / "seq.state", 0, toks)
        nxt = int(np.argmax(expected))
        ctx.decode(pyllama.Batch.from_tokens([nxt], toks.size))
        expected_next = np.array(ctx.logits(-1))
    for restore in ("bytes", "file", "seq_bytes", "seq_file"):
        with model.context(n_ctx=256) as ctx:
            if restore == "bytes":
                ctx.state.load(blob)
            elif restore == "file":
                assert np.array_equal(ctx.state.load_file(tmp_path / "ctx.state"), toks)
            elif restore == "seq_bytes":
                ctx.state.load_seq(seq_blob, 0)
            else:
                assert np.array_equal(ctx.state.load_seq_file(tmp_path / "seq.state", 0), toks)
            assert ctx.kv.pos_range(0) == (0, toks.size - 1)
            ctx.decode(pyllama.Batch.from_tokens([nxt], toks.size))
            assert np.allclose(ctx.logits(-1), expected_next, atol=1e-5), restore


def test_bad_state_is_refused(model: pyllama.Model, tmp_path: Path) -> None:
    with model.context(n_ctx=256) as ctx:
        with pytest.raises(pyllama.StateError):
            ctx.state.load(b"\x00" * 16)
        with pytest.raises(pyllama.StateError):
            ctx.state.load_file(tmp_path / "missing.state")
        assert pyllama.generate_text(ctx, "Hello", max_tokens=2)


def test_prefix_reuse_evaluates_only_new_tokens(model: pyllama.Model) -> None:
    base = "Hello world the cat sat on"
    with model.context(n_ctx=256) as ctx:
        first = pyllama.generate(ctx, base, max_tokens=4)
        list(first)
        n_prompt = model.tokenize(base).size
        assert first.n_prompt_evaluated == n_prompt
        ctx.reset_perf()
        longer = base + " und die"
        second = pyllama.generate(ctx, longer, max_tokens=4)
        list(second)
        extra = model.tokenize(longer).size - n_prompt
        assert second.n_prompt_evaluated == extra
        perf = ctx.perf()
        # prompt tokens decoded = only the new suffix (counted by llama.cpp itself)
        assert perf.n_p_eval + perf.n_eval == extra + 3
        reused = list(pyllama.generate(ctx, longer, max_tokens=4))
        with model.context(n_ctx=256) as fresh:
            assert [e.token for e in pyllama.generate(fresh, longer, max_tokens=4)] == [e.token for e in reused]
