"""The synthetic GGUF files load and behave in llama.cpp, checked through the raw binding only.

Everything else in the suite builds on these files, so this module uses
nothing but ``lib.*``: a failure here points at the fixture, not at pyllama's
wrappers. Every handle is freed by a context manager.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import synth
from pyllama._cffi import ffi, lib

_VOCAB = synth.build_vocab()
_N_VOCAB = len(_VOCAB.tokens)

ROUND_TRIP_TEXTS = [
    pytest.param("Hello world, the people of the world.", id="ascii"),
    pytest.param("Très bien : un café à l'été, être où ?", id="french"),
    pytest.param("Die Straße ist schön, über alles.", id="german"),
    pytest.param("日本语 你好世界", id="cjk"),
    pytest.param("I 🦙 llamas 👍🏽!", id="emoji"),
    pytest.param("  two leading spaces\nnewline\ttab, trailing ", id="whitespace"),
]


@pytest.fixture(scope="module", autouse=True)
def _backends() -> None:
    """Load the CPU backend from the package's lib directory once, as pyllama itself does."""
    import pyllama._cffi as cffi_module

    lib.ggml_backend_load_all_from_path(os.path.join(os.path.dirname(cffi_module.__file__), "lib").encode())
    lib.llama_backend_init()


@contextmanager
def load_model(path: Path) -> Iterator[Any]:
    """A llama_model* that is freed on exit."""
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    assert model != ffi.NULL, f"llama_model_load_from_file failed for {path}"
    try:
        yield model
    finally:
        lib.llama_model_free(model)


@contextmanager
def new_context(model: Any, *, embeddings: bool = False) -> Iterator[Any]:
    """A small single-threaded-friendly llama_context* that is freed on exit."""
    params = lib.llama_context_default_params()
    params.n_ctx = 128
    params.n_batch = 128
    params.n_ubatch = 128
    params.n_threads = params.n_threads_batch = 2
    params.embeddings = embeddings
    ctx = lib.llama_init_from_model(model, params)
    assert ctx != ffi.NULL, "llama_init_from_model failed"
    try:
        yield ctx
    finally:
        lib.llama_free(ctx)


def tokenize(vocab: Any, text: str, *, add_special: bool, parse_special: bool = False) -> list[int]:
    """llama_tokenize with the documented retry: a negative result is the needed size."""
    data = text.encode()
    cap = len(data) + 8
    buf = ffi.new("llama_token[]", cap)
    n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        buf = ffi.new("llama_token[]", cap)
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    assert n >= 0
    return list(buf[0:n])


def detokenize(vocab: Any, tokens: list[int], *, remove_special: bool, unparse_special: bool = False) -> bytes:
    """llama_detokenize into bytes (not str: a token sequence may end mid-character)."""
    arr = ffi.new("llama_token[]", tokens)
    cap = 16 * len(tokens) + 16
    out = ffi.new("char[]", cap)
    n = lib.llama_detokenize(vocab, arr, len(tokens), out, cap, remove_special, unparse_special)
    assert n >= 0, "detokenize buffer too small"
    text: bytes = ffi.unpack(out, n)
    return text


def decode(ctx: Any, tokens: list[int]) -> np.ndarray:
    """Decode ``tokens`` as one batch and return a copy of the last position's logits."""
    arr = ffi.new("llama_token[]", tokens)
    assert lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(tokens))) == 0
    logits = lib.llama_get_logits_ith(ctx, -1)
    copied: np.ndarray = np.frombuffer(ffi.buffer(logits, _N_VOCAB * 4), dtype=np.float32).copy()
    return copied


def test_model_loads_with_expected_vocabulary(synth_model_path: Path) -> None:
    with load_model(synth_model_path) as model:
        vocab = lib.llama_model_get_vocab(model)
        assert lib.llama_vocab_n_tokens(vocab) == _N_VOCAB
        assert 400 <= _N_VOCAB <= 600
        assert lib.llama_vocab_bos(vocab) == synth.BOS_ID
        assert lib.llama_vocab_eos(vocab) == synth.EOS_ID
        assert lib.llama_vocab_eot(vocab) == synth.IM_END_ID
        assert lib.llama_vocab_get_attr(vocab, synth.BYTE_BASE_ID + 0x41) & lib.LLAMA_TOKEN_ATTR_BYTE
        assert lib.llama_vocab_get_attr(vocab, synth.IM_START_ID) & lib.LLAMA_TOKEN_ATTR_CONTROL
        assert ffi.string(lib.llama_model_chat_template(model, ffi.NULL)).decode() == synth.CHATML_TEMPLATE


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenize_round_trips_exactly(synth_model_path: Path, text: str) -> None:
    with load_model(synth_model_path) as model:
        vocab = lib.llama_model_get_vocab(model)
        tokens = tokenize(vocab, text, add_special=False)
        assert detokenize(vocab, tokens, remove_special=False) == text.encode()


def test_text_uses_both_pieces_and_byte_fallback(synth_model_path: Path) -> None:
    """Streaming-detokenizer tests need multi-character pieces and split UTF-8 bytes."""
    with load_model(synth_model_path) as model:
        vocab = lib.llama_model_get_vocab(model)
        words = tokenize(vocab, "Hello world, the café", add_special=False)
        assert [_VOCAB.tokens[t] for t in words][:2] == ["\u2581Hello", "\u2581world"]
        emoji = tokenize(vocab, "🦙", add_special=False)
        assert emoji[-4:] == [synth.BYTE_BASE_ID + b for b in "🦙".encode()]


def test_bos_and_leading_space_on_detokenize(synth_model_path: Path) -> None:
    """Pins a llama.cpp quirk: stripping BOS on detokenize keeps the SentencePiece prefix space."""
    with load_model(synth_model_path) as model:
        vocab = lib.llama_model_get_vocab(model)
        tokens = tokenize(vocab, "Hello", add_special=True)
        assert tokens[0] == synth.BOS_ID
        assert detokenize(vocab, tokens, remove_special=True) == b" Hello"
        assert detokenize(vocab, tokens[1:], remove_special=True) == b"Hello"


def test_chatml_control_tokens_parse_as_single_ids(synth_model_path: Path) -> None:
    with load_model(synth_model_path) as model:
        vocab = lib.llama_model_get_vocab(model)
        msg = ffi.new("llama_chat_message *", {"role": ffi.new("char[]", b"user"), "content": ffi.new("char[]", b"hi")})
        buf = ffi.new("char[]", 256)
        n = lib.llama_chat_apply_template(lib.llama_model_chat_template(model, ffi.NULL), msg, 1, True, buf, 256)
        prompt = ffi.unpack(buf, n).decode()
        assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        tokens = tokenize(vocab, prompt, add_special=False, parse_special=True)
        assert tokens[0] == synth.IM_START_ID and synth.IM_END_ID in tokens


def test_decode_gives_finite_logits_and_varied_greedy_tokens(synth_model_path: Path) -> None:
    with load_model(synth_model_path) as model, new_context(model) as ctx:
        vocab = lib.llama_model_get_vocab(model)
        logits = decode(ctx, tokenize(vocab, "Hello world, the people", add_special=True))
        assert np.isfinite(logits).all() and logits.std() > 0.5
        greedy = []
        for _ in range(8):
            greedy.append(int(logits.argmax()))
            logits = decode(ctx, greedy[-1:])
        assert len(set(greedy)) >= 2
        assert all(_VOCAB.types[t] == gguf.TokenType.NORMAL for t in greedy)


@pytest.mark.parametrize("dtype", ["f16"])
def test_other_dtypes_load_and_decode(tmp_path: Path, dtype: str) -> None:
    path = synth.write_llama_model(tmp_path / f"{dtype}.gguf", dtype=dtype)
    with load_model(path) as model, new_context(model) as ctx:
        assert np.isfinite(decode(ctx, [synth.BOS_ID, 300, 301])).all()


def test_lora_adapter_changes_logits(synth_model_path: Path, synth_lora_path: Path) -> None:
    with load_model(synth_model_path) as model, new_context(model) as ctx:
        adapter = lib.llama_adapter_lora_init(model, str(synth_lora_path).encode())
        assert adapter != ffi.NULL
        try:
            prompt = [synth.BOS_ID, 300, 301, 302]
            base = decode(ctx, prompt)
            adapters = ffi.new("struct llama_adapter_lora *[]", [adapter])
            assert lib.llama_set_adapters_lora(ctx, adapters, 1, ffi.new("float[]", [1.0])) == 0
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            adapted = decode(ctx, prompt)
            assert np.isfinite(adapted).all()
            assert np.abs(adapted - base).max() > 1e-2
            assert lib.llama_set_adapters_lora(ctx, ffi.NULL, 0, ffi.NULL) == 0
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            np.testing.assert_allclose(decode(ctx, prompt), base, rtol=1e-5, atol=1e-5)
        finally:
            lib.llama_set_adapters_lora(ctx, ffi.NULL, 0, ffi.NULL)
            lib.llama_adapter_lora_free(adapter)


def test_embedding_model_pools_by_mean(synth_embedding_model_path: Path) -> None:
    with load_model(synth_embedding_model_path) as model, new_context(model, embeddings=True) as ctx:
        assert lib.llama_pooling_type(ctx) == lib.LLAMA_POOLING_TYPE_MEAN
        arr = ffi.new("llama_token[]", [synth.BOS_ID, 300, 301])
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(arr, 3)) == 0
        n_embd = lib.llama_model_n_embd(model)
        emb = np.frombuffer(ffi.buffer(lib.llama_get_embeddings_seq(ctx, 0), n_embd * 4), dtype=np.float32)
        assert np.isfinite(emb).all() and np.abs(emb).max() > 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = synth.write_llama_model(tmp_path / "a.gguf", seed=7)
    b = synth.write_llama_model(tmp_path / "b.gguf", seed=7)
    c = synth.write_llama_model(tmp_path / "c.gguf", seed=8)
    assert _sha256(a) == _sha256(b) != _sha256(c)
    la = synth.write_lora_adapter(tmp_path / "la.gguf", a)
    lb = synth.write_lora_adapter(tmp_path / "lb.gguf", synth.LlamaParams(seed=7))
    assert _sha256(la) == _sha256(lb)


def test_cli_writes_each_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.gguf"
    assert synth.main([str(base), "--n-layer", "1"]) == 0
    assert synth.main([str(tmp_path / "emb.gguf"), "--kind", "embedding"]) == 0
    assert synth.main([str(tmp_path / "lora.gguf"), "--kind", "lora", "--base", str(base)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "lora.gguf")
    with load_model(base) as model:
        adapter = lib.llama_adapter_lora_init(model, str(tmp_path / "lora.gguf").encode())
        assert adapter != ffi.NULL
        lib.llama_adapter_lora_free(adapter)


@pytest.mark.starter
def test_starter_model_fixture_loads(starter_model_path: Path) -> None:
    with load_model(starter_model_path) as model:
        assert lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)) > 100_000


def test_padded_vocabulary_keeps_the_synthetic_tokens(tmp_path: Path, synth_model_path: Path) -> None:
    import pyllama

    path = synth.write_llama_model(tmp_path / "big.gguf", n_vocab=5000)
    with pyllama.Model(path) as big, pyllama.Model(synth_model_path) as small:
        assert big.vocab.n_tokens == 5000
        text = "Hello world, schön"
        assert np.array_equal(big.tokenize(text), small.tokenize(text))  # the pads are never produced
    with pytest.raises(ValueError, match="n_vocab"):
        synth.write_llama_model(tmp_path / "bad.gguf", n_vocab=10)


@pytest.mark.parametrize("audio", [False, True], ids=["vision", "vision+audio"])
def test_projector_is_deterministic_and_has_libmtmds_layout(tmp_path: Path, audio: bool) -> None:
    """The mmproj writer: byte-identical for the same arguments, with the keys (and key types) and tensor
    shapes clip.cpp reads, and an output width equal to the synthetic text model's n_embd."""
    a = synth.write_projector(tmp_path / "a.gguf", audio=audio)
    b = synth.write_projector(tmp_path / "b.gguf", audio=audio)
    c = synth.write_projector(tmp_path / "c.gguf", audio=audio, seed=1)
    assert _sha256(a) == _sha256(b) != _sha256(c)
    assert a.stat().st_size < 512 * 1024 and not (tmp_path / "a.gguf.tmp").exists()

    reader = gguf.GGUFReader(a)

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    assert value("general.architecture") == "clip"
    assert value("clip.has_vision_encoder") is True and value("clip.has_audio_encoder") is audio
    if audio:  # both towers in one file, as Qwen2.5-Omni's: one projector type per modality
        assert (value("clip.vision.projector_type"), value("clip.audio.projector_type")) == ("mlp", "qwen2a")
        assert "clip.projector_type" not in reader.fields
        assert value("clip.audio.num_mel_bins") == synth.AUDIO_N_MEL
        assert value("clip.audio.projection_dim") == 64
    else:
        assert value("clip.projector_type") == "mlp"
    assert [value(f"clip.vision.{key}") for key in ("image_size", "patch_size", "block_count")] == [32, 8, 2]
    # clip.cpp aborts (GGML_ASSERT in gguf_get_val_u32) on a u32 key stored with another type
    assert reader.fields["clip.vision.image_size"].types == [gguf.GGUFValueType.UINT32]
    np.testing.assert_allclose(value("clip.vision.image_mean"), synth.CLIP_IMAGE_MEAN, rtol=1e-6)
    np.testing.assert_allclose(value("clip.vision.image_std"), synth.CLIP_IMAGE_STD, rtol=1e-6)

    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert shapes == synth.projector_shapes(audio=audio)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    assert shapes["mm.2.weight"] == (64, 64)  # rows: the text model's n_embd, what libmtmd checks
    assert shapes["v.position_embd.weight"] == ((32 // 8) ** 2 + 1, 32)  # a row per patch and the class embedding
    assert synth.projector_shapes(n_embd_text=48)["mm.2.weight"] == (48, 48)


def test_projector_cli_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audio.gguf"
    assert synth.main([str(out), "--kind", "projector", "--n-embd", "48", "--modality", "audio"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    reader = gguf.GGUFReader(out)
    assert reader.fields["clip.projector_type"].contents() == "qwen2a"
    assert reader.fields["clip.has_vision_encoder"].contents() is False
    assert {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}["mm.a.fc.weight"] == (48, 32)
    with pytest.raises(ValueError, match="vision, audio"):
        synth.write_projector(tmp_path / "none.gguf", vision=False)
    with pytest.raises(ValueError, match="patch_size"):
        synth.write_projector(tmp_path / "odd.gguf", image_size=30)


def test_media_writers_are_deterministic_and_decodable(tmp_path: Path) -> None:
    """write_image's PNG (written without Pillow) decodes back to its pixels; write_audio is a 16 kHz mono WAV."""
    import struct
    import wave
    import zlib

    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    png = synth.png_bytes(pixels)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">IIBB", png[16:26]) == (5, 4, 8, 2)  # width, height, 8-bit, truecolour
    n_idat = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT" and png.endswith(b"IEND\xaeB`\x82")
    rows = np.frombuffer(zlib.decompress(png[41:41 + n_idat]), dtype=np.uint8).reshape(4, 1 + 5 * 3)
    assert (rows[:, 0] == 0).all()  # filter byte: none
    np.testing.assert_array_equal(rows[:, 1:].reshape(4, 5, 3), pixels)

    a = synth.write_image(tmp_path / "a.png", seed=1)
    assert a.read_bytes() == synth.write_image(tmp_path / "b.png", seed=1).read_bytes()
    assert a.read_bytes() != synth.write_image(tmp_path / "c.png", seed=2).read_bytes()

    wav = synth.write_audio(tmp_path / "a.wav", seconds=0.5, seed=3)
    assert wav.read_bytes() == synth.write_audio(tmp_path / "b.wav", seconds=0.5, seed=3).read_bytes()
    with wave.open(str(wav)) as clip:
        assert (clip.getnchannels(), clip.getsampwidth(), clip.getframerate(), clip.getnframes()) == (1, 2, 16000, 8000)
