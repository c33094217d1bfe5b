"""llama.cpp's own server tests, run offline against ``pyllama serve`` and against llama-server.

The suite is vendor/llama.cpp/tools/server/tests (``unit/*.py``, ``utils.py``): each test starts a
server with llama-server's flags through ``utils.ServerProcess`` and talks to it over HTTP. It is
run in place, unchanged, by pytest, with this module loaded as a plugin (``-p server_suite``) that
patches ``utils`` in memory before the tests import it:

- the server binary is llama-server (``bench/native.py --server``) or a two-line wrapper that runs
  ``python -m pyllama serve "$@"`` with the very same flags (no translation);
- the model presets (``ServerPreset``), which name Hugging Face repositories, point at local files
  instead (``--model PATH``, no ``--hf-repo``): the chat starter (SmolLM2-135M-Instruct) for the
  text presets, Gemma 3 270M (the base starter) for ``tinygemma3``, and tests/synth.py models for
  the embedding, reranking and LoRA presets; the LoRA test's adapter is the synthetic one;
- anything else that would download (a test that sets its own ``model_hf_repo``, a model URL,
  ``download_file``) is skipped with the reason, and ``wget`` is a stub that refuses;
- each test gets a deadline (``--timeout``; on expiry the servers are killed and the test fails);
  each server's output goes to a log file whose error lines are kept with a failure.

Results (outcome, reason, duration per test id) go to a JSON file. The committed record,
tests/llama_server_suite.json, holds the ids llama-server passes and the ids ``pyllama serve``
passes (a list that only grows); tests/test_llama_server_suite.py runs the former against
``pyllama serve`` in CI and requires the latter.

    python bench/server_suite.py                          # both servers (llama-server if built), the table
    python bench/server_suite.py --server pyllama         # pyllama serve only
    python bench/server_suite.py --reference              # only the ids llama-server passes (as CI)
    python bench/server_suite.py --update                 # record the run in tests/llama_server_suite.json
    python bench/server_suite.py --table                  # the table of the committed record, no run
    python bench/server_suite.py --files test_basic.py -k props -v   # a few tests, verbose

Nothing is written into vendor/ (no bytecode, no pytest cache); work files go to a temporary
directory (``--workdir`` keeps them, server logs included).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = ROOT / "vendor" / "llama.cpp" / "tools" / "server" / "tests"
RECORD = ROOT / "tests" / "llama_server_suite.json"
CONFIG_ENV = "PYLLAMA_SERVER_SUITE_CONFIG"

#: The OpenAI/HTTP subset of the suite (issue 21), in the order the table lists it. Left out: the router,
#: MCP, built-in tools, proxy, sleep, speculative, vision, GCP and KV-unified-only files, which test
#: llama-server features outside this subset (several models, tool runtimes, multimodal models).
FILES = (
    "test_basic.py", "test_chat_completion.py", "test_completion.py", "test_tokenize.py",
    "test_embedding.py", "test_metrics.py", "test_security.py", "test_stream.py", "test_ctx_shift.py",
    "test_ignore_eos.py", "test_template.py", "test_tool_call.py", "test_compat_anthropic.py",
    "test_compat_oai_responses.py", "test_infill.py", "test_rerank.py", "test_slot_save.py", "test_lora.py",
)

#: preset of utils.ServerPreset -> the local model standing in for it (keys of prepare_models()).
#: ``router`` starts without a model in both servers and is left as it is.
PRESET_MODELS = {
    "tinyllama2": "chat",            # ggml-org/test-model-stories260K
    "tinyllama_infill": "chat",      # ggml-org/test-model-stories260K-infill (SmolLM2 has FIM tokens)
    "stories15m_moe": "synth",       # ggml-org/stories15M_MOE (+ its LoRA adapter: the synthetic one)
    "bert_bge_small": "embedding",
    "bert_bge_small_with_fa": "embedding",
    "jina_reranker_tiny": "reranker",
    "tinygemma3": "base",            # ggml-org/tinygemma3-GGUF (Gemma 3 270M, without the vision part)
}
#: download_file() URLs with a local stand-in
DOWNLOAD_MODELS = {"moe_shakespeare15M.gguf": "lora"}


# --- models ---------------------------------------------------------------------------------------------

def _synth() -> types.ModuleType:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import synth
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return synth


def prepare_models(workdir: Path, *, chat: Path | None = None, base: Path | None = None,
                   synth_model: Path | None = None, embedding: Path | None = None,
                   lora: Path | None = None) -> dict[str, str]:
    """The local models, by role (``chat``, ``base``, ``synth``, ``embedding``, ``reranker``, ``lora``):
    the given paths, else the starters from their packages and synthetic files written into ``workdir``."""
    synth = _synth()
    workdir.mkdir(parents=True, exist_ok=True)
    if chat is None or base is None:
        from pyllama import starter

        chat = chat or starter.chat_starter_path()
        base = base or starter.starter_model_path()
    synth_model = synth_model or synth.write_llama_model(workdir / "synth-llama.gguf")
    embedding = embedding or synth.write_embedding_model(workdir / "synth-embedding.gguf")
    lora = lora or synth.write_lora_adapter(workdir / "synth-lora.gguf", synth_model)
    reranker = synth.write_reranker_model(workdir / "synth-reranker.gguf")
    return {"chat": str(chat), "base": str(base), "synth": str(synth_model), "embedding": str(embedding),
            "reranker": str(reranker), "lora": str(lora)}


# --- servers --------------------------------------------------------------------------------------------

def pyllama_wrapper(workdir: Path) -> Path:
    """An executable that runs ``pyllama serve`` with the arguments it is given, unchanged."""
    path = workdir / "pyllama-serve"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pyllama serve \"$@\"\n")
    path.chmod(0o755)
    return path


def llama_server_binary() -> Path | None:
    """llama-server built from the same tree by bench/native.py --server, or None."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import native
    finally:
        sys.path.remove(str(ROOT / "bench"))
    path = native.bin_dir() / "llama-server"
    return path if path.is_file() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- running the suite -----------------------------------------------------------------------------------

def _pytest_cmd(files: Sequence[str], extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "server_suite", "-p", "no:cacheprovider", "-q",
            "-m", "not slow", "--rootdir", str(SUITE_DIR), *[f"unit/{f}" for f in files], *extra]


def run_suite(server_bin: Path, models: dict[str, str], workdir: Path, *, files: Sequence[str] = FILES,
              only: Iterable[str] | None = None, jobs: int = 1, timeout: float = 120.0,
              extra: Sequence[str] = (), total_timeout: float | None = None,
              echo: bool = False) -> dict[str, dict[str, Any]]:
    """Run the vendored tests of ``files`` against ``server_bin``; test id -> outcome, reason, duration.

    ``only``: run just these ids (the rest is deselected). ``jobs`` pytest processes share the files,
    each on its own port."""
    if not (SUITE_DIR / "utils.py").is_file():
        raise FileNotFoundError(f"{SUITE_DIR} is missing: run `python tools/vendor.py`")
    workdir.mkdir(parents=True, exist_ok=True)
    only_list = sorted(set(only)) if only is not None else None
    if only_list is not None:
        files = [f for f in files if any(i.startswith(f"unit/{f}::") for i in only_list)]
    if not files:
        return {}
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(files))))]
    for i, f in enumerate(files):
        groups[i % len(groups)].append(f)

    def one(n: int, group: list[str]) -> dict[str, dict[str, Any]]:
        results_path = workdir / f"results-{server_bin.name}-{n}.json"
        results_path.unlink(missing_ok=True)
        config = {"server_bin": str(server_bin), "models": models, "results": str(results_path),
                  "only": only_list, "timeout": timeout, "logdir": str(workdir / f"logs-{server_bin.name}")}
        config_path = workdir / f"config-{server_bin.name}-{n}.json"
        config_path.write_text(json.dumps(config, indent=1))
        env = {**os.environ, CONFIG_ENV: str(config_path), "PORT": str(_free_port()),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "PYTHONDONTWRITEBYTECODE": "1", "LLAMA_CACHE": str(workdir / "llama-cache"),
               "HF_HUB_OFFLINE": "1", "PYLLAMA_OFFLINE": "1"}
        for var in ("PYTEST_ADDOPTS", "DEBUG", "DEBUG_EXTERNAL", "SLOW_TESTS", "LLAMA_SERVER_BIN_PATH",
                    "PYLLAMA_API_KEY", "N_GPU_LAYERS"):
            env.pop(var, None)
        cmd = _pytest_cmd(group, extra)
        out = None if echo else subprocess.DEVNULL
        # its own process group: on the deadline the suite and every server it started go together
        proc = subprocess.Popen(cmd, cwd=SUITE_DIR, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            proc.wait(timeout=total_timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the suite ran past {total_timeout} s: {' '.join(cmd)}") from None
        finally:
            try:  # the suite itself, if still running (an interrupt), and any server left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if not results_path.is_file():
            raise RuntimeError(f"the suite wrote no results: {' '.join(cmd)} (in {SUITE_DIR})")
        return dict(json.loads(results_path.read_text()))

    results: dict[str, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
        for part in pool.map(lambda a: one(*a), enumerate(groups)):
            results.update(part)
    return results


# --- the table ------------------------------------------------------------------------------------------

def _file_of(test_id: str) -> str:
    return test_id.split("::", 1)[0].removeprefix("unit/")


def _passed(results: dict[str, dict[str, Any]]) -> set[str]:
    return {i for i, r in results.items() if r["outcome"] == "passed"}


def _ran(results: dict[str, dict[str, Any]]) -> set[str]:
    return {i for i, r in results.items() if r["outcome"] != "skipped"}


def table(run: dict[str, int], reference: set[str], ours: set[str], files: Sequence[str] = FILES) -> str:
    """Per file: tests run, passed by llama-server, passed by pyllama serve (of those, and in all)."""
    rows = [("file", "run", "llama-server", "pyllama", "pyllama of llama-server's")]
    tot = [0, 0, 0, 0]
    for f in files:
        ref = {i for i in reference if _file_of(i) == f}
        mine = {i for i in ours if _file_of(i) == f}
        vals = [run.get(f, 0), len(ref), len(mine), len(mine & ref)]
        tot = [a + b for a, b in zip(tot, vals)]
        rows.append((f, *map(str, vals)))
    rows.append(("total", *map(str, tot)))
    share = f"{100 * tot[3] / tot[1]:.0f} %" if tot[1] else "-"
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines) + f"\n\npyllama serve passes {tot[3]} of the {tot[1]} tests llama-server passes ({share})"


def load_record(path: Path = RECORD) -> dict[str, Any]:
    if path.is_file():
        return dict(json.loads(path.read_text()))
    return {"files": list(FILES), "run": {}, "llama_server": [], "pyllama": []}


def _vendor_commit() -> str | None:
    m = re.search(r'^upstream_commit\s*=\s*"([^"]*)"', (ROOT / "vendor" / "llama.cpp.lock").read_text(), re.M)
    return m.group(1) if m else None


# --- the pytest plugin (loaded inside the vendored suite's pytest with `-p server_suite`) ---------------

_current_logs: list[str] = []


def _config() -> dict[str, Any] | None:
    path = os.environ.get(CONFIG_ENV)
    return json.loads(Path(path).read_text()) if path else None


def _patch_utils(cfg: dict[str, Any]) -> None:
    import pytest

    if str(SUITE_DIR) not in sys.path:
        sys.path.insert(0, str(SUITE_DIR))
    wget = types.ModuleType("wget")

    def refuse(url: str, out: str | None = None, bar: Any = None) -> str:
        raise RuntimeError(f"offline: no download of {url}")

    wget.download = refuse  # type: ignore[attr-defined]
    sys.modules["wget"] = wget  # utils imports it; nothing may download
    import utils

    models: dict[str, str] = cfg["models"]
    logdir = Path(cfg["logdir"])
    logdir.mkdir(parents=True, exist_ok=True)
    preset_cls = utils.ServerPreset

    def local(name: str, original: Any) -> Any:
        def preset() -> Any:
            server = original()
            server.model_hf_repo = None
            server.model_hf_file = None
            server.model_file = models[PRESET_MODELS[name]]
            return server
        preset.__name__ = name
        return staticmethod(preset)

    for name in list(vars(preset_cls)):
        if name in PRESET_MODELS:
            setattr(preset_cls, name, local(name, getattr(preset_cls, name)))
    preset_cls.load_all = staticmethod(lambda: None)  # the presets are local: nothing to fetch

    def download_file(url: str, output_file_path: str | None = None) -> str:
        for suffix, role in DOWNLOAD_MODELS.items():
            if url.endswith(suffix):
                return models[role]
        pytest.skip(f"needs a download: {url}")

    utils.download_file = download_file
    original_start = utils.ServerProcess.start

    def start(self: Any, timeout_seconds: int = utils.DEFAULT_HTTP_TIMEOUT) -> None:
        wanted = [v for v in (self.model_hf_repo, self.model_url, self.mmproj_url) if v]
        if wanted:
            pytest.skip(f"needs a download: {', '.join(wanted)}")
        self.server_path = cfg["server_bin"]
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="server-", suffix=".log", dir=logdir)
            os.close(fd)
        _current_logs.append(self.log_path)
        original_start(self, max(int(timeout_seconds), 120))

    utils.ServerProcess.start = start


_patched = False


def _patch_once() -> None:
    global _patched
    cfg = _config()
    if cfg is not None and not _patched:
        _patched = True
        _patch_utils(cfg)


def pytest_load_initial_conftests(early_config: Any, parser: Any, args: list[str]) -> None:
    """Before the suite's conftest imports ``utils``: patch it."""
    _patch_once()


def pytest_configure(config: Any) -> None:
    _patch_once()


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    cfg = _config()
    if cfg is None or cfg.get("only") is None:
        return
    only = set(cfg["only"])
    keep = [i for i in items if i.nodeid in only]
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in only])
    items[:] = keep


class SuiteTimeout(Exception):
    """A test of the suite ran past its deadline (its servers were killed)."""


def _on_timeout(signum: int, frame: Any) -> None:
    import utils

    for server in list(utils.server_instances):  # unblock requests that wait on a stuck server
        if server.process is not None:
            server.process.kill()
    raise SuiteTimeout("the test ran past its deadline; its servers were killed")


try:
    import pytest as _pytest

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item: Any) -> Iterator[None]:
        """The test's deadline: on expiry its servers are killed (unblocking any request) and it fails."""
        cfg = _config()
        if cfg is None:
            yield
            return
        old = signal.signal(signal.SIGALRM, _on_timeout)
        signal.setitimer(signal.ITIMER_REAL, float(cfg.get("timeout", 120)))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
except ImportError:  # the script's own commands need no pytest
    pass


_results: dict[str, dict[str, Any]] = {}

_LOG_PATTERNS = re.compile(r"(unrecognized arguments|error:|Error|exception|not supported|Traceback|died)", re.I)


def _log_errors() -> list[str]:
    lines: list[str] = []
    for path in _current_logs:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        lines += [ln.strip()[:300] for ln in text.splitlines() if _LOG_PATTERNS.search(ln)][:5]
    return lines


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _current_logs.clear()


def pytest_runtest_logreport(report: Any) -> None:
    if _config() is None:
        return
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "reason": "", "duration": 0.0})
    entry["duration"] = round(entry["duration"] + report.duration, 3)
    if report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        entry["reason"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    elif report.failed and entry["outcome"] != "failed":
        entry["outcome"] = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        entry["reason"] = (f"[{report.when}] " if report.when != "call" else "") + message.strip()[:600]
        entry["server_log"] = _log_errors()
    if report.when == "teardown":  # after each test: a run cut short still leaves its results
        Path(_config()["results"]).write_text(json.dumps(_results, indent=1, sort_keys=True))


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    cfg = _config()
    if cfg is not None:
        Path(cfg["results"]).write_text(json.dumps(_results, indent=1, sort_keys=True))


# --- command line ---------------------------------------------------------------------------------------

def _run_one(kind: str, binary: Path, models: dict[str, str], workdir: Path, args: argparse.Namespace,
             only: Iterable[str] | None) -> dict[str, dict[str, Any]]:
    extra = [*(["-k", args.k] if args.k else []), *(["-v"] if args.verbose else [])]
    t0 = time.monotonic()
    res = run_suite(binary, models, workdir / kind, files=args.files, only=only, jobs=args.jobs,
                    timeout=args.timeout, extra=extra, echo=args.verbose)
    took = time.monotonic() - t0
    print(f"{kind}: {len(_ran(res))} run, {len(_passed(res))} passed, "
          f"{sum(r['outcome'] == 'skipped' for r in res.values())} skipped in {took:.0f} s", file=sys.stderr)
    (workdir / f"{kind}.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("both", "pyllama", "llama-server", "none"), default="both")
    ap.add_argument("--files", nargs="+", default=list(FILES), help="test files of unit/ (default: the subset)")
    ap.add_argument("--reference", action="store_true", help="only the ids llama-server passes in the record")
    ap.add_argument("--update", action="store_true", help="add this run's passes to tests/llama_server_suite.json")
    ap.add_argument("--table", action="store_true", help="print the committed record's table and exit")
    ap.add_argument("--failures", action="store_true", help="list pyllama's failures of llama-server's passes")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="pytest processes in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a test may take (default 120)")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the suite's pytest output")
    ap.add_argument("--workdir", type=Path, default=None, help="keep work files and server logs here")
    ap.add_argument("--load", nargs=2, type=Path, metavar=("LLAMA_SERVER_JSON", "PYLLAMA_JSON"),
                    help="no run: the results files of earlier runs (WORKDIR/KIND/results-*.json, WORKDIR/KIND.json)")
    args = ap.parse_args(argv)
    record = load_record()
    if args.table:
        print(table(record["run"], set(record["llama_server"]), set(record["pyllama"]), record["files"]))
        return 0
    workdir = args.workdir or (Path(".") if args.load else Path(tempfile.mkdtemp(prefix="server-suite-")))
    only = record["llama_server"] if args.reference else None
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    if args.load:
        runs = {k: json.loads(p.read_text()) for k, p in zip(("llama-server", "pyllama"), args.load)}
        args.server = "none"
    else:
        models = prepare_models(workdir / "models")
    if args.server in ("both", "llama-server"):
        binary = llama_server_binary()
        if binary is None:
            print("llama-server is not built (python bench/native.py --server): its column is the record's",
                  file=sys.stderr)
            if args.server == "llama-server":
                return 1
        else:
            runs["llama-server"] = _run_one("llama-server", binary, models, workdir, args, only)
    if args.server in ("both", "pyllama"):
        runs["pyllama"] = _run_one("pyllama", pyllama_wrapper(workdir), models, workdir, args, only)
    ref_run = runs.get("llama-server")
    reference = _passed(ref_run) if ref_run is not None else set(record["llama_server"])
    ours = _passed(runs["pyllama"]) if "pyllama" in runs else set(record["pyllama"])
    any_run = ref_run or runs.get("pyllama") or {}
    counted = {f: sum(1 for i in _ran(any_run) if _file_of(i) == f) for f in args.files}
    if args.reference or ref_run is None:
        counted = {f: record["run"].get(f, n) for f, n in counted.items()}
    print(table(counted, reference, ours, args.files))
    if args.failures and "pyllama" in runs:
        print("\npyllama's failures among llama-server's passes:")
        for i in sorted(reference - ours):
            r = runs["pyllama"].get(i, {"outcome": "not run", "reason": ""})
            log = "; ".join(r.get("server_log", [])[:2])
            print(f"- {i}: {r['outcome']}: {r['reason'].splitlines()[0] if r['reason'] else ''}"
                  + (f" | server: {log}" if log else ""))
    if args.update:
        lost = set(record["pyllama"]) - ours if "pyllama" in runs else set()
        if ref_run is not None and not args.reference and not args.k:  # files not run count 0
            record["llama_server"] = sorted(reference)
            record["run"] = counted
            record["files"] = list(FILES)
            record["vendor_commit"] = _vendor_commit()
        record["pyllama"] = sorted((set(record["pyllama"]) | ours) & set(record["llama_server"]))
        record["models"] = dict(PRESET_MODELS)
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nrecorded in {RECORD.relative_to(ROOT)}", file=sys.stderr)
        if lost:
            print("these recorded pyllama passes failed now (kept in the record):\n  " + "\n  ".join(sorted(lost)),
                  file=sys.stderr)
    if args.workdir is None and not args.load:
        print(f"work files and server logs: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
