/* json: output buffer, string escaping, UTF-8 check, strict validator, integer formatting.
 *
 * Design. The response writer appends into one struct json_buf; growth doubles, and allocation
 * failure is a sticky flag rather than a return value at every call, so a writer of many small
 * appends checks once. Upstream bodies go through json_valid() and are spliced raw when they pass,
 * or through json_append_string() when they do not; both run on every body, so both are written
 * for throughput:
 *   - bytes that need no attention (printable ASCII other than '"' and '\\') are skipped eight at
 *     a time with word-wide bit tests (SWAR), then one table lookup per byte up to the next
 *     interesting byte, and copied with one memcpy per run;
 *   - well-formed multi-byte UTF-8 is checked inline and stays inside the run;
 *   - json_valid() is a goto-driven state machine with the container stack kept as bits in a
 *     64-byte array, so neither deep input nor a large depth cap can exhaust the C stack.
 *
 * Threads and locks: none. Every function works only on its arguments; a struct json_buf belongs
 * to one thread at a time. */
#include "server/json.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Smallest block json_buf allocates; most responses fit without a second realloc. */
#define BUF_MIN_CAP 256

/* ---- Byte classes ------------------------------------------------------------------------ */

/* plain[c] is 1 for the bytes a JSON string may hold unescaped and that need no UTF-8 check:
 * 0x20-0x7F except '"' and '\\'. */
/* clang-format off */
static const unsigned char plain[256] = {
    ['\x20'] = 1, 1, 0 /* '"' */, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['\x30'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['\x40'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['\x50'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0 /* '\\' */, 1, 1, 1,
    ['\x60'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['\x70'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
};
/* clang-format on */

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v)); /* one unaligned load on every target we build for */
    return v;
}

/* Nonzero if some byte of the word is not plain: below 0x20, '"', '\\', or 0x80 and up. The
 * classic "has zero byte" / "has byte less than" tests; as booleans they are exact, whatever the
 * byte order. */
static inline uint64_t word_special(uint64_t x)
{
    uint64_t ctl = (x - ONES * 0x20) & ~x; /* high bit set where a byte < 0x20 (or >= 0x80) */
    uint64_t q = x ^ (ONES * '"');
    uint64_t bs = x ^ (ONES * '\\');
    uint64_t quote = (q - ONES) & ~q;
    uint64_t bslash = (bs - ONES) & ~bs;
    return (ctl | quote | bslash | x) & HIGHS;
}

/* Returns p advanced past plain bytes, stopping at the first non-plain byte or at e. */
static inline const unsigned char *skip_plain(const unsigned char *p, const unsigned char *e)
{
    while (e - p >= 8 && !word_special(load64(p)))
        p += 8;
    while (p < e && plain[*p])
        p++;
    return p;
}

/* p[0] is a byte >= 0x80 and p < e. Returns the length (2-4) of the well-formed UTF-8 sequence
 * there (Unicode Table 3-7: no overlongs, no surrogates, nothing above U+10FFFF), or 0 with *bad
 * set to the length (>= 1) of its maximal ill-formed subpart, the bytes one U+FFFD replaces. */
static inline size_t utf8_seq(const unsigned char *p, const unsigned char *e, size_t *bad)
{
    unsigned c = p[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0; /* overlong below U+0800 */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates U+D800-U+DFFF */
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90; /* overlong below U+10000 */
        else if (c == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    } else {
        *bad = 1; /* continuation byte, C0, C1 or F5-FF: never a lead */
        return 0;
    }
    size_t avail = (size_t)(e - p);
    if (avail < 2 || p[1] < lo || p[1] > hi) {
        *bad = 1;
        return 0;
    }
    for (size_t i = 2; i < need; i++) {
        if (i >= avail || (p[i] & 0xC0) != 0x80) {
            *bad = i;
            return 0;
        }
    }
    return need;
}

/* ---- struct json_buf --------------------------------------------------------------------- */

void json_buf_init(struct json_buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->oom = false;
}

void json_buf_destroy(struct json_buf *b)
{
    free(b->data);
    json_buf_init(b);
}

void json_buf_clear(struct json_buf *b)
{
    b->len = 0;
    b->oom = false;
    if (b->data)
        b->data[0] = '\0';
}

/* The slow path of json_buf_reserve(): grows the block to hold len + extra + 1 bytes. */
static bool buf_grow(struct json_buf *b, size_t extra)
{
    if (extra > SIZE_MAX - 1 - b->len) {
        b->oom = true;
        return false;
    }
    size_t need = b->len + extra + 1;
    size_t cap = b->cap < BUF_MIN_CAP ? BUF_MIN_CAP : b->cap;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *d = realloc(b->data, cap);
    if (!d) {
        b->oom = true;
        return false;
    }
    d[b->len] = '\0'; /* keeps the NUL invariant when the block is new */
    b->data = d;
    b->cap = cap;
    return true;
}

bool json_buf_reserve(struct json_buf *b, size_t extra)
{
    if (b->oom)
        return false;
    if (b->data && b->cap - b->len > extra) /* cap > len always holds while data != NULL */
        return true;
    return buf_grow(b, extra);
}

void json_buf_append(struct json_buf *b, const void *p, size_t n)
{
    uintptr_t src = (uintptr_t)p, base = (uintptr_t)b->data;
    if (b->data && src >= base && src < base + b->len) {
        /* Copying part of the buffer onto its end: the block may move, so keep an offset. */
        size_t off = (size_t)(src - base);
        if (!json_buf_reserve(b, n))
            return;
        memmove(b->data + b->len, b->data + off, n);
    } else {
        if (!json_buf_reserve(b, n))
            return;
        if (n)
            memcpy(b->data + b->len, p, n);
    }
    b->len += n;
    b->data[b->len] = '\0';
}

void json_buf_append_char(struct json_buf *b, char c)
{
    if (!json_buf_reserve(b, 1))
        return;
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
}

void json_buf_append_str(struct json_buf *b, const char *s)
{
    json_buf_append(b, s, strlen(s));
}

void json_buf_printf(struct json_buf *b, const char *fmt, ...)
{
    if (!json_buf_reserve(b, 0))
        return;
    va_list ap;
    va_start(ap, fmt);
    size_t room = b->cap - b->len; /* includes the byte for the NUL */
    int n = vsnprintf(b->data + b->len, room, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->data[b->len] = '\0';
        b->oom = true;
        return;
    }
    if ((size_t)n >= room) {
        if (!json_buf_reserve(b, (size_t)n)) {
            b->data[b->len] = '\0';
            return;
        }
        va_start(ap, fmt);
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

bool json_buf_failed(const struct json_buf *b)
{
    return b->oom;
}

char *json_buf_take(struct json_buf *b, size_t *len)
{
    if (b->oom) {
        json_buf_destroy(b);
        return NULL;
    }
    char *d = b->data ? b->data : calloc(1, 1); /* never used: "" */
    if (!d)
        return NULL;
    if (len)
        *len = b->len;
    json_buf_init(b);
    return d;
}

/* ---- Writing ----------------------------------------------------------------------------- */

/* Short escapes for the bytes that have one; 0 elsewhere. */
/* clang-format off */
static const char short_esc[128] = {
    ['\b'] = 'b', ['\f'] = 'f', ['\n'] = 'n', ['\r'] = 'r', ['\t'] = 't',
    ['"'] = '"', ['\\'] = '\\',
};
/* clang-format on */

static const char hexdig[16] = "0123456789abcdef";

/* U+2028 LINE SEPARATOR and U+2029 PARAGRAPH SEPARATOR: E2 80 A8 / E2 80 A9. */
static inline bool is_js_separator(const unsigned char *p)
{
    return p[0] == 0xE2 && p[1] == 0x80 && (p[2] & 0xFE) == 0xA8;
}

void json_append_string(struct json_buf *b, const char *s, size_t len)
{
    /* One reservation covers the common case (nothing to escape) in full. From then on the room
     * left always exceeds the input left by 2 (closing quote and NUL): a run copies as many bytes
     * as it consumes, and before each escape, which may write up to 6 bytes for 1 consumed, the
     * room is topped up to the input left + 8. So the writes below need no further checks. */
    if (len > SIZE_MAX - 8 || !json_buf_reserve(b, len + 2)) {
        b->oom = true;
        return;
    }
    if (!s)
        s = ""; /* NULL with len 0; pointer arithmetic on NULL is undefined */
    const unsigned char *p = (const unsigned char *)s, *e = p + len;
    char *q = b->data + b->len;
    *q++ = '"';
    while (p < e) {
        /* Extend the run over plain bytes and well-formed UTF-8 other than U+2028/U+2029. */
        const unsigned char *run = p;
        size_t n = 0, bad = 0;
        for (;;) {
            p = skip_plain(p, e);
            if (p == e || *p < 0x80)
                break;
            n = utf8_seq(p, e, &bad);
            if (n == 0 || (n == 3 && is_js_separator(p)))
                break;
            p += n;
        }
        memcpy(q, run, (size_t)(p - run));
        q += p - run;
        if (p == e)
            break;
        size_t used = (size_t)(q - b->data);
        if (b->cap - used < (size_t)(e - p) + 8) {
            b->len = used;
            if (!json_buf_reserve(b, (size_t)(e - p) + 8)) {
                b->data[b->len] = '\0';
                return;
            }
            q = b->data + used;
        }
        unsigned c = *p;
        if (c < 0x80) { /* control byte, '"' or '\\' */
            *q++ = '\\';
            if (short_esc[c]) {
                *q++ = short_esc[c];
            } else {
                memcpy(q, "u00", 3);
                q[3] = hexdig[c >> 4];
                q[4] = hexdig[c & 15];
                q += 5;
            }
            p++;
        } else if (n == 3) { /* U+2028 or U+2029 */
            memcpy(q, p[2] == 0xA8 ? "\\u2028" : "\\u2029", 6);
            q += 6;
            p += 3;
        } else { /* ill-formed: one U+FFFD for the maximal subpart */
            memcpy(q, "\xEF\xBF\xBD", 3);
            q += 3;
            p += bad;
        }
    }
    *q++ = '"';
    *q = '\0';
    b->len = (size_t)(q - b->data);
}

size_t json_format_int64(int64_t v, char *dst)
{
    char tmp[JSON_INT64_MAX_CHARS];
    char *q = tmp + sizeof(tmp);
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v; /* INT64_MIN included */
    do {
        *--q = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--q = '-';
    size_t n = (size_t)(tmp + sizeof(tmp) - q);
    memcpy(dst, q, n);
    return n;
}

void json_append_int64(struct json_buf *b, int64_t v)
{
    char tmp[JSON_INT64_MAX_CHARS];
    json_buf_append(b, tmp, json_format_int64(v, tmp));
}

int json_id_from_number(double v, int64_t *out)
{
    if (isnan(v) || isinf(v))
        return -EINVAL;
    if (v > JSON_ID_MAX_EXACT || v < -JSON_ID_MAX_EXACT)
        return -ERANGE;
    int64_t i = (int64_t)v; /* in range, so defined; truncates toward zero */
    if ((double)i != v)
        return -EINVAL;
    *out = i;
    return 0;
}

/* ---- Checking ---------------------------------------------------------------------------- */

bool json_utf8_valid(const char *s, size_t len)
{
    if (len == 0)
        return true; /* also keeps NULL + 0 out of the arithmetic below */
    const unsigned char *p = (const unsigned char *)s, *e = p + len;
    while (p < e) {
        while (e - p >= 8 && !(load64(p) & HIGHS))
            p += 8;
        while (p < e && *p < 0x80)
            p++;
        if (p == e)
            break;
        size_t bad, n = utf8_seq(p, e, &bad);
        if (n == 0)
            return false;
        p += n;
    }
    return true;
}

/* hexval1[c] is 1 + the value of hex digit c, or 0 if c is not one. */
/* clang-format off */
static const unsigned char hexval1[256] = {
    ['0'] = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
    ['A'] = 11, 12, 13, 14, 15, 16,
    ['a'] = 11, 12, 13, 14, 15, 16,
};
/* clang-format on */

/* The value of the four hex digits at p, or -1 if there are not four before e. */
static inline long hex4(const unsigned char *p, const unsigned char *e)
{
    if (e - p < 4)
        return -1;
    long a = hexval1[p[0]], b = hexval1[p[1]], c = hexval1[p[2]], d = hexval1[p[3]];
    if (!a || !b || !c || !d)
        return -1;
    return (a - 1) << 12 | (b - 1) << 8 | (c - 1) << 4 | (d - 1);
}

/* p is just past an opening quote. Returns the position just past the closing quote, or NULL if
 * the string is unterminated or holds a raw control byte, a bad escape, a lone surrogate escape or
 * ill-formed UTF-8. */
static const unsigned char *scan_string(const unsigned char *p, const unsigned char *e)
{
    for (;;) {
        p = skip_plain(p, e);
        if (p == e)
            return NULL;
        unsigned c = *p;
        if (c == '"')
            return p + 1;
        if (c >= 0x80) {
            size_t bad, n = utf8_seq(p, e, &bad);
            if (n == 0)
                return NULL;
            p += n;
            continue;
        }
        if (c != '\\')
            return NULL; /* raw control byte */
        if (++p == e)
            return NULL;
        switch (*p) {
        case '"':
        case '\\':
        case '/':
        case 'b':
        case 'f':
        case 'n':
        case 'r':
        case 't':
            p++;
            break;
        case 'u': {
            long cp = hex4(p + 1, e);
            if (cp < 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
                return NULL; /* bad digits or a lone low surrogate */
            p += 5;
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* a high surrogate needs a low one next */
                if (e - p < 6 || p[0] != '\\' || p[1] != 'u')
                    return NULL;
                long lo = hex4(p + 2, e);
                if (lo < 0xDC00 || lo > 0xDFFF)
                    return NULL;
                p += 6;
            }
            break;
        }
        default:
            return NULL;
        }
    }
}

static inline bool is_digit(unsigned c)
{
    return c - '0' < 10;
}

/* p is at '-' or a digit. Returns the position after the number, or NULL if the grammar
 * -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)? does not match. A digit right after a
 * leading 0 ("01") is left for the caller, which rejects it as unexpected. */
static const unsigned char *scan_number(const unsigned char *p, const unsigned char *e)
{
    if (*p == '-')
        p++;
    if (p == e || !is_digit(*p))
        return NULL;
    if (*p++ != '0')
        while (p < e && is_digit(*p))
            p++;
    if (p < e && *p == '.') {
        p++;
        if (p == e || !is_digit(*p))
            return NULL;
        while (p < e && is_digit(*p))
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p == e || !is_digit(*p))
            return NULL;
        while (p < e && is_digit(*p))
            p++;
    }
    return p;
}

static inline const unsigned char *skip_ws(const unsigned char *p, const unsigned char *e)
{
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* The literal 'lit' (n bytes) is at p. */
static inline bool match(const unsigned char *p, const unsigned char *e, const char *lit, size_t n)
{
    return (size_t)(e - p) >= n && memcmp(p, lit, n) == 0;
}

/* Bit 'depth - 1' of the container stack: the innermost open container is an object. */
static inline bool top_is_obj(const unsigned char *is_obj, unsigned depth)
{
    unsigned d = depth - 1;
    return (is_obj[d / 8] >> (d % 8)) & 1;
}

/* One function on purpose: a three-state machine over the bytes, read top to bottom; split
 * into helpers, its states would have to travel between them. */
bool json_valid(const char *s, size_t len, size_t *start, size_t *end)
{
    if (len == 0)
        return false; /* also keeps NULL + 0 out of the arithmetic below */
    const unsigned char *e = (const unsigned char *)s + len;
    const unsigned char *p = skip_ws((const unsigned char *)s, e);
    const unsigned char *vstart = p;
    /* Open containers, innermost last: bit d is set when level d is an object. */
    unsigned char is_obj[JSON_MAX_DEPTH / 8];
    unsigned depth = 0;

    /* Three states: 'value' expects a value, 'key' expects "name": inside an object, 'after' has
     * just finished a value. Each entry point has whitespace skipped already except 'after'. */
value:
    if (p == e)
        return false;
    switch (*p) {
    case '{':
    case '[':
        if (depth == JSON_MAX_DEPTH)
            return false;
        if (*p == '{')
            is_obj[depth / 8] |= (unsigned char)(1u << (depth % 8));
        else
            is_obj[depth / 8] &= (unsigned char)~(1u << (depth % 8));
        depth++;
        p = skip_ws(p + 1, e);
        if (p < e && *p == (top_is_obj(is_obj, depth) ? '}' : ']')) {
            p++; /* empty container */
            depth--;
            goto after;
        }
        if (top_is_obj(is_obj, depth))
            goto key;
        goto value;
    case '"':
        p = scan_string(p + 1, e);
        break;
    case 't':
        p = match(p, e, "true", 4) ? p + 4 : NULL;
        break;
    case 'f':
        p = match(p, e, "false", 5) ? p + 5 : NULL;
        break;
    case 'n':
        p = match(p, e, "null", 4) ? p + 4 : NULL;
        break;
    case '-':
    case '0':
    case '1':
    case '2':
    case '3':
    case '4':
    case '5':
    case '6':
    case '7':
    case '8':
    case '9':
        p = scan_number(p, e);
        break;
    default:
        return false;
    }
    if (!p)
        return false;
    goto after;

key:
    if (p == e || *p != '"')
        return false;
    p = scan_string(p + 1, e);
    if (!p)
        return false;
    p = skip_ws(p, e);
    if (p == e || *p != ':')
        return false;
    p = skip_ws(p + 1, e);
    goto value;

after:
    if (depth == 0)
        goto done;
    p = skip_ws(p, e);
    if (p == e)
        return false;
    bool in_obj = top_is_obj(is_obj, depth);
    if (*p == ',') {
        p = skip_ws(p + 1, e);
        if (in_obj)
            goto key;
        goto value;
    }
    if (*p != (in_obj ? '}' : ']'))
        return false;
    p++;
    depth--;
    goto after;

done:;
    const unsigned char *vend = p;
    if (skip_ws(p, e) != e)
        return false;
    if (start)
        *start = (size_t)(vstart - (const unsigned char *)s);
    if (end)
        *end = (size_t)(vend - (const unsigned char *)s);
    return true;
}

void json_error_doc(struct json_buf *o, const char *code, const char *message,
                    const char *extra)
{
    json_buf_append_str(o, "{\"error\":{\"code\":\"");
    json_buf_append_str(o, code);
    json_buf_append_str(o, "\",\"message\":");
    json_append_string(o, message, strlen(message));
    if (extra)
        json_buf_append_str(o, extra);
    json_buf_append_str(o, "}}\n");
}
