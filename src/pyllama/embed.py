"""Embeddings of texts with the model's pooling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import numpy.typing as npt

from .batch import Batch
from .errors import ContextOverflowError

if TYPE_CHECKING:
    from .context import Context
    from .model import Model


def embed(target: Model | Context, texts: str | Sequence[str], *, normalize: bool = True,
          pooling: str | None = None, **context_options: Any) -> npt.NDArray[np.float32]:
    """Embed texts: an array of shape (len(texts), n_embd) (or (n_embd,) for one string).

    Uses the model's pooling (``pooling=`` overrides it; 'none' is refused since
    it yields one vector per token). Given a model, a temporary embedding
    context is created and closed; given a context, it must have been created
    with ``embeddings=True``. Rows are L2-normalised unless ``normalize=False``.
    """
    from .context import Context

    single = isinstance(texts, str)
    items = [texts] if isinstance(texts, str) else list(texts)
    if isinstance(target, Context):
        ctx, own = target, False
        if not ctx.embeddings_enabled:
            raise ValueError("the context was not created with embeddings=True")
    else:
        opts = {"n_ctx": "auto", "n_batch": 2048, "n_ubatch": 2048, **context_options}
        ctx, own = target.context(embeddings=True, pooling=pooling, **opts), True
    try:
        if ctx.pooling == 0:
            raise ValueError("pooling 'none' gives one embedding per token; choose mean, cls or last")
        model = ctx.model
        out = np.empty((len(items), ctx.n_embd), dtype=np.float32)
        for row, text in enumerate(items):
            toks = model.vocab.tokenize(text, add_special=True, parse_special=False)
            if toks.size > min(ctx.n_batch, ctx.n_ubatch, ctx.n_ctx):
                raise ContextOverflowError(
                    f"text {row} has {toks.size} tokens; embedding needs them in one micro-batch "
                    f"(n_ubatch={ctx.n_ubatch})")
            ctx.kv.clear()
            batch = Batch.from_tokens(toks, 0, 0, logits="all")
            if model.has_encoder and not model.has_decoder:
                ctx.encode(batch)
            else:
                ctx.decode(batch)
            out[row] = ctx.sequence_embedding(0)
        ctx.kv.clear()
    finally:
        if own:
            ctx.close()
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, np.where(norms == 0, 1, norms), out=out)
    return out[0] if single else out


__all__ = ["embed"]
