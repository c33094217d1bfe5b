"""Images and audio into a text model, through llama.cpp's libmtmd (tools/mtmd).

A :class:`Projector` (the ``mmproj`` GGUF published beside a vision or audio model) turns media into
embeddings in the text model's space. A prompt that mixes text and media (:class:`Image`, :class:`Audio`)
is tokenized by libmtmd into chunks: text tokens, and for each image or clip a run of embeddings wrapped
in the model's own begin/end tokens. :class:`MediaPrompt` lays them out as one token array in which each
media run holds a placeholder id derived from the media's hash (negative: no vocabulary id has it), one
per position the run takes, so prefix reuse, the record of what a sequence holds and the decoder's
positions work as they do for text: the same image in the same place is never evaluated twice.

The decoder hands a media run to libmtmd's own decode helper when the sequence reaches it (batching,
M-RoPE positions, non-causal attention where the model wants it). The vision or audio tower runs then,
or earlier in a worker thread (:meth:`MediaPrompt.encode`, which the serving engine calls so that no
other request waits for it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Sequence, Union

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from ._handle import Handle
from .errors import LlamaError, ModelLoadError

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

MediaKind = Literal["image", "audio"]
MediaSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, npt.NDArray[Any]]

#: where a rendered chat holds an image or clip (one per process, as llama-server's): random, so no text has it
MARKER = os.environ.get("LLAMA_MEDIA_MARKER") or f"<__media_{secrets.token_hex(8)}__>"  # (llama-server's variable)
#: the most pixels an image may have before it is decoded (stb_image would allocate 3 bytes for each)
MAX_PIXELS = 64 * 1024 * 1024
#: the longest side an image may have
MAX_SIDE = 32768
#: the most bytes a media file may have
MAX_MEDIA_BYTES = 256 * 1024 * 1024


class MediaError(LlamaError, ValueError):
    """An image or audio clip that cannot be used: unreadable, unsupported, too large, or of a kind the
    projector does not take."""


class Media:
    """An image or an audio clip for a prompt: a file path, the file's bytes, or samples in memory.

    Files are decoded by libmtmd (images: the formats stb_image reads — PNG, JPEG, BMP, GIF, PNM, TGA,
    PSD; audio: WAV, MP3, FLAC, resampled to the projector's rate). Nothing is read before the media is
    tokenized with a projector.
    """

    kind: MediaKind = "image"
    __slots__ = ("source",)

    def __init__(self, source: MediaSource) -> None:
        if isinstance(source, (bytearray, memoryview)):
            source = bytes(source)
        if isinstance(source, np.ndarray):
            source = self._check_array(source)
        elif isinstance(source, (str, os.PathLike)):
            source = Path(source)
        elif not isinstance(source, bytes):
            raise TypeError(f"{type(self).__name__}() takes a path, the file's bytes or a numpy array, "
                            f"not {type(source).__name__}")
        if isinstance(source, bytes) and not source:
            raise MediaError(f"empty {self.kind} data")
        if isinstance(source, bytes) and len(source) > MAX_MEDIA_BYTES:
            raise MediaError(f"{len(source)} bytes of {self.kind} data; media may have {MAX_MEDIA_BYTES}")
        self.source: Path | bytes | npt.NDArray[Any] = source

    def _check_array(self, a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        raise NotImplementedError

    def data(self) -> bytes | npt.NDArray[Any]:
        """The file's bytes (read now, bounded by :data:`MAX_MEDIA_BYTES`) or the array."""
        src = self.source
        if not isinstance(src, Path):
            return src
        try:
            size = src.stat().st_size
            if size > MAX_MEDIA_BYTES:
                raise MediaError(f"{src} has {size} bytes; a media file may have {MAX_MEDIA_BYTES}")
            data = src.read_bytes()
        except OSError as exc:
            raise MediaError(f"cannot read the {self.kind} {src}: {exc.strerror or exc}") from exc
        if not data:
            raise MediaError(f"{src} is empty")
        return data

    def __repr__(self) -> str:
        src = self.source
        what = str(src) if isinstance(src, Path) else (
            f"{len(src)} bytes" if isinstance(src, bytes) else f"array {src.shape} {src.dtype}")
        return f"pyllama.{type(self).__name__}({what})"


class Image(Media):
    """An image: a path, the file's bytes, or a ``uint8`` numpy array of shape (height, width, 3) (RGB).

    libmtmd keeps its own copy of the pixels (``mtmd_bitmap_init`` copies), so an array is read once,
    without any other conversion when it is C-contiguous ``uint8``."""

    kind: MediaKind = "image"
    __slots__ = ()

    def _check_array(self, a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise MediaError(f"an image array must be uint8 of shape (height, width, 3), not {a.dtype} {a.shape}")
        h, w = int(a.shape[0]), int(a.shape[1])
        _check_size(w, h)
        return np.ascontiguousarray(a)


class Audio(Media):
    """An audio clip: a path, the file's bytes (WAV, MP3, FLAC), or mono ``float32`` samples in [-1, 1]
    at the projector's sample rate (:attr:`Projector.audio_sample_rate`)."""

    kind: MediaKind = "audio"
    __slots__ = ()

    def _check_array(self, a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if a.ndim != 1 or a.dtype != np.float32:
            raise MediaError(f"audio samples must be a 1-D float32 array (mono), not {a.dtype} {a.shape}")
        if a.size == 0:
            raise MediaError("empty audio")
        return np.ascontiguousarray(a)


def _check_size(w: int, h: int) -> None:
    if w <= 0 or h <= 0:
        raise MediaError(f"an image of {w} x {h} pixels has nothing in it")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise MediaError(f"an image of {w} x {h} pixels is too large (at most {MAX_SIDE} pixels a side and "
                         f"{MAX_PIXELS} in all)")


def image_info(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels) from an image file's header as stb_image reads it (nothing is decoded), or
    None when the format is not one stb_image knows."""
    w, h, c = ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *")
    if not lib.pyllama_image_info(data, len(data), w, h, c):
        return None
    return int(w[0]), int(h[0]), int(c[0])


@dataclass
class MediaSpan:
    """One image or audio clip of a :class:`MediaPrompt`: positions ``start`` to ``start + n_pos`` of its
    token array, ``n_tokens`` embeddings (they differ only with M-RoPE)."""

    start: int
    n_pos: int
    n_tokens: int
    kind: MediaKind
    id: str
    chunk: Any  # const mtmd_input_chunk *, owned by the prompt's chunk list
    embd: npt.NDArray[np.float32] | None = None
    encode_ms: float = 0.0  # the tower's time on it
    decode_ms: float = 0.0  # its embeddings' time through the text model


class Projector(Handle):
    """A multimodal projector (``mmproj-*.gguf``) loaded beside its text model.

    ``use_gpu`` offloads the projector's tower to the first accelerator (default: when the model itself
    uses one); ``n_threads`` is the CPU threads of its encode; ``image_min_tokens`` / ``image_max_tokens``
    bound the tokens of an image for projectors with dynamic resolution; ``warmup`` runs one encode at
    load (llama.cpp's default; off here, the first image pays it instead). The model's ``close()`` closes
    its projectors first.
    """

    _kind = "projector"

    def __init__(self, model: Model, path: str | os.PathLike[str], *, use_gpu: bool | None = None,
                 n_threads: int | None = None, image_min_tokens: int | None = None,
                 image_max_tokens: int | None = None, warmup: bool = False) -> None:
        from .projector_check import check_projector_file

        self.path = Path(path)
        check_projector_file(self.path, n_embd_text=int(lib.llama_model_n_embd_inp(model._p())))
        params = lib.mtmd_context_params_default()
        params.use_gpu = (model.n_gpu_layers != 0) if use_gpu is None else bool(use_gpu)
        params.print_timings = False
        params.warmup = bool(warmup)
        if n_threads is not None:
            if n_threads < 1:
                raise ValueError("n_threads must be >= 1")
            params.n_threads = n_threads
        for name, value in (("image_min_tokens", image_min_tokens), ("image_max_tokens", image_max_tokens)):
            if value is not None:
                if value < 1:
                    raise ValueError(f"{name} must be >= 1")
                setattr(params, name, value)
        # Media enter by position (mtmd_tokenize_from_parts), never by a marker in the text: the marker
        # libmtmd would look for is one no text contains.
        marker = ffi.new("char[]", MARKER.encode())
        params.media_marker = marker
        ptr = lib.mtmd_init_from_file(os.fsencode(self.path), model._p(), params)
        if ptr == ffi.NULL:
            raise ModelLoadError(f"llama.cpp could not load the projector {self.path} for this model "
                                 "(enable logging for 'pyllama.llama' for its reason)")
        super().__init__(ptr, lib.mtmd_free, model)
        self.model = model
        self.use_gpu = bool(params.use_gpu)
        self.vision = bool(lib.mtmd_support_vision(ptr))
        self.audio = bool(lib.mtmd_support_audio(ptr))
        rate = int(lib.mtmd_get_audio_sample_rate(ptr))
        self.audio_sample_rate: int | None = rate if rate > 0 else None
        self.mrope = bool(lib.mtmd_decode_use_mrope(ptr))
        self._encode_lock = threading.Lock()  # an encode leaves its output in the context until it is read
        self.n_encoded = 0  # images and clips run through the tower (a turn reusing the cache runs none)
        model._adopt(self)

    @property
    def modalities(self) -> tuple[MediaKind, ...]:
        """What the projector takes: ``("image",)``, ``("audio",)`` or both."""
        out: list[MediaKind] = []
        if self.vision:
            out.append("image")
        if self.audio:
            out.append("audio")
        return tuple(out)

    # --- media -> bitmaps ------------------------------------------------------------------------------
    def _bitmap(self, media: Media) -> Any:
        """A new mtmd_bitmap (the caller frees it) with an id that names its content."""
        if media.kind == "image" and not self.vision:
            raise MediaError(f"the projector {self.path.name} takes no images (it takes: "
                             f"{', '.join(self.modalities) or 'nothing'})")
        if media.kind == "audio" and not self.audio:
            raise MediaError(f"the projector {self.path.name} takes no audio (it takes: "
                             f"{', '.join(self.modalities) or 'nothing'})")
        data = media.data()
        ptr = self._p()
        digest = hashlib.sha256()
        if isinstance(data, np.ndarray):
            digest.update(f"{data.dtype}{data.shape}".encode())
            digest.update(data.tobytes() if not data.flags.c_contiguous else data.data)
            if media.kind == "image":
                h, w = int(data.shape[0]), int(data.shape[1])
                bmp = lib.mtmd_bitmap_init(w, h, ffi.from_buffer("unsigned char[]", data))
            else:
                bmp = lib.mtmd_bitmap_init_from_audio(int(data.size), ffi.from_buffer("float[]", data))
        else:
            if media.kind == "image":
                info = image_info(data)
                if info is None:
                    raise MediaError(f"{media!r}: not an image format llama.cpp reads (PNG, JPEG, BMP, GIF, "
                                     "PNM, TGA, PSD)")
                _check_size(info[0], info[1])
            digest.update(data)
            wrapped = lib.mtmd_helper_bitmap_init_from_buf(ptr, data, len(data), False,
                                                           lib.mtmd_helper_init_opt_default())
            bmp = wrapped.bitmap
            if bmp != ffi.NULL and bool(lib.mtmd_bitmap_is_audio(bmp)) != (media.kind == "audio"):
                found = "audio" if lib.mtmd_bitmap_is_audio(bmp) else "an image"
                lib.mtmd_bitmap_free(bmp)
                raise MediaError(f"{media!r} holds {found}, not {'audio' if media.kind == 'audio' else 'an image'}")
        if bmp == ffi.NULL:
            raise MediaError(f"llama.cpp could not decode {media!r} (truncated or corrupt?)")
        lib.mtmd_bitmap_set_id(bmp, digest.hexdigest()[:32].encode())
        return bmp

    # --- prompts -----------------------------------------------------------------------------------------
    def tokenize(self, parts: Sequence[str | Media], *, add_special: bool = True,
                 parse_special: bool = True) -> MediaPrompt:
        """Tokenize text and media in order into a :class:`MediaPrompt` (``add_special``: the model's BOS;
        ``parse_special``: control tokens written in the text are tokens)."""
        if isinstance(parts, (str, Media)):
            parts = [parts]
        items = list(parts)
        if not items:
            raise ValueError("empty prompt: nothing to condition the generation on")
        for p in items:
            if not isinstance(p, (str, Media)):
                raise TypeError(f"a prompt's parts are strings and pyllama.Image / pyllama.Audio, "
                                f"not {type(p).__name__}")
        ptr = self._p()
        bitmaps: list[Any] = []
        try:
            keep: list[Any] = []
            c_parts = []
            for p in items:
                part = ffi.new("mtmd_input_part *")
                if isinstance(p, str):
                    text = ffi.new("mtmd_input_text *")
                    raw = p.encode("utf-8")
                    buf = ffi.new("char[]", raw)
                    text.text, text.text_len = buf, len(raw)
                    text.add_special, text.parse_special = add_special, parse_special
                    part.text = text
                    keep += [text, buf]
                else:
                    bmp = self._bitmap(p)
                    bitmaps.append(bmp)
                    part.bitmap = bmp
                keep.append(part)
                c_parts.append(part)
            chunks = lib.mtmd_input_chunks_init()
            if chunks == ffi.NULL:
                raise MemoryError("libmtmd could not allocate a chunk list")
            arr = ffi.new("mtmd_input_part *[]", c_parts)
            rc = lib.mtmd_tokenize_from_parts(ptr, chunks, arr, len(c_parts), add_special)
            if rc != 0:
                lib.mtmd_input_chunks_free(chunks)
                raise MediaError("libmtmd could not preprocess the media (enable logging for 'pyllama.llama' "
                                 f"for its reason; code {rc})")
        finally:
            for bmp in bitmaps:
                lib.mtmd_bitmap_free(bmp)
        return MediaPrompt(self, chunks)

    def prompt(self, text: str, media: Sequence[Media], *, add_special: bool = True,
               parse_special: bool = True) -> MediaPrompt:
        """Tokenize ``text`` in which each :data:`MARKER` stands for the next of ``media`` (a rendered chat)."""
        return self.tokenize(media_parts(text, media), add_special=add_special, parse_special=parse_special)

    def _encode(self, span: MediaSpan, owner: MediaPrompt) -> npt.NDArray[np.float32]:
        """Run the tower on one media chunk of ``owner``; its embeddings ([n_tokens, n_embd]) are kept in
        the span."""
        if span.embd is not None:
            return span.embd
        with self._encode_lock:
            owner._p()  # closed meanwhile (a cancelled request): its chunks are gone
            ptr = self._p()
            t0 = time.perf_counter()
            if lib.mtmd_encode_chunk(ptr, span.chunk) != 0:
                raise MediaError(f"llama.cpp could not encode the {span.kind} (enable logging for 'pyllama.llama' "
                                 "for its reason)")
            n_embd = int(lib.llama_model_n_embd_inp(self.model._p()))
            out = lib.mtmd_get_output_embd(ptr)
            count = n_embd * span.n_tokens
            embd: npt.NDArray[np.float32] = np.frombuffer(ffi.buffer(out, count * 4), dtype=np.float32).copy()
            span.encode_ms = (time.perf_counter() - t0) * 1e3
            self.n_encoded += 1
        span.embd = embd
        return embd

    def __repr__(self) -> str:
        state = " closed" if self.closed else f" ({', '.join(self.modalities)})"
        return f"<pyllama.Projector {self.path.name}{state}>"


class MediaPrompt(Handle):
    """A tokenized prompt of text and media (:meth:`Projector.tokenize`): ``tokens`` (media positions hold
    negative placeholder ids), ``spans`` (one :class:`MediaSpan` per image or clip), ``n_media_tokens``
    and, once encoded, ``encode_ms``. Pass it to :func:`pyllama.generate` as the prompt."""

    _kind = "media prompt"

    def __init__(self, projector: Projector, chunks: Any) -> None:
        super().__init__(chunks, lib.mtmd_input_chunks_free, projector)
        self.projector = projector
        self.disposable = False  # True: the requests it is submitted with close it, the last one to end
        self._holders = 0
        self._holders_lock = threading.Lock()
        pieces: list[npt.NDArray[np.int32]] = []
        spans: list[MediaSpan] = []
        n = 0
        n_out = ffi.new("size_t *")
        for i in range(int(lib.mtmd_input_chunks_size(chunks))):
            chunk = lib.mtmd_input_chunks_get(chunks, i)
            kind = int(lib.mtmd_input_chunk_get_type(chunk))
            if kind == lib.MTMD_INPUT_CHUNK_TYPE_TEXT:
                toks = lib.mtmd_input_chunk_get_tokens_text(chunk, n_out)
                arr = np.frombuffer(ffi.buffer(toks, n_out[0] * 4), dtype=np.int32).copy()
                pieces.append(arr)
                n += arr.size
                continue
            media_id = ffi.string(lib.mtmd_input_chunk_get_id(chunk)).decode("ascii", "replace")
            n_pos = int(lib.mtmd_input_chunk_get_n_pos(chunk))
            n_tok = int(lib.mtmd_input_chunk_get_n_tokens(chunk))
            # one placeholder for the whole run, from its content: equal media give equal runs
            placeholder = -1 - (int(hashlib.sha256(media_id.encode()).hexdigest()[:8], 16) & 0x3FFFFFFF)
            pieces.append(np.full(n_pos, placeholder, dtype=np.int32))
            spans.append(MediaSpan(n, n_pos, n_tok, "audio" if kind == lib.MTMD_INPUT_CHUNK_TYPE_AUDIO else "image",
                                   media_id, chunk))
            n += n_pos
        self.tokens: npt.NDArray[np.int32] = (np.concatenate(pieces) if pieces
                                             else np.empty(0, dtype=np.int32))
        self.spans: tuple[MediaSpan, ...] = tuple(spans)
        self._starts = {s.start: s for s in spans}
        self._start_array = np.asarray([s.start for s in spans], dtype=np.int64)

    @property
    def n_media_tokens(self) -> int:
        """Embeddings the media become (what they cost the context)."""
        return sum(s.n_tokens for s in self.spans)

    @property
    def encode_ms(self) -> float:
        """Milliseconds the towers took on the media encoded so far."""
        return sum(s.encode_ms for s in self.spans)

    @property
    def decode_ms(self) -> float:
        """Milliseconds the media's embeddings took through the text model so far."""
        return sum(s.decode_ms for s in self.spans)

    def span_at(self, pos: int) -> MediaSpan | None:
        """The media run that starts at ``pos``, if one does."""
        return self._starts.get(pos)

    def text_until(self, pos: int) -> int:
        """How many text tokens follow ``pos`` before the next media run (or the end)."""
        starts = self._start_array
        i = int(np.searchsorted(starts, pos, side="right"))  # the first run starting after pos
        return (int(starts[i]) if i < starts.size else int(self.tokens.size)) - pos

    def inside(self, pos: int) -> int:
        """``pos`` moved back to the start of the media run it falls strictly inside (else ``pos``)."""
        for s in self.spans:
            if s.start < pos < s.start + s.n_pos:
                return s.start
        return pos

    def encode(self, from_pos: int = 0) -> None:
        """Run the towers on the media at or after ``from_pos`` that are not encoded yet (thread-safe; the
        decoder calls it for what is left when the sequence reaches a media run)."""
        self._p()
        for s in self.spans:
            if s.start >= from_pos and s.embd is None:
                self.projector._encode(s, self)

    def decode_span(self, ctx: Context, span: MediaSpan, seq_id: int) -> None:
        """Decode one media run's embeddings into ``seq_id`` at ``span.start`` (the caller holds the context's
        lock); the embeddings are dropped afterwards."""
        embd = self.projector._encode(span, self)
        new_pos = ffi.new("llama_pos *")
        t0 = time.perf_counter()
        rc = lib.mtmd_helper_decode_image_chunk(self.projector._p(), ctx._p(), span.chunk,
                                                ffi.from_buffer("float[]", embd), span.start, seq_id,
                                                ctx.n_batch, new_pos, ffi.NULL, ffi.NULL)
        if rc != 0:
            from .errors import DecodeError

            raise DecodeError(f"llama.cpp could not decode the {span.kind}'s embeddings ({rc})", int(rc))
        span.decode_ms = (time.perf_counter() - t0) * 1e3
        span.embd = None

    def hold(self) -> None:
        """A request takes the prompt (several may: ``n`` choices); see :meth:`release`."""
        with self._holders_lock:
            self._p()
            self._holders += 1

    def release(self) -> None:
        """A request is done with the prompt: a disposable one is closed when the last lets go. Never waits:
        while another thread encodes with the projector, the close is left to a thread of its own."""
        with self._holders_lock:
            self._holders -= 1
            last = self._holders <= 0 and self.disposable
        if not last:
            return
        lock = self.projector._encode_lock
        if lock.acquire(blocking=False):
            try:
                Handle.close(self)
            finally:
                lock.release()
        else:
            threading.Thread(target=self.close, name="pyllama-media-close", daemon=True).start()

    def close(self) -> None:
        """Free the chunks now (after an encode under way in another thread has finished)."""
        with self.projector._encode_lock:
            super().close()

    def __enter__(self) -> MediaPrompt:
        self._p()
        return self

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __repr__(self) -> str:
        return (f"<pyllama.MediaPrompt {self.tokens.size} positions, {len(self.spans)} media, "
                f"{self.n_media_tokens} media tokens>")


@dataclass(frozen=True)
class MediaParts:
    """A prompt of text and media not tokenized yet, with its tokenizer switches: what crosses to a worker
    process (the projector is there), tokenized there as :meth:`Projector.tokenize` does."""

    parts: tuple[str | Media, ...]
    add_special: bool = True
    parse_special: bool = True

    @property
    def media(self) -> list[Media]:
        return [p for p in self.parts if isinstance(p, Media)]


def as_media_prompt(model: Model, prompt: Any, *, add_special: bool = True,
                    parse_special: bool = True) -> MediaPrompt | None:
    """``prompt`` as a :class:`MediaPrompt` when it holds media (a MediaPrompt, :class:`MediaParts`, or a list
    of strings and media, tokenized with the model's projector), else None."""
    if isinstance(prompt, MediaParts):
        prompt, add_special, parse_special = list(prompt.parts), prompt.add_special, prompt.parse_special
    if isinstance(prompt, MediaPrompt):
        prompt._p()
        if prompt.projector.model is not model:
            raise ValueError("this media prompt was tokenized for another model")
        return prompt
    if isinstance(prompt, Media):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)) and any(isinstance(p, Media) for p in prompt):
        proj = model.mmproj
        if proj is None:
            raise MediaError("the prompt holds media but the model has no projector: load one with "
                             "model.projector('mmproj.gguf') or Model(..., mmproj=...)")
        return proj.tokenize(prompt, add_special=add_special, parse_special=parse_special)
    return None


def media_parts(text: str, media: Sequence[Media]) -> list[str | Media]:
    """``text`` cut at each :data:`MARKER`, with the next of ``media`` in each cut (a rendered chat as the
    parts :meth:`Projector.tokenize` takes)."""
    pieces = text.split(MARKER)
    if len(pieces) - 1 != len(media):
        raise MediaError(f"the text has {len(pieces) - 1} media markers for {len(media)} media")
    parts: list[str | Media] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append(piece)
        if i < len(media):
            parts.append(media[i])
    return parts


_MEDIA_PARTS = {"image_url": ("image_url", "url"), "input_audio": ("input_audio", "data"),
                "image": ("image", None), "audio": ("audio", None)}


def split_media(messages: Sequence[Any], *,
                open_file: Callable[[str], Path] | None = None) -> tuple[list[Any], list[Media]]:
    """Chat messages with their media parts replaced by marker parts (``{"type": "media_marker"}``, which
    llama.cpp's chat renderer places without the newline it puts between text parts), and the media in
    order.

    A media part is OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` or ``{"type":
    "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}``, or a :class:`Media` object itself.
    A URL is a ``data:image/...;base64,`` URL or bare base64; ``file://NAME`` (or a plain path) is opened
    with ``open_file`` (the server confines it to its ``--media-path``), refused without it. Remote URLs
    are refused: nothing is downloaded behind the caller's back.
    """
    out: list[Any] = []
    media: list[Media] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts: list[Any] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            item = _media_part(part, where, open_file)
            if item is None:
                parts.append(part)
                continue
            media.append(item)
            parts.append({"type": "media_marker", "text": MARKER})
        out.append({**message, "content": parts})
    return out, media


def _media_part(part: Any, where: str, open_file: Callable[[str], Path] | None) -> Media | None:
    if isinstance(part, Media):
        return part
    if not isinstance(part, Mapping):
        return None
    kind = part.get("type")
    if kind not in _MEDIA_PARTS:
        return None
    cls: type[Media] = Audio if kind in ("input_audio", "audio") else Image
    key, field = _MEDIA_PARTS[kind]
    value = part.get(key)
    if isinstance(value, Media):
        return value
    if field is not None and isinstance(value, Mapping):
        value = value.get(field, value.get("url"))
    if not isinstance(value, str) or not value:
        raise MediaError(f"{where}: {kind} needs a {'URL' if field == 'url' else 'base64 string'}")
    if value.startswith("data:"):
        head, sep, body = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise MediaError(f"{where}: a data: URL must be base64-encoded (data:image/png;base64,...)")
        if not head.startswith(("data:image/", "data:audio/")):
            raise MediaError(f"{where}: a data: URL of type {head[5:].split(';')[0]!r} is neither image nor audio")
        return cls(_b64(body, where))
    if value.startswith(("http://", "https://")):
        raise MediaError(f"{where}: remote URLs are not fetched; send the media as a data: URL")
    if value.startswith("file://") or os.path.isabs(value):
        if open_file is None:
            raise MediaError(f"{where}: local files are not allowed here")
        return cls(open_file(value[7:] if value.startswith("file://") else value))
    return cls(_b64(value, where))  # bare base64, as llama-server takes it


def _b64(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: invalid base64 data") from None
    if not data:
        raise MediaError(f"{where}: empty media data")
    return data


def check_media_prompt(media: MediaPrompt, *, draft: bool = False, context_shift: bool = False) -> None:
    """Refuse what a generation cannot do with media in its prompt."""
    if draft:
        raise ValueError("speculative decoding (draft=) does not take prompts with images or audio yet")
    if context_shift:
        raise ValueError("context_shift would cut through images or audio: it does not take media prompts")
    last = media.spans[-1] if media.spans else None
    if last is not None and last.start + last.n_pos >= media.tokens.size:
        raise ValueError("a prompt must not end with an image or audio clip: the reply starts from text after "
                         "it (a chat template adds it)")


__all__ = ["Audio", "Image", "Media", "MediaError", "MediaParts", "MediaPrompt", "MediaSpan", "Projector", "as_media_prompt", "check_media_prompt", "split_media", "media_parts", "MARKER",
           "image_info"]
