"""Sampler chains, custom Python samplers, and their errors."""

from __future__ import annotations

from typing import Callable

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


def _top_k(k: int) -> Rule:
    return lambda logits, tok, seen: bool(logits[tok] >= np.sort(logits)[-k])


def _top_n_sigma(n: float) -> Rule:
    # llama.cpp keeps the logits within n standard deviations of the largest
    return lambda logits, tok, seen: bool(logits[tok] >= logits.max() - n * logits.std() - 1e-5)


def _min_p(p: float) -> Rule:
    return lambda logits, tok, seen: bool(logits[tok] >= logits.max() + np.log(p) - 1e-5)


def _greedy_with(bias: dict[int, float] | None = None, forbid_seen: bool = False) -> Rule:
    def rule(logits: np.ndarray, tok: int, seen: list[int]) -> bool:
        want = logits.astype(np.float64)
        for t, b in (bias or {}).items():
            want[t] += b
        if forbid_seen and seen:
            want[seen] = -np.inf
        return tok == int(np.argmax(want))
    return rule


def _anything(logits: np.ndarray, tok: int, seen: list[int]) -> bool:
    return True  # no independent rule: checked for reproducibility only


Rule = Callable[[np.ndarray, int, list[int]], bool]

# Each chain with the rule its choice must obey at every step, computed from the step's logits with numpy.
ALL_SPECS: list[tuple[list[S.Sampler], Rule]] = [
    ([S.TopK(20), S.TopP(0.9), S.MinP(0.05), S.Typical(0.95), S.Temp(0.7), S.Dist(3)], _top_k(20)),
    ([S.TopNSigma(1.5), S.Dist(4)], _top_n_sigma(1.5)),
    ([S.MinP(0.05), S.Dist(5)], _min_p(0.05)),
    ([S.TempExt(0.8, 0.2, 1.0), S.XTC(0.5, 0.1, 1, 4), S.TopNSigma(1.5), S.Dist(4)], _anything),
    ([S.Mirostat(seed=5)], _anything),
    ([S.MirostatV2(seed=6)], _anything),
    ([S.Penalties(64, 1.0, 0.0, 1000.0), S.Greedy()], _greedy_with(forbid_seen=True)),
    ([S.Penalties(32, 1.3, 0.1, 0.1), S.DRY(), S.Dist(7)], _anything),
    ([S.LogitBias({300: 5.0}), S.Greedy()], _greedy_with({300: 5.0})),
    ([S.LogitBias({300: 50.0}), S.Greedy()], _greedy_with({300: 50.0})),
    ([S.AdaptiveP(0.5, 0.9, 8)], _anything),
    ([S.Grammar('root ::= (" the" | " cat")+'), S.Greedy()], _anything),  # tests/test_grammar* check the text
]


def _sample_steps(model: pyllama.Model, specs: list[S.Sampler], n: int = 6) -> tuple[list[int], list[np.ndarray]]:
    """n tokens sampled by a fresh chain, one decode at a time, with a copy of the logits each choice saw."""
    toks: list[int] = []
    seen_logits: list[np.ndarray] = []
    prompt = [int(t) for t in model.tokenize("Hello world the")]
    with model.context(n_ctx=256, n_threads=1) as ctx, pyllama.SamplerChain(specs, model) as chain:
        assert len(chain) == len(specs)
        for _ in range(n):
            ctx.evaluate(prompt + toks)
            seen_logits.append(np.array(ctx.logits(), dtype=np.float32))
            toks.append(chain.sample(ctx))
    return toks, seen_logits


@pytest.mark.parametrize("specs,rule", ALL_SPECS, ids=lambda s: "+".join(type(x).__name__ for x in s)
                         if isinstance(s, list) else "")
def test_every_builtin_sampler_obeys_its_rule(model: pyllama.Model, specs: list[S.Sampler], rule: Rule) -> None:
    """Every built-in sampler runs in a chain, each choice obeys the chain's rule recomputed from that step's
    logits with numpy (top-k, top-n-sigma, min-p, a logit bias, a presence penalty), and a fresh chain with
    the same seeds chooses the same tokens."""
    toks, logits = _sample_steps(model, specs)
    assert len(toks) == 6 and all(0 <= t < model.vocab.n_tokens for t in toks)
    for i, (tok, lg) in enumerate(zip(toks, logits)):
        assert rule(lg, tok, toks[:i]), f"step {i}: token {tok} breaks the rule of {specs}"
    assert _sample_steps(model, specs)[0] == toks


def test_the_rules_above_can_fail(model: pyllama.Model) -> None:
    """The rules are not vacuous: plain greedy breaks the bias rule whose bias changes the choice, and a
    wide random choice breaks top-k."""
    toks, logits = _sample_steps(model, [S.Greedy()], n=1)
    assert not _greedy_with({toks[0]: -100.0})(logits[0], toks[0], [])
    worst = int(np.argmin(logits[0]))
    assert not _top_k(20)(logits[0], worst, [])
    assert not _top_n_sigma(1.5)(logits[0], worst, [])
    assert not _min_p(0.05)(logits[0], worst, [])
    assert not _greedy_with(forbid_seen=True)(logits[0], toks[0], [toks[0]])


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
