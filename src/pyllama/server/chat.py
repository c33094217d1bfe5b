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
from typing import TYPE_CHECKING, Any, Callable

from ..chat import LEGACY_FORMAT, ChatFormat, ChatTemplate, ReasoningFormat
from ..errors import LlamaError
from ..grammar import json_schema_to_grammar
from ..samplers import Grammar, Sampler
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

    def __init__(self, model: Model, *, template: str | None = None,
                 reasoning_format: ReasoningFormat = "auto") -> None:
        self.model = model
        self.template = template
        self.reasoning_format = reasoning_format  # llama-server's --reasoning-format
        self.chat = ChatTemplate(model, template=template)
        if self.chat.format is None:
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
        messages = [m.as_dict() for m in req.messages]
        schema = req.response_format.schema_or_none() if req.response_format is not None else None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        tool_choice: Any = (req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice)
                            else req.tool_choice)
        if tools and schema is not None:
            raise APIError(400, "tools and response_format cannot be combined", param="response_format")
        if tools and tool_choice != "none" and self.format is None:
            raise APIError(400, "tool calls need llama.cpp's Jinja chat handling, which cannot use this model's "
                           "chat template", param="tools", code="unsupported")
        options: dict[str, Any] = {"reasoning_format": self.reasoning_format}
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
        prompt = str(cp.prompt)
        return ChatPlan(prompt=prompt, add_special=self._add_special(prompt), stops=list(cp.additional_stops),
                        grammar=grammar, parse=None if cp.format == LEGACY_FORMAT else cp.parse,
                        tools=bool(tools) and tool_choice != "none")


__all__ = ["ChatPlan", "ChatPrompter", "schema_grammar"]
