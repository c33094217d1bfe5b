"""Download progress: the event apps receive, the meter that produces it, the command line's bar."""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import DownloadCancelledError


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report for a pull (a split set counts as one download)."""

    done: int  #: bytes on disk for the whole pull, resumed and already-cached bytes included
    total: int | None  #: bytes of the whole pull (None while a server has not said)
    rate: float  #: bytes per second received over the last few seconds
    filename: str  #: the file being transferred


#: ``True`` for a tqdm bar on stderr; a callable gets :class:`DownloadProgress` and may return False to cancel.
ProgressArg = Union[bool, Callable[[DownloadProgress], Any], None]


class Meter:
    """Turns received bytes into throttled :class:`DownloadProgress` calls with a moving-average rate."""

    def __init__(self, callback: Callable[[DownloadProgress], Any] | None, total: int | None,
                 interval: float = 0.1, window: float = 3.0) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self.filename = ""
        self._interval = interval
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._received = 0  # bytes received in this process (not resumed ones): the rate's base
        self._last = 0.0

    def start_file(self, filename: str, already: int) -> None:
        self.filename = filename
        self.done += already
        self._emit(force=True)

    def add_total(self, n: int) -> None:
        self.total = (self.total or 0) + n

    def add(self, n: int) -> None:
        self.done += n
        self._received += n
        self._emit()

    def rewind(self, n: int) -> None:
        """The server made us start a file over: ``n`` bytes already counted are gone."""
        self.done -= n
        self._emit(force=True)

    def finish(self) -> None:
        self._emit(force=True, final=True)

    def _rate(self, now: float) -> float:
        self._samples.append((now, self._received))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return (self._received - b0) / (now - t0) if now > t0 else 0.0

    def _emit(self, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        rate = self._rate(now)
        if self.callback is None or (not force and now - self._last < self._interval):
            return
        self._last = now
        if self.callback(DownloadProgress(self.done, self.total, rate, self.filename)) is False and not final:
            raise DownloadCancelledError(f"download of {self.filename} cancelled by the progress callback")


class Bar:
    """A tqdm bar on stderr (plain periodic lines when tqdm is not installed)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._printed = -1
        try:
            from tqdm import tqdm
        except ImportError:  # the `progress` extra is optional
            self._tqdm: Any = None
        else:
            self._tqdm = tqdm

    def __call__(self, p: DownloadProgress) -> None:
        if self._tqdm is not None:
            if self._bar is None:
                self._bar = self._tqdm(total=p.total, desc=self.label, unit="B", unit_scale=True,
                                       unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
            if p.total != self._bar.total:
                self._bar.total = p.total
            self._bar.n = p.done
            self._bar.set_postfix_str(p.filename, refresh=False)
            self._bar.refresh()
        elif p.total:
            pct = p.done * 100 // p.total
            if pct // 10 != self._printed // 10 or p.done == p.total:
                self._printed = pct
                print(f"{self.label}: {pct}% of {p.total / 2**20:.1f} MiB ({p.rate / 2**20:.1f} MiB/s)",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["DownloadProgress", "ProgressArg", "Meter", "Bar"]
