/* Tests for server/json: the output buffer, string escaping (checked against an independent
 * reference written from the Unicode definitions), UTF-8 checking, the strict validator (tables,
 * depth cap, spans, and cJSON as a cross-check) and number helpers. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/json.h"
#include "tests/support.h"

/* Deterministic PRNG (xorshift64*) so that failures reproduce. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint64_t rng(void)
{
    return test_rng(&rng_state);
}

/* json_append_string() of s[0..n) as a malloc'd string (length in *outlen). */
static char *escaped(const char *s, size_t n, size_t *outlen)
{
    struct json_buf b;
    json_buf_init(&b);
    json_append_string(&b, s, n);
    return json_buf_take(&b, outlen);
}

/* Asserts that escaping s[0..n) gives exactly 'want' (NUL-terminated, quotes included). */
static void check_escape(const char *s, size_t n, const char *want)
{
    size_t len = 0;
    char *got = escaped(s, n, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(got);
    CU_ASSERT_EQUAL(len, strlen(want));
    CU_ASSERT(len == strlen(want) && memcmp(got, want, len) == 0);
    if (len != strlen(want) || memcmp(got, want, len) != 0)
        fprintf(stderr, "\nescape mismatch: got %s want %s\n", got, want);
    free(got);
}

static bool valid_str(const char *s)
{
    return json_valid(s, strlen(s), NULL, NULL);
}

/* ---- Reference UTF-8 model, built from the definition rather than from json.c's tables ---- */

/* prefix_ok[k-1] holds, as a bitmap, every byte string of length k (1-3) that is a proper prefix
 * of the UTF-8 encoding of some Unicode scalar value. */
static unsigned char *prefix_bits[3];

static size_t encode_utf8(uint32_t cp, unsigned char *o)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | cp >> 6);
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | cp >> 12);
        o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | cp >> 18);
    o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

static uint32_t prefix_key(const unsigned char *p, size_t k)
{
    uint32_t v = 0;
    for (size_t i = 0; i < k; i++)
        v = v << 8 | p[i];
    return v;
}

static bool is_prefix(const unsigned char *p, size_t k)
{
    uint32_t v = prefix_key(p, k);
    return prefix_bits[k - 1][v / 8] >> (v % 8) & 1;
}

static int ref_init(void)
{
    for (int k = 0; k < 3; k++) {
        prefix_bits[k] = calloc((size_t)1 << (8 * (k + 1)) >> 3, 1);
        if (!prefix_bits[k])
            return -1;
    }
    for (uint32_t cp = 0x80; cp <= 0x10FFFF; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF)
            continue;
        unsigned char o[4];
        size_t n = encode_utf8(cp, o);
        for (size_t k = 1; k < n; k++) {
            uint32_t v = prefix_key(o, k);
            prefix_bits[k - 1][v / 8] |= (unsigned char)(1u << (v % 8));
        }
    }
    return 0;
}

static int ref_cleanup(void)
{
    for (int k = 0; k < 3; k++) {
        free(prefix_bits[k]);
        prefix_bits[k] = NULL;
    }
    return 0;
}

/* At p (a byte >= 0x80, n bytes available): length of a complete scalar value's encoding, or 0
 * with *bad = the maximal subpart: the longest proper prefix of a valid encoding, at least 1. */
static size_t ref_char(const unsigned char *p, size_t n, size_t *bad, uint32_t *cpo)
{
    for (size_t L = 2; L <= 4 && L <= n; L++) {
        uint32_t cp = L == 2 ? p[0] & 0x1Fu : L == 3 ? p[0] & 0x0Fu : p[0] & 0x07u;
        for (size_t i = 1; i < L; i++)
            cp = cp << 6 | (p[i] & 0x3Fu);
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            continue;
        unsigned char o[4];
        if (encode_utf8(cp, o) == L && memcmp(o, p, L) == 0) {
            *cpo = cp;
            return L;
        }
    }
    size_t k = 1;
    while (k < 3 && k + 1 <= n && is_prefix(p, k + 1))
        k++;
    if (!is_prefix(p, k))
        k = 1;
    *bad = k;
    return 0;
}

/* A plain, byte-at-a-time escaper following the json.h contract. */
static void ref_escape(struct json_buf *b, const unsigned char *p, size_t n)
{
    json_buf_append_char(b, '"');
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c == '"' || c == '\\') {
            json_buf_printf(b, "\\%c", c);
            i++;
        } else if (c < 0x20) {
            const char *s = c == '\b'   ? "\\b"
                            : c == '\f' ? "\\f"
                            : c == '\n' ? "\\n"
                            : c == '\r' ? "\\r"
                            : c == '\t' ? "\\t"
                                        : NULL;
            if (s)
                json_buf_append_str(b, s);
            else
                json_buf_printf(b, "\\u%04x", c);
            i++;
        } else if (c < 0x80) {
            json_buf_append_char(b, (char)c);
            i++;
        } else {
            size_t bad = 0;
            uint32_t cp = 0;
            size_t L = ref_char(p + i, n - i, &bad, &cp);
            if (L == 0) {
                json_buf_append_str(b, "\xEF\xBF\xBD");
                i += bad;
            } else if (cp == 0x2028 || cp == 0x2029) {
                json_buf_printf(b, "\\u%04x", (unsigned)cp);
                i += L;
            } else {
                json_buf_append(b, p + i, L);
                i += L;
            }
        }
    }
    json_buf_append_char(b, '"');
}

static bool ref_utf8_valid(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n;) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t bad;
        uint32_t cp;
        size_t L = ref_char(p + i, n - i, &bad, &cp);
        if (!L)
            return false;
        i += L;
    }
    return true;
}

/* Random bytes biased towards the interesting ones: ASCII, escapes, UTF-8 leads and tails. */
static void random_bytes(unsigned char *p, size_t n)
{
    static const unsigned char pick[] = {'a',  'Z',  ' ',  '"',  '\\', '/',  '\n', 0x00, 0x1F, 0x7F,
                                         0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xA8, 0xBF, 0xC0, 0xC2, 0xDF,
                                         0xE0, 0xE2, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF};
    for (size_t i = 0; i < n; i++) {
        uint64_t r = rng();
        if (r % 4 == 0)
            p[i] = (unsigned char)(r >> 8);
        else if (r % 4 == 1)
            p[i] = pick[(r >> 8) % sizeof(pick)];
        else
            p[i] = (unsigned char)('a' + (r >> 8) % 26);
    }
}

/* Random valid UTF-8 text: ASCII runs with every kind of scalar value mixed in. */
static size_t random_utf8(unsigned char *p, size_t cap)
{
    size_t n = 0;
    while (n + 4 <= cap) {
        uint64_t r = rng();
        uint32_t cp;
        switch (r % 6) {
        case 0:
            cp = (uint32_t)(r >> 8) % 0x80;
            break;
        case 1:
            cp = 0x80 + (uint32_t)(r >> 8) % 0x780;
            break;
        case 2:
            cp = 0x800 + (uint32_t)(r >> 8) % 0xF800;
            if (cp >= 0xD800 && cp <= 0xDFFF)
                cp = 0x2028 + (cp & 1);
            break;
        case 3:
            cp = 0x10000 + (uint32_t)(r >> 8) % 0x100000;
            break;
        default:
            cp = 'a' + (uint32_t)(r >> 8) % 26;
            break;
        }
        n += encode_utf8(cp, p + n);
    }
    return n;
}

/* ---- json_buf ---------------------------------------------------------------------------- */

static void test_json_buf_appends(void)
{
    struct json_buf b;
    json_buf_init(&b);
    CU_ASSERT_PTR_NULL(b.data);
    CU_ASSERT_EQUAL(b.len, 0);
    CU_ASSERT_FALSE(json_buf_failed(&b));
    json_buf_append(&b, NULL, 0);
    json_buf_append(&b, "ab", 2);
    json_buf_append_char(&b, 'c');
    json_buf_append_str(&b, "de");
    json_buf_printf(&b, "[%d,%s]", 42, "x");
    json_append_int64(&b, -7);
    CU_ASSERT_EQUAL(b.len, strlen("abcde[42,x]-7"));
    CU_ASSERT_STRING_EQUAL(b.data, "abcde[42,x]-7");
    CU_ASSERT(b.cap > b.len);
    CU_ASSERT_FALSE(json_buf_failed(&b));
    json_buf_destroy(&b);
    CU_ASSERT_PTR_NULL(b.data);
    json_buf_destroy(&b); /* twice is fine */
}

/* Appending a part of the buffer to itself works even when that makes the block move. */
static void test_json_buf_self_append(void)
{
    struct json_buf b;
    json_buf_init(&b);
    json_buf_append_str(&b, "0123456789");
    for (int i = 0; i < 12; i++) /* doubles every time: 40 KB, several reallocations */
        json_buf_append(&b, b.data, b.len);
    CU_ASSERT_EQUAL(b.len, 10u << 12);
    bool ok = true;
    for (size_t i = 0; i < b.len; i++)
        ok &= b.data[i] == (char)('0' + i % 10);
    CU_ASSERT(ok);
    json_buf_append(&b, b.data + 3, 4);
    CU_ASSERT_EQUAL(memcmp(b.data + b.len - 4, "3456", 4), 0);
    CU_ASSERT_EQUAL(b.data[b.len], '\0');
    json_buf_destroy(&b);
}

static void test_json_buf_grows(void)
{
    struct json_buf b;
    json_buf_init(&b);
    for (int i = 0; i < 100000; i++)
        json_buf_append_char(&b, (char)('a' + i % 26));
    CU_ASSERT_EQUAL(b.len, 100000);
    bool ok = true;
    for (int i = 0; i < 100000; i++)
        ok &= b.data[i] == (char)('a' + i % 26);
    CU_ASSERT(ok);
    CU_ASSERT_EQUAL(b.data[b.len], '\0');
    /* printf larger than the room left, which takes the second vsnprintf */
    char big[5000];
    memset(big, 'q', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    json_buf_clear(&b);
    CU_ASSERT_EQUAL(b.len, 0);
    CU_ASSERT_STRING_EQUAL(b.data, "");
    size_t cap = b.cap;
    json_buf_printf(&b, "<%s>", big);
    CU_ASSERT_EQUAL(b.len, sizeof(big) + 1);
    CU_ASSERT_EQUAL(b.data[0], '<');
    CU_ASSERT_EQUAL(b.data[b.len - 1], '>');
    CU_ASSERT_EQUAL(b.data[b.len], '\0');
    CU_ASSERT_EQUAL(b.cap, cap); /* 100,000 bytes were already there */
    /* a fresh buffer whose first printf does not fit the first block */
    struct json_buf c;
    json_buf_init(&c);
    json_buf_printf(&c, "%s%s", big, big);
    CU_ASSERT_EQUAL(c.len, 2 * (sizeof(big) - 1));
    CU_ASSERT_EQUAL(strlen(c.data), c.len);
    json_buf_destroy(&c);
    /* reserve makes later appends allocation-free */
    CU_ASSERT_TRUE(json_buf_reserve(&b, 1 << 20));
    char *before = b.data;
    for (int i = 0; i < (1 << 20); i++)
        json_buf_append_char(&b, 'z');
    CU_ASSERT_PTR_EQUAL(b.data, before);
    json_buf_destroy(&b);
}

static void test_json_buf_take(void)
{
    struct json_buf b;
    json_buf_init(&b);
    json_buf_append_str(&b, "{\"a\":1}");
    size_t len = 0;
    char *s = json_buf_take(&b, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_EQUAL(len, 7);
    CU_ASSERT_STRING_EQUAL(s, "{\"a\":1}");
    CU_ASSERT_PTR_NULL(b.data);
    CU_ASSERT_EQUAL(b.len, 0);
    CU_ASSERT_EQUAL(b.cap, 0);
    free(s);
    /* an empty buffer still gives a malloc'd "" */
    len = 99;
    s = json_buf_take(&b, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_EQUAL(len, 0);
    CU_ASSERT_STRING_EQUAL(s, "");
    free(s);
    /* the length is optional; the buffer is reusable after take */
    json_buf_append_char(&b, 'x');
    s = json_buf_take(&b, NULL);
    CU_ASSERT_STRING_EQUAL(s, "x");
    free(s);
}

static void test_json_buf_oom_is_sticky(void)
{
    struct json_buf b;
    json_buf_init(&b);
    json_buf_append_str(&b, "abc");
    CU_ASSERT_FALSE(json_buf_reserve(&b, SIZE_MAX)); /* overflows: same path as ENOMEM */
    CU_ASSERT_TRUE(json_buf_failed(&b));
    json_buf_append_str(&b, "def");
    json_buf_append_char(&b, 'g');
    json_buf_printf(&b, "%d", 1);
    json_append_string(&b, "h", 1);
    json_append_int64(&b, 5);
    CU_ASSERT_EQUAL(b.len, 3); /* nothing more was written */
    CU_ASSERT_STRING_EQUAL(b.data, "abc");
    CU_ASSERT_FALSE(json_buf_reserve(&b, 1));
    CU_ASSERT_PTR_NULL(json_buf_take(&b, NULL)); /* frees the block (ASan checks) */
    CU_ASSERT_FALSE(json_buf_failed(&b));
    CU_ASSERT_PTR_NULL(b.data);
    /* overflow inside the string escaper, and clear() resets the flag */
    json_append_string(&b, "x", SIZE_MAX);
    CU_ASSERT_TRUE(json_buf_failed(&b));
    json_buf_clear(&b);
    CU_ASSERT_FALSE(json_buf_failed(&b));
    json_buf_append(&b, "ok", 2);
    CU_ASSERT_STRING_EQUAL(b.data, "ok");
    CU_ASSERT_FALSE(json_buf_reserve(&b, SIZE_MAX - 2));
    json_buf_destroy(&b);
}

/* ---- json_append_string ------------------------------------------------------------------ */

static void test_json_escape_control_bytes(void)
{
    for (unsigned c = 0; c < 0x20; c++) {
        char in[3] = {'a', (char)c, 'b'};
        char want[16];
        switch (c) {
        case '\b':
            strcpy(want, "\"a\\bb\"");
            break;
        case '\f':
            strcpy(want, "\"a\\fb\"");
            break;
        case '\n':
            strcpy(want, "\"a\\nb\"");
            break;
        case '\r':
            strcpy(want, "\"a\\rb\"");
            break;
        case '\t':
            strcpy(want, "\"a\\tb\"");
            break;
        default:
            snprintf(want, sizeof(want), "\"a\\u%04xb\"", c);
        }
        check_escape(in, 3, want);
    }
    check_escape("\x1f", 1, "\"\\u001f\"");
    check_escape("\x00\x00", 2, "\"\\u0000\\u0000\"");
}

static void test_json_escape_ascii(void)
{
    check_escape("", 0, "\"\"");
    check_escape("\"", 1, "\"\\\"\"");
    check_escape("\\", 1, "\"\\\\\"");
    check_escape("a\"b\\c", 5, "\"a\\\"b\\\\c\"");
    check_escape("</script>", 9, "\"</script>\""); /* '/' stays */
    check_escape("\x7f", 1, "\"\x7f\"");           /* DEL is not a JSON control */
    /* every printable byte but '"' and '\\' is copied as is */
    char in[96], want[100];
    size_t n = 0;
    for (int c = 0x20; c < 0x80; c++)
        if (c != '"' && c != '\\')
            in[n++] = (char)c;
    want[0] = '"';
    memcpy(want + 1, in, n);
    want[n + 1] = '"';
    want[n + 2] = '\0';
    check_escape(in, n, want);
    /* a run longer than a word with the special byte at every offset */
    for (size_t at = 0; at < 20; at++) {
        char s[20], w[32];
        memset(s, 'x', sizeof(s));
        s[at] = '"';
        memset(w, 'x', sizeof(w));
        w[0] = '"';
        w[1 + at] = '\\';
        w[2 + at] = '"';
        w[22] = '"';
        w[23] = '\0';
        check_escape(s, sizeof(s), w);
    }
}

static void test_json_escape_non_ascii_passthrough(void)
{
    /* clang-format off */
    const char *ok[] = {
        "\xC3\xBC",                         /* ü */
        "\xE2\x82\xAC",                     /* € */
        "\xF0\x9F\x98\x80",                 /* 😀 */
        "\xC2\x80", "\xDF\xBF",             /* U+0080, U+07FF */
        "\xE0\xA0\x80", "\xED\x9F\xBF",     /* U+0800, U+D7FF */
        "\xEE\x80\x80", "\xEF\xBF\xBF",     /* U+E000, U+FFFF */
        "\xF0\x90\x80\x80",                 /* U+10000 */
        "\xF4\x8F\xBF\xBF",                 /* U+10FFFF */
        "\xE2\x80\xA7", "\xE2\x80\xAA",     /* U+2027, U+202A: neighbours of the separators */
        ("Gr\xC3\xBC\xC3\x9F" "e, \xE4\xB8\x96\xE7\x95\x8C!"), /* mixed */
    };
    /* clang-format on */
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        char want[64];
        snprintf(want, sizeof(want), "\"%s\"", ok[i]);
        check_escape(ok[i], strlen(ok[i]), want);
    }
}

static void test_json_escape_js_separators(void)
{
    check_escape("\xE2\x80\xA8", 3, "\"\\u2028\"");
    check_escape("a\xE2\x80\xA9z", 5, "\"a\\u2029z\"");
    check_escape("\xE2\x80", 2, "\"\xEF\xBF\xBD\""); /* truncated: one U+FFFD */
}

static void test_json_escape_invalid_utf8(void)
{
#define R "\xEF\xBF\xBD" /* U+FFFD */
    /* clang-format off */
    static const struct {
        const char *in;
        const char *want; /* without the quotes */
    } cases[] = {
        {"\x80", R},                        /* lone continuation */
        {"\xBF\xBF", R R},                  /* two */
        {"\xC0\x80", R R},                  /* overlong NUL: C0 is never a lead */
        {"\xC1\xBF", R R},                  /* overlong */
        {"\xE0\x80\x80", R R R},            /* overlong 3-byte */
        {"\xE0\x9F\xBF", R R R},            /* overlong 3-byte, top */
        {"\xF0\x80\x80\x80", R R R R},      /* overlong 4-byte */
        {"\xF0\x8F\xBF\xBF", R R R R},      /* overlong 4-byte, top */
        {"\xED\xA0\x80", R R R},            /* surrogate D800 */
        {"\xED\xBF\xBF", R R R},            /* surrogate DFFF */
        {"\xF4\x90\x80\x80", R R R R},      /* U+110000 */
        {"\xF5\x80\x80\x80", R R R R},      /* F5 lead */
        {"\xFE", R},
        {"\xFF", R},
        {"\xC3", R},                        /* truncated at the end */
        {"\xE2\x82", R},                    /* one U+FFFD for a maximal subpart */
        {"\xF0\x9F\x98", R},
        {"\xE2\x82" "A", R "A"},
        {"\xF0\x9F\x98" "A", R "A"},
        {"\xF0\x9F" "\xF0\x9F\x98\x80", R "\xF0\x9F\x98\x80"},
        {"a\xC3", "a" R},
        {"\xC3\xA9\xC3", "\xC3\xA9" R},
        {"\xC3\"", R "\\\""},
        {"\xE2\n", R "\\n"},
        {"\xC3\xC3\xA9", R "\xC3\xA9"},
        {"abcdefgh\x80ijklmnop", "abcdefgh" R "ijklmnop"},
    };
    /* clang-format on */
#undef R
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char want[64];
        snprintf(want, sizeof(want), "\"%s\"", cases[i].want);
        check_escape(cases[i].in, strlen(cases[i].in), want);
    }
}

/* The fast escaper equals the byte-at-a-time reference on random input of every length and
 * alignment; its output is always valid UTF-8 and valid JSON. */
static void test_json_escape_matches_reference(void)
{
    unsigned char in[300];
    struct json_buf fast, ref;
    json_buf_init(&fast);
    json_buf_init(&ref);
    int mismatches = 0, invalid = 0;
    for (int round = 0; round < 20000; round++) {
        size_t n = (size_t)(rng() % sizeof(in));
        size_t off = (size_t)(rng() % 8);
        if (n + off > sizeof(in))
            n = sizeof(in) - off;
        random_bytes(in + off, n);
        json_buf_clear(&fast);
        json_buf_clear(&ref);
        json_append_string(&fast, (const char *)in + off, n);
        ref_escape(&ref, in + off, n);
        if (fast.len != ref.len || memcmp(fast.data, ref.data, ref.len) != 0)
            mismatches++;
        if (!json_utf8_valid(fast.data, fast.len) || !json_valid(fast.data, fast.len, NULL, NULL))
            invalid++;
    }
    CU_ASSERT_EQUAL(mismatches, 0);
    CU_ASSERT_EQUAL(invalid, 0);
    CU_ASSERT_FALSE(json_buf_failed(&fast));
    json_buf_destroy(&fast);
    json_buf_destroy(&ref);
}

/* Valid UTF-8 without NUL round-trips exactly through cJSON's parser. */
static void test_json_escape_roundtrips_through_cjson(void)
{
    unsigned char in[1024];
    int bad = 0;
    for (int round = 0; round < 2000; round++) {
        size_t n = random_utf8(in, (size_t)(rng() % sizeof(in)));
        for (size_t i = 0; i < n; i++)
            if (in[i] == 0)
                in[i] = 0x01;
        size_t len;
        char *s = escaped((const char *)in, n, &len);
        cJSON *j = cJSON_ParseWithLength(s, len);
        if (!j || !cJSON_IsString(j) || strlen(j->valuestring) != n ||
            memcmp(j->valuestring, in, n) != 0)
            bad++;
        cJSON_Delete(j);
        free(s);
    }
    CU_ASSERT_EQUAL(bad, 0);
}

/* ---- json_utf8_valid --------------------------------------------------------------------- */

static void test_json_utf8_valid_table(void)
{
    /* clang-format off */
    static const char *good[] = {
        "", "plain ascii", "\xC3\xBC", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xC2\x80",
        "\xDF\xBF", "\xE0\xA0\x80", "\xED\x9F\xBF", "\xEE\x80\x80", "\xEF\xBF\xBF",
        "\xF0\x90\x80\x80", "\xF4\x8F\xBF\xBF", "abcdefgh\xC3\xBCijklmnop\xF0\x9F\x98\x80",
    };
    /* clang-format on */
    /* clang-format off */
    static const char *bad[] = {
        "\x80", "\xBF", "\xC0\x80", "\xC1\xBF", "\xC2", "\xC2\x41", "\xE0\x80\x80", "\xE0\x9F\xBF",
        "\xE0\xA0", "\xED\xA0\x80", "\xED\xBF\xBF", "\xF0\x80\x80\x80", "\xF0\x8F\xBF\xBF",
        "\xF0\x90\x80", "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xF8\x88\x80\x80\x80", "\xFE",
        "\xFF", "abcdefgh\x80", "abcdefghijklmno\xC3",
    };
    /* clang-format on */
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        CU_ASSERT_TRUE(json_utf8_valid(good[i], strlen(good[i])));
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CU_ASSERT_FALSE(json_utf8_valid(bad[i], strlen(bad[i])));
    CU_ASSERT_TRUE(json_utf8_valid("a\0b", 3)); /* U+0000 is a scalar value */
    CU_ASSERT_TRUE(json_utf8_valid(NULL, 0));
}

/* Every 1- to 4-byte sequence starting with a non-ASCII byte agrees with the reference for
 * 1-2 bytes exhaustively, and on random longer ones. */
static void test_json_utf8_valid_matches_reference(void)
{
    int mismatches = 0;
    unsigned char s[4];
    for (unsigned a = 0; a < 256; a++) {
        s[0] = (unsigned char)a;
        mismatches += json_utf8_valid((const char *)s, 1) != ref_utf8_valid(s, 1);
        for (unsigned b = 0; b < 256; b++) {
            s[1] = (unsigned char)b;
            mismatches += json_utf8_valid((const char *)s, 2) != ref_utf8_valid(s, 2);
        }
    }
    /* all 3-byte sequences with a lead E0-EF or F0-F4 */
    for (unsigned a = 0xE0; a <= 0xF4; a++)
        for (unsigned b = 0x70; b < 0xD0; b++)
            for (unsigned c = 0x70; c < 0xD0; c++) {
                s[0] = (unsigned char)a;
                s[1] = (unsigned char)b;
                s[2] = (unsigned char)c;
                mismatches += json_utf8_valid((const char *)s, 3) != ref_utf8_valid(s, 3);
            }
    unsigned char buf[64];
    for (int round = 0; round < 50000; round++) {
        size_t n = (size_t)(rng() % sizeof(buf));
        if (round % 2)
            random_bytes(buf, n);
        else
            n = random_utf8(buf, n);
        mismatches += json_utf8_valid((const char *)buf, n) != ref_utf8_valid(buf, n);
    }
    CU_ASSERT_EQUAL(mismatches, 0);
}

/* ---- json_valid -------------------------------------------------------------------------- */

/* clang-format off */
static const char *valid_docs[] = {
    "0", "-0", "1", "-1", "123", "1e5", "1E5", "1e+5", "1e-5", "1.5E-3", "-0.0", "0.5",
    "1.25e10", "-12.5e+007", "0e0", "1e00", "123456789012345678901234567890",
    "1e999", "-1e-999",
    "true", "false", "null",
    "\"\"", "\"abc\"", "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\u0000\"", "\"\\u00e9\\u00E9\"",
    "\"\\ud83d\\ude00\"", "\"\\uD83D\\uDE00\"", "\"\\uDBFF\\uDFFF\"", "\"\\uFFFF\"",
    "\"\\uE000\"", "\"\\uD7FF\"", "\"\xC3\xBC\xE2\x82\xAC\xF0\x9F\x98\x80\"", "\"\x7f\"",
    "\"/\"", "\"'\"",
    "[]", "{}", "[ ]", "{ }", "[1]", "[1,2,3]", "[[]]", "[[],[]]", "[{}]", "{\"a\":1}",
    "{\"a\":{\"b\":[1,{\"c\":null}]}}", "{\"\":0}", "{\"a\":1,\"a\":2}",
    " \t\r\n[ 1 , { \"k\" : \"v\" } , true ]\n", "[\"a\",\"b\"]",
    "{\"x\":[1,2,{\"y\":\"\\u2028\"}],\"z\":-1.0e-1}",
};
/* clang-format on */

/* clang-format off */
static const char *invalid_docs[] = {
    "", " ", "\n\t ", "01", "-01", "00", "+1", ".5", "1.", "1.e5", "1e", "1e+", "1E-", "-",
    "--1", "0x10", "1.5.5", "NaN", "Infinity", "-Infinity", "1 2", "1,2", "[] []", "{}{}",
    "tru", "truex", "True", "nul", "nulll", "fals", "\"", "\"abc", "\"abc\\\"", "\"\\x41\"",
    "\"\\u12\"", "\"\\u12G4\"", "\"\\U0041\"", "\"\\'\"", "\"\\a\"", "\"\\\"",
    "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\\ud800x\"", "\"\\ud800\\ud800\"",
    "\"\\udfff\\ud800\"", "\"\\ud83d\\\"", "\"\\ud83d\\u\"",
    "\"a\nb\"", "\"a\tb\"", "\"\x01\"", "\"\x1f\"",
    "\"\x80\"", "\"\xC0\x80\"", "\"\xED\xA0\x80\"", "\"\xF4\x90\x80\x80\"", "\"\xC3\"",
    "[", "]", "[1", "[1,", "[1,]", "[,1]", "[1 2]", "[1:2]", "{", "}", "{\"a\"}", "{\"a\":}",
    "{\"a\":1,}", "{,}", "{\"a\" 1}", "{a:1}", "{1:1}", "{\"a\":1 \"b\":2}", "{'a':1}",
    "[1]]", "[1]}", "{\"a\":1]", "[}", "{]", "/* c */1", "1 // c", ("\xEF\xBB\xBF" "1"),
    "'a'", "[01]", "[-]", "{\"a\":01}", "[1e]", "[\x0c]",
    "\"abc\" x", "nullnull",
};
/* clang-format on */

static void test_json_valid_accepts(void)
{
    for (size_t i = 0; i < sizeof(valid_docs) / sizeof(valid_docs[0]); i++) {
        bool ok = valid_str(valid_docs[i]);
        CU_ASSERT_TRUE(ok);
        if (!ok)
            fprintf(stderr, "\nrejected valid: %s\n", valid_docs[i]);
    }
}

static void test_json_valid_rejects(void)
{
    for (size_t i = 0; i < sizeof(invalid_docs) / sizeof(invalid_docs[0]); i++) {
        bool ok = valid_str(invalid_docs[i]);
        CU_ASSERT_FALSE(ok);
        if (ok)
            fprintf(stderr, "\naccepted invalid: %s\n", invalid_docs[i]);
    }
    /* explicit lengths: embedded NUL, and a prefix of a valid document */
    CU_ASSERT_FALSE(json_valid("1\0", 2, NULL, NULL));
    CU_ASSERT_FALSE(json_valid("\"a\0b\"", 5, NULL, NULL));
    CU_ASSERT_FALSE(json_valid("[1,2]", 4, NULL, NULL));
    CU_ASSERT_FALSE(json_valid("true", 3, NULL, NULL));
    CU_ASSERT_FALSE(json_valid("\"\\u00e9\"", 6, NULL, NULL));
    CU_ASSERT_TRUE(json_valid("12345", 3, NULL, NULL)); /* "123" */
    CU_ASSERT_FALSE(json_valid(NULL, 0, NULL, NULL));
}

/* Every string the escaper writes is valid; every prefix of a valid document shorter than it
 * (for documents that are not numbers) is not. */
static void test_json_valid_prefixes_rejected(void)
{
    int wrong = 0;
    for (size_t i = 0; i < sizeof(valid_docs) / sizeof(valid_docs[0]); i++) {
        const char *d = valid_docs[i];
        size_t start, end;
        if (!json_valid(d, strlen(d), &start, &end))
            continue;
        char c = d[start];
        if (c == '-' || (c >= '0' && c <= '9'))
            continue;
        for (size_t n = 0; n < end; n++)
            wrong += json_valid(d, n, NULL, NULL);
    }
    CU_ASSERT_EQUAL(wrong, 0);
}

static void test_json_valid_spans(void)
{
    size_t start = 99, end = 99;
    CU_ASSERT_TRUE(json_valid("  {\"a\":1}\n\t", 11, &start, &end));
    CU_ASSERT_EQUAL(start, 2);
    CU_ASSERT_EQUAL(end, 9);
    CU_ASSERT_TRUE(json_valid("7", 1, &start, &end));
    CU_ASSERT_EQUAL(start, 0);
    CU_ASSERT_EQUAL(end, 1);
    CU_ASSERT_TRUE(json_valid("\r\n -12.5e3 \r\n", 13, &start, &end));
    CU_ASSERT_EQUAL(start, 3);
    CU_ASSERT_EQUAL(end, 10);
    CU_ASSERT_TRUE(json_valid(" \"x\" ", 5, &start, NULL));
    CU_ASSERT_EQUAL(start, 1);
    CU_ASSERT_TRUE(json_valid("[ ] ", 4, NULL, &end));
    CU_ASSERT_EQUAL(end, 3);
    /* untouched on failure */
    start = end = 77;
    CU_ASSERT_FALSE(json_valid("  [1,]  ", 8, &start, &end));
    CU_ASSERT_EQUAL(start, 77);
    CU_ASSERT_EQUAL(end, 77);
    /* a spliced span is itself valid with nothing around it */
    const char *d = "\n {\"k\": [true, null]}  ";
    CU_ASSERT_TRUE_FATAL(json_valid(d, strlen(d), &start, &end));
    CU_ASSERT_TRUE(json_valid(d + start, end - start, NULL, NULL));
    CU_ASSERT_EQUAL(d[start], '{');
    CU_ASSERT_EQUAL(d[end - 1], '}');
}

/* 'depth' nested containers around 'inner', alternating arrays and objects if 'mixed'. */
static char *nested(size_t depth, bool mixed, const char *inner, size_t *len)
{
    size_t in = strlen(inner);
    char *s = malloc(depth * 6 + in + 1);
    if (!s)
        return NULL;
    char *q = s;
    for (size_t i = 0; i < depth; i++) {
        if (mixed && i % 2) {
            memcpy(q, "{\"k\":", 5);
            q += 5;
        } else {
            *q++ = '[';
        }
    }
    memcpy(q, inner, in);
    q += in;
    for (size_t i = depth; i-- > 0;)
        *q++ = mixed && i % 2 ? '}' : ']';
    *q = '\0';
    *len = (size_t)(q - s);
    return s;
}

static void test_json_valid_depth_cap(void)
{
    size_t len;
    char *s = nested(JSON_MAX_DEPTH, false, "1", &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_TRUE(json_valid(s, len, NULL, NULL));
    free(s);
    s = nested(JSON_MAX_DEPTH, true, "{}", &len); /* 513 levels: one too many */
    CU_ASSERT_FALSE(json_valid(s, len, NULL, NULL));
    free(s);
    s = nested(JSON_MAX_DEPTH - 1, true, "[]", &len);
    CU_ASSERT_TRUE(json_valid(s, len, NULL, NULL));
    free(s);
    s = nested(JSON_MAX_DEPTH + 1, false, "", &len);
    CU_ASSERT_FALSE(json_valid(s, len, NULL, NULL));
    free(s);
    s = nested(JSON_MAX_DEPTH, true, "\"deep\"", &len);
    CU_ASSERT_TRUE(json_valid(s, len, NULL, NULL));
    free(s);
    /* the stack bits are reused correctly after popping: deep, back to 0, deep again */
    char *a = nested(JSON_MAX_DEPTH, true, "0", &len);
    size_t alen = len;
    char *two = malloc(2 * alen + 4);
    CU_ASSERT_PTR_NOT_NULL_FATAL(two);
    two[0] = '[';
    memcpy(two + 1, a + 1, alen - 2); /* drop the outer [ ] of a to keep the depth at the cap */
    two[alen - 1] = ',';
    memcpy(two + alen, a + 1, alen - 2);
    two[2 * alen - 2] = ']';
    CU_ASSERT_TRUE(json_valid(two, 2 * alen - 1, NULL, NULL));
    free(two);
    free(a);
}

static void test_json_valid_huge_nesting_is_safe(void)
{
    size_t n = 100000;
    char *s = malloc(2 * n);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    memset(s, '[', n);
    CU_ASSERT_FALSE(json_valid(s, n, NULL, NULL));
    memset(s + n, ']', n);
    CU_ASSERT_FALSE(json_valid(s, 2 * n, NULL, NULL));
    memset(s, '{', n);
    CU_ASSERT_FALSE(json_valid(s, n, NULL, NULL));
    free(s);
}

/* json_valid() accepts only what cJSON (more lenient: leading zeros aside, it skips UTF-8 and
 * surrogate checks) also parses, over many random mutations of valid documents; and it accepts
 * every document json_append_string()/json_append_int64() can produce inside a container. */
static void test_json_valid_agrees_with_cjson(void)
{
    char buf[256];
    int false_accepts = 0, rejected_own = 0, accepted = 0;
    for (int round = 0; round < 30000; round++) {
        const char *d = valid_docs[rng() % (sizeof(valid_docs) / sizeof(valid_docs[0]))];
        size_t n = strlen(d);
        memcpy(buf, d, n);
        int edits = 1 + (int)(rng() % 3);
        for (int k = 0; k < edits; k++) {
            static const char alpha[] = "[]{},:\"\\01-+.eE tfnu \xC3\xBC\x80";
            size_t at = n ? (size_t)(rng() % (n + 1)) : 0;
            char c = alpha[rng() % (sizeof(alpha) - 1)];
            switch (rng() % 3) {
            case 0: /* insert */
                if (n + 1 < sizeof(buf)) {
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = c;
                    n++;
                }
                break;
            case 1: /* delete */
                if (at < n) {
                    memmove(buf + at, buf + at + 1, n - at - 1);
                    n--;
                }
                break;
            default: /* replace */
                if (at < n)
                    buf[at] = c;
                break;
            }
        }
        buf[n] = '\0';
        if (json_valid(buf, n, NULL, NULL)) {
            accepted++;
            cJSON *j = cJSON_ParseWithLengthOpts(buf, n + 1, NULL, true);
            if (!j) {
                false_accepts++;
                fprintf(stderr, "\njson_valid accepted what cJSON rejects: %s\n", buf);
            }
            cJSON_Delete(j);
        }
    }
    CU_ASSERT_EQUAL(false_accepts, 0);
    CU_ASSERT(accepted > 1000); /* the mutation produced a fair share of valid documents */

    struct json_buf b;
    json_buf_init(&b);
    unsigned char in[200];
    for (int round = 0; round < 5000; round++) {
        size_t n = (size_t)(rng() % sizeof(in));
        random_bytes(in, n);
        json_buf_clear(&b);
        json_buf_append_str(&b, "{\"id\":");
        json_append_int64(&b, (int64_t)rng());
        json_buf_append_str(&b, ",\"s\":[");
        json_append_string(&b, (const char *)in, n);
        json_buf_append_str(&b, "]}");
        rejected_own += !json_valid(b.data, b.len, NULL, NULL);
    }
    CU_ASSERT_EQUAL(rejected_own, 0);
    json_buf_destroy(&b);
}

/* ---- numbers ----------------------------------------------------------------------------- */

static void test_json_int64_format(void)
{
    /* clang-format off */
    static const int64_t vals[] = {0, 1, -1, 7, 9, 10, -10, 99, 100, 12345, -98765,
                                   999999999, 1000000000, 9007199254740992LL,
                                   -9007199254740992LL, INT64_MAX, INT64_MIN, INT64_MIN + 1};
    /* clang-format on */
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        char want[32], got[JSON_INT64_MAX_CHARS + 1];
        snprintf(want, sizeof(want), "%lld", (long long)vals[i]);
        size_t n = json_format_int64(vals[i], got);
        CU_ASSERT_EQUAL(n, strlen(want));
        got[n] = '\0';
        CU_ASSERT_STRING_EQUAL(got, want);
    }
    int wrong = 0;
    for (int round = 0; round < 10000; round++) {
        int64_t v = (int64_t)rng() >> (rng() % 64);
        char want[32], got[JSON_INT64_MAX_CHARS + 1];
        snprintf(want, sizeof(want), "%lld", (long long)v);
        got[json_format_int64(v, got)] = '\0';
        wrong += strcmp(got, want) != 0;
    }
    CU_ASSERT_EQUAL(wrong, 0);
    struct json_buf b;
    json_buf_init(&b);
    json_append_int64(&b, INT64_MIN);
    json_buf_append_char(&b, ',');
    json_append_int64(&b, 0);
    CU_ASSERT_STRING_EQUAL(b.data, "-9223372036854775808,0");
    json_buf_destroy(&b);
}

static void test_json_id_from_number(void)
{
    const double two53 = 9007199254740992.0;
    static const struct {
        double v;
        int rc;
        int64_t want;
    } cases[] = {
        {0.0, 0, 0},
        {7.0, 0, 7},
        {-7.0, 0, -7},
        {1e15, 0, 1000000000000000LL},
        {9007199254740991.0, 0, 9007199254740991LL},
        {-9007199254740991.0, 0, -9007199254740991LL},
        {9007199254740992.0, -ERANGE, 0}, /* 2^53: 2^53 + 1 rounds to it, so it is ambiguous */
        {-9007199254740992.0, -ERANGE, 0},
        {9007199254740994.0, -ERANGE, 0}, /* 2^53 + 2 */
        {-9007199254740994.0, -ERANGE, 0},
        {1e300, -ERANGE, 0},
        {1.5, -EINVAL, 0},
        {-1.5, -EINVAL, 0},
        {0.1, -EINVAL, 0},
        {4503599627370495.5, -EINVAL, 0}, /* 2^52 - 0.5 */
        {1e-300, -EINVAL, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int64_t out = 12345;
        int rc = json_id_from_number(cases[i].v, &out);
        CU_ASSERT_EQUAL(rc, cases[i].rc);
        CU_ASSERT_EQUAL(out, rc == 0 ? cases[i].want : 12345); /* untouched on error */
    }
    int64_t out = 12345;
    CU_ASSERT_EQUAL(json_id_from_number(-0.0, &out), 0);
    CU_ASSERT_EQUAL(out, 0);
    out = 12345;
    CU_ASSERT_EQUAL(json_id_from_number(NAN, &out), -EINVAL);
    CU_ASSERT_EQUAL(json_id_from_number(INFINITY, &out), -EINVAL);
    CU_ASSERT_EQUAL(json_id_from_number(-INFINITY, &out), -EINVAL);
    CU_ASSERT_EQUAL(out, 12345);
    /* 2^53 + 1 rounds to 2^53 before the call: refused, never fetched as another id */
    CU_ASSERT_EQUAL(json_id_from_number(two53 + 1.0, &out), -ERANGE);
    CU_ASSERT_EQUAL(out, 12345);
    /* what cJSON hands over for "7" and "-0" */
    cJSON *j = cJSON_Parse("[7, -0, 9007199254740993, 1e2]");
    CU_ASSERT_PTR_NOT_NULL_FATAL(j);
    CU_ASSERT_EQUAL(json_id_from_number(cJSON_GetArrayItem(j, 0)->valuedouble, &out), 0);
    CU_ASSERT_EQUAL(out, 7);
    CU_ASSERT_EQUAL(json_id_from_number(cJSON_GetArrayItem(j, 1)->valuedouble, &out), 0);
    CU_ASSERT_EQUAL(out, 0);
    CU_ASSERT_EQUAL(json_id_from_number(cJSON_GetArrayItem(j, 3)->valuedouble, &out), 0);
    CU_ASSERT_EQUAL(out, 100);
    cJSON_Delete(j);
}

static CU_TestInfo json_tests[] = {
    {"buf appends and stays NUL-terminated", test_json_buf_appends},
    {"buf appends part of itself", test_json_buf_self_append},
    {"buf grows and reserve prevents reallocation", test_json_buf_grows},
    {"buf take hands over a malloc'd string", test_json_buf_take},
    {"buf out-of-memory is sticky and take returns NULL", test_json_buf_oom_is_sticky},
    {"escape every control byte", test_json_escape_control_bytes},
    {"escape quote and backslash, copy other ASCII", test_json_escape_ascii},
    {"escape copies well-formed non-ASCII", test_json_escape_non_ascii_passthrough},
    {"escape U+2028 and U+2029", test_json_escape_js_separators},
    {"escape replaces maximal ill-formed subparts by U+FFFD", test_json_escape_invalid_utf8},
    {"escape matches a byte-at-a-time reference", test_json_escape_matches_reference},
    {"escape round-trips through cJSON", test_json_escape_roundtrips_through_cjson},
    {"utf8_valid table", test_json_utf8_valid_table},
    {"utf8_valid matches the reference", test_json_utf8_valid_matches_reference},
    {"valid accepts RFC 8259 documents", test_json_valid_accepts},
    {"valid rejects malformed documents", test_json_valid_rejects},
    {"valid rejects every proper prefix", test_json_valid_prefixes_rejected},
    {"valid reports the span without whitespace", test_json_valid_spans},
    {"valid caps nesting at JSON_MAX_DEPTH", test_json_valid_depth_cap},
    {"valid survives 100k-deep nesting", test_json_valid_huge_nesting_is_safe},
    {"valid accepts only what cJSON parses", test_json_valid_agrees_with_cjson},
    {"int64 formatting", test_json_int64_format},
    {"id_from_number edge cases", test_json_id_from_number},
    CU_TEST_INFO_NULL,
};
TEST_SUITE_INIT(json, json_tests, ref_init, ref_cleanup)
