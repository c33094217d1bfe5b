"""Chat: the model's chat template, and a session that keeps its KV cache between turns."""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence, Union

from ._ffi import ffi, lib
from ._handle import Handle
from .errors import LlamaError, TemplateError
from .generate import Generation, TokenEvent
from .grammar import PrefilledGrammar, _call, json_schema_to_grammar
from .media import Media, MediaError, MediaPrompt, split_media
from .options import KNOBS, SAMPLING_KEYS, SamplingOptions, Unpack, check, sampler_from
from .samplers import Greedy, Sampler, default_chain

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

Message = Mapping[str, str]


def apply_template(model: Model, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                   template: str | None = None) -> str:
    """Render ``messages`` ({"role", "content"} dicts) with the model's chat template (or ``template``).

    The prompt is the one ``pyllama serve`` and ``llama-server`` build for the same
    messages: llama.cpp's Jinja engine (common/chat) renders the template, with
    whatever it adds (a default system message, for one). :class:`ChatTemplate`
    does the rendering and says when llama.cpp's legacy renderer stands in.
    """
    _validate_messages(messages)
    with ChatTemplate(model, template=template) as chat:
        return chat.apply(messages, add_generation_prompt=add_generation_prompt).prompt


def _validate_messages(messages: object) -> None:
    """TemplateError naming the bad field (``messages[0]: missing 'content'``) before any C call."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                            f"not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"messages[{i}]: must be a dict with 'role' and 'content', not {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise TemplateError(f"messages[{i}]: missing {key!r}")
            v = m[key]
            if not isinstance(v, str):
                raise TemplateError(f"messages[{i}][{key!r}]: must be a str, not {type(v).__name__}")
            if "\0" in v:  # llama.cpp reads C strings: the rest would be dropped silently
                raise TemplateError(f"messages[{i}][{key!r}]: contains a NUL character")


def _joined_parts(message: Any) -> Any:
    """A message whose content is a list of text parts, with the parts joined by newlines, as common/chat
    joins them for a renderer that takes strings (other messages as they are)."""
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list) or not all(isinstance(p, Mapping) and p.get("type") == "text"
                                                and isinstance(p.get("text"), str) for p in content):
        return message
    return {**message, "content": "\n".join(p["text"] for p in content)}


#: a user's turn: text, or parts (strings, pyllama.Image / pyllama.Audio, OpenAI-style content parts)
UserMessage = Union[str, Sequence[Union[str, "Media", Mapping[str, Any]]]]


def user_content(message: UserMessage) -> Any:
    """A user message's content as the history keeps it: a string, or a list of content parts."""
    if isinstance(message, str):
        return message
    if isinstance(message, (bytes, Mapping)) or not isinstance(message, Sequence):
        raise TypeError(f"a message is a string or a list of parts, not {type(message).__name__}")
    return [{"type": "text", "text": p} if isinstance(p, str) else p for p in message]


def builtin_templates() -> list[str]:
    """Names of the chat templates llama.cpp renders itself (usable as ``template=``)."""
    n = lib.llama_chat_builtin_templates(ffi.NULL, 0)
    arr = ffi.new("const char *[]", n)
    lib.llama_chat_builtin_templates(arr, n)
    return [ffi.string(arr[i]).decode() for i in range(n)]


def _builtin_for_architecture(arch: str) -> str | None:
    # GGUF files converted without tokenizer_config.json carry no template; llama.cpp's
    # named template for the model family is the next best thing (gemma3 -> gemma).
    names = set(builtin_templates())
    for cand in (arch, arch.rstrip("0123456789"), arch.split("-")[0]):
        if cand in names:
            return cand
    return None


def _apply_builtin(tmpl: str, messages: Sequence[Message], add_ass: bool) -> str | None:
    keep = []
    arr = ffi.new("llama_chat_message[]", max(1, len(messages)))
    for i, m in enumerate(messages):
        role, content = ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())
        keep += [role, content]
        arr[i].role, arr[i].content = role, content
    t = tmpl.encode()
    size = 256 + 2 * sum(len(m["content"].encode()) + len(m["role"]) for m in messages)
    buf = ffi.new("char[]", size)
    n = lib.llama_chat_apply_template(t, arr, len(messages), add_ass, buf, size)
    if n < 0:
        return None
    if n > size:
        buf = ffi.new("char[]", n)
        n = lib.llama_chat_apply_template(t, arr, len(messages), add_ass, buf, n)
    return str(ffi.string(buf, n).decode("utf-8", "replace"))


# --- llama.cpp's own chat handling: templates, tools, grammars, output parsing ------------

ToolChoice = Literal["auto", "none", "required"]
ReasoningFormat = Literal["none", "auto", "deepseek", "deepseek-legacy"]

_log = logging.getLogger("pyllama.chat")

# Jinja forms of llama.cpp's named templates, for GGUF files that carry no template
# (llama-server would fall back to ChatML, which these model families do not speak).
# Written from llama.cpp's built-in renderer (src/llama-chat.cpp, "gemma").
_FALLBACK_JINJA = {
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] | trim %}"
        "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n"
        "{% if ns.system and role != 'model' %}{{ ns.system }}\n\n{% set ns.system = '' %}{% endif %}"
        "{{ message['content'] | trim }}<end_of_turn>\n"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}

_REGEX_SPECIAL = re.compile(r"[.^$|()*+?\[\]{}\\]")
_ID_CHARS = string.ascii_letters + string.digits


def _regex_escape(word: str) -> str:
    # common.cpp regex_escape: the trigger word as a literal pattern
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), word)


def _new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered by llama.cpp's chat code, with what generating and parsing need.

    ``prompt`` is the text to generate from (tokenize it with special tokens
    parsed; the template leaves out the BOS token when the vocabulary adds it).
    ``grammar`` (GBNF, or "") constrains the output to the tool-call syntax or
    the response schema; ``grammar_lazy`` grammars apply only once one of the
    ``grammar_triggers`` appears. ``additional_stops`` are extra stop strings.
    ``format`` names llama.cpp's parser for the output.
    """

    prompt: str
    grammar: str
    grammar_lazy: bool
    grammar_triggers: list[dict[str, Any]]
    preserved_tokens: list[str]
    additional_stops: list[str]
    format: str
    generation_prompt: str = ""
    supports_thinking: bool = False
    thinking_start_tag: str = ""
    thinking_end_tags: list[str] = field(default_factory=list)
    _grammar_prefill: str = field(default="", repr=False)
    _trigger_patterns: tuple[str, ...] = field(default=(), repr=False)
    _trigger_tokens: tuple[int, ...] = field(default=(), repr=False)
    _parser_state: str = field(default="", repr=False, compare=False)

    def grammar_sampler(self) -> PrefilledGrammar | None:
        """The grammar as a sampler spec (put it before the selecting sampler), or None.

        Lazy grammars get llama-server's triggers: a trigger word that is one
        token becomes a trigger token, any other word an escaped pattern,
        full-match patterns are anchored. A non-lazy template grammar is
        advanced over the generation prompt, as llama-server does.
        """
        if not self.grammar:
            return None
        if self.grammar_lazy:
            return PrefilledGrammar(self.grammar, trigger_patterns=self._trigger_patterns,
                                    trigger_tokens=self._trigger_tokens)
        return PrefilledGrammar(self.grammar, prefill=self._grammar_prefill)

    def parse(self, text: str, *, partial: bool = False) -> dict[str, Any]:
        """The generated ``text`` as an OpenAI assistant message.

        Returns ``{"role": "assistant", "content": str | None, "reasoning_content":
        str | None, "tool_calls": [{"id", "type": "function", "function": {"name",
        "arguments"}}] | None}``; ``arguments`` is JSON text, ids are fresh
        ``call_...`` strings where the model gave none. With ``partial`` the text
        may end anywhere (streaming); without it, text the format does not allow
        raises ValueError.
        """
        if self.format == LEGACY_FORMAT:  # rendered without common/chat: no parser, the text is the content
            return {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
        raw = text.encode("utf-8")
        msg = _call(lib.pyllama_chat_parse(self._parser_state.encode(), raw, len(raw), partial))
        calls = [{"id": c["id"] or _new_tool_call_id(), "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in msg["tool_calls"]]
        content: str | None = msg["content"]
        if not content and calls:
            content = None
        return {"role": "assistant", "content": content,
                "reasoning_content": msg["reasoning_content"] or None, "tool_calls": calls or None}


class ChatFormat(Handle):
    """llama.cpp's chat handling for a model: its Jinja template (or ``template``),
    tool calling, response schemas and reasoning, as llama-server does it.

    ::

        fmt = ChatFormat(model)
        cp = fmt.apply(messages, tools=tools, tool_choice="required")
        text = generate_text(ctx, cp.prompt, sampler=[cp.grammar_sampler(), Greedy()],
                             stop=cp.additional_stops)
        message = cp.parse(text)       # {"role", "content", "tool_calls", ...}

    ``template`` is a Jinja template, or "chatml" / "gemma". A GGUF without a
    template gets its family's format where pyllama knows it (Gemma), else ChatML
    (llama-server's fallback). Tool calls need a template that renders them.
    """

    _kind = "chat format"

    def __init__(self, model: Model, *, template: str | None = None) -> None:
        if template is None and model.chat_template() is None:
            name = _builtin_for_architecture(model.architecture)
            template = _FALLBACK_JINJA.get(name or "")
            if template is None:
                _log.warning("the model has no chat template; using ChatML (as llama-server); pass template=")
        if template is not None and not template.strip():
            raise TemplateError("template= is empty")
        if template is not None:
            template = _FALLBACK_JINJA.get(template, template)  # a llama.cpp template name we know
        err = ffi.new("char **")
        ptr = lib.pyllama_chat_templates_init(model._p(), template.encode() if template is not None else ffi.NULL,
                                              err)
        if ptr == ffi.NULL:
            _call(err[0])
            raise TemplateError("llama.cpp could not load the chat template")
        super().__init__(ptr, lib.pyllama_chat_templates_free, model)
        self.model = model
        self._info: dict[str, Any] = _call(lib.pyllama_chat_templates_info(ptr))

    @property
    def source(self) -> str:
        """The Jinja source of the template in use."""
        self._p()
        return str(self._info["source"])

    @property
    def caps(self) -> dict[str, bool]:
        """What the template supports (tools, tool_calls, system_role, parallel_tool_calls, ...)."""
        self._p()
        return {k.removeprefix("supports_"): bool(v) for k, v in self._info["caps"].items()}

    def apply(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
              tool_choice: ToolChoice | Mapping[str, Any] = "auto", parallel_tool_calls: bool = False,
              json_schema: Mapping[str, Any] | None = None, grammar: str | None = None,
              add_generation_prompt: bool = True, continue_final_message: bool = False,
              enable_thinking: bool = True, reasoning_format: ReasoningFormat = "auto",
              template_kwargs: Mapping[str, Any] | None = None) -> ChatPrompt:
        """Render OpenAI-style ``messages`` (with tool results and assistant ``tool_calls``).

        ``tools`` are OpenAI function tools; ``tool_choice`` is "auto", "none",
        "required" or ``{"type": "function", "function": {"name": ...}}`` (that
        one tool, required). ``json_schema`` constrains the reply to a schema,
        ``grammar`` to a GBNF grammar (not with tools). ``reasoning_format``
        says how thinking is returned by :meth:`ChatPrompt.parse` ("none" leaves
        it in the content). ``template_kwargs`` are extra template variables.
        Malformed messages, tools or schemas raise ValueError; a template that
        fails raises TemplateError, both with llama.cpp's message.
        """
        model_vocab = self.model.vocab
        ptr = self._p()
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        tools_list = list(tools) if tools is not None else None
        choice: str
        if isinstance(tool_choice, Mapping):
            name = tool_choice.get("function", {}).get("name") if tool_choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise ValueError("tool_choice must be 'auto', 'none', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}")
            picked = [t for t in tools_list or [] if isinstance(t, Mapping)
                      and isinstance(t.get("function"), Mapping) and t["function"].get("name") == name]
            if not picked:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
            tools_list, choice = picked, "required"
        else:
            choice = tool_choice
        if tools_list and choice != "none" and not self._info["caps"].get("supports_tool_calls", False):
            raise TemplateError("this chat template cannot render tool calls; pass ChatFormat(model, "
                                "template=...) with a template that does")
        request: dict[str, Any] = {
            "messages": list(messages), "tool_choice": choice, "parallel_tool_calls": parallel_tool_calls,
            "add_generation_prompt": add_generation_prompt, "enable_thinking": enable_thinking,
            "reasoning_format": reasoning_format,
        }
        if tools_list:
            request["tools"] = tools_list
        if json_schema is not None:
            request["json_schema"] = json_schema
        if grammar is not None:
            request["grammar"] = grammar
        if continue_final_message:
            request["continue_final_message"] = True
        if template_kwargs:
            request["chat_template_kwargs"] = dict(template_kwargs)
        try:
            body = json.dumps(request)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the chat request is not JSON-serialisable: {exc}") from None
        out = _call(lib.pyllama_chat_apply(ptr, body.encode("utf-8")))
        patterns: list[str] = []
        tokens: list[int] = []
        for trig in out["grammar_triggers"]:
            kind, value = trig["type"], trig["value"]
            if kind == "word":
                ids = model_vocab.tokenize(value, add_special=False, parse_special=True)
                if ids.size == 1:
                    tokens.append(int(ids[0]))
                else:
                    patterns.append(_regex_escape(value))
            elif kind == "pattern":
                patterns.append(value)
            elif kind == "pattern_full":
                patterns.append(("" if value.startswith("^") else "^") + value + ("" if value.endswith("$") else "$")
                                if value else "^$")
            elif kind == "token":
                tok = int(trig["token"])
                if tok < 0:
                    ids = model_vocab.tokenize(value, add_special=False, parse_special=True)
                    if ids.size != 1:
                        raise TemplateError(f"grammar trigger token {value!r} is not one token of this vocabulary")
                    tok = int(ids[0])
                tokens.append(tok)
        if out["grammar_lazy"] and out["grammar"] and not patterns and not tokens:
            raise TemplateError("llama.cpp made a lazy grammar without triggers")
        return ChatPrompt(
            prompt=out["prompt"], grammar=out["grammar"], grammar_lazy=out["grammar_lazy"],
            grammar_triggers=out["grammar_triggers"], preserved_tokens=out["preserved_tokens"],
            additional_stops=out["additional_stops"], format=out["format"],
            generation_prompt=out["generation_prompt"], supports_thinking=out["supports_thinking"],
            thinking_start_tag=out["thinking_start_tag"], thinking_end_tags=out["thinking_end_tags"],
            _grammar_prefill=out["grammar_prefill"], _trigger_patterns=tuple(patterns),
            _trigger_tokens=tuple(tokens), _parser_state=out["parser_state"])


#: :attr:`ChatPrompt.format` of a prompt rendered by llama.cpp's legacy ``llama_chat_apply_template``
LEGACY_FORMAT = "llama_chat_apply_template"

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned and len(_warned) < 256:
        _warned.add(message)
        _log.warning("%s", message)


class ChatTemplate:
    """A model's chat template as pyllama renders it everywhere: :func:`apply_template`,
    :class:`ChatSession`, ``pyllama chat``, the worker and ``pyllama serve`` all go through
    :meth:`apply`, so the same messages make the same prompt, byte for byte.

    The renderer is llama.cpp's Jinja engine through common/chat (:class:`ChatFormat`, what
    ``llama-server --jinja`` runs). ``template`` replaces the model's own: a Jinja template
    or a llama.cpp template name. llama.cpp's legacy ``llama_chat_apply_template`` renders
    only where the Jinja path cannot, with a warning: a template the Jinja engine fails to
    load or to render (when the legacy renderer recognises it), or a llama.cpp template
    name without a Jinja form (``"llama3"``, ``"phi3"``, ...; also a template-less model of
    such a family). A model without a template and without a known family gets ChatML, as
    in llama-server. The legacy path renders plain messages only (no tools). ``jinja=False``
    asks for the legacy renderer alone, as ``llama-server --no-jinja`` (a model without a
    template it knows gets ChatML).
    """

    def __init__(self, model: Model, *, template: str | None = None, jinja: bool = True) -> None:
        if template is not None and not template.strip():
            raise TemplateError("template= is empty")
        self.model = model
        self.template = template
        #: the Jinja path (None where llama.cpp's Jinja engine cannot load the template)
        self.format: ChatFormat | None = None
        self._legacy: str | None = None  # what llama_chat_apply_template renders with
        self._why: str = ""  # why the Jinja path is not used
        source = template if template is not None else model.chat_template()
        self._source = source  # the template as written (None: the model has none)
        name = _builtin_for_architecture(model.architecture) if source is None else source
        if not jinja:
            self._legacy = name if name is not None else "chatml"
            self._why = "the legacy renderer was asked for (jinja=False)"
            return
        if name is not None and name != "chatml" and name not in _FALLBACK_JINJA and name in builtin_templates():
            # A llama.cpp template name: the Jinja engine would print it as text; only the legacy renderer knows it.
            self._legacy = name
            self._why = (f"'{name}' is a llama.cpp template name" if source is not None
                         else f"the model has no chat template; llama.cpp's '{name}' format is its family's")
            return
        try:
            self.format = ChatFormat(model, template=template)
        except (LlamaError, ValueError) as exc:
            self._legacy = source
            self._why = f"llama.cpp's Jinja engine cannot load the chat template ({exc})"

    def close(self) -> None:
        """Free the Jinja path's native state."""
        if self.format is not None:
            self.format.close()

    def __enter__(self) -> ChatTemplate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> ChatPrompt:
        """Render ``messages``; ``options`` are :meth:`ChatFormat.apply`'s (tools, json_schema, ...).

        Malformed messages raise ValueError; a template that cannot render them raises
        :class:`TemplateError`. A prompt from the legacy renderer has ``format ==
        LEGACY_FORMAT``, no parser, and a grammar only for ``json_schema`` / ``grammar``.
        """
        why, legacy = self._why, self._legacy
        if self.format is not None:
            try:
                return self.format.apply(messages, **options)
            except TemplateError as exc:  # the template failed (a malformed request is a plain ValueError)
                legacy = self._source  # None: pyllama's own fallback template failed, nothing else to try
                if legacy is None or (options.get("tools") and options.get("tool_choice", "auto") != "none"):
                    raise
                why = f"llama.cpp's Jinja engine cannot render the chat template ({exc})"
        return self._apply_legacy(legacy, messages, why, **options)

    @staticmethod
    def _apply_legacy(legacy: str | None, messages: Sequence[Mapping[str, Any]], why: str, *,
                      add_generation_prompt: bool = True,
                      tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = "auto",
                      json_schema: Mapping[str, Any] | None = None, grammar: str | None = None,
                      continue_final_message: bool = False, **ignored: Any) -> ChatPrompt:
        if tools and tool_choice != "none":
            raise TemplateError(f"this chat template cannot render tool calls: {why}")
        messages = [_joined_parts(m) for m in messages] if isinstance(messages, Sequence) else messages
        _validate_messages(messages)
        prefill = ""
        if continue_final_message:  # the turns before it, opened for the assistant, then its text to go on from
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs an assistant message at the end")
            if add_generation_prompt:
                raise ValueError("cannot set both add_generation_prompt and continue_final_message")
            messages, prefill, add_generation_prompt = messages[:-1], messages[-1]["content"], True
        text = _apply_builtin(legacy, messages, add_generation_prompt) if legacy is not None else None
        if text is None:
            raise TemplateError(f"{why}; llama_chat_apply_template does not know it either")
        _warn_once(f"{why}: rendered by llama_chat_apply_template instead")
        if json_schema is not None and grammar is not None:
            raise ValueError("cannot use both json_schema and grammar")
        gbnf = json_schema_to_grammar(dict(json_schema) or {"type": "object"}) if json_schema is not None else grammar
        return ChatPrompt(prompt=text + prefill, grammar=gbnf or "", grammar_lazy=False, grammar_triggers=[],
                          preserved_tokens=[], additional_stops=[], format=LEGACY_FORMAT)


class ChatSession:
    """A conversation on one context sequence; each turn reuses the KV cache of the previous ones.

    ::

        chat = ChatSession(ctx, system="You are terse.")
        for ev in chat.stream("Hello"):
            print(ev.text, end="")
        reply = chat.ask("And then?")

    With ``tools`` (OpenAI function tools) the conversation goes through
    :class:`ChatFormat`: the tool-call grammar joins the sampler, each reply is
    parsed, ``last_message`` holds it (``tool_calls`` included), and
    ``add_tool_result`` then ``stream()`` / ``ask()`` without a message continue.
    """

    def __init__(self, ctx: Context, *, system: str | None = None, template: str | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 tool_choice: ToolChoice | Mapping[str, Any] = "auto", parallel_tool_calls: bool = False,
                 seq_id: int = 0, **options: Unpack[SamplingOptions]) -> None:
        check("ChatSession", options, SAMPLING_KEYS)
        self.ctx = ctx
        self.template = template
        self.seq_id = seq_id
        #: the sampling options of every turn (a turn's own override them)
        self.options: SamplingOptions = options
        self.tools = list(tools) if tools else None
        self.tool_choice = tool_choice
        self.parallel_tool_calls = parallel_tool_calls
        self.format = ChatFormat(ctx.model, template=template) if self.tools else None
        self._chat: ChatTemplate | None = None  # renders turns without tools (made at the first)
        self.messages: list[dict[str, Any]] = []
        self.last_message: dict[str, Any] | None = None
        if system:
            self.messages.append({"role": "system", "content": system})

    def close(self) -> None:
        """Free the chat template's native state; the context stays the caller's."""
        if self.format is not None:
            self.format.close()
        if self._chat is not None:
            self._chat.close()

    def _tokens(self, text: str, media: Sequence[Media] = ()) -> Any:
        """The rendered conversation's tokens, or with media its :class:`~pyllama.MediaPrompt` (the model's
        projector tokenizes it)."""
        model = self.ctx.model
        bos = model.vocab.bos
        has_bos = bos is not None and text.startswith(model.vocab.text(bos))
        if media:
            proj = model.mmproj
            if proj is None:
                raise MediaError("the conversation holds images or audio but the model has no projector: load "
                                 "one with model.projector('mmproj.gguf')")
            return proj.prompt(text, media, add_special=not has_bos, parse_special=True)
        return model.vocab.tokenize(text, add_special=not has_bos, parse_special=True)

    def _rendered(self) -> tuple[list[Any], list[Media]]:
        """The history with its media parts as markers, and the media (local files: any path; the library's
        caller is trusted)."""
        return split_media(self.messages, open_file=Path)

    def _prompt_tokens(self) -> Any:
        if self._chat is None:
            self._chat = ChatTemplate(self.ctx.model, template=self.template)
        messages, media = self._rendered()
        return self._tokens(self._chat.apply(messages).prompt, media)

    def _tool_turn(self, options: dict[str, Any]) -> tuple[Any, ChatPrompt]:
        assert self.format is not None
        messages, media = self._rendered()
        cp = self.format.apply(messages, tools=self.tools, tool_choice=self.tool_choice,
                               parallel_tool_calls=self.parallel_tool_calls)
        gs = cp.grammar_sampler()
        if gs is not None:
            sampler = sampler_from(options)
            for knob in KNOBS:  # made into the chain above
                options.pop(knob, None)
            if sampler is None:
                seed = options.get("seed")  # as generate(): a seed alone means llama.cpp's default chain
                options["sampler"] = [gs, *(default_chain(seed=seed) if seed is not None else [Greedy()])]
            elif isinstance(sampler, Sequence) and all(isinstance(s, Sampler) for s in sampler):
                options["sampler"] = [gs, *sampler]
            else:
                raise ValueError("with tools, sampler= must be a list of sampler specs: "
                                 "the tool-call grammar goes in front of them")
        if cp.additional_stops:
            options["stop"] = [*options.get("stop", ()), *cp.additional_stops]
        return self._tokens(cp.prompt, media), cp

    def add_tool_result(self, content: str, *, tool_call_id: str | None = None, name: str | None = None) -> None:
        """Add the result of a tool call (answering ``last_message["tool_calls"]``) to the history."""
        msg: dict[str, Any] = {"role": "tool", "content": content}
        if tool_call_id is not None:
            msg["tool_call_id"] = tool_call_id
        if name is not None:
            msg["name"] = name
        self.messages.append(msg)

    def stream(self, message: UserMessage | None = None,
               **options: Unpack[SamplingOptions]) -> Iterator[TokenEvent]:
        """Send a user message (None: answer the tool results just added) and stream the reply;
        the reply joins the history when the stream ends. ``options`` override the session's for this turn.

        A message is text, or a list of parts: strings, :class:`~pyllama.Image` / :class:`~pyllama.Audio`
        (the model needs a projector) and OpenAI-style content parts (``{"type": "image_url", ...}``). Media
        stay in the history and in the KV cache: a later turn evaluates only what follows them."""
        check("stream", options, SAMPLING_KEYS)
        if message is not None:
            self.messages.append({"role": "user", "content": user_content(message)})
        elif not self.messages:
            raise ValueError("nothing to answer: pass a message")
        opts: dict[str, Any] = {**self.options, **options}
        cp: ChatPrompt | None = None
        if self.format is not None:
            tokens, cp = self._tool_turn(opts)
        else:
            tokens = self._prompt_tokens()
        try:
            gen = Generation(self.ctx, tokens, seq_id=self.seq_id, **opts)
        except BaseException:
            if isinstance(tokens, MediaPrompt):
                tokens.close()
            raise
        try:
            yield from gen
        finally:
            gen.close()
            if isinstance(tokens, MediaPrompt):
                tokens.close()
            if cp is None:
                self.last_message = {"role": "assistant", "content": gen.text}
                self.messages.append({"role": "assistant", "content": gen.text})
            else:
                try:
                    parsed = cp.parse(gen.text, partial=gen.finish_reason not in ("eog", "stop"))
                except ValueError:
                    parsed = {"role": "assistant", "content": gen.text, "reasoning_content": None,
                              "tool_calls": None}
                self.last_message = parsed
                entry = {"role": "assistant", "content": parsed["content"]}
                if parsed["tool_calls"]:
                    entry["tool_calls"] = parsed["tool_calls"]
                self.messages.append(entry)

    def ask(self, message: UserMessage | None = None, **options: Unpack[SamplingOptions]) -> str:
        """Send a user message (None: answer the tool results just added) and return the whole reply."""
        return "".join(ev.text for ev in self.stream(message, **options))


__all__ = ["apply_template", "ChatSession", "ChatTemplate", "ChatFormat", "ChatPrompt", "Message", "Generation",
           "LEGACY_FORMAT"]
