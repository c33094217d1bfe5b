"""Slow and vanished clients: a trickled request head (slowloris) or body is cut off by its deadline, a
client that stops reading its stream holds no slot once its tokens are made, a client that disconnects
during its prompt frees the slot; nobody else waits meanwhile.

A real `pyllama serve` subprocess on the synthetic model, raw sockets where a client must misbehave.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_fixture import RemoteServer

HEAD_TIMEOUT = 2.0
READ_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def srv(synth_model_path: Path) -> Iterator[RemoteServer]:
    with RemoteServer(synth_model_path, "--slots", "2", "--ctx-slot", "2048", "--metrics",
                      "--header-timeout", str(HEAD_TIMEOUT), "--timeout", str(READ_TIMEOUT)) as s:
        yield s


def _connect(srv: RemoteServer) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes; a reset (the server closed while this side was still sending)
    reads as b"<reset>" after what came before it."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        got += b"<reset>"
    return got


def _metric(srv: RemoteServer, name: str) -> float:
    for line in httpx.get(srv.url_for("metrics"), timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_trickled_request_head_is_cut_off(srv: RemoteServer) -> None:
    """Slowloris: a byte of the head every half second never completes it; at the deadline the connection
    gets a 408 and is closed, and meanwhile the server answers everyone else."""
    socks = [_connect(srv) for _ in range(8)]
    t0 = time.monotonic()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    stop = threading.Event()

    def trickle(s: socket.socket) -> None:
        for byte in head:
            if stop.is_set():
                return
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.5)

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    try:
        while time.monotonic() - t0 < HEAD_TIMEOUT:
            assert httpx.get(srv.url_for("health"), timeout=5).status_code == 200
            time.sleep(0.2)
        for s in socks:
            answer = _read_all(s)  # returns once the server has closed the connection
            assert answer.startswith((b"HTTP/1.1 408", b"<reset>")), answer[:100]
        took = time.monotonic() - t0
        assert HEAD_TIMEOUT - 0.5 < took < HEAD_TIMEOUT + 5, took
    finally:
        stop.set()
        for s in socks:
            s.close()
    # a connection that sends nothing at all is closed the same way
    idle = _connect(srv)
    assert _read_all(idle).startswith(b"HTTP/1.1 408")
    idle.close()
    r = httpx.post(srv.url_for("v1", "completions"), json={"prompt": "hi", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text


def test_keep_alive_requests_each_get_the_deadline(srv: RemoteServer) -> None:
    """On a kept-alive connection, a complete request is answered; the next one, trickled, is cut off."""
    s = _connect(srv)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):  # the whole first answer, head and body
        chunk = s.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    s.sendall(b"GET /health HTTP/1.1\r\nHo")  # and no more
    t0 = time.monotonic()
    assert _read_all(s).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < HEAD_TIMEOUT + 5
    s.close()


def test_a_stalled_body_is_a_408(srv: RemoteServer) -> None:
    s = _connect(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    t0 = time.monotonic()
    answer = _read_all(s)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and READ_TIMEOUT - 0.5 < time.monotonic() - t0 < READ_TIMEOUT + 5


def test_a_client_that_stops_reading_holds_no_slot(srv: RemoteServer) -> None:
    """A stream nobody reads: its tokens are made and buffered (at most a slot's context), the slot is free
    again as soon as generation ends, and another client's stream runs at its usual pace meanwhile."""
    s = _connect(srv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = b'{"prompt": "the cat", "max_tokens": 600, "ignore_eos": true, "stream": true, "logprobs": 5}'
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    s.recv(200)  # the stream started; nothing more is read
    gaps: list[float] = []
    last = None
    with httpx.stream("POST", srv.url_for("v1", "completions"), timeout=60,
                      json={"prompt": "once upon", "max_tokens": 60, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
    assert len(gaps) >= 59
    deadline = time.monotonic() + 60
    while _metric(srv, "pyllama_slots_busy") != 0:  # the unread request finished generating
        assert time.monotonic() < deadline, "the slot of an unread stream stayed busy"
        time.sleep(0.1)
    assert max(gaps) < 1.0, max(gaps)  # nobody waited on the reader that stopped
    s.close()


@pytest.fixture(scope="module")
def small_batches(synth_model_path: Path) -> Iterator[RemoteServer]:
    """Prompts evaluated 16 tokens a step, so a long one takes many steps."""
    with RemoteServer(synth_model_path, "--slots", "1", "--ctx-slot", "4096", "--metrics", "-b", "16",
                      "-ub", "16") as s:
        yield s


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_during_its_prompt_frees_the_slot(small_batches: RemoteServer, stream: bool) -> None:
    """A long prompt, and the client hangs up before its first token: the request is cancelled at the next
    engine step, long before its prompt would have been evaluated, and the next request is served."""
    srv = small_batches
    prompt = " ".join(["the cat sat on the mat"] * 150)
    n_prompt = len(httpx.post(srv.url_for("tokenize"), json={"content": prompt}, timeout=30).json()["tokens"])
    assert n_prompt > 600
    cancelled = _metric(srv, "pyllama_engine_requests_cancelled_total")
    steps = _metric(srv, "pyllama_engine_steps_total")
    data = json.dumps({"prompt": prompt, "max_tokens": 50, "stream": stream}).encode()
    s = _connect(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    deadline = time.monotonic() + 30
    while _metric(srv, "pyllama_slots_busy") == 0:  # its prompt is being evaluated
        assert time.monotonic() < deadline
        time.sleep(0.005)
    s.close()
    deadline = time.monotonic() + 20
    while _metric(srv, "pyllama_slots_busy") != 0:
        assert time.monotonic() < deadline, "the slot of a client that left stayed busy"
        time.sleep(0.01)
    assert _metric(srv, "pyllama_engine_requests_cancelled_total") == cancelled + 1
    used = _metric(srv, "pyllama_engine_steps_total") - steps
    print(f"\n{stream=}: {used} steps of {n_prompt / 16:.0f}")
    assert used < n_prompt / 16 / 2, f"{used} steps: the prompt ran on after its client left"
    r = httpx.post(srv.url_for("v1", "completions"), json={"prompt": "hi", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
