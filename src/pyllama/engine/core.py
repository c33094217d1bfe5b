"""The serving engine: continuous batching of many requests over one context.

One engine thread owns every llama.cpp call on the engine's context. Each
step builds one batch: the next token of every generating slot plus prompt
chunks of newly admitted requests (chunked prefill within ``n_batch``, so a
long prompt never stalls the streams in flight), decodes it once, and samples
each slot's row with that request's own sampler chain. Requests are submitted
from any thread or event loop; events reach consumers through per-request
channels, waking each event loop once per step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .._channel import Waiter, wake
from ..context import Context
from ..media import Media, MediaError, MediaPrompt, as_media_prompt, check_media_prompt
from ..context_params import FlashAttn
from ..decoder import Cursor, Decoder
from ..errors import ClosedError, LlamaError, StateError
from ..options import (SAMPLING_MODES, SUBMIT_KEYS, ContextFull, Sampling, SubmitOptions, Unpack,
                       check, stream_options)
from ..speculative import SpeculativeStats, Speculator
from ..stream import FinishReason, SequenceStream
from .front import EngineFront, EnginePrompt, check_embed_request, check_request, check_slot, embedding_pooling
from .request import EngineBusyError, EngineRequest, PromptProgress
from .slots import Slot, SlotFile, choose_slot

if TYPE_CHECKING:
    from ..embed import EmbedInput
    from ..lora import LoraAdapter
    from ..model import Model



@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters."""

    n_slots: int
    busy_slots: int
    queue_len: int
    requests_total: int
    requests_done: int
    requests_cancelled: int
    requests_failed: int
    requests_rejected: int
    steps: int
    batched_steps: int  # steps whose one llama_decode held tokens of two or more requests
    max_requests_in_step: int
    prompt_tokens: int  # prompt tokens evaluated
    cached_prompt_tokens: int  # prompt tokens reused from a slot's KV cache
    generated_tokens: int
    draft_tokens: int = 0  # speculative decoding: tokens drafted and verified
    draft_accepted_tokens: int = 0  # of them, the ones the model agreed with (emitted without a decode of their own)
    draft_steps: int = 0  # speculative decoding: verifications of a request's draft
    busy_slot_steps: int = 0  # requests decoded, summed over steps (/ steps: llama-server's busy slots per decode)



#: The engine's counters: every EngineStats field but the live gauges.
COUNTERS = tuple(f.name for f in fields(EngineStats) if f.name not in ("n_slots", "busy_slots", "queue_len"))
_NONE = np.empty(0, dtype=np.int32)  # what a slot computed under other LoRA scales offers a prompt to reuse


def _scale(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"a LoRA scale must be a finite number, not {value!r}")
    return float(value)


def lora_scales(scales: Mapping[int, float], n: int) -> tuple[float, ...]:
    """The scale of each of ``n`` adapters: those ``scales`` names (by index), 0 for the others."""
    if not isinstance(scales, Mapping):
        raise TypeError("LoRA scales are a mapping of adapter index to scale")
    for i in scales:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"no LoRA adapter {i!r}: this engine has {n} (indices 0 to {n - 1})" if n else
                             "this engine has no LoRA adapters")
    return tuple(_scale(scales[i]) if i in scales else 0.0 for i in range(n))


class _Core:
    """The engine's state and thread; the public :class:`Engine` is a thin owner of it (so that
    dropping the Engine, not the thread's reference, decides when it shuts down)."""

    def __init__(self, model: Model, ctx: Context, n_slots: int, n_ctx_slot: int, max_queue: int,
                 similarity: float, spec: Speculator | None = None,
                 adapters: Sequence[LoraAdapter] = (), lora_scales: tuple[float, ...] = ()) -> None:
        self.model = model
        self.adapters = list(adapters)
        self.lora_scales = lora_scales  # what a request that names no scales of its own gets
        self.lora_now: tuple[float, ...] = tuple(0.0 for _ in self.adapters)  # what the context decodes with
        self.ctx = ctx
        self.spec = spec
        self.n_ctx_slot = n_ctx_slot
        self.max_queue = max_queue
        self.similarity = similarity
        self.slots = [Slot(i) for i in range(n_slots)]
        for slot in self.slots:
            slot.lora = self.lora_now
        self.active: list[Slot] = []  # slots serving a request, in admission order
        self.decoder = Decoder(ctx, capacity=ctx.n_batch)
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.queue: deque[EngineRequest] = deque()
        self.cancels: list[EngineRequest] = []
        self.tasks: deque[Callable[[], None]] = deque()
        self.slot_tasks: list[tuple[int, Callable[[], None]]] = []  # each waits for its slot to be idle
        self.closing = False
        self.drain = False
        self.closed = False
        self.held = 0  # groups being submitted (Engine.together): admission waits for the whole group
        self.embed_ctx: Context | None = None
        self.encoder: concurrent.futures.ThreadPoolExecutor | None = None  # media towers, off the step thread
        self.c = dict.fromkeys(COUNTERS, 0)
        self.waiters: list[Waiter | None] = []
        self.thread = threading.Thread(target=self._run, name="pyllama-engine", daemon=True)
        self.thread.start()

    # --- called from any thread ---------------------------------------------------------------
    def enqueue(self, req: EngineRequest) -> None:
        with self.lock:
            if self.closing:
                req._stream.close()
                raise ClosedError("the engine is closed")
            # max_queue counts requests that must wait: those a free slot takes next step do not.
            free = sum(1 for s in self.slots if s.request is None)
            if len(self.queue) >= self.max_queue + free:
                self.c["requests_rejected"] += 1
                req._stream.close()
                raise EngineBusyError(f"the engine is busy: {len(self.queue)} requests are queued "
                                      f"(max_queue={self.max_queue})", retry_after=self._retry_after())
            self.queue.append(req)
            self.c["requests_total"] += 1
            self.cv.notify()

    def _retry_after(self) -> float:
        return 1.0 + len(self.queue) / max(1, len(self.slots))

    def cancel(self, req: EngineRequest) -> None:
        with self.lock:
            self.cancels.append(req)
            self.cv.notify()

    def run_task(self, fn: Callable[[], Any], slot: int | None = None) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the engine thread between steps; with ``slot``, once that slot serves no request
        (as llama-server defers a slot action until its slot is free)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def task() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        with self.lock:
            if self.closing:
                raise ClosedError("the engine is closed")
            if slot is None:
                self.tasks.append(task)
            else:
                self.slot_tasks.append((slot, task))
            self.cv.notify()
        return fut

    def _slot_tasks_ready(self) -> list[Callable[[], None]]:
        """Take the slot tasks whose slot is idle (called under the lock, on the engine thread)."""
        ready = [task for slot, task in self.slot_tasks if self.slots[slot].request is None]
        if ready:
            self.slot_tasks = [(slot, task) for slot, task in self.slot_tasks if self.slots[slot].request is not None]
        return ready

    def stats(self) -> EngineStats:
        with self.lock:
            c = dict(self.c)
            queue_len = len(self.queue)
        busy = sum(1 for s in self.slots if s.request is not None)
        return EngineStats(n_slots=len(self.slots), busy_slots=busy, queue_len=queue_len, **c)

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        with self.lock:
            if self.closed:
                return
            self.closing = True
            self.drain = drain
            self.cv.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
            if self.thread.is_alive():  # draining took too long: cancel the rest
                with self.lock:
                    self.drain = False
                    self.cv.notify()
                self.thread.join()
        with self.lock:
            self.closed = True
        if self.encoder is not None:  # an encode under way ends (its request is gone)
            self.encoder.shutdown(wait=True, cancel_futures=True)
        if self.embed_ctx is not None:
            self.embed_ctx.close()
        if self.spec is not None:
            self.spec.close()
        self.ctx.close()
        for adapter in self.adapters:
            adapter.close()

    # --- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                while not ((self.queue and not self.held) or self._runnable() or self.cancels or self.tasks
                           or self.closing or any(self.slots[i].request is None for i, _ in self.slot_tasks)):
                    self.cv.wait()
                cancels, self.cancels = self.cancels, []
                tasks = list(self.tasks) + self._slot_tasks_ready()
                self.tasks.clear()
                stop = self.closing and not (self.drain and (self.queue or self.active))
                if stop:
                    leftover = list(self.queue)
                    self.queue.clear()
            for req in cancels:
                self._cancel(req)
            if tasks:
                self._flush_waiters()  # a task (embeddings) may take long: deliver what is ready first
            for task in tasks:
                task()
            if stop:
                for queued in leftover:
                    self._finish(queued, "cancelled")
                for slot in list(self.active):
                    running = slot.request
                    assert running is not None
                    self._release(slot)
                    self._finish(running, "cancelled")
                self._flush_waiters()
                with self.lock:
                    for task in [*self.tasks, *(t for _, t in self.slot_tasks)]:  # never leave a caller waiting
                        task()
                    self.tasks.clear()
                    self.slot_tasks.clear()
                return
            self._admit()
            if self._runnable():
                try:
                    self._step()
                except BaseException as exc:  # never let the thread die with requests hanging
                    for slot in list(self.active):
                        if slot.request is not None:
                            self._fail(slot, exc)
            if not self.active:  # else the next step delivers this one's events as its decode starts
                self._flush_waiters()

    def _flush_waiters(self) -> None:
        if self.waiters:
            wake(self.waiters)
            self.waiters.clear()

    def _cancel(self, req: EngineRequest) -> None:
        if req.done:
            return
        for slot in self.active:
            if slot.request is req:
                self._release(slot)
                self._finish(req, "cancelled")
                return
        with self.lock:
            try:
                self.queue.remove(req)
            except ValueError:
                return
        self._finish(req, "cancelled")

    def _admit(self) -> None:
        free = [s for s in self.slots if s.request is None]
        decoder = self.decoder
        while free:
            with self.lock:
                if not self.queue or self.held:
                    return
                # the first queued request that can run now: a pinned one waits for its slot
                req = next((r for r in self.queue if r.slot_pin is None or self.slots[r.slot_pin] in free), None)
                if req is None:
                    return
                self.queue.remove(req)
            if req.slot_pin is not None:
                slot = self.slots[req.slot_pin]
            else:  # a slot computed under other LoRA scales has nothing to reuse
                slot, _ = choose_slot(free, req.prompt_tokens, self.similarity,
                                      lambda i: decoder.held(i) if self.slots[i].lora == req.lora else _NONE)
            free.remove(slot)
            if slot.lora != req.lora:
                decoder.drop(slot.id)
                slot.lora = req.lora
            cursor = Cursor(slot.id, req._stream, req.prompt_tokens, limit=self.n_ctx_slot,
                            on_full=req.context_full, spec=self.spec, stats=req.speculative, media=req.media)
            slot.request, slot.cursor, slot.state = req, cursor, "prefill"
            req.slot_id = slot.id
            req.t_start = time.perf_counter()
            self.active.append(slot)
            try:  # the prefix the slot holds is kept; backend sampling: the request's chain in the graph
                decoder.start(cursor)
            except (ValueError, LlamaError) as exc:
                self._fail(slot, exc)
                continue
            req.n_cached = cursor.n_reused
            self.c["cached_prompt_tokens"] += cursor.n_reused
            media = req.media
            if media is not None and any(sp.embd is None and sp.start >= cursor.prefilled for sp in media.spans):
                # the towers run beside the steps: the other slots go on generating meanwhile
                slot.state = "encode"
                slot.encoding = self._encoder().submit(media.encode, cursor.prefilled)
                slot.encoding.add_done_callback(self._wake)
            if req.progress:
                self.waiters.append(req._channel.put(PromptProgress.of(req.n_prompt, req.n_cached, req.n_cached, 0.0)))

    def _step(self) -> None:
        """One decode for every active slot (the decoder runs it; the engine accounts and delivers)."""
        # The events of the previous step go out as this decode starts: the event loops that consume
        # them take the GIL while llama.cpp runs without it, not while this thread needs it.
        turn = self._lora_turn()
        held = self.decoder.step([s.cursor for s in turn if s.cursor is not None], self._flush_waiters)
        if not held:
            self._end_full_slots()
            return
        c = self.c
        decode_failed = held[0].error is not None and all(h.error is held[0].error for h in held)
        if not decode_failed:  # (a failed decode fails its requests below)
            c["steps"] += 1
            if len(held) >= 2:
                c["batched_steps"] += 1
            if len(held) > c["max_requests_in_step"]:
                c["max_requests_in_step"] = len(held)
            c["busy_slot_steps"] += len(held)
        now = time.perf_counter()
        for slot in turn:
            cur, req = slot.cursor, slot.request
            assert cur is not None and req is not None
            if cur.error is not None:
                self._fail(slot, cur.error)
                continue
            stream = req._stream
            c["prompt_tokens"] += cur.n_prefilled
            if cur.n_prefilled:
                req.n_prefilled += cur.n_prefilled
                if req.progress:  # before this step's token: the chunk that ends the prompt also samples
                    ms = (now - req.t_start) * 1000.0 if req.t_start is not None else 0.0
                    done = min(req.n_prompt, req.n_cached + req.n_prefilled)
                    self.waiters.append(req._channel.put(PromptProgress.of(req.n_prompt, req.n_cached, done, ms)))
            if cur.generating:
                slot.state = "generate"
            if cur.n_drafted:
                c["draft_steps"] += 1
                c["draft_tokens"] += cur.n_drafted
                c["draft_accepted_tokens"] += cur.n_accepted
            if stream.n_generated > req.n_counted:
                if req.t_first_token is None:
                    req.t_first_token = now
                c["generated_tokens"] += stream.n_generated - req.n_counted
                req.n_counted = stream.n_generated
            if cur.events:
                put = req._channel.put
                for ev in cur.events:
                    self.waiters.append(put(ev))
                cur.events = []
            if stream.finish_reason is not None:
                self._release(slot)
                self._finish(req, None)

    def _lora_turn(self) -> list[Slot]:
        """The active slots this step decodes: all of them, or with LoRA adapters those under one set of
        scales (one decode runs under one set, as llama-server batches only slots with equal adapters),
        taking the sets in turn."""
        ready = self._ready_slots()
        if not self.adapters:
            return ready
        keys = list(dict.fromkeys(s.lora for s in ready))
        if not keys:
            return []
        key = keys[0]
        if len(keys) > 1:
            key = keys[(keys.index(self.lora_now) + 1) % len(keys)] if self.lora_now in keys else keys[0]
        if key != self.lora_now:
            self.decoder.use_adapters([(a, sc) for a, sc in zip(self.adapters, key) if sc != 0.0])
            self.lora_now = key
        return [s for s in ready if s.lora == key]

    def _runnable(self) -> bool:
        """Whether a step has something to do: an active slot whose media (if any) are encoded."""
        return any(s.encoding is None or s.encoding.done() for s in self.active)

    def _ready_slots(self) -> list[Slot]:
        """The active slots a step may decode: those whose media are encoded (a failed encode fails its
        request here)."""
        ready: list[Slot] = []
        for slot in list(self.active):
            fut = slot.encoding
            if fut is not None:
                if not fut.done():
                    continue
                slot.encoding = None
                slot.state = "prefill"
                exc = fut.exception()
                if exc is not None:
                    self._fail(slot, exc)
                    continue
            ready.append(slot)
        return ready

    def _encoder(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.encoder is None:
            self.encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pyllama-encode")
        return self.encoder

    def _wake(self, _fut: object = None) -> None:
        with self.lock:
            self.cv.notify()

    def _end_full_slots(self) -> None:
        """Slots that reached their limit in a step that decoded nothing."""
        for slot in list(self.active):
            cur, req = slot.cursor, slot.request
            if cur is None or req is None:
                continue
            if cur.error is not None:
                self._fail(slot, cur.error)
            elif req._stream.finish_reason is not None:
                self._release(slot)
                self._finish(req, None)

    # --- request ends ---------------------------------------------------------------------------
    def _finish(self, req: EngineRequest, reason: FinishReason | None) -> None:
        tail = req._stream.finish(reason)
        if tail is not None:
            self.waiters.append(req._channel.put(tail))
        with self.lock:
            self.c["requests_cancelled" if req._stream.finish_reason == "cancelled" else "requests_done"] += 1
        self._close_request(req, None)

    def _fail(self, slot: Slot, exc: BaseException) -> None:
        req = slot.request
        self._release(slot)
        self.decoder.drop(slot.id)  # what the failed request left in the cache is unknown
        if req is not None:
            with self.lock:
                self.c["requests_failed"] += 1
            self._close_request(req, exc)

    def _close_request(self, req: EngineRequest, error: BaseException | None) -> None:
        req.error = error
        req.t_done = time.perf_counter()
        self.waiters.append(req._channel.close(error))
        req._stream.close()
        if req.own_media and req.media is not None:
            req.media.release()

    def _release(self, slot: Slot) -> None:
        if slot.cursor is not None:
            self.decoder.finish(slot.cursor)  # before the request frees its chain
        slot.release()
        if slot in self.active:
            self.active.remove(slot)


class Engine(EngineFront):
    """Continuous batching over one model: many concurrent requests, one context, one thread.

    ``n_ctx`` is the context of one slot (prompt plus generated tokens of one
    request); the context holds ``n_slots`` of them in one unified KV cache.
    ``n_batch`` bounds the tokens of one step (generating tokens plus prompt
    chunks). ``draft`` turns on speculative decoding with an n-gram drafter
    (``"ngram"`` or one of :data:`pyllama.speculative.NGRAM_TYPES`; at most
    ``n_draft`` tokens per request and step, verified in the same batch).
    ``sampling`` is the requests' default mode (:data:`pyllama.stream.Sampling`).
    ``lora`` loads LoRA adapters (path, scale) the requests run under: at those
    scales unless :meth:`set_lora_scales` changes them or a request names its own
    (``lora={index: scale}``); one step decodes the requests of one set of scales.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, model: Model, *, n_slots: int = 4, n_ctx: int | Literal["auto"] = "auto",
                 n_batch: int = 512, n_ubatch: int = 512, n_threads: int | None = None,
                 n_threads_batch: int | None = None, flash_attn: FlashAttn = "auto", type_k: str | int = "f16",
                 type_v: str | int = "f16", max_queue: int = 64, slot_prompt_similarity: float = 0.1,
                 embeddings: bool = True, pooling: str | None = None, draft: str | None = None,
                 n_draft: int = 16, sampling: Sampling = "auto",
                 lora: Sequence[tuple[str | os.PathLike[str], float]] = ()) -> None:
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, not {sampling!r}")
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError("n_slots must be an int >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if not 0.0 <= slot_prompt_similarity <= 1.0:
            raise ValueError("slot_prompt_similarity must lie in [0, 1]")
        if n_ctx == "auto":
            n_ctx_slot = min(model.n_ctx_train, 4096)
            if model.fit.n_ctx > 0:
                n_ctx_slot = min(n_ctx_slot, max(256, model.fit.n_ctx // n_slots))
        elif isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx >= 8:
            n_ctx_slot = n_ctx
        else:
            raise ValueError(f"n_ctx must be 'auto' or an int >= 8 (tokens per slot), not {n_ctx!r}")
        self.pooling = embedding_pooling(model, pooling)
        if draft is not None and not isinstance(draft, str):
            raise TypeError("the engine drafts with an n-gram drafter named by a string ('ngram', ...)")
        ctx = Context(model, n_ctx=n_ctx_slot * n_slots, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_slots,
                      n_threads=n_threads, n_threads_batch=n_threads_batch, flash_attn=flash_attn,
                      type_k=type_k, type_v=type_v, kv_unified=True)
        adapters: list[LoraAdapter] = []
        try:
            refusal = Decoder(ctx).backend_refusal() if sampling == "backend" else None
            if refusal is not None:
                raise ValueError(refusal)
            scales = tuple(_scale(scale) for _, scale in lora)
            for path, _ in lora:
                adapters.append(model.lora(path))
            spec = Speculator(ctx, draft, n_max=n_draft) if draft is not None else None
        except BaseException:
            for adapter in adapters:
                adapter.close()
            ctx.close()
            raise
        self.model = model
        self.sampling: Sampling = sampling
        self.n_slots = n_slots
        self.n_ctx_slot = min(n_ctx_slot, ctx.n_ctx_seq)
        self.n_batch = ctx.n_batch
        self.embeddings = embeddings
        self._n_threads = n_threads
        self.draft = draft
        self._core = _Core(model, ctx, n_slots, self.n_ctx_slot, max_queue, slot_prompt_similarity, spec,
                           adapters, scales)
        self._finalizer = weakref.finalize(self, self._core.shutdown)

    # --- requests -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Requests submitted inside are admitted in the same step: their prompts are prefilled in one
        batch (a request admitted a step earlier would be computed in other batches, so identical greedy
        requests could drift apart in their last bits, and then in their text)."""
        core = self._core
        with core.lock:
            core.held += 1
        try:
            yield
        finally:
            with core.lock:
                core.held -= 1
                core.cv.notify()

    def submit(self, prompt: EnginePrompt, **options: Unpack[SubmitOptions]) -> EngineRequest:
        """Queue a generation; iterate the returned request for its token events.

        Thread-safe and non-blocking. The options are :class:`pyllama.SubmitOptions`:
        :func:`pyllama.generate`'s sampling options (``sampler`` specs or the plain
        knobs, ``max_tokens``, ``stop``, ``grammar``/``json_schema``, ...) and
        ``add_special``/``parse_special``. ``sampling`` ``"backend"`` runs the chain in
        the graph for this request's slot (its tokens are not drafted); unset, the
        engine's ``sampling`` applies, or "auto" for a request that mode cannot serve
        (logprobs with "backend", a non-greedy chain with "argmax").
        ``context_full`` says what happens when prompt plus reply reach the
        slot's context: finish with reason ``"context"`` ("stop", the default), raise
        :class:`ContextOverflowError` ("error"), or ``"shift"`` out the older half.
        Raises :class:`EngineBusyError` when the queue is full.
        """
        check("submit", options, SUBMIT_KEYS)
        if self._core.closing:
            raise ClosedError("the engine is closed")
        context_full: ContextFull = options.get("context_full", "stop")
        add_special, parse_special = options.get("add_special", True), options.get("parse_special", True)
        media = as_media_prompt(self.model, prompt, add_special=add_special, parse_special=parse_special)
        if media is not None and media is not prompt:
            media.disposable = True  # made here: the request closes it
        own_media = media is not None and media.disposable
        req: EngineRequest | None = None
        try:
            if media is not None:
                check_media_prompt(media, draft=self._core.spec is not None, context_shift=context_full == "shift")
            tokens = check_request(self.model.vocab, prompt, n_ctx_slot=self.n_ctx_slot,
                                   max_tokens=options.get("max_tokens", 256), add_special=add_special,
                                   parse_special=parse_special, context_full=context_full,
                                   media_tokens=None if media is None else media.tokens)
            req = self._request(tokens, context_full, options)
            req.media = media
            if own_media and media is not None:
                media.hold()
                req.own_media = True
            self._core.enqueue(req)  # (EngineBusyError when the queue is full)
        except BaseException:
            if req is not None and req.own_media and media is not None:
                media.release()
            elif own_media and media is not None and media is not prompt:
                media.close()
            raise
        return req

    def _request(self, tokens: npt.NDArray[np.int32], context_full: ContextFull,
                 options: SubmitOptions) -> EngineRequest:
        """The request for checked tokens, with its stream and options (not queued yet)."""
        sampling = options.get("sampling")
        kw = stream_options(options)
        if isinstance(kw.get("sampler"), Sequence):
            kw["sampler"] = list(kw["sampler"])

        def stream_for(mode: Sampling) -> SequenceStream:
            return SequenceStream(self.model, **{**kw, "sampling": mode})

        mode = self.sampling if sampling is None else sampling
        try:
            stream = stream_for(mode)
        except ValueError:
            if sampling is not None or mode == "auto":
                raise
            stream = stream_for("auto")  # the engine's default cannot serve this request
        if self._core.spec is None:
            self._core.decoder.prefer_backend(stream)
        req = EngineRequest(tokens, stream, context_full, self._core.cancel)
        req.progress = bool(options.get("progress", False))
        pin = options.get("slot")
        req.slot_pin = None if pin is None else check_slot(pin, self.n_slots)
        own = options.get("lora")
        req.lora = self._core.lora_scales if own is None else lora_scales(own, len(self._core.adapters))
        if self._core.spec is not None:
            req.speculative = SpeculativeStats()
        return req

    # --- media ----------------------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        proj = self.model.mmproj
        return proj.modalities if proj is not None and not proj.closed else ()

    def media_prompt(self, parts: Sequence[str | Media], *, add_special: bool = True,
                     parse_special: bool = True) -> MediaPrompt:
        """``parts`` tokenized with the model's projector, for :meth:`submit` (the request closes it)."""
        self.check_modalities([p for p in parts if isinstance(p, Media)])  # (none without a projector)
        proj = self.model.mmproj
        if proj is None:
            raise MediaError("the model has no projector for images or audio (load one: --mmproj)")
        mp = proj.tokenize(parts, add_special=add_special, parse_special=parse_special)
        mp.disposable = True
        return mp

    def prompt_tokens(self, parts: Sequence[str | Media], add_special: bool = True,
                      parse_special: bool = True) -> npt.NDArray[np.int32]:
        """The token layout of a prompt of text and media (media positions hold placeholder ids)."""
        with self.media_prompt(parts, add_special=add_special, parse_special=parse_special) as mp:
            tokens: npt.NDArray[np.int32] = mp.tokens.copy()
        return tokens

    # --- embeddings -----------------------------------------------------------------------------------
    def _embed_task(self, texts: list[EmbedInput], normalize: bool) -> Callable[[], npt.NDArray[np.float32]]:
        core = self._core
        model = self.model
        n_threads = self._n_threads
        pooling = self.pooling

        def run() -> npt.NDArray[np.float32]:
            from ..embed import embed

            if core.embed_ctx is None:
                n = min(model.n_ctx_train, 2048)
                core.embed_ctx = model.context(n_ctx=n, n_batch=n, n_ubatch=n, embeddings=True, pooling=pooling,
                                               n_threads=n_threads)
            return embed(core.embed_ctx, texts, normalize=normalize)

        return run

    def embed(self, texts: Sequence[EmbedInput], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts`` (strings or token id sequences), shape (len(texts), n_embd), computed on the
        engine thread (under rank pooling: the scores, see :meth:`rerank`)."""
        items = self._embed_items(texts)
        return self._core.run_task(self._embed_task(items, normalize)).result()  # type: ignore[no-any-return]

    async def aembed(self, texts: Sequence[EmbedInput], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        items = self._embed_items(texts)
        fut = self._core.run_task(self._embed_task(items, normalize))
        return await asyncio.wrap_future(fut)

    def _embed_items(self, texts: Sequence[EmbedInput]) -> list[EmbedInput]:
        if self.pooling == "none":
            raise ValueError("this engine embeds with pooling 'none' (one vector per token): not supported")
        return check_embed_request(texts, embeddings=self.embeddings)

    # --- a slot's cache ---------------------------------------------------------------------------
    def _on_slot(self, slot: int, fn: Callable[[int], Any]) -> Any:
        index = check_slot(slot, self.n_slots)
        return self._core.run_task(lambda: fn(index), slot=index).result()

    def save_slot(self, slot: int, path: str | os.PathLike[str]) -> SlotFile:
        """Write what slot ``slot`` holds (KV cache and token history) to ``path``, once it serves no request
        (pyllama's checksummed sequence file, :meth:`pyllama.state.State.save_seq_file`)."""
        core = self._core

        def save(i: int) -> SlotFile:
            t0 = time.perf_counter()
            tokens = core.decoder.held(i)
            core.ctx.state.save_seq_file(path, i, tokens)
            return SlotFile(i, int(tokens.size), os.path.getsize(path), (time.perf_counter() - t0) * 1e3)

        return self._on_slot(slot, save)  # type: ignore[no-any-return]

    def restore_slot(self, slot: int, path: str | os.PathLike[str]) -> SlotFile:
        """Replace what slot ``slot`` holds by a file of :meth:`save_slot` (or llama-server's slot save, or
        llama.cpp's sequence file), once it serves no request; a prompt that starts with the restored history
        reuses it. Raises :class:`pyllama.StateError` for a file that does not fit (the slot is then empty)."""
        core = self._core

        def restore(i: int) -> SlotFile:
            t0 = time.perf_counter()
            try:
                tokens = core.ctx.state.load_seq_file(path, i)
                if tokens.size > self.n_ctx_slot:
                    raise StateError(f"the file holds {tokens.size} tokens; a slot holds {self.n_ctx_slot}")
            except BaseException:
                core.decoder.drop(i)
                raise
            return SlotFile(i, int(tokens.size), os.path.getsize(path), (time.perf_counter() - t0) * 1e3)

        return self._on_slot(slot, restore)  # type: ignore[no-any-return]

    def erase_slot(self, slot: int) -> int:
        """Empty slot ``slot``'s cache once it serves no request; returns the number of tokens it held."""
        core = self._core

        def erase(i: int) -> int:
            n = int(core.decoder.held(i).size)
            core.decoder.drop(i)
            return n

        return self._on_slot(slot, erase)  # type: ignore[no-any-return]

    # --- LoRA adapters ----------------------------------------------------------------------------
    @property
    def lora(self) -> list[tuple[str, float]]:
        """The LoRA adapters (path, the scale requests get unless they name their own), by index."""
        core = self._core
        return [(str(a.path), s) for a, s in zip(core.adapters, core.lora_scales)]

    def set_lora_scales(self, scales: Mapping[int, float]) -> None:
        """The scales requests submitted from now on get (by adapter index; an adapter not named: 0, as
        llama-server's ``POST /lora-adapters``). Requests already submitted keep theirs."""
        core = self._core
        core.lora_scales = lora_scales(scales, len(core.adapters))

    # --- state ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._core.stats()

    @property
    def closed(self) -> bool:
        return self._core.closing

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine: cancel (or, with ``drain``, finish) every request, then free the context.

        With ``drain`` and a ``timeout``, requests still running after it are cancelled.
        Idempotent.
        """
        self._core.shutdown(drain=drain, timeout=timeout)
        self._finalizer.detach()

    def __enter__(self) -> Engine:
        return self

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<pyllama.Engine slots={s.n_slots} busy={s.busy_slots} queued={s.queue_len}"
                f"{' closed' if self.closed else ''}>")


__all__ = ["Engine", "EngineFront", "EngineStats", "ContextFull"]
