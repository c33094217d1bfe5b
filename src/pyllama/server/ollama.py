"""Ollama's API on the same engine: generation here (``/api/chat``, ``/api/generate``, ``/api/embed``), the
models in :mod:`.ollama_models` (``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/pull``, ``/api/delete``,
``/api/copy``, ``/api/create``, ``/api/push``, ``/api/version``), for the clients that speak it (Open
WebUI, Continue, editors, the ``ollama`` Python and JS libraries).

A translation, not a second code path: ``/api/chat`` and ``/api/generate`` become a chat completion request
(``options`` the sampling fields, ``format`` a JSON-object or JSON-schema response format, ``think`` the
template's thinking switch, ``tools`` function tools) run as one :class:`~.chat_turn.ChatTurn`;
``raw`` prompts and ``suffix`` (fill in the middle) go to the engine as the native completion's do;
``/api/embed`` is the engine's embeddings; ``/api/pull`` and ``/api/delete`` are the model store. Answers
are Ollama's: NDJSON streams (``stream`` defaults to true), durations in nanoseconds, ``done_reason``,
errors as ``{"error": "..."}``. ``keep_alive`` frees the model after that long idle (``0``: at once, after
the request; an empty prompt or message list only loads or unloads), as Ollama; the next request loads it
again. Model names: this server serves one model and answers to any name for chat, generate and embed (as
llama-server does); ``/api/show`` knows its names; a name made by ``/api/copy`` or ``/api/create``
(:class:`Variant`) gives its requests that model's system prompt, default options and messages, as Ollama
does; ``/api/pull`` resolves a name through the store
(``hf:org/repo[:QUANT]``, a URL, ``starter``/``chat-starter``; an Ollama library name is a 404).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncGenerator, Literal, Mapping, Union

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import sse
from .chat_turn import ChatTurn, Reply, sse_stream
from .errors import api_error, ollama_error_response
from .protocol import (APIError, ChatCompletionRequest, ChatMessage, ContentPart, ImageUrl, ImageUrlPart,
                       JsonSchemaFormat, ResponseFormat, TextPart, Tool, ToolCall, ToolCallFunction, _Request,
                       parse_request)
from .responses import gone, json_response
from .state import ServerState

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest

log = logging.getLogger("pyllama.server")

NDJSON = "application/x-ndjson"


# --- the wire format ------------------------------------------------------------------------------

class OllamaToolCallFunction(_Request):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(_Request):
    function: OllamaToolCallFunction


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


_KeepAlive = Union[str, float, None]
_Format = Union[Literal["json", ""], dict[str, Any], None]


class _OllamaGeneration(_Request):
    """What ``/api/chat`` and ``/api/generate`` share: the model, sampling ``options``, ``format``,
    streaming, ``keep_alive`` and ``think``."""

    model: str
    format: _Format = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: _KeepAlive = None
    think: Union[bool, str, None] = None


class OllamaChatRequest(_OllamaGeneration):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None


class OllamaGenerateRequest(_OllamaGeneration):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaEmbedRequest(_Request):
    model: str
    input: Union[str, list[str]] = ""
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: _KeepAlive = None
    dimensions: int | None = None


class OllamaEmbeddingsRequest(_Request):
    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: _KeepAlive = None


# --- names made by /api/copy and /api/create -----------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A name ``/api/copy`` or ``/api/create`` made for a served model: the name it was made from, and what its
    requests get (Ollama's model ``system`` prompt, its ``parameters`` as default options, its ``messages``
    before a chat's, its ``license``). Kept while the server runs."""

    parent: str
    system: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[OllamaMessage, ...] = ()
    license: str | None = None


_VARIANTS: weakref.WeakKeyDictionary[ServerState, dict[str, Variant]] = weakref.WeakKeyDictionary()


def variants(server: ServerState) -> dict[str, Variant]:
    """The names made for ``server``'s model (by name)."""
    return _VARIANTS.setdefault(server, {})


def _options(variant: Variant | None, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request's options over its model's parameters (Ollama's precedence)."""
    if variant is None or not variant.options:
        return options
    return {**variant.options, **(options or {})}


# --- translation ----------------------------------------------------------------------------------

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: _KeepAlive) -> float | None:
    """Ollama's ``keep_alive``: a number of seconds or a Go duration ("5m", "1h30m", "-1"); negative: never
    unload. None: the server's own setting."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise APIError(400, "keep_alive must be a finite number of seconds or a duration", param="keep_alive")
        return _forever_past_a_year(float(value))
    text = str(value).strip()
    with contextlib.suppress(ValueError):
        number = float(text)
        if math.isfinite(number):
            return _forever_past_a_year(number)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise APIError(400, f"keep_alive: not a duration: {text!r} (e.g. 5m, 1h, 30s, -1)", param="keep_alive")
    return _forever_past_a_year(sum(float(n) * _UNIT_S[u] for n, u in parts))


def _forever_past_a_year(seconds: float) -> float:
    """Past a year (or not a finite sum) the model stays: -1, Ollama's "never"."""
    return seconds if math.isfinite(seconds) and seconds <= 365 * 86400 else -1.0


# Ollama's options -> the chat request's sampling fields (options a llama.cpp server has no use for, such as
# num_ctx or num_gpu, are fixed when the server starts: ignored here, as Ollama ignores unknown ones)
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "stop": "stop"}


def _sampling(options: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key in _OPTIONS and value is not None:
            out[_OPTIONS[key]] = value
        elif key == "num_predict" and value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise APIError(400, "options.num_predict must be an integer", param="options.num_predict")
            out["max_tokens"] = None if value < 0 else value
    return out


def _format(fmt: _Format) -> ResponseFormat | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return ResponseFormat(type="json_object")
    if isinstance(fmt, dict):
        return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="format", schema=fmt))
    raise APIError(400, 'format must be "json" or a JSON schema', param="format")


def _no_images(where: str) -> APIError:
    return APIError(400, "image input is not supported by this server", param=where, code="unsupported")


def _with_images(text: str, images: list[str] | None) -> str | list[ContentPart]:
    """A message's content with Ollama's ``images`` (base64 files) before its text, as Ollama places them."""
    if not images:
        return text
    parts: list[ContentPart] = [ImageUrlPart(type="image_url", image_url=ImageUrl(url=b64)) for b64 in images]
    if text:
        parts.append(TextPart(type="text", text=text))
    return parts


def _messages(msgs: list[OllamaMessage]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    for i, m in enumerate(msgs):
        if m.images and m.role == "tool":
            raise _no_images(f"messages.{i}.images")
        calls = [ToolCall(id=f"call_{i}_{j}", function=ToolCallFunction(name=c.function.name,
                                                                      arguments=json.dumps(c.function.arguments)))
                 for j, c in enumerate(m.tool_calls or ())] or None
        if m.role == "tool":
            out.append(ChatMessage(role="tool", content=m.content, name=m.tool_name))
        else:
            out.append(ChatMessage(role=m.role, content=_with_images(m.content, m.images), tool_calls=calls,
                                   reasoning_content=m.thinking or None))
    return out


def _chat_request(model: str, messages: list[ChatMessage], *, options: dict[str, Any] | None, fmt: _Format,
                  tools: list[Tool] | None, think: Union[bool, str, None]) -> ChatCompletionRequest:
    kwargs: dict[str, Any] = _sampling(options)
    if think is not None:  # the template's switch (llama.cpp's enable_thinking); "high"/"low": on
        kwargs["chat_template_kwargs"] = {"enable_thinking": think is not False and think != "false"}
    try:
        return ChatCompletionRequest(model=model, messages=messages, response_format=_format(fmt), tools=tools,
                                     **kwargs)
    except ValueError as exc:  # a sampling option of the wrong type or range
        raise APIError(400, f"options: {exc}", param="options") from None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _counts(server: ServerState, er: EngineRequest) -> dict[str, Any]:
    """Ollama's counters of a finished request (durations in nanoseconds)."""
    t = server.timings(er)
    end = er.t_done if er.t_done is not None else time.perf_counter()
    return {"total_duration": int((end - er.t_submit) * 1e9), "load_duration": 0,
            "prompt_eval_count": int(t["prompt_n"]), "prompt_eval_duration": int(t["prompt_ms"] * 1e6),
            "eval_count": er.n_generated, "eval_duration": int(t["predicted_ms"] * 1e6)}


def _calls(reply: Reply) -> list[dict[str, Any]]:
    out = []
    for c in reply.tool_calls:
        try:
            args = json.loads(c.arguments) if c.arguments else {}
        except (ValueError, RecursionError):
            args = {}  # cut short by num_predict
        out.append({"function": {"name": c.name, "arguments": args if isinstance(args, dict) else {}}})
    return out


def json_line(obj: dict[str, Any]) -> bytes:
    return sse.dumps(obj) + b"\n"


def ndjson(frames: AsyncGenerator[bytes, None], what: str) -> StreamingResponse:
    """An NDJSON body; a failure midway (the status line is gone) ends it with an ``{"error"}`` line."""
    return StreamingResponse(sse_stream(frames, what, lambda err: json_line({"error": err.message})), media_type=NDJSON)


def error_answer(request: Request, exc: Exception) -> Response:
    err = api_error(exc)
    if err.status >= 500 and not isinstance(exc, APIError):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return ollama_error_response(err)


async def _load_or_unload(server: ServerState, model: str, keep: float | None, key: str) -> Response:
    """An empty request: load the model (or, with ``keep_alive`` 0, free it), as Ollama answers it."""
    reason = "unload" if keep == 0 else "load"
    if reason == "load":
        await server.ensure_engine()
    _after(server, keep)
    return json_response({"model": model, "created_at": now_iso(), key: _empty(key), "done": True,
                          "done_reason": reason})


def _empty(key: str) -> Any:
    return {"role": "assistant", "content": ""} if key == "message" else ""


def _after(server: ServerState, keep: float | None) -> None:
    """What a request's ``keep_alive`` asks: 0 frees the model once nothing is being answered."""
    if keep == 0:
        server.request_unload()
    else:
        server.keep_alive(keep)


# --- chat and generate ---------------------------------------------------------------------------

async def chat(server: ServerState, request: Request) -> Response:
    try:
        req = parse_request(OllamaChatRequest, await request.body())
        keep = keep_alive_seconds(req.keep_alive)
        if not req.messages:
            return await _load_or_unload(server, req.model, keep, "message")
        await server.ensure_engine()
        variant = variants(server).get(req.model)
        msgs = req.messages
        if variant is not None:  # as Ollama: the model's messages first, its system prompt unless the chat has one
            msgs = [*variant.messages, *msgs]
            if variant.system and req.messages[0].role != "system":
                msgs.insert(0, OllamaMessage(role="system", content=variant.system))
        turn = await ChatTurn.open(server, _chat_request(req.model, _messages(msgs),
                                                         options=_options(variant, req.options), fmt=req.format,
                                                         tools=req.tools, think=req.think))
        return await _answer(server, request, turn, req.model, req.stream, keep, "message")
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def generate(server: ServerState, request: Request) -> Response:
    try:
        req = parse_request(OllamaGenerateRequest, await request.body())
        keep = keep_alive_seconds(req.keep_alive)
        if req.images and (req.raw or req.suffix is not None):
            raise APIError(400, "images go with a templated prompt, not with raw or suffix", param="images",
                           code="unsupported")
        if req.template:
            raise APIError(400, "template: a per-request template is not supported (the model's own is used)",
                           param="template", code="unsupported")
        if not req.prompt and not req.suffix and not req.images:
            return await _load_or_unload(server, req.model, keep, "response")
        engine = await server.ensure_engine()
        variant = variants(server).get(req.model)
        options = _options(variant, req.options)
        if req.raw or req.suffix is not None:
            er = await _submit_raw(server, engine, req, options)
            return await _answer_raw(server, request, er, req.model, req.stream, keep)
        # as Ollama: the request's system prompt, else the model's; then the model's messages, then the prompt
        system = req.system or (variant.system if variant is not None else None)
        messages = ([ChatMessage(role="system", content=system)] if system else []) + \
            (_messages(list(variant.messages)) if variant is not None and req.context is None else []) + \
            [ChatMessage(role="user", content=_with_images(req.prompt, req.images))]
        turn = await ChatTurn.open(server, _chat_request(req.model, messages, options=options, fmt=req.format,
                                                         tools=None, think=req.think))
        return await _answer(server, request, turn, req.model, req.stream, keep, "response")
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def _answer(server: ServerState, request: Request, turn: ChatTurn, model: str, stream: bool,
                  keep: float | None, key: Literal["message", "response"]) -> Response:
    """A chat turn's answer: ``message`` objects (``/api/chat``) or ``response`` text (``/api/generate``)."""
    def piece(content: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if key == "message":
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            return {"message": msg}
        out: dict[str, Any] = {"response": content}
        if thinking:
            out["thinking"] = thinking
        return out

    def last(reply: Reply) -> dict[str, Any]:
        return {"model": model, "created_at": now_iso(), **piece(), "done": True,
                "done_reason": "length" if reply.finish == "length" else "stop", **_counts(server, turn.er)}

    if not stream:
        reply = await turn.reply(request)
        _after(server, keep)
        if reply is None:
            return gone()
        whole = {"model": model, "created_at": now_iso(),
                 **piece(reply.content, reply.reasoning, _calls(reply) or None), "done": True}
        return json_response({**whole, "done_reason": last(reply)["done_reason"], **_counts(server, turn.er)})

    async def frames() -> AsyncGenerator[bytes, None]:
        try:
            async for d in turn.deltas():
                if d is None or not hasattr(d, "kind"):
                    continue  # keep-alive ticks and prompt progress: NDJSON has no place for them
                if d.kind == "content" and d.text:
                    yield json_line({"model": model, "created_at": now_iso(), **piece(d.text), "done": False})
                elif d.kind == "reasoning" and d.text:
                    yield json_line({"model": model, "created_at": now_iso(), **piece(thinking=d.text), "done": False})
            calls = _calls(turn.result)  # whole calls, as Ollama sends them, once the output is complete
            if calls:
                yield json_line({"model": model, "created_at": now_iso(), **piece(calls=calls), "done": False})
            yield json_line(last(turn.result))
        finally:
            _after(server, keep)

    return ndjson(frames(), "chat" if key == "message" else "generate")


async def _submit_raw(server: ServerState, engine: Engine, req: OllamaGenerateRequest,
                      options: dict[str, Any] | None) -> EngineRequest:
    """A ``raw`` prompt as it is, or ``suffix``: the fill-in-the-middle prompt (models with FIM tokens)."""
    from ..infill import infill_support, infill_tokens
    from . import params

    opts = _chat_request(req.model, [ChatMessage(role="user", content="")], options=options, fmt=req.format,
                         tools=None, think=None)
    schema = opts.response_format.schema_or_none() if opts.response_format is not None else None

    def prepare() -> tuple[Any, Any, int | None]:
        from .chat import schema_grammar

        grammar = schema_grammar(schema, engine.model, "format") if schema is not None else None
        sampler = params.sampler_specs(opts, server.n_vocab, grammar=grammar, defaults=server.defaults)
        limit = params.max_tokens(opts, default=server.defaults.max_tokens)
        if req.suffix is not None:
            why = infill_support(engine.model)
            if why is not None:
                raise APIError(400, f"this model does not support insert (suffix): {why.strip()}", param="suffix",
                               code="unsupported")
            return infill_tokens(engine.model, req.prompt, req.suffix, n_batch=engine.n_batch,
                                 n_ctx=engine.n_ctx_slot, n_predict=-1 if limit is None else limit), sampler, limit
        return server.prompt_ids(engine, req.prompt, add_special=True, parse_special=True), sampler, limit

    tokens, sampler, limit = await server.off_loop(prepare)
    return server.submit(engine, tokens, max_tokens=limit, stop=opts.stops(), sampler=sampler,
                         add_special=False, parse_special=False)


async def _answer_raw(server: ServerState, request: Request, er: EngineRequest, model: str, stream: bool,
                      keep: float | None) -> Response:
    def last() -> dict[str, Any]:
        reason = "length" if er.finish_reason in ("length", "context") else "stop"
        return {"model": model, "created_at": now_iso(), "response": "", "done": True, "done_reason": reason,
                **_counts(server, er)}

    if not stream:
        evs = await server.collect(request, er)
        _after(server, keep)
        if evs is None:
            return gone()
        return json_response({**last(), "response": "".join(ev.text for ev in evs)})

    async def frames() -> AsyncGenerator[bytes, None]:
        try:
            async for ev in server.events(er, keepalive=False):
                if ev is not None and ev.text:
                    yield json_line({"model": model, "created_at": now_iso(), "response": ev.text, "done": False})
            yield json_line(last())
        finally:
            _after(server, keep)

    return ndjson(frames(), "generate")


# --- embeddings ---------------------------------------------------------------------------------------

async def embed(server: ServerState, request: Request) -> Response:
    """``/api/embed``: L2-normalised vectors of each input, as Ollama gives them."""
    try:
        req = parse_request(OllamaEmbedRequest, await request.body())
        keep = keep_alive_seconds(req.keep_alive)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or (len(texts) == 1 and texts[0] == ""):
            return await _load_or_unload_embed(server, req.model, keep)
        engine = await server.ensure_engine()
        t0 = time.perf_counter()
        vectors = await engine.aembed(texts, normalize=True)
        if req.dimensions is not None:
            if not 0 < req.dimensions <= vectors.shape[1]:
                raise APIError(400, f"dimensions must be in [1, {vectors.shape[1]}]", param="dimensions")
            vectors = vectors[:, :req.dimensions]
            vectors = vectors / (((vectors ** 2).sum(axis=1, keepdims=True)) ** 0.5 + 1e-12)
        n_tokens = sum(int(engine.tokenize(t).size) for t in texts)
        _after(server, keep)
        return json_response({"model": req.model, "embeddings": vectors.tolist(),
                      "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                      "prompt_eval_count": n_tokens})
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def _load_or_unload_embed(server: ServerState, model: str, keep: float | None) -> Response:
    if keep != 0:
        await server.ensure_engine()
    _after(server, keep)
    return json_response({"model": model, "embeddings": []})


async def embeddings(server: ServerState, request: Request) -> Response:
    """``/api/embeddings`` (Ollama's older route): one vector, not normalised."""
    try:
        req = parse_request(OllamaEmbeddingsRequest, await request.body())
        keep = keep_alive_seconds(req.keep_alive)
        if not req.prompt:
            await _load_or_unload_embed(server, req.model, keep)
            return json_response({"embedding": []})
        engine = await server.ensure_engine()
        vectors = await engine.aembed([req.prompt], normalize=False)
        _after(server, keep)
        return json_response({"embedding": vectors[0].tolist()})
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


__all__ = ["chat", "generate", "embed", "embeddings", "keep_alive_seconds", "error_answer", "ndjson", "json_line",
           "now_iso", "NDJSON", "Variant", "variants", "OllamaMessage"]
