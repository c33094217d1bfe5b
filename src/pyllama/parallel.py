"""Parallel sequences: N prompts generated together in one context, one batch per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .batch import Batch
from .detokenize import StreamDecoder
from .errors import ContextOverflowError
from .generate import Prompt, SamplerArg, StopMatcher, TokenEvent
from .sampling import Greedy, SamplerChain
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
                      results: list[SequenceResult] | None = None) -> Iterator[ParallelEvent]:
    """Generate for every prompt at once: sequence ``i`` uses KV sequence ``i`` and ``samplers[i]``
    (greedy when None). Each step decodes one batch holding the next token of every live sequence.
    Pass a ``results`` list to collect per-sequence tokens, text and finish reasons.
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
    owned: list[SamplerChain] = []
    chains: list[SamplerChain] = []
    for i in range(n):
        s = samplers[i] if samplers is not None else None
        if isinstance(s, SamplerChain):
            chains.append(s)
        else:
            chain = SamplerChain(list(s) if s is not None else [Greedy()], model)
            owned.append(chain)
            chains.append(chain)
    out = results if results is not None else []
    out[:] = [SequenceResult() for _ in range(n)]
    decoders = [StreamDecoder(model.vocab, lstrip_first=False) for _ in range(n)]
    stops = [StopMatcher(stop) for _ in range(n)]
    try:
        # Prompts: each evaluated into its own sequence (chunked by n_batch).
        rows = np.zeros(n, dtype=np.intp)
        pending = np.zeros(n, dtype=np.int32)
        for i, t in enumerate(toks):
            ctx.kv.remove(i)
            ctx.evaluate(t, seq_id=i, reuse_prefix=False)
            # Sample now: the next prompt's evaluation overwrites these logits.
            pending[i] = chains[i].sample(ctx, -1)
        pos = np.array([t.size for t in toks], dtype=np.int32)
        live = list(range(n))
        batch = Batch(n)
        vocab = model.vocab
        step = 0
        while live:
            still: list[int] = []
            for i in live:
                tok = int(pending[i])
                res = out[i]
                if vocab.is_eog(tok):
                    res.finish_reason = "eog"
                    continue
                res.tokens.append(tok)
                text, stopped = stops[i].feed(decoders[i].push(tok))
                res.text += text
                yield ParallelEvent(i, TokenEvent(tok, text, len(res.tokens) - 1))
                if stopped:
                    res.finish_reason = "stop"
                elif len(res.tokens) >= max_tokens:
                    res.finish_reason = "length"
                else:
                    still.append(i)
            live = still
            if not live:
                break
            idx = np.asarray(live, dtype=np.intp)
            batch.set(pending[idx], pos[idx], idx.astype(np.int32), logits="all")
            ctx._decode(batch)
            for i in live:
                ctx._seq_tokens.forget(i)
            pos[idx] += 1
            rows[idx] = np.arange(idx.size)
            for i in live:
                pending[i] = chains[i].sample(ctx, int(rows[i]))
            step += 1
        for i in range(n):
            tail = stops[i].flush() + decoders[i].flush()
            if tail:
                out[i].text += tail
                yield ParallelEvent(i, TokenEvent(-1, tail, len(out[i].tokens)))
    finally:
        for c in owned:
            c.close()


def generate_parallel_tokens(ctx: Context, prompts: Sequence[Prompt], **options: object) -> list[SequenceResult]:
    """Run :func:`generate_parallel` to the end and return each sequence's result."""
    results: list[SequenceResult] = []
    for _ in generate_parallel(ctx, prompts, results=results, **options):  # type: ignore[arg-type]
        pass
    return results


__all__ = ["generate_parallel", "generate_parallel_tokens", "SequenceResult", "ParallelEvent"]
