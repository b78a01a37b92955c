/* Tests for fetch_event_*(): one-shot events fired from any thread, run on a loop thread.
 *
 * Callbacks run on loop threads, so they only record (atomics); the test thread waits with
 * test_wait_until() and asserts afterwards. The engines never poll on their own (idle poll of
 * ten minutes), so a lost wakeup shows as a test that waits out its bound. No test assumes an
 * order among callbacks. */
#include "fetch/fetch.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "tests/support.h"

#define WAIT_MS test_ms(10000) /* bound for anything that should happen "soon" */

/* Set around fetch_event_fire() calls made from loop callbacks: a callback run from inside a
 * fire on the same thread would see it. */
static _Thread_local int in_fire;

/* What one event's callback saw. */
struct rec {
    struct fetch_event ev;
    atomic_int calls;    /* callback invocations */
    atomic_int cause;    /* the cause it got */
    atomic_bool nested;  /* it ran from inside a fire */
    pthread_t thread;    /* the thread that ran it (written before 'calls') */
    atomic_int *total;   /* shared count of callbacks, or NULL */
};

static void rec_cb(void *arg, int cause)
{
    struct rec *r = arg;
    r->thread = pthread_self();
    atomic_store(&r->cause, cause);
    if (in_fire)
        atomic_store(&r->nested, true);
    if (r->total)
        atomic_fetch_add(r->total, 1);
    atomic_fetch_add_explicit(&r->calls, 1, memory_order_release); /* last */
}

static bool rec_called(void *arg)
{
    return atomic_load_explicit(&((struct rec *)arg)->calls, memory_order_acquire) > 0;
}

struct count {
    atomic_int *n;
    int want;
};

static bool count_reached(void *arg)
{
    struct count *c = arg;
    return atomic_load(c->n) >= c->want;
}

/* The thread of each loop, seen from a zero-delay timer's callback. */
struct loop_thread {
    atomic_bool seen;
    pthread_t thread;
};

static void loop_thread_cb(void *arg, struct fetch_result *r)
{
    struct loop_thread *t = arg;
    (void)r;
    t->thread = pthread_self();
    atomic_store_explicit(&t->seen, true, memory_order_release);
}

static bool loop_thread_seen(void *arg)
{
    return atomic_load_explicit(&((struct loop_thread *)arg)->seen, memory_order_acquire);
}

static pthread_t thread_of_loop(struct fetch *f, unsigned loop)
{
    struct loop_thread t = {0};
    CU_ASSERT_EQUAL(fetch_after(f, loop, ctx_background(), 0, loop_thread_cb, &t), 0);
    CU_ASSERT(test_wait_until(loop_thread_seen, &t, WAIT_MS));
    return t.thread;
}

/* ---------------------------------------------------------------- basics */

struct firer {
    struct fetch *f;
    struct fetch_event *ev;
    int cause;
    bool won;
};

static void *fire_thread(void *arg)
{
    struct firer *fr = arg;
    fr->won = fetch_event_fire(fr->f, fr->ev, fr->cause);
    return NULL;
}

/* Fired from another thread: the callback runs once, on the event's loop, with the cause; a
 * second fire returns false and changes nothing. */
static void test_event_fire_from_another_thread(void)
{
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    pthread_t loop1 = thread_of_loop(f, 1);
    struct rec r = {0};
    CU_ASSERT_EQUAL(fetch_event_init(f, 1, &r.ev, rec_cb, &r), 0);
    struct firer fr = {f, &r.ev, -EPIPE, false};
    pthread_t th;
    CU_ASSERT_FATAL(pthread_create(&th, NULL, fire_thread, &fr) == 0);
    pthread_join(th, NULL);
    CU_ASSERT_TRUE(fr.won);
    CU_ASSERT(test_wait_until(rec_called, &r, WAIT_MS));
    CU_ASSERT_EQUAL(atomic_load(&r.cause), -EPIPE);
    CU_ASSERT(pthread_equal(r.thread, loop1));
    CU_ASSERT_FALSE(fetch_event_fire(f, &r.ev, 5));
    fetch_free(f);
    CU_ASSERT_EQUAL(atomic_load(&r.calls), 1);
    CU_ASSERT_EQUAL(atomic_load(&r.cause), -EPIPE);
}

/* Fired from a callback on the event's own loop (and on another loop): never run from inside
 * the fire, still run, once. */
struct loop_fires {
    struct fetch *f;
    struct rec *own, *other;
    atomic_int won; /* fires that returned true */
};

static void loop_fires_cb(void *arg, struct fetch_result *r)
{
    struct loop_fires *lf = arg;
    (void)r;
    in_fire = 1;
    atomic_fetch_add(&lf->won, fetch_event_fire(lf->f, &lf->own->ev, 11));
    atomic_fetch_add(&lf->won, fetch_event_fire(lf->f, &lf->other->ev, 12));
    atomic_fetch_add(&lf->won, fetch_event_fire(lf->f, &lf->own->ev, 13)); /* loses */
    in_fire = 0;
}

static void test_event_fire_from_loop_thread(void)
{
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    pthread_t loop0 = thread_of_loop(f, 0), loop1 = thread_of_loop(f, 1);
    struct rec own = {0}, other = {0};
    CU_ASSERT_EQUAL(fetch_event_init(f, 0, &own.ev, rec_cb, &own), 0);
    CU_ASSERT_EQUAL(fetch_event_init(f, 1, &other.ev, rec_cb, &other), 0);
    struct loop_fires lf = {.f = f, .own = &own, .other = &other};
    CU_ASSERT_EQUAL(fetch_after(f, 0, ctx_background(), 0, loop_fires_cb, &lf), 0);
    CU_ASSERT(test_wait_until(rec_called, &own, WAIT_MS));
    CU_ASSERT(test_wait_until(rec_called, &other, WAIT_MS));
    CU_ASSERT_EQUAL(atomic_load(&lf.won), 2);
    CU_ASSERT_EQUAL(atomic_load(&own.cause), 11);
    CU_ASSERT_EQUAL(atomic_load(&other.cause), 12);
    CU_ASSERT_FALSE(atomic_load(&own.nested));
    CU_ASSERT(pthread_equal(own.thread, loop0));
    CU_ASSERT(pthread_equal(other.thread, loop1));
    fetch_free(f);
    CU_ASSERT_EQUAL(atomic_load(&own.calls), 1);
    CU_ASSERT_EQUAL(atomic_load(&other.calls), 1);
}

/* Two threads fire the same event at once, many times over: exactly one wins, and the callback
 * runs once with the winner's cause. */
struct duel {
    pthread_barrier_t *go;
    struct firer fr;
};

static void *duel_thread(void *arg)
{
    struct duel *d = arg;
    pthread_barrier_wait(d->go);
    d->fr.won = fetch_event_fire(d->fr.f, d->fr.ev, d->fr.cause);
    return NULL;
}

static void test_event_fire_twice_one_callback(void)
{
    enum { ROUNDS = 200 };
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    unsigned bad = 0;
    for (int i = 0; i < ROUNDS; i++) {
        struct rec r = {0};
        CU_ASSERT_EQUAL(fetch_event_init(f, (unsigned)i % 2, &r.ev, rec_cb, &r), 0);
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, 2);
        struct duel d[2] = {{&go, {f, &r.ev, 100, false}}, {&go, {f, &r.ev, 200, false}}};
        pthread_t th[2];
        for (int k = 0; k < 2; k++)
            CU_ASSERT_FATAL(pthread_create(&th[k], NULL, duel_thread, &d[k]) == 0);
        for (int k = 0; k < 2; k++)
            pthread_join(th[k], NULL);
        pthread_barrier_destroy(&go);
        CU_ASSERT(test_wait_until(rec_called, &r, WAIT_MS));
        int winner = d[0].fr.won ? 100 : 200;
        bad += d[0].fr.won == d[1].fr.won || atomic_load(&r.cause) != winner;
        bad += atomic_load(&r.calls) != 1; /* both fires have returned: no second call */
    }
    CU_ASSERT_EQUAL(bad, 0);
    fetch_free(f);
}

/* ---------------------------------------------------------------- shutdown */

/* A timer that ends at shutdown: from its callback (fetch_free() has begun), arming an event
 * is refused and a fire on an event still armed wins with its cause. */
struct at_shutdown {
    struct fetch *f;
    struct rec *armed;   /* fired from the callback */
    struct rec refused;  /* armed from the callback */
    atomic_int init_rc;
    atomic_bool fire_won;
};

static void at_shutdown_cb(void *arg, struct fetch_result *r)
{
    struct at_shutdown *s = arg;
    (void)r;
    atomic_store(&s->init_rc, fetch_event_init(s->f, 0, &s->refused.ev, rec_cb, &s->refused));
    atomic_store(&s->fire_won, fetch_event_fire(s->f, &s->armed->ev, 77));
}

/* Events never fired get FETCH_ESHUTDOWN from fetch_free(), which returns after every callback;
 * arming after it began is refused; bad arguments are refused without a callback. */
static void test_event_shutdown(void)
{
    enum { N = 50 };
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    struct rec r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++)
        CU_ASSERT_EQUAL(fetch_event_init(f, (unsigned)i % 2, &r[i].ev, rec_cb, &r[i]), 0);
    struct rec x = {0};
    CU_ASSERT_EQUAL(fetch_event_init(f, 2, &x.ev, rec_cb, &x), -EINVAL);
    CU_ASSERT_EQUAL(fetch_event_init(f, 0, &x.ev, NULL, &x), -EINVAL);
    CU_ASSERT_EQUAL(fetch_event_init(NULL, 0, &x.ev, rec_cb, &x), -EINVAL);
    CU_ASSERT_EQUAL(fetch_event_init(f, 0, NULL, rec_cb, &x), -EINVAL);
    struct at_shutdown s = {.f = f, .armed = &r[0]};
    CU_ASSERT_EQUAL(fetch_after(f, 0, ctx_background(), 600000, at_shutdown_cb, &s), 0);
    CU_ASSERT_TRUE(fetch_event_fire(f, &r[1].ev, 1));
    CU_ASSERT(test_wait_until(rec_called, &r[1], WAIT_MS));
    fetch_free(f);
    CU_ASSERT_EQUAL(atomic_load(&s.init_rc), FETCH_ESHUTDOWN);
    CU_ASSERT_TRUE(atomic_load(&s.fire_won));
    CU_ASSERT_EQUAL(atomic_load(&s.refused.calls), 0);
    CU_ASSERT_EQUAL(atomic_load(&x.calls), 0);
    CU_ASSERT_EQUAL(atomic_load(&r[0].cause), 77);
    CU_ASSERT_EQUAL(atomic_load(&r[1].cause), 1);
    unsigned bad = 0;
    for (int i = 0; i < N; i++) {
        bad += atomic_load(&r[i].calls) != 1;
        bad += i > 1 && atomic_load(&r[i].cause) != FETCH_ESHUTDOWN;
        /* After fetch_free() the event is ended: a fire reads only the event and loses. */
        bad += fetch_event_fire(f, &r[i].ev, 9);
    }
    CU_ASSERT_EQUAL(bad, 0);
}

/* Threads fire events while fetch_free() runs: each callback runs exactly once, with the fire's
 * cause (-1000 - i for event i) when the fire won, else with FETCH_ESHUTDOWN. */
struct racer {
    struct fetch *f;
    struct rec *r;
    bool *won;
    int from, to;
    pthread_barrier_t *go;
};

static void *racer_thread(void *arg)
{
    struct racer *rc = arg;
    pthread_barrier_wait(rc->go);
    for (int i = rc->from; i < rc->to; i++)
        rc->won[i] = fetch_event_fire(rc->f, &rc->r[i].ev, -1000 - i);
    return NULL;
}

static void test_event_fire_races_free(void)
{
    enum { N = 2000, THREADS = 3, ROUNDS = 10 };
    struct rec *r = calloc(N, sizeof(*r));
    bool *won = calloc(N, sizeof(*won));
    CU_ASSERT_FATAL(r && won);
    unsigned bad = 0, won_total = 0, lost_total = 0;
    for (int round = 0; round < ROUNDS; round++) {
        memset(r, 0, N * sizeof(*r));
        memset(won, 0, N * sizeof(*won));
        struct fetch *f = test_quiet_engine(2);
        CU_ASSERT_FATAL(f != NULL);
        for (int i = 0; i < N; i++)
            CU_ASSERT_EQUAL(fetch_event_init(f, (unsigned)i % 2, &r[i].ev, rec_cb, &r[i]), 0);
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, THREADS + 1);
        struct racer rc[THREADS];
        pthread_t th[THREADS];
        for (int k = 0; k < THREADS; k++) {
            rc[k] = (struct racer){f, r, won, k * N / THREADS, (k + 1) * N / THREADS, &go};
            CU_ASSERT_FATAL(pthread_create(&th[k], NULL, racer_thread, &rc[k]) == 0);
        }
        pthread_barrier_wait(&go);
        fetch_free(f);
        for (int k = 0; k < THREADS; k++)
            pthread_join(th[k], NULL);
        pthread_barrier_destroy(&go);
        for (int i = 0; i < N; i++) {
            int cause = atomic_load(&r[i].cause), want = -1000 - i;
            bad += atomic_load(&r[i].calls) != 1;
            bad += won[i] ? cause != want : cause != FETCH_ESHUTDOWN;
            won_total += won[i];
            lost_total += !won[i];
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(won_total + lost_total, (unsigned)N * ROUNDS);
    free(r);
    free(won);
}

/* ---------------------------------------------------------------- many */

/* Many threads fire many events on both loops, each event by two threads: one callback per
 * event, with the winner's cause, on the event's loop. */
struct storm {
    struct fetch *f;
    struct rec *r;
    int n, k, threads;
    bool *won; /* [n][2]: the two fires of each event */
};

static void *storm_thread(void *arg)
{
    struct storm *s = arg;
    /* Thread k fires the events i with i % threads == k (slot 0) and those with
     * i % threads == k + 1 (slot 1), so each event has two firers. */
    for (int i = 0; i < s->n; i++) {
        int m = i % s->threads;
        if (m == s->k)
            s->won[2 * i] = fetch_event_fire(s->f, &s->r[i].ev, i);
        else if (m == (s->k + 1) % s->threads)
            s->won[2 * i + 1] = fetch_event_fire(s->f, &s->r[i].ev, -i - 1);
    }
    return NULL;
}

static void test_event_many_threads(void)
{
    enum { N = 20000, THREADS = 4 };
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    pthread_t loops[2] = {thread_of_loop(f, 0), thread_of_loop(f, 1)};
    struct rec *r = calloc(N, sizeof(*r));
    bool *won = calloc(2 * N, sizeof(*won));
    CU_ASSERT_FATAL(r && won);
    atomic_int total = 0;
    for (int i = 0; i < N; i++) {
        r[i].total = &total;
        CU_ASSERT_EQUAL(fetch_event_init(f, (unsigned)i % 2, &r[i].ev, rec_cb, &r[i]), 0);
    }
    struct storm s[THREADS];
    pthread_t th[THREADS];
    for (int k = 0; k < THREADS; k++) {
        s[k] = (struct storm){f, r, N, k, THREADS, won};
        CU_ASSERT_FATAL(pthread_create(&th[k], NULL, storm_thread, &s[k]) == 0);
    }
    for (int k = 0; k < THREADS; k++)
        pthread_join(th[k], NULL);
    struct count c = {&total, N};
    CU_ASSERT(test_wait_until(count_reached, &c, WAIT_MS));
    unsigned bad = 0;
    for (int i = 0; i < N; i++) {
        bool a = won[2 * i], b = won[2 * i + 1];
        bad += a == b;
        bad += atomic_load(&r[i].cause) != (a ? i : -i - 1);
        bad += atomic_load(&r[i].calls) != 1;
        bad += !pthread_equal(r[i].thread, loops[i % 2]);
    }
    CU_ASSERT_EQUAL(bad, 0);
    fetch_free(f);
    CU_ASSERT_EQUAL(atomic_load(&total), N);
    free(r);
    free(won);
}

/* A callback arms its own event again and fires it from the loop thread, 100 times: each run
 * comes from the loop's pass, never from inside the fire. */
struct again {
    struct fetch *f;
    struct fetch_event ev;
    atomic_int runs;
    atomic_bool nested;
    atomic_bool failed;
};

static void again_cb(void *arg, int cause)
{
    struct again *a = arg;
    if (in_fire)
        atomic_store(&a->nested, true);
    if (cause != atomic_load(&a->runs))
        atomic_store(&a->failed, true);
    int n = atomic_fetch_add(&a->runs, 1) + 1;
    if (n == 100)
        return;
    if (fetch_event_init(a->f, 0, &a->ev, again_cb, a) != 0)
        atomic_store(&a->failed, true);
    in_fire = 1;
    if (!fetch_event_fire(a->f, &a->ev, n))
        atomic_store(&a->failed, true);
    in_fire = 0;
}

static bool again_done(void *arg)
{
    return atomic_load(&((struct again *)arg)->runs) >= 100;
}

static void test_event_rearmed_from_callback(void)
{
    struct fetch *f = test_quiet_engine(1);
    CU_ASSERT_FATAL(f != NULL);
    struct again a = {.f = f};
    CU_ASSERT_EQUAL(fetch_event_init(f, 0, &a.ev, again_cb, &a), 0);
    CU_ASSERT_TRUE(fetch_event_fire(f, &a.ev, 0));
    CU_ASSERT(test_wait_until(again_done, &a, WAIT_MS));
    fetch_free(f);
    CU_ASSERT_EQUAL(atomic_load(&a.runs), 100);
    CU_ASSERT_FALSE(atomic_load(&a.nested));
    CU_ASSERT_FALSE(atomic_load(&a.failed));
}

static CU_TestInfo event_tests[] = {
    {"fired from another thread: once, on its loop, with the cause",
     test_event_fire_from_another_thread},
    {"fired from a loop thread: run by the loop, never inside the fire",
     test_event_fire_from_loop_thread},
    {"two fires at once: one wins, one callback", test_event_fire_twice_one_callback},
    {"shutdown: FETCH_ESHUTDOWN for the armed, refused after, bad arguments",
     test_event_shutdown},
    {"fires racing with fetch_free: exactly once, the fire's cause or shutdown",
     test_event_fire_races_free},
    {"many events, many firing threads", test_event_many_threads},
    {"re-armed and fired from its own callback", test_event_rearmed_from_callback},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(event, event_tests)
