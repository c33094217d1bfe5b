"""An assistant turn's output as a message, parsed as it grows (:class:`MessageParser`: every chat API's
streams use it), and one whole turn for the chat APIs that are not OpenAI's chat completions (Anthropic
Messages, OpenAI Responses): their request translated to a :class:`~.protocol.ChatCompletionRequest` runs
here.

The request goes the chat-completions way: rendered by the same
:class:`~.chat.ChatPrompter` (llama.cpp's common/chat: template, tool grammar,
output parser), sampled through :func:`.params.sampler_specs` with the server's
defaults, submitted by :meth:`~.state.ServerState.submit`. What comes back is
the assistant message as a :class:`Reply` (content, reasoning, tool calls) or,
streamed, as :class:`Delta` s: the output is parsed as it grows (llama.cpp's
partial parsing, as llama-server streams a message) and only what is new is
sent, so a tool call never leaks as text and its arguments arrive in fragments.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Callable, Literal, cast

from starlette.requests import Request

from ..engine.request import PromptProgress
from ..errors import LlamaError
from ..media import media_parts
from . import params
from .chat import ChatPlan
from .errors import api_error
from .protocol import APIError, ChatCompletionRequest
from .state import ServerState, finish_reason

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest
    from ..stream import TokenEvent

log = logging.getLogger("pyllama.server")


@dataclass
class ToolCallOut:
    """A tool call of the reply: ``arguments`` is JSON text (may be cut short by ``max_tokens``)."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class Reply:
    """The assistant's message and how the turn ended.

    ``finish`` is "stop" (end of turn or a stop string) or "length" (``max_tokens``
    or the context); ``stop_sequence`` the client's stop string that ended it.
    """

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    finish: Literal["stop", "length"] = "stop"
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Delta:
    """What a streamed turn added: ``text`` of the content or the reasoning, or a fragment of the
    arguments of tool call ``index`` (``call``: that call, with its id and name; ``opens``: the call's first
    delta)."""

    kind: Literal["content", "reasoning", "tool_call"]
    text: str = ""
    index: int = 0
    call: ToolCallOut | None = None
    opens: bool = False


class _Differ:
    """The message parsed so far, and what each newer parse adds (llama.cpp's common_chat_msg_diff).

    A tool call keeps the id it was first seen with (the parser invents a fresh one
    for a call the model gave none). Text a later parse no longer extends (the
    partial parser changed its mind) is not sent again; the reply keeps what was sent.
    """

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def update(self, msg: dict[str, Any]) -> list[Delta]:
        out: list[Delta] = []
        r = self.reply
        for kind, key in (("reasoning", "reasoning_content"), ("content", "content")):
            new = msg.get(key) or ""
            old = r.reasoning if kind == "reasoning" else r.content
            if len(new) > len(old) and new.startswith(old):
                if kind == "reasoning":
                    r.reasoning = new
                else:
                    r.content = new
                out.append(Delta(cast(Literal["content", "reasoning"], kind), new[len(old):]))
        for i, c in enumerate(msg.get("tool_calls") or ()):
            fn = c.get("function", c)
            name, args = str(fn.get("name") or ""), str(fn.get("arguments") or "")
            if i == len(r.tool_calls):
                if not name:
                    break  # not named yet: wait for more text
                call = ToolCallOut(id=str(c.get("id") or f"call_{uuid.uuid4().hex[:24]}"), name=name,
                                   arguments=args)
                r.tool_calls.append(call)
                out.append(Delta("tool_call", args, i, call, opens=True))
            elif i < len(r.tool_calls):
                call = r.tool_calls[i]
                if len(args) > len(call.arguments) and args.startswith(call.arguments):
                    out.append(Delta("tool_call", args[len(call.arguments):], i, call))
                    call.arguments = args
        return out


class MessageParser:
    """One turn's output parsed as it grows, by the chat format's own parser (llama.cpp's partial parsing,
    as llama-server streams a message): :meth:`feed` each piece of text, then :meth:`finish`; each returns
    the :class:`Delta` s that are new. :attr:`reply` is the message so far. Without a parser (the legacy
    template path) the text is the content."""

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self.reply = Reply()
        self.text = ""
        self._differ = _Differ(self.reply)

    def _parse(self, *, partial: bool) -> dict[str, Any] | None:
        assert self.plan.parse is not None
        parse = cast(Callable[..., dict[str, Any]], self.plan.parse)  # ChatPrompt.parse(text, partial=...)
        try:
            return dict(parse(self.text, partial=partial))
        except (LlamaError, ValueError) as exc:
            if not partial:
                log.warning("could not parse the model's output as a chat message: %s", exc)
            return None

    def feed(self, piece: str) -> list[Delta]:
        if not piece:
            return []
        self.text += piece
        if self.plan.parse is None:
            self.reply.content = self.text
            return [Delta("content", piece)]
        msg = self._parse(partial=True)
        return self._differ.update(msg) if msg is not None else []

    def whole(self, text: str) -> Reply:
        """The message of a whole output (nothing streamed)."""
        self.text = text
        if self.plan.parse is None:
            self.reply.content = text
        self.finish()
        return self.reply

    def finish(self) -> list[Delta]:
        """The last deltas: from parsing the whole output."""
        if self.plan.parse is None:
            return []
        msg = self._parse(partial=False)
        if msg is None and not self.reply.tool_calls and self.text.startswith(self.reply.content):
            msg = {"content": self.text}  # not the format's shape: the text is the content
        return self._differ.update(msg) if msg is not None else []


class ChatTurn:
    """A translated chat request, submitted: consume it with :meth:`reply` or :meth:`deltas` (then
    :attr:`result`). Bad parameters, a prompt too long or a full queue raise :class:`APIError` here."""

    def __init__(self, server: ServerState, req: ChatCompletionRequest, engine: Engine, plan: ChatPlan,
                 tokens: Any, limit: int | None, sampler: Any) -> None:
        self.server = server
        self.req = req
        self.plan = plan
        self.user_stops = req.stops()
        self.er: EngineRequest = server.submit(engine, tokens, max_tokens=limit,
                                               stop=[*self.user_stops, *plan.stops], sampler=sampler,
                                               progress=req.return_progress)
        self.message = MessageParser(plan)
        self.result = self.message.reply

    @classmethod
    async def open(cls, server: ServerState, req: ChatCompletionRequest) -> ChatTurn:
        """Render, tokenize and check the request off the event loop, then submit it."""
        engine = await server.ensure_engine()

        def prepare() -> tuple[ChatPlan, Any, int | None, Any]:
            server.check_model(req.model)
            limit = params.max_tokens(req, "max_completion_tokens", "max_tokens",
                                      default=server.defaults.max_tokens)
            plan: ChatPlan = server.prompter.plan(req)
            sampler = params.sampler_specs(req, server.n_vocab, grammar=plan.grammar, defaults=server.defaults)
            tokens = server.chat_prompt(engine, plan)
            return plan, tokens, limit, sampler

        plan, tokens, limit, sampler = await server.off_loop(prepare)
        return cls(server, req, engine, plan, tokens, limit, sampler)

    def _finish(self) -> list[Delta]:
        """The last deltas and the reply's end."""
        out = self.message.finish()
        self.result.finish = "length" if finish_reason(self.er) == "length" else "stop"
        self.result.stop_sequence = self._matched_stop()
        return out

    def _matched_stop(self) -> str | None:
        """The client's stop string that ended the turn (None: end of turn, a template stop, a limit)."""
        if self.er.finish_reason != "stop" or not self.user_stops or self.server.engine is None:
            return None
        full = self.server.engine.detokenize(self.er.tokens)  # the emitted text, the stop string and beyond
        hits = [(i + len(s), i, s) for s in self.user_stops if (i := full.find(s)) >= 0]
        return min(hits)[2] if hits else None  # the first to complete, as the stop matcher decides

    # --- consuming it ---------------------------------------------------------------------------
    async def reply(self, request: Request) -> Reply | None:
        """The whole reply (None: the client went away, which cancelled the request)."""
        evs = await self.server.collect(request, self.er)
        if evs is None:
            return None
        self.message.text = "".join(ev.text for ev in evs)
        if self.plan.parse is None:
            self.result.content = self.message.text
        self._finish()
        return self.result

    async def deltas(self) -> AsyncGenerator[Delta | PromptProgress | None, None]:
        """The reply as it grows; ``None`` is a keep-alive tick (before the first token), a
        :class:`~pyllama.engine.PromptProgress` the prompt's progress (when the request asked for it). When
        it is exhausted, :attr:`result` holds the whole reply."""
        events = cast("AsyncGenerator[TokenEvent | None, None]", self.server.events(self.er, keepalive=True))
        async with contextlib.aclosing(events):
            async for ev in events:  # closed at once when the client goes away: that cancels the request
                if ev is None:
                    yield None
                    continue
                if isinstance(ev, PromptProgress):
                    yield ev
                    continue
                for d in self.message.feed(ev.text):
                    yield d
        for d in self._finish():
            yield d

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, of which from the cache, generated tokens)."""
        return self.er.n_prompt, self.er.n_cached, self.er.n_generated


async def prompt_tokens(server: ServerState, req: ChatCompletionRequest) -> int:
    """How many tokens the request's rendered prompt is (nothing is generated; counted off the event loop)."""
    engine = await server.ensure_engine()

    def count() -> int:
        server.check_model(req.model)
        plan = server.prompter.plan(req)
        if plan.media:  # the projector's layout of the media (placeholders count as the positions they take)
            try:
                return int(engine.prompt_tokens(media_parts(plan.prompt, plan.media), plan.add_special, True).size)
            except Exception as exc:  # noqa: BLE001 - a 4xx
                raise api_error(exc) from None
        return int(server.prompt_ids(engine, plan.prompt, add_special=plan.add_special, parse_special=True).size)
    return await server.off_loop(count)


async def sse_stream(frames: AsyncGenerator[bytes, None], rid: str,
                     error_frame: Callable[[APIError], bytes]) -> AsyncIterator[bytes]:
    """An SSE body: ``frames``, or where they fail midway (the status line is gone) ``error_frame``."""
    try:
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame
    except Exception as exc:  # noqa: BLE001 - reported in-band
        err = api_error(exc)
        log.warning("stream %s failed: %s", rid, err.message)
        yield error_frame(err)


__all__ = ["ChatTurn", "Delta", "MessageParser", "Reply", "ToolCallOut", "prompt_tokens", "sse_stream"]
