"""The Hugging Face Hub, as far as the store needs it: a repository's files at a commit, with sizes and sha256."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from .download import RetryPolicy, http_error, request
from .errors import DownloadError, ModelNotFoundError
from .refs import HfRef

if TYPE_CHECKING:
    import httpx

DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    """``$HF_ENDPOINT`` (a mirror or a test server) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    """``$HF_TOKEN`` (or the older ``$HUGGING_FACE_HUB_TOKEN``)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def auth_headers(url: str) -> dict[str, str]:
    """The token, only for URLs on the Hub's own host (httpx drops it on redirects to other hosts)."""
    tok = token()
    if tok and urlsplit(url).netloc == urlsplit(endpoint()).netloc:
        return {"Authorization": f"Bearer {tok}"}
    return {}


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    sha256: str | None  #: LFS files only (every GGUF); small git files have none


@dataclass(frozen=True)
class Snapshot:
    """A repository at a commit."""

    repo: str
    revision: str
    commit: str
    files: dict[str, RepoFile]


def snapshot(client: httpx.Client, ref: HfRef, policy: RetryPolicy) -> Snapshot:
    """The files of ``ref.repo`` at ``ref.revision`` (main by default), from ``/api/models/.../revision/...``."""
    revision = ref.revision or "main"
    base = endpoint()
    url = f"{base}/api/models/{ref.repo}/revision/{quote(revision, safe='')}"
    resp = request(client, url, headers=auth_headers(url), policy=policy, params={"blobs": "true"})
    if resp.status_code in (401, 404):
        # the Hub answers 401 for a private repository as for a missing one
        hint = " (or HF_TOKEN may not read it)" if token() else " (a private or gated repository needs HF_TOKEN)"
        raise ModelNotFoundError(f"{ref.repo}: repository or revision {revision!r} not found on {base}{hint}")
    if resp.status_code >= 400:
        raise http_error(resp, token_hint=True)
    try:
        data = resp.json()
        commit = str(data["sha"])
        files = {}
        for s in data.get("siblings") or []:
            lfs = s.get("lfs") or {}
            sha = lfs.get("sha256") or lfs.get("oid")
            size = lfs.get("size", s.get("size"))
            files[str(s["rfilename"])] = RepoFile(str(s["rfilename"]), int(size) if size is not None else None,
                                                 str(sha).lower() if sha else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise DownloadError(f"{url}: unexpected answer from the Hub ({exc})") from None
    return Snapshot(ref.repo, revision, commit, files)


def file_url(repo: str, commit: str, path: str) -> str:
    return f"{endpoint()}/{repo}/resolve/{commit}/{quote(path)}"


__all__ = ["endpoint", "token", "auth_headers", "RepoFile", "Snapshot", "snapshot", "file_url", "DEFAULT_ENDPOINT"]
