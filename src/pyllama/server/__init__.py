"""pyllama's OpenAI-compatible HTTP server (the ``server`` extra: starlette, uvicorn, pydantic).

``create_app(engine)`` is an ASGI app over a :class:`pyllama.engine.Engine`,
servable by uvicorn or mountable in any other ASGI app; ``pyllama serve`` runs
it. Importing this package is cheap: the web stack loads on first use of
``create_app``, so ``pyllama --help`` works without the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'pyllama.server' has no attribute {name!r}")
