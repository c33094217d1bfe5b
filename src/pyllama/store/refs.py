"""Model references: ``hf:org/repo[:QUANT][@rev]``, ``hf:org/repo/path/file.gguf[@rev]``, ``https://...``.

Pure parsing and name matching (no I/O), shared by the downloader and the cache lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeGuard, Union
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .errors import InvalidReferenceError

DEFAULT_QUANT = "Q4_K_M"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# Quantisation tags as they appear in GGUF file names (for "available: ..." messages).
_QUANT_TAG = re.compile(
    r"(?:^|[-._/])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|F32|MXFP4(?:_MOE)?))(?=$|[-./])", re.IGNORECASE)


@dataclass(frozen=True)
class HfRef:
    """A file (``path``) or a quantisation (``quant``) of a Hugging Face model repository."""

    repo: str
    path: str | None = None
    quant: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        text = f"hf:{self.repo}"
        if self.path:
            text += f"/{self.path}"
        elif self.quant:
            text += f":{self.quant}"
        return text + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class UrlRef:
    """A file at a plain ``http://`` or ``https://`` URL."""

    url: str

    @property
    def filename(self) -> str:
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])

    def __str__(self) -> str:
        return self.url


Reference = Union[HfRef, UrlRef]


def is_reference(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a model reference rather than a local path."""
    if not isinstance(value, str):
        return False
    low = value[:8].lower()
    return low.startswith(("hf:", "http://", "https://"))


def parse_reference(text: str) -> Reference:
    """Parse a reference; raises :class:`InvalidReferenceError` with the accepted forms."""
    if not is_reference(text):
        raise InvalidReferenceError(
            f"not a model reference: {text!r} (use hf:org/repo:QUANT, hf:org/repo/file.gguf[@revision] "
            "or an http(s):// URL)")
    if text[:3].lower() != "hf:":
        parts = urlsplit(text)
        if not parts.netloc or not parts.path.rstrip("/") or parts.path.endswith("/"):
            raise InvalidReferenceError(f"a URL reference must name a file: {text!r}")
        return UrlRef(text)
    body = text[3:]
    revision: str | None = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision or ".." in revision or revision.startswith("/") or revision.endswith("/"):
            raise InvalidReferenceError(f"bad revision in {text!r}")
    segments = body.split("/")
    if len(segments) < 2:
        raise InvalidReferenceError(f"expected hf:org/repo[:QUANT] or hf:org/repo/path/file.gguf, not {text!r}")
    org, name = segments[0], segments[1]
    quant: str | None = None
    path: str | None = None
    if len(segments) == 2 and ":" in name:
        name, quant = name.split(":", 1)
        if not _QUANT.match(quant):
            raise InvalidReferenceError(f"bad quantisation {quant!r} in {text!r}")
    elif len(segments) > 2:
        path = "/".join(segments[2:])
        if any(s in ("", ".", "..") for s in segments[2:]) or ":" in path:
            raise InvalidReferenceError(f"bad file path {path!r} in {text!r}")
    if not (_NAME.match(org) and _NAME.match(name)):
        raise InvalidReferenceError(f"bad repository id {org}/{name!r} in {text!r}")
    return HfRef(repo=f"{org}/{name}", path=path, quant=quant, revision=revision)


def is_commit(revision: str | None) -> bool:
    """A full 40-hex commit id (immutable), as opposed to a branch or tag."""
    return revision is not None and _COMMIT.match(revision) is not None


def split_parts(path: str) -> list[str] | None:
    """All parts of a split GGUF (``name-00001-of-00003.gguf``) given any of them; None if not split."""
    head, _, base = path.rpartition("/")
    m = _SPLIT.match(base)
    if m is None:
        return None
    count = int(m["count"])
    if count < 1 or not 1 <= int(m["index"]) <= count:
        return None
    ext = base[-5:]  # keep the case of ".gguf"
    names = [f"{m['prefix']}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]
    return [f"{head}/{n}" if head else n for n in names]


def sibling_url(url: str, filename: str) -> str:
    """``url`` with its file name replaced (the query, if any, kept): the other parts of a split set."""
    parts = urlsplit(url)
    head = parts.path.rsplit("/", 1)[0]
    return urlunsplit(parts._replace(path=f"{head}/{quote(filename)}"))


def _is_model_gguf(path: str) -> bool:
    base = path.rsplit("/", 1)[-1].lower()
    if not base.endswith(".gguf") or "mmproj" in base:
        return False
    m = _SPLIT.match(base)
    return m is None or int(m["index"]) == 1


def matches_quant(path: str, quant: str) -> bool:
    """Whether a GGUF path carries the quantisation tag (in its file name or a folder name).

    The tag must stand alone: ``Q4_K`` does not match ``model-Q4_K_M.gguf``, ``Q4_0`` does not match ``IQ4_0``.
    """
    base = path.rsplit("/", 1)[-1]
    m = _SPLIT.match(base)
    stem = m["prefix"] if m else base[:-5] if base.lower().endswith(".gguf") else base
    pattern = re.compile(rf"(?:^|[-._]){re.escape(quant)}(?:$|[-.])", re.IGNORECASE)
    folders = path.split("/")[:-1]
    return bool(pattern.search(stem)) or any(f.lower() == quant.lower() for f in folders)


def pick_gguf(paths: list[str], quant: str | None) -> str | None:
    """The model GGUF (first part of a split set) for ``quant``; without one, Q4_K_M or the only GGUF."""
    models = [p for p in paths if _is_model_gguf(p)]
    if quant is None:
        found = [p for p in models if matches_quant(p, DEFAULT_QUANT)]
        if not found and len(models) == 1:
            found = models
    else:
        found = [p for p in models if matches_quant(p, quant)]
    if not found:
        return None
    return min(found, key=lambda p: (p.count("/"), len(p), p))


_SPLIT_STEM = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


def quant_bits(path: str) -> int:
    """The bits of a GGUF path's quantisation tag (``Q4_K_M`` -> 4, ``F16`` -> 16, none -> 0), as llama.cpp
    reads them (common/download.cpp ``extract_quant_bits``: the number in the last ``-``/``.`` tag of the
    name, a split set's ``-0000N-of-0000M`` left out)."""
    if not path.endswith(".gguf"):
        return 0
    stem = path[:-5]
    m = _SPLIT_STEM.match(stem)
    if m is not None:
        stem = m[1]
    tag = _TAG.search(stem)
    digits = re.search(r"[0-9]+", tag[1]) if tag is not None else None
    return int(digits[0]) if digits is not None else 0


def pick_mmproj(paths: list[str], model: str) -> str | None:
    """The multimodal projector llama.cpp's ``-hf`` takes for the model file ``model`` among a repository's
    ``paths`` (in the listing's order), or None.

    llama.cpp's rule (common/download.cpp ``find_best_sibling`` with the keyword ``mmproj``, called by
    ``find_best_mmproj`` when ``common_download_get_hf_plan`` has chosen the model): a candidate is a
    ``.gguf`` path containing ``mmproj`` in the model's folder or a folder above it; the deepest folder
    wins, then the quantisation closest in bits to the model's (an F16 model takes an F16 projector, a
    Q8_0 model a Q8_0 one, a Q4_K_M model a Q4/Q5/Q8 one before F16), then the first listed.
    """
    model_bits = quant_bits(model)
    model_dir = model.split("/")[:-1]
    own = set(split_parts(model) or [model])  # a model in a folder named mmproj is not its own projector
    best: str | None = None
    best_depth = best_diff = 0
    for path in paths:
        if not path.endswith(".gguf") or "mmproj" not in path or path in own:
            continue
        sib_dir = path.split("/")[:-1]
        if len(sib_dir) > len(model_dir) or model_dir[:len(sib_dir)] != sib_dir:
            continue  # only the model's folder and the folders above it
        depth, diff = len(sib_dir), abs(quant_bits(path) - model_bits)
        if best is None or depth > best_depth or (depth == best_depth and diff < best_diff):
            best, best_depth, best_diff = path, depth, diff
    return best


def available_quants(paths: list[str]) -> list[str]:
    """The quantisation tags found among the model GGUFs, for error messages."""
    tags: dict[str, None] = {}
    for p in paths:
        if _is_model_gguf(p):
            for m in _QUANT_TAG.finditer(p):
                tags.setdefault(m.group(1).upper(), None)
    return sorted(tags)


__all__ = ["HfRef", "UrlRef", "Reference", "is_reference", "parse_reference", "is_commit", "split_parts", "sibling_url",
           "matches_quant", "pick_gguf", "pick_mmproj", "quant_bits", "available_quants", "DEFAULT_QUANT"]
