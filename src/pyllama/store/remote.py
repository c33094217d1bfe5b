"""A remote GGUF's header, read with HTTP Range requests, and the quantisation of a repository that fits.

Only the header is fetched (metadata and tensor descriptions: a few hundred KiB to a few MiB of a
multi-GiB file), in growing ranges until llama.cpp's own GGUF parser accepts it. Laid into a sparse file
of the remote file's full size, the header is all llama.cpp's memory projection reads (it never touches
the weights), so :func:`fit_candidates` measures each candidate quantisation of a repository against this
machine — the devices llama.cpp sees, their free memory and the host's RAM, or a given budget — without
downloading any of them, and :func:`choose_quant` takes the largest that fits with a margin.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from . import download, hub
from .errors import DownloadError, ModelNotFoundError
from .refs import HfRef, available_quants, parse_reference, pick_gguf, split_parts

if TYPE_CHECKING:
    import httpx

    from ..fit import MemoryBudget

FIRST_RANGE = 256 << 10  # the first request; each next one asks for twice as much
MAX_HEADER = 256 << 20  # no GGUF header is this large (a 256k vocabulary's is a few MiB)
DEFAULT_MARGIN = 1 << 30  # memory left free on a device beside a model that "fits" (llama.cpp's --fit-target)

_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass
class RemoteHeader:
    """A remote GGUF's header: ``data`` (its first bytes, the whole header), the file's ``size``, and
    ``fetched``: the bytes the server sent for it."""

    url: str
    size: int
    data: bytes
    fetched: int
    meta: dict[str, Any] = field(default_factory=dict)


def _range(client: httpx.Client, url: str, headers: Mapping[str, str], n: int) -> tuple[bytes, int, int]:
    """The first ``n`` bytes of ``url``, the file's size, and the bytes received (a server that ignores Range
    sends the whole file: reading stops after ``n``)."""
    import httpx

    want = {**headers, "Range": f"bytes=0-{n - 1}"}
    try:
        with client.stream("GET", url, headers=want) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise download.http_error(resp, token_hint=True)
            size = None
            if resp.status_code == 206:
                m = _RANGE.match(resp.headers.get("content-range", ""))
                if m and m.group(3) != "*":
                    size = int(m.group(3))
            elif resp.headers.get("content-length", "").isdigit():
                size = int(resp.headers["content-length"])
            buf = bytearray()
            for chunk in resp.iter_bytes():
                buf += chunk
                if len(buf) >= n:
                    break
            received = len(buf)
    except httpx.TooManyRedirects as exc:
        raise DownloadError(f"{url}: too many redirects (a redirect loop?): {exc}") from None
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise DownloadError(f"GET {url}: {type(exc).__name__}: {exc}") from None
    if size is None:
        raise DownloadError(f"{url}: the server does not say how large the file is (no Content-Range/Length)")
    return bytes(buf[:n]), size, received


def _parse(data: bytes) -> dict[str, Any] | None:
    """llama.cpp's GGUF parser on ``data`` (metadata only): the facts the choice needs, or None while the
    header is not complete."""
    from ..gguf_check import header_facts

    with tempfile.TemporaryDirectory(prefix="pyllama-header-") as tmp:
        part = Path(tmp) / "head.gguf"
        part.write_bytes(data)
        return header_facts(part)


def read_header(url: str, *, headers: Mapping[str, str] | None = None, client: httpx.Client | None = None,
                first: int = FIRST_RANGE) -> RemoteHeader:
    """The header of the GGUF at ``url``, in Range requests of growing size (the weights are never fetched)."""
    own = client is None
    c = client if client is not None else download.new_client(30.0)
    try:
        n, fetched = first, 0
        while True:
            data, size, received = _range(c, url, headers or {}, n)
            fetched += received
            if data[:4] != b"GGUF":
                raise DownloadError(f"{url}: not a GGUF file")
            meta = _parse(data)
            if meta is not None:
                return RemoteHeader(url, size, data[: meta["data_offset"]], fetched, meta)
            if len(data) >= size or n >= MAX_HEADER:
                raise DownloadError(f"{url}: llama.cpp's GGUF parser does not accept its header")
            n = min(n * 2, MAX_HEADER)
    finally:
        if own:
            c.close()


def header_of(ref: str) -> RemoteHeader:
    """The header of the GGUF a reference names (``hf:org/repo[:QUANT]``, ``hf:org/repo/file.gguf``, or an
    ``http(s)://`` URL), without downloading it."""
    from .refs import DEFAULT_QUANT, UrlRef

    parsed = parse_reference(ref)
    with download.new_client(30.0) as client:
        if isinstance(parsed, UrlRef):
            return read_header(parsed.url, client=client)
        snap = hub.snapshot(client, parsed, download.RetryPolicy())
        path = parsed.path or pick_gguf(sorted(snap.files), parsed.quant)
        if path is None or path not in snap.files:
            quants = ", ".join(available_quants(sorted(snap.files))) or "none"
            raise ModelNotFoundError(f"{parsed.repo}: no GGUF file for {parsed.path or parsed.quant or DEFAULT_QUANT}; "
                                     f"available: {quants}")
        url = hub.file_url(parsed.repo, snap.commit, path)
        return read_header(url, headers=hub.auth_headers(url), client=client)


def sparse_copy(header: RemoteHeader, directory: str | os.PathLike[str], name: str = "model.gguf") -> Path:
    """``header`` as a file of the remote file's full size (the rest a hole: nothing is written there)."""
    path = Path(directory) / name
    with path.open("wb") as f:
        f.write(header.data)
        f.truncate(header.size)
    return path


@dataclass(frozen=True)
class Candidate:
    """One quantisation of a repository, measured: ``host``/``gpu`` bytes needed at the context asked for,
    ``fits`` against the budget, ``reason`` when it does not, ``fetched`` the header bytes it cost."""

    quant: str
    path: str
    size: int
    host: int
    gpu: int
    fits: bool
    reason: str
    fetched: int


def _measure(path: Path, size: int, n_ctx: int, budget: MemoryBudget, margin: int) -> tuple[int, int, bool, str]:
    """(host bytes, accelerator bytes, fits, reason) of the model at ``path`` with every layer on the
    accelerators when there are some, else on the CPU (weights there are the file, mapped)."""
    from ..fit import HOST, model_need

    need = model_need(path, n_ctx=n_ctx, file_size=size)
    host = need.get(HOST, 0)
    reason = budget.shortfall(need, margin=margin)
    return host, sum(need.values()) - host, reason is None, reason or ""


def fit_candidates(ref: str | HfRef, *, n_ctx: int = 4096, budget: MemoryBudget | int | None = None,
                   margin: int = DEFAULT_MARGIN) -> list[Candidate]:
    """Every quantisation of a Hugging Face repository (``hf:org/repo``), measured from its header alone
    against this machine's free memory, ``margin`` kept on each device, or against ``budget`` (bytes in
    all, or a :class:`~pyllama.fit.MemoryBudget` per device), largest file first."""
    from ..fit import MemoryBudget

    budget = MemoryBudget.of(budget)
    parsed = parse_reference(ref) if isinstance(ref, str) else ref
    if not isinstance(parsed, HfRef):
        raise ValueError("choosing a quantisation needs a Hugging Face repository (hf:org/repo)")
    policy = download.RetryPolicy()
    out: list[Candidate] = []
    with download.new_client(30.0) as client:
        snap = hub.snapshot(client, HfRef(parsed.repo, revision=parsed.revision), policy)
        paths = sorted(snap.files)
        for quant in available_quants(paths):
            path = pick_gguf(paths, quant)
            if path is None:
                continue
            parts = split_parts(path) or [path]
            size = sum(snap.files[p].size or 0 for p in parts if p in snap.files)
            header = read_header(hub.file_url(parsed.repo, snap.commit, path),
                                 headers=hub.auth_headers(hub.file_url(parsed.repo, snap.commit, path)), client=client)
            with tempfile.TemporaryDirectory(prefix="pyllama-fit-") as tmp:
                if len(parts) > 1:  # a split set: the projection reads the first part, which holds the metadata
                    size = header.size
                host, gpu, fits, reason = _measure(sparse_copy(header, tmp), size, n_ctx, budget, margin)
            out.append(Candidate(quant, path, size, host, gpu, fits, reason, header.fetched))
    if not out:
        raise ModelNotFoundError(f"{parsed.repo}: no GGUF files to choose from")
    return sorted(out, key=lambda c: -c.size)


def choose_quant(candidates: list[Candidate]) -> Candidate | None:
    """The largest candidate that fits (None: none does)."""
    return next((c for c in candidates if c.fits), None)


__all__ = ["RemoteHeader", "Candidate", "read_header", "header_of", "sparse_copy", "fit_candidates", "choose_quant",
           "FIRST_RANGE", "DEFAULT_MARGIN"]
