"""The response bodies, as models: what ``/openapi.json`` promises each endpoint answers.

The endpoints build their answers as plain dicts (the hot path allocates no model per token); these
models describe them for the OpenAPI document (:mod:`.openapi`), and the schema tests
(tests/test_server_openapi.py, schemathesis against a running server) check every answer against them,
which keeps the two in step. Fields are the ones a client may rely on; answers may carry more
(``extra="allow"``), as llama-server's do.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors ----------------------------------------------------------------------------------------

class ErrorDetail(_Answer):
    message: str
    type: str
    param: str | None
    code: Union[str, int, None]


class ErrorAnswer(_Answer):
    """Every error but those of Anthropic's routes: OpenAI's shape."""

    error: ErrorDetail


class AnthropicErrorDetail(_Answer):
    type: str
    message: str


class OllamaErrorAnswer(_Answer):
    """Errors on Ollama's routes (``/api/...``)."""

    error: str


class AnthropicErrorAnswer(_Answer):
    """Errors on ``/v1/messages``: Anthropic's shape."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# --- service ---------------------------------------------------------------------------------------

class Health(_Answer):
    status: Literal["ok", "loading", "error"]
    message: str | None = None


class ModelCard(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    aliases: list[str]
    tags: list[str]
    meta: dict[str, Any] | None = None


class ModelList(_Answer):
    object: Literal["list"]
    data: list[ModelCard]


class LoadProgress(_Answer):
    """A load under way (llama-server's router payload): the share of the weights read so far."""

    stages: list[str]
    current: str
    value: float


class RoutedStatus(_Answer):
    value: Literal["unloaded", "loading", "loaded", "failed"]
    failed_reason: str | None = None
    progress: LoadProgress | None = None


class RoutedModelCard(_Answer):
    """One model of a server of several (``--models``, ``--models-dir``, a preset file, the store)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    aliases: list[str]
    path: str
    status: RoutedStatus
    memory: dict[str, int] | None = None  # bytes per device, once measured


class RoutedModelList(_Answer):
    object: Literal["list"]
    data: list[RoutedModelCard]


class RoutedModelDone(RoutedModelCard):
    """``POST /models/load`` and ``POST /models``: the model's card after the action."""

    success: bool


class Props(_Answer):
    default_generation_settings: dict[str, Any]
    total_slots: int
    model_alias: str
    chat_template: str
    modalities: dict[str, bool]
    media_marker: str  # what stands for each of /completion's multimodal_data in its prompt_string


class RouterProps(_Answer):
    """``GET /props`` of a server of several models: the router's own (``role: router``) without ``?model=``,
    the model's (:class:`Props`) with it; these fields are in both."""

    model_alias: str
    model_path: str
    default_generation_settings: dict[str, Any]
    build_info: str


class Success(_Answer):
    success: bool


class LoraAdapter(_Answer):
    """One of ``GET /lora-adapters``' list."""

    id: int
    path: str
    scale: float


class OllamaMessage(_Answer):
    role: str
    content: str


class OllamaChat(_Answer):
    """``/api/chat``: the whole answer, or (streamed) each NDJSON line."""

    model: str
    created_at: str
    message: OllamaMessage
    done: bool


class OllamaGenerate(_Answer):
    model: str
    created_at: str
    response: str
    done: bool


class OllamaEmbed(_Answer):
    model: str
    embeddings: list[list[float]]


class OllamaEmbedding(_Answer):
    embedding: list[float]


class OllamaModel(_Answer):
    name: str
    model: str
    size: int
    digest: str
    details: dict[str, Any]


class OllamaModels(_Answer):
    """``/api/tags`` and ``/api/ps``."""

    models: list[OllamaModel]


class OllamaShow(_Answer):
    details: dict[str, Any]
    model_info: dict[str, Any]
    capabilities: list[str]
    template: str


class OllamaVersion(_Answer):
    version: str


class OllamaStatus(_Answer):
    status: str


class SlotAction(_Answer):
    """``POST /slots/{id}``: ``n_saved``/``n_written`` (save), ``n_restored``/``n_read`` (restore) with
    ``filename`` and ``timings``, or ``n_erased`` (erase)."""

    id_slot: int
    filename: str | None = None
    n_saved: int | None = None
    n_written: int | None = None
    n_restored: int | None = None
    n_read: int | None = None
    n_erased: int | None = None
    timings: dict[str, float] | None = None


# --- generation ------------------------------------------------------------------------------------

class PromptTokensDetails(_Answer):
    cached_tokens: int


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ToolCallFunctionOut(_Answer):
    name: str
    arguments: str


class ToolCallOut(_Answer):
    id: str
    type: Literal["function"]
    function: ToolCallFunctionOut


class AssistantMessage(_Answer):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(_Answer):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Answer):
    content: list[TokenLogprob] | None
    refusal: str | None = None


class ChatChoice(_Answer):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None


class ChatCompletion(_Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(_Answer):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None


class Completion(_Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class NativeCompletion(_Answer):
    """llama-server's ``/completion`` answer (one per prompt: a list when it was given several). Every field
    is optional: ``response_fields`` keeps only the ones it names."""

    content: str | None = None
    stop: bool | None = None
    tokens_predicted: int | None = None
    tokens_evaluated: int | None = None


class AnthropicUsage(_Answer):
    input_tokens: int
    output_tokens: int


class AnthropicMessageOut(_Answer):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: AnthropicUsage


class InputTokens(_Answer):
    input_tokens: int


class ResponseObject(_Answer):
    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]


# --- embeddings, rerank, tokens --------------------------------------------------------------------

class EmbeddingUsage(_Answer):
    prompt_tokens: int
    total_tokens: int


class Embedding(_Answer):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]  # str: base64 (encoding_format)


class EmbeddingList(_Answer):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class NativeEmbedding(_Answer):
    index: int
    embedding: list[list[float]]


class RerankResult(_Answer):
    index: int
    relevance_score: float | None = None
    score: float | None = None  # TEI's shape (a request with ``texts``)


class Rerank(_Answer):
    model: str
    object: Literal["list"]
    usage: EmbeddingUsage
    results: list[RerankResult]


class TokenPiece(_Answer):
    id: int
    piece: Union[str, list[int]]


class Tokens(_Answer):
    tokens: list[Union[int, TokenPiece]]


class Detokenized(_Answer):
    content: str


class RenderedPrompt(_Answer):
    prompt: str


__all__ = [
    "ErrorAnswer", "AnthropicErrorAnswer", "Health", "ModelCard", "ModelList", "Props", "Success", "Usage",
    "ChatCompletion", "Completion", "NativeCompletion", "AnthropicMessageOut", "InputTokens", "ResponseObject",
    "EmbeddingList", "NativeEmbedding", "Rerank", "RerankResult", "Tokens", "Detokenized", "RenderedPrompt",
]
