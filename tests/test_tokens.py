"""Tokenization into numpy, detokenization and streaming text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pyllama

TEXTS = [
    "Hello world",
    "Le café est très bon, déjà vu à Paris.",
    "Größe und Übermaß",
    "日本語のテキスト、中文文本",
    "emoji: 🦙🔥👩‍👩‍👧 done",
    "mixed 🇫🇷 français 😀 ok",
]



def test_tokenize_returns_int32_array(model: pyllama.Model) -> None:
    toks = model.tokenize("Hello world")
    assert isinstance(toks, np.ndarray) and toks.dtype == np.int32
    assert toks[0] == model.vocab.bos
    assert model.tokenize("Hello world", add_special=False)[0] != model.vocab.bos


def test_tokenize_long_byte_fallback_text(model: pyllama.Model) -> None:
    text = "🦙" * 300  # 4 byte tokens per character, plus the SentencePiece space prefix
    toks = model.tokenize(text, add_special=False)
    assert toks.size == 1201
    assert model.detokenize(toks) == text


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(model: pyllama.Model, text: str) -> None:
    toks = model.tokenize(text, add_special=False)
    assert model.detokenize(toks) == text


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_one_shot(model: pyllama.Model, text: str) -> None:
    toks = model.tokenize(text, add_special=False)
    dec = pyllama.StreamDecoder(model.vocab)
    pieces = [dec.push(int(t)) for t in toks] + [dec.flush()]
    assert "".join(pieces) == model.detokenize(toks)
    # Never half a character: every piece is valid text without replacement characters.
    assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_back_split_character(model: pyllama.Model) -> None:
    toks = model.tokenize("🦙", add_special=False)  # the space prefix, then 4 byte-fallback tokens
    assert toks.size == 5
    dec = pyllama.StreamDecoder(model.vocab)
    assert [dec.push(int(t)) for t in toks][1:] == ["", "", "", "🦙"]


def test_special_tokens(model: pyllama.Model) -> None:
    v = model.vocab
    assert v.bos == 1 and v.eos == 2 and v.eot == 260
    assert v.is_eog(v.eos) and v.is_eog(v.eot) and not v.is_eog(300)
    assert v.is_control(259)
    assert v.attr(259) & 8  # LLAMA_TOKEN_ATTR_CONTROL
    assert v.text(259) == "<|im_start|>"
    assert model.tokenize("<|im_start|>user", add_special=False, parse_special=True)[0] == 259
    assert 259 not in model.tokenize("<|im_start|>user", add_special=False, parse_special=False)


def test_tokenize_many(model: pyllama.Model) -> None:
    out = model.vocab.tokenize_many(TEXTS, add_special=False)
    assert [model.detokenize(t) for t in out] == TEXTS


def test_invalid_token_ids(model: pyllama.Model) -> None:
    with pytest.raises(pyllama.TokenizationError):
        model.detokenize([1, 99999])
    with pytest.raises(pyllama.TokenizationError):
        model.vocab.token_to_piece(-5)
    with pytest.raises(pyllama.TokenizationError):
        model.vocab.is_eog(590)


def test_tokenize_many_in_threads_equals_serial(model) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", " gamma", "δέλτα", "🙂", "\n", "x" * 7]
    docs = ["".join(rng.choice(words, size=int(rng.integers(1, 6000)))) for _ in range(23)] + ["", "a"]
    serial = [model.vocab.tokenize(d) for d in docs]
    for n in (1, 2, 4):
        got = model.vocab.tokenize_many(docs, n_threads=n)
        assert len(got) == len(docs)
        assert all(np.array_equal(a, b) for a, b in zip(serial, got))
    with pytest.raises(ValueError):
        model.vocab.tokenize_many(docs, n_threads=0)


@pytest.mark.starter
def test_long_text_in_pieces_gives_the_ids_of_one_call(starter_model_path: Path) -> None:
    """Texts over 64 KB are tokenized in pieces cut where a newline run starts: same ids as one call."""
    from pyllama._ffi import ffi, lib

    with pyllama.Model(starter_model_path) as m:
        v = m.vocab
        assert v._newline_cuts_exact(False) and v._newline_cuts_exact(True)  # Gemma 3: "\n" is user-defined
        rng = np.random.default_rng(3)
        pieces = ["\n", "\n\n", "\n\n\n\n\n", "\r\n", "\t", "  ", "<start_of_turn>", "<end_of_turn>", "<a>",
                  "word", " héllo", "🙂", "<bos>", "x\n", "\n ", "\n\t"]
        for trial in range(4):
            data = "".join(rng.choice(pieces, size=30000)).encode()
            assert len(data) > 65536
            for parse_special in (False, True):
                for add_special in (False, True):
                    out = np.empty(len(data) + 2, dtype=np.int32)
                    n = lib.llama_tokenize(v._v(), data, len(data), ffi.from_buffer("llama_token[]", out),
                                           out.size, add_special, parse_special)
                    assert np.array_equal(out[:n], v.tokenize(data, add_special=add_special,
                                                              parse_special=parse_special))


def test_min_tokens_is_a_lower_bound_known_without_tokenizing(model: pyllama.Model,
                                                              chat_starter_path: Path) -> None:
    """Vocab.min_tokens bounds the tokens of a text from its length (the longest piece of the vocabulary);
    the engine refuses a prompt that cannot fit its slot by it, before tokenizing megabytes."""
    from pyllama.engine import Engine
    from pyllama.errors import ContextOverflowError

    rng = np.random.default_rng(7)
    pieces = [model.vocab.token_to_piece(int(t), special=True) for t in range(model.vocab.n_tokens)]
    for n in (1, 10, 300, 5000):  # random text and text made of the longest pieces
        ids = rng.integers(0, model.vocab.n_tokens, size=n)
        text = b"".join(pieces[int(i)] for i in ids).decode("utf-8", errors="ignore")
        longest = "".join(max(pieces, key=len).decode("utf-8", errors="ignore") for _ in range(n))
        for t in (text, longest):
            assert model.vocab.min_tokens(t) <= model.vocab.tokenize(t, add_special=False, parse_special=True).size
    assert model.vocab.min_tokens("") == 0
    with pyllama.Model(chat_starter_path) as chat, Engine(chat, n_slots=1, n_ctx=512) as engine:
        with pytest.raises(ContextOverflowError, match="at least") as err:
            engine.submit("word " * 2_000_000)
        assert err.value.n_tokens is not None and err.value.n_tokens >= 512
        assert isinstance(engine.submit("word " * 100, max_tokens=2).result(), str)  # a prompt that fits runs
