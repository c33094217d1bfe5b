"""Slots: the engine's sequences in one KV cache, and which one a new request gets."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import numpy.typing as npt

from ..decoder import common_prefix

if TYPE_CHECKING:
    from ..decoder import Cursor
    from .request import EngineRequest

SlotState = Literal["idle", "encode", "prefill", "generate"]


class Slot:
    """One KV-cache sequence: the request it serves (through its decoder cursor) and when it was last used."""

    __slots__ = ("id", "request", "cursor", "state", "t_last_used", "lora", "encoding")

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.request: EngineRequest | None = None
        self.cursor: Cursor | None = None
        self.state: SlotState = "idle"
        self.t_last_used = 0.0
        self.encoding: concurrent.futures.Future[None] | None = None  # the prompt's media being encoded
        self.lora: tuple[float, ...] = ()  # the LoRA scales its cache was computed under

    def release(self) -> None:
        self.encoding = None
        self.request = None
        self.cursor = None
        self.state = "idle"
        self.t_last_used = time.perf_counter()


@dataclass(frozen=True)
class SlotFile:
    """What saving or restoring a slot's cache did: the tokens it holds, the file's bytes, the time it took."""

    slot: int
    n_tokens: int
    n_bytes: int
    ms: float


def choose_slot(free: Sequence[Slot], prompt: npt.NDArray[np.int32], similarity: float,
                held: Callable[[int], npt.NDArray[np.int32]]) -> tuple[Slot, int]:
    """The free slot whose cached tokens (``held(slot.id)``) share the longest prefix with ``prompt``, if
    that prefix covers more than ``similarity`` of the prompt (llama-server's ``--slot-prompt-similarity``);
    otherwise the least recently used one. Returns the slot and the shared prefix length."""
    best, best_lcp = None, 0
    for slot in free:
        lcp = common_prefix(held(slot.id), prompt)
        if lcp > best_lcp:
            best, best_lcp = slot, lcp
    if best is not None and best_lcp / max(1, prompt.size) > similarity:
        return best, best_lcp
    lru = min(free, key=lambda s: s.t_last_used)
    return lru, common_prefix(held(lru.id), prompt)


__all__ = ["Slot", "SlotFile", "choose_slot"]
