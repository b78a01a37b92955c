/* Tests for fetch/url: template checks with their messages, percent-encoding of hostile ids,
 * dot-segments, numeric ids, and properties over every byte and random ids (the host, path prefix
 * and query never change; decoding gives the id back). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/json.h"
#include "fetch/url.h"
#include "tests/support.h"

static uint64_t rng_state = 0xD1B54A32D192ED03ULL;

static uint64_t rng(void)
{
    return test_rng(&rng_state);
}

/* Parses 'tmpl', asserting success. */
static void parse_ok(const char *tmpl, struct url_template *t)
{
    char err[160];
    int rc = url_template_parse(tmpl, t, err, sizeof(err));
    CU_ASSERT_EQUAL(rc, 0);
    if (rc != 0) {
        fprintf(stderr, "\nunexpected parse failure for %s: %s\n", tmpl, err);
        memset(t, 0, sizeof(*t));
    }
}

/* The URL for id in template 'tmpl', malloc'd (NULL on failure). */
static char *build(const char *tmpl, const char *id, size_t idlen)
{
    struct url_template t;
    parse_ok(tmpl, &t);
    if (!t.text)
        return NULL;
    char *u = NULL;
    size_t len = 0;
    int rc = url_build(&t, id, idlen, &u, &len);
    CU_ASSERT_EQUAL(rc, 0);
    if (u)
        CU_ASSERT_EQUAL(len, strlen(u));
    url_template_destroy(&t);
    return u;
}

static void check_build(const char *tmpl, const char *id, size_t idlen, const char *want)
{
    char *u = build(tmpl, id, idlen);
    CU_ASSERT_PTR_NOT_NULL_FATAL(u);
    CU_ASSERT_STRING_EQUAL(u, want);
    if (strcmp(u, want) != 0)
        fprintf(stderr, "\nbuild(%s): got %s want %s\n", tmpl, u, want);
    free(u);
}

static int hexv(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1; /* lower case is not what url.c writes */
}

/* Decodes s[0..n) into out; -1 if it holds anything but unreserved bytes and %XX (upper hex). */
static long pct_decode(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= n)
                return -1;
            int h = hexv(s[i + 1]), l = hexv(s[i + 2]);
            if (h < 0 || l < 0)
                return -1;
            out[o++] = (char)(h << 4 | l);
            i += 2;
        } else if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                   c == '-' || c == '.' || c == '_' || c == '~') {
            out[o++] = c;
        } else {
            return -1;
        }
    }
    return (long)o;
}

/* ---- url_template_parse ------------------------------------------------------------------ */

static void test_url_template_parses(void)
{
    struct url_template t;
    parse_ok("http://127.0.0.1:9000/items/{id}?v=2", &t);
    CU_ASSERT_STRING_EQUAL(t.text, "http://127.0.0.1:9000/items/{id}?v=2");
    CU_ASSERT_EQUAL(t.prefix_len, strlen("http://127.0.0.1:9000/items/"));
    CU_ASSERT_EQUAL(t.suffix_off, t.prefix_len + 4);
    CU_ASSERT_STRING_EQUAL(t.text + t.suffix_off, "?v=2");
    CU_ASSERT_EQUAL(t.suffix_len, 4);
    CU_ASSERT_TRUE(t.id_seg_start);
    url_template_destroy(&t);
    CU_ASSERT_PTR_NULL(t.text);
    url_template_destroy(&t); /* twice is fine */

    parse_ok("https://h/{id}", &t); /* {id} right after the authority; empty suffix */
    CU_ASSERT_EQUAL(t.prefix_len, strlen("https://h/"));
    CU_ASSERT_EQUAL(t.suffix_len, 0);
    CU_ASSERT_TRUE(t.id_seg_start);
    url_template_destroy(&t);

    parse_ok("http://h/v1/item-{id}.json#top", &t);
    CU_ASSERT_FALSE(t.id_seg_start);
    CU_ASSERT_STRING_EQUAL(t.text + t.suffix_off, ".json#top");
    url_template_destroy(&t);

    static const char *more[] = {
        "HTTP://H/{id}",          "HttpS://h/{id}",          "http://[::1]:8080/items/{id}",
        "http://[::1]/{id}",      "http://user:pw@h:1/{id}", "http://h:65535/a/{id}/b?x=1&y=2#f",
        "http://localhost/{id}/", "http://h/a{id}b",         "http://h//{id}",
        "http://h/%7B/{id}", /* an encoded brace is just text */
    };
    for (size_t i = 0; i < sizeof(more) / sizeof(more[0]); i++) {
        parse_ok(more[i], &t);
        url_template_destroy(&t);
    }
}

static void test_url_template_errors(void)
{
    static const struct {
        const char *tmpl;
        const char *msg; /* a substring of the message */
    } cases[] = {
        {"", "empty"},
        {"ftp://h/{id}", "must start with http:// or https://"},
        {"h/{id}", "must start with http:// or https://"},
        {"http:/h/{id}", "must start with http:// or https://"},
        {"httpx://h/{id}", "must start with http:// or https://"},
        {"http://h/items", "must contain {id}"},
        {"http://h/items/{ID}", "must contain {id}"},
        {"http://h/items/{id", "must contain {id}"},
        {"http://h/{id}/{id}", "exactly once"},
        {"http://h/{id}?q={id}", "exactly once"},
        {"http://h/{id}/{name}", "'{' at offset 14 besides {id}"},
        {"http://h/{{id}}", "besides {id}"},
        {"http://h/}{id}", "besides {id}"},
        {"http://{id}/x", "not in the host or port"},
        {"http://h:{id}/x", "not in the host or port"},
        {"http://u{id}@h/x", "not in the host or port"},
        {"http://h{id}", "not in the host or port"},
        {"http://h?q={id}", "not in the query or fragment"},
        {"http://h/x?q={id}", "not in the query or fragment"},
        {"http://h/x?{id}", "not in the query or fragment"},
        {"http://h/x#{id}", "not in the query or fragment"},
        {"http://h/x?a#{id}", "not in the query or fragment"},
        {"http://h#/{id}", "not in the query or fragment"},
        {"http:///{id}", "no host"},
        {"http://:80/{id}", "no host"},
        {"http://u@/{id}", "no host"},
        {"http://[]/{id}", "no host"},
        {"http://h:/{id}", "empty port"},
        {"http://h:0/{id}", "out of range"},
        {"http://h:65536/{id}", "out of range"},
        {"http://h:99999999999999999999/{id}", "out of range"},
        {"http://h:8a/{id}", "not a number"},
        {"http://h:-1/{id}", "not a number"},
        {"http://[::1/{id}", "unterminated"},
        {"http://[::1]x/{id}", "junk after"},
        {"http://h/ {id}", "space, control or non-ASCII byte (0x20) at offset 9"},
        {"http://h/{id}\n", "(0x0A)"},
        {"http://h/\x7f{id}", "(0x7F)"},
        {"http://h/\xC3\xBC/{id}", "(0xC3) at offset 9"},
        {" http://h/{id}", "(0x20) at offset 0"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct url_template t = {.text = (char *)"sentinel"};
        char err[160] = "unset";
        int rc = url_template_parse(cases[i].tmpl, &t, err, sizeof(err));
        CU_ASSERT_EQUAL(rc, -EINVAL);
        bool has = strstr(err, cases[i].msg) != NULL;
        CU_ASSERT_TRUE(has);
        if (rc != -EINVAL || !has)
            fprintf(stderr, "\n%s: rc %d, message \"%s\", expected \"%s\"\n", cases[i].tmpl, rc,
                    err, cases[i].msg);
        CU_ASSERT_STRING_EQUAL(t.text, "sentinel"); /* untouched */
        CU_ASSERT_PTR_NULL(strchr(err, '\n'));
    }
    /* NULL template; no room for the message; a message longer than the room is cut, not
     * overrun */
    struct url_template t;
    CU_ASSERT_EQUAL(url_template_parse(NULL, &t, NULL, 0), -EINVAL);
    CU_ASSERT_EQUAL(url_template_parse("ftp://x/{id}", &t, NULL, 0), -EINVAL);
    char small[8];
    memset(small, 'X', sizeof(small));
    CU_ASSERT_EQUAL(url_template_parse("ftp://x/{id}", &t, small, 5), -EINVAL);
    CU_ASSERT_EQUAL(strlen(small), 4);
    CU_ASSERT_EQUAL(small[5], 'X');
    /* a success clears a stale message */
    char err[32] = "stale";
    CU_ASSERT_EQUAL(url_template_parse("http://h/{id}", &t, err, sizeof(err)), 0);
    CU_ASSERT_STRING_EQUAL(err, "");
    url_template_destroy(&t);
}

/* ---- url_build --------------------------------------------------------------------------- */

#define T "http://127.0.0.1:9/items/{id}?v=2"
#define P "http://127.0.0.1:9/items/"

static void test_url_build_escapes_hostile_ids(void)
{
    static const struct {
        const char *id;
        const char *want;
    } cases[] = {
        {"a", P "a?v=2"},
        {"abc-XYZ_09.~", P "abc-XYZ_09.~?v=2"},
        {"..", P "%2E%2E?v=2"},
        {".", P "%2E?v=2"},
        {"...", P "...?v=2"},
        {".a", P ".a?v=2"},
        {"a.", P "a.?v=2"},
        {"/", P "%2F?v=2"},
        {"?", P "%3F?v=2"},
        {"#", P "%23?v=2"},
        {"%", P "%25?v=2"},
        {"%2E%2E", P "%252E%252E?v=2"},
        {"@", P "%40?v=2"},
        {" ", P "%20?v=2"},
        {"+", P "%2B?v=2"},
        {":", P "%3A?v=2"},
        {";", P "%3B?v=2"},
        {"&x=1", P "%26x%3D1?v=2"},
        {"a/../b", P "a%2F..%2Fb?v=2"},
        {"../admin", P "..%2Fadmin?v=2"},
        {"\\..\\", P "%5C..%5C?v=2"},
        {"\xC3\xBC", P "%C3%BC?v=2"},               /* ü */
        {"\xF0\x9F\x98\x80", P "%F0%9F%98%80?v=2"}, /* 😀 */
        {"\xFF\x80", P "%FF%80?v=2"},               /* not UTF-8: still encoded */
        {"\r\nHost: evil", P "%0D%0AHost%3A%20evil?v=2"},
        {"@evil.com", P "%40evil.com?v=2"},
        {"{id}", P "%7Bid%7D?v=2"},
        {"\"'<>[]|^`", P "%22%27%3C%3E%5B%5D%7C%5E%60?v=2"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_build(T, cases[i].id, strlen(cases[i].id), cases[i].want);
    check_build(T, "a\0b", 3, P "a%00b?v=2"); /* a NUL is a byte like any other */
}

static void test_url_build_dot_segments(void)
{
    /* {id} as a whole segment: in the middle, at the end, before a query, a fragment or ';' */
    check_build("http://h/items/{id}/sub", ".", 1, "http://h/items/%2E/sub");
    check_build("http://h/items/{id}/sub", "..", 2, "http://h/items/%2E%2E/sub");
    check_build("http://h/{id}", "..", 2, "http://h/%2E%2E");
    check_build("http://h/{id}", ".", 1, "http://h/%2E");
    check_build("http://h/a/{id}#f", "..", 2, "http://h/a/%2E%2E#f");
    check_build("http://h/a/{id};v=1", "..", 2, "http://h/a/%2E%2E;v=1");
    /* starting a segment but not ending it: escaped too, which any server decodes to the same */
    check_build("http://h/a/{id}.json", "..", 2, "http://h/a/%2E%2E.json");
    /* not at a segment start: a dot there is not a dot-segment and stays raw */
    check_build("http://h/a/x{id}", "..", 2, "http://h/a/x..");
    check_build("http://h/a/x{id}/", ".", 1, "http://h/a/x./");
    /* ids of dots other than "." and ".." are never dot-segments */
    check_build("http://h/{id}", "...", 3, "http://h/...");
    check_build("http://h/{id}", ".a", 2, "http://h/.a");
}

static void test_url_build_empty_and_outlen(void)
{
    struct url_template t;
    parse_ok(T, &t);
    char *u = (char *)"untouched";
    CU_ASSERT_EQUAL(url_build(&t, "", 0, &u, NULL), -EINVAL);
    CU_ASSERT_STRING_EQUAL(u, "untouched");
    CU_ASSERT_EQUAL(url_build(&t, "x", 1, &u, NULL), 0); /* outlen is optional */
    CU_ASSERT_STRING_EQUAL(u, P "x?v=2");
    free(u);
    char enc[URL_ENCODED_MAX(3)];
    CU_ASSERT_EQUAL(url_encode_id(&t, "a b", 3, enc), 5);
    CU_ASSERT_EQUAL(memcmp(enc, "a%20b", 5), 0);
    CU_ASSERT_EQUAL(url_encode_id(&t, "..", 2, enc), 6);
    CU_ASSERT_EQUAL(memcmp(enc, "%2E%2E", 6), 0);
    url_template_destroy(&t);
    /* no prefix beyond the root, no suffix */
    check_build("http://h/{id}", "a?b", 3, "http://h/a%3Fb");
}

static void test_url_build_numeric_ids(void)
{
    struct url_template t;
    parse_ok("http://h/items/{id}", &t);
    static const struct {
        int64_t v;
        const char *want;
    } cases[] = {
        {7, "http://h/items/7"},
        {0, "http://h/items/0"},
        {-3, "http://h/items/-3"},
        {9007199254740992LL, "http://h/items/9007199254740992"},
        {INT64_MIN, "http://h/items/-9223372036854775808"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *u = NULL;
        size_t len = 0;
        CU_ASSERT_EQUAL(url_build_int64(&t, cases[i].v, &u, &len), 0);
        CU_ASSERT_PTR_NOT_NULL_FATAL(u);
        CU_ASSERT_STRING_EQUAL(u, cases[i].want);
        CU_ASSERT_EQUAL(len, strlen(cases[i].want));
        free(u);
    }
    /* number 7 and string "7" fetch the same URL, so they share a dedup key */
    char *a, *b;
    CU_ASSERT_EQUAL(url_build_int64(&t, 7, &a, NULL), 0);
    CU_ASSERT_EQUAL(url_build(&t, "7", 1, &b, NULL), 0);
    CU_ASSERT_STRING_EQUAL(a, b);
    free(a);
    free(b);
    url_template_destroy(&t);
}

/* For a given template, checks that 'u' is prefix + encoded id + suffix, that the middle holds no
 * delimiter and is not a dot-segment, and that it decodes back to the id. */
static bool url_is_safe(const struct url_template *t, const char *u, const char *id, size_t idlen)
{
    size_t n = strlen(u);
    if (n < t->prefix_len + t->suffix_len)
        return false;
    if (memcmp(u, t->text, t->prefix_len) != 0)
        return false;
    if (strcmp(u + n - t->suffix_len, t->text + t->suffix_off) != 0)
        return false;
    const char *mid = u + t->prefix_len;
    size_t mlen = n - t->prefix_len - t->suffix_len;
    if (memchr(mid, '/', mlen) || memchr(mid, '?', mlen) || memchr(mid, '#', mlen))
        return false;
    if (t->id_seg_start && ((mlen == 1 && mid[0] == '.') || (mlen == 2 && !memcmp(mid, "..", 2))))
        return false;
    char dec[64 * 3];
    long dlen = pct_decode(mid, mlen, dec);
    return dlen == (long)idlen && memcmp(dec, id, idlen) == 0;
}

static void test_url_build_every_byte(void)
{
    static const char *tmpls[] = {T, "https://[::1]:8443/a/b/{id}", "http://h/x{id}y#frag"};
    int bad = 0;
    for (size_t k = 0; k < sizeof(tmpls) / sizeof(tmpls[0]); k++) {
        struct url_template t;
        parse_ok(tmpls[k], &t);
        for (int c = 0; c < 256; c++) {
            char id[1] = {(char)c};
            char *u;
            if (url_build(&t, id, 1, &u, NULL) != 0) {
                bad++;
                continue;
            }
            bad += !url_is_safe(&t, u, id, 1);
            /* exactly the unreserved bytes stay raw, and only when the id is not "." */
            bool raw = strlen(u) == t.prefix_len + 1 + t.suffix_len;
            bool unres = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                         (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '~' ||
                         (c == '.' && !t.id_seg_start);
            bad += raw != unres;
            free(u);
        }
        url_template_destroy(&t);
    }
    CU_ASSERT_EQUAL(bad, 0);
}

static void test_url_build_random_ids(void)
{
    static const char *tmpls[] = {T, "http://h/{id}", "http://h/a/{id}/b", "http://h/p{id}"};
    static const char pick[] = "./?#%@ :;aZ09-_~\xC3\xBC\xFF";
    int bad = 0;
    for (size_t k = 0; k < sizeof(tmpls) / sizeof(tmpls[0]); k++) {
        struct url_template t;
        parse_ok(tmpls[k], &t);
        for (int round = 0; round < 5000; round++) {
            char id[64];
            size_t n = 1 + (size_t)(rng() % 8);
            if (round % 4 == 0)
                n = 1 + (size_t)(rng() % 2); /* plenty of "." and ".." */
            for (size_t i = 0; i < n; i++)
                id[i] = round % 4 == 0 ? '.' : pick[rng() % (sizeof(pick) - 1)];
            char *u;
            size_t len;
            if (url_build(&t, id, n, &u, &len) != 0) {
                bad++;
                continue;
            }
            bad += len != strlen(u) || !url_is_safe(&t, u, id, n);
            free(u);
        }
        url_template_destroy(&t);
    }
    CU_ASSERT_EQUAL(bad, 0);
}

#undef T
#undef P

static CU_TestInfo url_tests[] = {
    {"template parses and records prefix and suffix", test_url_template_parses},
    {"template errors name the problem", test_url_template_errors},
    {"build percent-encodes hostile ids", test_url_build_escapes_hostile_ids},
    {"build escapes dot-segment ids", test_url_build_dot_segments},
    {"build rejects empty ids, encode_id writes the key", test_url_build_empty_and_outlen},
    {"build numeric ids as decimal", test_url_build_numeric_ids},
    {"build is safe for every byte", test_url_build_every_byte},
    {"build is safe and reversible for random ids", test_url_build_random_ids},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(url, url_tests)
