"""`pyllama serve` as a real subprocess on a free loopback port, for the server tests and benchmarks.

::

    with RemoteServer(model_path, "--slots", "4") as srv:
        client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="x")

The server's output goes to a log file whose tail is shown when it fails to
start. Leaving the ``with`` block sends SIGTERM (the server's graceful
shutdown) and kills it if it has not exited within ``stop_timeout`` seconds:
no orphan process survives a test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteServer:
    """A ``pyllama serve`` child process; ``url`` once /health answered 200."""

    def __init__(self, model: str | os.PathLike[str], *args: str, api_key: str | None = None,
                 start_timeout: float = 240.0, stop_timeout: float = 20.0, threads: int | None = 2,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "pyllama", "serve", str(model), "--host", self.host, "--port", str(self.port)]
        if threads is not None and "-t" not in args and "--threads" not in args:
            cmd += ["--threads", str(threads)]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        self.cmd = [*cmd, *args]
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.env = {**os.environ, **(env or {})}
        self.env.pop("PYLLAMA_API_KEY", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="pyllama-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self) -> RemoteServer:
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        saw_loading = False
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyllama serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url_for("health"), timeout=2.0)
                if r.status_code == 200:
                    self.saw_loading = saw_loading
                    return self
                saw_loading = saw_loading or (r.status_code == 503 and r.json().get("status") == "loading")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pyllama serve did not become healthy in {self.start_timeout}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self._log.close()
        return proc.returncode

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if exc[0] is None:
            self.log_path.unlink(missing_ok=True)


__all__ = ["RemoteServer", "free_port", "router", "statuses"]


@contextlib.contextmanager
def stream_in_background(url: str, body: dict[str, Any], *, wait_s: float = 30.0) -> Iterator[list[str]]:
    """POST a streaming ``body`` from a thread; yields its SSE lines (growing as they arrive) once the first
    token event came, and joins the thread on exit. A connection cut by the server appends ``"<cut>"``."""
    got: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            got.append("<cut>")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stream)
        deadline = time.monotonic() + wait_s
        while not any(line.startswith("data: {") for line in got):
            assert time.monotonic() < deadline and not fut.done(), got[:3]
            time.sleep(0.01)
        yield got
        fut.result(timeout=30)


def router(*args: str, env: dict[str, str] | None = None) -> RemoteServer:
    """A ``pyllama serve`` of several models (router mode: no model argument), not started."""
    srv = RemoteServer("unused", threads=None, env=env)
    srv.cmd = [sys.executable, "-m", "pyllama", "serve", "--port", str(srv.port), "-t", "1", *args]
    return srv


def statuses(s: RemoteServer) -> dict[str, str]:
    """Each routed model's status, by id (``/v1/models``)."""
    return {m["id"]: m["status"]["value"] for m in httpx.get(s.url_for("v1", "models"), timeout=10).json()["data"]}

