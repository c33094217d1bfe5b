// An image's header facts through stb_image, the decoder libmtmd uses (pyllama_common.h).
// stb_image is compiled here privately (static functions): libmtmd keeps its own copy hidden.
#include "pyllama_common.h"

#include <climits>

#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#if defined(__GNUC__)
#    pragma GCC diagnostic push
#    pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include "stb/stb_image.h"
#if defined(__GNUC__)
#    pragma GCC diagnostic pop
#endif

int32_t pyllama_image_info(const unsigned char * buf, size_t len, int32_t * w, int32_t * h, int32_t * comp) {
    if (buf == nullptr || len == 0 || len > (size_t) INT_MAX) {
        return 0;
    }
    int x = 0, y = 0, n = 0;
    if (!stbi_info_from_memory(buf, (int) len, &x, &y, &n)) {
        return 0;
    }
    *w = x;
    *h = y;
    *comp = n;
    return 1;
}
