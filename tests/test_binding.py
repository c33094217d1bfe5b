"""The binding is the header: every non-deprecated LLAMA_API function is reachable."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pyllama
from pyllama._ffi import ffi, lib

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = [ROOT / "vendor/llama.cpp/include", ROOT / "vendor/llama.cpp/ggml/include", ROOT / "vendor/llama.cpp/tools/mtmd"]
sys.path.insert(0, str(ROOT / "tools"))
import gen_binding  # noqa: E402


def _api_functions_from_header() -> set[str]:
    """Non-deprecated LLAMA_API functions, read from llama.h with a plain text scan (independent of the generator)."""
    text = (INCLUDE[0] / "llama.h").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    names = set()
    for stmt in text.split(";"):
        if "LLAMA_API" not in stmt or "DEPRECATED(" in stmt or "#define" in stmt:
            continue
        m = re.search(r"(\w+)\s*\($", stmt.split("LLAMA_API", 1)[1].split("(")[0] + "(")
        if m:
            names.add(m.group(1))
    return names


def test_every_llama_api_function_is_bound() -> None:
    wanted = _api_functions_from_header()
    assert len(wanted) > 150
    missing = sorted(n for n in wanted if not hasattr(lib, n))
    assert missing == []


def test_deprecated_functions_are_not_bound() -> None:
    text = (INCLUDE[0] / "llama.h").read_text()
    deprecated = re.findall(r"DEPRECATED\(\s*LLAMA_API[^(]*?(\w+)\s*\(", text)
    deprecated += re.findall(r"LLAMA_API\s+DEPRECATED\([^(]*?(\w+)\s*\(", text)
    assert "llama_load_model_from_file" in deprecated
    assert [n for n in deprecated if hasattr(lib, n)] == []


def test_generated_declarations_match_the_vendored_headers() -> None:
    """Regenerating from the headers gives what the compiled module was built from."""
    built = next((ROOT / "build").glob("*/cdef.h"), None)
    fresh = gen_binding.build_cdef(INCLUDE, gen_binding.default_cc())
    names = set(gen_binding.bound_functions(INCLUDE))
    assert {n for n in names if n.startswith("llama_")} >= _api_functions_from_header()
    # libmtmd (images and audio): its C API and its helpers' are bound from their headers too
    mtmd = set(re.findall(r"MTMD_API\s+[^;(]*?\b(mtmd_\w+)\s*\(",
                          (INCLUDE[2] / "mtmd.h").read_text() + (INCLUDE[2] / "mtmd-helper.h").read_text()))
    assert {"mtmd_init_from_file", "mtmd_tokenize_from_parts", "mtmd_helper_decode_image_chunk"} <= mtmd
    assert mtmd - {"mtmd_encode", "mtmd_image_tokens_get_nx", "mtmd_image_tokens_get_ny",
                   "mtmd_get_memory_usage"} <= names  # (deprecated, or C++ only)
    if built is not None:
        assert built.read_text() == fresh


def test_structs_and_callbacks_are_usable() -> None:
    p = lib.llama_model_default_params()
    assert p.n_gpu_layers != 12345
    c = lib.llama_context_default_params()
    assert c.n_ctx >= 0 and c.n_batch > 0
    assert ffi.sizeof("llama_token_data") == 12
    assert ffi.typeof("struct llama_sampler_i").kind == "struct"
    assert ffi.typeof("llama_token_data_array").kind == "struct"
    assert ffi.typeof("ggml_log_callback").kind == "function"
    assert ffi.typeof("llama_progress_callback").kind == "function"
    assert lib.LLAMA_DEFAULT_SEED == 0xFFFFFFFF and lib.LLAMA_TOKEN_NULL == -1


def test_module_version_stamp_matches_package() -> None:
    assert ffi.string(lib.pyllama_binding_version()).decode() == pyllama.__version__
    info = pyllama.build_info()
    assert info["pyllama_version"] == pyllama.__version__


def test_pinned_llama_cpp_commit() -> None:
    """A bump of the vendored tree is deliberate: this pin moves with it."""
    lock = (ROOT / "vendor/llama.cpp.lock").read_text()
    assert 'upstream_commit = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"' in lock
    assert pyllama.build_info()["llama_commit"] == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
