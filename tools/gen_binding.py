"""Generate pyllama's cffi binding from the vendored llama.cpp headers.

The declarations are the headers themselves: the real C preprocessor expands
``llama.h`` (and the ggml headers it includes) against empty stand-ins for the
libc headers, declarations marked deprecated are dropped, attributes are
stripped, and each integer ``#define`` is re-added as ``#define X ...`` so the
compiler supplies its value. Nothing here restates a llama.cpp declaration.

pyllama's own C is no exception: it lives in src/native as real C and C++
files, compiled with warnings on, and its headers are read the same way. All
this file writes itself is the version stamp and the ``extern "Python"``
callbacks, which only a generated module can hold.

Usage (CMake runs this at build time)::

    python tools/gen_binding.py --include DIR [--include DIR ...] [--native DIR] \
        --version X.Y.Z --out _cffi.c [--cdef-out cdef.h]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Headers whose functions are bound. ggml.h, ggml-alloc.h, ggml-cpu.h and
# ggml-opt.h contribute their types only: ggml-cpu lives in a dlopen()ed backend
# module that nothing can link against, and the tensor API is not ours to expose.
FUNCTION_HEADERS = ("llama.h", "ggml-backend.h", "gguf.h", "mtmd.h", "mtmd-helper.h")
# The headers preprocessed for them: llama.h brings ggml's; libmtmd's (tools/mtmd:
# images and audio into a text model) follow, their repeats of llama.h dropped.
ENTRY_HEADERS = ("llama.h", "mtmd-helper.h")
TYPE_HEADERS = ("ggml.h", "ggml-alloc.h", "ggml-cpu.h", "ggml-opt.h")
# Integer macros re-exported as constants.
DEFINE_HEADERS = ("llama.h", "ggml.h", "gguf.h")
DEFINE_PREFIXES = ("LLAMA_", "GGML_", "GGUF_")
# Headers of backend modules that are dlopen()ed (GGML_BACKEND_DL): nothing can
# link against their functions, which are reached through
# ggml_backend_reg_get_proc_address. Each function becomes a function-pointer
# type NAME_t (ggml_backend_rpc_add_server_t, ...) for ffi.cast, and the
# header's integer macros with these prefixes are re-exported.
PROC_HEADERS = {"ggml-rpc.h": ("GGML_RPC_", "RPC_PROTO_")}

# pyllama's own C lives in src/native, where compilers and editors see it: the .c
# files are compiled into the module beside the generated binding, the .cpp files
# into libpyllama-common. Their headers join the cdef as llama.h does (through the
# preprocessor, so include guards and export macros vanish), in this order, and
# their integer macros with this prefix are re-exported.
NATIVE_DIR = Path(__file__).resolve().parent.parent / "src" / "native"
NATIVE_HEADERS = ("pyllama_common.h", "callbacks.h", "step.h", "batch.h")
NATIVE_DEFINE_PREFIX = "PYLLAMA_"

# What only the generated module can hold: the version stamp (it must match the
# Python package, see pyllama._ffi) and the Python functions C calls back.
BINDING_SOURCE = r"""
#include "llama.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "mtmd.h"
#include "mtmd-helper.h"
@NATIVE_INCLUDES@
static const char PYLLAMA_BINDING_VERSION[] = @VERSION@;
static const char PYLLAMA_BUILD_INFO[] = @BUILD_INFO@;

const char * pyllama_binding_version(void) { return PYLLAMA_BINDING_VERSION; }
const char * pyllama_build_info(void) { return PYLLAMA_BUILD_INFO; }
"""

BINDING_CDEF = """
const char * pyllama_binding_version(void);
const char * pyllama_build_info(void);

extern "Python" void _pyllama_log(enum ggml_log_level, const char *, void *);
extern "Python" bool _pyllama_progress(float, void *);
extern "Python" const char * _pyllama_sampler_name(const struct llama_sampler *);
extern "Python" void _pyllama_sampler_accept(struct llama_sampler *, llama_token);
extern "Python" void _pyllama_sampler_apply(struct llama_sampler *, llama_token_data_array *);
extern "Python" void _pyllama_sampler_reset(struct llama_sampler *);
extern "Python" struct llama_sampler * _pyllama_sampler_clone(const struct llama_sampler *);
extern "Python" void _pyllama_sampler_free(struct llama_sampler *);
"""

_LIBC_STUBS = ("stddef.h", "stdint.h", "stdio.h", "stdbool.h", "stdlib.h", "string.h")
_LINEMARKER = re.compile(r'^#\s*(\d+)\s+"([^"]*)"')
_INT_VALUE = re.compile(r"^\(?\s*-?\s*(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\s*\)?$")
_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Z][A-Z0-9_]*)\s+(.+?)\s*(//.*|/\*.*)?$")


@dataclass
class Decl:
    header: str
    text: str
    path: str = ""  # the header as the preprocessor named it

    @property
    def is_function(self) -> bool:
        head = self.text.split("{", 1)[0]
        return not self.text.startswith("typedef") and "(" in head

    @property
    def function_name(self) -> str | None:
        if not self.is_function:
            return None
        m = re.search(r"(\w+)\s*\(", self.text)
        return m.group(1) if m else None


def find_header(name: str, include_dirs: list[Path]) -> Path:
    for d in include_dirs:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{name} not found in {', '.join(map(str, include_dirs))}")


def preprocess(include_dirs: list[Path], cc: str, header: str = "llama.h") -> str:
    """Run the real preprocessor over llama.h (or another header); libc headers are empty stand-ins."""
    with tempfile.TemporaryDirectory() as tmp:
        for stub in _LIBC_STUBS:
            Path(tmp, stub).write_text("")
        args = [cc, "-E", "-nostdinc", "-I", tmp]
        for d in include_dirs:
            args += ["-I", str(d)]
        # __GNUC__ keeps the DEPRECATED() markers visible as attributes we can
        # filter on; no LLAMA_SHARED/GGML_SHARED so the API macros expand to
        # nothing (or plain `extern`).
        args += ["-D__GNUC__=12", "-x", "c", str(find_header(header, include_dirs))]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def split_declarations(expanded: str) -> list[Decl]:
    """Split preprocessed text into top-level declarations, each tagged with its header."""
    decls: list[Decl] = []
    header = path = ""
    start_header = start_path = ""
    buf: list[str] = []
    depth = 0
    for line in expanded.splitlines():
        m = _LINEMARKER.match(line)
        if m:
            path = m.group(2)
            header = os.path.basename(path)
            continue
        if line.startswith("#"):
            continue
        for ch in line + "\n":
            if not buf and ch.isspace():
                continue
            if not buf:
                start_header, start_path = header, path
            buf.append(ch)
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == ";" and depth == 0:
                text = " ".join("".join(buf).split())
                decls.append(Decl(start_header, text, start_path))
                buf = []
    return decls


def _strip_balanced(text: str, keyword: str) -> str:
    """Remove every `keyword(...)` with balanced parentheses."""
    while True:
        i = text.find(keyword)
        if i < 0:
            return text
        j = text.index("(", i)
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "(":
                depth += 1
            elif text[k] == ")":
                depth -= 1
                if depth == 0:
                    break
        text = text[:i] + text[k + 1 :]


def clean(text: str) -> str:
    text = _strip_balanced(text, "__attribute__")
    text = _strip_balanced(text, "__declspec")
    text = re.sub(r"\b(_Noreturn|__restrict__|__restrict|restrict|__inline__|__inline)\b", "", text)
    text = re.sub(r"^extern\s+", "", text.strip())
    # pycparser folds only literal array sizes; let the compiler size the rest.
    text = re.sub(r"\[([^\]]*[^\]\d\s][^\]]*)\]", "[...]", text)
    return " ".join(text.split())


def is_deprecated(decl: Decl) -> bool:
    return "deprecated" in decl.text and "__attribute__" in decl.text


def collect(include_dirs: list[Path], cc: str) -> tuple[list[str], list[str]]:
    """Return (declarations, bound function names) for the cdef."""
    out: list[str] = []
    seen: set[str] = set()
    functions: list[str] = []
    decls = [d for entry in ENTRY_HEADERS for d in split_declarations(preprocess(include_dirs, cc, entry))]
    for decl in decls:
        if decl.header not in FUNCTION_HEADERS + TYPE_HEADERS or is_deprecated(decl):
            continue
        text = clean(decl.text)
        name = Decl(decl.header, text).function_name
        if name is not None:
            if decl.header not in FUNCTION_HEADERS or text.startswith("static") or name in functions:
                continue
            functions.append(name)
        # C11 allows repeating a typedef (ggml does); cffi does not.
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out, functions


def collect_defines(include_dirs: list[Path]) -> list[str]:
    """Integer macros of the public headers, as `#define NAME ...` lines."""
    names: dict[str, str] = {}
    for header in DEFINE_HEADERS:
        for line in find_header(header, include_dirs).read_text().splitlines():
            m = _DEFINE.match(line)
            if not m or not m.group(1).startswith(DEFINE_PREFIXES):
                continue
            name, value = m.group(1), m.group(2).strip()
            if _INT_VALUE.match(value) or value in names:
                names[name] = value
    return [f"#define {name} ..." for name in names]


_PROTOTYPE = re.compile(r"^(?P<ret>.*?)\b(?P<name>\w+)\s*\((?P<args>.*)\)\s*;$")


def proc_declarations(include_dirs: list[Path], cc: str) -> list[str]:
    """PROC_HEADERS' functions as function-pointer typedefs, and their macros as ``#define X ...``."""
    out: list[str] = []
    for header, prefixes in PROC_HEADERS.items():
        for decl in split_declarations(preprocess(include_dirs, cc, header)):
            if decl.header != header or is_deprecated(decl):
                continue
            text = clean(decl.text)
            m = _PROTOTYPE.match(text) if Decl(header, text).is_function else None
            if m is not None and not text.startswith("static"):
                out.append(f"typedef {m['ret'].strip()} (*{m['name']}_t)({m['args']});")
        for line in find_header(header, include_dirs).read_text().splitlines():
            d = _DEFINE.match(line)
            if d and d.group(1).startswith(prefixes) and _INT_VALUE.match(d.group(2).strip()):
                out.append(f"#define {d.group(1)} ...")
    return out


def proc_source(include_dirs: list[Path], cc: str) -> str:
    """The C side of :func:`proc_declarations`: the headers (for the macros) and the same typedefs."""
    lines = [f'#include "{h}"' for h in PROC_HEADERS]
    lines += [d for d in proc_declarations(include_dirs, cc) if not d.startswith("#define")]
    return "\n".join(lines) + "\n"


def native_declarations(include_dirs: list[Path], cc: str, native_dir: Path = NATIVE_DIR) -> list[str]:
    """NATIVE_HEADERS' own declarations (not those of the headers they include) and integer macros."""
    native_dir = native_dir.resolve()
    out: list[str] = []
    seen: set[str] = set()
    for header in NATIVE_HEADERS:
        # A native header includes another (step.h needs callbacks.h): each declaration once.
        for decl in split_declarations(preprocess([native_dir, *include_dirs], cc, header)):
            if Path(decl.path).resolve().parent != native_dir:
                continue
            text = clean(decl.text)
            if text not in seen:
                seen.add(text)
                out.append(text)
        for line in (native_dir / header).read_text().splitlines():
            d = _DEFINE.match(line)
            if d and d.group(1).startswith(NATIVE_DEFINE_PREFIX) and _INT_VALUE.match(d.group(2).strip()):
                out.append(f"#define {d.group(1)} ...")
    return out


def build_cdef(include_dirs: list[Path], cc: str, native_dir: Path = NATIVE_DIR) -> str:
    decls, _ = collect(include_dirs, cc)
    decls += proc_declarations(include_dirs, cc)
    decls += collect_defines(include_dirs)
    decls += native_declarations(include_dirs, cc, native_dir)
    return "\n".join(decls) + "\n" + BINDING_CDEF


def bound_functions(include_dirs: list[Path], cc: str | None = None) -> list[str]:
    """Names of the functions the generated binding declares (for tests)."""
    return collect(include_dirs, cc or default_cc())[1]


def default_cc() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise RuntimeError("no C compiler found for preprocessing the headers")


def _c_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid C string literal for ASCII


def emit(
    include_dirs: list[Path],
    version: str,
    build_info: str,
    out: Path,
    cc: str,
    cdef_out: Path | None,
    native_dir: Path = NATIVE_DIR,
) -> None:
    import cffi

    cdef = build_cdef(include_dirs, cc, native_dir)
    if cdef_out is not None:
        cdef_out.write_text(cdef)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    includes = "".join(f'#include "{h}"\n' for h in NATIVE_HEADERS)
    source = BINDING_SOURCE.replace("@NATIVE_INCLUDES@", includes).replace("@VERSION@", _c_string(version))
    source += proc_source(include_dirs, cc)
    ffi.set_source("pyllama._cffi", source.replace("@BUILD_INFO@", _c_string(build_info)))
    tmp = out.with_suffix(".tmp.c")
    ffi.emit_c_code(str(tmp))
    # Only touch the output when it changed, so a Python-only rebuild does not
    # recompile the module.
    if out.is_file() and out.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate the cffi binding C source")
    parser.add_argument("--include", action="append", required=True, type=Path)
    parser.add_argument("--native", type=Path, default=NATIVE_DIR, help="pyllama's own C headers (src/native)")
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--build-info", type=Path, help="JSON file stamped into the module")
    parser.add_argument("--cdef-out", type=Path)
    parser.add_argument("--cc", default=None)
    args = parser.parse_args(argv)
    info = args.build_info.read_text() if args.build_info else "{}"
    json.loads(info)  # fail the build on a malformed stamp, not the import
    emit(args.include, args.version, info, args.out, args.cc or default_cc(), args.cdef_out, args.native)
    return 0


if __name__ == "__main__":
    sys.exit(main())
