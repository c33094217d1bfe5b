"""Benchmark records with llama-bench's fields, and its five output formats.

The field list, the JSON type of each field and the text forms used in CSV,
SQL and Markdown follow ``struct test`` and the printers of the vendored
``tools/llama-bench/llama-bench.cpp``, so a tool that reads llama-bench's
output reads ours. pyllama adds its own keys after llama-bench's (see
:data:`PYLLAMA_FIELDS`); they never change the meaning of a llama-bench key.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import IO, Any

from .params import FLASH_ATTN_NAMES, Instance, Params, defaults

# llama-bench's test::get_fields(), in order.
LLAMA_BENCH_FIELDS = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends",
    "model_filename", "model_type", "model_size", "model_n_params", "n_batch",
    "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode",
    "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode",
    "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx",
    "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
)
# test::get_field_type()
INT_FIELDS = frozenset({
    "build_number", "n_batch", "n_ubatch", "n_threads", "poll", "model_size", "model_n_params", "n_gpu_layers",
    "main_gpu", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "no_op_offload", "n_cpu_moe",
    "fit_target", "fit_min_ctx", "flash_attn",
})
BOOL_FIELDS = frozenset({"no_kv_offload", "cpu_strict", "embeddings", "no_host", "repack"})
FLOAT_FIELDS = frozenset({"avg_ts", "stddev_ts"})
# The JSON printers append these two arrays after the fields above.
SAMPLE_FIELDS = ("samples_ns", "samples_ts")

# Keys pyllama adds to every record (documented in bench/README.md).
PYLLAMA_FIELDS = {
    "binding": 'who ran the test: "pyllama" (this runner) or "llama.cpp" (the native llama-bench)',
    "pyllama_version": "the pyllama version that ran (or compared against) the test",
    "llama_commit": "full commit of the vendored llama.cpp",
    "machine": "label of the machine (--label, default: the host name)",
    "environment": "object: devices with memory, backend versions, CPU, cores, RAM, OS, Python, build flags",
}
# Extra keys of a pyllama record under --native.
NATIVE_FIELDS = {
    "native_avg_ts": "llama-bench's avg_ts for the same test, run interleaved",
    "native_stddev_ts": "llama-bench's stddev_ts for the same test",
    "native_samples_ts": "llama-bench's per-repetition tokens/s",
    "native_ratio": "median over repetitions of pyllama t/s / native t/s (paired, interleaved)",
    "native_ratio_min": "smallest per-repetition ratio",
    "native_ratio_max": "largest per-repetition ratio",
    "native_ratio_stddev": "sample standard deviation of the per-repetition ratios",
    "interleave": '"rep" (pyllama and native alternate every repetition) or "test"',
}


def _cpp_stdev_u64(v: list[int]) -> int:
    """llama-bench's ``stdev<uint64_t>``: the same formula with integer truncation."""
    n = len(v)
    if n <= 1:
        return 0
    mean = sum(v) // n
    sq_sum = sum(x * x for x in v)
    var = sq_sum // (n - 1) - mean * mean * n // (n - 1)
    return int(math.sqrt(max(var, 0)))


def _stdev_f(v: list[float]) -> float:
    """llama-bench's ``stdev<double>``."""
    n = len(v)
    if n <= 1:
        return 0.0
    mean = sum(v) / n
    sq_sum = sum(x * x for x in v)
    return math.sqrt(max(sq_sum / (n - 1) - mean * mean * n / (n - 1), 0.0))


@dataclass
class Record:
    """One test's result: llama-bench's ``struct test`` plus pyllama's keys."""

    inst: Instance
    build_commit: str
    build_number: int
    cpu_info: str
    gpu_info: str
    backends: str
    model_type: str
    model_size: int
    model_n_params: int
    test_time: str
    samples_ns: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    # --- statistics, exactly as llama-bench computes them ---------------------------
    @property
    def samples_ts(self) -> list[float]:
        n_tokens = self.inst.n_prompt + self.inst.n_gen
        return [1e9 * n_tokens / t for t in self.samples_ns]

    @property
    def avg_ns(self) -> int:
        return sum(self.samples_ns) // len(self.samples_ns) if self.samples_ns else 0

    @property
    def stddev_ns(self) -> int:
        return _cpp_stdev_u64(self.samples_ns)

    @property
    def avg_ts(self) -> float:
        ts = self.samples_ts
        return sum(ts) / len(ts) if ts else 0.0

    @property
    def stddev_ts(self) -> float:
        return _stdev_f(self.samples_ts)

    # --- llama-bench's views ---------------------------------------------------------
    def tensor_split_str(self) -> str:
        ts = self.inst.tensor_split
        max_nonzero = 0
        for i, v in enumerate(ts):
            if v > 0:
                max_nonzero = i
        return "/".join(f"{ts[i]:.2f}" for i in range(max_nonzero + 1))

    def typed_values(self) -> dict[str, Any]:
        """llama-bench's fields with their JSON types (str, int, bool, float), in its order."""
        i = self.inst
        return {
            "build_commit": self.build_commit, "build_number": self.build_number,
            "cpu_info": self.cpu_info, "gpu_info": self.gpu_info, "backends": self.backends,
            "model_filename": i.model, "model_type": self.model_type, "model_size": self.model_size,
            "model_n_params": self.model_n_params, "n_batch": i.n_batch, "n_ubatch": i.n_ubatch,
            "n_threads": i.n_threads, "cpu_mask": i.cpu_mask, "cpu_strict": i.cpu_strict, "poll": i.poll,
            "type_k": i.type_k, "type_v": i.type_v, "n_gpu_layers": i.n_gpu_layers, "n_cpu_moe": i.n_cpu_moe,
            "split_mode": i.split_mode, "main_gpu": i.main_gpu, "no_kv_offload": i.no_kv_offload,
            "flash_attn": i.flash_attn, "devices": i.devices, "tensor_split": self.tensor_split_str(),
            "tensor_buft_overrides": i.tensor_buft_overrides, "load_mode": i.load_mode, "lazy_mode": i.lazy_mode,
            "embeddings": i.embeddings, "no_op_offload": int(i.no_op_offload), "no_host": i.no_host,
            "repack": i.repack, "fit_target": i.fit_target, "fit_min_ctx": i.fit_min_ctx,
            "n_prompt": i.n_prompt, "n_gen": i.n_gen, "n_depth": i.n_depth, "test_time": self.test_time,
            "avg_ns": self.avg_ns, "stddev_ns": self.stddev_ns, "avg_ts": self.avg_ts, "stddev_ts": self.stddev_ts,
        }

    def string_values(self) -> list[str]:
        """``test::get_values()``: the text forms used by CSV, SQL and Markdown."""
        out = []
        for k, v in self.typed_values().items():
            if isinstance(v, bool):
                out.append("1" if v else "0")
            elif isinstance(v, float):
                out.append(f"{v:.6f}")  # std::to_string(double)
            else:
                out.append(str(v))
        return out

    def as_json(self) -> dict[str, Any]:
        """The JSON object: llama-bench's keys, then samples, then pyllama's keys."""
        d = self.typed_values()
        d["samples_ns"] = list(self.samples_ns)
        d["samples_ts"] = self.samples_ts
        d.update(self.extra)
        return d

    @property
    def binding(self) -> str:
        return str(self.extra.get("binding", "pyllama"))


def record_from_native(obj: dict[str, Any], inst: Instance, extra: dict[str, Any]) -> Record:
    """A :class:`Record` from one JSON object that the native llama-bench printed."""
    return Record(
        inst=inst, build_commit=str(obj["build_commit"]), build_number=int(obj["build_number"]),
        cpu_info=str(obj["cpu_info"]), gpu_info=str(obj["gpu_info"]), backends=str(obj["backends"]),
        model_type=str(obj["model_type"]), model_size=int(obj["model_size"]),
        model_n_params=int(obj["model_n_params"]), test_time=str(obj["test_time"]),
        samples_ns=[int(x) for x in obj["samples_ns"]], extra=dict(extra),
    )


def ratio_stats(py: Record, nat: Record) -> dict[str, Any]:
    """pyllama/native per repetition (pairs in run order) and their spread."""
    ratios = [a / b for a, b in zip(py.samples_ts, nat.samples_ts) if b > 0]
    return {
        "native_avg_ts": nat.avg_ts,
        "native_stddev_ts": nat.stddev_ts,
        "native_samples_ts": nat.samples_ts,
        "native_ratio": statistics.median(ratios) if ratios else None,
        "native_ratio_min": min(ratios) if ratios else None,
        "native_ratio_max": max(ratios) if ratios else None,
        "native_ratio_stddev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
    }


# --- printers ------------------------------------------------------------------------------

def _csv_escape(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


class Printer:
    """llama-bench's printer interface: header, one call per test, footer."""

    def __init__(self, fout: IO[str], params: Params) -> None:
        self.fout = fout
        self.params = params

    def header(self) -> None:
        pass

    def test(self, rec: Record, native: Record | None = None) -> None:
        raise NotImplementedError

    def footer(self) -> None:
        pass

    def _w(self, s: str) -> None:
        self.fout.write(s)
        self.fout.flush()


def _scalar_extras(rec: Record) -> dict[str, Any]:
    return {k: v for k, v in rec.extra.items() if not isinstance(v, (dict, list))}


class CsvPrinter(Printer):
    """llama-bench's CSV, plus pyllama's scalar keys as trailing columns."""

    _extra_cols: list[str]

    def header(self) -> None:
        self._extra_cols = ["binding", "pyllama_version", "llama_commit", "machine"]
        if self.params.native:
            self._extra_cols += [k for k in NATIVE_FIELDS if k != "native_samples_ts"]
        self._w(",".join([*LLAMA_BENCH_FIELDS, *self._extra_cols]) + "\n")

    def test(self, rec: Record, native: Record | None = None) -> None:
        for r in (rec, native):
            if r is None:
                continue
            extras = _scalar_extras(r)
            vals = r.string_values() + ["" if extras.get(c) is None else str(extras[c]) for c in self._extra_cols]
            self._w(",".join(_csv_escape(v) for v in vals) + "\n")


class JsonPrinter(Printer):
    """A JSON array laid out as llama-bench lays it out."""

    first = True

    def header(self) -> None:
        self._w("[\n")

    def test(self, rec: Record, native: Record | None = None) -> None:
        for r in (rec, native):
            if r is None:
                continue
            self._w("  {\n" if self.first else ",\n  {\n")
            self.first = False
            items = list(r.as_json().items())
            body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in items)
            self._w(body + "\n  }")

    def footer(self) -> None:
        self._w("\n]\n")


class JsonlPrinter(Printer):
    """One JSON object per line."""

    def test(self, rec: Record, native: Record | None = None) -> None:
        for r in (rec, native):
            if r is not None:
                self._w(json.dumps(r.as_json(), ensure_ascii=False) + "\n")


class SqlPrinter(Printer):
    """llama-bench's SQL (pyllama's keys are left out: the table is llama-bench's)."""

    def header(self) -> None:
        def sql_type(f: str) -> str:
            return "INTEGER" if f in INT_FIELDS or f in BOOL_FIELDS else "REAL" if f in FLOAT_FIELDS else "TEXT"
        cols = ",\n".join(f"  {f} {sql_type(f)}" for f in LLAMA_BENCH_FIELDS)
        self._w(f"CREATE TABLE IF NOT EXISTS llama_bench (\n{cols}\n);\n\n")

    def test(self, rec: Record, native: Record | None = None) -> None:
        for r in (rec, native):
            if r is None:
                continue
            vals = ", ".join(f"'{v}'" for v in r.string_values())
            self._w(f"INSERT INTO llama_bench ({', '.join(LLAMA_BENCH_FIELDS)}) VALUES ({vals});\n")


_MD_DISPLAY = {
    "n_gpu_layers": "ngl", "split_mode": "sm", "n_threads": "threads", "no_kv_offload": "nkvo", "flash_attn": "fa",
    "load_mode": "lm", "embeddings": "embd", "no_op_offload": "nopo", "no_host": "noh", "repack": "rpk",
    "devices": "dev", "tensor_split": "ts", "tensor_buft_overrides": "ot", "fit_target": "fitt",
    "fit_min_ctx": "fitc",
}
_MD_WIDTH = {
    "model": -30, "t/s": 20, "size": 10, "params": 10, "n_gpu_layers": 3, "n_threads": 7, "n_batch": 7,
    "n_ubatch": 8, "type_k": 6, "type_v": 6, "split_mode": 6, "load_mode": 10, "flash_attn": 3, "devices": -12,
    "test": 15, "no_op_offload": 4, "no_host": 4, "repack": 3, "native t/s": 20, "ratio": 22,
}


def _md_width(f: str) -> int:
    if f in _MD_WIDTH:
        return _MD_WIDTH[f]
    w = max(len(f), 10)
    is_str = f not in INT_FIELDS and f not in BOOL_FIELDS and f not in FLOAT_FIELDS
    return -w if is_str else w


class MarkdownPrinter(Printer):
    """llama-bench's Markdown table; under --native two more columns: native t/s and the ratio."""

    fields: list[str]
    backends = "CPU"

    def header(self) -> None:
        p = self.params
        f = ["model", "size", "params", "backend"]
        is_cpu = any(b in self.backends for b in ("CPU", "BLAS", "ZenDNN"))
        if not is_cpu:
            f.append("n_gpu_layers")
        if p.differs_from_default("n_cpu_moe"):
            f.append("n_cpu_moe")
        if p.differs_from_default("n_threads") or is_cpu:
            f.append("n_threads")
        for name in ("cpu_mask", "cpu_strict", "poll", "n_batch", "n_ubatch", "type_k", "type_v", "main_gpu",
                     "split_mode", "no_kv_offload", "flash_attn", "devices", "tensor_split"):
            if p.differs_from_default(name):
                f.append(name)
        for name in ("load_mode", "lazy_mode", "embeddings", "no_op_offload", "no_host", "repack"):
            if p.differs_from_default(name):
                f.append(name)
        f += ["test", "t/s"]
        if p.native:
            f += ["native t/s", "ratio"]
        self.fields = f
        self._w("|" + "".join(f" {self._pad(_MD_DISPLAY.get(x, x), _md_width(x))} |" for x in f) + "\n")
        self._w("|" + "".join(f" {'-' * (abs(_md_width(x)) - 1)}{':' if _md_width(x) > 0 else '-'} |" for x in f)
                + "\n")

    @staticmethod
    def _pad(s: str, width: int) -> str:
        return s.ljust(-width) if width < 0 else s.rjust(width)

    def test(self, rec: Record, native: Record | None = None) -> None:
        vmap = dict(zip(LLAMA_BENCH_FIELDS, rec.string_values()))
        cells = []
        for f in self.fields:
            if f == "model":
                v = rec.model_type
            elif f == "size":
                s = rec.model_size
                v = f"{s / 1024 / 1024:.2f} MiB" if s < 1024 ** 3 else f"{s / 1024 ** 3:.2f} GiB"
            elif f == "params":
                n = rec.model_n_params
                v = f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"
            elif f == "backend":
                v = rec.backends
            elif f == "test":
                v = rec.inst.name
            elif f == "t/s":
                v = f"{rec.avg_ts:.2f} ± {rec.stddev_ts:.2f}"
            elif f == "native t/s":
                v = f"{native.avg_ts:.2f} ± {native.stddev_ts:.2f}" if native else ""
            elif f == "ratio":
                r = rec.extra
                v = (f"{r['native_ratio']:.3f} [{r['native_ratio_min']:.3f}–{r['native_ratio_max']:.3f}]"
                     if native and r.get("native_ratio") is not None else "")
            elif f == "flash_attn":
                v = vmap[f]
            else:
                v = vmap[f]
            cells.append(self._pad(v, _md_width(f)))
        self._w("|" + "".join(f" {c} |" for c in cells) + "\n")

    def footer(self) -> None:
        self._w(f"\nbuild: {self.build_commit} ({self.build_number}), pyllama {self.pyllama_version}\n")

    build_commit = ""
    build_number = 0
    pyllama_version = ""


def make_printer(fmt: str, fout: IO[str], params: Params) -> Printer | None:
    cls: dict[str, type[Printer]] = {"csv": CsvPrinter, "json": JsonPrinter, "jsonl": JsonlPrinter,
                                     "md": MarkdownPrinter, "sql": SqlPrinter}
    return None if fmt == "none" else cls[fmt](fout, params)


__all__ = ["Record", "LLAMA_BENCH_FIELDS", "PYLLAMA_FIELDS", "NATIVE_FIELDS", "SAMPLE_FIELDS", "make_printer",
           "record_from_native", "ratio_stats", "FLASH_ATTN_NAMES", "defaults"]
