#include "batch.h"

/* A loop here instead of a numpy reduction, whose cold start costs several microseconds per
   evaluated prompt. */
int64_t pyllama_first_bad_token(const llama_token * toks, int64_t n, int32_t n_vocab) {
    for (int64_t i = 0; i < n; ++i) {
        if ((uint32_t) toks[i] >= (uint32_t) n_vocab) {
            return i;
        }
    }
    return -1;
}

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

/* generate_parallel: one call instead of a handful of numpy operations, each slow right after a
   decode has pushed Python's data out of the caches. */
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
