/* The per-token step of pyllama.generate, in C: decode the last token, choose the next (argmax or
   the sampler chain), and write its text piece, one call per token; plus the same loop without
   detokenization (pyllama_c_generate_loop), the baseline the binding's overhead is measured on. */
#ifndef PYLLAMA_STEP_H
#define PYLLAMA_STEP_H

#include <stdint.h>

#include "callbacks.h"
#include "llama.h"

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

/* pyllama_step_next's results other than a token, and s->rc when a sampler threw. */
#define PYLLAMA_STEP_FAILED (-1)
#define PYLLAMA_STEP_EOG (-2)
#define PYLLAMA_STEP_FULL (-3)
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
int32_t pyllama_step_next(struct llama_context * ctx, pyllama_step * s);

/* pyllama_step_next's state for a new generation, in one call: a dozen struct fields set from Python
   cost microseconds when that code is cold, as it is at every generation's start. */
void pyllama_step_init(pyllama_step * s, struct llama_sampler * smpl, const struct llama_vocab * vocab,
                       pyllama_abort_state * st, llama_pos pos, llama_pos n_ctx_seq, llama_seq_id seq,
                       int32_t greedy, int32_t n_vocab, int32_t lstrip);

/* The length of the longest prefix of buf[0..n) that does not end inside a character: the bytes
   after it are what Python's incremental utf-8 decoder holds back (a lead byte followed by fewer
   continuation bytes than it needs, each in the range CPython accepts at its place); anything else,
   valid or not, is decoded (or replaced) at once. */
int32_t pyllama_utf8_complete(const char * buf, int32_t n);

/* The C baseline of pyllama.generate's loop, for measuring the binding's
   per-token overhead in one process: sample from the last logits, decode the
   token at the next position, n times (the last token is sampled, not decoded).
   smpl NULL: the greedy token by argmax instead of a sampler. Returns n, or
   -(i + 1) when the decode after token i failed. */
int32_t pyllama_c_generate_loop(struct llama_context * ctx, struct llama_sampler * smpl,
                                int32_t pos0, int32_t n, llama_token * out);

#endif /* PYLLAMA_STEP_H */
