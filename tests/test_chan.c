/* Tests for pool/chan: FIFO order, capacity, try_send, close semantics for blocked senders and
 * receivers, ctx cancellation and deadlines waking blocked calls, MPMC delivery exactly once,
 * the seed "workers exit on ctx done or channel close" pattern, and many-round races for
 * `make tsan`. Threads record what they see; the test's thread asserts after joining them. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "ctx/ctx.h"
#include "pool/chan.h"
#include "tests/core_util.h"
#include "tests/support.h"

static struct baseline base;

static int suite_init(void)
{
    base = baseline_take();
    return 0;
}

#define CHECK_BASELINE() CU_ASSERT_TRUE(baseline_back(base))

/* Items are small integers carried in the pointer. */
#define ITEM(i) ((void *)(uintptr_t)(i))
#define VAL(p) ((uintptr_t)(p))

static void test_chan_cap_zero_is_null(void)
{
    CU_ASSERT_PTR_NULL(chan_new(0));
    struct chan *ch = chan_new(1);
    CU_ASSERT_PTR_NOT_NULL(ch);
    chan_free(ch);
    chan_free(NULL);
}

static void test_chan_fifo_and_wraparound(void)
{
    struct chan *ch = chan_new(5);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ch);
    uintptr_t next_in = 1, next_out = 1;
    int bad = 0;
    for (int round = 0; round < 50; round++) { /* fill to varying depths: the ring wraps */
        int k = 1 + round % 5;
        for (int i = 0; i < k; i++)
            bad += chan_send(ch, ITEM(next_in++), NULL) != 0;
        bad += chan_len(ch) != (size_t)k;
        for (int i = 0; i < k; i++) {
            void *it = NULL;
            bad += chan_recv(ch, &it, NULL) != 0;
            bad += VAL(it) != next_out++;
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(chan_len(ch), 0);
    void *n = ITEM(1);
    CU_ASSERT_EQUAL(chan_send(ch, NULL, ctx_background()), 0); /* NULL is an item like any */
    CU_ASSERT_EQUAL(chan_recv(ch, &n, ctx_background()), 0);
    CU_ASSERT_PTR_NULL(n);
    chan_free(ch);
}

static void test_chan_capacity_try_send(void)
{
    struct chan *ch = chan_new(3);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ch);
    for (int i = 0; i < 3; i++)
        CU_ASSERT_EQUAL(chan_try_send(ch, ITEM(i)), 0);
    CU_ASSERT_EQUAL(chan_len(ch), 3);
    CU_ASSERT_EQUAL(chan_try_send(ch, ITEM(9)), -EAGAIN);
    CU_ASSERT_EQUAL(chan_len(ch), 3);
    void *it;
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0);
    CU_ASSERT_EQUAL(VAL(it), 0);
    CU_ASSERT_EQUAL(chan_try_send(ch, ITEM(3)), 0);
    CU_ASSERT_EQUAL(chan_try_send(ch, ITEM(4)), -EAGAIN);
    /* A send with a ctx that is already done fails with its cause even with room. */
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    ctx_cancel(c, -EIO);
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(5), c), -EIO);
    CU_ASSERT_EQUAL(chan_recv(ch, &it, c), -EIO);
    CU_ASSERT_EQUAL(chan_len(ch), 2);
    for (uintptr_t want = 2; want <= 3; want++) {
        CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0);
        CU_ASSERT_EQUAL(VAL(it), want);
    }
    ctx_free(c);
    chan_free(ch);
    CHECK_BASELINE();
}

static void test_chan_close_semantics(void)
{
    struct chan *ch = chan_new(4);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ch);
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(1), NULL), 0);
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(2), NULL), 0);
    chan_close(ch);
    chan_close(ch); /* idempotent */
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(3), NULL), -EPIPE);
    CU_ASSERT_EQUAL(chan_try_send(ch, ITEM(3)), -EPIPE);
    void *it = NULL;
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0); /* drains first */
    CU_ASSERT_EQUAL(VAL(it), 1);
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0);
    CU_ASSERT_EQUAL(VAL(it), 2);
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), -EPIPE);
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), -EPIPE);
    /* Closed wins over a done ctx for senders: the channel state is the answer. */
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    ctx_cancel(c, -EIO);
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(3), c), -EPIPE);
    ctx_free(c);
    chan_free(ch);
    CHECK_BASELINE();
}

/* A thread that sends or receives once and records the result. */
struct op {
    struct chan *ch;  /* the channel */
    struct ctx *c;    /* passed to the call (may be NULL) */
    bool recv;        /* recv instead of send */
    void *item;       /* sent, or received */
    int rc;           /* the result */
    int64_t at;       /* when the call returned */
    struct latch *go; /* bumped just before the call */
};

static void *op_main(void *arg)
{
    struct op *o = arg;
    latch_add(o->go, 1);
    o->rc = o->recv ? chan_recv(o->ch, &o->item, o->c) : chan_send(o->ch, o->item, o->c);
    o->at = ctx_now();
    return NULL;
}

/* Gives started threads a chance to reach their blocking call. Correctness never depends on it
 * (the results are the same either way); it only makes the blocked path the one usually run. */
static void let_block(void)
{
    for (int i = 0; i < 50; i++)
        sched_yield();
}

#define NOPS 6

/* Starts n threads doing one send or recv each with ctx 'c' (only every other one when 'mixed';
 * the rest pass NULL), and returns once they are about to block. */
static void start_ops(struct op *o, pthread_t *t, int n, struct chan *ch, struct ctx *c, bool recv,
                      bool mixed, struct latch *go)
{
    long base_n = latch_get(go);
    for (int i = 0; i < n; i++) {
        o[i] = (struct op){.ch = ch,
                           .c = mixed && i % 2 == 0 ? NULL : c,
                           .recv = recv,
                           .item = ITEM(100 + i),
                           .go = go};
        pthread_create(&t[i], NULL, op_main, &o[i]);
    }
    latch_wait(go, base_n + n, test_ms(5000));
    let_block();
}

static void test_chan_close_wakes_blocked_senders(void)
{
    struct chan *ch = chan_new(2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ch);
    chan_send(ch, ITEM(1), NULL);
    chan_send(ch, ITEM(2), NULL);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    struct latch go;
    latch_init(&go);
    struct op o[NOPS];
    pthread_t t[NOPS];
    start_ops(o, t, NOPS, ch, c, false, true, &go); /* half with a ctx, half without */
    chan_close(ch);
    for (int i = 0; i < NOPS; i++) {
        pthread_join(t[i], NULL);
        CU_ASSERT_EQUAL(o[i].rc, -EPIPE);
    }
    void *it;
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0);
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), 0);
    CU_ASSERT_EQUAL(chan_recv(ch, &it, NULL), -EPIPE);
    chan_free(ch);
    ctx_cancel(c, -EIO); /* the senders' hooks are gone: this must not touch the freed chan */
    ctx_free(c);
    latch_destroy(&go);
    CHECK_BASELINE();
}

static void test_chan_close_wakes_blocked_receivers(void)
{
    struct chan *ch = chan_new(8);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ch);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    struct latch go;
    latch_init(&go);
    struct op o[NOPS];
    pthread_t t[NOPS];
    start_ops(o, t, NOPS, ch, c, true, true, &go);
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(7), NULL), 0);
    CU_ASSERT_EQUAL(chan_send(ch, ITEM(8), NULL), 0);
    chan_close(ch);
    int got = 0, pipe = 0;
    uintptr_t sum = 0;
    for (int i = 0; i < NOPS; i++) {
        pthread_join(t[i], NULL);
        if (o[i].rc == 0) {
            got++;
            sum += VAL(o[i].item);
        } else {
            pipe += o[i].rc == -EPIPE;
        }
    }
    CU_ASSERT_EQUAL(got, 2); /* the two items were drained ... */
    CU_ASSERT_EQUAL(sum, 15);
    CU_ASSERT_EQUAL(pipe, NOPS - 2); /* ... then everyone else saw the close */
    chan_free(ch);
    ctx_cancel(c, -EIO);
    ctx_free(c);
    latch_destroy(&go);
    CHECK_BASELINE();
}

/* Cancel wakes blocked sends and receives with the cause; a deadline with -ETIMEDOUT, not before
 * it. The channel is untouched by the failed calls. */
static void test_chan_ctx_wakes_blocked_calls(void)
{
    struct chan *full = chan_new(1);
    struct chan *empty = chan_new(1);
    CU_ASSERT_FATAL(full && empty);
    chan_send(full, ITEM(1), NULL);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    struct latch go;
    latch_init(&go);
    struct op s[3], r[3];
    pthread_t ts[3], tr[3];
    start_ops(s, ts, 3, full, c, false, false, &go);
    start_ops(r, tr, 3, empty, c, true, false, &go);
    ctx_cancel(c, -EIO);
    for (int i = 0; i < 3; i++) {
        pthread_join(ts[i], NULL);
        pthread_join(tr[i], NULL);
        CU_ASSERT_EQUAL(s[i].rc, -EIO);
        CU_ASSERT_EQUAL(r[i].rc, -EIO);
    }
    CU_ASSERT_EQUAL(chan_len(full), 1);
    CU_ASSERT_EQUAL(chan_len(empty), 0);
    ctx_free(c);

    /* Deadlines: nobody cancels; the timer thread does. */
    struct ctx *d = ctx_with_timeout(ctx_background(), 40);
    start_ops(s, ts, 2, full, d, false, false, &go);
    start_ops(r, tr, 2, empty, d, true, false, &go);
    for (int i = 0; i < 2; i++) {
        pthread_join(ts[i], NULL);
        pthread_join(tr[i], NULL);
        CU_ASSERT_EQUAL(s[i].rc, -ETIMEDOUT);
        CU_ASSERT_EQUAL(r[i].rc, -ETIMEDOUT);
        CU_ASSERT_TRUE(s[i].at >= ctx_deadline(d));
        CU_ASSERT_TRUE(r[i].at >= ctx_deadline(d));
        CU_ASSERT_TRUE(s[i].at <= ctx_deadline(d) + test_ms(2000));
    }
    ctx_free(d);
    /* Same thread, no helper: a deadline ends a blocked recv. */
    d = ctx_with_timeout(ctx_background(), 20);
    void *it;
    CU_ASSERT_EQUAL(chan_recv(empty, &it, d), -ETIMEDOUT);
    CU_ASSERT_TRUE(ctx_now() >= ctx_deadline(d));
    ctx_free(d);
    chan_free(full);
    chan_free(empty);
    latch_destroy(&go);
    CHECK_BASELINE();
}

/* P producers and C consumers on a small channel: every item arrives exactly once, and each
 * consumer sees each producer's items in the order they were sent. */
#define MP_PROD 4
#define MP_CONS 4
#define MP_ITEMS 20000

struct mp {
    struct chan *ch;
    int id;           /* producer id */
    atomic_int *seen; /* per item: times received */
    long order_bad;   /* consumer: per-producer order violations */
    long got;         /* consumer: items received */
};

static void *mp_prod(void *arg)
{
    struct mp *m = arg;
    for (int i = 0; i < MP_ITEMS; i++)
        chan_send(m->ch, ITEM((uintptr_t)m->id * MP_ITEMS + (uintptr_t)i + 1), NULL);
    return NULL;
}

static void *mp_cons(void *arg)
{
    struct mp *m = arg;
    long last[MP_PROD];
    for (int i = 0; i < MP_PROD; i++)
        last[i] = -1;
    void *it;
    while (chan_recv(m->ch, &it, NULL) == 0) {
        long v = (long)VAL(it) - 1;
        int p = (int)(v / MP_ITEMS);
        long seq = v % MP_ITEMS;
        m->order_bad += seq <= last[p];
        last[p] = seq;
        atomic_fetch_add(&m->seen[v], 1);
        m->got++;
    }
    return NULL;
}

static void test_chan_mpmc_exactly_once_in_order(void)
{
    int items = MP_PROD * MP_ITEMS;
    atomic_int *seen = calloc((size_t)items, sizeof(*seen));
    struct chan *ch = chan_new(16);
    CU_ASSERT_FATAL(seen && ch);
    struct mp prod[MP_PROD], cons[MP_CONS];
    pthread_t tp[MP_PROD], tc[MP_CONS];
    for (int i = 0; i < MP_CONS; i++) {
        cons[i] = (struct mp){.ch = ch, .seen = seen};
        pthread_create(&tc[i], NULL, mp_cons, &cons[i]);
    }
    for (int i = 0; i < MP_PROD; i++) {
        prod[i] = (struct mp){.ch = ch, .id = i, .seen = seen};
        pthread_create(&tp[i], NULL, mp_prod, &prod[i]);
    }
    for (int i = 0; i < MP_PROD; i++)
        pthread_join(tp[i], NULL);
    chan_close(ch); /* consumers drain, then see -EPIPE */
    long got = 0, order_bad = 0;
    for (int i = 0; i < MP_CONS; i++) {
        pthread_join(tc[i], NULL);
        got += cons[i].got;
        order_bad += cons[i].order_bad;
    }
    int not_once = 0;
    for (int i = 0; i < items; i++)
        not_once += atomic_load(&seen[i]) != 1;
    CU_ASSERT_EQUAL(got, items);
    CU_ASSERT_EQUAL(not_once, 0);
    CU_ASSERT_EQUAL(order_bad, 0);
    chan_free(ch);
    free(seen);
    CHECK_BASELINE();
}

/* Seed: workers that exit on ctx done or on channel close, whichever comes first.
 *   for { select { case <-ctx.Done(): return ctx.Err(); case it, ok := <-ch: if !ok { return nil }
 * } } */
#define SEED_WORKERS 4

struct seed_worker {
    struct chan *ch;
    struct ctx *c;
    atomic_long *processed; /* shared count of items handled */
    int rc;                 /* why the worker ended: 0 (closed) or the ctx's cause */
};

static void *seed_worker_main(void *arg)
{
    struct seed_worker *w = arg;
    for (;;) {
        void *it;
        int rc = chan_recv(w->ch, &it, w->c);
        if (rc == -EPIPE) {
            w->rc = 0;
            return NULL;
        }
        if (rc != 0) {
            w->rc = rc;
            return NULL;
        }
        atomic_fetch_add(w->processed, (long)VAL(it));
    }
}

static void seed_workers(bool by_cancel)
{
    struct chan *ch = chan_new(4);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    atomic_long processed = 0;
    struct seed_worker w[SEED_WORKERS];
    pthread_t t[SEED_WORKERS];
    for (int i = 0; i < SEED_WORKERS; i++) {
        w[i] = (struct seed_worker){.ch = ch, .c = c, .processed = &processed, .rc = 1};
        pthread_create(&t[i], NULL, seed_worker_main, &w[i]);
    }
    int sent = 0;
    for (int i = 0; i < 1000; i++)
        sent += chan_send(ch, ITEM(1), c) == 0;
    CU_ASSERT_EQUAL(sent, 1000);
    if (by_cancel)
        ctx_cancel(c, -EIO); /* the channel stays open */
    else
        chan_close(ch); /* the ctx stays live */
    for (int i = 0; i < SEED_WORKERS; i++) {
        pthread_join(t[i], NULL);
        CU_ASSERT_EQUAL(w[i].rc, by_cancel ? -EIO : 0);
    }
    if (by_cancel) { /* what was not handled is still queued */
        CU_ASSERT_EQUAL(atomic_load(&processed) + (long)chan_len(ch), 1000);
    } else { /* close: everything sent was drained */
        CU_ASSERT_EQUAL(atomic_load(&processed), 1000);
    }
    CU_ASSERT_EQUAL(ctx_err(c), by_cancel ? -EIO : 0);
    ctx_free(c);
    chan_free(ch);
}

static void test_chan_seed_workers_exit_on_cancel(void)
{
    seed_workers(true);
    CHECK_BASELINE();
}

static void test_chan_seed_workers_exit_on_close(void)
{
    seed_workers(false);
    CHECK_BASELINE();
}

/* Race: per round, senders and receivers (some with a ctx, some with a tiny deadline) against a
 * closer and a canceler at random moments. Invariants: every item whose send returned 0 is
 * received exactly once or is still queued at the end; nothing else is ever received; every
 * failure is -EPIPE or a ctx's cause; every thread returns. */
#define RACE_SEND 3
#define RACE_RECV 3
#define RACE_PER 40

struct race {
    struct chan *ch;
    struct ctx *c;     /* shared ctx; canceled at a random moment */
    atomic_int *count; /* per item: +1 per successful send, -1 per receipt */
    pthread_barrier_t *bar;
    int role, id, rounds; /* role 0 send, 1 recv, 2 close, 3 cancel; id: index (senders:
                           * items id*RACE_PER..; odd ids use a tiny deadline) */
    uint64_t seed;
    long bad; /* unexpected results */
};

static void *race_main(void *arg)
{
    struct race *r = arg;
    for (int round = 0; round < r->rounds; round++) {
        pthread_barrier_wait(r->bar);
        struct ctx *mine = r->c;
        if (r->id % 2) /* some use a tiny deadline under the shared ctx */
            mine = ctx_with_timeout(r->c, (int64_t)(rng_next(&r->seed) % 3));
        switch (r->role) {
        case 0:
            for (int i = 0; i < RACE_PER; i++) {
                int item = r->id * RACE_PER + i;
                int rc = chan_send(r->ch, ITEM(item + 1), mine);
                if (rc == 0)
                    atomic_fetch_add(&r->count[item], 1);
                else
                    r->bad += rc != -EPIPE && rc != -EIO && rc != -ETIMEDOUT;
                if (rc)
                    break;
            }
            break;
        case 1:
            for (;;) {
                void *it;
                int rc = chan_recv(r->ch, &it, mine);
                if (rc == 0) {
                    atomic_fetch_sub(&r->count[VAL(it) - 1], 1);
                    continue;
                }
                r->bad += rc != -EPIPE && rc != -EIO && rc != -ETIMEDOUT;
                break;
            }
            break;
        case 2:
            spin((unsigned)(rng_next(&r->seed) % 20000));
            chan_close(r->ch);
            break;
        case 3:
            spin((unsigned)(rng_next(&r->seed) % 20000));
            ctx_cancel(r->c, -EIO);
            break;
        }
        if (mine != r->c)
            ctx_free(mine);
        pthread_barrier_wait(r->bar);
    }
    return NULL;
}

static void test_chan_race_send_recv_close_cancel(void)
{
    int rounds = core_rounds(3000);
    int nthreads = RACE_SEND + RACE_RECV + 2;
    int nitems = RACE_SEND * RACE_PER;
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)nthreads + 1);
    struct race r[RACE_SEND + RACE_RECV + 2];
    pthread_t t[RACE_SEND + RACE_RECV + 2];
    atomic_int *count = calloc((size_t)nitems, sizeof(*count));
    CU_ASSERT_PTR_NOT_NULL_FATAL(count);
    for (int i = 0; i < nthreads; i++) {
        int role = i < RACE_SEND               ? 0
                   : i < RACE_SEND + RACE_RECV ? 1
                                               : i - RACE_SEND - RACE_RECV + 2;
        r[i] = (struct race){.count = count,
                             .bar = &bar,
                             .role = role,
                             .id = i,
                             .rounds = rounds,
                             .seed = 0x2545F4914F6CDD1DULL * (uint64_t)(i + 1)};
    }
    for (int i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, race_main, &r[i]);
    long leftover_bad = 0;
    for (int round = 0; round < rounds; round++) {
        struct chan *ch = chan_new(1 + (size_t)(round % 4));
        struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
        for (int i = 0; i < nitems; i++)
            atomic_store(&count[i], 0);
        for (int i = 0; i < nthreads; i++) {
            r[i].ch = ch;
            r[i].c = c;
        }
        pthread_barrier_wait(&bar);
        pthread_barrier_wait(&bar);
        void *it; /* the close came; drain what is left */
        while (chan_recv(ch, &it, NULL) == 0)
            atomic_fetch_sub(&count[VAL(it) - 1], 1);
        for (int i = 0; i < nitems; i++)
            leftover_bad += atomic_load(&count[i]) != 0;
        ctx_free(c);
        chan_free(ch);
    }
    long bad = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(t[i], NULL);
        bad += r[i].bad;
    }
    pthread_barrier_destroy(&bar);
    free(count);
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(leftover_bad, 0);
    CHECK_BASELINE();
}

static CU_TestInfo chan_tests[] = {
    {"cap 0 gives NULL", test_chan_cap_zero_is_null},
    {"FIFO order across wraparound", test_chan_fifo_and_wraparound},
    {"capacity and try_send -EAGAIN", test_chan_capacity_try_send},
    {"close: -EPIPE for senders, drain then -EPIPE", test_chan_close_semantics},
    {"close wakes blocked senders", test_chan_close_wakes_blocked_senders},
    {"close wakes blocked receivers (drain first)", test_chan_close_wakes_blocked_receivers},
    {"cancel and deadline wake blocked calls", test_chan_ctx_wakes_blocked_calls},
    {"MPMC: exactly once, per-producer order", test_chan_mpmc_exactly_once_in_order},
    {"seed: workers exit on ctx done", test_chan_seed_workers_exit_on_cancel},
    {"seed: workers exit on channel close", test_chan_seed_workers_exit_on_close},
    {"race: send/recv/close/cancel/deadline", test_chan_race_send_recv_close_cancel},
    CU_TEST_INFO_NULL,
};
TEST_SUITE_INIT(chan, chan_tests, suite_init, NULL)
