// pyllama's C entry points to llama.cpp's own chat templates (common/chat.cpp:
// the jinja engine, the PEG tool-call / reasoning parsers, the auto-parser) and
// JSON schema -> GBNF conversion, compiled into libpyllama-common.
//
// Every entry point takes and returns JSON text: the results are malloc'ed
// strings the caller frees with pyllama_free_string. No C++ exception crosses
// the boundary: each is caught and returned as {"error": "...", "kind": K},
// K = "value" (the request itself is malformed: messages, tools, schema) or
// "template" (the chat template failed to render or to yield a parser).
//
// The request and result fields follow llama-server's handling of
// /v1/chat/completions (tools/server/server-common.cpp,
// oaicompat_chat_params_parse, and the parse of the output in server-task.cpp).

#include "pyllama_common.h"

#include "chat.h"
#include "common.h"
#include "json-schema-to-grammar.h"
#include "json.h"
#include "llama.h"
#include "log.h"
#include "peg-parser.h"

#include <nlohmann/json.hpp>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

using ojson = nlohmann::ordered_json;

namespace {

// A failure of the request itself (bad JSON, bad message shape, unknown option).
struct request_error : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

char * dup_string(const std::string & s) {
    char * out = (char *) std::malloc(s.size() + 1);
    if (out != nullptr) {
        std::memcpy(out, s.data(), s.size());
        out[s.size()] = '\0';
    }
    return out;
}

char * error_json(const char * kind, const std::string & what) {
    ojson err = { { "error", what }, { "kind", kind } };
    return dup_string(err.dump(-1, ' ', false, ojson::error_handler_t::replace));
}

char * result_json(const ojson & j) {
    // The template or the model may produce invalid UTF-8; the caller gets U+FFFD.
    return dup_string(j.dump(-1, ' ', false, ojson::error_handler_t::replace));
}

ojson parse_request(const char * text) {
    if (text == nullptr) {
        throw request_error("no request");
    }
    ojson j = ojson::parse(text, nullptr, /* allow_exceptions */ false);
    if (j.is_discarded() || !j.is_object()) {
        throw request_error("the request is not a JSON object");
    }
    return j;
}

common_json to_common(const ojson & j) {
    return common_json::parse(j.dump());
}

const char * trigger_type_name(common_grammar_trigger_type t) {
    switch (t) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:        return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:         return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:      return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

template <typename F> char * guarded(const char * what, F && body) {
    try {
        return body();
    } catch (const request_error & e) {
        return error_json("value", e.what());
    } catch (const common_json_error & e) {
        return error_json("value", e.what());
    } catch (const ojson::exception & e) {
        return error_json("value", e.what());
    } catch (const std::exception & e) {
        return error_json("template", e.what());
    } catch (...) {
        return error_json("template", std::string(what) + ": unknown exception");
    }
}

// The inputs of common_chat_templates_apply from an OpenAI-style request.
// Every failure here is the request's, hence request_error.
common_chat_templates_inputs parse_inputs(const ojson & req) {
    common_chat_templates_inputs inputs;
    try {
        const ojson & messages = req.at("messages");
        if (!messages.is_array()) {
            throw request_error("'messages' must be an array");
        }
        for (const auto & msg : messages) {
            if (!msg.is_object()) {
                throw request_error("each message must be an object");
            }
            const std::string role = msg.contains("role") && msg.at("role").is_string() ? msg.at("role").get<std::string>() : "";
            if (role.empty()) {
                throw request_error("each message needs a 'role' string");
            }
            if (role == "assistant") {
                if (!msg.contains("content") && !msg.contains("tool_calls")) {
                    throw request_error("an assistant message needs 'content' or 'tool_calls'");
                }
            } else if (!msg.contains("content")) {
                throw request_error("a '" + role + "' message needs 'content'");
            }
        }
        // OpenAI clients send null for absent optional fields; llama.cpp wants them absent.
        ojson cleaned = messages;
        for (auto & msg : cleaned) {
            for (const char * key : { "reasoning_content", "name", "tool_call_id", "tool_calls" }) {
                if (msg.contains(key) && msg.at(key).is_null()) {
                    msg.erase(key);
                }
            }
        }
        inputs.messages = common_chat_msgs_parse_oaicompat(to_common(cleaned));

        const ojson tools = req.value("tools", ojson());
        if (!tools.is_null()) {
            if (!tools.is_array()) {
                throw request_error("'tools' must be an array");
            }
            inputs.tools = common_chat_tools_parse_oaicompat(to_common(tools));
        }
        inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(req.value("tool_choice", std::string("auto")));
        inputs.parallel_tool_calls = req.value("parallel_tool_calls", false);

        const ojson schema = req.value("json_schema", ojson());
        const std::string grammar = req.value("grammar", std::string());
        if (!schema.is_null()) {
            if (!grammar.empty()) {
                throw request_error("cannot use both json_schema and grammar");
            }
            if (!schema.is_object()) {
                throw request_error("'json_schema' must be an object");
            }
            // an empty schema means any object (as llama-server)
            inputs.json_schema = schema.empty() ? std::string("{\"type\":\"object\"}") : schema.dump();
        }
        inputs.grammar = grammar;
        if (!inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE && !grammar.empty()) {
            throw request_error("cannot use a custom grammar together with tools");
        }
        inputs.add_generation_prompt = req.value("add_generation_prompt", true);
        if (req.contains("continue_final_message")) {
            inputs.continue_final_message = common_chat_continuation_parse(to_common(req.at("continue_final_message")));
            if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE) {
                if (inputs.add_generation_prompt) {
                    throw request_error("cannot set both add_generation_prompt and continue_final_message");
                }
                if (inputs.messages.empty() || inputs.messages.back().role != "assistant") {
                    throw request_error("continue_final_message needs an assistant message at the end");
                }
                if (!inputs.messages.back().tool_calls.empty()) {
                    throw request_error("cannot continue an assistant message that contains tool calls");
                }
            }
        }
        inputs.enable_thinking  = req.value("enable_thinking", true);
        inputs.reasoning_format = common_reasoning_format_from_name(req.value("reasoning_format", std::string("auto")));
        if (req.contains("chat_template_kwargs")) {
            const ojson & kwargs = req.at("chat_template_kwargs");
            if (!kwargs.is_object()) {
                throw request_error("'chat_template_kwargs' must be an object");
            }
            for (const auto & item : kwargs.items()) {
                inputs.chat_template_kwargs[item.key()] = item.value().dump();
            }
        }
        inputs.use_jinja = true;
    } catch (const request_error &) {
        throw;
    } catch (const std::exception & e) {
        throw request_error(e.what());
    }
    return inputs;
}

// The parser state of one applied prompt: what common_chat_parse needs.
struct parser_state {
    std::string               key;
    common_chat_parser_params params;
};

}  // namespace

PYLLAMA_COMMON_API void pyllama_free_string(char * s) {
    std::free(s);
}

// The chat templates of a model (or of an explicit Jinja template, when
// template_override is a non-empty string). NULL on failure, with *error set
// to an error JSON the caller frees.
PYLLAMA_COMMON_API common_chat_templates * pyllama_chat_templates_init(const llama_model * model,
                                                                       const char * template_override, char ** error) {
    *error = nullptr;
    common_chat_templates * out = nullptr;
    char * err = guarded("pyllama_chat_templates_init", [&]() -> char * {
        const std::string tmpl = template_override != nullptr ? template_override : "";
        if (model == nullptr && tmpl.empty()) {
            throw request_error("no model and no template");
        }
        out = common_chat_templates_init(model, tmpl).release();
        return nullptr;
    });
    *error = err;
    return out;
}

PYLLAMA_COMMON_API void pyllama_chat_templates_free(common_chat_templates * tmpls) {
    common_chat_templates_free(tmpls);
}

// {"source", "tool_use_source", "explicit", "caps": {...}, "supports_enable_thinking"}
PYLLAMA_COMMON_API char * pyllama_chat_templates_info(const common_chat_templates * tmpls) {
    return guarded("pyllama_chat_templates_info", [&]() -> char * {
        ojson caps = ojson::object();
        for (const auto & kv : common_chat_templates_get_caps(tmpls)) {
            caps[kv.first] = kv.second;
        }
        // found by rendering a probe conversation, which a template may refuse
        bool thinking = false;
        try {
            thinking = common_chat_templates_support_enable_thinking(tmpls);
        } catch (const std::exception &) {
            thinking = false;
        }
        ojson out = {
            { "source", common_chat_templates_source(tmpls) },
            { "tool_use_source", common_chat_templates_source(tmpls, "tool_use") },
            { "explicit", common_chat_templates_was_explicit(tmpls) },
            { "caps", caps },
            { "supports_enable_thinking", thinking },
        };
        return result_json(out);
    });
}

// Renders an OpenAI-style request with the template. Request fields: messages,
// tools, tool_choice ("auto" | "none" | "required"), parallel_tool_calls,
// json_schema, grammar, add_generation_prompt, continue_final_message,
// enable_thinking, reasoning_format ("none" | "auto" | "deepseek" |
// "deepseek-legacy"), chat_template_kwargs. Result: prompt, grammar,
// grammar_lazy, grammar_type ("" | "user" | "tool_calls"), grammar_prefill (the
// text the grammar expects before the model's first token: the generation
// prompt, already in the prompt), grammar_triggers [{type, value, token}],
// preserved_tokens, additional_stops, format, generation_prompt,
// supports_thinking, thinking_start_tag, thinking_end_tags, and parser_state
// (opaque text for pyllama_chat_parse).
PYLLAMA_COMMON_API char * pyllama_chat_apply(const common_chat_templates * tmpls, const char * request) {
    return guarded("pyllama_chat_apply", [&]() -> char * {
        const ojson req = parse_request(request);
        if (!req.contains("messages")) {
            throw request_error("'messages' is required");
        }
        common_chat_templates_inputs inputs = parse_inputs(req);
        const common_chat_params params = common_chat_templates_apply(tmpls, inputs);

        ojson out = ojson::object();
        out["prompt"] = params.prompt;
        std::string grammar_type;
        std::string grammar = params.grammar;
        if (!grammar.empty()) {
            // generated from the tools or the json_schema, starting with the generation prompt
            grammar_type = "tool_calls";
        } else if (!inputs.grammar.empty()) {
            grammar      = inputs.grammar;
            grammar_type = "user";
        }
        out["grammar"]         = grammar;
        out["grammar_type"]    = grammar_type;
        out["grammar_lazy"]    = params.grammar_lazy;
        // as common_sampler_init: only a non-lazy template grammar is advanced past the prefill
        out["grammar_prefill"] = grammar_type == "tool_calls" && !params.grammar_lazy ? params.generation_prompt : "";
        ojson triggers = ojson::array();
        for (const auto & t : params.grammar_triggers) {
            triggers.push_back({ { "type", trigger_type_name(t.type) }, { "value", t.value }, { "token", t.token } });
        }
        out["grammar_triggers"]   = triggers;
        out["preserved_tokens"]   = params.preserved_tokens;
        out["additional_stops"]   = params.additional_stops;
        out["format"]             = common_chat_format_name(params.format);
        out["generation_prompt"]  = params.generation_prompt;
        out["supports_thinking"]  = params.supports_thinking;
        out["thinking_start_tag"] = params.thinking_start_tag;
        out["thinking_end_tags"]  = params.thinking_end_tags;

        ojson state = {
            { "format", (int) params.format },
            { "reasoning_format", req.value("reasoning_format", std::string("auto")) },
            { "generation_prompt", params.generation_prompt },
            { "parse_tool_calls", !inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE },
            { "is_continuation", inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE },
            { "parser", params.parser },
        };
        out["parser_state"] = state.dump();
        return result_json(out);
    });
}

// Parses generated text (without the prompt) into an OpenAI assistant message:
// {"role", "content", "reasoning_content", "tool_calls": [{"id", "name", "arguments"}]}.
// With partial, the text may stop anywhere (streaming).
PYLLAMA_COMMON_API char * pyllama_chat_parse(const char * parser_state_json, const char * text, size_t n_text,
                                             bool partial) {
    return guarded("pyllama_chat_parse", [&]() -> char * {
        if (parser_state_json == nullptr || (text == nullptr && n_text > 0)) {
            throw request_error("no parser state or text");
        }
        // A stream parses the same state once per token: keep the last one loaded.
        thread_local parser_state cached;
        if (cached.key != parser_state_json) {
            const ojson st = parse_request(parser_state_json);
            parser_state fresh;
            const int format = st.at("format").get<int>();
            if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
                throw request_error("unknown chat format in the parser state");
            }
            fresh.params.format            = (common_chat_format) format;
            fresh.params.reasoning_format  = common_reasoning_format_from_name(st.at("reasoning_format").get<std::string>());
            fresh.params.generation_prompt = st.at("generation_prompt").get<std::string>();
            fresh.params.parse_tool_calls  = st.at("parse_tool_calls").get<bool>();
            fresh.params.is_continuation   = st.at("is_continuation").get<bool>();
            const std::string parser       = st.at("parser").get<std::string>();
            if (!parser.empty()) {
                fresh.params.parser.load(parser);
            }
            fresh.key = parser_state_json;
            cached    = std::move(fresh);
        }
        const common_chat_msg msg = common_chat_parse(std::string(text != nullptr ? text : "", n_text), partial,
                                                      cached.params);
        ojson calls = ojson::array();
        for (const auto & tc : msg.tool_calls) {
            calls.push_back({ { "id", tc.id }, { "name", tc.name }, { "arguments", tc.arguments } });
        }
        std::string content = msg.content;
        if (content.empty() && !msg.content_parts.empty()) {
            content = msg.render_content("\n");
        }
        ojson out = {
            { "role", "assistant" },
            { "content", content },
            { "reasoning_content", msg.reasoning_content },
            { "tool_calls", calls },
        };
        return result_json(out);
    });
}

// {"grammar": GBNF} for a JSON schema (JSON text).
PYLLAMA_COMMON_API char * pyllama_json_schema_to_grammar(const char * schema_json) {
    return guarded("pyllama_json_schema_to_grammar", [&]() -> char * {
        if (schema_json == nullptr) {
            throw request_error("no schema");
        }
        const ojson schema = ojson::parse(schema_json, nullptr, false);
        if (schema.is_discarded()) {
            throw request_error("the schema is not valid JSON");
        }
        if (!schema.is_object() && !schema.is_boolean()) {
            throw request_error("a JSON schema must be an object");
        }
        std::string grammar;
        try {
            grammar = json_schema_to_grammar(to_common(schema));
        } catch (const std::exception & e) {
            throw request_error(e.what());
        }
        return result_json({ { "grammar", grammar } });
    });
}

// The tokens whose pieces spell `text` exactly: control tokens where the tokenizer found them, the text between
// them as byte tokens. llama.cpp's tokenizer puts a space before text that follows a control token in
// SentencePiece vocabularies with add_space_prefix ("<|im_start|>assistant" -> "<|im_start|>", " as", ...),
// which a grammar expecting the template's own text rejects (llama-server answers such a request 400: "Failed to
// initialize samplers"). Empty when a byte has no token.
static llama_tokens spelled_tokens(const llama_vocab * vocab, const std::string & text, const llama_tokens & tokens) {
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_token> byte_token(256, LLAMA_TOKEN_NULL);
    for (llama_token id = 0; id < n_vocab; id++) {
        if (llama_vocab_get_attr(vocab, id) & LLAMA_TOKEN_ATTR_BYTE) {
            const std::string name = llama_vocab_get_text(vocab, id);  // "<0x41>"
            if (name.size() == 6 && name.compare(0, 3, "<0x") == 0 && name[5] == '>') {
                byte_token[std::stoi(name.substr(3, 2), nullptr, 16)] = id;
            }
        }
    }
    llama_tokens out;
    size_t at = 0;
    auto spell = [&](size_t end) -> bool {
        for (; at < end; at++) {
            const llama_token b = byte_token[(unsigned char) text[at]];
            if (b == LLAMA_TOKEN_NULL) {
                return false;
            }
            out.push_back(b);
        }
        return true;
    };
    for (const llama_token tok : tokens) {
        if (!(llama_vocab_get_attr(vocab, tok) & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED))) {
            continue;
        }
        const std::string piece = common_token_to_piece(vocab, tok, true);
        const size_t found = piece.empty() ? std::string::npos : text.find(piece, at);
        if (found == std::string::npos) {
            continue;
        }
        if (!spell(found)) {
            return {};
        }
        out.push_back(tok);
        at = found + piece.size();
    }
    if (!spell(text.size())) {
        return {};
    }
    return out;
}

// Advances a grammar sampler over text the grammar expects but the model does
// not generate (the generation prompt already in the prompt), as
// common_sampler_init does. llama_sampler_accept throws on a token the grammar
// rejects; here that becomes {"error": ...} instead of an abort. {} on success.
PYLLAMA_COMMON_API char * pyllama_grammar_accept_text(llama_sampler * smpl, const llama_vocab * vocab,
                                                      const char * text) {
    return guarded("pyllama_grammar_accept_text", [&]() -> char * {
        if (smpl == nullptr || vocab == nullptr || text == nullptr) {
            throw request_error("no sampler, vocabulary or text");
        }
        const std::string prefill = text;
        llama_tokens tokens = common_tokenize(vocab, prefill, false, true);
        std::string spelled;
        size_t first = 0;
        for (size_t i = 0; i < tokens.size(); i++) {
            const std::string piece = common_token_to_piece(vocab, tokens[i], true);
            if (i == 0 && !piece.empty() && std::isspace((unsigned char) piece[0]) && !prefill.empty() &&
                !std::isspace((unsigned char) prefill[0])) {
                first = 1;  // some tokenizers add a space before the first special token
                continue;
            }
            spelled += piece;
        }
        if (spelled != prefill) {  // the tokenizer added text (a space after a control token): spell it exactly
            llama_tokens exact = spelled_tokens(vocab, prefill, tokens);
            if (!exact.empty()) {
                tokens = std::move(exact);
                first  = 0;
            }
        }
        for (size_t i = first; i < tokens.size(); i++) {
            try {
                llama_sampler_accept(smpl, tokens[i]);
            } catch (const std::exception & e) {
                throw request_error(std::string("the grammar rejects its prefill '") + prefill + "': " + e.what());
            }
        }
        return result_json(ojson::object());
    });
}
