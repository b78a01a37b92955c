/* request: parsing and checking a batch body (see request.h). */
#include "server/batch/request.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/json.h"

static int refuse(struct request_error *e, unsigned status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int refuse(struct request_error *e, unsigned status, const char *code, const char *fmt, ...)
{
    e->status = status;
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
    return status == 500 ? -ENOMEM : -EINVAL;
}

#define BAD(e, ...) refuse(e, 400, "bad_request", __VA_ARGS__)

/* cJSON cuts a string at a \u0000 escape, so an id "a\u0000b" would silently become "a". Before
 * parsing, every such escape in the raw text is overwritten with NUL_MARK: six 0xFF bytes, the
 * escape's own length, which valid UTF-8 never holds. cJSON copies them into the string as they
 * are, and the id check then names the position. The strict validity of the original text is
 * decided before this, so a marker elsewhere (a key, an unknown field) is harmless. Returns
 * whether any escape was marked. */
static const char NUL_MARK[6] = {'\xff', '\xff', '\xff', '\xff', '\xff', '\xff'};

static bool mark_nul_escapes(char *s, size_t n)
{
    bool found = false;
    for (size_t i = 0; i + 1 < n; i++) {
        if (s[i] != '\\')
            continue;
        if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4)) {
            memcpy(s + i, NUL_MARK, sizeof(NUL_MARK));
            found = true;
            i += 5;
            continue;
        }
        i++; /* skip the escaped character, so "\\u0000" is left alone */
    }
    return found;
}

/* A positive whole number of milliseconds from JSON; false if it is not one. */
static bool timeout_from_number(double v, int64_t *out)
{
    if (!(v >= 1 && v <= 9007199254740992.0) || v != (double)(int64_t)v)
        return false;
    *out = (int64_t)v;
    return true;
}

/* The header's digits; any length is a valid (if huge) deadline, clamped to 2^53 like the body's
 * timeout_ms and then to the maximum. */
static bool timeout_from_text(const char *t, int64_t *out)
{
    if (!*t)
        return false;
    int64_t v = 0;
    for (; *t; t++) {
        if (*t < '0' || *t > '9')
            return false;
        if (v < ((int64_t)1 << 53))
            v = v * 10 + (*t - '0');
    }
    if (v < 1)
        return false;
    *out = v;
    return true;
}

/* An optional boolean member: absent leaves *out alone. */
static int opt_bool(const cJSON *root, const char *name, bool *out, struct request_error *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!v)
        return 0;
    if (!cJSON_IsBool(v))
        return BAD(e, "\"%s\" must be true or false", name);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* Appends position i's echo text and id bytes to the arena. */
static int add_item(struct json_buf *arena, struct request_item *it, const cJSON *v, size_t i,
                    bool nul_marked, struct request_error *e)
{
    char num[JSON_INT64_MAX_CHARS];
    const char *id;
    size_t n;
    size_t echo_off = arena->len;
    if (cJSON_IsString(v)) {
        id = v->valuestring;
        n = strlen(id);
        if (n == 0)
            return BAD(e, "ids[%zu] is an empty string", i);
        if (nul_marked && memmem(id, n, NUL_MARK, sizeof(NUL_MARK)))
            return BAD(e, "ids[%zu] contains \\u0000", i);
        if (n > REQUEST_ID_MAX_BYTES)
            return BAD(e, "ids[%zu] is %zu bytes long; the limit is %d", i, n,
                       REQUEST_ID_MAX_BYTES);
        if (!json_utf8_valid(id, n))
            return BAD(e, "ids[%zu] is not valid UTF-8", i);
        json_append_string(arena, id, n);
    } else if (cJSON_IsNumber(v)) {
        int64_t x;
        if (json_id_from_number(v->valuedouble, &x) != 0)
            return BAD(e,
                       "ids[%zu] must be a whole number from -(2^53-1) to 2^53-1 (larger ids as "
                       "strings)",
                       i);
        n = json_format_int64(x, num);
        id = num;
        json_buf_append(arena, num, n);
    } else {
        return BAD(e, "ids[%zu] must be a string or an integer", i);
    }
    size_t echo_len = arena->len - echo_off;
    json_buf_append_char(arena, '\0');
    size_t id_off = arena->len;
    json_buf_append(arena, id, n);
    json_buf_append_char(arena, '\0');
    if (json_buf_failed(arena))
        return refuse(e, 500, "internal", "out of memory");
    if (arena->len > UINT32_MAX)
        return refuse(e, 413, "body_too_large", "the ids take more than 4 GiB");
    *it = (struct request_item){(uint32_t)echo_off, (uint32_t)echo_len, (uint32_t)id_off,
                                (uint32_t)n};
    return 0;
}

static int parse_root(const struct request_limits *lim, const cJSON *root, bool nul_marked,
                      int64_t given, struct request *out, struct request_error *e)
{
    if (!cJSON_IsObject(root))
        return BAD(e, "the request body must be a JSON object like {\"ids\": [...]}");
    const cJSON *tm = cJSON_GetObjectItemCaseSensitive(root, "timeout_ms");
    if (tm) {
        int64_t t;
        if (!cJSON_IsNumber(tm) || !timeout_from_number(tm->valuedouble, &t))
            return BAD(e, "timeout_ms must be a positive whole number of milliseconds");
        given = given < 0 || t < given ? t : given;
    }
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(root, "mode");
    if (mode) {
        if (cJSON_IsString(mode) && !strcmp(mode->valuestring, "all"))
            out->mode = MODE_ALL;
        else if (cJSON_IsString(mode) && !strcmp(mode->valuestring, "settled"))
            out->mode = MODE_SETTLED;
        else
            return BAD(e, "\"mode\" must be \"all\" or \"settled\"");
    }
    int rc;
    if ((rc = opt_bool(root, "hedge", &out->hedge, e)) != 0 ||
        (rc = opt_bool(root, "coalesce", &out->coalesce, e)) != 0)
        return rc;
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(root, "ids");
    if (!ids)
        return BAD(e, "\"ids\" is required");
    if (!cJSON_IsArray(ids))
        return BAD(e, "\"ids\" must be an array");
    size_t n = (size_t)cJSON_GetArraySize(ids);
    if (n > lim->max_batch)
        return refuse(e, 413, "too_many_ids",
                      "%zu ids exceed the limit of %u per request (--max-batch)", n,
                      lim->max_batch);
    out->items = calloc(n ? n : 1, sizeof(*out->items));
    if (!out->items)
        return refuse(e, 500, "internal", "out of memory");
    struct json_buf arena;
    json_buf_init(&arena);
    json_buf_reserve(&arena, n * 16 + 16);
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, ids)
    {
        if ((rc = add_item(&arena, &out->items[i], v, i, nul_marked, e)) != 0) {
            json_buf_destroy(&arena);
            return rc;
        }
        i++;
    }
    out->n = n;
    out->arena = json_buf_take(&arena, NULL);
    if (!out->arena)
        return refuse(e, 500, "internal", "out of memory");
    out->timeout_ms = given < 0 ? lim->default_timeout_ms : given;
    if (out->timeout_ms > lim->max_timeout_ms)
        out->timeout_ms = lim->max_timeout_ms;
    return 0;
}

int request_parse(const struct request_limits *lim, char *body, size_t len,
                  const char *timeout_header, struct request *out, struct request_error *e)
{
    memset(out, 0, sizeof(*out));
    out->hedge = out->coalesce = true;
    int64_t given = -1;
    if (timeout_header) {
        if (!timeout_from_text(timeout_header, &given))
            return BAD(e, "X-Request-Timeout-Ms must be a positive whole number of milliseconds");
    }
    if (!body || len == 0)
        return BAD(e, "empty request body; want {\"ids\": [...]}");
    /* cJSON is lenient (raw control bytes and any bytes in strings, "01", "1.", trailing data
     * with the length API); the strict validator decides what is JSON. It runs first, on the
     * text as received, but its verdict is given last, so that a bad id is still reported with
     * its index. */
    bool strict = json_valid(body, len, NULL, NULL);
    bool nul_marked = mark_nul_escapes(body, len);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!root) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        return BAD(e, "malformed JSON near byte %zu", at);
    }
    while (end && (size_t)(end - body) < len &&
           (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n'))
        end++;
    int rc;
    if (end && (size_t)(end - body) < len)
        rc = BAD(e, "malformed JSON: unexpected data after the object at byte %zu",
                 (size_t)(end - body));
    else
        rc = parse_root(lim, root, nul_marked, given, out, e);
    cJSON_Delete(root);
    if (rc == 0 && !strict) {
        /* cJSON took it and every id is fine, but the text is not RFC 8259 JSON: not UTF-8
         * outside the ids, raw control bytes in a string (a raw NUL would cut an id), lone
         * surrogates, non-standard numbers or nesting deeper than JSON_MAX_DEPTH. */
        if (!json_utf8_valid(body, len) && !nul_marked)
            rc = BAD(e, "the request body is not valid UTF-8");
        else
            rc = BAD(e,
                     "malformed JSON: not strict RFC 8259 (raw control characters in a string, a "
                     "non-standard number, a lone surrogate or nesting deeper than %d)",
                     JSON_MAX_DEPTH);
    }
    if (rc != 0)
        request_free(out);
    return rc;
}

void request_free(struct request *r)
{
    free(r->items);
    free(r->arena);
    memset(r, 0, sizeof(*r));
}
