"""``POST /completion`` (and ``/completions``): llama-server's native completion, in its shapes.

A thin translation of llama-server's request (server-schema.cpp's fields: ``n_predict``, ``samplers``,
``n_probs``, ``grammar``/``json_schema``, ``logit_bias`` pairs, ...) onto engine requests, and of
the results back into its answer (server-task.cpp's ``to_json_non_oaicompat``): ``content``,
``tokens``, ``stop_type``, ``stopping_word``, ``timings``, ``completion_probabilities``. A prompt
may be a string, token ids, ids and strings mixed, ``{"prompt_string": ...}``, or a list of those:
one result each (a list answer), as may ``n`` choices of each; they run in parallel slots and
batch. Streamed, every token is one ``data: {...}`` event and the last one (``"stop": true``)
carries the timings; there is no ``[DONE]``, as in llama-server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any, AsyncGenerator, Sequence, cast

import numpy as np
import numpy.typing as npt
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..infill import InfillFile, infill_support, infill_tokens
from ..samplers import Grammar, Sampler
from ..engine.request import PromptProgress
from ..stream import TokenEvent
from . import params, sse
from .chat import checked_grammar, schema_grammar
from .errors import api_error
from .protocol import APIError, InfillRequest, NativeCompletionRequest, parse_request
from .responses import gone, json_response
from .state import ServerState

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest
    from ..model import Model

log = logging.getLogger("pyllama.server")

# engine finish reason -> llama-server's stop_type
_STOP_TYPE = {"eog": "eos", "stop": "word", "length": "limit", "context": "limit", "cancelled": "none"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def native_prompts(server: ServerState, engine: Engine, prompt: Any) -> list[Any]:
    """llama-server's prompt forms (tokenize_input_prompts): a list without token ids is several prompts. Each
    becomes its tokens, or with ``multimodal_data`` the engine's media prompt."""
    if isinstance(prompt, list) and not any(_is_int(p) for p in prompt):
        if not prompt:
            raise APIError(400, '"prompt" must not be empty', param="prompt")
        return [_subprompt(server, engine, p) for p in prompt]
    return [_subprompt(server, engine, prompt)]


def _subprompt(server: ServerState, engine: Engine, p: Any) -> Any:
    if isinstance(p, dict) and "prompt_string" in p:
        if "multimodal_data" in p:
            return _multimodal(engine, p["prompt_string"], p["multimodal_data"])
        p = p["prompt_string"]
    if isinstance(p, str):
        return mixed_tokens(server, engine, [p], add_special=True, parse_special=True)
    if isinstance(p, list) and all(_is_int(x) or isinstance(x, str) for x in p):
        return mixed_tokens(server, engine, p, add_special=True, parse_special=True)
    raise APIError(400, '"prompt" elements must be a string, a list of tokens, a JSON object containing a prompt '
                   "string, or a list of mixed strings & tokens.", param="prompt")


def _multimodal(engine: Engine, text: Any, data: Any) -> Any:
    """``{"prompt_string": ..., "multimodal_data": [base64, ...]}``: each of /props' ``media_marker`` in the text
    stands for the next file (an image, or audio: the bytes say which), as llama-server's process_mtmd_prompt
    reads them."""
    from ..media import Audio, Image, Media, MediaError, image_info, media_parts

    if not engine.modalities:
        raise APIError(400, "Multimodal data provided, but model does not support multimodal requests.",
                       param="prompt", code="unsupported")
    if not isinstance(text, str) or not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise APIError(400, '"multimodal_data" is a list of base64 strings beside a "prompt_string"', param="prompt")
    media: list[Media] = []
    try:
        for i, b64 in enumerate(data):
            raw = base64.b64decode(b64, validate=True)
            if not raw:
                raise MediaError(f"multimodal_data[{i}] is empty")
            media.append(Image(raw) if image_info(raw) is not None else Audio(raw))
        return engine.media_prompt(media_parts(text, media), add_special=True, parse_special=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"multimodal_data: {exc}", param="prompt", code="invalid_media") from None


def mixed_tokens(server: ServerState, engine: Engine, items: Sequence[int | str], *, add_special: bool,
                 parse_special: bool) -> npt.NDArray[np.int32]:
    """Token ids and strings in one sequence (llama-server's tokenize_mixed): only a string in first place
    gets the special tokens (BOS); ids are checked against the vocabulary."""
    parts: list[npt.NDArray[np.int32]] = []
    ids: list[int] = []  # a run of ids, until the next string
    for i, item in enumerate(items):
        if isinstance(item, str):
            if ids:
                parts.append(np.asarray(ids, dtype=np.int32))
                ids = []
            try:
                parts.append(engine.tokenize(item, add_special=add_special and i == 0, parse_special=parse_special))
            except Exception as exc:  # noqa: BLE001
                raise api_error(exc) from None
        else:
            if not 0 <= item < server.n_vocab:
                raise APIError(400, f"prompt token id {item} is outside the vocabulary [0, {server.n_vocab})",
                               param="prompt", code="invalid_token")
            ids.append(item)
    if ids:
        parts.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.empty(0, dtype=np.int32)


def _grammar(req: NativeCompletionRequest, model: Model) -> Sampler | None:
    """The request's grammar, built once here (off the event loop): a schema or grammar past the server's
    limits or llama.cpp's is a 400 naming its field."""
    if req.json_schema is not None and req.grammar is None:
        schema: Any = req.json_schema
        if isinstance(schema, dict) and not schema:
            schema = {"type": "object"}  # an empty schema means any object, as in llama-server
        if not isinstance(schema, dict):
            raise APIError(400, '"json_schema": a JSON schema is an object', param="json_schema",
                           code="invalid_schema")
        return schema_grammar(schema, model, "json_schema")
    if req.grammar:
        params.check_grammar(req.grammar)
        return checked_grammar(Grammar(req.grammar), model, "grammar")
    return None


def _infill_prompt(server: ServerState, engine: Engine, req: InfillRequest) -> npt.NDArray[np.int32]:
    """The fill-in-the-middle prompt of ``/infill``, its inputs checked with llama-server's messages."""
    if not isinstance(req.prompt, str):
        raise APIError(400, '"prompt" must be a string', param="prompt")
    for name in ("input_prefix", "input_suffix"):
        if getattr(req, name) is None:
            raise APIError(400, f'"{name}" is required', param=name)
    chunks = [] if req.input_extra is None else req.input_extra
    if not isinstance(chunks, list):
        raise APIError(400, '"input_extra" must be an array of {"filename": string, "text": string}',
                       param="input_extra")
    extra = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise APIError(400, 'extra_context chunk must contain a "text" field with a string value',
                           param="input_extra")
        if not isinstance(chunk.get("filename", ""), str):
            raise APIError(400, 'extra_context chunk\'s "filename" field must be a string', param="input_extra")
        extra.append(InfillFile(chunk["text"], chunk.get("filename", "tmp")))

    def mixed(x: Any, name: str) -> npt.NDArray[np.int32]:
        items = [x] if isinstance(x, str) else x
        if not isinstance(items, list) or not all(_is_int(i) or isinstance(i, str) for i in items):
            raise APIError(400, f'"{name}" must be a string or a list of token ids and strings', param=name)
        return mixed_tokens(server, engine, items, add_special=False, parse_special=False)

    n_predict = server.defaults.max_tokens
    return infill_tokens(engine.model, mixed(req.input_prefix, "input_prefix"), mixed(req.input_suffix, "input_suffix"),
                         prompt=req.prompt, extra=extra, n_batch=engine.n_batch, n_ctx=engine.n_ctx_slot,
                         n_predict=-1 if n_predict is None else n_predict, spm=server.spm_infill)


def _prepare(server: ServerState, engine: Engine, body: bytes, infill: bool) -> tuple[
        NativeCompletionRequest, list[Any], int, dict[str, Any], Any, int]:
    """Everything before the engine sees the request (in a worker thread: a large body costs seconds)."""
    if infill:
        req: NativeCompletionRequest = parse_request(InfillRequest, body)
        prompts = [_infill_prompt(server, engine, cast(InfillRequest, req))]
    else:
        req = parse_request(NativeCompletionRequest, body)
        prompts = native_prompts(server, engine, req.prompt)
    n = params.choices(req.n_cmpl if req.n_cmpl is not None else req.n, engine.n_slots)
    settings = params.native_settings(req, server.defaults)
    grammar = _grammar(req, engine.model)
    if grammar is not None and req.ignore_eos:
        raise APIError(400, "ignore_eos cannot be combined with grammar or json_schema", param="ignore_eos",
                       code="invalid_value")

    def text_tokens(text: str) -> list[int]:
        return [int(t) for t in engine.tokenize(text, add_special=False, parse_special=False)]

    bias = params.native_logit_bias(req.logit_bias, server.n_vocab, text_tokens)
    settings["logit_bias"] = [{"bias": b, "token": t} for t, b in bias.items()]
    if req.ignore_eos:  # as llama-server reports it: each end-of-generation token at -inf (null in JSON)
        settings["logit_bias"] += [{"bias": None, "token": int(t)} for t in engine.model.vocab.eog_tokens()]
    specs = params.native_sampler_specs(settings, bias, grammar=grammar)
    return req, prompts, n, settings, specs, int(settings["n_probs"])


async def completion(server: ServerState, request: Request) -> Response:
    return await _complete(server, request, infill=False)


async def infill(server: ServerState, request: Request) -> Response:
    """``POST /infill``: fill in the middle (501 for a model without FIM tokens, as llama-server)."""
    engine = await server.ensure_engine()
    why = infill_support(engine.model)
    if why is not None:
        raise APIError(501, f"Infill is not supported by this model: {why}", type="not_supported_error",
                       code="not_supported")
    return await _complete(server, request, infill=True)


async def _complete(server: ServerState, request: Request, *, infill: bool) -> Response:
    engine = await server.ensure_engine()
    req, prompts, n, settings, specs, n_probs = await server.off_loop(_prepare, server, engine,
                                                                      await request.body(), infill)
    top = min(n_probs, 20)
    limit = int(settings["n_predict"])
    ers: list[EngineRequest] = []
    try:
        with engine.together():  # a list of prompts is prefilled in one batch, as in llama-server
            for tokens in prompts:
                ers += server.submit_n(engine, tokens, n, settings, max_tokens=None if limit < 0 else limit,
                                       stop=settings["stop"], sampler=specs, logprobs=top > 0, top_logprobs=top,
                                       ignore_eos=req.ignore_eos, add_special=False, parse_special=False,
                                       progress=req.stream and req.return_progress,
                                       slot=req.id_slot if req.id_slot >= 0 else None,
                                       lora=params.lora_scales(req.lora, len(engine.lora)))
    except BaseException:
        for er in ers:
            er.cancel()
        raise
    shape = _Shape(server, engine, req, settings, n_probs)
    if req.stream:
        return StreamingResponse(_stream(server, shape, ers), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    got = await server.collect_all(request, ers)
    if got is None:
        return gone()
    results = [shape.fields(shape.final(er, i, evs, stream=False)) for i, (er, evs) in enumerate(zip(ers, got))]
    return json_response(results[0] if len(results) == 1 else results)


class _Shape:
    """llama-server's answer objects for the engine requests of one native request."""

    def __init__(self, server: ServerState, engine: Engine, req: NativeCompletionRequest, settings: dict[str, Any],
                 n_probs: int) -> None:
        self.server, self.engine, self.req, self.settings = server, engine, req, settings
        self.n_probs = n_probs
        self.post = req.post_sampling_probs

    def _entry(self, token: int, logprob: float | None) -> dict[str, Any]:
        raw = self.server.piece_bytes(token)
        lp = logprob if logprob is not None and math.isfinite(logprob) else -3.4028234663852886e38
        d: dict[str, Any] = {"id": token, "token": raw.decode("utf-8", "ignore"), "bytes": list(raw)}
        if self.post:
            d["prob"] = math.exp(lp)
        else:
            d["logprob"] = lp
        return d

    def probs(self, ev: TokenEvent) -> dict[str, Any]:
        d = self._entry(ev.token, ev.logprob)
        tops = [self._entry(t, lp) for t, lp in (ev.top_logprobs or ())[: self.n_probs]]
        if self.post:
            tops = [t for t in tops if t["prob"] > 0.0]
        d["top_probs" if self.post else "top_logprobs"] = tops
        return d

    def partial(self, er: EngineRequest, index: int, ev: TokenEvent) -> dict[str, Any]:
        obj: dict[str, Any] = {"index": index, "content": ev.text, "tokens": [ev.token], "stop": False,
                               "id_slot": _slot(er), "tokens_predicted": ev.index + 1,
                               "tokens_evaluated": er.n_prompt}
        if self.req.timings_per_token:
            obj["timings"] = self.server.timings(er)
        if self.n_probs > 0 and ev.token >= 0:
            obj["completion_probabilities"] = [self.probs(ev)]
        return obj

    def progress(self, er: EngineRequest, index: int, ev: PromptProgress) -> dict[str, Any]:
        """llama-server's ``return_progress`` event: no content yet, the prompt's progress and its timings."""
        return {"index": index, "content": "", "tokens": [], "stop": False, "id_slot": _slot(er),
                "tokens_predicted": 0, "tokens_evaluated": er.n_prompt, "prompt_progress": ev.as_dict(),
                "timings": self.server.progress_timings(ev)}

    def final(self, er: EngineRequest, index: int, evs: list[TokenEvent], *, stream: bool) -> dict[str, Any]:
        """The last answer of a request: the whole result, or (streamed) what was held back and the totals."""
        content = "".join(ev.text for ev in evs)
        gen = [ev for ev in evs if ev.token >= 0]
        reason = er.finish_reason or "cancelled"
        stop_type = _STOP_TYPE.get(reason, "none")
        stopping_word = ""
        if stop_type == "word":
            stopping_word = self._stopping_word(er, content)
        obj: dict[str, Any] = {
            "index": index, "content": content,
            "tokens": [ev.token for ev in gen] if self.req.return_tokens and not stream else [],
            "id_slot": _slot(er), "stop": True, "model": self.server.model_name,
            "tokens_predicted": er.n_generated, "tokens_evaluated": er.n_prompt,
            "generation_settings": dict(self.settings), "prompt": self._prompt_text(er),
            "has_new_line": "\n" in (content if not stream else er.text), "truncated": reason == "context",
            "stop_type": stop_type, "stopping_word": stopping_word,
            "tokens_cached": er.n_prompt + er.n_generated, "timings": self.server.timings(er),
        }
        if self.n_probs > 0 and not stream and gen:
            obj["completion_probabilities"] = [self.probs(ev) for ev in gen]
        return obj

    def fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``response_fields``: only those fields, a path ``a/b`` lifted to the top under its own name."""
        wanted = self.req.response_fields
        if not wanted:
            return obj
        out: dict[str, Any] = {}
        for path in wanted:
            cur: Any = obj
            for part in path.split("/"):
                if not isinstance(cur, dict) or part not in cur:
                    break
                cur = cur[part]
            else:
                out[path] = cur
        return out

    def _prompt_text(self, er: EngineRequest) -> str:
        try:
            return self.engine.model.vocab.detokenize(er.prompt_tokens, unparse_special=True)
        except Exception:  # noqa: BLE001
            return ""

    def _stopping_word(self, er: EngineRequest, content: str) -> str:
        stops = self.settings["stop"]
        try:
            raw = self.engine.detokenize(er.tokens)
        except Exception:  # noqa: BLE001
            return stops[0] if len(stops) == 1 else ""
        found = [(raw.find(s, max(0, len(content) - 1)), s) for s in stops]
        hits = sorted((i, -len(s), s) for i, s in found if i >= 0)
        return hits[0][2] if hits else ""


def native_result(server: ServerState, engine: Engine, er: EngineRequest, evs: list[TokenEvent],
                  settings: dict[str, Any]) -> dict[str, Any]:
    """A finished request as llama-server's native answer: what its ``__verbose`` field shows (the prompt
    as rendered, the raw content, the settings, timings) for a request asking for it."""
    req = NativeCompletionRequest(prompt="")
    return _Shape(server, engine, req, settings, 0).final(er, 0, evs, stream=False)


def _slot(er: EngineRequest) -> int:
    slot = getattr(er, "slot_id", None)
    return -1 if slot is None else int(slot)


async def _stream(server: ServerState, shape: _Shape, ers: list[EngineRequest]) -> AsyncGenerator[bytes, None]:
    """llama-server's native stream: a ``data:`` event per token, the final one per request, no ``[DONE]``;
    several requests (prompts, choices) interleave, told apart by ``index``."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def pump(er: EngineRequest, index: int) -> None:
        leftover: list[str] = []
        async for ev in server.events(er, keepalive=len(ers) == 1):
            if ev is None:
                await queue.put(sse.KEEPALIVE)
            elif isinstance(ev, PromptProgress):
                await queue.put(sse.frame(shape.progress(er, index, ev)))
            elif ev.token < 0:
                leftover.append(ev.text)  # text held back at the end: it goes with the final event
            else:
                await queue.put(sse.frame(shape.partial(er, index, ev)))
        flush = TokenEvent(-1, "".join(leftover), -1)
        await queue.put(sse.frame(shape.fields(shape.final(er, index, [flush], stream=True))))

    async def run_all() -> None:
        try:
            await asyncio.gather(*(pump(er, i) for i, er in enumerate(ers)))
        except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
            err = api_error(exc)
            log.warning("native stream failed: %s", err.message)
            body = err.body()["error"]
            await queue.put(sse.frame({"error": {"code": err.status, "message": err.message, "type": body["type"]}}))
        finally:
            await queue.put(None)

    task = asyncio.ensure_future(run_all())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            yield item
    finally:
        if not task.done():
            task.cancel()
            for er in ers:
                er.cancel()
            with contextlib.suppress(BaseException):
                await task


__all__ = ["completion", "native_prompts", "native_result", "mixed_tokens"]
