"""The serving engine in a worker process: :class:`IsolatedEngine`, the :class:`pyllama.engine.Engine`
API that the server uses, with the real engine (and the model's weights) in a child.

The host keeps a vocabulary-only model, so prompts are tokenized and checked
here and chat templates render here; the child receives token ids and
streams each request's events back (several requests decode together in its
engine). If the child dies, every request that had streamed something raises
:class:`WorkerCrashedError`; those that had not (queued, or in prefill) are
sent once more, to a fresh child with the same settings (a request that
crashes that child too fails). The host process, a server included, stays up.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt

from .._channel import wake
from .._progress import ProgressArg
from ..engine import EngineBusyError, EngineRequest, EngineStats
from ..engine.request import PROGRESS_TOKEN, PromptProgress
from ..engine.core import COUNTERS, lora_scales
from ..engine.front import EnginePrompt, EngineFront, check_embed_request, check_request, check_slot
from ..engine.slots import SlotFile
from ..errors import ClosedError
from ..media import Media, MediaParts, MediaPrompt
from ..model import Model
from ..options import SUBMIT_KEYS, Sampling, SubmitOptions, Unpack
from ..stream import FinishReason, TokenEvent
from . import protocol as p
from .client import Worker
from .errors import WorkerCrashedError, WorkerError
from .generation import portable_options
from .process import _Inbox, _Process

if TYPE_CHECKING:
    from ..embed import EmbedInput
    from ..stream import SequenceStream


class _VocabModel(Model):
    """The host's vocabulary-only model, reporting the weights' facts (zero in a vocab-only
    load) as the child's full model gave them."""

    facts: Mapping[str, int] = {}  # replaced (not mutated) once the child has loaded the weights

    @property
    def n_embd(self) -> int:
        return self.facts.get("n_embd", 0)

    @property
    def n_ctx_train(self) -> int:
        return self.facts.get("n_ctx_train", 0)

    @property
    def n_params(self) -> int:
        return self.facts.get("n_params", 0)

    @property
    def size(self) -> int:
        return self.facts.get("size", 0)


class _Received:
    """What :class:`EngineRequest` reads from its stream, here the record of the child's events."""

    __slots__ = ("finish_reason", "token_ids", "texts")

    def __init__(self) -> None:
        self.finish_reason: FinishReason | None = None
        self.token_ids: list[int] = []
        self.texts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        return np.array(self.token_ids, dtype=np.int32)

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)


class IsolatedRequest(EngineRequest):
    """A request to an :class:`IsolatedEngine`, used as a :class:`pyllama.engine.EngineRequest`
    (``for`` or ``async for`` its :class:`TokenEvent` s); :meth:`cancel` stops it in the child."""

    def __init__(self, prompt_tokens: npt.NDArray[np.int32], on_end: Callable[[], None],
                 resubmit: Callable[[IsolatedRequest], None] | None = None) -> None:
        self._received = _Received()
        super().__init__(prompt_tokens, cast("SequenceStream", self._received), "stop", _stop)
        self._on_end = on_end
        self._end_lock = threading.Lock()
        self._proc: _Process | None = None
        self._inbox: _Inbox | None = None
        self._rid = 0
        self._delivered = False  # an event reached the consumer: the request can no longer be run again
        self._resubmit = resubmit  # once: a request the crash caught before its first event

    def _halt(self) -> None:
        """What :meth:`cancel` does (once): stop the request in the child and end its stream."""
        if self._proc is not None:
            self._proc.cancel(self._rid)  # CANCEL to the child; its later replies are dropped
        self._end("cancelled", None)

    def _take(self, msg: tuple[Any, ...]) -> None:
        """One reply, on the worker's reader thread: no queue and no thread hop per token."""
        kind = msg[0]
        if self.t_done is not None:
            return  # cancelled meanwhile: whatever the child still sends is dropped
        if kind == p.TOKEN:
            self._delivered = True
            _, _, token, text, index, logprob, top = msg
            got = self._received
            if token >= 0:
                if self.t_first_token is None:
                    self.t_first_token = time.perf_counter()
                got.token_ids.append(token)
            if text:
                got.texts.append(text)
            ev = (PromptProgress.of(*top) if token == PROGRESS_TOKEN else TokenEvent(token, text, index, logprob, top))
            waiter = self._channel.put(ev)
            if waiter is not None:  # the consumer's loop is parked on this request
                wake((waiter,))
        elif kind == p.END:
            self.n_cached, self.speculative = msg[4], msg[5]
            self._end(msg[2], None)
        elif kind == p.ERR:
            exc = p.decode_error(msg[2], WorkerError)
            proc, inbox = self._proc, self._inbox
            if proc is not None and inbox is not None and proc.memory_limit is not None:
                # under a memory limit the child's log may blame an allocation: read it off this reader thread
                # (it waits a moment for those lines), which delivers every other request's tokens
                threading.Thread(target=lambda: self._end(None, proc.failure(exc, inbox)), daemon=True,
                                 name="pyllama-isolated-failure").start()
                return
            self._end(None, exc)
        else:  # CRASH: WorkerCrashedError, or ClosedError when the engine was closed
            error, resubmit = msg[2], self._resubmit
            self._resubmit = None
            if isinstance(error, WorkerCrashedError) and not self._delivered and resubmit is not None:
                # Queued or in prefill when the child died: nothing was seen, so it runs on the fresh child
                # (once: a request that crashes a child twice fails). Off this reader thread, which belongs
                # to the dead child.
                threading.Thread(target=self._again, args=(resubmit, error), daemon=True,
                                 name="pyllama-isolated-resubmit").start()
                return
            self._end(None, error)

    def _again(self, resubmit: Callable[[IsolatedRequest], None], crash: BaseException) -> None:
        try:
            resubmit(self)
        except BaseException:  # noqa: BLE001 - no fresh child: the request fails with the crash it met
            self._end(None, crash)

    def _end(self, reason: FinishReason | None, error: BaseException | None) -> None:
        with self._end_lock:  # the reader's END and a consumer's cancel may race: the first one counts
            if self.t_done is not None:
                return
            self._received.finish_reason, self.error, self.t_done = reason, error, time.perf_counter()
        if self._proc is not None:  # else submit() forgets it once the child has taken the request
            self._proc.done(self._rid)
        wake((self._channel.close(error),))
        self._on_end()


def _stop(req: EngineRequest) -> None:
    assert isinstance(req, IsolatedRequest)
    req._halt()


class _Sink(_Inbox):
    """Hands the worker's replies to one request as they arrive."""

    __slots__ = ("req",)

    def __init__(self, req: IsolatedRequest) -> None:
        super().__init__()
        self.req = req

    def put(self, msg: tuple[Any, ...]) -> None:
        self.req._take(msg)


def _media_parts(prompt: Any, add_special: bool, parse_special: bool) -> MediaParts | None:
    """A prompt holding media as :class:`MediaParts` (for the child), else None."""
    if isinstance(prompt, MediaParts):
        return prompt
    if isinstance(prompt, MediaPrompt):
        raise ValueError("a MediaPrompt belongs to a projector in this process: give an isolated engine the "
                         "parts (strings and pyllama.Image / pyllama.Audio)")
    if isinstance(prompt, Media):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)) and any(isinstance(x, Media) for x in prompt):
        return MediaParts(tuple(prompt), add_special, parse_special)
    return None


class IsolatedEngine(EngineFront):
    """An :class:`pyllama.engine.Engine` in a worker process, for servers that must outlive a crash.

    ``model`` is a GGUF path; the keywords are :class:`pyllama.engine.Engine`'s (``n_gpu_layers``
    :class:`pyllama.Model`'s). ``model`` here is a vocabulary-only model (tokenizer, chat
    template, metadata). Errors found in the child (a bad grammar) are raised by the request's
    iterator, not by :meth:`submit`. ``worker_pid`` is the child's process id. ``memory_limit`` (bytes, Linux)
    caps the child's address space (:class:`pyllama.Worker`'s): a request that needs more ends with
    :class:`pyllama.WorkerMemoryError` naming the limit. ``mmproj``: the model's projector (images, audio).
    ``progress``: the child's load of the weights, as :class:`pyllama.Model`'s (a callable gets 0.0..1.0).
    """

    def __init__(self, model: str | os.PathLike[str], *, n_gpu_layers: int | Literal["all", "auto"] = "auto",
                 n_slots: int = 4, n_ctx: int | Literal["auto"] = "auto", n_batch: int = 512, n_ubatch: int = 512,
                 n_threads: int | None = None, n_threads_batch: int | None = None,
                 flash_attn: Literal["auto", "on", "off"] | bool = "auto", type_k: str | int = "f16",
                 type_v: str | int = "f16", max_queue: int = 64, slot_prompt_similarity: float = 0.1,
                 embeddings: bool = True, pooling: str | None = None, draft: str | None = None,
                 n_draft: int = 16, sampling: Sampling = "auto", log_level: str = "WARNING",
                 progress: ProgressArg = None, lora: Sequence[tuple[str | os.PathLike[str], float]] = (),
                 mmproj: str | os.PathLike[str] | None = None, mmproj_gpu: bool | None = None,
                 image_min_tokens: int | None = None, image_max_tokens: int | None = None,
                 memory_limit: int | None = None) -> None:
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError("n_slots must be an int >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        # a store reference's download shows its bar here; the weights' load is the child's
        self.model = vocab = _VocabModel(model, vocab_only=True, progress=True if progress is True else None)
        self.max_queue = max_queue
        self._lock = threading.Condition()
        self._in_flight = 0
        self._closed = False
        try:
            self._worker = Worker(log_level=log_level, restart=True, memory_limit=memory_limit)
            spec: dict[str, Any] = {"model": os.fspath(self.model.path),
                                    "model_options": {"n_gpu_layers": n_gpu_layers},
                    "engine_options": {"n_slots": n_slots, "n_ctx": n_ctx, "n_batch": n_batch,
                                       "n_ubatch": n_ubatch, "n_threads": n_threads,
                                       "n_threads_batch": n_threads_batch, "flash_attn": flash_attn,
                                       "type_k": type_k, "type_v": type_v, "max_queue": max_queue,
                                       "slot_prompt_similarity": slot_prompt_similarity,
                                       "embeddings": embeddings, "pooling": pooling, "draft": draft,
                                       "n_draft": n_draft,
                                       "sampling": sampling,
                                       "lora": [(os.fspath(path), scale) for path, scale in lora]}}
            if mmproj is not None:  # loaded beside the model in the child (pyllama.Model.projector's options)
                spec["projector"] = {"path": os.fspath(mmproj), "use_gpu": mmproj_gpu,
                                     "image_min_tokens": image_min_tokens, "image_max_tokens": image_max_tokens}
            info = self._worker._load_spec(spec, progress)
        except BaseException:
            if hasattr(self, "_worker"):
                self._worker.close()
            self.model.close()
            raise
        vocab.facts = dict(info["model_facts"])
        self._spec = spec
        self._lora = [(os.fspath(path), float(scale)) for path, scale in lora]
        self._lora_scales = tuple(scale for _, scale in self._lora)
        self.n_slots: int = info["n_slots"]
        self.n_ctx_slot: int = info["n_ctx_slot"]
        self.n_batch: int = info["n_batch"]
        self.embeddings: bool = info["embeddings"]
        self.pooling: str = info["pooling"]
        self._modalities: tuple[str, ...] = tuple(info.get("modalities", ()))

    # --- requests -------------------------------------------------------------------------------
    def submit(self, prompt: EnginePrompt, **options: Unpack[SubmitOptions]) -> IsolatedRequest:
        """Queue a generation in the child, as :meth:`pyllama.engine.Engine.submit` does in process.

        Non-blocking, except that the first request after a crash starts the fresh child.
        """
        if self._closed:
            raise ClosedError("the engine is closed")
        sent = portable_options("submit", options, SUBMIT_KEYS)
        add_special, parse_special = sent.get("add_special", True), sent.get("parse_special", True)
        parts = _media_parts(prompt, add_special, parse_special)
        media_tokens = None
        if parts is not None:  # the child's projector lays the prompt out: its positions are checked here
            self.check_modalities(parts.media)
            media_tokens = self.prompt_tokens(list(parts.parts), parts.add_special, parts.parse_special)
        tokens = check_request(self.model.vocab, prompt, n_ctx_slot=self.n_ctx_slot,
                               max_tokens=sent.get("max_tokens", 256), add_special=add_special,
                               parse_special=parse_special, context_full=sent.get("context_full", "stop"),
                               media_tokens=media_tokens)
        if sent.get("slot") is not None:
            check_slot(sent["slot"], self.n_slots)
        if sent.get("lora") is not None:
            sent["lora"] = dict(enumerate(lora_scales(sent["lora"], len(self._lora))))
        sent.pop("add_special", None)  # the child gets the tokens
        sent.pop("parse_special", None)
        with self._lock:  # the child's queue bound, counted here so a full queue is a 503 before any byte
            if self._in_flight >= self.n_slots + self.max_queue:
                raise EngineBusyError(f"the engine is busy: {self._in_flight} requests are in flight "
                                      f"(max_queue={self.max_queue})",
                                      retry_after=1.0 + self._in_flight / self.n_slots)
            self._in_flight += 1
        payload: Any = tokens if parts is None else parts  # media go as they came: tokenized in the child
        req = IsolatedRequest(tokens, self._request_ended, lambda again: self._send(again, payload, sent))
        req.slot_pin = req.slot_id = sent.get("slot")  # the child reports no slot: a pinned one is known
        try:
            self._send(req, payload, sent)
        except BaseException:
            self._request_ended()
            raise
        return req

    def _send(self, req: IsolatedRequest, tokens: npt.NDArray[np.int32] | MediaParts, sent: dict[str, Any]) -> None:
        if self._closed:
            raise ClosedError("the engine is closed")
        sink = _Sink(req)
        req._inbox = sink
        proc, rid, _ = self._worker._submit(p.ENGINE_SUBMIT, tokens, sent, inbox=sink)
        req._proc, req._rid = proc, rid
        if req.done:  # it ended (or was cancelled) before we got here
            if req.finish_reason == "cancelled":
                proc.cancel(rid)
            else:
                proc.done(rid)

    def _request_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    # --- media ---------------------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        return self._modalities

    def media_prompt(self, parts: Sequence[str | Media], *, add_special: bool = True,
                     parse_special: bool = True) -> MediaParts:
        """``parts`` as they go to the child, whose projector tokenizes them (the host has none)."""
        out = MediaParts(tuple(parts), add_special, parse_special)
        self.check_modalities(out.media)
        return out

    def prompt_tokens(self, parts: Sequence[str | Media], add_special: bool = True,
                      parse_special: bool = True) -> npt.NDArray[np.int32]:
        """:meth:`pyllama.engine.Engine.prompt_tokens`, in the child (its projector lays the media out)."""
        self.check_modalities([x for x in parts if isinstance(x, Media)])
        tokens: npt.NDArray[np.int32] = self._worker._call(p.ENGINE_CALL, "prompt_tokens",
                                                            (list(parts), add_special, parse_special))
        return tokens

    # --- embeddings (generate, tokenize, detokenize: EngineFront, on the host's vocabulary) -----------
    def embed(self, texts: Sequence[EmbedInput], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts`` (strings or token id sequences), shape (len(texts), n_embd), computed in the
        child."""
        items = check_embed_request(texts, embeddings=self.embeddings)
        vectors: npt.NDArray[np.float32] = self._worker._call(p.ENGINE_EMBED, items, normalize)
        return vectors

    async def aembed(self, texts: Sequence[EmbedInput], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        return await asyncio.to_thread(self.embed, texts, normalize=normalize)

    # --- a slot's cache and the LoRA scales (in the child) -------------------------------------------
    def save_slot(self, slot: int, path: str | os.PathLike[str]) -> SlotFile:
        """:meth:`pyllama.engine.Engine.save_slot`, in the child."""
        out: SlotFile = self._worker._call(p.ENGINE_CALL, "save_slot", (check_slot(slot, self.n_slots),
                                                                         os.fspath(path)))
        return out

    def restore_slot(self, slot: int, path: str | os.PathLike[str]) -> SlotFile:
        """:meth:`pyllama.engine.Engine.restore_slot`, in the child."""
        out: SlotFile = self._worker._call(p.ENGINE_CALL, "restore_slot", (check_slot(slot, self.n_slots),
                                                                            os.fspath(path)))
        return out

    def erase_slot(self, slot: int) -> int:
        """:meth:`pyllama.engine.Engine.erase_slot`, in the child."""
        n: int = self._worker._call(p.ENGINE_CALL, "erase_slot", (check_slot(slot, self.n_slots),))
        return n

    @property
    def lora(self) -> list[tuple[str, float]]:
        """:attr:`pyllama.engine.Engine.lora` (kept here: a fresh child after a crash starts from it)."""
        return [(path, scale) for (path, _), scale in zip(self._lora, self._lora_scales)]

    def set_lora_scales(self, scales: Mapping[int, float]) -> None:
        """:meth:`pyllama.engine.Engine.set_lora_scales`, in the child (and in the child started after a
        crash)."""
        checked = lora_scales(scales, len(self._lora))
        self._worker._call(p.ENGINE_CALL, "set_lora_scales", (dict(enumerate(checked)),))
        self._lora_scales = checked
        self._spec["engine_options"]["lora"] = [(path, s) for (path, _), s in zip(self._lora, checked)]

    # --- state ----------------------------------------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        """The child's process id (None while no child runs: after a crash, until the next request)."""
        return self._worker.pid

    def stats(self) -> EngineStats:
        """The child engine's counters (they restart from zero with a fresh child)."""
        stats: EngineStats | None = None
        if not self._closed and self._worker.pid is not None:  # a scrape never starts a child
            stats = self._worker._call(p.ENGINE_STATS)
        if stats is None:  # the fresh child has not loaded its engine yet
            zero = dict.fromkeys(("busy_slots", "queue_len", *COUNTERS), 0)
            stats = EngineStats(n_slots=self.n_slots, **zero)
        return stats

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the child (with ``drain``, after the requests in flight finish, up to ``timeout``
        seconds) and free the vocabulary. Requests still running raise :class:`ClosedError`. Idempotent."""
        self._closed = True
        if drain:
            with self._lock:
                self._lock.wait_for(lambda: self._in_flight == 0, timeout)
        self._worker.close()
        self.model.close()

    def __enter__(self) -> IsolatedEngine:
        return self

    def __repr__(self) -> str:
        return (f"<pyllama.worker.IsolatedEngine slots={self.n_slots} pid={self.worker_pid}"
                f"{' closed' if self._closed else ''}>")


__all__ = ["IsolatedEngine", "IsolatedRequest"]
