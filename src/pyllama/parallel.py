"""Parallel sequences: N prompts generated together in one context, one batch per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

from .decoder import Cursor, Decoder
from .errors import ContextOverflowError
from .generate import TextPrompt as Prompt
from .options import SAMPLING_KEYS, SamplerArg, SamplingOptions, Unpack, check, stream_options
from .samplers import Greedy
from .stream import SequenceStream, TokenEvent
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
                      results: list[SequenceResult] | None = None,
                      **options: Unpack[SamplingOptions]) -> Iterator[ParallelEvent]:
    """Generate for every prompt at once: sequence ``i`` uses KV sequence ``i`` and ``samplers[i]``
    (else the chain the options ask for; greedy by default). Each step decodes one batch holding the
    next token of every live sequence. Pass a ``results`` list to collect per-sequence tokens, text and
    finish reasons. The options are :func:`pyllama.generate`'s sampling options (``max_tokens``
    defaults to 128 here).
    """
    check("generate_parallel", options, SAMPLING_KEYS)
    n = len(prompts)
    if n == 0:
        return
    if n > ctx.n_seq_max:
        raise ValueError(f"{n} prompts need a context with n_seq_max >= {n} (it has {ctx.n_seq_max})")
    if samplers is not None and len(samplers) != n:
        raise ValueError(f"{len(samplers)} samplers for {n} prompts")
    model = ctx.model
    toks = [model.vocab.tokenize(p) if isinstance(p, (str, bytes)) else as_tokens(p) for p in prompts]
    if any(t.size == 0 for t in toks):
        raise ValueError("empty prompt")
    for t in toks:
        model.vocab.check_tokens(t)
    max_tokens = options.get("max_tokens", 128)
    longest = max(t.size for t in toks) + (max_tokens or 0)
    if longest > ctx.n_ctx_seq or (max_tokens is None and longest >= ctx.n_ctx_seq):
        raise ContextOverflowError(f"a sequence may need {longest} positions; n_ctx_seq is {ctx.n_ctx_seq}")
    base = stream_options({**options, "max_tokens": max_tokens})
    decoder = Decoder(ctx)
    cursors: list[Cursor] = []
    try:
        for i in range(n):
            own = samplers[i] if samplers is not None else None
            kw = dict(base)
            if own is not None:
                kw["sampler"] = own
            elif kw.get("sampler") is None:
                kw["sampler"] = [Greedy()]
            stream = SequenceStream(model, **kw)
            cursors.append(Cursor(i, stream, toks[i], limit=ctx.n_ctx_seq, reuse_prefix=False))
            decoder.prefer_backend(stream)
        for c in cursors:
            decoder.start(c)
        out = results if results is not None else []
        out[:] = [SequenceResult() for _ in range(n)]
        decoder.prefill(cursors)
        live = cursors
        while True:
            for c in live:
                for ev in c.events:
                    out[c.seq_id].text += ev.text
                    yield ParallelEvent(c.seq_id, ev)
            live = [c for c in live if c.stream is not None and c.stream.finish_reason is None]
            if not live:
                break
            decoder.step(live)
            for c in live:
                if c.error is not None:
                    raise c.error
        for c in cursors:
            st = c.stream
            assert st is not None
            tail = st.finish()
            res = out[c.seq_id]
            if tail is not None:
                res.text += tail.text
                yield ParallelEvent(c.seq_id, tail)
            res.tokens = st.tokens.tolist()
            res.finish_reason = st.finish_reason
    finally:
        for c in cursors:
            decoder.finish(c)
            if c.stream is not None:
                c.stream.close()


def generate_parallel_tokens(ctx: Context, prompts: Sequence[Prompt], *,
                             samplers: Sequence[SamplerArg] | None = None,
                             **options: Unpack[SamplingOptions]) -> list[SequenceResult]:
    """Run :func:`generate_parallel` to the end and return each sequence's result."""
    results: list[SequenceResult] = []
    for _ in generate_parallel(ctx, prompts, samplers=samplers, results=results, **options):
        pass
    return results


__all__ = ["generate_parallel", "generate_parallel_tokens", "SequenceResult", "ParallelEvent"]
