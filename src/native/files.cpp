// llama.cpp's rule for a file name a client may give (fs_validate_filename in common/common.cpp, the
// check llama-server applies to slot-save file names), behind a C entry point of libpyllama-common.

#include "pyllama_common.h"

#include "common.h"

#include <string>

// 1 when `name` is a name llama.cpp accepts (no separators unless allow_subdirs, no "..", no control or
// look-alike characters, valid UTF-8, at most 255 bytes), 0 when not, -1 on error.
PYLLAMA_COMMON_API int32_t pyllama_validate_filename(const char * name, bool allow_subdirs) {
    if (name == nullptr) {
        return 0;
    }
    try {
        return fs_validate_filename(std::string(name), allow_subdirs) ? 1 : 0;
    } catch (...) {
        return -1;
    }
}
