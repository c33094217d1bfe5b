"""The state behind one app: the engine (or its loader), its lifecycle, metrics and request plumbing.

:class:`ServerState` loads or adopts the engine, refuses work while loading or
shutting down, consumes engine requests (keep-alive ticks, client disconnects,
latency metrics), shapes logprobs and closes every SSE stream the same way.
The endpoint modules are functions over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import inspect
import os
import logging
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar, Union, cast

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request

from ..engine.front import check_prompt_size
from ..errors import ContextOverflowError
from ..stream import TokenEvent
from ..options import SubmitOptions, Unpack
from . import params, sse
from ..media import media_parts
from .chat import ChatPlan, ChatPrompter
from .errors import api_error
from .metrics import Metrics
from .params import RequestDefaults
from .paths import confined, without_dirs
from .protocol import APIError

if TYPE_CHECKING:
    from ..chat import ReasoningFormat
    from ..engine import Engine, EngineRequest, PromptProgress

log = logging.getLogger("pyllama.server")


class ProgressLoader(Protocol):
    """A loader told how its load goes: ``progress`` gets 0.0..1.0 (the weights read so far)."""

    def __call__(self, *, progress: Callable[[float], Any]) -> Engine: ...


#: an engine, or what builds one (taking ``progress=`` where it reports the load: /models shows it)
EngineSource = Union["Engine", Callable[[], "Engine"], ProgressLoader]

_FINISH = {"eog": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


async def interleave(gens: Sequence[AsyncGenerator[bytes, None]]) -> AsyncGenerator[bytes, None]:
    """The frames of several streams as they come (``n`` choices streamed together); closing it closes them."""
    queue: asyncio.Queue[tuple[int, bytes | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[bytes, None]) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for frame in gen:
                    await queue.put((i, frame))
            await queue.put((i, None))
        except Exception as exc:  # noqa: BLE001 - raised where the frames are read
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            _, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def finish_reason(er: EngineRequest) -> str:
    """OpenAI's ``finish_reason`` for how the engine request ended."""
    return _FINISH.get(er.finish_reason or "stop", "stop")


DEFAULT_MAX_BODY_SIZE = 16 << 20
PREP_THREADS = 4  # requests prepared at once off the event loop (tokenizing holds no GIL; templating does)
WAIT_THREADS = 64  # calls that may wait long at once (slot actions waiting for their slot): more wait their turn
T = TypeVar("T")


def _give_back_memory() -> None:
    """Return the heap freed by an unload to the system (glibc keeps it in its per-thread arenas otherwise,
    and a server that loads and unloads models from several threads would look like it grows)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class ServerState:
    """The state behind one app: the engine (or its loader), metrics and the request handlers."""

    def __init__(self, source: EngineSource, *, api_key: str | Sequence[str] | None, model_name: str | None,
                 keepalive_s: float, chat_template: str | None, aliases: Sequence[str] = (),
                 defaults: RequestDefaults = RequestDefaults(), metrics: bool = True,
                 reasoning_format: ReasoningFormat = "auto", slots: bool = True, props: bool = False,
                 thinking: bool = True, chat_template_kwargs: Mapping[str, Any] | None = None,
                 verbose: bool = False, tags: Sequence[str] = (), jinja: bool = True,
                 max_body_size: int | None = None, read_timeout: float = 600.0,
                 slot_save_path: str | os.PathLike[str] | None = None, spm_infill: bool = False,
                 media_path: str | os.PathLike[str] | None = None) -> None:
        self.engine: Engine | None = None
        #: where file:// media URLs are read from (llama-server's --media-path; None: refused)
        self.media_path = None if media_path is None else Path(media_path)
        self.spm_infill = spm_infill  # /infill puts the suffix before the prefix (llama-server's --spm-infill)
        #: where POST /slots/{id}?action=save|restore reads and writes (None: those actions answer 501)
        self.slot_save_path = None if slot_save_path is None else Path(slot_save_path)
        self.read_timeout = read_timeout
        self._max_body_size = max_body_size
        self._prep_limiter: anyio.CapacityLimiter | None = None
        self._wait_limiter: anyio.CapacityLimiter | None = None
        self.loader: Callable[[], Engine] | None = None
        #: the load under way: llama-server's router payload {"stages", "current", "value"} (None: no load)
        self.load_progress: dict[str, Any] | None = None
        self.chat_template = chat_template
        self.reasoning_format: ReasoningFormat = reasoning_format
        self.thinking = thinking
        self.jinja = jinja
        self.verbose = verbose  # llama-server -v: answers carry "__verbose" unless a request says otherwise
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.aliases = [a for a in aliases if a != model_name]  # more names /v1/models lists
        #: every name the model answers to (its file's too), known once it has loaded
        self.model_aliases: set[str] = set(self.aliases)
        self.tags = list(tags)
        if hasattr(source, "submit"):  # an Engine, or anything offering its API (e.g. an isolated one)
            self._adopt(cast("Engine", source))
        elif "progress" in inspect.signature(source).parameters:
            self.loader = functools.partial(cast(ProgressLoader, source), progress=self._loaded_part)
        else:
            self.loader = cast("Callable[[], Engine]", source)
        self.owns_engine = self.loader is not None
        # the keys a request may carry (llama-server's --api-key takes several); empty: no key needed
        self.api_keys: tuple[str, ...] = (api_key,) if isinstance(api_key, str) else tuple(api_key or ())
        self.defaults = defaults
        self.metrics_enabled = metrics
        self.model_name = model_name or (self._default_name() if self.engine is not None else "pyllama")
        self.named = model_name is not None  # an alias names the model (llama-server's -a)
        self.keepalive_s = keepalive_s
        self.metrics = Metrics()
        self.created = int(time.time())
        self.load_error: BaseException | None = None
        self.on_load_error: list[Callable[[BaseException], None]] = []
        self._load_thread: threading.Thread | None = None
        self.unloaded = False  # the model was freed on request (keep_alive): the next request loads it again
        self.unload_after: float | None = None  # seconds idle before the model is freed (None: never)
        self.last_used = time.monotonic()
        self._idle_task: asyncio.Task[None] | None = None
        self._unload_requested = False
        self.http_in_flight = 0  # requests being answered (FrontDoor counts them)
        #: awaited before the model is loaded on demand (the router makes room for it, or refuses)
        self.before_load: Callable[[], Awaitable[None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: set[EngineRequest] = set()
        self.closing = False
        self._fingerprint: str | None = None
        self.slots_enabled = slots
        self.props_enabled = props
        #: per slot id: the last request it served and that request's generation settings (GET /slots)
        self.slot_last: dict[int, tuple[EngineRequest, dict[str, Any]]] = {}
        # generation settings of requests in flight
        self.settings: weakref.WeakKeyDictionary[EngineRequest, dict[str, Any]] = weakref.WeakKeyDictionary()

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint``: llama-server's build info (of the vendored llama.cpp)."""
        if self._fingerprint is None:
            from .props import build_info

            self._fingerprint = build_info()
        return self._fingerprint

    # --- lifecycle -------------------------------------------------------------------------
    def _default_name(self) -> str:
        assert self.engine is not None
        return Path(str(self.engine.model.path)).name

    def _adopt(self, engine: Engine) -> None:
        self.prompter = ChatPrompter(engine.model, template=self.chat_template,
                                     reasoning_format=self.reasoning_format, thinking=self.thinking,
                                     template_kwargs=self.chat_template_kwargs, jinja=self.jinja,
                                     open_file=self.open_media)
        self.n_vocab = engine.model.vocab.n_tokens
        self._piece_cache = functools.lru_cache(maxsize=65536)(self._piece_uncached)
        path = Path(str(engine.model.path))
        self.model_aliases = {path.name, path.stem, str(path), *self.aliases}
        #: what lists of models show, kept while the model is unloaded
        self.model_facts: dict[str, Any] = {"path": path, "architecture": engine.model.architecture,
                            "n_params": engine.model.n_params, "file_type": engine.model.meta("general.file_type"),
                            # llama.cpp's "llama 135M Q4_1": its name of the weights' type, after the size
                            "ftype_name": " ".join(engine.model.description.split()[2:])}
        self.engine = engine  # last: requests are served from here on

    def _loaded_part(self, value: float) -> None:  # from the loading thread: one assignment, read whole
        self.load_progress = {"stages": ["text_model"], "current": "text_model", "value": round(value, 4)}

    def _load(self) -> None:
        assert self.loader is not None
        again = self.unloaded  # loading again after an unload: a failure fails the requests, not the server
        self._loaded_part(0.0)
        try:
            engine = self.loader()
            try:
                if self.model_name == "pyllama":
                    self.model_name = Path(str(engine.model.path)).name
                self._adopt(engine)
                self.unloaded = False
            except BaseException:
                engine.close()
                engine.model.close()
                raise
            log.info("model loaded: %s (%d slots of %d tokens)", self.model_name, engine.n_slots, engine.n_ctx_slot)
        except BaseException as exc:  # noqa: BLE001 - reported through /health and the callbacks
            self.load_error = exc
            log.error("loading the model failed: %s", exc)
            if not again:
                for cb in self.on_load_error:
                    cb(exc)
        finally:
            self.load_progress = None

    # --- the model on demand (Ollama's keep_alive) ---------------------------------------------
    @property
    def loading(self) -> bool:
        return self._load_thread is not None and self._load_thread.is_alive()

    def _start_load(self) -> None:
        """Load the model again in the background (after an unload), unless a load is running."""
        if self.loader is None or self.closing or self.engine is not None:
            return
        if self._load_thread is not None and self._load_thread.is_alive():
            return
        self.load_error = None
        self._load_thread = threading.Thread(target=self._load, name="pyllama-load", daemon=True)
        self._load_thread.start()

    async def ensure_engine(self) -> Engine:
        """The engine, loading the model first if it was unloaded (the request waits for the load). A pending
        unload is called off: this request wants the model."""
        self.last_used = time.monotonic()
        self._unload_requested = False
        if self.engine is None and self.unloaded:
            if self.before_load is not None and not self.loading:
                await self.before_load()
            self._start_load()
            while self.engine is None and self.load_error is None and not self.closing:
                await asyncio.sleep(0.05)
        return self.require_engine()

    def request_unload(self) -> None:
        """Free the model as soon as no request is being answered (Ollama's ``keep_alive: 0``); the next
        request that needs it loads it again. Nothing to do where the engine is not the server's."""
        if self.engine is not None and self.owns_engine:
            self._unload_requested = True
            self._watch_idle()

    def keep_alive(self, seconds: float | None) -> None:
        """A request's ``keep_alive``: the model is freed after this many idle seconds (negative: never)."""
        if seconds is None:
            return
        self.unload_after = None if seconds < 0 else seconds
        self._watch_idle()

    def _watch_idle(self) -> None:
        if self._idle_task is None and self._loop is not None:
            self._idle_task = self._loop.create_task(self._unload_when_idle())

    async def _unload_when_idle(self) -> None:
        while not self.closing:
            await asyncio.sleep(0.05)
            engine = self.engine
            if engine is None or self.http_in_flight or self._active:
                continue
            after = self.unload_after
            if self._unload_requested or (after is not None and time.monotonic() - self.last_used >= after):
                self._unload_requested = False
                await self._unload(engine)

    async def unload_now(self) -> bool:
        """Free the model at once (the router, making room: it calls this for a model nothing is using)."""
        engine = self.engine
        if engine is None or not self.owns_engine:
            return False
        await self._unload(engine)
        return True

    async def _unload(self, engine: Engine) -> None:
        """Free ``engine``, its chat handling and its model. Called when no request is being answered, so
        nothing holds them; a request arriving meanwhile loads a fresh engine."""
        prompter = self.prompter
        self.engine = None
        self.unloaded = True
        await asyncio.to_thread(engine.close)
        prompter.close()
        await asyncio.to_thread(engine.model.close)
        _give_back_memory()
        log.info("model unloaded: %s", self.model_name)

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
        if self.loader is not None and self.engine is None and not self.unloaded:
            self._load_thread = threading.Thread(target=self._load, name="pyllama-load", daemon=True)
            self._load_thread.start()
        try:
            yield
        finally:
            if self._idle_task is not None:
                self._idle_task.cancel()
            if self._load_thread is not None:
                await asyncio.to_thread(self._load_thread.join)  # a load in progress finishes first
            if self.engine is not None:
                self.prompter.close()  # ours whoever owns the engine; it holds the model
            if self.owns_engine and self.engine is not None:
                engine = self.engine
                await asyncio.to_thread(engine.close)
                await asyncio.to_thread(engine.model.close)

    @property
    def max_body_size(self) -> int:
        """The largest request body read (bytes): the configured one, else room for a whole slot's context
        written as JSON text (64 bytes a token: escapes, token-id arrays) and never under 16 MiB."""
        if self._max_body_size is not None:
            return self._max_body_size
        n_ctx = self.engine.n_ctx_slot if self.engine is not None else 0
        return max(DEFAULT_MAX_BODY_SIZE, 64 * n_ctx)

    def require_engine(self) -> Engine:
        if self.closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.engine is not None:
            self.last_used = time.monotonic()
            return self.engine
        if self.load_error is not None:
            raise APIError(500, f"the model failed to load: {without_dirs(str(self.load_error))}",
                           type="server_error", code="load_failed")
        if self.unloaded:  # (a request that needs the model awaits ensure_engine, which loads it again)
            raise APIError(503, "the model is unloaded (keep_alive); a request that needs it loads it again",
                           type="server_error", code="unloaded", headers={"Retry-After": "1"})
        raise APIError(503, "the model is loading", type="server_error", code="loading", headers={"Retry-After": "1"})

    def check_model(self, name: str | None) -> None:
        """A request's ``model``: any name is accepted, as llama-server does in single-model mode (clients
        hard-code names like ``gpt-4o-mini``); there is one model to serve it."""

    def find_model(self, name: str) -> None:
        """``GET /v1/models/{name}``: a lookup, so only the names this server answers to (else 404)."""
        if name == self.model_name or name in self.model_aliases:
            return
        raise APIError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                       param="model", code="model_not_found")

    # --- token text for logprobs ------------------------------------------------------------
    def _piece_uncached(self, token: int) -> bytes:
        assert self.engine is not None
        return self.engine.model.vocab.token_to_piece(token, special=True)

    def piece_bytes(self, token: int) -> bytes:
        """The token's text as raw bytes (cached: a piece may be part of a UTF-8 sequence)."""
        raw: bytes = self._piece_cache(token)
        return raw

    def piece(self, token: int) -> tuple[str, list[int]]:
        raw = self.piece_bytes(token)
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
            t = self.timings(er)
            m.count_generation(t["prompt_n"], t["prompt_ms"] / 1e3, max(0, t["predicted_n"] - 1),
                               t["predicted_ms"] / 1e3, er.n_prompt + er.n_generated)
            settings = self.settings.pop(er, None)
            slot = getattr(er, "slot_id", None)
            if slot is not None:
                self.slot_last[slot] = (er, settings or {})

    def _check_cut(self, er: EngineRequest) -> None:
        if er.finish_reason == "cancelled" and self.closing:
            raise APIError(503, "the server is shutting down: the request was cut short", type="server_error",
                           code="shutting_down")

    async def collect(self, request: Request, er: EngineRequest) -> list[TokenEvent] | None:
        """All events of a non-streamed request; None when the client disconnected (which cancels it)."""
        got = await self.collect_all(request, [er])
        return None if got is None else got[0]

    async def collect_all(self, request: Request, ers: Sequence[EngineRequest]) -> list[list[TokenEvent]] | None:
        """All events of several non-streamed requests (run together: they batch); None when the client
        disconnected (which cancels them all)."""
        async def drain_one(er: EngineRequest) -> list[TokenEvent]:
            return [ev async for ev in self.events(er, keepalive=False) if ev is not None]

        async def drain() -> list[list[TokenEvent]]:
            try:
                return list(await asyncio.gather(*(drain_one(er) for er in ers)))
            except BaseException:
                for er in ers:
                    er.cancel()
                raise

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
                for er in ers:
                    er.cancel()
                work.cancel()
        if not work.done() or work.cancelled():
            return None
        return work.result()

    async def stream(self, er: EngineRequest | Sequence[EngineRequest], rid: str,
                     frames: AsyncGenerator[bytes, None], usage_base: dict[str, Any] | None) -> AsyncIterator[bytes]:
        """An SSE stream: ``frames``, the usage chunk (built on ``usage_base``, when given), then ``[DONE]``.

        The status line is sent before the first frame, so a failure midway is
        reported in-band as an error event in OpenAI's shape.
        """
        try:
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    yield frame
            if usage_base is not None:  # with llama-server's timings, as it sends them in this chunk
                first = er[0] if isinstance(er, Sequence) else er
                yield sse.frame({**usage_base, "choices": [], "usage": self.usage_all(er),
                                 "timings": self.timings(first)})
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
            err = api_error(exc)
            log.warning("stream %s failed: %s", rid, err.message)
            yield sse.frame(err.body())
        yield sse.DONE

    def submit(self, engine: Engine, prompt: Any, **options: Unpack[SubmitOptions]) -> EngineRequest:
        params.check_stops(options.get("stop") or ())
        try:
            return engine.submit(prompt, **options)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes a 4xx/503 in OpenAI's shape
            err = api_error(exc)
            if isinstance(exc, ContextOverflowError):  # llama-server's fields of this error
                if exc.n_tokens is not None:  # (counted once: a long prompt is not tokenized again)
                    err.extra.update(n_prompt_tokens=exc.n_tokens, n_ctx=engine.n_ctx_slot)
                    raise err from None
                try:
                    n = (engine.tokenize(prompt, add_special=options.get("add_special", True),
                                         parse_special=options.get("parse_special", True)).size
                         if isinstance(prompt, (str, bytes)) else len(prompt))
                except Exception:  # noqa: BLE001
                    n = 0
                err.extra.update(n_prompt_tokens=int(n), n_ctx=engine.n_ctx_slot)
            raise err from None

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread: the CPU-heavy part of a request (validating a large body,
        rendering its chat template, tokenizing, building a grammar) never delays another request's tokens
        or ``/health`` on the event loop. At most PREP_THREADS at once."""
        if self._prep_limiter is None:  # (made in the loop: anyio's limiter belongs to one)
            self._prep_limiter = anyio.CapacityLimiter(PREP_THREADS)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._prep_limiter)

    async def waiting(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread of its own pool, for a call that may wait long (a slot action waits for
        its slot): however many wait, the threads other work runs in (off_loop, asyncio's) stay free."""
        if self._wait_limiter is None:
            self._wait_limiter = anyio.CapacityLimiter(WAIT_THREADS)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._wait_limiter)

    def chat_prompt(self, engine: Engine, plan: ChatPlan) -> Any:
        """What the engine runs for a rendered chat: its tokens, or with media the engine's media prompt
        (images decoded here, off the event loop; a 400 for media the model does not take)."""
        if not plan.media:
            return self.prompt_ids(engine, plan.prompt, add_special=plan.add_special, parse_special=True)
        try:
            return engine.media_prompt(media_parts(plan.prompt, plan.media), add_special=plan.add_special,
                                       parse_special=True)
        except Exception as exc:  # noqa: BLE001 - a 4xx in OpenAI's shape
            raise api_error(exc) from None

    def open_media(self, name: str) -> Path:
        """A ``file://`` image or clip a request names: inside ``--media-path`` (else a 400)."""
        if self.media_path is None:
            raise APIError(400, "file:// URLs are not allowed unless --media-path is specified",
                           param="messages", code="invalid_media")
        return confined(self.media_path, name, param="url", allow_subdirs=True)

    def prompt_ids(self, engine: Engine, prompt: Any, *, add_special: bool,
                   parse_special: bool) -> Any:
        """A text prompt's tokens (what submit would compute), for a worker thread; ids pass unchanged."""
        if isinstance(prompt, (str, bytes)):
            try:
                check_prompt_size(engine.model.vocab, prompt, engine.n_ctx_slot)
                return engine.tokenize(prompt, add_special=add_special, parse_special=parse_special)
            except Exception as exc:  # noqa: BLE001 - a 4xx in OpenAI's shape
                raise api_error(exc) from None
        return prompt

    def submit_n(self, engine: Engine, prompt: Any, n: int, settings: dict[str, Any] | None = None,
                 **options: Unpack[SubmitOptions]) -> list[EngineRequest]:
        """``n`` requests for the same prompt (``n`` choices: they run in parallel slots and batch); a
        refusal of any cancels those already queued. ``settings`` (llama-server's generation settings) are
        kept for ``GET /slots``."""
        ers: list[EngineRequest] = []
        try:
            with engine.together():
                for _ in range(n):
                    ers.append(self.submit(engine, prompt, **options))
        except BaseException:
            for er in ers:
                er.cancel()
            raise
        if settings is not None:
            for er in ers:
                self.settings[er] = settings
        return ers

    def running_by_slot(self) -> dict[int, EngineRequest] | None:
        """The requests in a slot now, by slot id (None where the engine does not say which slot)."""
        out: dict[int, EngineRequest] = {}
        for er in list(self._active):
            if er.t_start is None or er.done:
                continue
            slot = getattr(er, "slot_id", None)
            if slot is None:  # (the engine sets it as the request gets its slot)
                return None
            out[slot] = er
        return out

    def timings(self, er: EngineRequest) -> dict[str, Any]:
        """llama-server's ``timings`` of a request: prompt processing from getting a slot to the first token,
        generation from there to the last (its rate over the tokens after the first, which came with the
        prompt's last decode)."""
        now = time.perf_counter()
        start = er.t_start
        first = er.t_first_token
        if start is None and (first is not None or er.t_done is not None):
            start = er.t_submit  # an engine that does not say when the slot was taken (--isolate)
        end = er.t_done if er.t_done is not None else now
        prompt_ms = (first - start) * 1e3 if start is not None and first is not None else 0.0
        if start is not None and first is None and er.t_done is not None:
            prompt_ms = (er.t_done - start) * 1e3
        n_gen = er.n_generated
        steps = max(0, n_gen - 1)
        predicted_ms = max(1e-3, (end - first) * 1e3) if first is not None else 0.0
        prompt_n = max(0, er.n_prompt - er.n_cached) if start is not None else 0
        out: dict[str, Any] = {
            "cache_n": er.n_cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1e3 / prompt_ms * prompt_n if prompt_ms > 0 else 0.0,
            "predicted_n": n_gen, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / steps if steps else 0.0,
            "predicted_per_second": 1e3 / predicted_ms * steps if predicted_ms > 0 and steps else 0.0,
        }
        spec = er.speculative
        if spec is not None and spec.n_drafted:
            out["draft_n"] = spec.n_drafted
            out["draft_n_accepted"] = spec.n_accepted
        return out

    @staticmethod
    def progress_timings(ev: PromptProgress) -> dict[str, Any]:
        """llama-server's ``timings`` of a prompt still being evaluated: nothing predicted yet."""
        n, ms = ev.processed - ev.cache, ev.time_ms
        return {"cache_n": ev.cache, "prompt_n": n, "prompt_ms": ms, "prompt_per_token_ms": ms / n if n else 0.0,
                "prompt_per_second": 1e3 / ms * n if ms > 0 else 0.0, "predicted_n": 0, "predicted_ms": 0.0,
                "predicted_per_token_ms": 0.0, "predicted_per_second": 0.0}

    def usage_all(self, ers: EngineRequest | Sequence[EngineRequest]) -> dict[str, Any]:
        """The usage of the requests of one answer (``n`` choices: the prompt once, every choice's tokens)."""
        if not isinstance(ers, Sequence):
            return self.usage(ers)
        out = self.usage(ers[0])
        gen = sum(er.n_generated for er in ers)
        out.update(completion_tokens=gen, total_tokens=out["prompt_tokens"] + gen)
        return out

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
