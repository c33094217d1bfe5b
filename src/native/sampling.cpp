// llama_sampler_sample with every C++ exception caught. Samplers throw (the
// grammar sampler: "Unexpected empty grammar stack after accepting piece" when
// no token the grammar allows remains); through llama.h's C function that is
// std::terminate. pyllama samples through this entry point instead.
//
// A chain with a grammar is sampled the way llama.cpp's common_sampler_sample
// does it (grammar_first=false): the grammar's apply walks every candidate of
// the vocabulary through its parse stacks (about 10 ms a token for a small JSON
// grammar on SmolLM2's 49k vocabulary, three times the decode), so the chain
// first runs without it and the grammar checks only the token that came out;
// only when it refuses that token does the whole chain run again over all the
// logits, grammar included, which is what llama_sampler_sample does.

#include "pyllama_common.h"

#include "llama.h"

#include <algorithm>
#include <atomic>
#include <cmath>  // INFINITY
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

static thread_local std::string g_last_error;

// grammar.cpp's sampler interface (libpyllama-common's own, not exported)
const llama_sampler_i * pyllama_grammar_iface();

// Run `fn`; 0 when it returned, -1 when it threw (the message kept for pyllama_sampling_error()).
template <typename F> static int32_t guarded(F && fn) {
    try {
        fn();
        return 0;
    } catch (const std::exception & e) {
        g_last_error = e.what();
    } catch (...) {
        g_last_error = "unknown exception";
    }
    return -1;
}

// The interfaces of llama.cpp's grammar sampler and of the samplers whose apply keeps no state
// but a random draw, so that running them a second time after the grammar refused their token
// leaves them as one run would. Mirostat (v1 and v2) moves its mu in apply, a Python sampler may
// do anything: a chain holding one keeps the grammar over every candidate. Known by interface, not
// by name, since a sampler written in Python names itself. Each interface is a static of
// llama-sampler.cpp: it outlives the reference sampler it was read from.
struct known_ifaces {
    // llama.cpp's, and pyllama's bounded one over the same engine (grammar.cpp), which pyllama uses
    std::vector<const llama_sampler_i *> grammars;
    std::vector<const llama_sampler_i *> replayable;

    bool is_grammar(const llama_sampler_i * iface) const {
        return std::find(grammars.begin(), grammars.end(), iface) != grammars.end();
    }

    known_ifaces() {
        llama_sampler * g = llama_sampler_init_grammar(nullptr, "", "");  // no grammar: nothing parsed
        grammars = { g->iface, pyllama_grammar_iface() };
        llama_sampler_free(g);
        const llama_logit_bias bias = { 0, 1.0f };
        // The arguments only have to give the real sampler, not its no-op stand-in
        // (llama.cpp returns an "empty" sampler for temp 1, top-k 0, ...); top-k 0 is that stand-in.
        llama_sampler * refs[] = {
            llama_sampler_init_greedy(),
            llama_sampler_init_dist(0),
            llama_sampler_init_top_k(0),
            llama_sampler_init_top_k(40),
            llama_sampler_init_top_p(0.5f, 1),
            llama_sampler_init_min_p(0.05f, 1),
            llama_sampler_init_typical(0.5f, 1),
            llama_sampler_init_temp(0.5f),
            llama_sampler_init_temp_ext(0.5f, 0.5f, 1.0f),
            llama_sampler_init_xtc(0.5f, 0.1f, 1, 0),
            llama_sampler_init_top_n_sigma(1.0f),
            llama_sampler_init_penalties(1, 64, 1.1f, 0.0f, 0.0f),
            llama_sampler_init_dry(nullptr, 0.8f, 1.75f, 2, 64, nullptr, 0),  // no breakers: no vocabulary read
            llama_sampler_init_logit_bias(1, 1, &bias),
            // its apply records the token it drew for accept; a second apply records the new one
            llama_sampler_init_adaptive_p(0.5f, 0.9f, 0),
        };
        for (llama_sampler * r : refs) {
            replayable.push_back(r->iface);
            llama_sampler_free(r);
        }
    }
};

static const known_ifaces & ifaces() {
    static const known_ifaces k;
    return k;
}

// Whether `smpl` is a chain with a grammar, every other sampler of it replayable: the chain that
// pyllama_sampler_sample samples without the grammar first.
static bool grammar_deferred(llama_sampler * smpl) {
    if (smpl == nullptr || llama_sampler_chain_get(smpl, -1) != smpl) {  // not a chain: chain_n would misread it
        return false;
    }
    const known_ifaces & k = ifaces();
    bool has_grammar = false;
    for (int32_t i = 0, n = llama_sampler_chain_n(smpl); i < n; ++i) {
        const llama_sampler_i * iface = llama_sampler_chain_get(smpl, i)->iface;
        if (k.is_grammar(iface)) {
            has_grammar = true;
        } else if (std::find(k.replayable.begin(), k.replayable.end(), iface) == k.replayable.end()) {
            return false;
        }
    }
    return has_grammar;
}

// Tokens sampled without the grammar first, and those of them the grammar refused (sampled again
// with it), in this process: what the deferral saves, for tests and benchmarks.
static std::atomic<int64_t> g_checked{0};
static std::atomic<int64_t> g_refused{0};

// The candidates of the sampling pass without the grammar: one vocabulary-sized array per
// thread, reused from token to token.
static thread_local std::vector<llama_token_data> g_cur;

// Sample `smpl` (a chain with a grammar, grammar_deferred) from row `idx` without its grammar, then
// ask the grammar about the token drawn; LLAMA_TOKEN_NULL when it refuses it. The token drawn is
// the one a grammar-first pass would draw whenever the grammar allows it and nothing but the grammar
// removes candidates: greedy picks the same maximum, and a draw from the full distribution that
// lands on an allowed token, redrawn over the allowed ones otherwise, is a draw from the allowed
// ones in proportion p(t) / p(allowed). Truncating samplers (top-k, top-p, min-p, ...) cut the
// unconstrained distribution instead of the constrained one, as in llama.cpp's common_sampler; and
// a refusal costs the random samplers a second draw, so a seed gives other text than grammar-first.
static llama_token sample_without_grammar(llama_sampler * smpl, const float * logits, int32_t n_vocab) {
    const known_ifaces & k = ifaces();
    auto & cur = g_cur;
    cur.resize((size_t) n_vocab);
    for (llama_token t = 0; t < n_vocab; ++t) {
        cur[t] = llama_token_data{ t, logits[t], 0.0f };
    }
    llama_token_data_array cur_p = { cur.data(), cur.size(), -1, false };
    const int32_t n = llama_sampler_chain_n(smpl);
    for (int32_t i = 0; i < n; ++i) {  // as llama_sampler_chain_apply does, less the grammar
        llama_sampler * s = llama_sampler_chain_get(smpl, i);
        if (!k.is_grammar(s->iface) && s->iface->apply != nullptr) {
            llama_sampler_apply(s, &cur_p);
        }
    }
    if (cur_p.selected < 0 || cur_p.selected >= (int64_t) cur_p.size) {
        return LLAMA_TOKEN_NULL;  // the full pass decides (llama_sampler_sample asserts there, as before)
    }
    const llama_token token = cur_p.data[cur_p.selected].id;
    // The grammar's verdict on one candidate: a refused token's logit becomes -inf. Every grammar of
    // the chain is asked, in order, as a grammar-first pass would have them all mask.
    for (int32_t i = 0; i < n; ++i) {
        llama_sampler * s = llama_sampler_chain_get(smpl, i);
        if (!k.is_grammar(s->iface)) {
            continue;
        }
        llama_token_data one = { token, 0.0f, 0.0f };
        llama_token_data_array one_p = { &one, 1, -1, false };
        llama_sampler_apply(s, &one_p);
        if (one.logit == -INFINITY) {
            return LLAMA_TOKEN_NULL;
        }
    }
    return token;
}

static llama_token sample(llama_sampler * smpl, llama_context * ctx, int32_t idx) {
    // Rows a backend sampler (the graph) sampled or filtered keep llama_sampler_sample's handling; its
    // tests, in its order (the candidate ids are never null: the whole vocabulary stands in for none).
    const bool host_logits = llama_get_sampled_token_ith(ctx, idx) == LLAMA_TOKEN_NULL &&
                             llama_get_sampled_probs_ith(ctx, idx) == nullptr &&
                             llama_get_sampled_logits_ith(ctx, idx) == nullptr;
    if (host_logits && grammar_deferred(smpl)) {
        const float * logits = llama_get_logits_ith(ctx, idx);
        if (logits != nullptr) {  // none: llama_sampler_sample asserts, as before
            const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
            const llama_token token = sample_without_grammar(smpl, logits, n_vocab);
            g_checked.fetch_add(1, std::memory_order_relaxed);
            if (token != LLAMA_TOKEN_NULL) {
                llama_sampler_accept(smpl, token);  // the whole chain accepts, as llama_sampler_sample has it
                return token;
            }
            g_refused.fetch_add(1, std::memory_order_relaxed);
        }
    }
    // The grammar refused the token (or the chain is not one to defer it): the full pass over fresh
    // candidates, grammar included, exactly as before.
    return llama_sampler_sample(smpl, ctx, idx);
}

// Sample (and accept) from the logits of row `idx`. Returns 0 and writes the
// token, or -1 when a sampler threw (pyllama_sampling_error() says what).
PYLLAMA_COMMON_API int32_t pyllama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
                                                  int32_t idx, llama_token * token) {
    return guarded([&] { *token = sample(smpl, ctx, idx); });
}

PYLLAMA_COMMON_API int32_t pyllama_sampler_grammar_deferred(struct llama_sampler * smpl) {
    int32_t deferred = 0;
    return guarded([&] { deferred = grammar_deferred(smpl) ? 1 : 0; }) == 0 ? deferred : -1;
}

PYLLAMA_COMMON_API void pyllama_sampler_grammar_counts(int64_t * checked, int64_t * refused) {
    *checked = g_checked.load(std::memory_order_relaxed);
    *refused = g_refused.load(std::memory_order_relaxed);
}

// llama_sampler_accept, likewise.
PYLLAMA_COMMON_API int32_t pyllama_sampler_accept(struct llama_sampler * smpl, llama_token token) {
    return guarded([&] { llama_sampler_accept(smpl, token); });
}

// The message of this thread's last failed pyllama_sampler_* call.
PYLLAMA_COMMON_API const char * pyllama_sampling_error(void) {
    return g_last_error.c_str();
}
