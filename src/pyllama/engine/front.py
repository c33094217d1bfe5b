"""What every engine offers, in process (:class:`~pyllama.engine.Engine`) or in a worker
(``IsolatedEngine``): the checks a request passes before it is queued, and :class:`EngineFront`, the API
both build on ``submit`` and ``aembed`` (blocking generate, tokens, reranking, closing)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union, cast

import numpy as np
import numpy.typing as npt

from ..errors import ContextOverflowError
from ..options import CONTEXT_FULL, SubmitOptions, Unpack
from ..vocab import Vocab, as_tokens

if TYPE_CHECKING:
    from ..embed import EmbedInput
    from ..media import Media, MediaPrompt
    from ..model import Model
    from .request import EngineRequest
    from .slots import SlotFile

#: text, token ids, or text and media (a MediaPrompt, or a list of strings and pyllama.Image / pyllama.Audio)
EnginePrompt = Union[str, bytes, Sequence[int], npt.NDArray[np.integer[Any]], "MediaPrompt", "Sequence[str | Media]"]


def check_request(vocab: Vocab, prompt: EnginePrompt, *,
                  n_ctx_slot: int, max_tokens: int | None, add_special: bool, parse_special: bool,
                  context_full: str, media_tokens: npt.NDArray[np.int32] | None = None) -> npt.NDArray[np.int32]:
    """The prompt's tokens, once the request is known to fit a slot (else ValueError or ContextOverflowError);
    ``media_tokens``: the prompt already tokenized with its images or audio (placeholders at their places)."""
    if context_full not in CONTEXT_FULL:
        raise ValueError(f"context_full must be one of {CONTEXT_FULL}, not {context_full!r}")
    if media_tokens is not None:
        tokens = media_tokens
    elif isinstance(prompt, (str, bytes)):
        check_prompt_size(vocab, prompt, n_ctx_slot)
        tokens = vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
    else:
        tokens = as_tokens(cast("Sequence[int]", prompt))
        vocab.check_tokens(tokens)
    if tokens.size == 0:
        raise ValueError("empty prompt: nothing to condition the generation on")
    if tokens.size >= n_ctx_slot:
        raise ContextOverflowError(f"the prompt has {tokens.size} tokens; a slot holds {n_ctx_slot} "
                                   "(prompt and reply together)", n_tokens=int(tokens.size), n_ctx=n_ctx_slot)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise ValueError("max_tokens must be an int >= 0 or None")
    return tokens


def check_prompt_size(vocab: Vocab, text: str | bytes, n_ctx_slot: int) -> None:
    """ContextOverflowError for a text too long for a slot by its length alone (:meth:`Vocab.min_tokens`),
    before anything tokenizes it; a text that may fit passes (its tokens decide)."""
    if len(text) < n_ctx_slot:  # fewer characters than the slot holds: the bound cannot refuse it
        return
    least = vocab.min_tokens(text)
    if least >= n_ctx_slot:
        raise ContextOverflowError(f"the prompt has at least {least} tokens ({len(text)} characters); a slot "
                                   f"holds {n_ctx_slot} (prompt and reply together)", n_tokens=least,
                                   n_ctx=n_ctx_slot)


def check_slot(slot: object, n_slots: int) -> int:
    """``slot`` once known to name one of an engine's ``n_slots`` slots (else ValueError)."""
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < n_slots:
        raise ValueError(f"slot must be an int in [0, {n_slots}), not {slot!r}")
    return slot


def check_embed_request(texts: Sequence[EmbedInput], *, embeddings: bool) -> list[EmbedInput]:
    """``texts`` as a list, once known to be a non-empty list of inputs (strings or token id sequences) for an
    engine with embeddings."""
    if not embeddings:
        raise ValueError("this engine was created with embeddings=False")
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of inputs (strings or token id sequences)")
    items = list(texts)
    if not items or not all(isinstance(t, (str, Sequence, np.ndarray)) for t in items):
        raise ValueError("embed() needs a non-empty list of strings or token id sequences")
    return items


#: The embedding pooling names of :meth:`pyllama.Model.context`, by llama.cpp's enum value.
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


def embedding_pooling(model: Model, pooling: str | None) -> str:
    """The pooling an engine embeds with: ``pooling`` if given, else the model's own, else mean."""
    if pooling is not None:
        if pooling not in POOLING_NAMES.values():
            raise ValueError(f"pooling must be one of {sorted(POOLING_NAMES.values())}, not {pooling!r}")
        return pooling
    own = model.meta(f"{model.architecture}.pooling_type")
    return POOLING_NAMES.get(int(own), "mean") if own is not None and own.lstrip("-").isdigit() else "mean"


class EngineFront:
    """What every engine offers on top of ``submit``: a blocking generate, and tokens on its model's vocabulary
    (shared by :class:`Engine` and the worker's ``IsolatedEngine``)."""

    model: Model
    pooling: str

    def submit(self, prompt: EnginePrompt,
               **options: Unpack[SubmitOptions]) -> EngineRequest:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Requests submitted inside are admitted in the same step (n choices, a list of prompts): their
        prompts are prefilled in one batch, so identical requests compute identically, as in llama-server.
        (Here: nothing to hold; :class:`Engine` holds its admission.)"""
        yield

    async def aembed(self, texts: Sequence[EmbedInput], *,
                     normalize: bool = True) -> npt.NDArray[np.float32]:  # pragma: no cover - abstract
        raise NotImplementedError

    def rerank_prompts(self, query: str, documents: Sequence[str]) -> list[npt.NDArray[np.int32]]:
        """What :meth:`arerank` scores: one token sequence per document (see :func:`pyllama.rerank_tokens`)."""
        from ..rerank import rerank_tokens

        if self.pooling != "rank":
            raise ValueError(f"this engine pools embeddings by {self.pooling!r}, not by rank: reranking needs "
                             "a reranker model (or pooling='rank')")
        return [rerank_tokens(self.model, query, d) for d in documents]

    async def arerank(self, prompts: Sequence[npt.NDArray[np.int32]]) -> npt.NDArray[np.float32]:
        """The reranker's score of each of :meth:`rerank_prompts`' sequences, computed with the embeddings."""
        scores = await self.aembed(list(prompts), normalize=False)
        return np.ascontiguousarray(scores[:, 0])

    @property
    def modalities(self) -> tuple[str, ...]:  # pragma: no cover - abstract
        """The media the engine's model takes through its projector: ``()``, ``("image",)``, ``("audio",)``
        or both."""
        raise NotImplementedError

    def media_prompt(self, parts: Sequence[str | Media], *, add_special: bool = True,
                     parse_special: bool = True) -> Any:  # pragma: no cover - abstract
        """What :meth:`submit` takes for a prompt of text and media, prepared where the engine can (call it
        off the event loop: images are decoded here); the request closes it."""
        raise NotImplementedError

    def prompt_tokens(self, parts: Sequence[str | Media], add_special: bool = True,
                      parse_special: bool = True) -> npt.NDArray[np.int32]:  # pragma: no cover - abstract
        """The token layout of a prompt of text and media (media positions hold placeholder ids)."""
        raise NotImplementedError

    def check_modalities(self, media: Sequence[Media]) -> None:
        """MediaError (a 400) for media of a kind the model does not take, as llama-server words it."""
        from ..media import MediaError

        kinds = self.modalities
        for item in media:
            if item.kind not in kinds:
                raise MediaError(f"{item.kind} input is not supported - hint: if this is unexpected, you may need "
                                 "to provide the mmproj")

    def generate(self, prompt: EnginePrompt, **options: Unpack[SubmitOptions]) -> str:
        """Submit and wait: the whole completion as one string."""
        return self.submit(prompt, **options).result()

    def tokenize(self, text: str | bytes, *, add_special: bool = True,
                 parse_special: bool = False) -> npt.NDArray[np.int32]:
        return self.model.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int] | npt.NDArray[np.integer[Any]]) -> str:
        return self.model.vocab.detokenize(tokens)

    def save_slot(self, slot: int, path: str | os.PathLike[str]) -> SlotFile:  # pragma: no cover - abstract
        raise NotImplementedError

    def restore_slot(self, slot: int, path: str | os.PathLike[str]) -> SlotFile:  # pragma: no cover - abstract
        raise NotImplementedError

    def erase_slot(self, slot: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def lora(self) -> list[tuple[str, float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_lora_scales(self, scales: Mapping[int, float]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def aclose(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close, drain=drain, timeout=timeout)

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["EngineFront", "EnginePrompt", "check_request", "check_slot", "check_embed_request", "embedding_pooling",
           "POOLING_NAMES"]
