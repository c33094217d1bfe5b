/* Greedy decoding with the token chosen on the host, by argmax over the logits, or inside the compute graph
 * (llama.cpp's backend sampling), in C against libllama: bench/backend_sampling.py's three ways, for a machine
 * where only llama.cpp is built (a GPU lent for minutes, say). Each way gets its own context of the same model;
 * rounds interleave them; every way must produce the same token ids.
 *
 *   cc -O2 bench/backend_sampling.c -I vendor/llama.cpp/include -I vendor/llama.cpp/ggml/include \
 *      -L BUILD/bin -lllama -lggml -lggml-base -Wl,-rpath,BUILD/bin -o backend_sampling
 *   ./backend_sampling MODEL.gguf [n_tokens=128] [rounds=5] [n_gpu_layers=99] [n_threads=2] [cycles]
 *
 * With "cycles" it instead attaches a fresh greedy chain to one context for each round, generates, detaches
 * and frees it (what pyllama does per generation), and checks the tokens stay the host's. Loadable backends
 * are looked for where GGML_BACKEND_DIR points, else beside the executable.
 */
#include "ggml-backend.h"
#include "llama.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_MODES 3
static const char * MODE_NAMES[N_MODES] = { "host", "argmax", "backend" };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

/* llama.cpp's host greedy rule: the first index of the largest logit */
static llama_token argmax(const float * x, int32_t n) {
    int32_t best = 0;
    float mx = x[0];
    for (int32_t i = 1; i < n; ++i) {
        if (x[i] > mx) {
            mx = x[i];
            best = i;
        }
    }
    return best;
}

static int cmp_double(const void * a, const void * b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static int decode_one(struct llama_context * ctx, llama_token tok, llama_pos pos) {
    llama_seq_id seq = 0;
    llama_seq_id * seqs = &seq;
    int32_t n_seq = 1;
    int8_t want = 1;
    struct llama_batch b = { 1, &tok, NULL, &pos, &n_seq, &seqs, &want };
    return llama_decode(ctx, b);
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [n_tokens] [rounds] [n_gpu_layers] [n_threads]\n", argv[0]);
        return 2;
    }
    const int n = argc > 2 ? atoi(argv[2]) : 128;
    const int rounds = argc > 3 ? atoi(argv[3]) : 5;
    const int ngl = argc > 4 ? atoi(argv[4]) : 99;
    const int n_threads = argc > 5 ? atoi(argv[5]) : 2;
    const int cycles = argc > 6 && strcmp(argv[6], "cycles") == 0;
    llama_backend_init();
    const char * backend_dir = getenv("GGML_BACKEND_DIR");
    if (backend_dir != NULL) {
        ggml_backend_load_all_from_path(backend_dir);
    } else {
        ggml_backend_load_all(); /* a build with loadable backends (GGML_BACKEND_DL) finds them here */
    }
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = ngl;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    const char * text = "The history of the printing press begins";
    llama_token prompt[64];
    const int32_t n_prompt = llama_tokenize(vocab, text, (int32_t) strlen(text), prompt, 64, true, false);
    if (n_prompt < 2) {
        fprintf(stderr, "tokenize failed\n");
        return 1;
    }
    struct llama_context * ctx[N_MODES];
    struct llama_sampler * chain[N_MODES];
    for (int m = 0; m < N_MODES; ++m) {
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 1024;
        cp.n_batch = 512;
        cp.n_threads = cp.n_threads_batch = n_threads;
        ctx[m] = llama_init_from_model(model, cp);
        chain[m] = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(chain[m], llama_sampler_init_greedy());
        if (ctx[m] == NULL) {
            fprintf(stderr, "cannot create a context\n");
            return 1;
        }
    }
    if (cycles) {
        /* the host's greedy tokens, then attach / generate / detach / free on ctx[2], round after round */
        llama_token * want = malloc(sizeof(llama_token) * (size_t) n);
        llama_token * got = malloc(sizeof(llama_token) * (size_t) n);
        int ok = 1;
        for (int r = -1; r < rounds && ok; ++r) {
            struct llama_context * c = r < 0 ? ctx[0] : ctx[2];
            struct llama_sampler * sm = llama_sampler_chain_init(llama_sampler_chain_default_params());
            llama_sampler_chain_add(sm, llama_sampler_init_greedy());
            if (r >= 0 && !llama_set_sampler(c, 0, sm)) {
                fprintf(stderr, "llama_set_sampler refused\n");
                return 1;
            }
            llama_memory_clear(llama_get_memory(c), true);
            if (llama_decode(c, llama_batch_get_one(prompt, n_prompt - 1)) != 0) {
                return 1;
            }
            llama_pos pos = n_prompt - 1;
            llama_token tok = prompt[n_prompt - 1];
            for (int i = 0; i < n; ++i) {
                if (decode_one(c, tok, pos++) != 0) {
                    return 1;
                }
                tok = llama_sampler_sample(sm, c, -1);
                (r < 0 ? want : got)[i] = tok;
            }
            if (r >= 0) {
                llama_set_sampler(c, 0, NULL);
                ok = memcmp(want, got, sizeof(llama_token) * (size_t) n) == 0;
            }
            llama_sampler_free(sm);
        }
        printf("%d attach/generate/detach/free cycles on one context: %s\n", rounds, ok ? "tokens as the host's" : "TOKENS DIFFER");
        return ok ? 0 : 3;
    }
    if (!llama_set_sampler(ctx[2], 0, chain[2])) {
        fprintf(stderr, "llama_set_sampler refused the greedy chain here\n");
        return 1;
    }
    llama_token * ids = malloc(sizeof(llama_token) * (size_t) n * N_MODES);
    double * per_token = malloc(sizeof(double) * (size_t) rounds * N_MODES);
    int same = 1;
    for (int r = -1; r < rounds; ++r) { /* round -1: warm-up */
        for (int m = 0; m < N_MODES; ++m) {
            llama_memory_clear(llama_get_memory(ctx[m]), true);
            struct llama_batch pb = llama_batch_get_one(prompt, n_prompt - 1);
            if (llama_decode(ctx[m], pb) != 0) {
                fprintf(stderr, "prompt decode failed\n");
                return 1;
            }
            llama_synchronize(ctx[m]);
            llama_pos pos = n_prompt - 1;
            const double t0 = now_s();
            llama_token tok = prompt[n_prompt - 1];
            for (int i = 0; i < n; ++i) {
                if (decode_one(ctx[m], tok, pos++) != 0) {
                    fprintf(stderr, "decode failed\n");
                    return 1;
                }
                tok = m == 1 ? argmax(llama_get_logits_ith(ctx[m], -1), n_vocab)
                             : llama_sampler_sample(chain[m], ctx[m], -1);
                ids[m * n + i] = tok;
            }
            const double dt = now_s() - t0;
            if (r >= 0) {
                per_token[m * rounds + r] = dt / n;
            }
        }
        for (int m = 1; m < N_MODES; ++m) {
            same = same && memcmp(ids, ids + m * n, sizeof(llama_token) * (size_t) n) == 0;
        }
    }
    printf("%s: n_vocab %d, %d tokens, %d interleaved rounds, per token (median [min-max]):\n", argv[1], n_vocab, n,
           rounds);
    double med[N_MODES];
    for (int m = 0; m < N_MODES; ++m) {
        double * v = per_token + m * rounds;
        qsort(v, (size_t) rounds, sizeof(double), cmp_double);
        med[m] = v[rounds / 2];
        printf("  %-8s %9.1f us [%.1f-%.1f]  %8.2f t/s\n", MODE_NAMES[m], 1e6 * med[m], 1e6 * v[0],
               1e6 * v[rounds - 1], 1.0 / med[m]);
    }
    printf("  backend/host %.3f, backend/argmax %.3f (time per token); token ids identical: %s\n", med[2] / med[0],
           med[2] / med[1], same ? "yes" : "NO");
    for (int m = 0; m < N_MODES; ++m) {
        llama_free(ctx[m]); /* the context first: it holds the attached sampler */
        llama_sampler_free(chain[m]);
    }
    llama_model_free(model);
    free(ids);
    free(per_token);
    return same ? 0 : 3;
}
