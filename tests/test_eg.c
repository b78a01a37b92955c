/* Tests for pool/errgroup, thread tasks and async tasks: the first error cancels the group's ctx
 * and is what eg_wait returns, eg_wait cancels the ctx, the limit caps concurrency and makes
 * eg_go block, a failed group refuses and skips tasks, parent cancellation propagates; the async
 * path queues past the limit, hands freed slots to queued tasks (from other threads too), survives
 * 100,000 queued tasks that fail or complete synchronously without recursion, reports the end
 * once (the callback may free the group); the seed "fetch-all, first error cancels the rest" and
 * "capped worker pool" patterns; many-round races for `make tsan`. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "ctx/ctx.h"
#include "pool/chan.h"
#include "pool/errgroup.h"
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

static void max_update(atomic_int *max, int v)
{
    int m = atomic_load(max);
    while (v > m && !atomic_compare_exchange_weak(max, &m, v))
        ;
}

/* ---------------------------------------------------------------- thread tasks */

static int count_fn(struct ctx *c, void *arg)
{
    (void)c;
    atomic_fetch_add((atomic_long *)arg, 1);
    return 0;
}

static int fail_fn(struct ctx *c, void *arg)
{
    (void)c;
    return (int)(intptr_t)arg;
}

static int gate_fn(struct ctx *c, void *arg)
{
    (void)c;
    gate_task(arg);
    return 0;
}

static void test_eg_all_ok(void)
{
    struct pool *p = pool_new(4, 16);
    struct ctx *parent = ctx_new(ctx_background(), CTX_FOREVER);
    struct eg *g = eg_new(parent, p);
    CU_ASSERT_FATAL(p && parent && g);
    atomic_long n = 0;
    int fails = 0;
    for (int i = 0; i < 2000; i++)
        fails += eg_go(g, count_fn, &n) != 0;
    CU_ASSERT_EQUAL(fails, 0);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(atomic_load(&n), 2000); /* all ran before eg_wait returned */
    CU_ASSERT_EQUAL(eg_err(g), 0);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -ECANCELED); /* eg_wait cancels the group's ctx */
    CU_ASSERT_EQUAL(ctx_err(parent), 0);             /* not its parent */
    eg_free(g);
    ctx_free(parent);
    pool_free(p);
    CHECK_BASELINE();
}

static void test_eg_wait_with_no_tasks_cancels_ctx(void)
{
    struct eg *g = eg_new(ctx_background(), NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(g);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), 0);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -ECANCELED);
    eg_free(g);
    eg_free(NULL);
    CHECK_BASELINE();
}

static void test_eg_without_pool(void)
{
    struct eg *g = eg_new(NULL, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(g);
    atomic_long n = 0;
    CU_ASSERT_EQUAL(eg_go(g, count_fn, &n), -EINVAL);
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n));
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    eg_free(g);
    struct pool *p = pool_new(1, 1);
    g = eg_new(NULL, p);
    CU_ASSERT_EQUAL(eg_go(g, NULL, NULL), -EINVAL);
    CU_ASSERT_FALSE(eg_try_go(g, NULL, NULL));
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* The first error: one task fails once the others are running; they wait on the group's ctx
 * and then return a second, different error, which must not win. */
struct first_err {
    struct latch started; /* the waiting tasks that are running */
    int others;           /* how many of them */
    atomic_int seen_bad;  /* a waiter saw a cause other than the first error */
};

static int first_err_failer(struct ctx *c, void *arg)
{
    struct first_err *f = arg;
    (void)c;
    latch_wait(&f->started, f->others, test_ms(10000));
    return -EIO;
}

static int first_err_waiter(struct ctx *c, void *arg)
{
    struct first_err *f = arg;
    latch_add(&f->started, 1);
    int rc = ctx_wait(c, CTX_FOREVER);
    if (rc != -EIO)
        atomic_store(&f->seen_bad, 1);
    return -EPERM;
}

static void test_eg_first_error_cancels_and_wins(void)
{
    struct pool *p = pool_new(4, 8);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    struct first_err f = {.others = 3};
    latch_init(&f.started);
    for (int i = 0; i < 3; i++)
        CU_ASSERT_EQUAL(eg_go(g, first_err_waiter, &f), 0);
    CU_ASSERT_EQUAL(eg_go(g, first_err_failer, &f), 0);
    CU_ASSERT_EQUAL(eg_wait(g), -EIO);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -EIO); /* the cause is the error */
    CU_ASSERT_EQUAL(eg_err(g), -EIO);
    CU_ASSERT_EQUAL(atomic_load(&f.seen_bad), 0);
    latch_destroy(&f.started);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* Once failed: eg_go returns the error without running fn, eg_try_go is false. */
static void test_eg_go_after_failure(void)
{
    struct pool *p = pool_new(2, 8);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    atomic_long n = 0;
    CU_ASSERT_EQUAL(eg_go(g, fail_fn, (void *)(intptr_t)-ENOENT), 0);
    CU_ASSERT_EQUAL(ctx_wait(eg_ctx(g), ctx_now() + test_ms(10000)), -ENOENT); /* the failure landed */
    CU_ASSERT_EQUAL(eg_err(g), -ENOENT);
    CU_ASSERT_EQUAL(eg_go(g, count_fn, &n), -ENOENT);
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n));
    CU_ASSERT_EQUAL(eg_wait(g), -ENOENT);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* Tasks queued in the pool but not yet started when the group fails are skipped. A single
 * worker makes the order certain: the failing task ends (and cancels) before the next starts. */
struct gated_fail {
    struct gate *g;
    int rc;
};

static int gated_fail_fn(struct ctx *c, void *arg)
{
    struct gated_fail *f = arg;
    (void)c;
    gate_task(f->g);
    return f->rc;
}

static void test_eg_unstarted_tasks_skipped_after_failure(void)
{
    struct pool *p = pool_new(1, 64);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    struct gate gt;
    gate_init(&gt);
    struct gated_fail f = {&gt, -EIO};
    atomic_long n = 0;
    CU_ASSERT_EQUAL(eg_go(g, gated_fail_fn, &f), 0);
    CU_ASSERT_TRUE(latch_wait(&gt.entered, 1, test_ms(5000)));
    for (int i = 0; i < 50; i++)
        CU_ASSERT_EQUAL(eg_go(g, count_fn, &n), 0); /* queued behind the held worker */
    latch_add(&gt.open, 1);
    CU_ASSERT_EQUAL(eg_wait(g), -EIO);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    gate_destroy(&gt);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* Seed: a capped worker pool through the errgroup limit: never more than the cap at once, and
 * the cap is reached (the first 'cap' tasks wait at a gate until all of them are in). */
struct capped {
    atomic_int running, max;
    atomic_long done;
};

static int capped_fn(struct ctx *c, void *arg)
{
    struct capped *k = arg;
    (void)c;
    max_update(&k->max, atomic_fetch_add(&k->running, 1) + 1);
    spin(300);
    atomic_fetch_sub(&k->running, 1);
    atomic_fetch_add(&k->done, 1);
    return 0;
}

static void test_eg_limit_caps_concurrency(void)
{
    enum { CAP = 3, TASKS = 600 };
    struct pool *p = pool_new(8, 16);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    eg_set_limit(g, CAP);
    struct gate gt;
    gate_init(&gt);
    for (int i = 0; i < CAP; i++)
        CU_ASSERT_EQUAL(eg_go(g, gate_fn, &gt), 0);
    CU_ASSERT_TRUE(latch_wait(&gt.entered, CAP, test_ms(5000))); /* the cap is reached */
    atomic_long n = 0;
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n)); /* at the limit */
    latch_add(&gt.open, 1);
    struct capped k = {0};
    for (int i = 0; i < TASKS; i++)
        CU_ASSERT_EQUAL(eg_go(g, capped_fn, &k), 0);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_TRUE(atomic_load(&k.max) <= CAP);
    CU_ASSERT_EQUAL(atomic_load(&k.done), TASKS);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    gate_destroy(&gt);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* eg_go blocks at the limit: with limit 1 and a task held at a gate, a second eg_go on another
 * thread returns only after the gate opened, and its task starts after the first ended. */
struct blocked_go {
    struct eg *g;
    struct gate *gt;
    atomic_int returned; /* eg_go returned */
    int rc;
    bool gate_open_at_return; /* was the gate open when eg_go returned? */
    atomic_int first_done;    /* the gated task has finished */
    int second_saw_first_done;
};

static int blocked_first_fn(struct ctx *c, void *arg)
{
    struct blocked_go *b = arg;
    (void)c;
    gate_task(b->gt);
    atomic_store(&b->first_done, 1);
    return 0;
}

static int blocked_second_fn(struct ctx *c, void *arg)
{
    struct blocked_go *b = arg;
    (void)c;
    b->second_saw_first_done = atomic_load(&b->first_done);
    return 0;
}

static void *blocked_go_main(void *arg)
{
    struct blocked_go *b = arg;
    b->rc = eg_go(b->g, blocked_second_fn, b);
    b->gate_open_at_return = latch_get(&b->gt->open) > 0;
    atomic_store(&b->returned, 1);
    return NULL;
}

static bool blocked_returned(void *arg)
{
    struct blocked_go *b = arg;
    return atomic_load(&b->returned) != 0;
}

static void test_eg_go_blocks_at_limit(void)
{
    struct pool *p = pool_new(4, 8);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    eg_set_limit(g, 1);
    struct gate gt;
    gate_init(&gt);
    struct blocked_go b = {.g = g, .gt = &gt};
    CU_ASSERT_EQUAL(eg_go(g, blocked_first_fn, &b), 0);
    CU_ASSERT_TRUE(latch_wait(&gt.entered, 1, test_ms(5000)));
    pthread_t t;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, blocked_go_main, &b), 0);
    /* A generous look for a wrong early return (it can only make a broken limit pass, never a
     * working one fail). */
    CU_ASSERT_FALSE(test_wait_until(blocked_returned, &b, 100));
    latch_add(&gt.open, 1);
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(b.rc, 0);
    CU_ASSERT_TRUE(b.gate_open_at_return);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(b.second_saw_first_done, 1);
    gate_destroy(&gt);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* eg_try_go: false at the limit, false when the pool queue is full, false once failed; the
 * refusals leave no trace (eg_wait still returns). eg_set_limit(0) acts as 1; < 0 is no limit. */
static void test_eg_try_go(void)
{
    struct pool *p = pool_new(1, 1);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    struct gate gt;
    gate_init(&gt);
    atomic_long n = 0;
    eg_set_limit(g, 0); /* treated as 1 */
    CU_ASSERT_TRUE(eg_try_go(g, gate_fn, &gt));
    CU_ASSERT_TRUE(latch_wait(&gt.entered, 1, test_ms(5000)));
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n)); /* limit */
    eg_set_limit(g, -5);                         /* no limit */
    CU_ASSERT_TRUE(eg_try_go(g, count_fn, &n));  /* fills the pool's queue of 1 */
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n)); /* pool queue full */
    latch_add(&gt.open, 1);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(atomic_load(&n), 1);
    eg_free(g);

    g = eg_new(ctx_background(), p);
    CU_ASSERT_TRUE(eg_try_go(g, fail_fn, (void *)(intptr_t)-EIO));
    ctx_wait(eg_ctx(g), ctx_now() + test_ms(10000));
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n)); /* failed */
    CU_ASSERT_EQUAL(eg_wait(g), -EIO);
    CU_ASSERT_EQUAL(atomic_load(&n), 1);
    eg_free(g);
    gate_destroy(&gt);
    pool_free(p);
    CHECK_BASELINE();
}

/* A parent's cancel reaches the group's ctx: tasks waiting on it return its cause, which
 * becomes the group's result; a group born under a canceled parent skips its tasks. */
static int ctx_waiter_fn(struct ctx *c, void *arg)
{
    latch_add(arg, 1);
    return ctx_wait(c, CTX_FOREVER);
}

static void test_eg_parent_cancel_propagates(void)
{
    struct pool *p = pool_new(3, 8);
    struct ctx *parent = ctx_new(ctx_background(), CTX_FOREVER);
    struct eg *g = eg_new(parent, p);
    CU_ASSERT_FATAL(p && parent && g);
    struct latch started;
    latch_init(&started);
    for (int i = 0; i < 3; i++)
        eg_go(g, ctx_waiter_fn, &started);
    CU_ASSERT_TRUE(latch_wait(&started, 3, test_ms(5000)));
    ctx_cancel(parent, -EHOSTDOWN);
    CU_ASSERT_EQUAL(eg_wait(g), -EHOSTDOWN);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -EHOSTDOWN);
    eg_free(g);

    g = eg_new(parent, p); /* parent already done */
    atomic_long n = 0;
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -EHOSTDOWN);
    eg_go(g, count_fn, &n);
    CU_ASSERT_EQUAL(eg_wait(g), -EHOSTDOWN);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    eg_free(g);
    latch_destroy(&started);
    ctx_free(parent);
    pool_free(p);
    CHECK_BASELINE();
}

/* Seed: fetch-all. Each "fetch" waits (like a transfer in flight) until the group's ctx is done
 * or its own 10 s elapse; one fails. The first error cancels the rest, they stop promptly, and
 * the fetches that had not started never start. */
#define FETCHES 24

struct fetch_all {
    struct latch started;    /* fetches running */
    atomic_int ran;          /* fetches that ran at all */
    atomic_int saw_cause;    /* fetches that ended because the ctx was canceled with -EIO */
    atomic_int timed_out;    /* fetches that waited their whole 10 s (must be 0) */
    int64_t canceled_at;     /* when the failing fetch failed */
    atomic_llong latest_end; /* the latest end among the waiting fetches */
};

struct fetch_arg {
    struct fetch_all *fa;
    int id;
};

static int fetch_fn(struct ctx *c, void *arg)
{
    struct fetch_arg *a = arg;
    struct fetch_all *fa = a->fa;
    atomic_fetch_add(&fa->ran, 1);
    latch_add(&fa->started, 1);
    if (a->id == 5) {
        latch_wait(&fa->started, 6, test_ms(10000)); /* fail once several are in flight */
        fa->canceled_at = ctx_now();
        return -EIO;
    }
    int rc = ctx_wait(c, ctx_now() + test_ms(10000));
    int64_t now = ctx_now();
    long long prev = atomic_load(&fa->latest_end);
    while (now > prev && !atomic_compare_exchange_weak(&fa->latest_end, &prev, now))
        ;
    if (rc == 0) {
        atomic_fetch_add(&fa->timed_out, 1);
        return 0;
    }
    if (rc == -EIO)
        atomic_fetch_add(&fa->saw_cause, 1);
    return rc;
}

static void test_eg_seed_fetch_all_first_error_cancels_rest(void)
{
    struct pool *p = pool_new(8, FETCHES);
    struct eg *g = eg_new(ctx_background(), p);
    CU_ASSERT_FATAL(p && g);
    eg_set_limit(g, 8);
    struct fetch_all fa = {0};
    latch_init(&fa.started);
    struct fetch_arg args[FETCHES];
    int refused = 0;
    for (int i = 0; i < FETCHES; i++) {
        args[i] = (struct fetch_arg){&fa, i};
        int rc = eg_go(g, fetch_fn, &args[i]); /* blocks at the limit; stops once failed */
        if (rc != 0) {
            CU_ASSERT_EQUAL(rc, -EIO);
            refused++;
        }
    }
    CU_ASSERT_EQUAL(eg_wait(g), -EIO);
    int ran = atomic_load(&fa.ran);
    CU_ASSERT_TRUE(ran >= 6 && ran <= FETCHES);
    CU_ASSERT_EQUAL(atomic_load(&fa.timed_out), 0);
    CU_ASSERT_EQUAL(atomic_load(&fa.saw_cause), ran - 1); /* every other fetch saw the cause */
    CU_ASSERT_TRUE(atomic_load(&fa.latest_end) - fa.canceled_at < test_ms(5000)); /* promptly */
    CU_ASSERT_TRUE(refused > 0); /* the loop stopped submitting */
    latch_destroy(&fa.started);
    eg_free(g);
    pool_free(p);
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- async tasks */

/* An async harness: started tasks are recorded (index, thread) so the test can complete them
 * later from any thread; 'mode' picks what start does. */
enum { A_HOLD, A_FAIL, A_COMPLETE_OK, A_COMPLETE_FAIL, A_CTX_HOOK };

struct ahar;

struct atask {
    struct ahar *h;
    int idx;
    int mode;
    struct ctx_hook hook; /* A_CTX_HOOK: completes the task when the group's ctx is done */
    struct eg *g;
    atomic_int started;
    pthread_t tid;
};

struct ahar {
    atomic_int starts;    /* start calls */
    atomic_int order_bad; /* a task started before an earlier-queued one */
    atomic_int last_idx;  /* index of the last started task */
    atomic_int running, max;
    struct latch done; /* bumped by the done callback */
    atomic_int done_calls;
    int done_err;
    pthread_t done_tid;
    bool free_in_done; /* done callback frees the group */
    struct eg *g;
    atomic_int done_saw_ctx; /* ctx_err of the group's ctx inside the callback */
};

static void ahar_init(struct ahar *h)
{
    *h = (struct ahar){0};
    atomic_store(&h->last_idx, -1);
    latch_init(&h->done);
}

static void atask_hook_fn(void *arg)
{
    struct atask *t = arg;
    atomic_fetch_sub(&t->h->running, 1);
    eg_complete(t->g, ctx_err(eg_ctx(t->g)));
}

static int astart(struct eg *g, struct ctx *c, void *arg)
{
    struct atask *t = arg;
    struct ahar *h = t->h;
    atomic_fetch_add(&h->starts, 1);
    atomic_store(&t->started, 1);
    t->tid = pthread_self();
    t->g = g;
    int prev = atomic_exchange(&h->last_idx, t->idx);
    if (prev > t->idx)
        atomic_store(&h->order_bad, 1);
    max_update(&h->max, atomic_fetch_add(&h->running, 1) + 1);
    switch (t->mode) {
    case A_FAIL:
        atomic_fetch_sub(&h->running, 1);
        return -EIO;
    case A_COMPLETE_OK:
        atomic_fetch_sub(&h->running, 1);
        eg_complete(g, 0);
        return 0;
    case A_COMPLETE_FAIL:
        atomic_fetch_sub(&h->running, 1);
        eg_complete(g, -EIO);
        return 0;
    case A_CTX_HOOK:
        if (ctx_err(c)) {
            atomic_fetch_sub(&h->running, 1);
            return ctx_err(c);
        }
        ctx_hook_add(c, &t->hook, atask_hook_fn, t);
        return 0;
    default:
        return 0;
    }
}

/* Completes a held task (not from inside its start). */
static void atask_complete(struct atask *t, int rc)
{
    atomic_fetch_sub(&t->h->running, 1);
    eg_complete(t->g, rc);
}

static void adone(void *arg, int err)
{
    struct ahar *h = arg;
    h->done_err = err;
    h->done_tid = pthread_self();
    atomic_store(&h->done_saw_ctx, ctx_err(eg_ctx(h->g)));
    atomic_fetch_add(&h->done_calls, 1);
    if (h->free_in_done)
        eg_free(h->g);
    latch_add(&h->done, 1);
}

static struct atask *atasks(struct ahar *h, int n, int mode)
{
    struct atask *t = calloc((size_t)n, sizeof(*t));
    for (int i = 0; t && i < n; i++) {
        t[i].h = h;
        t[i].idx = i;
        t[i].mode = mode;
    }
    return t;
}

static void test_eg_async_no_limit_and_wait(void)
{
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), NULL);
    struct atask *t = atasks(&h, 10, A_HOLD);
    CU_ASSERT_FATAL(g && t);
    h.g = g;
    for (int i = 0; i < 10; i++)
        CU_ASSERT_EQUAL(eg_go_async(g, astart, &t[i]), 0);
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 10); /* no limit: all started at once */
    CU_ASSERT_EQUAL(eg_go_async(g, NULL, NULL), -EINVAL);
    for (int i = 0; i < 10; i++)
        atask_complete(&t[i], 0);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(eg_go_async(g, astart, &t[0]), -EINVAL); /* not after eg_wait */
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 10);
    eg_free(g);
    free(t);
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

static void test_eg_async_wait_with_no_tasks(void)
{
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(g);
    h.g = g;
    eg_wait_async(g, adone, &h);
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 1); /* at once, on this thread */
    CU_ASSERT_TRUE(pthread_equal(h.done_tid, pthread_self()));
    CU_ASSERT_EQUAL(h.done_err, 0);
    CU_ASSERT_EQUAL(atomic_load(&h.done_saw_ctx), -ECANCELED); /* ctx canceled before done */
    CU_ASSERT_EQUAL(eg_go_async(g, astart, NULL), -EINVAL);    /* not after eg_wait_async */
    eg_free(g);

    /* The callback may free the group, even when it runs inside eg_wait_async. */
    ahar_init(&h);
    h.g = eg_new(ctx_background(), NULL);
    h.free_in_done = true;
    eg_wait_async(h.g, adone, &h);
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 1);
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

/* A thread that completes one held task and records which task it then saw start. */
struct completer {
    struct atask *t;
    int rc;
};

static void *completer_main(void *arg)
{
    struct completer *k = arg;
    atask_complete(k->t, k->rc);
    return NULL;
}

static void complete_on_thread(struct atask *t, int rc, pthread_t *tid)
{
    struct completer k = {t, rc};
    pthread_create(tid, NULL, completer_main, &k);
    pthread_join(*tid, NULL);
}

/* With limit 2: two start, the rest queue; each completion on another thread hands its slot to
 * the next queued task, in order, on that thread; the done callback runs once, on the thread
 * that completed the last task, and may free the group. */
static void test_eg_async_limit_queues_and_hands_slots(void)
{
    enum { N = 10 };
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), NULL);
    struct atask *t = atasks(&h, N, A_HOLD);
    CU_ASSERT_FATAL(g && t);
    h.g = g;
    h.free_in_done = true;
    eg_set_limit(g, 2);
    for (int i = 0; i < N; i++)
        CU_ASSERT_EQUAL(eg_go_async(g, astart, &t[i]), 0);
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 2);
    CU_ASSERT_TRUE(atomic_load(&t[0].started) && atomic_load(&t[1].started));
    CU_ASSERT_FALSE(atomic_load(&t[2].started));
    int wrong_thread = 0, wrong_count = 0;
    for (int i = 0; i < N; i++) {
        pthread_t tid;
        if (i == N - 2)
            eg_wait_async(g, adone, &h); /* sealed while 2 still run */
        complete_on_thread(&t[i], 0, &tid);
        int want = i + 2 < N ? i + 3 : N;
        wrong_count += atomic_load(&h.starts) != want;
        if (i + 2 < N)
            wrong_thread += !pthread_equal(t[i + 2].tid, tid);
        else if (i == N - 1)
            wrong_thread += !pthread_equal(h.done_tid, tid);
    }
    CU_ASSERT_EQUAL(wrong_count, 0);
    CU_ASSERT_EQUAL(wrong_thread, 0);
    CU_ASSERT_EQUAL(atomic_load(&h.order_bad), 0);
    CU_ASSERT_TRUE(atomic_load(&h.max) <= 2);
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 1);
    CU_ASSERT_EQUAL(h.done_err, 0);
    free(t); /* the group was freed by the callback */
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

/* A start that fails synchronously completes its task with that error at once. */
static void test_eg_async_start_fails_synchronously(void)
{
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), NULL);
    struct atask *t = atasks(&h, 3, A_FAIL);
    CU_ASSERT_FATAL(g && t);
    h.g = g;
    CU_ASSERT_EQUAL(eg_go_async(g, astart, &t[0]), -EIO); /* added, and failed at once */
    CU_ASSERT_EQUAL(eg_err(g), -EIO);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -EIO);
    CU_ASSERT_EQUAL(eg_go_async(g, astart, &t[1]), -EIO); /* start not called */
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 1);
    eg_wait_async(g, adone, &h);
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 1);
    CU_ASSERT_EQUAL(h.done_err, -EIO);
    CU_ASSERT_EQUAL(atomic_load(&h.done_saw_ctx), -EIO);
    eg_free(g);
    free(t);
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

/* The first error drops the queued tasks: their start is never called. */
static void test_eg_async_first_error_drops_queued(void)
{
    enum { N = 10 };
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), NULL);
    struct atask *t = atasks(&h, N, A_HOLD);
    CU_ASSERT_FATAL(g && t);
    h.g = g;
    eg_set_limit(g, 2);
    for (int i = 0; i < N; i++)
        eg_go_async(g, astart, &t[i]);
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 2);
    pthread_t tid;
    complete_on_thread(&t[0], -EPROTO, &tid);
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 2); /* nothing more started */
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -EPROTO);
    CU_ASSERT_EQUAL(eg_go_async(g, astart, &t[0]), -EPROTO);
    eg_wait_async(g, adone, &h);
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 0); /* t[1] still runs */
    atask_complete(&t[1], 0);
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 1);
    CU_ASSERT_EQUAL(h.done_err, -EPROTO);
    for (int i = 2; i < N; i++)
        CU_ASSERT_FALSE(atomic_load(&t[i].started));
    eg_free(g);
    free(t);
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

/* 100,000 queued tasks behind held tasks (limit 1 or more), all completing synchronously inside
 * their start, or all failing: completing a held task must run them all (or stop at the first
 * failure) in a loop, not by recursion. It runs on a thread with a 256 KiB stack, so a recursion
 * per task overflows it whatever the frame sizes; the thread records, the test asserts. */
#define MANY_ASYNC 100000

struct many {
    int mode, limit;                    /* in */
    bool alloc_ok;                      /* out: everything below is valid */
    int refused, starts_before, starts; /* eg_go_async failures, starts before/after */
    int done_calls, done_err, order_bad;
};

static void *many_main(void *arg)
{
    struct many *m = arg;
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), NULL);
    struct atask *held = atasks(&h, m->limit, A_HOLD);
    struct atask *t = atasks(&h, MANY_ASYNC, m->mode);
    m->alloc_ok = g && t && held;
    if (m->alloc_ok) {
        h.g = g;
        eg_set_limit(g, m->limit);
        for (int i = 0; i < m->limit; i++)
            eg_go_async(g, astart, &held[i]);
        for (int i = 0; i < MANY_ASYNC; i++) {
            t[i].idx = i + m->limit;
            m->refused += eg_go_async(g, astart, &t[i]) != 0;
        }
        m->starts_before = atomic_load(&h.starts);
        eg_wait_async(g, adone, &h);
        for (int i = 0; i < m->limit; i++) /* the first runs the whole queue on this stack */
            atask_complete(&held[i], 0);
        m->starts = atomic_load(&h.starts);
        m->done_calls = atomic_load(&h.done_calls);
        m->done_err = h.done_err;
        m->order_bad = atomic_load(&h.order_bad);
    }
    eg_free(g);
    free(t);
    free(held);
    latch_destroy(&h.done);
    return NULL;
}

static void many_sync(int mode, int limit)
{
    struct many m = {.mode = mode, .limit = limit};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t t;
    int rc = pthread_create(&t, &attr, many_main, &m);
    pthread_attr_destroy(&attr);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    pthread_join(t, NULL);
    CU_ASSERT_TRUE_FATAL(m.alloc_ok);
    CU_ASSERT_EQUAL(m.refused, 0);
    CU_ASSERT_EQUAL(m.starts_before, limit);
    CU_ASSERT_EQUAL(m.done_calls, 1);
    if (mode == A_COMPLETE_OK) {
        CU_ASSERT_EQUAL(m.starts, MANY_ASYNC + limit);
        CU_ASSERT_EQUAL(m.done_err, 0);
    } else {
        CU_ASSERT_EQUAL(m.starts, limit + 1); /* the first failure drops the rest */
        CU_ASSERT_EQUAL(m.done_err, -EIO);
    }
    CU_ASSERT_EQUAL(m.order_bad, 0);
}

static void test_eg_async_100000_complete_synchronously(void)
{
    many_sync(A_COMPLETE_OK, 1);
    many_sync(A_COMPLETE_OK, 3);
    CHECK_BASELINE();
}

static void test_eg_async_100000_fail_synchronously(void)
{
    many_sync(A_FAIL, 1);
    many_sync(A_COMPLETE_FAIL, 1);
    many_sync(A_FAIL, 4);
    CHECK_BASELINE();
}

/* The parent's cancel reaches async tasks: running ones (hooked on the group's ctx, like a
 * transfer) complete with the cause; queued ones see a done ctx when they start, fail at once,
 * and the rest are dropped. */
static void test_eg_async_parent_cancel_propagates(void)
{
    enum { N = 8 };
    struct ahar h;
    ahar_init(&h);
    struct ctx *parent = ctx_new(ctx_background(), CTX_FOREVER);
    struct eg *g = eg_new(parent, NULL);
    struct atask *t = atasks(&h, N, A_CTX_HOOK);
    CU_ASSERT_FATAL(parent && g && t);
    h.g = g;
    eg_set_limit(g, 2);
    for (int i = 0; i < N; i++)
        eg_go_async(g, astart, &t[i]);
    eg_wait_async(g, adone, &h);
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 2);
    ctx_cancel(parent, -ECONNRESET); /* hooks complete t0, t1 on this thread */
    CU_ASSERT_EQUAL(atomic_load(&h.done_calls), 1);
    CU_ASSERT_EQUAL(h.done_err, -ECONNRESET);
    CU_ASSERT_EQUAL(ctx_err(eg_ctx(g)), -ECONNRESET);
    CU_ASSERT_TRUE(atomic_load(&h.starts) <= 3); /* at most one queued task saw the done ctx */
    for (int i = 0; i < 2; i++)
        CU_ASSERT_FALSE(ctx_hook_remove(eg_ctx(g), &t[i].hook));
    eg_free(g);
    ctx_free(parent);
    free(t);
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

/* Thread tasks and async tasks share one limit. */
static void test_eg_mixed_share_limit(void)
{
    struct pool *p = pool_new(2, 4);
    struct ahar h;
    ahar_init(&h);
    struct eg *g = eg_new(ctx_background(), p);
    struct atask *t = atasks(&h, 2, A_HOLD);
    CU_ASSERT_FATAL(p && g && t);
    h.g = g;
    eg_set_limit(g, 2);
    struct gate gt;
    gate_init(&gt);
    atomic_long n = 0;
    eg_go_async(g, astart, &t[0]);               /* slot 1 */
    CU_ASSERT_TRUE(eg_try_go(g, gate_fn, &gt));  /* slot 2 */
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n)); /* full */
    eg_go_async(g, astart, &t[1]);               /* queued */
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 1);
    CU_ASSERT_TRUE(latch_wait(&gt.entered, 1, test_ms(5000)));
    atask_complete(&t[0], 0); /* its slot goes to the queued async task */
    CU_ASSERT_EQUAL(atomic_load(&h.starts), 2);
    CU_ASSERT_FALSE(eg_try_go(g, count_fn, &n));
    latch_add(&gt.open, 1);
    atask_complete(&t[1], 0);
    CU_ASSERT_EQUAL(eg_wait(g), 0);
    CU_ASSERT_EQUAL(atomic_load(&n), 0);
    gate_destroy(&gt);
    eg_free(g);
    pool_free(p);
    free(t);
    latch_destroy(&h.done);
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- races */

/* Sync race: per round a group with a random limit, two submitter threads eg_go'ing tasks that
 * may fail, spawn a child with eg_try_go (racing with eg_wait's seal) or wait on the ctx; then
 * eg_wait and eg_free at once. Invariants: concurrency within the limit; the result is 0 exactly
 * when no task failed, else one of the failures that ran. */
struct sr_round;

struct sr_arg {
    struct sr_round *r;
    int kind; /* 0 ok, 1 fail, 2 spawn a child with eg_try_go, 3 wait briefly on ctx */
    int code; /* kind 1: returns -(200 + code) */
};

struct sr_round {
    struct eg *g;
    int limit;
    atomic_int running, max;
    atomic_int ran, failed;
    atomic_int fail_mask; /* bit i: error -(200+i) was returned */
    struct sr_arg plain;  /* the children's argument: kind 0 */
};

static int sr_fn(struct ctx *c, void *arg)
{
    struct sr_arg *a = arg;
    struct sr_round *r = a->r;
    int now = atomic_fetch_add(&r->running, 1) + 1;
    if (r->limit > 0)
        max_update(&r->max, now);
    atomic_fetch_add(&r->ran, 1);
    int rc = 0;
    switch (a->kind) {
    case 1:
        rc = -(200 + a->code);
        atomic_fetch_or(&r->fail_mask, 1 << a->code);
        atomic_fetch_add(&r->failed, 1);
        break;
    case 2: /* legal while this task runs, even if eg_wait has begun */
        eg_try_go(r->g, sr_fn, &r->plain);
        break;
    case 3:
        ctx_wait(c, ctx_now() + 1);
        break;
    }
    atomic_fetch_sub(&r->running, 1);
    return rc;
}

struct sr_sub {
    struct sr_round **r;
    struct sr_arg *args; /* 20 per submitter, owned by the test */
    pthread_barrier_t *bar;
    int rounds;
    uint64_t seed;
};

#define SR_PER 20

static void *sr_sub_main(void *arg)
{
    struct sr_sub *s = arg;
    for (int i = 0; i < s->rounds; i++) {
        pthread_barrier_wait(s->bar);
        struct sr_round *r = *s->r;
        for (int j = 0; j < SR_PER; j++) {
            uint64_t x = rng_next(&s->seed) % 100;
            s->args[j] = (struct sr_arg){r,
                                         x < 3    ? 1
                                         : x < 20 ? 2
                                         : x < 23 ? 3
                                                  : 0,
                                         (int)(rng_next(&s->seed) % 8)};
            int rc = eg_go(r->g, sr_fn, &s->args[j]);
            if (rc)
                break;
        }
        pthread_barrier_wait(s->bar);
    }
    return NULL;
}

static void test_eg_race_go_wait(void)
{
    int rounds = core_rounds(1500);
    struct pool *p = pool_new(4, 8);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 3);
    struct sr_round *cur = NULL;
    struct sr_arg args[2][SR_PER];
    struct sr_sub s[2];
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        s[i] = (struct sr_sub){&cur, args[i], &bar, rounds, 0xDEADBEEFULL * (uint64_t)(i + 1)};
        pthread_create(&t[i], NULL, sr_sub_main, &s[i]);
    }
    long over_limit = 0, bad_result = 0;
    for (int i = 0; i < rounds; i++) {
        struct sr_round *r = calloc(1, sizeof(*r));
        r->g = eg_new(ctx_background(), p);
        r->limit = i % 5 == 0 ? -1 : 1 + i % 4;
        r->plain = (struct sr_arg){r, 0, 0};
        eg_set_limit(r->g, r->limit);
        cur = r;
        pthread_barrier_wait(&bar);
        pthread_barrier_wait(&bar); /* submitters done */
        int rc = eg_wait(r->g);
        eg_free(r->g); /* at once: nothing may touch the group after eg_wait returned */
        if (rc == 0)
            bad_result += atomic_load(&r->failed) != 0;
        else
            bad_result +=
                rc > -200 || rc < -207 || !(atomic_load(&r->fail_mask) & (1 << (-rc - 200)));
        if (r->limit > 0)
            over_limit += atomic_load(&r->max) > r->limit;
        free(r);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&bar);
    pool_free(p);
    CU_ASSERT_EQUAL(over_limit, 0);
    CU_ASSERT_EQUAL(bad_result, 0);
    CHECK_BASELINE();
}

/* Async race: per round, tasks started with a random limit, each either completing later from
 * one of several completer threads (tokens through a channel), completing synchronously, or
 * failing synchronously; the round ends with eg_wait_async whose callback frees the group, or
 * with eg_wait and an immediate eg_free. Invariants: the callback runs exactly once; the limit
 * holds; the result is 0 exactly when no task failed. */
#define AR_COMPLETERS 4
#define AR_TASKS 64

struct ar_round;

struct ar_task {
    struct ar_round *r;
    int kind; /* 0 complete later ok, 1 later with error, 2 sync ok, 3 sync fail */
};

struct ar_round {
    struct eg *g;
    int limit;
    atomic_int running, max, failed;
    struct latch done;
    atomic_int done_calls;
    int err;
    struct ar_task tasks[AR_TASKS];
};

static struct chan *ar_tokens;

static int ar_start(struct eg *g, struct ctx *c, void *arg)
{
    struct ar_task *t = arg;
    struct ar_round *r = t->r;
    (void)c;
    max_update(&r->max, atomic_fetch_add(&r->running, 1) + 1);
    switch (t->kind) {
    case 2:
        atomic_fetch_sub(&r->running, 1);
        eg_complete(g, 0);
        return 0;
    case 3:
        atomic_fetch_add(&r->failed, 1);
        atomic_fetch_sub(&r->running, 1);
        return -EIO;
    default:
        chan_send(ar_tokens, t, NULL); /* room for every task: never blocks */
        return 0;
    }
}

static void *ar_completer_main(void *arg)
{
    (void)arg;
    void *it;
    while (chan_recv(ar_tokens, &it, NULL) == 0) {
        struct ar_task *t = it;
        struct ar_round *r = t->r;
        struct eg *g = r->g; /* read before the slot frees: the group may end and go */
        if (t->kind == 1)
            atomic_fetch_add(&r->failed, 1);
        atomic_fetch_sub(&r->running, 1);
        eg_complete(g, t->kind == 1 ? -EPIPE : 0);
    }
    return NULL;
}

static void ar_done(void *arg, int err)
{
    struct ar_round *r = arg;
    r->err = err;
    atomic_fetch_add(&r->done_calls, 1);
    eg_free(r->g);
    latch_add(&r->done, 1);
}

static void test_eg_race_async_complete_many_threads(void)
{
    int rounds = core_rounds(3000);
    ar_tokens = chan_new(AR_TASKS * 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ar_tokens);
    pthread_t t[AR_COMPLETERS];
    for (int i = 0; i < AR_COMPLETERS; i++)
        pthread_create(&t[i], NULL, ar_completer_main, NULL);
    uint64_t seed = 0x1234567ULL;
    long bad = 0;
    for (int i = 0; i < rounds; i++) {
        struct ar_round *r = calloc(1, sizeof(*r));
        latch_init(&r->done);
        r->g = eg_new(ctx_background(), NULL);
        r->limit = i % 7 == 0 ? -1 : 1 + i % 6;
        eg_set_limit(r->g, r->limit);
        bool fails = i % 3 == 0;
        for (int j = 0; j < AR_TASKS; j++) {
            uint64_t x = rng_next(&seed) % 100;
            int kind = x < 60 ? 0 : x < 90 ? 2 : 1;
            if (kind == 1 && fails && x % 2)
                kind = 3;
            if (!fails && (kind == 1 || kind == 3))
                kind = 0;
            r->tasks[j] = (struct ar_task){r, kind};
            if (eg_go_async(r->g, ar_start, &r->tasks[j]) != 0)
                break; /* the group failed: stop adding, like the server's loop */
        }
        int err;
        if (i % 2) {
            eg_wait_async(r->g, ar_done, r);
            latch_wait(&r->done, 1, -1);
            err = r->err;
            bad += atomic_load(&r->done_calls) != 1;
        } else {
            err = eg_wait(r->g);
            eg_free(r->g);
        }
        bad += (err != 0) != (atomic_load(&r->failed) != 0);
        if (r->limit > 0)
            bad += atomic_load(&r->max) > r->limit;
        latch_destroy(&r->done);
        free(r);
    }
    chan_close(ar_tokens);
    for (int i = 0; i < AR_COMPLETERS; i++)
        pthread_join(t[i], NULL);
    chan_free(ar_tokens);
    CU_ASSERT_EQUAL(bad, 0);
    CHECK_BASELINE();
}

static CU_TestInfo eg_tests[] = {
    {"all tasks ok: eg_wait 0, ctx canceled", test_eg_all_ok},
    {"eg_wait with no tasks cancels ctx", test_eg_wait_with_no_tasks_cancels_ctx},
    {"no pool: eg_go -EINVAL", test_eg_without_pool},
    {"first error cancels ctx and is the result", test_eg_first_error_cancels_and_wins},
    {"eg_go after failure returns the error", test_eg_go_after_failure},
    {"unstarted tasks skipped after failure", test_eg_unstarted_tasks_skipped_after_failure},
    {"seed: limit caps concurrency (capped pool)", test_eg_limit_caps_concurrency},
    {"eg_go blocks at the limit", test_eg_go_blocks_at_limit},
    {"eg_try_go: limit, full pool, failed", test_eg_try_go},
    {"parent cancel propagates", test_eg_parent_cancel_propagates},
    {"seed: fetch-all, first error cancels the rest",
     test_eg_seed_fetch_all_first_error_cancels_rest},
    {"async: no limit, eg_wait", test_eg_async_no_limit_and_wait},
    {"async: eg_wait_async with no tasks", test_eg_async_wait_with_no_tasks},
    {"async: limit queues, slots handed over", test_eg_async_limit_queues_and_hands_slots},
    {"async: start fails synchronously", test_eg_async_start_fails_synchronously},
    {"async: first error drops queued tasks", test_eg_async_first_error_drops_queued},
    {"async: 100,000 complete synchronously", test_eg_async_100000_complete_synchronously},
    {"async: 100,000 fail synchronously", test_eg_async_100000_fail_synchronously},
    {"async: parent cancel propagates", test_eg_async_parent_cancel_propagates},
    {"thread and async tasks share the limit", test_eg_mixed_share_limit},
    {"race: eg_go / eg_wait / eg_free", test_eg_race_go_wait},
    {"race: eg_complete from many threads", test_eg_race_async_complete_many_threads},
    CU_TEST_INFO_NULL,
};
TEST_SUITE_INIT(eg, eg_tests, suite_init, NULL)
