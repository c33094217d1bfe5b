// A grammar sampler on llama.cpp's own grammar engine (src/llama-grammar.*, the functions
// llama-sampler.cpp's grammar sampler calls) that refuses a grammar whose parse stacks explode.
//
// llama.cpp follows a grammar by keeping every parse that is still possible: one stack per
// parse. An ambiguous grammar multiplies them with each character, e.g.
//     s ::= "#" s t | "#" s u | "x"     t ::= "b"     u ::= "c"
// doubles them per "#", so accepting one 80-"#" token (SmolLM2's vocabulary has one) never
// ends: the engine thread, and every request batched with it, hangs. llama.cpp has no bound
// (llama-server hangs the same way), and the work happens inside one call that cannot be
// interrupted. So before a token is accepted it is walked character by character on the
// grammar's stacks with llama_grammar_accept, counting them, and the real accept runs only
// when no step exceeded the bound; the stacks are restored in between (they point into the
// rules, which never change). Past the bound, accept throws; pyllama_sampler_sample/_accept
// turn that into the request's SamplerError. apply refuses the same way, before its pass.
//
// Everything else is llama.cpp's grammar sampler: name "grammar", lazy triggers, reset, clone.

#include "pyllama_common.h"

#include "llama-grammar.h"
#include "llama.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct bounded_grammar {
    const llama_vocab * vocab;
    std::string         text;
    std::string         root;
    llama_grammar *     grammar;
    size_t              max_stacks;
    size_t              n_accepted;
};

void check_stacks(const bounded_grammar & g, size_t n) {
    if (n > g.max_stacks) {
        throw std::runtime_error("the grammar is too ambiguous to follow: " + std::to_string(n) +
                                 " possible parses after " + std::to_string(g.n_accepted) +
                                 " tokens (the limit is " + std::to_string(g.max_stacks) +
                                 "; each one more makes every token slower)");
    }
}

// The code points of `piece`, continuing a UTF-8 sequence the previous token left open
// (llama-grammar.cpp's decode_utf8 is internal; this is the same decoding, minus its
// end marker). Invalid bytes end the walk: the real accept then rejects them as it does.
std::vector<uint32_t> code_points(const std::string & piece, llama_partial_utf8 partial) {
    static const int lengths[16] = { 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4 };
    std::vector<uint32_t> out;
    uint32_t value = partial.value;
    int      remain = partial.n_remain;
    size_t   i = 0;
    for (; i < piece.size() && remain > 0; ++i) {
        uint8_t b = static_cast<uint8_t>(piece[i]);
        if ((b >> 6) != 2) {
            return out;
        }
        value = (value << 6) + (b & 0x3F);
        --remain;
    }
    if (partial.n_remain > 0 && remain == 0) {
        out.push_back(value);
    }
    while (i < piece.size()) {
        uint8_t b = static_cast<uint8_t>(piece[i]);
        int     n = lengths[b >> 4];
        if (n == 0) {
            return out;
        }
        static const uint8_t masks[5] = { 0x00, 0x7F, 0x1F, 0x0F, 0x07 };
        value = b & masks[n];
        ++i;
        int k = 1;
        for (; k < n && i < piece.size(); ++k, ++i) {
            value = (value << 6) + (static_cast<uint8_t>(piece[i]) & 0x3F);
        }
        if (k < n) {
            return out;  // continued by the next token
        }
        out.push_back(value);
    }
    return out;
}

// Walk `token` over the grammar's stacks, counting them; the stacks are as they were after it.
void walk(bounded_grammar & g, llama_token token) {
    llama_grammar & gr = *g.grammar;
    if (gr.awaiting_trigger || llama_vocab_is_eog(g.vocab, token)) {
        return;  // a lazy grammar buffers text until triggered; an end of generation advances nothing
    }
    char    buf[256];
    int32_t n = llama_token_to_piece(g.vocab, token, buf, sizeof(buf), 0, true);
    std::string piece;
    if (n < 0) {
        piece.resize(static_cast<size_t>(-n));
        n = llama_token_to_piece(g.vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, true);
        piece.resize(n > 0 ? static_cast<size_t>(n) : 0);
    } else {
        piece.assign(buf, static_cast<size_t>(n));
    }
    const llama_grammar_stacks saved = gr.stacks;
    try {
        for (uint32_t cp : code_points(piece, gr.partial_utf8)) {
            llama_grammar_accept(&gr, cp);
            check_stacks(g, gr.stacks.size());
            if (gr.stacks.empty()) {
                break;  // not allowed here: the real accept says so
            }
        }
    } catch (...) {
        gr.stacks = saved;
        throw;
    }
    gr.stacks = saved;
}

const char * name(const llama_sampler *) {
    return "grammar";
}

void accept(llama_sampler * smpl, llama_token token) {
    auto * g = static_cast<bounded_grammar *>(smpl->ctx);
    if (g->grammar == nullptr) {
        return;
    }
    walk(*g, token);
    llama_grammar_accept_impl(*g->grammar, token);
    ++g->n_accepted;
    check_stacks(*g, g->grammar->stacks.size());
}

void apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    auto * g = static_cast<bounded_grammar *>(smpl->ctx);
    if (g->grammar == nullptr) {
        return;
    }
    check_stacks(*g, g->grammar->stacks.size());
    llama_grammar_apply_impl(*g->grammar, cur_p);
}

llama_grammar * init_like(const llama_grammar & old, const bounded_grammar & g) {
    std::vector<const char *> patterns;
    patterns.reserve(old.trigger_patterns.size());
    for (const auto & p : old.trigger_patterns) {
        patterns.push_back(p.pattern.c_str());
    }
    return llama_grammar_init_impl(g.vocab, g.text.c_str(), g.root.c_str(), old.lazy, patterns.data(),
                                   patterns.size(), old.trigger_tokens.data(), old.trigger_tokens.size());
}

void reset(llama_sampler * smpl) {
    auto * g = static_cast<bounded_grammar *>(smpl->ctx);
    if (g->grammar == nullptr) {
        return;
    }
    llama_grammar * fresh = init_like(*g->grammar, *g);
    if (fresh == nullptr) {
        throw std::runtime_error("the grammar could not be parsed again");
    }
    llama_grammar_free_impl(g->grammar);
    g->grammar = fresh;
    g->n_accepted = 0;
}

llama_sampler * make(bounded_grammar * g);

llama_sampler * clone(const llama_sampler * smpl) {
    const auto * g = static_cast<const bounded_grammar *>(smpl->ctx);
    auto * copy = new bounded_grammar(*g);
    copy->grammar = g->grammar != nullptr ? llama_grammar_clone_impl(*g->grammar) : nullptr;
    return make(copy);
}

void free_grammar(llama_sampler * smpl) {
    auto * g = static_cast<bounded_grammar *>(smpl->ctx);
    if (g->grammar != nullptr) {
        llama_grammar_free_impl(g->grammar);
    }
    delete g;
}

llama_sampler_i iface = {
    /* .name              = */ name,
    /* .accept            = */ accept,
    /* .apply             = */ apply,
    /* .reset             = */ reset,
    /* .clone             = */ clone,
    /* .free              = */ free_grammar,
    /* .backend_init      = */ nullptr,
    /* .backend_accept    = */ nullptr,
    /* .backend_apply     = */ nullptr,
    /* .backend_set_input = */ nullptr,
    /* .backend_reset     = */ nullptr,
    /* .copy_state        = */ nullptr,
};

llama_sampler * make(bounded_grammar * g) {
    return llama_sampler_init(&iface, g);
}

}  // namespace

// For sampling.cpp, which samples a chain holding this grammar without it first.
const llama_sampler_i * pyllama_grammar_iface() {
    return &iface;
}

PYLLAMA_COMMON_API struct llama_sampler * pyllama_sampler_init_grammar(
        const struct llama_vocab * vocab, const char * grammar_str, const char * grammar_root, bool lazy,
        const char ** trigger_patterns, size_t n_trigger_patterns, const llama_token * trigger_tokens,
        size_t n_trigger_tokens, size_t max_stacks) {
    try {
        llama_grammar * grammar = llama_grammar_init_impl(vocab, grammar_str, grammar_root, lazy, trigger_patterns,
                                                          n_trigger_patterns, trigger_tokens, n_trigger_tokens);
        if (grammar == nullptr) {
            return nullptr;  // a parse error, logged by llama.cpp
        }
        return make(new bounded_grammar{ vocab, grammar_str, grammar_root, grammar, max_stacks, 0 });
    } catch (...) {
        return nullptr;
    }
}
