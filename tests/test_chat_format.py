"""llama.cpp's own chat handling (common/chat.cpp through libpyllama-common): templates,
tool calls, grammars and output parsing, on the synthetic model and the real starter model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

import pyllama
from pyllama.chat import ChatFormat, ChatPrompt

# A Gemma-style template that can render tools, written for these tests: the starter
# GGUF carries no template, and Gemma 3's own does not render tools.
TOOL_TEMPLATE = """{{- bos_token -}}
{%- if tools -%}
<start_of_turn>system
You can call these functions. To call one, answer with
<tool_call>
{"name": <function name>, "arguments": <arguments object>}
</tool_call>
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><end_of_turn>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
<start_of_turn>model
{% if message.content %}{{ message.content }}{% endif -%}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor -%}
{%- endif -%}
<end_of_turn>
{% elif message.role == 'tool' -%}
<start_of_turn>user
<tool_response>
{{ message.content }}
</tool_response><end_of_turn>
{% else -%}
<start_of_turn>{{ message.role }}
{{ message.content }}<end_of_turn>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model
{% endif -%}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def starter(starter_model_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(starter_model_path) as m:
        yield m


@pytest.fixture(scope="module")
def fmt(starter: pyllama.Model) -> Iterator[ChatFormat]:
    with ChatFormat(starter, template=TOOL_TEMPLATE) as f:
        yield f


def _generate(model: pyllama.Model, cp: ChatPrompt, max_tokens: int) -> str:
    sampler = cp.grammar_sampler()
    assert sampler is not None
    with model.context(n_ctx=1024) as ctx:
        return pyllama.generate_text(ctx, cp.prompt, sampler=[sampler, pyllama.Greedy()], max_tokens=max_tokens,
                                     stop=cp.additional_stops)


# --- rendering --------------------------------------------------------------------------------


def test_model_template_matches_apply_template(model: pyllama.Model) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    with ChatFormat(model) as f:
        assert f.source == model.chat_template()
        cp = f.apply(messages)
    assert cp.prompt == pyllama.apply_template(model, messages)
    assert cp.grammar == "" and cp.grammar_sampler() is None


@pytest.mark.starter
def test_model_without_template_uses_its_family_format(starter: pyllama.Model) -> None:
    assert starter.chat_template() is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    with ChatFormat(starter) as f:
        assert f.apply(messages).prompt == pyllama.apply_template(starter, messages)
        # Gemma 3's format has no tools: asking for them is an error, not a silent drop.
        with pytest.raises(pyllama.TemplateError, match="tool"):
            f.apply(ASK, tools=[WEATHER])


@pytest.mark.starter
def test_tools_are_rendered_and_required_grammar_is_strict(fmt: ChatFormat) -> None:
    assert fmt.caps["tool_calls"] and fmt.caps["tools"]
    cp = fmt.apply(ASK, tools=[WEATHER], tool_choice="required")
    assert "get_weather" in cp.prompt and "Current weather of a city" in cp.prompt
    assert cp.prompt.endswith("<start_of_turn>model\n")
    assert cp.grammar and not cp.grammar_lazy and "get_weather" in cp.grammar
    assert "<tool_call>" in cp.preserved_tokens
    sampler = cp.grammar_sampler()
    assert sampler is not None and sampler.prefill == cp.generation_prompt
    assert not sampler.trigger_patterns and not sampler.trigger_tokens


@pytest.mark.starter
def test_auto_tool_choice_gives_a_lazy_grammar_with_triggers(fmt: ChatFormat) -> None:
    cp = fmt.apply(ASK, tools=[WEATHER, CLOCK])
    assert cp.grammar_lazy and cp.grammar_triggers
    sampler = cp.grammar_sampler()
    assert sampler is not None and sampler.prefill == ""
    assert list(sampler.trigger_patterns) + list(sampler.trigger_tokens)
    # a trigger word of several tokens becomes an escaped literal pattern
    for trig in cp.grammar_triggers:
        if trig["type"] == "word" and len(fmt.model.tokenize(trig["value"], add_special=False,
                                                               parse_special=True)) > 1:
            assert any(p.replace("\\", "") == trig["value"] for p in sampler.trigger_patterns)
    none = fmt.apply(ASK, tools=[WEATHER], tool_choice="none")
    assert none.grammar == ""


@pytest.mark.starter
def test_named_tool_choice_keeps_only_that_tool(fmt: ChatFormat) -> None:
    cp = fmt.apply(ASK, tools=[WEATHER, CLOCK],
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in cp.grammar and "get_weather" not in cp.grammar and not cp.grammar_lazy
    with pytest.raises(ValueError, match="not among the tools"):
        fmt.apply(ASK, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.starter
def test_history_with_tool_calls_and_results_renders(fmt: ChatFormat) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    cp = fmt.apply(history, tools=[WEATHER])
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in cp.prompt
    assert '"city": "Paris"' in cp.prompt
    # arguments given as an object are accepted too
    history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert fmt.apply(history, tools=[WEATHER]).prompt == cp.prompt


# --- generation and parsing -------------------------------------------------------------------


@pytest.mark.starter
def test_required_tool_call_generation_parses(starter: pyllama.Model, fmt: ChatFormat) -> None:
    cp = fmt.apply(ASK, tools=[WEATHER], tool_choice="required")
    text = _generate(starter, cp, max_tokens=40)
    msg = cp.parse(text, partial=True)
    assert msg["role"] == "assistant" and msg["tool_calls"], text
    call = msg["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert isinstance(args, dict) and isinstance(args["city"], str)


@pytest.mark.starter
def test_chat_session_with_tools(starter: pyllama.Model) -> None:
    with starter.context(n_ctx=1024) as ctx:
        chat = pyllama.ChatSession(ctx, template=TOOL_TEMPLATE, tools=[WEATHER], tool_choice="required",
                                   max_tokens=40)
        chat.ask("What is the weather in Rome?")
        last = chat.last_message
        assert last is not None and last["tool_calls"]
        call = last["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        assert chat.messages[-1]["tool_calls"] == last["tool_calls"]
        chat.add_tool_result("rainy, 12 C", tool_call_id=call["id"])
        chat.tool_choice = "none"
        reply = chat.ask(max_tokens=8)
        assert chat.messages[-1] == {"role": "assistant", "content": chat.last_message["content"]}  # type: ignore[index]
        assert isinstance(reply, str)
        chat.close()


@pytest.mark.starter
def test_parse_hand_written_outputs(fmt: ChatFormat) -> None:
    cp = fmt.apply(ASK, tools=[WEATHER, CLOCK], parallel_tool_calls=True)
    msg = cp.parse('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    assert msg["content"] is None
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_time"]
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"zone": "UTC"}
    plain = cp.parse("It is sunny.")
    assert plain == {"role": "assistant", "content": "It is sunny.", "reasoning_content": None, "tool_calls": None}
    # a stream cut anywhere parses without error
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for i in range(len(text) + 1):
        part = cp.parse(text[:i], partial=True)
        assert part["role"] == "assistant"
    assert part["tool_calls"] and part["content"] == "Sure.\n"


@pytest.mark.starter
def test_json_schema_through_the_template(starter: pyllama.Model, fmt: ChatFormat) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "rain": {"type": "boolean"}},
              "required": ["city", "rain"], "additionalProperties": False}
    cp = fmt.apply([{"role": "user", "content": "Describe Paris weather as JSON."}], json_schema=schema)
    assert cp.grammar and not cp.grammar_lazy
    text = _generate(starter, cp, max_tokens=48)
    value = json.loads(cp.parse(text)["content"])
    jsonschema.validate(value, schema)


THINK_TEMPLATE = """{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
<|im_start|>assistant
{% if message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content }}<|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{%- endif -%}
"""


def test_reasoning_is_split_from_the_content(model: pyllama.Model) -> None:
    hello = [{"role": "user", "content": "hi"}]
    reply = "<think>\nLet me see.\n</think>\n\nHello!"
    with ChatFormat(model, template=THINK_TEMPLATE) as f:
        cp = f.apply(hello)
        assert cp.supports_thinking and cp.thinking_start_tag == "<think>" and cp.thinking_end_tags == ["</think>"]
        msg = cp.parse(reply)
        assert msg["content"] == "Hello!" and msg["reasoning_content"].strip() == "Let me see."
        assert cp.parse("<think>\nLet me", partial=True)["reasoning_content"] == "Let me"
        assert f.apply(hello, reasoning_format="none").parse(reply)["content"] == reply
        off = f.apply(hello, enable_thinking=False)
        assert off.prompt.endswith("<think>\n\n</think>\n\n")
        assert off.parse("Hello!")["content"] == "Hello!"
        # earlier reasoning goes back into the history as the template renders it
        history = [*hello, {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
                   {"role": "user", "content": "bye"}]
        assert "<think>\nGreet back.\n</think>" in f.apply(history).prompt


# --- errors: clear exceptions, never a crash --------------------------------------------------


@pytest.mark.parametrize("messages", [
    "hello",
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 42}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "assistant"}],
    [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
    [{"role": 5, "content": "x"}],
    ["not a dict"],
])
def test_malformed_messages_raise_value_error(model: pyllama.Model, messages: Any) -> None:
    with ChatFormat(model) as f, pytest.raises(ValueError):
        f.apply(messages)


@pytest.mark.starter
@pytest.mark.parametrize("kwargs", [
    {"tools": "get_weather"},
    {"tools": [{"type": "function"}]},
    {"tools": [WEATHER], "tool_choice": "sometimes"},
    {"tools": [WEATHER], "tool_choice": {"type": "function"}},
    {"tools": [WEATHER], "grammar": 'root ::= "x"'},
    {"json_schema": {"type": "object"}, "grammar": 'root ::= "x"'},
    {"json_schema": {"type": "nonsense"}},
    {"json_schema": ["not", "an", "object"]},
    {"reasoning_format": "loud"},
    {"template_kwargs": {"x": object()}},
])
def test_malformed_requests_raise_value_error(fmt: ChatFormat, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        fmt.apply(ASK, **kwargs)


def test_template_errors(model: pyllama.Model) -> None:
    with pytest.raises(pyllama.TemplateError):
        ChatFormat(model, template="{% for m in messages %}{{ m.content ")
    with pytest.raises(pyllama.TemplateError):
        ChatFormat(model, template="   ")
    with ChatFormat(model, template="{{ raise_exception('no users here') }}") as f:
        with pytest.raises(pyllama.TemplateError, match="no users here"):
            f.apply([{"role": "user", "content": "hi"}])


def test_closed_format_and_prompt_without_state(model: pyllama.Model) -> None:
    f = ChatFormat(model)
    cp = f.apply([{"role": "user", "content": "hi"}])
    f.close()
    f.close()
    with pytest.raises(pyllama.ClosedError):
        f.apply([{"role": "user", "content": "hi"}])
    assert cp.parse("still parses")["content"] == "still parses"
    bare = ChatPrompt(prompt="", grammar="", grammar_lazy=False, grammar_triggers=[], preserved_tokens=[],
                      additional_stops=[], format="")
    with pytest.raises(ValueError):
        bare.parse("x")


def test_prefill_the_grammar_rejects_is_a_sampler_error(model: pyllama.Model) -> None:
    spec = pyllama.PrefilledGrammar('root ::= "yes" | "no"', prefill="maybe")
    with pytest.raises(pyllama.SamplerError, match="rejects"):
        pyllama.SamplerChain([spec, pyllama.Greedy()], model)


@pytest.mark.starter
def test_prefill_advances_the_grammar(starter: pyllama.Model) -> None:
    # the grammar starts with text already at the end of the prompt, as template grammars do
    grammar = 'root ::= "<start_of_turn>model\n" ("yes" | "no")'
    prompt = "<start_of_turn>user\nIs water wet?<end_of_turn>\n<start_of_turn>model\n"
    spec = pyllama.PrefilledGrammar(grammar, prefill="<start_of_turn>model\n")
    with starter.context(n_ctx=256) as ctx:
        text = pyllama.generate_text(ctx, prompt, sampler=[spec, pyllama.Greedy()], max_tokens=4)
    assert text in ("yes", "no")
