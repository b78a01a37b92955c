/* framing.h in process: the framing verdict on header lists given with their lengths, and the
 * target path. */
#include <CUnit/CUnit.h>
#include <string.h>

#include "server/http/framing.h"
#include "tests/support.h"

/* One header field; a NULL name ends a list. */
struct field {
    const char *name;
    const char *value;
    size_t value_len; /* 0: strlen(value) */
};

static bool verdict_of(const struct field *fs, const char *version, struct framing_verdict *v)
{
    struct framing f;
    framing_init(&f);
    for (const struct field *x = fs; x->name; x++)
        framing_field(&f, x->name, strlen(x->name), x->value,
                      x->value_len ? x->value_len : strlen(x->value));
    return framing_finish(&f, version, v);
}

static void expect(const struct field *fs, const char *version, unsigned status, const char *code)
{
    struct framing_verdict v;
    bool ok = verdict_of(fs, version, &v);
    CU_ASSERT_EQUAL(ok, status == 0);
    CU_ASSERT_EQUAL(v.status, status);
    if (code)
        CU_ASSERT(v.code && !strcmp(v.code, code));
    if (status)
        CU_ASSERT(v.message[0] != '\0');
}

static void test_framing_accepts_plain_requests(void)
{
    /* One Host and one length: the ordinary request. */
    expect((struct field[]){{"Host", "x", 0}, {"Content-Length", "13", 0}, {NULL, NULL, 0}},
           "HTTP/1.1", 0, NULL);
    /* Names are case-insensitive (RFC 9110 5.1), codings too (RFC 9112 7). */
    expect((struct field[]){{"host", "x", 0}, {"transfer-encoding", " Chunked ", 0}, {NULL, NULL, 0}},
           "HTTP/1.1", 0, NULL);
    /* OWS around a length is not part of it (RFC 9110 5.5). */
    expect((struct field[]){{"Host", "x", 0}, {"Content-Length", "\t13 ", 0}, {NULL, NULL, 0}},
           "HTTP/1.1", 0, NULL);
    /* HTTP/1.0 needs no Host. */
    expect((struct field[]){{"Content-Length", "0", 0}, {NULL, NULL, 0}}, "HTTP/1.0", 0, NULL);
    /* The largest representable length is still a length. */
    expect((struct field[]){{"Host", "x", 0}, {"Content-Length", "18446744073709551615", 0},
                            {NULL, NULL, 0}},
           "HTTP/1.1", 0, NULL);
}

static void test_framing_refuses_ambiguity(void)
{
    const char *v11 = "HTTP/1.1";
    /* RFC 9112 6.1: both framings, either order. */
    expect((struct field[]){{"Host", "x", 0}, {"Content-Length", "5", 0},
                            {"Transfer-Encoding", "chunked", 0}, {NULL, NULL, 0}},
           v11, 400, "bad_framing");
    expect((struct field[]){{"Host", "x", 0}, {"Transfer-Encoding", "chunked", 0},
                            {"Content-Length", "5", 0}, {NULL, NULL, 0}},
           v11, 400, "bad_framing");
    /* RFC 9110 8.6: repeated lengths, equal ones included (fanout's choice). */
    expect((struct field[]){{"Host", "x", 0}, {"Content-Length", "5", 0},
                            {"Content-Length", "5", 0}, {NULL, NULL, 0}},
           v11, 400, "bad_framing");
    /* Two TE lines. */
    expect((struct field[]){{"Host", "x", 0}, {"Transfer-Encoding", "chunked", 0},
                            {"Transfer-Encoding", "chunked", 0}, {NULL, NULL, 0}},
           v11, 400, "bad_framing");
    /* Malformed lengths: a list, signs, empty, 2^64, inner space. */
    const char *bad[] = {"13, 5", "-1", "+1", "", "18446744073709551616", "1 3", "0x10", "1e3"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect((struct field[]){{"Host", "x", 0}, {"Content-Length", bad[i], 0}, {NULL, NULL, 0}},
               v11, 400, "bad_framing");
    /* Codings: unknown ones are 501, a broken list of chunked is 400. */
    const char *unknown[] = {"gzip, chunked", "chunked, identity", "xchunked", "identity", "gzip"};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++)
        expect((struct field[]){{"Host", "x", 0}, {"Transfer-Encoding", unknown[i], 0},
                                {NULL, NULL, 0}},
               v11, 501, "unsupported_encoding");
    const char *broken[] = {"chunked, chunked", "chunked,", ", chunked", "", "chunked;q=1"};
    for (size_t i = 0; i < sizeof(broken) / sizeof(broken[0]); i++)
        expect((struct field[]){{"Host", "x", 0}, {"Transfer-Encoding", broken[i], 0},
                                {NULL, NULL, 0}},
               v11, 400, "bad_framing");
    /* RFC 9112 6.1: TE on HTTP/1.0. */
    expect((struct field[]){{"Transfer-Encoding", "chunked", 0}, {NULL, NULL, 0}}, "HTTP/1.0", 400,
           "bad_framing");
}

static void test_framing_refuses_bad_fields(void)
{
    const char *v11 = "HTTP/1.1";
    /* RFC 9112 5.1: whitespace before the colon (the parser kept it in the name). */
    expect((struct field[]){{"Host", "x", 0}, {"Transfer-Encoding ", "chunked", 0}, {NULL, NULL, 0}},
           v11, 400, "bad_framing");
    /* A separator in a name. */
    expect((struct field[]){{"Host", "x", 0}, {"X(A)", "1", 0}, {NULL, NULL, 0}}, v11, 400,
           "bad_header");
    /* RFC 9110 5.5: a NUL inside a value is seen through its length. */
    expect((struct field[]){{"Host", "x", 0}, {"X-Request-Id", "abc\0def", 7}, {NULL, NULL, 0}}, v11,
           400, "bad_header");
    /* Bare CR or LF, and DEL. */
    expect((struct field[]){{"Host", "x", 0}, {"X-A", "a\rb", 0}, {NULL, NULL, 0}}, v11, 400,
           "bad_header");
    expect((struct field[]){{"Host", "x", 0}, {"X-A", "a\x7f", 0}, {NULL, NULL, 0}}, v11, 400,
           "bad_header");
    /* HTAB is allowed inside a value. */
    expect((struct field[]){{"Host", "x", 0}, {"X-A", "a\tb", 0}, {NULL, NULL, 0}}, v11, 0, NULL);
    /* RFC 9112 3.2: exactly one Host on 1.1; never two. */
    expect((struct field[]){{"Content-Length", "0", 0}, {NULL, NULL, 0}}, v11, 400, "bad_header");
    expect((struct field[]){{"Host", "x", 0}, {"Host", "y", 0}, {NULL, NULL, 0}}, v11, 400,
           "bad_header");
    expect((struct field[]){{"Host", "x", 0}, {"Host", "x", 0}, {NULL, NULL, 0}}, "HTTP/1.0", 400,
           "bad_header");
}

static void test_framing_trim_and_target(void)
{
    const char *s = " \t abc \t";
    size_t n = strlen(s);
    framing_trim(&s, &n);
    CU_ASSERT_EQUAL(n, 3);
    CU_ASSERT(!strncmp(s, "abc", 3));
    const char *e = "   ";
    size_t en = 3;
    framing_trim(&e, &en);
    CU_ASSERT_EQUAL(en, 0);
    /* RFC 9112 3.2.2: the absolute form's path; the origin form as it is. */
    CU_ASSERT_STRING_EQUAL(framing_target_path("/v1/batch"), "/v1/batch");
    CU_ASSERT_STRING_EQUAL(framing_target_path("http://h:8080/v1/batch"), "/v1/batch");
    CU_ASSERT_STRING_EQUAL(framing_target_path("HTTP://h/healthz"), "/healthz");
    CU_ASSERT_STRING_EQUAL(framing_target_path("http://h"), "/");
    CU_ASSERT_STRING_EQUAL(framing_target_path("*"), "*");
}

static CU_TestInfo framing_tests[] = {
    {"plain requests pass: Host, a length, chunked, OWS, HTTP/1.0",
     test_framing_accepts_plain_requests},
    {"ambiguous framing: CL with TE, repeats, malformed lengths, codings",
     test_framing_refuses_ambiguity},
    {"bad fields: space before the colon, separators, NUL/CR/DEL, Host count",
     test_framing_refuses_bad_fields},
    {"trim removes OWS; the absolute form's path", test_framing_trim_and_target},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(framing, framing_tests)
