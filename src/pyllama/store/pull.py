"""The store's public operations: pull, resolve, list, remove."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..starter import CHAT_STARTER_DIST, STARTERS
from . import cache, download, hub
from .cache import CachedModel, PartialDownload
from .errors import ChecksumError, ModelNotFoundError, NotCachedError, StoreError
from .progress import Bar, DownloadProgress, Meter, ProgressArg
from .refs import (DEFAULT_QUANT, HfRef, Reference, UrlRef, available_quants, is_commit, is_reference,
                   parse_reference, pick_gguf, pick_mmproj, sibling_url, split_parts)

if TYPE_CHECKING:
    import httpx

_SHA256 = re.compile(r"\b([0-9a-fA-F]{64})\b")


def pull(ref: str, *, progress: ProgressArg = None, sha256: str | None = None, offline: bool | None = None,
         cache_dir: str | os.PathLike[str] | None = None, read_timeout: float = 30.0, retries: int = 5,
         mmproj: bool = True) -> Path:
    """Download a model into the cache (resuming a partial download) and return the path to load.

    ``ref`` is ``hf:org/repo:QUANT``, ``hf:org/repo/path/file.gguf[@revision]``, an ``http(s)://`` URL,
    or ``"starter"`` / ``"chat-starter"`` (the embedded models, from their installed packages);
    a split GGUF is fetched as a set and the first part returned. A Hugging Face reference asks the
    Hub for the revision's current commit; a URL already in the cache is not fetched again.
    ``sha256`` adds a checksum the file must match (Hugging Face publishes one for every GGUF; a URL
    may have ``<url>.sha256``). ``progress``: ``True`` for a bar on stderr, or a callable receiving
    :class:`DownloadProgress` (return ``False`` to cancel). Offline (``offline=True``,
    ``PYLLAMA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) only the cache is consulted.
    ``read_timeout`` is how long a stalled connection is waited for before a retry; ``retries`` is
    the number of consecutive failed attempts without progress tolerated.

    ``mmproj``: a Hugging Face repository's multimodal projector (a ``*mmproj*.gguf`` file, chosen
    as llama.cpp's ``-hf`` chooses it: :func:`pyllama.store.refs.pick_mmproj`) comes with the model,
    verified and resumable like it, and is recorded as the model's: :func:`projector_for` finds it.
    ``mmproj=False`` leaves it (llama.cpp's ``--no-mmproj``).
    """
    if ref in STARTERS:  # an embedded model: from its PyPI package, verified, offline
        return STARTERS[ref]()
    parsed = parse_reference(ref)
    root = cache.store_root(cache_dir)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hex digits, not {sha256!r}")
    expected = sha256.lower() if sha256 else None
    if cache.is_offline(offline):
        return _cached_or_raise(root, parsed, ref, offline)
    if isinstance(parsed, UrlRef):
        files = cache.lookup(root, parsed)
        if files is not None and (expected is None or (cache.read_record(files[0]) or {}).get("sha256") == expected):
            return files[0]  # a URL is taken to name fixed content: the cached copy is it
    policy = download.RetryPolicy(retries=retries)
    bar = Bar(f"pull {ref}") if progress is True else None
    callback: Callable[[DownloadProgress], object] | None = bar if bar is not None else (
        progress if callable(progress) else None)
    projector: download.RemoteFile | None = None
    try:
        with download.new_client(read_timeout) as client:
            if isinstance(parsed, HfRef):
                plan, snap = _plan_hf(client, parsed, root, expected, policy)
                projector = _plan_projector(parsed, snap, plan[0], root) if mmproj else None
            else:
                plan, snap = _plan_url(client, parsed, root, expected, policy), None
            _fetch_all(client, plan + ([projector] if projector is not None else []), root, callback, policy)
    finally:
        if bar is not None:
            bar.close()
    if projector is not None:
        cache.link_projector(plan[0].dest, str(projector.record["path"]))
    if snap is not None and not is_commit(snap.revision):
        _write_ref(root, snap)
    return plan[0].dest


def resolve(ref: str | os.PathLike[str], *, progress: ProgressArg = None, offline: bool | None = None,
            cache_dir: str | os.PathLike[str] | None = None, mmproj: bool = True) -> Path:
    """The local file for a model reference: the cache first, else :func:`pull` (with the repository's
    projector unless ``mmproj=False``). A path is returned as is."""
    if isinstance(ref, str) and ref in STARTERS:
        return pull(ref)
    if not is_reference(ref):
        return Path(ref)
    parsed = parse_reference(ref)
    root = cache.store_root(cache_dir)
    files = cache.lookup(root, parsed)
    if files is not None:
        return files[0]
    if cache.is_offline(offline):
        return _cached_or_raise(root, parsed, ref, offline)
    return pull(ref, progress=progress, offline=False, cache_dir=cache_dir, mmproj=mmproj)


def list_models(*, cache_dir: str | os.PathLike[str] | None = None) -> list[CachedModel]:
    """Every model in the cache (with the starters once assembled or verified), sorted by reference."""
    return cache.list_models(cache.store_root(cache_dir))


def list_partial(*, cache_dir: str | os.PathLike[str] | None = None) -> list[PartialDownload]:
    """Interrupted downloads waiting in the cache; pulling the same reference resumes them."""
    return cache.list_partial(cache.store_root(cache_dir))


def remove(ref: str, *, cache_dir: str | os.PathLike[str] | None = None) -> list[CachedModel]:
    """Delete a model from the cache (every cached revision unless ``@revision`` is given); returns what went.

    A model's projector goes with it (listed after the models) unless another cached model of the same
    commit still uses it. ``ref`` is a reference, a path inside the cache (a projector's path removes only
    the projector), or ``"starter"``. Raises :class:`NotCachedError` when nothing matches. The chat starter is not in the cache but in its package: ``pip uninstall``.
    """
    root = cache.store_root(cache_dir)
    target: Reference | str
    if ref == "chat-starter" or (not is_reference(ref) and cache.is_chat_starter(root, Path(ref))):
        raise StoreError(f"the chat starter lives in its installed package, not in the model cache: "
                         f"`pip uninstall {CHAT_STARTER_DIST}` removes it")
    if ref == "starter":
        target = ref
    elif is_reference(ref):
        target = parse_reference(ref)
    else:
        target = _ref_of_path(root, Path(ref))
    removed = cache.remove(root, target)
    if not removed:
        raise NotCachedError(f"{ref} is not in the model cache ({root})")
    return removed


def _ref_of_path(root: Path, path: Path) -> Reference | str:
    for entry in cache.list_models(root):
        if path.resolve() in {f.resolve() for f in entry.files}:
            return entry.ref if entry.ref in STARTERS else parse_reference(entry.ref)
        if entry.mmproj is not None and path.resolve() == entry.mmproj.resolve():  # a model's projector alone
            record = cache.read_record(entry.mmproj) or {}
            return HfRef(str(record["repo"]), path=str(record["path"]), revision=str(record["commit"]))
    raise NotCachedError(f"{path} is not a model in the cache ({root})")


def _cached_or_raise(root: Path, parsed: Reference, ref: str, offline: bool | None) -> Path:
    files = cache.lookup(root, parsed)
    if files is None:
        why = "offline=True" if offline else "PYLLAMA_OFFLINE or HF_HUB_OFFLINE is set"
        raise NotCachedError(f"{ref} is not in the model cache ({root}) and pyllama is offline ({why}); "
                             f"pull it while online: pyllama pull {ref}")
    return files[0]


def _plan_hf(client: httpx.Client, ref: HfRef, root: Path, sha256: str | None,
             policy: download.RetryPolicy) -> tuple[list[download.RemoteFile], hub.Snapshot]:
    snap = hub.snapshot(client, ref, policy)
    paths = sorted(snap.files)
    if ref.path is not None:
        if ref.path not in snap.files:
            raise ModelNotFoundError(f"{ref.repo}@{snap.revision} has no file {ref.path}")
        chosen = ref.path
    else:
        found = pick_gguf(paths, ref.quant)
        if found is None:
            quants = ", ".join(available_quants(paths)) or "none"
            raise ModelNotFoundError(f"{ref.repo}@{snap.revision} has no GGUF file for quantisation "
                                     f"{ref.quant or DEFAULT_QUANT}; available: {quants}")
        chosen = found
    parts = split_parts(chosen) or [chosen]
    missing = [p for p in parts if p not in snap.files]
    if missing:
        raise ModelNotFoundError(f"{ref.repo}@{snap.revision}: the split set of {chosen} lacks {', '.join(missing)}")
    if sha256 is not None and len(parts) > 1:
        raise ValueError(f"sha256= names one file, and {chosen} is a set of {len(parts)} "
                         "(the repository publishes the sha256 of each)")
    plan = []
    for p in parts:
        expected = snap.files[p].sha256
        if sha256 is not None:
            if expected is not None and expected != sha256:
                raise ChecksumError(f"the sha256 given ({sha256}) is not the one {ref.repo} publishes for {p} "
                                    f"({expected})", expected=expected, actual=sha256)
            expected = sha256
        plan.append(_hf_file(ref, snap, p, root, expected))
    return plan, snap


def _hf_file(ref: HfRef, snap: hub.Snapshot, path: str, root: Path, sha256: str | None) -> download.RemoteFile:
    """A file of the repository at the snapshot's commit, to fetch into the cache."""
    url = hub.file_url(ref.repo, snap.commit, path)
    return download.RemoteFile(
        url=url, dest=cache.hf_file(root, ref.repo, snap.commit, path), size=snap.files[path].size, sha256=sha256,
        headers=hub.auth_headers(url), token_hint=True, immutable=sha256 is not None,
        record={"kind": "hf", "repo": ref.repo, "path": path, "commit": snap.commit,
                "revision": snap.revision, "endpoint": hub.endpoint()})


def _plan_projector(ref: HfRef, snap: hub.Snapshot, model: download.RemoteFile,
                    root: Path) -> download.RemoteFile | None:
    """The repository's projector for the model (llama.cpp's choice), or None: none, or the file is one."""
    model_path = str(model.record["path"])
    if "mmproj" in model_path.rsplit("/", 1)[-1]:
        return None  # the file pulled is itself a projector
    chosen = pick_mmproj(list(snap.files), model_path)
    return _hf_file(ref, snap, chosen, root, snap.files[chosen].sha256) if chosen is not None else None


def _plan_url(client: httpx.Client, ref: UrlRef, root: Path, sha256: str | None,
              policy: download.RetryPolicy) -> list[download.RemoteFile]:
    names = split_parts(ref.filename) or [ref.filename]
    if sha256 is not None and len(names) > 1:
        raise ValueError(f"sha256= names one file, and {ref.filename} is part of a set of {len(names)}")
    directory = cache.url_dir(root, cache.first_url(ref.url))
    plan = []
    for name in names:
        url = ref.url if name == ref.filename else sibling_url(ref.url, name)
        rf = download.RemoteFile(url=url, dest=directory / name, headers=hub.auth_headers(url),
                                 record={"kind": "url"})
        if not download.is_cached(rf):
            rf = download.RemoteFile(url=url, dest=rf.dest, sha256=sha256 or _published_sha256(client, url, policy),
                                     headers=rf.headers, record=rf.record)
        plan.append(rf)
    return plan


def _published_sha256(client: httpx.Client, url: str, policy: download.RetryPolicy) -> str | None:
    """The checksum in ``<url>.sha256`` (``sha256sum`` format or a bare digest), when the server has one."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    side = urlunsplit(parts._replace(path=parts.path + ".sha256"))
    resp = download.request(client, side, headers=hub.auth_headers(side), policy=policy)
    if resp.status_code != 200 or len(resp.content) > 4096:
        return None
    m = _SHA256.search(resp.text)
    return m.group(1).lower() if m else None


def _fetch_all(client: httpx.Client, plan: list[download.RemoteFile], root: Path,
               callback: Callable[[DownloadProgress], object] | None, policy: download.RetryPolicy) -> None:
    todo = [rf for rf in plan if not download.is_cached(rf) and not _reuse(rf, root)]
    known = [rf.size for rf in plan if rf.size is not None]
    meter = Meter(callback, sum(known) if known else None)
    # The whole set must fit before the first byte moves (sizes unknown up front are checked per file).
    needed = sum((rf.size or 0) - download.partial_size(rf) for rf in todo)
    if todo:
        download.check_space(todo[0].dest.parent, needed)
    for rf in plan:
        download.fetch(client, rf, meter, policy)
    meter.finish()


def _reuse(rf: download.RemoteFile, root: Path) -> bool:
    """Hard-link an identical verified file of another commit of the same repository instead of downloading."""
    if rf.sha256 is None or rf.record.get("kind") != "hf":
        return False
    blob = cache.find_blob(root, str(rf.record["repo"]), rf.sha256)
    if blob is None or blob == rf.dest:
        return False
    rf.dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = rf.dest.with_name(f"{rf.dest.name}.{os.getpid()}.link")
    try:
        os.link(blob, tmp)
    except OSError:  # no hard links on this file system: download
        return False
    record = dict(cache.read_record(blob) or {})
    record.pop("mmproj", None)  # the other commit's projector: this pull records this commit's own
    record.update(rf.record, url=rf.url)
    cache.write_record(rf.dest, record)
    os.replace(tmp, rf.dest)
    return True


def _write_ref(root: Path, snap: hub.Snapshot) -> None:
    path = cache.refs_file(root, snap.repo, snap.revision)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(snap.commit + "\n")
    os.replace(tmp, path)


__all__ = ["pull", "resolve", "list_models", "list_partial", "remove"]
