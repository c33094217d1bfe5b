"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible server.

vLLM's ``bench serve`` metrics per concurrency level: request throughput,
output tokens/s, and TTFT, inter-token latency (ITL) and end-to-end latency
(E2E) as median / p90 / p99. Every request streams a fixed prompt with a fixed
``max_tokens`` and ``ignore_eos`` (both pyllama serve and llama-server honour
it), greedy, so every request does the same work on either server.

    # against a running server
    python bench/serve.py --url http://127.0.0.1:8080 -c 1,4,8 -n 128

    # pyllama serve and llama-server (bench/native.py --server) on the same model,
    # slots, context and threads, measured interleaved (A B A B) with ratios
    python bench/serve.py --compare [MODEL] --slots 4 --ctx 2048 --threads 2 -c 1,4,8 -n 128 --rounds 2

Clients are httpx streams parsed by hand (the load generator shares the machine
with the servers, so it is kept light). Each level runs ``--requests`` requests
(default: 4 per client) through ``concurrency`` workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List the steps to bake a loaf of sourdough bread, with tips for beginners.",
    "Describe the water cycle and why it matters for agriculture.",
    "Write a letter from a cat to its owner about the quality of the food.",
    "Summarise the history of the printing press in a few paragraphs.",
    "What are the pros and cons of remote work for a small software company?",
    "Compose a poem about autumn leaves falling in a quiet park.",
]


@dataclass
class Sample:
    """One request as the client saw it (seconds)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    failed: int
    duration: float
    request_throughput: float
    output_throughput: float
    ttft: dict[str, float]
    itl: dict[str, float]
    e2e: dict[str, float]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    s = sorted(values)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"median": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(s)}


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> Sample:
    t0 = time.perf_counter()
    first: float | None = None
    last = t0
    itl: list[float] = []
    n_chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return Sample(ok=False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Sample(ok=False, error=str(obj["error"])[:200])
                if obj.get("usage"):
                    usage_tokens = int(obj["usage"].get("completion_tokens", 0)) or usage_tokens
                choices = obj.get("choices") or []
                if not choices:
                    continue
                text = choices[0].get("text")
                if text is None:
                    text = (choices[0].get("delta") or {}).get("content")
                if not text:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                n_chunks += 1
    except httpx.HTTPError as exc:
        return Sample(ok=False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None:
        return Sample(ok=False, error="no token received")
    tokens = usage_tokens if usage_tokens is not None else n_chunks
    # A chunk may carry several tokens (a held-back stop prefix, a multi-byte character):
    # spread its gap over them, as vLLM does, so ITL is per token.
    if tokens > n_chunks > 1 and itl:
        scale = (n_chunks - 1) / (tokens - 1)
        itl = [g * scale for g in itl]
    return Sample(ok=True, ttft=first - t0, e2e=end - t0, itl=itl, output_tokens=tokens)


async def run_level(base_url: str, *, concurrency: int, n_requests: int, max_tokens: int, model: str | None,
                    endpoint: str, api_key: str | None, server: str, timeout: float) -> LevelResult:
    url = base_url.rstrip("/") + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    samples: list[Sample] = []

    def body(i: int) -> dict[str, Any]:
        prompt = PROMPTS[i % len(PROMPTS)]
        b: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                             "stream_options": {"include_usage": True}}
        if model:
            b["model"] = model
        if endpoint == "chat":
            b["messages"] = [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt
        return b

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    tmo = httpx.Timeout(timeout, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=tmo) as client:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                samples.append(await one_request(client, url, body(i), headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    ok = [s for s in samples if s.ok]
    for s in samples:
        if not s.ok:
            print(f"  {server}: request failed: {s.error}", file=sys.stderr)
    out_tokens = sum(s.output_tokens for s in ok)
    return LevelResult(server=server, concurrency=concurrency, requests=len(ok), failed=len(samples) - len(ok),
                       duration=duration, request_throughput=len(ok) / duration,
                       output_throughput=out_tokens / duration,
                       ttft=percentiles([s.ttft for s in ok]), itl=percentiles([g for s in ok for g in s.itl]),
                       e2e=percentiles([s.e2e for s in ok]))


# --- servers for --compare -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server child process; stopped (SIGTERM, then SIGKILL) on exit, never left behind."""

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{name}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        print(f"starting {self.name}: {' '.join(self.cmd)}", file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become healthy; log: {self.log.name}")
            time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()


def _model_path(arg: str | None) -> str:
    if arg and arg != "starter":
        return arg
    import pyllama

    return str(pyllama.starter_model_path())


def pyllama_cmd(model: str, port: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "pyllama", "serve", model, "--port", str(port), "--slots", str(args.slots),
            "--ctx-slot", str(args.ctx), "-t", str(args.threads), "-b", str(args.batch_size),
            "-ub", str(args.ubatch_size), "-fa", args.flash_attn, "--alias", "bench"]


def llama_server_cmd(exe: Path, model: str, port: int, args: argparse.Namespace) -> list[str]:
    # -np slots with a unified KV cache capped at --ctx tokens per slot: pyllama's engine layout
    return [str(exe), "-m", model, "--port", str(port), "--host", "127.0.0.1", "-np", str(args.slots),
            "-kvu", "--kv-unified-per-slot", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads),
            "-b", str(args.batch_size), "-ub", str(args.ubatch_size), "-fa", args.flash_attn, "--alias", "bench",
            "--no-webui", "--metrics"]


def llama_server_exe() -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    import native

    return Path(native.server_tool())


# --- reporting ---------------------------------------------------------------------------------

def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def print_levels(results: list[LevelResult], *, header: bool = True) -> None:
    if header:
        print(f"{'server':<14}{'conc':>5}{'ok':>5}{'fail':>5}{'req/s':>8}{'out tok/s':>11}"
              f"{'TTFT ms p50/p90/p99':>24}{'ITL ms p50/p90/p99':>22}{'E2E s p50/p90/p99':>20}")
    for r in results:
        ttft = "/".join(_ms(r.ttft[k]) for k in ("median", "p90", "p99"))
        itl = "/".join(_ms(r.itl[k]) for k in ("median", "p90", "p99"))
        e2e = "/".join(f"{r.e2e[k]:.2f}" for k in ("median", "p90", "p99"))
        print(f"{r.server:<14}{r.concurrency:>5}{r.requests:>5}{r.failed:>5}{r.request_throughput:>8.2f}"
              f"{r.output_throughput:>11.1f}{ttft:>24}{itl:>22}{e2e:>20}", flush=True)


def _combine(rs: list[LevelResult]) -> dict[str, float]:
    """Per-round throughput averaged; latency percentiles averaged over rounds."""
    return {
        "req/s": statistics.fmean(r.request_throughput for r in rs),
        "out tok/s": statistics.fmean(r.output_throughput for r in rs),
        "TTFT p50 ms": 1000 * statistics.fmean(r.ttft["median"] for r in rs),
        "TTFT p90 ms": 1000 * statistics.fmean(r.ttft["p90"] for r in rs),
        "ITL p50 ms": 1000 * statistics.fmean(r.itl["median"] for r in rs),
        "ITL p90 ms": 1000 * statistics.fmean(r.itl["p90"] for r in rs),
        "E2E p50 s": statistics.fmean(r.e2e["median"] for r in rs),
        "E2E p99 s": statistics.fmean(r.e2e["p99"] for r in rs),
    }


def print_compare(results: list[LevelResult], a: str, b: str) -> None:
    levels = sorted({r.concurrency for r in results})
    print(f"\n| concurrency | metric | {a} | {b} | {a}/{b} |\n|---:|---|---:|---:|---:|")
    for c in levels:
        ca = _combine([r for r in results if r.server == a and r.concurrency == c])
        cb = _combine([r for r in results if r.server == b and r.concurrency == c])
        for k in ca:
            ratio = ca[k] / cb[k] if cb[k] else float("nan")
            print(f"| {c} | {k} | {ca[k]:.2f} | {cb[k]:.2f} | {ratio:.3f} |")


# --- main ----------------------------------------------------------------------------------------

def parse_levels(s: str) -> list[int]:
    levels = [int(x) for x in s.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError("concurrency levels are integers >= 1, e.g. 1,4,8")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="server to measure (e.g. http://127.0.0.1:8080)")
    ap.add_argument("--compare", nargs="?", const="starter", metavar="MODEL",
                    help="start pyllama serve and llama-server on MODEL (default: the starter) and compare")
    ap.add_argument("-c", "--concurrency", type=parse_levels, default=[1, 4, 8])
    ap.add_argument("-n", "--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 per client)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--model", default=None, help="model field of the requests")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--rounds", type=int, default=1, help="--compare: A B rounds per level")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-fa", "--flash-attn", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--only", choices=["pyllama", "llama-server"], default=None,
                    help="--compare: start just one of the two servers")
    ap.add_argument("-o", "--output", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if bool(args.url) == bool(args.compare):
        ap.error("give either --url or --compare")

    def n_req(c: int) -> int:
        return args.requests if args.requests is not None else 4 * c

    results: list[LevelResult] = []

    def level(url: str, name: str, c: int, model: str | None) -> None:
        r = asyncio.run(run_level(url, concurrency=c, n_requests=n_req(c), max_tokens=args.max_tokens, model=model,
                                  endpoint=args.endpoint, api_key=args.api_key, server=name, timeout=args.timeout))
        print_levels([r], header=not results)
        results.append(r)

    if args.url:
        for c in args.concurrency:
            level(args.url, "server", c, args.model)
    else:
        model = _model_path(args.compare)
        servers: list[tuple[str, list[str], int]] = []
        if args.only in (None, "pyllama"):
            p = free_port()
            servers.append(("pyllama", pyllama_cmd(model, p, args), p))
        if args.only in (None, "llama-server"):
            p = free_port()
            servers.append(("llama-server", llama_server_cmd(llama_server_exe(), model, p, args), p))
        with contextlib.ExitStack() as stack:
            running = [stack.enter_context(ServerProcess(name, cmd, port)) for name, cmd, port in servers]
            for srv in running:  # warm-up: first-request costs are not part of any level
                asyncio.run(run_level(srv.url, concurrency=1, n_requests=1, max_tokens=8, model="bench",
                                      endpoint=args.endpoint, api_key=None, server=srv.name, timeout=args.timeout))
            for c in args.concurrency:
                for _ in range(args.rounds):
                    for srv in running:  # interleaved: A B A B
                        level(srv.url, srv.name, c, "bench")
        if len(servers) == 2:
            print_compare(results, "pyllama", "llama-server")
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
