"""How a generation step runs on a context: the one home of the token loop.

A :class:`Cursor` is one sequence being generated: its :class:`SequenceStream`, its prompt, where it is
in the KV cache and the token it sampled last. A :class:`Decoder` claims the context, evaluates prompts
against the prefix each sequence already holds, builds and decodes batches (prompt chunks, each
sequence's next token, speculative drafts), samples each row (host chain, argmax, or the token the
graph chose), advances positions, applies the context-full policy (stop, error, shift) and releases.

Everything that generates goes through it: :func:`pyllama.generate` (the fused C step, or
:meth:`Decoder.step` per token for Python samplers and speculative decoding),
:func:`pyllama.generate_parallel`, the serving engine (its scheduler only chooses which cursors go into
a step) and the benchmark runner.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from .batch import Batch
from .errors import BusyError, ClosedError, ContextOverflowError, DecodeError, LlamaError, SamplerError
from .options import ContextFull
from .sampling import sampling_error
from .stream import SequenceStream, TokenEvent

if TYPE_CHECKING:
    from .context import Context
    from .lora import LoraAdapter
    from .media import MediaPrompt
    from .sampling import SamplerChain
    from .speculative import SpeculativeStats, Speculator

_NO_TOKENS = np.empty(0, dtype=np.int32)
_CLAIM_LOCK = threading.Lock()


class Cursor:
    """One sequence being generated on a :class:`Decoder`'s context.

    ``prompt[:prefilled]`` is in the KV cache; once the whole prompt is, the
    cursor generates: ``last`` (sampled and emitted, not yet decoded) goes at
    ``pos`` in the next step. ``limit`` is the positions the sequence may use,
    ``on_full`` what happens at it. ``events`` holds what the last step emitted;
    ``error`` what failed this cursor (the step goes on with the others).
    """

    __slots__ = ("seq_id", "stream", "prompt", "prefilled", "pos", "last", "limit", "on_full", "n_keep",
                 "reuse_prefix", "sample_first", "logits", "spec", "stats", "events", "error", "n_reused",
                 "n_drafted", "n_accepted", "n_prefilled", "media")

    def __init__(self, seq_id: int, stream: SequenceStream | None, prompt: npt.NDArray[np.int32], *, limit: int,
                 on_full: ContextFull = "stop", n_keep: int = 0, reuse_prefix: bool = True,
                 sample_first: bool = True, logits: str = "last", spec: Speculator | None = None,
                 stats: SpeculativeStats | None = None, media: MediaPrompt | None = None) -> None:
        self.seq_id = seq_id
        self.stream = stream
        self.prompt = prompt
        self.limit = limit
        self.on_full = on_full
        self.n_keep = n_keep
        self.reuse_prefix = reuse_prefix
        self.sample_first = sample_first and stream is not None
        self.logits = logits  # which prompt rows get logits: "last", "none" or "all"
        self.spec = spec
        self.stats = stats
        self.prefilled = 0
        self.pos = 0
        self.last = -1
        self.events: list[TokenEvent] = []
        self.error: BaseException | None = None
        self.n_reused = 0  # prompt tokens the sequence already held (not evaluated)
        self.n_drafted = 0  # in the last step
        self.n_accepted = 0
        self.n_prefilled = 0
        self.media = media  # images and audio in the prompt: their runs go through libmtmd

    @property
    def generating(self) -> bool:
        return self.prefilled >= self.prompt.size

    @property
    def n_evaluated(self) -> int:
        """Prompt tokens evaluated (not reused from the cache)."""
        return self.prefilled - self.n_reused


class Decoder:
    """Runs :class:`Cursor` s on one context (see the module docstring).

    ``capacity`` sizes the decoder's own batch (the engine's step); without it
    the context's shared batch is used under its lock.
    """

    __slots__ = ("ctx", "_lock", "_tracker", "_batch")

    def __init__(self, ctx: Context, *, capacity: int | None = None) -> None:
        self.ctx = ctx
        self._lock = ctx._lock
        self._tracker = ctx._seq_tokens
        self._batch = Batch(capacity) if capacity is not None else None

    # --- ownership ------------------------------------------------------------------------------
    def claim(self) -> Callable[[], None]:
        """Mark the context as generating in this thread; another thread's generation raises BusyError.

        A context's logits belong to its last decode, so two threads generating on one
        context would sample each other's rows. Several generations interleaved in one
        thread (different sequences) are fine: each samples right after its own decode.
        """
        ctx = self.ctx
        me = threading.get_ident()
        with _CLAIM_LOCK:
            owner = ctx._gen_owner
            if owner is not None and owner[0] != me:
                raise BusyError("this context is generating in another thread: a context serves one generation "
                                "at a time (use one context per thread, pyllama.generate_parallel, or the engine)")
            ctx._gen_owner = (me, 1 if owner is None else owner[1] + 1)

        def release() -> None:
            with _CLAIM_LOCK:
                owner = ctx._gen_owner
                if owner is not None:
                    ctx._gen_owner = None if owner[1] <= 1 else (owner[0], owner[1] - 1)

        return release

    def prefer_backend(self, stream: SequenceStream) -> None:
        """Take a stream's "auto" to backend sampling where that pays on this context."""
        if self.ctx._backend_sampling_pays:
            stream.prefer_backend()

    def backend_refusal(self) -> str | None:
        """Why sampler chains must not run in this context's graph, or None."""
        return self.ctx._backend_sampling_refusal

    def use_adapters(self, items: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Decode with these LoRA adapters and scales from the next step on. The sequences keep what they
        hold: the caller keeps a sequence computed under other adapters away from prompts that would reuse it."""
        self.ctx._set_adapters(items)

    def attach(self, seq_id: int, chain: SamplerChain | None) -> None:
        """Run ``chain`` inside the graph for ``seq_id`` (backend sampling); None detaches whatever is there."""
        self.ctx._attach_sampler(seq_id, chain)

    # --- a cursor's life ----------------------------------------------------------------------------
    def start(self, c: Cursor) -> None:
        """Attach the cursor's chain for backend sampling (or detach an earlier one), keep the longest
        prefix of its prompt that the sequence holds (the rest of the sequence is removed) and let its
        drafter see the prompt. The prompt itself is evaluated by the following steps."""
        ctx, seq, prompt = self.ctx, c.seq_id, c.prompt
        stream = c.stream
        if prompt.size >= c.limit and c.on_full == "shift":  # keep the start and the most recent tokens
            recent = c.limit // 2
            prompt = c.prompt = np.concatenate([prompt[: c.n_keep], prompt[-(recent - c.n_keep):]])
        with self._lock:
            mem = lib.llama_get_memory(ctx._p())
            if stream is not None:
                ctx._attach_sampler(seq, stream.chain if stream.sampling == "backend" else None)
            held = ctx.cached_tokens(seq) if c.reuse_prefix else None
            keep = 0 if held is None else common_prefix(held, prompt)
            keep = min(keep, prompt.size - 1)  # evaluate at least one token: its logits start the reply
            if c.media is not None:  # never half an image: its run is decoded whole
                keep = c.media.inside(keep)
            if not lib.llama_memory_seq_rm(mem, seq, keep, -1):
                lib.llama_memory_seq_rm(mem, seq, -1, -1)  # recurrent memory cannot drop a suffix: start over
                keep = 0
            self._tracker.set(seq, prompt[:keep])
        c.prefilled = c.pos = c.n_reused = keep
        if c.spec is not None:
            c.spec._begin(seq, prompt)
            dctx = c.spec.draft_context
            if dctx is not None:  # the draft model reads the prompt too (reusing what it already holds)
                dctx.evaluate(prompt, seq_id=seq, logits="none" if prompt.size > 1 else "last")

    def finish(self, c: Cursor) -> None:
        """Detach the cursor's chain if it runs in the graph (before its stream frees the chain)."""
        stream = c.stream
        if stream is not None and stream.sampling == "backend":
            self.ctx._detach_sampler(c.seq_id, stream._chain)

    def drop(self, seq_id: int) -> None:
        """Empty a sequence whose content is unknown (after a failure)."""
        with self._lock:
            if self.ctx._ptr is not None:
                lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx._ptr), seq_id, -1, -1)
                self._tracker.forget(seq_id)

    def held(self, seq_id: int) -> npt.NDArray[np.int32]:
        """The tokens sequence ``seq_id`` holds, as far as known (empty when unknown)."""
        toks = self._tracker.get(seq_id)
        return _NO_TOKENS if toks is None else toks

    def prefill(self, cursors: Sequence[Cursor], before_decode: Callable[[], None] | None = None) -> None:
        """Evaluate the cursors' prompts (all of them in shared batches, as llama-batched-bench prefills);
        each samples its first token right after the decode that holds its last prompt row."""
        todo = [c for c in cursors if not c.generating]
        while todo:
            self.step(todo, before_decode)
            for c in todo:
                if c.error is not None:
                    raise c.error
            todo = [c for c in todo if not c.generating]

    # --- one step -------------------------------------------------------------------------------------
    def step(self, cursors: Sequence[Cursor], before_decode: Callable[[], None] | None = None) -> list[Cursor]:
        """Decode one batch for ``cursors`` and sample it; returns the cursors it held.

        Generating cursors go first, each with its next token and (with a drafter) a draft after
        it; prompt chunks fill the rest of the batch in the cursors' order. A generating cursor at
        its limit gets the context-full policy first. Afterwards each cursor's ``events``
        hold what it emitted; a failure of one cursor (sampling, a full context with "error") is
        its ``error``, a failed decode every included cursor's.
        """
        with self._lock:  # the shared batch, and a close() from another thread, wait for the step
            return self._step(cursors, before_decode)

    def _step(self, cursors: Sequence[Cursor], before_decode: Callable[[], None] | None) -> list[Cursor]:
        batch = self._batch if self._batch is not None else self._shared_batch()
        tok, pos, seq, logits = batch.token, batch.pos, batch.seq_id, batch.logits
        cap = batch.capacity
        n = 0
        rows: list[tuple[Cursor, int, int]] = []  # (cursor, row it samples, draft tokens after it; -1: prompt)
        chunks: list[tuple[Cursor, int]] = []
        gens = [c for c in cursors if c.generating]
        for i, c in enumerate(gens):
            c.events = []
            c.n_drafted = c.n_accepted = c.n_prefilled = 0
            if c.pos >= c.limit and not self._make_room(c):
                continue
            tok[n], pos[n], seq[n, 0], logits[n] = c.last, c.pos, c.seq_id, 1
            k = self._draft(c, batch, n, cap - n - (len(gens) - i)) if c.spec is not None else 0
            rows.append((c, n, k))
            n += 1 + k
        budget = cap - n
        for c in cursors:
            if c.generating:
                continue
            c.events = []
            c.n_drafted = c.n_accepted = c.n_prefilled = 0
            if c.media is not None:
                self._media(c)  # before the batch: the rows it samples are this step's last decode
                if c.error is not None or c.generating:
                    continue
            if budget <= 0:
                continue
            k = min(c.prompt.size - c.prefilled, budget)
            if c.media is not None:  # text up to the next image or clip
                k = min(k, c.media.text_until(c.prefilled))
            end = n + k
            tok[n:end] = c.prompt[c.prefilled:c.prefilled + k]
            pos[n:end] = np.arange(c.prefilled, c.prefilled + k, dtype=np.int32)
            seq[n:end, 0] = c.seq_id
            final = c.prefilled + k == c.prompt.size
            logits[n:end] = 1 if c.logits == "all" else 0
            if final and c.logits == "last":
                logits[end - 1] = 1
            if final and c.sample_first:
                rows.append((c, end - 1, -1))
            chunks.append((c, k))
            n = end
            budget -= k
        if before_decode is not None:
            before_decode()
        if n == 0:
            return []
        batch.n_seq_id[:n] = 1
        batch._struct.n_tokens = n
        held = list({id(c): c for c in [r[0] for r in rows] + [ch[0] for ch in chunks]}.values())
        try:
            self.ctx._decode(batch)
        except LlamaError as exc:
            for c in held:
                c.error = exc
                self._tracker.forget(c.seq_id)
            return held
        tracker = self._tracker
        for c, k in chunks:
            c.prefilled += k
            c.n_prefilled = k
            tracker.set(c.seq_id, c.prompt[:c.prefilled])
            if c.generating:
                c.pos = c.prompt.size
        ptr = self.ctx._ptr
        for c, row, n_draft in rows:
            stream = c.stream
            assert stream is not None
            spec = c.spec
            try:
                if n_draft > 0 and spec is not None and spec.draft_context is not None:
                    self._draft_sees(c, tok, row, n_draft)
                events, r, token = verify(stream, ptr, row, tok[row + 1:row + 1 + max(n_draft, 0)])
            except Exception as exc:
                c.error = exc
                continue
            c.events.extend(events)
            c.last = token
            if n_draft < 0:  # the first token, sampled from the prompt's last row
                continue
            kept = tok[row:row + 1 + r]
            tracker.extend(c.seq_id, c.pos, kept)
            if spec is not None and spec.draft_context is not None:  # the draft model decoded them too
                spec.draft_context._seq_tokens.extend(c.seq_id, c.pos, kept)
            c.pos += 1 + r
            if spec is not None:
                if r < n_draft:  # rejected draft tokens sit in the caches after pos
                    self._trim(c)
                spec._accept(c.seq_id, r)
                c.n_drafted, c.n_accepted = n_draft, r
                if n_draft and c.stats is not None:
                    c.stats.add(n_draft, r)
        return held

    def _media(self, c: Cursor) -> None:
        """Decode the media runs that start where the cursor's prompt stands (libmtmd's helper: its own
        batches of embeddings, positions and attention mask); a failure is the cursor's error."""
        media = c.media
        assert media is not None
        span = media.span_at(c.prefilled)
        while span is not None:
            try:
                media.decode_span(self.ctx, span, c.seq_id)
            except Exception as exc:
                c.error = exc
                self._tracker.forget(c.seq_id)
                return
            c.prefilled += span.n_pos
            c.n_prefilled += span.n_pos
            self._tracker.set(c.seq_id, c.prompt[:c.prefilled])
            if c.generating:
                c.pos = c.prompt.size
            span = media.span_at(c.prefilled)

    def _shared_batch(self) -> Batch:
        return self.ctx._shared_batch()

    def _draft(self, c: Cursor, batch: Batch, row: int, room: int) -> int:
        """Draft after the cursor's last token into the batch rows after ``row``; returns how many."""
        spec, stream = c.spec, c.stream
        assert spec is not None and stream is not None
        if stream.sampling == "backend":  # rows sampled in the graph are not verified one after another
            return 0
        # last goes at pos, the draft after it: within the sequence and within what may still be emitted
        n_max = min(spec.n_max, room, c.limit - c.pos - 1)
        if stream.max_tokens is not None:
            n_max = min(n_max, stream.max_tokens - stream.n_generated - 1)
        if n_max <= 0:
            return 0
        dctx = spec.draft_context
        st = dctx._arm_abort() if dctx is not None else None  # a draft model's decodes see Ctrl-C too
        k = spec._draft(c.seq_id, self.held(c.seq_id)[:c.pos], c.last, n_max)
        if st is not None and st.interrupted:
            raise KeyboardInterrupt
        if k:
            end = row + 1 + k
            batch.token[row + 1:end] = spec._out[:k]
            batch.pos[row + 1:end] = np.arange(c.pos + 1, c.pos + 1 + k, dtype=np.int32)
            batch.seq_id[row + 1:end, 0] = c.seq_id
            batch.logits[row + 1:end] = 1
        return k

    def _draft_sees(self, c: Cursor, tok: npt.NDArray[np.int32], row: int, n_draft: int) -> None:
        """Let a draft model decode the verified batch [last, draft...] too."""
        spec = c.spec
        assert spec is not None and spec.draft_context is not None
        st = spec.draft_context._arm_abort()
        rc = lib.pyllama_spec_process(spec._p(), c.seq_id, ffi.from_buffer("llama_token[]", tok[row:]),
                                      n_draft + 1, c.pos)
        if st.interrupted:
            raise KeyboardInterrupt
        if rc != 0:
            raise DecodeError("the draft model failed to decode the verified batch: "
                              + ffi.string(lib.pyllama_spec_error()).decode("utf-8", "replace"), rc)

    def _trim(self, c: Cursor) -> None:
        """Remove what follows the cursor's position (a rejected draft) from its caches."""
        with self._lock:
            lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx._p()), c.seq_id, c.pos, -1)
        self._tracker.truncate(c.seq_id, c.pos)
        dctx = c.spec.draft_context if c.spec is not None else None
        if dctx is not None:
            dctx.kv.remove(c.seq_id, c.pos, -1)

    # --- a full context -------------------------------------------------------------------------------
    def _make_room(self, c: Cursor) -> bool:
        """The context-full policy, for a cursor at its limit: True when it may go on (shifted)."""
        stream = c.stream
        assert stream is not None
        if c.on_full == "stop":
            if stream.finish_reason is None:
                stream.finish_reason = "context"
            return False
        if c.on_full == "shift":
            try:
                self.shift(c)
                return True
            except ContextOverflowError as exc:
                c.error = exc
                return False
        c.error = ContextOverflowError(f"the sequence reached its context size ({c.limit} tokens)")
        return False

    def shift(self, c: Cursor) -> None:
        """Make room: drop half of what follows the first ``n_keep`` tokens and move the rest down."""
        ctx, seq = self.ctx, c.seq_id
        n_discard = (c.pos - c.n_keep) // 2
        with self._lock:
            kv = ctx.kv
            if not kv.can_shift or n_discard <= 0:
                raise ContextOverflowError("the context is full and its memory cannot shift")
            known = self._tracker.get(seq)
            kept = None if known is None or known.size != c.pos else np.concatenate(
                [known[: c.n_keep], known[c.n_keep + n_discard:]])
            kv.remove(seq, c.n_keep, c.n_keep + n_discard)
            kv.shift(seq, c.n_keep + n_discard, -1, -n_discard)
            if kept is not None:  # the cells keep their tokens (re-positioned), as llama-server counts them
                self._tracker.set(seq, kept)
        c.pos -= n_discard

    # --- single sequence ------------------------------------------------------------------------------
    def generate(self, c: Cursor, *, fused: bool, before_decode: Callable[[], None] | None = None,
                 claim: bool = True) -> Iterator[TokenEvent]:
        """The events of one cursor from claim to release: the fused C step (one call per token) when the
        stream allows it and there is no drafter, else a :meth:`step` per token."""
        if c.stream is not None and c.stream.max_tokens == 0:
            c.sample_first = False
        if fused and c.spec is None:
            c.sample_first = False  # the C step samples the prompt's logits itself
            return self._fused(c, before_decode, claim)
        return self._stepped(c, before_decode, claim)

    def _open(self, c: Cursor, claim: bool) -> Callable[[], None] | None:
        """Claim the context, start the cursor and evaluate its prompt; returns the claim's release."""
        release = self.claim() if claim else None
        try:
            self.start(c)
            self.prefill([c])
        except BaseException:
            self._close(c, release)
            raise
        assert c.stream is not None
        if c.stream.max_tokens == 0:
            c.stream.finish_reason = "length"
        return release

    def _close(self, c: Cursor, release: Callable[[], None] | None) -> None:
        try:
            self.finish(c)
        finally:
            if release is not None:
                release()

    def _stepped(self, c: Cursor, before: Callable[[], None] | None, claim: bool) -> Iterator[TokenEvent]:
        stream = c.stream
        assert stream is not None
        release = self._open(c, claim)
        try:
            yield from c.events
            while stream.finish_reason is None:
                self.step([c], before)
                if c.error is not None:
                    raise c.error
                yield from c.events
            tail = stream.finish()
            if tail is not None:
                yield tail
        finally:
            self._close(c, release)

    def _fused(self, c: Cursor, before: Callable[[], None] | None, claim: bool) -> Iterator[TokenEvent]:
        """One C call per token (pyllama_step_next: decode, sample, EOG check, piece).

        The first step samples from the prompt's logits; each later one first decodes the token before.
        Without stop strings or log-probabilities the event is made right here (the common case, a few
        local operations per token); the context's record of what the sequence holds asks for the
        decoded tokens when it is used (SeqTokens.follow). One generator from the claim to the release:
        each level of ``yield from`` would cost every token a frame switch.
        """
        ctx = self.ctx
        stream = c.stream
        assert stream is not None
        tracker = self._tracker
        seq_id = c.seq_id
        release = self._open(c, claim)
        try:
            if stream.finish_reason is not None:
                return
            pos = c.pos
            s = ffi.new("pyllama_step *")
            # the abort state is re-armed in C before each decode (check_signals: this thread's); a
            # generation continues its prompt, so no piece loses a leading space (lstrip 0)
            lib.pyllama_step_init(s, ffi.NULL if stream._argmax else stream.chain._p(), stream._vocab_p,
                                  ctx._arm_abort(), pos, c.limit, seq_id, stream._argmax, ctx.n_vocab, 0)
            step, unpack, piece = lib.pyllama_step_next, ffi.unpack, s.piece
            fast = not stream.want_logprobs and not stream._stop.stops
            limit = stream.max_tokens if stream.max_tokens is not None else -1
            parts_append = stream._parts.append
            lock = self._lock
            acquire, release_lock = lock.acquire, lock.release
            n = stream.n_generated
            out = stream._gen
            cap = out.size
            recorded = pos  # tokens decoded before this position are in the tracker

            def pending() -> tuple[int, npt.NDArray[np.int32]]:
                nonlocal recorded
                start, end = recorded, int(s.pos)
                if end <= start:
                    return start, _NO_TOKENS
                recorded = end
                return start, stream._gen[start - pos: end - pos]

            tracker.follow(seq_id, pending)
            while True:
                if before is not None:
                    before()
                acquire()  # a close() from another thread cannot free the context mid-step
                try:  # (acquire/release: half the cost of a with block per token)
                    ptr = ctx._ptr
                    if ptr is None:
                        raise ClosedError("the context was closed during generation")
                    tok = step(ptr, s)
                finally:
                    release_lock()
                if tok < 0:
                    if tok == lib.PYLLAMA_STEP_FAILED:
                        self._step_failed(s)
                    if tok == lib.PYLLAMA_STEP_EOG:
                        stream.finish_reason = "eog"
                        break
                    # PYLLAMA_STEP_FULL: the context-full policy
                    tracker.unfollow(seq_id)
                    c.pos = int(s.pos)
                    if not self._make_room(c):
                        if c.error is not None:
                            raise c.error
                        break
                    # positions moved: the shifted record is exact, and the generated tokens after it
                    # are recorded from the new position on
                    pos -= int(s.pos) - c.pos
                    s.pos = recorded = c.pos
                    tracker.follow(seq_id, pending)
                    continue
                k = s.n_piece  # whole characters only: the step holds back the start of an incomplete one
                text = unpack(piece, k).decode("utf-8", "replace") if k >= 0 else _long_piece_text(stream, s, tok)
                if not fast:
                    with lock:
                        ev = stream.accept_text(tok, text, ctx._p(), -1)
                    if ev is not None:
                        yield ev
                    if stream.finish_reason is not None:
                        break
                    continue
                if n == cap:
                    out = stream._gen = np.concatenate([out, np.empty(cap, dtype=np.int32)])
                    cap = out.size
                out[n] = tok
                n += 1
                stream.n_generated = n
                if text:
                    parts_append(text)
                if n == limit:
                    stream.finish_reason = "length"
                    yield TokenEvent(tok, text, n - 1)
                    break
                yield TokenEvent(tok, text, n - 1)
            # an incomplete character held back at the end becomes U+FFFD
            tail = stream.finish(held=unpack(s.pending, s.n_pending) if s.n_pending else b"")
            if tail is not None:
                yield tail
        finally:
            tracker.unfollow(seq_id)
            self._close(c, release)

    def _step_failed(self, s: Any) -> None:
        """Raise for a failed pyllama_step_next."""
        with self._lock:
            self.ctx._p()  # closed meanwhile: ClosedError
            if s.rc == lib.PYLLAMA_STEP_SAMPLER_ERROR:
                raise SamplerError(f"sampling failed: {sampling_error()}")
            batch = Batch(1).add([s.prev], int(s.pos), int(s.seq), logits="all")
            self.ctx._decode_failed(batch, s.rc)

    # --- the benchmark's loops (llama-bench's, with sampling) ----------------------------------------
    def run_steps(self, s: Any, first: int, pos: int, n: int) -> int:
        """``n`` fused steps from ``first`` at ``pos`` on a prepared step struct, end of generation ignored;
        returns the next position."""
        ctx = self.ctx
        s.prev, s.pos, s.st = first, pos, ctx._arm_abort()
        ctx_p, step = ctx._p(), lib.pyllama_step_next
        for _ in range(n):
            if step(ctx_p, s) in (lib.PYLLAMA_STEP_FAILED, lib.PYLLAMA_STEP_FULL):
                raise DecodeError(f"decode or sampling failed ({s.rc})", int(s.rc))
        return int(s.pos)


def common_prefix(held: npt.NDArray[np.int32], prompt: npt.NDArray[np.int32]) -> int:
    """How many leading tokens ``held`` and ``prompt`` share."""
    m = min(int(held.size), int(prompt.size))
    diff = np.flatnonzero(held[:m] != prompt[:m])
    return int(diff[0]) if diff.size else m


def verify(stream: SequenceStream, ctx_ptr: Any, row: int,
           draft: npt.NDArray[np.int32]) -> tuple[list[TokenEvent], int, int]:
    """Sample batch rows ``row``, ``row + 1``, ... with the stream's own chain while each sampled token is
    the draft's (row ``row + i`` holds the logits after draft token ``i - 1``); stop at the first other token,
    at the end of the draft or when the stream finishes. Returns the events, how many draft tokens were
    accepted and the last sampled token. Without a draft: one row sampled."""
    if ctx_ptr is None:
        raise ClosedError("the context was closed during generation")
    sample, push = stream.sample, stream.push
    events: list[TokenEvent] = []
    n = len(draft)
    i = 0
    while True:
        token = sample(ctx_ptr, row + i)
        ev = push(token, ctx_ptr, row + i)
        if ev is not None:
            events.append(ev)
        if stream.finish_reason is not None or i == n or token != draft[i]:
            return events, i, token
        i += 1


def _long_piece_text(stream: SequenceStream, s: Any, token: int) -> str:
    """The text of a piece longer than pyllama_step_next's buffer (never in practice), held-back bytes
    handled as the step handles them."""
    piece = stream.model.vocab._piece(token, False, s.lstrip, ffi.new("char[]", 256))
    s.lstrip = 0
    data: bytes = ffi.unpack(s.pending, s.n_pending) + piece
    whole = int(lib.pyllama_utf8_complete(data, len(data)))
    s.n_pending = len(data) - whole
    ffi.memmove(s.pending, data[whole:], len(data) - whole)
    return data[:whole].decode("utf-8", "replace")


__all__ = ["Decoder", "Cursor", "verify", "common_prefix"]
