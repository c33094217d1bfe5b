"""``POST /v1/chat/completions``: chat messages in, an assistant message (content, reasoning, tool calls) out."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import LlamaError
from . import params, sse
from .chat import ChatPlan
from .protocol import APIError, ChatCompletionRequest, parse_request
from .responses import gone, json_response
from .state import ServerState, finish_reason

if TYPE_CHECKING:
    from ..engine import EngineRequest

log = logging.getLogger("pyllama.server")


async def chat_completions(server: ServerState, request: Request) -> Response:
    engine = server.require_engine()
    req = parse_request(ChatCompletionRequest, await request.body())
    server.check_model(req.model)
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
    limit = params.max_tokens(req.max_completion_tokens, req.max_tokens)
    plan: ChatPlan = server.prompter.plan(req)
    sampler = params.sampler_specs(req, server.n_vocab, grammar=plan.grammar)
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    er = server.submit(engine, plan.prompt, max_tokens=limit, stop=[*req.stops(), *plan.stops], sampler=sampler,
                     logprobs=req.logprobs, top_logprobs=top, add_special=plan.add_special,
                     parse_special=True, ignore_eos=req.ignore_eos)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_chat_stream(server, er, rid, req.logprobs, plan, usage),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    evs = await server.collect(request, er)
    if evs is None:
        return gone()
    text = "".join(ev.text for ev in evs)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = finish_reason(er)
    if plan.parse is not None:
        message, finish = _parsed(server, plan, text, finish)
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    if req.logprobs:
        choice["logprobs"] = {"content": [server.chat_logprob(ev) for ev in evs if ev.token >= 0],
                              "refusal": None}
    return json_response({"id": rid, "object": "chat.completion", "created": int(time.time()),
                          "model": server.model_name, "choices": [choice], "usage": server.usage(er)})


def _parsed(server: ServerState, plan: ChatPlan, text: str, finish: str) -> tuple[dict[str, Any], str]:
    assert plan.parse is not None
    try:
        parsed = dict(plan.parse(text))
    except (LlamaError, ValueError) as exc:
        log.warning("could not parse the model's output as a chat message: %s", exc)
        return {"role": "assistant", "content": text}, finish
    message: dict[str, Any] = {"role": "assistant", "content": parsed.get("content") or None}
    if parsed.get("reasoning_content"):
        message["reasoning_content"] = parsed["reasoning_content"]
    calls = parsed.get("tool_calls") or []
    if calls:
        message["tool_calls"] = [
            {"id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["function"]["name"] if "function" in c else c["name"],
                          "arguments": (c["function"] if "function" in c else c).get("arguments", "{}")}}
            for c in calls]
        finish = "tool_calls"
    elif message["content"] is None:
        message["content"] = ""
    return message, finish


def _chat_stream(server: ServerState, er: EngineRequest, rid: str, logprobs: bool, plan: ChatPlan,
                 include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}

    def chunk(delta: dict[str, Any], finish: str | None = None, lps: list[dict[str, Any]] | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": lps, "refusal": None} if lps else None,
                  "finish_reason": finish}
        obj: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return sse.frame(obj)

    # With tools the output is parsed as a whole before it is sent (a tool call must not leak as content).
    buffered = plan.tools and plan.parse is not None
    parts: list[str] = []

    async def frames() -> AsyncGenerator[bytes, None]:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in server.events(er, keepalive=True):
            if ev is None:
                yield sse.KEEPALIVE
                continue
            if buffered:
                parts.append(ev.text)
                continue
            lps = [server.chat_logprob(ev)] if logprobs and ev.token >= 0 else None
            if ev.text or lps:
                yield chunk({"content": ev.text}, lps=lps)
        finish = finish_reason(er)
        if buffered:
            message, finish = _parsed(server, plan, "".join(parts), finish)
            delta: dict[str, Any] = {}
            if message.get("reasoning_content"):
                delta["reasoning_content"] = message["reasoning_content"]
            if message.get("content"):
                delta["content"] = message["content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
            if delta:
                yield chunk(delta)
        yield chunk({}, finish)

    return server.stream(er, rid, frames(), base if include_usage else None)
