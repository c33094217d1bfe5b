"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API.

A translation, as llama-server's (tools/server/server-chat.cpp,
``server_chat_convert_anthropic_to_oai``): the request becomes a chat
completion request (``system`` a system message, content blocks messages,
``tool_use`` blocks assistant tool calls, ``tool_result`` blocks tool messages,
``tools`` with ``input_schema`` function tools) and runs as one
(:class:`~.chat_turn.ChatTurn`); the reply comes back as content blocks
(``thinking``, ``text``, ``tool_use``), streamed as Anthropic's events. Errors
have Anthropic's shape. Differences from llama-server: ``tool_choice``
``{"type": "tool", "name": ...}`` forces that tool (llama-server: any tool),
a client's stop string ends with ``stop_reason`` ``"stop_sequence"`` (as
Anthropic; llama-server says ``"end_turn"``), tool results come before the
user's text of the same message, and empty ``messages`` are a 400 (as
Anthropic and pyllama's chat completions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from typing import Annotated, Any, AsyncGenerator, Literal, Union

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..engine.request import PromptProgress
from . import params, sse
from .chat_turn import ChatTurn, Reply, prompt_tokens, sse_stream
from .errors import anthropic_error_body, anthropic_error_response, api_error
from .protocol import (APIError, ChatCompletionRequest, ChatMessage, FunctionDef, NamedFunction, NamedToolChoice,
                       TextPart, Tool, ToolCall, ToolCallFunction, _Request, parse_request, INT32_MAX,
                       ContentPart, ImageUrl, ImageUrlPart)
from .responses import gone, json_response
from .state import ServerState

log = logging.getLogger("pyllama.server")


# --- the wire format ------------------------------------------------------------------------------

class TextBlock(_Request):
    type: Literal["text"]
    text: str


class ImageBlock(_Request):
    type: Literal["image"]
    source: dict[str, Any] | None = None


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type")]], None] = None
    is_error: bool | None = None


class ThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[Union[TextBlock, ImageBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock,
                               RedactedThinkingBlock], Field(discriminator="type")]


class AnthropicMessage(_Request):
    role: Literal["user", "assistant"]
    content: Union[str, list[ContentBlock]]


class AnthropicTool(_Request):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(_Request):
    """Anthropic's request (``metadata``, ``thinking``, ``service_tier``, ... are accepted and ignored)."""

    model: str | None = None
    messages: list[AnthropicMessage]
    system: Union[str, list[TextBlock], None] = None
    max_tokens: int | None = None  # required by Anthropic; here (as llama-server) optional
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None


# --- Anthropic -> chat completion -----------------------------------------------------------------

def _image_part(block: ImageBlock, where: str) -> ImageUrlPart:
    """Anthropic's image block as the chat request's image part: base64 data becomes a data: URL (a URL
    source stays a URL, which the media reader refuses: nothing is fetched)."""
    src = block.source or {}
    kind = src.get("type")
    if kind == "base64" and isinstance(src.get("data"), str) and isinstance(src.get("media_type"), str):
        url = f"data:{src['media_type']};base64,{src['data']}"
    elif kind == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise APIError(400, "an image block needs a source of type base64 (media_type, data) or url",
                       param=f"{where}.source", code="invalid_value")
    return ImageUrlPart(type="image_url", image_url=ImageUrl(url=url))


def _no_images(where: str) -> APIError:
    return APIError(400, "image input is not supported by this server", param=where, code="unsupported")


def _result_text(block: ToolResultBlock, where: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    parts: list[str] = []
    for part in block.content:
        if isinstance(part, ImageBlock):
            raise _no_images(where)
        parts.append(part.text)
    return "".join(parts)


def _messages(req: MessagesRequest) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    if req.system is not None:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append(ChatMessage(role="system", content=system))
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append(ChatMessage(role=m.role, content=m.content))
            continue
        texts: list[ContentPart] = []
        calls: list[ToolCall] = []
        reasoning = ""
        for j, b in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(b, TextBlock):
                texts.append(TextPart(type="text", text=b.text))
            elif isinstance(b, ThinkingBlock):
                reasoning += b.thinking
            elif isinstance(b, ToolUseBlock):
                calls.append(ToolCall(id=b.id, function=ToolCallFunction(name=b.name, arguments=json.dumps(b.input))))
            elif isinstance(b, ToolResultBlock):
                # the results answer the previous assistant turn's calls: they come before this turn's text
                out.append(ChatMessage(role="tool", tool_call_id=b.tool_use_id, content=_result_text(b, where)))
            elif isinstance(b, ImageBlock):
                texts.append(_image_part(b, where))
        if texts or calls or reasoning:
            out.append(ChatMessage(role=m.role, content=texts, tool_calls=calls or None,
                                   reasoning_content=reasoning or None))
    return out


def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat completion request that Anthropic's ``req`` is."""
    if not req.messages:
        raise APIError(400, "messages: at least one message is required", param="messages",
                       code="invalid_messages")
    params.check_tool_count(len(req.tools or ()))
    tools = [Tool(type="function", function=FunctionDef(name=t.name, description=t.description,
                                                         parameters=t.input_schema))
             for t in req.tools or ()] or None
    choice: Any = None
    parallel = False
    if tools and req.tool_choice is not None:
        tc = req.tool_choice
        if tc.type == "tool":
            if not tc.name:
                raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice.name")
            choice = NamedToolChoice(type="function", function=NamedFunction(name=tc.name))
        else:
            choice = {"auto": "auto", "any": "required", "none": "none"}[tc.type]
        parallel = tc.disable_parallel_tool_use is False
    return ChatCompletionRequest(model=req.model, messages=_messages(req), max_tokens=req.max_tokens,
                                 stop=req.stop_sequences, temperature=req.temperature, top_p=req.top_p,
                                 top_k=req.top_k, tools=tools, tool_choice=choice, parallel_tool_calls=parallel)


# --- the reply as Anthropic's message -------------------------------------------------------------

def _stop_reason(reply: Reply) -> str:
    if reply.finish == "length":
        return "max_tokens"
    if reply.tool_calls:
        return "tool_use"
    return "stop_sequence" if reply.stop_sequence is not None else "end_turn"


def _input(arguments: str) -> Any:
    try:
        value = json.loads(arguments) if arguments else {}
    except (ValueError, RecursionError):
        return {}  # cut short by max_tokens (or nested past Python's parser)
    return value if isinstance(value, dict) else {}


def _usage(turn: ChatTurn) -> dict[str, int]:
    n_prompt, n_cached, n_generated = turn.usage()
    return {"input_tokens": n_prompt - n_cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": n_cached, "output_tokens": n_generated}


def _content(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.reasoning:
        blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
    if reply.content:
        blocks.append({"type": "text", "text": reply.content})
    for c in reply.tool_calls:
        blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c.arguments)})
    return blocks


def _message(server: ServerState, rid: str, turn: ChatTurn, reply: Reply | None) -> dict[str, Any]:
    return {"id": rid, "type": "message", "role": "assistant", "model": server.model_name,
            "content": _content(reply) if reply is not None else [],
            "stop_reason": _stop_reason(reply) if reply is not None else None,
            "stop_sequence": reply.stop_sequence if reply is not None else None,
            "usage": _usage(turn)}


def _stream(server: ServerState, turn: ChatTurn, rid: str) -> AsyncGenerator[bytes, None]:
    def ev(obj: dict[str, Any]) -> bytes:
        return sse.event(obj["type"], obj)

    async def frames() -> AsyncGenerator[bytes, None]:
        started = False
        block: tuple[str, int] | None = None  # the open content block: its kind and tool call
        index = -1

        def close() -> list[bytes]:
            if block is None:
                return []
            out: list[bytes] = []
            if block[0] == "reasoning":  # Anthropic's clients expect a signature before a thinking block ends
                out.append(ev({"type": "content_block_delta", "index": index,
                               "delta": {"type": "signature_delta", "signature": ""}}))
            return [*out, ev({"type": "content_block_stop", "index": index})]

        def start() -> list[bytes]:
            message = _message(server, rid, turn, None)
            message["usage"]["output_tokens"] = 0
            return [ev({"type": "message_start", "message": message}), ev({"type": "ping"})]

        async with contextlib.aclosing(turn.deltas()) as deltas:
            async for d in deltas:
                if d is None:
                    yield ev({"type": "ping"})  # keep-alive while the prompt is evaluated
                    continue
                if isinstance(d, PromptProgress):  # (not asked for: Anthropic's API has no such event)
                    continue
                if not started:
                    started = True
                    for f in start():
                        yield f
                key = (d.kind, d.index)
                if key != block:
                    for f in close():
                        yield f
                    block, index = key, index + 1
                    if d.kind == "reasoning":
                        cb: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
                    elif d.kind == "content":
                        cb = {"type": "text", "text": ""}
                    else:
                        assert d.call is not None
                        cb = {"type": "tool_use", "id": d.call.id, "name": d.call.name, "input": {}}
                    yield ev({"type": "content_block_start", "index": index, "content_block": cb})
                if not d.text:
                    continue
                if d.kind == "reasoning":
                    delta = {"type": "thinking_delta", "thinking": d.text}
                elif d.kind == "content":
                    delta = {"type": "text_delta", "text": d.text}
                else:
                    delta = {"type": "input_json_delta", "partial_json": d.text}
                yield ev({"type": "content_block_delta", "index": index, "delta": delta})
        if not started:
            for f in start():
                yield f
        for f in close():
            yield f
        reply = turn.result
        yield ev({"type": "message_delta",
                  "delta": {"stop_reason": _stop_reason(reply), "stop_sequence": reply.stop_sequence},
                  "usage": _usage(turn)})
        yield ev({"type": "message_stop"})

    return frames()


# --- the endpoints --------------------------------------------------------------------------------

async def messages(server: ServerState, request: Request) -> Response:
    try:
        req = parse_request(MessagesRequest, await request.body())
        turn = await ChatTurn.open(server, to_chat(req))
        rid = f"msg_{uuid.uuid4().hex[:24]}"
        if req.stream:
            body = sse_stream(_stream(server, turn, rid), rid,
                              lambda err: sse.event("error", anthropic_error_body(err)))
            return StreamingResponse(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        reply = await turn.reply(request)
        if reply is None:
            return gone()
        return json_response(_message(server, rid, turn, reply))
    except Exception as exc:  # noqa: BLE001 - every error in Anthropic's shape
        return _error(request, exc)


async def count_tokens(server: ServerState, request: Request) -> Response:
    try:
        req = parse_request(MessagesRequest, await request.body())
        return json_response({"input_tokens": await prompt_tokens(server, to_chat(req))})
    except Exception as exc:  # noqa: BLE001 - every error in Anthropic's shape
        return _error(request, exc)


def _error(request: Request, exc: Exception) -> Response:
    err = api_error(exc)
    if err.status >= 500 and not isinstance(exc, APIError):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return anthropic_error_response(err)


__all__ = ["MessagesRequest", "count_tokens", "messages", "to_chat"]
