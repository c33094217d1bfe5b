"""``pyllama chat``: an interactive chat on the model's template, streaming, with the
conversation kept in the KV cache between turns.

Interactive on a terminal (``/reset``, ``/save FILE``, ``/load FILE``, ``/exit``;
Ctrl-C stops the current answer, Ctrl-C twice at the prompt or Ctrl-D quits);
non-interactive with ``-p`` (repeatable: one turn each) or when stdin is not a
terminal (all of stdin is one message), printing only the answers. ``-v``
prints after each answer how much of the prompt was evaluated and how much
came from the KV cache. ``--isolate`` runs the model in a
:class:`pyllama.Worker` child process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from .chat import UserMessage
    from .context import Context
    from .media import Media
    from .generate import Generation
    from .model import Model
    from .options import SamplingOptions
    from .stream import TokenEvent
    from .worker import Worker, WorkerChatSession

_MAGIC = b"PYLLAMA-CHAT 1\n"  # then one JSON line, then the KV state of the conversation's sequence
HELP = "/reset  forget the conversation    /save FILE  save it (with its KV cache)    /load FILE  restore it\n" \
       "/image FILE, /audio FILE  attach to the next message (--mmproj)\n" \
       "/exit   quit    Ctrl-C stops an answer; Ctrl-C twice at the prompt (or Ctrl-D) quits"


class _Turn(Protocol):
    finish_reason: str | None

    def __iter__(self) -> Iterator[TokenEvent]: ...
    def close(self) -> None: ...


class _Reply:
    """One answer being streamed, with what ``-v`` reports about it."""

    def __init__(self, stream: _Turn, n_prompt: Callable[[], int], n_evaluated: Callable[[], int],
                 n_generated: Callable[[], int]) -> None:
        self.stream = stream
        self.n_prompt = n_prompt
        self.n_evaluated = n_evaluated
        self.n_generated = n_generated


DEFAULT_SYSTEM = "You are a helpful assistant."


class _Local:
    """The model in this process: a ChatSession on one context."""

    def __init__(self, path: str, args: argparse.Namespace, options: SamplingOptions) -> None:
        from .chat import ChatSession
        from .model import Model

        self.model: Model = Model(path, n_gpu_layers=args.ngl, rpc=args.rpc or (), mmproj=args.mmproj)
        try:
            self.ctx: Context = self.model.context(n_ctx=args.ctx, n_threads=args.threads,
                                                   n_threads_batch=args.threads)
        except BaseException:
            self.model.close()
            raise
        self.session = ChatSession(self.ctx, system=args.system)
        self.options = options
        self.description = self.model.description
        proj = self.model.mmproj
        self.modalities: tuple[str, ...] = proj.modalities if proj is not None else ()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.session.messages

    def turn(self, message: UserMessage) -> _Reply:
        from .chat import user_content
        from .generate import Generation

        session = self.session
        session.messages.append({"role": "user", "content": user_content(message)})
        try:
            # The whole conversation, rendered; Generation evaluates only what the KV cache lacks.
            tokens = session._prompt_tokens()
            gen: Generation = Generation(self.ctx, tokens, seq_id=session.seq_id, **self.options)
        except BaseException:
            session.messages.pop()
            raise
        return _Reply(_LocalTurn(gen, session.messages), lambda: len(tokens), lambda: gen.n_prompt_evaluated,
                      lambda: gen.n_generated)

    def reset(self) -> None:
        self.session.messages = [m for m in self.session.messages[:1] if m["role"] == "system"]

    def save(self, path: Path) -> None:
        ctx, seq = self.ctx, self.session.seq_id
        cached = ctx.cached_tokens(seq)
        state = ctx.state.save_seq(seq) if cached is not None and cached.size else b""
        _write_session(path, self.messages, [] if cached is None else cached.tolist(), self.description, state)

    def load(self, path: Path) -> int:
        messages, tokens, state = _read_session(path)
        ctx, seq = self.ctx, self.session.seq_id
        if state:
            ctx.state.load_seq(state, seq)  # checks the model and context shape first
            span = ctx.kv.pos_range(seq)
            if span is not None and span[0] == 0 and span[1] + 1 == len(tokens):
                import numpy as np

                ctx.kv.set_known(seq, np.asarray(tokens, dtype=np.int32))  # so the next turn reuses them
            else:  # the token list does not describe the restored cache: the next turn starts over
                ctx.kv.remove(seq)
                tokens = []
        else:
            ctx.kv.remove(seq)
        self.session.messages = messages
        return len(tokens)

    def close(self) -> None:
        self.session.close()
        self.ctx.close()
        self.model.close()


class _LocalTurn:
    def __init__(self, gen: Generation, messages: list[dict[str, Any]]) -> None:
        self.gen = gen
        self.messages = messages
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        return iter(self.gen)

    def close(self) -> None:
        gen = self.gen
        if not gen._closed:
            gen.close()
            self.finish_reason = gen.finish_reason
            self.messages.append({"role": "assistant", "content": gen.text})
            ctx, seq = gen.ctx, gen.seq_id
            if gen.n_generated and ctx.cached_tokens(seq) is None:
                # Ctrl-C inside a decode makes the context forget what the sequence holds; the
                # whole prompt was evaluated before the first token, so keep that much for the next turn.
                n = int(gen.prompt_tokens.size)
                ctx.kv.remove(seq, n, -1)
                ctx.kv.set_known(seq, gen.prompt_tokens)


class _Isolated:
    """The model in a :class:`pyllama.Worker` child process."""

    def __init__(self, path: str, args: argparse.Namespace, options: SamplingOptions) -> None:
        from .worker import Worker

        self.worker: Worker = Worker()
        try:
            info = self.worker.load(path, n_gpu_layers=args.ngl, n_ctx=args.ctx, n_threads=args.threads,
                                    n_threads_batch=args.threads, rpc=args.rpc or (), mmproj=args.mmproj)
        except BaseException:
            self.worker.close()
            raise
        self.session: WorkerChatSession = self.worker.chat(system=args.system, **options)
        self.description = f"{info['description']} (worker pid {self.worker.pid})"
        self.modalities: tuple[str, ...] = tuple(info.get("modalities", ()))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.session.messages

    def turn(self, message: UserMessage) -> _Reply:
        gen = self.session.stream(message)
        return _Reply(gen, lambda: gen.n_prompt_tokens, lambda: gen.n_prompt_evaluated, lambda: gen.n_generated)

    def reset(self) -> None:
        self.session.reset()

    def save(self, path: Path) -> None:  # the KV cache stays in the child: messages only
        _write_session(path, self.messages, [], self.description, b"")

    def load(self, path: Path) -> int:
        messages, _, _ = _read_session(path)
        self.session.messages = messages
        return 0

    def close(self) -> None:
        self.worker.close()


def _portable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as JSON holds them: an attached image or clip becomes the content part that names it again (a
    file by its absolute path, bytes as a data: URL)."""
    import base64

    from .media import Media

    def part(p: Any) -> Any:
        if not isinstance(p, Media):
            return p
        src = p.source
        url = (f"file://{Path(src).resolve()}" if isinstance(src, Path)
               else "data:application/octet-stream;base64," + base64.b64encode(bytes(src)).decode())
        return ({"type": "input_audio", "input_audio": {"data": url}} if p.kind == "audio"
                else {"type": "image_url", "image_url": {"url": url}})

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def _write_session(path: Path, messages: list[dict[str, Any]], tokens: list[int], model: str, state: bytes) -> None:
    head = json.dumps({"model": model, "messages": _portable(messages), "tokens": tokens}, ensure_ascii=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(_MAGIC + head.encode() + b"\n" + state)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_session(path: Path) -> tuple[list[dict[str, Any]], list[int], bytes]:
    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path} is not a pyllama chat session (saved with /save)")
    end = data.index(b"\n", len(_MAGIC))
    head = json.loads(data[len(_MAGIC):end])
    messages = head.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), (str, list)) for m in messages):
        raise ValueError(f"{path}: malformed message list")
    tokens = [int(t) for t in head.get("tokens", [])]
    return messages, tokens, data[end + 1:]


def _answer(backend: _Local | _Isolated, message: str, out: TextIO, verbose: bool,
            media: list[Media] | None = None) -> bool:
    """Stream one answer (to ``message``, after the ``media`` attached to it); False when Ctrl-C stopped it."""
    reply = backend.turn([*media, message] if media else message)
    t0 = time.perf_counter()
    completed = True
    try:
        for ev in reply.stream:
            out.write(ev.text)
            out.flush()
    except KeyboardInterrupt:
        completed = False
    finally:
        reply.stream.close()
    out.write("\n" if completed else "\n[stopped]\n")
    out.flush()
    if verbose:
        dt = time.perf_counter() - t0
        n_eval, n_prompt, n_gen = reply.n_evaluated(), reply.n_prompt(), reply.n_generated()
        print(f"[prompt: {n_eval} new tokens, {n_prompt - n_eval} reused; answer: {n_gen} tokens in {dt:.2f}s; "
              f"finish: {reply.stream.finish_reason or 'stopped'}]", file=sys.stderr, flush=True)
    return completed


def _command(backend: _Local | _Isolated, line: str, attached: list[Media]) -> bool:
    """Run a /command; False to quit. ``/image`` and ``/audio`` add to ``attached`` (the next message's)."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return False
    if cmd in ("/image", "/audio"):
        from .media import Audio, Image

        path = Path(arg).expanduser()
        if not arg or not path.is_file():
            print(f"usage: {cmd} FILE (an existing file)")
        elif not backend.modalities:
            print("[this model has no projector: start pyllama chat with --mmproj mmproj.gguf]")
        else:
            attached.append(Image(path) if cmd == "/image" else Audio(path))
            print(f"[{path.name} goes with your next message]")
        return True
    if cmd == "/reset":
        backend.reset()
        print("[conversation reset]")
    elif cmd in ("/save", "/load"):
        if not arg:
            print(f"usage: {cmd} FILE")
            return True
        path = Path(arg).expanduser()
        try:
            if cmd == "/save":
                backend.save(path)
                print(f"[saved {len(backend.messages)} messages to {path}]")
            else:
                n = backend.load(path)
                print(f"[loaded {len(backend.messages)} messages from {path}"
                      f"{f'; {n} tokens of KV cache restored' if n else ''}]")
        except (OSError, ValueError) as exc:
            print(f"[{cmd[1:]} failed: {exc}]")
        except Exception as exc:  # noqa: BLE001 - a StateError or a worker error: report, keep chatting
            print(f"[{cmd[1:]} failed: {exc}]")
    elif cmd == "/help":
        print(HELP)
    else:
        print(f"[unknown command {cmd}; /help lists them]")
    return True


def _interactive(backend: _Local | _Isolated, verbose: bool) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # Windows
        pass
    print(f"pyllama chat: {backend.description}\n{HELP}", flush=True)
    ctrl_c = False
    attached: list[Media] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            if ctrl_c:
                print()
                return 0
            ctrl_c = True
            print("\n[Ctrl-C again or Ctrl-D to quit]", flush=True)
            continue
        ctrl_c = False
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(backend, line, attached):
                return 0
            continue
        media, attached = attached, []
        try:
            _answer(backend, line, sys.stdout, verbose, media)
        except KeyboardInterrupt:  # between turns, while the prompt was evaluated: same as stopping the answer
            print("\n[stopped]", flush=True)
        except Exception as exc:  # noqa: BLE001 - an overflowing context, a crashed worker: say so, keep going
            from .errors import ContextOverflowError

            hint = " (/reset starts over)" if isinstance(exc, ContextOverflowError) else ""
            print(f"[error: {exc}{hint}]", flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from .cli import _model_path, sampling_options
    from .errors import LlamaError
    from .store.projector import cli_projector

    if args.n_predict is not None and args.n_predict < 0:
        args.n_predict = None
    if args.ngl not in ("auto", "all"):
        args.ngl = int(args.ngl)
    options = sampling_options(args)
    interactive = not args.prompt and sys.stdin.isatty()
    messages: list[str] = list(args.prompt or [])
    if not interactive and not messages:
        text = sys.stdin.read().strip()
        if not text:
            print("pyllama chat: nothing to answer (stdin was empty; pass -p PROMPT)", file=sys.stderr)
            return 2
        messages = [text]
    try:
        path = _model_path(args.model or "chat-starter")
        args.mmproj = cli_projector(args.model, args.mmproj, args.no_mmproj)  # else an hf: model's, pulled with it
        backend: _Local | _Isolated = (_Isolated if args.isolate else _Local)(path, args, options)
    except LlamaError as exc:
        print(f"pyllama: {exc}", file=sys.stderr)
        return 1
    try:
        if interactive:
            try:
                return _interactive(backend, args.verbose)
            except KeyboardInterrupt:  # a Ctrl-C that lands between two prompts: quitting is what it asks
                print()
                return 0
        from .media import Image

        first: list[Media] = [Image(Path(f)) for f in args.image]
        for message in messages:
            if not _answer(backend, message, sys.stdout, args.verbose, first):
                return 130
            first = []
        return 0
    except LlamaError as exc:
        print(f"pyllama: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()


def register(subparsers: Any) -> None:
    """Add ``pyllama chat`` to the command line's subcommands."""
    c = subparsers.add_parser("chat", help="interactive chat with a model (its chat template, streaming)",
                              description="Chat with a model on its chat template, streaming the answers; the "
                                          "conversation stays in the KV cache between turns.")
    c.add_argument("model", nargs="?", help="GGUF file, model reference, `chat-starter` or `starter` (default: "
                                            "the chat starter, SmolLM2-135M-Instruct)")
    # A plain system prompt by default: without one, templates such as the chat starter's put in their own
    # (SmolLM2's names the model and its maker), after which a 135M model answers simple questions worse
    # ("What is the capital of France?" greedy: a list of French words instead of "Paris"). -s '' keeps the
    # template's own, as llama-server does.
    c.add_argument("-s", "--system", default=DEFAULT_SYSTEM,
                   help=f"system prompt (default: {DEFAULT_SYSTEM!r}; -s '' for the template's own)")
    c.add_argument("-p", "--prompt", action="append", default=None,
                   help="non-interactive: send this message and print the answer (repeat for more turns)")
    c.add_argument("-n", "--n-predict", type=int, default=-1, help="most tokens per answer (-1: until the turn ends)")
    c.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    c.add_argument("--top-k", type=int, default=40)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--min-p", type=float, default=0.05)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("-t", "--threads", type=int, default=None)
    c.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="add ggml RPC servers' devices (pyllama rpc-server); best with --isolate")
    c.add_argument("-c", "--ctx", type=int, default=4096, help="context size in tokens")
    c.add_argument("-ngl", "--n-gpu-layers", dest="ngl", default="auto")
    c.add_argument("--isolate", action="store_true", help="run the model in a worker process (pyllama.Worker)")
    c.add_argument("-mm", "--mmproj", default=None, metavar="FILE",
                   help="the model's multimodal projector (mmproj-*.gguf): /image and /audio attach media "
                        "(default: for an hf: model, the projector pulled with it)")
    from .store.projector import NoProjector

    c.add_argument("--no-mmproj", dest="no_mmproj", action=NoProjector,
                   help="load no projector (not the one pulled with an hf: model either)")
    c.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="with -p: an image for the first message (may repeat; needs --mmproj)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="after each answer, print prompt tokens evaluated and reused from the KV cache")
    c.set_defaults(func=cmd_chat)


__all__ = ["register", "cmd_chat"]
