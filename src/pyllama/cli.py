"""The ``pyllama`` command: run, inspect, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TextIO

from . import chat_cli, rpc
from .server import cli as serve_cli
from .store import cli as store_cli
from .store import projector as store_projector
from ._units import memory_budget
from .options import SamplingOptions

if TYPE_CHECKING:
    from .stream import TokenEvent


def _model_path(arg: str | None) -> str:
    if arg:
        from .store import resolve  # a reference (hf:..., https://...) is pulled into the cache first

        return str(resolve(arg, progress=True))
    from .starter import starter_model_path

    return str(starter_model_path())


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The sampling flags shared by `pyllama run` and `pyllama chat` as generation options."""
    return SamplingOptions(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           seed=args.seed, max_tokens=args.n_predict)


def cmd_run(args: argparse.Namespace) -> int:
    from .generate import Generation
    from .model import Model

    from .chat import ChatSession
    from .media import Audio, Image, Media

    options = sampling_options(args)
    options["stop"] = args.stop
    media: list[Media] = [*map(Image, args.image), *map(Audio, args.audio)]
    path = _model_path(args.model)
    mmproj = store_projector.cli_projector(args.model, args.mmproj, args.no_mmproj)  # else an hf: model's
    if media and mmproj is None:
        raise SystemExit("--image / --audio need the model's projector: --mmproj mmproj.gguf")
    with Model(path, n_gpu_layers=args.ngl, progress=args.progress, rpc=args.rpc or (),
               mmproj=mmproj) as model:
        with model.context(n_ctx=args.ctx, n_threads=args.threads, n_batch=args.batch,
                           flash_attn=args.flash_attn) as ctx:
            out = sys.stdout
            if args.chat:  # one user turn through the chat template, media first (as llama-mtmd-cli renders it)
                chat = ChatSession(ctx, **options)
                try:
                    if not _print_stream(chat.stream([*media, args.prompt]), out):
                        return 130
                finally:
                    chat.close()
                out.write("\n")
                return 0
            prompt: Any = [*media, args.prompt] if media else args.prompt  # raw: the media, then the text
            spec = _speculator(ctx, args) if args.draft else None
            try:
                with Generation(ctx, prompt, **options, parse_special=False, draft=spec) as gen:
                    if not _print_stream(gen, out):
                        return 130
            finally:
                if spec is not None:
                    spec.close()
                    if spec.draft_model is not None:
                        spec.draft_model.close()
            out.write("\n")
            if args.verbose:
                perf = ctx.perf()
                print(f"prompt: {perf.n_p_eval} tokens, {perf.prompt_tokens_per_second:.1f} t/s; "
                      f"generation: {perf.n_eval} tokens, {perf.tokens_per_second:.1f} t/s; "
                      f"finish: {gen.finish_reason}", file=sys.stderr)
                st = gen.speculative
                if st is not None:
                    print(f"drafts: {st.n_drafts}, drafted {st.n_drafted} tokens, accepted {st.n_accepted} "
                          f"({st.acceptance_rate:.1%})", file=sys.stderr)
    return 0


def _print_stream(events: Iterable[TokenEvent], out: TextIO) -> bool:
    """Print a stream's text as it comes; False when Ctrl-C stopped it."""
    try:
        for ev in events:
            out.write(ev.text)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        return False
    return True


def _speculator(ctx: Any, args: argparse.Namespace) -> Any:
    """A Speculator for ``--draft``: an n-gram drafter by name, else a draft model's file."""
    from .model import Model
    from .speculative import NGRAM_TYPES, Speculator

    if args.draft == "ngram" or args.draft in NGRAM_TYPES:
        return Speculator(ctx, args.draft, n_max=args.draft_max)
    if not os.path.isfile(args.draft):
        raise SystemExit(f"--draft: neither an n-gram drafter ({', '.join(NGRAM_TYPES)}) nor a model file: "
                         f"{args.draft}")
    draft_model = Model(args.draft, n_gpu_layers=args.ngl, progress=args.progress)
    try:
        return Speculator(ctx, draft_model, n_max=args.draft_max)
    except BaseException:
        draft_model.close()
        raise


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def cmd_fit(args: argparse.Namespace) -> int:
    """What n_gpu_layers="auto" would choose for a model here, and the projected memory use."""
    from dataclasses import asdict

    from .fit import fit_params, memory_projection

    if args.model and args.model in ("build", "devices", "gpu"):
        raise SystemExit("usage: pyllama inspect fit [MODEL]")
    if _is_repository(args.model):  # every quantisation of a repository, measured from its header alone
        from .store.cli import print_candidates
        from .store.remote import choose_quant, fit_candidates

        candidates = fit_candidates(args.model, n_ctx=args.ctx or 4096, budget=args.memory_budget,
                                    margin=args.margin_mib << 20)
        chosen = choose_quant(candidates)
        if args.json:
            print(json.dumps({"model": args.model, "chosen": chosen.quant if chosen else None,
                              "candidates": [asdict(c) for c in candidates]}, indent=2))
        else:
            print_candidates(candidates, chosen, out=sys.stdout)
        return 0
    path = _model_path(args.model)
    fit = fit_params(path, margin_mib=args.margin_mib, min_ctx=args.min_ctx)
    n_ctx = args.ctx or (min(fit.n_ctx, 4096) if fit.n_ctx else 4096)
    rows = memory_projection(path, n_gpu_layers=fit.n_gpu_layers, n_ctx=n_ctx)
    if args.json:
        print(json.dumps({"model": path, "fit": asdict(fit), "n_ctx": n_ctx,
                          "memory": [asdict(r) for r in rows]}, indent=2))
        return 0
    layers = "all" if fit.n_gpu_layers < 0 else str(fit.n_gpu_layers)
    print(f"{path}")
    print(f"fit: {fit.status}{' (' + fit.reason + ')' if fit.reason else ''}; n_gpu_layers={layers}"
          f"{'; tensor_split=' + str(list(fit.tensor_split)) if fit.tensor_split else ''}"
          f"{'; ' + str(len(fit.overrides)) + ' tensor overrides' if fit.overrides else ''}"
          f"; margin {fit.margin_mib} MiB; {fit.seconds:.2f}s")
    print(f"projected memory at n_ctx={n_ctx}:")
    for r in rows:
        print(f"  {r.device:<10} model {_fmt_bytes(r.model):>9}  context {_fmt_bytes(r.context):>9}  "
              f"compute {_fmt_bytes(r.compute):>9}  free {_fmt_bytes(r.free)} / {_fmt_bytes(r.total)}")
    return 0


def _is_repository(arg: str | None) -> bool:
    """``hf:org/repo`` (no file, no quantisation): a repository whose quantisations ``inspect fit`` compares."""
    from .store.refs import HfRef, is_reference, parse_reference

    if not is_reference(arg):
        return False
    parsed = parse_reference(arg)
    return isinstance(parsed, HfRef) and parsed.path is None and parsed.quant is None


def cmd_model(args: argparse.Namespace) -> int:
    """``pyllama inspect model REF|URL``: a remote GGUF's metadata, read from its header alone."""
    from .store.remote import header_of

    if not args.model:
        raise SystemExit("usage: pyllama inspect model hf:org/repo[:QUANT]|hf:org/repo/file.gguf|URL")
    h = header_of(args.model)
    facts = {"url": h.url, "size": h.size, "header_bytes_fetched": h.fetched, **h.meta}
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        for key, value in facts.items():
            print(f"{key:<28} {value}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .context_params import thread_choice
    from .devices import backends, build_info, devices, supports_gpu_offload, system_info, unavailable_backends

    if args.what == "fit":
        return cmd_fit(args)
    if args.what == "model":
        return cmd_model(args)

    threads = thread_choice()
    info: dict[str, Any] = {"build": build_info(), "backends": backends(),
                            "default_threads": {"n_threads": threads.n_threads, "reason": threads.reason},
                            "devices": [d.as_dict() for d in devices()],
                            "system_info": system_info(), "gpu_offload": supports_gpu_offload()}
    what = args.what
    if what == "build":
        data: Any = {k: info[k] for k in ("build", "backends", "default_threads", "system_info")}
    elif what == "devices":
        data = info["devices"]
    else:  # gpu
        data = {"build": info["build"], "backends": info["backends"], "gpu_offload": info["gpu_offload"],
                "devices": info["devices"],
                "accelerators": [d for d in info["devices"] if d["type"] != "cpu"],
                "unavailable": [u.as_dict() for u in unavailable_backends()]}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if what == "build":
        b = info["build"]
        print(f"pyllama {b['pyllama_version']}  llama.cpp {b['llama_commit'][:9]}  backend {b['backend']}")
        print(f"backend libraries: {' '.join(b['backend_libraries'])}")
        if b.get("cpu_features"):
            print(f"CPU features: {' '.join(b['cpu_features'])}")
        print(f"compiler: {b.get('c_compiler', '')}  {b.get('system', '')}  {b.get('build_type', '')}")
        print(f"loaded backends: {', '.join(info['backends'])}")
        threads = thread_choice()
        print(f"default threads: {threads.n_threads} ({threads.reason})")
        print(info["system_info"])
        return 0
    devs = data if what == "devices" else data["devices"]
    if what == "gpu" and not data["accelerators"]:
        print(f"no accelerator found (build: {info['build']['backend']}); running on the CPU")
    if what == "gpu":
        for u in data["unavailable"]:
            print(f"{u['backend']} unavailable: {u['reason']}")
    for d in devs:
        mem = f"{_fmt_bytes(d['memory_free'])} free / {_fmt_bytes(d['memory_total'])}" if d["memory_total"] else ""
        driver = f"  [{d['driver']}]" if d.get("driver") else ""
        print(f"[{d['index']}] {d['name']:<10} {d['type']:<6} {d['backend']:<8} {d['description']}  {mem}{driver}")
    if what == "devices":
        print(f"default CPU threads: {threads.n_threads} ({threads.reason})")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        from .benchmark import main as bench_main
    except ImportError as exc:
        print(f"pyllama bench is unavailable: {exc}", file=sys.stderr)
        return 2
    return int(bench_main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyllama", description="llama.cpp from Python")
    p.add_argument("--log-level", default=None, help="show llama.cpp's log at this level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="stream the raw completion of a prompt")
    r.add_argument("model", nargs="?", help="GGUF file, model reference, `starter` or `chat-starter` "
                                            "(default: the starter model, Gemma 3 270M)")
    r.add_argument("-p", "--prompt", required=True)
    r.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until the end)")
    r.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    r.add_argument("--top-k", type=int, default=40)
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--min-p", type=float, default=0.05)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("-t", "--threads", type=int, default=None)
    r.add_argument("-c", "--ctx", type=int, default=4096)
    r.add_argument("-b", "--batch", type=int, default=2048)
    r.add_argument("-ngl", "--n-gpu-layers", dest="ngl", default="auto")
    r.add_argument("-fa", "--flash-attn", default="auto", choices=["auto", "on", "off"])
    r.add_argument("--stop", action="append", default=[])
    r.add_argument("--draft", default=None, metavar="DRAFTER|MODEL",
                   help="speculative decoding: 'ngram' (prompt lookup), another n-gram drafter "
                        "(pyllama.speculative.NGRAM_TYPES), or a smaller GGUF model of the same vocabulary")
    r.add_argument("--draft-max", type=int, default=16, help="most tokens per draft")
    r.add_argument("--progress", action="store_true", help="show a load progress bar")
    r.add_argument("--rpc", default=None, metavar="HOST:PORT,...", help="add ggml RPC servers' devices (pyllama rpc-server)")
    r.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    r.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the model's chat template")
    r.add_argument("-mm", "--mmproj", default=None, metavar="FILE",
                   help="the model's multimodal projector (mmproj-*.gguf), for --image and --audio (default: "
                        "for an hf: model, the projector pulled with it)")
    r.add_argument("--no-mmproj", dest="no_mmproj", action=store_projector.NoProjector,
                   help="load no projector (not the one pulled with an hf: model either)")
    r.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image before the prompt (may repeat; needs --mmproj)")
    r.add_argument("--audio", action="append", default=[], metavar="FILE",
                   help="an audio clip (WAV, MP3, FLAC) before the prompt (may repeat; needs --mmproj)")

    i = sub.add_parser("inspect", help="the build, the devices, the GPUs, or how a model fits them")
    i.add_argument("what", choices=["build", "devices", "gpu", "fit", "model"])
    i.add_argument("model", nargs="?", help="for `fit`: a GGUF file or reference (default: the starter model), or "
                                            "hf:org/repo to compare its quantisations from their headers; for "
                                            "`model`: a reference or URL whose header is read")
    i.add_argument("--memory-budget", type=memory_budget, default=None, metavar="SIZE|DEV=SIZE,...",
                   help="for `fit hf:org/repo`: the memory to fit in, in all (8G) and/or per device "
                        "(host=16G,CUDA0=20G) (default: each device's free memory and the RAM)")
    i.add_argument("--json", action="store_true")
    i.add_argument("--margin-mib", type=int, default=1024, help="for `fit`: memory to leave free per device")
    i.add_argument("--min-ctx", type=int, default=4096, help="for `fit`: smallest context the fit may choose")
    i.add_argument("-c", "--ctx", type=int, default=0, help="for `fit`: context size to project (default: auto)")

    chat_cli.register(sub)
    rpc.register(sub)
    serve_cli.register(sub)
    store_cli.register(sub)
    sub.add_parser("bench", help="llama-bench compatible benchmark (see pyllama bench --help)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.log_level:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(name)s %(levelname)s: %(message)s")
    if hasattr(args, "func"):  # subcommands registered by their own modules
        return int(args.func(args))
    if args.command == "run":
        from .errors import LlamaError

        if args.n_predict < 0:
            args.n_predict = None
        if args.ngl not in ("auto", "all"):
            args.ngl = int(args.ngl)
        try:
            return cmd_run(args)
        except LlamaError as exc:
            print(f"pyllama: {exc}", file=sys.stderr)
            return 1
    from .store.errors import StoreError

    try:
        return cmd_inspect(args)
    except (OSError, ValueError, StoreError) as exc:  # a missing or unreadable model, an unreachable one
        print(f"pyllama: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
