/* Tests for one key's attempts (server/batch/attempt.h) without flights or batches: a struct
 * attempts driven directly on a real fetch engine (one loop) against in-process upstream stubs
 * (tests/upstub.h), owned by the test, which records what the attempts tell it.
 *
 * The stubs act on the last path segment, so an upstream template with a prefix before {id}
 * makes a whole upstream slow or failing ("sleep60000-": a minute; "status503-": 503). Which
 * upstream a key tries first is its rendezvous ranking, so tests pick keys by asking
 * upstreams_rank().
 *
 * The test owner does what a flight does at wound_down(): it destroys the attempts and frees
 * their memory, poisoned first. An attempt or timer that called back after that would read
 * the poison (a crash, or a use after free under ASan), and every test ends by freeing the
 * engine, which calls back everything still out.
 *
 * Synchronization is by events: the owner's latches, stub and metric counters reaching a value,
 * a probe run on the loop thread. Every bound is test_ms(); nothing is timed. */
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
#include "server/batch/attempt.h"
#include "server/batch/budget.h"
#include "server/obs/metrics.h"
#include "tests/core_util.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define WAIT_MS test_ms(10000)
#define POISON 0x5A

/* An engine, stubs and what the attempts run with. */
struct rig {
    struct upstub *stub[2];
    unsigned nstub;
    char tmpl[2][UPSTUB_TMPL_MAX];
    struct fetch *fetch;
    struct upstreams *ups;
    struct budget hedge, retry;
    struct metrics *m;
    struct attempt_env env;
};

/* Starts 'n' stubs with templates "<stub i>/items/<prefix[i]>{id}", replicas without ejection,
 * budgets of 'hedge_pct' and 'retry_pct' with some credit (none when the pct is 0). */
static bool rig_init(struct rig *g, unsigned n, const char *const *prefix, unsigned hedge_pct,
                     unsigned retry_pct)
{
    memset(g, 0, sizeof(*g));
    g->nstub = n;
    const char *t[2];
    if (!upstub_start_set(n, prefix, g->stub, g->tmpl))
        return false;
    for (unsigned i = 0; i < n; i++)
        t[i] = g->tmpl[i];
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
    budget_init(&g->hedge, hedge_pct, 0, ctx_now());
    budget_init(&g->retry, retry_pct, 0, ctx_now());
    for (int i = 0; i < 20; i++) {
        budget_deposit(&g->hedge, ctx_now());
        budget_deposit(&g->retry, ctx_now());
    }
    if (!(g->m = calloc(1, sizeof(*g->m))))
        return false;
    metrics_init(g->m);
    g->env = (struct attempt_env){.fetch = g->fetch,
                                  .ups = g->ups,
                                  .hedge_budget = &g->hedge,
                                  .retry_budget = &g->retry,
                                  .metrics = g->m};
    return true;
}

/* Frees the engine first: whatever of the attempts is still out calls back now. */
static void rig_free(struct rig *g)
{
    fetch_free(g->fetch);
    upstreams_free(g->ups);
    budget_destroy(&g->hedge);
    budget_destroy(&g->retry);
    for (unsigned i = 0; i < g->nstub; i++)
        upstub_free(g->stub[i]);
    free(g->m);
}

#define STUB(s, field) UPSTUB_STAT(s, field)
#define WAIT_STUB(s, field, n) UPSTUB_WAIT(s, field, n, WAIT_MS)
#define M(a) test_load(a)


#define WAIT_COUNTER(a, n) test_wait_counter(a, n, WAIT_MS)

/* Attempts counted in the metrics so far, every upstream and kind. */
static uint64_t counted(const struct rig *g)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < g->nstub; i++)
        for (int k = 0; k < OUTCOME_KINDS; k++)
            n += M(&upstream_stats(g->ups, i)->fetches[k]);
    return n;
}

/* A key whose ranking puts upstream 'first' first. */
static void key_ranked(const struct rig *g, unsigned first, char *out, size_t cap)
{
    test_key_ranked(g->ups, first, -1, out, cap);
}

/* ---------------------------------------------------------------- the owner */

/* What owns one struct attempts here, as a flight would. The loop thread writes everything
 * below 'tid'; the test reads it after the latch that follows. */
struct owner {
    struct rig *g;
    struct attempts *a;      /* malloc'd; destroyed, poisoned and freed at wound_down() */
    struct ctx *ctx;         /* the attempts' ctx */
    char key[64];
    int64_t deadline[2];     /* what deadline() says: on its first call, and on every later one */
    unsigned deadline_calls;
    struct latch started, decided, wound;
    pthread_t tid;           /* the loop's thread (where attempts_start() ran) */
    int start_rc;
    bool wrong_thread;       /* a callback came on another thread */
    unsigned ndecided, nwound;
    bool wound_first;        /* wound_down() came before decided() */
    int err;                 /* the outcome, copied */
    long status;
    char *body, *detail;
    unsigned started_at_wound; /* attempts started, as wound_down() came */
    unsigned out_at_wound;     /* attempts and timers not yet called back, then */
    uint64_t counted_at_wound; /* attempts counted in the metrics, then */
};

static void owner_decided(void *arg, const struct flight_outcome *out)
{
    struct owner *o = arg;
    o->wrong_thread |= !pthread_equal(pthread_self(), o->tid);
    o->ndecided++;
    o->wound_first = o->nwound > 0;
    o->err = out->err;
    o->status = out->status;
    o->body = out->body ? strndup(out->body, out->len) : NULL;
    o->detail = out->detail ? strdup(out->detail) : NULL;
    latch_add(&o->decided, 1);
}

static void owner_wound_down(void *arg)
{
    struct owner *o = arg;
    o->wrong_thread |= !pthread_equal(pthread_self(), o->tid);
    o->nwound++;
    o->started_at_wound = o->a->started;
    o->out_at_wound = o->a->pending;
    o->counted_at_wound = counted(o->g);
    attempts_destroy(o->a);
    memset(o->a, POISON, sizeof(*o->a));
    free(o->a);
    o->a = NULL;
    latch_add(&o->wound, 1);
}

static int64_t owner_deadline(void *arg)
{
    struct owner *o = arg;
    return o->deadline[o->deadline_calls++ == 0 ? 0 : 1];
}

static const struct attempts_owner test_owner = {
    .decided = owner_decided,
    .wound_down = owner_wound_down,
    .deadline = owner_deadline,
};

static void start_fired(void *arg, struct fetch_result *r)
{
    struct owner *o = arg;
    o->tid = pthread_self();
    o->start_rc = r->err ? r->err : attempts_start(o->a);
    latch_add(&o->started, 1);
}

/* Starts the attempts for 'key' on the loop, deadline() saying 'deadline' first and 'later'
 * from then on. False if they could not start. */
static bool owner_start2(struct rig *g, struct owner *o, const char *key, bool hedge,
                         int64_t deadline, int64_t later)
{
    memset(o, 0, sizeof(*o));
    o->g = g;
    latch_init(&o->started);
    latch_init(&o->decided);
    latch_init(&o->wound);
    snprintf(o->key, sizeof(o->key), "%s", key);
    o->deadline[0] = deadline;
    o->deadline[1] = later;
    o->ctx = ctx_new(ctx_background(), CTX_FOREVER);
    o->a = malloc(sizeof(*o->a));
    if (!o->ctx || !o->a)
        return false;
    struct attempts_params p = {.ctx = o->ctx,
                                .loop = 0,
                                .key = o->key,
                                .key_len = strlen(o->key),
                                .rid = "rid-a",
                                .hedge = hedge,
                                .owner = &test_owner,
                                .owner_arg = o};
    attempts_init(o->a, &g->env, &p);
    return fetch_after(g->fetch, 0, ctx_background(), 0, start_fired, o) == 0 &&
           latch_wait(&o->started, 1, WAIT_MS) && o->start_rc == 0;
}

static bool owner_start(struct rig *g, struct owner *o, const char *key, bool hedge,
                        int64_t deadline)
{
    return owner_start2(g, o, key, hedge, deadline, deadline);
}

/* Waits for the wound-down callback; true if it came, exactly once, after exactly one decided
 * one, all on the loop thread, with nothing out. */
static bool owner_wait(struct owner *o)
{
    if (!latch_wait(&o->wound, 1, WAIT_MS)) {
        fprintf(stderr, "\n  the attempts did not wind down in time\n");
        return false;
    }
    return o->ndecided == 1 && o->nwound == 1 && !o->wound_first && !o->wrong_thread &&
           o->out_at_wound == 0;
}

/* After rig_free(): everything of the attempts has called back. */
static void owner_free(struct owner *o)
{
    if (o->a) { /* never started, or never wound down (a failed test) */
        attempts_destroy(o->a);
        free(o->a);
    }
    ctx_free(o->ctx);
    free(o->body);
    free(o->detail);
    latch_destroy(&o->started);
    latch_destroy(&o->decided);
    latch_destroy(&o->wound);
}

/* What the attempts hold out, read on their loop thread. */
struct peek {
    struct owner *o;
    struct latch done;
    unsigned in_flight, timers;
};

static void peek_fired(void *arg, struct fetch_result *r)
{
    struct peek *k = arg;
    (void)r;
    if (k->o->a) {
        k->in_flight = k->o->a->in_flight;
        k->timers = k->o->a->pending - k->o->a->in_flight;
    }
    latch_add(&k->done, 1);
}

static bool peek(struct rig *g, struct owner *o, unsigned *in_flight, unsigned *timers)
{
    struct peek k = {.o = o};
    latch_init(&k.done);
    bool ok = fetch_after(g->fetch, 0, ctx_background(), 0, peek_fired, &k) == 0 &&
              latch_wait(&k.done, 1, WAIT_MS);
    latch_destroy(&k.done);
    *in_flight = k.in_flight;
    *timers = k.timers;
    return ok;
}

/* ---------------------------------------------------------------- the first attempt */

/* The first attempt goes to the key's first upstream, whichever that is, and its answer is the
 * outcome: counted there, decided, then wound down. */
static void test_attempt_first_goes_to_the_first_upstream(void)
{
    for (unsigned first = 0; first < 2; first++) {
        struct rig g;
        CU_ASSERT_FATAL(rig_init(&g, 2, NULL, 100, 100));
        char key[32], want[64];
        key_ranked(&g, first, key, sizeof(key));
        struct owner o;
        CU_ASSERT_FATAL(owner_start(&g, &o, key, false, CTX_FOREVER));
        CU_ASSERT_FATAL(owner_wait(&o));
        CU_ASSERT_EQUAL(o.err, 0);
        CU_ASSERT_EQUAL(o.status, 200);
        snprintf(want, sizeof(want), "{\"id\":\"%s\"}", key);
        CU_ASSERT(o.body && strstr(o.body, want));
        CU_ASSERT_PTR_NULL(o.detail);
        CU_ASSERT_EQUAL(STUB(g.stub[first], requests), 1);
        CU_ASSERT_EQUAL(STUB(g.stub[1 - first], requests), 0);
        CU_ASSERT_EQUAL(o.started_at_wound, 1);
        CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, first)->fetches[OUTCOME_OK]), 1);
        CU_ASSERT_EQUAL(o.counted_at_wound, 1);
        struct upstub_req req;
        CU_ASSERT(upstub_log(g.stub[first], &req, 1) == 1 && strcmp(req.request_id, "rid-a") == 0);
        rig_free(&g);
        owner_free(&o);
    }
}

/* ---------------------------------------------------------------- hedges */

/* The hedge schedule: the delay, then half of it (at least 1 ms), then none. */
static void test_attempt_hedge_waits(void)
{
    CU_ASSERT_EQUAL(attempt_hedge_wait(1000, 0), 1000);
    CU_ASSERT_EQUAL(attempt_hedge_wait(1000, 1), 500);
    CU_ASSERT_EQUAL(attempt_hedge_wait(3, 1), 1);
    CU_ASSERT_EQUAL(attempt_hedge_wait(1, 1), 1);
    CU_ASSERT_EQUAL(attempt_hedge_wait(0, 0), 0);
    CU_ASSERT_EQUAL(attempt_hedge_wait(1000, ATTEMPT_MAX_HEDGES), -1);
    CU_ASSERT_EQUAL(attempt_hedge_wait(1000, ATTEMPT_MAX_HEDGES + 1), -1);
}

/* The first upstream holds the attempt; after the delay a hedge goes to the next one and wins;
 * the loser is aborted at once (closed at its upstream) and counted before the attempts wind
 * down. */
static void test_attempt_hedge_wins_and_the_loser_is_aborted(void)
{
    struct rig g;
    const char *pre[] = {"sleep60000-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 100, 0));
    g.env.hedge_after_ms = 20;
    char key[32], want[64];
    key_ranked(&g, 0, key, sizeof(key));
    struct owner o;
    CU_ASSERT_FATAL(owner_start(&g, &o, key, true, CTX_FOREVER));
    CU_ASSERT_FATAL(owner_wait(&o));
    CU_ASSERT_EQUAL(o.err, 0);
    snprintf(want, sizeof(want), "{\"id\":\"%s\"}", key); /* B's: not "sleep60000-..." */
    CU_ASSERT(o.body && strstr(o.body, want));
    /* One hedge to B, or (if B was slow to answer) a second one, back to A. */
    uint64_t sent = M(&g.m->hedges_sent);
    CU_ASSERT(sent >= 1 && sent <= ATTEMPT_MAX_HEDGES);
    CU_ASSERT_EQUAL(M(&g.m->hedges_won), 1);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), 1);
    CU_ASSERT_EQUAL(o.started_at_wound, 1 + sent);
    CU_ASSERT_EQUAL(o.counted_at_wound, 1 + sent); /* every loser counted before */
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), sent);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 1)->fetches[OUTCOME_OK]), 1);
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, sent)); /* closed at the upstream */
    rig_free(&g);
    owner_free(&o);
}

/* Both upstreams hold every request: the first attempt goes to A, the first hedge to B, the
 * second back to A; then no timer is left for a third. A cancel from outside ends all three,
 * with its cause as the outcome. */
static void test_attempt_second_hedge_then_no_more(void)
{
    struct rig g;
    const char *pre[] = {"sleep60000-", "sleep60000-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 100, 0));
    g.env.hedge_after_ms = 10;
    char key[32];
    key_ranked(&g, 0, key, sizeof(key));
    struct owner o;
    CU_ASSERT_FATAL(owner_start(&g, &o, key, true, CTX_FOREVER));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[0], requests, 2));
    CU_ASSERT_FATAL(WAIT_STUB(g.stub[1], requests, 1));
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), ATTEMPT_MAX_HEDGES);
    unsigned in_flight = 0, timers = 99;
    CU_ASSERT_FATAL(peek(&g, &o, &in_flight, &timers));
    CU_ASSERT_EQUAL(in_flight, 3);
    CU_ASSERT_EQUAL(timers, 0);
    ctx_cancel(o.ctx, -EPIPE);
    CU_ASSERT_FATAL(owner_wait(&o));
    CU_ASSERT_EQUAL(o.err, -EPIPE);
    CU_ASSERT_STRING_EQUAL(o.detail ? o.detail : "", "canceled");
    CU_ASSERT_PTR_NULL(o.body);
    CU_ASSERT_EQUAL(o.started_at_wound, 3);
    CU_ASSERT_EQUAL(o.counted_at_wound, 3);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_CANCELED]), 2);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 1)->fetches[OUTCOME_CANCELED]), 1);
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), ATTEMPT_MAX_HEDGES);
    CU_ASSERT_EQUAL(M(&g.m->hedges_won), 0);
    CU_ASSERT(WAIT_STUB(g.stub[0], canceled, 2));
    CU_ASSERT(WAIT_STUB(g.stub[1], canceled, 1));
    rig_free(&g);
    owner_free(&o);
}

/* An empty hedge budget refuses the hedge: counted, nothing sent, and no timer is armed for
 * another try; the first attempt goes on alone. */
static void test_attempt_hedge_refused_by_the_budget(void)
{
    struct rig g;
    const char *pre[] = {"sleep60000-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 0));
    g.env.hedge_after_ms = 10;
    char key[32];
    key_ranked(&g, 0, key, sizeof(key));
    struct owner o;
    CU_ASSERT_FATAL(owner_start(&g, &o, key, true, CTX_FOREVER));
    CU_ASSERT_FATAL(WAIT_COUNTER(&g.m->hedges_refused, 1));
    unsigned in_flight = 0, timers = 99;
    CU_ASSERT_FATAL(peek(&g, &o, &in_flight, &timers));
    CU_ASSERT_EQUAL(in_flight, 1);
    CU_ASSERT_EQUAL(timers, 0);
    CU_ASSERT_EQUAL(M(&g.m->hedges_refused), 1);
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), 0);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), 0);
    ctx_cancel(o.ctx, -ECANCELED);
    CU_ASSERT_FATAL(owner_wait(&o));
    CU_ASSERT_EQUAL(o.err, -ECANCELED);
    CU_ASSERT_EQUAL(o.started_at_wound, 1);
    rig_free(&g);
    owner_free(&o);
}

/* ---------------------------------------------------------------- retries */

/* Runs one key ranked 'first' to its end; false if it did not. */
static bool run_key(struct rig *g, struct owner *o, unsigned first, int64_t deadline)
{
    char key[32];
    key_ranked(g, first, key, sizeof(key));
    return owner_start(g, o, key, false, deadline) && owner_wait(o);
}

/* A 503 is retried on the next upstream, whose answer is the outcome; with no retries left the
 * 503 is the outcome. */
static void test_attempt_retry_503_on_the_next_upstream(void)
{
    struct rig g;
    const char *pre[] = {"status503-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 100));
    g.env.retries = 1;
    struct owner o;
    CU_ASSERT_FATAL(run_key(&g, &o, 0, CTX_FOREVER));
    CU_ASSERT_EQUAL(o.err, 0);
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 1);
    CU_ASSERT_EQUAL(o.started_at_wound, 2);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_STATUS]), 1);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 1)->fetches[OUTCOME_OK]), 1);
    owner_free(&o);

    g.env.retries = 0;
    struct owner o2;
    CU_ASSERT_FATAL(run_key(&g, &o2, 0, CTX_FOREVER));
    CU_ASSERT_EQUAL(o2.err, FETCH_ESTATUS);
    CU_ASSERT_EQUAL(o2.status, 503);
    CU_ASSERT(o2.body && strstr(o2.body, "503")); /* the upstream's body is kept */
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 1);
    CU_ASSERT_EQUAL(o2.started_at_wound, 1);
    rig_free(&g);
    owner_free(&o2);
}

/* A 500 and a 404 are final, however many retries are allowed. */
static void test_attempt_no_retry_after_a_final_ending(void)
{
    struct rig g;
    const char *pre[] = {"status500-", "status404-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 100));
    g.env.retries = 3;
    long want[2] = {500, 404};
    for (unsigned first = 0; first < 2; first++) {
        struct owner o;
        CU_ASSERT_FATAL(run_key(&g, &o, first, CTX_FOREVER));
        CU_ASSERT_EQUAL(o.err, FETCH_ESTATUS);
        CU_ASSERT_EQUAL(o.status, want[first]);
        CU_ASSERT_EQUAL(o.started_at_wound, 1);
        CU_ASSERT_EQUAL(STUB(g.stub[first], requests), 1);
        CU_ASSERT_EQUAL(STUB(g.stub[0], requests) + STUB(g.stub[1], requests), first + 1);
        owner_free(&o);
    }
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 0);
    CU_ASSERT_EQUAL(M(&g.m->retries_refused), 0);
    rig_free(&g);
}

/* An empty retry budget refuses the retry: counted, and the 503 is the outcome. */
static void test_attempt_retry_refused_by_the_budget(void)
{
    struct rig g;
    const char *pre[] = {"status503-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 0));
    g.env.retries = 1;
    struct owner o;
    CU_ASSERT_FATAL(run_key(&g, &o, 0, CTX_FOREVER));
    CU_ASSERT_EQUAL(o.err, FETCH_ESTATUS);
    CU_ASSERT_EQUAL(o.status, 503);
    CU_ASSERT_EQUAL(M(&g.m->retries_refused), 1);
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 0);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), 0);
    rig_free(&g);
    owner_free(&o);
}

/* The backoff's cap: 25, 75, 175 ms, then 250 ms for good. */
static void test_attempt_backoff_caps(void)
{
    CU_ASSERT_EQUAL(attempt_backoff_cap(0), 25);
    CU_ASSERT_EQUAL(attempt_backoff_cap(1), 75);
    CU_ASSERT_EQUAL(attempt_backoff_cap(2), 175);
    CU_ASSERT_EQUAL(attempt_backoff_cap(3), ATTEMPT_BACKOFF_MAX_MS);
    CU_ASSERT_EQUAL(attempt_backoff_cap(19), ATTEMPT_BACKOFF_MAX_MS);
    CU_ASSERT_EQUAL(attempt_backoff_cap(1000), ATTEMPT_BACKOFF_MAX_MS);
}

static uint64_t jitter_max(uint64_t n)
{
    return n;
}

/* Every backoff waits its whole cap (the draw is the largest): a retry starts only when its
 * backoff ends before the deadline, so the retries made are at most the number of caps whose
 * sum stays under the time given, however fast the upstreams answer. A retry whose backoff
 * would end past the deadline is not started (and is no budget refusal), and every attempt
 * that reached an upstream carried time left. */
static void test_attempt_backoff_bounded_by_the_deadline(void)
{
    struct rig g;
    const char *pre[] = {"status503-", "status503-"};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 1000));
    g.env.retries = 100;
    g.env.jitter = jitter_max;
    int64_t span = test_ms(1000);
    unsigned bound = 0;
    for (int64_t sum = attempt_backoff_cap(0); sum < span; sum += attempt_backoff_cap(bound))
        bound++;
    struct owner o;
    CU_ASSERT_FATAL(run_key(&g, &o, 0, ctx_now() + span));
    uint64_t retries = M(&g.m->retries_sent);
    CU_ASSERT(retries >= 1);
    CU_ASSERT(retries <= bound);
    CU_ASSERT_EQUAL(M(&g.m->retries_refused), 0);
    CU_ASSERT(o.err == FETCH_ESTATUS || o.err == -ETIMEDOUT);
    CU_ASSERT_EQUAL(o.started_at_wound, 1 + retries);
    struct upstub_req log[64];
    size_t late = 0, total = 0;
    for (unsigned s = 0; s < 2; s++) {
        size_t n = upstub_log(g.stub[s], log, 64);
        for (size_t i = 0; i < n; i++, total++)
            late += !log[i].has_timeout_ms || atoll(log[i].timeout_ms) <= 0;
    }
    CU_ASSERT(total >= 1);
    CU_ASSERT_EQUAL(late, 0);
    rig_free(&g);
    owner_free(&o);
}

/* ---------------------------------------------------------------- deadlines */

/* An attempt cut by its own deadline is followed by a fresh one when the owner's deadline has
 * moved later meanwhile (deadline() says so from its second call on, as when a waiter with a
 * later deadline joins), which carries the new time left; when it has not, the deadline is
 * the outcome. Neither is a retry. */
static void test_attempt_outlived_deadline_attempts_again(void)
{
    struct rig g;
    const char *pre[] = {"sleep60000-", ""};
    CU_ASSERT_FATAL(rig_init(&g, 2, pre, 0, 0));
    int64_t first = test_ms(100);
    char key[32], want[64];
    key_ranked(&g, 0, key, sizeof(key));
    struct owner o;
    CU_ASSERT_FATAL(owner_start(&g, &o, key, false, ctx_now() + first));
    CU_ASSERT_FATAL(owner_wait(&o));
    CU_ASSERT_EQUAL(o.err, -ETIMEDOUT);
    CU_ASSERT_EQUAL(o.started_at_wound, 1);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_DEADLINE]), 1);
    CU_ASSERT_EQUAL(STUB(g.stub[1], requests), 0);
    owner_free(&o);

    /* The same, with the deadline a minute on once the first attempt has started. */
    struct owner o2;
    CU_ASSERT_FATAL(owner_start2(&g, &o2, key, false, ctx_now() + first, ctx_now() + 60000));
    CU_ASSERT_FATAL(owner_wait(&o2));
    CU_ASSERT_EQUAL(o2.err, 0);
    snprintf(want, sizeof(want), "{\"id\":\"%s\"}", key); /* B's answer */
    CU_ASSERT(o2.body && strstr(o2.body, want));
    CU_ASSERT_EQUAL(o2.started_at_wound, 2);
    CU_ASSERT_EQUAL(M(&upstream_stats(g.ups, 0)->fetches[OUTCOME_DEADLINE]), 2);
    CU_ASSERT_EQUAL(M(&g.m->retries_sent), 0);
    struct upstub_req req;
    CU_ASSERT_FATAL(upstub_log(g.stub[1], &req, 1) == 1);
    CU_ASSERT(req.has_timeout_ms && atoll(req.timeout_ms) > first);
    rig_free(&g);
    owner_free(&o2);
}

/* ---------------------------------------------------------------- winding down */

/* A fast answer with the hedge timer still armed: decided at once, but wound down only after
 * the aborted timer has called back (a timer calling back later would find the attempts freed
 * and poisoned: see the top). */
static void test_attempt_wound_down_after_the_timers(void)
{
    struct rig g;
    CU_ASSERT_FATAL(rig_init(&g, 1, NULL, 100, 0));
    g.env.hedge_after_ms = 600000;
    struct owner o;
    CU_ASSERT_FATAL(owner_start(&g, &o, "fast", true, CTX_FOREVER));
    CU_ASSERT_FATAL(owner_wait(&o));
    CU_ASSERT_EQUAL(o.err, 0);
    CU_ASSERT_EQUAL(o.started_at_wound, 1);
    CU_ASSERT_EQUAL(o.counted_at_wound, 1);
    CU_ASSERT_EQUAL(M(&g.m->hedges_sent), 0);
    rig_free(&g); /* anything still out calls back here */
    owner_free(&o);
}

static CU_TestInfo attempt_tests[] = {
    {"first attempt: the key's first upstream", test_attempt_first_goes_to_the_first_upstream},
    {"hedge: the delay, half of it, then none", test_attempt_hedge_waits},
    {"hedge: to the next upstream, wins; the loser is aborted and counted",
     test_attempt_hedge_wins_and_the_loser_is_aborted},
    {"hedge: the second back to the first upstream, then no more",
     test_attempt_second_hedge_then_no_more},
    {"hedge: refused by an empty budget, counted, no more tries",
     test_attempt_hedge_refused_by_the_budget},
    {"retry: a 503 goes to the next upstream", test_attempt_retry_503_on_the_next_upstream},
    {"retry: never after a 500 or a 404", test_attempt_no_retry_after_a_final_ending},
    {"retry: refused by an empty budget, counted", test_attempt_retry_refused_by_the_budget},
    {"backoff: the caps", test_attempt_backoff_caps},
    {"backoff: never ends past the deadline", test_attempt_backoff_bounded_by_the_deadline},
    {"deadline: a moved deadline gets a fresh attempt", test_attempt_outlived_deadline_attempts_again},
    {"wound down only after every timer called back", test_attempt_wound_down_after_the_timers},
    CU_TEST_INFO_NULL,
};

TEST_SUITE(attempt, attempt_tests)
