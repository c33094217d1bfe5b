"""Embeddings of texts (or token sequences) with the model's pooling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import numpy.typing as npt

from .batch import Batch
from .errors import ContextOverflowError
from .vocab import as_tokens

if TYPE_CHECKING:
    from .context import Context
    from .context_params import ContextKnobs
    from .model import Model
    from .options import Unpack
    from .vocab import TokenArray

#: One input of :func:`embed`: a text (tokenized with the model's special tokens, BOS for one) or token ids,
#: used as they are.
EmbedInput = Union[str, Sequence[int], npt.NDArray[np.integer[Any]]]


def _is_one(texts: Any) -> bool:
    """Whether ``texts`` is one input rather than a list of them."""
    if isinstance(texts, str):
        return True
    if isinstance(texts, np.ndarray):
        return texts.ndim == 1
    return isinstance(texts, Sequence) and bool(texts) and all(isinstance(t, (int, np.integer)) for t in texts)


def embed_tokens(model: Model, item: EmbedInput, row: int = 0) -> TokenArray:
    """The tokens :func:`embed` evaluates for ``item``: a text tokenized as llama-server does, or ids checked
    against the vocabulary."""
    if isinstance(item, str):
        toks = model.vocab.tokenize(item, add_special=True, parse_special=False)
    else:
        toks = as_tokens(item)
        model.vocab.check_tokens(toks)
    if not toks.size:
        raise ValueError(f"input {row} has no tokens")
    return toks


def embed(target: Model | Context, texts: EmbedInput | Sequence[EmbedInput], *, normalize: bool = True,
          pooling: str | None = None, **context_options: Unpack[ContextKnobs]) -> npt.NDArray[np.float32]:
    """Embed texts: an array of shape (len(texts), n_embd) (or (n_embd,) for one input).

    An input is a string or a sequence of token ids (a list of them is several inputs). Uses the model's
    pooling (``pooling=`` overrides it; 'none' is refused since it yields one vector per token). Given a
    model, a temporary embedding context is created and closed; given a context, it must have been created
    with ``embeddings=True``. Rows are L2-normalised unless ``normalize=False``. Under rank pooling (a
    reranker) each row is the model's score(s) for its input, never normalised: see :func:`pyllama.rerank`.
    """
    from .context import Context

    single = _is_one(texts)
    items: list[EmbedInput] = [texts] if single else list(texts)  # type: ignore[list-item,arg-type]
    if isinstance(target, Context):
        ctx, own = target, False
        if not ctx.embeddings_enabled:
            raise ValueError("the context was not created with embeddings=True")
    else:
        knobs: ContextKnobs = {"n_ctx": "auto", "n_batch": 2048, "n_ubatch": 2048, **context_options}
        ctx, own = target.context(embeddings=True, pooling=pooling, **knobs), True
    try:
        ranks = ctx.pooling == 4  # rank pooling gives scores, not directions: never normalised
        if ctx.pooling == 0:
            raise ValueError("pooling 'none' gives one embedding per token; choose mean, cls or last")
        model = ctx.model
        tokens = [embed_tokens(model, item, row) for row, item in enumerate(items)]
        out = _pooled(ctx, tokens)
    finally:
        if own:
            ctx.close()
    if normalize and not ranks:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, np.where(norms == 0, 1, norms), out=out)
    return out[0] if single else out


def _pooled(ctx: Context, tokens: list[TokenArray]) -> npt.NDArray[np.float32]:
    """The pooled output of each token sequence, one at a time in sequence 0."""
    model = ctx.model
    out: npt.NDArray[np.float32] | None = None
    for row, toks in enumerate(tokens):
        if toks.size > min(ctx.n_batch, ctx.n_ubatch, ctx.n_ctx):
            raise ContextOverflowError(
                f"input {row} has {toks.size} tokens; embedding needs them in one micro-batch "
                f"(n_ubatch={ctx.n_ubatch})")
        ctx.kv.clear()
        batch = Batch.from_tokens(toks, 0, 0, logits="all")
        if model.has_encoder and not model.has_decoder:
            ctx.encode(batch)
        else:
            ctx.decode(batch)
        vec = ctx.sequence_embedding(0)
        if out is None:  # the width: n_embd, or the reranker's number of scores
            out = np.empty((len(tokens), vec.size), dtype=np.float32)
        out[row] = vec
    ctx.kv.clear()
    return out if out is not None else np.empty((0, ctx.n_embd), dtype=np.float32)


__all__ = ["EmbedInput", "embed", "embed_tokens"]
