"""``POST /v1/chat/completions``: chat messages in, an assistant message (content, reasoning, tool calls) out."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..samplers import Grammar
from . import params, sse
from .chat import ChatPlan, checked_grammar
from .chat_turn import Delta, MessageParser
from .native import native_result
from .protocol import APIError, ChatCompletionRequest, JsonSchemaFormat, ResponseFormat, parse_request
from .responses import gone, json_response
from .state import ServerState, finish_reason, interleave

from ..engine.request import PromptProgress

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest

@dataclass
class _Prepared:
    req: ChatCompletionRequest
    plan: ChatPlan
    limit: int | None
    sampler: Any
    top: int
    n: int
    settings: dict[str, Any]
    tokens: Any


def _prepare(server: ServerState, engine: Engine, body: bytes) -> _Prepared:
    """Everything before the engine sees the request (in a worker thread: a large body costs seconds)."""
    req = parse_request(ChatCompletionRequest, body)
    server.check_model(req.model)
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
    limit = params.max_tokens(req, "max_completion_tokens", "max_tokens", default=server.defaults.max_tokens)
    if req.json_schema is not None and req.response_format is None:  # llama-server's shortcut
        req.response_format = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(schema=req.json_schema))
    if req.grammar:
        params.check_grammar(req.grammar)
    plan: ChatPlan = server.prompter.plan(req)
    if req.grammar:
        if plan.grammar is not None:
            raise APIError(400, "grammar cannot be combined with response_format, json_schema or tools",
                           param="grammar")
        plan.grammar = checked_grammar(Grammar(req.grammar), engine.model, "grammar")
    sampler = params.sampler_specs(req, server.n_vocab, grammar=plan.grammar, defaults=server.defaults)
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    n = params.choices(req.n, engine.n_slots)  # n choices: n requests in parallel slots (they batch)
    settings = params.native_settings(req, server.defaults)
    tokens = server.chat_prompt(engine, plan)
    return _Prepared(req, plan, limit, sampler, top, n, settings, tokens)


async def chat_completions(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()
    p = await server.off_loop(_prepare, server, engine, await request.body())
    req, plan, top = p.req, p.plan, p.top
    ers = server.submit_n(engine, p.tokens, p.n, p.settings, max_tokens=p.limit,
                          stop=[*req.stops(), *plan.stops], sampler=p.sampler, logprobs=req.logprobs,
                          top_logprobs=top, ignore_eos=req.ignore_eos, progress=req.stream and req.return_progress,
                          lora=params.lora_scales(req.lora, len(engine.lora)))
    settings = p.settings
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_chat_stream(server, ers, rid, req.logprobs, plan, usage, req.timings_per_token),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    got = await server.collect_all(request, ers)
    if got is None:
        return gone()
    choices = []
    for i, (er, evs) in enumerate(zip(ers, got)):
        message, finish = _message(plan, "".join(ev.text for ev in evs), finish_reason(er))
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
        if req.logprobs:
            choice["logprobs"] = {"content": [server.chat_logprob(ev) for ev in evs if ev.token >= 0],
                                  "refusal": None}
        choices.append(choice)
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": server.model_name,
            "system_fingerprint": server.fingerprint, "choices": choices, "usage": server.usage_all(ers),
            "timings": server.timings(ers[0])}
    if req.verbose if req.verbose is not None else server.verbose:
        body["__verbose"] = native_result(server, engine, ers[0], got[0], settings)
    return json_response(body)


def _message(plan: ChatPlan, text: str, finish: str) -> tuple[dict[str, Any], str]:
    """The assistant message of a whole output, parsed as a stream's deltas add up."""
    reply = MessageParser(plan).whole(text)
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or (None if reply.tool_calls else "")}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
        finish = "tool_calls"
    return message, finish


def openai_delta(deltas: list[Delta]) -> dict[str, Any]:
    """The chunk ``delta`` of what a turn added: ``content``, ``reasoning_content``, and ``tool_calls`` entries
    keyed by ``index`` (``id``, ``type`` and the function's ``name`` once, then argument fragments)."""
    out: dict[str, Any] = {}
    for d in deltas:
        if d.kind == "content":
            out["content"] = out.get("content", "") + d.text
        elif d.kind == "reasoning":
            out["reasoning_content"] = out.get("reasoning_content", "") + d.text
        else:
            assert d.call is not None
            entry: dict[str, Any] = {"index": d.index, "function": {"arguments": d.text}}
            if d.opens:
                entry = {"index": d.index, "id": d.call.id, "type": "function",
                         "function": {"name": d.call.name, "arguments": d.text}}
            out.setdefault("tool_calls", []).append(entry)
    return out


def _chat_stream(server: ServerState, ers: list[EngineRequest], rid: str, logprobs: bool, plan: ChatPlan,
                 include_usage: bool, timings_per_token: bool = False) -> AsyncIterator[bytes]:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
            "system_fingerprint": server.fingerprint}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              lps: list[dict[str, Any]] | None = None, timings: dict[str, Any] | None = None) -> bytes:
        choice = {"index": index, "delta": delta,
                  "logprobs": {"content": lps, "refusal": None} if lps else None, "finish_reason": finish}
        obj: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        if timings is not None:
            obj["timings"] = timings  # llama-server's, on the last chunk
        return sse.frame(obj)

    async def frames(index: int, er: EngineRequest) -> AsyncGenerator[bytes, None]:
        # The output is parsed as it grows (llama-server's way): reasoning, content and each tool call's
        # name and argument fragments arrive as their own deltas; a tool call never leaks as content.
        message = MessageParser(plan)
        yield chunk(index, {"role": "assistant", "content": None})
        async for ev in server.events(er, keepalive=len(ers) == 1):
            if ev is None:
                yield sse.KEEPALIVE
                continue
            if isinstance(ev, PromptProgress):  # llama-server's return_progress: a chunk without choices
                progress: dict[str, Any] = {**base, "choices": [], "prompt_progress": ev.as_dict()}
                if timings_per_token:
                    progress["timings"] = server.progress_timings(ev)
                yield sse.frame(progress)
                continue
            lps = [server.chat_logprob(ev)] if logprobs and ev.token >= 0 else None
            delta = openai_delta(message.feed(ev.text))
            if delta or lps:
                yield chunk(index, delta, lps=lps, timings=server.timings(er) if timings_per_token else None)
        last = openai_delta(message.finish())
        if last:
            yield chunk(index, last)
        finish = "tool_calls" if message.reply.tool_calls else finish_reason(er)
        yield chunk(index, {}, finish, timings=server.timings(er))

    merged = frames(0, ers[0]) if len(ers) == 1 else interleave([frames(i, er) for i, er in enumerate(ers)])
    return server.stream(ers, rid, merged, base if include_usage else None)
