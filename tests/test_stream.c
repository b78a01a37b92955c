/* Tests for NDJSON streaming (Accept: application/x-ndjson) against an in-process server and
 * upstream stub: lines in completion order, every position exactly once, the done line last,
 * the first error ends the stream (mode all), a client gone cancels the rest, and the answer's
 * memory is bounded by --max-response-bytes whatever the reader does. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "server/batch/batch.h"
#include "tests/srvtest.h"
#include "tests/support.h"

static const char *const ndjson[] = {"Accept: application/x-ndjson", NULL};

/* The lines of a stream body, parsed. */
struct lines {
    cJSON *line[128];
    int n;
    bool bad; /* a line that is not a JSON object, or too many */
};

static void lines_parse(const char *body, size_t len, struct lines *l)
{
    memset(l, 0, sizeof(*l));
    const char *p = body, *end = body + len;
    while (p && p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) { /* every line ends with a newline */
            l->bad = true;
            return;
        }
        cJSON *j = cJSON_ParseWithLength(p, (size_t)(nl - p));
        if (!cJSON_IsObject(j) || l->n == 128) {
            cJSON_Delete(j);
            l->bad = true;
            return;
        }
        l->line[l->n++] = j;
        p = nl + 1;
    }
}

static void lines_free(struct lines *l)
{
    for (int i = 0; i < l->n; i++)
        cJSON_Delete(l->line[i]);
}

static int index_of(const cJSON *line)
{
    const cJSON *i = cJSON_GetObjectItemCaseSensitive(line, "index");
    return cJSON_IsNumber(i) ? i->valueint : -1;
}

/* The line for position 'pos', and its place in the stream (-1 if none). */
static int place_of(const struct lines *l, int pos)
{
    for (int i = 0; i < l->n; i++)
        if (index_of(l->line[i]) == pos)
            return i;
    return -1;
}

static const char *err_code(const cJSON *o)
{
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(o, "error"),
                                                      "code");
    return cJSON_IsString(c) ? c->valuestring : "";
}

static double num(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

/* Settled mode: a line per position as it completes (the silent id's at the deadline, last of
 * all), duplicates at each position, errors in place, then the done line with the counts. */
static void test_stream_settled_completion_order(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    char body[256];
    snprintf(body, sizeof(body),
             "{\"ids\":[\"fault-silent\",\"x\",\"x\",\"status404-y\",5],\"mode\":\"settled\","
             "\"timeout_ms\":%lld}", (long long)test_ms(2000));
    struct srvtest_resp r;
    srvtest_post(e.port, body, ndjson, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.content_type, "application/x-ndjson");
    struct lines l;
    lines_parse(r.body ? r.body : "", r.len, &l);
    CU_ASSERT_FALSE(l.bad);
    CU_ASSERT_EQUAL_FATAL(l.n, 6);
    for (int pos = 0; pos < 5; pos++) {
        int at = place_of(&l, pos);
        CU_ASSERT(at >= 0 && at < 5);
        for (int j = at + 1; j < 5; j++) /* exactly once */
            CU_ASSERT(index_of(l.line[j]) != pos);
    }
    CU_ASSERT_EQUAL(place_of(&l, 0), 4); /* the deadline came after every other answer */
    CU_ASSERT_STRING_EQUAL(err_code(l.line[4]), "deadline_exceeded");
    CU_ASSERT_EQUAL(num(l.line[place_of(&l, 1)], "status"), 200);
    CU_ASSERT_EQUAL(num(l.line[place_of(&l, 2)], "status"), 200);
    CU_ASSERT_STRING_EQUAL(err_code(l.line[place_of(&l, 3)]), "upstream_status");
    CU_ASSERT_EQUAL(num(l.line[place_of(&l, 4)], "id"), 5);
    const cJSON *done = l.line[5];
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(done, "done")));
    CU_ASSERT_EQUAL(num(done, "results"), 3);
    CU_ASSERT_EQUAL(num(done, "errors"), 2);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/x"), 1);
    lines_free(&l);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

static bool canceled_counted(void *arg)
{
    const struct srvtest_env *e = arg;
    return srvtest_metric(e->port, "fanout_fetches_total{result=\"canceled\"}") >= 1;
}

/* The silent id's fetch was aborted: counted canceled, and closed at the upstream when it had
 * reached it (the batch may end before its request was even written). */
static void expect_silent_aborted(struct srvtest_env *e)
{
    CU_ASSERT(test_wait_until(canceled_counted, e, SRVTEST_WAIT_MS));
    if (upstub_count(e->up, "/items/fault-silent") > 0)
        CU_ASSERT(srvtest_wait_stub_canceled(e->up, 1, SRVTEST_WAIT_MS));
}

/* Mode all: the first error gets its line and a done line with the error; the rest is
 * canceled (closed at the upstream) and gets no line. */
static void test_stream_first_error_ends_it(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"a\",\"fail-b\",\"fault-silent\",\"a\"],\"timeout_ms\":60000}",
                 ndjson, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    struct lines l;
    lines_parse(r.body ? r.body : "", r.len, &l);
    CU_ASSERT_FALSE(l.bad);
    CU_ASSERT_FATAL(l.n >= 2);
    const cJSON *done = l.line[l.n - 1];
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(done, "done")));
    CU_ASSERT_STRING_EQUAL(err_code(done), "upstream_status");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(done, "error"),
                                                       "id");
    CU_ASSERT(cJSON_IsString(id) && !strcmp(id->valuestring, "fail-b"));
    CU_ASSERT_EQUAL(place_of(&l, 1), l.n - 2); /* the error's line, just before the end */
    CU_ASSERT_STRING_EQUAL(err_code(l.line[l.n - 2]), "upstream_status");
    CU_ASSERT_EQUAL(place_of(&l, 2), -1); /* canceled: no line */
    expect_silent_aborted(&e);
    lines_free(&l);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* Opens 'c' and sends an NDJSON batch as HTTP/1.0 (the answer is then delimited by the close).
 * Returns false if it could not. */
static bool send_stream_request(struct srvtest_raw *c, uint16_t port, const char *body)
{
    if (!srvtest_raw_open(c, port))
        return false;
    char req[4096];
    int n = snprintf(req, sizeof(req),
                     "POST /v1/batch HTTP/1.0\r\nHost: t\r\nAccept: application/x-ndjson\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    if (n < 0 || (size_t)n >= sizeof(req) || !srvtest_raw_write(c, req, (size_t)n)) {
        srvtest_raw_close(c);
        return false;
    }
    return true;
}

static bool first_line_in(const struct srvtest_raw *c)
{
    return strstr(c->buf, "\"index\":0") != NULL;
}

/* A client that goes away after the first line cancels the rest: the silent id's fetch is
 * closed at the upstream, and the flight counted abandoned. */
static void test_stream_client_gone_cancels(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_raw *c = malloc(sizeof(*c));
    CU_ASSERT_FATAL(c != NULL);
    CU_ASSERT_FATAL(
        send_stream_request(c, e.port, "{\"ids\":[\"a\",\"fault-silent\"],\"timeout_ms\":60000}"));
    CU_ASSERT(srvtest_raw_read(c, first_line_in, SRVTEST_WAIT_MS)); /* the first line */
    CU_ASSERT_EQUAL(srvtest_raw_status(c), 200);
    CU_ASSERT_PTR_NULL(strstr(c->buf, "\"done\""));
    srvtest_raw_close(c);
    free(c);
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    expect_silent_aborted(&e);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_flights_abandoned_total"), 1);
    srvtest_env_free(&e);
}

/* The slowest reader, one that reads nothing until every fetch is done: the answer waiting for
 * it stays within --max-response-bytes (positions past the cap get upstream_too_large), and it
 * then reads every line and the done line. */
static void test_stream_slow_reader_bounded_by_cap(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_response_bytes = 16 * 1024;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    char body[2048];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[");
    for (int i = 0; i < 20; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"big2000-%d\"", i ? "," : "", i);
    snprintf(body + k, sizeof(body) - k, "],\"mode\":\"settled\"}");
    struct srvtest_raw *c = malloc(sizeof(*c));
    CU_ASSERT_FATAL(c != NULL && send_stream_request(c, e.port, body));
    for (int i = 0; i < 20; i++) { /* every fetch answered before a byte is read */
        char t[64];
        snprintf(t, sizeof(t), "/items/big2000-%d", i);
        CU_ASSERT(srvtest_wait_stub_target(e.up, t, 1, SRVTEST_WAIT_MS));
    }
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    CU_ASSERT(srvtest_raw_read(c, NULL, SRVTEST_WAIT_MS)); /* to the close */
    CU_ASSERT_FALSE(c->clipped);
    srvtest_raw_close(c);
    const char *buf = c->buf;
    size_t len = c->len;
    const char *start = strstr(buf, "\r\n\r\n");
    CU_ASSERT_FATAL(start != NULL);
    start += 4;
    size_t blen = len - (size_t)(start - buf);
    CU_ASSERT(blen <= cfg.max_response_bytes + 20 * 200); /* the cap, plus short error lines */
    struct lines l;
    lines_parse(start, blen, &l);
    CU_ASSERT_FALSE(l.bad);
    if (l.n != 21)
        fprintf(stderr, "\n  %d lines (bad %d): %.300s\n", l.n, l.bad, buf);
    CU_ASSERT_EQUAL_FATAL(l.n, 21);
    int ok = 0, big = 0;
    for (int pos = 0; pos < 20; pos++) {
        int at = place_of(&l, pos);
        CU_ASSERT_FATAL(at >= 0);
        ok += num(l.line[at], "status") == 200;
        big += !strcmp(err_code(l.line[at]), "upstream_too_large");
    }
    CU_ASSERT_EQUAL(ok + big, 20);
    CU_ASSERT(ok >= 5 && big >= 5); /* 2 KB bodies: about 7 fit in 16 KiB */
    CU_ASSERT_EQUAL(num(l.line[20], "results"), ok);
    CU_ASSERT_EQUAL(num(l.line[20], "errors"), big);
    lines_free(&l);
    free(c);
    srvtest_env_free(&e);
}

/* A batch large enough to spread its fetches over both fetch loops (the limit above its 100
 * ids, BATCH_SPREAD_MIN and more at once): every position's line exactly once with its own id's
 * answer, the done line last with the counts, one upstream fetch per distinct id. */
static void test_stream_large_batch_spread(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.fetch_threads = 2;
    cfg.limit = 200;
    cfg.spread_min = BATCH_SPREAD_MIN;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    enum { N = 100 };
    char body[4096];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"mode\":\"settled\",\"ids\":[");
    for (int i = 0; i < N; i++) /* every 7th a 404 */
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"%sq%d\"", i ? "," : "",
                              i % 7 == 3 ? "status404-" : "", i);
    snprintf(body + k, sizeof(body) - k, "]}");
    struct srvtest_resp r;
    srvtest_post(e.port, body, ndjson, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    struct lines l;
    lines_parse(r.body ? r.body : "", r.len, &l);
    CU_ASSERT_FALSE(l.bad);
    CU_ASSERT_EQUAL_FATAL(l.n, N + 1);
    int wrong = 0, errors = 0;
    for (int pos = 0; pos < N; pos++) {
        int at = place_of(&l, pos);
        if (at < 0 || at >= N) {
            wrong++;
            continue;
        }
        for (int j = at + 1; j < N; j++) /* exactly once */
            wrong += index_of(l.line[j]) == pos;
        if (pos % 7 == 3) {
            errors++;
            wrong += strcmp(err_code(l.line[at]), "upstream_status") != 0;
            continue;
        }
        char want[32];
        snprintf(want, sizeof(want), "q%d", pos);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(l.line[at], "data"), "id");
        wrong += !cJSON_IsString(id) || strcmp(id->valuestring, want) != 0;
    }
    CU_ASSERT_EQUAL(wrong, 0);
    const cJSON *done = l.line[N];
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(done, "done")));
    CU_ASSERT_EQUAL(num(done, "results"), N - errors);
    CU_ASSERT_EQUAL(num(done, "errors"), errors);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_flights_started_total"), N);
    lines_free(&l);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* --spread-min spreads a large batch in the server: with two fetch loops of one upstream
 * connection each and every id held at the stub, two requests out at once can only be one from
 * each loop. The client then goes away, and every fetch is closed at the upstream. */
static void test_stream_server_spreads_large_batch(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.fetch_threads = 2;
    cfg.max_conns = 2;
    cfg.limit = 64;
    cfg.spread_min = BATCH_SPREAD_MIN;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    char body[2048];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[");
    for (int i = 0; i < 64; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"sleep60000-%d\"", i ? "," : "", i);
    snprintf(body + k, sizeof(body) - k, "],\"timeout_ms\":60000}");
    struct srvtest_raw *c = malloc(sizeof(*c));
    CU_ASSERT_FATAL(c != NULL && send_stream_request(c, e.port, body));
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 2, SRVTEST_WAIT_MS));
    /* Every id's flight exists (on a loaded machine the last ones may start after the first
     * two requests are out) before the client goes. */
    CU_ASSERT(srvtest_wait_metric(e.port, "fanout_flights_started_total", 64, SRVTEST_WAIT_MS));
    srvtest_raw_close(c);
    free(c);
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    CU_ASSERT(srvtest_wait_stub_canceled(e.up, 2, SRVTEST_WAIT_MS));
    /* The calls wind down on the loops after the connection's request has ended: wait for the
     * count, then check it is no more than every flight. */
    CU_ASSERT(srvtest_wait_metric(e.port, "fanout_flights_abandoned_total", 64, SRVTEST_WAIT_MS));
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_flights_abandoned_total"), 64);
    srvtest_env_free(&e);
}

static CU_TestInfo stream_tests[] = {
    {"settled: completion order, each position once, done last", test_stream_settled_completion_order},
    {"mode all: the first error's line, then done with the error", test_stream_first_error_ends_it},
    {"a client gone mid-stream cancels the rest", test_stream_client_gone_cancels},
    {"the slowest reader: memory within --max-response-bytes", test_stream_slow_reader_bounded_by_cap},
    {"a large batch spread over both loops: each line once, done last", test_stream_large_batch_spread},
    {"--spread-min: the server spreads a large batch over its loops",
     test_stream_server_spreads_large_batch},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(stream, stream_tests)
