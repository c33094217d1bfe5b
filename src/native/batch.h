/* Filling a llama_batch's rows, and checking token ids before they go in: each a loop in C
   instead of a handful of numpy operations, whose cold start after a decode costs more than the
   work (pyllama.Batch, Vocab.check_tokens, generate_parallel). */
#ifndef PYLLAMA_BATCH_H
#define PYLLAMA_BATCH_H

#include <stdint.h>

#include "llama.h"

/* The index of the first id outside [0, n_vocab), or -1. */
int64_t pyllama_first_bad_token(const llama_token * toks, int64_t n, int32_t n_vocab);

/* Batch.add for one sequence's tokens at positions pos0, pos0+1, ... after the batch's rows, with
   logits for none (0), the last (1) or all (2) of them; the caller checked the capacity. */
void pyllama_batch_add_seq(struct llama_batch * b, const llama_token * toks, int32_t n, llama_pos pos0,
                           llama_seq_id seq, int32_t logits);

/* One decoding step of parallel sequences: the next token of each sequence live[0..n) at its
   position, one row each with logits, the positions advanced. */
void pyllama_batch_step_rows(struct llama_batch * b, const llama_token * next, llama_pos * pos,
                             const int32_t * live, int32_t n);

#endif /* PYLLAMA_BATCH_H */
