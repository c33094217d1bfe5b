/* Python.h first, as it asks: it may set feature macros the libc headers read. */
#include <Python.h>

#include "callbacks.h"

#include <time.h>

static int64_t pyllama_now_ns(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ggml calls this between graph nodes. Reading a flag is free; polling Python's
   signal handlers needs the GIL, so it happens at most every 20 ms and only for
   a decode started on the main thread (the one that receives SIGINT). */
bool pyllama_abort_callback(void * data) {
    pyllama_abort_state * st = (pyllama_abort_state *) data;
    if (st->flag) {
        return true;
    }
    if (st->check_signals) {
        int64_t now = pyllama_now_ns();
        if (now >= st->next_check_ns) {
            st->next_check_ns = now + 20000000;
            PyGILState_STATE g = PyGILState_Ensure();
            if (PyErr_CheckSignals() != 0) {
                PyErr_Clear();
                st->interrupted = 1;
                st->flag = 1;
            }
            PyGILState_Release(g);
        }
    }
    return st->flag != 0;
}

void pyllama_log_silent(enum ggml_log_level level, const char * text, void * user_data) {
    (void) level;
    (void) text;
    (void) user_data;
}
