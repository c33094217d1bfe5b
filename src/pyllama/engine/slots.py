"""Slots: the engine's sequences in one KV cache, and which one a new request gets."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .request import EngineRequest

SlotState = Literal["idle", "prefill", "generate"]


class Slot:
    """One KV-cache sequence: the request it serves and the tokens it holds (for prompt reuse)."""

    __slots__ = ("id", "cached", "n_cached", "request", "state", "prefill", "pos", "last_token", "t_last_used")

    def __init__(self, seq_id: int, capacity: int) -> None:
        self.id = seq_id
        self.cached = np.empty(capacity + 1, dtype=np.int32)  # tokens in the KV cache, in position order
        self.n_cached = 0
        self.request: EngineRequest | None = None
        self.state: SlotState = "idle"
        self.prefill = 0  # index of the next prompt token to evaluate
        self.pos = 0  # position of the next token to decode
        self.last_token = -1  # sampled, not yet decoded
        self.t_last_used = 0.0

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        return self.cached[: self.n_cached]

    def common_prefix(self, prompt: npt.NDArray[np.int32]) -> int:
        m = min(self.n_cached, int(prompt.size))
        if m == 0:
            return 0
        diff = np.flatnonzero(self.cached[:m] != prompt[:m])
        return int(diff[0]) if diff.size else m

    def append(self, tokens: npt.NDArray[np.int32] | int) -> None:
        if isinstance(tokens, int):
            self.cached[self.n_cached] = tokens
            self.n_cached += 1
        else:
            k = int(tokens.size)
            self.cached[self.n_cached:self.n_cached + k] = tokens
            self.n_cached += k

    def release(self) -> None:
        self.request = None
        self.state = "idle"
        self.t_last_used = time.perf_counter()


def choose_slot(free: Sequence[Slot], prompt: npt.NDArray[np.int32], similarity: float) -> tuple[Slot, int]:
    """The free slot whose cached tokens share the longest prefix with ``prompt``, if that prefix
    covers more than ``similarity`` of the prompt (llama-server's ``--slot-prompt-similarity``);
    otherwise the least recently used one. Returns the slot and the shared prefix length."""
    best, best_lcp = None, 0
    for slot in free:
        lcp = slot.common_prefix(prompt)
        if lcp > best_lcp:
            best, best_lcp = slot, lcp
    if best is not None and best_lcp / max(1, prompt.size) > similarity:
        return best, best_lcp
    lru = min(free, key=lambda s: s.t_last_used)
    return lru, lru.common_prefix(prompt)


__all__ = ["Slot", "choose_slot"]
