// The whole common/log.h API for the common/ sources compiled into
// libpyllama-common, routed to llama.cpp's current logger.
//
// Upstream's common/log.cpp starts a worker thread that prints INFO lines to
// stdout; a library must not. Here every line goes straight to the logger set
// with llama_log_set(), which pyllama routes to Python's `logging` (logger
// "pyllama.llama"). Nothing here writes to stdout or stderr, and the file,
// colour, prefix and pause settings of the CLI tools are accepted and ignored.

#include "json.h"
#include "llama.h"
#include "log.h"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <string>

struct common_log {};  // opaque in log.h; one instance stands for "the" log

namespace {
// LOG_TRC (fit.cpp's account of what it measured and chose) passes; LOG_DBG
// (per-token parser traces) does not unless a caller lowers the threshold.
std::atomic<int>  g_verbosity_thold{ LOG_LEVEL_TRACE };
std::atomic<bool> g_jsonl{ false };

void emit(ggml_log_level level, const char * text) {
    ggml_log_callback callback  = nullptr;
    void *            user_data = nullptr;
    llama_log_get(&callback, &user_data);
    if (callback != nullptr) {
        callback(level, text, user_data);
    }
}
}  // namespace

int common_log_get_verbosity_thold(void) {
    return g_verbosity_thold.load(std::memory_order_relaxed);
}

void common_log_set_verbosity_thold(int verbosity) {
    g_verbosity_thold.store(verbosity, std::memory_order_relaxed);
}

bool common_log_get_jsonl(void) {
    return g_jsonl.load(std::memory_order_relaxed);
}

void common_log_set_jsonl(bool jsonl) {
    g_jsonl.store(jsonl, std::memory_order_relaxed);
}

int common_log_get_verbosity(enum ggml_log_level level) {
    switch (level) {
        case GGML_LOG_LEVEL_DEBUG: return LOG_LEVEL_DEBUG;
        case GGML_LOG_LEVEL_INFO:  return LOG_LEVEL_TRACE;
        case GGML_LOG_LEVEL_WARN:  return LOG_LEVEL_WARN;
        case GGML_LOG_LEVEL_ERROR: return LOG_LEVEL_ERROR;
        case GGML_LOG_LEVEL_CONT:  return LOG_LEVEL_TRACE;
        case GGML_LOG_LEVEL_NONE:
        default:                   return LOG_LEVEL_OUTPUT;
    }
}

void common_log_default_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    if (common_log_get_verbosity(level) <= common_log_get_verbosity_thold()) {
        emit(level, text);
    }
}

common_log * common_log_init() {
    return common_log_main();
}

common_log * common_log_main() {
    static common_log log;
    return &log;
}

void common_log_pause(common_log *) {}

void common_log_resume(common_log *) {}

void common_log_free(common_log *) {}

void common_log_add(common_log *, ggml_log_level level, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    const int n = std::vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    if (n > 0) {
        std::string text((size_t) n, '\0');
        std::vsnprintf(text.data(), text.size() + 1, fmt, args);
        emit(level, text.c_str());
    }
    va_end(args);
}

void common_log_add_json(common_log *, const char * type, const common_json & data) {
    if (common_log_get_jsonl()) {
        const std::string line = std::string("{\"type\":\"") + type + "\",\"data\":" + data.dump_safe() + "}\n";
        emit(GGML_LOG_LEVEL_INFO, line.c_str());
    }
}

void common_log_set_file(common_log *, const char *) {}

void common_log_set_colors(common_log *, log_colors) {}

void common_log_set_prefix(common_log *, bool) {}

void common_log_set_timestamps(common_log *, bool) {}

void common_log_flush(common_log *) {}
