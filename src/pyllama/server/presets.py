"""llama-server's ``--models-preset FILE``: an INI file of per-model options for the router.

The file's format and meanings are llama.cpp's (common/preset.cpp, tools/server/README.md "Model presets")::

    version = 1

    [*]                      ; every model's options
    c = 8192
    n-gpu-layers = 8

    [a]                      ; a model the router already serves: its options
    chat-template = chatml
    np = 2

    [custom]                 ; a new model: `model =` (a file, or a store reference such as hf:org/repo:Q4_K_M)
    model = /models/custom-Q4_K_M.gguf
    load-on-startup = true

A key is one of ``pyllama serve``'s flags without its dashes (``ctx-size``), a short form (``c``, ``ngl``) or
llama-server's environment name of the flag (``LLAMA_ARG_CTX_SIZE``). Its value is parsed by the very parser
of ``pyllama serve`` (:func:`.cli.serve_parser`), so a preset takes exactly what the command line takes; a
switch takes ``true``/``false`` (``on``/``off``, ``1``/``0``; ``no-jinja = true`` is ``jinja = false``). A model's
options are the server's command line, over its section, over ``[*]``: a flag given on the command line wins.
Options that are the router's (host, port, API keys, TLS, CORS, the ``models-*`` flags) are ignored in a preset
with a log line, as llama-server removes or overwrites them; ``model``, ``mmproj`` and ``alias`` name one model
and are ignored in ``[*]``. Keys of presets alone: ``load-on-startup`` (load the model when the server starts),
``stop-timeout`` (seconds ``POST /models/unload`` waits for the model's requests before cancelling them; 10) and
``dedup-cache-models`` (accepted: the router lists no cache here). An unknown key or a value the flag refuses is
an error naming the file, the section and the key.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

log = logging.getLogger("pyllama.server")

#: llama.cpp's common_arg_utils::is_truthy / is_falsey
TRUTHY = ("on", "enabled", "true", "1")
FALSEY = ("off", "disabled", "false", "0")

#: seconds POST /models/unload waits for a model's requests before cancelling them (llama-server's default)
DEFAULT_STOP_TIMEOUT = 10

#: the options of the router itself: a preset's are ignored (llama-server removes or overwrites them)
ROUTER_DESTS = frozenset({
    "host", "port", "api_key", "api_key_file", "ssl_key_file", "ssl_cert_file", "models_dir", "models", "models_max",
    "models_autoload", "memory_budget", "models_preset", "cors_origins", "cors_methods", "cors_headers",
    "cors_credentials", "no_cors", "header_timeout", "shutdown_timeout", "isolate", "offline",
})
#: what names the model of a section (its file); ignored in [*]
MODEL_DESTS = ("model", "model_flag", "hf_repo", "hf_file", "model_url")
#: the options of one model alone: ignored in [*]
ONE_MODEL_DESTS = frozenset({"mmproj", "alias"})
#: options that say one thing together: a layer setting one of them replaces what a lower layer set for the rest
GROUPS = (frozenset({"ctx_size", "ctx_slot"}), frozenset({"draft", "spec_type"}))

#: llama-server's environment names whose flag is not the name itself (LLAMA_ARG_CTX_SIZE is --ctx-size)
ENV_FLAGS = {
    "LLAMA_API_KEY": "--api-key", "LLAMA_ARG_BATCH": "--batch-size", "LLAMA_ARG_UBATCH": "--ubatch-size",
    "LLAMA_ARG_N_PARALLEL": "--parallel", "LLAMA_ARG_STATIC_PATH": "--path",
    "LLAMA_ARG_ENDPOINT_METRICS": "--metrics", "LLAMA_ARG_ENDPOINT_PROPS": "--props",
    "LLAMA_ARG_ENDPOINT_SLOTS": "--slots", "LLAMA_ARG_THINK": "--reasoning-format",
    "LLAMA_ARG_THINK_BUDGET": "--reasoning-budget",
}
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")


class PresetError(ValueError):
    """The preset file is malformed, or one of its keys or values is not an option's."""


@dataclass
class Section:
    """One section's options: ``values`` by the parser's destination (the flag's), each with its ``keys``."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    notes: list[tuple[str | None, str | None, str, bool]] = field(default_factory=list)
    load_on_startup: bool | None = None
    stop_timeout: int | None = None

    def model_ref(self, where: str) -> str | None:
        """The model the section names (``model``, ``hf-repo`` with ``hf-file``, ``model-url``), or None."""
        v = self.values
        hf = None
        if v.get("hf_file") and not v.get("hf_repo"):
            raise PresetError(f"{where}: hf-file needs hf-repo")
        if v.get("hf_repo"):
            repo = str(v["hf_repo"]).removeprefix("hf:")
            hf = f"hf:{repo.split(':', 1)[0]}/{v['hf_file']}" if v.get("hf_file") else f"hf:{repo}"
        given = [(key, ref) for key, ref in (("model", v.get("model_flag") or v.get("model")), ("hf-repo", hf),
                                              ("model-url", v.get("model_url"))) if ref]
        if len(given) > 1:
            raise PresetError(f"{where}: name the model once, not with {' and '.join(k for k, _ in given)}")
        return str(given[0][1]) if given else None

    @property
    def aliases(self) -> list[str]:
        return [a.strip() for a in str(self.values.get("alias") or "").split(",") if a.strip()]


@dataclass
class Preset:
    path: Path
    everywhere: Section  # [*]
    models: dict[str, Section]  # one section per model, in the file's order


def truthy(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in TRUTHY else False if v in FALSEY else None


def read_ini(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The sections of llama.cpp's INI dialect in order, each with its keys (a later value of a key wins; a
    section named again starts afresh, as llama.cpp reads it). Keys before the first section belong to the
    section ``default``. ``;`` and ``#`` start comments, also after a value."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PresetError(f"--models-preset: preset file does not exist: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"--models-preset: cannot read {path}: {exc}") from None
    sections: dict[str, dict[str, str]] = {}
    current = "default"
    header = re.compile(r"\[\s*([^\]]*?)\s*\]\s*(?:[;#].*)?")
    pair = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*(.*)")
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        m = header.fullmatch(stripped)
        if m:
            current = m.group(1)
            sections[current] = {}
            continue
        m = pair.fullmatch(stripped)
        if m is None:
            raise PresetError(f"{path}:{n}: not a section, a `key = value` line or a comment: {line.strip()!r}")
        sections.setdefault(current, {})[m.group(1)] = re.split(r"[;#]", m.group(2), maxsplit=1)[0].rstrip()
    return list(sections.items())


def canonical_name(name: str) -> str:
    """llama.cpp's canonical tag of a section name: ``org/repo:q4_k_m`` is ``org/repo:Q4_K_M``."""
    head, colon, tag = name.rpartition(":")
    if not colon or name == "*":
        return name
    m = re.search(r"[-.]([A-Za-z0-9_]+)$", tag)
    return f"{head}:{(m.group(1) if m else tag).upper()}"


def flag_of(key: str, parser: argparse.ArgumentParser) -> str | None:
    """The flag of ``parser`` an INI key names: ``--KEY``, ``-KEY``, or an environment name's flag."""
    options = parser._option_string_actions
    if key.startswith(("LLAMA_", "HF_")):
        flag = ENV_FLAGS.get(key)
        if flag is None and key.startswith("LLAMA_ARG_"):
            flag = "--" + key[len("LLAMA_ARG_"):].lower().replace("_", "-")
        return flag if flag in options else None
    for flag in (f"--{key}", f"-{key}"):
        if flag in options and options[flag].dest != "help":
            return flag
    return None


def _opposite(flag: str, parser: argparse.ArgumentParser) -> str | None:
    """A switch's negation (``--jinja`` / ``--no-jinja``, ``-kvu`` / ``-no-kvu``), if the parser has it."""
    dashes = "--" if flag.startswith("--") else "-"
    name = flag[len(dashes):]
    other = dashes + (name[3:] if name.startswith("no-") else "no-" + name)
    action = parser._option_string_actions.get(other)
    return other if action is not None and action.nargs in (0, "?") else None


def _argv(key: str, flag: str, value: str, parser: argparse.ArgumentParser,
          where: str) -> tuple[list[str], tuple[str, Any] | None]:
    """The command line a key means, or a (destination, value) to set where a switch has no negation."""
    action = parser._option_string_actions[flag]
    if action.nargs == 0 or action.nargs == "?":  # a switch (--slots alone is llama-server's switch)
        on = truthy(value)
        if on is None:
            if action.nargs == "?":
                return [flag, value], None
            raise PresetError(f"{where}: {key} is a switch: true or false, not {value!r}")
        if on:
            return [flag], None
        other = _opposite(flag, parser)
        if other is not None:
            return [other], None
        if isinstance(action, argparse._StoreTrueAction):
            return [], (action.dest, False)
        if isinstance(action, argparse._StoreFalseAction):
            return [], (action.dest, True)
        return [], None  # as llama.cpp: a switch without a negation, set false, is left out
    return [flag, value], None


def _section(name: str, items: dict[str, str], path: Path, probe: argparse.ArgumentParser) -> Section:
    sec = Section(name)
    appending = {a.dest for a in probe._actions if isinstance(a, argparse._AppendAction)}
    for key, value in items.items():
        where = f"{path}: [{name}] {key}"
        if key == "version":
            continue
        if key in PRESET_ONLY:
            if key == "load-on-startup":
                on = truthy(value)
                if on is None:
                    raise PresetError(f"{where}: true or false, not {value!r}")
                sec.load_on_startup = on
            elif key == "stop-timeout":
                try:
                    sec.stop_timeout = int(value)
                except ValueError:
                    raise PresetError(f"{where}: a whole number of seconds, not {value!r}") from None
            else:
                log.info("%s: ignored (the router lists no cached models)", where)
            continue
        flag = flag_of(key, probe)
        if flag is None:
            raise PresetError(f"{where}: not an option of pyllama serve (a flag without its dashes, e.g. ctx-size "
                              "or c, llama-server's LLAMA_ARG_* name, or load-on-startup / stop-timeout)")
        argv, direct = _argv(key, flag, value, probe, where)
        try:
            ns = probe.parse_args(argv)
        except _ProbeError as exc:
            raise PresetError(f"{where}: {exc}") from None
        got = {k: v for k, v in vars(ns).items() if k != "serve_argv"}
        if direct is not None:
            got[direct[0]] = direct[1]
        for dest, v in got.items():
            if dest == "llama_notes":
                sec.notes.extend(v)
            elif dest in appending and dest in sec.values:
                sec.values[dest] = [*sec.values[dest], *v]
            else:
                sec.values[dest] = v
            sec.keys[dest] = key
    return sec


class _ProbeError(Exception):
    pass


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ProbeError(message)

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        return []  # flags match exactly, as `pyllama serve` takes them


def probe_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` (a fresh one: it is changed) answering only what its arguments set: every default
    suppressed, flags matched exactly, and an error raised (not printed and exited)."""
    parser.__class__ = _Probe
    for a in parser._actions:
        if a.dest != "help":
            a.default = argparse.SUPPRESS
    parser._defaults.clear()
    return parser


def explicit(argv: Sequence[str], probe: argparse.ArgumentParser) -> set[str]:
    """The destinations a command line sets itself (exactly: parsed again with every default suppressed)."""
    try:
        ns = probe.parse_args(list(argv))
    except _ProbeError as exc:  # (the same parser took it before)
        raise PresetError(f"the command line, parsed again: {exc}") from None
    return {k for k in vars(ns) if k not in ("serve_argv", "llama_notes")}


def load(path: Path, probe: argparse.ArgumentParser) -> Preset:
    """Read and check the preset file (every key parsed by ``probe``: see :func:`probe_parser`)."""
    everywhere = Section("*")
    models: dict[str, Section] = {}
    for name, items in read_ini(path):
        name = canonical_name(name)
        sec = _section(name, items, path, probe)
        if name == "*":
            everywhere = sec
            for dest in [d for d in sec.values if d in MODEL_DESTS or d in ONE_MODEL_DESTS]:
                log.warning("%s: [*] %s names one model: ignored in [*]", path, sec.keys[dest])
                del sec.values[dest]
        elif name == "default" and not sec.values and sec.load_on_startup is None and sec.stop_timeout is None:
            continue  # only `version` before the first section
        else:
            models[name] = sec
    for sec in (everywhere, *models.values()):
        for dest in [d for d in sec.values if d in ROUTER_DESTS]:
            log.warning("%s: [%s] %s is controlled by the router: ignored (as llama-server, the router's own "
                        "options are removed or overwritten in a model's)", path, sec.name, sec.keys[dest])
            del sec.values[dest]
    return Preset(path, everywhere, models)


def merged(base: argparse.Namespace, given: Iterable[str], layers: Sequence[Section],
           default: Any) -> tuple[argparse.Namespace, list[str]]:
    """A model's options: ``base`` (the server's parsed command line, which set ``given`` itself) with each
    layer's values over it, lowest layer first, those the command line gave left as it gave them. Returns the
    options and the keys applied. ``default(dest)`` is a destination's default."""
    out = argparse.Namespace(**vars(base))
    out.llama_notes = []
    on_cli = set(given)
    applied: dict[str, str] = {}
    for layer in layers:
        for dest, value in layer.values.items():
            if dest in MODEL_DESTS:
                continue
            group = next((g for g in GROUPS if dest in g), frozenset({dest}))
            if group & on_cli:
                continue  # the command line said it
            for other in group - {dest}:
                if other not in layer.values:
                    setattr(out, other, default(other))
                    applied.pop(other, None)
            setattr(out, dest, value)
            applied[dest] = f"{layer.keys[dest]} ({'[*]' if layer.name == '*' else 'its section'})"
    return out, list(applied.values())


__all__ = ["Preset", "Section", "PresetError", "load", "merged", "explicit", "probe_parser", "flag_of",
           "read_ini", "canonical_name", "DEFAULT_STOP_TIMEOUT", "ENV_FLAGS"]
