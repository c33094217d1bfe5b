"""`pyllama serve`'s Anthropic Messages and OpenAI Responses APIs, driven by the real ``anthropic`` and
``openai`` SDKs (sync and async) against a real server subprocess on the synthetic model.

Both are translations onto the chat-completions path, so the same conversation gives the same greedy
text through all three APIs. The server's template is ChatML with a Hermes-style tool section, so a
named tool choice forces a tool call (a grammar over a tool whose one argument is an enum: the call
always ends). One test on the chat starter checks that the answers read sensibly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_fixture import RemoteServer  # noqa: E402

ALIAS = "synth"
KEY = "sk-compat"

TOOL_TEMPLATE = """\
{%- if tools -%}
<|im_start|>system
You can call these functions. To call one, answer with
<tool_call>
{"name": <function name>, "arguments": <arguments object>}
</tool_call>
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif -%}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% elif message.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""

UNIT_SCHEMA = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["unit"], "additionalProperties": False}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "The weather, in a unit", "input_schema": UNIT_SCHEMA}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The weather, in a unit",
                  "parameters": UNIT_SCHEMA}
SYSTEM = "Be brief."
GREEDY = {"temperature": 0}  # the anthropic SDK has no sampling arguments any more: sent as extra body fields
USER = "Hello world the"


@pytest.fixture(scope="module")
def server(synth_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    template = tmp_path_factory.mktemp("tmpl") / "chatml-tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    with RemoteServer(synth_model_path, "--slots", "2", "--ctx-slot", "512", "--alias", ALIAS,
                      "--chat-template-file", str(template), "--keepalive", "0.001", api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def claude(server: RemoteServer) -> Any:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> Any:
    return openai.OpenAI(base_url=server.url_for("v1"), api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_text(client: Any) -> str:
    """The greedy reply of chat completions to [system, user]: what the other two APIs must give."""
    r = client.chat.completions.create(model=ALIAS, max_tokens=8, extra_body=GREEDY,
                                       messages=[{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": USER}])
    assert r.choices[0].message.content
    return str(r.choices[0].message.content)


def _post(server: RemoteServer, path: str, body: dict[str, Any], **headers: str) -> Any:
    return httpx.post(server.url + path, json=body, headers=headers or {"x-api-key": KEY}, timeout=60)


def _sse(server: RemoteServer, path: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each named event of a streamed answer."""
    out, name = [], ""
    with httpx.stream("POST", server.url + path, json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name, (name, data)
                out.append((name, data))
    return out


# --- Anthropic Messages -----------------------------------------------------------------------------

def test_anthropic_message_matches_chat_completions(claude: Any, chat_text: str) -> None:
    msg = claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, extra_body=GREEDY, system=SYSTEM,
                                 messages=[{"role": "user", "content": USER}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == chat_text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 8 and msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 5
    # system as blocks, content as blocks: the same conversation
    again = claude.messages.create(model=ALIAS, max_tokens=8, extra_body=GREEDY,
                                   system=[{"type": "text", "text": SYSTEM}],
                                   messages=[{"role": "user", "content": [{"type": "text", "text": USER}]}])
    assert again.content[0].text == chat_text and again.usage.cache_read_input_tokens > 0


def test_anthropic_streams(server: RemoteServer, claude: Any, chat_text: str) -> None:
    kwargs: dict[str, Any] = dict(model=ALIAS, max_tokens=8, extra_body=GREEDY, system=SYSTEM,
                                  messages=[{"role": "user", "content": USER}])
    with claude.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == chat_text and final.content[0].text == chat_text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    events = [e.type for e in claude.messages.create(stream=True, **kwargs)]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert events[1:].count("content_block_start") == 1 and "content_block_delta" in events
    # on the wire: named events, a ping after message_start, block indices that open and close in order
    body = {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **GREEDY, "stream": True}
    wire = _sse(server, "/v1/messages", body)
    names = [n for n, _ in wire]
    first = names.index("message_start")  # keep-alive pings may come before it
    assert set(names[:first]) <= {"ping"} and names[first + 1] == "ping"
    rest = [n for n in names[first + 1:] if n != "ping"]
    assert rest[0] == "content_block_start" and rest[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(rest[1:-3]) == {"content_block_delta"}
    start = wire[first][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert all(d["index"] == 0 for n, d in wire if n.startswith("content_block"))
    delta = wire[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 8


def test_anthropic_stop_sequences(claude: Any) -> None:
    full = claude.messages.create(model=ALIAS, max_tokens=16, extra_body=GREEDY,
                                  messages=[{"role": "user", "content": "the cat and the dog"}]).content[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    msg = claude.messages.create(model=ALIAS, max_tokens=16, extra_body=GREEDY, stop_sequences=["zzzq", stop],
                                 messages=[{"role": "user", "content": "the cat and the dog"}])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert "".join(b.text for b in msg.content) == full[:full.find(stop)]


def test_anthropic_count_tokens(claude: Any) -> None:
    messages = [{"role": "user", "content": USER}]
    count = claude.messages.count_tokens(model=ALIAS, system=SYSTEM, messages=messages)
    used = claude.messages.create(model=ALIAS, max_tokens=1, system=SYSTEM, messages=messages).usage
    assert count.input_tokens == used.input_tokens + used.cache_read_input_tokens > 5
    with_tool = claude.messages.count_tokens(model=ALIAS, messages=messages, tools=[ANTHROPIC_TOOL])
    assert with_tool.input_tokens > count.input_tokens  # the tool section of the template


def test_anthropic_auth_and_errors(server: RemoteServer, claude: Any) -> None:
    body = {"model": ALIAS, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert _post(server, "/v1/messages", body, authorization=f"Bearer {KEY}").status_code == 200
    for headers in ({"x-api-key": "wrong"}, {}):
        r = httpx.post(server.url + "/v1/messages", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "authentication_error"
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=ALIAS, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    cases = [
        ({"model": ALIAS, "max_tokens": 2}, "messages"),
        ({**body, "messages": []}, "at least one message"),
        ({**body, "max_tokens": 0}, "max_tokens"),
        ({**body, "temperature": "hot"}, "temperature"),
        ({**body, "messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "image input is not supported"),
        ({**body, "tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ]
    for case, message in cases:
        r = _post(server, "/v1/messages", case)
        assert r.status_code == 400, (case, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
        assert message in err["error"]["message"], err
    with pytest.raises(anthropic.BadRequestError, match="at least one message"):
        claude.messages.create(model=ALIAS, max_tokens=2, messages=[])


def test_anthropic_async(server: RemoteServer, chat_text: str) -> None:
    async def main() -> None:
        claude = anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
        kwargs: dict[str, Any] = dict(model=ALIAS, max_tokens=8, extra_body=GREEDY, system=SYSTEM,
                                      messages=[{"role": "user", "content": USER}])
        msg, streamed = await asyncio.gather(claude.messages.create(**kwargs), _astream(claude, kwargs))
        assert msg.content[0].text == chat_text and streamed == chat_text
        count = await claude.messages.count_tokens(model=ALIAS, system=SYSTEM, messages=kwargs["messages"])
        assert count.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
        await claude.close()

    async def _astream(claude: Any, kwargs: dict[str, Any]) -> str:
        async with claude.messages.stream(**kwargs) as stream:
            return "".join([t async for t in stream.text_stream])

    asyncio.run(main())


# --- OpenAI Responses -------------------------------------------------------------------------------

def test_responses_match_chat_completions(client: Any, chat_text: str) -> None:
    r = client.responses.create(model="gpt-4.1", instructions=SYSTEM, input=USER, max_output_tokens=8,
                                temperature=0)
    assert r.id.startswith("resp_") and r.object == "response"
    assert [o.type for o in r.output] == ["message"] and r.output[0].id.startswith("msg_")
    assert r.output_text == chat_text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 8 and r.usage.total_tokens == r.usage.input_tokens + 8
    # the same conversation as input items (easy messages and typed content)
    items = client.responses.create(model=ALIAS, max_output_tokens=8, temperature=0, input=[
        {"role": "system", "content": SYSTEM},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": USER}]}])
    assert items.output_text == chat_text and items.usage.input_tokens_details.cached_tokens > 0


def test_responses_stream(client: Any, chat_text: str) -> None:
    events = list(client.responses.create(model=ALIAS, instructions=SYSTEM, input=USER, max_output_tokens=8,
                                          temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    rid = events[0].response.id
    msg_id = events[2].item.id
    assert rid.startswith("resp_") and msg_id.startswith("msg_")
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(e.item_id == msg_id and e.output_index == 0 for e in deltas)
    text = "".join(e.delta for e in deltas)
    done = events[-1].response
    assert text == chat_text == done.output_text and done.id == rid and done.output[0].id == msg_id
    assert done.usage.output_tokens == 8
    # the SDK's accumulating helper reads the same stream
    with client.responses.stream(model=ALIAS, instructions=SYSTEM, input=USER, max_output_tokens=8,
                                 temperature=0) as stream:
        assert stream.get_final_response().output_text == chat_text


def test_responses_errors_and_input_tokens(server: RemoteServer, client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=ALIAS, input="hi", previous_response_id="resp_x")
    with pytest.raises(openai.BadRequestError, match="image input is not supported"):
        client.responses.create(model=ALIAS, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url_for("v1"), api_key="wrong", max_retries=0).responses.create(
            model=ALIAS, input="hi")
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": ALIAS, "instructions": SYSTEM, "input": USER}
    r = httpx.post(server.url_for("v1", "responses", "input_tokens"), json=body, headers=headers)
    assert r.status_code == 200 and r.json()["object"] == "response.input_tokens"
    used = client.responses.create(max_output_tokens=1, **body).usage
    assert r.json()["input_tokens"] == used.input_tokens
    bad = httpx.post(server.url_for("v1", "responses"), json={"model": ALIAS}, headers=headers)
    assert bad.status_code == 400 and "input" in bad.json()["error"]["message"]


def test_responses_async(server: RemoteServer, chat_text: str) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=server.url_for("v1"), api_key=KEY, max_retries=0, timeout=60)
        kwargs: dict[str, Any] = dict(model=ALIAS, instructions=SYSTEM, input=USER, max_output_tokens=8,
                                      temperature=0)
        plain, stream = await asyncio.gather(client.responses.create(**kwargs),
                                             client.responses.create(stream=True, **kwargs))
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        assert plain.output_text == text == chat_text
        await client.close()

    asyncio.run(main())


# --- the chat starter: answers that read sensibly ----------------------------------------------------

@pytest.mark.starter
@pytest.mark.slow
def test_chat_starter_answers_through_both(chat_starter_path: Path) -> None:
    question = "What is the capital of France?"
    with RemoteServer(chat_starter_path, "--slots", "1", "-c", "1024") as srv:
        claude = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        msg = claude.messages.create(model="any", max_tokens=32, extra_body=GREEDY,
                                     system="You are a helpful assistant.",
                                     messages=[{"role": "user", "content": question}])
        assert "Paris" in msg.content[0].text and msg.stop_reason == "end_turn", msg
        client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="unused", max_retries=0, timeout=120)
        r = client.responses.create(model="any", max_output_tokens=32, temperature=0,
                                    instructions="You are a helpful assistant.", input=question)
        assert r.output_text == msg.content[0].text and r.status == "completed"


# --- tools: on the starter (Gemma 3 270M) with a tool template and worked examples ------------------

CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
EXAMPLES = (("Berlin", "sunny"), ("London", "rainy"))
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def tool_server(starter_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    from test_server_starter import TOOL_TEMPLATE as GEMMA_TOOLS

    template = tmp_path_factory.mktemp("tmpl") / "gemma-tools.jinja"
    template.write_text(GEMMA_TOOLS)
    with RemoteServer(starter_model_path, "--slots", "2", "--ctx-slot", "1024",
                      "--chat-template-file", str(template)) as srv:
        yield srv


def _anthropic_history() -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    for i, (city, weather) in enumerate(EXAMPLES):
        msgs += [{"role": "user", "content": f"What is the weather in {city}?"},
                 {"role": "assistant", "content": [{"type": "tool_use", "id": f"call_{i}", "name": "get_weather",
                                                    "input": {"city": city}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"call_{i}",
                                               "content": [{"type": "text", "text": weather}]}]},
                 {"role": "assistant", "content": f"It is {weather} in {city}."}]
    return [*msgs, {"role": "user", "content": QUESTION}]


def _responses_history() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i, (city, weather) in enumerate(EXAMPLES):
        items += [{"role": "user", "content": f"What is the weather in {city}?"},
                  {"type": "function_call", "call_id": f"call_{i}", "name": "get_weather",
                   "arguments": json.dumps({"city": city})},
                  {"type": "function_call_output", "call_id": f"call_{i}", "output": weather},
                  {"type": "message", "role": "assistant",
                   "content": [{"type": "output_text", "text": f"It is {weather} in {city}."}]}]
    return [*items, {"role": "user", "content": QUESTION}]


@pytest.mark.starter
@pytest.mark.slow
def test_anthropic_tool_use(tool_server: RemoteServer) -> None:
    claude = anthropic.Anthropic(base_url=tool_server.url, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "Get the weather for a city", "input_schema": CITY_SCHEMA}
    kwargs: dict[str, Any] = dict(model="any", max_tokens=32, extra_body=GREEDY, tools=[tool],
                                  tool_choice={"type": "tool", "name": "get_weather"},
                                  messages=_anthropic_history())
    msg = claude.messages.create(**kwargs)
    # the small model may go on after its call until max_tokens (llama-server's stop_reason then: max_tokens)
    assert msg.stop_reason in ("tool_use", "max_tokens"), msg
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id
    assert isinstance(uses[0].input["city"], str)
    # streamed: one tool_use block whose input_json_delta fragments make the same input
    with claude.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"] and starts[0].content_block.name == "get_weather"
    fragments = "".join(e.delta.partial_json for e in events
                        if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(fragments) == uses[0].input
    assert final.stop_reason == msg.stop_reason and final.content[-1].input == uses[0].input
    # the call and its result go back in: an answer in text
    follow = claude.messages.create(**{**kwargs, "tool_choice": {"type": "none"}, "max_tokens": 12, "messages": [
        *kwargs["messages"],
        {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather",
                                           "input": uses[0].input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "cloudy"}]}]})
    assert follow.content and follow.content[0].type == "text" and follow.stop_reason != "tool_use"


@pytest.mark.starter
@pytest.mark.slow
def test_responses_function_call(tool_server: RemoteServer) -> None:
    client = openai.OpenAI(base_url=tool_server.url_for("v1"), api_key="unused", max_retries=0, timeout=120)
    tool = {"type": "function", "name": "get_weather", "description": "Get the weather for a city",
            "parameters": CITY_SCHEMA}
    kwargs: dict[str, Any] = dict(model="any", max_output_tokens=32, temperature=0, tools=[tool],
                                  tool_choice={"type": "function", "name": "get_weather"},
                                  input=_responses_history())
    r = client.responses.create(**kwargs)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id, r.output
    args = json.loads(calls[0].arguments)
    assert isinstance(args["city"], str) and r.status in ("completed", "incomplete")
    events = list(client.responses.create(stream=True, **kwargs))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call"] and added[0].item.name == "get_weather"
    fragments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(fragments) == args and done[0].arguments == fragments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].arguments == fragments
    follow = client.responses.create(**{**kwargs, "tool_choice": "none", "max_output_tokens": 12, "input": [
        *kwargs["input"], {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                           "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "cloudy"}]})
    assert follow.output[0].type == "message" and follow.output_text

