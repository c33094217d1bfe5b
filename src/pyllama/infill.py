"""Fill in the middle: the prompt a code model completes between a prefix and a suffix.

The layout is llama-server's (``format_prompt_infill`` in llama.cpp's tools/server, the repository-level
pattern of Qwen2.5-Coder, https://arxiv.org/pdf/2409.12186)::

    [FIM_REP]myproject\\n[FIM_SEP]name0\\ntext0...[FIM_SEP]filename\\n[FIM_PRE]prefix prompt[FIM_SUF]suffix[FIM_MID]

with the prefix, suffix and extra files cut to fit a batch and the context as llama-server cuts them, so a
model answers ``/infill`` here as it does there. That code lives in llama-server, not in a library pyllama
builds, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import numpy.typing as npt

from .vocab import as_tokens

if TYPE_CHECKING:
    from .model import Model

TokenInput = Union[str, Sequence[int], npt.NDArray[np.integer[Any]]]

# llama-server's separator of extra chunks for a model without a file separator token
_CHUNK_PREFIX = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class InfillFile:
    """Another file of the project, given to the model before the one being edited (``input_extra``)."""

    text: str
    filename: str = "tmp"


def infill_support(model: Model) -> str | None:
    """Why ``model`` cannot fill in the middle (its missing tokens, in llama-server's words), or None."""
    vocab = model.vocab
    missing = [f"{what} token is missing. " for what, tok in
               (("prefix", vocab.fim_pre), ("suffix", vocab.fim_suf), ("middle", vocab.fim_mid)) if tok is None]
    return "".join(missing) or None


def infill_tokens(model: Model, prefix: TokenInput, suffix: TokenInput, *, prompt: TokenInput = "",
                  extra: Sequence[InfillFile] = (), n_batch: int = 2048, n_ctx: int = 4096, n_predict: int = -1,
                  spm: bool = False) -> npt.NDArray[np.int32]:
    """The fill-in-the-middle prompt for the code between ``prefix`` and ``suffix`` (text or token ids),
    ``prompt`` being the start of the middle already written, ``extra`` other files of the project.

    The prefix keeps its last 3/4 of ``n_batch`` tokens, the suffix its first quarter less the prompt, and
    the extra files the last ``n_ctx - n_batch - 2 * n_predict`` tokens, as llama-server; ``spm`` puts the
    suffix first (its ``--spm-infill``). Raises ValueError for a model without FIM tokens."""
    why = infill_support(model)
    if why is not None:
        raise ValueError(f"this model cannot fill in the middle: {why.strip()}")
    vocab = model.vocab
    pre, suf, mid = vocab.fim_pre, vocab.fim_suf, vocab.fim_mid
    assert pre is not None and suf is not None and mid is not None

    def text(s: str, special: bool = False) -> list[int]:
        out: list[int] = vocab.tokenize(s, add_special=False, parse_special=special).tolist()
        return out

    def tokens(x: TokenInput, special: bool = False) -> list[int]:
        if isinstance(x, str):
            return text(x, special)
        arr = as_tokens(x)
        vocab.check_tokens(arr)
        out: list[int] = arr.tolist()
        return out

    t_prefix, t_suffix, t_prompt = tokens(prefix), tokens(suffix), tokens(prompt, special=True)
    extra_tokens: list[int] = []
    if vocab.fim_rep is not None:
        extra_tokens += [vocab.fim_rep, *text("myproject\n")]
    for chunk in extra:
        if vocab.fim_sep is not None:
            extra_tokens += [vocab.fim_sep, *text(chunk.filename + "\n")]
        else:
            extra_tokens += text(_CHUNK_PREFIX)
        extra_tokens += text(chunk.text)
    if vocab.fim_sep is not None:
        extra_tokens += [vocab.fim_sep, *text("filename\n")]

    n_prefix = min(len(t_prefix), 3 * (n_batch // 4))
    n_suffix = min(len(t_suffix), max(0, n_batch // 4 - (2 + len(t_prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_tokens))
    head = [pre, *t_prefix[len(t_prefix) - n_prefix:], *t_prompt]
    tail = [suf, *t_suffix[:n_suffix]]
    first, second = (tail, head) if spm else (head, tail)
    if vocab.add_bos and vocab.bos is not None:
        first = [vocab.bos, *first]
    out = [*extra_tokens[len(extra_tokens) - n_extra:], *first, *second, mid]
    return np.asarray(out, dtype=np.int32)


__all__ = ["InfillFile", "infill_tokens", "infill_support"]
