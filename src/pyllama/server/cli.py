"""``pyllama serve``: the OpenAI-compatible server on uvicorn.

Only argparse is imported here; the web stack loads when the command runs, so
the rest of the command line works without the ``server`` extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ..engine import Engine


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand to ``pyllama``'s parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching (needs pyllama[server])",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/embeddings, "
                    "/v1/models) plus /health, /metrics, /tokenize and /detokenize.")
    p.add_argument("model", nargs="?", help="GGUF file, or `starter` (default: the starter model, Gemma 3 270M)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--slots", type=int, default=4, help="concurrent requests decoded together")
    p.add_argument("-c", "--ctx-size", default="auto",
                   help="context of one slot: prompt plus reply of one request (default: auto)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-tb", "--threads-batch", type=int, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=512, help="most tokens decoded in one step")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-fa", "--flash-attn", default="auto", choices=["auto", "on", "off"])
    p.add_argument("-ctk", "--cache-type-k", default="f16")
    p.add_argument("-ctv", "--cache-type-v", default="f16")
    p.add_argument("-ngl", "--n-gpu-layers", dest="ngl", default="auto")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 503)")
    p.add_argument("--slot-prompt-similarity", type=float, default=0.1)
    p.add_argument("--draft", default=None, metavar="DRAFTER",
                   help="speculative decoding with an n-gram drafter: ngram (prompt lookup), or one of "
                        "llama.cpp's ngram-cache, ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod")
    p.add_argument("--draft-max", type=int, default=16, help="most draft tokens per request and step")
    p.add_argument("--sampling", default="auto", choices=["auto", "host", "argmax", "backend"],
                   help="where greedy requests choose their tokens: auto (measured fastest for the backend), host "
                        "(llama.cpp's sampler), argmax (over the logits), backend (in the compute graph); requests "
                        "a mode cannot serve (logprobs with backend) take auto")
    p.add_argument("--api-key", default=os.environ.get("PYLLAMA_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every endpoint but /health "
                        "(default: $PYLLAMA_API_KEY)")
    p.add_argument("-a", "--alias", default=None, help="model id for clients (default: the file name)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template replacing the model's own")
    p.add_argument("--chat-template-file", default=None, help="file holding the Jinja chat template")
    p.add_argument("--keepalive", type=float, default=10.0,
                   help="seconds between SSE keep-alive comments while a stream waits for its first token")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds open requests get to finish on SIGTERM/SIGINT before they are cancelled")
    p.add_argument("--progress", action="store_true", help="show a load progress bar")
    p.add_argument("--isolate", action="store_true",
                   help="run the engine in a worker process: a crash there fails the requests in flight, "
                        "the server stays up and the next request starts a fresh worker")
    p.set_defaults(func=cmd_serve)


def _loader(args: argparse.Namespace, path: str) -> Engine:
    from ..engine import Engine
    from ..model import Model

    ngl: Any = args.ngl if args.ngl in ("auto", "all") else int(args.ngl)
    if getattr(args, "isolate", False):
        return _isolated_loader(args, path, ngl)
    model = Model(path, n_gpu_layers=ngl, progress=args.progress)
    try:
        n_ctx: Any = args.ctx_size if args.ctx_size == "auto" else int(args.ctx_size)
        return Engine(model, n_slots=args.slots, n_ctx=n_ctx, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                      n_threads=args.threads, n_threads_batch=args.threads_batch, flash_attn=args.flash_attn,
                      type_k=args.cache_type_k, type_v=args.cache_type_v, max_queue=args.max_queue,
                      slot_prompt_similarity=args.slot_prompt_similarity, draft=args.draft, n_draft=args.draft_max,
                      sampling=args.sampling)
    except BaseException:
        model.close()
        raise


def _isolated_loader(args: argparse.Namespace, path: str, ngl: Any) -> Engine:
    from ..worker.engine import IsolatedEngine

    n_ctx: Any = args.ctx_size if args.ctx_size == "auto" else int(args.ctx_size)
    engine = IsolatedEngine(path, n_gpu_layers=ngl, n_slots=args.slots, n_ctx=n_ctx, n_batch=args.batch_size,
                            n_ubatch=args.ubatch_size, n_threads=args.threads, n_threads_batch=args.threads_batch,
                            flash_attn=args.flash_attn, type_k=args.cache_type_k, type_v=args.cache_type_v,
                            max_queue=args.max_queue, slot_prompt_similarity=args.slot_prompt_similarity,
                            draft=args.draft, n_draft=args.draft_max, sampling=args.sampling, progress=args.progress)
    return cast("Engine", engine)  # duck-typed: it offers the Engine API the server uses


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f"pyllama serve needs the server extra: pip install 'pyllama[server]' ({exc})", file=sys.stderr)
        return 2
    if args.model in (None, "starter"):
        from ..starter import starter_model_path

        path = str(starter_model_path())
    else:
        path = args.model
        if not os.path.isfile(path):
            print(f"pyllama serve: no such model file: {path}", file=sys.stderr)
            return 1
    if args.slots < 1:
        print("pyllama serve: --slots must be >= 1", file=sys.stderr)
        return 2
    from ..speculative import NGRAM_TYPES

    if args.draft is not None and args.draft not in ("ngram", *NGRAM_TYPES):
        print(f"pyllama serve: --draft must be ngram or one of {', '.join(NGRAM_TYPES)}", file=sys.stderr)
        return 2
    if args.api_key is None and not _is_loopback(args.host):
        print(f"pyllama serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
              "can use it", file=sys.stderr)
    # llama.cpp's own log stays quiet unless `pyllama --log-level` asked for it; the server says what it does.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("pyllama.server").setLevel(logging.INFO)
    template = args.chat_template
    if args.chat_template_file:
        try:
            with open(args.chat_template_file, encoding="utf-8") as fh:
                template = fh.read()
        except OSError as exc:
            print(f"pyllama serve: cannot read the chat template: {exc}", file=sys.stderr)
            return 1
    app = create_app(lambda: _loader(args, path), api_key=args.api_key or None, model_name=args.alias,
                     keepalive_s=args.keepalive, chat_template=template)
    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # requests in flight get --shutdown-timeout to finish, then end with an error event
            state.shutdown_soon(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own deadline is the backstop: by then our requests have ended themselves
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", log_level="info",
                            access_log=False, timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = Server(config)
    failed: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    state.on_load_error.append(on_load_error)
    server.run()  # handles SIGINT/SIGTERM: stops accepting, lets requests finish, then closes the engine
    if failed:
        print(f"pyllama serve: could not load {path}: {failed[0]}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


__all__ = ["register", "cmd_serve"]
