"""One resumable, verified download into the cache.

Bytes land in ``<file>.part`` beside ``<file>.part.json`` (URL, expected size,
ETag, sha256), so a new process continues where a killed one stopped: it asks
for the rest with ``Range`` (and ``If-Range`` on a strong ETag) and accepts only
a ``206`` whose ``Content-Range`` starts at its offset; a ``200`` means the
server ignored the range or the file changed, and the body is taken from byte
zero. The sha256 is computed while the bytes arrive (the partial bytes are
hashed again on resume) and checked before the verified file is renamed into
place, so the final path never holds partial or unverified data. A lock file
keeps two processes from writing the same partial; the second waits and then
finds the file done.

The HTTP client is httpx rather than urllib3: per-phase timeouts (the read
timeout is the stall detector), ``client.stream()`` with plain ``Range``
headers, one pooled client per pull that follows the Hub's redirects (and drops
the token on a redirect to another host), and exceptions by family (timeouts,
network errors, protocol errors: exactly what is worth a retry). It is imported
inside functions only, so ``import pyllama`` stays fast.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .._version import __version__
from . import cache
from .errors import ChecksumError, DownloadError, InsufficientSpaceError, ModelNotFoundError, StoreError
from .progress import Meter

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("pyllama.store")

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """What to fetch, where it goes, and what it must be."""

    url: str
    dest: Path
    size: int | None = None  #: from the repository's metadata; None: learnt from the response
    sha256: str | None = None  #: published or given; None: only the size is checked
    headers: Mapping[str, str] = field(default_factory=dict)  #: e.g. the token, for this host only
    record: Mapping[str, Any] = field(default_factory=dict)  #: source facts for the cache record
    token_hint: bool = False  #: say "set HF_TOKEN" when access is refused
    #: the URL names fixed bytes (a Hub file at a commit, with its sha256): resume without ETag checks,
    #: since a CDN's ETag may differ between its nodes and the sha256 settles it anyway
    immutable: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of dropped connections, stalls (read timeouts) and 5xx answers, with exponential backoff."""

    retries: int = 5  #: consecutive failures without progress before giving up
    backoff: float = 0.5  #: first wait in seconds, doubled each time (jittered)
    max_backoff: float = 10.0
    #: the longest ``Retry-After`` (429, 503) waited out; a server asking for more is an error at once
    max_retry_after: float = 60.0

    def wait(self, failures: int, retry_after: float | None = None) -> None:
        backoff = min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
        time.sleep(backoff if retry_after is None else max(retry_after, backoff))


def new_client(read_timeout: float) -> httpx.Client:
    """One client per pull: explicit timeouts (the read timeout is the stall detector), redirects followed."""
    import httpx

    timeout = httpx.Timeout(connect=15.0, read=read_timeout, write=15.0, pool=15.0)
    # identity: byte offsets must be offsets into the file, not into a compressed stream
    return httpx.Client(timeout=timeout, follow_redirects=True,
                        headers={"User-Agent": f"pyllama/{__version__}", "Accept-Encoding": "identity"})


class _Retry(Exception):
    """A transient failure: wait (at least ``retry_after`` seconds when the server said so), then continue
    from the current offset."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after(resp: httpx.Response, policy: RetryPolicy) -> float | None:
    """The wait a 429/503 asks for (``Retry-After``: seconds or an HTTP date); a DownloadError when it is
    longer than the policy waits out."""
    value = resp.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None  # unreadable: the usual backoff
    seconds = max(0.0, seconds)
    if seconds > policy.max_retry_after:
        raise DownloadError(f"{resp.request.url}: HTTP {resp.status_code}, the server asks to retry after "
                            f"{seconds:.0f} s (more than {policy.max_retry_after:.0f} s); try again later")
    return seconds


def _redirect_loop(url: str, exc: BaseException) -> DownloadError:
    return DownloadError(f"{url}: too many redirects (a redirect loop?): {exc}")


def _transient() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def request(client: httpx.Client, url: str, *, headers: Mapping[str, str], policy: RetryPolicy,
            params: Mapping[str, str] | None = None) -> httpx.Response:
    """A small GET (metadata, checksums) with the same retries as downloads; the body is read."""
    import httpx

    failures = 0
    while True:
        wait: float | None = None
        try:
            resp = client.get(url, headers=dict(headers), params=params)
            if resp.status_code not in _RETRY_STATUS:
                return resp
            reason = f"HTTP {resp.status_code}"
            wait = retry_after(resp, policy)
        except httpx.TooManyRedirects as exc:
            raise _redirect_loop(url, exc) from None
        except _transient() as exc:
            reason = f"{type(exc).__name__}: {exc}"
        failures += 1
        if failures > policy.retries:
            raise DownloadError(f"GET {url} failed after {policy.retries} retries: {reason}") from None
        log.info("GET %s: %s; retrying", url, reason)
        policy.wait(failures, wait)


def http_error(resp: httpx.Response, *, token_hint: bool) -> StoreError:
    """The exception for an HTTP error status (4xx/5xx that retries did not cure)."""
    status, url = resp.status_code, str(resp.request.url)
    if status in (401, 403):
        hint = " (set HF_TOKEN to a token that may read this repository, and accept its licence)" if token_hint else ""
        return DownloadError(f"{url}: HTTP {status}, access denied{hint}")
    if status == 404:
        return ModelNotFoundError(f"{url}: HTTP 404, not found")
    return DownloadError(f"{url}: HTTP {status}")


def is_cached(rf: RemoteFile) -> bool:
    """The destination holds a verified copy of this file."""
    record = cache.read_record(rf.dest)
    return (record is not None and (rf.size is None or record["size"] == rf.size)
            and (rf.sha256 is None or record.get("sha256") == rf.sha256))


def partial_size(rf: RemoteFile) -> int:
    try:
        return rf.dest.with_name(rf.dest.name + ".part").stat().st_size
    except OSError:
        return 0


def check_space(directory: Path, needed: int) -> None:
    free = cache.free_space(directory)
    if needed > free:
        raise InsufficientSpaceError(
            f"not enough free disk space in {directory}: {needed / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free (set PYLLAMA_CACHE to a larger disk)")


def fetch(client: httpx.Client, rf: RemoteFile, meter: Meter, policy: RetryPolicy) -> None:
    """Download ``rf`` into the cache (or find it there), reporting to ``meter``."""
    from filelock import FileLock, Timeout

    rf.dest.parent.mkdir(parents=True, exist_ok=True)
    if not is_cached(rf):
        # The lock file stays behind: deleting it would let a third process lock a new file
        # while a second still waits on the old one.
        lock = FileLock(str(rf.dest) + ".lock")
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.info("%s: another process is downloading it; waiting", rf.dest.name)
            lock.acquire()
        try:
            if not is_cached(rf):  # another process may have finished it while we waited
                _Transfer(client, rf, meter, policy).run()
                return
        finally:
            lock.release()
    size = rf.dest.stat().st_size
    if rf.size is None:
        meter.add_total(size)
    meter.start_file(rf.dest.name, size)


class _Transfer:
    def __init__(self, client: httpx.Client, rf: RemoteFile, meter: Meter, policy: RetryPolicy) -> None:
        self.client, self.rf, self.meter, self.policy = client, rf, meter, policy
        self.part = rf.dest.with_name(rf.dest.name + ".part")
        self.state = rf.dest.with_name(rf.dest.name + ".part.json")
        self.size = rf.size
        self.etag: str | None = None
        self.offset = 0
        self.hasher = hashlib.sha256()

    def run(self) -> None:
        self._load()
        self.meter.start_file(self.rf.dest.name, self.offset)
        if self.size is not None:
            check_space(self.part.parent, self.size - self.offset)
        failures = 0
        while self.size is None or self.offset < self.size:
            before = self.offset
            try:
                if self._attempt():
                    break
            except _Retry as exc:
                failures = 1 if self.offset > before else failures + 1
                if failures > self.policy.retries:
                    raise DownloadError(f"downloading {self.rf.url} failed after {self.policy.retries} retries "
                                        f"({exc}); {self.offset} bytes are kept for a later resume") from None
                log.info("%s: %s; retrying from byte %d", self.rf.dest.name, exc, self.offset)
                self.policy.wait(failures, exc.retry_after)
        self._finish()

    def _load(self) -> None:
        """Continue a partial download when its state record says it is the same file."""
        try:
            state = json.loads(self.state.read_text())
            offset = self.part.stat().st_size
        except (OSError, ValueError):
            state, offset = None, 0
        rf = self.rf
        if not isinstance(state, dict):
            state = {}
        known = state.get("size") if isinstance(state.get("size"), int) else None
        same = (state.get("url") == rf.url and (rf.size is None or known in (None, rf.size))
                and (rf.sha256 is None or state.get("sha256") in (None, rf.sha256))
                and 0 < offset <= (rf.size or known or offset))
        if not same:
            self.part.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
            return
        if self.size is None and known is not None:
            self.size = known
            self.meter.add_total(known)
        self.etag = state.get("etag")
        with open(self.part, "rb") as f:  # hashlib keeps no resumable state: hash what is there again
            while block := f.read(_HASH_BLOCK):
                self.hasher.update(block)
        self.offset = offset
        log.info("%s: resuming at byte %d", self.rf.dest.name, offset)

    def _reset(self) -> None:
        self.meter.rewind(self.offset)
        self.offset = 0
        self.etag = None
        self.hasher = hashlib.sha256()
        with open(self.part, "wb"):
            pass

    def _save_state(self) -> None:
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps({"url": self.rf.url, "size": self.size, "etag": self.etag,
                                   "sha256": self.rf.sha256, "format": 1}))
        os.replace(tmp, self.state)

    def _attempt(self) -> bool:
        """One request; True when the body ended cleanly with the size unknown beforehand."""
        headers = dict(self.rf.headers)
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
            if self.etag and not self.etag.startswith("W/") and not self.rf.immutable:  # needs a strong ETag
                headers["If-Range"] = self.etag
        import httpx

        try:
            with self.client.stream("GET", self.rf.url, headers=headers) as resp:
                if resp.status_code in _RETRY_STATUS:
                    raise _Retry(f"HTTP {resp.status_code}", retry_after(resp, self.policy))
                if resp.status_code == 416 and self.offset:
                    self._reset()
                    raise _Retry("HTTP 416 to the resume request; starting over")
                if resp.status_code >= 400:
                    raise http_error(resp, token_hint=self.rf.token_hint)
                self._accept(resp)
                self._save_state()
                with open(self.part, "ab", buffering=0) as f:
                    for chunk in resp.iter_raw():
                        if self.offset == 0:
                            self._check_start(resp, chunk)
                        self._write(f, chunk)
                        self.hasher.update(chunk)
                        self.offset += len(chunk)
                        self.meter.add(len(chunk))
                        if self.size is not None and self.offset > self.size:
                            self._reset()
                            raise DownloadError(f"{self.rf.url}: the server sent more than the {self.size} "
                                                "bytes it announced")
        except httpx.TooManyRedirects as exc:
            raise _redirect_loop(self.rf.url, exc) from None
        except _transient() as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if self.size is None:
            return True
        if self.offset < self.size:
            raise _Retry(f"connection closed at byte {self.offset} of {self.size}")
        return False

    def _write(self, f: Any, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:  # an unbuffered write may take part of the chunk (a disk filling up): write the rest
                view = view[f.write(view):]
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            kept = self.part.stat().st_size  # a prefix of the file: a resume hashes it again and continues
            raise DownloadError(f"{self.rf.dest.name}: the disk is full ({os.strerror(exc.errno)}) in "
                                f"{self.part.parent}; {kept} bytes are kept: free some space and pull again to "
                                "resume") from None

    def _check_start(self, resp: httpx.Response, chunk: bytes) -> None:
        """The first bytes of the file: an error page answered with 200 (a proxy's, a captive portal's) is
        not saved as the model."""
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        head = bytes(chunk[:64]).lstrip().lower()
        page = ctype in ("text/html", "application/xhtml+xml") or head.startswith((b"<!doctype html", b"<html"))
        not_gguf = self.rf.dest.suffix == ".gguf" and len(chunk) >= 4 and bytes(chunk[:4]) != b"GGUF"
        if page or not_gguf:
            self.part.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
            what = f"a web page ({ctype or 'HTML'})" if page else f"data that is not GGUF (it starts {bytes(chunk[:4])!r})"
            raise DownloadError(f"{self.rf.url}: the server answered HTTP {resp.status_code} with {what}, not the "
                                "file; nothing was kept")

    def _accept(self, resp: httpx.Response) -> None:
        """Check the answer against the request; start over from zero when it is the whole file."""
        etag = resp.headers.get("etag")
        total: int | None = None
        if self.offset and resp.status_code == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            changed = not self.rf.immutable and self.etag and etag and etag != self.etag
            if (m is None or int(m[1]) != self.offset or changed
                    or (self.size is not None and m[3] != "*" and int(m[3]) != self.size)):
                self._reset()
                raise _Retry(f"the server answered the resume with {resp.headers.get('content-range')!r} "
                             f"(ETag {etag}); starting over")
            total = int(m[3]) if m[3] != "*" else None
        elif resp.status_code == 200:
            if self.offset:
                log.info("%s: the server sent the whole file (Range ignored or file changed); starting over",
                         self.rf.dest.name)
                self._reset()
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{self.rf.url}: unexpected HTTP {resp.status_code}")
        self.etag = etag
        if total is None:
            return
        if self.size is None:
            self.size = total
            self.meter.add_total(total)
            check_space(self.part.parent, total - self.offset)
        elif total != self.size:
            raise DownloadError(f"{self.rf.url}: the server sends {total} bytes, the repository says {self.size}")

    def _finish(self) -> None:
        actual = self.hasher.hexdigest()
        expected = self.rf.sha256
        if expected is not None and actual != expected:
            self.part.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
            raise ChecksumError(f"{self.rf.dest.name}: sha256 mismatch (expected {expected}, got {actual}); "
                                "the downloaded data was deleted", expected=expected, actual=actual)
        with open(self.part, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        cache.write_record(self.rf.dest, {**self.rf.record, "url": self.rf.url, "size": self.offset,
                                          "sha256": actual, "verified": expected is not None,
                                          "etag": self.etag, "time": time.time()})
        os.replace(self.part, self.rf.dest)
        self.state.unlink(missing_ok=True)
        if expected is None:
            log.warning("%s: no published sha256; only the size was checked", self.rf.dest.name)


__all__ = ["RemoteFile", "RetryPolicy", "new_client", "request", "http_error", "fetch", "is_cached",
           "partial_size", "check_space"]
