"""JSON schema -> GBNF with llama.cpp's own converter (common/json-schema-to-grammar.cpp), and the bounds on
what a grammar may cost llama.cpp (pyllama.grammar.gbnf_cost)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import pyllama
from pyllama.grammar import GRAMMAR_MAX_STACKS

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def test_a_chat_json_schema_after_a_control_token_on_a_space_prefix_vocabulary(model: pyllama.Model) -> None:
    """The synthetic vocabulary is SentencePiece with add_space_prefix: llama.cpp tokenizes the generation prompt
    "<|im_start|>assistant\\n" with a space before "assistant", so advancing the template's JSON grammar over those
    tokens fails (llama-server answers such a request 400, "Failed to initialize samplers"). pyllama advances it
    over tokens that spell the text exactly, and the chat answers with JSON."""
    from pyllama.chat import ChatFormat

    pieces = [model.vocab.text(int(t)) for t in
              model.vocab.tokenize("<|im_start|>assistant\n", add_special=False, parse_special=True)]
    assert pieces[1].startswith("\u2581")  # the space llama.cpp's tokenizer adds (the planted fault)
    with ChatFormat(model) as fmt:
        cp = fmt.apply([{"role": "user", "content": "Who are you?"}], json_schema=PERSON)
        assert cp.prompt.endswith("<|im_start|>assistant\n")
        grammar = cp.grammar_sampler()
        assert grammar is not None
        with model.context(n_ctx=512, n_threads=1) as ctx:
            text = pyllama.generate_text(ctx, model.vocab.tokenize(cp.prompt, parse_special=True), max_tokens=200,
                                         sampler=[grammar, pyllama.Greedy()])
    json.loads(text)


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


# --- what a grammar costs llama.cpp (pyllama.grammar.gbnf_cost) and the bounds every grammar meets -----

def _nested(levels: int) -> dict[str, Any]:
    return {"type": "string", "pattern": "^" + "(" * levels + "x?" + "){2}" * levels + "$"}


def _object(depth: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s, "b": {"type": "integer"}}, "required": ["a"]}
    return s


REFUSED = [  # schema, what the error names; each took llama.cpp from 24 s to hours (or was a parse error)
    (_nested(14), "parse stacks"),  # 12 levels took 30 s to create, and 513 stacks 29 s a token
    ({"enum": [f"v{i}" for i in range(100_000)]}, "parse stacks"),  # 24 s to create
    ({"anyOf": [{"const": i} for i in range(1000)]}, "parse stacks"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 100_000}, "2000 repetitions"),
    ({"type": "string", "minLength": 1_000_000}, "2000 repetitions"),
]
ALLOWED = [  # schemas within the depth and size a request may have: each builds in well under a second
    _object(150),
    {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},  # llama.cpp reads it as unbounded
    {"type": "string", "maxLength": 1_000_000},
    {"type": "string", "pattern": "^((a+)+)+b{1,1000}$"},
    {"type": "integer", "minimum": -10**15, "maximum": 10**15},
    {"enum": [f"value {i}" for i in range(200)]},
    _nested(7),
]


@pytest.mark.parametrize("schema,named", REFUSED, ids=[f"refused{i}" for i in range(len(REFUSED))])
def test_costly_schemas_are_refused_before_llama_cpp_builds_them(model: pyllama.Model, schema: Any,
                                                                  named: str) -> None:
    from pyllama.grammar import gbnf_cost

    grammar = pyllama.json_schema_to_grammar(schema)
    t = time.perf_counter()
    with pytest.raises(pyllama.SamplerError, match=named):
        pyllama.SamplerChain([pyllama.Grammar(grammar), pyllama.Greedy()], model)
    assert time.perf_counter() - t < 2.0
    if named == "parse stacks":
        assert gbnf_cost(grammar).stacks > GRAMMAR_MAX_STACKS


@pytest.mark.parametrize("schema", ALLOWED, ids=[f"allowed{i}" for i in range(len(ALLOWED))])
def test_allowed_schemas_build_fast(model: pyllama.Model, schema: Any) -> None:
    grammar = pyllama.Grammar(pyllama.json_schema_to_grammar(schema))
    t = time.perf_counter()
    pyllama.SamplerChain([grammar, pyllama.Greedy()], model).close()
    assert time.perf_counter() - t < 1.0


def test_llama_cpp_grammars_are_within_the_bounds(model: pyllama.Model) -> None:
    """The grammars llama.cpp ships parse as llama.cpp parses them, and cost little."""
    from pyllama.grammar import check_gbnf

    files = sorted((Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "grammars").glob("*.gbnf"))
    assert len(files) >= 8
    for f in files:
        cost = check_gbnf(f.read_text())
        assert 0 < cost.stacks <= 12 and cost.rules < 100, (f.name, cost)
        pyllama.SamplerChain([pyllama.Grammar(f.read_text()), pyllama.Greedy()], model).close()


def test_a_call_to_one_of_128_tools_is_within_the_bounds(model: pyllama.Model) -> None:
    """The server takes 128 tools (OpenAI's limit): the template's tool-call grammar for them is allowed."""
    from test_server_starter import TOOL_TEMPLATE

    from pyllama.chat import ChatTemplate
    from pyllama.grammar import check_gbnf

    params = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city"]}
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": params}} for i in range(128)]
    with ChatTemplate(model, template=TOOL_TEMPLATE) as chat:
        out = chat.apply([{"role": "user", "content": "hi"}], tools=tools, tool_choice="required")
        grammar = out.grammar_sampler()
    assert grammar is not None
    assert 128 <= check_gbnf(grammar.grammar).stacks <= GRAMMAR_MAX_STACKS
    grammar.check(model)


@pytest.mark.parametrize("grammar,message", [
    ('root ::= "a" | b\n', "undefined rule identifier 'b'"),
    ('root ::= "a\n', "malformed string literal"),
    ("root ::= [a-\n", "malformed character class"),
    ('root ::= "a" )\n', "expecting newline or end"),
    ('root ::= ("a"\n', "expecting ')'"),
    ('root ::= "a"{3001}\n', "2000 repetitions"),
    ('root ::= ("a"{0,50}){0,50}\n', "2000"),
    ('root ::= "\\q"\n', "malformed string literal"),
    ("root ::= ?\n", "expecting preceding item"),
])
def test_grammar_syntax_errors_name_the_place(grammar: str, message: str) -> None:
    """Found before llama.cpp parses the text (which prints all of it to stderr on an error)."""
    from pyllama.grammar import gbnf_cost

    with pytest.raises(pyllama.SamplerError, match=re.escape(message)):
        gbnf_cost(grammar)


def test_gbnf_cost_counts_as_llama_cpp_rewrites() -> None:
    from pyllama.grammar import gbnf_cost

    assert gbnf_cost('root ::= "a" | "b" | "c"\n').stacks == 3
    assert gbnf_cost('root ::= "a"{0,1999}\n').rules == 1 + 1999  # S{0,n}: n nested optional rules
    assert gbnf_cost('root ::= x x x\nx ::= "a" | ""\n').stacks == 1 + 1 + 1 + 1  # three "a"s, or the end
    nested = "root ::= a0\n" + "".join(f"a{i} ::= a{i + 1} a{i + 1}\n" for i in range(10)) + 'a10 ::= "x" | ""\n'
    assert gbnf_cost(nested).stacks == 2**10 + 1
    # a rule that loops back through a part that may match nothing meets a stack already expanded: finite
    assert gbnf_cost('root ::= ("a"?)*\n').stacks <= 3
