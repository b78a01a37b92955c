/* End-to-end tests of the batch HTTP API (DESIGN.md section 3): every row of the error table,
 * results, ids and their URL encoding, request ids and deadlines.
 *
 * Each test starts its own upstream stub and server in-process (tests/srvtest.h) and drives the
 * server with libcurl from the test thread, or from background threads that only record what they
 * saw. Times appear only as generous correctness bounds (a deadline that was honoured, a sibling
 * that was not waited for), never as performance targets. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server/json.h"
#include "tests/srvtest.h"
#include "tests/support.h"

/* Starts the default environment or fails the test. */
#define START(e)                                                                                   \
    do {                                                                                           \
        CU_ASSERT_FATAL(srvtest_env_init(e) == 0);                                                 \
        CU_ASSERT_FATAL(srvtest_start_default(e) == 0);                                            \
    } while (0)

#define START_CFG(e, c)                                                                            \
    do {                                                                                           \
        CU_ASSERT_FATAL(srvtest_start(e, c) == 0);                                                 \
    } while (0)

static uint64_t stub_requests(struct upstub *up)
{
    struct upstub_stats st;
    upstub_stats(up, &st);
    return st.requests;
}

/* The result at 'i' of a 200: its id, status and data. */
static const cJSON *result_at(const struct srvtest_resp *r, int i, const char *field)
{
    const cJSON *a = srvtest_results(r);
    const cJSON *it = a ? cJSON_GetArrayItem(a, i) : NULL;
    return it ? cJSON_GetObjectItemCaseSensitive(it, field) : NULL;
}

static bool str_is(const cJSON *v, const char *s)
{
    return cJSON_IsString(v) && !strcmp(v->valuestring, s);
}

static bool num_is(const cJSON *v, double d)
{
    return cJSON_IsNumber(v) && v->valuedouble == d;
}

/* data.id of result i (the stub echoes the decoded last path segment). */
static bool data_id_is(const struct srvtest_resp *r, int i, const char *want)
{
    const cJSON *d = result_at(r, i, "data");
    return cJSON_IsObject(d) && str_is(cJSON_GetObjectItemCaseSensitive(d, "id"), want);
}

/* ---------------------------------------------------------------- 400 bad_request */

struct bad_case {
    const char *body;       /* request body */
    size_t len;             /* 0: strlen */
    const char *header;     /* extra header line or NULL */
    const char *must_have;  /* substring the message must contain */
};

static void test_server_bad_requests(void)
{
    static char long_id[300], long_body[400];
    memset(long_id, 'a', 257);
    long_id[257] = 0;
    snprintf(long_body, sizeof(long_body), "{\"ids\":[\"a\",\"%s\"]}", long_id);
    static char long_rid[200];
    memset(long_rid, 'r', 129);
    snprintf(long_rid + 129, sizeof(long_rid) - 129, "%s", "");
    static char long_rid_hdr[256];
    snprintf(long_rid_hdr, sizeof(long_rid_hdr), "X-Request-Id: %s", long_rid);
    static const char nul_in_id[] = "{\"ids\":[\"a\",\"x\\u0000y\"]}";
    static const char raw_nul[] = "{\"ids\":[\"a\",\"x\0y\"]}";
    const struct bad_case cases[] = {
        {"{\"ids\":[", 0, NULL, "malformed"},
        {"{\"ids\":[\"a\",]}", 0, NULL, "malformed"},
        {"{\"ids\":[\"a\"]} trailing", 0, NULL, "malformed"},
        {"", 0, NULL, "empty"},
        {"{}", 0, NULL, "ids"},
        {"{\"idz\":[\"a\"]}", 0, NULL, "ids"},
        {"{\"ids\":\"a\"}", 0, NULL, "array"},
        {"{\"ids\":{\"0\":\"a\"}}", 0, NULL, "array"},
        {"{\"ids\":null}", 0, NULL, "array"},
        {"[\"a\"]", 0, NULL, "object"},
        {"{\"ids\":[\"a\",null]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",{\"id\":\"b\"}]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",[\"b\"]]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",true]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",false]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",1.5]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",1e300]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",9007199254740992]}", 0, NULL, "ids[1]"},  /* 2^53: ambiguous */
        {"{\"ids\":[\"a\",-9007199254740993]}", 0, NULL, "ids[1]"}, /* reads as -2^53 */
        {"{\"ids\":[\"a\",\"\"]}", 0, NULL, "ids[1]"},
        {long_body, 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",\"\xff\"]}", 0, NULL, "ids[1]"},
        {"{\"ids\":[\"a\",\"\xc0\xaf\"]}", 0, NULL, "ids[1]"},      /* overlong '/' */
        {"{\"ids\":[\"a\",\"\xed\xa0\x80\"]}", 0, NULL, "ids[1]"},  /* surrogate */
        {"{\"ids\":[\"a\",\"\xe2\x82\"]}", 0, NULL, "ids[1]"},      /* truncated */
        {nul_in_id, 0, NULL, "ids[1]"},
        {raw_nul, sizeof(raw_nul) - 1, NULL, NULL},
        {"{\"ids\":[\"a\"],\"timeout_ms\":0}", 0, NULL, "timeout_ms"},
        {"{\"ids\":[\"a\"],\"timeout_ms\":-1}", 0, NULL, "timeout_ms"},
        {"{\"ids\":[\"a\"],\"timeout_ms\":1.5}", 0, NULL, "timeout_ms"},
        {"{\"ids\":[\"a\"],\"timeout_ms\":\"x\"}", 0, NULL, "timeout_ms"},
        {"{\"ids\":[\"a\"],\"timeout_ms\":\"100\"}", 0, NULL, "timeout_ms"},
        {"{\"ids\":[\"a\"],\"timeout_ms\":null}", 0, NULL, "timeout_ms"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Timeout-Ms: 0", "X-Request-Timeout-Ms"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Timeout-Ms: -1", "X-Request-Timeout-Ms"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Timeout-Ms: 1.5", "X-Request-Timeout-Ms"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Timeout-Ms: x", "X-Request-Timeout-Ms"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Timeout-Ms;", "X-Request-Timeout-Ms"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Id: has space", "X-Request-Id"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Id: q\"uote", "X-Request-Id"},
        {"{\"ids\":[\"a\"]}", 0, long_rid_hdr, "X-Request-Id"},
        {"{\"ids\":[\"a\"]}", 0, "X-Request-Id: caf\xc3\xa9", "X-Request-Id"},
    };
    struct srvtest_env e;
    START(&e);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct bad_case *k = &cases[i];
        struct srvtest_call c = {.body = k->body, .body_len = k->len,
                                 .headers = {k->header, NULL}};
        if (!k->body[0])
            c.body_len = 0, c.method = "POST", c.body = NULL;
        struct srvtest_resp r;
        srvtest_call(NULL, e.port, &c, &r);
        bool ok = r.status == 400 && !strcmp(srvtest_err_code(&r), "bad_request") &&
                  (!k->must_have || strstr(srvtest_err_message(&r), k->must_have)) &&
                  r.request_id[0] && strstr(r.content_type, "application/json");
        if (!ok)
            fprintf(stderr, "\n  case %zu (%s | %s): %ld %s\n", i, k->body,
                    k->header ? k->header : "", r.status, r.body ? r.body : "(no body)");
        CU_ASSERT(ok);
        srvtest_resp_free(&r);
    }
    CU_ASSERT_EQUAL(stub_requests(e.up), 0); /* nothing bad ever reaches the upstream */
    srvtest_env_free(&e);
}

/* Hostile bodies: huge, truncated, not UTF-8, deeply nested. 400 (or 200 for a huge valid one),
 * never a crash, and the server still answers afterwards. */
static void test_server_hostile_json(void)
{
    struct srvtest_env e;
    START(&e);
    size_t n = 100000;
    char *deep = malloc(n + 1);
    CU_ASSERT_FATAL(deep != NULL);
    memset(deep, '[', n);
    deep[n] = 0;
    struct srvtest_resp r;
    srvtest_post(e.port, deep, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "bad_request");
    srvtest_resp_free(&r);

    /* Nested inside an id position, closed properly: still 400, the id is not a string. */
    size_t depth = 5000;
    char *nested = malloc(2 * depth + 32);
    CU_ASSERT_FATAL(nested != NULL);
    size_t k = (size_t)sprintf(nested, "{\"ids\":[");
    memset(nested + k, '[', depth);
    memset(nested + k + depth, ']', depth);
    sprintf(nested + k + 2 * depth, "]}");
    srvtest_post(e.port, nested, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    srvtest_resp_free(&r);
    free(nested);

    /* Huge but valid: an unknown field of 900 kB is ignored. */
    size_t big = 900 * 1024;
    char *huge = malloc(big + 64);
    CU_ASSERT_FATAL(huge != NULL);
    k = (size_t)sprintf(huge, "{\"pad\":\"");
    memset(huge + k, 'p', big);
    sprintf(huge + k + big, "\",\"ids\":[\"a\"]}");
    srvtest_post(e.port, huge, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(data_id_is(&r, 0, "a"));
    srvtest_resp_free(&r);

    /* Truncated: the same body cut in the middle of the string, and just before the end. */
    struct srvtest_call c = {.body = huge, .body_len = k + big / 2};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "bad_request");
    srvtest_resp_free(&r);
    c.body_len = strlen(huge) - 1;
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    srvtest_resp_free(&r);
    free(huge);

    /* Not UTF-8 outside the ids: JSON text must be UTF-8 (RFC 8259 section 8.1). */
    srvtest_post(e.port, "{\"note\":\"\xfe\xff\",\"ids\":[\"a\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    CU_ASSERT(strstr(srvtest_err_message(&r), "UTF-8") != NULL);
    srvtest_resp_free(&r);
    /* UTF-16 with a BOM is not JSON we accept either. */
    static const char utf16[] = "\xff\xfe{\0}\0";
    c = (struct srvtest_call){.body = utf16, .body_len = sizeof(utf16) - 1};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    srvtest_resp_free(&r);

    /* \u0000 outside the ids is valid JSON and harmless; inside an unknown field it is ignored. */
    srvtest_post(e.port, "{\"note\":\"a\\u0000b\",\"ids\":[\"a\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    /* An escaped backslash before "u0000" is not a \u0000 escape. */
    srvtest_post(e.port, "{\"ids\":[\"x\\\\u0000\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(data_id_is(&r, 0, "x\\u0000"));
    CU_ASSERT(upstub_count(e.up, "/items/x%5Cu0000") == 1);
    srvtest_resp_free(&r);

    srvtest_get(e.port, "/healthz", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    free(deep);
    srvtest_env_free(&e);
}

/* Ids at the limits that must be accepted: 256 bytes, 4-byte UTF-8, 2^53 - 1. */
static void test_server_id_limits_accepted(void)
{
    struct srvtest_env e;
    START(&e);
    char id[257], body[400];
    memset(id, 'b', 256);
    id[256] = 0;
    snprintf(body, sizeof(body), "{\"ids\":[\"%s\",\"\xf0\x9f\x98\x80\",9007199254740991,-5]}",
             id);
    struct srvtest_resp r;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(str_is(result_at(&r, 0, "id"), id));
    CU_ASSERT(str_is(result_at(&r, 1, "id"), "\xf0\x9f\x98\x80"));
    CU_ASSERT(num_is(result_at(&r, 2, "id"), 9007199254740991.0));
    CU_ASSERT(num_is(result_at(&r, 3, "id"), -5));
    CU_ASSERT(upstub_count(e.up, "/items/%F0%9F%98%80") == 1);
    CU_ASSERT(upstub_count(e.up, "/items/9007199254740991") == 1);
    CU_ASSERT(upstub_count(e.up, "/items/-5") == 1);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- 413 */

static void test_server_too_many_ids(void)
{
    struct srvtest_env e;
    START(&e);
    size_t n = 10000;
    char *body = malloc(n * 8 + 32);
    CU_ASSERT_FATAL(body != NULL);
    size_t k = (size_t)sprintf(body, "{\"ids\":[");
    for (size_t i = 0; i < n; i++)
        k += (size_t)sprintf(body + k, "%s%zu", i ? "," : "", i);
    sprintf(body + k, "]}");
    struct srvtest_resp r;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 413);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "too_many_ids");
    CU_ASSERT(strstr(srvtest_err_message(&r), "1000") != NULL);
    srvtest_resp_free(&r);

    /* Exactly max_batch ids is fine (duplicates included). */
    k = (size_t)sprintf(body, "{\"ids\":[");
    for (size_t i = 0; i < 1000; i++)
        k += (size_t)sprintf(body + k, "%s%zu", i ? "," : "", i % 10);
    sprintf(body + k, "]}");
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&r)), 1000);
    CU_ASSERT_EQUAL(stub_requests(e.up), 10); /* 10 distinct ids */
    srvtest_resp_free(&r);
    free(body);
    srvtest_env_free(&e);
}

static void test_server_body_too_large(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_request_bytes = 1024;
    START_CFG(&e, &cfg);
    char body[4096];
    /* A valid body of exactly the limit is accepted. */
    int k = snprintf(body, sizeof(body), "{\"ids\":[\"a\"]}");
    memset(body + k, ' ', 1024 - (size_t)k);
    body[1024] = 0;
    struct srvtest_resp r;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    struct srvtest_call c = {.body = body, .chunked = true};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    /* One byte over, with Content-Length known, then chunked, then far over. */
    memset(body + k, ' ', 1025 - (size_t)k);
    body[1025] = 0;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 413);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "body_too_large");
    srvtest_resp_free(&r);
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 413);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "body_too_large");
    srvtest_resp_free(&r);
    memset(body + k, ' ', sizeof(body) - 1 - (size_t)k);
    body[sizeof(body) - 1] = 0;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 413);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "body_too_large");
    srvtest_resp_free(&r);
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 413);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "body_too_large");
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(stub_requests(e.up), 2);
    srvtest_get(e.port, "/healthz", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- 404 / 405 */

static void test_server_not_found_and_bad_method(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    srvtest_get(e.port, "/nope", &r);
    CU_ASSERT_EQUAL(r.status, 404);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "not_found");
    srvtest_resp_free(&r);
    srvtest_post(e.port, "{\"ids\":[\"a\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    struct srvtest_call c = {.path = "/v1/batch/", .body = "{\"ids\":[\"a\"]}"};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 404);
    srvtest_resp_free(&r);

    srvtest_get(e.port, "/v1/batch", &r);
    CU_ASSERT_EQUAL(r.status, 405);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "method_not_allowed");
    CU_ASSERT_STRING_EQUAL(r.allow, "POST");
    srvtest_resp_free(&r);
    c = (struct srvtest_call){.method = "PUT", .body = "{\"ids\":[\"a\"]}"};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 405);
    CU_ASSERT_STRING_EQUAL(r.allow, "POST");
    srvtest_resp_free(&r);
    c = (struct srvtest_call){.method = "POST", .path = "/healthz", .body = "{}"};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 405);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "method_not_allowed");
    CU_ASSERT(strstr(r.allow, "GET") != NULL);
    srvtest_resp_free(&r);
    c = (struct srvtest_call){.method = "DELETE", .path = "/metrics"};
    srvtest_call(NULL, e.port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 405);
    CU_ASSERT(strstr(r.allow, "GET") != NULL);
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(stub_requests(e.up), 1);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- 502 */

static void test_server_upstream_status(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"a\",\"status404\",\"b\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_status");
    CU_ASSERT(str_is(srvtest_err_field(&r, "id"), "status404"));
    CU_ASSERT(num_is(srvtest_err_field(&r, "upstream_status"), 404));
    srvtest_resp_free(&r);
    srvtest_post(e.port, "{\"ids\":[7,\"fail\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_status");
    CU_ASSERT(str_is(srvtest_err_field(&r, "id"), "fail"));
    CU_ASSERT(num_is(srvtest_err_field(&r, "upstream_status"), 500));
    srvtest_resp_free(&r);
    /* The longest id, all of it needing escapes, comes back whole in valid JSON. */
    char id[300], body[2048];
    int k = snprintf(id, sizeof(id), "status404");
    memset(id + k, '"', 256 - (size_t)k);
    id[256] = 0;
    k = snprintf(body, sizeof(body), "{\"ids\":[\"a\",\"status404");
    for (int i = 9; i < 256; i++)
        k += snprintf(body + k, sizeof(body) - (size_t)k, "\\\"");
    snprintf(body + k, sizeof(body) - (size_t)k, "\"]}");
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT(r.json != NULL);
    CU_ASSERT(str_is(srvtest_err_field(&r, "id"), id));
    CU_ASSERT(num_is(srvtest_err_field(&r, "upstream_status"), 404));
    srvtest_resp_free(&r);
    k = snprintf(body, sizeof(body), "{\"timeout_ms\":100,\"ids\":[\"sleep60000");
    for (int i = 10; i < 256; i++)
        k += snprintf(body + k, sizeof(body) - (size_t)k, "\\u0001");
    snprintf(body + k, sizeof(body) - (size_t)k, "\"]}");
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 504);
    CU_ASSERT(r.json != NULL);
    const cJSON *got = srvtest_err_field(&r, "id");
    CU_ASSERT(cJSON_IsString(got) && strlen(got->valuestring) == 256 &&
              got->valuestring[255] == 1);
    srvtest_resp_free(&r);
    /* A numeric failing id is reported as a number; 3xx is not success either. */
    srvtest_post(e.port, "{\"ids\":[\"status302\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT(num_is(srvtest_err_field(&r, "upstream_status"), 302));
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

static void test_server_upstream_unreachable(void)
{
    struct srvtest_env e;
    START(&e);
    /* A second server whose upstream port is closed. */
    struct srvtest_env dead = {0};
    struct srv_config cfg;
    srvtest_config(&dead, &cfg);
    uint16_t port = 0;
    int refusing = srvtest_refusing_port(&port);
    CU_ASSERT_FATAL(refusing >= 0);
    snprintf(cfg.upstream, sizeof(cfg.upstream), "http://127.0.0.1:%u/items/{id}", port);
    cfg.connect_timeout_ms = 600000; /* a refusal must not wait for a connect timeout */
    START_CFG(&dead, &cfg);
    struct srvtest_resp r;
    srvtest_post(dead.port, "{\"ids\":[\"a\",\"b\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_unreachable");
    const cJSON *id = srvtest_err_field(&r, "id");
    CU_ASSERT(str_is(id, "a") || str_is(id, "b"));
    CU_ASSERT(r.elapsed_ms < test_ms(1500));
    srvtest_resp_free(&r);
    /* A reset mid-body and an empty reply are unreachable too. */
    srvtest_post(e.port, "{\"ids\":[\"reset\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_unreachable");
    CU_ASSERT(str_is(srvtest_err_field(&r, "id"), "reset"));
    srvtest_resp_free(&r);
    srvtest_post(e.port, "{\"ids\":[\"empty\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_unreachable");
    srvtest_resp_free(&r);
    srvtest_env_free(&dead);
    close(refusing);
    srvtest_env_free(&e);
}

static void test_server_upstream_too_large(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_body = 1000;
    START_CFG(&e, &cfg);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"a\",\"big5000000\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_too_large");
    CU_ASSERT(str_is(srvtest_err_field(&r, "id"), "big5000000"));
    srvtest_resp_free(&r);
    /* At the cap it is fine, and a non-JSON body comes back as a JSON string. */
    srvtest_post(e.port, "{\"ids\":[\"big1000\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    const cJSON *d = result_at(&r, 0, "data");
    CU_ASSERT(cJSON_IsString(d) && strlen(d->valuestring) == 1000 && d->valuestring[999] == 'x');
    srvtest_resp_free(&r);
    srvtest_post(e.port, "{\"ids\":[\"big1001\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_too_large");
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* --max-response-bytes: duplicates repeat a body at each position, so 100 positions of one
 * 2,000-byte body need ~200 KB; with a 64 KB cap the batch fails with upstream_too_large (and
 * fetches the body once), while the same ids fit under the default cap. */
static void test_server_response_cap(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_response_bytes = 64 * 1024;
    START_CFG(&e, &cfg);
    char body[2048];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[");
    for (int i = 0; i < 100; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"big2000\"", i ? "," : "");
    snprintf(body + k, sizeof(body) - k, "]}");
    struct srvtest_resp r;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_too_large");
    CU_ASSERT_PTR_NOT_NULL(strstr(srvtest_err_message(&r), "--max-response-bytes"));
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/big2000"), 1);
    srvtest_resp_free(&r);
    /* 30 positions (~60 KB) fit. */
    k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[");
    for (int i = 0; i < 30; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"big2000\"", i ? "," : "");
    snprintf(body + k, sizeof(body) - k, "]}");
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- 504 and deadlines */

/* A 504 naming 'id', not before 'min_ms' (a deadline never fires early, so this tells which
 * deadline won) and long before the 60 s upstream delay would have ended. */
static void expect_deadline(uint16_t port, const char *body, const char *hdr, const char *id,
                            int64_t min_ms)
{
    const char *h[] = {hdr, NULL};
    struct srvtest_resp r;
    srvtest_post(port, body, hdr ? h : NULL, &r);
    bool ok = r.status == 504 && !strcmp(srvtest_err_code(&r), "deadline_exceeded") &&
              str_is(srvtest_err_field(&r, "id"), id) && r.elapsed_ms >= min_ms &&
              r.elapsed_ms < test_ms(10000);
    if (!ok)
        fprintf(stderr, "\n  %s | %s: %ld in %lld ms: %s\n", body, hdr ? hdr : "", r.status,
                (long long)r.elapsed_ms, r.body ? r.body : "");
    CU_ASSERT(ok);
    srvtest_resp_free(&r);
}

static void test_server_deadline(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_timeout_ms = 400;
    cfg.timeout_ms = 300;
    START_CFG(&e, &cfg);
    /* Each sleep id takes 60 s. The 504's earliest time and the X-Request-Timeout-Ms the
     * upstream saw (never above the effective deadline) show which deadline won. */
    expect_deadline(e.port, "{\"ids\":[\"sleep60000a\"],\"timeout_ms\":150}", NULL,
                    "sleep60000a", 150);
    expect_deadline(e.port, "{\"ids\":[\"sleep60000b\"]}", "X-Request-Timeout-Ms: 150",
                    "sleep60000b", 150);
    /* Both given: the smaller wins, whichever carries it (c: the header, d: the body). The 504
     * alone cannot tell 150 from the 400 of the other side clamped; the upstream's header does. */
    expect_deadline(e.port, "{\"ids\":[\"sleep60000c\"],\"timeout_ms\":100000}",
                    "X-Request-Timeout-Ms: 150", "sleep60000c", 150);
    expect_deadline(e.port, "{\"ids\":[\"sleep60000d\"],\"timeout_ms\":150}",
                    "X-Request-Timeout-Ms: 100000", "sleep60000d", 150);
    /* No timeout given: the default (300); a huge one: clamped to max_timeout_ms (400). */
    expect_deadline(e.port, "{\"ids\":[\"sleep60000e\"]}", NULL, "sleep60000e", 300);
    expect_deadline(e.port, "{\"ids\":[\"sleep60000f\"],\"timeout_ms\":60000}", NULL,
                    "sleep60000f", 400);
    expect_deadline(e.port, "{\"ids\":[\"sleep60000g\"]}", "X-Request-Timeout-Ms: 60000",
                    "sleep60000g", 400);
    expect_deadline(e.port, "{\"ids\":[\"sleep60000h\"]}",
                    "X-Request-Timeout-Ms: 000099999999999999999999999", "sleep60000h", 400);
    /* The upstream saw the remaining deadline, never more than the effective one. */
    struct upstub_req q;
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/sleep60000a", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 150);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/sleep60000b", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 150);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/sleep60000c", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 150);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/sleep60000d", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 150);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/sleep60000e", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 300);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/sleep60000f", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 400);
    /* Every timed-out fetch was closed at the upstream, not left to run. */
    CU_ASSERT(srvtest_wait_stub_canceled(e.up, 8, SRVTEST_WAIT_MS));

    /* A batch that finishes in time is a 200 and the upstream sees a sane header. */
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"sleep20\",\"z\"],\"timeout_ms\":350}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/z", &q));
    CU_ASSERT(q.has_timeout_ms && atoll(q.timeout_ms) > 0 && atoll(q.timeout_ms) <= 350);
    srvtest_env_free(&e);
}

/* The reported id is one still pending at the deadline, not one that finished. */
static void test_server_deadline_names_pending_id(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.limit = 2;
    START_CFG(&e, &cfg);
    /* With limit 2 the third id waits in the queue; the first two finish, the third hangs.
     * The deadline is far longer than the fast fetches take, scaled like every bound. */
    char body[160];
    int64_t tmo = test_ms(1500);
    snprintf(body, sizeof(body),
             "{\"ids\":[\"a\",\"b\",\"sleep60000x\",\"c\",\"d\"],\"timeout_ms\":%lld}",
             (long long)tmo);
    expect_deadline(e.port, body, NULL, "sleep60000x", tmo);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- results */

static void test_server_results_in_request_order(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    srvtest_post(e.port,
                 "{\"ids\":[\"sleep400\",\"sleep200\",\"sleep1\",\"plain\",7,-3,0],"
                 "\"extra\":{\"ignored\":true}}",
                 NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(strstr(r.content_type, "application/json") != NULL);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&r)), 7);
    const char *want[] = {"sleep400", "sleep200", "sleep1", "plain", "7", "-3", "0"};
    for (int i = 0; i < 7; i++) {
        CU_ASSERT(num_is(result_at(&r, i, "status"), 200));
        CU_ASSERT(data_id_is(&r, i, want[i]));
    }
    for (int i = 0; i < 4; i++)
        CU_ASSERT(str_is(result_at(&r, i, "id"), want[i]));
    /* Numeric ids are echoed as numbers. */
    CU_ASSERT(num_is(result_at(&r, 4, "id"), 7));
    CU_ASSERT(num_is(result_at(&r, 5, "id"), -3));
    CU_ASSERT(num_is(result_at(&r, 6, "id"), 0));
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

static void test_server_duplicates_fetched_once(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"d\",\"d\",7,\"7\",\"d\",\"e\",7]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&r)), 7);
    CU_ASSERT(str_is(result_at(&r, 0, "id"), "d"));
    CU_ASSERT(str_is(result_at(&r, 1, "id"), "d"));
    CU_ASSERT(num_is(result_at(&r, 2, "id"), 7));
    CU_ASSERT(str_is(result_at(&r, 3, "id"), "7"));
    CU_ASSERT(str_is(result_at(&r, 4, "id"), "d"));
    CU_ASSERT(str_is(result_at(&r, 5, "id"), "e"));
    CU_ASSERT(num_is(result_at(&r, 6, "id"), 7));
    for (int i = 0; i < 7; i++)
        CU_ASSERT(data_id_is(&r, i, i == 5 ? "e" : (i == 2 || i == 3 || i == 6) ? "7" : "d"));
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/d"), 1);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/7"), 1);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/e"), 1);
    CU_ASSERT_EQUAL(stub_requests(e.up), 3);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* Ids that need escaping cannot change the host, port, path prefix or query, nor become a
 * dot-segment; the stub sees the request-target exactly as sent. */
static void test_server_ids_are_escaped(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    upstub_url(e.up, cfg.upstream, sizeof(cfg.upstream), "/items/{id}?v=2");
    START_CFG(&e, &cfg);
    static const struct {
        const char *json; /* the id as a JSON string literal */
        const char *dec;  /* its value */
        const char *enc;  /* expected path segment */
    } ids[] = {
        {"\"..\"", "..", "%2E%2E"},
        {"\".\"", ".", "%2E"},
        {"\"/\"", "/", "%2F"},
        {"\"?\"", "?", "%3F"},
        {"\"#\"", "#", "%23"},
        {"\"%\"", "%", "%25"},
        {"\"%41\"", "%41", "%2541"},
        {"\"@\"", "@", "%40"},
        {"\" \"", " ", "%20"},
        {"\"a/../b\"", "a/../b", "a%2F..%2Fb"},
        {"\"../x\"", "../x", "..%2Fx"},
        {"\"\xc3\xbc\"", "\xc3\xbc", "%C3%BC"},
        {"\"\\u00fc\"", "\xc3\xbc", "%C3%BC"}, /* the same id escaped in JSON: deduplicated */
        {"\"a?v=3&w\"", "a?v=3&w", "a%3Fv%3D3%26w"},
        {"\"x:y\"", "x:y", "x%3Ay"},
        {"\"\\\\\"", "\\", "%5C"},
        {"\"\\r\\n\"", "\r\n", "%0D%0A"},
        {"\"...\"", "...", "..."},
        {"\"A-z_0.9~\"", "A-z_0.9~", "A-z_0.9~"},
    };
    size_t n = sizeof(ids) / sizeof(ids[0]);
    char body[2048];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[");
    for (size_t i = 0; i < n; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s%s", i ? "," : "", ids[i].json);
    snprintf(body + k, sizeof(body) - k, "]}");
    struct srvtest_resp r;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&r)), (int)n);
    for (size_t i = 0; i < n; i++) {
        char target[128];
        snprintf(target, sizeof(target), "/items/%s?v=2", ids[i].enc);
        bool seen = upstub_count(e.up, target) == 1;
        bool echo = str_is(result_at(&r, (int)i, "id"), ids[i].dec);
        bool data = data_id_is(&r, (int)i, ids[i].dec);
        if (!seen || !echo || !data)
            fprintf(stderr, "\n  id %s: seen %d echo %d data %d\n", ids[i].json, seen, echo,
                    data);
        CU_ASSERT(seen && echo && data);
    }
    /* Nothing else reached the stub, and every target kept the prefix and the query. */
    struct upstub_req log[64];
    size_t got = upstub_log(e.up, log, 64);
    CU_ASSERT_EQUAL(got, n - 1); /* ü twice: one fetch */
    for (size_t i = 0; i < got; i++) {
        const char *t = log[i].target;
        size_t tl = strlen(t);
        bool ok = !strncmp(t, "/items/", 7) && tl > 11 && !strcmp(t + tl - 4, "?v=2") &&
                  !strchr(t, '#') && strchr(t, '?') == t + tl - 4 && !strchr(t + 7, '/');
        CU_ASSERT(ok);
    }
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

static void test_server_data_spliced_or_string(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"text1\",\"obj\",\"status201\",\"q\\\"x\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(str_is(result_at(&r, 0, "data"), "text"));
    CU_ASSERT(data_id_is(&r, 1, "obj"));
    CU_ASSERT(num_is(result_at(&r, 2, "status"), 201));
    const cJSON *d = result_at(&r, 2, "data");
    CU_ASSERT(cJSON_IsObject(d) && num_is(cJSON_GetObjectItemCaseSensitive(d, "status"), 201));
    CU_ASSERT(data_id_is(&r, 3, "q\"x"));
    /* The JSON body was spliced raw, not re-encoded. */
    CU_ASSERT(r.body && strstr(r.body, "\"data\":{\"id\":\"obj\"}") != NULL);
    srvtest_resp_free(&r);
    /* Empty ids give an empty result list. */
    srvtest_post(e.port, "{\"ids\":[]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(srvtest_results(&r) && cJSON_GetArraySize(srvtest_results(&r)) == 0);
    CU_ASSERT(r.body && !strncmp(r.body, "{\"results\":[]}", 14));
    srvtest_resp_free(&r);
    srvtest_post(e.port, " {\"timeout_ms\":5, \"ids\" : [ ] }\n", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(srvtest_results(&r) && cJSON_GetArraySize(srvtest_results(&r)) == 0);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- request ids */

static void test_server_request_id(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    const char *h[] = {"X-Request-Id: req-abc.123_XYZ", NULL};
    srvtest_post(e.port, "{\"ids\":[\"r1\"]}", h, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.request_id, "req-abc.123_XYZ");
    srvtest_resp_free(&r);
    struct upstub_req q;
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/r1", &q));
    CU_ASSERT(q.has_request_id);
    CU_ASSERT_STRING_EQUAL(q.request_id, "req-abc.123_XYZ");

    /* Generated when absent: non-empty, passed upstream, different per request. */
    srvtest_post(e.port, "{\"ids\":[\"r2\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(strlen(r.request_id) >= 8);
    char first[256];
    snprintf(first, sizeof(first), "%s", r.request_id);
    srvtest_resp_free(&r);
    CU_ASSERT_FATAL(upstub_find(e.up, "/items/r2", &q));
    CU_ASSERT_STRING_EQUAL(q.request_id, first);
    srvtest_post(e.port, "{\"ids\":[\"r3\"]}", NULL, &r);
    CU_ASSERT(r.request_id[0] && strcmp(r.request_id, first) != 0);
    srvtest_resp_free(&r);

    /* Errors carry it too, and every other route. */
    const char *h2[] = {"X-Request-Id: err-1", NULL};
    srvtest_post(e.port, "{\"ids\":[\"fail\"]}", h2, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(r.request_id, "err-1");
    srvtest_resp_free(&r);
    srvtest_get(e.port, "/healthz", &r);
    CU_ASSERT(r.request_id[0] != 0);
    srvtest_resp_free(&r);
    /* The largest accepted one: 128 visible characters. */
    char rid[160], line[200];
    memset(rid, 'k', 128);
    rid[128] = 0;
    snprintf(line, sizeof(line), "X-Request-Id: %s", rid);
    const char *h3[] = {line, NULL};
    srvtest_post(e.port, "{\"ids\":[\"r4\"]}", h3, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.request_id, rid);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- modes and upstreams */

/* The request's options are checked like everything else. */
static void test_server_request_options_checked(void)
{
    struct srvtest_env e;
    START(&e);
    static const struct {
        const char *body, *want;
    } bad[] = {
        {"{\"ids\":[\"a\"],\"mode\":\"some\"}", "\"mode\" must be"},
        {"{\"ids\":[\"a\"],\"mode\":1}", "\"mode\" must be"},
        {"{\"ids\":[\"a\"],\"hedge\":\"no\"}", "\"hedge\" must be true or false"},
        {"{\"ids\":[\"a\"],\"coalesce\":0}", "\"coalesce\" must be true or false"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct srvtest_resp r;
        srvtest_post(e.port, bad[i].body, NULL, &r);
        CU_ASSERT_EQUAL(r.status, 400);
        CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "bad_request");
        CU_ASSERT(strstr(srvtest_err_message(&r), bad[i].want) != NULL);
        srvtest_resp_free(&r);
    }
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"a\"],\"mode\":\"all\",\"hedge\":false,\"coalesce\":true}",
                 NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(stub_requests(e.up), 1);
    srvtest_env_free(&e);
}

/* mode settled over HTTP: 200, one entry per position, errors in place. */
static void test_server_settled_mode(void)
{
    struct srvtest_env e;
    START(&e);
    struct srvtest_resp r;
    char body[200];
    snprintf(body, sizeof(body),
             "{\"mode\":\"settled\",\"timeout_ms\":%lld,"
             "\"ids\":[\"a\",\"fail\",\"sleep60000-s\",\"status418\",\"a\"]}",
             (long long)test_ms(1000));
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    const cJSON *res = srvtest_results(&r);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(res), 5);
    static const char *const want[] = {NULL, "upstream_status", "deadline_exceeded",
                                       "upstream_status", NULL};
    for (int i = 0; i < 5; i++) {
        const cJSON *it = cJSON_GetArrayItem(res, i);
        const cJSON *err = cJSON_GetObjectItemCaseSensitive(it, "error");
        if (!want[i]) {
            CU_ASSERT(err == NULL && num_is(cJSON_GetObjectItem(it, "status"), 200));
            continue;
        }
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
        CU_ASSERT(cJSON_IsString(code) && !strcmp(code->valuestring, want[i]));
        CU_ASSERT(cJSON_IsString(cJSON_GetObjectItem(err, "message")));
    }
    CU_ASSERT(num_is(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(res, 3), "error"),
                                         "upstream_status"),
                     418));
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* Several upstreams: the first refuses connections; with one retry every batch succeeds, and
 * after --eject-after failures the dead one is ejected (metrics and no more attempts). */
static void test_server_several_upstreams_failover(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    uint16_t port = 0;
    int refusing = srvtest_refusing_port(&port);
    CU_ASSERT_FATAL(refusing >= 0);
    char live[256];
    upstub_url(e.up, live, sizeof(live), "/items/{id}");
    snprintf(cfg.upstream, sizeof(cfg.upstream), "http://127.0.0.1:%u/items/{id}\n%s", port, live);
    cfg.retries = 1;
    cfg.eject_after = 2;
    cfg.max_ejected_pct = 50;
    START_CFG(&e, &cfg);
    int failed = 0;
    for (int i = 0; i < 30; i++) {
        char body[64];
        snprintf(body, sizeof(body), "{\"ids\":[\"f%d\"]}", i);
        struct srvtest_resp r;
        srvtest_post(e.port, body, NULL, &r);
        failed += r.status != 200;
        srvtest_resp_free(&r);
    }
    CU_ASSERT_EQUAL(failed, 0);
    char name[160];
    snprintf(name, sizeof(name),
             "fanout_upstream_ejected{upstream=\"127.0.0.1:%u\",member=\"127.0.0.1:%u\"}", port,
             port);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, name), 1);
    snprintf(name, sizeof(name),
             "fanout_upstream_fetches_total{upstream=\"127.0.0.1:%u\",member=\"127.0.0.1:%u\","
             "result=\"unreachable\"}",
             port, port);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, name), 2);
    CU_ASSERT_EQUAL(stub_requests(e.up), 30);
    srvtest_env_free(&e);
    close(refusing);
}

static CU_TestInfo server_api_tests[] = {
    {"400 bad_request: every malformed input, index named", test_server_bad_requests},
    {"hostile JSON: huge, truncated, not UTF-8, deeply nested", test_server_hostile_json},
    {"ids at the limits are accepted", test_server_id_limits_accepted},
    {"413 too_many_ids", test_server_too_many_ids},
    {"413 body_too_large, Content-Length and chunked", test_server_body_too_large},
    {"404 not_found, 405 method_not_allowed with Allow", test_server_not_found_and_bad_method},
    {"502 upstream_status with id and status", test_server_upstream_status},
    {"502 upstream_unreachable", test_server_upstream_unreachable},
    {"502 upstream_too_large", test_server_upstream_too_large},
    {"502 upstream_too_large past --max-response-bytes", test_server_response_cap},
    {"504 deadline: body, header, smaller wins, clamp", test_server_deadline},
    {"504 names a pending id", test_server_deadline_names_pending_id},
    {"results in request order, numeric ids echoed", test_server_results_in_request_order},
    {"duplicates fetched once, reported at each position", test_server_duplicates_fetched_once},
    {"ids are escaped: no dot-segments, no host/query change", test_server_ids_are_escaped},
    {"JSON data spliced, other bodies as strings, empty ids", test_server_data_spliced_or_string},
    {"X-Request-Id echoed, passed upstream, generated", test_server_request_id},
    {"mode, hedge and coalesce are checked", test_server_request_options_checked},
    {"mode settled: 200, errors at their positions", test_server_settled_mode},
    {"several upstreams: failover with retries, ejection", test_server_several_upstreams_failover},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(server_api, server_api_tests)
