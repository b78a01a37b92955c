/* Tests for server/batch/request.h: request_parse() turns a body (and the X-Request-Timeout-Ms
 * value) into positions with their echo text and id bytes, the mode and flags, and the deadline
 * (the smaller of body and header, else the default, clamped to the maximum); every refusal is a
 * status, a code and a message naming what was wrong, and leaves the request empty. Pure code. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/batch/request.h"
#include "server/json.h"
#include "tests/support.h"

static const struct request_limits LIM = {
    .max_batch = 5, .default_timeout_ms = 300, .max_timeout_ms = 400};

/* Parses a copy of body[0..len) (request_parse writes into it). */
static int parse_n(const struct request_limits *lim, const char *body, size_t len,
                   const char *hdr, struct request *rq, struct request_error *e)
{
    char *copy = malloc(len + 1);
    CU_ASSERT_FATAL(copy != NULL);
    memcpy(copy, body, len);
    copy[len] = '\0';
    memset(e, 0, sizeof(*e));
    int rc = request_parse(lim, copy, len, hdr, rq, e);
    free(copy); /* the request keeps nothing of the body */
    return rc;
}

/* The same with room for more ids. */
static int parse_wide(const char *body, struct request *rq, struct request_error *e)
{
    struct request_limits lim = LIM;
    lim.max_batch = 100;
    return parse_n(&lim, body, strlen(body), NULL, rq, e);
}

static int parse(const char *body, const char *hdr, struct request *rq, struct request_error *e)
{
    return parse_n(&LIM, body, strlen(body), hdr, rq, e);
}

/* A request that must parse; returns its deadline (or -1 after a failed assertion). */
static int64_t deadline_of(const char *body, const char *hdr)
{
    struct request rq;
    struct request_error e;
    int rc = parse(body, hdr, &rq, &e);
    CU_ASSERT_EQUAL(rc, 0);
    if (rc != 0) {
        fprintf(stderr, "\n  %s | %s: %u %s\n", body, hdr ? hdr : "-", e.status, e.message);
        return -1;
    }
    int64_t t = rq.timeout_ms;
    request_free(&rq);
    return t;
}

/* A refusal with 'status' and 'code' whose message holds 'needle'; the request is left empty. */
static void expect_refused_n(const char *body, size_t len, const char *hdr, unsigned status,
                             const char *code, const char *needle)
{
    struct request rq;
    memset(&rq, 0x5a, sizeof(rq)); /* garbage in: request_parse must empty it */
    struct request_error e;
    int rc = parse_n(&LIM, body, len, hdr, &rq, &e);
    bool ok = rc == (status == 500 ? -ENOMEM : -EINVAL) && e.status == status && e.code &&
              !strcmp(e.code, code) && e.message[0] && !strchr(e.message, '\n') &&
              strstr(e.message, needle) != NULL;
    CU_ASSERT(ok);
    if (!ok)
        fprintf(stderr, "\n  %.*s | %s: rc %d, %u %s \"%s\" (want %u %s \"%s\")\n", (int)len,
                body, hdr ? hdr : "-", rc, e.status, e.code ? e.code : "-", e.message, status,
                code, needle);
    CU_ASSERT(rq.n == 0 && rq.items == NULL && rq.arena == NULL);
}

static void expect_refused(const char *body, const char *hdr, unsigned status, const char *code,
                           const char *needle)
{
    expect_refused_n(body, strlen(body), hdr, status, code, needle);
}

#define BAD(body, needle) expect_refused(body, NULL, 400, "bad_request", needle)

/* The echo text and id bytes of position i are 'echo' and id[0..idlen). */
static void expect_item(const struct request *rq, size_t i, const char *echo, const char *id,
                        size_t idlen)
{
    CU_ASSERT_FATAL(i < rq->n);
    CU_ASSERT_STRING_EQUAL(request_echo(rq, i), echo);
    CU_ASSERT_EQUAL(rq->items[i].echo_len, strlen(echo));
    CU_ASSERT_EQUAL(rq->items[i].id_len, idlen);
    CU_ASSERT(memcmp(request_id(rq, i), id, idlen) == 0);
    CU_ASSERT_EQUAL(request_id(rq, i)[idlen], '\0');
}

/* ---------------------------------------------------------------- what a request holds */

static void test_request_ids_echo_and_defaults(void)
{
    struct request rq;
    struct request_error e;
    CU_ASSERT_FATAL(parse("{\"ids\":[\"a\",7,\"b c\",-12,\"a\"]}", NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.n, 5);
    expect_item(&rq, 0, "\"a\"", "a", 1);
    expect_item(&rq, 1, "7", "7", 1);
    expect_item(&rq, 2, "\"b c\"", "b c", 3);
    expect_item(&rq, 3, "-12", "-12", 3);
    expect_item(&rq, 4, "\"a\"", "a", 1); /* duplicates are positions of their own */
    CU_ASSERT_EQUAL(rq.mode, MODE_ALL);
    CU_ASSERT_TRUE(rq.hedge);
    CU_ASSERT_TRUE(rq.coalesce);
    CU_ASSERT_EQUAL(rq.timeout_ms, LIM.default_timeout_ms);
    request_free(&rq);
    CU_ASSERT(rq.n == 0 && rq.items == NULL && rq.arena == NULL);

    /* No ids is a request too. */
    CU_ASSERT_FATAL(parse("{\"ids\":[]}", NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.n, 0);
    request_free(&rq);
    /* Whitespace around the object, and members the server does not know, are fine. */
    CU_ASSERT_FATAL(parse(" \r\n\t{\"x\":{\"y\":[1,2]},\"ids\":[\"q\"],\"z\":null} \n", NULL, &rq,
                          &e) == 0);
    CU_ASSERT_EQUAL(rq.n, 1);
    expect_item(&rq, 0, "\"q\"", "q", 1);
    request_free(&rq);
}

/* An id's echo is JSON text for the same string (escapes decoded, re-escaped canonically); its
 * bytes are the decoded string. */
static void test_request_echo_is_canonical_json(void)
{
    struct request rq;
    struct request_error e;
    CU_ASSERT_FATAL(parse_wide("{\"ids\":[\"\\u00e9\",\"q\\\"\\\\\",\"\\/x\",\"t\\tn\\n\","
                               "\"\\ud83d\\ude00\",\"\\u2028\"]}",
                               &rq, &e) == 0);
    CU_ASSERT_EQUAL_FATAL(rq.n, 6);
    expect_item(&rq, 0, "\"\xc3\xa9\"", "\xc3\xa9", 2);
    expect_item(&rq, 1, "\"q\\\"\\\\\"", "q\"\\", 3);
    expect_item(&rq, 2, "\"/x\"", "/x", 2);
    expect_item(&rq, 3, "\"t\\tn\\n\"", "t\tn\n", 4);
    expect_item(&rq, 4, "\"\xf0\x9f\x98\x80\"", "\xf0\x9f\x98\x80", 4);
    expect_item(&rq, 5, "\"\\u2028\"", "\xe2\x80\xa8", 3);
    /* Every echo is a JSON string whose value is the id. */
    for (size_t i = 0; i < rq.n; i++) {
        const char *echo = request_echo(&rq, i);
        CU_ASSERT(json_valid(echo, strlen(echo), NULL, NULL));
    }
    request_free(&rq);
}

/* A number id is its decimal text: integral doubles of any spelling, up to 2^53 - 1. */
static void test_request_number_ids(void)
{
    struct request rq;
    struct request_error e;
    CU_ASSERT_FATAL(
        parse_wide("{\"ids\":[0,-0,1e2,2.50e1,9007199254740991,-9007199254740991,100.0]}", &rq,
                   &e) == 0);
    CU_ASSERT_EQUAL_FATAL(rq.n, 7);
    expect_item(&rq, 0, "0", "0", 1);
    expect_item(&rq, 1, "0", "0", 1);
    expect_item(&rq, 2, "100", "100", 3);
    expect_item(&rq, 3, "25", "25", 2);
    expect_item(&rq, 4, "9007199254740991", "9007199254740991", 16);
    expect_item(&rq, 5, "-9007199254740991", "-9007199254740991", 17);
    expect_item(&rq, 6, "100", "100", 3);
    request_free(&rq);
    BAD("{\"ids\":[1,9007199254740992]}", "ids[1]");
    BAD("{\"ids\":[-9007199254740992]}", "ids[0]");
    BAD("{\"ids\":[\"a\",1.5]}", "ids[1]");
    BAD("{\"ids\":[1e300]}", "ids[0]");
    BAD("{\"ids\":[1e-3]}", "ids[0]");
}

/* mode, hedge and coalesce: their values, and a refusal naming the member otherwise. */
static void test_request_mode_and_flags(void)
{
    struct request rq;
    struct request_error e;
    CU_ASSERT_FATAL(parse("{\"ids\":[1],\"mode\":\"settled\",\"hedge\":false,\"coalesce\":false}",
                          NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.mode, MODE_SETTLED);
    CU_ASSERT_FALSE(rq.hedge);
    CU_ASSERT_FALSE(rq.coalesce);
    request_free(&rq);
    CU_ASSERT_FATAL(parse("{\"ids\":[1],\"mode\":\"all\",\"hedge\":true,\"coalesce\":true}", NULL,
                          &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.mode, MODE_ALL);
    CU_ASSERT_TRUE(rq.hedge);
    CU_ASSERT_TRUE(rq.coalesce);
    request_free(&rq);
    BAD("{\"ids\":[1],\"mode\":\"ALL\"}", "\"mode\"");
    BAD("{\"ids\":[1],\"mode\":\"\"}", "\"mode\"");
    BAD("{\"ids\":[1],\"mode\":1}", "\"mode\"");
    BAD("{\"ids\":[1],\"mode\":null}", "\"mode\"");
    BAD("{\"ids\":[1],\"hedge\":\"false\"}", "\"hedge\"");
    BAD("{\"ids\":[1],\"hedge\":0}", "\"hedge\"");
    BAD("{\"ids\":[1],\"coalesce\":null}", "\"coalesce\"");
    BAD("{\"ids\":[1],\"coalesce\":[]}", "\"coalesce\"");
}

/* ---------------------------------------------------------------- the deadline */

/* The body's timeout_ms and the header: when both are given the smaller wins, whichever it
 * is; alone, each is taken; none gives the default; every result is clamped to the maximum. */
static void test_request_deadline_smaller_wins(void)
{
    /* Both given, each order, each side smaller. */
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":150}", "250"), 150);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":250}", "150"), 150);
    CU_ASSERT_EQUAL(deadline_of("{\"timeout_ms\":100,\"ids\":[1]}", "399"), 100);
    CU_ASSERT_EQUAL(deadline_of("{\"timeout_ms\":399,\"ids\":[1]}", "100"), 100);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":200}", "200"), 200);
    /* One side past the maximum: the other, smaller, wins before the clamp. */
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":100000}", "150"), 150);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":150}", "100000"), 150);
    /* Alone. */
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":120}", NULL), 120);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1]}", "130"), 130);
    /* Neither: the default. */
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1]}", NULL), LIM.default_timeout_ms);
    /* Clamped to the maximum, from either side or both. */
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":401}", NULL), LIM.max_timeout_ms);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1]}", "401"), LIM.max_timeout_ms);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":60000}", "90000"),
                    LIM.max_timeout_ms);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":9007199254740992}", NULL),
                    LIM.max_timeout_ms);
    /* The smallest deadline is 1 ms; leading zeros and any number of digits are fine. */
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":1}", NULL), 1);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1]}", "0001"), 1);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1]}", "000099999999999999999999999"),
                    LIM.max_timeout_ms);
    CU_ASSERT_EQUAL(deadline_of("{\"ids\":[1],\"timeout_ms\":1.0e2}", NULL), 100);
    /* A default above the maximum is clamped as well. */
    struct request_limits lim = LIM;
    lim.default_timeout_ms = 1000;
    struct request rq;
    struct request_error e;
    CU_ASSERT_FATAL(parse_n(&lim, "{\"ids\":[1]}", 11, NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.timeout_ms, lim.max_timeout_ms);
    request_free(&rq);
}

static void test_request_deadline_refusals(void)
{
    static const char *const bad_hdr[] = {"0", "-1", "1.5", "x", "", " 5", "5 ", "+5", "1e3",
                                          "00"};
    for (size_t i = 0; i < sizeof(bad_hdr) / sizeof(bad_hdr[0]); i++)
        expect_refused("{\"ids\":[1]}", bad_hdr[i], 400, "bad_request", "X-Request-Timeout-Ms");
    /* A bad header is refused even when the body is good, and before a bad body is looked at. */
    expect_refused("{\"ids\":[1],\"timeout_ms\":100}", "abc", 400, "bad_request",
                   "X-Request-Timeout-Ms");
    expect_refused("not json", "abc", 400, "bad_request", "X-Request-Timeout-Ms");
    static const char *const bad_body[] = {
        "{\"ids\":[1],\"timeout_ms\":0}",      "{\"ids\":[1],\"timeout_ms\":-5}",
        "{\"ids\":[1],\"timeout_ms\":1.5}",    "{\"ids\":[1],\"timeout_ms\":\"100\"}",
        "{\"ids\":[1],\"timeout_ms\":true}",   "{\"ids\":[1],\"timeout_ms\":null}",
        "{\"ids\":[1],\"timeout_ms\":1e300}",  "{\"ids\":[1],\"timeout_ms\":[100]}",
        "{\"ids\":[1],\"timeout_ms\":0.5}",
    };
    for (size_t i = 0; i < sizeof(bad_body) / sizeof(bad_body[0]); i++) {
        BAD(bad_body[i], "timeout_ms");
        expect_refused(bad_body[i], "100", 400, "bad_request", "timeout_ms");
    }
}

/* ---------------------------------------------------------------- ids */

static void test_request_id_limits(void)
{
    struct request rq;
    struct request_error e;
    /* 256 bytes is the longest id, counted in bytes (not characters). */
    char body[2048];
    char id[REQUEST_ID_MAX_BYTES + 2];
    memset(id, 'k', sizeof(id));
    id[REQUEST_ID_MAX_BYTES] = '\0';
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", id);
    CU_ASSERT_FATAL(parse(body, NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.items[0].id_len, REQUEST_ID_MAX_BYTES);
    request_free(&rq);
    id[REQUEST_ID_MAX_BYTES] = 'k';
    id[REQUEST_ID_MAX_BYTES + 1] = '\0';
    snprintf(body, sizeof(body), "{\"ids\":[1,\"%s\"]}", id);
    BAD(body, "ids[1]");
    BAD(body, "257");
    /* 128 two-byte characters are 256 bytes; one more is too long. */
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[\"");
    for (int i = 0; i < 128; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "\xc3\xa9");
    snprintf(body + k, sizeof(body) - k, "\"]}");
    CU_ASSERT_FATAL(parse(body, NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.items[0].id_len, 256);
    request_free(&rq);
    k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[\"");
    for (int i = 0; i < 128; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "\\u00e9");
    snprintf(body + k, sizeof(body) - k, "x\"]}");
    BAD(body, "ids[0]");

    /* Each bad id is named by its index. */
    BAD("{\"ids\":[\"a\",\"\"]}", "ids[1]");
    BAD("{\"ids\":[\"a\",\"b\",null]}", "ids[2]");
    BAD("{\"ids\":[true]}", "ids[0]");
    BAD("{\"ids\":[\"a\",{\"id\":1}]}", "ids[1]");
    BAD("{\"ids\":[[\"a\"]]}", "ids[0]");
    BAD("{\"ids\":[\"a\",\"b\\u0000c\"]}", "ids[1]");
    BAD("{\"ids\":[\"\\u0000\"]}", "\\u0000");
    expect_refused("{\"ids\":[\"ok\",\"\xff\xfe\"]}", NULL, 400, "bad_request", "ids[1]");
    expect_refused("{\"ids\":[\"\xc0\xaf\"]}", NULL, 400, "bad_request", "UTF-8");
    expect_refused("{\"ids\":[\"\xed\xa0\x80\"]}", NULL, 400, "bad_request", "ids[0]");
    /* The first bad id is the one reported. */
    BAD("{\"ids\":[\"a\",\"\",null]}", "ids[1]");
    /* An escaped backslash before u0000 is not a NUL: the id is those six characters. */
    CU_ASSERT_FATAL(parse("{\"ids\":[\"\\\\u0000\"]}", NULL, &rq, &e) == 0);
    expect_item(&rq, 0, "\"\\\\u0000\"", "\\u0000", 6);
    request_free(&rq);
    /* A \u0000 outside the ids is no concern of the id check. */
    CU_ASSERT_FATAL(parse("{\"note\":\"a\\u0000b\",\"ids\":[\"x\"]}", NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.n, 1);
    request_free(&rq);
}

/* --max-batch ids are fine; one more is 413 too_many_ids naming the limit. */
static void test_request_batch_limit(void)
{
    struct request rq;
    struct request_error e;
    CU_ASSERT_FATAL(parse("{\"ids\":[1,2,3,4,5]}", NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL(rq.n, 5);
    request_free(&rq);
    expect_refused("{\"ids\":[1,2,3,4,5,6]}", NULL, 413, "too_many_ids", "6 ids");
    expect_refused("{\"ids\":[1,2,3,4,5,6]}", NULL, 413, "too_many_ids", "--max-batch");
    /* A large batch keeps every position's bytes apart. */
    struct request_limits lim = LIM;
    lim.max_batch = 5000;
    size_t cap = 5000 * 24 + 32, k = 0;
    char *body = malloc(cap);
    CU_ASSERT_FATAL(body != NULL);
    k += (size_t)snprintf(body + k, cap - k, "{\"ids\":[");
    for (int i = 0; i < 5000; i++)
        k += (size_t)(i % 2 ? snprintf(body + k, cap - k, "%s%d", i ? "," : "", i)
                            : snprintf(body + k, cap - k, "%s\"s%d\"", i ? "," : "", i));
    k += (size_t)snprintf(body + k, cap - k, "]}");
    CU_ASSERT_FATAL(parse_n(&lim, body, k, NULL, &rq, &e) == 0);
    CU_ASSERT_EQUAL_FATAL(rq.n, 5000);
    int wrong = 0;
    for (int i = 0; i < 5000; i++) {
        char want[32];
        snprintf(want, sizeof(want), i % 2 ? "%d" : "s%d", i);
        wrong += strcmp(request_id(&rq, (size_t)i), want) != 0 ||
                 rq.items[i].id_len != strlen(want);
    }
    CU_ASSERT_EQUAL(wrong, 0);
    request_free(&rq);
    free(body);
}

/* ---------------------------------------------------------------- the body */

static void test_request_body_shape(void)
{
    BAD("{}", "\"ids\" is required");
    BAD("{\"IDS\":[1]}", "\"ids\" is required");
    BAD("{\"ids\":\"a\"}", "\"ids\" must be an array");
    BAD("{\"ids\":{\"0\":\"a\"}}", "\"ids\" must be an array");
    BAD("{\"ids\":null}", "\"ids\" must be an array");
    BAD("[\"a\"]", "JSON object");
    BAD("\"ids\"", "JSON object");
    BAD("42", "JSON object");
    BAD("null", "JSON object");
    expect_refused_n("", 0, NULL, 400, "bad_request", "empty");
    struct request rq;
    struct request_error e;
    memset(&e, 0, sizeof(e));
    CU_ASSERT_EQUAL(request_parse(&LIM, NULL, 0, NULL, &rq, &e), -EINVAL);
    CU_ASSERT_EQUAL(e.status, 400);
    CU_ASSERT(rq.n == 0 && rq.items == NULL && rq.arena == NULL);
}

/* What is not JSON, or not strict RFC 8259 JSON, is refused, even when cJSON would take it. */
static void test_request_malformed_json(void)
{
    BAD("{\"ids\":[1,2", "malformed JSON");
    BAD("{\"ids\":[1,]}", "malformed JSON");
    BAD("{ids:[1]}", "malformed JSON");
    BAD("{\"ids\":[1]} {}", "after the object");
    BAD("{\"ids\":[1]}x", "after the object");
    /* Not strict: cJSON's leniencies. */
    BAD("{\"ids\":[1],\"n\":01}", "strict");
    BAD("{\"ids\":[1],\"n\":1.}", "strict");
    BAD("{\"ids\":[1],\"n\":\"\\ud800\"}", "JSON");
    expect_refused("{\"ids\":[1],\"s\":\"a\x01\"}", NULL, 400, "bad_request", "strict");
    expect_refused_n("{\"ids\":[\"a\"],\"s\":\"\0\"}", 21, NULL, 400, "bad_request", "");
    expect_refused("{\"ids\":[1],\"s\":\"\xff\"}", NULL, 400, "bad_request", "UTF-8");
    expect_refused("\xef\xbb\xbf{\"ids\":[1]}", NULL, 400, "bad_request", "");
    /* Nesting past the validator's depth, outside the ids. */
    size_t depth = JSON_MAX_DEPTH + 1, k = 0;
    char *deep = malloc(2 * depth + 32);
    CU_ASSERT_FATAL(deep != NULL);
    k += (size_t)sprintf(deep, "{\"ids\":[1],\"d\":");
    for (size_t i = 0; i < depth - 1; i++)
        deep[k++] = '[';
    for (size_t i = 0; i < depth - 1; i++)
        deep[k++] = ']';
    deep[k++] = '}';
    deep[k] = '\0';
    BAD(deep, "strict");
    free(deep);
    /* A bad id is still reported by its index when the body is also not strict. */
    expect_refused("{\"ids\":[\"a\",\"\"],\"n\":01}", NULL, 400, "bad_request", "ids[1]");
}

static CU_TestInfo request_tests[] = {
    {"ids: echo text and bytes per position; defaults", test_request_ids_echo_and_defaults},
    {"ids: the echo is canonical JSON for the decoded string", test_request_echo_is_canonical_json},
    {"number ids: decimal text, up to 2^53 - 1", test_request_number_ids},
    {"mode, hedge, coalesce: values and refusals naming them", test_request_mode_and_flags},
    {"deadline: the smaller of body and header wins, default, clamp",
     test_request_deadline_smaller_wins},
    {"deadline: bad header or timeout_ms refused, naming it", test_request_deadline_refusals},
    {"ids: 256 bytes, type, empty, UTF-8, \\u0000, each named by index", test_request_id_limits},
    {"--max-batch: the limit, one more is 413; a large batch", test_request_batch_limit},
    {"body: an object with an ids array, not empty", test_request_body_shape},
    {"malformed or non-strict JSON refused", test_request_malformed_json},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(request, request_tests)
