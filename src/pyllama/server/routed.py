"""The models a router serves, each with its options: ``--models-dir`` (and its subdirectories holding a
model with its ``mmproj*.gguf``), ``--models``, and ``--models-preset``'s sections merged over them as
llama-server merges them (the command line over the model's section over ``[*]``)."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cli import _llama_server_args, _log_notes, _Settings, serve_parser

log = logging.getLogger("pyllama.server")


def router_models(args: argparse.Namespace, need_some: bool = True) -> list[tuple[str, str, str | None]]:
    """(name, path, projector) of each model the router serves: --models-dir's GGUF files (and, as llama-server
    lays them out, its subdirectories holding one model with its mmproj-*.gguf), then --models' entries, then
    with --models-store every model of the store by its reference (none is an error where ``need_some``)."""
    from ..store import is_reference, resolve
    from ..store.refs import split_parts

    def models_in(folder: Path) -> list[Path]:
        out = []
        for f in sorted(folder.glob("*.gguf")):
            parts = split_parts(f.name)
            if "mmproj" not in f.name.lower() and (parts is None or parts[0] == f.name):
                out.append(f)
        return out

    out: list[tuple[str, str, str | None]] = []
    if args.models_dir is not None:
        folder = Path(args.models_dir)
        if not folder.is_dir():
            raise ValueError(f"--models-dir: not a directory: {folder}")
        for f in models_in(folder):
            out.append((f.stem, str(f), None))
        for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
            found = models_in(sub)
            projectors = sorted(sub.glob("mmproj*.gguf"))
            if len(found) == 1:
                out.append((sub.name, str(found[0]), str(projectors[0]) if projectors else None))
    for item in (args.models or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, ref = item.partition("=")
        if not sep or is_reference(item):
            name, ref = "", item
        path = str(resolve(ref, progress=True, offline=True if args.offline else None)) if is_reference(ref) else ref
        if not os.path.isfile(path):
            raise ValueError(f"--models: no such model file: {ref}")
        out.append((name or Path(path).stem, path, None))
    if getattr(args, "models_store", False):  # every model the store holds, by its reference
        from ..store import list_models

        taken = {name for name, _, _ in out}
        for cached in list_models():
            if cached.ref not in taken and not any(os.path.samefile(p, cached.path) for _, p, _ in out):
                out.append((cached.ref, str(cached.path), str(cached.mmproj) if cached.mmproj else None))
    if not out and need_some:
        raise ValueError("no models to serve (--models-dir holds no GGUF files, --models names none)")
    return out


@dataclass
class Routed:
    """One model of the router: its name, file, projector, options and what its preset says of it."""

    name: str
    path: str
    mmproj: str | None
    args: argparse.Namespace
    aliases: list[str] = field(default_factory=list)
    load_on_startup: bool = False
    stop_timeout: float = 10.0
    settings: _Settings | None = None


def _model_file(ref: str, offline: bool, where: str) -> str:
    """A preset's model: a file (relative to the working directory) or a store reference (hf:org/repo:Q, a URL)."""
    from ..store import is_reference, resolve

    if is_reference(ref):
        return str(resolve(ref, progress=True, offline=True if offline else None))
    if not os.path.isfile(ref):
        raise ValueError(f"{where}: no such model file: {ref}")
    return ref


def router_specs(args: argparse.Namespace, raw: argparse.Namespace, found: list[tuple[str, str, str | None]],
                 need_some: bool = True) -> tuple[list[Routed], Callable[[str, str, str | None], Routed]]:
    """Each routed model with its options: --models-dir's and --models' models, and --models-preset's
    sections over them (its new models added), merged as llama-server merges them: the command line over the
    model's section over [*]; and the maker of a model added while the server runs (a pull: the command
    line over [*])."""
    from ..speculative import NGRAM_TYPES
    from . import presets

    if args.models_preset is None:
        return [Routed(name, p, proj, args) for name, p, proj in found], lambda name, p, proj: Routed(name, p, proj, args)
    preset = presets.load(Path(args.models_preset), presets.probe_parser(serve_parser()))
    for part in (preset.everywhere, *preset.models.values()):
        for flag, value, reason, later in part.notes:
            shown = f"{flag} {value}" if value is not None else flag
            log.log(logging.WARNING if later else logging.INFO, "%s [%s]: %s %s (%s): ignored", preset.path, part.name,
                    shown, "is not supported yet" if later else "changes nothing here", reason)
    given = presets.explicit(getattr(args, "serve_argv", None) or [], presets.probe_parser(serve_parser()))
    defaults = serve_parser()
    models: dict[str, tuple[str, str | None]] = {name: (p, proj) for name, p, proj in found}
    for name, section in preset.models.items():
        where = f"{preset.path}: [{name}]"
        ref = section.model_ref(where)
        if ref is None and name not in models:
            raise presets.PresetError(
                f"{where} is not a model this server serves ({', '.join(models) or 'none'}) and gives no "
                "`model = FILE` (or hf-repo) to define one")
        if ref is not None:
            models[name] = (_model_file(ref, args.offline, where), None)
    def spec(name: str, p: str, proj: str | None) -> Routed:
        sec = preset.models.get(name)
        layers = [preset.everywhere] + ([sec] if sec is not None else [])
        a, applied = presets.merged(raw, given, layers, defaults.get_default)
        for dest in presets.MODEL_DESTS + ("alias",):
            setattr(a, dest, None)
        problem = _llama_server_args(a)
        if problem is None and a.draft is not None and a.draft not in ("ngram", *NGRAM_TYPES):
            problem = f"--draft must be ngram or one of {', '.join(NGRAM_TYPES)}"
        if problem is not None:
            raise presets.PresetError(f"{preset.path}: model `{name}`: {problem}")
        _log_notes(a)
        if getattr(a, "no_mmproj", False):
            proj = a.mmproj = None
        elif a.mmproj is not None:
            proj = a.mmproj
        load = [s.load_on_startup for s in layers if s.load_on_startup is not None]
        stop = [s.stop_timeout for s in layers if s.stop_timeout is not None]
        if applied:
            log.info("model %s: from %s: %s", name, preset.path.name, ", ".join(applied))
        return Routed(name, p, proj, a, sec.aliases if sec is not None else [],
                      bool(load and load[-1]), float(stop[-1]) if stop else float(presets.DEFAULT_STOP_TIMEOUT))

    out = [spec(name, p, proj) for name, (p, proj) in models.items()]
    if not out and need_some:
        raise ValueError("no models to serve (--models-dir holds no GGUF files, --models and --models-preset "
                         "name none)")
    return out, spec


__all__ = ["Routed", "router_models", "router_specs"]
