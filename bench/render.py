"""Merge benchmark results from many machines into one Markdown table and plots.

Reads every ``*.jsonl`` file of a results directory (records written by
``pyllama bench -o jsonl`` / ``--save``, with or without ``--native``; plain
llama-bench JSONL is accepted too) and writes:

* ``README.md``: a summary table (prompt processing and generation tokens/s
  per machine, device and model, with the pyllama/native ratio) and a table of
  every test;
* ``throughput.png`` and ``ratio.png`` (matplotlib, Agg backend).

    python bench/render.py                       # bench/results -> bench/results
    python bench/render.py --results DIR --out DIR
    python bench/render.py --readme README.md    # also refresh the marked block of a README

When one (machine, device, model, test, settings) appears several times, the
most recent record (``test_time``) wins.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
SUMMARY_TESTS = ("pp512", "tg128")
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def test_name(r: dict[str, Any]) -> str:
    """llama-bench's test label (pp512, tg128, pp512+tg128, `` @ d4096``)."""
    p, g, d = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0)), int(r.get("n_depth", 0))
    s = f"pp{p}" if g == 0 else f"tg{g}" if p == 0 else f"pp{p}+tg{g}"
    if r.get("sampling"):  # pyllama bench --sampling: generation with every token sampled
        s += f" {r['sampling']}"
    return s + (f" @ d{d}" if d else "")


def device_label(r: dict[str, Any]) -> str:
    """The device that did the work: the GPU(s) when layers are offloaded, else the CPU."""
    gpu = str(r.get("gpu_info") or "")
    backends = str(r.get("backends") or "CPU")
    if gpu and int(r.get("n_gpu_layers", -1)) != 0 and backends not in ("CPU", "BLAS"):
        return gpu
    return str(r.get("cpu_info") or "CPU")


def model_label(r: dict[str, Any]) -> str:
    name = Path(str(r.get("model_filename", ""))).name
    mt = str(r.get("model_type", ""))
    return f"{mt} ({name})" if name else mt


@dataclass
class Row:
    """One configuration on one machine: its results per test, pyllama and native."""

    machine: str
    device: str
    backend: str
    model: str
    threads: str
    settings: str
    tests: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))

    @property
    def key(self) -> tuple[str, ...]:
        return (self.machine, self.device, self.backend, self.model, self.threads, self.settings)


def _settings(r: dict[str, Any]) -> str:
    """Non-default llama-bench settings that change throughput (shown so rows are comparable)."""
    parts = []
    if int(r.get("n_batch", 2048)) != 2048:
        parts.append(f"b={r['n_batch']}")
    if int(r.get("n_ubatch", 512)) != 512:
        parts.append(f"ub={r['n_ubatch']}")
    if int(r.get("flash_attn", -1)) != -1:
        parts.append(f"fa={'on' if int(r['flash_attn']) == 1 else 'off'}")
    for k in ("type_k", "type_v"):
        if r.get(k, "f16") != "f16":
            parts.append(f"{k[-1]}={r[k]}")
    if int(r.get("n_gpu_layers", -1)) not in (-1, 0) and str(r.get("backends", "CPU")) not in ("CPU", "BLAS"):
        parts.append(f"ngl={r['n_gpu_layers']}")
    for k, short in (("no_kv_offload", "nkvo"), ("embeddings", "embd"), ("no_op_offload", "nopo")):
        if r.get(k):
            parts.append(f"{short}=1")
    if r.get("repack", True) is False:
        parts.append("repack=0")
    return " ".join(parts)


def load_records(results: Path) -> list[dict[str, Any]]:
    """Every JSON object of every ``*.jsonl`` file (the file's stem is the default machine label)."""
    out: list[dict[str, Any]] = []
    for path in sorted(results.glob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not JSON ({exc})") from None
            r.setdefault("machine", path.stem)
            r.setdefault("binding", "llama.cpp")
            out.append(r)
    return out


def build_rows(records: list[dict[str, Any]]) -> list[Row]:
    rows: dict[tuple[str, ...], Row] = {}
    for r in sorted(records, key=lambda r: str(r.get("test_time", ""))):
        backend = str(r.get("backends", "CPU"))
        cpu_only = backend in ("CPU", "BLAS") or int(r.get("n_gpu_layers", -1)) == 0
        row = Row(machine=str(r["machine"]), device=device_label(r), backend=backend, model=model_label(r),
                  threads=str(r.get("n_threads", "")) if cpu_only else "", settings=_settings(r))
        row = rows.setdefault(row.key, row)
        # a sampled test's reference is llama-simple's loop in C: the native column for that test
        binding = "llama.cpp" if str(r["binding"]).startswith("llama.cpp") else str(r["binding"])
        row.tests[test_name(r)][binding] = r  # later records replace earlier ones
    return sorted(rows.values(), key=lambda x: x.key)


def _ts(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    return f"{float(r['avg_ts']):.2f} ± {float(r['stddev_ts']):.2f}"


def _ratio(py: dict[str, Any] | None, nat: dict[str, Any] | None) -> str:
    if py is None:
        return ""
    if py.get("native_ratio") is not None:
        return f"{py['native_ratio']:.3f} ({py['native_ratio_min']:.3f}–{py['native_ratio_max']:.3f})"
    if nat is not None and float(nat.get("avg_ts", 0)) > 0:  # not paired: ratio of means only
        return f"{float(py['avg_ts']) / float(nat['avg_ts']):.3f}"
    return ""


def _tests_sorted(names: set[str]) -> list[str]:
    def k(n: str) -> tuple[int, int, int, str]:
        d = re.search(r"@ d(\d+)", n)
        return (0 if n.startswith("pp") and "+" not in n else 1 if n.startswith("tg") else 2,
                int(d.group(1)) if d else 0, len(n), n)
    return sorted(names, key=k)


def _esc(s: str) -> str:
    return s.replace("|", "\\|")


def summary_table(rows: list[Row]) -> str:
    """pp512 and tg128 per machine, device, model (pyllama's t/s, native's, and the ratio)."""
    head = ["Machine", "Device", "Backend", "Model", "Threads", "Settings"]
    for t in SUMMARY_TESTS:
        head += [f"{t} t/s (pyllama)", f"{t} t/s (native)", f"{t} pyllama/native"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 6 + ["---:"] * 3 * len(SUMMARY_TESTS)) + "|"]
    for row in rows:
        if not any(t in row.tests for t in SUMMARY_TESTS):
            continue
        cells = [row.machine, row.device, row.backend, row.model, row.threads or "—", row.settings or "—"]
        for t in SUMMARY_TESTS:
            res = row.tests.get(t, {})
            py, nat = res.get("pyllama"), res.get("llama.cpp")
            cells += [_ts(py) or "—", _ts(nat) or "—", _ratio(py, nat) or "—"]
        lines.append("| " + " | ".join(_esc(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def detail_table(rows: list[Row]) -> str:
    """Every test of every row."""
    head = ["Machine", "Device", "Backend", "Model", "Threads", "Settings", "Test",
            "pyllama t/s", "native t/s", "pyllama/native (min–max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 7 + ["---:"] * 3) + "|"]
    for row in rows:
        for t in _tests_sorted(set(row.tests)):
            res = row.tests[t]
            py, nat = res.get("pyllama"), res.get("llama.cpp")
            cells = [row.machine, row.device, row.backend, row.model, row.threads or "—", row.settings or "—", t,
                     _ts(py) or "—", _ts(nat) or "—", _ratio(py, nat) or "—"]
            lines.append("| " + " | ".join(_esc(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _row_label(row: Row) -> str:
    dev = row.device if len(row.device) <= 32 else row.device[:31] + "…"
    label = f"{row.machine}: {dev}"
    if row.threads:
        label += f", {row.threads} t"
    if row.settings:
        label += f", {row.settings}"
    return f"{label}\n{row.model}"


SAMPLING = ("host", "argmax", "backend")


def _bars(rows: list[Row], tests: Sequence[str], out: Path, name: str, native_label: str) -> Path:
    """One horizontal bar chart per test: pyllama's t/s and the native reference's, a row per configuration."""
    import matplotlib.pyplot as plt

    labels = [_row_label(r) for r in rows]
    height = max(2.5, 0.8 * len(rows) + 1.5)
    width = 6 if len(tests) <= 2 else 4.5
    fig, axes = plt.subplots(1, len(tests), figsize=(width * len(tests), height), squeeze=False)
    for ax, t in zip(axes[0], tests):
        ys = list(range(len(rows)))
        for off, binding, color, label in ((-0.2, "pyllama", "#1f77b4", "pyllama"),
                                           (0.2, "llama.cpp", "#aaaaaa", native_label)):
            vals = [float(r.tests.get(t, {}).get(binding, {}).get("avg_ts", math.nan)) for r in rows]
            errs = [float(r.tests.get(t, {}).get(binding, {}).get("stddev_ts", 0.0)) for r in rows]
            ax.barh([y + off for y in ys], vals, height=0.4, xerr=errs, color=color, label=label)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tokens / s")
        ax.set_title(t)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    p = out / name
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot(rows: list[Row], out: Path) -> list[Path]:
    """throughput.png (t/s per test, pyllama and native), sampling.png (sampled generation, when
    measured) and ratio.png (pyllama/native with spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    # sampling.png: generation with every token sampled (pyllama bench --sampling), against the C loop
    sampled = _tests_sorted({t for r in rows for t in r.tests if t.split(" @")[0].split(" ")[-1] in SAMPLING})
    if sampled:
        srows = [r for r in rows if any(t in r.tests for t in sampled)]
        written.append(_bars(srows, sampled, out, "sampling.png", "C loop (llama-simple's)"))
    rows = [r for r in rows if any(t in r.tests for t in SUMMARY_TESTS)]
    if not rows:
        return written
    labels = [_row_label(r) for r in rows]
    height = max(2.5, 0.8 * len(rows) + 1.5)
    written.append(_bars(rows, SUMMARY_TESTS, out, "throughput.png", "llama.cpp (native)"))

    have_ratio = any(r.tests.get(t, {}).get("pyllama", {}).get("native_ratio") is not None
                     for r in rows for t in SUMMARY_TESTS)
    if have_ratio:
        fig, ax = plt.subplots(figsize=(9, height))
        ys = list(range(len(rows)))
        for k, (t, color) in enumerate(zip(SUMMARY_TESTS, ("#1f77b4", "#ff7f0e"))):
            xs, lo, hi, yy = [], [], [], []
            for y, r in zip(ys, rows):
                py = r.tests.get(t, {}).get("pyllama", {})
                if py.get("native_ratio") is None:
                    continue
                xs.append(py["native_ratio"])
                lo.append(py["native_ratio"] - py["native_ratio_min"])
                hi.append(py["native_ratio_max"] - py["native_ratio"])
                yy.append(y + (k - 0.5) * 0.3)
            ax.errorbar(xs, yy, xerr=[lo, hi], fmt="o", color=color, capsize=3, label=t)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("pyllama ÷ native t/s (median, min–max of interleaved repetitions)")
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        p = out / "ratio.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def render(results: Path, out: Path | None = None, *, plots: bool = True) -> str:
    """Write README.md (and the PNGs) for a results directory; return the Markdown."""
    out = results if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(results)
    rows = build_rows(records)
    images = plot(rows, out) if plots else []
    files = sorted(p.name for p in results.glob("*.jsonl"))
    md = [
        "# Benchmark results",
        "",
        "Rendered by `python bench/render.py` from " + (", ".join(f"`{f}`" for f in files) or "no files") + ".",
        "Tokens/s are llama-bench's `avg_ts ± stddev_ts`; *native* is llama.cpp's own `llama-bench`, built from",
        "the same vendored tree with the same flags and run interleaved with pyllama (`pyllama bench --native`);",
        "pyllama/native is the median of the per-repetition ratios, with their min–max.",
        "",
        "## Prompt processing and generation",
        "",
        summary_table(rows),
        "## Every test",
        "",
        detail_table(rows),
    ]
    for img in images:
        md += [f"![{img.stem}]({img.name})", ""]
    notes = results / "NOTES.md"
    if notes.is_file():  # hand-written remarks on the measurements (kept beside the data)
        md += ["## Notes", "", notes.read_text(encoding="utf-8").strip(), ""]
    text = "\n".join(md)
    (out / "README.md").write_text(text, encoding="utf-8")
    return text


def update_readme(readme: Path, table: str) -> None:
    """Replace the block between the bench-table markers of a README with ``table``."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Merge bench/results/*.jsonl into a Markdown table and plots.")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="directory of *.jsonl files")
    ap.add_argument("--out", type=Path, default=None, help="where README.md and the PNGs go (default: --results)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--readme", type=Path, default=None,
                    help=f"also put the summary table between {BEGIN} and {END} in this file")
    args = ap.parse_args(argv)
    render(args.results, args.out, plots=not args.no_plots)
    if args.readme:
        update_readme(args.readme, summary_table(build_rows(load_records(args.results))))
    print(f"wrote {(args.out or args.results) / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
