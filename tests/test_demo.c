/* Tests for server/demo: routes, magic ids, id escaping, keep-alive, delays that hold no thread,
 * clients that hang up mid-delay, and demo_stop() with requests suspended; the demo set (set.h),
 * and a server with --demo --demo-members 3, whose members discovery finds. Clients are the
 * tests' HTTP client (tests/srvtest.h): one exchange at a time, or many at once driven from the
 * test's own thread. */
#include "server/demo/demo.h"

#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/config.h"
#include "server/demo/set.h"
#include "tests/prom.h"
#include "tests/srvtest.h"
#include "tests/support.h"

/* Generous bound for anything that should take milliseconds. */
#define SLOW_MS test_ms(10000)

/* ---------------------------------------------------------------- client helpers */

/* One GET of 'path' on handle 'h' (its connection kept for the next), or on a fresh connection
 * when h is NULL. */
static void get_on(CURL *h, struct demo *d, const char *path, struct srvtest_resp *r)
{
    struct srvtest_call c = {.path = path, .timeout_ms = SLOW_MS};
    srvtest_call(h, demo_port(d), &c, r);
}

static void get(struct demo *d, const char *path, struct srvtest_resp *r)
{
    get_on(NULL, d, path, r);
}

/* 's' percent-encoded: every byte but A-Z a-z 0-9 - . _ ~ as %XX ('/' included). */
static void escape(const char *s, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t k = 0;
    for (; *s && k + 4 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (isalnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~') {
            out[k++] = (char)ch;
        } else {
            out[k++] = '%';
            out[k++] = hex[ch >> 4];
            out[k++] = hex[ch & 15];
        }
    }
    out[k] = '\0';
}

static struct demo *start(void)
{
    struct demo *d = NULL;
    int rc = demo_start("127.0.0.1", 0, &d);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    return d;
}

/* Checks that 'body' is an item document for 'id' (n bytes, valid UTF-8); returns its price. */
static double check_item(const char *body, const char *id, size_t n)
{
    cJSON *doc = cJSON_Parse(body);
    CU_ASSERT_PTR_NOT_NULL_FATAL(doc);
    const cJSON *jid = cJSON_GetObjectItemCaseSensitive(doc, "id");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(doc, "name");
    const cJSON *price = cJSON_GetObjectItemCaseSensitive(doc, "price_cents");
    const cJSON *tags = cJSON_GetObjectItemCaseSensitive(doc, "tags");
    CU_ASSERT(cJSON_IsString(jid) && strlen(jid->valuestring) == n &&
              memcmp(jid->valuestring, id, n) == 0);
    char want[512];
    snprintf(want, sizeof(want), "Item %.*s", (int)n, id);
    CU_ASSERT(cJSON_IsString(name) && strcmp(name->valuestring, want) == 0);
    CU_ASSERT(cJSON_IsNumber(price) && price->valuedouble >= 100 && price->valuedouble <= 99999 &&
              price->valuedouble == (double)(long)price->valuedouble);
    CU_ASSERT(cJSON_IsArray(tags) && cJSON_GetArraySize(tags) == 1 &&
              cJSON_IsString(cJSON_GetArrayItem(tags, 0)) &&
              strcmp(cJSON_GetArrayItem(tags, 0)->valuestring, "demo") == 0);
    double p = cJSON_IsNumber(price) ? price->valuedouble : -1;
    cJSON_Delete(doc);
    return p;
}

struct stats_want {
    struct demo *d;
    uint64_t canceled, in_flight, sleeping;
};

static bool stats_reach(void *arg)
{
    struct stats_want *w = arg;
    struct demo_stats s;
    demo_stats(w->d, &s);
    return s.canceled == w->canceled && s.in_flight == w->in_flight && s.sleeping == w->sleeping;
}

/* Makes sure the ctx timer thread is running, so thread counts taken next stay put. */
static void warm_ctx_timer(void)
{
    struct ctx *c = ctx_with_timeout(ctx_background(), 60000);
    ctx_free(c);
}

/* ---------------------------------------------------------------- tests */

static void test_demo_item_json(void)
{
    struct demo *d = start();
    struct srvtest_resp r, r2;
    get(d, "/items/abc-42", &r);
    CU_ASSERT_EQUAL(r.rc, CURLE_OK);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.content_type, "application/json");
    double p1 = check_item(r.body, "abc-42", 6);
    get(d, "/items/abc-42", &r2);
    double p2 = check_item(r2.body, "abc-42", 6);
    CU_ASSERT_EQUAL(p1, p2); /* deterministic */
    CU_ASSERT_STRING_EQUAL(r.body, r2.body);
    srvtest_resp_free(&r);
    srvtest_resp_free(&r2);
    /* Different ids mostly get different prices. */
    int distinct = 0;
    double first = -1;
    for (int i = 0; i < 10; i++) {
        char path[64];
        snprintf(path, sizeof(path), "/items/id%d", i);
        get(d, path, &r);
        char id[16];
        snprintf(id, sizeof(id), "id%d", i);
        double p = check_item(r.body, id, strlen(id));
        if (i == 0)
            first = p;
        else if (p != first)
            distinct++;
        srvtest_resp_free(&r);
    }
    CU_ASSERT(distinct >= 5);
    demo_stop(d);
}

static void test_demo_id_escaping_round_trip(void)
{
    static const char *const ids[] = {
        "with space",  "quo\"te",   "back\\slash",  "a/b", "\xc3\xbc", "caf\xc3\xa9 \xe2\x82\xac",
        "ctl\x01\x1f", "tab\tnl\n", "{\"json\":1}", "%41", "?&=#",     "\xe2\x80\xa8",
    };
    struct demo *d = start();
    CURL *h = curl_easy_init();
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
        char enc[256];
        escape(ids[i], enc, sizeof(enc)); /* '/' becomes %2F */
        char path[512];
        snprintf(path, sizeof(path), "/items/%s", enc);
        struct srvtest_resp r;
        get_on(h, d, path, &r);
        CU_ASSERT_EQUAL(r.status, 200);
        check_item(r.body, ids[i], strlen(ids[i]));
        srvtest_resp_free(&r);
    }
    /* Invalid UTF-8 is replaced, so the body is still valid JSON. */
    struct srvtest_resp r;
    get_on(h, d, "/items/x%FFy", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    check_item(r.body, "x\xef\xbf\xbdy", 5);
    srvtest_resp_free(&r);
    curl_easy_cleanup(h);
    demo_stop(d);
}

static void test_demo_fail_is_500(void)
{
    struct demo *d = start();
    struct srvtest_resp r;
    get(d, "/items/fail-7", &r);
    CU_ASSERT_EQUAL(r.status, 500);
    CU_ASSERT_STRING_EQUAL(r.content_type, "application/json");
    CU_ASSERT_STRING_EQUAL(r.body, "{\"error\":\"injected failure\",\"id\":\"fail-7\"}");
    srvtest_resp_free(&r);
    get(d, "/items/fail%22q", &r); /* the id is escaped here too */
    CU_ASSERT_EQUAL(r.status, 500);
    CU_ASSERT_STRING_EQUAL(r.body, "{\"error\":\"injected failure\",\"id\":\"fail\\\"q\"}");
    srvtest_resp_free(&r);
    demo_stop(d);
}

static void test_demo_text_is_plain(void)
{
    struct demo *d = start();
    struct srvtest_resp r;
    get(d, "/items/text-1", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.content_type, "text/plain");
    CU_ASSERT_STRING_EQUAL(r.body, "plain text for text-1");
    srvtest_resp_free(&r);
    demo_stop(d);
}

/* drop100 always closes without an answer, drop0 never does; drop30 closes some of 200. */
static void test_demo_drop_ids(void)
{
    struct demo *d = start();
    struct srvtest_resp r;
    get(d, "/items/drop100-a", &r);
    CU_ASSERT_EQUAL(r.rc, CURLE_GOT_NOTHING);
    CU_ASSERT_EQUAL(r.status, 0);
    srvtest_resp_free(&r);
    get(d, "/items/drop0-a", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    check_item(r.body, "drop0-a", 7);
    srvtest_resp_free(&r);
    int dropped = 0;
    for (int i = 0; i < 200; i++) {
        get(d, "/items/drop30-b", &r);
        dropped += r.rc == CURLE_GOT_NOTHING;
        CU_ASSERT(r.rc == CURLE_GOT_NOTHING || r.status == 200);
        srvtest_resp_free(&r);
    }
    CU_ASSERT(dropped > 20 && dropped < 110); /* 60 expected; any sane generator is in here */
    get(d, "/items/dropx", &r); /* no number: an ordinary id */
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    demo_stop(d);
}

static void test_demo_status_ids(void)
{
    struct demo *d = start();
    struct srvtest_resp r;
    get(d, "/items/status418", &r);
    CU_ASSERT_EQUAL(r.status, 418);
    CU_ASSERT_STRING_EQUAL(r.body,
                           "{\"error\":\"injected status\",\"status\":418,\"id\":\"status418\"}");
    srvtest_resp_free(&r);
    get(d, "/items/status503-x", &r);
    CU_ASSERT_EQUAL(r.status, 503);
    srvtest_resp_free(&r);
    get(d, "/items/status201", &r);
    CU_ASSERT_EQUAL(r.status, 201);
    check_item(r.body, "status201", 9);
    srvtest_resp_free(&r);
    get(d, "/items/status204", &r);
    CU_ASSERT_EQUAL(r.status, 204);
    CU_ASSERT_EQUAL(r.len, 0);
    srvtest_resp_free(&r);
    /* Not a magic status: out of range or not three digits. */
    get(d, "/items/status99", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    get(d, "/items/status4180", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    get(d, "/items/status100", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    demo_stop(d);
}

static void test_demo_sleep_delays(void)
{
    struct demo *d = start();
    struct srvtest_resp r;
    int64_t t0 = ctx_now();
    get(d, "/items/sleep200", &r);
    int64_t dt = ctx_now() - t0;
    CU_ASSERT_EQUAL(r.status, 200);
    check_item(r.body, "sleep200", 8);
    CU_ASSERT(dt >= 200);
    CU_ASSERT(dt < SLOW_MS);
    srvtest_resp_free(&r);

    /* ?ms= on any id, added to sleep<N>. */
    t0 = ctx_now();
    get(d, "/items/plain?ms=150", &r);
    dt = ctx_now() - t0;
    CU_ASSERT_EQUAL(r.status, 200);
    check_item(r.body, "plain", 5);
    CU_ASSERT(dt >= 150);
    srvtest_resp_free(&r);
    t0 = ctx_now();
    get(d, "/items/sleep100-x?ms=100", &r);
    dt = ctx_now() - t0;
    CU_ASSERT_EQUAL(r.status, 200);
    check_item(r.body, "sleep100-x", 10);
    CU_ASSERT(dt >= 200);
    srvtest_resp_free(&r);
    /* A delayed failure is still a failure. */
    t0 = ctx_now();
    get(d, "/items/fail-late?ms=50", &r);
    CU_ASSERT(ctx_now() - t0 >= 50);
    CU_ASSERT_EQUAL(r.status, 500);
    srvtest_resp_free(&r);
    /* "sleep" without digits, or ?ms= that is not a number: no delay, a normal item. */
    get(d, "/items/sleepy?ms=abc", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    check_item(r.body, "sleepy", 6);
    srvtest_resp_free(&r);

    struct demo_stats s;
    demo_stats(d, &s);
    CU_ASSERT_EQUAL(s.delayed, 4);
    CU_ASSERT_EQUAL(s.requests, 5);
    CU_ASSERT_EQUAL(s.sleeping, 0);
    CU_ASSERT_EQUAL(s.canceled, 0);
    demo_stop(d);
}

static void test_demo_keep_alive(void)
{
    struct demo *d = start();
    CURL *h = curl_easy_init();
    long connects = 0;
    int ok = 0;
    for (int i = 0; i < 100; i++) {
        char path[64];
        /* Mix in the other answers: none of them may close the connection. */
        if (i % 10 == 3)
            snprintf(path, sizeof(path), "/nothing/%d", i);
        else if (i % 10 == 5)
            snprintf(path, sizeof(path), "/items/fail%d", i);
        else if (i % 25 == 7)
            snprintf(path, sizeof(path), "/items/sleep5-%d", i);
        else
            snprintf(path, sizeof(path), "/items/k%d", i);
        struct srvtest_resp r;
        get_on(h, d, path, &r);
        ok += r.rc == CURLE_OK && r.status != 0 && strcasecmp(r.connection, "close") != 0;
        connects += r.connects;
        srvtest_resp_free(&r);
    }
    /* A POST with a body (dropped by the demo) keeps the connection too. */
    struct srvtest_resp r;
    struct srvtest_call post = {
        .path = "/items/posted", .body = "{\"x\":1}", .timeout_ms = SLOW_MS};
    srvtest_call(h, demo_port(d), &post, &r);
    CU_ASSERT_EQUAL(r.status, 405);
    connects += r.connects;
    srvtest_resp_free(&r);
    get_on(h, d, "/items/after-post", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    connects += r.connects;
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(ok, 100);
    CU_ASSERT_EQUAL(connects, 1);
    curl_easy_cleanup(h);
    demo_stop(d);
}

static void test_demo_not_found_and_bad_method(void)
{
    struct demo *d = start();
    struct srvtest_resp r;
    static const char *const paths[] = {"/", "/items", "/items/", "/item/x", "/itemsx/y"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        get(d, paths[i], &r);
        CU_ASSERT_EQUAL(r.status, 404);
        CU_ASSERT_STRING_EQUAL(r.content_type, "application/json");
        CU_ASSERT_STRING_EQUAL(r.body, "{\"error\":\"not found\"}");
        srvtest_resp_free(&r);
    }
    static const char *const methods[] = {"POST", "PUT", "DELETE", "PATCH", "OPTIONS"};
    for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
        struct srvtest_call c = {.method = methods[i], .path = "/items/x", .timeout_ms = SLOW_MS};
        srvtest_call(NULL, demo_port(d), &c, &r);
        CU_ASSERT_EQUAL(r.status, 405);
        CU_ASSERT(strncmp(r.allow, "GET", 3) == 0);
        CU_ASSERT_STRING_EQUAL(r.body, "{\"error\":\"method not allowed\"}");
        srvtest_resp_free(&r);
    }
    demo_stop(d);
}

static void test_demo_start_errors_and_template(void)
{
    struct demo *d = NULL;
    CU_ASSERT_EQUAL(demo_start("localhost", 0, &d), -EINVAL); /* numeric addresses only */
    CU_ASSERT_EQUAL(demo_start("127.0.0.1:80", 0, &d), -EINVAL);
    CU_ASSERT_PTR_NULL(d);
    d = start();
    CU_ASSERT(demo_port(d) != 0);
    char want[64], buf[64];
    snprintf(want, sizeof(want), "http://127.0.0.1:%u/items/{id}", (unsigned)demo_port(d));
    demo_url_template(d, buf, sizeof(buf));
    CU_ASSERT_STRING_EQUAL(buf, want);
    demo_url_template(d, buf, 8); /* truncated, terminated */
    CU_ASSERT_STRING_EQUAL(buf, "http://");
    struct demo *d2 = NULL;
    CU_ASSERT_EQUAL(demo_start("127.0.0.1", demo_port(d), &d2), -EADDRINUSE);
    CU_ASSERT_PTR_NULL(d2);
    demo_stop(d);
    demo_stop(NULL);

    /* IPv6 loopback, when the machine has it. */
    struct demo *d6 = NULL;
    if (demo_start("::1", 0, &d6) == 0) {
        demo_url_template(d6, buf, sizeof(buf));
        snprintf(want, sizeof(want), "http://[::1]:%u/items/{id}", (unsigned)demo_port(d6));
        CU_ASSERT_STRING_EQUAL(buf, want);
        struct srvtest_resp r;
        struct srvtest_call c = {.host = "::1", .path = "/items/v6", .timeout_ms = SLOW_MS};
        srvtest_call(NULL, demo_port(d6), &c, &r);
        CU_ASSERT_EQUAL(r.status, 200);
        check_item(r.body, "v6", 2);
        srvtest_resp_free(&r);
        demo_stop(d6);
    }
}

/* A client that gives up mid-delay is noticed at once (long before the delay ends), counted as
 * canceled, and its request is freed. */
static void test_demo_client_disconnect_mid_sleep(void)
{
    warm_ctx_timer();
    int threads = test_thread_count(), fds = test_fd_count();
    struct demo *d = start();
    for (int i = 1; i <= 3; i++) {
        /* The client gives up after 200 ms and closes its connection. */
        struct srvtest_call c = {.path = i == 3 ? "/items/x?ms=30000" : "/items/sleep30000",
                                 .timeout_ms = 200};
        struct srvtest_resp r;
        srvtest_call(NULL, demo_port(d), &c, &r);
        CU_ASSERT_EQUAL(r.rc, CURLE_OPERATION_TIMEDOUT);
        srvtest_resp_free(&r);
        struct stats_want w = {d, (uint64_t)i, 0, 0};
        /* The delay is 30 s; detection is prompt, the bound is generous and well below that. */
        CU_ASSERT(test_wait_until(stats_reach, &w, SLOW_MS));
    }
    struct demo_stats s;
    demo_stats(d, &s);
    CU_ASSERT_EQUAL(s.requests, 3);
    CU_ASSERT_EQUAL(s.delayed, 3);
    /* The demo still serves. */
    struct srvtest_resp r;
    get(d, "/items/after", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    demo_stop(d);
    CU_ASSERT(test_settles_to(threads, fds, SLOW_MS));
}

struct sleeping_want {
    struct demo *d;
    uint64_t n;
};

static bool sleeping_reach(void *arg)
{
    struct sleeping_want *w = arg;
    struct demo_stats s;
    demo_stats(w->d, &s);
    return s.sleeping >= w->n;
}

/* Delays do not hold a thread: all 40 wait at once on 2 MHD threads, and all end well. */
static void test_demo_delays_overlap(void)
{
    enum { N = 40 };
    struct demo *d = start();
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    for (int i = 0; i < N; i++) {
        char path[64];
        snprintf(path, sizeof(path), "/items/sleep300-%d", i);
        struct srvtest_call c = {.path = path, .timeout_ms = SLOW_MS};
        CU_ASSERT(srvtest_multi_add(&g, demo_port(d), &c) == i);
    }
    int64_t t0 = ctx_now();
    struct sleeping_want w = {d, N};
    srvtest_multi_wait(&g, sleeping_reach, &w, SLOW_MS);
    struct demo_stats s;
    demo_stats(d, &s);
    CU_ASSERT_EQUAL(s.sleeping, N); /* blocking delays could not all be waiting at once */
    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, SLOW_MS));
    CU_ASSERT(ctx_now() - t0 >= 300);
    for (int i = 0; i < N; i++)
        CU_ASSERT_EQUAL(g.resp[i].status, 200);
    srvtest_multi_free(&g);
    demo_stop(d);
}

/* demo_stop() with 50 requests suspended for a minute returns promptly, answers them 503 and
 * leaves no thread or descriptor behind. */
static void test_demo_stop_with_requests_mid_sleep(void)
{
    enum { N = 50 };
    warm_ctx_timer();
    int threads = test_thread_count(), fds = test_fd_count();
    struct demo *d = start();
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    for (int i = 0; i < N; i++) {
        char path[64];
        if (i % 2)
            snprintf(path, sizeof(path), "/items/sleep60000-%d", i);
        else
            snprintf(path, sizeof(path), "/items/n%d?ms=60000", i);
        struct srvtest_call c = {.path = path, .timeout_ms = 120000};
        CU_ASSERT(srvtest_multi_add(&g, demo_port(d), &c) == i);
    }
    struct sleeping_want w = {d, N};
    srvtest_multi_wait(&g, sleeping_reach, &w, SLOW_MS);
    struct demo_stats s;
    demo_stats(d, &s);
    CU_ASSERT_EQUAL(s.sleeping, N);

    int64_t t0 = ctx_now();
    demo_stop(d);
    int64_t dt = ctx_now() - t0;
    CU_ASSERT(dt < test_ms(5000)); /* the delays are 60 s; this only says "did not wait for them" */

    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, SLOW_MS));
    int got503 = 0;
    for (int i = 0; i < N; i++) {
        const struct srvtest_resp *r = &g.resp[i];
        got503 += r->status == 503 && r->rc == CURLE_OK && r->body &&
                  strcmp(r->body, "{\"error\":\"shutting down\"}") == 0;
    }
    srvtest_multi_free(&g);
    CU_ASSERT_EQUAL(got503, N);
    CU_ASSERT(test_settles_to(threads, fds, SLOW_MS));
}

static bool idle(void *arg)
{
    struct demo_stats s;
    demo_stats(arg, &s);
    return s.in_flight == 0 && s.sleeping == 0;
}

/* Race test (for make tsan): timers firing, clients hanging up at about the same moment, and
 * demo_stop() arriving mid-way, over many rounds. Every transfer ends, every counter settles. */
static void test_demo_races_timers_hangups_and_stop(void)
{
    enum { ROUNDS = 12, N = 40 };
    warm_ctx_timer();
    int threads = test_thread_count(), fds = test_fd_count();
    for (int round = 0; round < ROUNDS; round++) {
        struct demo *d = start();
        struct srvtest_multi g;
        CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
        for (int i = 0; i < N; i++) {
            char path[64];
            int ms = 5 + (i * 7 + round * 3) % 40;
            snprintf(path, sizeof(path), "/items/sleep%d-%d", ms, i);
            /* A third give up at about the time their delay ends. */
            struct srvtest_call c = {.path = path,
                                     .timeout_ms = i % 3 == 0 ? ms + (i % 5) - 2 : SLOW_MS};
            CU_ASSERT(srvtest_multi_add(&g, demo_port(d), &c) == i);
        }
        bool stop_early = round % 2 == 1;
        if (stop_early) {
            struct sleeping_want w = {d, N / 4};
            srvtest_multi_wait(&g, sleeping_reach, &w, SLOW_MS);
            demo_stop(d);
            d = NULL;
        }
        CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, SLOW_MS));
        int finished = 0;
        for (int i = 0; i < N; i++) {
            /* 200, 503 (stopped), or a client-side timeout or a closed connection. */
            const struct srvtest_resp *r = &g.resp[i];
            finished += g.done[i] && (r->status == 200 || r->status == 503 || r->rc != CURLE_OK);
        }
        srvtest_multi_free(&g);
        CU_ASSERT_EQUAL(finished, N);
        if (d) {
            /* Every client is gone: nothing may stay in flight or asleep. */
            CU_ASSERT(test_wait_until(idle, d, SLOW_MS));
            struct demo_stats s;
            demo_stats(d, &s);
            /* Clients that gave up very early may not have been received at all. */
            CU_ASSERT_EQUAL(s.delayed, s.requests);
            CU_ASSERT(s.delayed >= N - (N + 2) / 3 && s.delayed <= N);
            CU_ASSERT(s.canceled <= (N + 2) / 3);
            demo_stop(d);
        }
    }
    CU_ASSERT(test_settles_to(threads, fds, SLOW_MS));
}

/* ---------------------------------------------------------------- members (set.h) */

/* A down@<address> id fails with 503 only on the demo at that address. */
static void test_demo_down_ids(void)
{
    struct demo *d = start();
    static const struct {
        const char *path;
        long status;
    } cases[] = {
        {"/items/down@127.0.0.1", 503},    {"/items/down@127.0.0.1-7", 503},
        {"/items/down%40127.0.0.1-8", 503}, {"/items/down@127.0.0.10-1", 200},
        {"/items/down@127.0.0.2-1", 200},  {"/items/down@127.0.0.1.5", 200},
        {"/items/down127.0.0.1", 200},     {"/items/down@", 200},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct srvtest_resp r;
        get(d, cases[i].path, &r);
        CU_ASSERT_EQUAL(r.status, cases[i].status);
        if (r.status != cases[i].status)
            fprintf(stderr, "\n  %s: %ld\n", cases[i].path, r.status);
        if (cases[i].status == 503) {
            const cJSON *e = cJSON_GetObjectItemCaseSensitive(r.json, "error");
            CU_ASSERT(cJSON_IsString(e) && !strcmp(e->valuestring, "member down"));
        }
        srvtest_resp_free(&r);
    }
    demo_stop(d);
}

/* A set of one is the demo as --demo always ran it; a set of several shares one port on
 * 127.0.0.2 and up, behind one name that its lookup answers; the rest goes to the system. */
static void test_demo_set_start_lookup_and_template(void)
{
    char err[512] = "", buf[128], want[128];
    struct demo_set *s = NULL;
    CU_ASSERT_EQUAL(demo_set_start(0, &s, err, sizeof(err)), -EINVAL);
    CU_ASSERT_EQUAL(demo_set_start(DEMO_SET_MAX + 1, &s, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NULL(s);

    CU_ASSERT_FATAL(demo_set_start(1, &s, err, sizeof(err)) == 0);
    CU_ASSERT_EQUAL(demo_set_count(s), 1);
    CU_ASSERT_PTR_NULL(demo_set_member(s, 1));
    demo_set_url_template(s, buf, sizeof(buf));
    snprintf(want, sizeof(want), "http://127.0.0.1:%u/items/{id}",
             (unsigned)demo_port(demo_set_member(s, 0)));
    CU_ASSERT_STRING_EQUAL(buf, want);
    demo_set_stop(s);
    demo_set_stop(NULL);

    int rc = demo_set_start(3, &s, err, sizeof(err));
    if (rc == -EADDRNOTAVAIL) { /* no 127.0.0.2 here: the reason names what is missing */
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "127.0.0.2"));
        return;
    }
    CU_ASSERT_FATAL(rc == 0);
    CU_ASSERT_EQUAL(demo_set_count(s), 3);
    unsigned port = demo_port(demo_set_member(s, 0));
    for (unsigned i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(demo_port(demo_set_member(s, i)), port);
        char host[32], path[64];
        snprintf(host, sizeof(host), "127.0.0.%u", i + 2);
        snprintf(path, sizeof(path), "/items/down@%s-x", host);
        struct srvtest_resp r;
        struct srvtest_call c = {.host = host, .path = path, .timeout_ms = SLOW_MS};
        srvtest_call(NULL, (uint16_t)port, &c, &r); /* each member fails its own down@ */
        CU_ASSERT_EQUAL(r.status, 503);
        srvtest_resp_free(&r);
        c.path = "/items/down@127.0.0.9-x";
        srvtest_call(NULL, (uint16_t)port, &c, &r);
        CU_ASSERT_EQUAL(r.status, 200);
        srvtest_resp_free(&r);
        struct demo_stats st;
        demo_stats(demo_set_member(s, i), &st);
        CU_ASSERT_EQUAL(st.requests, 2);
    }
    demo_set_url_template(s, buf, sizeof(buf));
    snprintf(want, sizeof(want), "http://" DEMO_SET_NAME ":%u/items/{id}", port);
    CU_ASSERT_STRING_EQUAL(buf, want);

    char addrs[256];
    CU_ASSERT_EQUAL(demo_set_lookup(s, DEMO_SET_NAME, addrs, sizeof(addrs)), 0);
    CU_ASSERT_STRING_EQUAL(addrs, "127.0.0.2,127.0.0.3,127.0.0.4");
    CU_ASSERT_EQUAL(demo_set_lookup(s, "Fanout-Demo.INTERNAL", addrs, sizeof(addrs)), 0);
    CU_ASSERT_STRING_EQUAL(addrs, "127.0.0.2,127.0.0.3,127.0.0.4");
    CU_ASSERT_EQUAL(demo_set_lookup(s, DEMO_SET_NAME, addrs, 20), 0); /* whole addresses only */
    CU_ASSERT_STRING_EQUAL(addrs, "127.0.0.2,127.0.0.3");
    CU_ASSERT_EQUAL(demo_set_lookup(s, DEMO_SET_NAME, addrs, 19), 0);
    CU_ASSERT_STRING_EQUAL(addrs, "127.0.0.2");
    CU_ASSERT_EQUAL(demo_set_lookup(s, "other.invalid", addrs, sizeof(addrs)), EAI_NONAME);
    CU_ASSERT_EQUAL(demo_set_lookup(s, "127.0.0.1", addrs, sizeof(addrs)), 0);
    CU_ASSERT_STRING_EQUAL(addrs, "127.0.0.1");
    demo_set_stop(s);
}

/* Parses 'args' (NULL-terminated, after the program name) with no FANOUT_* upstream setting in
 * the environment. */
static int parse_args(struct srv_config *c, const char *const *args, char *err, size_t errlen)
{
    static const char *const vars[] = {"FANOUT_DEMO", "FANOUT_DEMO_MEMBERS", "FANOUT_UPSTREAM",
                                       "FANOUT_UPSTREAMS_FILE", "FANOUT_DEMO_UPSTREAM_ONLY"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
        unsetenv(vars[i]);
    char *argv[16] = {"fanout"};
    int argc = 1;
    for (; args[argc - 1] && argc < 15; argc++)
        argv[argc] = (char *)(uintptr_t)args[argc - 1];
    enum config_action act;
    config_defaults(c);
    return config_parse(c, argc, argv, &act, err, errlen);
}

/* --demo-members: 1 by default, 1 to DEMO_SET_MAX, and only with --demo. */
static void test_demo_members_flag(void)
{
    struct srv_config c;
    char err[512];
    CU_ASSERT_EQUAL(parse_args(&c, (const char *[]){"--demo", NULL}, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(c.demo_members, 1);
    CU_ASSERT_EQUAL(
        parse_args(&c, (const char *[]){"--demo", "--demo-members", "3", NULL}, err, sizeof(err)),
        0);
    CU_ASSERT_EQUAL(c.demo_members, 3);
    CU_ASSERT_EQUAL(parse_args(&c, (const char *[]){"--demo", "--demo-members=16", NULL}, err,
                               sizeof(err)),
                    0);
    const char *const *bad[] = {
        (const char *[]){"--demo", "--demo-members", "0", NULL},
        (const char *[]){"--demo", "--demo-members", "17", NULL},
        (const char *[]){"--demo-members", "3", "--upstream", "http://h:1/{id}", NULL},
        (const char *[]){"--demo-members", "2", "--demo-upstream-only", NULL},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        CU_ASSERT_EQUAL(parse_args(&c, bad[i], err, sizeof(err)), -EINVAL);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "--demo-members"));
    }
}

/* A server with --demo --demo-members N, its log on a memory file. */
struct members_env {
    struct srv *srv;
    uint16_t port;
    int log_fd;
};

static bool members_start(struct members_env *e, unsigned n, int64_t eject_ms)
{
    struct srv_config c;
    config_defaults(&c);
    snprintf(c.listen_host, sizeof(c.listen_host), "127.0.0.1");
    c.listen_port = 0;
    c.demo = true;
    c.demo_members = n;
    c.http_threads = 2;
    c.fetch_threads = 2;
    c.drain_ms = 2000;
    c.log_level = LOG_INFO;
    if (eject_ms) {
        c.eject_ms = c.eject_max_ms = eject_ms;
        c.limit = 4;
    }
    e->log_fd = memfd_create("fanout-log", MFD_CLOEXEC);
    CU_ASSERT_FATAL(e->log_fd >= 0);
    char err[512] = "";
    int rc = srv_new(&c, e->log_fd, &e->srv, err, sizeof(err));
    if (rc == -EADDRNOTAVAIL) { /* no 127.0.0.2 here */
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "127.0.0.2"));
        close(e->log_fd);
        return false;
    }
    if (rc != 0)
        fprintf(stderr, "\n  srv_new: %s\n", err);
    CU_ASSERT_FATAL(rc == 0);
    e->port = srv_port(e->srv);
    return true;
}

/* Stops the server and returns its log (malloc'd). */
static char *members_stop(struct members_env *e)
{
    CU_ASSERT_EQUAL(srv_free(e->srv), 0);
    off_t len = lseek(e->log_fd, 0, SEEK_END);
    char *log = calloc(1, (size_t)(len > 0 ? len : 0) + 1);
    CU_ASSERT_FATAL(log != NULL);
    if (len > 0)
        CU_ASSERT(pread(e->log_fd, log, (size_t)len, 0) == len);
    close(e->log_fd);
    return log;
}

/* How many log lines hold every one of the strings a, b (b may be NULL). */
static int log_lines(const char *log, const char *a, const char *b)
{
    int n = 0;
    for (const char *p = log; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char line[1024];
        snprintf(line, sizeof(line), "%.*s", (int)len, p);
        n += strstr(line, a) && (!b || strstr(line, b));
        p += len + (nl != NULL);
    }
    return n;
}

static bool members_scrape(uint16_t port, struct prom_scrape *sc)
{
    struct srvtest_resp r;
    srvtest_get(port, "/metrics", &r);
    char err[512] = "";
    bool ok = r.status == 200 && r.body && prom_parse(r.body, r.len, "fanout_", sc, err,
                                                      sizeof(err)) == 0;
    if (!ok)
        fprintf(stderr, "\n  scrape: %ld %s\n", r.status, err);
    srvtest_resp_free(&r);
    return ok;
}

/* A settled batch of n ids "<prefix><k>"; returns how many positions came back 200. */
static int batch_ok(uint16_t port, const char *prefix, int n)
{
    size_t cap = (size_t)n * 48 + 64;
    char *body = malloc(cap);
    CU_ASSERT_FATAL(body != NULL);
    size_t used = (size_t)snprintf(body, cap, "{\"mode\":\"settled\",\"ids\":[");
    for (int k = 0; k < n; k++)
        used += (size_t)snprintf(body + used, cap - used, "%s\"%s%d\"", k ? "," : "", prefix, k);
    snprintf(body + used, cap - used, "]}");
    struct srvtest_call c = {.body = body, .timeout_ms = SLOW_MS};
    struct srvtest_resp r;
    srvtest_call(NULL, port, &c, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    int ok = 0;
    const cJSON *it;
    const cJSON *res = srvtest_results(&r);
    cJSON_ArrayForEach(it, res)
    {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(it, "status");
        ok += cJSON_IsNumber(st) && st->valueint == 200;
    }
    srvtest_resp_free(&r);
    free(body);
    return ok;
}

/* --demo --demo-members 3: discovery finds three members behind the demo's name, each serves
 * its share of ids (its own counters and the server's per-member metrics agree), and each was
 * logged as added. */
static void test_demo_members_serve(void)
{
    enum { N = 3, IDS = 90 };
    struct members_env e;
    if (!members_start(&e, N, 0))
        return;
    uint16_t mport = demo_port(srv_demo_member(e.srv, 0));
    CU_ASSERT_PTR_NULL(srv_demo_member(e.srv, N));
    char upstream[64];
    snprintf(upstream, sizeof(upstream), DEMO_SET_NAME ":%u", (unsigned)mport);

    struct srvtest_resp r;
    srvtest_get(e.port, "/readyz", &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT_EQUAL(batch_ok(e.port, "item-", IDS), IDS);

    struct prom_scrape sc;
    CU_ASSERT_FATAL(members_scrape(e.port, &sc));
    char lab[256];
    snprintf(lab, sizeof(lab), "upstream=\"%s\"", upstream);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_members", lab, -1), N);
    snprintf(lab, sizeof(lab), "result=\"ok\",upstream=\"%s\"", upstream);
    CU_ASSERT(prom_value(&sc, "fanout_resolves_total", lab, -1) >= 1);
    uint64_t total = 0;
    for (unsigned i = 0; i < N; i++) {
        struct demo_stats st;
        demo_stats(srv_demo_member(e.srv, i), &st);
        snprintf(lab, sizeof(lab), "member=\"127.0.0.%u:%u\",result=\"ok\",upstream=\"%s\"", i + 2,
                 (unsigned)mport, upstream);
        double fetched = prom_value(&sc, "fanout_upstream_fetches_total", lab, -1);
        CU_ASSERT(st.requests > 0);
        CU_ASSERT_EQUAL(fetched, (double)st.requests);
        if (st.requests == 0 || fetched != (double)st.requests)
            fprintf(stderr, "\n  member %u: %llu requests, %g fetches\n", i,
                    (unsigned long long)st.requests, fetched);
        total += st.requests;
    }
    CU_ASSERT_EQUAL(total, IDS);
    prom_free(&sc);

    char *log = members_stop(&e);
    for (unsigned i = 0; i < N; i++) {
        char member[64];
        snprintf(member, sizeof(member), "\"member\":\"127.0.0.%u:%u\"", i + 2, (unsigned)mport);
        CU_ASSERT_EQUAL(log_lines(log, "\"msg\":\"member added\"", member), 1);
    }
    CU_ASSERT_EQUAL(log_lines(log, "\"msg\":\"member added\"", NULL), N);
    free(log);
}

/* One member failing (down@ ids) is ejected after --eject-after failures in a row: the log and
 * the metrics say so, and the next batches go to the other two only. */
static void test_demo_members_one_ejected(void)
{
    enum { N = 3, IDS = 90 };
    struct members_env e;
    if (!members_start(&e, N, 3600000))
        return;
    uint16_t mport = demo_port(srv_demo_member(e.srv, 0));
    /* Settled: an id that failed on 127.0.0.3 and could not be retried is its own error. */
    batch_ok(e.port, "down@127.0.0.3-", IDS);

    struct prom_scrape sc;
    CU_ASSERT_FATAL(members_scrape(e.port, &sc));
    char lab[256];
    snprintf(lab, sizeof(lab),
             "member=\"127.0.0.3:%u\",upstream=\"" DEMO_SET_NAME ":%u\"", (unsigned)mport,
             (unsigned)mport);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_ejected", lab, -1), 1);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_ejections_total", lab, -1), 1);
    prom_free(&sc);

    struct demo_stats before[N], after[N];
    for (unsigned i = 0; i < N; i++)
        demo_stats(srv_demo_member(e.srv, i), &before[i]);
    CU_ASSERT_EQUAL(batch_ok(e.port, "after-", IDS), IDS);
    for (unsigned i = 0; i < N; i++)
        demo_stats(srv_demo_member(e.srv, i), &after[i]);
    CU_ASSERT_EQUAL(after[1].requests, before[1].requests); /* 127.0.0.3: none */
    CU_ASSERT(after[0].requests > before[0].requests);
    CU_ASSERT(after[2].requests > before[2].requests);
    CU_ASSERT_EQUAL(after[0].requests - before[0].requests + after[2].requests -
                        before[2].requests, IDS);

    char *log = members_stop(&e);
    char member[64];
    snprintf(member, sizeof(member), "\"member\":\"127.0.0.3:%u\"", (unsigned)mport);
    CU_ASSERT_EQUAL(log_lines(log, "\"msg\":\"upstream ejected\"", member), 1);
    CU_ASSERT_EQUAL(log_lines(log, "\"msg\":\"upstream ejected\"", NULL), 1);
    free(log);
}

static CU_TestInfo demo_tests[] = {
    {"item JSON body and content type", test_demo_item_json},
    {"id escaping round trip", test_demo_id_escaping_round_trip},
    {"fail ids answer 500", test_demo_fail_is_500},
    {"text ids answer text/plain", test_demo_text_is_plain},
    {"status ids answer that status", test_demo_status_ids},
    {"drop ids close without an answer, as often as asked", test_demo_drop_ids},
    {"sleep ids and ?ms= delay the answer", test_demo_sleep_delays},
    {"delays overlap without holding threads", test_demo_delays_overlap},
    {"keep-alive: 100 requests on one connection", test_demo_keep_alive},
    {"unknown path 404, other methods 405", test_demo_not_found_and_bad_method},
    {"start errors and URL template", test_demo_start_errors_and_template},
    {"client disconnect mid-sleep is counted and freed", test_demo_client_disconnect_mid_sleep},
    {"stop with 50 requests mid-sleep is prompt and clean", test_demo_stop_with_requests_mid_sleep},
    {"timers, hang-ups and stop race cleanly", test_demo_races_timers_hangups_and_stop},
    {"down@ ids fail only on their member", test_demo_down_ids},
    {"--demo-members: its bounds, only with --demo", test_demo_members_flag},
    {"demo set: start, lookup and template", test_demo_set_start_lookup_and_template},
    {"--demo-members 3: three members serve", test_demo_members_serve},
    {"--demo-members 3: one member down is ejected", test_demo_members_one_ejected},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(demo, demo_tests)
