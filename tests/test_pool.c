/* Tests for pool/pool: every task runs, a full queue answers -EAGAIN (workers held at a gate so
 * it fills deterministically), pool_free() drains queued tasks then joins, -EPIPE once freeing
 * has begun, pool_submit_wait() waits for room, threads come and go with the pool, the seed
 * "mutex-guarded counter hammered by many threads" and "capped worker pool" patterns, and a
 * many-round race for `make tsan`. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "ctx/ctx.h"
#include "pool/pool.h"
#include "tests/core_util.h"
#include "tests/support.h"

static struct baseline base;

static int suite_init(void)
{
    base = baseline_take();
    return 0;
}

#define CHECK_BASELINE() CU_ASSERT_TRUE(baseline_back(base))

static void count_task(void *arg)
{
    atomic_fetch_add((atomic_long *)arg, 1);
}

static void test_pool_bad_arguments(void)
{
    CU_ASSERT_PTR_NULL(pool_new(0, 4));
    CU_ASSERT_PTR_NULL(pool_new(2, 0));
    struct pool *p = pool_new(1, 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT_EQUAL(pool_submit(p, NULL, NULL), -EINVAL);
    CU_ASSERT_EQUAL(pool_submit_wait(p, NULL, NULL), -EINVAL);
    pool_free(p);
    pool_free(NULL);
    CHECK_BASELINE();
}

static void test_pool_all_tasks_run_threads_come_and_go(void)
{
    struct pool *p = pool_new(4, 64);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT_EQUAL(pool_threads(p), 4);
    CU_ASSERT_EQUAL(test_thread_count(), base.threads + 4); /* started in pool_new */
    atomic_long n = 0;
    int fails = 0;
    for (int i = 0; i < 20000; i++)
        fails += pool_submit_wait(p, count_task, &n) != 0;
    CU_ASSERT_EQUAL(fails, 0);
    pool_free(p);
    CU_ASSERT_EQUAL(atomic_load(&n), 20000);
    CHECK_BASELINE(); /* joined */
}

static void test_pool_full_queue_eagain(void)
{
    struct pool *p = pool_new(2, 3);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    struct gate g;
    gate_init(&g);
    atomic_long n = 0;
    CU_ASSERT_EQUAL(pool_submit(p, gate_task, &g), 0);
    CU_ASSERT_EQUAL(pool_submit(p, gate_task, &g), 0);
    CU_ASSERT_TRUE(latch_wait(&g.entered, 2, test_ms(5000))); /* both workers held: queue empty */
    for (int i = 0; i < 3; i++)
        CU_ASSERT_EQUAL(pool_submit(p, count_task, &n), 0);
    CU_ASSERT_EQUAL(pool_submit(p, count_task, &n), -EAGAIN);
    CU_ASSERT_EQUAL(pool_submit(p, count_task, &n), -EAGAIN);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    latch_add(&g.open, 1);
    pool_free(p);
    CU_ASSERT_EQUAL(atomic_load(&n), 3); /* the refused ones never ran */
    CU_ASSERT_EQUAL(atomic_load(&g.passed), 2);
    gate_destroy(&g);
    CHECK_BASELINE();
}

/* pool_free() on another thread while the workers are held and the queue is full: submits see
 * -EPIPE once it has begun; opening the gate lets it run every queued task, then join. */
struct freer {
    struct pool *p;
};

static void *freer_main(void *arg)
{
    struct freer *f = arg;
    pool_free(f->p);
    return NULL;
}

static void test_pool_free_drains_then_joins(void)
{
    struct pool *p = pool_new(2, 8);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    struct gate g;
    gate_init(&g);
    atomic_long n = 0;
    pool_submit(p, gate_task, &g);
    pool_submit(p, gate_task, &g);
    CU_ASSERT_TRUE(latch_wait(&g.entered, 2, test_ms(5000)));
    for (int i = 0; i < 8; i++)
        CU_ASSERT_EQUAL(pool_submit(p, count_task, &n), 0);
    struct freer f = {p};
    pthread_t t;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, freer_main, &f), 0);
    /* The pool cannot be freed while its workers are held, so polling it is safe: -EAGAIN
     * (full) until pool_free() has begun, then -EPIPE. */
    int rc;
    int64_t until = ctx_now() + test_ms(10000);
    while ((rc = pool_submit(p, count_task, &n)) == -EAGAIN && ctx_now() < until)
        ;
    CU_ASSERT_EQUAL(rc, -EPIPE);
    CU_ASSERT_EQUAL(pool_submit_wait(p, count_task, &n), -EPIPE);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    latch_add(&g.open, 1);
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(atomic_load(&n), 8); /* queued before pool_free: all ran */
    CU_ASSERT_EQUAL(atomic_load(&g.passed), 2);
    gate_destroy(&g);
    CHECK_BASELINE();
}

/* pool_submit_wait() blocks while full and goes through once room appears; a waiter blocked when
 * pool_free() begins gets -EPIPE. */
struct submitter {
    struct pool *p;
    atomic_long *n;
    struct latch *go;
    int rc;
};

static void *submitter_main(void *arg)
{
    struct submitter *s = arg;
    latch_add(s->go, 1);
    s->rc = pool_submit_wait(s->p, count_task, s->n);
    return NULL;
}

static void test_pool_submit_wait(void)
{
    struct pool *p = pool_new(1, 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    struct gate g;
    gate_init(&g);
    atomic_long n = 0;
    struct latch go;
    latch_init(&go);
    pool_submit(p, gate_task, &g);
    CU_ASSERT_TRUE(latch_wait(&g.entered, 1, test_ms(5000)));
    CU_ASSERT_EQUAL(pool_submit(p, count_task, &n), 0); /* queue now full */
    struct submitter s = {p, &n, &go, 1};
    pthread_t t;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, submitter_main, &s), 0);
    latch_wait(&go, 1, test_ms(5000));
    latch_add(&g.open, 1); /* room appears as the worker moves on */
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(s.rc, 0);
    pool_free(p);
    CU_ASSERT_EQUAL(atomic_load(&n), 2);
    gate_destroy(&g);

    /* Blocked when pool_free() begins: -EPIPE. */
    p = pool_new(1, 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    gate_init(&g);
    atomic_store(&n, 0);
    pool_submit(p, gate_task, &g);
    CU_ASSERT_TRUE(latch_wait(&g.entered, 1, test_ms(5000)));
    pool_submit(p, count_task, &n);
    struct submitter s2 = {p, &n, &go, 1};
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, submitter_main, &s2), 0);
    latch_wait(&go, 2, test_ms(5000));
    struct freer f = {p};
    pthread_t tf;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&tf, NULL, freer_main, &f), 0);
    pthread_join(t, NULL); /* returns while the worker is still held */
    CU_ASSERT_EQUAL(s2.rc, -EPIPE);
    latch_add(&g.open, 1);
    pthread_join(tf, NULL);
    CU_ASSERT_EQUAL(atomic_load(&n), 1);
    gate_destroy(&g);
    latch_destroy(&go);
    CHECK_BASELINE();
}

/* Seed: a counter guarded by a mutex, hammered from many threads: the exact total. */
struct counter {
    pthread_mutex_t mu;
    long value; /* guarded by mu */
};

#define HAMMER_TASKS 64
#define HAMMER_INCS 5000

static void hammer_task(void *arg)
{
    struct counter *c = arg;
    for (int i = 0; i < HAMMER_INCS; i++) {
        pthread_mutex_lock(&c->mu);
        c->value++;
        pthread_mutex_unlock(&c->mu);
    }
}

static void test_pool_seed_mutex_counter(void)
{
    struct counter c = {.value = 0};
    pthread_mutex_init(&c.mu, NULL);
    struct pool *p = pool_new(8, HAMMER_TASKS);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    for (int i = 0; i < HAMMER_TASKS; i++)
        CU_ASSERT_EQUAL(pool_submit(p, hammer_task, &c), 0);
    pool_free(p);
    pthread_mutex_lock(&c.mu);
    CU_ASSERT_EQUAL(c.value, (long)HAMMER_TASKS * HAMMER_INCS);
    pthread_mutex_unlock(&c.mu);
    pthread_mutex_destroy(&c.mu);
    CHECK_BASELINE();
}

/* Seed: a capped worker pool (a fixed number of threads) never runs more tasks at once than its
 * cap, and reaches it. */
struct capped {
    atomic_int running; /* tasks running now */
    atomic_int max;     /* the most ever running at once */
    struct gate *g;     /* the first 'cap' tasks wait here */
    atomic_int first;   /* tasks that have started */
    int cap;
};

static void capped_task(void *arg)
{
    struct capped *c = arg;
    int now = atomic_fetch_add(&c->running, 1) + 1;
    int m = atomic_load(&c->max);
    while (now > m && !atomic_compare_exchange_weak(&c->max, &m, now))
        ;
    if (atomic_fetch_add(&c->first, 1) < c->cap)
        gate_task(c->g); /* hold the pool full until every worker is busy */
    else
        spin(500);
    atomic_fetch_sub(&c->running, 1);
}

static void test_pool_seed_capped_worker_pool(void)
{
    enum { CAP = 3, TASKS = 3000 };
    struct gate g;
    gate_init(&g);
    struct capped c = {.g = &g, .cap = CAP};
    struct pool *p = pool_new(CAP, 16);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    for (int i = 0; i < CAP; i++)
        pool_submit(p, capped_task, &c);
    CU_ASSERT_TRUE(latch_wait(&g.entered, CAP, test_ms(5000))); /* the cap is reached ... */
    latch_add(&g.open, 1);
    for (int i = CAP; i < TASKS; i++)
        pool_submit_wait(p, capped_task, &c);
    pool_free(p);
    CU_ASSERT_EQUAL(atomic_load(&c.max), CAP); /* ... and never exceeded */
    CU_ASSERT_EQUAL(atomic_load(&c.first), TASKS);
    gate_destroy(&g);
    CHECK_BASELINE();
}

/* Race: rounds of a pool fed from several threads at once (submit and submit_wait), with tasks
 * that submit more tasks from the workers, then freed while those inner submits may be racing
 * with the stop. Every accepted task runs exactly once; refusals are -EAGAIN or -EPIPE only. */
struct race_pool {
    struct pool *p;
    atomic_long accepted; /* submits that returned 0 */
    atomic_long ran;      /* tasks that ran */
    atomic_long bad;      /* unexpected return codes */
};

static void race_inner_task(void *arg)
{
    struct race_pool *r = arg;
    atomic_fetch_add(&r->ran, 1);
}

static void race_outer_task(void *arg)
{
    struct race_pool *r = arg;
    atomic_fetch_add(&r->ran, 1);
    int rc = pool_submit(r->p, race_inner_task, r); /* from a worker, possibly during stop */
    if (rc == 0)
        atomic_fetch_add(&r->accepted, 1);
    else if (rc != -EAGAIN && rc != -EPIPE)
        atomic_fetch_add(&r->bad, 1);
}

struct race_feeder {
    struct race_pool *r;
    pthread_barrier_t *bar;
    bool wait;
};

static void *race_feeder_main(void *arg)
{
    struct race_feeder *f = arg;
    pthread_barrier_wait(f->bar);
    for (int i = 0; i < 50; i++) {
        int rc = f->wait ? pool_submit_wait(f->r->p, race_outer_task, f->r)
                         : pool_submit(f->r->p, race_outer_task, f->r);
        if (rc == 0)
            atomic_fetch_add(&f->r->accepted, 1);
        else if (rc != -EAGAIN)
            atomic_fetch_add(&f->r->bad, 1);
    }
    return NULL;
}

static void test_pool_race_submit_and_free(void)
{
    int rounds = core_rounds(300);
    long mismatch = 0, bad = 0;
    for (int round = 0; round < rounds; round++) {
        struct race_pool r = {.p = pool_new(1 + (unsigned)(round % 3), 1 + (size_t)(round % 5))};
        CU_ASSERT_PTR_NOT_NULL_FATAL(r.p);
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, 3);
        struct race_feeder f[3] = {{&r, &bar, false}, {&r, &bar, true}, {&r, &bar, true}};
        pthread_t t[3];
        for (int i = 0; i < 3; i++)
            pthread_create(&t[i], NULL, race_feeder_main, &f[i]);
        for (int i = 0; i < 3; i++)
            pthread_join(t[i], NULL);
        pool_free(r.p); /* races with inner submits from the workers */
        mismatch += atomic_load(&r.accepted) != atomic_load(&r.ran);
        bad += atomic_load(&r.bad);
        pthread_barrier_destroy(&bar);
    }
    CU_ASSERT_EQUAL(mismatch, 0);
    CU_ASSERT_EQUAL(bad, 0);
    CHECK_BASELINE();
}

static CU_TestInfo pool_tests[] = {
    {"bad arguments", test_pool_bad_arguments},
    {"all tasks run; threads start and are joined", test_pool_all_tasks_run_threads_come_and_go},
    {"full queue: -EAGAIN (gated workers)", test_pool_full_queue_eagain},
    {"pool_free drains queued tasks, then joins; -EPIPE", test_pool_free_drains_then_joins},
    {"pool_submit_wait waits for room; -EPIPE on free", test_pool_submit_wait},
    {"seed: mutex counter hammered by many threads", test_pool_seed_mutex_counter},
    {"seed: capped worker pool never exceeds its cap", test_pool_seed_capped_worker_pool},
    {"race: submitters, inner submits, free", test_pool_race_submit_and_free},
    CU_TEST_INFO_NULL,
};
TEST_SUITE_INIT(pool, pool_tests, suite_init, NULL)
