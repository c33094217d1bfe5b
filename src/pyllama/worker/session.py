"""A chat session held in the worker: :class:`WorkerChatSession`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..options import SAMPLING_KEYS
from . import protocol as p
from .generation import WorkerGeneration, portable_options

if TYPE_CHECKING:
    from ..chat import UserMessage
    from .client import Worker


class WorkerChatSession:
    """A conversation with the worker's model; see :meth:`Worker.chat`.

    The child keeps the conversation in its KV cache between turns, so each
    turn evaluates only its new tokens. The messages are kept here too, so a
    session survives a restarted worker or an idle unload (the next turn then
    evaluates the whole conversation once). The generation settings are plain
    attributes, changeable between turns.
    """

    def __init__(self, worker: Worker, *, system: str | None, template: str | None, seq_id: int,
                 options: dict[str, Any]) -> None:
        self.worker = worker
        self.template = template
        self.seq_id = seq_id
        #: the sampling options of every turn (checked by :meth:`Worker.chat`; changeable between turns)
        self.options = options
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def stream(self, message: UserMessage) -> WorkerGeneration:
        """Send a user message and stream the reply; the reply joins ``messages`` when the stream ends. A
        message is text or parts, as :meth:`pyllama.ChatSession.stream` takes them (images and audio need
        the worker's model loaded with ``mmproj=``)."""
        from ..chat import user_content

        options = portable_options("chat", self.options, SAMPLING_KEYS)
        history = [*self.messages, {"role": "user", "content": user_content(message)}]
        gen = self.worker._stream(p.CHAT, (history, self.template, self.seq_id, options),
                                  on_end=lambda g: self.messages.append({"role": "assistant", "content": g.text}))
        self.messages.append(history[-1])
        return gen

    def ask(self, message: UserMessage) -> str:
        """Send a user message and return the whole reply."""
        with self.stream(message) as gen:
            for _ in gen:
                pass
            return gen.text

    async def aask(self, message: UserMessage) -> str:
        """:meth:`ask` for asyncio code."""
        async with self.stream(message) as gen:
            async for _ in gen:
                pass
            return gen.text


__all__ = ["WorkerChatSession"]
