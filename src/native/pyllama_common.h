/* libpyllama-common's C entry points: llama.cpp's common/ helpers (chat templates, parameter
   fitting, exception-safe sampling, speculative decoding, CPU and Vulkan probes) behind a C ABI,
   defined in the .cpp files beside it. Each includes this header, so the compiler checks every
   definition against the declaration the binding is generated from (tools/gen_binding.py).

   No C++ exception crosses these functions. The chat and JSON-schema entry points take and
   return JSON text; returned strings are malloc'ed and freed with pyllama_free_string. */
#ifndef PYLLAMA_COMMON_H
#define PYLLAMA_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

/* Exported only from libpyllama-common, which is built with hidden visibility; C linkage so the
   binding (C) can call what the C++ sources define. */
#ifdef __cplusplus
#    define PYLLAMA_EXTERN_C extern "C"
#else
#    define PYLLAMA_EXTERN_C
#endif
#if defined(PYLLAMA_COMMON_BUILD) && defined(_WIN32)
#    define PYLLAMA_COMMON_API PYLLAMA_EXTERN_C __declspec(dllexport)
#elif defined(PYLLAMA_COMMON_BUILD)
#    define PYLLAMA_COMMON_API PYLLAMA_EXTERN_C __attribute__((visibility("default")))
#else
#    define PYLLAMA_COMMON_API PYLLAMA_EXTERN_C
#endif

/* cpu.cpp: llama.cpp's default thread count for math (common_cpu_get_num_math); -1 on error. */
PYLLAMA_COMMON_API int32_t pyllama_cpu_get_num_math(void);

/* sampling.cpp: llama_sampler_sample / llama_sampler_accept returning -1 where a sampler threw
   (a grammar with no allowed token left); pyllama_sampling_error() says what. A chain with a grammar
   is sampled as llama.cpp's common_sampler samples it: without the grammar first, the grammar asked
   about the token drawn, the whole chain run again only when it refuses it. */
PYLLAMA_COMMON_API int32_t pyllama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx,
                                                  int32_t idx, llama_token * token);
PYLLAMA_COMMON_API int32_t pyllama_sampler_accept(struct llama_sampler * smpl, llama_token token);
/* 1 when pyllama_sampler_sample samples this chain without its grammar and asks the grammar about the
   token drawn only (a chain with a grammar, its other samplers llama.cpp's stateless ones), 0 when it
   runs the chain as llama_sampler_sample does; -1 on error. */
PYLLAMA_COMMON_API int32_t pyllama_sampler_grammar_deferred(struct llama_sampler * smpl);
/* How many tokens this process sampled with the grammar deferred, and how many of them the grammar
   refused (the chain then ran again over every candidate, grammar first). */
PYLLAMA_COMMON_API void pyllama_sampler_grammar_counts(int64_t * checked, int64_t * refused);
PYLLAMA_COMMON_API const char * pyllama_sampling_error(void);

/* grammar.cpp: llama.cpp's grammar sampler (named "grammar"; lazy when trigger patterns or tokens are
   given) that throws from accept and apply, instead of hanging, once the grammar keeps more than
   max_stacks parses open; NULL when the grammar does not parse. */
PYLLAMA_COMMON_API struct llama_sampler * pyllama_sampler_init_grammar(
    const struct llama_vocab * vocab, const char * grammar_str, const char * grammar_root, bool lazy,
    const char ** trigger_patterns, size_t n_trigger_patterns, const llama_token * trigger_tokens,
    size_t n_trigger_tokens, size_t max_stacks);

/* media.cpp: an image's size and channel count from its file header, read by stb_image (the decoder
   libmtmd uses) without decoding the pixels, so a huge image is refused before anything is allocated;
   returns 1 when stb_image knows the format, 0 when it does not (*w, *h, *comp untouched). */
PYLLAMA_COMMON_API int32_t pyllama_image_info(const unsigned char * buf, size_t len, int32_t * w, int32_t * h,
                                              int32_t * comp);

/* fit.cpp: common_fit_params, and the projected memory use per device. */
PYLLAMA_COMMON_API int32_t pyllama_fit_params(const char * path_model, struct llama_model_params * mparams,
                                              struct llama_context_params * cparams, float * tensor_split,
                                              struct llama_model_tensor_buft_override * tensor_buft_overrides,
                                              size_t * margins, uint32_t n_ctx_min, int32_t log_level);
PYLLAMA_COMMON_API int32_t pyllama_fit_memory(const char * path_model, const struct llama_model_params * mparams,
                                              const struct llama_context_params * cparams, int64_t * out,
                                              ggml_backend_dev_t * devices, int32_t max_rows, int32_t log_level);

/* chat.cpp: chat templates, tool-call / reasoning parsing, JSON schema -> GBNF. */
typedef struct common_chat_templates common_chat_templates;
PYLLAMA_COMMON_API void pyllama_free_string(char * s);
PYLLAMA_COMMON_API common_chat_templates * pyllama_chat_templates_init(const struct llama_model * model,
                                                                       const char * template_override,
                                                                       char ** error);
PYLLAMA_COMMON_API void pyllama_chat_templates_free(common_chat_templates * tmpls);
PYLLAMA_COMMON_API char * pyllama_chat_templates_info(const common_chat_templates * tmpls);
PYLLAMA_COMMON_API char * pyllama_chat_apply(const common_chat_templates * tmpls, const char * request);
PYLLAMA_COMMON_API char * pyllama_chat_parse(const char * parser_state, const char * text, size_t n_text,
                                             bool partial);
PYLLAMA_COMMON_API char * pyllama_json_schema_to_grammar(const char * schema_json);
PYLLAMA_COMMON_API char * pyllama_grammar_accept_text(struct llama_sampler * smpl, const struct llama_vocab * vocab,
                                                      const char * text);

/* speculative.cpp: llama.cpp's drafters (draft model, n-gram lookup) per sequence. */
typedef struct pyllama_spec pyllama_spec;
PYLLAMA_COMMON_API pyllama_spec * pyllama_spec_init(const char * config, struct llama_context * ctx_tgt,
                                                    struct llama_context * ctx_dft, uint32_t n_seq);
PYLLAMA_COMMON_API void pyllama_spec_free(pyllama_spec * s);
PYLLAMA_COMMON_API int32_t pyllama_spec_begin(pyllama_spec * s, int32_t seq_id, const llama_token * prompt,
                                              int32_t n_prompt);
PYLLAMA_COMMON_API int32_t pyllama_spec_draft(pyllama_spec * s, int32_t seq_id, const llama_token * history,
                                              int32_t n_history, llama_token id_last, int32_t n_max,
                                              llama_token * out, int32_t cap);
PYLLAMA_COMMON_API int32_t pyllama_spec_process(pyllama_spec * s, int32_t seq_id, const llama_token * tokens,
                                                int32_t n, llama_pos pos0);
PYLLAMA_COMMON_API int32_t pyllama_spec_accept(pyllama_spec * s, int32_t seq_id, int32_t n_accepted);
PYLLAMA_COMMON_API const char * pyllama_spec_error(void);

/* files.cpp: llama.cpp's check of a file name a client gives (fs_validate_filename): 1 valid, 0 not, -1 error. */
PYLLAMA_COMMON_API int32_t pyllama_validate_filename(const char * name, bool allow_subdirs);

/* vulkan.cpp: the Vulkan drivers and their versions, as JSON. */
PYLLAMA_COMMON_API char * pyllama_vulkan_drivers(void);

#endif /* PYLLAMA_COMMON_H */
