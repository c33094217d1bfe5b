"""Parallel sequences: N prompts generated together in one context, one batch per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ._ffi import ffi, lib
from .batch import Batch
from .errors import ContextOverflowError
from .generate import Prompt
from .sampling import Greedy
from .stream import SamplerArg, Sampling, SequenceStream, TokenEvent
from .vocab import as_tokens

if TYPE_CHECKING:
    from .context import Context


@dataclass
class SequenceResult:
    """What one sequence of a parallel generation produced."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass(frozen=True)
class ParallelEvent:
    sequence: int
    event: TokenEvent


def generate_parallel(ctx: Context, prompts: Sequence[Prompt], *, samplers: Sequence[SamplerArg] | None = None,
                      max_tokens: int = 128, stop: Sequence[str] = (),
                      results: list[SequenceResult] | None = None, ignore_eos: bool = False,
                      sampling: Sampling = "auto") -> Iterator[ParallelEvent]:
    """Generate for every prompt at once: sequence ``i`` uses KV sequence ``i`` and ``samplers[i]``
    (greedy when None). Each step decodes one batch holding the next token of every live sequence.
    Pass a ``results`` list to collect per-sequence tokens, text and finish reasons; ``ignore_eos``
    and ``sampling`` are :func:`pyllama.generate`'s.
    """
    n = len(prompts)
    if n == 0:
        return
    if n > ctx.n_seq_max:
        raise ValueError(f"{n} prompts need a context with n_seq_max >= {n} (it has {ctx.n_seq_max})")
    model = ctx.model
    toks = [model.vocab.tokenize(p) if isinstance(p, (str, bytes)) else as_tokens(p) for p in prompts]
    if any(t.size == 0 for t in toks):
        raise ValueError("empty prompt")
    longest = max(t.size for t in toks) + max_tokens
    if longest > ctx.n_ctx_seq:
        raise ContextOverflowError(f"a sequence may need {longest} positions; n_ctx_seq is {ctx.n_ctx_seq}")
    streams: list[SequenceStream] = []
    try:
        for i in range(n):
            s = samplers[i] if samplers is not None else None
            streams.append(SequenceStream(model, s if s is not None else [Greedy()], max_tokens=max_tokens,
                                          stop=stop, ignore_eos=ignore_eos, sampling=sampling))
        if ctx._backend_sampling_pays:
            for st in streams:
                st.prefer_backend()
        for i, st in enumerate(streams):  # backend sampling: each sequence's chain in the graph; else none
            ctx._attach_sampler(i, st.chain if st.sampling == "backend" else None)
        out = results if results is not None else []
        out[:] = [SequenceResult() for _ in range(n)]
        # Prompts: all of them in shared batches of up to n_batch tokens (as llama-batched-bench
        # prefills), each sequence's first token sampled from its last prompt row right after the
        # decode that holds it (the next decode overwrites the logits).
        pending = np.zeros(n, dtype=np.int32)
        for i, t in enumerate(toks):
            model.vocab.check_tokens(t)
            ctx.kv.remove(i)
        batch = Batch(min(ctx.n_batch, sum(t.size for t in toks)))
        ends: list[tuple[int, int]] = []  # (sequence, batch row of its last prompt token)

        def prefill() -> None:
            ctx._decode(batch)
            ptr = ctx._p()
            for seq, row in ends:
                pending[seq] = streams[seq].sample(ptr, row)
            ends.clear()
            batch.clear()

        for i, t in enumerate(toks):
            off = 0
            while off < t.size:
                piece = t[off:off + batch.capacity - batch.n_tokens]
                last = off + piece.size == t.size
                if last:
                    ends.append((i, batch.n_tokens + piece.size - 1))
                batch.add(piece, off, i, logits="last" if last else "none")
                off += piece.size
                if batch.n_tokens == batch.capacity:
                    prefill()
        if batch.n_tokens:
            prefill()
        for i in range(n):
            ctx._seq_tokens.forget(i)
        pos = np.array([t.size for t in toks], dtype=np.int32)
        live = list(range(n))
        live_ids = np.arange(n, dtype=np.int32)
        batch = Batch(n)
        # each step's batch in one C call (next tokens, positions advanced): right after a decode has
        # pushed Python's data out of the caches, the numpy operations it replaces took ~150 µs a step
        step_rows, batch_p = lib.pyllama_batch_step_rows, batch._struct
        pending_p, pos_p = ffi.from_buffer("llama_token[]", pending), ffi.from_buffer("llama_pos[]", pos)
        live_p = ffi.from_buffer("int32_t[]", live_ids)
        while live:
            still: list[int] = []
            for i in live:
                stream, res = streams[i], out[i]
                tok = int(pending[i])
                n_before = stream.n_generated
                ev = stream.push(tok)
                if stream.n_generated > n_before:
                    res.tokens.append(tok)
                if ev is not None:
                    res.text += ev.text
                    yield ParallelEvent(i, ev)
                if stream.finish_reason is None:
                    still.append(i)
                else:
                    res.finish_reason = stream.finish_reason
            if len(still) != len(live):
                live_ids[: len(still)] = still
            live = still
            if not live:
                break
            step_rows(batch_p, pending_p, pos_p, live_p, len(live))
            ctx._decode(batch)
            for i in live:
                ctx._seq_tokens.forget(i)
            ptr = ctx._p()
            for row, i in enumerate(live):
                pending[i] = streams[i].sample(ptr, row)
        for i in range(n):
            tail = streams[i].finish()
            if tail is not None:
                out[i].text += tail.text
                yield ParallelEvent(i, tail)
    finally:
        for i, st in enumerate(streams):
            if st.sampling == "backend":
                ctx._detach_sampler(i, st._chain)
            st.close()


def generate_parallel_tokens(ctx: Context, prompts: Sequence[Prompt], **options: object) -> list[SequenceResult]:
    """Run :func:`generate_parallel` to the end and return each sequence's result."""
    results: list[SequenceResult] = []
    for _ in generate_parallel(ctx, prompts, results=results, **options):  # type: ignore[arg-type]
        pass
    return results


__all__ = ["generate_parallel", "generate_parallel_tokens", "SequenceResult", "ParallelEvent"]
