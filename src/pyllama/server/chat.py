"""Chat requests -> a prompt, extra stops, a grammar and an output parser.

Through :class:`pyllama.chat.ChatFormat` (llama.cpp's ``common/chat.cpp``: the
model's Jinja template, tool-call grammars and per-family parsers) tools,
``tool_choice``, ``response_format`` and reasoning are handled as
``llama-server --jinja`` does. A model whose template llama.cpp cannot use
falls back to :func:`pyllama.apply_template`: plain chat and
``response_format`` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..chat import ChatFormat, apply_template
from ..errors import LlamaError
from ..grammar import json_schema_to_grammar
from ..sampling import Grammar, Sampler
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
    grammar: Sampler | None = None
    parse: Callable[[str], dict[str, Any]] | None = None  # text -> OpenAI message (content, tool_calls, ...)
    tools: bool = False  # the output may hold tool calls: parse it before sending it


def schema_grammar(schema: dict[str, Any]) -> Grammar:
    """A grammar sampler for a JSON schema (llama.cpp's json-schema-to-grammar); a bad schema is a 400."""
    try:
        return Grammar(json_schema_to_grammar(schema))
    except (LlamaError, ValueError) as exc:
        raise APIError(400, f"response_format: the JSON schema cannot be used: {exc}", param="response_format",
                       code="invalid_schema") from None


class ChatPrompter:
    """Turns chat requests into prompts for one model."""

    def __init__(self, model: Model, *, template: str | None = None) -> None:
        self.model = model
        self.template = template
        self.format: ChatFormat | None = None
        try:
            self.format = ChatFormat(model, template=template)
        except (LlamaError, ValueError) as exc:
            # no template common/chat.cpp can use: plain chat through apply_template still works
            log.warning("llama.cpp's chat handling is unavailable for this model (%s): no tool calls", exc)
        bos = model.vocab.bos
        self._bos_text = model.vocab.text(bos) if bos is not None else None

    def close(self) -> None:
        if self.format is not None:
            self.format.close()

    def _add_special(self, prompt: str) -> bool:
        # A template that writes the BOS text itself must not get a second BOS from the tokenizer.
        return not (self._bos_text and prompt.startswith(self._bos_text))

    def plan(self, req: ChatCompletionRequest) -> ChatPlan:
        messages = [m.as_dict() for m in req.messages]
        schema = req.response_format.schema_or_none() if req.response_format is not None else None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        tool_choice: Any = (req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice)
                            else req.tool_choice)
        if tools and schema is not None:
            raise APIError(400, "tools and response_format cannot be combined", param="response_format")
        if self.format is not None:
            return self._plan_format(messages, tools, tool_choice, req.parallel_tool_calls, schema)
        if tools and tool_choice != "none":
            raise APIError(400, "tool calls need pyllama.chat.ChatFormat (llama.cpp's chat parsers), which this "
                           "build lacks", param="tools", code="unsupported")
        try:
            prompt = apply_template(self.model, messages, add_generation_prompt=True, template=self.template)
        except (LlamaError, ValueError, KeyError) as exc:
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages",
                           code="invalid_messages") from None
        return ChatPlan(prompt=prompt, add_special=self._add_special(prompt),
                        grammar=schema_grammar(schema) if schema is not None else None)

    def _plan_format(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any,
                     parallel: bool | None, schema: dict[str, Any] | None) -> ChatPlan:
        options: dict[str, Any] = {}
        if tools:
            options["tools"] = tools
            options["tool_choice"] = tool_choice if tool_choice is not None else "auto"
            options["parallel_tool_calls"] = bool(parallel)
        if schema is not None:
            options["json_schema"] = schema
        assert self.format is not None
        try:
            cp = self.format.apply(messages, **options)
            grammar = cp.grammar_sampler()
        except (LlamaError, ValueError, KeyError, TypeError) as exc:
            raise APIError(400, f"the chat request cannot be formatted: {exc}", param="messages",
                           code="invalid_messages") from None
        prompt = str(cp.prompt)
        return ChatPlan(prompt=prompt, add_special=self._add_special(prompt),
                        stops=list(getattr(cp, "additional_stops", None) or ()), grammar=grammar, parse=cp.parse,
                        tools=bool(tools) and tool_choice != "none")


__all__ = ["ChatPlan", "ChatPrompter", "schema_grammar"]
