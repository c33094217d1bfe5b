"""Speculative decoding: llama.cpp's own drafters, verified by the target model.

A :class:`Speculator` proposes the tokens that will likely follow, through
llama.cpp's ``common/speculative.cpp`` (a smaller draft model of the same
vocabulary, or n-gram lookup over the text so far: no second model). The
target then decodes the last token and the whole draft in one batch and
samples each row with the generation's own sampler chain; the draft tokens it
agrees with are kept, and the first row it disagrees on gives the next token.
Every emitted token is the one the chain would have sampled without a draft,
so greedy output is unchanged (on a backend whose results do not depend on the
batch shape), while several tokens may cost one target decode.

Use ``generate(ctx, prompt, draft="ngram")`` or ``draft=<Model>``; a
:class:`Speculator` built once and passed as ``draft=`` is reused across
generations (a draft model's context is created once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from ._context_access import native
from ._handle import Handle
from .errors import LlamaError

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

#: The n-gram drafters: ``"lookup"`` is llama-lookup's (``common/ngram-cache``: n-grams of 1 to 4
#: tokens over the prompt and the output so far, as examples/lookup does it); the others are
#: ``common/speculative.cpp``'s types by their llama.cpp names (llama-server's ``--spec-type``).
NGRAM_TYPES = ("lookup", "ngram-cache", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")
#: What ``draft="ngram"`` means.
DEFAULT_NGRAM = "lookup"

DraftArg = Union["Speculator", "Model", str, None]


@dataclass
class SpeculativeStats:
    """What the drafter proposed and the target kept, over one generation."""

    n_drafts: int = 0    # target decodes that verified a non-empty draft
    n_drafted: int = 0   # draft tokens proposed
    n_accepted: int = 0  # of them, kept

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    def add(self, n_drafted: int, n_accepted: int) -> None:
        """Count one verified draft."""
        self.n_drafts += 1
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted


class Speculator(Handle):
    """Drafts tokens for generations on ``ctx``.

    ``draft``: a :class:`~pyllama.Model` sharing the target's vocabulary (a
    context of it is created beside ``ctx``: same size, sequences and threads,
    freed with the speculator), ``"ngram"`` (the same as ``"lookup"``) or
    one of :data:`NGRAM_TYPES`. ``n_max`` bounds a draft; a draft model stops
    early below ``p_min`` confidence and drafts shorter than ``n_min`` are
    dropped. ``ngram_size_n``/``ngram_size_m``/``ngram_min_hits`` tune the
    ngram-simple/-map-k drafters (llama.cpp's defaults when None).
    """

    _kind = "speculator"

    def __init__(self, ctx: Context, draft: Model | str = "ngram", *, n_max: int = 16, n_min: int = 0,
                 p_min: float = 0.0, ngram_size_n: int | None = None, ngram_size_m: int | None = None,
                 ngram_min_hits: int | None = None) -> None:
        from .model import Model

        native(ctx)
        if ctx.model.is_recurrent or lib.llama_model_is_hybrid(ctx.model._p()):
            raise ValueError("speculative decoding drops rejected draft tokens from the cache, which a "
                             "recurrent or hybrid model's memory cannot do")
        if not 1 <= n_max <= 1024:
            raise ValueError("n_max must lie in [1, 1024]")
        if not 0 <= n_min <= n_max:
            raise ValueError("n_min must lie in [0, n_max]")
        if n_max + 1 > ctx.n_batch:
            raise ValueError(f"n_max + 1 ({n_max + 1}) must fit in the context's n_batch ({ctx.n_batch})")
        draft_ctx: Context | None = None
        if isinstance(draft, Model):
            kind = "draft-simple"
            draft_ctx = _draft_context(ctx, draft, n_max)
        elif isinstance(draft, str):
            kind = DEFAULT_NGRAM if draft == "ngram" else draft
            if kind not in NGRAM_TYPES:
                raise ValueError(f"draft must be a Model, 'ngram' or one of {NGRAM_TYPES}, not {draft!r}")
        else:
            raise TypeError(f"draft must be a Model or a string, not {type(draft).__name__}")
        config: dict[str, Any] = {"types": [kind], "n_max": n_max, "n_min": n_min, "p_min": float(p_min)}
        for key, value in (("ngram_size_n", ngram_size_n), ("ngram_size_m", ngram_size_m),
                           ("ngram_min_hits", ngram_min_hits)):
            if value is not None:
                config[key] = int(value)
        ptr = lib.pyllama_spec_init(json.dumps(config).encode(), native(ctx),
                                    native(draft_ctx) if draft_ctx is not None else ffi.NULL, ctx.n_seq_max)
        if ptr == ffi.NULL:
            message = ffi.string(lib.pyllama_spec_error()).decode("utf-8", "replace")
            if draft_ctx is not None:
                draft_ctx.close()
            raise ValueError(f"speculative decoding could not be set up: {message}")
        # The contexts outlive the C speculator, which keeps pointers to them.
        super().__init__(ptr, lib.pyllama_spec_free, ctx, draft_ctx)
        self.ctx = ctx
        self.kind = kind
        self.draft_model: Model | None = draft if isinstance(draft, Model) else None
        self.draft_context = draft_ctx
        self.n_max = n_max
        self._out = np.empty(n_max, dtype=np.int32)
        self._out_p = ffi.from_buffer("llama_token[]", self._out)

    def close(self) -> None:
        """Free the speculator and the draft model's context it created."""
        if self._ptr is None:
            return
        super().close()
        if self.draft_context is not None:
            self.draft_context.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_max={self.n_max}"
        return f"<Speculator {self.kind} {state}>"

    # --- the calls of one generation (under the target context's lock) -----------------
    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            message = ffi.string(lib.pyllama_spec_error()).decode("utf-8", "replace")
            raise LlamaError(f"speculative {what} failed: {message}")
        return rc

    def _begin(self, seq_id: int, prompt: npt.NDArray[np.int32]) -> None:
        self._check(lib.pyllama_spec_begin(self._p(), seq_id, ffi.from_buffer("llama_token[]", prompt),
                                           prompt.size), "begin")

    def _accept(self, seq_id: int, n_accepted: int) -> None:
        self._check(lib.pyllama_spec_accept(self._p(), seq_id, n_accepted), "accept")

    def _draft(self, seq_id: int, history: npt.NDArray[np.int32], id_last: int, n_max: int) -> int:
        """Draft up to ``n_max`` tokens after ``id_last`` (at position len(history)); they land in ``_out``."""
        return self._check(lib.pyllama_spec_draft(self._p(), seq_id, ffi.from_buffer("llama_token[]", history),
                                                  history.size, id_last, n_max, self._out_p, self.n_max), "draft")


def _draft_context(ctx: Context, draft: Model, n_max: int) -> Context:
    from .context import Context

    if ctx.model._p() == draft._p():
        raise ValueError("the draft model is the target model: use draft='ngram' or a smaller model")
    unified = ctx.n_seq_max > 1 and ctx.n_ctx_seq == ctx.n_ctx
    return Context(draft, n_ctx=ctx.n_ctx, n_batch=max(ctx.n_batch, n_max + 1), n_ubatch=ctx.n_ubatch,
                   n_seq_max=ctx.n_seq_max, n_threads=ctx.n_threads, n_threads_batch=ctx.n_threads_batch,
                   flash_attn=ctx.flash_attn, kv_unified=unified)


__all__ = ["Speculator", "SpeculativeStats", "DraftArg", "NGRAM_TYPES"]
