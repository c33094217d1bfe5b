#include "step.h"

#include "pyllama_common.h"

#include <string.h>
#if defined(__SSE2__) || defined(_M_X64)
#    include <emmintrin.h>
#endif

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
