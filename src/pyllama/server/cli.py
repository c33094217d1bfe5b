"""``pyllama serve``: the OpenAI-compatible server on uvicorn.

Only argparse is imported here; the web stack loads when the command runs, so
the rest of the command line works without the ``server`` extra.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import logging
import math
import os
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, cast

from .._units import byte_size, memory_budget

log = logging.getLogger("pyllama.server")

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..engine import Engine


# --- llama-server's command line ------------------------------------------------------------------------
# `pyllama serve` takes the flags a script passes to llama-server (common/arg.cpp): where the meanings
# agree, llama-server's names are aliases in register()'s table; IGNORED lists the flags that have nothing
# to do here (accepted, logged at INFO), NOT_YET those of features pyllama does not have yet (accepted,
# logged as a warning). Any other flag is an error naming it. Deliberate differences: -c is the whole KV
# cache as in llama-server (pyllama's per-slot size is --ctx-slot), and `--slots N` is pyllama's -np.

#: (flags, whether they take a value, why they change nothing here)
IGNORED: tuple[tuple[tuple[str, ...], bool, str], ...] = (
    (("--ui", "--webui", "--no-ui", "--no-webui"), False, "pyllama serves no web UI"),
    (("--path", "--ui-config", "--webui-config", "--ui-config-file", "--webui-config-file"), True,
     "pyllama serves no web UI"),
    (("-cb", "--cont-batching", "-nocb", "--no-cont-batching"), False, "batching is always continuous"),
    (("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"), False,
     "the KV cache is always one buffer of equal slots (--ctx-slot)"),
    (("--embedding", "--embeddings"), False, "embeddings are always served, next to completions"),
    (("--cache-prompt", "--no-cache-prompt"), False, "a slot's cached prompt prefix is always reused"),
    (("--no-context-shift",), False, "generation always stops at the end of the slot's context"),
    (("--warmup", "--no-warmup", "--perf", "--no-perf"), False, "no effect on answers"),
    (("--threads-http",), True, "uvicorn serves HTTP on one event loop"),
    (("--reuse-port",), False, "uvicorn binds the port"),
    (("--log-disable", "--log-prefix", "--no-log-prefix", "--log-timestamps",
      "--no-log-timestamps"), False, "pyllama's log level: `pyllama --log-level LEVEL serve`"),
    (("-lv", "--verbosity", "--log-verbosity", "--log-file", "--log-colors"), True,
     "pyllama's log level: `pyllama --log-level LEVEL serve`"),
)

#: (flags, whether they take a value, the feature pyllama lacks)
NOT_YET: tuple[tuple[tuple[str, ...], bool, str], ...] = (
    (("--reasoning-budget",), True, "a budget of thinking tokens"),
    (("--cache-reuse",), True, "reusing cached chunks past a changed prefix (the common prefix is reused)"),
    (("--context-shift",), False, "context shift (generation stops at the end of the slot's context)"),
    (("--api-prefix",), True, "a path prefix (mount pyllama.server.create_app under one)"),
    (("-md", "--model-draft", "--spec-draft-model"), True,
     "speculative decoding with a draft model (n-gram drafters: --spec-type ngram-*)"),
    (("-mmu", "--mmproj-url"), True, "downloading a projector from a URL (pull it first: `pyllama pull`)"),
    (("-dev", "--device", "-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-fit", "--fit"),
     True, "choosing the devices (pyllama fits the model to them: `pyllama inspect fit`)"),
    (("-lm", "--load-mode"), True, "choosing how the weights are loaded"),
    (("--mlock", "--no-mmap", "--mmap"), False, "choosing how the weights are loaded (older llama-server flags)"),
    (("--sleep-idle-seconds",), True, "unloading the model while idle"),
)


class _StrictParser(argparse.ArgumentParser):
    """Flags match exactly: no abbreviations, and an unknown ``-cram`` is an error, not ``-c ram``."""

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        return []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[Any, list[str]]:
        # the command line is kept (serve_argv): which flags it gave itself decides over --models-preset
        ns, extras = super().parse_known_args(args, namespace)
        ns.serve_argv = list(sys.argv[1:] if args is None else args)
        return ns, extras


def serve_parser() -> argparse.ArgumentParser:
    """A fresh parser of ``pyllama serve``'s command line (the one ``pyllama serve`` parses with)."""
    sub = argparse.ArgumentParser(prog="pyllama").add_subparsers()
    register(sub)
    parser: argparse.ArgumentParser = sub.choices["serve"]
    return parser


class _Noted(argparse.Action):
    """A flag of IGNORED or NOT_YET: kept (flag, value, reason, not yet supported) to be logged."""

    def __init__(self, option_strings: list[str], dest: str, *, reason: str, later: bool, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.reason = reason
        self.later = later

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        notes = list(getattr(namespace, self.dest, None) or [])
        notes.append((option_string, values if isinstance(values, str) else None, self.reason, self.later))
        setattr(namespace, self.dest, notes)


class _SlotsAction(argparse.Action):
    """``--slots N`` sets the slot count (pyllama's spelling of ``-np``); ``--slots`` alone is llama-server's
    switch for its /slots endpoint."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values is None:
            namespace.slots_endpoint = True
        else:
            namespace.slots = values


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _parallel(text: str) -> int:
    n = _int(text)
    if n == -1:
        return 4  # llama-server's "auto"
    if n < 1:
        raise argparse.ArgumentTypeError(f"the number of slots must be >= 1 (or -1: auto), not {n}")
    return n


def _slot_count(text: str) -> int:
    try:
        return _parallel(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number of slots, not {text!r} (llama-server's `--slots` switch takes no value: "
            "put it after the model, or give the model with -m)") from None


def _ctx_slot(text: str) -> int | str:
    if text == "auto":
        return text
    n = _int(text)
    if n < 8:
        raise argparse.ArgumentTypeError(f"a slot needs at least 8 tokens, not {n}")
    return n


def _threads(text: str) -> int | None:
    n = _int(text)
    return None if n < 0 else n  # llama-server's -1: the default choice


def _flash_attn(text: str) -> str:
    # llama-server's is_truthy / is_falsey / is_autoy (common/arg.cpp)
    if text in ("on", "enabled", "true", "1"):
        return "on"
    if text in ("off", "disabled", "false", "0"):
        return "off"
    if text in ("auto", "-1"):
        return "auto"
    raise argparse.ArgumentTypeError(f"expected on, off or auto, not {text!r}")


def _gpu_layers(text: str) -> int | str:
    if text in ("auto", "all"):
        return text
    n = _int(text)
    return "auto" if n < 0 else n


def _lora_file(path: str) -> str:
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no LoRA adapter file {path}")
    return path


def _lora_files(text: str) -> list[tuple[str, float]]:
    return [(_lora_file(p), 1.0) for p in text.split(",") if p]


def _scaled_lora_files(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        path, sep, scale = item.rpartition(":")
        try:
            value = float(scale)
        except ValueError:
            value = float("nan")
        if not sep or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not FNAME:SCALE: {item!r}")
        out.append((_lora_file(path), value))
    return out


def _lora_list(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The adapters in command-line order; at scale 0 with --lora-init-without-apply."""
    adapters = [item for group in args.lora for item in group]
    return [(path, 0.0) for path, _ in adapters] if args.lora_init_without_apply else adapters


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():  # as llama-server: the directory must exist
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    return path


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand to ``pyllama``'s parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching (needs pyllama[server])",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/embeddings, "
                    "/v1/models) plus /health, /metrics, /tokenize and /detokenize. Takes llama-server's "
                    "flags too (note -c: the whole KV cache, shared by the slots).",
        usage="%(prog)s [MODEL | -m FNAME | -hf USER/MODEL[:QUANT]] [options]", allow_abbrev=False)
    p.__class__ = _StrictParser  # the subparser is made by the parent's class
    p.add_argument("model", nargs="?", help="GGUF file, `chat-starter` or `starter` (default: the chat starter, "
                                            "SmolLM2-135M-Instruct; `starter` is Gemma 3 270M, a base model)")
    p.add_argument("-m", "--model", dest="model_flag", default=None, metavar="FNAME",
                   help="the model, as llama-server takes it (instead of MODEL)")
    p.add_argument("-hf", "-hfr", "--hf-repo", dest="hf_repo", default=None, metavar="USER/MODEL[:QUANT]",
                   help="a Hugging Face repository through pyllama's model store (hf:USER/MODEL:QUANT; "
                        "default quant Q4_K_M)")
    p.add_argument("-hff", "--hf-file", dest="hf_file", default=None, metavar="FILE",
                   help="with -hf: that file of the repository instead of a quant")
    p.add_argument("-mu", "--model-url", dest="model_url", default=None, metavar="URL",
                   help="a model at a URL, through pyllama's model store")
    p.add_argument("--offline", action="store_true", help="resolve -hf / references from the cache only")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--parallel", dest="slots", type=_parallel, default=4, metavar="N",
                   help="slots: requests decoded together (default 4; -1: 4)")
    p.add_argument("--slots", dest="slots", nargs="?", type=_slot_count, action=_SlotsAction, metavar="N",
                   default=argparse.SUPPRESS,
                   help="`--slots N`: pyllama's spelling of -np N; `--slots` alone: llama-server's switch for "
                        "its /slots endpoint")
    p.add_argument("--no-slots", dest="slots_endpoint", action="store_false",
                   help="llama-server's switch off for /slots")
    p.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=None, metavar="N",
                   help="llama-server's meaning: the whole KV cache, shared by the slots, so each slot holds "
                        "N / slots tokens (0 or unset: --ctx-slot auto)")
    p.add_argument("--ctx-slot", "--kv-unified-per-slot", dest="ctx_slot", type=_ctx_slot, default=None,
                   metavar="N|auto", help="context of one slot, prompt plus reply of one request; the cache holds "
                                          "slots x N (overrides -c; auto: min(training context, 4096), fit to "
                                          "memory)")
    p.add_argument("-t", "--threads", type=_threads, default=None, metavar="N", help="-1: pyllama's choice")
    p.add_argument("-tb", "--threads-batch", type=_threads, default=None, metavar="N")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="most tokens decoded in one step")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-fa", "--flash-attn", type=_flash_attn, default="auto", metavar="on|off|auto")
    p.add_argument("-ctk", "--cache-type-k", default="f16")
    p.add_argument("-ctv", "--cache-type-v", default="f16")
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="ngl", type=_gpu_layers, default="auto",
                   metavar="N|auto|all")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 503)")
    p.add_argument("-sps", "--slot-prompt-similarity", type=float, default=0.1)
    p.add_argument("--draft", default=None, metavar="DRAFTER",
                   help="speculative decoding with an n-gram drafter: ngram (prompt lookup), or one of "
                        "llama.cpp's ngram-cache, ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod")
    p.add_argument("--spec-type", dest="spec_type", default=None, metavar="TYPE[,TYPE]",
                   help="llama-server's spelling: its ngram-* types are --draft's")
    p.add_argument("--draft-max", "--spec-draft-n-max", dest="draft_max", type=int, default=16,
                   help="most draft tokens per request and step")
    p.add_argument("--sampling", default="auto", choices=["auto", "host", "argmax", "backend"],
                   help="where greedy requests choose their tokens: auto (measured fastest for the backend), host "
                        "(llama.cpp's sampler), argmax (over the logits), backend (in the compute graph); requests "
                        "a mode cannot serve (logprobs with backend) take auto")
    p.add_argument("--api-key", default=os.environ.get("PYLLAMA_API_KEY"), metavar="KEY[,KEY]",
                   help="require `Authorization: Bearer KEY` on every endpoint but /health "
                        "(default: $PYLLAMA_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="FNAME",
                   help="more keys, one a line (lines starting with # are comments)")
    p.add_argument("-a", "--alias", default=None, metavar="NAME[,NAME]",
                   help="model id for clients, then more names /v1/models lists (default: the file name); "
                        "requests may name any model")
    p.add_argument("--pooling", default=None, choices=["none", "mean", "cls", "last", "rank"],
                   help="the pooling of /embeddings (default: the model's own, else mean; 'none' serves none)")
    p.add_argument("--rerank", "--reranking", dest="pooling", action="store_const", const="rank",
                   help="serve /rerank: the model is a reranker (rank pooling); a reranker GGUF says so itself")
    p.add_argument("-v", "--verbose", "--log-verbose", dest="verbose", action="store_true",
                   help="llama-server's debugging answers: chat completions carry \"__verbose\" (the native answer "
                        "with the rendered prompt) unless a request sends verbose: false; the log stays pyllama's "
                        "(`pyllama --log-level LEVEL serve`)")
    p.add_argument("--backend-sampling", "--backend_sampling", "-bs", dest="sampling", action="store_const",
                   const="backend",
                   help="llama-server's spelling of --sampling backend")
    p.add_argument("--tags", default=None, metavar="TAG[,TAG]", help="tags /models lists for the model")
    p.add_argument("--max-body-size", type=byte_size, default=None, metavar="BYTES",
                   help="largest request body read, e.g. 32M (413 past it; default: a slot's context as JSON, "
                        "at least 16M)")
    p.add_argument("-to", "--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="longest wait for each part of a request's body (408 past it; llama-server's read "
                        "timeout; default 600)")
    p.add_argument("--header-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time a client has to send a request's line and headers, from connecting or from the "
                        "previous response (past it: 408 and the connection closed; slowloris; default 30)")
    p.add_argument("--metrics", action="store_true",
                   help="serve /metrics (Prometheus; without it: 501, as llama-server)")
    p.add_argument("--slot-save-path", type=_directory, default=None, metavar="DIR",
                   help="let POST /slots/{id}?action=save|restore write and read slot caches in DIR (file names "
                        "confined to it; without it: 501, as llama-server)")
    p.add_argument("--lora", dest="lora", action="append", type=_lora_files, default=[], metavar="FNAME[,FNAME]",
                   help="a LoRA adapter (scale 1; a comma-separated list loads several; may repeat; adapters are "
                        "numbered in the order given, as /lora-adapters and a request's `lora` name them)")
    p.add_argument("--lora-scaled", dest="lora", action="append", type=_scaled_lora_files, default=[],
                   metavar="FNAME:SCALE[,...]", help="a LoRA adapter with its scale (a comma-separated list; may repeat)")
    p.add_argument("--lora-init-without-apply", action="store_true",
                   help="load the adapters at scale 0 (set scales with POST /lora-adapters)")
    p.add_argument("--memory-limit", type=byte_size, default=None, metavar="BYTES",
                   help="with --isolate (and for each model of the router): cap the worker's address space, e.g. "
                        "8G (RLIMIT_AS, Linux; the mapped model counts); a request past it is an error naming the "
                        "limit, and the worker starts afresh")
    mm = p.add_argument_group("images and audio (llama.cpp's libmtmd)")
    mm.add_argument("-mm", "--mmproj", default=None, metavar="FILE",
                    help="the model's multimodal projector (mmproj-*.gguf): chat messages may then hold images "
                         "(image_url) or audio (input_audio), as the projector takes")
    from ..store.projector import NoProjector

    mm.add_argument("--no-mmproj", dest="no_mmproj", action=NoProjector,
                    help="load no projector (not the one pulled with an hf: model either)")
    mm.add_argument("--mmproj-offload", dest="mmproj_offload", action="store_true", default=None,
                    help="run the projector on the GPU (default: where the model runs on one)")
    mm.add_argument("--no-mmproj-offload", dest="mmproj_offload", action="store_false",
                    help="run the projector on the CPU")
    mm.add_argument("--media-path", type=_directory, default=None, metavar="DIR",
                    help="read file://NAME image and audio URLs from DIR (names confined to it; without it they "
                         "are refused)")
    mm.add_argument("--image-min-tokens", type=int, default=None, metavar="N",
                    help="fewest tokens an image becomes (projectors with dynamic resolution)")
    mm.add_argument("--image-max-tokens", type=int, default=None, metavar="N",
                    help="most tokens an image becomes (projectors with dynamic resolution)")
    m = p.add_argument_group("several models (llama-server's router mode; each model in its own worker process)")
    m.add_argument("--models-dir", default=None, metavar="DIR",
                   help="serve every GGUF model in DIR, named by file stem (projectors and later parts of split "
                        "sets left out)")
    m.add_argument("--models", default=None, metavar="[NAME=]MODEL,...",
                   help="serve these models (files or store references such as hf:org/repo:Q4_K_M), each named "
                        "NAME or by its file stem")
    m.add_argument("--models-store", action="store_true",
                   help="serve every model of pyllama's store by its reference (`pyllama ls`), and any it holds "
                        "later; without it too, a model pulled through the server (/api/pull, POST /models) is "
                        "served once pulled")
    m.add_argument("--models-max", type=int, default=4, metavar="N",
                   help="most models loaded at once; the least recently used idle one makes room (default 4)")
    m.add_argument("--models-autoload", action=argparse.BooleanOptionalAction, default=True,
                   help="load a model on its first request (default); without: POST /models/load first")
    m.add_argument("--memory-budget", type=memory_budget, default=None, metavar="SIZE|DEV=SIZE,...",
                   help="the memory the loaded models may take together, each measured per device by llama.cpp's "
                        "projection: in all (8G) and/or per device (host=16G,CUDA0=20G; device names as `pyllama "
                        "inspect devices` gives them); default: each device's free memory, 1 GiB kept")
    m.add_argument("--models-preset", default=None, metavar="FILE",
                   help="llama-server's INI file of per-model options: [*] for every model, a section per model "
                        "(a model served, or a new one with `model = FILE`); keys are these flags without dashes "
                        "(c, ngl, chat-template, ...), plus load-on-startup and stop-timeout; the command line "
                        "wins over a model's section, which wins over [*]")
    p.add_argument("--spm-infill", action="store_true",
                   help="/infill: suffix before prefix in the prompt (the Suffix/Prefix/Middle order some models use)")
    p.add_argument("--props", action="store_true",
                   help="let POST /props answer (without it: 501, as llama-server; GET /props always answers)")
    p.add_argument("--cors-origins", default="*", metavar="ORIGINS",
                   help="origins browsers may call from: *, localhost (loopback origins) or a comma-separated list")
    p.add_argument("--cors-methods", default="GET, POST, DELETE, OPTIONS", metavar="METHODS")
    p.add_argument("--cors-headers", default="*", metavar="HEADERS")
    p.add_argument("--cors-credentials", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-cors", action="store_true", help="send no CORS headers (browsers on other origins are "
                                                          "refused)")
    p.add_argument("--ssl-key-file", default=None, metavar="FNAME", help="serve HTTPS with this PEM key")
    p.add_argument("--ssl-cert-file", default=None, metavar="FNAME", help="... and this PEM certificate")
    p.add_argument("--chat-template", default=None, help="Jinja chat template replacing the model's own")
    p.add_argument("--chat-template-file", default=None, help="file holding the Jinja chat template")
    p.add_argument("--jinja", action=argparse.BooleanOptionalAction, default=True,
                   help="render chats with llama.cpp's Jinja path, common/chat (default); --no-jinja: its legacy "
                        "renderer alone, as llama-server --no-jinja (plain messages, no tools)")
    p.add_argument("-rea", "--reasoning", default="auto", choices=["on", "off", "auto"],
                   help="thinking in chats whose template can think: off renders them with thinking turned off "
                        "(a request's chat_template_kwargs.enable_thinking or reasoning_effort overrides it)")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='template variables for every chat, a JSON object (e.g. \'{"enable_thinking": false}\')')
    p.add_argument("--reasoning-format", default="auto", choices=["none", "auto", "deepseek", "deepseek-legacy"],
                   help="where a thinking model's reasoning goes: none (left in the content), deepseek "
                        "(reasoning_content), deepseek-legacy (both)")
    sampling = p.add_argument_group("request defaults", "what a request that leaves a parameter unset gets "
                                                        "(llama-server's flags)")
    sampling.add_argument("--temp", "--temperature", dest="temp", type=float, default=None)
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--min-p", type=float, default=None)
    sampling.add_argument("-s", "--seed", type=int, default=None, help="-1: random")
    sampling.add_argument("--repeat-penalty", type=float, default=None)
    sampling.add_argument("--repeat-last-n", type=int, default=None)
    sampling.add_argument("--presence-penalty", type=float, default=None)
    sampling.add_argument("--frequency-penalty", type=float, default=None)
    sampling.add_argument("-n", "--predict", "--n-predict", dest="n_predict", type=int, default=None,
                          help="max_tokens (-1: until the end of generation or the context)")
    p.add_argument("--keepalive", "--sse-ping-interval", dest="keepalive", type=float, default=10.0,
                   help="seconds between SSE keep-alive comments while a stream waits for a token (<= 0: none)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds open requests get to finish on SIGTERM/SIGINT before they are cancelled")
    p.add_argument("--progress", action="store_true",
                   help="show a load progress bar on the terminal (in its place, the router's /models shows none)")
    p.add_argument("--isolate", action="store_true",
                   help="run the engine in a worker process: a crash there fails the requests in flight, "
                        "the server stays up and the next request starts a fresh worker")
    for title, table, later in (("llama-server flags accepted and ignored", IGNORED, False),
                                ("llama-server flags accepted, not supported yet (a warning)", NOT_YET, True)):
        group = p.add_argument_group(title)
        for flags, takes_value, reason in table:
            group.add_argument(*flags, dest="llama_notes", action=_Noted, nargs=None if takes_value else 0,
                               metavar="VALUE" if takes_value else None, default=[], reason=reason, later=later,
                               help=reason)
    p.set_defaults(func=cmd_serve, slots_endpoint=True)


def _loader(args: argparse.Namespace, path: str, *, progress: Callable[[float], Any] | None = None) -> Engine:
    """The engine ``pyllama serve`` runs. ``progress`` (the server's record of the load, for /models) gives way
    to ``--progress``'s bar on the terminal."""
    from ..engine import Engine
    from ..model import Model
    from ..store.projector import cli_projector

    ngl: Any = args.ngl if args.ngl in ("auto", "all") else int(args.ngl)
    # without --mmproj / --no-mmproj, an hf: model's projector pulled with it
    mmproj = cli_projector(args.model, args.mmproj, getattr(args, "no_mmproj", False), log)
    if getattr(args, "isolate", False):
        return _isolated_loader(args, path, ngl, mmproj, progress=progress)
    model = Model(path, n_gpu_layers=ngl, progress=args.progress or progress)
    try:
        if mmproj is not None:
            model.projector(mmproj, use_gpu=args.mmproj_offload, image_min_tokens=args.image_min_tokens,
                            image_max_tokens=args.image_max_tokens)
        return Engine(model, n_slots=args.slots, n_ctx=args.slot_ctx, n_batch=args.batch_size,
                      n_ubatch=args.ubatch_size, n_threads=args.threads, n_threads_batch=args.threads_batch,
                      flash_attn=args.flash_attn, type_k=args.cache_type_k, type_v=args.cache_type_v,
                      max_queue=args.max_queue, slot_prompt_similarity=args.slot_prompt_similarity, draft=args.draft,
                      n_draft=args.draft_max, sampling=args.sampling, pooling=args.pooling, lora=_lora_list(args))
    except BaseException:
        model.close()
        raise


def _isolated_loader(args: argparse.Namespace, path: str, ngl: Any, mmproj: str | None = None, *,
                     progress: Callable[[float], Any] | None = None) -> Engine:
    from ..worker.engine import IsolatedEngine

    engine = IsolatedEngine(path, n_gpu_layers=ngl, n_slots=args.slots, n_ctx=args.slot_ctx, n_batch=args.batch_size,
                            n_ubatch=args.ubatch_size, n_threads=args.threads, n_threads_batch=args.threads_batch,
                            flash_attn=args.flash_attn, type_k=args.cache_type_k, type_v=args.cache_type_v,
                            max_queue=args.max_queue, slot_prompt_similarity=args.slot_prompt_similarity,
                            draft=args.draft, n_draft=args.draft_max, sampling=args.sampling,
                            progress=args.progress or progress, pooling=args.pooling, lora=_lora_list(args),
                            mmproj=mmproj or args.mmproj, mmproj_gpu=args.mmproj_offload, image_min_tokens=args.image_min_tokens,
                            image_max_tokens=args.image_max_tokens, memory_limit=args.memory_limit)
    return cast("Engine", engine)  # duck-typed: it offers the Engine API the server uses


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (an IPv4 or IPv6 address or a name) and ``port``."""
    family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _llama_server_args(args: argparse.Namespace) -> str | None:
    """Fold llama-server's spellings into the settings the server uses; returns a usage error, or None."""
    notes: list[tuple[str | None, str | None, str, bool]] = list(args.llama_notes)
    # the model: MODEL, -m, -hf (with -hff) or -mu
    if args.hf_file and not args.hf_repo:
        return "-hff/--hf-file needs -hf/--hf-repo"
    hf = None
    if args.hf_repo:
        repo = args.hf_repo.removeprefix("hf:")
        hf = f"hf:{repo.split(':', 1)[0]}/{args.hf_file}" if args.hf_file else f"hf:{repo}"
    given = [(flag, value) for flag, value in (("MODEL", args.model), ("-m", args.model_flag), ("-hf", hf),
                                               ("-mu", args.model_url)) if value]
    if len(given) > 1:
        return f"name the model once, not with {' and '.join(flag for flag, _ in given)}"
    args.model = given[0][1] if given else None
    # the context of a slot: --ctx-slot, else llama-server's -c (the whole cache) shared by the slots
    if args.ctx_slot is not None:
        if args.ctx_size:
            notes.append(("-c", str(args.ctx_size), f"--ctx-slot gives each slot {args.ctx_slot} tokens", False))
        args.slot_ctx = args.ctx_slot
    elif args.ctx_size:
        if args.ctx_size < 0:
            return f"-c/--ctx-size must be >= 0, not {args.ctx_size}"
        args.slot_ctx = args.ctx_size // args.slots
        if args.slot_ctx < 8:
            return (f"-c {args.ctx_size} shared by {args.slots} slots leaves {args.slot_ctx} tokens a slot; "
                    "a slot needs at least 8")
    else:
        args.slot_ctx = "auto"
    # API keys: --api-key (comma-separated) and --api-key-file (one a line)
    keys = [k.strip() for k in (args.api_key or "").split(",") if k.strip()]
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as fh:
                keys += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        except OSError as exc:
            return f"cannot read --api-key-file: {exc}"
    args.api_keys = keys
    # as llama-server (a std::set): the names in order, the first of them the model's id
    names = sorted({a.strip() for a in (args.alias or "").split(",") if a.strip()})
    args.model_name, args.aliases = (names[0], names[1:]) if names else (None, [])
    if args.n_predict is not None and (args.n_predict == 0 or args.n_predict < -1):
        return f"-n/--n-predict must be -1 (no limit) or >= 1, not {args.n_predict}"
    if args.seed is not None and args.seed > 0xFFFFFFFF:
        return f"--seed must fit 32 bits, not {args.seed}"
    # llama-server's --spec-type: its ngram-* drafters are --draft's
    if args.spec_type:
        from ..speculative import NGRAM_TYPES

        types = [t.strip() for t in args.spec_type.split(",") if t.strip() and t.strip() != "none"]
        ngram = [t for t in types if t in NGRAM_TYPES]
        for t in types:
            if t not in ngram:
                notes.append(("--spec-type", t, "speculative decoding with a draft model", True))
        if ngram and args.draft is None:
            args.draft = ngram[0]
        for t in ngram[1:] if args.draft == ngram[0] else ngram:
            notes.append(("--spec-type", t, f"one n-gram drafter at a time: {args.draft}", False))
    args.llama_notes = notes
    return None


def _log_notes(args: argparse.Namespace) -> None:
    log = logging.getLogger("pyllama.server")
    for flag, value, reason, later in args.llama_notes:
        shown = f"{flag} {value}" if value is not None else flag
        if later:
            log.warning("%s is not supported yet (%s): ignored", shown, reason)
        else:
            log.info("%s ignored: %s", shown, reason)


_Settings = tuple[Any, Any, Any]  # (chat template, its kwargs, RequestDefaults)


class _Refused(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _app_settings(a: argparse.Namespace, who: str = "") -> _Settings:
    """The chat template (read from --chat-template-file), --chat-template-kwargs and the request defaults a
    model's app takes from its options; a problem is :class:`_Refused` with the exit code."""
    from .params import RequestDefaults

    template = a.chat_template
    if a.chat_template_file:
        try:
            with open(a.chat_template_file, encoding="utf-8") as fh:
                template = fh.read()
        except OSError as exc:
            raise _Refused(f"{who}cannot read the chat template: {exc}", 1) from None
    kwargs = None
    if a.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(a.chat_template_kwargs)
        except ValueError as exc:
            raise _Refused(f"{who}--chat-template-kwargs is not JSON: {exc}", 2) from None
        if not isinstance(kwargs, dict):
            raise _Refused(f"{who}--chat-template-kwargs must be a JSON object", 2)
    defaults = RequestDefaults(
        temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        seed=None if a.seed is None or a.seed < 0 else a.seed, repeat_penalty=a.repeat_penalty,
        repeat_last_n=a.repeat_last_n, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        max_tokens=None if a.n_predict is None or a.n_predict < 0 else a.n_predict)
    return template, kwargs, defaults


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f"pyllama serve needs the server extra: pip install 'pyllama[server]' ({exc})", file=sys.stderr)
        return 2
    raw = argparse.Namespace(**vars(args))  # as parsed: each routed model's options start from it
    problem = _llama_server_args(args)
    several = (args.models_dir is not None or args.models is not None or args.models_preset is not None
               or args.models_store)
    if problem is None and args.memory_limit is not None and not (args.isolate or several):
        problem = "--memory-limit caps a worker process: use it with --isolate (or several models)"
    if problem is not None:
        print(f"pyllama serve: {problem}", file=sys.stderr)
        return 2
    # llama.cpp's own log stays quiet unless `pyllama --log-level` asked for it; the server says what it does.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("pyllama.server").setLevel(logging.INFO)
    from ..errors import LlamaError
    from ..starter import STARTERS
    from .presets import PresetError
    from .routed import Routed, router_models, router_specs

    routed: list[Routed] | None = None
    if several:  # several models: the router
        try:
            if args.mmproj is not None:
                raise ValueError("--mmproj names one model's projector: with several models, put each model "
                                 "with its mmproj-*.gguf in a subdirectory of --models-dir (or give it in the "
                                 "model's section of --models-preset)")
            need_some = args.models_preset is None and not args.models_store
            routed, new_spec = router_specs(args, raw, router_models(args, need_some=need_some), need_some)
        except PresetError as exc:
            print(f"pyllama serve: {exc}", file=sys.stderr)
            return 2
        except (OSError, ValueError, LlamaError) as exc:
            print(f"pyllama serve: {exc}", file=sys.stderr)
            return 1
        path = ""
    elif args.model is None or args.model in STARTERS:
        try:
            path = str(STARTERS[args.model or "chat-starter"]())
        except LlamaError as exc:
            print(f"pyllama serve: {exc}", file=sys.stderr)
            return 1
    else:
        from ..store import is_reference, resolve

        path = args.model
        if is_reference(path):  # hf:..., https://... (and -hf, -mu): the store's cache, else a download
            try:
                path = str(resolve(path, progress=True, offline=True if args.offline else None))
            except LlamaError as exc:
                print(f"pyllama serve: {exc}", file=sys.stderr)
                return 1
        elif not os.path.isfile(path):
            print(f"pyllama serve: no such model file: {path}", file=sys.stderr)
            return 1
    from ..speculative import NGRAM_TYPES

    if args.draft is not None and args.draft not in ("ngram", *NGRAM_TYPES):
        print(f"pyllama serve: --draft must be ngram or one of {', '.join(NGRAM_TYPES)}", file=sys.stderr)
        return 2
    hosts = [h.strip() for h in args.host.split(",") if h.strip()]  # llama-server binds each of a list
    if not hosts:
        print("pyllama serve: --host names no address", file=sys.stderr)
        return 2
    if not args.api_keys and not all(_is_loopback(h) for h in hosts):
        print(f"pyllama serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
              "can use it", file=sys.stderr)
    _log_notes(args)
    from .cors import CORSOptions
    from .slow_clients import protocol_with

    try:
        settings = _app_settings(args)
        for spec in routed or ():
            spec.settings = _app_settings(spec.args, f"model `{spec.name}`: ")
    except _Refused as exc:
        print(f"pyllama serve: {exc.message}", file=sys.stderr)
        return exc.code
    cors = None if args.no_cors else CORSOptions(origins=args.cors_origins, methods=args.cors_methods,
                                                 headers=args.cors_headers, credentials=args.cors_credentials)

    def make_app(loader: Callable[..., Engine], name: str | None, load_at_start: bool, a: argparse.Namespace,
                 settings: _Settings) -> Starlette:
        template, kwargs, defaults = settings
        return create_app(loader, api_key=args.api_keys, model_name=name,
                          aliases=a.aliases if load_at_start else (),
                          keepalive_s=a.keepalive if a.keepalive > 0 else 1e9,
                          chat_template=template, defaults=defaults, metrics=a.metrics, cors=cors,
                          reasoning_format=a.reasoning_format, slots=a.slots_endpoint, props=a.props,
                          reasoning=a.reasoning, chat_template_kwargs=kwargs, verbose=a.verbose,
                          tags=[t.strip() for t in (a.tags or "").split(",") if t.strip()], jinja=a.jinja,
                          max_body_size=a.max_body_size, read_timeout=a.timeout,
                          slot_save_path=a.slot_save_path, spm_infill=a.spm_infill,
                          load_at_start=load_at_start, media_path=a.media_path)

    app: Any
    if routed is not None:
        from ..store import list_models
        from .protocol import APIError
        from .router import ModelRouter, RoutedModel

        def routed_model(spec: Routed) -> RoutedModel:
            a = spec.args
            ngl: Any = a.ngl if a.ngl in ("auto", "all") else int(a.ngl)
            if spec.settings is None:
                spec.settings = _app_settings(a, f"model `{spec.name}`: ")
            loader = functools.partial(_isolated_loader, a, spec.path, ngl, spec.mmproj)
            return RoutedModel(spec.name, Path(spec.path), make_app(loader, spec.name, False, a, spec.settings),
                               aliases=tuple(spec.aliases), load_on_startup=spec.load_on_startup,
                               stop_timeout=spec.stop_timeout,
                               n_ctx=a.slot_ctx * a.slots if isinstance(a.slot_ctx, int) else None)

        def add_model(name: str, path: Path, projector: Path | None) -> RoutedModel:
            try:
                spec = new_spec(name, str(path), None if getattr(args, "no_mmproj", False) or projector is None else str(projector))
                return routed_model(spec)
            except (_Refused, PresetError, ValueError) as exc:
                raise APIError(400, f"model `{name}` cannot be served: {getattr(exc, 'message', exc)}",
                               param="model") from None

        store_names = {m.ref for m in list_models()} if args.models_store else set()
        models = [routed_model(spec) for spec in routed]
        for m in models:
            m.from_store = m.name in store_names
        try:
            router = ModelRouter(models, models_max=max(1, args.models_max), memory_budget=args.memory_budget,
                                 autoload=args.models_autoload, api_keys=args.api_keys or (), n_ctx=4096,
                                 add_model=add_model, store=args.models_store)
        except ValueError as exc:
            print(f"pyllama serve: {exc}", file=sys.stderr)
            return 2
        app, state = router, router
        log.info("serving %d models: %s", len(routed), ", ".join(spec.name for spec in routed))
    else:
        app = make_app(functools.partial(_loader, args, path), args.model_name, True, args, settings)
        state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # requests in flight get --shutdown-timeout to finish, then end with an error event
            state.shutdown_soon(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own deadline is the backstop: by then our requests have ended themselves
    # h11 with a deadline on each request's head (uvicorn has none: slowloris); request lines and headers
    # larger than h11's 16 KiB default are refused with a 400 by h11 itself
    config = uvicorn.Config(app, host=hosts[0], port=args.port, lifespan="on", log_level="info",
                            http=protocol_with(args.header_timeout),
                            access_log=False, timeout_graceful_shutdown=args.shutdown_timeout + 5,
                            ssl_keyfile=args.ssl_key_file, ssl_certfile=args.ssl_cert_file)
    server = Server(config)
    failed: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    if routed is None:
        app.state.server.on_load_error.append(on_load_error)
    sockets = None
    if len(hosts) > 1:
        try:
            sockets = [_bind(h, args.port) for h in hosts]
        except OSError as exc:
            print(f"pyllama serve: cannot listen on {args.host} port {args.port}: {exc}", file=sys.stderr)
            return 1
    server.run(sockets=sockets)  # handles SIGINT/SIGTERM: stops accepting, lets requests finish, closes the engine
    if failed:
        print(f"pyllama serve: could not load {path}: {failed[0]}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


__all__ = ["register", "cmd_serve"]
