"""``POST /v1/responses`` (and ``/v1/responses/input_tokens``): OpenAI's Responses API.

A translation, as llama-server's (tools/server/server-chat.cpp,
``server_chat_convert_responses_to_chatcmpl``): ``instructions`` become a system
message, ``input`` (a string, or items: messages with ``input_text`` /
``output_text`` content, ``function_call``, ``function_call_output`` and
``reasoning`` items; consecutive assistant items make one assistant message)
the chat messages, function ``tools`` chat tools (other tool types are skipped,
as llama-server does), ``text.format`` a ``response_format``,
``max_output_tokens`` ``max_tokens``; the request runs as a chat completion
(:class:`~.chat_turn.ChatTurn`). The reply is a ``response`` object with
``reasoning``, ``message`` and ``function_call`` output items, streamed as the
Responses events. Errors keep OpenAI's shape. As llama-server, a stream ends
with ``response.completed`` (a reply cut by ``max_output_tokens`` has status
``"incomplete"`` there) and ``previous_response_id`` is refused: nothing is stored.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Annotated, Any, AsyncGenerator, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..engine.request import PromptProgress
from . import params, sse
from .chat_turn import ChatTurn, Reply, prompt_tokens, sse_stream
from .protocol import (APIError, ChatCompletionRequest, ChatMessage, FunctionDef, NamedFunction, NamedToolChoice,
                       ResponseFormat, TextPart, Tool, ToolCall, ToolCallFunction, _Request, parse_request, INT32_MAX,
                       ImageUrl, ImageUrlPart)
from .protocol import ContentPart as ChatContentPart
from .responses import gone, json_response
from .state import ServerState

log = logging.getLogger("pyllama.server")


# --- the wire format ------------------------------------------------------------------------------

class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: str


class Refusal(_Request):
    type: Literal["refusal"]
    refusal: str


class InputMedia(_Request):
    type: Literal["input_image", "input_file", "input_audio"]
    image_url: str | None = None  # input_image: a data: URL (file_id is not served)


ContentPart = Annotated[Union[InputText, Refusal, InputMedia], Field(discriminator="type")]


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[ContentPart]]


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[ContentPart]]


class ReasoningText(_Request):
    text: str


class ReasoningItem(_Request):
    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return str(kind)


InputItem = Annotated[Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
                            Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                            Annotated[ReasoningItem, Tag("reasoning")]], Discriminator(_item_type)]


class FunctionTool(_Request):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class TextOptions(_Request):
    format: TextFormat | None = None


class ResponsesRequest(_Request):
    """The Responses request (``store``, ``metadata``, ``reasoning``, ``truncation``, ... are accepted and
    ignored); ``top_k``, ``min_p`` and ``seed`` are llama-server's extensions."""

    model: str | None = None
    input: Union[str, list[InputItem]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    previous_response_id: str | None = None
    stream: bool = False
    timings_per_token: bool = False  # llama-server's: timings on each text delta and on response.completed
    return_progress: bool = False  # llama-server's: response.in_progress events with prompt_progress


# --- Responses -> chat completion -----------------------------------------------------------------

def _text(content: str | list[Any], where: str) -> list[ChatContentPart]:
    if isinstance(content, str):
        return [TextPart(type="text", text=content)]
    parts: list[ChatContentPart] = []
    for j, part in enumerate(content):
        if isinstance(part, InputMedia):
            if part.type == "input_image" and part.image_url is not None:
                parts.append(ImageUrlPart(type="image_url", image_url=ImageUrl(url=part.image_url)))
                continue
            raise APIError(400, f"{part.type} is not supported by this server (input_image takes an image_url)",
                           param=f"{where}.{j}", code="unsupported")
        parts.append(TextPart(type="text", text=part.text if isinstance(part, InputText) else part.refusal))
    return parts


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    if req.instructions is not None:
        out.append(ChatMessage(role="system", content=req.instructions))
    if isinstance(req.input, str):
        return [*out, ChatMessage(role="user", content=req.input)]

    def assistant() -> ChatMessage:
        # the output items of one reply (reasoning, message, function calls) are one assistant message
        if not out or out[-1].role != "assistant":
            out.append(ChatMessage(role="assistant", content=[]))
        return out[-1]

    for i, item in enumerate(req.input):
        where = f"input.{i}"
        if isinstance(item, MessageItem):
            parts = _text(item.content, f"{where}.content")
            if item.role == "assistant":
                msg = assistant()
                assert isinstance(msg.content, list)
                msg.content.extend(parts)
            else:
                out.append(ChatMessage(role=item.role, content=parts))
        elif isinstance(item, FunctionCallItem):
            msg = assistant()
            call = ToolCall(id=item.call_id, function=ToolCallFunction(name=item.name, arguments=item.arguments))
            msg.tool_calls = [*(msg.tool_calls or ()), call]
        elif isinstance(item, FunctionCallOutputItem):
            out.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                   content=_text(item.output, f"{where}.output")))
        else:
            text = "".join(p.text for p in item.content or item.summary)
            if text:
                msg = assistant()
                msg.reasoning_content = (msg.reasoning_content or "") + text
    return out


def _tools(req: ResponsesRequest) -> list[Tool] | None:
    params.check_tool_count(len(req.tools or ()))  # before each is validated
    tools: list[Tool] = []
    for i, raw in enumerate(req.tools or ()):
        if raw.get("type") != "function":
            log.warning("/v1/responses: tool type %r has no chat equivalent: skipped", raw.get("type"))
            continue
        try:
            t = FunctionTool.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = ".".join(str(x) for x in ("tools", i, *err["loc"]))
            raise APIError(400, f"invalid request: {loc}: {err['msg']}", param=loc) from None
        tools.append(Tool(type="function", function=FunctionDef(name=t.name, description=t.description,
                                                                parameters=t.parameters, strict=t.strict)))
    return tools or None


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that the Responses request ``req`` is."""
    if req.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                       "conversation in input", param="previous_response_id", code="unsupported")
    messages = _messages(req)
    if not messages:
        raise APIError(400, "input must not be empty", param="input", code="invalid_messages")
    fmt = req.text.format if req.text is not None else None
    response_format = None
    if fmt is not None and fmt.type != "text":
        response_format = ResponseFormat.model_validate(
            {"type": fmt.type, "schema": fmt.schema_} if fmt.type == "json_object" else
            {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}})
    choice: Any = req.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    return ChatCompletionRequest(model=req.model, messages=messages, max_tokens=req.max_output_tokens,
                                 temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                 seed=req.seed, tools=_tools(req), tool_choice=choice,
                                 parallel_tool_calls=req.parallel_tool_calls, response_format=response_format,
                                 return_progress=req.stream and req.return_progress)


# --- the reply as a response object ---------------------------------------------------------------

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(turn: ChatTurn) -> dict[str, Any]:
    n_prompt, n_cached, n_generated = turn.usage()
    return {"input_tokens": n_prompt, "input_tokens_details": {"cached_tokens": n_cached},
            "output_tokens": n_generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_prompt + n_generated}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(rid: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"id": rid, "type": "reasoning", "summary": [], "content": content, "encrypted_content": None,
            "status": status}


def _message_item(mid: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    return {"id": mid, "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text)] if text is not None else []}


def _call_item(fid: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": fid, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _output(reply: Reply) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if reply.reasoning:
        out.append(_reasoning_item(_id("rs"), reply.reasoning))
    if reply.content:
        out.append(_message_item(_id("msg"), reply.content))
    out += [_call_item(_id("fc"), c.id, c.name, c.arguments) for c in reply.tool_calls]
    return out


def _response(server: ServerState, rid: str, req: ResponsesRequest, created: int, output: list[dict[str, Any]],
              turn: ChatTurn, reply: Reply | None) -> dict[str, Any]:
    tools = [{"type": "function", **t.function.model_dump(exclude_none=True)}
             for t in turn.req.tools or ()]
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, FunctionChoice) else req.tool_choice
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    status = "in_progress" if reply is None else ("incomplete" if reply.finish == "length" else "completed")
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "completed_at": int(time.time()) if reply is not None else None, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": server.model_name,
        "output": output, "parallel_tool_calls": bool(req.parallel_tool_calls), "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": req.temperature,
        "top_p": req.top_p, "text": {"format": fmt or {"type": "text"}}, "tool_choice": choice or "auto",
        "tools": tools, "truncation": "disabled", "usage": _usage(turn) if reply is not None else None,
        "metadata": {},
    }


class _Item:
    """An output item being streamed: its ``output_index`` and what it has gathered so far."""

    def __init__(self, index: int, key: tuple[str, int], item: dict[str, Any]) -> None:
        self.index = index
        self.key = key
        self.item = item
        self.text = ""


def _stream(server: ServerState, turn: ChatTurn, req: ResponsesRequest, rid: str,
            created: int) -> AsyncGenerator[bytes, None]:
    seq = 0

    def ev(obj: dict[str, Any]) -> bytes:
        nonlocal seq
        obj["sequence_number"] = seq
        seq += 1
        return sse.event(obj["type"], obj)

    def opened(it: _Item) -> list[bytes]:
        out = [ev({"type": "response.output_item.added", "output_index": it.index, "item": it.item})]
        if it.key[0] == "content":
            out.append(ev({"type": "response.content_part.added", "item_id": it.item["id"],
                           "output_index": it.index, "content_index": 0, "part": _text_part("")}))
        return out

    def delta(it: _Item, text: str) -> bytes:
        it.text += text
        kind = it.key[0]
        where = {"item_id": it.item["id"], "output_index": it.index}
        if kind == "content":
            obj = {"type": "response.output_text.delta", **where, "content_index": 0, "delta": text, "logprobs": []}
            if req.timings_per_token:
                obj["timings"] = server.timings(turn.er)
            return ev(obj)
        if kind == "reasoning":
            return ev({"type": "response.reasoning_text.delta", **where, "content_index": 0, "delta": text})
        return ev({"type": "response.function_call_arguments.delta", **where, "delta": text})

    def closed(it: _Item) -> tuple[list[bytes], dict[str, Any]]:
        kind, item, where = it.key[0], it.item, {"item_id": it.item["id"], "output_index": it.index}
        out: list[bytes] = []
        if kind == "content":
            done = _message_item(item["id"], it.text)
            out += [ev({"type": "response.output_text.done", **where, "content_index": 0, "text": it.text,
                        "logprobs": []}),
                    ev({"type": "response.content_part.done", **where, "content_index": 0,
                        "part": _text_part(it.text)})]
        elif kind == "reasoning":
            done = _reasoning_item(item["id"], it.text)
            out.append(ev({"type": "response.reasoning_text.done", **where, "content_index": 0, "text": it.text}))
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], it.text)
            out.append(ev({"type": "response.function_call_arguments.done", **where, "name": item["name"],
                           "arguments": it.text}))
        out.append(ev({"type": "response.output_item.done", "output_index": it.index, "item": done}))
        return out, done

    async def frames() -> AsyncGenerator[bytes, None]:
        start = _response(server, rid, req, created, [], turn, None)
        yield ev({"type": "response.created", "response": start})
        yield ev({"type": "response.in_progress", "response": start})
        output: list[dict[str, Any]] = []
        current: _Item | None = None
        async with contextlib.aclosing(turn.deltas()) as deltas:
            async for d in deltas:
                if d is None:
                    yield sse.KEEPALIVE
                    continue
                if isinstance(d, PromptProgress):
                    yield ev({"type": "response.in_progress", "response": start, "prompt_progress": d.as_dict()})
                    continue
                key = (d.kind, d.index)
                if current is None or current.key != key:
                    if current is not None:
                        evs, done = closed(current)
                        output.append(done)
                        for f in evs:
                            yield f
                    if d.kind == "content":
                        item = _message_item(_id("msg"), None, "in_progress")
                    elif d.kind == "reasoning":
                        item = _reasoning_item(_id("rs"), "", "in_progress")
                    else:
                        assert d.call is not None
                        item = _call_item(_id("fc"), d.call.id, d.call.name, "", "in_progress")
                    current = _Item(len(output), key, item)
                    for f in opened(current):
                        yield f
                if d.text:
                    yield delta(current, d.text)
        if current is not None:
            evs, done = closed(current)
            output.append(done)
            for f in evs:
                yield f
        final = _response(server, rid, req, created, output, turn, turn.result)
        done = {"type": "response.completed", "response": final}
        if req.timings_per_token:
            done["timings"] = server.timings(turn.er)
        yield ev(done)

    return frames()


# --- the endpoints --------------------------------------------------------------------------------

async def responses(server: ServerState, request: Request) -> Response:
    req = parse_request(ResponsesRequest, await request.body())
    turn = await ChatTurn.open(server, to_chat(req))
    rid, created = _id("resp"), int(time.time())
    if req.stream:
        body = sse_stream(_stream(server, turn, req, rid, created), rid,
                          lambda err: sse.event("error", {"type": "error", **err.body()}))
        return StreamingResponse(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    reply = await turn.reply(request)
    if reply is None:
        return gone()
    return json_response(_response(server, rid, req, created, _output(reply), turn, reply))


async def input_tokens(server: ServerState, request: Request) -> Response:
    req = parse_request(ResponsesRequest, await request.body())
    return json_response({"object": "response.input_tokens", "input_tokens": await prompt_tokens(server, to_chat(req))})


__all__ = ["ResponsesRequest", "input_tokens", "responses", "to_chat"]
