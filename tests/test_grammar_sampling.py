"""A chain with a grammar samples without it first and asks the grammar about the token drawn only
(src/native/sampling.cpp, as llama.cpp's common_sampler does); the grammar over every candidate runs
only when it refuses that token. The references here drive llama.cpp's own llama_sampler_sample,
which applies the grammar to every candidate, through cffi."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import pyllama
from pyllama._context_access import native
from pyllama._ffi import ffi, lib
from test_json_schema import PERSON  # the schema the JSON-schema tests use

DIGITS = 'root ::= [0-9] [0-9] [0-9] "."'
PROMPT = "Write JSON about the sky:"


@pytest.fixture(scope="module")
def chat(chat_starter_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(chat_starter_path) as m:
        yield m


def _reference(model: pyllama.Model, ctx: pyllama.Context, prompt: str, grammar: str,
               n: int, logprobs: list[float] | None = None) -> tuple[list[int], int]:
    """Greedy tokens under ``grammar`` applied to every candidate (llama_sampler_sample on [grammar, greedy]),
    and at how many steps the grammar refused the unconstrained argmax; each token's log-probability under
    the raw logits is appended to ``logprobs``."""
    tokens: list[int] = []
    refused = 0
    with pyllama.SamplerChain([pyllama.Grammar(grammar), pyllama.Greedy()], model) as chain:
        ctx.kv.clear()
        prompt_tokens = model.tokenize(prompt)
        ctx.evaluate(prompt_tokens, reuse_prefix=False)
        pos = int(prompt_tokens.size)
        for _ in range(n):
            logits = ctx.logits().astype(np.float64)
            first_max = int(np.argmax(logits))
            tok = int(lib.llama_sampler_sample(chain._p(), native(ctx), -1))
            refused += tok != first_max
            if model.vocab.is_eog(tok):
                break
            if logprobs is not None:
                mx = logits.max()
                logprobs.append(float(logits[tok] - mx - np.log(np.exp(logits - mx).sum())))
            tokens.append(tok)
            ctx.decode(pyllama.Batch.from_tokens([tok], pos))
            pos += 1
    return tokens, refused


def _counts() -> tuple[int, int]:
    """Tokens sampled so far with the grammar deferred, and of those the ones the grammar refused."""
    checked, refused = ffi.new("int64_t *"), ffi.new("int64_t *")
    lib.pyllama_sampler_grammar_counts(checked, refused)
    return int(checked[0]), int(refused[0])


def _generated(ctx: pyllama.Context, prompt: str, n: int, logprobs: list[float] | None = None,
               **options: Any) -> list[int]:
    ctx.kv.clear()
    with pyllama.generate(ctx, prompt, max_tokens=n, reuse_prefix=False, logprobs=logprobs is not None,
                          **options) as gen:
        for ev in gen:
            if logprobs is not None and ev.logprob is not None:
                logprobs.append(ev.logprob)
        return [int(t) for t in gen.tokens]


@pytest.mark.parametrize("which", ["synthetic", "chat starter"])
def test_greedy_under_a_grammar_is_greedy_over_the_allowed_tokens(which: str, request: pytest.FixtureRequest) -> None:
    """Greedy generation with a JSON schema's grammar gives, token for token, what the grammar applied to
    every candidate gives, and the same log-probabilities; the grammar refused the unconstrained argmax on
    the way (the full pass ran) and allowed it elsewhere (the one-token check sufficed)."""
    model: pyllama.Model = request.getfixturevalue("model" if which == "synthetic" else "chat")
    grammar = pyllama.json_schema_to_grammar(PERSON)
    with model.context(n_ctx=512, n_threads=2) as ctx:
        want_lp: list[float] = []
        want, refused = _reference(model, ctx, PROMPT, grammar, 120, want_lp)
        checked0, refused0 = _counts()
        got = _generated(ctx, PROMPT, 120, grammar=grammar)
        checked1, refused1 = _counts()
        got_lp: list[float] = []  # log-probabilities read from the raw logits, whatever the chain did
        assert _generated(ctx, PROMPT, 120, got_lp, grammar=grammar) == want
        # SamplerChain.sample, outside the fused generation step
        ctx.kv.clear()
        prompt_tokens = model.tokenize(PROMPT)
        ctx.evaluate(prompt_tokens, reuse_prefix=False)
        by_chain: list[int] = []
        with pyllama.SamplerChain([pyllama.Grammar(grammar), pyllama.Greedy()], model) as chain:
            for pos in range(prompt_tokens.size, prompt_tokens.size + len(want)):
                by_chain.append(chain.sample(ctx))
                ctx.decode(pyllama.Batch.from_tokens([by_chain[-1]], pos))
    assert got == want and by_chain == want
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    # every token was drawn without the grammar first; it refused the argmax where the reference says
    assert checked1 - checked0 >= len(want) and refused1 - refused0 == refused
    assert 0 < refused < len(want)
    json.loads(model.detokenize(want))


def test_a_grammar_that_refuses_the_first_argmax_is_still_obeyed(chat: pyllama.Model) -> None:
    """The unconstrained argmax after the prompt is no digit, so the grammar refuses the first token drawn
    without it: the full pass picks the best digit, greedy as the reference, sampled within the grammar."""
    with chat.context(n_ctx=256, n_threads=2) as ctx:
        ctx.evaluate(chat.tokenize(PROMPT), reuse_prefix=False)
        first = int(np.argmax(ctx.logits()))
        assert not chat.vocab.text(first).strip()[:1].isdigit()
        want, refused = _reference(chat, ctx, PROMPT, DIGITS, 16)
        assert refused >= 1
        refused0 = _counts()[1]
        assert _generated(ctx, PROMPT, 16, grammar=DIGITS) == want
        assert _counts()[1] - refused0 == refused  # the grammar refused the token drawn, the full pass ran
        assert re.fullmatch(r"[0-9]{3}\.", chat.detokenize(want))
        for seed in range(4):
            ctx.kv.clear()
            text = pyllama.generate_text(ctx, PROMPT, max_tokens=16, grammar=DIGITS, temperature=0.8, seed=seed,
                                         reuse_prefix=False)
            assert re.fullmatch(r"[0-9]{3}\.", text), text


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sampled_json_under_a_schema_is_valid(chat: pyllama.Model, seed: int) -> None:
    """llama.cpp's default chain (top-k, top-p, min-p, temperature 0.8) under the schema's grammar: whatever
    the draw, the reply parses and validates."""
    import jsonschema

    with chat.context(n_ctx=512, n_threads=2) as ctx:
        with pyllama.generate(ctx, "Describe a person as JSON:", max_tokens=200, json_schema=PERSON,
                              temperature=0.8, seed=seed) as gen:
            for _ in gen:
                pass
            assert gen.finish_reason == "eog"
            text = gen.text
    jsonschema.validate(json.loads(text), PERSON)


def test_which_chains_check_the_grammar_after_sampling(model: pyllama.Model) -> None:
    """Only chains with a grammar whose other samplers keep no state in apply but a random draw (mirostat
    moves its mu there, a Python sampler may do anything): those keep the grammar over every candidate."""

    class Keep(pyllama.CustomSampler):
        def apply(self, candidates: pyllama.Candidates) -> None:
            pass

    g = pyllama.Grammar('root ::= "a"')
    cases: list[tuple[list[pyllama.Sampler], int]] = [
        ([g, pyllama.Greedy()], 1),
        ([g, *pyllama.default_chain(temperature=0.8, seed=1)], 1),
        ([pyllama.TopK(40), g, pyllama.Temp(0.5), pyllama.Dist(1)], 1),
        ([pyllama.Penalties(64, 1.1), pyllama.DRY(0.8), pyllama.XTC(0.5, 0.1), pyllama.TopNSigma(1.0),
          pyllama.Typical(0.5), pyllama.TempExt(0.5, 0.5), pyllama.LogitBias({1: 2.0}), g, pyllama.AdaptiveP(0.5, 0.9)], 1),
        ([pyllama.TopK(0), pyllama.Temp(1.0), g, pyllama.Dist(1)], 1),  # llama.cpp's no-op stand-ins
        (pyllama.default_chain(temperature=0.8, seed=1), 0),
        ([g, pyllama.Mirostat(seed=1)], 0),
        ([g, pyllama.MirostatV2(seed=1)], 0),
        ([g, Keep(), pyllama.Greedy()], 0),
    ]
    for specs, want in cases:
        with pyllama.SamplerChain(specs, model) as chain:
            assert lib.pyllama_sampler_grammar_deferred(chain._p()) == want, chain
    single = lib.llama_sampler_init_greedy()  # not a chain
    try:
        assert lib.pyllama_sampler_grammar_deferred(single) == 0
    finally:
        lib.llama_sampler_free(single)
    assert lib.pyllama_sampler_grammar_deferred(ffi.NULL) == 0
