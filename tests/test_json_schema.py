"""JSON schema -> GBNF with llama.cpp's own converter (common/json-schema-to-grammar.cpp)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

import pyllama

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def starter(starter_model_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(starter_model_path) as m:
        yield m


def test_dict_and_text_give_the_same_grammar() -> None:
    grammar = pyllama.json_schema_to_grammar(PERSON)
    assert grammar == pyllama.json_schema_to_grammar(json.dumps(PERSON))
    assert "root ::=" in grammar and '\\"age\\"' in grammar


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_grammar_makes_a_random_model_write_valid_json(model: pyllama.Model, seed: int | None) -> None:
    """The synthetic model writes noise; under the schema's grammar, greedy or sampled, its output parses and
    validates against the schema (and without the grammar it does not parse)."""
    import jsonschema

    pick = pyllama.Greedy() if seed is None else pyllama.Dist(seed)
    with model.context(n_ctx=512, n_threads=1) as ctx:
        text = pyllama.generate_text(ctx, "Hello", max_tokens=300,
                                     sampler=[pyllama.Grammar(pyllama.json_schema_to_grammar(PERSON)), pick])
        free = pyllama.generate_text(ctx, "Hello", max_tokens=40, sampler=[pick])
    jsonschema.validate(json.loads(text), PERSON)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


@pytest.mark.starter
def test_constrained_generation_validates(starter: pyllama.Model) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    grammar = pyllama.Grammar(pyllama.json_schema_to_grammar(PERSON))
    prompt = "<start_of_turn>user\nDescribe a person as JSON.<end_of_turn>\n<start_of_turn>model\n"
    with starter.context(n_ctx=512) as ctx:
        with pyllama.generate(ctx, prompt, sampler=[grammar, pyllama.Greedy()], max_tokens=96) as gen:
            for _ in gen:
                pass
            text, reason = gen.text, gen.finish_reason
    assert reason == "eog", text  # the grammar completed, so only end-of-generation was allowed
    value = json.loads(text)
    jsonschema.validate(value, PERSON)


@pytest.mark.parametrize("schema", [
    "{not json",
    "42",
    "[]",
    {"$ref": "#/definitions/missing"},
    {"type": "nonsense"},
    {"type": "object", "properties": 5},
    {"type": "integer", "minimum": "zero"},
    {"anyOf": 3},
    {"enum": []},
    {"properties": {"x": {"$ref": "https://example.com/x.json"}}},
])
def test_malformed_schema_raises_value_error(schema: Any) -> None:
    with pytest.raises(ValueError):
        pyllama.json_schema_to_grammar(schema)


@pytest.mark.parametrize("schema", [True, 3, None, ["type", "object"]])
def test_schema_of_wrong_python_type_raises_value_error(schema: Any) -> None:
    with pytest.raises(ValueError, match="dict or JSON text"):
        pyllama.json_schema_to_grammar(schema)


def test_unserialisable_schema_raises_value_error() -> None:
    with pytest.raises(ValueError, match="serialisable"):
        pyllama.json_schema_to_grammar({"type": "object", "default": object()})
