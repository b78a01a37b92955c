/* End-to-end tests of the batch path's concurrency and lifecycle: admission (503), first error
 * cancels the rest, client disconnect, the per-request limit, keep-alive, drain and shutdown
 * (threads, fds and memory back to baseline), and many concurrent batches for make tsan.
 *
 * Each test starts its own upstream stub and server in-process (tests/srvtest.h). Requests that
 * must run concurrently go through background threads that only record their response; the test
 * thread waits on observable state (the stub's counters, the server's in-flight gauge) with
 * bounded waits and asserts after joining. Times appear only as generous correctness bounds. */
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/http/watch.h"
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
    CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
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
    /* limit 3: two 60 s sleeps and the failure run; q1..q3 wait in the queue and never start.
     * The siblings must have reached the stub for their closing to be seen there; on a loaded
     * machine the failure can come back before they are written, so the batch is sent again
     * (with fresh ids) until one round has had a sibling out. */
    uint64_t sent = 0;
    for (int round = 0; round < 5 && sent == 0; round++) {
        uint64_t canceled0 = STUB(e.up, canceled);
        char body[256], a[32], b[32], q[3][32];
        snprintf(a, sizeof(a), "sleep60000a-%d", round);
        snprintf(b, sizeof(b), "sleep60000b-%d", round);
        for (int i = 0; i < 3; i++)
            snprintf(q[i], sizeof(q[i]), "q%d-%d", i + 1, round);
        snprintf(body, sizeof(body),
                 "{\"ids\":[\"%s\",\"%s\",\"fail\",\"%s\",\"%s\",\"%s\"],\"timeout_ms\":30000}", a,
                 b, q[0], q[1], q[2]);
        srvtest_post(e.port, body, NULL, &r);
        CU_ASSERT_EQUAL(r.status, 502);
        CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "upstream_status");
        const cJSON *id = srvtest_err_field(&r, "id");
        CU_ASSERT(cJSON_IsString(id) && !strcmp(id->valuestring, "fail"));
        CU_ASSERT(r.elapsed_ms < test_ms(5000)); /* not waiting for the 60 s siblings */
        srvtest_resp_free(&r);
        /* The siblings that reached the stub were closed there; the queued ones never left. */
        char path[128];
        snprintf(path, sizeof(path), "/items/%s", a);
        sent = upstub_count(e.up, path);
        snprintf(path, sizeof(path), "/items/%s", b);
        sent += upstub_count(e.up, path);
        CU_ASSERT(srvtest_wait_stub_canceled(e.up, canceled0 + sent, SRVTEST_WAIT_MS));
        for (int i = 0; i < 3; i++) {
            snprintf(path, sizeof(path), "/items/%s", q[i]);
            CU_ASSERT_EQUAL(upstub_count(e.up, path), 0);
        }
    }
    CU_ASSERT(sent >= 1);
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
                          "{\"ids\":[\"sleep60000a%d\",\"sleep60000b%d\"],\"timeout_ms\":30000}",
                          round, round);
        int rl = snprintf(req, sizeof(req),
                          "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          "application/json\r\nContent-Length: %d\r\n\r\n%s",
                          bl, body);
        CU_ASSERT_FATAL(srvtest_raw_send(fd, req, (size_t)rl));
        char ta[64], tb[64];
        snprintf(ta, sizeof(ta), "/items/sleep60000a%d", round);
        snprintf(tb, sizeof(tb), "/items/sleep60000b%d", round);
        CU_ASSERT(srvtest_wait_stub_target(e.up, ta, 1, SRVTEST_WAIT_MS));
        CU_ASSERT(srvtest_wait_stub_target(e.up, tb, 1, SRVTEST_WAIT_MS));
        CU_ASSERT_EQUAL(srv_in_flight(e.srv), 1);
        int64_t t0 = ctx_now();
        if (round == 1)
            shutdown(fd, SHUT_RDWR); /* a FIN before the close */
        close(fd);
        /* Both fetches are closed at the stub long before their 30 s deadline. */
        CU_ASSERT(srvtest_wait_stub_canceled(e.up, canceled0 + 2, test_ms(5000)));
        CU_ASSERT(ctx_now() - t0 < test_ms(5000));
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
    /* Two keep-alive connections made before the drain. */
    static const char readyz[] = "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
    static const char late[] = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n"
                               "{\"ids\":[\"late\"]}";
    struct srvtest_raw *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));
    CU_ASSERT_FATAL(a && b);
    CU_ASSERT_FATAL(srvtest_raw_open(a, e.port) && srvtest_raw_open(b, e.port));
    CU_ASSERT(srvtest_raw_send(a->fd, readyz, sizeof(readyz) - 1));
    CU_ASSERT_EQUAL(srvtest_raw_response(a, NULL, 0, SRVTEST_WAIT_MS), 200);
    CU_ASSERT(srvtest_raw_send(b->fd, readyz, sizeof(readyz) - 1));
    CU_ASSERT_EQUAL(srvtest_raw_response(b, NULL, 0, SRVTEST_WAIT_MS), 200);

    struct srvtest_bg bg = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep300\",\"x\"]}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_target(e.up, "/items/sleep300", 1, SRVTEST_WAIT_MS));
    srv_drain_start(e.srv);
    /* /readyz turns 503; a new batch is refused with 503 overloaded, never fetched. */
    char body[512];
    CU_ASSERT(srvtest_raw_send(a->fd, readyz, sizeof(readyz) - 1));
    CU_ASSERT_EQUAL(srvtest_raw_response(a, NULL, 0, SRVTEST_WAIT_MS), 503);
    CU_ASSERT(srvtest_raw_send(b->fd, late, sizeof(late) - 1));
    CU_ASSERT_EQUAL(srvtest_raw_response(b, body, sizeof(body), SRVTEST_WAIT_MS), 503);
    CU_ASSERT(strstr(body, "\"overloaded\"") != NULL);
    srvtest_raw_close(a);
    srvtest_raw_close(b);
    free(a);
    free(b);
    int64_t t0 = ctx_now();
    srv_drain(e.srv, 600000);
    CU_ASSERT(ctx_now() - t0 < test_ms(10000)); /* returned once the batch was answered */
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&bg.resp)), 2);
    srvtest_resp_free(&bg.resp);
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/late"), 0);
    /* New connections get nothing once draining. */
    int fd = srvtest_raw_connect(e.port);
    if (fd >= 0) {
        char buf[16];
        srvtest_raw_send(fd, readyz, sizeof(readyz) - 1);
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        CU_ASSERT(n <= 0);
        close(fd);
    }
    srvtest_env_free(&e);
}

/* Pipelined requests on one connection: the bytes of the next request wait while a batch is
 * suspended (they are not a hang-up), and the answers come back in order. */
static void test_server_pipelined_requests(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_raw *c = malloc(sizeof(*c));
    CU_ASSERT_FATAL(c != NULL);
    CU_ASSERT_FATAL(srvtest_raw_open(c, e.port));
    static const char reqs[] =
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{\"ids\":[\"sleep200\"]}"
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{\"ids\":[\"p2\"]}"
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{\"ids\":[1,]";
    CU_ASSERT_FATAL(srvtest_raw_send(c->fd, reqs, sizeof(reqs) - 1));
    char body[512];
    CU_ASSERT_EQUAL(srvtest_raw_response(c, body, sizeof(body), SRVTEST_WAIT_MS), 200);
    CU_ASSERT(strstr(body, "\"id\":\"sleep200\"") != NULL);
    CU_ASSERT_EQUAL(srvtest_raw_response(c, body, sizeof(body), SRVTEST_WAIT_MS), 200);
    CU_ASSERT(strstr(body, "\"id\":\"p2\"") != NULL);
    CU_ASSERT_EQUAL(srvtest_raw_response(c, body, sizeof(body), SRVTEST_WAIT_MS), 200);
    CU_ASSERT(strstr(body, "ok") != NULL);
    CU_ASSERT_EQUAL(srvtest_raw_response(c, body, sizeof(body), SRVTEST_WAIT_MS), 400);
    srvtest_raw_close(c);
    free(c);
    CU_ASSERT_EQUAL(STUB(e.up, canceled), 0);
    srvtest_env_free(&e);
}

static void test_server_drain_deadline_answers_503(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    static const char body[] = "{\"ids\":[\"sleep60000\",\"y\"],\"timeout_ms\":30000}";
    struct srvtest_bg bg = {.port = e.port, .call = {.body = body}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
    int64_t t0 = ctx_now();
    srv_drain(e.srv, 200);
    CU_ASSERT(ctx_now() - t0 < test_ms(5000)); /* the batch's deadline is 30 s away */
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&bg.resp), "overloaded");
    CU_ASSERT(atoi(bg.resp.retry_after) >= 1);
    CU_ASSERT(bg.resp.elapsed_ms < test_ms(5000));
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
    struct srvtest_bg bg = {.port = e.port,
                            .call = {.body = "{\"ids\":[\"sleep60000\"],\"timeout_ms\":30000}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_in_flight(e.up, 1, SRVTEST_WAIT_MS));
    int64_t t0 = ctx_now();
    srv_free(e.srv);
    e.srv = NULL;
    CU_ASSERT(ctx_now() - t0 < test_ms(5000)); /* drain 100 ms, then canceled */
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
        CU_ASSERT(srvtest_wait_stub_target(e.up, "/items/sleep2000", 1, SRVTEST_WAIT_MS));
        close(fd);
        CU_ASSERT(srvtest_wait_srv_in_flight(e.srv, 0, SRVTEST_WAIT_MS));
        struct srvtest_bg bg = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep4000\"]}"}};
        CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
        CU_ASSERT(srvtest_wait_stub_target(e.up, "/items/sleep4000", 1, SRVTEST_WAIT_MS));
        /* No thread per request or per fetch. */
        CU_ASSERT(test_thread_count() <= running + 1); /* + the client thread */
        srv_free(e.srv);
        e.srv = NULL;
        srvtest_bg_join(&bg);
        CU_ASSERT_EQUAL(bg.resp.status, 503);
        srvtest_resp_free(&bg.resp);
        srvtest_env_free(&e);
        ctx_shutdown();
        CU_ASSERT(test_settles_to(threads, fds, test_ms(5000)));
        if (test_thread_count() != threads || test_fd_count() != fds)
            fprintf(stderr, "\n  threads %d (was %d), fds %d (was %d)\n", test_thread_count(),
                    threads, test_fd_count(), fds);
    }
}

/* The threads a server runs while it serves a batch, over the test's own and its stub's. */
static int server_threads(bool shared, unsigned http, unsigned fetch)
{
    ctx_shutdown();
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    int base = test_thread_count();
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.loop_shared = shared;
    cfg.http_threads = http;
    cfg.fetch_threads = fetch;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"t1\",\"t2\",\"t3\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    int n = test_thread_count() - base;
    srvtest_env_free(&e);
    ctx_shutdown();
    return n;
}

/* Shared: the fetch loops serve HTTP, and --http-threads starts nothing; split: one daemon
 * thread, or --http-threads workers. The rest is a fixed set whatever the sizes. */
static void test_server_thread_count(void)
{
    int shared2 = server_threads(true, 3, 2), shared3 = server_threads(true, 1, 3);
    int split2 = server_threads(false, 3, 2), split1 = server_threads(false, 1, 2);
    CU_ASSERT_EQUAL(shared3, shared2 + 1);
    CU_ASSERT_EQUAL(split2, shared2 + 3);
    CU_ASSERT_EQUAL(split1, shared2 + 1);
    /* 2 loops, 2 resolvers, discover, guard, watch, log writer, ctx's timer */
    CU_ASSERT_EQUAL(shared2, 9);
    if (shared2 != 9 || split2 != shared2 + 3)
        fprintf(stderr, "\n  threads: shared %d (3 loops: %d), split %d (1 worker: %d)\n",
                shared2, shared3, split2, split1);
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
        {"{\"ids\":[\"sleep60000\",\"sleep10\"],\"timeout_ms\":60}", 504},
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

/* ---------------------------------------------------------------- drain under load */

struct hammer {
    pthread_t thread;      /* the client loop */
    uint16_t port;         /* server */
    atomic_bool *stop;     /* set by the test */
    atomic_uint ok;        /* 200s (read by the test while running) */
    unsigned refused, other, failed; /* 503s, other statuses, transport errors */
    long other_status;     /* the first unexpected status */
};

static void *hammer_main(void *arg)
{
    struct hammer *h = arg;
    CURL *easy = curl_easy_init();
    if (!easy)
        return NULL;
    while (!atomic_load(h->stop)) {
        struct srvtest_call c = {.body = "{\"ids\":[\"h1\",\"h2\",\"sleep2\"]}",
                                 .timeout_ms = 5000};
        struct srvtest_resp r;
        srvtest_call(easy, h->port, &c, &r);
        if (r.rc != CURLE_OK)
            h->failed++;
        else if (r.status == 200)
            atomic_fetch_add(&h->ok, 1);
        else if (r.status == 503 && !strcmp(srvtest_err_code(&r), "overloaded"))
            h->refused++;
        else if (h->other++ == 0)
            h->other_status = r.status;
        srvtest_resp_free(&r);
    }
    curl_easy_cleanup(easy);
    return NULL;
}

struct hammer_progress {
    struct hammer *h;
    int n;
    unsigned want;
};

static bool hammers_did(void *arg)
{
    struct hammer_progress *p = arg;
    unsigned sum = 0;
    for (int i = 0; i < p->n; i++)
        sum += atomic_load(&p->h[i].ok);
    return sum >= p->want;
}

/* Clients keep sending batches on keep-alive connections while the server drains and stops:
 * each gets a 200, a 503 or a closed connection, and the server stops cleanly (no batch may be
 * admitted once the drain has found it idle). */
static void test_server_drain_under_load(void)
{
    enum { CLIENTS = 4 };
    for (int round = 0; round < 4; round++) {
        struct srvtest_env e;
        CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
        CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
        atomic_bool stop = false;
        struct hammer h[CLIENTS];
        for (int i = 0; i < CLIENTS; i++) {
            h[i] = (struct hammer){.port = e.port, .stop = &stop};
            atomic_init(&h[i].ok, 0);
            CU_ASSERT_FATAL(pthread_create(&h[i].thread, NULL, hammer_main, &h[i]) == 0);
        }
        struct hammer_progress p = {h, CLIENTS, 40};
        CU_ASSERT(test_wait_until(hammers_did, &p, SRVTEST_WAIT_MS));
        srv_drain(e.srv, 2000);
        CU_ASSERT_EQUAL(srv_in_flight(e.srv), 0);
        srv_free(e.srv);
        e.srv = NULL;
        atomic_store(&stop, true);
        unsigned ok = 0, other = 0;
        for (int i = 0; i < CLIENTS; i++) {
            pthread_join(h[i].thread, NULL);
            ok += atomic_load(&h[i].ok);
            other += h[i].other;
            if (h[i].other)
                fprintf(stderr, "\n  client %d: unexpected status %ld\n", i, h[i].other_status);
        }
        CU_ASSERT(ok >= 40);
        CU_ASSERT_EQUAL(other, 0);
        srvtest_env_free(&e);
    }
}

/* ---------------------------------------------------------------- the disconnect watch */

struct watched {
    int fds[2];       /* socketpair: [0] watched, [1] the "client" */
    struct ctx *c;    /* canceled by the watch on hang-up */
    uint64_t token;   /* watch token */
};

static bool ctx_is_done(void *arg)
{
    return ctx_err(arg) != 0;
}

static void test_server_watch_hangup_cancels(void)
{
    struct watch *w;
    CU_ASSERT_FATAL(watch_new(&w) == 0);
    struct watched a, b;
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a.fds) == 0);
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b.fds) == 0);
    a.c = ctx_new(ctx_background(), CTX_FOREVER);
    b.c = ctx_new(ctx_background(), CTX_FOREVER);
    CU_ASSERT_FATAL(a.c && b.c);
    CU_ASSERT_FATAL(watch_add(w, a.fds[0], a.c, &a.token) == 0);
    CU_ASSERT_FATAL(watch_add(w, b.fds[0], b.c, &b.token) == 0);
    /* Bytes from the client (pipelining) are not a hang-up. */
    CU_ASSERT(send(a.fds[1], "GET / HTTP/1.1\r\n\r\n", 18, 0) == 18);
    /* a is removed before its client goes; b's client goes while watched. */
    watch_remove(w, a.token);
    close(a.fds[1]);
    close(b.fds[1]);
    CU_ASSERT(test_wait_until(ctx_is_done, b.c, SRVTEST_WAIT_MS));
    CU_ASSERT_EQUAL(ctx_err(b.c), -EPIPE);
    CU_ASSERT_EQUAL(ctx_err(a.c), 0);
    watch_remove(w, b.token);
    watch_remove(w, b.token); /* a stale token is ignored */
    /* Entries are reused; a stale token must not remove the new owner. */
    struct watched d;
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, d.fds) == 0);
    d.c = ctx_new(ctx_background(), CTX_FOREVER);
    CU_ASSERT_FATAL(watch_add(w, d.fds[0], d.c, &d.token) == 0);
    watch_remove(w, a.token);
    close(d.fds[1]);
    CU_ASSERT(test_wait_until(ctx_is_done, d.c, SRVTEST_WAIT_MS));
    CU_ASSERT_EQUAL(ctx_err(d.c), -EPIPE);
    /* Left registered at free: released there. */
    watch_free(w);
    ctx_free(a.c);
    ctx_free(b.c);
    ctx_free(d.c);
    close(a.fds[0]);
    close(b.fds[0]);
    close(d.fds[0]);
}

/* Hang-ups racing with removal, many rounds: whatever ctx_err() says right after watch_remove()
 * is final (the watch never cancels late), and nothing leaks. */
static void test_server_watch_remove_races_hangup(void)
{
    enum { ROUNDS = 2000 };
    struct watch *w;
    CU_ASSERT_FATAL(watch_new(&w) == 0);
    struct ctx **cs = calloc(ROUNDS, sizeof(*cs));
    int *seen = calloc(ROUNDS, sizeof(*seen));
    CU_ASSERT_FATAL(cs && seen);
    int late = 0, fired = 0;
    for (int i = 0; i < ROUNDS; i++) {
        int fds[2];
        CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
        cs[i] = ctx_new(ctx_background(), CTX_FOREVER);
        CU_ASSERT_FATAL(cs[i] != NULL);
        uint64_t tok;
        CU_ASSERT_FATAL(watch_add(w, fds[0], cs[i], &tok) == 0);
        close(fds[1]);
        for (int spin = 0; spin < (i % 64) * 20; spin++)
            __asm__ __volatile__("" ::: "memory"); /* vary where the removal lands */
        watch_remove(w, tok);
        seen[i] = ctx_err(cs[i]);
        close(fds[0]);
    }
    /* Let any late cancel happen: flush the watch thread with one more hang-up. */
    struct watched z;
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, z.fds) == 0);
    z.c = ctx_new(ctx_background(), CTX_FOREVER);
    CU_ASSERT_FATAL(watch_add(w, z.fds[0], z.c, &z.token) == 0);
    close(z.fds[1]);
    CU_ASSERT(test_wait_until(ctx_is_done, z.c, SRVTEST_WAIT_MS));
    watch_remove(w, z.token);
    watch_free(w); /* joins the thread: every cancel it started has returned */
    for (int i = 0; i < ROUNDS; i++) {
        if (seen[i] != ctx_err(cs[i]))
            late++;
        if (seen[i] == -EPIPE)
            fired++;
        ctx_free(cs[i]);
    }
    if (late)
        fprintf(stderr, "\n  %d late cancels, %d in time\n", late, fired);
    CU_ASSERT_EQUAL(late, 0);
    ctx_free(z.c);
    close(z.fds[0]);
    free(cs);
    free(seen);
}

/* A ctx hook that holds the watch thread inside its cancel until released. */
struct blocker {
    atomic_int state;         /* 0 armed, 1 running, 2 released, 3 returned */
    struct watch *w;          /* for the remover thread */
    uint64_t token;           /* what it removes */
    atomic_bool removed;      /* watch_remove() has returned */
    atomic_int state_at_remove; /* the hook's state when it did */
};

static void blocking_hook(void *arg)
{
    struct blocker *b = arg;
    atomic_store(&b->state, 1);
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    while (atomic_load(&b->state) != 2 && ctx_now() < until) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&b->state, 3);
}

static void *remover_main(void *arg)
{
    struct blocker *b = arg;
    watch_remove(b->w, b->token);
    atomic_store(&b->state_at_remove, atomic_load(&b->state));
    atomic_store(&b->removed, true);
    return NULL;
}

static bool hook_running(void *arg)
{
    return atomic_load(&((struct blocker *)arg)->state) == 1;
}

static bool remover_returned(void *arg)
{
    return atomic_load(&((struct blocker *)arg)->removed);
}

/* watch_remove() does not return while the watch thread is still cancelling that ctx. */
static void test_server_watch_remove_waits_for_cancel(void)
{
    struct watch *w;
    CU_ASSERT_FATAL(watch_new(&w) == 0);
    int fds[2];
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    CU_ASSERT_FATAL(c != NULL);
    struct blocker b = {.w = w};
    struct ctx_hook h;
    CU_ASSERT_FATAL(ctx_hook_add(c, &h, blocking_hook, &b) == 0);
    CU_ASSERT_FATAL(watch_add(w, fds[0], c, &b.token) == 0);
    close(fds[1]);
    CU_ASSERT_FATAL(test_wait_until(hook_running, &b, SRVTEST_WAIT_MS));
    pthread_t t;
    CU_ASSERT_FATAL(pthread_create(&t, NULL, remover_main, &b) == 0);
    /* While the cancel is held inside the hook, the removal must keep waiting. The bound only
     * gives a wrong implementation time to return early. */
    CU_ASSERT_FALSE(test_wait_until(remover_returned, &b, 200));
    atomic_store(&b.state, 2);
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(atomic_load(&b.state_at_remove), 3);
    CU_ASSERT_EQUAL(ctx_err(c), -EPIPE);
    watch_free(w);
    ctx_free(c);
    close(fds[0]);
}

/* fanout_requests_in_flight falls when the answer is queued: read on a second connection right
 * after each answer on the first, it is 0 every time. */
static void test_server_gauge_zero_after_answer(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_raw *a = malloc(sizeof(*a)), *m = malloc(sizeof(*m));
    CU_ASSERT_FATAL(a && m);
    CU_ASSERT_FATAL(srvtest_raw_open(a, e.port) && srvtest_raw_open(m, e.port));
    static const char batch[] = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n"
                                "{\"ids\":[\"g\"]}";
    static const char scrape[] = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    char *body = malloc(65536);
    CU_ASSERT_FATAL(body != NULL);
    int rounds = 500, nonzero = 0, bad = 0;
    for (int i = 0; i < rounds && !bad; i++) {
        bad += !srvtest_raw_send(a->fd, batch, sizeof(batch) - 1);
        bad += srvtest_raw_response(a, NULL, 0, SRVTEST_WAIT_MS) != 200;
        bad += !srvtest_raw_send(m->fd, scrape, sizeof(scrape) - 1);
        bad += srvtest_raw_response(m, body, 65536, SRVTEST_WAIT_MS) != 200;
        const char *g = strstr(body, "\nfanout_requests_in_flight ");
        nonzero += !g || atoi(g + 27) != 0;
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(nonzero, 0);
    free(body);
    srvtest_raw_close(a);
    srvtest_raw_close(m);
    free(a);
    free(m);
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
    {"pipelined requests are answered in order", test_server_pipelined_requests},
    {"drain deadline: the batch gets 503", test_server_drain_deadline_answers_503},
    {"srv_free with a batch in flight", test_server_free_with_batch_in_flight},
    {"threads, fds and memory released at shutdown", test_server_releases_everything},
    {"threads: the loops (which serve HTTP when shared) and a fixed set", test_server_thread_count},
    {"concurrent batches with mixed outcomes", test_server_concurrent_mixed_batches},
    {"drain and stop under load", test_server_drain_under_load},
    {"watch: hang-up cancels, removed entries never do", test_server_watch_hangup_cancels},
    {"watch: removal racing hang-ups never cancels late", test_server_watch_remove_races_hangup},
    {"watch: removal waits for a cancel in progress", test_server_watch_remove_waits_for_cancel},
    {"in-flight gauge is 0 right after every answer", test_server_gauge_zero_after_answer},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(server_life, server_life_tests)
