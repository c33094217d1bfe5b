"""Several machines over ggml's RPC backend: real `pyllama rpc-server` processes on loopback.

Every client that adds a server runs in a child process: added servers stay
in a process for its lifetime (and ggml aborts a client whose server dies),
so the test process itself never adds one.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pyllama
from pyllama import rpc

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
N_TOKENS = 8
CHILD_TIMEOUT = 300  # a starter-model load over loopback RPC on a busy 2-core machine

# The client side, in a child process. Prints one JSON object per line.
CLIENT = r"""
import json, logging, sys
import pyllama
from pyllama import rpc

args = json.loads(sys.argv[1])
log = []

class Keep(logging.Handler):
    def emit(self, record):
        log.append(record.getMessage())

native = logging.getLogger("pyllama.llama")
native.setLevel(logging.DEBUG)
native.addHandler(Keep())

def out(**kw):
    print(json.dumps(kw), flush=True)

def greedy(model, n):
    with model.context(n_ctx=256, n_threads=1, flash_attn="off") as ctx:
        with pyllama.generate(ctx, args["prompt"], sampler=[pyllama.Greedy()], max_tokens=n) as gen:
            for ev in gen:
                if ev.token >= 0 and args.get("stream"):
                    out(token=int(ev.token))
        return [int(t) for t in gen.tokens]

def devices():
    return [d.as_dict() for d in pyllama.devices()]

mode = args["mode"]
if mode == "split":
    eps = args["servers"]
    first = rpc.add_servers(eps)
    # Idempotent: again, and under another name for the same servers.
    again = rpc.add_servers([e.replace("127.0.0.1", "localhost") for e in eps] + eps)
    with pyllama.Model(args["model"], rpc=eps, n_gpu_layers="all") as m:
        tokens = greedy(m, args["n"])
        # ggml's connections (one per server) carry dead-peer detection
        import socket
        conns = [s for lst in rpc._client_sockets(eps).values() for s in lst]
        keepalive = [(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                      s.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", socket.TCP_NODELAY)))
                     for s in conns]
        for s in conns:
            s.close()  # dup()s: left open they would keep the connections alive past the model
    out(first=first, again=again, servers=rpc.servers(), devices=devices(), tokens=tokens, log=log,
        keepalive=keepalive)
elif mode == "stream":
    with pyllama.Model(args["model"], rpc=args["servers"], n_gpu_layers="all") as m:
        out(loaded=True)
        greedy(m, args["n"])
    out(finished=True)
elif mode == "lost-between-uses":
    ep = args["servers"][0]
    with pyllama.Model(args["model"], rpc=[ep], n_gpu_layers="all") as m:
        out(tokens=greedy(m, args["n"]))
    sys.stdin.readline()  # the parent kills the server
    try:
        pyllama.Model(args["model"], rpc=[ep], n_gpu_layers="all")
        out(error=None)
    except pyllama.RpcError as exc:
        out(error=str(exc), devices=devices())
    sys.stdin.readline()  # the parent restarts it on the same port
    with pyllama.Model(args["model"], rpc=[ep], n_gpu_layers="all") as m:
        out(tokens=greedy(m, args["n"]), devices=devices())
"""


_lines: dict[int, queue.Queue[str]] = {}


def _client(args: dict[str, Any], **popen: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    q: queue.Queue[str] = queue.Queue()
    _lines[proc.pid] = q
    stdout = proc.stdout
    assert stdout is not None

    def pump() -> None:
        for line in iter(stdout.readline, ""):
            q.put(line)
        q.put("")  # the end

    threading.Thread(target=pump, daemon=True).start()
    return proc


def _read_json(proc: subprocess.Popen[str], timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """The client's next line, within ``timeout`` (a hung client fails the test, it never hangs it)."""
    try:
        line = _lines[proc.pid].get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"no output from the client within {timeout}s") from None
    if not line:
        proc.wait(30)
        raise AssertionError(f"client ended ({proc.returncode}) without output:\n{proc.stderr.read()[-3000:]}"
                             if proc.stderr else "client ended")
    obj: dict[str, Any] = json.loads(line)
    return obj


def _split_run(model: Path, servers: list[str]) -> dict[str, Any]:
    """A client that loads ``model`` split over ``servers`` and generates: its one result line (it must exit 0)."""
    proc = _client({"mode": "split", "model": str(model), "servers": servers, "prompt": PROMPT, "n": N_TOKENS})
    try:
        res = _read_json(proc)
        assert proc.wait(CHILD_TIMEOUT) == 0
    finally:
        proc.kill()
    return res


@pytest.fixture(scope="module")
def servers() -> Iterator[list[pyllama.RpcServer]]:
    with pyllama.rpc_server(device="CPU", threads=1) as a, pyllama.rpc_server(device="CPU", threads=1) as b:
        yield [a, b]


@pytest.fixture(scope="module")
def local_tokens(starter_model_path: Path) -> list[int]:
    """The greedy continuation on this process's CPU: what the split model must reproduce."""
    with pyllama.Model(starter_model_path, n_gpu_layers=0) as m:
        with m.context(n_ctx=256, n_threads=1, flash_attn="off") as ctx:
            with pyllama.generate(ctx, PROMPT, sampler=[pyllama.Greedy()], max_tokens=N_TOKENS) as gen:
                list(gen)
            return [int(t) for t in gen.tokens]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- build and protocol -----------------------------------------------------------------
def test_build_ships_the_rpc_backend() -> None:
    assert "ggml-rpc" in pyllama.build_info()["backend_libraries"]
    assert "RPC" in pyllama.backends()
    out = subprocess.run([sys.executable, "-m", "pyllama", "inspect", "build"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ggml-rpc" in out.stdout and "RPC" in out.stdout


def test_handshake_constants_match_the_vendored_sources() -> None:
    src = ROOT / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-rpc"
    if not src.is_dir():
        pytest.skip("no vendored llama.cpp tree (installed wheel)")
    assert re.search(r"RPC_CMD_HELLO\s*==\s*(\d+)", (src / "ggml-rpc.cpp").read_text()).group(1) == str(  # type: ignore[union-attr]
        rpc._RPC_CMD_HELLO)
    assert re.search(r"RPC_CONN_CAPS_SIZE\s*=\s*(\d+)", (src / "transport.h").read_text()).group(1) == str(  # type: ignore[union-attr]
        rpc._RPC_CONN_CAPS_SIZE)


def test_endpoints_are_validated_and_canonical() -> None:
    for bad in ("localhost", "host:0", "host:99999", "::1:50052", "a:b:c", ":50052"):
        with pytest.raises(ValueError):
            rpc.canonical_endpoint(bad)
    assert rpc.canonical_endpoint("localhost:50052") == "127.0.0.1:50052"
    assert rpc.split_endpoints("localhost:1, 127.0.0.1:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]


# --- the server ---------------------------------------------------------------------------
def test_server_handshake_and_sigterm(servers: list[pyllama.RpcServer]) -> None:
    major, _, _ = rpc.check_server(servers[0].endpoint)
    assert major == pyllama._ffi.lib.RPC_PROTO_MAJOR_VERSION
    with pyllama.rpc_server(device="CPU", threads=1) as s:
        assert s.returncode is None
        assert "127.0.0.1" in s.endpoint
    assert s.returncode == -signal.SIGTERM
    with pytest.raises(pyllama.RpcError):
        rpc.check_server(s.endpoint, timeout=2)


def test_server_warns_when_bound_beyond_loopback() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the warning, then a clean bind failure.
    out = subprocess.run([sys.executable, "-m", "pyllama", "rpc-server", "--host", "192.0.2.1",
                          "--port", str(_free_port()), "--device", "CPU"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "WARNING" in out.stderr and "NO authentication" in out.stderr and "ssh -N -L" in out.stderr
    assert "could not start" in out.stderr


def test_server_rejects_unknown_device() -> None:
    out = subprocess.run([sys.executable, "-m", "pyllama", "rpc-server", "--port", str(_free_port()),
                          "--device", "NoSuchGPU7"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "unknown device 'NoSuchGPU7'" in out.stderr


def test_server_ends_with_its_parent() -> None:
    code = ("import sys, pyllama; s = pyllama.rpc_server(device='CPU', threads=1); "
            "print(s.pid, flush=True); sys.stdin.readline()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()  # no close(), no atexit: only the server's own watch can end it
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _is_zombie(pid):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the rpc-server outlived its parent")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


# --- unreachable servers ----------------------------------------------------------------------
def test_unreachable_server_is_a_quick_clear_error(starter_model_path: Path) -> None:
    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(pyllama.RpcError, match="unreachable"):
        rpc.check_server(dead, timeout=2)
    # Nothing is added when the check fails, so this process stays free of RPC devices.
    with pytest.raises(pyllama.RpcError, match="unreachable"):
        pyllama.Model(starter_model_path, rpc=[dead])
    assert rpc.servers() == []
    assert not any(d.backend == "RPC" for d in pyllama.devices())


def test_silent_server_times_out() -> None:
    # Accepts connections but never answers: a hung server, or one busy with another client.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        ep = f"127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(pyllama.RpcError, match="no handshake within 1s"):
            rpc.check_server(ep, timeout=1)
        assert time.monotonic() - t0 < 20  # bounded by the timeout, not a hang (generous on a busy box)


# --- the client: a model split across two servers -------------------------------------------------
@pytest.mark.starter
def test_model_split_across_two_servers(servers: list[pyllama.RpcServer], starter_model_path: Path,
                                        local_tokens: list[int]) -> None:
    eps = [s.endpoint for s in servers]
    res = _split_run(starter_model_path, eps)
    assert res["servers"] == eps
    assert len(res["first"]) == 2 and res["again"] == res["first"]  # added once, aliases included
    remote = [d for d in res["devices"] if d["backend"] == "RPC"]
    assert [d["endpoint"] for d in remote] == eps
    assert all(d["memory_total"] > 0 and d["memory_free"] > 0 for d in remote)
    assert res["tokens"] == local_tokens
    assert len(res["keepalive"]) == 2 and all(ka[0] == 1 for ka in res["keepalive"])
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert all(ka[1] == rpc._USER_TIMEOUT_MS for ka in res["keepalive"])
    log = res["log"]
    for name, ep in zip(res["first"], eps):
        assert any(f"assigned to device {name}," in line for line in log), name
        assert any(f"[{ep}] model buffer size" in line for line in log), ep
    assert not any(re.search(r"layer +\d+ assigned to device CPU", line) for line in log)


@pytest.mark.starter
def test_server_killed_mid_generation(starter_model_path: Path, local_tokens: list[int]) -> None:
    bound = rpc.DEAD_PEER_SECONDS + 30  # the stated bound, plus room for a busy machine
    server = pyllama.rpc_server(device="CPU", threads=1)
    port = server.port
    proc = _client({"mode": "stream", "model": str(starter_model_path), "servers": [server.endpoint],
                    "prompt": PROMPT, "n": 100_000, "stream": True},
                   env={**os.environ, "GGML_NO_BACKTRACE": "1"})  # no debugger attach: the abort is prompt
    try:
        assert _read_json(proc) == {"loaded": True}
        for _ in range(3):
            assert "token" in _read_json(proc)
        server.kill()
        t0 = time.monotonic()
        rc = proc.wait(bound)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        server.close()
    # ggml has no error path here: the client process aborts, with ggml's reason on stderr.
    assert rc == -signal.SIGABRT, (rc, err[-2000:])
    assert "Remote RPC server crashed" in err
    assert elapsed < bound
    # A fresh client on a restarted server works.
    with pyllama.rpc_server(device="CPU", threads=1, port=port) as again:
        res = _split_run(starter_model_path, [again.endpoint])
    assert res["tokens"] == local_tokens


@pytest.mark.starter
def test_server_lost_between_uses_then_restarted(starter_model_path: Path, local_tokens: list[int]) -> None:
    server = pyllama.rpc_server(device="CPU", threads=1)
    port, ep = server.port, server.endpoint
    proc = _client({"mode": "lost-between-uses", "model": str(starter_model_path), "servers": [ep],
                    "prompt": PROMPT, "n": N_TOKENS}, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        assert _read_json(proc)["tokens"] == local_tokens
        server.kill()
        proc.stdin.write("\n")
        proc.stdin.flush()
        lost = _read_json(proc)
        assert lost["error"] and "unreachable" in lost["error"]
        remote = [d for d in lost["devices"] if d["endpoint"] == ep]
        assert remote and all(d["memory_total"] == 0 for d in remote)  # listed, not queried: no abort
        server = pyllama.rpc_server(device="CPU", threads=1, port=port)
        proc.stdin.write("\n")
        proc.stdin.flush()
        back = _read_json(proc)
        assert proc.wait(CHILD_TIMEOUT) == 0
    finally:
        proc.kill()
        server.close()
    assert back["tokens"] == local_tokens
    assert all(d["memory_total"] > 0 for d in back["devices"] if d["endpoint"] == ep)


@pytest.mark.starter
def test_server_tensor_cache(tmp_path: Path, starter_model_path: Path, local_tokens: list[int]) -> None:
    cache = tmp_path / "rpc-cache"
    with pyllama.rpc_server(device="CPU", threads=1, cache=cache) as server:
        for _ in range(2):  # the second client finds the large tensors in the cache
            res = _split_run(starter_model_path, [server.endpoint])
            assert res["tokens"] == local_tokens
            files = list(cache.iterdir())
            assert files and all(re.fullmatch(r"[0-9a-f]{16}", f.name) for f in files)


@pytest.mark.starter
def test_cli_run_with_rpc(servers: list[pyllama.RpcServer], starter_model_path: Path) -> None:
    eps = ",".join(s.endpoint for s in servers)
    out = subprocess.run([sys.executable, "-m", "pyllama", "run", str(starter_model_path), "--rpc", eps,
                          "-ngl", "all", "-p", PROMPT, "-n", "4", "--temp", "0", "-c", "256", "-t", "1"],
                         capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
    dead = f"127.0.0.1:{_free_port()}"
    out = subprocess.run([sys.executable, "-m", "pyllama", "run", str(starter_model_path), "--rpc", dead,
                          "-p", PROMPT, "-n", "4"], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert out.returncode == 1 and f"RPC server {dead} is unreachable" in out.stderr


# --- bench ---------------------------------------------------------------------------------------------
def test_bench_rpc_option_maps_to_llama_bench() -> None:
    from pyllama.benchmark.params import UsageError, parse_args

    p = parse_args(["-m", "x.gguf", "-rpc", "127.0.0.1:50052,127.0.0.1:50053", "-p", "16", "-n", "0"])
    assert p.rpc == "127.0.0.1:50052,127.0.0.1:50053"
    args = p.instances()[0].native_args()
    assert args[args.index("-rpc") + 1] == p.rpc
    with pytest.raises(UsageError, match="interleave test"):
        parse_args(["-m", "x.gguf", "-rpc", "127.0.0.1:50052", "--native"])
    assert parse_args(["-m", "x.gguf", "--rpc", "h:1", "--native", "--interleave", "test"]).rpc == "h:1"


@pytest.mark.starter
def test_server_killed_mid_generation_in_a_worker_is_a_clear_error(starter_model_path: Path,
                                                                   local_tokens: list[int]) -> None:
    """Through pyllama.Worker, the abort ggml makes of a lost server stays in the child: the app gets
    WorkerCrashedError naming it, within the stated bound, and the next load on a restarted server works."""
    bound = rpc.DEAD_PEER_SECONDS + 30
    server = pyllama.rpc_server(device="CPU", threads=1)
    port = server.port
    with pyllama.Worker(restart=True) as worker:
        worker.load(str(starter_model_path), rpc=[server.endpoint], n_ctx=512, n_threads=1)
        stream = worker.generate(PROMPT, max_tokens=100_000, ignore_eos=True)
        it = iter(stream)
        for _ in range(3):
            next(it)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(pyllama.WorkerCrashedError) as info:
            for _ in it:
                pass
        assert time.monotonic() - t0 < bound
        assert "Remote RPC server crashed" in str(info.value) or "SIGABRT" in str(info.value)
        server.close()
        with pyllama.rpc_server(device="CPU", threads=1, port=port) as again:
            worker.load(str(starter_model_path), rpc=[again.endpoint], n_ctx=256, n_threads=1, flash_attn="off")
            tokens = [ev.token for ev in worker.generate(PROMPT, max_tokens=N_TOKENS) if ev.token >= 0]
    assert tokens == local_tokens[: len(tokens)] and len(tokens) == len(local_tokens)
