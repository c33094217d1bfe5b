"""Chat requests -> a prompt, extra stops, a grammar and an output parser.

Rendered by :class:`pyllama.chat.ChatTemplate`, the library's one chat-template
path (llama.cpp's ``common/chat.cpp``: the model's Jinja template, tool-call
grammars and per-family parsers), so tools, ``tool_choice``,
``response_format`` and reasoning are handled as ``llama-server --jinja`` does,
and a conversation gets the prompt :func:`pyllama.apply_template` gives. Where
the Jinja path cannot render, llama.cpp's legacy renderer stands in: plain
chat and ``response_format`` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from ..chat import LEGACY_FORMAT, ChatFormat, ChatTemplate, ReasoningFormat
from ..errors import LlamaError
from ..grammar import json_schema_to_grammar
from ..media import Media, MediaError, split_media
from ..samplers import Grammar, Sampler
from . import params
from .protocol import APIError, ChatCompletionRequest, NamedToolChoice

if TYPE_CHECKING:
    from ..model import Model

log = logging.getLogger("pyllama.server")


@dataclass
class ChatPlan:
    """What one chat request turns into."""

    prompt: str
    add_special: bool
    stops: list[str] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)  # each where the prompt holds media.MARKER
    grammar: Sampler | None = None
    parse: Callable[[str], dict[str, Any]] | None = None  # text -> OpenAI message (content, tool_calls, ...)
    tools: bool = False  # the output may hold tool calls: parse it before sending it


G = TypeVar("G", bound=Grammar)


def checked_grammar(grammar: G, model: Model, param: str) -> G:
    """``grammar``, built once (call it off the event loop): past :mod:`pyllama.grammar`'s bounds, or refused
    by llama.cpp, it is a 400 naming ``param``. The engine's build of it on submit is then llama.cpp's parse
    alone (the costly checks are remembered)."""
    try:
        grammar.check(model)
    except (LlamaError, ValueError) as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_grammar") from None
    return grammar


def schema_grammar(schema: dict[str, Any], model: Model | None = None, param: str = "response_format") -> Grammar:
    """A grammar sampler for a JSON schema (llama.cpp's json-schema-to-grammar), built once as
    :func:`checked_grammar` builds it when ``model`` is given (without it, when the engine builds the request's
    chain); a schema too large or one that cannot be used is a 400 naming ``param``."""
    params.check_json_size(schema, param)
    try:
        grammar = Grammar(json_schema_to_grammar(schema))
        if model is not None:
            grammar.check(model)
    except (LlamaError, ValueError) as exc:
        raise APIError(400, f"{param}: the JSON schema cannot be used: {exc}", param=param,
                       code="invalid_schema") from None
    return grammar


class ChatPrompter:
    """Turns chat requests into prompts for one model."""

    def __init__(self, model: Model, *, template: str | None = None, reasoning_format: ReasoningFormat = "auto",
                 thinking: bool = True, template_kwargs: Mapping[str, Any] | None = None, jinja: bool = True,
                 open_file: Callable[[str], Path] | None = None) -> None:
        self.model = model
        self.open_file = open_file  # file:// media (--media-path); None: refused
        self.template = template
        self.reasoning_format = reasoning_format  # llama-server's --reasoning-format
        self.thinking = thinking  # its --reasoning on|off|auto (auto: on where the template can think)
        self.template_kwargs = dict(template_kwargs or {})  # its --chat-template-kwargs
        self.chat = ChatTemplate(model, template=template, jinja=jinja)
        if self.chat.format is None and jinja:
            log.warning("llama.cpp's Jinja chat handling is unavailable for this model: plain chat only, "
                        "no tool calls")
        bos = model.vocab.bos
        self._bos_text = model.vocab.text(bos) if bos is not None else None

    @property
    def format(self) -> ChatFormat | None:
        """llama.cpp's chat handling for the model (None: the legacy renderer, no tools)."""
        return self.chat.format

    def close(self) -> None:
        self.chat.close()

    def _add_special(self, prompt: str) -> bool:
        # A template that writes the BOS text itself must not get a second BOS from the tokenizer.
        return not (self._bos_text and prompt.startswith(self._bos_text))

    def plan(self, req: ChatCompletionRequest) -> ChatPlan:
        try:
            messages, media = split_media([m.as_dict() for m in req.messages], open_file=self.open_file)
        except MediaError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_media") from None
        schema = req.response_format.schema_or_none() if req.response_format is not None else None
        if req.tools:  # counted before each is copied
            params.check_tool_count(len(req.tools))
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        if tools:
            params.check_json_size(tools, "tools")
        if schema is not None:
            params.check_json_size(schema, "response_format")
        tool_choice: Any = (req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice)
                            else req.tool_choice)
        if tools and schema is not None:
            raise APIError(400, "tools and response_format cannot be combined", param="response_format")
        if tools and tool_choice != "none" and self.format is None:
            raise APIError(400, "tool calls need llama.cpp's Jinja chat handling, which cannot use this model's "
                           "chat template", param="tools", code="unsupported")
        options: dict[str, Any] = {"reasoning_format": req.reasoning_format or self.reasoning_format,
                                   **self._turn_options(req, messages)}
        if tools:
            options["tools"] = tools
            options["tool_choice"] = tool_choice if tool_choice is not None else "auto"
            options["parallel_tool_calls"] = bool(req.parallel_tool_calls)
        if schema is not None:
            options["json_schema"] = schema
        try:
            cp = self.chat.apply(messages, **options)
            grammar = cp.grammar_sampler()
        except (LlamaError, ValueError, KeyError, TypeError) as exc:
            raise APIError(400, f"the chat request cannot be formatted: {exc}", param="messages",
                           code="invalid_messages") from None
        if grammar is not None:  # the tool-call grammar or the schema's: built here, off the event loop
            grammar = checked_grammar(grammar, self.model, "tools" if tools else "response_format")
        prompt = str(cp.prompt)
        return ChatPlan(prompt=prompt, add_special=self._add_special(prompt), stops=list(cp.additional_stops),
                        media=media,
                        grammar=grammar, parse=None if cp.format == LEGACY_FORMAT else cp.parse,
                        tools=bool(tools) and tool_choice != "none")


    def _turn_options(self, req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The template switches of a request, as llama-server reads them (oaicompat_chat_params_parse): a
        conversation ending in an assistant message is continued (its prefill) unless the request says how;
        ``chat_template_kwargs`` add to the server's, ``enable_thinking`` among them overrides --reasoning, and
        ``reasoning_effort: "none"`` turns thinking off."""
        cont = req.continue_final_message
        add_generation_prompt = req.add_generation_prompt
        if cont is None and messages and messages[-1].get("role") == "assistant":
            if len(messages) >= 2 and messages[-2].get("role") == "assistant":
                raise APIError(400, "Cannot have 2 or more assistant messages at the end of the list.",
                               param="messages", code="invalid_messages")
            cont, add_generation_prompt = True, False
        if cont and add_generation_prompt:  # as llama-server, vLLM and transformers: say which one
            raise APIError(400, "Cannot set both add_generation_prompt and continue_final_message to true.",
                           param="continue_final_message")
        kwargs = {**self.template_kwargs, **(req.chat_template_kwargs or {})}
        thinking = self.thinking
        flag = kwargs.get("enable_thinking")
        if isinstance(flag, bool):
            thinking = flag
        elif flag is not None:
            raise APIError(400, f'invalid type for "enable_thinking" (expected boolean, got {type(flag).__name__})',
                           param="chat_template_kwargs")
        if req.reasoning_effort == "none":
            thinking = False
            kwargs.pop("reasoning_effort", None)
        elif req.reasoning_effort:
            kwargs["reasoning_effort"] = req.reasoning_effort
        out: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, "enable_thinking": thinking}
        if cont:
            out["continue_final_message"] = cont
        if kwargs:
            out["template_kwargs"] = kwargs
        return out


__all__ = ["ChatPlan", "ChatPrompter", "checked_grammar", "schema_grammar"]
