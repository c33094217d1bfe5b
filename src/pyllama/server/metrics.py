"""Prometheus text exposition of the server's and the engine's counters (no client library needed).

The server counts what only it sees (requests by endpoint and status, time to
first token, inter-token latency, end-to-end latency); the engine's own
counters (tokens, queue, slots, steps, batched steps) are read from one
:class:`~pyllama.engine.EngineStats` snapshot per scrape.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import fields
from typing import Any

PREFIX = "pyllama_"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """A cumulative histogram with fixed upper bounds (observations are O(log buckets))."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        n = PREFIX + self.name
        lines = [f"# HELP {n} {self.help}", f"# TYPE {n} histogram"]
        acc = 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            lines.append(f'{n}_bucket{{le="{bound}"}} {acc}')
        lines.append(f'{n}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{n}_sum {self.sum}", f"{n}_count {self.count}"]
        return lines


# EngineStats field -> (metric name, type, help); counters end in _total.
_ENGINE = {
    "n_slots": ("slots", "gauge", "Sequence slots of the engine."),
    "busy_slots": ("slots_busy", "gauge", "Slots holding a request now."),
    "queue_len": ("queue_length", "gauge", "Requests waiting for a slot."),
    "requests_total": ("engine_requests_total", "counter", "Requests submitted to the engine."),
    "requests_done": ("engine_requests_done_total", "counter", "Requests the engine finished."),
    "requests_cancelled": ("engine_requests_cancelled_total", "counter", "Requests cancelled (client gone)."),
    "requests_rejected": ("engine_requests_rejected_total", "counter", "Requests refused (queue full)."),
    "requests_failed": ("engine_requests_failed_total", "counter", "Requests that failed in the engine."),
    "steps": ("engine_steps_total", "counter", "Engine steps (one llama_decode each)."),
    "batched_steps": ("engine_batched_steps_total", "counter",
                      "Steps whose one llama_decode held tokens of two or more requests."),
    "max_requests_in_step": ("engine_max_requests_in_step", "gauge", "Most requests decoded in one step."),
    "prompt_tokens": ("prompt_tokens_total", "counter", "Prompt tokens of submitted requests."),
    "cached_prompt_tokens": ("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's cache."),
    "generated_tokens": ("generation_tokens_total", "counter", "Tokens generated."),
    "draft_tokens": ("draft_tokens_total", "counter", "Speculative decoding: draft tokens verified."),
    "draft_accepted_tokens": ("draft_tokens_accepted_total", "counter",
                              "Speculative decoding: draft tokens the model agreed with."),
}


class Metrics:
    """The server's counters and histograms; thread-safe updates, rendered on scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request arrival to its first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive streamed tokens.", ITL_BUCKETS)
        self.e2e = Histogram("request_latency_seconds", "End-to-end latency of generation requests.", E2E_BUCKETS)
        # llama-server's (llamacpp:*): totals, and the rates since the last scrape
        self.prompt_s = self.predict_s = 0.0
        self.n_tokens_max = 0
        self.embed_tokens = self.embed_decodes = 0
        self.bucket_prompt_n = self.bucket_gen_steps = 0
        self.bucket_prompt_s = self.bucket_gen_s = 0.0

    def count_generation(self, prompt_n: int, prompt_s: float, gen_steps: int, gen_s: float, n_tokens: int) -> None:
        """One finished generation, for llama-server's metrics: prompt tokens decoded and their time,
        generation steps (tokens after the first) and their time, and the sequence's length."""
        with self._lock:
            self.prompt_s += prompt_s
            self.predict_s += gen_s
            self.n_tokens_max = max(self.n_tokens_max, n_tokens)
            self.bucket_prompt_n += prompt_n
            self.bucket_prompt_s += prompt_s
            self.bucket_gen_steps += gen_steps
            self.bucket_gen_s += gen_s

    def count_embedding(self, n_tokens: int, n_decodes: int) -> None:
        """An embedding request: its prompt tokens and decodes count too, as in llama-server."""
        with self._lock:
            self.embed_tokens += n_tokens
            self.embed_decodes += n_decodes

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe(self, hist: Histogram, value: float) -> None:
        with self._lock:
            hist.observe(value)

    def observe_many(self, hist: Histogram, values: list[float]) -> None:
        with self._lock:
            for v in values:
                hist.observe(v)

    def render(self, stats: Any | None, *, model_name: str, loaded: bool) -> str:
        """The exposition text; ``stats`` is an EngineStats snapshot (None while loading)."""
        lines = [f"# HELP {PREFIX}model_loaded 1 once the model is loaded and the engine runs.",
                 f"# TYPE {PREFIX}model_loaded gauge", f'{PREFIX}model_loaded{{model="{_esc(model_name)}"}} {int(loaded)}',
                 f"# HELP {PREFIX}http_requests_total HTTP requests by endpoint and status code.",
                 f"# TYPE {PREFIX}http_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{PREFIX}http_requests_total{{endpoint="{_esc(endpoint)}",status="{status}"}} {n}')
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
        if stats is not None:
            present = {f.name for f in fields(stats)}
            for field, (name, kind, help) in _ENGINE.items():
                if field in present:
                    lines += [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} {kind}",
                              f"{PREFIX}{name} {getattr(stats, field)}"]
        return "\n".join(lines) + "\n"


    def render_llamacpp(self, stats: Any | None) -> str:
        """llama-server's metrics (``llamacpp:*``, server-context.cpp's metrics handler); the rates are
        over the time since the previous scrape, as llama-server's."""
        def get(name: str) -> float:
            return float(getattr(stats, name, 0) or 0) if stats is not None else 0.0

        with self._lock:
            steps = get("steps") + self.embed_decodes
            counters = [
                ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens",
                 get("prompt_tokens") + self.embed_tokens),
                ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache",
                 get("cached_prompt_tokens")),
                ("prompt_seconds_total", "Total time spent processing prompts", self.prompt_s),
                ("tokens_predicted_total", "Number of generation tokens processed", get("generated_tokens")),
                ("tokens_predicted_seconds_total", "Total time spent generating tokens", self.predict_s),
                ("n_decode_total", "Total number of llama_decode() calls", steps),
                ("n_tokens_max", "Largest observed sequence length (prompt + generation)", self.n_tokens_max),
                ("spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated",
                 get("draft_tokens")),
                ("spec_decode_num_accepted_tokens_total", "Speculative: Total draft tokens accepted by the target "
                 "model", get("draft_accepted_tokens")),
                ("spec_decode_num_drafts_total", "Speculative: Total speculative decoding verification steps",
                 get("draft_steps")),
            ]
            gauges = [
                ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
                 self.bucket_prompt_n / self.bucket_prompt_s if self.bucket_prompt_s > 0 else 0.0),
                ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
                 self.bucket_gen_steps / self.bucket_gen_s if self.bucket_gen_s > 0 else 0.0),
                ("requests_processing", "Number of requests processing", get("busy_slots")),
                ("requests_deferred", "Number of requests deferred", get("queue_len")),
                ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
                 get("busy_slot_steps") / max(get("steps"), 1.0)),
            ]
            self.bucket_prompt_n = self.bucket_gen_steps = 0
            self.bucket_prompt_s = self.bucket_gen_s = 0.0
        lines = []
        for kind, items in (("counter", counters), ("gauge", gauges)):
            for name, help, value in items:
                v = int(value) if float(value).is_integer() else value
                lines += [f"# HELP llamacpp:{name} {help}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {v}"]
        return "\n".join(lines) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["Metrics", "Histogram"]
