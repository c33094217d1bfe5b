"""The seam through which the context's facets reach its internals.

``ctx.kv``, ``ctx.state``, a :class:`~pyllama.Threadpool` and a
:class:`~pyllama.Speculator` edit what a context holds; they reach its native
handle, its lock and its record of what each sequence holds through these
functions, and nothing else does but :mod:`pyllama.decoder` (the token loop).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._seqtokens import SeqTokens
    from .context import Context


def native(ctx: Context) -> Any:
    """The context's ``llama_context *`` (ClosedError once it is closed)."""
    return ctx._p()


def guard(ctx: Context) -> threading.RLock:
    """The lock that serialises every use of the context's native state."""
    return ctx._lock


def held_record(ctx: Context) -> SeqTokens:
    """The record of the tokens each sequence holds (for prefix reuse); edit it under :func:`guard`."""
    return ctx._seq_tokens


def attached_chains(ctx: Context) -> list[Any]:
    """The sampler chains attached to the context for backend sampling."""
    return list(ctx._backend_samplers.values())


__all__ = ["native", "guard", "held_record", "attached_chains"]
