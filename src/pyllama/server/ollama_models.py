"""Ollama's model routes: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version`` (what this server
serves) and ``/api/pull``, ``/api/delete`` (the model store), in Ollama's shapes; errors and streams as
:mod:`.ollama` writes them."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re
import threading
from pathlib import Path
from typing import Any, AsyncGenerator

from starlette.requests import Request
from starlette.responses import Response

from .._version import __version__
from .errors import api_error, ollama_error_response
from .ollama import error_answer, json_line, ndjson
from .protocol import APIError, _Request, parse_request
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
        return json_response({"models": [_card(server, digest)]})
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
        return json_response({"license": model.meta("general.license") or "", "modelfile": f"FROM {path.name}\n",
                      "parameters": "", "template": template,
                      "details": details(server.model_facts), "model_info": info, "capabilities": caps,
                      "modified_at": modified.isoformat()})
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


async def version(server: ServerState, request: Request) -> Response:
    return json_response({"version": __version__})


async def pull(server: ServerState, request: Request) -> Response:
    """``/api/pull``: the store's pull, its progress as Ollama's status stream."""
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
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "success", "path_name": path.name})
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    def refused(exc: BaseException) -> APIError:
        return _store_error(exc, ref, "pull model manifest")

    worker = threading.Thread(target=run, name="pyllama-ollama-pull", daemon=True)
    worker.start()
    if not req.stream:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                return ollama_error_response(refused(item))
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
                    yield json_line({"status": "success"})
                else:
                    yield json_line(item)
        finally:
            gone_flag.set()

    return ndjson(frames(), "pull")


def _store_error(exc: BaseException, ref: str, what: str) -> APIError:
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
        try:
            removed = await asyncio.to_thread(remove, ref)
        except Exception as exc:  # noqa: BLE001 - the store's errors, each as its status
            raise _store_error(exc, ref, "delete") from None
        if not removed:
            raise APIError(404, f"model '{ref}' not found", param="model")
        return Response(status_code=200)
    except Exception as exc:  # noqa: BLE001 - every error in Ollama's shape
        return error_answer(request, exc)


__all__ = ["OllamaModelRequest", "tags", "ps", "show", "version", "pull", "delete", "details"]
