/* The C callbacks pyllama hands to llama.cpp, compiled into the binding module: an abort
   callback that never re-enters Python on the hot path, and a silent logger that replaces the
   Python one at interpreter exit. */
#ifndef PYLLAMA_CALLBACKS_H
#define PYLLAMA_CALLBACKS_H

#include <stdbool.h>
#include <stdint.h>

#include "ggml.h"

/* One per context, passed as its abort_callback_data. */
typedef struct pyllama_abort_state {
    volatile int32_t flag;        /* set by ctx.abort() from any thread */
    volatile int32_t interrupted; /* set when a pending SIGINT asked to stop */
    int32_t check_signals;        /* poll Python's signal handlers (main thread only) */
    int64_t next_check_ns;
} pyllama_abort_state;

/* ggml_abort_callback; data is a pyllama_abort_state. */
bool pyllama_abort_callback(void * data);

/* ggml_log_callback that drops every line. */
void pyllama_log_silent(enum ggml_log_level level, const char * text, void * user_data);

#endif /* PYLLAMA_CALLBACKS_H */
