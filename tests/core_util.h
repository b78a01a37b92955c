/* Helpers shared by the ctx/ and pool/ tests, header-only (static inline, so a file that uses
 * a few of them compiles clean): a counting latch on CLOCK_MONOTONIC, thread/fd baselines that
 * account for ctx's timer thread, a small PRNG, and the round count of the stress tests.
 * A latch may be used from any thread; the baseline helpers from the test's thread. */
#ifndef FANOUT_TEST_CORE_UTIL_H
#define FANOUT_TEST_CORE_UTIL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "ctx/ctx.h"
#include "tests/support.h"

#if defined(__SANITIZE_THREAD__)
#define CORE_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CORE_TSAN 1
#endif
#endif
#ifndef CORE_TSAN
#define CORE_TSAN 0
#endif

/* Rounds for a stress test: 'n' normally, 4n under TSan (the races are what `make tsan` is for,
 * and these tests slow down only 2-3x under it), times $FANOUT_STRESS when set (a soak:
 * FANOUT_STRESS=20 make tsan). */
static inline int core_rounds(int n)
{
    const char *s = getenv("FANOUT_STRESS");
    long mult = s ? strtol(s, NULL, 10) : 1;
    if (mult < 1)
        mult = 1;
    long r = (CORE_TSAN ? 4L * n : n) * mult;
    return r < 1 ? 1 : (int)r;
}

/* A counter that threads bump and others wait on, with monotonic timeouts. */
struct latch {
    pthread_mutex_t mu; /* guards n */
    pthread_cond_t cv;  /* broadcast on every change */
    long n;             /* the count */
};

static inline void latch_init(struct latch *l)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, &a);
    pthread_condattr_destroy(&a);
    l->n = 0;
}

static inline void latch_destroy(struct latch *l)
{
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
}

static inline void latch_add(struct latch *l, long k)
{
    pthread_mutex_lock(&l->mu);
    l->n += k;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

static inline long latch_get(struct latch *l)
{
    pthread_mutex_lock(&l->mu);
    long n = l->n;
    pthread_mutex_unlock(&l->mu);
    return n;
}

/* Waits until the count reaches 'n' or 'ms' milliseconds pass (ms < 0: no limit). Returns true
 * if it was reached. */
static inline bool latch_wait(struct latch *l, long n, int64_t ms)
{
    int64_t until = ms < 0 ? -1 : ctx_now() + ms;
    pthread_mutex_lock(&l->mu);
    while (l->n < n) {
        if (until < 0) {
            pthread_cond_wait(&l->cv, &l->mu);
            continue;
        }
        if (ctx_now() >= until)
            break;
        struct timespec ts = {.tv_sec = until / 1000, .tv_nsec = (until % 1000) * 1000000L};
        pthread_cond_timedwait(&l->cv, &l->mu, &ts);
    }
    bool ok = l->n >= n;
    pthread_mutex_unlock(&l->mu);
    return ok;
}

/* A gate: tasks entering gate_task() bump 'entered' and wait until it opens (latch_add(&open,
 * 1)), so a test can hold workers busy and know when they are. */
struct gate {
    struct latch entered; /* tasks that reached the gate */
    struct latch open;    /* >= 1 once open */
    atomic_long passed;   /* tasks that went through */
};

static inline void gate_init(struct gate *g)
{
    latch_init(&g->entered);
    latch_init(&g->open);
    atomic_init(&g->passed, 0);
}

static inline void gate_destroy(struct gate *g)
{
    latch_destroy(&g->entered);
    latch_destroy(&g->open);
}

static inline void gate_task(void *arg)
{
    struct gate *g = arg;
    latch_add(&g->entered, 1);
    latch_wait(&g->open, 1, -1);
    atomic_fetch_add(&g->passed, 1);
}

/* Threads and fds of the process with no ctx timer thread running. */
struct baseline {
    int threads; /* /proc/self/task entries */
    int fds;     /* open descriptors */
};

static inline void *baseline_noop(void *arg)
{
    return arg;
}

/* Takes the baseline. A thread is created and joined first: TSan starts its own background
 * thread at the first pthread_create, and that one must count as part of the baseline. */
static inline struct baseline baseline_take(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, baseline_noop, NULL) == 0)
        pthread_join(t, NULL);
    ctx_shutdown();
    struct baseline b = {test_thread_count(), test_fd_count()};
    return b;
}

/* Stops ctx's timer thread, then waits (bounded) for the counts to come back to 'b'. */
static inline bool baseline_back(struct baseline b)
{
    ctx_shutdown();
    return test_settles_to(b.threads, b.fds, test_ms(5000));
}

/* xorshift64*: a fast per-thread PRNG for stress tests; seed must be non-zero. */
static inline uint64_t rng_next(uint64_t *s)
{
    return test_rng(s);
}

/* Spins a little without sleeping, to widen race windows. */
static inline void spin(unsigned n)
{
    atomic_uint x = 0;
    for (unsigned i = 0; i < n; i++)
        atomic_fetch_add_explicit(&x, 1, memory_order_relaxed);
}

#endif
