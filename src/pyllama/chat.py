"""Chat: the model's chat template, and a session that keeps its KV cache between turns."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ._ffi import ffi, lib
from .errors import TemplateError
from .generate import Generation, TokenEvent

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

Message = Mapping[str, str]


def apply_template(model: Model, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                   template: str | None = None) -> str:
    """Render ``messages`` ({"role", "content"} dicts) with the model's chat template.

    llama.cpp's built-in renderer is used when it recognises the template;
    otherwise the Jinja template itself is rendered in a sandbox (needs jinja2,
    the ``chat`` extra).
    """
    tmpl = template if template is not None else model.chat_template()
    if tmpl is None:
        tmpl = _builtin_for_architecture(model.architecture)
    if tmpl is None:
        raise TemplateError("the model has no chat template; pass template= (a Jinja template or a "
                            f"llama.cpp template name: {', '.join(builtin_templates())})")
    text = _apply_builtin(tmpl, messages, add_generation_prompt)
    return text if text is not None else _apply_jinja(model, tmpl, messages, add_generation_prompt)


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


def _apply_jinja(model: Model, tmpl: str, messages: Sequence[Message], add_ass: bool) -> str:
    try:
        from jinja2.exceptions import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TemplateError("llama.cpp does not know this chat template; "
                            "install jinja2 (pip install 'pyllama[chat]') to render it") from None

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    vocab = model.vocab
    special = {name: (vocab.text(t) if t is not None else "") for name, t in
               (("bos_token", vocab.bos), ("eos_token", vocab.eos))}
    try:
        return env.from_string(tmpl).render(messages=list(messages), add_generation_prompt=add_ass, **special)
    except JinjaError as exc:
        raise TemplateError(f"chat template failed: {exc}") from None


class ChatSession:
    """A conversation on one context sequence; each turn reuses the KV cache of the previous ones.

    ::

        chat = ChatSession(ctx, system="You are terse.")
        for ev in chat.stream("Hello"):
            print(ev.text, end="")
        reply = chat.ask("And then?")
    """

    def __init__(self, ctx: Context, *, system: str | None = None, template: str | None = None,
                 seq_id: int = 0, **generation_options: Any) -> None:
        self.ctx = ctx
        self.template = template
        self.seq_id = seq_id
        self.options = generation_options
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def _prompt_tokens(self) -> Any:
        model = self.ctx.model
        text = apply_template(model, self.messages, add_generation_prompt=True, template=self.template)
        bos = model.vocab.bos
        has_bos = bos is not None and text.startswith(model.vocab.text(bos))
        return model.vocab.tokenize(text, add_special=not has_bos, parse_special=True)

    def stream(self, message: str, **options: Any) -> Iterator[TokenEvent]:
        """Send a user message and stream the reply; the reply joins the history when the stream ends."""
        self.messages.append({"role": "user", "content": message})
        gen = Generation(self.ctx, self._prompt_tokens(), seq_id=self.seq_id, **{**self.options, **options})
        try:
            yield from gen
        finally:
            gen.close()
            self.messages.append({"role": "assistant", "content": gen.text})

    def ask(self, message: str, **options: Any) -> str:
        """Send a user message and return the whole reply."""
        return "".join(ev.text for ev in self.stream(message, **options))


__all__ = ["apply_template", "ChatSession", "Message", "Generation"]
