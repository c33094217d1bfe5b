"""The OpenAI-compatible ASGI application over a :class:`pyllama.engine.Engine`.

``create_app(engine)`` returns a Starlette app that can be served by uvicorn
(``pyllama serve``) or mounted inside any other ASGI app. Each endpoint is a
small async function: it validates the request, submits it to the engine
(which raises at once on a bad prompt, a full queue or bad parameters: a 4xx
or 503 before any byte is streamed) and consumes the engine request with
``async for``. A client that goes away cancels its request, which frees the
slot within one engine step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Union, cast

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ClosedError, ContextOverflowError, LlamaError, SamplerError, TemplateError, TokenizationError
from ..stream import TokenEvent
from . import params, sse
from .chat import ChatPlan, ChatPrompter, schema_grammar
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    error_body,
    parse_request,
)

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest

log = logging.getLogger("pyllama.server")

EngineSource = Union["Engine", Callable[[], "Engine"]]

_FINISH = {"eog": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
              "/tokenize", "/detokenize")


# Answer to a client that disconnected before its non-streamed result was ready (nobody reads it;
# 499 is the conventional "client closed request" code, so the request counter shows it).
def _gone() -> Response:
    return Response(status_code=499)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(sse.dumps(obj), status_code=status, headers=headers, media_type="application/json")


def _error_response(err: APIError) -> Response:
    return _json(err.body(), err.status, err.headers)


def api_error(exc: BaseException) -> APIError:
    """Map an exception from the engine or the library to the answer the client gets."""
    from ..engine import EngineBusyError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineBusyError):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return APIError(503, f"the server is busy: {exc}", type="server_error", code="server_busy",
                        headers={"Retry-After": retry})
    if isinstance(exc, ClosedError):
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, TokenizationError):
        return APIError(400, str(exc), code="invalid_token")
    if isinstance(exc, (SamplerError, TemplateError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, LlamaError):
        return APIError(500, f"generation failed: {exc}", type="server_error", code=type(exc).__name__)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


class _Server:
    """The state behind one app: the engine (or its loader), metrics and the request handlers."""

    def __init__(self, source: EngineSource, *, api_key: str | None, model_name: str | None,
                 keepalive_s: float, chat_template: str | None) -> None:
        self.engine: Engine | None = None
        self.loader: Callable[[], Engine] | None = None
        self.chat_template = chat_template
        if hasattr(source, "submit"):  # an Engine, or anything offering its API (e.g. an isolated one)
            self._adopt(cast("Engine", source))
        else:
            self.loader = source
        self.owns_engine = self.loader is not None
        self.api_key = api_key
        self.model_name = model_name or (self._default_name() if self.engine is not None else "pyllama")
        self.keepalive_s = keepalive_s
        self.metrics = Metrics()
        self.created = int(time.time())
        self.load_error: BaseException | None = None
        self.on_load_error: list[Callable[[BaseException], None]] = []
        self._load_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: set[EngineRequest] = set()
        self.closing = False

    # --- lifecycle -------------------------------------------------------------------------
    def _default_name(self) -> str:
        assert self.engine is not None
        return Path(str(self.engine.model.path)).name

    def _adopt(self, engine: Engine) -> None:
        self.prompter = ChatPrompter(engine.model, template=self.chat_template)
        self.n_vocab = engine.model.vocab.n_tokens
        self._piece_cache = functools.lru_cache(maxsize=65536)(self._piece_uncached)
        path = Path(str(engine.model.path))
        self.model_aliases = {path.name, path.stem, str(path)}
        self.engine = engine  # last: requests are served from here on

    def _load(self) -> None:
        assert self.loader is not None
        try:
            engine = self.loader()
            try:
                if self.model_name == "pyllama":
                    self.model_name = Path(str(engine.model.path)).name
                self._adopt(engine)
            except BaseException:
                engine.close()
                engine.model.close()
                raise
            log.info("model loaded: %s (%d slots of %d tokens)", self.model_name, engine.n_slots, engine.n_ctx_slot)
        except BaseException as exc:  # noqa: BLE001 - reported through /health and the callbacks
            self.load_error = exc
            log.error("loading the model failed: %s", exc)
            for cb in self.on_load_error:
                cb(exc)

    def shutdown_soon(self, grace: float) -> None:
        """Refuse new requests now and cancel those in flight after ``grace`` seconds.

        Safe from a signal handler or another thread. Streams cut this way end
        with an error event, so the HTTP server's own graceful shutdown finds
        every connection finished instead of killing tasks mid-response.
        """
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._begin_shutdown, grace)

    def _begin_shutdown(self, grace: float) -> None:
        if not self.closing:
            self.closing = True
            assert self._loop is not None
            self._loop.call_later(grace, self._cancel_active)

    def _cancel_active(self) -> None:
        for er in list(self._active):
            er.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        if self.loader is not None and self.engine is None:
            self._load_thread = threading.Thread(target=self._load, name="pyllama-load", daemon=True)
            self._load_thread.start()
        try:
            yield
        finally:
            if self._load_thread is not None:
                await asyncio.to_thread(self._load_thread.join)  # a load in progress finishes first
            if self.engine is not None:
                self.prompter.close()  # ours whoever owns the engine; it holds the model
            if self.owns_engine and self.engine is not None:
                engine = self.engine
                await asyncio.to_thread(engine.close)
                await asyncio.to_thread(engine.model.close)

    def require_engine(self) -> Engine:
        if self.closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise APIError(500, f"the model failed to load: {self.load_error}", type="server_error",
                           code="load_failed")
        raise APIError(503, "the model is loading", type="server_error", code="loading", headers={"Retry-After": "1"})

    def check_model(self, name: str | None) -> None:
        if name is None or name == self.model_name or name in self.model_aliases:
            return
        raise APIError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                       param="model", code="model_not_found")

    # --- token text for logprobs ------------------------------------------------------------
    def _piece_uncached(self, token: int) -> bytes:
        assert self.engine is not None
        return self.engine.model.vocab.token_to_piece(token, special=True)

    def piece(self, token: int) -> tuple[str, list[int]]:
        raw: bytes = self._piece_cache(token)
        return raw.decode("utf-8", "replace"), list(raw)

    # --- consuming an engine request ------------------------------------------------------------
    async def events(self, er: EngineRequest, *, keepalive: bool) -> AsyncIterator[TokenEvent | None]:
        """The request's events; ``None`` is a keep-alive tick (only before the first event, when asked)."""
        it = er.__aiter__()
        pending: asyncio.Future[TokenEvent] | None = None
        gaps: list[float] = []
        last: float | None = None
        self._active.add(er)
        try:
            if keepalive:
                pending = asyncio.ensure_future(it.__anext__())
                while True:
                    done, _ = await asyncio.wait((pending,), timeout=self.keepalive_s)
                    if done:
                        break
                    yield None
                fut, pending = pending, None
                try:
                    ev = fut.result()
                except StopAsyncIteration:
                    self._check_cut(er)
                    return
                last = time.perf_counter()
                yield ev
            while True:
                try:
                    ev = await it.__anext__()
                except StopAsyncIteration:
                    self._check_cut(er)
                    return
                if ev.token >= 0:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                yield ev
        finally:
            self._active.discard(er)
            if pending is not None and not pending.done():
                pending.cancel()
            if er.finish_reason is None:
                er.cancel()
            m = self.metrics
            if er.t_first_token is not None:
                m.observe(m.ttft, er.t_first_token - er.t_submit)
                m.observe(m.e2e, time.perf_counter() - er.t_submit)
            if gaps:
                m.observe_many(m.itl, gaps)

    def _check_cut(self, er: EngineRequest) -> None:
        if er.finish_reason == "cancelled" and self.closing:
            raise APIError(503, "the server is shutting down: the request was cut short", type="server_error",
                           code="shutting_down")

    async def collect(self, request: Request, er: EngineRequest) -> list[TokenEvent] | None:
        """All events of a non-streamed request; None when the client disconnected (which cancels it)."""
        async def drain() -> list[TokenEvent]:
            return [ev async for ev in self.events(er, keepalive=False) if ev is not None]

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(drain())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                er.cancel()
                work.cancel()
        if not work.done() or work.cancelled():
            return None
        return work.result()

    def submit(self, engine: Engine, prompt: Any, **kw: Any) -> EngineRequest:
        try:
            return engine.submit(prompt, **kw)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes a 4xx/503 in OpenAI's shape
            raise api_error(exc) from None

    def usage(self, er: EngineRequest) -> dict[str, Any]:
        return {"prompt_tokens": er.n_prompt, "completion_tokens": er.n_generated,
                "total_tokens": er.n_prompt + er.n_generated,
                "prompt_tokens_details": {"cached_tokens": er.n_cached}}

    # --- logprobs in the two OpenAI shapes -------------------------------------------------------
    def chat_logprob(self, ev: TokenEvent) -> dict[str, Any]:
        text, raw = self.piece(ev.token)
        tops = []
        for tok, lp in ev.top_logprobs or ():
            t, b = self.piece(tok)
            tops.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": tops}

    def completion_logprobs(self, evs: list[TokenEvent], offset: int) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for ev in evs:
            text, _ = self.piece(ev.token)
            tokens.append(text)
            lps.append(ev.logprob)
            tops.append({self.piece(t)[0]: lp for t, lp in ev.top_logprobs or ()})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # --- endpoints ------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.engine is not None:
            return _json({"status": "ok"})
        if self.load_error is not None:
            return _json({"status": "error", "message": str(self.load_error)}, 500)
        return _json({"status": "loading"}, 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        stats = self.engine.stats() if self.engine is not None else None
        text = self.metrics.render(stats, model_name=self.model_name, loaded=self.engine is not None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.model_name, "object": "model", "created": self.created,
                                "owned_by": "pyllama"}
        if self.engine is not None:
            e, m = self.engine, self.engine.model
            card["meta"] = {"n_slots": e.n_slots, "n_ctx_slot": e.n_ctx_slot, "n_vocab": self.n_vocab,
                            "n_ctx_train": m.n_ctx_train, "n_embd": m.n_embd, "n_params": m.n_params,
                            "size": m.size}
        return card

    async def models(self, request: Request) -> Response:
        self.require_engine()
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self.require_engine()
        self.check_model(request.path_params["model"])
        return _json(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        engine = self.require_engine()
        req = parse_request(ChatCompletionRequest, await request.body())
        self.check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
        limit = params.max_tokens(req.max_completion_tokens, req.max_tokens)
        plan: ChatPlan = self.prompter.plan(req)
        sampler = params.sampler_specs(req, self.n_vocab, grammar=plan.grammar)
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        er = self.submit(engine, plan.prompt, max_tokens=limit, stop=[*req.stops(), *plan.stops], sampler=sampler,
                         logprobs=req.logprobs, top_logprobs=top, add_special=plan.add_special,
                         parse_special=True, ignore_eos=req.ignore_eos)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._chat_stream(er, rid, req.logprobs, plan, usage),
                                     media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        evs = await self.collect(request, er)
        if evs is None:
            return _gone()
        text = "".join(ev.text for ev in evs)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = _FINISH.get(er.finish_reason or "stop", "stop")
        if plan.parse is not None:
            message, finish = self._parsed(plan, text, finish)
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        if req.logprobs:
            choice["logprobs"] = {"content": [self.chat_logprob(ev) for ev in evs if ev.token >= 0],
                                  "refusal": None}
        return _json({"id": rid, "object": "chat.completion", "created": int(time.time()),
                      "model": self.model_name, "choices": [choice], "usage": self.usage(er)})

    def _parsed(self, plan: ChatPlan, text: str, finish: str) -> tuple[dict[str, Any], str]:
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

    async def _chat_stream(self, er: EngineRequest, rid: str, logprobs: bool, plan: ChatPlan,
                           include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}

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
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for ev in self.events(er, keepalive=True):
                if ev is None:
                    yield sse.KEEPALIVE
                    continue
                if buffered:
                    parts.append(ev.text)
                    continue
                lps = [self.chat_logprob(ev)] if logprobs and ev.token >= 0 else None
                if ev.text or lps:
                    yield chunk({"content": ev.text}, lps=lps)
            finish = _FINISH.get(er.finish_reason or "stop", "stop")
            if buffered:
                message, finish = self._parsed(plan, "".join(parts), finish)
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
            if include_usage:
                yield sse.frame({**base, "choices": [], "usage": self.usage(er)})
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
            err = api_error(exc)
            log.warning("stream %s failed: %s", rid, err.message)
            yield sse.frame(err.body())
        yield sse.DONE

    async def completions(self, request: Request) -> Response:
        engine = self.require_engine()
        req = parse_request(CompletionRequest, await request.body())
        self.check_model(req.model)
        prompt = self._completion_prompt(req.prompt)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix", code="unsupported")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of", code="unsupported")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", param="echo", code="unsupported")
        limit = params.max_tokens(req.max_tokens)
        schema = req.response_format.schema_or_none() if req.response_format is not None else None
        grammar = schema_grammar(schema) if schema is not None else None
        sampler = params.sampler_specs(req, self.n_vocab, grammar=grammar)
        want_lp = req.logprobs is not None
        er = self.submit(engine, prompt, max_tokens=limit, stop=req.stops(), sampler=sampler, logprobs=want_lp,
                         top_logprobs=req.logprobs or 0, add_special=True, parse_special=True,
                         ignore_eos=req.ignore_eos)
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else engine.detokenize(prompt)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._completion_stream(er, rid, want_lp, echo, usage),
                                     media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        evs = await self.collect(request, er)
        if evs is None:
            return _gone()
        text = "".join(ev.text for ev in evs)
        choice: dict[str, Any] = {"index": 0, "text": echo + text, "logprobs": None,
                                  "finish_reason": _FINISH.get(er.finish_reason or "stop", "stop")}
        if want_lp:
            choice["logprobs"] = self.completion_logprobs([ev for ev in evs if ev.token >= 0], len(echo))
        return _json({"id": rid, "object": "text_completion", "created": int(time.time()),
                      "model": self.model_name, "choices": [choice], "usage": self.usage(er)})

    def _completion_prompt(self, prompt: Any) -> str | np.ndarray[Any, np.dtype[np.int32]]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            return prompt
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if not isinstance(prompt[0], int):
            raise APIError(400, "one prompt per request: send several requests (they are batched together)",
                           param="prompt", code="unsupported")
        tokens = np.asarray(prompt, dtype=np.int64)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= self.n_vocab)][0])
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {self.n_vocab})",
                           param="prompt", code="invalid_token")
        return tokens.astype(np.int32)

    async def _completion_stream(self, er: EngineRequest, rid: str, logprobs: bool, echo: str,
                                 include_usage: bool) -> AsyncIterator[bytes]:
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        offset = len(echo)

        def chunk(text: str, finish: str | None = None, lps: dict[str, Any] | None = None) -> bytes:
            obj: dict[str, Any] = {**base, "choices": [{"index": 0, "text": text, "logprobs": lps,
                                                        "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return sse.frame(obj)

        try:
            if echo:
                yield chunk(echo)
            async for ev in self.events(er, keepalive=True):
                if ev is None:
                    yield sse.KEEPALIVE
                    continue
                lps = self.completion_logprobs([ev], offset) if logprobs and ev.token >= 0 else None
                if ev.text or lps:
                    yield chunk(ev.text, lps=lps)
                offset += len(ev.text)
            yield chunk("", _FINISH.get(er.finish_reason or "stop", "stop"))
            if include_usage:
                yield sse.frame({**base, "choices": [], "usage": self.usage(er)})
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
            err = api_error(exc)
            log.warning("stream %s failed: %s", rid, err.message)
            yield sse.frame(err.body())
        yield sse.DONE

    async def embeddings(self, request: Request) -> Response:
        engine = self.require_engine()
        req = parse_request(EmbeddingRequest, await request.body())
        self.check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise APIError(400, "input must not be empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be text (a string or a list of strings); token ids are not supported",
                           param="input", code="unsupported")
        strs: list[str] = [t for t in texts if isinstance(t, str)]
        if any(not t for t in strs):
            raise APIError(400, "input strings must not be empty", param="input")
        n_embd = engine.model.n_embd
        if req.dimensions is not None and req.dimensions != n_embd:
            raise APIError(400, f"dimensions must be {n_embd} (the model's embedding size)", param="dimensions",
                           code="unsupported")
        try:
            vecs = await engine.aembed(strs, normalize=True)
            n_tokens = sum(int(engine.tokenize(t).size) for t in strs)
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None
        data = []
        for i, v in enumerate(np.asarray(vecs, dtype=np.float32)):
            emb: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                        else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return _json({"object": "list", "data": data, "model": self.model_name,
                      "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    async def tokenize(self, request: Request) -> Response:
        engine = self.require_engine()
        req = parse_request(TokenizeRequest, await request.body())
        try:
            toks = engine.tokenize(req.content, add_special=req.add_special, parse_special=req.parse_special)
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None
        if not req.with_pieces:
            return _json({"tokens": toks.tolist()})
        out = []
        for t in toks.tolist():
            raw: bytes = self._piece_cache(t)
            try:
                piece: Any = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)  # llama-server's shape for a piece that is not valid UTF-8 alone
            out.append({"id": t, "piece": piece})
        return _json({"tokens": out})

    async def detokenize(self, request: Request) -> Response:
        engine = self.require_engine()
        req = parse_request(DetokenizeRequest, await request.body())
        try:
            text = engine.detokenize(req.tokens)
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None
        return _json({"content": text})


class _FrontDoor:
    """Pure ASGI middleware: the API key check and the request counter (also for streamed responses)."""

    def __init__(self, app: ASGIApp, server: _Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        endpoint = "/v1/models" if path.startswith("/v1/models/") else (path if path in _ENDPOINTS else "other")
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.server.api_key
            if key is not None and path != "/health" and not _authorized(scope, key):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _error_response(err)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.server.metrics.count_request(endpoint, status)


def _authorized(scope: Scope, key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return _json(error_body(str(exc.detail), type=kind, code=str(exc.status_code)), exc.status_code,
                 dict(exc.headers or {}))


async def _on_other_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _error_response(api_error(exc))


def create_app(engine: EngineSource, *, api_key: str | None = None, model_name: str | None = None,
               keepalive_s: float = 10.0, chat_template: str | None = None) -> Starlette:
    """The OpenAI-compatible app over ``engine``.

    ``engine`` is an :class:`~pyllama.engine.Engine` (the caller keeps owning
    it) or a callable that builds one: it is then called in a background
    thread at startup (``/health`` answers 503 ``{"status": "loading"}``
    meanwhile) and the app closes the engine and its model at shutdown.
    ``api_key`` makes every endpoint but ``/health`` require
    ``Authorization: Bearer <key>``; ``model_name`` is the id clients send
    (default: the model's file name); ``keepalive_s`` spaces the SSE comments
    sent while a stream waits for its first token; ``chat_template`` (Jinja
    source) replaces the model's own template. ``app.state.server``
    exposes ``on_load_error`` (callbacks run when the loader fails).
    """
    server = _Server(engine, api_key=api_key, model_name=model_name, keepalive_s=keepalive_s,
                     chat_template=chat_template)
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_endpoint, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/embeddings", server.embeddings, methods=["POST"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Any]] = {
        APIError: _on_api_error, HTTPException: _on_http_error, Exception: _on_other_error}
    app = Starlette(routes=routes, middleware=[Middleware(_FrontDoor, server=server)],
                    exception_handlers=handlers, lifespan=server.lifespan)
    app.state.server = server
    return app


__all__ = ["create_app", "api_error"]
