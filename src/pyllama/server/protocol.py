"""The OpenAI wire format: request models (pydantic, strict types) and errors in OpenAI's shape.

Requests are validated from the raw body in JSON mode with strict types, so a
string where a number belongs, bad JSON and missing fields are all a 400 with a
message naming the field, never a 500. Fields this server does not know are
ignored (clients send ``user``, ``store``, ``metadata``, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the error object (llama-server's n_prompt_tokens, n_ctx)

    def body(self) -> dict[str, Any]:
        body = error_body(self.message, type=self.type, code=self.code, param=self.param)
        body["error"].update(self.extra)
        return body


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# llama.cpp takes these counts as int32: a larger number is a 400 naming the field, not an OverflowError.
INT32_MAX = 2**31 - 1


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ModelRequest(_Request):
    """A server of several models: the model an action is for (``POST /models/load`` and ``unload``; ``POST
    /models`` pulls a reference of the store's: ``hf:org/repo:QUANT`` or a URL)."""

    model: str


# --- chat messages ----------------------------------------------------------------------------

class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageUrl(_Request):
    url: str
    detail: str | None = None  # OpenAI's resolution hint: the projector decides the image's tokens


class ImageUrlPart(_Request):
    """An image: a ``data:image/...;base64,`` URL, bare base64, or ``file://NAME`` under ``--media-path``."""

    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Request):
    data: str  # base64 of a WAV, MP3 or FLAC file
    format: str | None = None  # "wav", "mp3": the bytes say it themselves


class InputAudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, ImageUrlPart, InputAudioPart], Field(discriminator="type")]


class ToolCallFunction(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def as_dict(self) -> dict[str, Any]:
        """The message as llama.cpp's chat handling takes it (optional fields only when set). Text parts stay
        parts: common/chat joins them as llama-server does (with a newline, or as the template renders them)."""
        content: Any = ([p.model_dump(exclude_none=True) for p in self.content] if isinstance(self.content, list)
                        else self.text())
        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            d["reasoning_content"] = self.reasoning_content
        return d


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-server's json_object extension

    def schema_or_none(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow, or None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return self.schema_ if self.schema_ is not None else {"type": "object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                           param="response_format")
        return self.json_schema.schema_


class StreamOptions(_Request):
    include_usage: bool = False


# --- requests ---------------------------------------------------------------------------------

class SamplingRequest(_Request):
    """Fields shared by chat and text completions (OpenAI's, plus llama-server's common extensions)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    logit_bias: dict[str, float] | None = None
    stop: Union[str, list[str], None] = None
    max_tokens: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    lora: Any = None  # llama-server's per-request adapters, [{"id", "scale"}] (params.lora_scales checks it)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    grammar: str | None = None  # llama-server's extensions: a GBNF grammar, or a JSON schema, for the reply
    json_schema: dict[str, Any] | None = None
    timings_per_token: bool = False  # llama-server's: timings in every streamed chunk
    return_progress: bool = False  # llama-server's: prompt_progress chunks while the prompt is evaluated
    verbose: bool | None = None  # llama-server's: its native answer as "__verbose" (default: serve -v)
    # llama-server's (and vLLM's) template switches: what ChatTemplate.apply takes
    add_generation_prompt: bool = True
    continue_final_message: Union[bool, Literal["content", "reasoning_content"], None] = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings`` and llama-server's ``POST /embedding(s)``: ``input`` (or ``content``) in
    llama-server's prompt forms (strings, token ids, both mixed, ``{"prompt_string": ...}``,
    ``{"content": [parts]}``), checked by :func:`pyllama.server.embeddings.embedding_prompts`."""

    model_config = ConfigDict(strict=False, extra="ignore", populate_by_name=True)

    model: str | None = None
    input: Any = None
    content: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    embd_normalize: int | None = None


class TokenizeRequest(_Request):
    content: Union[str, list[Union[int, str]], None] = None  # a string, or token ids and strings mixed
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int] = Field(default_factory=list)


# llama-server's native requests: its field names, numbers taken as loosely as it takes them

NativePrompt = Union[str, list[Any], dict[str, Any]]


class NativeCompletionRequest(_Request):
    """llama-server's ``POST /completion`` (its field names; unset fields take the server's defaults)."""

    model_config = ConfigDict(strict=False, extra="ignore", populate_by_name=True)

    prompt: NativePrompt
    n_predict: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=-1)
    max_completion_tokens: int | None = Field(default=None, ge=-1)
    n_cmpl: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    temperature: float | None = Field(default=None, ge=0)
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    top_k: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX)
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    top_n_sigma: float | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX)
    dry_penalty_last_n: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX)
    dry_sequence_breakers: list[str] | None = None
    mirostat: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    min_keep: int | None = Field(default=None, ge=0, le=INT32_MAX)
    seed: int | None = None
    samplers: Union[list[str], str, None] = None
    logit_bias: Union[list[Any], dict[str, Any], None] = None
    ignore_eos: bool = False
    grammar: str | None = None
    json_schema: Union[dict[str, Any], list[Any], None] = None
    n_probs: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    post_sampling_probs: bool = False
    cache_prompt: bool = True
    id_slot: int = Field(default=-1, ge=-INT32_MAX, le=INT32_MAX)
    lora: Any = None  # [{"id", "scale"}] (params.lora_scales checks it)
    return_tokens: bool = False
    timings_per_token: bool = False
    return_progress: bool = False
    response_fields: list[str] | None = None
    n_keep: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]  # llama-server drops empty stop strings


class InfillRequest(NativeCompletionRequest):
    """llama-server's ``POST /infill``: the native completion's fields, ``input_prefix`` and ``input_suffix``
    (text, or ids and text mixed), ``prompt`` (the start of the middle), ``input_extra`` (other files:
    ``{"filename", "text"}``). The handler checks the inputs itself, with llama-server's messages."""

    prompt: Any = ""
    input_prefix: Any = None
    input_suffix: Any = None
    input_extra: Any = None


class RerankRequest(_Request):
    """``POST /rerank`` (Jina's shape: ``documents``; TEI's: ``texts``, ``return_text``). The handler checks
    these fields itself, with llama-server's messages, which its clients and tests match."""

    model_config = ConfigDict(strict=False, extra="ignore", populate_by_name=True)

    model: str | None = None
    query: str
    documents: list[str] | None = None
    texts: list[str] | None = None
    top_n: int | None = None
    return_text: bool = False


class LoraScale(_Request):
    id: int
    scale: float


class LoraScalesRequest(RootModel[list[LoraScale]]):
    """``POST /lora-adapters``: ``[{"id", "scale"}]`` (the handler checks it, with llama-server's messages)."""


class SlotActionRequest(_Request):
    """``POST /slots/{id}?action=save|restore``: the file, a name inside ``--slot-save-path``."""

    filename: str


R = TypeVar("R", bound=_Request)


def parse_request(cls: type[R], body: bytes) -> R:
    """Validate a raw JSON body into ``cls``; any problem is a 400 :class:`APIError` naming the field."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] in ("json_invalid", "json_type"):
            raise APIError(400, f"the request body is not valid JSON: {errors[0]['msg']}",
                           code="invalid_json") from None
        parts = []
        for err in errors[:3]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        param = ".".join(str(x) for x in errors[0]["loc"]) if errors else None
        raise APIError(400, "invalid request: " + "; ".join(parts) + more, param=param or None) from None


__all__ = [
    "APIError", "error_body", "ChatMessage", "TextPart", "ToolCall", "Tool", "ResponseFormat", "StreamOptions",
    "SamplingRequest", "ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "TokenizeRequest",
    "DetokenizeRequest", "NativeCompletionRequest", "InfillRequest", "RerankRequest", "SlotActionRequest", "LoraScalesRequest", "parse_request",
]
