"""A small real HTTP server for the model-store tests: Hugging Face-style paths, Range, ETags, faults.

Serves what the test wrote under ``root``:

- ``/{org}/{repo}/resolve/{revision}/{path}`` from ``root/repos/{org}/{repo}/{path}`` (revision: ``main``
  or the repository's commit), with ``X-Repo-Commit``, ``X-Linked-Size`` and ``X-Linked-Etag``;
- ``/api/models/{org}/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes and ``lfs.sha256``) and
  ``/api/models/{org}/{repo}/tree/{rev}`` (``lfs.oid``/``size``), the Hub's shapes;
- ``/files/{path}`` from ``root/files/{path}`` (plain URLs; ``x.sha256`` files are served like any other).

Every body honours ``Range: bytes=N-`` and ``bytes=N-M`` (and ``If-Range``) unless ``ignore_range``; the ETag is the
content's sha256 (plus ``etag_salt``). Switches, settable while it runs: ``ignore_range``,
``wrong_range`` (a 206 that starts at 0), ``drop_after``/``drops`` (close the connection after N body
bytes, for the next ``drops`` bodies), ``stall_after``/``stall_seconds``/``stalls``, ``corrupt_offset``
(flip one byte of every body), ``throttle`` (bytes, seconds per chunk), ``token`` (401 without it),
``api_sizes`` (sizes the API reports instead of the real ones). ``bytes_served`` counts body bytes per
URL path; ``requests`` logs (method, path, Range header, status).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class HFServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "repos").mkdir(parents=True, exist_ok=True)
        (root / "files").mkdir(parents=True, exist_ok=True)
        self.ignore_range = False
        self.wrong_range = False
        self.drop_after: int | None = None
        self.drops = 0
        self.stall_after: int | None = None
        self.stall_seconds = 0.0
        self.stalls = 0
        self.corrupt_offset: int | None = None
        self.throttle: tuple[int, float] | None = None
        self.busy: list[tuple[int, str | None]] = []  # the next requests answer (status, Retry-After)
        self.html_page = False  # files answer 200 with a web page (a proxy's or a captive portal's)
        self.redirect_loop = False  # files answer 302 to themselves
        self.token: str | None = None
        self.etag_salt = ""
        self.api_sizes: dict[str, int] = {}
        self.bytes_served: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.auth_seen: list[str | None] = []
        self.active = 0  # bodies being sent
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hf": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HFServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HFServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content --------------------------------------------------------------------------------
    def add_repo(self, repo: str, files: dict[str, bytes]) -> str:
        """Write a repository's files; returns its commit id."""
        base = self.root / "repos" / repo
        for path, data in files.items():
            target = base / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return self.commit(repo)

    def add_file(self, path: str, data: bytes, *, sha256_file: bool = False) -> str:
        """Write a plain file (and ``path.sha256`` in sha256sum format); returns its URL."""
        target = self.root / "files" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if sha256_file:
            target.with_name(target.name + ".sha256").write_text(
                f"{hashlib.sha256(data).hexdigest()}  {target.name}\n")
        return f"{self.url}/files/{path}"

    def repo_files(self, repo: str) -> dict[str, Path]:
        base = self.root / "repos" / repo
        return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}

    def commit(self, repo: str) -> str:
        h = hashlib.sha1(repo.encode())
        for path, p in self.repo_files(repo).items():
            h.update(path.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()

    def served(self, suffix: str = "") -> int:
        """Body bytes sent for the URL paths ending with ``suffix``."""
        with self._lock:
            return sum(n for p, n in self.bytes_served.items() if p.endswith(suffix))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no body is being sent (a killed client's connection has been noticed)."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.active, "the server is still sending"

    def range_requests(self, suffix: str = "") -> list[str | None]:
        """The Range headers of the requests for URL paths ending with ``suffix``."""
        with self._lock:
            return [r for _, p, r, _ in self.requests if urlsplit(p).path.endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    hf: HFServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._handle(body=True)

    def do_HEAD(self) -> None:
        self._handle(body=False)

    # -- routing --------------------------------------------------------------------------------
    def _handle(self, body: bool) -> None:
        hf = self.hf
        split = urlsplit(self.path)
        path = unquote(split.path)
        with hf._lock:
            hf.auth_seen.append(self.headers.get("Authorization"))
        if hf.token is not None and self.headers.get("Authorization") != f"Bearer {hf.token}":
            return self._send_json(401, {"error": "Invalid credentials"}, body)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2] + "/" + parts[3], parts[4:], parse_qs(split.query), body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, rel = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if rev not in ("main", hf.commit(repo)):
                return self._send_json(404, {"error": "Revision Not Found"}, body)
            file = hf.root / "repos" / repo / rel
            extra = {"X-Repo-Commit": hf.commit(repo)}
            if file.is_file():
                extra["X-Linked-Size"] = str(file.stat().st_size)
                extra["X-Linked-Etag"] = f'"{hashlib.sha256(file.read_bytes()).hexdigest()}"'
            return self._file(file, body, extra)
        if parts[0] == "files":
            return self._file(hf.root / "files" / "/".join(parts[1:]), body, {})
        self._send_json(404, {"error": "not found"}, body)

    def _api(self, repo: str, rest: list[str], query: dict[str, list[str]], body: bool) -> None:
        hf = self.hf
        files = hf.repo_files(repo)
        if not files:
            return self._send_json(401, {"error": "Repository Not Found"}, body)
        commit = hf.commit(repo)
        if rest[:1] in (["revision"], ["tree"]) and (len(rest) < 2 or rest[1] not in ("main", commit)):
            return self._send_json(404, {"error": "Revision Not Found"}, body)

        def lfs(path: str, p: Path) -> dict[str, Any] | None:
            if not path.endswith(".gguf"):
                return None  # like git: small files are not in LFS
            return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                    "size": hf.api_sizes.get(path, p.stat().st_size), "pointerSize": 134}

        if rest[:1] == ["tree"]:
            items = []
            for path, p in files.items():
                item: dict[str, Any] = {"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                                        "size": hf.api_sizes.get(path, p.stat().st_size), "path": path}
                info = lfs(path, p)
                if info is not None:
                    item["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": 134}
                items.append(item)
            return self._send_json(200, items, body)
        blobs = query.get("blobs", ["false"])[0] == "true"
        siblings = []
        for path, p in files.items():
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s["size"] = hf.api_sizes.get(path, p.stat().st_size)
                s["blobId"] = hashlib.sha1(p.read_bytes()).hexdigest()
                info = lfs(path, p)
                if info is not None:
                    s["lfs"] = info
            siblings.append(s)
        self._send_json(200, {"id": repo, "modelId": repo, "sha": commit, "siblings": siblings}, body)

    # -- responses ------------------------------------------------------------------------------
    def _send_json(self, status: int, data: Any, body: bool) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self._log(status, None)
        if body:
            self.wfile.write(raw)

    def _log(self, status: int, rng: str | None) -> None:
        with self.hf._lock:
            self.hf.requests.append((self.command, self.path, rng, status))

    def _file(self, file: Path, body: bool, extra: dict[str, str]) -> None:
        hf = self.hf
        with hf._lock:
            busy = hf.busy.pop(0) if hf.busy else None
        if busy is not None:
            status, after = busy
            self.send_response(status)
            if after is not None:
                self.send_header("Retry-After", after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return self._log(status, self.headers.get("Range"))
        if hf.redirect_loop:
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return self._log(302, None)
        if hf.html_page:
            page = b"<!DOCTYPE html><html><body><h1>Please sign in to continue</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            if body:
                self.wfile.write(page)
            return self._log(200, None)
        if not file.is_file():
            return self._send_json(404, {"error": "Entry not found"}, body)
        data = bytearray(file.read_bytes())
        etag = f'"{hashlib.sha256(data).hexdigest()}{hf.etag_salt}"'
        if hf.corrupt_offset is not None and hf.corrupt_offset < len(data):
            data[hf.corrupt_offset] ^= 0xFF
        size = len(data)
        rng = self.headers.get("Range")
        start = 0
        status = 200
        end = size - 1  # the last byte sent
        if rng and not hf.ignore_range:
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range == etag:
                first, _, last = rng.removeprefix("bytes=").partition("-")
                start = int(first)
                if last:
                    end = min(int(last), size - 1)
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self._log(416, rng)
                    return
                status = 206
        sent_from = 0 if (status == 206 and hf.wrong_range) else start
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "none" if hf.ignore_range else "bytes")
        self.send_header("Content-Length", str(end + 1 - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start if not hf.wrong_range else 0}-{end}/{size}")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self._log(status, rng)
        if not body:
            return
        length = end + 1 - start
        with hf._lock:  # faults apply to bodies long enough to have them (not to .sha256 files)
            drop = hf.drop_after if hf.drops > 0 and hf.drop_after is not None and hf.drop_after < length else None
            if drop is not None:
                hf.drops -= 1
            stall = hf.stall_after if hf.stalls > 0 and hf.stall_after is not None and hf.stall_after < length else None
            if stall is not None:
                hf.stalls -= 1
            hf.active += 1
        payload = memoryview(bytes(data))[sent_from:sent_from + length]
        chunk, delay = hf.throttle or (64 * 1024, 0.0)
        pos = 0
        try:
            self._send_body(payload, chunk, delay, drop, stall)
        finally:
            with hf._lock:
                hf.active -= 1

    def _send_body(self, payload: memoryview, chunk: int, delay: float, drop: int | None,
                   stall: int | None) -> None:
        hf = self.hf
        pos = 0
        try:
            while pos < len(payload):
                n = min(chunk, len(payload) - pos)
                if drop is not None:
                    n = min(n, drop - pos)
                if stall is not None and pos < stall:
                    n = min(n, stall - pos)
                if n > 0:
                    self.wfile.write(payload[pos:pos + n])
                    pos += n
                    with hf._lock:
                        hf.bytes_served[urlsplit(self.path).path] += n
                if drop is not None and pos >= drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if stall is not None and pos == stall:
                    stall = None
                    time.sleep(hf.stall_seconds)
                if delay:
                    time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


def fake_gguf(size: int, seed: int = 0) -> bytes:
    """Bytes that start like a GGUF file (the store never parses them)."""
    import random

    rnd = random.Random(seed)
    return b"GGUF" + rnd.randbytes(size - 4)


# -- pytest fixtures (imported by the test_store_* modules) ------------------------------------------
import pytest  # noqa: E402


@pytest.fixture
def server(tmp_path: Path) -> Any:
    """A running HFServer over ``tmp_path/srv``, stopped after the test."""
    with HFServer(tmp_path / "srv") as srv:
        yield srv


@pytest.fixture
def store_env(tmp_path: Path, server: HFServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hub endpoint pointing to ``server``, an empty model cache; returns the cache directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("PYLLAMA_CACHE", str(cache))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PYLLAMA_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return cache
