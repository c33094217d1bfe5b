"""Load-progress reporting: a user callback or a progress bar (fed by llama.cpp's callback in
:mod:`pyllama.model`, or by a worker's load). Pure Python: the worker's host side uses it without the
native library."""

from __future__ import annotations

from typing import Any, Callable, Union

#: a model load's ``progress``: True shows a bar, a callable gets 0.0..1.0
ProgressArg = Union[bool, Callable[[float], Any], None]


class _Reporter:
    def __init__(self, fn: Callable[[float], Any], bar: Any = None) -> None:
        self.fn = fn
        self.bar = bar
        self.error: BaseException | None = None
        self.cancelled = False

    def __call__(self, value: float) -> bool:
        result = self.fn(value)
        if result is False:
            self.cancelled = True
            return False
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reporter(progress: bool | Callable[[float], Any] | None, label: str) -> _Reporter | None:
    """``True`` shows a tqdm bar (if tqdm is installed); a callable gets 0.0..1.0 and may return False to cancel."""
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            from tqdm import tqdm
        except ImportError:  # the progress extra is optional
            return None
        bar = tqdm(total=100, desc=label, unit="%", leave=False)

        def update(value: float) -> None:
            bar.n = round(value * 100)
            bar.refresh()

        return _Reporter(update, bar)
    return _Reporter(progress)

