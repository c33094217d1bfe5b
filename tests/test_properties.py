"""Property tests (hypothesis): tokenization round trips, streaming detokenization, stop matching.

What must hold, precisely (the synthetic model: a SentencePiece vocabulary with
byte fallback, ``add_space_prefix``, ChatML control tokens):

1. For any Unicode text ``s`` without U+2581 (SentencePiece's own space sign,
   which the tokenizer reads as a space): ``detokenize(tokenize(s, add_special=False)) == s``.
   Special-token look-alikes (``<|im_start|>``) are ordinary text unless
   ``parse_special``; with it they become control tokens and come back with
   ``unparse_special``, each text fragment after one prefixed by the space
   SentencePiece adds to every fragment (llama.cpp's ``add_space_prefix``,
   which only the very first token sheds on detokenization).
2. For any bytes ``b`` (invalid UTF-8 included) without U+2581's encoding:
   ``detokenize_bytes(tokenize(b, add_special=False)) == b`` up to spaces coming
   back as U+2581 after an invalid UTF-8 lead byte (exactly ``b`` without spaces).
3. For any token ids ``t`` of the vocabulary: a :class:`StreamDecoder` fed ``t``
   one token at a time (then flushed) gives ``detokenize(t)``, never a partial
   character in between.
3b. For any bytes cut into any pieces: holding back what ``pyllama_utf8_complete`` (the fused
   generation step's rule) leaves and decoding the rest of each piece at once gives exactly what
   Python's incremental utf-8 decoder gives, piece by piece.
4. For any text ``T``, stop strings ``S`` and split of ``T`` into chunks fed to
   :class:`StopMatcher`: the emitted text is ``T`` cut before the earliest
   occurrence of any stop string (what matching on the whole text gives), and a
   stop is reported exactly when ``T`` contains one; with no stop, everything
   is emitted (after ``flush``).
"""

from __future__ import annotations

import re

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyllama  # noqa: E402
from pyllama.generate import StopMatcher  # noqa: E402

SPM_SPACE = "\u2581".encode()
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "<0x41>"]
PARSED = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]  # what parse_special turns into tokens

# Text: any code point but surrogates (not encodable) and U+2581; special-token look-alikes mixed in.
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")
texts = st.lists(st.one_of(st.text(_chars, max_size=12), st.sampled_from(SPECIALS)), max_size=8).map("".join)


@SETTINGS
@given(s=texts)
def test_tokenize_detokenize_round_trip(model: pyllama.Model, s: str) -> None:
    toks = model.tokenize(s, add_special=False, parse_special=False)
    assert model.detokenize(toks) == s


def _with_fragment_spaces(s: str) -> str:
    """``s`` with the space SentencePiece prefixes to each text fragment that follows a special token."""
    pattern = re.compile("|".join(re.escape(t) for t in PARSED))
    out, pos = [], 0
    for mt in pattern.finditer(s):
        out.append(s[pos:mt.end()])
        pos = mt.end()
        nxt = pattern.match(s, pos)
        if pos < len(s) and (nxt is None or nxt.start() != pos):
            out.append(" ")
    out.append(s[pos:])
    return "".join(out)


@SETTINGS
@given(s=texts)
def test_round_trip_with_special_tokens_parsed(model: pyllama.Model, s: str) -> None:
    toks = model.tokenize(s, add_special=False, parse_special=True)
    for t in PARSED:
        assert int((toks == model.vocab.tokenize(t, add_special=False, parse_special=True)[0]).sum()) == s.count(t)
    assert model.detokenize(toks, unparse_special=True) == _with_fragment_spaces(s)


@SETTINGS
@given(b=st.binary(max_size=64))
def test_bytes_round_trip_including_invalid_utf8(model: pyllama.Model, b: bytes) -> None:
    hypothesis.assume(SPM_SPACE not in b)
    toks = model.tokenize(b, add_special=False)
    # A space becomes "▁" (3 bytes) before tokenization; after an invalid lead byte that claims the
    # next bytes, its bytes are spelled as byte tokens and come back as "▁", not as a space.
    assert model.vocab.detokenize_bytes(toks).replace(SPM_SPACE, b" ") == b
    if b" " not in b:
        assert model.vocab.detokenize_bytes(toks) == b


@SETTINGS
@given(data=st.data())
def test_stream_decoder_equals_one_shot_detokenize(model: pyllama.Model, data: st.DataObject) -> None:
    n = model.vocab.n_tokens
    tokens = data.draw(st.lists(st.integers(0, n - 1), max_size=24))
    special = data.draw(st.booleans())
    dec = pyllama.StreamDecoder(model.vocab, special=special)
    parts = [dec.push(t) for t in tokens]
    text = "".join(parts) + dec.flush()
    assert text == model.detokenize(tokens, unparse_special=special)
    # Never half a character: each part is complete text on its own.
    assert all("\ufffd" not in p or "\ufffd" in text for p in parts)


# Bytes near character boundaries: every lead byte kind, continuation bytes at the edges of their ranges.
_utf8_bytes = st.lists(st.sampled_from([0x41, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE1,
                                        0xED, 0xEF, 0xF0, 0xF3, 0xF4, 0xF5, 0xFF]), max_size=24).map(bytes)


@settings(max_examples=2000, deadline=None)
@given(data=_utf8_bytes, cuts=st.lists(st.integers(0, 24), max_size=8))
@example(data="é🙂".encode(), cuts=[1, 3, 4])
def test_fused_step_utf8_hold_back_equals_incremental_decoding(data: bytes, cuts: list[int]) -> None:
    import codecs

    from pyllama._ffi import lib

    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    expected = [dec.decode(p) for p in pieces] + [dec.decode(b"", final=True)]
    held, got = b"", []
    for p in pieces:
        buf = held + p
        whole = lib.pyllama_utf8_complete(buf, len(buf))
        assert 0 <= len(buf) - whole <= 3
        got.append(buf[:whole].decode("utf-8", "replace"))
        held = buf[whole:]
    got.append(held.decode("utf-8", "replace"))
    assert got == expected


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Matching on the whole text: the stop string whose first occurrence ends first wins (ties: the one
    that starts first), which is what a generation that stops as soon as a stop string appears sees."""
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops if s) if i >= 0]
    return (text[: min(hits)[1]], True) if hits else (text, False)


stop_alphabet = st.sampled_from("ab\n<|>é🙂")
stop_texts = st.text(stop_alphabet, max_size=30)
stop_lists = st.lists(st.text(stop_alphabet, min_size=1, max_size=4), max_size=3)


@settings(max_examples=1000, deadline=None)
@given(text=stop_texts, stops=stop_lists, cuts=st.lists(st.integers(0, 30), max_size=8))
@example(text="<a<", stops=["a", "<a<"], cuts=[1, 2])
def test_stop_matching_over_any_split_equals_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    _check_split(text, stops, cuts)


def _check_split(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m = StopMatcher(stops)
    out, stopped = [], False
    for c in chunks:
        emitted, stopped = m.feed(c)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    assert ("".join(out), stopped) == _reference(text, stops)


@settings(max_examples=1000, deadline=None)
@given(text=stop_texts, stop=st.text(stop_alphabet, min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_one_stop_string_over_any_split_equals_the_whole_text(text: str, stop: str, cuts: list[int]) -> None:
    _check_split(text, [stop], cuts)
