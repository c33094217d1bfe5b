// pyllama's C entry points to llama.cpp's own speculative decoding
// (common/speculative.cpp: a draft model, n-gram lookup in its several forms),
// compiled into libpyllama-common. The verification loop (decode the target on
// [last token, draft...], sample each row with the generation's own sampler
// chain, keep the agreeing prefix) is pyllama's, as in llama.cpp's examples;
// what to draft is llama.cpp's.
//
// The configuration comes in as JSON; no C++ exception crosses the boundary
// (each is caught, its message kept for pyllama_spec_error()), and every
// argument llama.cpp would assert on is checked first.

#include "pyllama_common.h"

#include "common.h"
#include "llama.h"
#include "ngram-cache.h"
#include "speculative.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <algorithm>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// The most tokens one draft may hold: llama.cpp counts accepted tokens in a uint16_t.
static constexpr int32_t PYLLAMA_SPEC_N_MAX = 1024;

// "lookup": llama-lookup's drafter (examples/lookup/lookup.cpp) on common/ngram-cache: n-grams of 1..4
// tokens over the prompt and the output so far. common/speculative.cpp's "ngram-cache" type feeds its
// cache only the new tokens on their own after the first draft, so it never learns from the output.
struct pyllama_lookup_seq {
    common_ngram_cache context;
    size_t             n_seen = 0;  // tokens of the sequence already counted in `context`
};

struct pyllama_spec {
    common_params_speculative params;
    common_speculative *      spec = nullptr;     // llama.cpp's speculator, or
    std::vector<pyllama_lookup_seq> lookup;      // llama-lookup's, one per sequence
    common_ngram_cache        lookup_empty;      // its dynamic and static caches: none
    llama_context *           ctx_tgt = nullptr;
    llama_context *           ctx_dft = nullptr;
    uint32_t                  n_seq = 0;
    common_batch              batch;
    llama_tokens              history;
    llama_tokens              result;
    std::vector<int32_t>      n_last;  // the size of each sequence's last draft: what accept may count
};

static thread_local std::string g_spec_error;

template <typename F> static int32_t guarded(F && fn) {
    try {
        return fn();
    } catch (const std::exception & e) {
        g_spec_error = e.what();
    } catch (...) {
        g_spec_error = "unknown exception";
    }
    return -1;
}

static int32_t fail(const std::string & what) {
    g_spec_error = what;
    return -1;
}

template <typename T> static T get_or(const nlohmann::json & j, const char * key, T fallback) {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? fallback : it->get<T>();
}

// Create a speculator for the n_seq sequences of ctx_tgt. config (JSON):
//   {"types": ["lookup"] or a list of llama.cpp's types: ["ngram-cache" | "ngram-simple" | "ngram-map-k" | "ngram-map-k4v" | "ngram-mod" | "draft-simple", ...],
//    "n_max": 16, "n_min": 0, "p_min": 0.0,                 -- a draft model's drafts
//    "ngram_size_n": 12, "ngram_size_m": 48, "ngram_min_hits": 1,   -- ngram-simple / -map-k / -map-k4v
//    "ngram_mod_n_match": 24, "ngram_mod_n_min": 48, "ngram_mod_n_max": 64}
// draft-simple needs ctx_dft (a context of the draft model with n_seq sequences).
// NULL on failure (pyllama_spec_error() says why).
PYLLAMA_COMMON_API pyllama_spec * pyllama_spec_init(const char * config, llama_context * ctx_tgt,
                                                    llama_context * ctx_dft, uint32_t n_seq) {
    pyllama_spec * out = nullptr;
    const int32_t rc = guarded([&]() -> int32_t {
        if (config == nullptr || ctx_tgt == nullptr) {
            return fail("a configuration and a target context are required");
        }
        if (n_seq == 0 || n_seq > llama_n_seq_max(ctx_tgt)) {
            return fail("n_seq must lie in [1, the target context's n_seq_max]");
        }
        const auto j = nlohmann::json::parse(config);
        auto s = std::make_unique<pyllama_spec>();
        auto & p = s->params;
        std::vector<std::string> names = j.at("types").get<std::vector<std::string>>();
        const bool lookup = names.size() == 1 && names[0] == "lookup";
        p.types = lookup ? std::vector<common_speculative_type>{} : common_speculative_types_from_names(names);
        for (auto t : p.types) {
            switch (t) {
                case COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE:
                    if (ctx_dft == nullptr) {
                        return fail("draft-simple needs a draft model's context");
                    }
                    if (llama_n_seq_max(ctx_dft) != n_seq) {
                        return fail("the draft context must hold as many sequences as the speculator");
                    }
                    break;
                case COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE:
                case COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K:
                case COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V:
                case COMMON_SPECULATIVE_TYPE_NGRAM_MOD:
                case COMMON_SPECULATIVE_TYPE_NGRAM_CACHE:
                    break;
                default:
                    return fail("speculative type '" + common_speculative_type_to_str(t) +
                                "' is not supported by pyllama (draft-simple and the n-gram types are)");
            }
        }
        p.draft.n_max = get_or<int32_t>(j, "n_max", p.draft.n_max);
        p.draft.n_min = get_or<int32_t>(j, "n_min", p.draft.n_min);
        p.draft.p_min = get_or<float>(j, "p_min", p.draft.p_min);
        if (p.draft.n_max < 1 || p.draft.n_max > PYLLAMA_SPEC_N_MAX || p.draft.n_min < 0 ||
            p.draft.n_min > p.draft.n_max) {
            return fail("need 1 <= n_max <= 1024 and 0 <= n_min <= n_max");
        }
        const auto size_n   = get_or<int32_t>(j, "ngram_size_n", p.ngram_simple.size_n);
        const auto size_m   = get_or<int32_t>(j, "ngram_size_m", p.ngram_simple.size_m);
        const auto min_hits = get_or<int32_t>(j, "ngram_min_hits", p.ngram_simple.min_hits);
        if (size_n < 1 || size_n > 1024 || size_m < 1 || size_m > PYLLAMA_SPEC_N_MAX || min_hits < 1 ||
            min_hits > 65535) {
            return fail("need 1 <= ngram_size_n <= 1024, 1 <= ngram_size_m <= 1024 and ngram_min_hits >= 1");
        }
        for (auto * m : { &p.ngram_simple, &p.ngram_map_k, &p.ngram_map_k4v }) {
            m->size_n   = (uint16_t) size_n;
            m->size_m   = (uint16_t) size_m;
            m->min_hits = (uint16_t) min_hits;
        }
        p.ngram_mod.n_match = get_or<int32_t>(j, "ngram_mod_n_match", p.ngram_mod.n_match);
        p.ngram_mod.n_min   = get_or<int32_t>(j, "ngram_mod_n_min", p.ngram_mod.n_min);
        p.ngram_mod.n_max   = get_or<int32_t>(j, "ngram_mod_n_max", p.ngram_mod.n_max);
        if (p.ngram_mod.n_match < 1 || p.ngram_mod.n_match > 1024 || p.ngram_mod.n_min < 0 ||
            p.ngram_mod.n_max < p.ngram_mod.n_min || p.ngram_mod.n_max > PYLLAMA_SPEC_N_MAX) {
            return fail("need 1 <= ngram_mod_n_match <= 1024 and 0 <= ngram_mod_n_min <= ngram_mod_n_max <= 1024");
        }
        p.draft.ctx_tgt = ctx_tgt;
        p.draft.ctx_dft = ctx_dft;
        s->ctx_tgt      = ctx_tgt;
        s->ctx_dft      = ctx_dft;
        s->n_seq        = n_seq;
        s->batch        = common_batch(ctx_tgt);
        s->n_last.assign(n_seq, 0);
        if (lookup) {
            s->lookup.resize(n_seq);
            out = s.release();
            return 0;
        }
        s->spec = common_speculative_init(p, n_seq);
        if (s->spec == nullptr) {
            return fail("no speculative implementation could be set up");
        }
        out = s.release();
        return 0;
    });
    return rc == 0 ? out : nullptr;
}

PYLLAMA_COMMON_API void pyllama_spec_free(pyllama_spec * s) {
    if (s != nullptr) {
        common_speculative_free(s->spec);
        delete s;
    }
}

// Start a generation of sequence seq_id whose context holds prompt[0, n_prompt).
PYLLAMA_COMMON_API int32_t pyllama_spec_begin(pyllama_spec * s, int32_t seq_id, const llama_token * prompt,
                                              int32_t n_prompt) {
    return guarded([&]() -> int32_t {
        if (seq_id < 0 || (uint32_t) seq_id >= s->n_seq || n_prompt < 0) {
            return fail("seq_id or prompt length out of range");
        }
        s->history.assign(prompt, prompt + n_prompt);
        if (!s->lookup.empty()) {
            s->lookup[seq_id] = pyllama_lookup_seq{};
            return 0;
        }
        common_speculative_begin(s->spec, seq_id, s->history);
        return 0;
    });
}

// Draft at most n_max tokens to follow id_last, which sits at position pos0 after
// history[0, n_history) (the tokens the target context holds for seq_id). Writes
// them to out (room for cap) and returns how many, or -1 on failure. A draft
// model's context is left holding history only.
PYLLAMA_COMMON_API int32_t pyllama_spec_draft(pyllama_spec * s, int32_t seq_id, const llama_token * history,
                                              int32_t n_history, llama_token id_last, int32_t n_max,
                                              llama_token * out, int32_t cap) {
    return guarded([&]() -> int32_t {
        if (seq_id < 0 || (uint32_t) seq_id >= s->n_seq || n_history < 0 || n_max < 0 || cap < n_max) {
            return fail("seq_id, history length or draft size out of range");
        }
        if (n_max == 0) {
            return 0;
        }
        s->history.assign(history, history + n_history);
        s->result.clear();
        if (!s->lookup.empty()) {
            auto & lk = s->lookup[seq_id];
            s->history.push_back(id_last);
            if (lk.n_seen > s->history.size()) {
                lk = pyllama_lookup_seq{};  // another text than the one counted: start over
            }
            common_ngram_cache_update(lk.context, LLAMA_NGRAM_MIN, LLAMA_NGRAM_MAX, s->history,
                                      (int) (s->history.size() - lk.n_seen), false);
            lk.n_seen = s->history.size();
            s->result.push_back(id_last);
            common_ngram_cache_draft(s->history, s->result, n_max, LLAMA_NGRAM_MIN, LLAMA_NGRAM_MAX, lk.context,
                                     s->lookup_empty, s->lookup_empty);
            s->result.erase(s->result.begin());
            const int32_t n = std::min<int32_t>((int32_t) s->result.size(), n_max);
            std::copy(s->result.begin(), s->result.begin() + n, out);
            s->n_last[seq_id] = n;
            return n;
        }
        auto & dp = common_speculative_get_draft_params(s->spec, seq_id);
        dp = {
            /* .drafting = */ true,
            /* .n_max    = */ std::min(n_max, PYLLAMA_SPEC_N_MAX),
            /* .pos0     = */ n_history,
            /* .id_last  = */ id_last,
            /* .prompt   = */ &s->history,
            /* .result   = */ &s->result,
        };
        common_speculative_draft(s->spec);
        dp.prompt = nullptr;
        dp.result = nullptr;
        if (s->ctx_dft != nullptr) {
            // what the draft model decoded while drafting: the verification batch is fed to it next
            llama_memory_seq_rm(llama_get_memory(s->ctx_dft), seq_id, n_history, -1);
        }
        const int32_t n = std::min<int32_t>((int32_t) s->result.size(), n_max);
        std::copy(s->result.begin(), s->result.begin() + n, out);
        s->n_last[seq_id] = n;
        return n;
    });
}

// The target has decoded tokens[0, n) of seq_id at positions pos0.. (the last
// token and the draft): let the speculator see them (a draft model decodes them).
PYLLAMA_COMMON_API int32_t pyllama_spec_process(pyllama_spec * s, int32_t seq_id, const llama_token * tokens,
                                                int32_t n, llama_pos pos0) {
    return guarded([&]() -> int32_t {
        if (seq_id < 0 || (uint32_t) seq_id >= s->n_seq || n < 0 || n > PYLLAMA_SPEC_N_MAX + 1) {
            return fail("seq_id or batch size out of range");
        }
        if (s->spec == nullptr) {
            return 0;  // lookup reads the text at draft time
        }
        s->batch.clear();
        for (int32_t i = 0; i < n; ++i) {
            s->batch.add(tokens[i], pos0 + i, seq_id, true);
        }
        return common_speculative_process(s->spec, s->batch) ? 0 : fail("the draft model failed to decode");
    });
}

// n_accepted tokens of the last draft of seq_id were accepted.
PYLLAMA_COMMON_API int32_t pyllama_spec_accept(pyllama_spec * s, int32_t seq_id, int32_t n_accepted) {
    return guarded([&]() -> int32_t {
        if (seq_id < 0 || (uint32_t) seq_id >= s->n_seq) {
            return fail("seq_id out of range");
        }
        if (n_accepted < 0 || n_accepted > s->n_last[seq_id]) {
            return fail("more tokens accepted than the last draft held");
        }
        s->n_last[seq_id] = 0;  // (llama.cpp asserts on a count no draft backs)
        if (s->spec == nullptr) {
            return 0;
        }
        common_speculative_accept(s->spec, seq_id, (uint16_t) n_accepted);
        return 0;
    });
}

// The message of this thread's last failed pyllama_spec_* call.
PYLLAMA_COMMON_API const char * pyllama_spec_error(void) {
    return g_spec_error.c_str();
}
