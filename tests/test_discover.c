/* Tests for server/upstream/discover.h: the live set follows its names' answers (added, removed,
 * changed members; unchanged answers publish nothing), keeps its members through failing lookups
 * and retries them with growing gaps, holds them through NXDOMAIN for hold_ms and then empties
 * the upstream with a reason, looks names up once in static mode and never for IP literals,
 * reads its upstreams file at start, on reload and when the file is replaced (refusing a broken
 * one), caps the members at max_members, and leaves no thread or fd behind.
 *
 * Names are looked up by a fake lookup function with a table the tests set (under a mutex) and
 * a record of every call; the discover thread runs for real, and the tests wait for what it
 * publishes (never sleep). Gaps between lookups are only checked from below. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "fetch/upstream.h"
#include "server/obs/log.h"
#include "server/upstream/discover.h"
#include "tests/support.h"

#define WAIT_MS test_ms(20000)
#define SVC "http://svc.test:8080/items/{id}"
#define DOWN "http://down.test:8080/items/{id}"
#define EMPTY "http://empty.test:8080/items/{id}"

/* ---------------------------------------------------------------- the fake lookup */

#define FAKE_HOSTS 8
#define FAKE_CALLS 512

struct fake_host {
    char host[64];
    int rc;                      /* what a lookup returns */
    char answer[1024];           /* with rc 0 */
    unsigned calls;              /* lookups so far */
    int64_t at[FAKE_CALLS];      /* when each began (ctx_now()) */
};

struct fake {
    pthread_mutex_t mu;
    struct fake_host h[FAKE_HOSTS];
    unsigned n;
    unsigned unknown;            /* lookups of names not in the table */
    char last_unknown[64];
};

static void fake_init(struct fake *f)
{
    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->mu, NULL);
}

static void fake_destroy(struct fake *f)
{
    pthread_mutex_destroy(&f->mu);
}

static struct fake_host *fake_find(struct fake *f, const char *host)
{
    for (unsigned i = 0; i < f->n; i++)
        if (!strcmp(f->h[i].host, host))
            return &f->h[i];
    return NULL;
}

/* From now on, lookups of 'host' return 'rc' and, with 0, 'answer'. Returns how many lookups
 * of it had begun before: the number (0-based) of the first lookup to get the new answer. */
static unsigned fake_set(struct fake *f, const char *host, int rc, const char *answer)
{
    unsigned calls = 0;
    pthread_mutex_lock(&f->mu);
    struct fake_host *h = fake_find(f, host);
    if (!h && f->n < FAKE_HOSTS) {
        h = &f->h[f->n++];
        snprintf(h->host, sizeof(h->host), "%s", host);
    }
    if (h) {
        h->rc = rc;
        snprintf(h->answer, sizeof(h->answer), "%s", answer ? answer : "");
        calls = h->calls;
    }
    pthread_mutex_unlock(&f->mu);
    return calls;
}

static unsigned fake_calls(struct fake *f, const char *host)
{
    pthread_mutex_lock(&f->mu);
    struct fake_host *h = fake_find(f, host);
    unsigned n = h ? h->calls : 0;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* When lookup number i (0-based) of 'host' began, or -1. */
static int64_t fake_call_at(struct fake *f, const char *host, unsigned i)
{
    pthread_mutex_lock(&f->mu);
    struct fake_host *h = fake_find(f, host);
    int64_t t = h && i < h->calls && i < FAKE_CALLS ? h->at[i] : -1;
    pthread_mutex_unlock(&f->mu);
    return t;
}

static int fake_lookup(void *arg, const char *host, char *addrs, size_t size)
{
    struct fake *f = arg;
    pthread_mutex_lock(&f->mu);
    struct fake_host *h = fake_find(f, host);
    int rc = EAI_NONAME;
    if (!h) {
        f->unknown++;
        snprintf(f->last_unknown, sizeof(f->last_unknown), "%s", host);
    } else {
        if (h->calls < FAKE_CALLS)
            h->at[h->calls] = ctx_now();
        h->calls++;
        rc = h->rc;
        if (rc == 0)
            snprintf(addrs, size, "%s", h->answer);
    }
    pthread_mutex_unlock(&f->mu);
    return rc;
}

struct calls_want {
    struct fake *f;
    const char *host;
    unsigned n;
};

static bool calls_reached(void *arg)
{
    struct calls_want *w = arg;
    return fake_calls(w->f, w->host) >= w->n;
}

/* Waits for 'host' to have been looked up n times. */
static bool wait_calls(struct fake *f, const char *host, unsigned n)
{
    struct calls_want w = {f, host, n};
    return test_wait_until(calls_reached, &w, WAIT_MS);
}

/* ---------------------------------------------------------------- discover helpers */

static atomic_uint_fast64_t jitter_span; /* the last span a jitter draw was asked for */

/* No jitter: the middle of the span, so every lookup is every_ms after the last. */
static uint64_t no_jitter(uint64_t n)
{
    atomic_store(&jitter_span, n);
    return n / 2;
}

static struct discover_opts opts_for(struct fake *f)
{
    return (struct discover_opts){.set = {.policy = UPSTREAM_REPLICAS},
                                  .dns = true,
                                  .every_ms = 20,
                                  .hold_ms = 0,
                                  .max_members = 64,
                                  .lookup = fake_lookup,
                                  .lookup_arg = f,
                                  .jitter = no_jitter};
}

static struct discover *start(const struct discover_opts *o, const char *const *t, unsigned n)
{
    struct discover *d = NULL;
    char err[512] = "";
    int rc = discover_new(o, t, n, &d, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "\n  discover_new: %d %s\n", rc, err);
        return NULL;
    }
    if (discover_start(d, NULL) != 0) {
        discover_free(d);
        return NULL;
    }
    return d;
}

/* The index in the live set of the upstream with template 'tmpl', or -1. */
static int upstream_index(struct upstreams *u, const char *tmpl)
{
    for (unsigned i = 0; i < upstreams_count(u); i++)
        if (!strcmp(upstream_template(u, i), tmpl))
            return (int)i;
    return -1;
}

/* The members of upstream 'tmpl' in the live set as their addresses, comma-joined ("" for none,
 * "?" when the upstream is not in the set), and into 'why' (may be NULL) its note. */
static void live_members(struct discover *d, const char *tmpl, char *out, size_t cap, char *why,
                         size_t whycap)
{
    struct upstreams *u = upstream_live_get(discover_live(d));
    int i = upstream_index(u, tmpl);
    out[0] = 0;
    if (i < 0)
        snprintf(out, cap, "?");
    unsigned first = 0, n = i < 0 ? 0 : upstream_members(u, (unsigned)i, &first);
    size_t len = 0;
    for (unsigned m = first; m < first + n; m++) {
        const char *lab = upstream_member_label(u, m);
        const char *colon = strrchr(lab, ':');
        size_t l = colon ? (size_t)(colon - lab) : strlen(lab);
        len += (size_t)snprintf(out + len, len < cap ? cap - len : 0, "%s%.*s", len ? "," : "",
                                (int)l, lab);
    }
    if (why)
        snprintf(why, whycap, "%s", i < 0 ? "" : upstream_why(u, (unsigned)i));
    upstreams_free(u);
}

struct members_want {
    struct discover *d;
    const char *tmpl;
    const char *want;
};

static bool members_are(void *arg)
{
    struct members_want *w = arg;
    char got[2048];
    live_members(w->d, w->tmpl, got, sizeof(got), NULL, 0);
    return !strcmp(got, w->want);
}

/* Waits for the live set's members of 'tmpl' to be 'want' (comma-joined addresses). */
static bool wait_members(struct discover *d, const char *tmpl, const char *want)
{
    struct members_want w = {d, tmpl, want};
    if (test_wait_until(members_are, &w, WAIT_MS))
        return true;
    char got[2048];
    live_members(d, tmpl, got, sizeof(got), NULL, 0);
    fprintf(stderr, "\n  %s: members '%s', waited for '%s'\n", tmpl, got, want);
    return false;
}

/* The live set's templates, comma-joined in order. */
static void live_templates(struct discover *d, char *out, size_t cap)
{
    struct upstreams *u = upstream_live_get(discover_live(d));
    size_t len = 0;
    out[0] = 0;
    for (unsigned i = 0; i < upstreams_count(u); i++)
        len += (size_t)snprintf(out + len, len < cap ? cap - len : 0, "%s%s", i ? "," : "",
                                upstream_template(u, i));
    upstreams_free(u);
}

struct templates_want {
    struct discover *d;
    const char *want;
};

static bool templates_are(void *arg)
{
    struct templates_want *w = arg;
    char got[2048];
    live_templates(w->d, got, sizeof(got));
    return !strcmp(got, w->want);
}

static bool wait_templates(struct discover *d, const char *want)
{
    struct templates_want w = {d, want};
    if (test_wait_until(templates_are, &w, WAIT_MS))
        return true;
    char got[2048];
    live_templates(d, got, sizeof(got));
    fprintf(stderr, "\n  templates '%s', waited for '%s'\n", got, want);
    return false;
}

struct passes_want {
    struct discover *d;
    uint64_t n;
};

static bool passes_reached(void *arg)
{
    struct passes_want *w = arg;
    return discover_passes(w->d) >= w->n;
}

/* Waits for the thread to have finished 'more' passes after now. */
static bool wait_passes(struct discover *d, uint64_t more)
{
    struct passes_want w = {d, discover_passes(d) + more};
    return test_wait_until(passes_reached, &w, WAIT_MS);
}

/* Asks for a reload and waits for the pass that follows it. */
static bool reload_and_wait(struct discover *d)
{
    struct passes_want w = {d, discover_passes(d) + 1};
    discover_reload(d);
    return test_wait_until(passes_reached, &w, WAIT_MS);
}

/* The stats of the member at 'addr' of upstream 'tmpl' in the live set (its identity), or NULL. */
static const struct upstream_stats *member_stats(struct discover *d, const char *tmpl,
                                                 const char *addr)
{
    struct upstreams *u = upstream_live_get(discover_live(d));
    const struct upstream_stats *st = NULL;
    int i = upstream_index(u, tmpl);
    unsigned first = 0, n = i < 0 ? 0 : upstream_members(u, (unsigned)i, &first);
    for (unsigned m = first; m < first + n; m++) {
        const char *c = upstream_member_connect_to(u, m);
        if (c && !strncmp(c, addr, strlen(addr)) && c[strlen(addr)] == ':')
            st = upstream_stats(u, m);
    }
    upstreams_free(u);
    return st; /* the member lives on in the discover's set */
}

static uint64_t resolves(struct discover *d, const char *tmpl, enum upstream_resolve r)
{
    struct upstreams *u = upstream_live_get(discover_live(d));
    int i = upstream_index(u, tmpl);
    uint64_t n = i < 0 ? 0 : upstream_resolves(u, (unsigned)i, r);
    upstreams_free(u);
    return n;
}

/* ---------------------------------------------------------------- a log on a pipe */

struct logpipe {
    int fd[2];
    struct log *log;
    char buf[65536];
    size_t len;
};

static bool logpipe_open(struct logpipe *lp)
{
    memset(lp, 0, sizeof(*lp));
    if (pipe(lp->fd) != 0)
        return false;
    fcntl(lp->fd[0], F_SETFL, fcntl(lp->fd[0], F_GETFL) | O_NONBLOCK);
    return log_new(lp->fd[1], LOG_INFO, 1 << 16, NULL, &lp->log) == 0;
}

/* Reads what the log wrote so far (what does not fit is dropped). */
static void logpipe_read(struct logpipe *lp)
{
    char tmp[4096];
    ssize_t k;
    while ((k = read(lp->fd[0], tmp, sizeof(tmp))) > 0) {
        size_t room = sizeof(lp->buf) - 1 - lp->len, take = (size_t)k < room ? (size_t)k : room;
        memcpy(lp->buf + lp->len, tmp, take);
        lp->len += take;
        lp->buf[lp->len] = 0;
    }
}

struct logpipe_want {
    struct logpipe *lp;
    const char *text;
    size_t from;
};

static bool logpipe_has(void *arg)
{
    struct logpipe_want *w = arg;
    logpipe_read(w->lp);
    return strstr(w->lp->buf + w->from, w->text) != NULL;
}

/* Waits for a line holding 'text' written after the first 'from' bytes. */
static bool logpipe_wait(struct logpipe *lp, size_t from, const char *text)
{
    struct logpipe_want w = {lp, text, from};
    return test_wait_until(logpipe_has, &w, WAIT_MS);
}

static void logpipe_close(struct logpipe *lp)
{
    log_free(lp->log);
    close(lp->fd[1]);
    logpipe_read(lp);
    close(lp->fd[0]);
}

/* ---------------------------------------------------------------- answers */

/* The members follow the answers: added, removed, changed, IPv6 among them; a member kept is the
 * same member (its counters come along); an answer with the same addresses in another order
 * publishes no new snapshot; every answer is counted; lookups are every_ms apart (the jitter
 * is drawn over 40% of it). */
static void test_discover_members_follow_answers(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.2,10.0.0.1");
    struct discover_opts o = opts_for(&f);
    const char *t[] = {SVC};
    struct discover *d = NULL;
    char err[256];
    CU_ASSERT_FATAL(discover_new(&o, t, 1, &d, err, sizeof(err)) == 0);
    /* discover_new() looked it up once, synchronously */
    CU_ASSERT_EQUAL(fake_calls(&f, "svc.test"), 1);
    char got[256], why[UPSTREAM_WHY_MAX];
    live_members(d, SVC, got, sizeof(got), why, sizeof(why));
    CU_ASSERT_STRING_EQUAL(got, "10.0.0.1,10.0.0.2");
    CU_ASSERT_STRING_EQUAL(why, "");
    CU_ASSERT_EQUAL(resolves(d, SVC, UPSTREAM_RESOLVE_OK), 1);
    const struct upstream_stats *st2 = member_stats(d, SVC, "10.0.0.2");
    CU_ASSERT_PTR_NOT_NULL(st2);
    CU_ASSERT_FATAL(discover_start(d, NULL) == 0);

    fake_set(&f, "svc.test", 0, "10.0.0.3,10.0.0.1,10.0.0.2");
    CU_ASSERT(wait_members(d, SVC, "10.0.0.1,10.0.0.2,10.0.0.3"));
    CU_ASSERT_PTR_EQUAL(member_stats(d, SVC, "10.0.0.2"), st2);
    fake_set(&f, "svc.test", 0, "10.0.0.3,10.0.0.2");
    CU_ASSERT(wait_members(d, SVC, "10.0.0.2,10.0.0.3"));
    CU_ASSERT_PTR_EQUAL(member_stats(d, SVC, "10.0.0.2"), st2);
    fake_set(&f, "svc.test", 0, "[2001:db8::7],10.0.0.9");
    CU_ASSERT(wait_members(d, SVC, "10.0.0.9,[2001:db8::7]"));

    /* The same addresses in another order: no new snapshot. A lookup that began after the
     * change has been applied once the one after it begins. */
    struct upstreams *before = upstream_live_get(discover_live(d));
    unsigned c0 = fake_set(&f, "svc.test", 0, "10.0.0.9,[2001:db8::7],10.0.0.9");
    CU_ASSERT(wait_calls(&f, "svc.test", c0 + 3));
    struct upstreams *after = upstream_live_get(discover_live(d));
    CU_ASSERT_PTR_EQUAL(after, before);
    upstreams_free(after);
    upstreams_free(before);
    CU_ASSERT(resolves(d, SVC, UPSTREAM_RESOLVE_OK) >= c0 + 1);
    CU_ASSERT_EQUAL(resolves(d, SVC, UPSTREAM_RESOLVE_FAILED), 0);
    CU_ASSERT_EQUAL(resolves(d, SVC, UPSTREAM_RESOLVE_EMPTY), 0);
    /* Lookups every_ms apart (at least), the jitter drawn over 2/5 of every_ms. */
    unsigned c = fake_calls(&f, "svc.test");
    for (unsigned i = 2; i + 1 < c && i + 1 < FAKE_CALLS; i++)
        CU_ASSERT(fake_call_at(&f, "svc.test", i + 1) - fake_call_at(&f, "svc.test", i) >= 20);
    CU_ASSERT_EQUAL(atomic_load(&jitter_span), 8);
    discover_free(d);
    fake_destroy(&f);
}

/* A lookup that gets no answer (EAI_AGAIN) keeps the last members, and is tried again after
 * 500 ms, then 1000 ms, ... (checked from below only); a name that fails from its first lookup
 * has no member, says why, and backs off the same way. An answer again brings members, and a
 * reload looks every name up at once. */
static void test_discover_failing_lookup_keeps_members(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.1,10.0.0.2");
    fake_set(&f, "down.test", EAI_AGAIN, NULL);
    struct discover_opts o = opts_for(&f);
    const char *t[] = {SVC, DOWN};
    struct discover *d = NULL;
    char err[256];
    CU_ASSERT_FATAL(discover_new(&o, t, 2, &d, err, sizeof(err)) == 0);
    char got[256], why[UPSTREAM_WHY_MAX];
    live_members(d, DOWN, got, sizeof(got), why, sizeof(why));
    CU_ASSERT_STRING_EQUAL(got, "");
    CU_ASSERT_PTR_NOT_NULL(strstr(why, "down.test:8080"));
    CU_ASSERT_PTR_NOT_NULL(strstr(why, "lookup failed"));
    CU_ASSERT_FATAL(discover_start(d, NULL) == 0);

    CU_ASSERT(wait_calls(&f, "svc.test", 3)); /* following every_ms */
    unsigned c0 = fake_set(&f, "svc.test", EAI_AGAIN, NULL);
    /* lookup c0 is the first to fail, c0 + 1 and c0 + 2 its retries */
    CU_ASSERT(wait_calls(&f, "svc.test", c0 + 3));
    int64_t t0 = fake_call_at(&f, "svc.test", c0), t1 = fake_call_at(&f, "svc.test", c0 + 1),
            t2 = fake_call_at(&f, "svc.test", c0 + 2);
    CU_ASSERT(t1 - t0 >= DISCOVER_BACKOFF_MIN_MS);
    CU_ASSERT(t2 - t1 >= 2 * DISCOVER_BACKOFF_MIN_MS);
    live_members(d, SVC, got, sizeof(got), NULL, 0);
    CU_ASSERT_STRING_EQUAL(got, "10.0.0.1,10.0.0.2");
    CU_ASSERT(resolves(d, SVC, UPSTREAM_RESOLVE_FAILED) >= 2);

    /* The name that never answered backs off too. */
    CU_ASSERT(wait_calls(&f, "down.test", 3));
    int64_t d0 = fake_call_at(&f, "down.test", 0), d1 = fake_call_at(&f, "down.test", 1),
            d2 = fake_call_at(&f, "down.test", 2);
    CU_ASSERT(d1 - d0 >= DISCOVER_BACKOFF_MIN_MS);
    CU_ASSERT(d2 - d1 >= 2 * DISCOVER_BACKOFF_MIN_MS);
    if (d1 - d0 < DISCOVER_BACKOFF_MIN_MS)
        fprintf(stderr, "\n  down.test looked up %u times, %lld ms apart at first\n",
                fake_calls(&f, "down.test"), (long long)(d1 - d0));

    /* Answers again; a reload asks at once rather than after the backoff. */
    fake_set(&f, "svc.test", 0, "10.0.0.3");
    fake_set(&f, "down.test", 0, "10.0.0.8");
    discover_reload(d);
    CU_ASSERT(wait_members(d, SVC, "10.0.0.3"));
    CU_ASSERT(wait_members(d, DOWN, "10.0.0.8"));
    live_members(d, DOWN, got, sizeof(got), why, sizeof(why));
    CU_ASSERT_STRING_EQUAL(why, "");
    discover_free(d);
    fake_destroy(&f);
}

/* NXDOMAIN keeps the members for hold_ms (counted from the first such answer), then empties the
 * upstream with a reason naming it; an empty answer does the same; an answer again brings
 * members back. With a long hold, the members stay through many NXDOMAIN answers. */
static void test_discover_nxdomain_holds_then_empties(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.1,10.0.0.2");
    fake_set(&f, "empty.test", 0, "10.0.0.5");
    struct discover_opts o = opts_for(&f);
    o.hold_ms = 300;
    const char *t[] = {SVC, EMPTY};
    struct discover *d = start(&o, t, 2);
    CU_ASSERT_FATAL(d != NULL);
    unsigned c0 = fake_set(&f, "svc.test", EAI_NONAME, NULL);
    CU_ASSERT(wait_members(d, SVC, ""));
    int64_t seen = ctx_now();
    /* lookup c0 was the first to say NXDOMAIN: the members went no sooner than hold_ms later */
    CU_ASSERT(seen - fake_call_at(&f, "svc.test", c0) >= o.hold_ms);
    char got[256], why[UPSTREAM_WHY_MAX];
    live_members(d, SVC, got, sizeof(got), why, sizeof(why));
    CU_ASSERT_PTR_NOT_NULL(strstr(why, "svc.test:8080"));
    CU_ASSERT_PTR_NOT_NULL(strstr(why, "NXDOMAIN"));
    CU_ASSERT(resolves(d, SVC, UPSTREAM_RESOLVE_EMPTY) >= 1);
    /* Its keys have nowhere to go but the other upstream. */
    struct upstreams *u = upstream_live_get(discover_live(d));
    CU_ASSERT_EQUAL(upstreams_member_count(u), 1);
    upstreams_free(u);

    fake_set(&f, "empty.test", 0, "");
    CU_ASSERT(wait_members(d, EMPTY, ""));
    live_members(d, EMPTY, got, sizeof(got), why, sizeof(why));
    CU_ASSERT_PTR_NOT_NULL(strstr(why, "no address"));
    u = upstream_live_get(discover_live(d));
    CU_ASSERT_FALSE(upstreams_any_member(u));
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, ctx_now()), UPSTREAM_NONE);
    upstreams_free(u);

    fake_set(&f, "svc.test", 0, "10.0.0.3");
    fake_set(&f, "empty.test", 0, "10.0.0.6");
    CU_ASSERT(wait_members(d, SVC, "10.0.0.3"));
    CU_ASSERT(wait_members(d, EMPTY, "10.0.0.6"));
    live_members(d, SVC, got, sizeof(got), why, sizeof(why));
    CU_ASSERT_STRING_EQUAL(why, "");
    discover_free(d);

    /* A hold far longer than the test: many NXDOMAIN answers, the members stay. */
    fake_set(&f, "svc.test", 0, "10.0.0.1,10.0.0.2");
    o.hold_ms = 3600 * 1000;
    d = start(&o, t, 2);
    CU_ASSERT_FATAL(d != NULL);
    c0 = fake_set(&f, "svc.test", EAI_NONAME, NULL);
    CU_ASSERT(wait_calls(&f, "svc.test", c0 + 5));
    live_members(d, SVC, got, sizeof(got), NULL, 0);
    CU_ASSERT_STRING_EQUAL(got, "10.0.0.1,10.0.0.2");
    discover_free(d);
    fake_destroy(&f);
}

struct why_want {
    struct discover *d;
    const char *tmpl;
    const char *text;
};

static bool why_has(void *arg)
{
    struct why_want *w = arg;
    char got[64], why[UPSTREAM_WHY_MAX];
    live_members(w->d, w->tmpl, got, sizeof(got), why, sizeof(why));
    return strstr(why, w->text) != NULL;
}

/* An upstream without members says its latest reason: a name that never answered first fails
 * to be looked up (no answer), then is NXDOMAIN; the set is published again for the new reason
 * though its members (none) did not change. */
static void test_discover_why_follows_the_latest_answer(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", EAI_AGAIN, NULL);
    struct discover_opts o = opts_for(&f);
    const char *t[] = {SVC};
    struct discover *d = start(&o, t, 1);
    CU_ASSERT_FATAL(d != NULL);
    struct why_want w = {d, SVC, "lookup failed"};
    CU_ASSERT(test_wait_until(why_has, &w, WAIT_MS));
    fake_set(&f, "svc.test", EAI_NONAME, NULL);
    w.text = "NXDOMAIN";
    CU_ASSERT(test_wait_until(why_has, &w, WAIT_MS));
    discover_free(d);
    fake_destroy(&f);
}

/* Static discovery looks each name up once (in discover_new()); later answers, reloads
 * included, change nothing. */
static void test_discover_static_looks_up_once(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.1,10.0.0.2");
    struct discover_opts o = opts_for(&f);
    o.dns = false;
    const char *t[] = {SVC};
    struct discover *d = start(&o, t, 1);
    CU_ASSERT_FATAL(d != NULL);
    CU_ASSERT_EQUAL(fake_calls(&f, "svc.test"), 1);
    fake_set(&f, "svc.test", 0, "10.0.0.3");
    for (int i = 0; i < 3; i++)
        CU_ASSERT(reload_and_wait(d));
    CU_ASSERT_EQUAL(fake_calls(&f, "svc.test"), 1);
    char got[256];
    live_members(d, SVC, got, sizeof(got), NULL, 0);
    CU_ASSERT_STRING_EQUAL(got, "10.0.0.1,10.0.0.2");
    discover_free(d);
    fake_destroy(&f);
}

/* An upstream whose host is an IP literal (IPv4 or bracketed IPv6) is one member reached by that
 * literal, and is never looked up, not even on a reload. */
static void test_discover_ip_literal_never_looked_up(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.1");
    struct discover_opts o = opts_for(&f);
    const char *v4 = "http://127.0.0.7:8080/items/{id}", *v6 = "http://[::1]:8081/items/{id}";
    const char *t[] = {v4, SVC, v6};
    struct discover *d = start(&o, t, 3);
    CU_ASSERT_FATAL(d != NULL);
    CU_ASSERT(reload_and_wait(d));
    CU_ASSERT(wait_calls(&f, "svc.test", 3));
    pthread_mutex_lock(&f.mu);
    CU_ASSERT_EQUAL(f.unknown, 0);
    if (f.unknown)
        fprintf(stderr, "\n  looked up: %s\n", f.last_unknown);
    pthread_mutex_unlock(&f.mu);
    struct upstreams *u = upstream_live_get(discover_live(d));
    unsigned first;
    CU_ASSERT_EQUAL(upstream_members(u, 0, &first), 1);
    CU_ASSERT_STRING_EQUAL(upstream_member_label(u, first), "127.0.0.7:8080");
    CU_ASSERT_PTR_NULL(upstream_member_connect_to(u, first));
    CU_ASSERT_EQUAL(upstream_members(u, 2, &first), 1);
    CU_ASSERT_STRING_EQUAL(upstream_member_label(u, first), "[::1]:8081");
    CU_ASSERT_PTR_NULL(upstream_member_connect_to(u, first));
    CU_ASSERT_EQUAL(upstream_members(u, 1, &first), 1);
    CU_ASSERT_STRING_EQUAL(upstream_member_connect_to(u, first), "10.0.0.1:8080");
    upstreams_free(u);
    discover_free(d);
    fake_destroy(&f);
}

/* ---------------------------------------------------------------- the upstreams file */

#define FA "http://a.test:8080/items/{id}"
#define FB "http://b.test:8080/items/{id}"
#define FC "http://c.test:8080/items/{id}"
#define FD "http://d.test:8080/items/{id}"

static bool write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return false;
    bool ok = fputs(text, f) >= 0;
    return fclose(f) == 0 && ok;
}

/* Writes 'text' to a new file beside 'path' and renames it over 'path'. */
static bool replace_file(const char *path, const char *text)
{
    char tmp[512];
    snprintf(tmp, sizeof(tmp), "%s.new", path);
    return write_file(tmp, text) && rename(tmp, path) == 0;
}

/* The upstreams file: read at start (comments, blank lines and spaces around templates
 * skipped); rewritten in place and reloaded: the new list; replaced by rename(2) without a
 * reload: seen by the file check; a broken file (a bad template, or a host too long to look
 * up) refused with a log line saying why, by the check and by a reload, the set and its
 * following kept; fixed again: taken. A kept upstream keeps its members across the changes.
 * discover_new() refuses a broken or missing file, saying why. */
static void test_discover_upstreams_file(void)
{
    char dir[] = "/tmp/fanout-discover-XXXXXX";
    CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
    char path[256];
    snprintf(path, sizeof(path), "%s/upstreams", dir);
    CU_ASSERT_FATAL(write_file(path, "# the upstreams\n\n   " FA "  \n\t# b next\n" FB "\r\n"));
    struct fake f;
    fake_init(&f);
    fake_set(&f, "a.test", 0, "10.0.0.1");
    fake_set(&f, "b.test", 0, "10.0.0.2");
    fake_set(&f, "c.test", 0, "10.0.0.3");
    fake_set(&f, "d.test", 0, "10.0.0.4");
    struct logpipe lp;
    CU_ASSERT_FATAL(logpipe_open(&lp));
    struct discover_opts o = opts_for(&f);
    o.every_ms = 3600 * 1000; /* the passes are the file's checks */
    o.file = path;
    o.file_check_ms = 20;
    o.log = lp.log;
    struct discover *d = start(&o, NULL, 0);
    CU_ASSERT_FATAL(d != NULL);
    char got[1024];
    live_templates(d, got, sizeof(got));
    CU_ASSERT_STRING_EQUAL(got, FA "," FB);
    live_members(d, FA, got, sizeof(got), NULL, 0);
    CU_ASSERT_STRING_EQUAL(got, "10.0.0.1");
    const struct upstream_stats *sta = member_stats(d, FA, "10.0.0.1");

    /* Rewritten in place, then reloaded. */
    CU_ASSERT_FATAL(write_file(path, FA "\n" FC "\n"));
    discover_reload(d);
    CU_ASSERT(wait_templates(d, FA "," FC));
    CU_ASSERT(wait_members(d, FC, "10.0.0.3"));

    /* Replaced by a rename, no reload. */
    CU_ASSERT_FATAL(replace_file(path, FD "\n" FA "\n"));
    CU_ASSERT(wait_templates(d, FD "," FA));
    CU_ASSERT(wait_members(d, FD, "10.0.0.4"));
    CU_ASSERT_PTR_EQUAL(member_stats(d, FA, "10.0.0.1"), sta);

    /* Broken: a template without {id}. Refused on the check, and on a reload. */
    logpipe_read(&lp);
    size_t mark = lp.len;
    CU_ASSERT_FATAL(replace_file(path, FA "\nhttp://x.test:8080/no-placeholder\n"));
    CU_ASSERT(logpipe_wait(&lp, mark, "no-placeholder"));
    CU_ASSERT_PTR_NOT_NULL(strstr(lp.buf + mark, "upstreams file refused"));
    logpipe_read(&lp);
    mark = lp.len;
    discover_reload(d);
    CU_ASSERT(logpipe_wait(&lp, mark, "no-placeholder"));
    live_templates(d, got, sizeof(got));
    CU_ASSERT_STRING_EQUAL(got, FD "," FA);

    /* Broken: a host too long for a name. Refused, and the names it shares with the set are
     * still followed. */
    char longhost[600];
    snprintf(longhost, sizeof(longhost), "%s\nhttp://%0300d.test:8080/items/{id}\n", FA, 0);
    logpipe_read(&lp);
    mark = lp.len;
    CU_ASSERT_FATAL(replace_file(path, longhost));
    discover_reload(d);
    CU_ASSERT(logpipe_wait(&lp, mark, "host is too long"));
    CU_ASSERT_PTR_NOT_NULL(strstr(lp.buf + mark, "upstreams file refused"));
    live_templates(d, got, sizeof(got));
    CU_ASSERT_STRING_EQUAL(got, FD "," FA);
    fake_set(&f, "a.test", 0, "10.0.0.11");
    fake_set(&f, "d.test", 0, "10.0.0.14");
    discover_reload(d); /* looks every name up; the file is refused again */
    CU_ASSERT(wait_members(d, FA, "10.0.0.11"));
    CU_ASSERT(wait_members(d, FD, "10.0.0.14"));

    /* Fixed: taken. */
    CU_ASSERT_FATAL(replace_file(path, FB "\n"));
    CU_ASSERT(wait_templates(d, FB));
    CU_ASSERT(wait_members(d, FB, "10.0.0.2"));
    discover_free(d);
    logpipe_close(&lp);

    /* discover_new() refuses a broken file, and a missing one, saying why. */
    struct discover *bad = (struct discover *)&bad;
    CU_ASSERT_FATAL(write_file(path, FA "\n" FA "\n"));
    o.log = NULL;
    CU_ASSERT_EQUAL(discover_new(&o, NULL, 0, &bad, got, sizeof(got)), -EINVAL);
    CU_ASSERT_PTR_NULL(bad);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, path));
    CU_ASSERT_PTR_NOT_NULL(strstr(got, "given twice"));
    CU_ASSERT_FATAL(write_file(path, longhost));
    CU_ASSERT_EQUAL(discover_new(&o, NULL, 0, &bad, got, sizeof(got)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, "host is too long"));
    CU_ASSERT_FATAL(write_file(path, "# nothing\n"));
    CU_ASSERT_EQUAL(discover_new(&o, NULL, 0, &bad, got, sizeof(got)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, "no upstream"));
    CU_ASSERT_FATAL(unlink(path) == 0);
    CU_ASSERT(discover_new(&o, NULL, 0, &bad, got, sizeof(got)) < 0);
    CU_ASSERT_PTR_NULL(bad);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, "cannot open"));
    CU_ASSERT(rmdir(dir) == 0);
    fake_destroy(&f);
}

/* discover_parse_file(): one template per line; '#' lines (after spaces) and blank lines
 * skipped; spaces, tabs and CRs around a template dropped; a space inside a line refused with
 * its line number; more than 'max' refused; exactly 'max' fine; no final newline fine. */
static void test_discover_parse_file(void)
{
    const char *out[4];
    char err[256];
    char t1[] = "# list\n\n  \t\n   http://a/{id}  \n\t# http://commented/{id}\r\n"
                "http://b/{id}\r\n  #x\nhttp://c/{id}#frag";
    CU_ASSERT_EQUAL(discover_parse_file(t1, out, 4, err, sizeof(err)), 3);
    CU_ASSERT_STRING_EQUAL(out[0], "http://a/{id}");
    CU_ASSERT_STRING_EQUAL(out[1], "http://b/{id}");
    CU_ASSERT_STRING_EQUAL(out[2], "http://c/{id}#frag");
    char t2[] = "";
    CU_ASSERT_EQUAL(discover_parse_file(t2, out, 4, err, sizeof(err)), 0);
    char t3[] = "# only\n\n#comments\n";
    CU_ASSERT_EQUAL(discover_parse_file(t3, out, 4, err, sizeof(err)), 0);
    char t4[] = "http://a/{id}\n\n# c\nhttp://b/ {id}\n";
    CU_ASSERT_EQUAL(discover_parse_file(t4, out, 4, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "line 4"));
    char t5[] = "http://a/{id}\thttp://b/{id}";
    CU_ASSERT_EQUAL(discover_parse_file(t5, out, 4, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "line 1"));
    char t6[] = "http://a/{id}\nhttp://b/{id}\n";
    CU_ASSERT_EQUAL(discover_parse_file(t6, out, 2, err, sizeof(err)), 2);
    char t7[] = "http://a/{id}\n#\nhttp://b/{id}\nhttp://c/{id}\n";
    CU_ASSERT_EQUAL(discover_parse_file(t7, out, 2, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "line 4"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "more than 2"));
}

/* ---------------------------------------------------------------- limits and hygiene */

/* An answer with more addresses than max_members gives max_members members, all from the answer,
 * with a warning; the same addresses in another order (a name server rotating its answer) give
 * the same members, so no new snapshot; the cap is on all upstreams together. */
static void test_discover_max_members(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5");
    fake_set(&f, "down.test", 0, "10.0.1.1,10.0.1.2");
    struct logpipe lp;
    CU_ASSERT_FATAL(logpipe_open(&lp));
    struct discover_opts o = opts_for(&f);
    o.max_members = 3;
    o.log = lp.log;
    const char *t1[] = {SVC};
    struct discover *d = start(&o, t1, 1);
    CU_ASSERT_FATAL(d != NULL);
    struct upstreams *u = upstream_live_get(discover_live(d));
    CU_ASSERT_EQUAL(upstreams_member_count(u), 3);
    for (unsigned m = 0; m < upstreams_member_count(u); m++) {
        const char *c = upstream_member_connect_to(u, m);
        CU_ASSERT(c && !strncmp(c, "10.0.0.", 7) && c[7] >= '1' && c[7] <= '5');
    }
    CU_ASSERT(logpipe_wait(&lp, 0, "members left out"));
    static const char *const rotated[] = {"10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.1,10.0.0.2",
                                          "10.0.0.5,10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4",
                                          "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.1"};
    for (unsigned r = 0; r < 3; r++)
        CU_ASSERT(wait_calls(&f, "svc.test", fake_set(&f, "svc.test", 0, rotated[r]) + 2));
    struct upstreams *after = upstream_live_get(discover_live(d));
    CU_ASSERT_PTR_EQUAL(after, u);
    upstreams_free(after);
    upstreams_free(u);
    fake_set(&f, "svc.test", 0, "10.0.0.7,10.0.0.8");
    CU_ASSERT(wait_members(d, SVC, "10.0.0.7,10.0.0.8"));
    fake_set(&f, "svc.test", 0, "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6");
    CU_ASSERT(wait_calls(&f, "svc.test", fake_calls(&f, "svc.test") + 2));
    u = upstream_live_get(discover_live(d));
    CU_ASSERT_EQUAL(upstreams_member_count(u), 3);
    upstreams_free(u);
    discover_free(d);

    const char *t2[] = {SVC, DOWN};
    d = start(&o, t2, 2);
    CU_ASSERT_FATAL(d != NULL);
    u = upstream_live_get(discover_live(d));
    CU_ASSERT_EQUAL(upstreams_member_count(u), 3);
    upstreams_free(u);
    discover_free(d);
    logpipe_close(&lp);
    fake_destroy(&f);
}

static void *idle_thread(void *arg)
{
    return arg;
}

/* discover_new() starts no thread; discover_start() one; discover_free() joins it and closes
 * what it opened (the file's reads included); discover_stop() twice is fine, discover_free(NULL)
 * too; a discover_new() that fails leaves nothing behind. */
static void test_discover_thread_and_fd_hygiene(void)
{
    struct fake f;
    fake_init(&f);
    fake_set(&f, "svc.test", 0, "10.0.0.1");
    char dir[] = "/tmp/fanout-discover-XXXXXX";
    CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
    char path[256];
    snprintf(path, sizeof(path), "%s/upstreams", dir);
    CU_ASSERT_FATAL(write_file(path, SVC "\n"));
    /* A thread started and joined first: a runtime's helper thread that a first
     * pthread_create() may start (TSan's) is then in the baseline. */
    pthread_t th;
    CU_ASSERT_FATAL(pthread_create(&th, NULL, idle_thread, NULL) == 0);
    pthread_join(th, NULL);
    int threads = test_thread_count(), fds = test_fd_count();
    for (int round = 0; round < 3; round++) {
        struct discover_opts o = opts_for(&f);
        o.file = round == 1 ? path : NULL;
        o.file_check_ms = 10;
        const char *t[] = {SVC};
        struct discover *d = NULL;
        char err[256];
        CU_ASSERT_FATAL(discover_new(&o, t, 1, &d, err, sizeof(err)) == 0);
        CU_ASSERT_EQUAL(test_thread_count(), threads);
        if (round < 2) {
            CU_ASSERT_FATAL(discover_start(d, NULL) == 0);
            CU_ASSERT_EQUAL(test_thread_count(), threads + 1);
            CU_ASSERT(wait_passes(d, 3));
            CU_ASSERT(reload_and_wait(d));
        }
        if (round == 0) {
            discover_stop(d);
            discover_stop(d);
            CU_ASSERT_EQUAL(test_thread_count(), threads);
        }
        discover_free(d);
        CU_ASSERT(test_settles_to(threads, fds, WAIT_MS));
    }
    discover_free(NULL);
    struct discover_opts o = opts_for(&f);
    o.every_ms = 0;
    struct discover *d = (struct discover *)&d;
    char err[256];
    const char *t[] = {SVC};
    CU_ASSERT_EQUAL(discover_new(&o, t, 1, &d, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NULL(d);
    o = opts_for(&f);
    o.max_members = UPSTREAM_MEMBERS_MAX + 1;
    CU_ASSERT_EQUAL(discover_new(&o, t, 1, &d, err, sizeof(err)), -EINVAL);
    o = opts_for(&f);
    const char *bad[] = {"http://svc.test:8080/no-placeholder"};
    CU_ASSERT_EQUAL(discover_new(&o, bad, 1, &d, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "{id}"));
    CU_ASSERT(test_settles_to(threads, fds, WAIT_MS));
    CU_ASSERT(unlink(path) == 0);
    CU_ASSERT(rmdir(dir) == 0);
    fake_destroy(&f);
}

static CU_TestInfo discover_tests[] = {
    {"members follow the answers; same answer, same snapshot",
     test_discover_members_follow_answers},
    {"a failing lookup keeps the members, retried with growing gaps",
     test_discover_failing_lookup_keeps_members},
    {"NXDOMAIN holds the members for hold_ms, then empties with a reason",
     test_discover_nxdomain_holds_then_empties},
    {"no member: the reason follows the latest answer", test_discover_why_follows_the_latest_answer},
    {"static: looked up once", test_discover_static_looks_up_once},
    {"an IP literal upstream: one member, never looked up",
     test_discover_ip_literal_never_looked_up},
    {"upstreams file: start, reload, rename, broken refused", test_discover_upstreams_file},
    {"parse_file: comments, blanks, spaces, a space inside, max", test_discover_parse_file},
    {"max_members caps the members, stably, with a warning", test_discover_max_members},
    {"threads and fds: none left behind", test_discover_thread_and_fd_hygiene},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(discover, discover_tests)
