"""Ollama's model routes: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version`` (what this server
serves), ``/api/pull``, ``/api/delete`` (the model store), ``/api/copy`` and ``/api/create`` (more names for the
served model, kept while the server runs: a copy, or a model made ``from`` it with its own ``system`` prompt,
default ``parameters``, ``messages`` and ``license``; what needs new weights or a Go template is refused) and
``/api/push`` (501: there is no registry to push to), in Ollama's shapes; errors and streams as
:mod:`.ollama` writes them."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any, AsyncGenerator, Awaitable, Callable, Union

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from .._version import __version__
from .errors import api_error, ollama_error_response
from .ollama import (_OPTIONS, OllamaMessage, Variant, _chat_request, _messages, error_answer, json_line, ndjson,
                     variants)
from .protocol import APIError, ChatMessage, _Request, parse_request
from .responses import json_response
from .state import ServerState


class OllamaModelRequest(_Request):
    """``/api/show``, ``/api/pull``, ``/api/delete``: a model by ``model`` (or its older name ``name``)."""

    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False
    verbose: bool = False

    def ref(self) -> str:
        ref = self.model or self.name
        if not ref:
            raise APIError(400, "model is required", param="model")
        return ref



class OllamaCopyRequest(_Request):
    source: str
    destination: str


class OllamaCreateRequest(_Request):
    """``/api/create``: a new ``model`` ``from`` a served one (Ollama's fields; those pyllama cannot honour are
    refused by name)."""

    model: str | None = None
    name: str | None = None  # the older spelling of model
    from_: str | None = Field(default=None, alias="from")
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[OllamaMessage] | None = None
    license: Union[str, list[str], None] = None
    template: str | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    modelfile: str | None = None
    path: str | None = None
    stream: bool = True


#: what /api/create cannot do here: the field, and why
_UNSUPPORTED_CREATE = {
    "files": "creating a model from uploaded GGUF files is not supported (create from a served model: `from`)",
    "adapters": "LoRA adapters are given when the server starts (--lora), not per created model",
    "quantize": "quantizing is not supported here (llama.cpp's llama-quantize makes quantized GGUF files)",
    "template": "a Go chat template is not supported (the model's own Jinja template is used)",
    "modelfile": "Modelfiles are not supported (give from, system, parameters, messages as fields)",
    "path": "Modelfiles are not supported (give from, system, parameters, messages as fields)",
}
#: Ollama's options that are fixed when a llama.cpp server loads its model
_LOAD_TIME = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "num_keep", "numa",
              "low_vram", "vocab_only", "use_mlock")


def read_copy(body: bytes) -> OllamaCopyRequest:
    req = parse_request(OllamaCopyRequest, body)
    for key in ("source", "destination"):
        if not getattr(req, key).strip():
            raise APIError(400, f"{key} is required", param=key)
    return req


def read_create(body: bytes) -> tuple[OllamaCreateRequest, str, str]:
    """The create request, the new name and the name it is made from (400 naming any field not supported)."""
    req = parse_request(OllamaCreateRequest, body)
    for key, why in _UNSUPPORTED_CREATE.items():
        if getattr(req, key):
            raise APIError(400, f"{key}: {why}", param=key, code="unsupported")
    name = (req.model or req.name or "").strip()
    if not name:
        raise APIError(400, "model is required", param="model")
    if not req.from_:
        raise APIError(400, "from is required: pyllama creates a model from a served one", param="from")
    return req, name, req.from_


def new_variant(req: OllamaCreateRequest, parent_name: str, parent: Variant | None) -> Variant:
    """The name ``req`` creates from ``parent_name`` (itself made by create or copy: ``parent``): its fields over
    the parent's, as Ollama layers a model over its FROM."""
    params = dict(req.parameters or {})
    for key in params:
        if key in _LOAD_TIME:
            raise APIError(400, f"parameters.{key}: fixed when the server loads the model (pyllama serve's flags), "
                           "not per created model", param=f"parameters.{key}", code="unsupported")
        if key not in _OPTIONS and key != "num_predict":
            raise APIError(400, f"parameters.{key}: not a parameter pyllama knows", param=f"parameters.{key}",
                           code="unsupported")
    try:  # checked as a request's options are
        _chat_request(req.model or "", [ChatMessage(role="user", content="")], options=params, fmt=None, tools=None,
                      think=None)
        _messages(list(req.messages or ()))
    except APIError as err:
        raise APIError(400, err.message.replace("options", "parameters", 1), param="parameters") from None
    license = "\n".join(req.license) if isinstance(req.license, list) else req.license
    base = parent or Variant(parent=parent_name)
    return Variant(parent=parent_name, system=req.system if req.system is not None else base.system,
                   options={**base.options, **params},
                   messages=tuple(req.messages) if req.messages is not None else base.messages,
                   license=license if license is not None else base.license)


def created(stream: bool) -> Response:
    """Ollama's answer to a create: its status lines, or ``{"status": "success"}``."""
    if not stream:
        return json_response({"status": "success"})

    async def frames() -> AsyncGenerator[bytes, None]:
        for status in ("using existing layer", "writing manifest", "success"):
            yield json_line({"status": status})

    return ndjson(frames(), "create")


def push_refused() -> APIError:
    return APIError(501, "pushing a model to a registry is not supported by this server (pyllama serves models "
                    "from files and the Hugging Face Hub; upload GGUF files there)", type="not_supported_error",
                    code="not_supported")


_DIGESTS: dict[tuple[str, int, float], str] = {}
_DIGEST_LOCK = threading.Lock()


def _digest(path: Path) -> str:
    """The file's sha256 (Ollama's digest of a model), computed once per file version."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    with _DIGEST_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    with _DIGEST_LOCK:
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _param_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


_QUANT = re.compile(r"(?:^|[-._])((?:I?Q\d+_[A-Z0-9_]+)|F16|BF16|F32|Q\d_\d)(?:[-._]|$)", re.IGNORECASE)


def details(facts: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``details`` from what the server knows of a model (``quantization_level`` from the file's
    name, else llama.cpp's description of the loaded model; empty where neither says)."""
    arch = facts["architecture"]
    m = _QUANT.search(Path(facts["path"]).stem)
    quant = m.group(1).upper() if m else str(facts.get("ftype_name") or "")
    n_params = int(facts.get("n_params") or 0)
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": _param_size(n_params) if n_params else "", "quantization_level": quant}


def _card(server: ServerState, digest: str) -> dict[str, Any]:
    facts = server.model_facts
    path = Path(facts["path"])
    modified = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return {"name": server.model_name, "model": server.model_name, "modified_at": modified.isoformat(),
            "size": path.stat().st_size, "digest": digest, "details": details(facts)}


async def tags(server: ServerState, request: Request) -> Response:
    """``/api/tags``: the model this server serves, loaded or not (listing never loads it)."""
    try:
        if server.engine is None and not server.unloaded:
            server.require_engine()  # still loading (503) or failed (500)
        digest = await asyncio.to_thread(_digest, Path(server.model_facts["path"]))
        cards = [_card(server, digest)]
        for name, v in variants(server).items():  # Ollama lists a copy as a model of its own
            card = _card(server, digest)
            card["name"] = card["model"] = name
            card["details"]["parent_model"] = v.parent
            cards.append(card)
        return json_response({"models": cards})
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def ps(server: ServerState, request: Request) -> Response:
    """``/api/ps``: the model, when it is loaded, with its context and when it will be freed."""
    try:
        engine = server.engine
        if engine is None:
            return json_response({"models": []})
        digest = await asyncio.to_thread(_digest, Path(str(engine.model.path)))
        after = server.unload_after
        expires = (datetime.datetime.now(datetime.timezone.utc)
                   + datetime.timedelta(seconds=after if after is not None else 10 * 365 * 86400))
        return json_response({"models": [{**_card(server, digest), "expires_at": expires.isoformat(),
                                  "size_vram": 0, "context_length": engine.n_ctx_slot}]})
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def show(server: ServerState, request: Request) -> Response:
    """``/api/show``: the served model's details, metadata, template and capabilities."""
    try:
        req = parse_request(OllamaModelRequest, await request.body())
        name = req.ref()
        engine = await server.ensure_engine()
        variant = variants(server).get(name)
        if variant is None:
            try:
                server.find_model(name)
            except APIError:
                raise APIError(404, f"model '{name}' not found", param="model") from None
        model = engine.model
        arch = model.architecture
        info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": model.n_params,
                                f"{arch}.context_length": model.n_ctx_train, f"{arch}.embedding_length": model.n_embd}
        fmt = server.prompter.format
        template = fmt.source if fmt is not None else (server.chat_template or model.chat_template() or "")
        caps = ["completion"]
        if fmt is not None and fmt.caps.get("tool_calls"):
            caps.append("tools")
        from ..infill import infill_support
        if infill_support(model) is None:
            caps.append("insert")
        if "enable_thinking" in template or "<think>" in template:  # the templates that can think say so
            caps.append("thinking")
        if engine.embeddings:
            caps.append("embedding")
        if "image" in engine.modalities:
            caps.append("vision")
        if "audio" in engine.modalities:
            caps.append("audio")
        path = Path(str(model.path))
        modified = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        shown: dict[str, Any] = {"license": model.meta("general.license") or "", "modelfile": f"FROM {path.name}\n",
                 "parameters": "", "template": template, "details": details(server.model_facts), "model_info": info,
                 "capabilities": caps, "modified_at": modified.isoformat()}
        if variant is not None:
            shown.update(_variant_fields(variant))
            shown["details"]["parent_model"] = variant.parent
        return json_response(shown)
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


def _parameter_lines(options: dict[str, Any]) -> list[str]:
    """Ollama's ``parameters`` text: one ``name value`` a line (a stop list: one line per stop)."""
    lines = []
    for key, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key} {json.dumps(v) if isinstance(v, str) else v}")
    return lines


def _variant_fields(v: Variant) -> dict[str, Any]:
    """What ``/api/show`` tells of a name made by create or copy."""
    params = _parameter_lines(dict(v.options))
    modelfile = [f"FROM {v.parent}"] + [f"PARAMETER {line}" for line in params]
    if v.system is not None:
        modelfile.append(f'SYSTEM """{v.system}"""')
    for m in v.messages:
        modelfile.append(f'MESSAGE {m.role} """{m.content}"""')
    out: dict[str, Any] = {"modelfile": "\n".join(modelfile) + "\n", "parameters": "\n".join(params)}
    if v.system is not None:
        out["system"] = v.system
    if v.messages:
        out["messages"] = [m.model_dump(exclude_none=True) for m in v.messages]
    if v.license is not None:
        out["license"] = v.license
    return out


def _served_name(server: ServerState, name: str) -> bool:
    return name == server.model_name or name in server.model_aliases or name in server.aliases


async def copy(server: ServerState, request: Request) -> Response:
    """``/api/copy``: ``destination`` names the served model too (with what ``source`` had, if create made it)."""
    try:
        req = read_copy(await request.body())
        table = variants(server)
        if req.source in table:
            variant = table[req.source]
        elif _served_name(server, req.source):
            variant = Variant(parent=req.source)
        else:
            raise APIError(404, f"model '{req.source}' not found", param="source")
        if req.destination != req.source:
            if _served_name(server, req.destination):
                raise APIError(400, f"`{req.destination}` names the served model itself: choose another name",
                               param="destination")
            table[req.destination] = variant
        return Response(status_code=200)
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def create(server: ServerState, request: Request) -> Response:
    """``/api/create`` from the served model (or a name made from it): a new name whose requests get its system
    prompt, default parameters and messages."""
    try:
        req, name, parent = read_create(await request.body())
        table = variants(server)
        if parent not in table and not _served_name(server, parent):
            raise APIError(404, f"model '{parent}' not found", param="from")
        if _served_name(server, name):
            raise APIError(400, f"`{name}` names the served model itself: choose another name", param="model")
        table[name] = new_variant(req, parent, table.get(parent))
        return created(req.stream)
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def push(server: ServerState, request: Request) -> Response:
    """``/api/push``: 501, there is no registry to push to."""
    return ollama_error_response(push_refused())


async def version(server: ServerState, request: Request) -> Response:
    return json_response({"version": __version__})


async def pull(server: ServerState | None, request: Request, *,
               on_pulled: Callable[[str, Path], Awaitable[None]] | None = None) -> Response:
    """``/api/pull``: the store's pull, its progress as Ollama's status stream; ``on_pulled(ref, path)``
    runs before the success is told (the router serves the model from then on)."""
    from ..store import DownloadProgress, InvalidReferenceError
    from ..store import pull as store_pull

    from ..starter import STARTERS
    from ..store import parse_reference

    try:
        req = parse_request(OllamaModelRequest, await request.body())
        ref = req.ref()
        if ref not in STARTERS:  # a name the store cannot resolve is refused before any stream
            try:
                parse_reference(ref)
            except InvalidReferenceError as exc:
                raise APIError(404, f"pull model manifest: {exc}", param="model") from None
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
    gone_flag = threading.Event()

    def report(p: DownloadProgress) -> bool:
        loop.call_soon_threadsafe(queue.put_nowait, {"status": f"pulling {p.filename}", "digest": p.filename,
                                                     "total": p.total or 0, "completed": p.done})
        return not gone_flag.is_set()  # False cancels the download (the client went away)

    def run() -> None:
        try:
            path = store_pull(ref, progress=report)
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "verifying sha256 digest"})
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "success", "path": path})
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    def refused(exc: BaseException) -> APIError:
        return store_error(exc, ref, "pull model manifest")

    worker = threading.Thread(target=run, name="pyllama-ollama-pull", daemon=True)
    worker.start()
    async def pulled(path: Path) -> BaseException | None:
        try:
            if on_pulled is not None:
                await on_pulled(ref, path)
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            return exc
        return None

    if not req.stream:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                return ollama_error_response(refused(item))
            if item is not None and item.get("status") == "success" and (failed := await pulled(item["path"])):
                return ollama_error_response(refused(failed))
            if item is None:
                return json_response({"status": "success"})

    async def frames() -> AsyncGenerator[bytes, None]:
        try:
            yield json_line({"status": "pulling manifest"})
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    yield json_line({"error": refused(item).message})
                    return
                if item.get("status") == "success":
                    failed = await pulled(item["path"])
                    yield json_line({"error": refused(failed).message} if failed else {"status": "success"})
                else:
                    yield json_line(item)
        finally:
            gone_flag.set()

    return ndjson(frames(), "pull")


def store_error(exc: BaseException, ref: str, what: str) -> APIError:
    """A model-store failure as Ollama's answer: a name the store cannot find or resolve is a 404, a full disk
    a 507, a download that failed upstream a 502; the message never shows where the cache lies."""
    from ..store import (InsufficientSpaceError, InvalidReferenceError, ModelNotFoundError, NotCachedError,
                         StoreError)

    if isinstance(exc, (InvalidReferenceError, ModelNotFoundError, NotCachedError)):
        return APIError(404, f"{what}: model '{ref}' not found", param="model")
    if isinstance(exc, InsufficientSpaceError):
        return APIError(507, f"{what}: not enough disk space for '{ref}'", type="server_error")
    if isinstance(exc, StoreError):
        return APIError(502, f"{what}: {exc}", type="server_error")
    return api_error(exc)


async def delete(server: ServerState, request: Request) -> Response:
    """``/api/delete``: remove a model from the store (404 when the store does not hold it)."""
    from ..store import remove

    try:
        req = parse_request(OllamaModelRequest, await request.body())
        ref = req.ref()
        if variants(server).pop(ref, None) is not None:  # a name made by copy or create: forgotten
            return Response(status_code=200)
        try:
            removed = await asyncio.to_thread(remove, ref)
        except Exception as exc:  # noqa: BLE001 - the store's errors, each as its status
            raise store_error(exc, ref, "delete") from None
        if not removed:
            raise APIError(404, f"model '{ref}' not found", param="model")
        return Response(status_code=200)
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


__all__ = ["store_error", "OllamaModelRequest", "OllamaCopyRequest", "OllamaCreateRequest", "tags", "ps", "show", "version", "pull",
           "delete", "copy", "create", "push", "details", "read_copy", "read_create", "new_variant", "created",
           "push_refused"]
