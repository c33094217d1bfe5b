"""Generate pyllama's cffi binding from the vendored llama.cpp headers.

The declarations are the headers themselves: the real C preprocessor expands
``llama.h`` (and the ggml headers it includes) against empty stand-ins for the
libc headers, declarations marked deprecated are dropped, attributes are
stripped, and each integer ``#define`` is re-added as ``#define X ...`` so the
compiler supplies its value. Nothing here restates a llama.cpp declaration.

Usage (CMake runs this at build time)::

    python tools/gen_binding.py --include DIR [--include DIR ...] \
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
FUNCTION_HEADERS = ("llama.h", "ggml-backend.h", "gguf.h")
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

# Our own C, compiled into the module beside the binding. Kept tiny: an abort
# callback that never re-enters Python on the hot path, and a silent logger that
# replaces the Python one at interpreter exit.
# Defined in libpyllama-common (src/native/*.cpp: llama.cpp's common/ helpers
# behind C entry points); the module links against it. The chat and JSON-schema
# entry points take and return JSON text (malloc'ed, freed by pyllama_free_string).
COMMON_DECLS = """int32_t pyllama_cpu_get_num_math(void);
int32_t pyllama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx,
                               llama_token * token);
int32_t pyllama_sampler_accept(struct llama_sampler * smpl, llama_token token);
const char * pyllama_sampling_error(void);
int32_t pyllama_fit_params(const char * path_model, struct llama_model_params * mparams,
                           struct llama_context_params * cparams, float * tensor_split,
                           struct llama_model_tensor_buft_override * tensor_buft_overrides,
                           size_t * margins, uint32_t n_ctx_min, int32_t log_level);
int32_t pyllama_fit_memory(const char * path_model, const struct llama_model_params * mparams,
                           const struct llama_context_params * cparams, int64_t * out,
                           ggml_backend_dev_t * devices, int32_t max_rows, int32_t log_level);
typedef struct common_chat_templates common_chat_templates;
void pyllama_free_string(char * s);
common_chat_templates * pyllama_chat_templates_init(const struct llama_model * model,
                                                    const char * template_override, char ** error);
void pyllama_chat_templates_free(common_chat_templates * tmpls);
char * pyllama_chat_templates_info(const common_chat_templates * tmpls);
char * pyllama_chat_apply(const common_chat_templates * tmpls, const char * request);
char * pyllama_chat_parse(const char * parser_state, const char * text, size_t n_text, bool partial);
char * pyllama_json_schema_to_grammar(const char * schema_json);
char * pyllama_grammar_accept_text(struct llama_sampler * smpl, const struct llama_vocab * vocab,
                                   const char * text);
typedef struct pyllama_spec pyllama_spec;
pyllama_spec * pyllama_spec_init(const char * config, struct llama_context * ctx_tgt,
                                 struct llama_context * ctx_dft, uint32_t n_seq);
void pyllama_spec_free(pyllama_spec * s);
int32_t pyllama_spec_begin(pyllama_spec * s, int32_t seq_id, const llama_token * prompt, int32_t n_prompt);
int32_t pyllama_spec_draft(pyllama_spec * s, int32_t seq_id, const llama_token * history, int32_t n_history,
                           llama_token id_last, int32_t n_max, llama_token * out, int32_t cap);
int32_t pyllama_spec_process(pyllama_spec * s, int32_t seq_id, const llama_token * tokens, int32_t n,
                             llama_pos pos0);
int32_t pyllama_spec_accept(pyllama_spec * s, int32_t seq_id, int32_t n_accepted);
const char * pyllama_spec_error(void);
char * pyllama_vulkan_drivers(void);
"""

# The types C_SOURCE defines and C_CDEF declares: written once.
SHARED_TYPES = """\
typedef struct pyllama_abort_state {
    volatile int32_t flag;        /* set by ctx.abort() from any thread */
    volatile int32_t interrupted; /* set when a pending SIGINT asked to stop */
    int32_t check_signals;        /* poll Python's signal handlers (main thread only) */
    int64_t next_check_ns;
} pyllama_abort_state;
/* The state of pyllama_step_next between tokens of one generation (see there). */
typedef struct pyllama_step {
    struct llama_sampler * smpl;      /* the chain (unused when greedy) */
    const struct llama_vocab * vocab;
    pyllama_abort_state * st;         /* the context's abort state, or NULL */
    llama_token prev;                 /* to decode first (< 0: none); then the token chosen */
    llama_pos pos;                    /* where prev goes */
    llama_pos n_ctx_seq;              /* a sequence's cells: no decode at or past it */
    llama_seq_id seq;
    int32_t greedy;                   /* argmax instead of the chain */
    int32_t n_vocab;
    int32_t lstrip;                   /* strip the leading space of the next piece */
    int32_t rc;                       /* why the last step failed */
    int32_t n_piece;                  /* bytes of whole characters in piece; negative: -needed (did not fit) */
    int32_t n_pending;                /* bytes of a character still incomplete, held for the next piece */
    char pending[4];
    char piece[256];
} pyllama_step;
"""

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#endif
#include "llama.h"
#include "ggml-backend.h"
#include "gguf.h"

static const char PYLLAMA_BINDING_VERSION[] = @VERSION@;
static const char PYLLAMA_BUILD_INFO[] = @BUILD_INFO@;

const char * pyllama_binding_version(void) { return PYLLAMA_BINDING_VERSION; }
const char * pyllama_build_info(void) { return PYLLAMA_BUILD_INFO; }

@SHARED_TYPES@
static int64_t pyllama_now_ns(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ggml calls this between graph nodes. Reading a flag is free; polling Python's
   signal handlers needs the GIL, so it happens at most every 20 ms and only for
   a decode started on the main thread (the one that receives SIGINT). */
bool pyllama_abort_callback(void * data) {
    pyllama_abort_state * st = (pyllama_abort_state *) data;
    if (st->flag) {
        return true;
    }
    if (st->check_signals) {
        int64_t now = pyllama_now_ns();
        if (now >= st->next_check_ns) {
            st->next_check_ns = now + 20000000;
            PyGILState_STATE g = PyGILState_Ensure();
            if (PyErr_CheckSignals() != 0) {
                PyErr_Clear();
                st->interrupted = 1;
                st->flag = 1;
            }
            PyGILState_Release(g);
        }
    }
    return st->flag != 0;
}

void pyllama_log_silent(enum ggml_log_level level, const char * text, void * user_data) {
    (void) level; (void) text; (void) user_data;
}

/* libpyllama-common (src/native/*.cpp): llama.cpp's common/ helpers behind a C ABI. */
@COMMON_DECLS@
static int32_t pyllama_argmax(const float * x, int32_t n);

/* The C baseline of pyllama.generate's loop, for measuring the binding's
   per-token overhead in one process: sample from the last logits, decode the
   token at the next position, n times (the last token is sampled, not decoded).
   smpl NULL: the greedy token by pyllama_argmax instead of a sampler. */
int32_t pyllama_c_generate_loop(struct llama_context * ctx, struct llama_sampler * smpl,
                                int32_t pos0, int32_t n, llama_token * out) {
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
    llama_token tok = 0;
    llama_pos pos = pos0;
    llama_seq_id seq = 0;
    llama_seq_id * seqs = &seq;
    int32_t n_seq = 1;
    int8_t want = 1;
    struct llama_batch b = { 1, &tok, NULL, &pos, &n_seq, &seqs, &want };
    for (int32_t i = 0; i < n; ++i) {
        tok = smpl != NULL ? llama_sampler_sample(smpl, ctx, -1)
                           : pyllama_argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        out[i] = tok;
        if (i + 1 == n) {
            break;
        }
        if (llama_decode(ctx, b) != 0) {
            return -(i + 1);
        }
        pos++;
    }
    return n;
}

/* llama.cpp's greedy choice (llama_sampler_greedy: the first index of the
   largest logit; a NaN is never chosen over index 0) without its candidate
   array: the maximum with SIMD, then the first index holding it. */
static int32_t pyllama_argmax_scalar(const float * x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}

static int32_t pyllama_argmax(const float * x, int32_t n) {
#if defined(__SSE2__) || defined(_M_X64)
    if (n >= 16) {
        __m128 m0 = _mm_loadu_ps(x), m1 = m0, m2 = m0, m3 = m0;
        __m128 nan = _mm_setzero_ps();
        int32_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
            __m128 c = _mm_loadu_ps(x + i + 8), d = _mm_loadu_ps(x + i + 12);
            nan = _mm_or_ps(nan, _mm_or_ps(_mm_or_ps(_mm_cmpunord_ps(a, a), _mm_cmpunord_ps(b, b)),
                                           _mm_or_ps(_mm_cmpunord_ps(c, c), _mm_cmpunord_ps(d, d))));
            m0 = _mm_max_ps(m0, a);
            m1 = _mm_max_ps(m1, b);
            m2 = _mm_max_ps(m2, c);
            m3 = _mm_max_ps(m3, d);
        }
        if (_mm_movemask_ps(nan) != 0) {
            return pyllama_argmax_scalar(x, n);  /* NaNs: keep the scalar rule's exact answer */
        }
        float lanes[4];
        _mm_storeu_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
        float mx = lanes[0];
        for (int32_t k = 1; k < 4; ++k) {
            mx = lanes[k] > mx ? lanes[k] : mx;
        }
        for (; i < n; ++i) {
            if (x[i] != x[i]) {
                return pyllama_argmax_scalar(x, n);
            }
            mx = x[i] > mx ? x[i] : mx;
        }
        /* the first index of the maximum, as the scalar rule finds */
        __m128 want = _mm_set1_ps(mx);
        int32_t j = 0;
        for (; j + 16 <= n; j += 16) {
            __m128 a = _mm_cmpeq_ps(_mm_loadu_ps(x + j), want), b = _mm_cmpeq_ps(_mm_loadu_ps(x + j + 4), want);
            __m128 c = _mm_cmpeq_ps(_mm_loadu_ps(x + j + 8), want), d = _mm_cmpeq_ps(_mm_loadu_ps(x + j + 12), want);
            if (_mm_movemask_ps(_mm_or_ps(_mm_or_ps(a, b), _mm_or_ps(c, d))) != 0) {
                break;
            }
        }
        for (; j < n; ++j) {
            if (x[j] == mx) {
                return j;
            }
        }
    }
#endif
    return pyllama_argmax_scalar(x, n);
}

#define PYLLAMA_STEP_SAMPLER_ERROR (-1000)

/* One token of pyllama.generate in one call (the fused per-token step): decode
   s->prev at s->pos in sequence s->seq (unless prev < 0), take the next token
   from the last logits (argmax when s->greedy, which is llama.cpp's greedy
   choice, first maximum, without its vocabulary-sized candidate array; else the
   sampler chain), and write its piece. s->st (the context's abort state, or
   NULL) is re-armed before the decode; a successful decode advances s->pos.
   Returns the token (>= 0, with s->n_piece bytes of piece, negative when the
   piece did not fit: -needed), or
     PYLLAMA_STEP_EOG      the token (in s->prev) ends generation;
     PYLLAMA_STEP_FULL     s->pos reached s->n_ctx_seq: nothing was done;
     PYLLAMA_STEP_FAILED   s->rc says why: llama_decode's code (0 with
                           st->interrupted: a Ctrl-C at the graph's last node)
                           or PYLLAMA_STEP_SAMPLER_ERROR (the decode succeeded). */
/* The length of the longest prefix of buf[0..n) that does not end inside a character: the bytes
   after it are what Python's incremental utf-8 decoder holds back (a lead byte followed by fewer
   continuation bytes than it needs, each in the range CPython accepts at its place); anything else,
   valid or not, is decoded (or replaced) at once. */
int32_t pyllama_utf8_complete(const char * buf, int32_t n) {
    const unsigned char * b = (const unsigned char *) buf;
    for (int32_t back = 1; back <= 3 && back <= n; ++back) {
        unsigned char c = b[n - back];
        if ((c & 0xC0) == 0x80) {
            continue;  /* a continuation byte: its lead is further back */
        }
        int32_t need = (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 1;
        if (need <= back) {
            return n;
        }
        for (int32_t k = 1; k < back; ++k) {
            unsigned char cc = b[n - back + k];
            unsigned char lo = 0x80, hi = 0xBF;
            if (k == 1) {
                if (c == 0xE0) lo = 0xA0;  /* (CPython holds ED A0..BF back too: a surrogate, replaced once whole) */
                else if (c == 0xF0) lo = 0x90;
                else if (c == 0xF4) hi = 0x8F;
            }
            if (cc < lo || cc > hi) {
                return n;  /* not a prefix of any character: replaced now */
            }
        }
        return n - back;
    }
    return n;
}

#define PYLLAMA_STEP_FAILED (-1)
#define PYLLAMA_STEP_EOG (-2)
#define PYLLAMA_STEP_FULL (-3)
int32_t pyllama_step_next(struct llama_context * ctx, pyllama_step * s) {
    if (s->prev >= 0) {
        if (s->pos >= s->n_ctx_seq) {
            return PYLLAMA_STEP_FULL;
        }
        pyllama_abort_state * st = s->st;
        if (st != NULL) {  /* what Context._arm_abort does before each decode */
            st->flag = 0;
            st->interrupted = 0;
        }
        llama_token tok = s->prev;
        llama_pos p = s->pos;
        llama_seq_id seq = s->seq;
        llama_seq_id * seqs = &seq;
        int32_t n_seq = 1;
        int8_t want = 1;
        struct llama_batch b = { 1, &tok, NULL, &p, &n_seq, &seqs, &want };
        int32_t rc = llama_decode(ctx, b);
        if (rc != 0 || (st != NULL && st->interrupted)) {
            s->rc = rc;
            return PYLLAMA_STEP_FAILED;
        }
        s->pos++;
    }
    llama_token next;
    if (s->greedy) {
        next = pyllama_argmax(llama_get_logits_ith(ctx, -1), s->n_vocab);
    } else if (pyllama_sampler_sample(s->smpl, ctx, -1, &next) != 0) {
        s->rc = PYLLAMA_STEP_SAMPLER_ERROR;  /* a sampler threw: pyllama_sampling_error() */
        return PYLLAMA_STEP_FAILED;
    }
    s->prev = next;
    if (llama_vocab_is_eog(s->vocab, next)) {
        s->n_piece = 0;
        return PYLLAMA_STEP_EOG;
    }
    /* the piece after the bytes held back, then the end of an incomplete character held back again:
       what is left decodes on its own, exactly as Python's incremental utf-8 decoder would emit it */
    int32_t held = s->n_pending;
    memcpy(s->piece, s->pending, (size_t) held);
    int32_t n = llama_token_to_piece(s->vocab, next, s->piece + held, (int32_t) sizeof(s->piece) - held,
                                     s->lstrip, false);
    if (n < 0) {
        s->n_piece = n;  /* the caller asks for the piece again, with lstrip, and clears it */
        return next;
    }
    s->lstrip = 0;
    n += held;
    int32_t whole = pyllama_utf8_complete(s->piece, n);
    s->n_pending = n - whole;
    memcpy(s->pending, s->piece + whole, (size_t) (n - whole));
    s->n_piece = whole;
    return next;
}

/* pyllama_step_next's state for a new generation, in one call: a dozen struct fields set from Python
   cost microseconds when that code is cold, as it is at every generation's start. */
void pyllama_step_init(pyllama_step * s, struct llama_sampler * smpl, const struct llama_vocab * vocab,
                       pyllama_abort_state * st, llama_pos pos, llama_pos n_ctx_seq, llama_seq_id seq,
                       int32_t greedy, int32_t n_vocab, int32_t lstrip) {
    memset(s, 0, sizeof *s);
    s->smpl = smpl;
    s->vocab = vocab;
    s->st = st;
    s->prev = -1;
    s->pos = pos;
    s->n_ctx_seq = n_ctx_seq;
    s->seq = seq;
    s->greedy = greedy;
    s->n_vocab = n_vocab;
    s->lstrip = lstrip;
}

/* The index of the first id outside [0, n_vocab), or -1 (Vocab.check_tokens: a loop here instead of
   a numpy reduction, whose cold start costs several microseconds per evaluated prompt). */
int64_t pyllama_first_bad_token(const llama_token * toks, int64_t n, int32_t n_vocab) {
    for (int64_t i = 0; i < n; ++i) {
        if ((uint32_t) toks[i] >= (uint32_t) n_vocab) {
            return i;
        }
    }
    return -1;
}

/* Batch.add for one sequence's tokens at positions pos0, pos0+1, ... after the batch's rows, with
   logits for none (0), the last (1) or all (2) of them; the caller checked the capacity. */
void pyllama_batch_add_seq(struct llama_batch * b, const llama_token * toks, int32_t n, llama_pos pos0,
                           llama_seq_id seq, int32_t logits) {
    int32_t start = b->n_tokens;
    for (int32_t i = 0; i < n; ++i) {
        int32_t r = start + i;
        b->token[r] = toks[i];
        b->pos[r] = (llama_pos) ((int64_t) pos0 + i);
        b->n_seq_id[r] = 1;
        b->seq_id[r][0] = seq;
        b->logits[r] = (int8_t) (logits == 2 || (logits == 1 && i == n - 1));
    }
    b->n_tokens = start + n;
}

/* One decoding step of parallel sequences: the next token of each sequence live[0..n) at its position,
   one row each with logits, the positions advanced (generate_parallel; one call instead of a handful of
   numpy operations, each slow right after a decode has pushed Python's data out of the caches). */
void pyllama_batch_step_rows(struct llama_batch * b, const llama_token * next, llama_pos * pos,
                             const int32_t * live, int32_t n) {
    for (int32_t r = 0; r < n; ++r) {
        int32_t i = live[r];
        b->token[r] = next[i];
        b->pos[r] = pos[i]++;
        b->n_seq_id[r] = 1;
        b->seq_id[r][0] = i;
        b->logits[r] = 1;
    }
    b->n_tokens = n;
}
"""

C_CDEF = """
const char * pyllama_binding_version(void);
const char * pyllama_build_info(void);
@SHARED_TYPES@bool pyllama_abort_callback(void * data);
void pyllama_log_silent(enum ggml_log_level level, const char * text, void * user_data);
#define PYLLAMA_STEP_SAMPLER_ERROR -1000
#define PYLLAMA_STEP_FAILED -1
#define PYLLAMA_STEP_EOG -2
#define PYLLAMA_STEP_FULL -3
@COMMON_DECLS@int32_t pyllama_c_generate_loop(struct llama_context * ctx, struct llama_sampler * smpl,
                                int32_t pos0, int32_t n, llama_token * out);
int32_t pyllama_step_next(struct llama_context * ctx, pyllama_step * s);
int32_t pyllama_utf8_complete(const char * buf, int32_t n);
void pyllama_step_init(pyllama_step * s, struct llama_sampler * smpl, const struct llama_vocab * vocab,
                       pyllama_abort_state * st, llama_pos pos, llama_pos n_ctx_seq, llama_seq_id seq,
                       int32_t greedy, int32_t n_vocab, int32_t lstrip);
int64_t pyllama_first_bad_token(const llama_token * toks, int64_t n, int32_t n_vocab);
void pyllama_batch_add_seq(struct llama_batch * b, const llama_token * toks, int32_t n, llama_pos pos0,
                           llama_seq_id seq, int32_t logits);
void pyllama_batch_step_rows(struct llama_batch * b, const llama_token * next, llama_pos * pos,
                             const int32_t * live, int32_t n);

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
    header = ""
    start_header = ""
    buf: list[str] = []
    depth = 0
    for line in expanded.splitlines():
        m = _LINEMARKER.match(line)
        if m:
            header = os.path.basename(m.group(2))
            continue
        if line.startswith("#"):
            continue
        for ch in line + "\n":
            if not buf and ch.isspace():
                continue
            if not buf:
                start_header = header
            buf.append(ch)
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == ";" and depth == 0:
                text = " ".join("".join(buf).split())
                decls.append(Decl(start_header, text))
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
    for decl in split_declarations(preprocess(include_dirs, cc)):
        if decl.header not in FUNCTION_HEADERS + TYPE_HEADERS or is_deprecated(decl):
            continue
        text = clean(decl.text)
        name = Decl(decl.header, text).function_name
        if name is not None:
            if decl.header not in FUNCTION_HEADERS or text.startswith("static"):
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


def build_cdef(include_dirs: list[Path], cc: str) -> str:
    decls, _ = collect(include_dirs, cc)
    decls += proc_declarations(include_dirs, cc)
    cdef = C_CDEF.replace("@COMMON_DECLS@", COMMON_DECLS).replace("@SHARED_TYPES@", SHARED_TYPES)
    return "\n".join(decls + collect_defines(include_dirs)) + "\n" + cdef


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
    include_dirs: list[Path], version: str, build_info: str, out: Path, cc: str, cdef_out: Path | None
) -> None:
    import cffi

    cdef = build_cdef(include_dirs, cc)
    if cdef_out is not None:
        cdef_out.write_text(cdef)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    source = C_SOURCE.replace("@VERSION@", _c_string(version)).replace("@COMMON_DECLS@", COMMON_DECLS)
    source = source.replace("@SHARED_TYPES@", SHARED_TYPES)
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
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--build-info", type=Path, help="JSON file stamped into the module")
    parser.add_argument("--cdef-out", type=Path)
    parser.add_argument("--cc", default=None)
    args = parser.parse_args(argv)
    info = args.build_info.read_text() if args.build_info else "{}"
    json.loads(info)  # fail the build on a malformed stamp, not the import
    emit(args.include, args.version, info, args.out, args.cc or default_cc(), args.cdef_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
