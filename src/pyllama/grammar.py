"""Grammars made by llama.cpp's own code: JSON schema -> GBNF, and chat-template grammars.

Both come from libpyllama-common (``common/json-schema-to-grammar.cpp`` and
``common/chat.cpp`` of the vendored tree, behind ``src/native/chat.cpp``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ._ffi import ffi, lib
from .errors import SamplerError, TemplateError
from .samplers import Grammar, _vocab

if TYPE_CHECKING:
    from .model import Model


def _call(result: Any) -> Any:
    """Decode the JSON a libpyllama-common entry point returned, raising its error."""
    if result == ffi.NULL:
        raise MemoryError("libpyllama-common returned no result")
    try:
        text = ffi.string(result).decode("utf-8", "replace")
    finally:
        lib.pyllama_free_string(result)
    out = json.loads(text)
    if isinstance(out, dict) and "error" in out:
        message = str(out["error"])
        if out.get("kind") == "template":
            raise TemplateError(message)
        raise ValueError(message)
    return out


def json_schema_to_grammar(schema: Mapping[str, Any] | str) -> str:
    """The GBNF grammar llama.cpp derives from a JSON schema (a dict or JSON text).

    Use it as ``pyllama.Grammar(json_schema_to_grammar(schema))``. A malformed
    schema (not JSON, not an object, an unsupported construct or a dangling
    ``$ref``) raises ValueError with llama.cpp's message.
    """
    if isinstance(schema, str):
        text = schema
    elif isinstance(schema, Mapping):
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the schema is not JSON-serialisable: {exc}") from None
    else:
        raise ValueError(f"a JSON schema must be a dict or JSON text, not {type(schema).__name__}")
    out = _call(lib.pyllama_json_schema_to_grammar(text.encode("utf-8")))
    return str(out["grammar"])


@dataclass(frozen=True)
class PrefilledGrammar(Grammar):
    """A :class:`Grammar` advanced over ``prefill`` before the first sampled token.

    The grammars llama.cpp builds from a chat template for tool calls or a
    response schema start with the template's generation prompt (say
    ``<start_of_turn>model\\n``), which is already at the end of the prompt;
    llama-server feeds those tokens to the grammar, and so does this sampler.
    Resetting the chain returns the grammar to its start, before the prefill.
    """

    prefill: str = ""

    def _create(self, model: Model | None) -> Any:
        vp = _vocab(model, "grammar")
        p = super()._create(model)
        if self.prefill:
            try:
                _call(lib.pyllama_grammar_accept_text(p, vp, self.prefill.encode("utf-8")))
            except ValueError as exc:
                lib.llama_sampler_free(p)
                raise SamplerError(str(exc)) from None
        return p


__all__ = ["json_schema_to_grammar", "PrefilledGrammar"]
