"""Server-sent events as OpenAI streams them: ``data: {json}`` frames, ``data: [DONE]``, comments."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"  # a comment: clients ignore it, proxies and timers see traffic

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (the body of every response and frame)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def frame(obj: Any) -> bytes:
    """One ``data:`` event carrying ``obj`` as JSON (JSON never contains a raw newline)."""
    return b"data: " + dumps(obj) + b"\n\n"


def event(name: str, obj: Any) -> bytes:
    """A named event (``event: name`` then ``data: {json}``), as Anthropic and OpenAI's Responses stream."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


__all__ = ["DONE", "KEEPALIVE", "HEADERS", "MEDIA_TYPE", "dumps", "event", "frame"]
