"""A grammar whose parses multiply while it generates ends its request with a clear error instead of
hanging the engine (src/native/grammar.cpp): llama.cpp's grammar engine follows every parse still
possible, and nothing bounds them.

``s ::= "#" s t | "#" s u | "x"`` doubles them with each "#": the chat starter's vocabulary has a token
of 80 "#", and accepting it walks 2**80 parses (llama.cpp's own grammar sampler never returns; so does
llama-server with the same grammar). ``s ::= "a" s | "a" s s | "b"`` adds one per "a": every token
slower than the last, without end. Both now stop at :data:`pyllama.samplers.GRAMMAR_MAX_STACKS`
parses; grammars that stay within it (JSON schemas keep a handful) are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import pytest

import pyllama
from pyllama.errors import SamplerError
from pyllama.samplers import GRAMMAR_MAX_STACKS, Grammar, Greedy
from pyllama.sampling import SamplerChain
from server_fixture import RemoteServer

# a hang would otherwise hold CI to its limit: each test has a minute
pytestmark = pytest.mark.timeout(120)

DOUBLING = 'root ::= s\ns ::= "#" s t | "#" s u | "x"\nt ::= "b"\nu ::= "c"'
GROWING = 'root ::= s\ns ::= "a" s | "a" s s | "b"'


@pytest.fixture(scope="module")
def model(chat_starter_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(chat_starter_path) as m:
        yield m


def _longest_run(model: pyllama.Model, char: str) -> tuple[int, int]:
    """(token, length) of the vocabulary's longest token made of ``char`` alone."""
    best = (-1, 0)
    for i in range(model.vocab.n_tokens):
        piece = model.detokenize([i])
        if piece and set(piece) == {char} and len(piece) > best[1]:
            best = (i, len(piece))
    return best


def test_a_doubling_grammar_is_refused_at_the_token_that_would_hang(model: pyllama.Model) -> None:
    token, n = _longest_run(model, "#")
    assert n >= 20, f"the vocabulary's longest run of '#' is {n}: 2**{n} parses"
    chain = SamplerChain([Grammar(DOUBLING), Greedy()], model)
    with pytest.raises(SamplerError, match="too ambiguous.*possible parses.*limit is 256"):
        chain.accept(token)
    # the grammar is as it was: a short run, within the bound, is accepted, and so is the end
    short = model.tokenize("##", add_special=False, parse_special=False)
    chain.accept(short[0])
    chain.accept(model.tokenize("x", add_special=False, parse_special=False)[0])


def test_a_growing_grammar_ends_its_generation_with_the_reason(model: pyllama.Model) -> None:
    a = model.tokenize("a", add_special=False, parse_special=False)
    assert len(a) == 1
    chain = SamplerChain([Grammar(GROWING), Greedy()], model)
    accepted = 0
    with pytest.raises(SamplerError, match="too ambiguous") as err:
        for _ in range(2 * GRAMMAR_MAX_STACKS):
            chain.accept(a[0])
            accepted += 1
    # three parses more per "a": the bound ends it at ~85 tokens, where each cost ~0.3 s of apply and rising
    assert 16 <= accepted <= GRAMMAR_MAX_STACKS and "after" in str(err.value), (accepted, str(err.value))
    # a bound of the caller's choosing
    small = SamplerChain([Grammar(GROWING, max_stacks=8), Greedy()], model)
    with pytest.raises(SamplerError, match="limit is 8"):
        for _ in range(16):
            small.accept(a[0])
    with pytest.raises(ValueError, match="max_stacks"):
        SamplerChain([Grammar(GROWING, max_stacks=0), Greedy()], model)


def test_generation_with_the_doubling_grammar_stops_with_the_reason(model: pyllama.Model) -> None:
    """Through generate: the model is pushed to the run of '#' by a logit bias; the error names the grammar."""
    token, _ = _longest_run(model, "#")
    with model.context(n_ctx=256) as ctx:
        with pytest.raises(SamplerError, match="too ambiguous"):
            with pyllama.generate(ctx, "Draw a line:", grammar=DOUBLING, logit_bias={token: 100.0},
                                  max_tokens=8) as gen:
                for _ in gen:
                    pass
        # the context and the model go on: a plain grammar answers
        text = pyllama.generate_text(ctx, "Say yes:", grammar='root ::= "yes" | "no"', max_tokens=4)
        assert text in ("yes", "no")


def test_the_server_answers_a_doubling_grammar_with_a_400_and_goes_on(chat_starter_path: Path) -> None:
    with pyllama.Model(chat_starter_path) as m:
        token, _ = _longest_run(m, "#")
    with RemoteServer(chat_starter_path, "--slots", "2", "--ctx-slot", "512") as s:
        body = {"prompt": "Draw a line:", "grammar": DOUBLING, "logit_bias": [[token, 100.0]], "n_predict": 8}
        r = httpx.post(s.url + "/completion", json=body, timeout=120)
        assert r.status_code == 400 and "too ambiguous" in r.json()["error"]["message"], r.text
        with httpx.stream("POST", s.url + "/completion", json={**body, "stream": True}, timeout=120) as st:
            events = [json.loads(line[6:]) for line in st.iter_lines() if line.startswith("data: ")]
        assert events and "too ambiguous" in json.dumps(events[-1]), events[-1:]
        ok = httpx.post(s.url + "/completion", json={"prompt": "Say yes:", "n_predict": 4,
                                                     "grammar": 'root ::= "yes" | "no"'}, timeout=120)
        assert ok.status_code == 200 and ok.json()["content"] in ("yes", "no")
