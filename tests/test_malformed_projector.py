"""Malformed multimodal projectors never kill the interpreter: the projector corpus of tests/mutants.py.

Each mutant of the synthetic projectors (vision "mlp", audio "qwen2a", both) must end as ``ModelLoadError``
at ``model.projector(path)`` (``rejected``), or as a projector that tokenizes an image (and audio, when it
has an audio encoder) and generates 4 tokens (``ok``); a loaded projector may refuse a step only with a
pyllama error (``error``). One child process (tests/test_malformed.py's runner) loads the text model once
and then the mutants one after the other; a death (abort, segfault) or hang is recorded and a new child
goes on at the next file. The test asserts 0 deaths, 0 hangs and no other exception type (``bad``).

By hand (``--all``: every file's outcome; ``--only REGEX``: some files; ``--compare``: also load every file
without pyllama's pre-check and list the files it refuses that llama.cpp would load and run)::

    python tests/test_malformed_projector.py [--jobs 2] [--random 300 --seed 1] [--all] [--compare] [--dir OUT]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mutants  # noqa: E402
import synth  # noqa: E402
from test_malformed import PER_FILE_TIMEOUT_S, CorpusResult, _report, child_say, run_corpus  # noqa: E402

VENDOR = Path(__file__).parent.parent / "vendor" / "llama.cpp"


# --- the child: the text model once, then each projector named on stdin ------------------------------------
def _child(text: str, image: str, audio: str, *, unchecked: bool = False) -> int:
    import pyllama
    from pyllama.errors import LlamaError, ModelLoadError

    if unchecked:  # what llama.cpp does without pyllama's pre-check (--compare)
        import pyllama.projector_check

        pyllama.projector_check.check_projector_file = lambda *args, **kwargs: None

    say = child_say
    model = pyllama.Model(text, n_gpu_layers=0)
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        say("BEGIN", path)
        try:
            proj = model.projector(path, n_threads=1)
        except ModelLoadError as exc:
            say("END", path, "rejected", str(exc).replace("\n", " ")[:300])
            continue
        except BaseException as exc:  # anything else is a finding
            say("END", path, "bad", f"{type(exc).__name__} at load: {exc}".replace("\n", " ")[:300])
            continue
        try:
            with proj:
                parts: list[str | pyllama.Media] = ["<|im_start|>user\n"]
                if proj.vision:
                    parts.append(pyllama.Image(image))
                if proj.audio:
                    parts.append(pyllama.Audio(audio))
                parts.append("describe<|im_end|>\n<|im_start|>assistant\n")
                with proj.tokenize(parts) as prompt:
                    with model.context(n_ctx=1024, n_threads=1) as ctx:
                        with pyllama.generate(ctx, prompt, max_tokens=4) as gen:
                            for _ in gen:
                                pass
            say("END", path, "ok", f"{','.join(proj.modalities)}: {len(prompt)} prompt tokens, "
                                   f"{gen.n_generated} generated")
        except (LlamaError, ValueError) as exc:  # pyllama.MediaError is both
            say("END", path, "error", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
        except BaseException as exc:
            say("END", path, "bad", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
    model.close()
    return 0


def _inputs(directory: Path) -> list[str]:
    """The child's arguments: the text model, an image and a clip, written into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    text = synth.write_llama_model(directory / "text.gguf")
    return [str(text), str(synth.write_image(directory / "image.png", seed=3)),
            str(synth.write_audio(directory / "clip.wav", seconds=1.0))]


def run_projectors(paths: list[Path], directory: Path, *, jobs: int = 1, timeout: float = PER_FILE_TIMEOUT_S,
                   unchecked: bool = False, bound: float = 60.0) -> CorpusResult:
    command = [sys.executable, __file__, "--child-unchecked" if unchecked else "--child",
               *_inputs(directory / "inputs")]
    return run_corpus(paths, timeout=timeout, jobs=jobs, command=command, bound=bound)


# --- tests ------------------------------------------------------------------------------------------------
def test_projector_corpus_is_deterministic(tmp_path: Path) -> None:
    a = mutants.projector_corpus(tmp_path)
    b = mutants.projector_corpus(tmp_path)
    assert a == b  # byte-identical on every run
    names = [n for n, _ in a]
    assert len(a) >= 500
    for base in mutants.PROJECTOR_BASES:
        assert f"{base}:valid" in names
        assert f"{base}:drop:clip.{'audio' if base == 'audio' else 'vision'}.embedding_length" in names
    assert sum(n.split(":")[1].startswith("random-") for n in names) == 30


def test_every_projector_mutant_is_rejected_or_works(tmp_path: Path) -> None:
    paths = mutants.write_corpus(tmp_path / "corpus", projector=True, n_random=30)
    t0 = time.monotonic()
    result = run_projectors(paths, tmp_path, jobs=min(2, os.cpu_count() or 1), bound=300.0)
    report = _report(result, time.monotonic() - t0)
    print(report)
    assert len(result.outcomes) == len(paths)
    assert not result.failures(), report
    by_name = {name.split("-", 1)[1].removesuffix(".gguf"): got for name, got in result.outcomes.items()}
    # The checks refuse none of the valid projectors (a Yi-VL layout and one block more included); one for a
    # text model of another width is refused with that reason.
    for name in ("vision_valid", "audio_valid", "both_valid", "vision_yi-llava", "vision_extra-block_clip.vision."
                 "block_count", "audio_extra-block_clip.audio.block_count"):
        assert by_name[name][0] == "ok", (name, by_name[name])
    assert by_name["narrow_valid-for-32"][0] == "rejected" and "width" in by_name["narrow_valid-for-32"][1]
    counts = result.counts()
    assert counts["rejected"] > 300 and counts["ok"] > 50  # the corpus exercises both ends


def test_check_passes_the_valid_projectors(tmp_path: Path) -> None:
    from pyllama.projector_check import check_projector_file

    for name, kw in mutants.PROJECTOR_BASES.items():
        check_projector_file(synth.write_projector(tmp_path / f"{name}.gguf", **kw), n_embd_text=64)
    check_projector_file(synth.write_projector(tmp_path / "wide.gguf", n_embd_text=128, n_layer=3, image_size=64,
                                               patch_size=16, n_embd=48, n_head=6, audio=True), n_embd_text=128)


def test_projector_key_types_match_clip_cpp() -> None:
    """PROJECTOR_KEY_TYPES is every key clip.cpp reads with a typed getter, at the type it reads: a pin bump
    that adds, drops or retypes one fails here."""
    from pyllama._ffi import lib
    from pyllama.projector_check import PROJECTOR_KEY_TYPES

    impl, src = VENDOR / "tools" / "mtmd" / "clip-impl.h", VENDOR / "tools" / "mtmd" / "clip.cpp"
    if not src.exists():
        pytest.skip("no vendored llama.cpp tree")
    defines = dict(re.findall(r'#define\s+(KEY_\w+)\s+"([^"]+)"', impl.read_text()))
    types = {"bool": lib.GGUF_TYPE_BOOL, "i32": lib.GGUF_TYPE_INT32, "u32": lib.GGUF_TYPE_UINT32,
             "f32": lib.GGUF_TYPE_FLOAT32, "string": lib.GGUF_TYPE_STRING}
    read: dict[str, set[int]] = {}
    for getter, name in re.findall(r"\bget_(bool|i32|u32|f32|string)\(\s*(?:string_format\(\s*)?(KEY_\w+)",
                                   src.read_text()):
        read.setdefault(defines[name].replace("%s", "{m}"), set()).add(int(types[getter]))
    assert len(read) > 50
    assert {k: v for k, v in read.items() if len(v) > 1} == {}  # one type per key
    assert {k: v.pop() for k, v in read.items()} == PROJECTOR_KEY_TYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load the malformed-projector corpus in child processes.")
    parser.add_argument("--child", nargs=3, metavar=("TEXT", "IMAGE", "AUDIO"), help=argparse.SUPPRESS)
    parser.add_argument("--child-unchecked", nargs=3, metavar=("TEXT", "IMAGE", "AUDIO"), help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true",
                        help="also load every file without pyllama's pre-check and list the files it refuses "
                             "that llama.cpp loads and runs (checks stricter than the crash)")
    parser.add_argument("--random", type=int, default=30, help="seeded random mutants spread over the bases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=PER_FILE_TIMEOUT_S)
    parser.add_argument("--only", help="a regular expression: load only the mutants whose file name matches")
    parser.add_argument("--all", action="store_true", help="list every outcome, not only the unusual ones")
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)
    if args.child_unchecked:
        return _child(*args.child_unchecked, unchecked=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        paths = mutants.write_corpus(out / "corpus", projector=True, n_random=args.random, seed=args.seed)
        if args.only:
            paths = [p for p in paths if re.search(args.only, p.name)]
        t0 = time.monotonic()
        result = run_projectors(paths, out, jobs=args.jobs, timeout=args.timeout, bound=3600.0)
        print(_report(result, time.monotonic() - t0))
        if args.all:
            for name, (o, d) in sorted(result.outcomes.items()):
                print(f"  {name}: {o} ({d})")
        if args.compare:
            raw = run_projectors(paths, out, jobs=args.jobs, timeout=args.timeout, unchecked=True, bound=3600.0)
            print("without the pre-check:", _report(raw, 0.0).splitlines()[0])
            for name, (o, d) in sorted(result.outcomes.items()):
                if o == "rejected" and raw.outcomes.get(name, ("",))[0] in ("ok", "error"):
                    print(f"  stricter: {name}: {d.split(': ', 1)[-1][:160]}")
    return 1 if result.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
