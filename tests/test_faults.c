/* Upstream faults: every way an upstream can misbehave gives its documented error, on time, with
 * nothing left behind. Each fault is checked at the fetch level (fetch_get() results) and end to
 * end through the HTTP server (the 502/504 codes users see).
 *
 * The faults come from the in-process stub (tests/upstub.h: the fault-* routes, redirect<NNN>,
 * reset, empty, big<N>, stream<N>), from sockets made here (a port that refuses, a listener that
 * never accepts), and from the resolver: names under "invalid." fail at once (RFC 6761, no query
 * leaves the machine), and a lookup hook (fetch_opts.lookup) answers "*.test" names, one of
 * which blocks on a latch the test releases, to model a resolver that hangs.
 *
 * Time: "prompt" faults are given a 60 s deadline and must end within test_ms(5000); deadline
 * faults would hang for minutes (or forever) and must end at their 250 ms deadline: not before
 * it, and within test_ms(5000) after it. Callbacks only record; the test thread waits for them
 * with test_wait_until() and asserts afterwards. Thread and fd counts must return to where they
 * were; ASan checks memory. */
#include "fetch/fetch.h"

#include <curl/curl.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/srvtest.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define WAIT_MS test_ms(5000)  /* bound for an outcome that should come at once */
#define LONG_MS 60000          /* the deadline of a "prompt" fault: its failure mode */
#define DEADLINE_MS 250        /* the deadline of a deadline fault */
#define SLACK_MS 3             /* curl's timer may round a deadline down by a millisecond */

/* ---------------------------------------------------------------- one result */

struct res {
    pthread_mutex_t mu; /* guards everything below */
    int calls;          /* callback invocations */
    int err;            /* fetch_result.err */
    long status;        /* fetch_result.status */
    char *body;         /* owned here after the callback */
    size_t len;
    int64_t at;         /* ctx_now() in the callback */
    char detail[256];   /* fetch_result.detail */
};

static void res_init(struct res *r)
{
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->mu, NULL);
}

static void res_destroy(struct res *r)
{
    free(r->body);
    pthread_mutex_destroy(&r->mu);
}

static void res_cb(void *arg, struct fetch_result *fr)
{
    struct res *r = arg;
    pthread_mutex_lock(&r->mu);
    r->calls++;
    r->err = fr->err;
    r->status = fr->status;
    free(r->body);
    r->body = fr->body;
    r->len = fr->len;
    r->at = ctx_now();
    snprintf(r->detail, sizeof(r->detail), "%s", fr->detail ? fr->detail : "");
    pthread_mutex_unlock(&r->mu);
}

static bool res_done(void *arg)
{
    struct res *r = arg;
    pthread_mutex_lock(&r->mu);
    bool done = r->calls > 0;
    pthread_mutex_unlock(&r->mu);
    return done;
}

/* Starts one GET on loop 0 bound to 'c'. */
static int get_on(struct fetch *f, struct ctx *c, const char *url, size_t max_body, struct res *r)
{
    struct fetch_req q = {.url = url, .max_body = max_body, .cb = res_cb, .arg = r};
    return fetch_get(f, 0, c, &q);
}

/* ---------------------------------------------------------------- fixtures */

struct base {
    int threads, fds;
};

static struct base base_now(void)
{
    /* ctx's timer thread stays for the process once started; start it before counting. */
    struct ctx *warm = ctx_with_timeout(ctx_background(), 60000);
    ctx_free(warm);
    struct base b = {test_thread_count(), test_fd_count()};
    return b;
}

static bool settled(struct base b)
{
    bool ok = test_settles_to(b.threads, b.fds, WAIT_MS);
    if (!ok)
        fprintf(stderr, "\n  threads %d (was %d), fds %d (was %d)\n", test_thread_count(),
                b.threads, test_fd_count(), b.fds);
    return ok;
}

static struct fetch *engine(unsigned loops, size_t max_body, fetch_lookup_fn lookup, void *arg)
{
    struct fetch_opts o;
    fetch_opts_default(&o);
    o.loops = loops;
    o.max_conns = 8 * loops;
    o.idle_poll_ms = 600000; /* a missed wakeup stalls for ten minutes, far past every bound */
    o.connect_timeout_ms = 0; /* only deadlines; the connect cap has its own test */
    if (max_body)
        o.max_body = max_body;
    o.lookup = lookup;
    o.lookup_arg = arg;
    struct fetch *f = NULL;
    return fetch_new(&o, &f) == 0 ? f : NULL;
}

static bool stub_all_closed(void *arg)
{
    struct upstub_stats st;
    upstub_stats(arg, &st);
    return st.open == 0;
}

/* The stub saw every connection closed (the fetch let go of the faulty one). */
static bool stub_closed(struct upstub *s)
{
    return test_wait_until(stub_all_closed, s, WAIT_MS);
}

/* A listener on 127.0.0.1 that never accepts: the kernel completes connections into its
 * backlog and nobody ever reads or answers. Returns the fd and the port, or -1. */
static int mute_listener(uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 16) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

/* ---------------------------------------------------------------- fetch level: prompt faults */

/* Fetches each path with a 60 s deadline; each must give 'want' well before it. */
static void expect_prompt(struct upstub *s, struct fetch *f, const char *const *paths, int want)
{
    for (size_t i = 0; paths[i]; i++) {
        char url[256];
        upstub_url(s, url, sizeof(url), paths[i]);
        struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
        struct res r;
        res_init(&r);
        CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &r), 0);
        bool done = test_wait_until(res_done, &r, WAIT_MS);
        CU_ASSERT(done);
        CU_ASSERT_EQUAL(r.err, want);
        if (!done || r.err != want)
            fprintf(stderr, "\n  %s: err %d (%s), want %d\n", paths[i], r.err, r.detail, want);
        CU_ASSERT(r.detail[0] != 0);
        CU_ASSERT_PTR_NULL(r.body); /* errors other than a status carry no body */
        if (!done) {
            ctx_cancel(c, -ECANCELED);
            test_wait_until(res_done, &r, WAIT_MS);
        }
        ctx_free(c);
        res_destroy(&r);
    }
}

static void test_faults_refused_is_unreachable(void)
{
    struct base b = base_now();
    uint16_t port;
    int fd = srvtest_refusing_port(&port);
    CU_ASSERT_FATAL(fd >= 0);
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/items/a", port);
    struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
    struct res r;
    res_init(&r);
    CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &r), 0);
    CU_ASSERT(test_wait_until(res_done, &r, WAIT_MS));
    CU_ASSERT_EQUAL(r.err, FETCH_EUNREACH);
    CU_ASSERT(r.detail[0] != 0);
    ctx_free(c);
    res_destroy(&r);
    fetch_free(f);
    close(fd);
    CU_ASSERT(settled(b));
}

static void test_faults_resets_are_unreachable(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    static const char *const paths[] = {
        "/items/fault-rst-now",   /* RST before any byte */
        "/items/fault-rst-head",  /* headers, then RST before the body */
        "/items/reset",           /* RST in the middle of a Content-Length body */
        "/items/fault-rst-chunk", /* RST in the middle of a chunked body */
        "/items/empty",           /* closed without a reply */
        NULL,
    };
    expect_prompt(s, f, paths, FETCH_EUNREACH);
    fetch_free(f);
    CU_ASSERT(stub_closed(s));
    upstub_free(s);
    CU_ASSERT(settled(b));
}

static void test_faults_malformed_responses_are_unreachable(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    /* Each keeps the connection open after its bytes unless noted, so waiting for more would
     * run into the 60 s deadline. */
    static const char *const paths[] = {
        "/items/fault-status-garbage", /* not an HTTP status line (HTTP/0.9 is refused) */
        "/items/fault-status-letters", /* "HTTP/1.1 abc OK" */
        "/items/fault-status-long",    /* "HTTP/1.1 2000 OK" */
        "/items/fault-status-version", /* "HTTP/7.3 200 OK" */
        "/items/fault-status-empty",   /* an empty line where the status line belongs */
        "/items/fault-cl-long-close",  /* Content-Length 100, 5 bytes, then close */
        "/items/fault-chunk-bad-size", /* chunk size "zz" */
        "/items/fault-chunk-overrun",  /* a chunk longer than its size */
        "/items/fault-chunk-cut",      /* close in the middle of a chunk */
        "/items/fault-chunk-no-end",   /* close before the last chunk */
        NULL,
    };
    expect_prompt(s, f, paths, FETCH_EUNREACH);
    fetch_free(f);
    CU_ASSERT(stub_closed(s));
    upstub_free(s);
    CU_ASSERT(settled(b));
}

static void test_faults_content_length_shorter_than_body(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    /* The message is the Content-Length bytes; what follows (here a whole second response,
     * smuggled) must not become the answer to the next request on that connection. */
    char url[256];
    for (int round = 0; round < 2; round++) {
        upstub_url(s, url, sizeof(url), round == 0 ? "/items/fault-cl-short" : "/items/next");
        struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
        struct res r;
        res_init(&r);
        CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &r), 0);
        CU_ASSERT(test_wait_until(res_done, &r, WAIT_MS));
        CU_ASSERT_EQUAL(r.err, 0);
        CU_ASSERT_EQUAL(r.status, 200);
        const char *want = round == 0 ? "12345" : "{\"id\":\"next\"}";
        CU_ASSERT(r.body && strcmp(r.body, want) == 0);
        ctx_free(c);
        res_destroy(&r);
    }
    CU_ASSERT_EQUAL(upstub_count(s, "/items/next"), 1);
    fetch_free(f);
    CU_ASSERT(stub_closed(s));
    upstub_free(s);
    CU_ASSERT(settled(b));
}

static void test_faults_redirects_are_status_never_followed(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    static const long codes[] = {301, 302, 303, 307, 308};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        char path[64], url[256];
        snprintf(path, sizeof(path), "/items/redirect%ld", codes[i]);
        upstub_url(s, url, sizeof(url), path);
        struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
        struct res r;
        res_init(&r);
        CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &r), 0);
        CU_ASSERT(test_wait_until(res_done, &r, WAIT_MS));
        CU_ASSERT_EQUAL(r.err, FETCH_ESTATUS);
        CU_ASSERT_EQUAL(r.status, codes[i]);
        CU_ASSERT(r.body && strcmp(r.body, "{\"moved\":true}") == 0);
        ctx_free(c);
        res_destroy(&r);
    }
    CU_ASSERT_EQUAL(upstub_count(s, "/items/redirect-target"), 0);
    fetch_free(f);
    upstub_free(s);
    CU_ASSERT(settled(b));
}

static void test_faults_100mb_body(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fetch *f = engine(1, 1 << 20, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    const uint64_t size = 100ull << 20;
    /* Over the 1 MiB cap: announced (Content-Length) or not (read to the close), aborted as
     * soon as the cap is passed, so the stub stops early. */
    static const char *const over[] = {"/items/big104857600", "/items/stream104857600", NULL};
    struct upstub_stats st0;
    upstub_stats(s, &st0);
    expect_prompt(s, f, over, FETCH_ETOOBIG);
    CU_ASSERT(stub_closed(s));
    struct upstub_stats st1;
    upstub_stats(s, &st1);
    CU_ASSERT(st1.bytes_sent - st0.bytes_sent < size); /* neither body was sent whole */

    /* Under a cap that fits it, the whole body arrives intact. */
    char url[256];
    upstub_url(s, url, sizeof(url), "/items/big104857600");
    struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
    struct res r;
    res_init(&r);
    CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, size + 1, &r), 0);
    CU_ASSERT(test_wait_until(res_done, &r, test_ms(30000)));
    CU_ASSERT_EQUAL(r.err, 0);
    CU_ASSERT_EQUAL(r.len, size);
    bool all_x = r.body != NULL;
    for (uint64_t i = 0; all_x && i < r.len; i += 4093)
        all_x = r.body[i] == 'x';
    CU_ASSERT(all_x);
    ctx_free(c);
    res_destroy(&r);
    fetch_free(f);
    upstub_free(s);
    CU_ASSERT(settled(b));
}

/* ---------------------------------------------------------------- fetch level: deadline faults */

/* Fetches 'url' with a DEADLINE_MS deadline: -ETIMEDOUT, not before the deadline, soon after. */
static void expect_deadline(struct fetch *f, const char *url)
{
    struct ctx *c = ctx_with_timeout(ctx_background(), DEADLINE_MS);
    int64_t deadline = ctx_deadline(c);
    struct res r;
    res_init(&r);
    CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &r), 0);
    bool done = test_wait_until(res_done, &r, DEADLINE_MS + WAIT_MS);
    CU_ASSERT(done);
    CU_ASSERT_EQUAL(r.err, -ETIMEDOUT);
    CU_ASSERT(r.at >= deadline - SLACK_MS);
    if (!done || r.err != -ETIMEDOUT || r.at < deadline - SLACK_MS)
        fprintf(stderr, "\n  %s: err %d (%s), %lld ms from the deadline\n", url, r.err, r.detail,
                (long long)(r.at - deadline));
    CU_ASSERT_PTR_NULL(r.body);
    ctx_free(c);
    res_destroy(&r);
}

static void test_faults_deadline_faults_end_at_the_deadline(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    static const char *const paths[] = {
        "/items/fault-silent",          /* request read, never answered */
        "/items/fault-body-forever",    /* a chunk every 20 ms, forever */
        "/items/fault-headers-forever", /* a header line every 20 ms, forever */
        "/items/fault-trickle",         /* the whole response at 1 byte/s (80 s) */
        "/items/fault-cl-long-hang",    /* 5 of 100 bytes, then silence */
        "/items/sleep600000",           /* answers after ten minutes */
        NULL,
    };
    for (size_t i = 0; paths[i]; i++) {
        char url[256];
        upstub_url(s, url, sizeof(url), paths[i]);
        expect_deadline(f, url);
    }
    /* A listener that never accepts: connected, never read. */
    uint16_t port;
    int fd = mute_listener(&port);
    CU_ASSERT_FATAL(fd >= 0);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/items/a", port);
    expect_deadline(f, url);
    fetch_free(f);
    close(fd);
    CU_ASSERT(stub_closed(s)); /* every faulty connection was closed by the fetch */
    struct upstub_stats st;
    upstub_stats(s, &st);
    CU_ASSERT_EQUAL(st.in_flight, 0);
    upstub_free(s);
    CU_ASSERT(settled(b));
}

/* ---------------------------------------------------------------- DNS */

static void test_faults_default_lookup(void)
{
    char addrs[1024];
    /* "localhost" comes from /etc/hosts (nsswitch "files"), no query leaves the machine. */
    CU_ASSERT_EQUAL(fetch_lookup_default(NULL, "localhost", addrs, sizeof(addrs)), 0);
    CU_ASSERT(strstr(addrs, "127.0.0.1") != NULL || strstr(addrs, "[::1]") != NULL);
    CU_ASSERT_EQUAL(fetch_lookup_default(NULL, "nx.invalid", addrs, sizeof(addrs)), EAI_NONAME);
    CU_ASSERT_EQUAL(fetch_lookup_default(NULL, "INVALID.", addrs, sizeof(addrs)), EAI_NONAME);
}

static void test_faults_invalid_name_is_unreachable(void)
{
    struct base b = base_now();
    struct fetch *f = engine(1, 0, NULL, NULL);
    CU_ASSERT_FATAL(f != NULL);
    static const char *const urls[] = {"http://nx.invalid/items/a", "http://a.b.INVALID.:8080/x",
                                       "http://invalid/items/a", NULL};
    for (size_t i = 0; urls[i]; i++) {
        struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
        struct res r;
        res_init(&r);
        CU_ASSERT_EQUAL_FATAL(get_on(f, c, urls[i], 0, &r), 0);
        CU_ASSERT(test_wait_until(res_done, &r, WAIT_MS));
        CU_ASSERT_EQUAL(r.err, FETCH_EUNREACH);
        CU_ASSERT(strstr(r.detail, "resolve") != NULL);
        ctx_free(c);
        res_destroy(&r);
    }
    fetch_free(f);
    CU_ASSERT(settled(b));
}

/* A lookup hook for "*.test" names: "hang.test" blocks until the test opens the latch (its
 * failure mode: a minute), "nx.test" does not resolve, any other answers 127.0.0.1. Counts the
 * lookups per kind. */
struct fake_dns {
    pthread_mutex_t mu;   /* guards everything below */
    pthread_cond_t cv;    /* signalled when 'open' is set */
    bool open;            /* the latch: hanging lookups may return */
    int hanging;          /* lookups blocked in the latch right now */
    int lookups_hang;     /* "hang.test" lookups started */
    int lookups_other;    /* other lookups */
    int hang_after;       /* every name hangs from this lookup number on (0: never) */
};

static void fake_init(struct fake_dns *d)
{
    memset(d, 0, sizeof(*d));
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv, &a);
    pthread_condattr_destroy(&a);
}

static void fake_open(struct fake_dns *d)
{
    pthread_mutex_lock(&d->mu);
    d->open = true;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void fake_destroy(struct fake_dns *d)
{
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
}

static int fake_lookup(void *arg, const char *host, char *addrs, size_t size)
{
    struct fake_dns *d = arg;
    pthread_mutex_lock(&d->mu);
    bool hang = strcmp(host, "hang.test") == 0;
    if (hang)
        d->lookups_hang++;
    else
        d->lookups_other++;
    if (d->hang_after > 0 && d->lookups_hang + d->lookups_other >= d->hang_after)
        hang = true;
    if (hang) {
        d->hanging++;
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += 60;
        while (!d->open && pthread_cond_timedwait(&d->cv, &d->mu, &until) == 0)
            ;
        d->hanging--;
    }
    pthread_mutex_unlock(&d->mu);
    if (strcmp(host, "nx.test") == 0)
        return EAI_NONAME;
    /* IPv6 first: curl tries ::1 (where nothing listens), then the stub's 127.0.0.1. */
    snprintf(addrs, size, "%s", strcmp(host, "v6.test") == 0 ? "[::1],127.0.0.1" : "127.0.0.1");
    return 0;
}

struct fake_cond {
    struct fake_dns *d;
    int hanging;
};

static bool fake_hanging(void *arg)
{
    struct fake_cond *c = arg;
    pthread_mutex_lock(&c->d->mu);
    bool ok = c->d->hanging >= c->hanging;
    pthread_mutex_unlock(&c->d->mu);
    return ok;
}

static void test_faults_dns_names_resolve_through_the_resolver(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fake_dns d;
    fake_init(&d);
    struct fetch *f = engine(2, 0, fake_lookup, &d);
    CU_ASSERT_FATAL(f != NULL);
    /* "ok.test" is known only to the hook: a success proves curl used the pinned answer (its
     * own resolver would ask the system, which knows nothing of it). Ten fetches, one lookup. */
    enum { N = 10 };
    struct res r[N];
    struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
    for (int i = 0; i < N; i++) {
        char url[128];
        snprintf(url, sizeof(url), "http://ok.test:%d/items/n%d", upstub_port(s), i);
        res_init(&r[i]);
        struct fetch_req q = {.url = url, .cb = res_cb, .arg = &r[i]};
        CU_ASSERT_EQUAL_FATAL(fetch_get(f, (unsigned)i % 2, c, &q), 0);
    }
    for (int i = 0; i < N; i++) {
        CU_ASSERT(test_wait_until(res_done, &r[i], WAIT_MS));
        CU_ASSERT_EQUAL(r[i].err, 0);
        char want[32];
        snprintf(want, sizeof(want), "{\"id\":\"n%d\"}", i);
        CU_ASSERT(r[i].body && strcmp(r[i].body, want) == 0);
        res_destroy(&r[i]);
    }
    pthread_mutex_lock(&d.mu);
    CU_ASSERT_EQUAL(d.lookups_other, 1);
    pthread_mutex_unlock(&d.mu);
    /* An answer with an IPv6 address is pinned as well. */
    char url[128];
    snprintf(url, sizeof(url), "http://v6.test:%d/items/six", upstub_port(s));
    struct res six;
    res_init(&six);
    CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &six), 0);
    CU_ASSERT(test_wait_until(res_done, &six, WAIT_MS));
    CU_ASSERT_EQUAL(six.err, 0);
    CU_ASSERT(six.body && strcmp(six.body, "{\"id\":\"six\"}") == 0);
    res_destroy(&six);
    /* A name that does not resolve. */
    snprintf(url, sizeof(url), "http://nx.test:%d/items/a", upstub_port(s));
    struct res nx;
    res_init(&nx);
    CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &nx), 0);
    CU_ASSERT(test_wait_until(res_done, &nx, WAIT_MS));
    CU_ASSERT_EQUAL(nx.err, FETCH_EUNREACH);
    CU_ASSERT(strstr(nx.detail, "nx.test") != NULL);
    res_destroy(&nx);
    ctx_free(c);
    fetch_free(f);
    upstub_free(s);
    fake_destroy(&d);
    CU_ASSERT(settled(b));
}

static void *free_thread(void *arg)
{
    fetch_free(arg);
    return NULL;
}

static void test_faults_hanging_lookup_never_blocks_the_loop(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fake_dns d;
    fake_init(&d);
    struct fetch *f = engine(1, 0, fake_lookup, &d); /* one loop: everything shares it */
    CU_ASSERT_FATAL(f != NULL);
    int port = upstub_port(s);
    char hang_url[128], ok_url[128];
    snprintf(hang_url, sizeof(hang_url), "http://hang.test:%d/items/h", port);

    /* Three transfers wait on one hanging lookup: one with a deadline, one canceled, one that
     * fetch_free() will end. */
    struct ctx *dl = ctx_with_timeout(ctx_background(), DEADLINE_MS);
    struct ctx *cancel = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx *forever = ctx_new(ctx_background(), CTX_FOREVER);
    int64_t deadline = ctx_deadline(dl);
    struct res rd, rc, rf;
    res_init(&rd);
    res_init(&rc);
    res_init(&rf);
    CU_ASSERT_EQUAL_FATAL(get_on(f, dl, hang_url, 0, &rd), 0);
    CU_ASSERT_EQUAL_FATAL(get_on(f, cancel, hang_url, 0, &rc), 0);
    CU_ASSERT_EQUAL_FATAL(get_on(f, forever, hang_url, 0, &rf), 0);
    struct fake_cond fc = {&d, 1};
    CU_ASSERT(test_wait_until(fake_hanging, &fc, WAIT_MS));

    /* Meanwhile the same loop serves other names and IP literals. */
    for (int i = 0; i < 3; i++) {
        if (i == 2)
            snprintf(ok_url, sizeof(ok_url), "http://127.0.0.1:%d/items/lit", port);
        else
            snprintf(ok_url, sizeof(ok_url), "http://ok%d.test:%d/items/name", i, port);
        struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
        struct res r;
        res_init(&r);
        CU_ASSERT_EQUAL_FATAL(get_on(f, c, ok_url, 0, &r), 0);
        CU_ASSERT(test_wait_until(res_done, &r, WAIT_MS));
        CU_ASSERT_EQUAL(r.err, 0);
        ctx_free(c);
        res_destroy(&r);
    }
    /* Cancel: at once. */
    ctx_cancel(cancel, -ECANCELED);
    CU_ASSERT(test_wait_until(res_done, &rc, WAIT_MS));
    CU_ASSERT_EQUAL(rc.err, -ECANCELED);
    /* Deadline: at the deadline, not before. */
    CU_ASSERT(test_wait_until(res_done, &rd, DEADLINE_MS + WAIT_MS));
    CU_ASSERT_EQUAL(rd.err, -ETIMEDOUT);
    CU_ASSERT(rd.at >= deadline - SLACK_MS);
    pthread_mutex_lock(&d.mu);
    CU_ASSERT_EQUAL(d.lookups_hang, 1); /* one lookup for all the waiters */
    CU_ASSERT_EQUAL(d.hanging, 1);      /* still hanging: nobody waited for it */
    pthread_mutex_unlock(&d.mu);
    CU_ASSERT_FALSE(res_done(&rf));

    /* fetch_free() ends the last waiter at once, then joins the resolver, which is still in
     * the lookup: it returns once the lookup does. */
    pthread_t t;
    CU_ASSERT_FATAL(pthread_create(&t, NULL, free_thread, f) == 0);
    CU_ASSERT(test_wait_until(res_done, &rf, WAIT_MS));
    CU_ASSERT_EQUAL(rf.err, FETCH_ESHUTDOWN);
    fake_open(&d);
    pthread_join(t, NULL);
    ctx_free(dl);
    ctx_free(cancel);
    ctx_free(forever);
    res_destroy(&rd);
    res_destroy(&rc);
    res_destroy(&rf);
    upstub_free(s);
    fake_destroy(&d);
    CU_ASSERT(settled(b));
}

static void test_faults_lookup_longer_than_connect_timeout_is_unreachable(void)
{
    struct base b = base_now();
    struct fake_dns d;
    fake_init(&d);
    struct fetch_opts o;
    fetch_opts_default(&o);
    o.loops = 1;
    o.max_conns = 4;
    o.idle_poll_ms = 600000;
    o.connect_timeout_ms = DEADLINE_MS; /* curl's connect timeout includes its lookup; ours too */
    o.lookup = fake_lookup;
    o.lookup_arg = &d;
    struct fetch *f = NULL;
    CU_ASSERT_FATAL(fetch_new(&o, &f) == 0);
    struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
    int64_t t0 = ctx_now();
    struct res r;
    res_init(&r);
    CU_ASSERT_EQUAL_FATAL(get_on(f, c, "http://hang.test/items/a", 0, &r), 0);
    CU_ASSERT(test_wait_until(res_done, &r, DEADLINE_MS + WAIT_MS));
    CU_ASSERT_EQUAL(r.err, FETCH_EUNREACH);
    CU_ASSERT(r.at >= t0 + DEADLINE_MS);
    CU_ASSERT(strstr(r.detail, "hang.test") != NULL);
    ctx_free(c);
    res_destroy(&r);
    fake_open(&d);
    fetch_free(f);
    fake_destroy(&d);
    CU_ASSERT(settled(b));
}

static void test_faults_stale_answer_serves_during_refresh(void)
{
    struct base b = base_now();
    struct upstub *s;
    CU_ASSERT_FATAL(upstub_new(1, &s) == 0);
    struct fake_dns d;
    fake_init(&d);
    d.hang_after = 2; /* the first lookup answers, every later one hangs */
    struct fetch_opts o;
    fetch_opts_default(&o);
    o.loops = 1;
    o.max_conns = 4;
    o.idle_poll_ms = 600000;
    o.dns_ttl_ms = 1; /* every use after the first millisecond refreshes */
    o.lookup = fake_lookup;
    o.lookup_arg = &d;
    struct fetch *f = NULL;
    CU_ASSERT_FATAL(fetch_new(&o, &f) == 0);
    char url[128];
    snprintf(url, sizeof(url), "http://ok.test:%d/items/a", upstub_port(s));
    for (int i = 0; i < 3; i++) {
        struct ctx *c = ctx_with_timeout(ctx_background(), LONG_MS);
        struct res r;
        res_init(&r);
        CU_ASSERT_EQUAL_FATAL(get_on(f, c, url, 0, &r), 0);
        CU_ASSERT(test_wait_until(res_done, &r, WAIT_MS));
        CU_ASSERT_EQUAL(r.err, 0);
        ctx_free(c);
        res_destroy(&r);
        if (i == 0) { /* let the answer expire */
            int64_t t0 = ctx_now();
            while (ctx_now() < t0 + 2)
                usleep(500);
        }
        if (i == 1) { /* that use started a refresh, which hangs: the third is served too */
            struct fake_cond fc = {&d, 1};
            CU_ASSERT(test_wait_until(fake_hanging, &fc, WAIT_MS));
        }
    }
    pthread_mutex_lock(&d.mu);
    CU_ASSERT_EQUAL(d.lookups_other, 2); /* the first, and one refresh, still hanging */
    pthread_mutex_unlock(&d.mu);
    fake_open(&d);
    fetch_free(f);
    upstub_free(s);
    fake_destroy(&d);
    CU_ASSERT(settled(b));
}

static void test_faults_resolver_threads_are_fixed(void)
{
    struct base b = base_now();
    struct fake_dns d;
    fake_init(&d);
    struct fetch *f = engine(2, 0, fake_lookup, &d);
    CU_ASSERT_FATAL(f != NULL);
    CU_ASSERT_EQUAL(test_thread_count(), b.threads + 2 + 2); /* the loops and the resolvers */
    /* Many names, each hanging (hang_after 1): at most the resolver's two threads run them. */
    pthread_mutex_lock(&d.mu);
    d.hang_after = 1;
    pthread_mutex_unlock(&d.mu);
    enum { N = 20 };
    struct res r[N];
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    for (int i = 0; i < N; i++) {
        char url[128];
        snprintf(url, sizeof(url), "http://name%d.test/items/a", i);
        res_init(&r[i]);
        struct fetch_req q = {.url = url, .cb = res_cb, .arg = &r[i]};
        CU_ASSERT_EQUAL_FATAL(fetch_get(f, (unsigned)i % 2, c, &q), 0);
    }
    struct fake_cond fc = {&d, 2};
    CU_ASSERT(test_wait_until(fake_hanging, &fc, WAIT_MS));
    CU_ASSERT_EQUAL(test_thread_count(), b.threads + 2 + 2);
    ctx_cancel(c, -ECANCELED);
    for (int i = 0; i < N; i++) {
        CU_ASSERT(test_wait_until(res_done, &r[i], WAIT_MS));
        CU_ASSERT_EQUAL(r[i].err, -ECANCELED);
        res_destroy(&r[i]);
    }
    CU_ASSERT_EQUAL(test_thread_count(), b.threads + 2 + 2);
    /* The two hanging lookups return; the 18 queued ones have nobody waiting: skipped. */
    fake_open(&d);
    fetch_free(f);
    ctx_free(c);
    pthread_mutex_lock(&d.mu);
    CU_ASSERT_EQUAL(d.lookups_other, 2);
    pthread_mutex_unlock(&d.mu);
    fake_destroy(&d);
    CU_ASSERT(settled(b));
}

/* ---------------------------------------------------------------- over HTTP */

static void cfg_for(const struct srvtest_env *e, struct srv_config *cfg)
{
    srvtest_config(e, cfg);
    cfg->max_timeout_ms = 120000;
    cfg->timeout_ms = LONG_MS;
    cfg->timeout_ms_given = true;
}

/* POSTs one id and checks the status and error code. */
static void expect_http(uint16_t port, const char *id, int timeout_ms, long status,
                        const char *code)
{
    char body[256];
    if (timeout_ms > 0)
        snprintf(body, sizeof(body), "{\"ids\":[\"%s\"],\"timeout_ms\":%d}", id, timeout_ms);
    else
        snprintf(body, sizeof(body), "{\"ids\":[\"%s\"]}", id);
    struct srvtest_resp r;
    srvtest_post(port, body, NULL, &r);
    CU_ASSERT_EQUAL(r.status, status);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), code);
    const cJSON *fid = srvtest_err_field(&r, "id");
    CU_ASSERT(cJSON_IsString(fid) && strcmp(fid->valuestring, id) == 0);
    if (r.status != status || strcmp(srvtest_err_code(&r), code) != 0)
        fprintf(stderr, "\n  %s: %ld %s\n", id, r.status, r.body ? r.body : "");
    if (timeout_ms > 0) { /* ended by the deadline, not before; and not at the failure mode */
        CU_ASSERT(r.elapsed_ms >= timeout_ms - SLACK_MS);
    } else {
        CU_ASSERT(r.elapsed_ms < WAIT_MS);
    }
    srvtest_resp_free(&r);
}

static void test_faults_over_http(void)
{
    struct base b = base_now();
    struct srvtest_env e = {0};
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    cfg_for(&e, &cfg);
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    static const char *const unreachable[] = {
        "fault-rst-now",        "fault-rst-head",      "reset",
        "fault-rst-chunk",      "empty",               "fault-status-garbage",
        "fault-status-letters", "fault-status-long",   "fault-status-version",
        "fault-status-empty",   "fault-cl-long-close",
        "fault-chunk-bad-size", "fault-chunk-overrun", "fault-chunk-cut",
        "fault-chunk-no-end",   NULL,
    };
    for (size_t i = 0; unreachable[i]; i++)
        expect_http(e.port, unreachable[i], 0, 502, "upstream_unreachable");
    expect_http(e.port, "redirect302", 0, 502, "upstream_status");
    expect_http(e.port, "redirect301", 0, 502, "upstream_status");
    expect_http(e.port, "big104857600", 0, 502, "upstream_too_large");
    expect_http(e.port, "stream104857600", 0, 502, "upstream_too_large");
    static const char *const slow[] = {
        "fault-silent", "fault-body-forever", "fault-headers-forever", "fault-trickle",
        "fault-cl-long-hang", NULL,
    };
    for (size_t i = 0; slow[i]; i++)
        expect_http(e.port, slow[i], DEADLINE_MS, 504, "deadline_exceeded");
    CU_ASSERT_EQUAL(upstub_count(e.up, "/items/redirect-target"), 0);
    /* Content-Length shorter than the body: the message is its first 5 bytes. */
    struct srvtest_resp r;
    srvtest_post(e.port, "{\"ids\":[\"fault-cl-short\",\"next\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    const cJSON *res = srvtest_results(&r);
    const cJSON *d0 = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(res, 0), "data");
    const cJSON *d1 = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(res, 1), "data");
    CU_ASSERT(cJSON_IsNumber(d0) && d0->valuedouble == 12345);
    const cJSON *id1 = cJSON_GetObjectItemCaseSensitive(d1, "id");
    CU_ASSERT(cJSON_IsString(id1) && strcmp(id1->valuestring, "next") == 0);
    srvtest_resp_free(&r);
    srvtest_env_free(&e);
    CU_ASSERT(settled(b));
}

/* A server whose upstream template points at 'host_port'. */
static void http_upstream(const char *host_port, const char *id, int timeout_ms, long status,
                          const char *code)
{
    struct srvtest_env e = {0};
    CU_ASSERT_FATAL(srvtest_env_init(&e) == 0);
    struct srv_config cfg;
    cfg_for(&e, &cfg);
    snprintf(cfg.upstream, sizeof(cfg.upstream), "http://%s/items/{id}", host_port);
    CU_ASSERT_FATAL(srvtest_start(&e, &cfg) == 0);
    expect_http(e.port, id, timeout_ms, status, code);
    srvtest_env_free(&e);
}

static void test_faults_over_http_refused_mute_and_dns(void)
{
    struct base b = base_now();
    char hp[64];
    uint16_t port;
    int fd = srvtest_refusing_port(&port);
    CU_ASSERT_FATAL(fd >= 0);
    snprintf(hp, sizeof(hp), "127.0.0.1:%u", port);
    http_upstream(hp, "a", 0, 502, "upstream_unreachable");
    close(fd);
    fd = mute_listener(&port);
    CU_ASSERT_FATAL(fd >= 0);
    snprintf(hp, sizeof(hp), "127.0.0.1:%u", port);
    http_upstream(hp, "a", DEADLINE_MS, 504, "deadline_exceeded");
    close(fd);
    http_upstream("nx.invalid:8080", "a", 0, 502, "upstream_unreachable");
    CU_ASSERT(settled(b));
}

static CU_TestInfo faults_tests[] = {
    {"connection refused: unreachable, at once", test_faults_refused_is_unreachable},
    {"resets before and inside the body: unreachable, at once",
     test_faults_resets_are_unreachable},
    {"malformed status lines, lengths, chunks: unreachable, at once",
     test_faults_malformed_responses_are_unreachable},
    {"Content-Length shorter than the body: the rest is not the next answer",
     test_faults_content_length_shorter_than_body},
    {"3xx: upstream_status, never followed", test_faults_redirects_are_status_never_followed},
    {"100 MB body: too large at once over the cap, intact under it", test_faults_100mb_body},
    {"hangs, endless bodies and headers, trickles: at the deadline",
     test_faults_deadline_faults_end_at_the_deadline},
    {"the default lookup: hosts file, .invalid at once", test_faults_default_lookup},
    {"names under .invalid: unreachable, no lookup", test_faults_invalid_name_is_unreachable},
    {"names resolve through the resolver, pinned, one lookup",
     test_faults_dns_names_resolve_through_the_resolver},
    {"a hanging lookup never blocks the loop (cancel, deadline, free)",
     test_faults_hanging_lookup_never_blocks_the_loop},
    {"a lookup longer than the connect timeout: unreachable, on time",
     test_faults_lookup_longer_than_connect_timeout_is_unreachable},
    {"an expired answer serves while its refresh hangs",
     test_faults_stale_answer_serves_during_refresh},
    {"resolver threads: a fixed set, started with the engine", test_faults_resolver_threads_are_fixed},
    {"over HTTP: every fault's status and code", test_faults_over_http},
    {"over HTTP: refused, never accepted, unresolvable",
     test_faults_over_http_refused_mute_and_dns},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(faults, faults_tests)
