// pyllama's C entry points to llama.cpp's own parameter fitting (common/fit.cpp
// of the vendored tree), compiled into libpyllama-common beside libllama.
//
// fit.cpp logs through common/log.h, which src/native/log.cpp implements on
// llama.cpp's current logger (pyllama routes it to Python's `logging`).

#include "pyllama_common.h"

#include "fit.h"
#include "json.h"
#include "log.h"

#include <cstdint>
#include <exception>
#include <string>

// common_fit_params with C linkage and no exception crossing the boundary.
// Returns common_params_fit_status (0 fitted or nothing to change, 1 could not
// fit, 2 error). Buffers and their sizes as documented in fit.h.
PYLLAMA_COMMON_API int32_t pyllama_fit_params(const char * path_model, llama_model_params * mparams,
                                              llama_context_params * cparams, float * tensor_split,
                                              llama_model_tensor_buft_override * tensor_buft_overrides,
                                              size_t * margins, uint32_t n_ctx_min, int32_t log_level) {
    try {
        return (int32_t) common_fit_params(path_model, mparams, cparams, tensor_split, tensor_buft_overrides,
                                           margins, n_ctx_min, nullptr, (ggml_log_level) log_level);
    } catch (const std::exception & e) {
        common_log_add(common_log_main(), GGML_LOG_LEVEL_ERROR, "pyllama_fit_params: %s\n", e.what());
    } catch (...) {
        common_log_add(common_log_main(), GGML_LOG_LEVEL_ERROR, "pyllama_fit_params: unknown exception\n");
    }
    return (int32_t) COMMON_PARAMS_FIT_STATUS_ERROR;
}

// The projected memory use of a model and context with these parameters, per
// device and then the host: 5 int64 per row (total, free, model, context,
// compute bytes) and the row's device (NULL for the host row). Returns the
// number of rows written (at most max_rows), or -1.
PYLLAMA_COMMON_API int32_t pyllama_fit_memory(const char * path_model, const llama_model_params * mparams,
                                              const llama_context_params * cparams, int64_t * out,
                                              ggml_backend_dev_t * devices, int32_t max_rows, int32_t log_level) {
    try {
        std::vector<ggml_backend_dev_t> devs;
        uint32_t n_layer = 0, n_ctx_train = 0, n_expert = 0;
        const common_device_memory_data_vec rows = common_get_device_memory_data(
            path_model, mparams, cparams, devs, n_layer, n_ctx_train, n_expert, (ggml_log_level) log_level);
        int32_t n = 0;
        for (const auto & r : rows) {
            if (n >= max_rows) {
                break;
            }
            devices[n] = (size_t) n < devs.size() ? devs[n] : nullptr;
            int64_t * o = out + 5 * n++;
            o[0] = r.total;
            o[1] = r.free;
            o[2] = (int64_t) r.model;
            o[3] = (int64_t) r.context;
            o[4] = (int64_t) r.compute;
        }
        return n;
    } catch (const std::exception & e) {
        common_log_add(common_log_main(), GGML_LOG_LEVEL_ERROR, "pyllama_fit_memory: %s\n", e.what());
    } catch (...) {
        common_log_add(common_log_main(), GGML_LOG_LEVEL_ERROR, "pyllama_fit_memory: unknown exception\n");
    }
    return -1;
}
