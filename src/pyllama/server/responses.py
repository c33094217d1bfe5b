"""The plain (non-streamed) responses every endpoint answers with."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from . import sse


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``obj`` as JSON, serialized like the SSE frames."""
    return Response(sse.dumps(obj), status_code=status, headers=headers, media_type="application/json")


# Answer to a client that disconnected before its non-streamed result was ready (nobody reads it;
# 499 is the conventional "client closed request" code, so the request counter shows it).
def gone() -> Response:
    return Response(status_code=499)
