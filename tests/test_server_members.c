/* End-to-end tests of upstream members, over HTTP: every address of an upstream's name is a
 * member with connections of its own; the members follow the name's lookups while batches run;
 * an upstream left without members fails its ids at once and /readyz says so; a failing lookup
 * keeps the last members; the upstreams file is read on srv_reload() and when it is replaced;
 * health checks keep traffic off a new member until it passes; snapshot swaps race many batches
 * (for make tsan and make asan); a retry whose snapshot's members have all left goes to the
 * set's members now; threads and fds return to their baseline at srv_free().
 *
 * The members are test upstreams (tests/upstub.h) on 127.0.0.2, 127.0.0.3 and 127.0.0.4, all
 * on one port, and the names ("items.test" and others) are answered by the test's own lookup
 * (struct srv_seams), which the test changes as it goes. Waits are on observable state (the
 * discover thread's passes, /metrics, the stubs' counters and request logs, the clients'
 * counters) with generous bounds; no assertion depends on how long anything takes. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/srvtest.h"
#include "tests/support.h"

#define NAME "items.test"
#define STUBS_MAX 4
#define CLIENT_TIMEOUT_MS test_ms(60000) /* one batch's whole exchange, for the client loops */

static void pause_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---------------------------------------------------------------- the lookup */

#define DNS_NAMES_MAX 4
#define DNS_ANSWERS_MAX 4

/* What one name resolves to: rc 0 and answers[] in turn (one per lookup), or an EAI_* code. */
struct dns_name {
    char host[64];
    char answers[DNS_ANSWERS_MAX][128];
    unsigned nanswers;
    int rc;
    uint64_t calls;
};

/* The lookup the server is given: a table of names; a name not in it is NXDOMAIN. */
struct fake_dns {
    pthread_mutex_t mu;
    struct dns_name names[DNS_NAMES_MAX];
    unsigned n;
    atomic_uint_fast64_t calls; /* lookups of any name */
};

static int fake_lookup(void *arg, const char *host, char *addrs, size_t size)
{
    struct fake_dns *d = arg;
    int rc = EAI_NONAME;
    pthread_mutex_lock(&d->mu);
    for (unsigned i = 0; i < d->n; i++) {
        struct dns_name *nm = &d->names[i];
        if (strcmp(nm->host, host) != 0)
            continue;
        rc = nm->rc;
        if (rc == 0)
            snprintf(addrs, size, "%s", nm->answers[nm->calls % nm->nanswers]);
        nm->calls++;
        break;
    }
    pthread_mutex_unlock(&d->mu);
    atomic_fetch_add(&d->calls, 1);
    return rc;
}

/* The entry of 'host' (made when missing); d->mu held. */
static struct dns_name *dns_entry(struct fake_dns *d, const char *host)
{
    for (unsigned i = 0; i < d->n; i++)
        if (!strcmp(d->names[i].host, host))
            return &d->names[i];
    if (d->n == DNS_NAMES_MAX)
        return NULL;
    struct dns_name *nm = &d->names[d->n++];
    memset(nm, 0, sizeof(*nm));
    snprintf(nm->host, sizeof(nm->host), "%s", host);
    return nm;
}

/* From now on 'host' resolves to answers[0], answers[1], ... in turn (n of them), or, with
 * rc != 0, fails with that EAI_* code. */
static void dns_set(struct fake_dns *d, const char *host, int rc, const char *const *answers,
                    unsigned n)
{
    pthread_mutex_lock(&d->mu);
    struct dns_name *nm = dns_entry(d, host);
    if (nm) {
        nm->rc = rc;
        nm->nanswers = n < DNS_ANSWERS_MAX ? n : DNS_ANSWERS_MAX;
        for (unsigned i = 0; i < nm->nanswers; i++)
            snprintf(nm->answers[i], sizeof(nm->answers[i]), "%s", answers[i]);
        nm->calls = 0;
    }
    pthread_mutex_unlock(&d->mu);
}

/* 'host' resolves to 'addrs' ("127.0.0.2,127.0.0.3"). */
static void dns_answer(struct fake_dns *d, const char *host, const char *addrs)
{
    dns_set(d, host, 0, &addrs, 1);
}

static void dns_fail(struct fake_dns *d, const char *host, int rc)
{
    dns_set(d, host, rc, NULL, 0);
}

/* ---------------------------------------------------------------- the rig */

/* Stubs on 127.0.0.2.. with one port, the lookup, a server, and an upstreams file. */
struct rig {
    struct upstub *stub[STUBS_MAX]; /* stub[i] listens on 127.0.0.(2 + i) */
    unsigned nstubs;
    int port;                       /* their one port */
    struct fake_dns dns;
    struct srv *srv;
    uint16_t sport;                 /* the server's port */
    char dir[64];                   /* a temporary directory for the file, or "" */
    char file[128];                 /* the upstreams file in it */
};

static void stub_addr(unsigned i, char *out, size_t cap)
{
    snprintf(out, cap, "127.0.0.%u", 2 + i);
}

/* Starts 'n' stubs (one loop each) on 127.0.0.2.. sharing a port. Returns false if they could
 * not be started (another socket held the port on one of the addresses every time). */
static bool rig_stubs(struct rig *r, unsigned n)
{
    for (int tries = 0; tries < 50; tries++) {
        char a[32];
        stub_addr(0, a, sizeof(a));
        if (upstub_new_at(1, a, 0, &r->stub[0]) != 0)
            return false;
        r->port = upstub_port(r->stub[0]);
        r->nstubs = 1;
        for (unsigned i = 1; i < n; i++) {
            stub_addr(i, a, sizeof(a));
            if (upstub_new_at(1, a, r->port, &r->stub[i]) != 0)
                break;
            r->nstubs++;
        }
        if (r->nstubs == n)
            return true;
        for (unsigned i = 0; i < r->nstubs; i++)
            upstub_free(r->stub[i]);
        r->nstubs = 0;
    }
    return false;
}

static void rig_init(struct rig *r, unsigned nstubs)
{
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->dns.mu, NULL);
    atomic_init(&r->dns.calls, 0);
    CU_ASSERT_FATAL(rig_stubs(r, nstubs));
}

/* The tests' server settings: one upstream, NAME on the stubs' port, looked up every 100 ms
 * (the least allowed); new members at full weight at once and no retries, so that where each
 * attempt went is plain. */
static void rig_config(const struct rig *r, struct srv_config *c)
{
    struct srvtest_env none = {0};
    srvtest_config(&none, c);
    snprintf(c->upstream, sizeof(c->upstream), "http://" NAME ":%d/items/{id}", r->port);
    c->resolve_every_ms = 100;
    c->slow_start_ms = 0;
    c->retries = 0;
}

/* Starts the server with the rig's lookup ('file_check_ms' as in struct srv_seams), its log on
 * 'log_fd'. */
static int rig_start_log(struct rig *r, const struct srv_config *c, int64_t file_check_ms,
                         int log_fd)
{
    struct srv_seams seams = {.lookup = fake_lookup, .lookup_arg = &r->dns,
                              .file_check_ms = file_check_ms};
    char err[512];
    int rc = srv_new_seams(c, log_fd, &seams, &r->srv, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "\n  srv_new_seams: %s\n", err);
        r->srv = NULL;
        return rc;
    }
    r->sport = srv_port(r->srv);
    return 0;
}

static int rig_start(struct rig *r, const struct srv_config *c, int64_t file_check_ms)
{
    return rig_start_log(r, c, file_check_ms, 2);
}

static void rig_free(struct rig *r)
{
    srv_free(r->srv);
    r->srv = NULL;
    for (unsigned i = 0; i < r->nstubs; i++)
        upstub_free(r->stub[i]);
    r->nstubs = 0;
    if (r->file[0])
        unlink(r->file);
    if (r->dir[0])
        rmdir(r->dir);
    pthread_mutex_destroy(&r->dns.mu);
}

/* ---------------------------------------------------------------- the upstreams file */

static void rig_file_dir(struct rig *r)
{
    snprintf(r->dir, sizeof(r->dir), "/tmp/fanout-members-XXXXXX");
    CU_ASSERT_FATAL(mkdtemp(r->dir) != NULL);
    snprintf(r->file, sizeof(r->file), "%s/upstreams", r->dir);
}

/* Replaces the file by one holding 'text': written beside it, then rename(2)d over it, so a
 * reader sees the old file or the new one, never a part. */
static void rig_file_write(struct rig *r, const char *text)
{
    char tmp[160];
    snprintf(tmp, sizeof(tmp), "%s/.next", r->dir);
    FILE *f = fopen(tmp, "w");
    CU_ASSERT_FATAL(f != NULL);
    CU_ASSERT_FATAL(fputs(text, f) >= 0);
    CU_ASSERT_FATAL(fclose(f) == 0);
    CU_ASSERT_FATAL(rename(tmp, r->file) == 0);
}

/* The template of name 'host' on the stubs' port, as a file line. */
static void tmpl_line(const struct rig *r, const char *host, const char *path, char *out,
                      size_t cap)
{
    snprintf(out, cap, "http://%s:%d%s\n", host, r->port, path);
}

/* ---------------------------------------------------------------- observations */

/* A /metrics series' value ("name{labels}" as rendered), or -1 when absent. */
static double metric(const struct rig *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static double metric(const struct rig *r, const char *fmt, ...)
{
    char series[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(series, sizeof(series), fmt, ap);
    va_end(ap);
    return srvtest_metric(r->sport, series);
}

/* Waits until the series reads 'want' (-1: until it is absent). */
static bool wait_metric(const struct rig *r, double want, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool wait_metric(const struct rig *r, double want, const char *fmt, ...)
{
    char series[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(series, sizeof(series), fmt, ap);
    va_end(ap);
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    for (;;) {
        double v = srvtest_metric(r->sport, series);
        if (v == want)
            return true;
        if (ctx_now() > until) {
            fprintf(stderr, "\n  %s is %g, not %g\n", series, v, want);
            return false;
        }
        pause_ms(5);
    }
}

/* Waits until the series reads at least 'want'. */
static bool wait_metric_at_least(const struct rig *r, double want, const char *series)
{
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    for (;;) {
        double v = srvtest_metric(r->sport, series);
        if (v >= want)
            return true;
        if (ctx_now() > until) {
            fprintf(stderr, "\n  %s is %g, not %g or more\n", series, v, want);
            return false;
        }
        pause_ms(5);
    }
}

/* NAME's members now, by the gauge. */
static bool wait_members(const struct rig *r, double n)
{
    return wait_metric(r, n, "fanout_upstream_members{upstream=\"" NAME ":%d\"}", r->port);
}

/* Requests stub i has received whose target starts with 'prefix' (of those it still logs: its
 * last UPSTUB_LOG_SIZE). */
static size_t stub_prefixed(const struct rig *r, unsigned i, const char *prefix)
{
    struct upstub_req *log = malloc(UPSTUB_LOG_SIZE * sizeof(*log));
    CU_ASSERT_FATAL(log != NULL);
    size_t n = upstub_log(r->stub[i], log, UPSTUB_LOG_SIZE), k = 0;
    for (size_t j = 0; j < n; j++)
        k += strncmp(log[j].target, prefix, strlen(prefix)) == 0;
    free(log);
    return k;
}

static uint64_t stub_requests(const struct rig *r, unsigned i)
{
    return UPSTUB_STAT(r->stub[i], requests);
}

struct passes_want {
    struct srv *srv;
    uint64_t n;
};

static bool passes_reached(void *arg)
{
    struct passes_want *w = arg;
    return srv_discover_passes(w->srv) >= w->n;
}

/* srv_reload(), then waits until a whole pass of the discover thread has run since: the pass
 * in progress at the call may have started before it, the one after has not. The names are
 * looked up every resolve_every_ms, so passes keep coming. */
static bool reload_and_wait(struct rig *r)
{
    srv_reload(r->srv);
    struct passes_want w = {r->srv, srv_discover_passes(r->srv) + 2};
    return test_wait_until(passes_reached, &w, SRVTEST_WAIT_MS);
}

/* POSTs a batch of 'n' ids "<prefix><k>" and returns the status (0 when no answer came);
 * 'out' (or NULL) keeps the response for the caller to free. */
static long post_ids(const struct rig *r, const char *prefix, unsigned n, struct srvtest_resp *out)
{
    char body[4096];
    size_t k = (size_t)snprintf(body, sizeof(body), "{\"timeout_ms\":30000,\"ids\":[");
    for (unsigned i = 0; i < n && k < sizeof(body) - 64; i++)
        k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"%s%u\"", i ? "," : "", prefix, i);
    snprintf(body + k, sizeof(body) - k, "]}");
    struct srvtest_resp own, *resp = out ? out : &own;
    struct srvtest_call c = {.body = body, .timeout_ms = CLIENT_TIMEOUT_MS};
    srvtest_call(NULL, r->sport, &c, resp);
    long status = resp->status;
    if (status == 200 && cJSON_GetArraySize(srvtest_results(resp)) != (int)n)
        status = -1;
    if (status != 200 && !out)
        fprintf(stderr, "\n  batch %s*: %ld %s\n", prefix, resp->status,
                resp->body ? resp->body : "(no answer)");
    if (!out)
        srvtest_resp_free(&own);
    return status;
}

/* Sends batches of 8 ids "<prefix><round>-<k>" until stub 'i' has received 'n' of them more
 * than before, every one answered 200. Returns whether it happened within the bound. */
static bool batches_until_stub(const struct rig *r, const char *prefix, unsigned i, uint64_t n)
{
    uint64_t want = stub_requests(r, i) + n;
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    for (unsigned round = 0; stub_requests(r, i) < want; round++) {
        char p[64];
        snprintf(p, sizeof(p), "%s%u-", prefix, round);
        if (post_ids(r, p, 8, NULL) != 200 || ctx_now() > until)
            return false;
    }
    return true;
}

/* ---------------------------------------------------------------- client loops */

/* A client thread sending batches of 'ids' distinct ids on one keep-alive connection, 'max' of
 * them (0: until *stop). Every 'sync_every' batches (0: never) it waits until the lookup has
 * been asked again since its last wait, so that its batches interleave with member changes. */
struct client {
    pthread_t thread;
    const struct rig *r;
    unsigned id;
    unsigned ids;
    unsigned max;
    atomic_bool *stop;
    unsigned sync_every;
    atomic_uint started, done; /* batches sent, batches answered (read while it runs) */
    unsigned bad;              /* answers other than a 200 with every result */
    unsigned unsynced;         /* waits for the lookup that timed out */
    char first_bad[256];       /* the first of them */
};

struct calls_want {
    const atomic_uint_fast64_t *calls;
    uint64_t n;
};

static bool calls_reached(void *arg)
{
    struct calls_want *w = arg;
    return test_load(w->calls) >= w->n;
}

static void *client_main(void *arg)
{
    struct client *c = arg;
    CURL *easy = curl_easy_init();
    char body[2048];
    uint64_t seen = test_load(&c->r->dns.calls);
    for (unsigned n = 0; (c->max == 0 || n < c->max) && !(c->stop && atomic_load(c->stop)); n++) {
        if (c->sync_every && n % c->sync_every == c->sync_every - 1) {
            struct calls_want w = {&c->r->dns.calls, seen + 1};
            c->unsynced += !test_wait_until(calls_reached, &w, SRVTEST_WAIT_MS);
            seen = test_load(&c->r->dns.calls);
        }
        size_t k = (size_t)snprintf(body, sizeof(body), "{\"timeout_ms\":30000,\"ids\":[");
        for (unsigned i = 0; i < c->ids; i++)
            k += (size_t)snprintf(body + k, sizeof(body) - k, "%s\"c%u-%u-%u\"", i ? "," : "",
                                  c->id, n, i);
        snprintf(body + k, sizeof(body) - k, "]}");
        atomic_fetch_add(&c->started, 1);
        struct srvtest_call call = {.body = body, .timeout_ms = CLIENT_TIMEOUT_MS};
        struct srvtest_resp resp;
        srvtest_call(easy, c->r->sport, &call, &resp);
        if (resp.status != 200 || cJSON_GetArraySize(srvtest_results(&resp)) != (int)c->ids) {
            if (c->bad++ == 0)
                snprintf(c->first_bad, sizeof(c->first_bad), "%ld (curl %d) %.200s", resp.status,
                         (int)resp.rc, resp.body ? resp.body : "");
        }
        srvtest_resp_free(&resp);
        atomic_fetch_add(&c->done, 1);
    }
    if (easy)
        curl_easy_cleanup(easy);
    return NULL;
}

static void clients_start(struct client *c, unsigned n, const struct rig *r, unsigned ids,
                          unsigned max, atomic_bool *stop, unsigned sync_every)
{
    for (unsigned i = 0; i < n; i++) {
        memset(&c[i], 0, sizeof(c[i]));
        c[i].r = r;
        c[i].id = i;
        c[i].ids = ids;
        c[i].max = max;
        c[i].stop = stop;
        c[i].sync_every = sync_every;
        atomic_init(&c[i].started, 0);
        atomic_init(&c[i].done, 0);
        CU_ASSERT_FATAL(pthread_create(&c[i].thread, NULL, client_main, &c[i]) == 0);
    }
}

/* Joins them; returns the number of bad answers (the first few printed). */
static unsigned clients_join(struct client *c, unsigned n)
{
    unsigned bad = 0;
    for (unsigned i = 0; i < n; i++) {
        pthread_join(c[i].thread, NULL);
        if (c[i].bad)
            fprintf(stderr, "\n  client %u: %u bad answers, the first %s\n", i, c[i].bad,
                    c[i].first_bad);
        bad += c[i].bad;
    }
    return bad;
}

struct clients_want {
    struct client *c;
    unsigned n;
    unsigned done[16]; /* each client's answered batches to reach */
};

static bool clients_reached(void *arg)
{
    struct clients_want *w = arg;
    for (unsigned i = 0; i < w->n; i++)
        if (atomic_load(&w->c[i].done) < w->done[i])
            return false;
    return true;
}

/* Waits until every client has had 'more' batches answered past 'base' (its batches started,
 * with base_started, or answered so far). */
static bool clients_wait(struct client *c, unsigned n, bool base_started, unsigned more)
{
    struct clients_want w = {c, n, {0}};
    for (unsigned i = 0; i < n; i++)
        w.done[i] = (base_started ? atomic_load(&c[i].started) : atomic_load(&c[i].done)) + more;
    return test_wait_until(clients_reached, &w, test_ms(30000));
}

/* ---------------------------------------------------------------- 1. two members */

/* One name, two addresses: two members. Each stub gets requests, and each member's count of
 * ok attempts is exactly what its own stub received, so no attempt went out on the other
 * member's connection. */
static void test_members_two_addresses(void)
{
    struct rig r;
    rig_init(&r, 2);
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
    struct srv_config c;
    rig_config(&r, &c);
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 2));
    CU_ASSERT(batches_until_stub(&r, "two-a", 0, 3));
    CU_ASSERT(batches_until_stub(&r, "two-b", 1, 3));
    CU_ASSERT_EQUAL(post_ids(&r, "two-c", 32, NULL), 200);
    CU_ASSERT(srvtest_wait_srv_in_flight(r.srv, 0, SRVTEST_WAIT_MS));
    double total = 0;
    for (unsigned i = 0; i < 2; i++) {
        uint64_t got = stub_requests(&r, i);
        CU_ASSERT(got >= 3);
        double ok = metric(&r,
                           "fanout_upstream_fetches_total{upstream=\"" NAME ":%d\",member=\"127.0.0.%u:%d\","
                           "result=\"ok\"}",
                           r.port, 2 + i, r.port);
        CU_ASSERT_EQUAL(ok, (double)got);
        if (ok != (double)got)
            fprintf(stderr, "\n  member 127.0.0.%u: %g ok attempts, its stub got %llu\n", 2 + i,
                    ok, (unsigned long long)got);
        total += ok;
        CU_ASSERT_EQUAL(metric(&r,
                               "fanout_upstream_in_flight{upstream=\"" NAME ":%d\","
                               "member=\"127.0.0.%u:%d\"}",
                               r.port, 2 + i, r.port),
                        0);
        CU_ASSERT_EQUAL(metric(&r,
                               "fanout_upstream_fetches_total{upstream=\"" NAME ":%d\","
                               "member=\"127.0.0.%u:%d\",result=\"unreachable\"}",
                               r.port, 2 + i, r.port),
                        0);
    }
    CU_ASSERT(total >= 3 + 3 + 32);
    CU_ASSERT(metric(&r, "fanout_resolves_total{upstream=\"" NAME ":%d\",result=\"ok\"}",
                     r.port) >= 1);
    struct srvtest_resp rz;
    srvtest_get(r.sport, "/readyz", &rz);
    CU_ASSERT_EQUAL(rz.status, 200);
    srvtest_resp_free(&rz);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 2. members come and go */

enum { CHURN_CLIENTS = 4 };

/* Batches run from several clients while a third member is added and then the first removed:
 * no batch fails; the new member gets traffic; the removed one's attempts in flight finish,
 * and once every batch that could still hold the old set is answered, no request reaches it. */
static void test_members_added_and_removed_under_load(void)
{
    struct rig r;
    rig_init(&r, 3);
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
    struct srv_config c;
    rig_config(&r, &c);
    c.limit = 48;
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 2));
    atomic_bool stop = false;
    struct client cl[CHURN_CLIENTS];
    clients_start(cl, CHURN_CLIENTS, &r, 4, 0, &stop, 0);
    CU_ASSERT(clients_wait(cl, CHURN_CLIENTS, false, 5));

    /* A third member: it takes its share. */
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3,127.0.0.4");
    srv_reload(r.srv);
    CU_ASSERT(wait_members(&r, 3));
    CU_ASSERT(UPSTUB_WAIT(r.stub[2], requests, 1, SRVTEST_WAIT_MS));

    /* Slow ids in flight, some of them on 127.0.0.2, when it is removed. */
    char slow[1024];
    size_t k = (size_t)snprintf(slow, sizeof(slow), "{\"timeout_ms\":30000,\"ids\":[");
    for (int i = 0; i < 40; i++)
        k += (size_t)snprintf(slow + k, sizeof(slow) - k, "%s\"sleep1500-%d\"", i ? "," : "", i);
    snprintf(slow + k, sizeof(slow) - k, "]}");
    struct srvtest_bg bg = {.port = r.sport,
                            .call = {.body = slow, .timeout_ms = CLIENT_TIMEOUT_MS}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    while (stub_prefixed(&r, 0, "/items/sleep1500-") == 0 && ctx_now() < until)
        pause_ms(1);
    CU_ASSERT(stub_prefixed(&r, 0, "/items/sleep1500-") >= 1);
    uint64_t canceled0 = UPSTUB_STAT(r.stub[0], canceled);

    dns_answer(&r.dns, NAME, "127.0.0.3,127.0.0.4");
    srv_reload(r.srv);
    CU_ASSERT(wait_members(&r, 2));
    CU_ASSERT_EQUAL(metric(&r,
                           "fanout_upstream_in_flight{upstream=\"" NAME ":%d\","
                           "member=\"127.0.0.2:%d\"}",
                           r.port, r.port),
                    -1); /* its series went with it */
    /* The batch that held the old set is answered in full: its attempts on the removed member
     * finished there, none was cut. */
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 200);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(srvtest_results(&bg.resp)), 40);
    srvtest_resp_free(&bg.resp);
    CU_ASSERT_EQUAL(UPSTUB_STAT(r.stub[0], canceled), canceled0);
    /* Every client batch begun before the removal was seen is answered; from then on nothing
     * reaches 127.0.0.2 while each client gets 10 more batches answered. */
    CU_ASSERT(clients_wait(cl, CHURN_CLIENTS, true, 0));
    uint64_t frozen = stub_requests(&r, 0);
    uint64_t others = stub_requests(&r, 1) + stub_requests(&r, 2);
    CU_ASSERT(clients_wait(cl, CHURN_CLIENTS, false, 10));
    CU_ASSERT_EQUAL(stub_requests(&r, 0), frozen);
    CU_ASSERT_EQUAL(UPSTUB_STAT(r.stub[0], in_flight), 0);
    /* (a batch under way when 'others' was read may have sent some of its ids already) */
    CU_ASSERT(stub_requests(&r, 1) + stub_requests(&r, 2) >= others + CHURN_CLIENTS * 9 * 4);
    atomic_store(&stop, true);
    CU_ASSERT_EQUAL(clients_join(cl, CHURN_CLIENTS), 0);
    CU_ASSERT_EQUAL(stub_requests(&r, 0), frozen);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 3. emptied */

/* NXDOMAIN: once the hold is over the upstream has no member; its ids fail at once with 502
 * upstream_unreachable saying why, and /readyz turns 503. An answer again brings it back. */
static void test_members_emptied_by_nxdomain(void)
{
    struct rig r;
    rig_init(&r, 2);
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
    struct srv_config c;
    rig_config(&r, &c);
    c.resolve_hold_ms = 200;
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 2));
    CU_ASSERT_EQUAL(post_ids(&r, "nx-a", 8, NULL), 200);

    dns_fail(&r.dns, NAME, EAI_NONAME);
    CU_ASSERT(wait_members(&r, 0));
    CU_ASSERT(metric(&r, "fanout_resolves_total{upstream=\"" NAME ":%d\",result=\"empty\"}",
                     r.port) >= 1);
    uint64_t sent0 = stub_requests(&r, 0) + stub_requests(&r, 1);
    struct srvtest_resp resp;
    CU_ASSERT_EQUAL(post_ids(&r, "nx-b", 3, &resp), 502);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&resp), "upstream_unreachable");
    const char *msg = srvtest_err_message(&resp);
    char label[64];
    snprintf(label, sizeof(label), NAME ":%d", r.port);
    CU_ASSERT(strstr(msg, label) != NULL);
    CU_ASSERT(strstr(msg, "has no member") != NULL);
    CU_ASSERT(strstr(msg, "NXDOMAIN") != NULL);
    if (!strstr(msg, label) || !strstr(msg, "has no member"))
        fprintf(stderr, "\n  message: %s\n", msg);
    srvtest_resp_free(&resp);
    CU_ASSERT_EQUAL(stub_requests(&r, 0) + stub_requests(&r, 1), sent0); /* nothing was tried */
    srvtest_get(r.sport, "/readyz", &resp);
    CU_ASSERT_EQUAL(resp.status, 503);
    const cJSON *st = resp.json ? cJSON_GetObjectItemCaseSensitive(resp.json, "status") : NULL;
    CU_ASSERT(cJSON_IsString(st) && !strcmp(st->valuestring, "no_upstream_member"));
    srvtest_resp_free(&resp);
    srvtest_get(r.sport, "/healthz", &resp); /* liveness is not readiness */
    CU_ASSERT_EQUAL(resp.status, 200);
    srvtest_resp_free(&resp);

    dns_answer(&r.dns, NAME, "127.0.0.3");
    CU_ASSERT(wait_members(&r, 1));
    uint64_t on0 = stub_requests(&r, 0), on1 = stub_requests(&r, 1);
    CU_ASSERT_EQUAL(post_ids(&r, "nx-c", 8, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 0), on0);
    CU_ASSERT_EQUAL(stub_requests(&r, 1), on1 + 8);
    srvtest_get(r.sport, "/readyz", &resp);
    CU_ASSERT_EQUAL(resp.status, 200);
    srvtest_resp_free(&resp);
    rig_free(&r);
}

/* NXDOMAIN within the hold: the members stay and serve. */
static void test_members_held_through_nxdomain(void)
{
    struct rig r;
    rig_init(&r, 2);
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
    struct srv_config c;
    rig_config(&r, &c);
    c.resolve_hold_ms = 3600000;
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 2));
    dns_fail(&r.dns, NAME, EAI_NONAME);
    char series[160];
    snprintf(series, sizeof(series),
             "fanout_resolves_total{upstream=\"" NAME ":%d\",result=\"empty\"}", r.port);
    CU_ASSERT(wait_metric_at_least(&r, 2, series));
    CU_ASSERT(reload_and_wait(&r)); /* a lookup now too: still held */
    CU_ASSERT(wait_members(&r, 2));
    CU_ASSERT(batches_until_stub(&r, "held-a", 0, 1));
    CU_ASSERT(batches_until_stub(&r, "held-b", 1, 1));
    struct srvtest_resp resp;
    srvtest_get(r.sport, "/readyz", &resp);
    CU_ASSERT_EQUAL(resp.status, 200);
    srvtest_resp_free(&resp);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 4. lookup failure */

/* A lookup that gets no answer (EAI_AGAIN) keeps the last members: batches go on to both. */
static void test_members_kept_when_lookup_fails(void)
{
    struct rig r;
    rig_init(&r, 2);
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
    struct srv_config c;
    rig_config(&r, &c);
    c.resolve_hold_ms = 0; /* an NXDOMAIN would empty it at once: this is not one */
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 2));
    dns_fail(&r.dns, NAME, EAI_AGAIN);
    char series[160];
    snprintf(series, sizeof(series),
             "fanout_resolves_total{upstream=\"" NAME ":%d\",result=\"failed\"}", r.port);
    CU_ASSERT(wait_metric_at_least(&r, 2, series));
    CU_ASSERT(reload_and_wait(&r));
    CU_ASSERT(wait_members(&r, 2));
    CU_ASSERT_EQUAL(metric(&r, "fanout_resolves_total{upstream=\"" NAME ":%d\",result=\"empty\"}",
                           r.port),
                    0);
    CU_ASSERT(batches_until_stub(&r, "again-a", 0, 2));
    CU_ASSERT(batches_until_stub(&r, "again-b", 1, 2));
    struct srvtest_resp resp;
    srvtest_get(r.sport, "/readyz", &resp);
    CU_ASSERT_EQUAL(resp.status, 200);
    srvtest_resp_free(&resp);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 5. the upstreams file */

/* Reads what the server logged on the pipe's read end (after srv_free(): all of it). */
static void read_log(int fd, char *out, size_t cap)
{
    size_t n = 0;
    for (;;) {
        ssize_t k = read(fd, out + n, cap - 1 - n);
        if (k <= 0 || (n += (size_t)k) == cap - 1)
            break;
    }
    out[n] = 0;
}

/* The file names upstream A; rewritten to name B, it is read on srv_reload() (the file is not
 * polled here) and batches go to B; a file with a bad template is refused (logged) and batches
 * keep going to B. */
static void test_members_file_reload(void)
{
    struct rig r;
    rig_init(&r, 3);
    rig_file_dir(&r);
    dns_answer(&r.dns, "a.test", "127.0.0.2");
    dns_answer(&r.dns, "b.test", "127.0.0.3");
    dns_answer(&r.dns, "c.test", "127.0.0.4");
    char a[128], b[128], bad[128], text[512];
    tmpl_line(&r, "a.test", "/items/{id}", a, sizeof(a));
    tmpl_line(&r, "b.test", "/items/{id}", b, sizeof(b));
    tmpl_line(&r, "c.test", "/items/no-id-here", bad, sizeof(bad));
    rig_file_write(&r, a);
    struct srv_config c;
    rig_config(&r, &c);
    c.upstream[0] = 0;
    snprintf(c.upstreams_file, sizeof(c.upstreams_file), "%s", r.file);
    c.log_level = LOG_ERROR;
    int logp[2];
    CU_ASSERT_FATAL(pipe2(logp, O_CLOEXEC) == 0);
    CU_ASSERT_FATAL(fcntl(logp[0], F_SETFL, O_NONBLOCK) == 0);
    CU_ASSERT_FATAL(rig_start_log(&r, &c, 3600000, logp[1]) == 0);
    CU_ASSERT(wait_metric(&r, 1, "fanout_upstream_members{upstream=\"a.test:%d\"}", r.port));
    CU_ASSERT(batches_until_stub(&r, "file-a", 0, 8));
    CU_ASSERT_EQUAL(stub_requests(&r, 1), 0);

    rig_file_write(&r, b);
    CU_ASSERT(reload_and_wait(&r));
    CU_ASSERT(wait_metric(&r, 1, "fanout_upstream_members{upstream=\"b.test:%d\"}", r.port));
    CU_ASSERT(wait_metric(&r, -1, "fanout_upstream_members{upstream=\"a.test:%d\"}", r.port));
    CU_ASSERT(srvtest_wait_srv_in_flight(r.srv, 0, SRVTEST_WAIT_MS));
    uint64_t on_a = stub_requests(&r, 0);
    CU_ASSERT_EQUAL(post_ids(&r, "file-b", 16, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 0), on_a);
    CU_ASSERT_EQUAL(stub_requests(&r, 1), 16);

    snprintf(text, sizeof(text), "# B and a template without {id}\n%s%s", b, bad);
    rig_file_write(&r, text);
    CU_ASSERT(reload_and_wait(&r));
    CU_ASSERT_EQUAL(post_ids(&r, "file-c", 16, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 1), 32);
    CU_ASSERT_EQUAL(stub_requests(&r, 0), on_a);
    CU_ASSERT_EQUAL(stub_requests(&r, 2), 0);
    CU_ASSERT_EQUAL(metric(&r, "fanout_upstream_members{upstream=\"b.test:%d\"}", r.port), 1);
    CU_ASSERT_EQUAL(metric(&r, "fanout_upstream_members{upstream=\"c.test:%d\"}", r.port), -1);
    /* A line with a space inside is refused the same way. */
    snprintf(text, sizeof(text), "%shttp://c.test:%d/items/{id} extra\n", b, r.port);
    rig_file_write(&r, text);
    CU_ASSERT(reload_and_wait(&r));
    CU_ASSERT_EQUAL(post_ids(&r, "file-d", 16, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 1), 48);
    CU_ASSERT_EQUAL(stub_requests(&r, 2), 0);

    srv_free(r.srv);
    r.srv = NULL;
    close(logp[1]);
    char *log = malloc(65536);
    CU_ASSERT_FATAL(log != NULL);
    read_log(logp[0], log, 65536);
    close(logp[0]);
    const char *first = strstr(log, "upstreams file refused");
    CU_ASSERT(first != NULL);
    CU_ASSERT(first && strstr(first + 1, "upstreams file refused") != NULL); /* both of them */
    if (!first)
        fprintf(stderr, "\n  log: %s\n", log);
    free(log);
    rig_free(&r);
}

/* The file replaced by rename(2) is picked up with no srv_reload(). */
static void test_members_file_replaced(void)
{
    struct rig r;
    rig_init(&r, 2);
    rig_file_dir(&r);
    dns_answer(&r.dns, "a.test", "127.0.0.2");
    dns_answer(&r.dns, "b.test", "127.0.0.3");
    char a[128], b[128];
    tmpl_line(&r, "a.test", "/items/{id}", a, sizeof(a));
    tmpl_line(&r, "b.test", "/items/{id}", b, sizeof(b));
    rig_file_write(&r, a);
    struct srv_config c;
    rig_config(&r, &c);
    c.upstream[0] = 0;
    snprintf(c.upstreams_file, sizeof(c.upstreams_file), "%s", r.file);
    CU_ASSERT_FATAL(rig_start(&r, &c, 20) == 0);
    CU_ASSERT(wait_metric(&r, 1, "fanout_upstream_members{upstream=\"a.test:%d\"}", r.port));
    CU_ASSERT_EQUAL(post_ids(&r, "swap-a", 8, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 0), 8);

    rig_file_write(&r, b);
    CU_ASSERT(wait_metric(&r, 1, "fanout_upstream_members{upstream=\"b.test:%d\"}", r.port));
    CU_ASSERT(wait_metric(&r, -1, "fanout_upstream_members{upstream=\"a.test:%d\"}", r.port));
    CU_ASSERT_EQUAL(post_ids(&r, "swap-b", 8, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 0), 8);
    CU_ASSERT_EQUAL(stub_requests(&r, 1), 8);

    /* Both at once, then A alone again. */
    char text[300];
    snprintf(text, sizeof(text), "%s%s", a, b);
    rig_file_write(&r, text);
    CU_ASSERT(wait_metric(&r, 1, "fanout_upstream_members{upstream=\"a.test:%d\"}", r.port));
    CU_ASSERT(batches_until_stub(&r, "swap-c", 0, 1));
    CU_ASSERT(batches_until_stub(&r, "swap-d", 1, 1));
    rig_file_write(&r, a);
    CU_ASSERT(wait_metric(&r, -1, "fanout_upstream_members{upstream=\"b.test:%d\"}", r.port));
    CU_ASSERT(srvtest_wait_srv_in_flight(r.srv, 0, SRVTEST_WAIT_MS));
    uint64_t on_b = stub_requests(&r, 1);
    CU_ASSERT_EQUAL(post_ids(&r, "swap-e", 8, NULL), 200);
    CU_ASSERT_EQUAL(stub_requests(&r, 1), on_b);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 6. health checks */

#define HEALTH "/health"

/* With health checks, a new member whose health path fails gets no traffic; once it passes,
 * it does. */
static void test_members_health_gates_new_member(void)
{
    struct rig r;
    rig_init(&r, 3);
    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
    upstub_set_path_status(r.stub[2], HEALTH, 503);
    struct srv_config c;
    rig_config(&r, &c);
    snprintf(c.health_path, sizeof(c.health_path), HEALTH);
    c.health_every_ms = 100;
    c.health_timeout_ms = test_ms(5000);
    c.healthy_after = 2;
    c.unhealthy_after = 100; /* failures alone never make a member unhealthy here: what keeps
                                the new one out is the gate before its first pass */
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 2));
    for (unsigned i = 0; i < 2; i++)
        CU_ASSERT(wait_metric(&r, 1,
                              "fanout_upstream_healthy{upstream=\"" NAME ":%d\","
                              "member=\"127.0.0.%u:%d\"}",
                              r.port, 2 + i, r.port));

    dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3,127.0.0.4");
    srv_reload(r.srv);
    CU_ASSERT(wait_members(&r, 3));
    /* Two checks have reached it: the first one's failure has been counted (a round starts
     * only once the last has called back). */
    int64_t until = ctx_now() + SRVTEST_WAIT_MS;
    while (stub_prefixed(&r, 2, HEALTH) < 2 && ctx_now() < until)
        pause_ms(5);
    CU_ASSERT(stub_prefixed(&r, 2, HEALTH) >= 2);
    CU_ASSERT_EQUAL(metric(&r,
                           "fanout_upstream_healthy{upstream=\"" NAME ":%d\","
                           "member=\"127.0.0.4:%d\"}",
                           r.port, r.port),
                    0);
    for (unsigned round = 0; round < 6; round++) {
        char p[32];
        snprintf(p, sizeof(p), "gated%u-", round);
        CU_ASSERT_EQUAL(post_ids(&r, p, 8, NULL), 200);
    }
    CU_ASSERT_EQUAL(stub_prefixed(&r, 2, "/items/"), 0);
    CU_ASSERT(stub_prefixed(&r, 0, "/items/") + stub_prefixed(&r, 1, "/items/") >= 48);

    upstub_set_path_status(r.stub[2], HEALTH, 200);
    CU_ASSERT(wait_metric(&r, 1,
                          "fanout_upstream_healthy{upstream=\"" NAME ":%d\","
                          "member=\"127.0.0.4:%d\"}",
                          r.port, r.port));
    int64_t until2 = ctx_now() + SRVTEST_WAIT_MS;
    for (unsigned round = 0; stub_prefixed(&r, 2, "/items/") == 0 && ctx_now() < until2;
         round++) {
        char p[32];
        snprintf(p, sizeof(p), "open%u-", round);
        CU_ASSERT_EQUAL(post_ids(&r, p, 8, NULL), 200);
    }
    CU_ASSERT(stub_prefixed(&r, 2, "/items/") >= 1);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 7. swaps racing batches */

enum { RACE_CLIENTS = 8, RACE_BATCHES = 125 }; /* 1,000 batches */

struct flipper {
    pthread_t thread;
    struct srv *srv;
    atomic_bool *stop;
    unsigned reloads;
};

/* srv_reload() again and again, each time after the discover thread's pass count has moved,
 * until *stop. */
static void *flipper_main(void *arg)
{
    struct flipper *f = arg;
    while (!atomic_load(f->stop)) {
        uint64_t p = srv_discover_passes(f->srv);
        srv_reload(f->srv);
        f->reloads++;
        while (srv_discover_passes(f->srv) == p && !atomic_load(f->stop))
            pause_ms(1);
    }
    return NULL;
}

/* 1,000 batches from 8 clients while the name's answer changes at every lookup (every 100 ms,
 * and at every srv_reload(), called in a loop): the live set is swapped under them all the
 * time. Every batch is answered 200 with all its results. */
static void test_members_swaps_race_batches(void)
{
    struct rig r;
    rig_init(&r, 3);
    static const char *const sets[] = {"127.0.0.2,127.0.0.3", "127.0.0.3,127.0.0.4",
                                       "127.0.0.2,127.0.0.3,127.0.0.4", "127.0.0.4,127.0.0.2"};
    dns_set(&r.dns, NAME, 0, sets, 4);
    struct srv_config c;
    rig_config(&r, &c);
    c.slow_start_ms = 10000; /* members come and go while ramping */
    c.max_requests = 4096;
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    atomic_bool stop = false;
    struct flipper f = {.srv = r.srv, .stop = &stop};
    CU_ASSERT_FATAL(pthread_create(&f.thread, NULL, flipper_main, &f) == 0);
    uint64_t calls0 = test_load(&r.dns.calls);
    struct client *cl = calloc(RACE_CLIENTS, sizeof(*cl));
    CU_ASSERT_FATAL(cl != NULL);
    clients_start(cl, RACE_CLIENTS, &r, 3, RACE_BATCHES, NULL, 25);
    unsigned bad = clients_join(cl, RACE_CLIENTS);
    atomic_store(&stop, true);
    pthread_join(f.thread, NULL);
    CU_ASSERT_EQUAL(bad, 0);
    unsigned sent = 0, unsynced = 0;
    for (unsigned i = 0; i < RACE_CLIENTS; i++) {
        sent += atomic_load(&cl[i].done);
        unsynced += cl[i].unsynced;
    }
    CU_ASSERT_EQUAL(sent, RACE_CLIENTS * RACE_BATCHES);
    CU_ASSERT_EQUAL(unsynced, 0);
    /* Each client waited for a fresh lookup 5 times along the way. */
    CU_ASSERT(test_load(&r.dns.calls) >= calls0 + 5);
    CU_ASSERT(f.reloads >= 1);
    CU_ASSERT(srvtest_wait_srv_in_flight(r.srv, 0, SRVTEST_WAIT_MS));
    uint64_t total = 0;
    for (unsigned i = 0; i < 3; i++) {
        CU_ASSERT(stub_requests(&r, i) >= 1);
        total += stub_requests(&r, i);
    }
    CU_ASSERT_EQUAL(total, (uint64_t)RACE_CLIENTS * RACE_BATCHES * 3);
    free(cl);
    /* Still serving, and ready. */
    CU_ASSERT_EQUAL(post_ids(&r, "after-", 8, NULL), 200);
    struct srvtest_resp resp;
    srvtest_get(r.sport, "/readyz", &resp);
    CU_ASSERT_EQUAL(resp.status, 200);
    srvtest_resp_free(&resp);
    rig_free(&r);
}

/* ---------------------------------------------------------------- retries follow the set */

/* A retry after every member of the attempt's snapshot has left the set goes to the set's
 * members now: the only member is replaced while an attempt is out on it, that attempt then
 * fails (its stub goes away), and the retry is answered by the new member. */
static void test_members_retry_follows_the_set(void)
{
    struct rig r;
    rig_init(&r, 2);
    dns_answer(&r.dns, NAME, "127.0.0.2");
    struct srv_config c;
    rig_config(&r, &c);
    c.retries = 1;
    CU_ASSERT_FATAL(rig_start(&r, &c, 0) == 0);
    CU_ASSERT(wait_members(&r, 1));
    /* 127.0.0.3 answers the id at once; 127.0.0.2 holds it for a minute. */
    upstub_set_path_status(r.stub[1], "/items/sleep60000", 200);
    struct srvtest_bg bg = {.port = r.sport,
                            .call = {.body = "{\"timeout_ms\":30000,\"ids\":[\"sleep60000\"]}",
                                     .timeout_ms = CLIENT_TIMEOUT_MS}};
    CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
    CU_ASSERT(UPSTUB_WAIT(r.stub[0], in_flight, 1, SRVTEST_WAIT_MS));

    dns_answer(&r.dns, NAME, "127.0.0.3");
    srv_reload(r.srv);
    CU_ASSERT(wait_metric(&r, 0,
                          "fanout_upstream_in_flight{upstream=\"" NAME ":%d\","
                          "member=\"127.0.0.3:%d\"}",
                          r.port, r.port));
    CU_ASSERT(wait_members(&r, 1));
    upstub_free(r.stub[0]); /* the attempt out on 127.0.0.2 fails: a retryable ending */
    r.stub[0] = NULL;
    srvtest_bg_join(&bg);
    CU_ASSERT_EQUAL(bg.resp.status, 200);
    if (bg.resp.status != 200)
        fprintf(stderr, "\n  %ld %s\n", bg.resp.status, bg.resp.body ? bg.resp.body : "");
    srvtest_resp_free(&bg.resp);
    CU_ASSERT_EQUAL(upstub_count(r.stub[1], "/items/sleep60000"), 1);
    CU_ASSERT(metric(&r, "fanout_retries_sent_total") >= 1);
    rig_free(&r);
}

/* ---------------------------------------------------------------- 8. resources */

/* Discovery, health checks, the file and member changes leave no thread and no fd behind once
 * the server is freed. */
static void test_members_release_everything(void)
{
    ctx_shutdown(); /* the process-wide ctx timer: stopped for the baseline */
    int threads = test_thread_count(), fds = test_fd_count();
    CU_ASSERT_FATAL(threads > 0 && fds > 0);
    for (int round = 0; round < 2; round++) {
        struct rig r;
        rig_init(&r, 3);
        rig_file_dir(&r);
        dns_answer(&r.dns, NAME, "127.0.0.2,127.0.0.3");
        dns_answer(&r.dns, "other.test", "127.0.0.4");
        char text[300], other[128], one[128];
        tmpl_line(&r, NAME, "/items/{id}", one, sizeof(one));
        tmpl_line(&r, "other.test", "/items/{id}", other, sizeof(other));
        rig_file_write(&r, one);
        struct srv_config c;
        rig_config(&r, &c);
        c.upstream[0] = 0;
        snprintf(c.upstreams_file, sizeof(c.upstreams_file), "%s", r.file);
        snprintf(c.health_path, sizeof(c.health_path), HEALTH);
        c.health_every_ms = 100;
        c.health_timeout_ms = test_ms(5000);
        c.healthy_after = 1;
        c.drain_ms = 100;
        CU_ASSERT_FATAL(rig_start(&r, &c, 20) == 0);
        CU_ASSERT(wait_members(&r, 2));
        CU_ASSERT_EQUAL(post_ids(&r, "res-a", 8, NULL), 200);
        dns_answer(&r.dns, NAME, "127.0.0.3,127.0.0.4");
        snprintf(text, sizeof(text), "%s%s", one, other);
        rig_file_write(&r, text);
        CU_ASSERT(wait_metric(&r, 1, "fanout_upstream_members{upstream=\"other.test:%d\"}",
                              r.port));
        CU_ASSERT(reload_and_wait(&r));
        CU_ASSERT_EQUAL(post_ids(&r, "res-b", 8, NULL), 200);
        dns_fail(&r.dns, NAME, EAI_AGAIN);
        CU_ASSERT(reload_and_wait(&r));
        /* Left in flight at srv_free(): answered 503 by the drain. */
        struct srvtest_bg bg = {.port = r.sport,
                                .call = {.body = "{\"ids\":[\"sleep4000\"],\"timeout_ms\":30000}",
                                         .timeout_ms = CLIENT_TIMEOUT_MS}};
        CU_ASSERT_FATAL(srvtest_bg_start(&bg) == 0);
        int64_t until = ctx_now() + SRVTEST_WAIT_MS;
        while (ctx_now() < until && stub_prefixed(&r, 0, "/items/sleep4000") +
                                            stub_prefixed(&r, 1, "/items/sleep4000") +
                                            stub_prefixed(&r, 2, "/items/sleep4000") ==
                                        0)
            pause_ms(2);
        srv_free(r.srv);
        r.srv = NULL;
        srvtest_bg_join(&bg);
        CU_ASSERT(bg.resp.status == 503 || bg.resp.status == 200);
        srvtest_resp_free(&bg.resp);
        rig_free(&r);
        ctx_shutdown();
        CU_ASSERT(test_settles_to(threads, fds, test_ms(5000)));
        if (test_thread_count() != threads || test_fd_count() != fds)
            fprintf(stderr, "\n  threads %d (was %d), fds %d (was %d)\n", test_thread_count(),
                    threads, test_fd_count(), fds);
    }
}

static CU_TestInfo server_members_tests[] = {
    {"two addresses, two members, each its own connections", test_members_two_addresses},
    {"members added and removed while batches run", test_members_added_and_removed_under_load},
    {"NXDOMAIN past the hold: 502 at once, /readyz 503, back", test_members_emptied_by_nxdomain},
    {"NXDOMAIN within the hold keeps the members", test_members_held_through_nxdomain},
    {"a lookup failure keeps the last members", test_members_kept_when_lookup_fails},
    {"upstreams file read on srv_reload(), a bad one refused", test_members_file_reload},
    {"upstreams file replaced by rename(2), no reload", test_members_file_replaced},
    {"health checks keep a new member out until it passes", test_members_health_gates_new_member},
    {"1,000 batches racing member swaps", test_members_swaps_race_batches},
    {"a retry after every member left goes to the set's members", test_members_retry_follows_the_set},
    {"threads and fds back to baseline after srv_free", test_members_release_everything},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(server_members, server_members_tests)
