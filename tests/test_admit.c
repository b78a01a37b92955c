/* Tests of refusals (503 overloaded) against an in-process server and test upstream: every
 * answer coded "overloaded" is counted once in fanout_admission_rejections_total, whichever
 * path refused it: admission (--max-requests), --max-memory while a body arrives (at its end,
 * or on the socket when it goes on past the discard bound), and a batch ended by shutdown,
 * answered whole or streamed as NDJSON (a 200 whose last line is the overloaded error).
 *
 * The counts are read from /metrics once the refused request has completed (its status is
 * counted then): each test waits for that event, bounded, and then compares. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/prom.h"
#include "tests/srvtest.h"
#include "tests/support.h"

/* ---------------------------------------------------------------- counts */

/* The series the tests compare. */
struct counts {
    double rejected;  /* fanout_admission_rejections_total */
    double batch503;  /* fanout_requests_total{code="503",route="batch"} */
    double batch200;  /* fanout_requests_total{code="200",route="batch"} */
};

/* Scrapes /metrics into *c. Returns false when the scrape failed or did not parse. */
static bool counts_get(uint16_t port, struct counts *c)
{
    struct srvtest_resp r;
    srvtest_get(port, "/metrics", &r);
    struct prom_scrape sc;
    char err[256];
    bool ok = r.status == 200 && r.body && prom_parse(r.body, r.len, "fanout_", &sc, err,
                                                      sizeof(err)) == 0;
    if (ok) {
        c->rejected = prom_value(&sc, "fanout_admission_rejections_total", "", -1);
        c->batch503 = prom_value(&sc, "fanout_requests_total", "code=\"503\",route=\"batch\"", 0);
        c->batch200 = prom_value(&sc, "fanout_requests_total", "code=\"200\",route=\"batch\"", 0);
        prom_free(&sc);
    }
    srvtest_resp_free(&r);
    return ok;
}

/* What a wait for a count looks for. */
struct count_wait {
    uint16_t port;
    double batch503;  /* at least this many 503s on the batch route */
    double batch200;  /* and at least this many 200s */
    struct counts got; /* the last scrape */
};

static bool counts_reached(void *arg)
{
    struct count_wait *w = arg;
    return counts_get(w->port, &w->got) && w->got.batch503 >= w->batch503 &&
           w->got.batch200 >= w->batch200;
}

/* Waits until the batch route has counted 'n503' 503s and 'n200' 200s (the requests
 * completed); *out is the scrape that saw it. */
static bool wait_counts(uint16_t port, double n503, double n200, struct counts *out)
{
    struct count_wait w = {.port = port, .batch503 = n503, .batch200 = n200};
    bool ok = test_wait_until(counts_reached, &w, SRVTEST_WAIT_MS);
    *out = w.got;
    return ok;
}

static bool srv_idle(void *arg)
{
    return srv_active(arg) == 0;
}

/* ---------------------------------------------------------------- raw clients */

/* What came back on a raw connection. */
struct reply {
    char buf[16384]; /* the first bytes of the answer, NUL-terminated */
    size_t len;
    bool eof;        /* the server closed */
};

/* The status of the first response in 'r', or 0. */
static unsigned reply_status(const struct reply *r)
{
    return r->len > 12 && !strncmp(r->buf, "HTTP/1.", 7) ? (unsigned)strtoul(r->buf + 9, NULL, 10)
                                                         : 0;
}

/* Whether a whole response (headers and Content-Length body) is in. */
static bool reply_whole(const struct reply *r)
{
    const char *end = strstr(r->buf, "\r\n\r\n");
    const char *cl = strcasestr(r->buf, "\r\nContent-Length:");
    return end && cl && cl < end &&
           (size_t)(end + 4 - r->buf) + strtoul(cl + 17, NULL, 10) <= r->len;
}

/* Sends data[0..len) on 'fd' while reading what comes back, until a whole response is in, the
 * server closes, or the bound passes: a client that keeps writing a body the server has
 * already answered still reads the answer. */
static void send_reading(int fd, const char *data, size_t len, struct reply *r)
{
    memset(r, 0, sizeof(*r));
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    size_t off = 0;
    while (!r->eof && !reply_whole(r) && ctx_now() < until) {
        struct pollfd p = {.fd = fd, .events = POLLIN | (off < len ? POLLOUT : 0)};
        if (poll(&p, 1, 100) <= 0)
            continue;
        if (p.revents & POLLIN) {
            ssize_t k = recv(fd, r->buf + r->len, sizeof(r->buf) - 1 - r->len, 0);
            if (k <= 0) {
                r->eof = true;
                break;
            }
            r->len += (size_t)k;
            r->buf[r->len] = '\0';
        } else if (p.revents & POLLOUT) {
            size_t n = len - off < 65536 ? len - off : 65536;
            ssize_t k = send(fd, data + off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (k > 0)
                off += (size_t)k;
            else if (k < 0 && errno != EAGAIN && errno != EINTR)
                off = len; /* the server stopped reading: only the answer is left to read */
        } else if (p.revents & (POLLERR | POLLHUP)) {
            r->eof = true;
        }
    }
}

/* A POST /v1/batch with a Content-Length body of 'size' bytes: a batch of 'id' (with
 * 'timeout_ms') padded with spaces. malloc'd; its length in *len. */
static char *padded_batch(const char *id, int64_t timeout_ms, size_t size, size_t *len)
{
    char doc[256];
    int dn = snprintf(doc, sizeof(doc), "{\"ids\":[\"%s\"],\"timeout_ms\":%lld", id,
                      (long long)timeout_ms);
    char head[256];
    int hn = snprintf(head, sizeof(head),
                      "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n", size);
    char *req = malloc((size_t)hn + size);
    if (!req)
        return NULL;
    memcpy(req, head, (size_t)hn);
    memcpy(req + hn, doc, (size_t)dn);
    memset(req + hn + dn, ' ', size - (size_t)dn - 1);
    req[(size_t)hn + size - 1] = '}';
    *len = (size_t)hn + size;
    return req;
}

/* A POST /v1/batch whose chunked body is one chunk of 'size' spaces (never a valid batch: it
 * is refused before it is parsed) and the last chunk. malloc'd; its length in *len. */
static char *chunked_blank(size_t size, size_t *len)
{
    static const char head[] =
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    char *req = malloc(sizeof(head) + 32 + size + 8);
    if (!req)
        return NULL;
    int n = snprintf(req, sizeof(head) + 32, "%s%zx\r\n", head, size);
    memset(req + n, ' ', size);
    memcpy(req + n + size, "\r\n0\r\n\r\n", 7);
    *len = (size_t)n + size + 7;
    return req;
}

/* ---------------------------------------------------------------- the server */

#define HOLD_MS 120000 /* a holding batch outlives any test; it ends when its client closes */

/* A server with --max-memory 1 MiB and --max-request-bytes 1 MiB, and a connection whose
 * running batch holds half of it: its 400 KB body takes a 512 KiB buffer, held until the batch
 * completes. A body that grows past 512 KiB beside it does not fit. Returns the holder's fd,
 * or -1. */
static int start_half_full(struct srvtest_env *e)
{
    if (srvtest_env_init(e) != 0)
        return -1;
    struct srv_config cfg;
    srvtest_config(e, &cfg);
    cfg.max_memory = 1 << 20;
    cfg.max_request_bytes = 1 << 20;
    cfg.max_body = 64 << 10;
    cfg.max_timeout_ms = HOLD_MS;
    if (srvtest_start(e, &cfg) != 0)
        return -1;
    size_t len;
    char *req = padded_batch("sleep120000-hold", HOLD_MS, 400000, &len);
    int fd = req ? srvtest_raw_connect(e->port) : -1;
    bool sent = fd >= 0 && srvtest_raw_send(fd, req, len);
    free(req);
    /* Admitted and running: its fetch has reached the test upstream, its whole body is in. */
    if (!sent || !srvtest_wait_stub_target(e->up, "/items/sleep120000-hold", 1, SRVTEST_WAIT_MS)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* ---------------------------------------------------------------- the tests */

/* A chunked body that runs out of --max-memory and then goes on past the discard bound (1 MiB)
 * is answered 503 overloaded on the socket, before its end: one rejection, one 503. */
static void test_admit_over_memory_on_socket_counted(void)
{
    struct srvtest_env e;
    int holder = start_half_full(&e);
    CU_ASSERT_FATAL(holder >= 0);
    struct counts c0;
    CU_ASSERT_FATAL(counts_get(e.port, &c0));
    size_t len;
    char *req = chunked_blank((size_t)3 << 20, &len); /* 512 KiB fit; 1 MiB more is dropped */
    CU_ASSERT_FATAL(req != NULL);
    int fd = srvtest_raw_connect(e.port);
    CU_ASSERT_FATAL(fd >= 0);
    struct reply r;
    send_reading(fd, req, len, &r);
    close(fd);
    free(req);
    CU_ASSERT_EQUAL(reply_status(&r), 503);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.buf, "\"code\":\"overloaded\""));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.buf, "--max-memory"));
    struct counts c1;
    CU_ASSERT(wait_counts(e.port, c0.batch503 + 1, 0, &c1));
    CU_ASSERT_EQUAL(c1.batch503 - c0.batch503, 1);
    CU_ASSERT_EQUAL(c1.rejected - c0.rejected, 1);
    close(holder);
    srvtest_env_free(&e);
}

/* The same body ending before the discard bound is answered 503 at its end: counted once too. */
static void test_admit_over_memory_at_end_counted(void)
{
    struct srvtest_env e;
    int holder = start_half_full(&e);
    CU_ASSERT_FATAL(holder >= 0);
    struct counts c0;
    CU_ASSERT_FATAL(counts_get(e.port, &c0));
    size_t len;
    char *req = chunked_blank(600000, &len); /* past 512 KiB, within the discard bound */
    CU_ASSERT_FATAL(req != NULL);
    int fd = srvtest_raw_connect(e.port);
    CU_ASSERT_FATAL(fd >= 0);
    struct reply r;
    send_reading(fd, req, len, &r);
    close(fd);
    free(req);
    CU_ASSERT_EQUAL(reply_status(&r), 503);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.buf, "\"code\":\"overloaded\""));
    struct counts c1;
    CU_ASSERT(wait_counts(e.port, c0.batch503 + 1, 0, &c1));
    CU_ASSERT_EQUAL(c1.batch503 - c0.batch503, 1);
    CU_ASSERT_EQUAL(c1.rejected - c0.rejected, 1);
    close(holder);
    srvtest_env_free(&e);
}

/* --max-requests: the batch over the cap is refused at admission, counted once. */
static void test_admit_cap_counted_once(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    srvtest_config(&e, &cfg);
    cfg.max_requests = 1;
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    struct srvtest_bg held = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep600-cap\"]}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&held) == 0);
    CU_ASSERT(srvtest_wait_stub_target(e.up, "/items/sleep600-cap", 1, SRVTEST_WAIT_MS));
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"c\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "overloaded");
    srvtest_resp_free(&r);
    srvtest_bg_join(&held);
    CU_ASSERT_EQUAL(held.resp.status, 200);
    srvtest_resp_free(&held.resp);
    struct counts c;
    CU_ASSERT(wait_counts(e.port, 1, 1, &c));
    CU_ASSERT_EQUAL(c.batch503, 1);
    CU_ASSERT_EQUAL(c.rejected, 1);
    srvtest_env_free(&e);
}

/* A buffered batch canceled by shutdown is answered 503 overloaded, counted once. */
static void test_admit_shutdown_buffered_counted_once(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_bg bg = {.port = e.port, .call = {.body = "{\"ids\":[\"sleep60000-buf\"]}"}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_target(e.up, "/items/sleep60000-buf", 1, SRVTEST_WAIT_MS));
    srv_cancel_all(e.srv);
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&bg.resp), "overloaded");
    srvtest_resp_free(&bg.resp);
    CU_ASSERT(test_wait_until(srv_idle, e.srv, SRVTEST_WAIT_MS)); /* completed: counted */
    struct counts c;
    CU_ASSERT(counts_get(e.port, &c));
    CU_ASSERT_EQUAL(c.batch503, 1);
    CU_ASSERT_EQUAL(c.rejected, 1);
    srvtest_env_free(&e);
}

/* A streamed batch canceled by shutdown: the 200 went out when it started, and its last line
 * is the overloaded error. That is a refusal as much as a 503 is: counted once in the
 * rejections (its status stays the 200 it was answered with). */
static void test_admit_shutdown_stream_counted_once(void)
{
    struct srvtest_env e;
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    CU_ASSERT_FATAL(srvtest_start_default(&e) == 0);
    struct srvtest_bg bg = {.port = e.port,
                            .call = {.body = "{\"ids\":[\"sleep60000-st\"]}",
                                     .headers = {"Accept: application/x-ndjson"}}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(srvtest_wait_stub_target(e.up, "/items/sleep60000-st", 1, SRVTEST_WAIT_MS));
    srv_cancel_all(e.srv);
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 200);
    CU_ASSERT_STRING_EQUAL(bg.resp.content_type, "application/x-ndjson");
    const char *last = NULL;
    for (const char *p = bg.resp.body; p && *p;) {
        last = p;
        const char *nl = strchr(p, '\n');
        p = nl ? nl + 1 : NULL;
    }
    cJSON *done = last ? cJSON_Parse(last) : NULL;
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(done, "error"), "code");
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(done, "done")));
    CU_ASSERT(cJSON_IsString(code) && !strcmp(code->valuestring, "overloaded"));
    cJSON_Delete(done);
    srvtest_resp_free(&bg.resp);
    CU_ASSERT(test_wait_until(srv_idle, e.srv, SRVTEST_WAIT_MS)); /* completed: counted */
    struct counts c;
    CU_ASSERT(counts_get(e.port, &c));
    CU_ASSERT_EQUAL(c.batch200, 1);
    CU_ASSERT_EQUAL(c.batch503, 0);
    CU_ASSERT_EQUAL(c.rejected, 1);
    srvtest_env_free(&e);
}

static CU_TestInfo admit_tests[] = {
    {"--max-memory: a body answered 503 on the socket is counted as a rejection",
     test_admit_over_memory_on_socket_counted},
    {"--max-memory: a body answered 503 at its end is counted once",
     test_admit_over_memory_at_end_counted},
    {"--max-requests: the refusal is counted once", test_admit_cap_counted_once},
    {"shutdown: a buffered batch's 503 is counted once", test_admit_shutdown_buffered_counted_once},
    {"shutdown: a streamed batch ended overloaded is counted once",
     test_admit_shutdown_stream_counted_once},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(admit, admit_tests)
