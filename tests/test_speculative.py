"""Speculative decoding through llama.cpp's drafters: the same tokens as plain generation, fewer target decodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pyllama
import synth

# The synthetic model's greedy output soon repeats itself: n-gram lookup finds drafts in it.
PROMPT = "the cat and the dog and the cat and the dog and the cat"


@pytest.fixture(scope="module")
def draft_model(synth_dir: Path, synth_model_path: Path) -> Iterator[pyllama.Model]:
    # The target's weights (same seed) stored as q8_0: a draft that mostly agrees with the target.
    path = synth.write_llama_model(synth_dir / "llama-q8.gguf", dtype="q8_0")
    with pyllama.Model(path) as m:
        yield m


@pytest.fixture(scope="module")
def other_model(synth_dir: Path) -> Iterator[pyllama.Model]:
    path = synth.write_llama_model(synth_dir / "llama-other.gguf", n_layer=1, seed=99)
    with pyllama.Model(path) as m:
        yield m


def plain(ctx: pyllama.Context, prompt: str = PROMPT, **options: object) -> pyllama.Generation:
    with pyllama.generate(ctx, prompt, reuse_prefix=False, **options) as gen:  # type: ignore[arg-type]
        list(gen)
    return gen


def speculative(ctx: pyllama.Context, draft: object, prompt: str = PROMPT, **options: object) -> tuple[
        pyllama.Generation, list[pyllama.TokenEvent]]:
    with pyllama.generate(ctx, prompt, draft=draft, reuse_prefix=False, **options) as gen:  # type: ignore[arg-type]
        events = list(gen)
    return gen, events


# llama.cpp's ngram-simple/-map-k defaults look for 12-token keys followed by 48 tokens (long edits):
# shorter ones find the repeats of this short output
SMALL = {"ngram_size_n": 2, "ngram_size_m": 8}


@pytest.mark.parametrize("kind, options", [("ngram", {}), ("lookup", {}), ("ngram-cache", {}), ("ngram-mod", {}),
                                           ("ngram-simple", SMALL), ("ngram-map-k", SMALL),
                                           ("ngram-map-k4v", SMALL)])
def test_ngram_drafts_give_the_greedy_tokens(model: pyllama.Model, kind: str, options: dict[str, int]) -> None:
    with model.context(n_ctx=512) as ctx:
        ref = plain(ctx, max_tokens=120)
        with pyllama.Speculator(ctx, kind, **options) as spec:
            gen, events = speculative(ctx, spec, max_tokens=120)
        assert np.array_equal(gen.tokens, ref.tokens) and gen.text == ref.text
        assert gen.finish_reason == ref.finish_reason == "length"
        assert "".join(e.text for e in events) == gen.text
        assert [e.index for e in events if e.token >= 0] == list(range(120))
        st = gen.speculative
        assert st is not None and st.n_accepted <= st.n_drafted
        if kind != "ngram-cache":  # llama.cpp's ngram-cache type learns from the prompt alone (see speculative.cpp)
            assert st.n_drafted > 0 and st.n_accepted > 0, st
        # the cache holds the prompt and what was generated but the last token, as after plain generation
        cached = ctx.cached_tokens(0)
        want = np.concatenate([model.tokenize(PROMPT, parse_special=True), gen.tokens[:-1]])
        assert cached is not None and np.array_equal(cached, want)
        assert ctx.kv.pos_range(0) == (0, want.size - 1)


def test_draft_model_gives_the_greedy_tokens(model: pyllama.Model, draft_model: pyllama.Model) -> None:
    with model.context(n_ctx=512) as ctx:
        ref = plain(ctx, max_tokens=80)
        with pyllama.Speculator(ctx, draft_model, n_max=6) as spec:
            for _ in range(2):  # a speculator serves several generations; its draft context follows the target
                gen, _ = speculative(ctx, spec, max_tokens=80)
                assert np.array_equal(gen.tokens, ref.tokens)
                st = gen.speculative
                assert st is not None and st.n_drafts > 0 and st.n_accepted > 0.5 * st.n_drafted, st
                assert st.acceptance_rate == st.n_accepted / st.n_drafted
                dctx = spec.draft_context
                assert dctx is not None and dctx.n_seq_max == ctx.n_seq_max
                assert np.array_equal(dctx.cached_tokens(0), ctx.cached_tokens(0))
            draft_ctx = spec.draft_context
        assert spec.closed and draft_ctx is not None and draft_ctx.closed
        with pytest.raises(pyllama.ClosedError):
            speculative(ctx, spec, max_tokens=4)


def test_a_weak_draft_model_changes_nothing(model: pyllama.Model, other_model: pyllama.Model) -> None:
    with model.context(n_ctx=512) as ctx:
        ref = plain(ctx, max_tokens=40)
        gen, _ = speculative(ctx, other_model, max_tokens=40)
        assert np.array_equal(gen.tokens, ref.tokens)
        assert gen.speculative is not None and gen.speculative.n_drafted > 0


def test_limits_stops_logprobs_and_seeded_sampling_match(model: pyllama.Model) -> None:
    with model.context(n_ctx=512) as ctx:
        for n in (1, 2, 7, 33):
            assert speculative(ctx, "ngram-simple", max_tokens=n)[0].n_generated == n
        ref = plain(ctx, max_tokens=60)
        stop = ref.text[len(ref.text) // 2:][:3]
        want = plain(ctx, max_tokens=60, stop=[stop])
        got, _ = speculative(ctx, "ngram-simple", max_tokens=60, stop=[stop])
        assert got.finish_reason == want.finish_reason == "stop" and got.text == want.text
        a = plain(ctx, max_tokens=30, logprobs=True, top_logprobs=3)
        b, events = speculative(ctx, "ngram-simple", max_tokens=30, logprobs=True, top_logprobs=3)
        ref_events = list(pyllama.generate(ctx, PROMPT, max_tokens=30, logprobs=True, top_logprobs=3,
                                           reuse_prefix=False))
        assert [e.token for e in events] == [e.token for e in ref_events]
        got_lp = np.array([e.logprob for e in events if e.token >= 0])
        want_lp = np.array([e.logprob for e in ref_events if e.token >= 0])
        np.testing.assert_allclose(got_lp, want_lp, atol=1e-4)
        assert np.array_equal(a.tokens, b.tokens)
        # the chain samples the same rows in the same order: seeded sampling draws the same tokens
        chain = [pyllama.TopK(20), pyllama.Temp(0.8), pyllama.Dist(7)]
        s1 = plain(ctx, max_tokens=50, sampler=chain)
        s2, _ = speculative(ctx, "ngram-simple", max_tokens=50, sampler=chain)
        assert np.array_equal(s1.tokens, s2.tokens)


def test_full_context_ends_the_stream(model: pyllama.Model) -> None:
    with model.context(n_ctx=64) as ctx:
        ref = plain(ctx, max_tokens=None)
        gen, _ = speculative(ctx, "ngram-simple", max_tokens=None)
        assert gen.finish_reason == ref.finish_reason
        assert np.array_equal(gen.tokens, ref.tokens)


def test_other_sequences_are_untouched(model: pyllama.Model) -> None:
    with model.context(n_ctx=512, n_seq_max=2) as ctx:
        ctx.evaluate(model.tokenize("Hello world"), seq_id=0)
        before = ctx.kv.pos_range(0)
        ref = plain(ctx, max_tokens=40, seq_id=1)
        gen, _ = speculative(ctx, "ngram", max_tokens=40, seq_id=1)
        assert np.array_equal(gen.tokens, ref.tokens)
        assert ctx.kv.pos_range(0) == before


def test_bad_arguments_are_refused(model: pyllama.Model, draft_model: pyllama.Model) -> None:
    with model.context(n_ctx=256, n_batch=32) as ctx, model.context(n_ctx=256) as other:
        with pytest.raises(ValueError, match="ngram"):
            pyllama.Speculator(ctx, "lookahead")
        with pytest.raises(ValueError, match="n_max"):
            pyllama.Speculator(ctx, "ngram", n_max=0)
        with pytest.raises(ValueError, match="n_batch"):
            pyllama.Speculator(ctx, "ngram", n_max=40)
        with pytest.raises(ValueError, match="n_min"):
            pyllama.Speculator(ctx, "ngram", n_max=4, n_min=5)
        with pytest.raises(ValueError, match="target model"):
            pyllama.Speculator(ctx, model)
        with pytest.raises(TypeError):
            pyllama.Speculator(ctx, 3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ngram_size_n"):
            pyllama.Speculator(ctx, "ngram-simple", ngram_size_n=0)
        with pytest.raises(ValueError, match="context_shift"):
            pyllama.generate(ctx, PROMPT, draft="ngram", context_shift=True)
        with pyllama.Speculator(other, "ngram") as spec, pytest.raises(ValueError, match="another context"):
            list(pyllama.generate(ctx, PROMPT, draft=spec, max_tokens=4))
        # nothing above broke the context
        assert plain(ctx, max_tokens=5).n_generated == 5


def test_closing_the_context_closes_nothing_twice(model: pyllama.Model, draft_model: pyllama.Model) -> None:
    ctx = model.context(n_ctx=256)
    spec = pyllama.Speculator(ctx, draft_model, n_max=4)
    ctx.close()
    with pytest.raises(pyllama.ClosedError):
        speculative(ctx, spec, max_tokens=4)
    spec.close()
    spec.close()
    del spec
