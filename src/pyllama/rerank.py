"""Reranking: how relevant each document is to a query, scored by a reranker model (rank pooling).

A reranker (a cross-encoder such as bge-reranker or jina-reranker in GGUF) reads the query and one
document as a single sequence and pools it into a score. The sequence is built as llama-server builds it
(``format_prompt_rerank``): the model's ``rerank`` chat template with ``{query}`` and ``{document}``
filled in when it has one, else ``[BOS] query [EOS] [SEP] document [EOS]`` as its vocabulary adds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .context import Context
    from .context_params import ContextKnobs
    from .model import Model
    from .options import Unpack
    from .vocab import TokenArray


def rerank_tokens(model: Model, query: str, document: str) -> TokenArray:
    """The token sequence a reranker scores for (``query``, ``document``)."""
    vocab = model.vocab
    template = model.chat_template("rerank")
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return vocab.tokenize(text, add_special=False, parse_special=True)
    eos = vocab.eos if vocab.eos is not None else vocab.sep
    parts: list[Any] = []
    if vocab.add_bos and vocab.bos is not None:
        parts.append([vocab.bos])
    parts.append(vocab.tokenize(query, add_special=False))
    if vocab.add_eos and eos is not None:
        parts.append([eos])
    if vocab.add_sep and vocab.sep is not None:
        parts.append([vocab.sep])
    parts.append(vocab.tokenize(document, add_special=False))
    if vocab.add_eos and eos is not None:
        parts.append([eos])
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])


def rerank(target: Model | Context, query: str, documents: Sequence[str],
           **context_options: Unpack[ContextKnobs]) -> npt.NDArray[np.float32]:
    """The relevance score of each document to ``query``, in the documents' order (higher: more relevant).

    ``target`` is a reranker model (a temporary context with rank pooling is made and closed) or a context
    created with ``embeddings=True, pooling="rank"``.
    """
    from .context import Context
    from .embed import embed

    if not isinstance(query, str) or isinstance(documents, str):
        raise TypeError("rerank() takes a query string and a sequence of document strings")
    docs = list(documents)
    if not docs or not all(isinstance(d, str) for d in docs):
        raise ValueError("rerank() needs a non-empty list of document strings")
    model = target.model if isinstance(target, Context) else target
    if isinstance(target, Context) and target.pooling != 4:
        raise ValueError("the context does not pool by rank: create it with embeddings=True, pooling='rank'")
    tokens = [rerank_tokens(model, query, d) for d in docs]
    if isinstance(target, Context):
        scores = embed(target, tokens, normalize=False)
    else:
        scores = embed(target, tokens, normalize=False, pooling="rank", **context_options)
    return np.ascontiguousarray(scores[:, 0])


__all__ = ["rerank", "rerank_tokens"]
