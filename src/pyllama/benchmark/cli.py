"""``pyllama bench``: llama-bench's command line, run through pyllama (and, with --native, through llama.cpp)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from .params import USAGE, Instance, Params, UsageError, parse_args
from .record import MarkdownPrinter, Printer, Record, make_printer, ratio_stats, record_from_native


def _print_devices() -> None:
    import pyllama

    print("Available devices:")
    for d in pyllama.devices():
        if d.type == "cpu":
            continue
        print(f"  {d.name}: {d.description} ({d.memory_total // (1 << 20)} MiB, {d.memory_free // (1 << 20)} MiB free)")
    if not any(d.type != "cpu" for d in pyllama.devices()):
        print("  (none)")


def _print_version() -> None:
    import pyllama

    info = pyllama.build_info()
    print(f"pyllama {pyllama.__version__}, llama.cpp {info.get('llama_commit', 'unknown')}")
    print(json.dumps(info, indent=2))


class _Outputs:
    """stdout/stderr printers and the --save file."""

    def __init__(self, params: Params) -> None:
        self.printers: list[Printer] = []
        for fmt, stream in ((params.output_format, sys.stdout), (params.output_format_stderr, sys.stderr)):
            p = make_printer(fmt, stream, params)
            if p is not None:
                self.printers.append(p)
        self.save: IO[str] | None = None
        if params.save:
            Path(params.save).parent.mkdir(parents=True, exist_ok=True)
            self.save = open(params.save, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.started = False

    def header(self, first: Record) -> None:
        for p in self.printers:
            if isinstance(p, MarkdownPrinter):
                p.backends = first.backends
                p.build_commit, p.build_number = first.build_commit, first.build_number
                p.pyllama_version = str(first.extra.get("pyllama_version", ""))
            p.header()
        self.started = True

    def test(self, rec: Record, native: Record | None) -> None:
        if not self.started:
            self.header(rec)
        for p in self.printers:
            p.test(rec, native)
        if self.save is not None:
            for r in (rec, native):
                if r is not None:
                    self.save.write(json.dumps(r.as_json(), ensure_ascii=False) + "\n")
            self.save.flush()

    def close(self) -> None:
        if self.started:
            for p in self.printers:
                p.footer()
        if self.save is not None:
            self.save.close()


def run(params: Params) -> list[tuple[Record, Record | None]]:
    """Run the whole matrix; print each result as it completes; return (pyllama, native) pairs."""
    import pyllama

    from . import env as _env
    from .native import find_native_bench, run_native
    from .runner import DepthCache, ModelCache, PyllamaTest

    if params.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("pyllama.llama").addHandler(handler)
        logging.getLogger("pyllama.llama").setLevel(logging.DEBUG)

    environment = _env.collect(params.label)
    info = pyllama.build_info()
    common: dict[str, Any] = {
        "binding": "pyllama",
        "pyllama_version": pyllama.__version__,
        "llama_commit": info.get("llama_commit"),
        "machine": environment["machine"],
        "environment": environment,
    }
    native_exe = find_native_bench(params.native_bin) if params.native else None

    instances = params.instances()
    outputs = _Outputs(params)
    models = ModelCache()
    depth = DepthCache()
    rng = np.random.default_rng(params.seed)
    results: list[tuple[Record, Record | None]] = []

    def progress(idx: int, msg: str) -> None:
        if params.progress:
            print(f"pyllama-bench: benchmark {idx}/{len(instances)}: {msg}", file=sys.stderr, flush=True)

    def native_once(inst: Instance, reps: int, delay: int) -> dict[str, Any]:
        assert native_exe is not None
        return run_native(native_exe, inst, reps=reps, no_warmup=params.no_warmup, delay=delay,
                          verbose=params.verbose)

    try:
        for idx, inst in enumerate(instances, 1):
            progress(idx, "starting")
            model = models.get(inst)
            test = PyllamaTest(inst, model, depth, rng)
            native_objs: list[dict[str, Any]] = []
            c_loop: list[int] = []  # a sampled test's reference: llama-simple's loop in C, in this process
            try:
                rec = test.record(common)
                if inst.sampling:
                    rec.extra["sampling"] = inst.sampling
                if params.delay:
                    time.sleep(params.delay)
                if not params.no_warmup:
                    progress(idx, "warmup run")
                    test.warmup()
                per_rep_native = native_exe is not None and params.interleave == "rep" and not inst.sampling
                for i in range(params.reps):
                    if per_rep_native and i > 0 and not params.no_warmup:
                        # each native run warms up before its one repetition: so does pyllama
                        test.warmup()
                    progress(idx, f"run {i + 1}/{params.reps}")
                    rec.samples_ns.append(test.rep())
                    if per_rep_native:
                        progress(idx, f"native run {i + 1}/{params.reps}")
                        native_objs.append(native_once(inst, 1, 0))
                    elif params.native and inst.sampling:
                        progress(idx, f"C loop run {i + 1}/{params.reps}")
                        c_loop.append(test.rep(native=True))
            finally:
                test.close()
            if c_loop:
                extra = {**common, "binding": "llama.cpp C loop", "interleave": "rep", "sampling": inst.sampling}
                c_rec = replace(rec, samples_ns=c_loop, extra=extra)
                rec.extra.update(ratio_stats(rec, c_rec))
                rec.extra["interleave"] = "rep"
                outputs.test(rec, c_rec)
                results.append((rec, c_rec))
                continue
            if native_exe is not None and params.interleave == "test":
                if params.rpc:
                    models.close()  # an RPC server takes one client at a time: free it for llama-bench
                progress(idx, f"native runs ({params.reps})")
                native_objs.append(native_once(inst, params.reps, params.delay))
            native_rec = None
            if native_objs:
                extra = {**common, "binding": "llama.cpp", "interleave": params.interleave}
                native_rec = record_from_native(native_objs[0], inst, extra)
                native_rec.samples_ns = [int(s) for o in native_objs for s in o["samples_ns"]]
                rec.extra.update(ratio_stats(rec, native_rec))
                rec.extra["interleave"] = params.interleave
            outputs.test(rec, native_rec)
            results.append((rec, native_rec))
    finally:
        models.close()
        outputs.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyllama bench`` (and of ``python -m pyllama.benchmark``).

    ``pyllama bench tune ARGS`` runs the settings sweep of :mod:`pyllama.benchmark.tune`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["tune"]:
        from .tune import main as tune_main

        return tune_main(args[1:])
    try:
        params = parse_args(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 1
    if params.help:
        print(USAGE)
        return 0
    if params.version:
        _print_version()
        return 0
    if params.rpc:  # as llama-bench: the servers' devices join every test (and --list-devices)
        from ..rpc import RpcError, add_servers

        try:
            add_servers(params.rpc)
        except (RpcError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if params.list_devices:
        _print_devices()
        return 0
    from .native import NativeBenchError
    from .runner import BenchError

    try:
        run(params)
    except (BenchError, NativeBenchError) as exc:
        print(f"pyllama bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["main", "run"]
