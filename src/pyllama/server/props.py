"""llama-server's server properties and slot monitor: ``GET/POST /props``, ``GET /slots``, ``POST /slots/{id}``.

The shapes are llama-server's (server-context.cpp's ``get_res_props`` and ``server_slot::to_json``),
filled from the engine, its model and what the server saw of each slot's requests. ``POST /props``
answers only with ``--props`` (else 501, as llama-server); ``GET /slots`` is on unless ``--no-slots``.
Saving and restoring a slot's cache (``POST /slots/{id}?action=...``) is not supported: 501.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .._version import __version__
from ..engine.front import check_slot
from ..errors import StateError
from ..media import MARKER
from . import params
from .paths import confined
from .protocol import APIError, SlotActionRequest, parse_request
from .responses import json_response
from .state import ServerState

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest


def build_info() -> str:
    """llama-server's ``build_info`` (``b<build>-<commit>``) for the vendored llama.cpp, as far as known."""
    try:
        from .._ffi import build_info as info

        bi = info()
    except Exception:  # noqa: BLE001
        return f"pyllama-{__version__}"
    number = bi.get("llama_build_number") or bi.get("build_number")
    commit = bi.get("llama_commit") or bi.get("commit") or ""
    if number:
        return f"b{number}-{commit}" if commit else f"b{number}"
    return f"pyllama-{__version__}" + (f"-{commit}" if commit else "")


def _token_text(engine: Engine, token: int | None) -> str:
    if token is None:
        return ""
    try:
        return engine.model.vocab.text(token)
    except Exception:  # noqa: BLE001
        return ""


async def get_props(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()  # an unloaded model (keep_alive) loads again
    fmt = server.prompter.format
    template = fmt.source if fmt is not None else (server.chat_template or engine.model.chat_template() or "")
    vocab = engine.model.vocab
    return json_response({
        "default_generation_settings": {"params": params.native_settings(None, server.defaults),
                                        "n_ctx": engine.n_ctx_slot},
        "total_slots": engine.n_slots,
        "model_alias": server.model_name,
        "model_path": str(engine.model.path),
        "modalities": {"vision": "image" in engine.modalities, "video": False, "audio": "audio" in engine.modalities},
        "media_marker": MARKER,  # where /completion's prompt_string holds each of its multimodal_data
        "endpoint_slots": server.slots_enabled,
        "endpoint_props": server.props_enabled,
        "endpoint_metrics": server.metrics_enabled,
        "ui": False,
        "chat_template": template,
        "chat_template_caps": fmt.caps if fmt is not None else {},
        "bos_token": _token_text(engine, vocab.bos),
        "eos_token": _token_text(engine, vocab.eos),
        "build_info": build_info(),
        "is_sleeping": False,
    })


async def post_props(server: ServerState, request: Request) -> Response:
    if not server.props_enabled:
        raise APIError(501, "This server does not support changing global properties. Start it with `--props`",
                       type="not_supported_error", code="not_supported")
    if not server.unloaded:  # loading (503) or failed (500) as every request then; an unloaded model stays so
        server.require_engine()
    return json_response({"success": True})  # as llama-server: nothing can be changed yet


def _slot(server: ServerState, engine: Engine, slot_id: int, running: EngineRequest | None) -> dict[str, Any]:
    d: dict[str, Any] = {"id": slot_id, "n_ctx": engine.n_ctx_slot,
                         "speculative": getattr(engine, "draft", None) is not None,
                         "is_processing": running is not None}
    last = server.slot_last.get(slot_id)
    er = running if running is not None else (last[0] if last is not None else None)
    if er is None:
        return d
    settings = server.settings.get(er) if running is not None else (last[1] if last is not None else None)
    limit = (settings or {}).get("n_predict", -1)
    d.update({
        "id_task": er.id, "n_prompt_tokens": er.n_prompt,
        "n_prompt_tokens_processed": max(0, er.n_prompt - er.n_cached),
        "n_prompt_tokens_cache": er.n_cached, "params": settings or {},
        "next_token": [{
            "has_next_token": running is not None, "has_new_line": "\n" in er.text,
            "n_remain": limit - er.n_generated if running is not None and limit >= 0 else -1,
            "n_decoded": er.n_generated if running is not None else 0,
        }],
    })
    try:
        d["prompt"] = engine.model.vocab.detokenize(er.prompt_tokens, unparse_special=True)
    except Exception:  # noqa: BLE001
        d["prompt"] = ""
    d["generated"] = er.text
    return d


async def get_slots(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()  # an unloaded model (keep_alive) loads again
    if not server.slots_enabled:
        raise APIError(501, "This server does not support slots endpoint. Start it with `--slots`",
                       type="not_supported_error", code="not_supported")
    running = server.running_by_slot()
    slots: list[dict[str, Any]]
    if running is None:  # an engine that does not say which slot serves a request: the busy count only
        busy = engine.stats().busy_slots
        slots = [{"id": i, "n_ctx": engine.n_ctx_slot, "speculative": getattr(engine, "draft", None) is not None,
                  "is_processing": i < busy} for i in range(engine.n_slots)]
    else:
        slots = [_slot(server, engine, i, running.get(i)) for i in range(engine.n_slots)]
    if request.query_params.get("fail_on_no_slot") and all(s["is_processing"] for s in slots):
        raise APIError(503, "no slot available", type="unavailable_error", code="unavailable")
    return json_response(slots)


async def post_slot(server: ServerState, request: Request) -> Response:
    """``POST /slots/{id}?action=save|restore|erase``: a slot's cache to and from ``--slot-save-path``, as
    llama-server (the action waits until the slot serves no request)."""
    engine = await server.ensure_engine()  # an unloaded model (keep_alive) loads again
    if server.slot_save_path is None:
        raise APIError(501, "This server does not support slots action. Start it with `--slot-save-path`",
                       type="not_supported_error", code="not_supported")
    try:
        slot = int(request.path_params["id_slot"])
        check_slot(slot, engine.n_slots)
    except ValueError:
        raise APIError(400, "Invalid slot ID", param="id_slot", code="invalid_value") from None
    action = request.query_params.get("action", "")
    if action == "erase":
        n = await server.waiting(engine.erase_slot, slot)
        return json_response({"id_slot": slot, "n_erased": n})
    if action not in ("save", "restore"):
        raise APIError(400, "Invalid action", param="action", code="invalid_value")
    name = parse_request(SlotActionRequest, await request.body()).filename
    path = confined(server.slot_save_path, name)
    try:
        if action == "save":
            done = await server.waiting(engine.save_slot, slot, path)
        else:
            if not path.is_file():
                raise APIError(400, f"Unable to restore slot: no file {name!r}", param="filename",
                               code="invalid_value")
            done = await server.waiting(engine.restore_slot, slot, path)
    except (StateError, OSError) as exc:  # messages name the file as the client did, not where it lies
        message = str(exc).replace(str(path), name).replace(str(server.slot_save_path), "")
        if action == "save":
            raise APIError(500, f"Unable to save slot: {message}", type="server_error") from None
        raise APIError(400, f"Unable to restore slot: {message}", param="filename", code="invalid_value") from None
    timing = {"save_ms": done.ms} if action == "save" else {"restore_ms": done.ms}
    counts = {"n_saved": done.n_tokens, "n_written": done.n_bytes} if action == "save" else \
        {"n_restored": done.n_tokens, "n_read": done.n_bytes}
    return json_response({"id_slot": slot, "filename": name, **counts, "timings": timing})


__all__ = ["get_props", "post_props", "get_slots", "post_slot", "build_info"]
