"""One chat-template path: the library, `pyllama chat`, the worker and the server render the same prompt.

Every template of the vendored llama.cpp tree (``models/templates/*.jinja``) is given as the
template of the synthetic model, and the prompt of :func:`pyllama.apply_template` is compared,
byte for byte, with the one the server's chat-completion route renders
(:meth:`pyllama.server.chat.ChatPrompter.plan`, the function the route calls) and with llama.cpp's
Jinja path itself (:class:`pyllama.ChatFormat`, common/chat).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

import pyllama
from pyllama.chat import LEGACY_FORMAT, ChatTemplate

pytest.importorskip("pydantic")

from pyllama.server.chat import ChatPrompter  # noqa: E402
from pyllama.server.protocol import APIError, ChatCompletionRequest  # noqa: E402

TEMPLATES = sorted((Path(__file__).parents[1] / "vendor" / "llama.cpp" / "models" / "templates").glob("*.jinja"))

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "What is 2+2?"}],
]

# SmolLM2-135M-Instruct's template (the chat starter's): it adds a system message when there is none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _server_prompt(model: pyllama.Model, messages: list[dict[str, str]], template: str | None) -> str | None:
    prompter = ChatPrompter(model, template=template)
    try:
        return prompter.plan(ChatCompletionRequest(model="any", messages=messages)).prompt  # type: ignore[arg-type]
    except APIError:
        return None
    finally:
        prompter.close()


def _library_prompt(model: pyllama.Model, messages: list[dict[str, str]], template: str | None) -> str | None:
    try:
        return pyllama.apply_template(model, messages, template=template)
    except pyllama.TemplateError:
        return None


def test_the_vendored_templates_are_there() -> None:
    assert len(TEMPLATES) >= 40, "vendor/llama.cpp is not materialised (python tools/vendor.py)"


@pytest.mark.may_skip  # a vendored template may render none of the conversations
@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_library_and_server_prompts_are_identical(model: pyllama.Model, path: Path) -> None:
    template = path.read_text(encoding="utf-8")
    rendered = 0
    for messages in CONVERSATIONS:
        library = _library_prompt(model, messages, template)
        server = _server_prompt(model, messages, template)
        assert library == server, f"{path.name}: the library and the server disagree"
        if library is None:
            continue
        rendered += 1
        with pyllama.ChatFormat(model, template=template) as fmt:  # llama.cpp's Jinja path, not the fallback
            assert fmt.apply(messages).prompt == library
    if not rendered:
        pytest.skip(f"{path.name} renders none of the test conversations")


def test_model_template_and_template_override_agree(model: pyllama.Model) -> None:
    for messages in CONVERSATIONS:
        own = pyllama.apply_template(model, messages)
        assert own == _server_prompt(model, messages, None)
        assert own == pyllama.apply_template(model, messages, template=model.chat_template())


def test_the_templates_default_system_message_is_kept(model: pyllama.Model) -> None:
    # The bug this path fixes: the library rendered SmolLM2 without the system message its template
    # adds, while the server (llama.cpp's common/chat, as llama-server) added it.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    library = pyllama.apply_template(model, messages, template=SMOLLM2_TEMPLATE)
    assert library.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert library == _server_prompt(model, messages, SMOLLM2_TEMPLATE)


def test_chat_session_renders_through_the_same_path(model: pyllama.Model) -> None:
    with model.context(n_ctx=512) as ctx:
        chat = pyllama.ChatSession(ctx, template=SMOLLM2_TEMPLATE, max_tokens=4)
        chat.messages.append({"role": "user", "content": "Hello"})
        expected = pyllama.apply_template(model, chat.messages, template=SMOLLM2_TEMPLATE)
        # the synthetic vocabulary adds BOS, which this template does not write
        assert list(chat._prompt_tokens()) == list(model.tokenize(expected, add_special=True, parse_special=True))
        chat.close()


def test_a_template_name_renders_through_the_legacy_path_with_a_warning(model: pyllama.Model,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    messages = CONVERSATIONS[0]
    with caplog.at_level(logging.WARNING, logger="pyllama.chat"):
        with ChatTemplate(model, template="llama3") as chat:
            cp = chat.apply(messages)
    assert cp.format == LEGACY_FORMAT and cp.prompt.startswith("<|start_header_id|>user<|end_header_id|>\n\nHello")
    assert cp.parse("Hi!") == {"role": "assistant", "content": "Hi!", "reasoning_content": None, "tool_calls": None}
    assert "llama_chat_apply_template" in caplog.text
    assert pyllama.apply_template(model, messages, template="llama3") == cp.prompt == _server_prompt(
        model, messages, "llama3")
    with ChatTemplate(model, template="llama3") as chat, pytest.raises(pyllama.TemplateError, match="tool calls"):
        chat.apply(messages, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_a_template_the_jinja_engine_cannot_render_falls_back_with_a_warning(
        model: pyllama.Model, caplog: pytest.LogCaptureFixture) -> None:
    # ChatML by its markers (llama.cpp's legacy renderer recognises it), but the Jinja raises.
    broken = "{{ raise_exception('no') }}<|im_start|>{{ messages[0]['content'] }}<|im_end|>"
    messages = CONVERSATIONS[1]
    with caplog.at_level(logging.WARNING, logger="pyllama.chat"):
        text = pyllama.apply_template(model, messages, template=broken)
    assert text == pyllama.apply_template(model, messages, template="chatml")
    assert "cannot render" in caplog.text and "llama_chat_apply_template" in caplog.text
    assert _server_prompt(model, messages, broken) == text
    # Neither renderer knows it: the Jinja engine's error.
    with pytest.raises(pyllama.TemplateError, match="no system"):
        pyllama.apply_template(model, messages, template="{{ raise_exception('no system') }}")


def test_the_worker_renders_the_same_prompt(model: pyllama.Model, synth_model_path: Path) -> None:
    messages: list[dict[str, Any]] = CONVERSATIONS[1]
    with pyllama.Worker() as worker:
        worker.load(str(synth_model_path), n_ctx=256)
        assert worker.apply_template(messages, template=SMOLLM2_TEMPLATE) == pyllama.apply_template(
            model, messages, template=SMOLLM2_TEMPLATE)


def test_the_legacy_renderer_by_choice(model: pyllama.Model) -> None:
    """jinja=False (llama-server --no-jinja): llama_chat_apply_template alone; content parts joined by newlines
    as common/chat joins them; a JSON schema becomes a plain grammar; a prefill is the earlier turns opened for
    the assistant, then its text."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    with ChatTemplate(model, template="chatml", jinja=False) as chat:
        cp = chat.apply(messages, json_schema={"const": "42"})
        assert cp.format == LEGACY_FORMAT and chat.format is None
        assert cp.prompt == "<|im_start|>user\nHel\nlo<|im_end|>\n<|im_start|>assistant\n"
        assert cp.grammar == pyllama.json_schema_to_grammar({"const": "42"})
        prefilled = chat.apply([*messages, {"role": "assistant", "content": "Wh"}], add_generation_prompt=False,
                               continue_final_message=True)
        assert prefilled.prompt == cp.prompt + "Wh"
        with pytest.raises(ValueError, match="assistant message"):
            chat.apply(messages, add_generation_prompt=False, continue_final_message=True)
