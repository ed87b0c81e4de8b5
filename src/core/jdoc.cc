/*
 * jdoc.cc: jdoc.h on simdjson's DOM parser. The C side sees simdjson's trivially copyable
 * element and array iterator as opaque words; nothing here throws (simdjson's error-code API
 * only, and std::nothrow allocation).
 */
#include <simdjson.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <strings.h>
#include <memory>
#include <new>
#include <string_view>
#include <type_traits>
#include <vector>

#include <jansson.h>

extern "C" {
#include "core/jdoc.h"
}

using simdjson::dom::array;
using simdjson::dom::element;
using simdjson::dom::element_type;
using simdjson::dom::object;

static_assert(sizeof(element) <= sizeof(jdoc_val::opaque), "jdoc_val too small for an element");
static_assert(std::is_trivially_copyable<element>::value, "element must be copyable as bytes");
static_assert(2 * sizeof(array::iterator) <= sizeof(jdoc_iter::opaque),
              "jdoc_iter too small for two array iterators");
static_assert(std::is_trivially_copyable<array::iterator>::value,
              "array::iterator must be copyable as bytes");
static_assert(2 * sizeof(object::iterator) <= sizeof(jdoc_iter::opaque),
              "jdoc_iter too small for two object iterators");
static_assert(std::is_trivially_copyable<object::iterator>::value,
              "object::iterator must be copyable as bytes");

/* A document up to this size keeps the thread's parser memory (about 15 bytes per byte of
 * capacity) for the next one. */
static const size_t KEEP_CAPACITY = 256 << 10;

/* freed when its thread ends */
static thread_local std::unique_ptr<simdjson::dom::parser> tls_parser;

static element get(const jdoc_val *v)
{
    element el;
    std::memcpy(static_cast<void *>(&el), v->opaque, sizeof(el));
    return el;
}

static array as_array(const element &el)
{
    array a;
    if (el.get_array().get(a) != simdjson::SUCCESS) /* callers checked the type */
        return array();
    return a;
}

static object as_object(const element &el)
{
    object o;
    if (el.get_object().get(o) != simdjson::SUCCESS)
        return object();
    return o;
}

static void put(jdoc_val *v, const element &el)
{
    std::memset(v->opaque, 0, sizeof(v->opaque));
    std::memcpy(v->opaque, static_cast<const void *>(&el), sizeof(el));
}

/* The first key that an object in `el` holds twice, searched depth first. */
static bool find_duplicate(const element &el, std::string_view *dup)
{
    if (el.type() == element_type::ARRAY) {
        for (element item : as_array(el))
            if (find_duplicate(item, dup))
                return true;
        return false;
    }
    if (el.type() != element_type::OBJECT)
        return false;
    object obj = as_object(el);
    size_t n = 0;
    for (auto field : obj) {
        n++;
        if (find_duplicate(field.value, dup))
            return true;
    }
    if (n < 2)
        return false;
    if (n <= 16) {
        size_t i = 0;
        for (auto a : obj) {
            size_t j = 0;
            for (auto b : obj) {
                if (j++ <= i)
                    continue;
                if (a.key == b.key) {
                    *dup = a.key;
                    return true;
                }
            }
            i++;
        }
        return false;
    }
    std::vector<std::string_view> keys;
    try {
        keys.reserve(n);
        for (auto field : obj)
            keys.push_back(field.key);
    } catch (...) {
        return false; /* out of memory: the caller's decoder still sees one of the values */
    }
    std::sort(keys.begin(), keys.end());
    auto it = std::adjacent_find(keys.begin(), keys.end());
    if (it == keys.end())
        return false;
    *dup = *it;
    return true;
}

/* jansson's messages (2.14), by how they start; each phrase quotes nothing of the text.
 * Those that print input bytes ("invalid Unicode escape '\\u12'", "control character 0x1")
 * are cut before them, and jansson adds "near '...'" to most: both stay out. */
static const struct {
    const char *starts;
    const char *phrase;
} jansson_reasons[] = {
    {"unable to decode byte", "invalid UTF-8"},
    {"premature end of input", "premature end of input"},
    {"unexpected newline", "unexpected newline in a string"},
    {"control character", "control character in a string"},
    {"invalid escape", "invalid escape"},
    {"invalid Unicode", "invalid Unicode escape"},
    {"too big negative integer", "integer too big"},
    {"too big integer", "integer too big"},
    {"real number overflow", "real number overflow"},
    {"maximum parsing depth reached", "nested too deeply"},
    {"string or '}' expected", "string or '}' expected"},
    {"':' expected", "':' expected"},
    {"invalid token", "invalid token"},
    {"unexpected token", "unexpected token"},
    {"']' expected", "']' expected"},
    {"'[' or '{' expected", "'[' or '{' expected"},
    {"end of file expected", "text after the JSON value"},
    {"\\u0000 is not allowed", "\\u0000 in a string"},
    {"NUL byte in object key", "\\u0000 in an object key"},
};

extern "C" const char *jdoc_jansson_reason(const struct json_error_t *jerr)
{
    for (const auto &r : jansson_reasons)
        if (std::strncmp(jerr->text, r.starts, std::strlen(r.starts)) == 0)
            return r.phrase;
    switch (json_error_code(jerr)) {
    case json_error_invalid_utf8:
        return "invalid UTF-8";
    case json_error_premature_end_of_input:
        return "premature end of input";
    case json_error_end_of_input_expected:
        return "text after the JSON value";
    case json_error_null_character:
    case json_error_null_byte_in_key:
        return "\\u0000 in a string";
    case json_error_numeric_overflow:
        return "number too big";
    case json_error_stack_overflow:
        return "nested too deeply";
    case json_error_out_of_memory:
        return "out of memory";
    default:
        return "invalid syntax";
    }
}

/* Python's json.dumps writes NaN, Infinity and -Infinity, which JSON does not have; jansson
 * calls them an invalid token. jerr->position is the byte after the token, or after the '-'. */
static const char *non_finite_hint(const char *text, size_t len, const json_error_t *jerr)
{
    static const char *const tokens[] = {"nan", "infinity", "inf"};
    size_t end = (size_t)jerr->position, start = end;

    if (std::strncmp(jerr->text, "invalid token", 13) != 0 || end > len)
        return NULL;
    if (end > 0 && text[end - 1] == '-') /* "-Infinity": the token is what follows */
        while (end < len && std::isalpha((unsigned char)text[end]))
            end++;
    else
        while (start > 0 && std::isalpha((unsigned char)text[start - 1]))
            start--;
    for (const char *t : tokens)
        if (end - start == std::strlen(t) && strncasecmp(text + start, t, end - start) == 0)
            return t[0] == 'n' ? "JSON has no NaN: send null for a missing value"
                               : "JSON has no Infinity: send a finite number, or null for a "
                                 "missing value";
    return NULL;
}

extern "C" const char *jdoc_jansson_why(const char *text, size_t len,
                                        const struct json_error_t *jerr, unsigned flags)
{
    const char *hint = non_finite_hint(text, len, jerr);

    if (hint)
        return hint;
    return flags & JDOC_STORED ? jdoc_jansson_reason(jerr) : jerr->text;
}

/* simdjson says only what is wrong; jansson also says where (text that simdjson refuses for
 * its own limits, jansson may accept: then simdjson's reason stands alone). simdjson's
 * reasons are fixed phrases; jansson's may quote the text (see jdoc_jansson_reason). */
static int malformed(const char *text, size_t len, unsigned flags, simdjson::error_code code,
                     struct err *e)
{
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_DECODE_ANY, &jerr);

    if (root) {
        json_decref(root);
        return err_set(e, ERR_INVALID, "malformed JSON: %s", simdjson::error_message(code));
    }
    return err_set(e, ERR_INVALID, "malformed JSON at line %d column %d: %s", jerr.line,
                   jerr.column, jdoc_jansson_why(text, len, &jerr, flags));
}

extern "C" int jdoc_parse(const char *text, size_t len, unsigned flags, struct jdoc_val *root,
                          struct err *e)
{
    element el;
    std::string_view dup;

    if (!tls_parser) {
        tls_parser.reset(new (std::nothrow) simdjson::dom::parser());
        if (!tls_parser)
            return err_set(e, ERR_NOMEM, "out of memory");
    }
    if (len == 0)
        return err_set(e, ERR_INVALID, "malformed JSON: %s",
                       flags & JDOC_STORED ? "no text" : "the body is empty");
    simdjson::error_code code = tls_parser->parse(text, len, true).get(el);
    if (code == simdjson::MEMALLOC)
        return err_set(e, ERR_NOMEM, "out of memory parsing %zu bytes of JSON", len);
    if (code != simdjson::SUCCESS)
        return malformed(text, len, flags, code, e);
    if (find_duplicate(el, &dup)) {
        if (flags & JDOC_STORED)
            return err_set(e, ERR_INVALID, "malformed JSON: an object has the same key twice");
        return err_set(e, ERR_INVALID, "malformed JSON: duplicate key '%.*s'",
                       (int)std::min<size_t>(dup.size(), 64), dup.data());
    }
    put(root, el);
    return 0;
}

extern "C" void jdoc_done(void)
{
    if (tls_parser && tls_parser->capacity() > KEEP_CAPACITY)
        tls_parser.reset();
}

extern "C" enum jdoc_type jdoc_type(const struct jdoc_val *v)
{
    element el = get(v);

    switch (el.type()) {
    case element_type::ARRAY:
        return JDOC_ARRAY;
    case element_type::OBJECT:
        return JDOC_OBJECT;
    case element_type::INT64:
        return JDOC_INT;
    case element_type::UINT64:
    case element_type::DOUBLE:
        return JDOC_REAL;
    case element_type::STRING:
        return JDOC_STRING;
    case element_type::BOOL:
        return JDOC_BOOL;
    case element_type::NULL_VALUE:
    default:
        return JDOC_NULL;
    }
}

extern "C" int jdoc_is_true(const struct jdoc_val *v)
{
    bool b = false;

    return get(v).get_bool().get(b) == simdjson::SUCCESS && b;
}

extern "C" int64_t jdoc_int(const struct jdoc_val *v)
{
    int64_t n = 0;

    return get(v).get_int64().get(n) == simdjson::SUCCESS ? n : 0;
}

extern "C" double jdoc_number(const struct jdoc_val *v)
{
    element el = get(v);
    double d = 0;
    int64_t i;
    uint64_t u;

    switch (el.type()) {
    case element_type::INT64:
        return el.get_int64().get(i) == simdjson::SUCCESS ? (double)i : 0;
    case element_type::UINT64:
        return el.get_uint64().get(u) == simdjson::SUCCESS ? (double)u : 0;
    case element_type::DOUBLE:
        return el.get_double().get(d) == simdjson::SUCCESS ? d : 0;
    default:
        return 0;
    }
}

extern "C" const char *jdoc_string(const struct jdoc_val *v, size_t *len)
{
    element el = get(v);
    std::string_view s;

    if (el.type() != element_type::STRING || el.get_string().get(s) != simdjson::SUCCESS)
        return nullptr;
    if (len)
        *len = s.size();
    return s.data(); /* simdjson's string buffer ends each string with a NUL */
}

extern "C" int jdoc_get(const struct jdoc_val *v, const char *key, struct jdoc_val *out)
{
    element el = get(v), member;

    if (el.type() != element_type::OBJECT ||
        as_object(el).at_key(key).get(member) != simdjson::SUCCESS)
        return 0;
    put(out, member);
    return 1;
}

/* Members counted one by one: the tape's count saturates at 0xFFFFFF. */
template <class Container> static size_t count_all(const Container &c)
{
    size_t n = 0;

    for (auto item : c) {
        (void)item;
        n++;
    }
    return n;
}

extern "C" size_t jdoc_size(const struct jdoc_val *v)
{
    element el = get(v);
    size_t n;

    if (el.type() == element_type::ARRAY) {
        n = as_array(el).size();
        return n < 0xFFFFFF ? n : count_all(as_array(el));
    }
    if (el.type() == element_type::OBJECT) {
        n = as_object(el).size();
        return n < 0xFFFFFF ? n : count_all(as_object(el));
    }
    return 0;
}

extern "C" void jdoc_iter_init(const struct jdoc_val *v, struct jdoc_iter *it)
{
    element el = get(v);
    array::iterator pos, end;

    std::memset(it->opaque, 0, sizeof(it->opaque)); /* equal positions: an empty iteration */
    if (el.type() != element_type::ARRAY)
        return;
    pos = as_array(el).begin();
    end = as_array(el).end();
    std::memcpy(it->opaque, static_cast<const void *>(&pos), sizeof(pos));
    std::memcpy(it->opaque + 2, static_cast<const void *>(&end), sizeof(end));
}

extern "C" int jdoc_iter_next(struct jdoc_iter *it, struct jdoc_val *out)
{
    array::iterator pos, end;

    std::memcpy(static_cast<void *>(&pos), it->opaque, sizeof(pos));
    std::memcpy(static_cast<void *>(&end), it->opaque + 2, sizeof(end));
    if (!(pos != end))
        return 0;
    put(out, *pos);
    ++pos;
    std::memcpy(it->opaque, static_cast<const void *>(&pos), sizeof(pos));
    return 1;
}

extern "C" void jdoc_members_init(const struct jdoc_val *v, struct jdoc_iter *it)
{
    element el = get(v);
    object::iterator pos, end;

    std::memset(it->opaque, 0, sizeof(it->opaque)); /* equal positions: an empty iteration */
    if (el.type() != element_type::OBJECT)
        return;
    pos = as_object(el).begin();
    end = as_object(el).end();
    std::memcpy(it->opaque, static_cast<const void *>(&pos), sizeof(pos));
    std::memcpy(it->opaque + 2, static_cast<const void *>(&end), sizeof(end));
}

extern "C" int jdoc_members_next(struct jdoc_iter *it, const char **key, size_t *key_len,
                                 struct jdoc_val *out)
{
    object::iterator pos, end;

    std::memcpy(static_cast<void *>(&pos), it->opaque, sizeof(pos));
    std::memcpy(static_cast<void *>(&end), it->opaque + 2, sizeof(end));
    if (!(pos != end))
        return 0;
    *key = pos.key_c_str();
    *key_len = pos.key_length();
    put(out, pos.value());
    ++pos;
    std::memcpy(it->opaque, static_cast<const void *>(&pos), sizeof(pos));
    return 1;
}
