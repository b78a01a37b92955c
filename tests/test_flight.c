/* Tests for the flight registry and its waiters (server/batch/flight.h) without batches: calls
 * made with flight_wait() directly, on a one-loop engine against in-process upstream stubs
 * (tests/upstub.h). A test's waits are made together inside one callback on the loop (where
 * flight_wait() must be called), so which flight a call joins never depends on timing.
 *
 * The stubs act on the last path segment: "sleep60000-k" is held a minute, "sleep200-k"
 * answered after 200 ms; an upstream template with such a prefix makes the whole upstream so.
 *
 * Synchronization is by events: each waiter's callback (a latch), stub and metric counters.
 * Every bound is test_ms(); nothing is timed. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/budget.h"
#include "server/batch/flight.h"
#include "server/obs/metrics.h"
#include "tests/core_util.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define WAIT_MS test_ms(10000)
#define MAX_WAITERS 4

/* An engine, stubs, a registry and what its flights run with. */
struct rig {
    struct upstub *stub[2];
    unsigned nstub;
    struct fetch *fetch;
    struct upstreams *ups;      /* the set the upstreams were made as (a reference) */
    struct upstream_live *live; /* what the flights read it from */
    struct budget hedge, retry;
    struct metrics *m;
    struct ctx *root;
    struct flight_env env;
};

/* Starts 'n' stubs with templates "<stub i>/items/<prefix[i]>{id}" (replicas, no ejection). */
static bool rig_init(struct rig *g, unsigned n, const char *const *prefix)
{
    memset(g, 0, sizeof(*g));
    g->nstub = n;
    char tmpl[2][UPSTUB_TMPL_MAX];
    if (!upstub_start_set(n, prefix, g->stub, tmpl))
        return false;
    const char *t[2] = {tmpl[0], tmpl[1]};
    struct fetch_opts fo;
    fetch_opts_default(&fo);
    fo.loops = 1;
    fo.max_conns = 16;
    fo.idle_poll_ms = 600000; /* a missed wakeup would stall for minutes, not hide */
    if (fetch_new(&fo, &g->fetch) != 0)
        return false;
    struct upstreams_opts uo = {.policy = UPSTREAM_REPLICAS,
                                .eject_after = 1000000,
                                .eject_ms = 1000,
                                .eject_max_ms = 1000,
                                .max_ejected_pct = 50};
    char err[256];
    if (upstreams_new(t, n, &uo, &g->ups, err, sizeof(err)) != 0) {
        fprintf(stderr, "\n  %s\n", err);
        return false;
    }
    if (upstream_live_new(upstreams_ref(g->ups), &g->live) != 0)
        return false;
    budget_init(&g->hedge, 0, 0, ctx_now());
    budget_init(&g->retry, 0, 0, ctx_now());
    if (!(g->m = calloc(1, sizeof(*g->m))))
        return false;
    metrics_init(g->m);
    g->root = ctx_new(ctx_background(), CTX_FOREVER);
    g->env = (struct flight_env){.fetch = g->fetch,
                                 .ups = g->live,
                                 .root = g->root,
                                 .hedge_budget = &g->hedge,
                                 .retry_budget = &g->retry,
                                 .metrics = g->m,
                                 .flights = flights_new()};
    return g->root && g->env.flights;
}

static void rig_free(struct rig *g)
{
    fetch_free(g->fetch);
    flights_free(g->env.flights);
    upstream_live_free(g->live);
    upstreams_free(g->ups);
    budget_destroy(&g->hedge);
    budget_destroy(&g->retry);
    for (unsigned i = 0; i < g->nstub; i++)
        upstub_free(g->stub[i]);
    ctx_free(g->root);
    free(g->m);
}

#define STUB(s, field) UPSTUB_STAT(s, field)
#define WAIT_STUB(s, field, n) UPSTUB_WAIT(s, field, n, WAIT_MS)
#define M(a) test_load(a)


/* A key whose ranking puts upstream 'first' first. */
static void key_ranked(const struct rig *g, unsigned first, char *out, size_t cap)
{
    test_key_ranked(g->ups, first, -1, out, cap);
}

/* ---------------------------------------------------------------- calls */

/* One call's wait and what its callback saw (written on the loop thread, read by the test
 * after the latch). */
struct call {
    struct rig *g;
    struct ctx *ctx;           /* the caller's: the waiter's deadline, its cancel */
    struct flight_waiter w;
    struct latch done;
    int rc;                    /* flight_wait()'s */
    int cause;                 /* the callback's */
    int err;                   /* the outcome, when cause is 0 */
    long status;
    char body[128];
    uint64_t counted;          /* attempts counted in the metrics when the callback ran */
    pthread_t tid;             /* the thread it ran on */
    bool release;              /* drop the flight at once in the callback */
};

/* Attempts counted in the metrics so far, every upstream and kind. */
static uint64_t counted(const struct rig *g)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < g->nstub; i++)
        for (int k = 0; k < OUTCOME_KINDS; k++)
            n += M(&upstream_stats(g->ups, i)->fetches[k]);
    return n;
}

static void call_done(void *arg, int cause)
{
    struct call *c = arg;
    c->tid = pthread_self();
    c->cause = cause;
    c->counted = counted(c->g);
    if (cause == 0) {
        const struct flight_outcome *o = flight_outcome(&c->w);
        c->err = o->err;
        c->status = o->status;
        snprintf(c->body, sizeof(c->body), "%.*s", (int)(o->body ? o->len : 0),
                 o->body ? o->body : "");
    }
    if (c->release)
        flight_release(&c->w);
    latch_add(&c->done, 1);
}

static bool call_init(struct rig *g, struct call *c, int64_t timeout_ms)
{
    memset(c, 0, sizeof(*c));
    c->g = g;
    latch_init(&c->done);
    c->ctx = ctx_with_timeout(ctx_background(), timeout_ms);
    return c->ctx != NULL;
}

static bool call_wait(struct call *c)
{
    return latch_wait(&c->done, 1, WAIT_MS);
}

static void call_free(struct call *c)
{
    flight_release(&c->w);
    ctx_free(c->ctx);
    latch_destroy(&c->done);
}

/* What one callback on the loop does: every call waits on 'key' in turn; then the call at
 * 'cancel' (if >= 0) is canceled with -EPIPE. */
struct script {
    struct rig *g;
    const char *key;
    bool coalesce;
    bool hedge;
    struct call *calls[MAX_WAITERS];
    unsigned ncalls;
    int cancel;
    struct latch ran;
    pthread_t tid;
};

static void script_fired(void *arg, struct fetch_result *r)
{
    struct script *s = arg;
    (void)r;
    s->tid = pthread_self();
    for (unsigned i = 0; i < s->ncalls; i++) {
        struct flight_params p = {.key = s->key,
                                  .key_len = strlen(s->key),
                                  .hedge = s->hedge,
                                  .coalesce = s->coalesce,
                                  .rid = "rid-f",
                                  .loop = 0,
                                  .run_loop = 0};
        struct call *c = s->calls[i];
        c->rc = flight_wait(&s->g->env, c->ctx, &p, &c->w, call_done, c);
    }
    if (s->cancel >= 0)
        ctx_cancel(s->calls[s->cancel]->ctx, -EPIPE);
    latch_add(&s->ran, 1);
}

/* Runs the script on the loop; false if it did not run or a wait was refused. */
static bool script_run(struct script *s)
{
    latch_init(&s->ran);
    bool ok = fetch_after(s->g->fetch, 0, ctx_background(), 0, script_fired, s) == 0 &&
              latch_wait(&s->ran, 1, WAIT_MS);
    latch_destroy(&s->ran);
    for (unsigned i = 0; ok && i < s->ncalls; i++)
        ok = s->calls[i]->rc == 0;
    return ok;
}

/* ---------------------------------------------------------------- tests */

/* Two calls for one key share one fetch: one request upstream, one flight started and one
 * joined, the same outcome for both, each callback on the loop. A later call for the same key
 * finds no flight (the first has its outcome) and starts a new one. */
static void test_flight_coalesces_and_never_joins_a_decided_flight(void)
{
    struct rig g;
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL));
    struct call a, b, c;
    CU_ASSERT_FATAL(call_init(&g, &a, -1) && call_init(&g, &b, -1) && call_init(&g, &c, -1));
    struct script s = {.g = &g, .key = "hot", .coalesce = true, .calls = {&a, &b}, .ncalls = 2,
                       .cancel = -1};
    CU_ASSERT_FATAL(script_run(&s));
    CU_ASSERT_FATAL(call_wait(&a) && call_wait(&b));
    CU_ASSERT_EQUAL(a.cause, 0);
    CU_ASSERT_EQUAL(b.cause, 0);
    CU_ASSERT_EQUAL(a.err, 0);
    CU_ASSERT_EQUAL(b.status, 200);
    CU_ASSERT_STRING_EQUAL(a.body, "{\"id\":\"hot\"}");
    CU_ASSERT_STRING_EQUAL(b.body, a.body);
    CU_ASSERT(pthread_equal(a.tid, s.tid) && pthread_equal(b.tid, s.tid));
    CU_ASSERT_FALSE(a.w.joined);
    CU_ASSERT_TRUE(b.w.joined);
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 1);
    CU_ASSERT_EQUAL(M(&g.m->flights_started), 1);
    CU_ASSERT_EQUAL(M(&g.m->flights_joined), 1);
    struct script s2 = {.g = &g, .key = "hot", .coalesce = true, .calls = {&c}, .ncalls = 1,
                        .cancel = -1};
    CU_ASSERT_FATAL(script_run(&s2));
    CU_ASSERT_FATAL(call_wait(&c));
    CU_ASSERT_EQUAL(c.err, 0);
    CU_ASSERT_FALSE(c.w.joined);
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 2);
    CU_ASSERT_EQUAL(M(&g.m->flights_started), 2);
    rig_free(&g);
    call_free(&a);
    call_free(&b);
    call_free(&c);
}

/* The flight's deadline is its latest waiter's. The first call's short deadline is the first
 * attempt's (it starts before the second call joins); the first call leaves at it alone, the
 * first attempt is cut there, and the next attempt carries the second call's time and answers
 * it. */
static void test_flight_deadline_is_the_latest_waiters(void)
{
    struct rig g;
    const char *pre[] = {"sleep60000-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre));
    char key[32], want[64];
    key_ranked(&g, 0, key, sizeof(key));
    int64_t first = test_ms(200);
    struct call a, b;
    CU_ASSERT_FATAL(call_init(&g, &a, first) && call_init(&g, &b, 60000));
    struct script s = {.g = &g, .key = key, .coalesce = true, .calls = {&a, &b}, .ncalls = 2,
                       .cancel = -1};
    CU_ASSERT_FATAL(script_run(&s));
    CU_ASSERT_FATAL(call_wait(&a) && call_wait(&b));
    CU_ASSERT_EQUAL(a.cause, -ETIMEDOUT);
    CU_ASSERT_EQUAL(b.cause, 0);
    CU_ASSERT_EQUAL(b.err, 0);
    snprintf(want, sizeof(want), "{\"id\":\"%s\"}", key); /* B's answer */
    CU_ASSERT_STRING_EQUAL(b.body, want);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_DEADLINE]), 1);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 0);
    struct upstub_req ra, rb;
    CU_ASSERT_FATAL(upstub_log(g.stub[0], &ra, 1) == 1 && upstub_log(g.stub[1], &rb, 1) == 1);
    CU_ASSERT(atoll(ra.timeout_ms) <= first);
    CU_ASSERT(atoll(rb.timeout_ms) > first);
    CU_ASSERT_STRING_EQUAL(rb.request_id, "rid-f");
    rig_free(&g);
    call_free(&a);
    call_free(&b);
}

/* A call that leaves while another still waits only drops its reference: the fetch goes on and
 * answers the other one. */
static void test_flight_a_waiter_leaving_alone_cancels_nothing(void)
{
    struct rig g;
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL));
    struct call a, b;
    CU_ASSERT_FATAL(call_init(&g, &a, -1) && call_init(&g, &b, -1));
    struct script s = {.g = &g, .key = "sleep200-k", .coalesce = true, .calls = {&a, &b},
                       .ncalls = 2, .cancel = 0};
    CU_ASSERT_FATAL(script_run(&s));
    CU_ASSERT_FATAL(call_wait(&a));
    CU_ASSERT_EQUAL(a.cause, -EPIPE);
    CU_ASSERT_FATAL(call_wait(&b));
    CU_ASSERT_EQUAL(b.cause, 0);
    CU_ASSERT_EQUAL(b.err, 0);
    CU_ASSERT_STRING_EQUAL(b.body, "{\"id\":\"sleep200-k\"}");
    CU_ASSERT_EQUAL(STUB(g.stub[0], requests), 1);
    CU_ASSERT_EQUAL(STUB(g.stub[0], canceled), 0);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 0);
    rig_free(&g);
    call_free(&a);
    call_free(&b);
}

/* The last call to leave cancels the flight, with its own cause; its callback waits for the
 * run to wind down, so the aborted attempt has been counted by then. */
static void test_flight_last_waiter_cancels_after_the_wind_down(void)
{
    struct rig g;
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL));
    struct call a, b;
    CU_ASSERT_FATAL(call_init(&g, &a, -1) && call_init(&g, &b, -1));
    struct script s = {.g = &g, .key = "sleep60000-k", .coalesce = true, .calls = {&a, &b},
                       .ncalls = 2, .cancel = -1};
    CU_ASSERT_FATAL(script_run(&s));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[0], requests, 1));
    ctx_cancel(a.ctx, -ECANCELED);
    CU_ASSERT_FATAL(call_wait(&a));
    CU_ASSERT_EQUAL(a.cause, -ECANCELED);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 0);
    ctx_cancel(b.ctx, -EPIPE);
    CU_ASSERT_FATAL(call_wait(&b));
    CU_ASSERT_EQUAL(b.cause, -EPIPE);
    CU_ASSERT_EQUAL(b.counted, 1); /* the attempt ended and was counted first */
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), 1);
    CU_ASSERT_EQUAL(M(&g.m->flights_abandoned), 1);
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 1));
    rig_free(&g);
    call_free(&a);
    call_free(&b);
}

/* A hedged flight: the first upstream holds the first attempt, the hedge to the next one wins.
 * The call hears the outcome only after the losing attempt has ended and been counted, and
 * drops the flight at once: the flight (and its attempts) must be done with by then. */
static void test_flight_delivers_after_the_losers_are_counted(void)
{
    struct rig g;
    const char *pre[] = {"sleep60000-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre));
    budget_destroy(&g.hedge);
    budget_init(&g.hedge, 100, 0, ctx_now());
    for (int i = 0; i < 10; i++)
        budget_deposit(&g.hedge, ctx_now());
    g.env.hedge_after_ms = 10;
    char key[32];
    key_ranked(&g, 0, key, sizeof(key));
    struct call a;
    CU_ASSERT_FATAL(call_init(&g, &a, -1));
    a.release = true;
    struct script s = {.g = &g, .key = key, .hedge = true, .calls = {&a}, .ncalls = 1,
                       .cancel = -1};
    CU_ASSERT_FATAL(script_run(&s));
    CU_ASSERT_FATAL(call_wait(&a));
    CU_ASSERT_EQUAL(a.cause, 0);
    CU_ASSERT_EQUAL(a.err, 0);
    uint64_t sent = M(&g.m->hedges_sent);
    CU_ASSERT(sent >= 1);
    CU_ASSERT_EQUAL(a.counted, 1 + sent); /* the losers too */
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), sent);
    rig_free(&g);
    call_free(&a);
}

static CU_TestInfo flight_tests[] = {
    {"one fetch for two calls; a decided flight is never joined",
     test_flight_coalesces_and_never_joins_a_decided_flight},
    {"the deadline is the latest waiter's", test_flight_deadline_is_the_latest_waiters},
    {"a waiter leaving alone cancels nothing", test_flight_a_waiter_leaving_alone_cancels_nothing},
    {"the last waiter cancels; its callback after the wind-down",
     test_flight_last_waiter_cancels_after_the_wind_down},
    {"delivered after the losers are counted", test_flight_delivers_after_the_losers_are_counted},
    CU_TEST_INFO_NULL,
};

TEST_SUITE(flight, flight_tests)
