"""Malformed models never kill the interpreter: the corpus of tests/mutants.py, each file in a child process.

Every mutant must end as ``ModelLoadError`` at ``Model(path)``, or as a model
that tokenizes, detokenizes and generates 8 tokens; a loaded model may refuse
one of those steps only with a pyllama error (``error``: a vocabulary without
byte tokens cannot spell the prompt's emoji). A child process loads many files
one after the other and reports each; when a file kills it (abort, segfault) or
hangs it, the parent records that and starts a new child at the next file. The
test asserts 0 deaths, 0 hangs and no other exception type (``bad``).

Longer runs (random bit flips and byte overwrites) by one command::

    python tests/test_malformed.py --random 5000 --seed 1 [--jobs 2]
    python tests/test_malformed.py --random 5000 --semantic --seed 1   # random typed values for known keys
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mutants  # noqa: E402
import synth  # noqa: E402
from bounded import join_all

# ggml prints a gdb backtrace on abort (seconds each); a finding needs only the exit status.
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1"}
PER_FILE_TIMEOUT_S = 30.0  # generous: a busy 2-core box; a healthy load of these files takes milliseconds
PROMPT = "Hello world, café 日本 🙂"


# --- the child: loads files named on stdin, one result line per file --------------------------------------
def child_say(*parts: str) -> None:
    """One line of the child's report to run_corpus: ``BEGIN path`` or ``END path outcome detail``."""
    sys.stdout.write("\t".join(parts) + "\n")
    sys.stdout.flush()


def _child() -> int:
    import pyllama
    from pyllama.errors import LlamaError, ModelLoadError

    say = child_say
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        say("BEGIN", path)
        try:
            model = pyllama.Model(path, n_gpu_layers=0)
        except ModelLoadError as exc:
            say("END", path, "rejected", str(exc).replace("\n", " ")[:300])
            continue
        except BaseException as exc:  # anything else is a finding
            say("END", path, "bad", f"{type(exc).__name__} at load: {exc}".replace("\n", " ")[:300])
            continue
        try:
            with model:
                toks = model.tokenize(PROMPT)
                model.detokenize(toks)
                prompt = toks if toks.size else [0]
                with model.context(n_ctx=64, n_batch=64, n_threads=1) as ctx:
                    with pyllama.generate(ctx, prompt, max_tokens=8) as gen:
                        for _ in gen:
                            pass
            say("END", path, "ok", f"{gen.n_generated} tokens")
        except (LlamaError, ValueError) as exc:
            say("END", path, "error", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
        except BaseException as exc:
            say("END", path, "bad", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
    return 0


# --- the parent -------------------------------------------------------------------------------------------
@dataclass
class CorpusResult:
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # file name -> (outcome, detail)

    def counts(self) -> Counter[str]:
        return Counter(o for o, _ in self.outcomes.values())

    def failures(self) -> dict[str, tuple[str, str]]:
        return {k: v for k, v in self.outcomes.items() if v[0] in ("death", "hang", "bad")}


def _reader(stream: object, q: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        q.put(line)
    q.put(None)


def _feed(stdin: object, text: str) -> None:
    try:  # from a thread: the pipe holds 64 KiB, and the child may die before reading it all
        stdin.write(text)  # type: ignore[attr-defined]
        stdin.close()  # type: ignore[attr-defined]
    except (BrokenPipeError, OSError, ValueError):
        pass


def _run_batch(paths: list[Path], result: CorpusResult, timeout: float, command: list[str]) -> None:
    """Feed ``paths`` to children (``command``), starting a new child after each death or hang."""
    todo = list(paths)
    env = CHILD_ENV
    while todo:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        threading.Thread(target=_feed, args=(proc.stdin, "".join(f"{p}\n" for p in todo)), daemon=True).start()
        current: str | None = None
        try:
            while todo:
                try:
                    line = q.get(timeout=timeout)
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    name = Path(current or str(todo[0])).name
                    result.outcomes[name] = ("hang", f"no result within {timeout:.0f}s")
                    todo.pop(0)
                    break
                if line is None:  # the child died
                    rc = proc.wait()
                    name = Path(current or str(todo[0])).name
                    result.outcomes[name] = ("death", f"exit code {rc}")
                    todo.pop(0)
                    break
                parts = line.rstrip("\n").split("\t")
                if parts[0] == "BEGIN":
                    current = parts[1]
                elif parts[0] == "END":
                    result.outcomes[Path(parts[1]).name] = (parts[2], parts[3] if len(parts) > 3 else "")
                    todo.pop(0)
                    current = None
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def run_corpus(paths: list[Path], *, timeout: float = PER_FILE_TIMEOUT_S, jobs: int = 1,
               command: list[str] | None = None, bound: float = 60.0) -> CorpusResult:
    """Load ``paths`` in children, ``jobs`` at a time, within ``bound`` seconds in all. ``command`` starts a
    child (default: this file's, which loads models); a child reads one path a line on stdin and writes the
    tab-separated lines ``BEGIN path`` before and ``END path outcome detail`` after each file (child_say)."""
    result = CorpusResult()
    command = command or [sys.executable, __file__, "--child"]
    shards = [paths[i::jobs] for i in range(jobs)]
    threads = [threading.Thread(target=_run_batch, args=(s, result, timeout, command)) for s in shards if s]
    for t in threads:
        t.start()
    join_all(threads, bound)
    return result


def _report(result: CorpusResult, seconds: float) -> str:
    c = result.counts()
    lines = [f"{len(result.outcomes)} mutants in {seconds:.1f}s: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))]
    lines += [f"  {name}: {o} ({d})" for name, (o, d) in sorted(result.outcomes.items()) if o not in ("ok", "rejected")]
    return "\n".join(lines)


# --- tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mutants")


def test_corpus_has_at_least_150_deterministic_mutants(corpus_dir: Path) -> None:
    a = mutants.corpus(corpus_dir)
    b = mutants.corpus(corpus_dir)
    assert len(a) >= 150
    assert a == b  # byte-identical on every run


def test_every_mutant_is_rejected_or_works(corpus_dir: Path) -> None:
    paths = mutants.write_corpus(corpus_dir)
    t0 = time.monotonic()
    result = run_corpus(paths, jobs=min(2, os.cpu_count() or 1))
    report = _report(result, time.monotonic() - t0)
    print(report)
    assert len(result.outcomes) == len(paths)
    assert not result.failures(), report
    counts = result.counts()
    assert counts["rejected"] > 100 and counts["ok"] > 0  # the corpus exercises both ends


@pytest.mark.parametrize("name", ["block_count=0", "tokens-duplicate", "tokenizer.model=bert"])
def test_issue_11_aborts_are_load_errors(tmp_path: Path, name: str) -> None:
    """The three GGUF files that aborted llama.cpp inside Model(path) now raise ModelLoadError (in-process)."""
    import pyllama

    data = dict(mutants.corpus(tmp_path))[name]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    # In a child first, so a regression fails this test instead of killing the test run.
    code = f"import pyllama\ntry:\n    pyllama.Model({str(path)!r})\nexcept pyllama.ModelLoadError:\n    pass\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.Model(path)


def test_seeded_random_mutants_are_rejected_or_work(tmp_path: Path) -> None:
    base, g = mutants.base_model(tmp_path)
    paths = []
    for name, data in (*mutants.random_mutants(base.read_bytes(), 300, seed=0), *mutants.semantic_mutants(g, 300, seed=3)):
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        paths.append(p)
    result = run_corpus(paths, jobs=min(2, os.cpu_count() or 1))
    report = _report(result, 0.0)
    print(report)
    assert len(result.outcomes) == len(paths)
    assert not result.failures(), report


def test_overrides_are_checked_like_file_values(synth_model_path: Path) -> None:
    import pyllama

    # llama.cpp applies kv_overrides before the same assert (llama-model.cpp:1328).
    code = (f"import pyllama\ntry:\n    pyllama.Model({str(synth_model_path)!r}, "
            "kv_overrides={'llama.block_count': 0})\nexcept pyllama.ModelLoadError:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    with pytest.raises(pyllama.ModelLoadError, match="block_count = 0"):
        pyllama.Model(synth_model_path, kv_overrides={"llama.block_count": 0})


def test_vocabulary_without_byte_tokens_refuses_text_it_cannot_spell(tmp_path: Path) -> None:
    """An SPM vocabulary without byte fallback: llama.cpp would terminate inside llama_tokenize."""
    import pyllama

    path = tmp_path / "m.gguf"
    path.write_bytes(dict(mutants.corpus(tmp_path))["tokens-without-byte-tokens"])
    code = (f"import pyllama\nm = pyllama.Model({str(path)!r})\ntry:\n    m.tokenize('x \\U0001F642')\n"
            "except pyllama.TokenizationError:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    with pyllama.Model(path) as m:
        assert m.detokenize(m.tokenize("hello world", add_special=False)) == "hello world"
        with pytest.raises(pyllama.TokenizationError, match="neither a token nor byte tokens"):
            m.tokenize("smile \U0001F642")
        with pytest.raises(pyllama.TokenizationError):
            m.tokenize(b"\xff")


def test_each_check_still_guards_its_llama_cpp_line() -> None:
    """A pin bump that moves or removes an assert fails here, naming the check to revisit."""
    from pyllama.gguf_check import GUARDS

    vendor = Path(__file__).parent.parent / "vendor" / "llama.cpp"
    if not (vendor / "include" / "llama.h").exists():
        pytest.skip("no vendored llama.cpp tree")
    stale = []
    for name, g in GUARDS.items():
        lines = (vendor / g.path).read_text(errors="replace").splitlines()
        if g.line > len(lines) or lines[g.line - 1].strip() != g.source:
            stale.append(f"{name}: {g.path}:{g.line} no longer reads {g.source!r}")
    assert not stale, "\n".join(stale)


def test_check_passes_the_valid_models(tmp_path: Path) -> None:
    from pyllama.gguf_check import check_model_file

    check_model_file(synth.write_llama_model(tmp_path / "a.gguf"))
    check_model_file(synth.write_embedding_model(tmp_path / "b.gguf"))
    check_model_file(synth.write_llama_model(tmp_path / "c.gguf", dtype="q4_0"))


@pytest.mark.starter
def test_check_passes_the_starter_model(starter_model_path: Path) -> None:
    from pyllama.gguf_check import check_model_file

    check_model_file(starter_model_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load the malformed-GGUF corpus in child processes.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--random", type=int, default=0, help="N seeded random mutants instead of the corpus")
    parser.add_argument("--semantic", action="store_true",
                        help="with --random: set metadata keys llama.cpp reads to random typed values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=PER_FILE_TIMEOUT_S)
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.child:
        return _child()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        if args.random:
            out.mkdir(parents=True, exist_ok=True)
            base, g = mutants.base_model(out)
            paths = []
            gen = (mutants.semantic_mutants(g, args.random, args.seed) if args.semantic
                   else mutants.random_mutants(base.read_bytes(), args.random, args.seed))
            for name, data in gen:
                p = out / f"{name}.gguf"
                p.write_bytes(data)
                paths.append(p)
        else:
            paths = mutants.write_corpus(out)
        t0 = time.monotonic()
        result = run_corpus(paths, timeout=args.timeout, jobs=args.jobs)
        print(_report(result, time.monotonic() - t0))
    return 1 if result.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
