"""Sampler chains, custom Python samplers, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pyllama
from pyllama import samplers as S



class PyGreedy(pyllama.CustomSampler):
    selects = True
    name = "py-greedy"

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def apply(self, candidates: pyllama.Candidates) -> None:
        candidates.selected = int(np.argmax(candidates.logits))

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def _tokens(ctx: pyllama.Context, sampler: object, n: int = 12) -> list[int]:
    return [e.token for e in pyllama.generate(ctx, "Hello world the", sampler=sampler, max_tokens=n)
            if e.token >= 0]


def test_custom_python_greedy_matches_builtin(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        builtin = _tokens(ctx, [pyllama.Greedy()])
        custom = PyGreedy()
        ours = _tokens(ctx, [custom])
        assert ours == builtin
        assert custom.accepted == ours  # the chain calls accept() with every sampled token


def test_candidates_are_a_zero_copy_view(model: pyllama.Model) -> None:
    seen: dict[str, object] = {}

    class Probe(pyllama.CustomSampler):
        def apply(self, c: pyllama.Candidates) -> None:
            seen["n"] = c.data.size
            seen["dtype"] = c.data.dtype
            seen["base"] = c.data.base is not None
            c.logits[:] = np.where(c.ids == 300, 1e9, c.logits)  # edit in place: force token 300

    with model.context(n_ctx=256) as ctx:
        toks = _tokens(ctx, [Probe(), pyllama.Greedy()], n=3)
    assert toks == [300, 300, 300]
    assert seen["n"] == model.vocab.n_tokens and seen["dtype"] == pyllama.samplers.TOKEN_DATA


def test_custom_sampler_error_is_raised_not_crashing(model: pyllama.Model) -> None:
    class Broken(pyllama.CustomSampler):
        selects = True

        def apply(self, c: pyllama.Candidates) -> None:
            raise ZeroDivisionError("bad sampler")

    with model.context(n_ctx=256) as ctx:
        with pytest.raises(pyllama.SamplerError, match="ZeroDivisionError"):
            _tokens(ctx, [Broken()])
        assert _tokens(ctx, [pyllama.Greedy()], n=2)


def test_chain_must_end_with_a_selector(model: pyllama.Model) -> None:
    with pytest.raises(pyllama.SamplerError, match="does not select"):
        pyllama.SamplerChain([pyllama.TopK(5), pyllama.Temp(0.5)], model)
    with pytest.raises(pyllama.SamplerError, match="needs the model"):
        pyllama.SamplerChain([pyllama.Grammar('root ::= "a"'), pyllama.Greedy()])


ALL_SPECS = [
    [S.TopK(20), S.TopP(0.9), S.MinP(0.05), S.Typical(0.95), S.Temp(0.7), S.Dist(3)],
    [S.TempExt(0.8, 0.2, 1.0), S.XTC(0.5, 0.1, 1, 4), S.TopNSigma(1.5), S.Dist(4)],
    [S.Mirostat(seed=5)],
    [S.MirostatV2(seed=6)],
    [S.Penalties(32, 1.3, 0.1, 0.1), S.DRY(), S.Dist(7)],
    [S.LogitBias({300: 5.0}), S.Greedy()],
    [S.AdaptiveP(0.5, 0.9, 8)],
    [S.Grammar('root ::= (" the" | " cat")+'), S.Greedy()],
]


@pytest.mark.parametrize("specs", ALL_SPECS, ids=lambda s: "+".join(type(x).__name__ for x in s))
def test_every_builtin_sampler_runs(model: pyllama.Model, specs: list[S.Sampler]) -> None:
    with model.context(n_ctx=256) as ctx:
        chain = pyllama.SamplerChain(specs, model)
        assert len(chain) == len(specs)
        toks = _tokens(ctx, chain, n=6)
        chain.close()
    assert len(toks) == 6 and all(0 <= t < model.vocab.n_tokens for t in toks)


def test_grammar_constrains_output(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        text = pyllama.generate_text(ctx, "Hello", sampler=[S.Grammar('root ::= (" the" | " cat")+'), S.Greedy()],
                                     max_tokens=6)
    # Complete words, except perhaps the last one cut by max_tokens.
    rest = text.replace(" the", "").replace(" cat", "")
    assert text and (rest == "" or " the".startswith(rest) or " cat".startswith(rest))


def test_seeded_dist_is_reproducible(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        a = _tokens(ctx, pyllama.default_chain(temperature=1.0, seed=42))
        b = _tokens(ctx, pyllama.default_chain(temperature=1.0, seed=42))
    assert a == b


def test_invalid_grammar_raises(model: pyllama.Model) -> None:
    with pytest.raises(pyllama.SamplerError):
        pyllama.SamplerChain([S.Grammar("root ::= ((("), S.Greedy()], model)


def test_argmax_paths_pick_llamacpp_greedy_token(model) -> None:  # type: ignore[no-untyped-def]
    """The fused step's SIMD argmax and the engine's numpy argmax choose exactly what llama.cpp's greedy
    sampler chooses (first maximum; a NaN never chosen over index 0), ties and NaNs included."""
    import numpy as np

    from pyllama._ffi import ffi, lib
    from pyllama.stream import SequenceStream

    with model.context(n_ctx=64, n_threads=1) as ctx:
        ctx.evaluate([1, 5, 9])
        chain = pyllama.SamplerChain([pyllama.Greedy()], model)
        stream = SequenceStream(model, [pyllama.Greedy()])
        no_eog = SequenceStream(model, [pyllama.Greedy()], ignore_eos=True)
        eog = [t for t in range(model.vocab.n_tokens) if model.vocab.is_eog(t)]
        p, n_vocab = ctx._p(), model.vocab.n_tokens
        view = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(p, -1), n_vocab * 4), dtype=np.float32)
        step = ffi.new("pyllama_step *")
        step.smpl, step.vocab, step.greedy, step.n_vocab = chain._p(), model.vocab._v(), 1, n_vocab
        rng = np.random.default_rng(0)
        for trial in range(200):
            arr = rng.standard_normal(n_vocab).astype(np.float32)
            if trial % 3 == 0:
                arr[rng.integers(0, n_vocab, 4)] = arr.max()
            if trial % 5 == 0:
                arr[rng.integers(0, n_vocab, 2)] = np.nan
            if trial % 7 == 0:
                arr[0] = np.nan
            view[:] = arr
            expected = lib.llama_sampler_sample(chain._p(), p, -1)
            step.prev = -1
            got = lib.pyllama_step_next(p, step)
            assert step.prev == expected, trial
            assert got == (lib.PYLLAMA_STEP_EOG if model.vocab.is_eog(expected) else expected), trial
            assert stream.sample(p, -1) == expected, trial
            # ignore_eos: greedy over the logits with end-of-generation tokens at -inf
            masked = arr.copy()
            masked[eog] = -np.inf
            view[:] = masked
            expected_no_eog = lib.llama_sampler_sample(chain._p(), p, -1)
            view[:] = arr
            assert no_eog.sample(p, -1) == expected_no_eog, trial
            assert np.array_equal(view, arr, equal_nan=True)  # the logits are left as they were
        stream.close()
        no_eog.close()
        chain.close()
