"""Incremental detokenization: text that is always valid UTF-8, never half a character."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Iterable

from ._ffi import ffi

if TYPE_CHECKING:
    from .vocab import Vocab


class StreamDecoder:
    """Turn tokens into text one at a time.

    A character split across tokens (byte-fallback pieces of an emoji, say) is
    held back until it is complete. By default the concatenated output equals
    ``vocab.detokenize(all_tokens)``, including its removal of the leading space
    a SentencePiece tokenizer prefixes; pass ``lstrip_first=False`` when the
    tokens continue earlier text (generation after a prompt).
    """

    def __init__(self, vocab: Vocab, *, special: bool = False, lstrip_first: bool | None = None) -> None:
        self._vocab = vocab
        self._special = special
        self._lstrip = int(vocab.add_space_prefix if lstrip_first is None else lstrip_first)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ffi.new("char[]", 256)

    def push(self, token: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""
        piece = self._vocab._piece(token, self._special, self._lstrip, self._buf)
        self._lstrip = 0
        return self._decoder.decode(piece)

    def push_bytes(self, token: int) -> tuple[bytes, str]:
        """The token's raw bytes and the text it completes."""
        piece = self._vocab._piece(token, self._special, self._lstrip, self._buf)
        self._lstrip = 0
        return piece, self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)

    def decode_all(self, tokens: Iterable[int]) -> str:
        return "".join(self.push(int(t)) for t in tokens) + self.flush()


__all__ = ["StreamDecoder"]
