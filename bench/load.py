"""A bounded load test of `pyllama serve`: many users, a mix of requests, misbehaving readers.

Starts the server itself (a subprocess on loopback), then runs ``--users`` asyncio users for ``--duration``
seconds. Each user loops over a weighted mix: chat completions streamed and not, text completions
streamed and not, embeddings, tokenize. ``--abandon`` of the streams are dropped after a few chunks
(the client closes the connection), ``--slow`` of them are read one chunk a second. Every request has a
deadline (``--stall``): one that passes it counts as stalled. It reports errors by kind (a 503 with
Retry-After is the server shedding load, counted apart), p50/p99 time to first token and inter-token
latency of the streams read at full speed, and the server's RSS (slope over the run), open file
descriptors and threads at the start and after the load (once idle).

    python bench/load.py                                   # the chat starter, 64 users, 10 minutes
    python bench/load.py -m model.gguf --users 16 --duration 20 --slots 4

Exit status 0 when there were no errors other than 503s, no stalled request, and the descriptors and
threads came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ServerProcess, free_port, percentiles  # noqa: E402 - bench/serve.py's server and quantiles

MIX = (("chat-stream", 35), ("chat", 15), ("completion-stream", 15), ("completion", 10), ("embedding", 10),
       ("tokenize", 15))
PROMPTS = ("What is the capital of France?", "Write a haiku about rain.", "List three primary colours.",
           "Explain what a CPU does in one sentence.", "Say hello in Spanish.", "What is 12 times 12?")


@dataclass
class Outcome:
    kind: str
    status: str  # "ok", "abandoned", "503", "http NNN", "stalled", "error: ..."
    seconds: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    slow: bool = False


def _proc_facts(pid: int) -> dict[str, float]:
    facts: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                facts["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                facts["threads"] = int(line.split()[1])
        facts["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return facts


class Load:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.outcomes: list[Outcome] = []
        self.rng = random.Random(args.seed)
        self.kinds = [k for k, _ in MIX]
        self.weights = [w for _, w in MIX]

    async def user(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            t0 = time.monotonic()
            try:
                out = await asyncio.wait_for(self.one(client, kind), self.args.stall)
            except asyncio.TimeoutError:
                out = Outcome(kind, "stalled", time.monotonic() - t0)
            except httpx.HTTPError as exc:
                out = Outcome(kind, f"error: {type(exc).__name__}", time.monotonic() - t0)
            self.outcomes.append(out)

    async def one(self, client: httpx.AsyncClient, kind: str) -> Outcome:
        prompt = self.rng.choice(PROMPTS)
        n = self.args.max_tokens
        t0 = time.monotonic()
        if kind == "embedding":
            r = await client.post("/v1/embeddings", json={"input": [prompt, prompt[::-1]]})
            return Outcome(kind, "ok" if r.status_code == 200 else _status(r.status_code), time.monotonic() - t0)
        if kind == "tokenize":
            r = await client.post("/tokenize", json={"content": prompt})
            return Outcome(kind, "ok" if r.status_code == 200 else _status(r.status_code), time.monotonic() - t0)
        chat = kind.startswith("chat")
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict[str, Any] = {"max_tokens": n, "temperature": 0.7, "seed": self.rng.randrange(1 << 30)}
        body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        if not kind.endswith("stream"):
            r = await client.post(path, json=body)
            return Outcome(kind, "ok" if r.status_code == 200 else _status(r.status_code), time.monotonic() - t0)
        body["stream"] = True
        abandon = self.rng.random() < self.args.abandon
        slow = not abandon and self.rng.random() < self.args.slow
        cut_after = self.rng.randint(1, 4)
        out = Outcome(kind, "ok", 0.0, slow=slow)
        last: float | None = None
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(kind, _status(r.status_code), time.monotonic() - t0)
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if '"error"' in line[:20]:
                    out.status = "error: in-band error event"
                    break
                if not _has_text(line):
                    continue  # the role chunk comes at once, before a slot: not a token
                now = time.monotonic()
                if out.ttft is None:
                    out.ttft = now - t0
                elif last is not None:
                    out.gaps.append(now - last)
                last = now
                chunks += 1
                if abandon and chunks >= cut_after:
                    out.status = "abandoned"
                    break  # leaving the block closes the connection: the server must free the slot
                if slow:
                    await asyncio.sleep(1.0)
        out.seconds = time.monotonic() - t0
        return out


def _has_text(line: str) -> bool:
    try:
        choices = json.loads(line[6:]).get("choices") or [{}]
    except ValueError:
        return False
    first = choices[0]
    return bool(first.get("text") or (first.get("delta") or {}).get("content"))


def _status(code: int) -> str:
    return "503" if code == 503 else f"http {code}"


async def _run(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    load = Load(url, args)
    samples: list[tuple[float, dict[str, float]]] = []
    limits = httpx.Limits(max_connections=args.users + 8, max_keepalive_connections=args.users)
    async with httpx.AsyncClient(base_url=url, timeout=args.stall + 5, limits=limits) as client:
        for _ in range(3):  # warm: the first requests load caches; the baseline is taken after them
            await load.one(client, "chat")
        await asyncio.sleep(1.0)
        before = _proc_facts(pid)
        start = time.monotonic()
        deadline = start + args.duration

        async def sample() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - start, _proc_facts(pid)))
                await asyncio.sleep(max(1.0, args.duration / 60))

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(load.user(client, deadline) for _ in range(args.users)))
        await sampler
        took = time.monotonic() - start
    await asyncio.sleep(args.settle)  # idle: keep-alive connections close, slots free
    # anyio's worker threads (request preparation) stay pooled and are let go when a later call finds
    # them idle for 10 s: one light request does that, as the next client would
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await client.post("/tokenize", json={"content": "hi"})
    await asyncio.sleep(1.0)
    after = _proc_facts(pid)
    outs = load.outcomes
    statuses: dict[str, int] = {}
    for o in outs:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    full = [o for o in outs if o.ttft is not None and not o.slow]
    ttft = percentiles([o.ttft for o in full if o.ttft is not None])
    itl = percentiles([g for o in full for g in o.gaps])
    xs = [t for t, f in samples if "rss_mb" in f]
    ys = [f["rss_mb"] for _, f in samples if "rss_mb" in f]
    slope = statistics.linear_regression(xs, ys).slope * 60 if len(xs) >= 3 else None
    bad = {k: v for k, v in statuses.items() if k not in ("ok", "abandoned", "503")}
    return {
        "users": args.users, "duration_s": round(took, 1), "requests": len(outs),
        "requests_per_s": round(len(outs) / took, 2), "statuses": statuses,
        "by_kind": {k: sum(1 for o in outs if o.kind == k) for k in load.kinds},
        "slow_streams": sum(1 for o in outs if o.slow),
        "ttft_p50_s": ttft["median"], "ttft_p99_s": ttft["p99"],
        "itl_p50_s": itl["median"], "itl_p99_s": itl["p99"],
        "rss_mb_start": before.get("rss_mb"), "rss_mb_end": after.get("rss_mb"),
        "rss_mb_max": max(ys) if ys else None, "rss_slope_mb_per_min": slope,
        "fds": [before.get("fds"), after.get("fds")], "threads": [before.get("threads"), after.get("threads")],
        "unexpected": bad,
        "ok": not bad and after.get("fds", 0) <= before.get("fds", 0) + 2
              and after.get("threads", 0) <= before.get("threads", 0) + 2,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="chat-starter", help="a GGUF path or reference (default: chat-starter)")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ctx-slot", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--abandon", type=float, default=0.10, help="share of streams dropped mid-way (0.10)")
    ap.add_argument("--slow", type=float, default=0.05, help="share of streams read a chunk a second (0.05)")
    ap.add_argument("--stall", type=float, default=180.0, help="a request past this many seconds is stalled")
    ap.add_argument("--settle", type=float, default=15.0, help="idle seconds before the final fds/threads count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=None, help="write the report as JSON here too")
    args = ap.parse_args(argv)

    port = free_port()
    cmd = [sys.executable, "-m", "pyllama", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--slots", str(args.slots), "--ctx-slot", str(args.ctx_slot), "--max-queue", str(args.users * 2)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with ServerProcess("pyllama", cmd, port) as server:  # stopped on the way out, whatever happens
        assert server.proc is not None
        report = asyncio.run(_run(server.url, args, server.proc.pid))
        report["server_alive"] = server.proc.poll() is None
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if report["ok"] and report["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
