/* End-to-end tests of the batch path's concurrency and lifecycle: admission (503), first error
 * cancels the rest, client disconnect, the per-request limit, keep-alive, drain and shutdown
 * (threads, fds and memory back to baseline), and many concurrent batches for make tsan.
 *
 * Each test starts its own upstream stub and server in-process (tests/srvtest.h). Requests that
 * must run concurrently go through background threads that only record their response; the test
 * thread waits on observable state (the stub's counters, the server's in-flight gauge) with
 * bounded waits and asserts after joining. Times appear only as generous correctness bounds. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/srvtest.h"
#include "tests/support.h"

static uint64_t stub_stat(struct upstub *up, size_t off)
{
    struct upstub_stats st;
    upstub_stats(up, &st);
    return *(const uint64_t *)((const char *)&st + off);
}
#define STUB(up, field) stub_stat(up, offsetof(struct upstub_stats, field))

/* ---------------------------------------------------------------- 503 overloaded */

static void test_server_overloaded(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_requests = 2;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    struct srvtest_bg held[2] = {
        {.port = e.port, .call = {.body = "{\"ids\":[\"sleep600a\"]}"}},
        {.port = e.port, .call = {.body = "{\"ids\":[\"sleep600b\"]}"}},
    };
    for (int i = 0; i < 2; i++)
        CU_ASSERT_FATAL(srvtest_bg_start(&held[i]) == 0);
    /* Both admitted: their fetches are at the stub. */
    bool holding = srvtest_wait_stub_in_flight(e.up, 2, SRVTEST_WAIT_MS);
    CU_ASSERT(holding);
    CU_ASSERT_EQUAL(srv_in_flight(e.srv), 2);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_requests_in_flight"), 2);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_admission_rejections_total"), 0);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"c\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "overloaded");
    CU_ASSERT(atoi(r.retry_after) >= 1);
    srvtest_resp_free(&r);
    /* Probes are not batches: still served. */
    srvtest_get(e.port, "/healthz", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_admission_rejections_total"), 1);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/c"), 0);
    for (int i = 0; i < 2; i++) {
        srvtest_bg_join(&held[i]);
        CU_ASSERT_EQUAL(held[i].resp.status, 200);
        srvtest_resp_free(&held[i].resp);
    }
    /* Capacity is back once they are answered. */
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    srvtest_post(e.port, "{\"ids\":[\"c\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(srvtest_metric(e.port, "fanout_requests_in_flight"), 0);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- first error */

static void test_server_first_error_cancels_the_rest(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.limit = 3;
    cfg.fetch_threads = 1;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    /* Warm three connections so that the three transfers below go out in one pass. */
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"w1\",\"w2\",\"w3\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    uint64_t canceled0 = STUB(e.up, canceled);
    /* limit 3: two 3 s sleeps and the failure run; q1..q3 wait in the queue and never start. */
    srvtest_post(e.port,
                 "{\"ids\":[\"sleep3000a\",\"sleep3000b\",\"fail\",\"q1\",\"q2\",\"q3\"]}",
                 NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_status");
    const cJSON *id = srvtest_err_field(&r, "id");
    CU_ASSERT(cJSON_IsString(id) && !strcmp(id->valuestring, "fail"));
    CU_ASSERT(r.elapsed_ms < 1500); /* not waiting for the 3 s siblings */
    srvtest_resp_free(&r);
    /* The siblings that reached the stub were closed there. */
    uint64_t sent = upstub_count(e.up, "/items/sleep3000a") + upstub_count(e.up, "/items/sleep3000b");
    CU_ASSERT(sent >= 1);
    CU_ASSERT(srvtest_wait_stub_canceled(e.up, canceled0 + sent, 2500));
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/q1"), 0);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/q2"), 0);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/q3"), 0);
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    /* The server is fine afterwards. */
    srvtest_post(e.port, "{\"ids\":[\"after\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- client disconnect */

static void test_server_client_disconnect_cancels(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    for (int round = 0; round < 3; round++) {
        uint64_t canceled0 = STUB(e.up, canceled);
        int fd = srvtest_raw_connect(e.port);
        CU_ASSERT_FATAL(fd >= 0);
        char req[512], body[128];
        int bl = snprintf(body, sizeof(body),
                          "{\"ids\":[\"sleep5000a%d\",\"sleep5000b%d\"],\"timeout_ms\":8000}",
                          round, round);
        int rl = snprintf(req, sizeof(req),
                          "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          "application/json\r\nContent-Length: %d\r\n\r\n%s",
                          bl, body);
        CU_ASSERT_FATAL(srvtest_raw_send(fd, req, (size_t)rl));
        CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 2, SRVTEST_WAIT_MS));
        CU_ASSERT_EQUAL(srv_in_flight(e.srv), 1);
        int64_t t0 = ctx_now();
        if (round == 1)
            shutdown(fd, SHUT_RDWR); /* a FIN before the close */
        close(fd);
        /* Both fetches are closed at the stub well before their 5 s would pass. */
        CU_ASSERT(srvtest_wait_stub_canceled(e.up, canceled0 + 2, 3000));
        CU_ASSERT(ctx_now() - t0 < 3000);
        CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    }
    /* Still serving. */
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"ok\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* A client that goes away before its batch is even admitted to the fetch (mid-body) or right
 * after sending: nothing leaks, nothing crashes, the server keeps serving. */
static void test_server_client_gone_early(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    const char *partial = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                          "{\"ids\":[\"a\"";
    const char *whole = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"
                        "{\"ids\":[7]}\n";
    for (int i = 0; i < 20; i++) {
        int fd = srvtest_raw_connect(e.port);
        CU_ASSERT_FATAL(fd >= 0);
        const char *m = i % 2 ? whole : partial;
        CU_ASSERT(srvtest_raw_send(fd, m, strlen(m)));
        close(fd);
    }
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"ok\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- the limit */

static void test_server_limit_caps_in_flight(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.limit = 4;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    char body[512];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"ids\":[");
    for (int i = 0; i < 12; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"sleep50-%d\"", i ? "," : "", i);
    snprintf(body + k, sizeof(body) - k, "]}");
    struct srvtest_resp r;
    srvtest_post(e.port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&r)), 12);
    srvtest_resp_free(&r);
    uint64_t max = STUB(e.up, max_in_flight);
    CU_ASSERT(max <= 4);
    CU_ASSERT(max > 1); /* they do overlap */
    CU_ASSERT_EQUAL(STUB(e.up, requests), 12);
    srvtest_env_free(&e);
}

/* The limit is per request: two concurrent requests together may exceed it. */
static void test_server_limit_is_per_request(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.limit = 2;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    struct srvtest_bg bg[2] = {
        {.port = e.port, .call = {.body = "{\"ids\":[\"sleep400a\",\"sleep400b\",\"sleep1a\"]}"}},
        {.port = e.port, .call = {.body = "{\"ids\":[\"sleep400c\",\"sleep400d\",\"sleep1b\"]}"}},
    };
    for (int i = 0; i < 2; i++)
        CU_ASSERT_FATAL(srvtest_bg_start(&bg[i]) == 0);
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 4, SRVTEST_WAIT_MS));
    for (int i = 0; i < 2; i++) {
        srvtest_bg_join(&bg[i]);
        CU_ASSERT_EQUAL(bg[i].resp.status, 200);
        srvtest_resp_free(&bg[i].resp);
    }
    CU_ASSERT_EQUAL(STUB(e.up, max_in_flight), 4);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- keep-alive */

static void test_server_keep_alive(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    CURL *easy = curl_easy_init();
    CU_ASSERT_FATAL(easy != NULL);
    long connects = 0;
    int bad = 0;
    for (int i = 0; i < 100; i++) {
        char body[64];
        snprintf(body, sizeof(body), "{\"ids\":[\"k%d\",%d]}", i % 7, i);
        struct srvtest_call c = {.body = body};
        long want = 200;
        switch (i % 10) {
        case 3: /* a 400 keeps the connection too */
            c.body = "{\"ids\":[null]}";
            want = 400;
            break;
        case 5:
            c.body = NULL;
            c.path = "/healthz";
            break;
        case 7:
            c.body = NULL;
            c.path = "/nowhere";
            want = 404;
            break;
        case 9:
            c.body = "{\"ids\":[\"fail\"]}";
            want = 502;
            break;
        }
        struct srvtest_resp r;
        srvtest_call(easy, e.port, &c, &r);
        if (r.status != want || r.rc != CURLE_OK) {
            if (bad++ < 5)
                fprintf(stderr, "\n  request %d: %ld (want %ld), curl %d\n", i, r.status, want,
                        (int)r.rc);
        }
        connects += r.connects;
        srvtest_resp_free(&r);
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(connects, 1);
    curl_easy_cleanup(easy);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- drain */

static void test_server_drain_completes_in_flight(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    /* A keep-alive connection made before the drain sees /readyz turn 503. */
    CURL *easy = curl_easy_init();
    CU_ASSERT_FATAL(easy != NULL);
    struct srvtest_call probe = {.path = "/readyz"};
    struct srvtest_resp r;
    srvtest_call(easy, e.port, &probe, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);

    struct srvtest_bg bg = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep300\",\"x\"]}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
    srv_drain_start(e.srv);
    srvtest_call(easy, e.port, &probe, &r);
    CU_ASSERT_EQUAL(r.status, 503);
    srvtest_resp_free(&r);
    /* A batch on that connection while draining is refused with 503. */
    struct srvtest_call late = {.body = "{\"ids\":[\"late\"]}"};
    srvtest_call(easy, e.port, &late, &r);
    if (r.rc == CURLE_OK) {
        CU_ASSERT_EQUAL(r.status, 503);
        CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "overloaded");
    }
    srvtest_resp_free(&r);
    curl_easy_cleanup(easy);
    int64_t t0 = ctx_now();
    srv_drain(e.srv, 5000);
    CU_ASSERT(ctx_now() - t0 < 4000); /* returned once the batch was answered */
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&bg.resp)), 2);
    srvtest_resp_free(&bg.resp);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/late"), 0);
    /* New connections are refused once draining. */
    int fd = srvtest_raw_connect(e.port);
    if (fd >= 0) {
        char buf[16];
        const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        srvtest_raw_send(fd, get, strlen(get));
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        CU_ASSERT(n <= 0);
        close(fd);
    }
    srvtest_env_free(&e);
}

static void test_server_drain_deadline_answers_503(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_bg bg = {.port = e.port,
                            .call = {.body = "{\"ids\":[\"sleep5000\",\"y\"],\"timeout_ms\":9000}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
    int64_t t0 = ctx_now();
    srv_drain(e.srv, 200);
    CU_ASSERT(ctx_now() - t0 < 3000);
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&bg.resp), "overloaded");
    CU_ASSERT(atoi(bg.resp.retry_after) >= 1);
    CU_ASSERT(bg.resp.elapsed_ms < 3000);
    srvtest_resp_free(&bg.resp);
    CU_ASSERT(srvtest_wait_stub_canceled(e.up, 1, SRVTEST_WAIT_MS));
    srvtest_env_free(&e);
}

/* srv_free without srv_drain drains by itself (--drain-ms), then cancels. */
static void test_server_free_with_batch_in_flight(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.drain_ms = 100;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    struct srvtest_bg bg = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep5000\"]}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
    int64_t t0 = ctx_now();
    srv_free(e.srv);
    e.srv = NULL;
    CU_ASSERT(ctx_now() - t0 < 3000);
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 503);
    srvtest_resp_free(&bg.resp);
    srvtest_env_free(&e);
}

/* ---------------------------------------------------------------- resources */

static void test_server_releases_everything(void)
{
    /* The ctx timer thread is process-wide and started on first use: stop it for the baseline
     * and again before comparing. Let curl's client side settle first too. */
    ctx_shutdown();
    int threads = test_thread_count(), fds = test_fd_count();
    CU_ASSERT_FATAL(threads > 0 && fds > 0);
    for (int round = 0; round < 2; round++) {
        struct srvtest_env e;
        CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
        struct srv_config cfg;
        srvtest_config(&e, &cfg);
        cfg.http_threads = 3;
        cfg.fetch_threads = 2;
        cfg.drain_ms = 100;
        CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
        /* Work of every kind: ok, failure, deadline, disconnect, left in flight at free. */
        struct srvtest_resp r;
        srvtest_post(e.port, "{\"ids\":[\"a\",\"b\",7]}", NULL, &r);
        CU_ASSERT_EQUAL(r.status, 200);
        srvtest_resp_free(&r);
        int running = test_thread_count(); /* the server's, and the ctx timer by now */
        srvtest_post(e.port, "{\"ids\":[\"sleep1000\",\"fail\"]}", NULL, &r);
        CU_ASSERT_EQUAL(r.status, 502);
        srvtest_resp_free(&r);
        srvtest_post(e.port, "{\"ids\":[\"sleep1000\"],\"timeout_ms\":50}", NULL, &r);
        CU_ASSERT_EQUAL(r.status, 504);
        srvtest_resp_free(&r);
        int fd = srvtest_raw_connect(e.port);
        CU_ASSERT_FATAL(fd >= 0);
        const char *m = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 22\r\n\r\n"
                        "{\"ids\":[\"sleep2000\"]}\n";
        CU_ASSERT(srvtest_raw_send(fd, m, strlen(m)));
        CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
        close(fd);
        CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
        struct srvtest_bg bg = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep4000\"]}"}};
        CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
        CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
        /* No thread per request or per fetch. */
        CU_ASSERT(test_thread_count() <= running + 1); /* + the client thread */
        srv_free(e.srv);
        e.srv = NULL;
        srvtest_bg_join(&bg);
        CU_ASSERT_EQUAL(bg.resp.status, 503);
        srvtest_resp_free(&bg.resp);
        srvtest_env_free(&e);
        ctx_shutdown();
        CU_ASSERT(test_settles_to(threads, fds, 5000));
        if (test_thread_count() != threads || test_fd_count() != fds)
            fprintf(stderr, "\n  threads %d (was %d), fds %d (was %d)\n", test_thread_count(),
                    threads, test_fd_count(), fds);
    }
}

/* ---------------------------------------------------------------- concurrency */

/* Many batches at once with every outcome, from several client threads: each gets its own answer
 * (for make tsan, the race test of the batch path). */
static void test_server_concurrent_mixed_batches(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.limit = 3;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    enum { N = 24 };
    static const struct {
        const char *body;
        long status;
    } kinds[] = {
        {"{\"ids\":[\"m1\",\"m2\",\"m3\",\"m4\",\"m5\",7,8,9]}", 200},
        {"{\"ids\":[\"sleep30\",\"fail\",\"sleep2000\",\"z1\",\"z2\"]}", 502},
        {"{\"ids\":[\"sleep2000\",\"sleep10\"],\"timeout_ms\":60}", 504},
        {"{\"ids\":[\"sleep5\",\"sleep5\",\"m1\",\"m1\"]}", 200},
        {"{\"ids\":[1,]}", 400},
        {"{\"ids\":[\"status503\",\"m6\"]}", 502},
    };
    struct srvtest_bg bg[N];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++) {
            bg[i] = (struct srvtest_bg){.port = e.port,
                                        .call = {.body = kinds[i % 6].body}};
            CU_ASSERT_FATAL(srvtest_bg_start(&bg[i]) == 0);
        }
        int wrong = 0;
        for (int i = 0; i < N; i++) {
            srvtest_bg_join(&bg[i]);
            if (bg[i].resp.status != kinds[i % 6].status) {
                if (wrong++ < 3)
                    fprintf(stderr, "\n  batch %d: %ld want %ld: %s\n", i, bg[i].resp.status,
                            kinds[i % 6].status, bg[i].resp.body ? bg[i].resp.body : "");
            }
            srvtest_resp_free(&bg[i].resp);
        }
        CU_ASSERT_EQUAL(wrong, 0);
    }
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
    srvtest_env_free(&e);
}

static CU_TestInfo server_life_tests[] = {
    {"503 overloaded at max_requests, metrics", test_server_overloaded},
    {"first error cancels the rest", test_server_first_error_cancels_the_rest},
    {"client disconnect cancels the upstream fetches", test_server_client_disconnect_cancels},
    {"client gone mid-body or before the answer", test_server_client_gone_early},
    {"limit caps in-flight fetches per request", test_server_limit_caps_in_flight},
    {"limit is per request", test_server_limit_is_per_request},
    {"keep-alive over 100 requests on one connection", test_server_keep_alive},
    {"drain completes a batch in flight", test_server_drain_completes_in_flight},
    {"drain deadline: the batch gets 503", test_server_drain_deadline_answers_503},
    {"srv_free with a batch in flight", test_server_free_with_batch_in_flight},
    {"threads, fds and memory released at shutdown", test_server_releases_everything},
    {"concurrent batches with mixed outcomes", test_server_concurrent_mixed_batches},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(server_life, server_life_tests)
