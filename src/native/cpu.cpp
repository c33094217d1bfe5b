// llama.cpp's own choice of thread count for the CPU (common_cpu_get_num_math in
// common/common.cpp: physical cores, no SMT siblings, no efficiency cores on
// hybrid x86 CPUs), behind a C entry point of libpyllama-common.

#include "pyllama_common.h"

#include "common.h"

#include <cstdint>

// The number of CPUs useful for math, as llama.cpp's tools default to; -1 on error.
PYLLAMA_COMMON_API int32_t pyllama_cpu_get_num_math(void) {
    try {
        return common_cpu_get_num_math();
    } catch (...) {
        return -1;
    }
}
