"""Several machines: ggml's RPC backend, its server and its client.

``pyllama rpc-server`` (or :func:`rpc_server`) runs ggml's RPC server on one
machine's devices; ``Model(path, rpc=["host:port", ...])`` adds those servers'
devices to this process (``ggml_backend_rpc_add_server``), after which they are
ordinary devices: :func:`pyllama.devices` lists them with their memory, llama.cpp's
fit spreads layers over them (``n_gpu_layers="auto"``) and ``devices=`` /
``tensor_split=`` choose explicitly.

The protocol has no authentication and no encryption: a server bound beyond
loopback lets anyone who reaches the port run graphs and read its memory.
Across machines, bind to 127.0.0.1 and tunnel: ``ssh -N -L 50052:127.0.0.1:50052 host``.

Failures, and what pyllama can and cannot do about them:

* ggml's client aborts the process (``GGML_ABORT``) when it cannot connect,
  when the handshake fails, and when a server goes away while in use. Before
  adding a server, and before a model or a device query touches one, pyllama
  connects and performs the handshake itself (:func:`check_server`, within
  ``timeout`` seconds), so an unreachable, busy or incompatible server is an
  :class:`RpcError`, not an abort.
* A server lost *during* a load or a generation still aborts the process: ggml
  has no error path there. Run such work in a child process (``pyllama.Worker``,
  or any subprocess) to contain it. The abort follows the loss at once when the
  server's host closes the connection (the server process died), and within
  about :data:`DEAD_PEER_SECONDS` when the host or network vanished (TCP
  keepalive and ``TCP_USER_TIMEOUT`` are set on ggml's sockets, Linux). A server
  that hangs while its host stays up is not detected: watch the child with a
  deadline.
* ggml's server serves one client at a time; a second client waits, so
  :func:`check_server` reports a busy server as an error after ``timeout``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from ._ffi import ffi, lib
from .errors import LlamaError

logger = logging.getLogger("pyllama")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
CONNECT_TIMEOUT = 5.0  #: seconds for connect + handshake in :func:`check_server`
# ggml-rpc's handshake, which upstream keeps stable across protocol versions
# (ggml/src/ggml-rpc/ggml-rpc.cpp: "RPC_CMD_HELLO must be always 14"; transport.h:
# RPC_CONN_CAPS_SIZE). tests/test_rpc.py checks both against the vendored sources.
_RPC_CMD_HELLO = 14
_RPC_CONN_CAPS_SIZE = 24
# Dead-peer detection set on ggml's client sockets (see harden_connections).
_KEEPIDLE, _KEEPINTVL, _KEEPCNT = 10, 5, 3
_USER_TIMEOUT_MS = 30_000
DEAD_PEER_SECONDS = max(_KEEPIDLE + _KEEPINTVL * _KEEPCNT, _USER_TIMEOUT_MS // 1000)


class RpcError(LlamaError, ConnectionError):
    """An RPC server could not be reached, refused the handshake, or this build has no RPC backend."""


# --- endpoints -------------------------------------------------------------------
def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ggml's client speaks IPv4 only."""
    if not isinstance(endpoint, str) or endpoint.count(":") != 1:
        raise ValueError(f"RPC server must be 'host:port' (IPv4 address or host name), not {endpoint!r}")
    host, _, port_s = endpoint.partition(":")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"RPC server must be 'host:port' with a port in 1..65535, not {endpoint!r}")
    return host, int(port_s)


def canonical_endpoint(endpoint: str) -> str:
    """``ip:port`` for ``host:port``: one name per server, so it is added (and connected) once.

    ggml keys its connections by the endpoint string and its server takes one
    client at a time: the same server under two names would deadlock a load.
    """
    host, port = parse_endpoint(endpoint.strip())
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RpcError(f"RPC server {endpoint}: cannot resolve {host!r} to an IPv4 address ({exc})") from None
    return f"{infos[0][4][0]}:{port}"


def split_endpoints(value: str | Iterable[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> canonical endpoints, duplicates dropped, order kept."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        ep = canonical_endpoint(item)
        if ep not in out:
            out.append(ep)
    return out


# --- the handshake probe ------------------------------------------------------------
def check_server(endpoint: str, *, timeout: float = CONNECT_TIMEOUT) -> tuple[int, int, int]:
    """Connect to an RPC server and shake hands, within ``timeout`` seconds; return its protocol version.

    Raises :class:`RpcError` for a server that is not listening, does not answer
    (busy with another client, or not an RPC server) or speaks an incompatible
    protocol: the cases where ggml's own client would abort or hang.
    """
    ep = canonical_endpoint(endpoint)
    host, port = parse_endpoint(ep)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CONN_CAPS_SIZE) + bytes(_RPC_CONN_CAPS_SIZE))
            s.settimeout(max(0.05, deadline - time.monotonic()))
            size = struct.unpack("<Q", _recv_exact(s, 8))[0]
            if not 4 <= size <= 4096:
                raise RpcError(f"RPC server {ep}: unexpected handshake reply ({size} bytes); not a ggml RPC server?")
            major, minor, patch = _recv_exact(s, size)[:3]
    except socket.timeout:
        raise RpcError(f"RPC server {ep}: no handshake within {timeout:g}s (busy with another client, "
                       "or not a ggml RPC server)") from None
    except OSError as exc:
        raise RpcError(f"RPC server {ep} is unreachable: {exc.strerror or exc}") from None
    if major != lib.RPC_PROTO_MAJOR_VERSION or minor > lib.RPC_PROTO_MINOR_VERSION:
        raise RpcError(f"RPC server {ep} speaks protocol {major}.{minor}.{patch}; this pyllama speaks "
                       f"{lib.RPC_PROTO_MAJOR_VERSION}.{lib.RPC_PROTO_MINOR_VERSION}.x: run the same llama.cpp on both")
    return int(major), int(minor), int(patch)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(0, "the server closed the connection during the handshake")
        buf += chunk
    return buf


# --- ggml's own client sockets --------------------------------------------------------
def _fd_dir() -> str | None:
    for d in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(d):
            return d
    return None


def _client_sockets(endpoints: Iterable[str]) -> dict[str, list[socket.socket]]:
    """This process's open TCP connections to these endpoints (dup'ed; the caller closes them)."""
    wanted = {parse_endpoint(ep): ep for ep in endpoints}
    out: dict[str, list[socket.socket]] = {}
    d = _fd_dir()
    if not wanted or d is None:
        return out
    # A socket object made with a default timeout set would switch the descriptor,
    # shared with ggml's, to non-blocking: ggml's next read would fail and abort.
    default_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(None)
    try:
        for name in os.listdir(d):
            try:
                fd = os.dup(int(name))
            except (ValueError, OSError):
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                peer = s.getpeername() if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM else None
            except OSError:
                peer = None
            if peer is not None and tuple(peer) in wanted:
                out.setdefault(wanted[tuple(peer)], []).append(s)
            else:
                s.close()
    finally:
        socket.setdefaulttimeout(default_timeout)
    return out


def _is_open(s: socket.socket) -> bool:
    """Whether the peer has not closed this connection (a peek, so ggml's reads are untouched)."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def harden_connections(endpoints: Iterable[str] | None = None) -> int:
    """Turn on dead-peer detection on ggml's open connections to RPC servers; return how many.

    ggml's sockets block without a timeout, so a server whose host or network
    vanished would hang the client forever. With TCP keepalive and
    ``TCP_USER_TIMEOUT`` (Linux) the kernel fails the connection after about
    :data:`DEAD_PEER_SECONDS`, and ggml then aborts the process (contain it in
    a child process). A slow graph on a live server is not affected: its
    kernel answers the probes.
    """
    n = 0
    socks = _client_sockets(servers() if endpoints is None else endpoints)
    for lst in socks.values():
        for s in lst:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for opt, val in (("TCP_KEEPIDLE", _KEEPIDLE), ("TCP_KEEPALIVE", _KEEPIDLE),
                                 ("TCP_KEEPINTVL", _KEEPINTVL), ("TCP_KEEPCNT", _KEEPCNT),
                                 ("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS)):
                    if hasattr(socket, opt):
                        s.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
                n += 1
            except OSError as exc:
                logger.debug("could not set keepalive on an RPC connection: %s", exc)
            finally:
                s.close()
    return n


def ensure_reachable(endpoints: Iterable[str], *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise :class:`RpcError` unless every server can be used without ggml aborting.

    A server this process is already connected to (a loaded model holds the
    connection) is checked by peeking at that connection: a handshake would
    wait behind our own session.
    """
    eps = list(endpoints)
    if _fd_dir() is None and len(_users):
        # ggml's connections cannot be seen here (Windows): a handshake would wait
        # behind the session a loaded model holds, so servers in use are trusted.
        eps = [ep for ep in eps if ep not in _added]
    live = _client_sockets(eps)
    try:
        for ep in eps:
            conns = live.get(ep)
            if conns:
                if not all(_is_open(s) for s in conns):
                    raise RpcError(f"RPC server {ep} closed its connection to this process (it stopped or "
                                   "restarted); models using it are lost: close them, and load again")
                continue
            check_server(ep, timeout=timeout)
    finally:
        for lst in live.values():
            for s in lst:
                s.close()


# --- the client: adding servers -------------------------------------------------------
_added: dict[str, list[str]] = {}  # canonical endpoint -> its device names, in order
_add_lock = threading.Lock()
_users: weakref.WeakSet[Any] = weakref.WeakSet()  # models loaded while servers were added


def note_model(model: Any) -> None:
    """For :class:`pyllama.Model`: a model loaded now may hold connections to the added servers."""
    if _added:
        _users.add(model)
        harden_connections()


def _proc(name: str) -> Any:
    """A function of the dlopen()ed RPC backend, typed by the generated ``NAME_t``."""
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise RpcError("this pyllama build has no RPC backend (libggml-rpc is missing from pyllama/lib)")
    ptr = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if ptr == ffi.NULL:
        raise RpcError(f"the RPC backend does not export {name}")
    return ffi.cast(f"{name}_t", ptr)


def add_servers(endpoints: str | Iterable[str], *, timeout: float = CONNECT_TIMEOUT) -> list[str]:
    """Add RPC servers' devices to this process (once per server); return their device names.

    Each server is checked first (:func:`check_server`), so one that cannot be
    used raises :class:`RpcError` instead of aborting the process.
    """
    eps = split_endpoints(endpoints)
    names: list[str] = []
    with _add_lock:
        new = [ep for ep in eps if ep not in _added]
        if len(_added) + len(new) > lib.GGML_RPC_MAX_SERVERS:
            raise ValueError(f"at most {lib.GGML_RPC_MAX_SERVERS} RPC servers per process")
        for ep in new:
            check_server(ep, timeout=timeout)
        add = _proc("ggml_backend_rpc_add_server") if new else None
        for ep in eps:
            if ep not in _added and add is not None:
                before = lib.ggml_backend_dev_count()
                reg = add(ep.encode())
                if reg == ffi.NULL:
                    raise RpcError(f"RPC server {ep} offers no device")
                lib.ggml_backend_register(reg)
                _added[ep] = [ffi.string(lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i))).decode()
                              for i in range(before, lib.ggml_backend_dev_count())]
                logger.info("RPC server %s added: %s", ep, ", ".join(_added[ep]))
            names += _added[ep]
    return names


def servers() -> list[str]:
    """The RPC servers added to this process (canonical ``ip:port``), in order."""
    return list(_added)


def device_endpoint(device_index: int) -> str | None:
    """The server behind ggml device ``device_index``, or None for a local device."""
    dev = lib.ggml_backend_dev_get(device_index)
    reg = lib.ggml_backend_dev_backend_reg(dev)
    if reg == ffi.NULL or ffi.string(lib.ggml_backend_reg_name(reg)) != b"RPC":
        return None
    return str(ffi.string(lib.ggml_backend_dev_description(dev)).decode())  # ggml describes it by its endpoint


def prepare_model(rpc: Sequence[str] | str, devices: Sequence[str] | None) -> None:
    """For :class:`pyllama.Model`: add ``rpc`` and check every server the load may touch."""
    if rpc:
        add_servers(rpc)
    if not _added:
        return
    if devices is None:  # llama.cpp's default device list takes every RPC device
        used = list(_added)
    else:
        used = [ep for ep, names in _added.items() if any(n in names for n in devices)]
    ensure_reachable(used)


# --- the server --------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, devices: Sequence[str] = (),
          threads: int | None = None, cache: str | os.PathLike[str] | None = None) -> NoReturn:
    """Run ggml's RPC server in this process until a signal ends it (the C loop never returns).

    SIGINT and SIGTERM get their default action: the process ends at once and
    its OS reclaims everything; the server keeps no state but the ``cache``
    directory, where ggml writes each received tensor in place (a server killed
    mid-write can leave a short file there: clear the directory after a crash).
    """
    ep = canonical_endpoint(f"{host}:{port}")
    ip = ep.rsplit(":", 1)[0]
    if not _is_loopback(ip):
        print("\n" + "!" * 78 + f"\nWARNING: the RPC server listens on {ip}, beyond this machine.\n"
              "ggml's RPC protocol has NO authentication and NO encryption: anyone who reaches\n"
              "this port can run code on its devices and read their memory. Only on a network you\n"
              "fully trust; otherwise bind to 127.0.0.1 and tunnel:\n"
              f"    ssh -N -L {port}:127.0.0.1:{port} THIS_HOST   (on the client)\n" + "!" * 78 + "\n",
              file=sys.stderr, flush=True)
    devs = _server_devices(devices)
    n_threads = threads if threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, not {n_threads}")
    cache_b = ffi.NULL
    if cache is not None:
        os.makedirs(cache, exist_ok=True)
        cache_b = os.fsencode(os.path.abspath(cache))
    start = _proc("ggml_backend_rpc_start_server")
    arr = ffi.new("ggml_backend_dev_t[]", devs)
    names = [ffi.string(lib.ggml_backend_dev_name(d)).decode() for d in devs]
    print(f"pyllama rpc-server: {ep} on {', '.join(names)}, {n_threads} threads"
          f"{', cache ' + os.fsdecode(cache_b) if cache is not None else ''}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    start(ep.encode(), cache_b, n_threads, len(devs), arr)
    # Only a failure returns (ggml printed why on stderr).
    raise RpcError(f"the RPC server could not start on {ep} (port in use, or address not on this machine?)")


def _server_devices(names: Sequence[str]) -> list[Any]:
    """The devices to serve: the named ones, else every accelerator, else the CPU (as rpc-server)."""
    all_devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    by_name = {ffi.string(lib.ggml_backend_dev_name(d)).decode(): d for d in all_devs}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"unknown device {missing[0]!r}; available: {sorted(by_name)}")
        return [by_name[n] for n in names]
    accel = [d for d in all_devs if lib.ggml_backend_dev_type(d) in (lib.GGML_BACKEND_DEVICE_TYPE_GPU,
                                                                     lib.GGML_BACKEND_DEVICE_TYPE_IGPU)
             and ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(d))) != b"RPC"]
    if accel:
        return accel
    cpu = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
    if cpu == ffi.NULL:
        raise RpcError("no device to serve")
    return [cpu]


def _watch_parent(parent: int) -> None:
    """End this process when its parent is gone (no orphaned servers)."""
    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="pyllama-rpc-parent-watch", daemon=True).start()


def serve_main(args: argparse.Namespace) -> int:
    """``pyllama rpc-server``."""
    if args.exit_with_parent:
        _watch_parent(args.exit_with_parent)
    devices = [d for d in (args.device or "").replace("/", ",").split(",") if d]
    try:
        serve(host=args.host, port=args.port, devices=devices, threads=args.threads, cache=args.cache)
    except (RpcError, ValueError, OSError) as exc:
        print(f"pyllama rpc-server: {exc}", file=sys.stderr)
        return 1


def register(subparsers: Any) -> None:
    """Add ``pyllama rpc-server`` to the command line."""
    p = subparsers.add_parser(
        "rpc-server", help="serve this machine's devices to other pyllama / llama.cpp processes (ggml RPC)",
        description="Run ggml's RPC server on local devices; clients add it with --rpc HOST:PORT. "
                    "The protocol has no authentication or encryption: keep the default loopback "
                    "address and reach it through an SSH tunnel (ssh -N -L PORT:127.0.0.1:PORT HOST).")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--device", default=None,
                   help="device(s) to serve, comma-separated: CPU, Vulkan0, CUDA0, ... (default: every GPU, else CPU)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: half the logical CPUs)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep received tensors in DIR, so a client reloading a model sends only hashes "
                        "(ggml trusts these files unchecked: clear DIR after a crash)")
    p.add_argument("--exit-with-parent", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=serve_main)


# --- the server as a child process ----------------------------------------------------------
def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes], log_path: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.unlink(log_path)
    except OSError:
        pass


class RpcServer:
    """A ``pyllama rpc-server`` child process; see :func:`rpc_server`."""

    def __init__(self, *, host: str, port: int, device: str | Sequence[str] | None, threads: int | None,
                 cache: str | os.PathLike[str] | None, timeout: float) -> None:
        ip = canonical_endpoint(f"{host}:1").rsplit(":", 1)[0]
        self.port = port or _free_port(ip)
        self.endpoint = f"{ip}:{self.port}"
        cmd = [sys.executable, "-m", "pyllama", "rpc-server", "--host", ip, "--port", str(self.port),
               "--exit-with-parent", str(os.getpid())]
        if device:
            cmd += ["--device", device if isinstance(device, str) else ",".join(device)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if cache is not None:
            cmd += ["--cache", os.fspath(cache)]
        fd, self._log_path = tempfile.mkstemp(prefix="pyllama-rpc-", suffix=".log")
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _terminate, self._proc, self._log_path)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RpcError(f"pyllama rpc-server exited with {self._proc.returncode}:\n{self.output()[-2000:]}")
            try:
                check_server(self.endpoint, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                return
            except RpcError:
                if time.monotonic() >= deadline:
                    raise RpcError(f"pyllama rpc-server on {self.endpoint} not ready after {timeout:g}s:\n"
                                   f"{self.output()[-2000:]}") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit status (negative: the signal) once ended."""
        return self._proc.poll()

    def output(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        try:
            with open(self._log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """End the server abruptly (SIGKILL), as a crash would."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); idempotent."""
        self._finalizer()

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<pyllama.RpcServer {self.endpoint} pid {self.pid} {state}>"


def rpc_server(*, host: str = DEFAULT_HOST, port: int = 0, device: str | Sequence[str] | None = None,
               threads: int | None = None, cache: str | os.PathLike[str] | None = None,
               timeout: float = 60.0) -> RpcServer:
    """Start ``pyllama rpc-server`` as a child process and return once it accepts clients.

    ``port=0`` picks a free port (``server.endpoint`` says which). The server
    ends with ``close()`` / the ``with`` block, at garbage collection, at
    interpreter exit, and when this process dies.
    """
    return RpcServer(host=host, port=port, device=device, threads=threads, cache=cache, timeout=timeout)


__all__ = ["RpcError", "RpcServer", "rpc_server", "add_servers", "servers", "check_server", "ensure_reachable",
           "harden_connections", "serve", "register", "parse_endpoint", "canonical_endpoint", "DEAD_PEER_SECONDS"]
