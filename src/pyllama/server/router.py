"""Several models behind one server: llama-server's router mode, Ollama's model management.

Each model is a whole app of its own (:func:`.app.create_app`: every route, its own
:class:`~.state.ServerState`), over an engine in its own worker process (``IsolatedEngine``), so a crash
takes down that model's requests only and the next request starts it again. The router reads which model
a request names (the JSON body's ``model``, or ``?model=`` on a GET) and hands the request to that app;
the model loads on its first request (``--models-autoload``, the default) or by ``POST /models/load``,
and is freed by ``POST /models/unload``, Ollama's ``keep_alive`` or to make room. Before a model loads
the router makes room for it: at most ``--models-max`` loaded, and on each device (the host's RAM, each
GPU) the models loaded plus this one, each measured per device by llama.cpp's projection from its file
(weights unread), within ``--memory-budget`` (in all, or per device) or else within what the device has
free, a margin kept; room is made by freeing the least recently used model that is answering nothing, never one with a request
in flight. A model that could never fit is a clear error. ``GET /v1/models`` (and ``/models``) lists
every model with its status (unloaded, loading, loaded, failed with the reason), ``/api/tags`` and
``/api/ps`` Ollama's views of the same.

A model may have more names: its ``--models-preset`` section's ``alias``, and Ollama's ``/api/copy`` and
``/api/create`` (a new name for a routed model, its requests given a system prompt and default options),
which the router answers itself, as ``/api/push`` (501: no registry here). A preset's ``load-on-startup``
loads the model when the server starts; ``POST /models/unload`` waits the model's ``stop-timeout`` seconds for
its requests, then cancels them. What the router says of itself in ``/openapi.json`` is :mod:`.router_doc`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from ..fit import DEFAULT_MARGIN_MIB, MemoryBudget, model_need
from . import sse
from .errors import error_response_for
from .front_door import PUBLIC, authorized
from .paths import without_dirs
from .protocol import APIError

if TYPE_CHECKING:
    from .openapi import Doc
    from .state import ServerState

log = logging.getLogger("pyllama.server")

#: the largest request body the router reads to find the model (a model's own limit applies after)
ROUTER_MAX_BODY = 64 << 20
#: memory left free on a device without a budget (llama.cpp's --fit-target)
MEMORY_MARGIN = DEFAULT_MARGIN_MIB << 20


@dataclass
class RoutedModel:
    """One model of the router: its name, file, app and state, and what it needs in memory (measured once)."""

    name: str
    path: Path
    app: Starlette
    #: bytes it needs loaded, per device ("host" for RAM)
    need: dict[str, int] | None = None
    #: more names requests may give it (its preset section's `alias`)
    aliases: tuple[str, ...] = ()
    #: load it when the server starts (its preset's `load-on-startup`)
    load_on_startup: bool = False
    #: seconds POST /models/unload waits for its requests before cancelling them (its preset's `stop-timeout`)
    stop_timeout: float = 10.0
    #: the context its cache holds, all slots (measured for the memory it needs; None: the router's)
    n_ctx: int | None = None
    #: a model of the store (--models-store, or pulled through the server): DELETE removes it from both
    from_store: bool = False

    @property
    def state(self) -> ServerState:
        state: ServerState = self.app.state.server
        return state

    @property
    def status(self) -> str:
        s = self.state
        if s.engine is not None:
            return "loaded"
        if s.loading:
            return "loading"
        if s.load_error is not None:
            return "failed"
        return "unloaded"

    @property
    def busy(self) -> bool:
        s = self.state
        return bool(s.http_in_flight or s._active)


def measure(path: Path, n_ctx: int) -> dict[str, int]:
    """Bytes a model needs loaded, per device (llama.cpp's projection from its file)."""
    return model_need(path, n_ctx=n_ctx)


class ModelRouter:
    """The ASGI app of a server of several models (see the module docstring)."""

    def __init__(self, models: Sequence[RoutedModel], *, models_max: int, memory_budget: MemoryBudget | int | None,
                 autoload: bool, api_keys: Sequence[str], n_ctx: int,
                 add_model: Callable[[str, Path, Path | None], RoutedModel] | None = None,
                 store: bool = False) -> None:
        if not models and not store:
            raise ValueError("the router needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name: {sorted(n for n in names if names.count(n) > 1)}")
        self.models = {m.name: m for m in models}
        #: a model's other names: its preset aliases (fixed) and Ollama's copies and creations (made at run time)
        self.aliases: dict[str, RoutedModel] = {}
        self.copies: dict[str, RoutedModel] = {}
        for m in models:
            for alias in m.aliases:
                if alias in self.models or alias in self.aliases:
                    raise ValueError(f"the alias `{alias}` of model `{m.name}` names another model too")
                self.aliases[alias] = m
        self._tasks: set[asyncio.Task[None]] = set()
        self.models_max = models_max
        self.memory_budget = MemoryBudget.of(memory_budget)
        self.memory_budget.check_devices()
        self.autoload = autoload
        self.api_keys = tuple(api_keys)
        self.n_ctx = n_ctx
        self._room = asyncio.Lock()
        self.created = int(time.time())
        for m in models:
            m.state.before_load = self._before_load(m)
        #: makes the routed model of a file pulled (or found in the store) while the server runs
        self.add_model = add_model
        #: --models-store: a reference the store holds is served on its first request
        self.store = store
        self._lifespans: dict[str, contextlib.AbstractAsyncContextManager[None]] = {}
        self._started = False
        self._own: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("GET", "/v1/models"): self._list, ("GET", "/models"): self._list,
            ("GET", "/health"): self._health, ("GET", "/v1/health"): self._health,
            ("GET", "/api/tags"): self._tags, ("GET", "/api/ps"): self._ps,
            ("POST", "/models/load"): self._load, ("POST", "/models/unload"): self._unload,
            ("POST", "/api/copy"): self._ollama_copy, ("POST", "/api/create"): self._ollama_create,
            ("POST", "/api/push"): self._ollama_push,
            ("POST", "/api/pull"): self._ollama_pull, ("POST", "/models"): self._pull_model,
            ("DELETE", "/api/delete"): self._delete, ("DELETE", "/models"): self._delete,
            ("GET", "/openapi.json"): self._openapi, ("GET", "/api/version"): self._version,
        }
        self._document: tuple[tuple[str, ...], bytes] | None = None  # the names it lists, the document

    # --- making room --------------------------------------------------------------------------
    def _before_load(self, model: RoutedModel) -> Callable[[], Awaitable[None]]:
        async def make_room() -> None:
            async with self._room:
                await self._make_room(model)
        return make_room

    async def _make_room(self, model: RoutedModel) -> None:
        if model.need is None:
            try:
                model.need = await asyncio.to_thread(measure, model.path, model.n_ctx or self.n_ctx)
            except Exception as exc:  # noqa: BLE001 - a file llama.cpp cannot read: the model failed to load
                model.state.load_error = exc
                model.state.require_engine()  # raises: the load failure, as the model's status says it
                raise
        budget, need = self.memory_budget, model.need
        never = budget.shortfall(need, margin=MEMORY_MARGIN, free=False)
        if never is not None:
            raise APIError(507, f"model `{model.name}` can never be loaded here: {never} "
                           f"(--memory-budget {budget})", type="server_error", code="model_too_large")

        def loaded() -> list[RoutedModel]:
            return [m for m in self.models.values() if m is not model and m.status in ("loaded", "loading")]

        def shortfall() -> str | None:
            if len(loaded()) + 1 > self.models_max:
                return f"{self.models_max} models loaded (--models-max)"
            held: dict[str, int] = {}
            for m in loaded():
                for device, n in (m.need or {}).items():
                    held[device] = held.get(device, 0) + n
            return budget.shortfall(need, held, margin=MEMORY_MARGIN)

        while (why := shortfall()) is not None:
            idle = [m for m in loaded() if m.status == "loaded" and not m.busy]
            if not idle:
                if not loaded():  # nothing to free: this machine cannot hold it now
                    raise APIError(507, f"model `{model.name}` does not fit now: {why}", type="server_error",
                                   code="model_too_large")
                raise APIError(503, f"no room to load `{model.name}` ({why}): the loaded models are answering "
                               "requests", type="server_error", code="models_busy", headers={"Retry-After": "2"})
            victim = min(idle, key=lambda m: m.state.last_used)
            log.info("unloading %s to make room for %s", victim.name, model.name)
            await victim.state.unload_now()

    # --- the routes of the router itself ---------------------------------------------------------
    def _card(self, m: RoutedModel) -> dict[str, Any]:
        status: dict[str, Any] = {"value": m.status}
        if m.state.load_error is not None:
            status["failed_reason"] = without_dirs(str(m.state.load_error))
        progress = m.state.load_progress
        if progress is not None and status["value"] == "loading":  # llama-server's router payload
            status["progress"] = progress
        aliases = sorted({*m.aliases, *(name for table in (self.aliases, self.copies)
                                          for name, c in table.items() if c is m)})
        card = {"id": m.name, "aliases": aliases, "object": "model", "created": self.created, "owned_by": "pyllama",
                "path": m.path.name, "status": status}
        if m.need is not None:  # measured at its first load: bytes per device
            card["memory"] = dict(m.need)
        return card

    async def _list(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _answer(send, 200, {"object": "list", "data": [self._card(m) for m in self.models.values()]})

    def _unknown(self, name: object) -> APIError:
        return APIError(404, f"the model `{name}` does not exist here; models: {', '.join(self.models)}",
                        param="model", code="model_not_found")

    async def _one(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"][len("/v1/models/"):]
        model = self._named(name)
        if model is None:
            await _answer(send, 404, self._unknown(name).body())
            return
        await _answer(send, 200, self._card(model))

    async def _props(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /props`` naming no model: the router's own, in llama-server's router shape."""
        from .props import build_info

        await _answer(send, 200, {"role": "router", "max_instances": self.models_max,
                                  "models_autoload": self.autoload, "model_alias": "pyllama", "model_path": "none",
                                  "default_generation_settings": {"params": {}, "n_ctx": 0},
                                  "build_info": build_info()})

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .._version import __version__  # (Ollama's clients ask it first, naming no model)

        await _answer(send, 200, {"version": __version__})

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _answer(send, 200, {"status": "ok"})

    def _ollama_card(self, m: RoutedModel) -> dict[str, Any]:
        from ..gguf_check import header_facts
        from .ollama_models import details

        facts = m.state.model_facts if m.state.engine is not None else None
        if facts is None:
            head = header_facts(m.path) or {}
            facts = {"path": m.path, "architecture": head.get("architecture") or "", "n_params": 0,
                     "file_type": head.get("file_type")}
        st = m.path.stat()
        return {"name": m.name, "model": m.name, "size": st.st_size, "digest": "",
                "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
                "details": details(facts)}

    async def _tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .ollama import variants

        def cards() -> list[dict[str, Any]]:
            out = [self._ollama_card(m) for m in self.models.values()]
            for name, m in self.copies.items():  # Ollama lists a copy as a model of its own
                card = self._ollama_card(m)
                card["name"] = card["model"] = name
                card["details"]["parent_model"] = variants(m.state)[name].parent
                out.append(card)
            return out

        await _answer(send, 200, {"models": await asyncio.to_thread(cards)})

    async def _ps(self, scope: Scope, receive: Receive, send: Send) -> None:
        loaded = [m for m in self.models.values() if m.status == "loaded"]
        cards = await asyncio.to_thread(lambda: [self._ollama_card(m) for m in loaded])
        for card, m in zip(cards, loaded):
            engine = m.state.engine
            card.update({"expires_at": "2100-01-01T00:00:00Z", "size_vram": 0,
                         "context_length": engine.n_ctx_slot if engine is not None else 0})
        await _answer(send, 200, {"models": cards})

    async def _model_of_body(self, scope: Scope, receive: Receive, send: Send) -> RoutedModel | None:
        body = await _read_body(receive, ROUTER_MAX_BODY)
        if body is None:
            await _answer(send, 413, _error_body(scope, APIError(413, "the request body is too large")))
            return None
        name = await _model_field(body)  # (off the event loop when the body is large)
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            await _answer(send, 404 if name else 400, _error_body(scope, APIError(
                404 if name else 400, f"no model `{name}` here (models: {', '.join(self.models)})" if name
                else "which model? (`model` names one of: " + ", ".join(self.models) + ")", param="model")))
        return model

    async def _load(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = await self._model_of_body(scope, receive, send)
        if model is None:
            return
        try:
            await model.state.ensure_engine()
        except APIError as err:
            await _answer(send, err.status, err.body())
            return
        await _answer(send, 200, {"success": True, **self._card(model)})

    async def _unload(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = await self._model_of_body(scope, receive, send)
        if model is None:
            return
        model.state.request_unload()  # once nothing is being answered
        if model.state.engine is not None:
            self._spawn(self._force_unload(model))
        await _answer(send, 200, {"success": True})

    async def _force_unload(self, model: RoutedModel) -> None:
        """After the model's stop timeout, an unload still waiting for requests cancels them (llama-server
        terminates the model's process then)."""
        await asyncio.sleep(model.stop_timeout)
        s = model.state
        if s._unload_requested and s.engine is not None and s._active:
            log.info("model %s: its requests still run %g s after the unload was asked for: cancelled", model.name,
                     model.stop_timeout)
            s._cancel_active()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- Ollama's copy and create: more names for a routed model ----------------------------------
    async def _ollama_call(self, scope: Scope, receive: Receive, send: Send,
                           handle: Callable[[bytes], Awaitable[Any]]) -> None:
        from .errors import ollama_error_response

        body = await _read_body(receive, ROUTER_MAX_BODY)
        try:
            if body is None:
                raise APIError(413, "the request body is too large")
            response = await handle(body)
        except APIError as err:
            response = ollama_error_response(err)
        await response(scope, receive, send)

    def _name_free(self, name: str) -> None:
        if name in self.models or name in self.aliases:
            raise APIError(400, f"`{name}` names a model this server serves: choose another name", param="model")

    def _add_copy(self, name: str, model: RoutedModel, variant: Any) -> None:
        from .ollama import variants

        old = self.copies.pop(name, None)
        if old is not None:
            variants(old.state).pop(name, None)
        self.copies[name] = model
        variants(model.state)[name] = variant

    async def _ollama_copy(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import Response

        from .ollama import Variant, variants
        from .ollama_models import read_copy

        async def handle(body: bytes) -> Response:
            req = read_copy(body)
            model = self._named(req.source)
            if model is None:
                raise APIError(404, f"model '{req.source}' not found", param="source")
            if req.destination != req.source:
                self._name_free(req.destination)
                self._add_copy(req.destination, model,
                               variants(model.state).get(req.source) or Variant(parent=model.name))
            return Response(status_code=200)

        await self._ollama_call(scope, receive, send, handle)

    async def _ollama_create(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import Response

        from .ollama import variants
        from .ollama_models import created, new_variant, read_create

        async def handle(body: bytes) -> Response:
            req, name, parent = read_create(body)
            model = self._named(parent)
            if model is None:
                raise APIError(404, f"model '{parent}' not found", param="from")
            self._name_free(name)
            self._add_copy(name, model, new_variant(req, parent, variants(model.state).get(parent)))
            return created(req.stream)

        await self._ollama_call(scope, receive, send, handle)

    async def _ollama_push(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .ollama_models import push_refused

        async def handle(body: bytes) -> Any:
            raise push_refused()

        await self._ollama_call(scope, receive, send, handle)

    # --- the description ------------------------------------------------------------------------------
    def described(self) -> list[tuple[Sequence[str], str, Doc]]:
        """What ``/openapi.json`` describes (:mod:`.router_doc`)."""
        from .router_doc import router_routes

        return router_routes(self._own, self._names())

    def _names(self) -> tuple[str, ...]:
        """Every name a request may give a model: its own, its aliases, Ollama's copies."""
        return tuple(sorted({*self.models, *self.aliases, *self.copies}))

    async def _openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .openapi import document

        names = self._names()
        if self._document is None or self._document[0] != names:  # models come and go (pulls, deletes)
            table = self.described()
            doc = await asyncio.to_thread(document, table, secured=bool(self.api_keys),
                                          title="pyllama serve (several models)")
            self._document = names, sse.dumps(doc)
        await _send_json(send, 200, self._document[1])

    # --- the store: models pulled while the server runs, and deleted ---------------------------------
    async def _ollama_pull(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ollama's pull: the store's, then the model is served under the name pulled."""
        from starlette.requests import Request

        from .ollama_models import pull

        response = await pull(None, Request(scope, receive), on_pulled=self._pulled)
        await response(scope, receive, send)

    async def _pull_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """llama-server's ``POST /models {"model": REF}``: pulled into the store, then served. The answer
        comes once the file is verified (llama-server answers first and shows ``downloading``)."""
        from ..store import pull
        from .ollama_models import store_error

        body = await _read_body(receive, 1 << 20)
        name = await _model_field(body) if body is not None else None
        try:
            if not isinstance(name, str) or not name:
                raise APIError(400, "`model` must name the model to pull (hf:org/repo:QUANT, a URL)", param="model")
            if self._named(name) is not None:
                raise APIError(400, f"model `{name}` already exists", param="model")
            try:
                path = await asyncio.to_thread(pull, name)
            except Exception as exc:  # noqa: BLE001 - the store's errors, each as its status
                raise store_error(exc, name, "pull") from None
            await self._pulled(name, path)
        except APIError as err:
            await _answer(send, err.status, err.body())
            return
        await _answer(send, 200, {"success": True, **self._card(self.models[name])})

    async def _pulled(self, name: str, path: Path) -> None:
        if self._named(name) is not None:
            return
        same = next((m for m in self.models.values() if m.path == path), None)
        if same is not None:  # served already under another name (the store's reference): this one too
            self.aliases[name] = same
        else:
            await self._add(name, path, from_store=True)

    async def _from_store(self, name: str) -> RoutedModel | None:
        """The routed model of a reference the store holds (pulled by another process, or named otherwise than
        it was pulled), added on its first request; None when the store does not hold it."""
        from ..store import is_reference, resolve

        if not is_reference(name):
            return None
        try:
            path = await asyncio.to_thread(resolve, name, offline=True)
        except Exception:  # noqa: BLE001 - not in the store (or not a valid reference): not a model here
            return None
        await self._pulled(name, Path(path))
        return self._named(name)

    async def _add(self, name: str, path: Path, *, from_store: bool) -> RoutedModel:
        from ..store import projector_for

        if self.add_model is None:
            raise APIError(400, "this server serves the models it started with", param="model")
        if name in self.models or name in self.aliases or name in self.copies:
            raise APIError(400, f"`{name}` names a model this server serves already", param="model")
        try:
            projector = await asyncio.to_thread(projector_for, path)
        except Exception:  # noqa: BLE001 - a file outside the cache has no projector
            projector = None
        model = self.add_model(name, path, projector)
        model.from_store = from_store
        model.state.before_load = self._before_load(model)
        if self._started:
            cm = model.state.lifespan(model.app)
            await cm.__aenter__()
            self._lifespans[name] = cm
        self.models[name] = model
        log.info("serving %s (%s)", name, path.name)
        return model

    async def _remove(self, model: RoutedModel) -> None:
        if model.busy:
            raise APIError(409, f"model `{model.name}` is answering requests: unload it first (POST /models/unload)",
                           param="model", code="model_busy")
        del self.models[model.name]
        for table in (self.aliases, self.copies):
            for alias in [a for a, m in table.items() if m is model]:
                del table[alias]
        await model.state.unload_now()
        cm = self._lifespans.pop(model.name, None)
        if cm is not None:
            await cm.__aexit__(None, None, None)
        log.info("no longer serving %s", model.name)

    async def _delete(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ollama's ``DELETE /api/delete {"model"}`` and llama-server's ``DELETE /models?model=``: a name made
        by copy or create is forgotten; a model of the store stops being served and leaves the store; a
        file this server was started with is refused (the server deletes no file it was given)."""
        from starlette.responses import Response

        from ..store import remove
        from .ollama import variants
        from .ollama_models import store_error

        ollama = scope["path"] == "/api/delete"
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        name: object = (query.get("model") or [None])[0]
        if name is None:
            body = await _read_body(receive, 1 << 20)
            name = await _model_field(body) if body is not None else None
            if name is None and body:
                with contextlib.suppress(ValueError, AttributeError):
                    name = json.loads(body).get("name")  # Ollama's older field
        try:
            if not isinstance(name, str) or not name:
                raise APIError(400, "`model` must name the model to delete", param="model")
            if name in self.copies:
                parent = self.copies.pop(name)
                variants(parent.state).pop(name, None)
            else:
                model = self._named(name)
                if model is not None and not model.from_store:
                    raise APIError(400, f"model `{model.name}` is a file this server was started with: it is not "
                                   "deleted (remove it from --models-dir, --models or the preset)", param="model")
                if model is not None:
                    await self._remove(model)
                ref = model.name if model is not None else name
                try:
                    removed = await asyncio.to_thread(remove, ref)
                except Exception as exc:  # noqa: BLE001 - the store's errors, each as its status
                    if model is None:
                        raise store_error(exc, ref, "delete") from None
                    removed = []  # served from the store, then removed by someone else: gone all the same
                if model is None and not removed:
                    raise APIError(404, f"model '{ref}' not found", param="model")
        except APIError as err:
            await _answer(send, err.status, _error_body(scope, err))
            return
        if ollama:
            await Response(status_code=200)(scope, receive, send)
        else:
            await _answer(send, 200, {"success": True})

    # --- dispatch ---------------------------------------------------------------------------------
    def _named(self, name: object) -> RoutedModel | None:
        if not isinstance(name, str):
            return None
        if name in self.models:
            return self.models[name]
        if name in self.aliases:
            return self.aliases[name]
        if name in self.copies:
            return self.copies[name]
        for m in self.models.values():  # the file's name or stem also names it
            if name in (m.path.name, m.path.stem):
                return m
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if self.api_keys and path not in PUBLIC and method != "OPTIONS" \
                and not authorized(scope, self.api_keys):
            err = APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
            await error_response_for(path)(err)(scope, receive, send)
            return
        own = self._own.get((method, path))
        if own is None and method == "GET" and path.startswith("/v1/models/"):  # OpenAI's retrieve
            own = self._one
        if own is not None:
            await own(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        name: object = (query.get("model") or [None])[0]
        if name is None and method == "GET" and path == "/props":  # llama-server's router answers for itself
            await self._props(scope, receive, send)
            return
        body: bytes | None = None
        if name is None and method in ("POST", "PUT", "DELETE", "PATCH"):
            body = await _read_body(receive, ROUTER_MAX_BODY)
            if body is None:
                await error_response_for(path)(APIError(413, "the request body is too large"))(scope, receive, send)
                return
            name = await _model_field(body)
        model = self._named(name)
        if model is None and self.store and isinstance(name, str):
            model = await self._from_store(name)
        if model is None and name is None and len(self.models) == 1:
            model = next(iter(self.models.values()))
        if model is None and name is None and method == "OPTIONS":
            model = next(iter(self.models.values()))  # a CORS preflight: any model's app answers it
        if model is None:
            if name is None:
                err = APIError(400, "this server serves several models: name one (`model` in the body, or "
                               f"?model=): {', '.join(self.models)}", param="model", code="model_required")
            else:
                err = self._unknown(name)
            await error_response_for(path)(err)(scope, receive, send)
            return
        autoload = self.autoload if "autoload" not in query else query["autoload"][0] in ("true", "1")
        if not autoload and model.state.engine is None:  # (llama-server's ?autoload= overrides the flag)
            err = APIError(400, f"the model `{model.name}` is not loaded (POST /models/load; the server runs "
                           "without --models-autoload)", param="model", code="model_not_loaded")
            await error_response_for(path)(err)(scope, receive, send)
            return
        await model.app(scope, _replay(body, receive) if body is not None else receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        async with contextlib.AsyncExitStack() as stack:
            try:
                for m in self.models.values():
                    await stack.enter_async_context(m.state.lifespan(m.app))
            except BaseException as exc:  # noqa: BLE001 - told to the server, which stops
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
            self._started = True
            for m in self.models.values():
                if m.load_on_startup:
                    self._spawn(self._load_at_start(m))
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            for m in self.models.values():
                m.state.shutdown_soon(0.0)
            for cm in reversed(list(self._lifespans.values())):  # the models added while it ran
                await cm.__aexit__(None, None, None)
            self._lifespans.clear()
        await send({"type": "lifespan.shutdown.complete"})

    async def _load_at_start(self, m: RoutedModel) -> None:
        try:
            await m.state.ensure_engine()
        except Exception as exc:  # noqa: BLE001 - the model's status says it failed
            log.error("loading %s at startup failed: %s", m.name, exc)

    def shutdown_soon(self, grace: float) -> None:
        for m in self.models.values():
            m.state.shutdown_soon(grace)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _model_field(body: bytes) -> object:
    """The body's ``model`` (parsed off the event loop when the body is large: it may be megabytes)."""
    def parse() -> object:
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        return value.get("model") if isinstance(value, dict) else None

    if len(body) > 64 << 10:
        return await asyncio.to_thread(parse)
    return parse()


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the client's disconnect, when it comes
    return replay


async def _answer(send: Send, status: int, obj: Any) -> None:
    await _send_json(send, status, sse.dumps(obj))


async def _send_json(send: Send, status: int, data: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _error_body(scope: Scope, err: APIError) -> dict[str, Any]:
    return {"error": err.message} if scope["path"].startswith("/api/") else err.body()


__all__ = ["ModelRouter", "RoutedModel", "measure", "ROUTER_MAX_BODY"]
