// llama_sampler_sample with every C++ exception caught. Samplers throw (the
// grammar sampler: "Unexpected empty grammar stack after accepting piece" when
// no token the grammar allows remains); through llama.h's C function that is
// std::terminate. pyllama samples through this entry point instead.

#include "pyllama_common.h"

#include "llama.h"

#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>

static thread_local std::string g_last_error;

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

// Sample (and accept) from the logits of row `idx`. Returns 0 and writes the
// token, or -1 when a sampler threw (pyllama_sampling_error() says what).
PYLLAMA_COMMON_API int32_t pyllama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
                                                  int32_t idx, llama_token * token) {
    return guarded([&] { *token = llama_sampler_sample(smpl, ctx, idx); });
}

// llama_sampler_accept, likewise.
PYLLAMA_COMMON_API int32_t pyllama_sampler_accept(struct llama_sampler * smpl, llama_token token) {
    return guarded([&] { llama_sampler_accept(smpl, token); });
}

// The message of this thread's last failed pyllama_sampler_* call.
PYLLAMA_COMMON_API const char * pyllama_sampling_error(void) {
    return g_last_error.c_str();
}
