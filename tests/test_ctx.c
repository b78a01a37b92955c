/* Tests for ctx/: every function's contract with its edge cases (first cause wins, wide and deep
 * trees, deadlines in the past and clamped to the parent's, hooks added late, removed from
 * inside themselves or while another thread cancels), the timer thread's life, the seed
 * batch-loop pattern, and many-round races for `make tsan`. Threads record what they see; the
 * test's own thread asserts after joining them. Every test ends by checking that threads and
 * fds are back to the suite's baseline (after ctx_shutdown() stops the timer thread). */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "ctx/ctx.h"
#include "tests/core_util.h"
#include "tests/support.h"

static struct baseline base;

static int suite_init(void)
{
    base = baseline_take();
    return 0;
}

#define CHECK_BASELINE() CU_ASSERT_TRUE(baseline_back(base))

/* A hook that records when, where and with what cause it ran, and how often. */
struct rec {
    struct ctx_hook h; /* the hook */
    struct ctx *c;     /* the ctx it is on */
    struct latch runs; /* bumped once per run */
    int64_t at;        /* ctx_now() at the run */
    int err;           /* ctx_err(c) at the run */
    pthread_t tid;     /* the thread that ran it */
};

static void rec_fn(void *arg)
{
    struct rec *r = arg;
    r->at = ctx_now();
    r->err = ctx_err(r->c);
    r->tid = pthread_self();
    latch_add(&r->runs, 1);
}

static void rec_init(struct rec *r, struct ctx *c)
{
    *r = (struct rec){.c = c};
    latch_init(&r->runs);
}

static int rec_add(struct rec *r, struct ctx *c)
{
    rec_init(r, c);
    return ctx_hook_add(c, &r->h, rec_fn, r);
}

/* ---------------------------------------------------------------- basics */

static void test_ctx_now_is_monotonic(void)
{
    int64_t a = ctx_now();
    CU_ASSERT_TRUE(a > 0);
    for (int i = 0; i < 1000; i++) {
        int64_t b = ctx_now();
        CU_ASSERT_TRUE(b >= a);
        a = b;
    }
}

static void test_ctx_background_is_inert(void)
{
    struct ctx *bg = ctx_background();
    CU_ASSERT_PTR_NOT_NULL(bg);
    CU_ASSERT_PTR_EQUAL(ctx_background(), bg);
    CU_ASSERT_EQUAL(ctx_err(bg), 0);
    CU_ASSERT_EQUAL(ctx_deadline(bg), CTX_FOREVER);
    CU_ASSERT_EQUAL(ctx_remaining(bg), CTX_FOREVER);
    CU_ASSERT_PTR_NULL(ctx_value(bg, &base));
    CU_ASSERT_PTR_EQUAL(ctx_ref(bg), bg);
    ctx_unref(bg);
    ctx_cancel(bg, -EIO);
    ctx_free(bg);
    CU_ASSERT_EQUAL(ctx_err(bg), 0);

    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, bg), 0);
    int64_t until = ctx_now() + 5;
    CU_ASSERT_EQUAL(ctx_wait(bg, until), 0);
    CU_ASSERT_TRUE(ctx_now() >= until);
    CU_ASSERT_TRUE(ctx_hook_remove(bg, &r.h));
    CU_ASSERT_EQUAL(latch_get(&r.runs), 0);
    latch_destroy(&r.runs);

    ctx_free(NULL); /* allowed */
    CHECK_BASELINE();
}

static void test_ctx_new_is_live(void)
{
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_EQUAL(ctx_err(c), 0);
    CU_ASSERT_EQUAL(ctx_deadline(c), CTX_FOREVER);
    CU_ASSERT_EQUAL(ctx_remaining(c), CTX_FOREVER);
    CU_ASSERT_EQUAL(ctx_wait(c, ctx_now() - 1), 0); /* 'until' already past: returns at once */
    struct ctx *n = ctx_new(NULL, CTX_FOREVER);     /* NULL parent: a root */
    CU_ASSERT_PTR_NOT_NULL_FATAL(n);
    CU_ASSERT_EQUAL(ctx_err(n), 0);
    struct ctx *t = ctx_with_timeout(c, -1); /* negative: no deadline */
    CU_ASSERT_EQUAL(ctx_deadline(t), CTX_FOREVER);
    ctx_free(t);
    ctx_free(n);
    ctx_free(c);
    CHECK_BASELINE();
}

static void test_ctx_cancel_causes(void)
{
    struct ctx *a = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx *b = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    ctx_cancel(a, -EIO);
    ctx_cancel(b, 0);
    ctx_cancel(c, 5); /* not a cause: treated as -ECANCELED */
    CU_ASSERT_EQUAL(ctx_err(a), -EIO);
    CU_ASSERT_EQUAL(ctx_err(b), -ECANCELED);
    CU_ASSERT_EQUAL(ctx_err(c), -ECANCELED);
    ctx_free(a);
    ctx_free(b);
    ctx_free(c);
    CHECK_BASELINE();
}

static void test_ctx_cancel_twice_first_cause_wins(void)
{
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, c), 0);
    ctx_cancel(c, -EIO);
    ctx_cancel(c, -EPERM);
    ctx_cancel(c, 0);
    CU_ASSERT_EQUAL(ctx_err(c), -EIO);
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1);
    CU_ASSERT_EQUAL(r.err, -EIO);
    CU_ASSERT_TRUE(pthread_equal(r.tid, pthread_self()));
    CU_ASSERT_FALSE(ctx_hook_remove(c, &r.h)); /* it has run */
    ctx_free(c);                               /* the free's own cancel changes nothing */
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1);
    latch_destroy(&r.runs);
    CHECK_BASELINE();
}

/* Cancels reach descendants only: not the parent, not siblings. */
static void test_ctx_cancel_reaches_descendants_only(void)
{
    struct ctx *root = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx *a = ctx_new(root, CTX_FOREVER);
    struct ctx *sib = ctx_new(root, CTX_FOREVER);
    struct ctx *a1 = ctx_new(a, CTX_FOREVER);
    struct ctx *a11 = ctx_with_value(a1, &base, &base);
    ctx_cancel(a, -EIO);
    CU_ASSERT_EQUAL(ctx_err(a), -EIO);
    CU_ASSERT_EQUAL(ctx_err(a1), -EIO);
    CU_ASSERT_EQUAL(ctx_err(a11), -EIO);
    CU_ASSERT_EQUAL(ctx_err(root), 0);
    CU_ASSERT_EQUAL(ctx_err(sib), 0);
    ctx_cancel(root, -EPERM);
    CU_ASSERT_EQUAL(ctx_err(sib), -EPERM);
    CU_ASSERT_EQUAL(ctx_err(a1), -EIO); /* already done: keeps its cause */
    ctx_free(a11);
    ctx_free(a1);
    ctx_free(sib);
    ctx_free(a);
    ctx_free(root);
    CHECK_BASELINE();
}

#define WIDE 10000

/* A parent with 10,000 children, each with a hook; order says which is freed first. */
static void wide_tree(bool parent_first)
{
    struct ctx *p = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx **kids = calloc(WIDE, sizeof(*kids));
    struct rec *recs = calloc(WIDE, sizeof(*recs));
    CU_ASSERT_FATAL(p && kids && recs);
    int add_fail = 0;
    for (int i = 0; i < WIDE; i++) {
        kids[i] = ctx_new(p, CTX_FOREVER);
        CU_ASSERT_PTR_NOT_NULL_FATAL(kids[i]);
        add_fail += rec_add(&recs[i], kids[i]) != 0;
    }
    CU_ASSERT_EQUAL(add_fail, 0);
    if (parent_first)
        ctx_free(p); /* cancels all with -ECANCELED and drops our reference */
    else
        ctx_cancel(p, -EIO);
    int want = parent_first ? -ECANCELED : -EIO;
    int bad_err = 0, bad_runs = 0, bad_seen = 0;
    for (int i = 0; i < WIDE; i++) {
        bad_err += ctx_err(kids[i]) != want;
        bad_runs += latch_get(&recs[i].runs) != 1;
        bad_seen += recs[i].err != want;
    }
    CU_ASSERT_EQUAL(bad_err, 0);
    CU_ASSERT_EQUAL(bad_runs, 0);
    CU_ASSERT_EQUAL(bad_seen, 0);
    for (int i = 0; i < WIDE; i++) {
        ctx_free(kids[i]);
        latch_destroy(&recs[i].runs);
    }
    if (!parent_first)
        ctx_free(p);
    free(recs);
    free(kids);
}

static void test_ctx_cancel_parent_of_10000_children(void)
{
    wide_tree(false);
    wide_tree(true);
    CHECK_BASELINE();
}

/* Children freed before the parent is canceled leave it; the rest are canceled with it. */
static void test_ctx_free_child_before_and_after_parent(void)
{
    struct ctx *p = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx *k[6];
    for (int i = 0; i < 6; i++)
        k[i] = ctx_new(p, CTX_FOREVER);
    ctx_free(k[0]); /* before: unlinks from the live parent */
    ctx_free(k[3]);
    CU_ASSERT_EQUAL(ctx_err(p), 0); /* a child's end is not the parent's */
    ctx_free(p);                    /* the parent goes first: its children keep it alive */
    CU_ASSERT_EQUAL(ctx_err(k[1]), -ECANCELED);
    CU_ASSERT_EQUAL(ctx_err(k[5]), -ECANCELED);
    struct ctx *late = ctx_new(k[2], CTX_FOREVER); /* grandchild of a freed parent */
    CU_ASSERT_EQUAL(ctx_err(late), -ECANCELED);
    ctx_free(k[5]);
    ctx_free(k[1]);
    ctx_free(k[2]); /* after: the grandchild still holds it */
    ctx_free(late);
    ctx_free(k[4]);

    /* A reference outlives ctx_free(): the ctx stays readable and done; ctx_unref never
     * cancels. */
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    struct ctx *r = ctx_ref(c);
    CU_ASSERT_PTR_EQUAL(r, c);
    ctx_unref(ctx_ref(c));
    CU_ASSERT_EQUAL(ctx_err(c), 0);
    ctx_free(c);
    CU_ASSERT_EQUAL(ctx_err(r), -ECANCELED);
    ctx_unref(r);
    CHECK_BASELINE();
}

static void test_ctx_child_of_canceled_parent(void)
{
    struct ctx *p = ctx_new(ctx_background(), CTX_FOREVER);
    ctx_cancel(p, -EIO);
    struct ctx *a = ctx_new(p, CTX_FOREVER);
    struct ctx *b = ctx_with_value(p, &base, NULL);
    struct ctx *c = ctx_with_timeout(p, 60000);
    struct ctx *d = ctx_new(p, ctx_now() - 10); /* the parent's cause came first */
    CU_ASSERT_FATAL(a && b && c && d);
    CU_ASSERT_EQUAL(ctx_err(a), -EIO);
    CU_ASSERT_EQUAL(ctx_err(b), -EIO);
    CU_ASSERT_EQUAL(ctx_err(c), -EIO);
    CU_ASSERT_EQUAL(ctx_err(d), -EIO);
    CU_ASSERT_EQUAL(ctx_wait(a, CTX_FOREVER), -EIO); /* returns at once */
    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, a), 0);
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1);
    CU_ASSERT_EQUAL(r.err, -EIO);
    ctx_cancel(a, -EPERM);
    CU_ASSERT_EQUAL(ctx_err(a), -EIO);
    latch_destroy(&r.runs);
    ctx_free(d);
    ctx_free(c);
    ctx_free(b);
    ctx_free(a);
    ctx_free(p);
    CHECK_BASELINE();
}

static void test_ctx_deadline_in_past(void)
{
    int64_t now = ctx_now();
    struct ctx *a = ctx_new(ctx_background(), now - 10);
    struct ctx *b = ctx_with_timeout(ctx_background(), 0);
    CU_ASSERT_FATAL(a && b);
    CU_ASSERT_EQUAL(ctx_err(a), -ETIMEDOUT);
    CU_ASSERT_EQUAL(ctx_err(b), -ETIMEDOUT);
    CU_ASSERT_EQUAL(ctx_deadline(a), now - 10);
    CU_ASSERT_EQUAL(ctx_remaining(a), 0);
    CU_ASSERT_EQUAL(ctx_wait(a, CTX_FOREVER), -ETIMEDOUT);
    struct ctx *k = ctx_new(a, CTX_FOREVER);
    CU_ASSERT_EQUAL(ctx_err(k), -ETIMEDOUT);
    CU_ASSERT_EQUAL(ctx_deadline(k), now - 10);
    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, b), 0);
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1);
    CU_ASSERT_EQUAL(r.err, -ETIMEDOUT);
    latch_destroy(&r.runs);
    ctx_free(k);
    ctx_free(b);
    ctx_free(a);
    CHECK_BASELINE();
}

static void test_ctx_hook_added_after_done_runs_at_once(void)
{
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    ctx_cancel(c, -EPIPE);
    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, c), 0);
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1); /* before ctx_hook_add returned */
    CU_ASSERT_TRUE(pthread_equal(r.tid, pthread_self()));
    CU_ASSERT_EQUAL(r.err, -EPIPE);
    CU_ASSERT_FALSE(ctx_hook_remove(c, &r.h));
    CU_ASSERT_EQUAL(ctx_hook_add(c, NULL, rec_fn, &r), -EINVAL);
    CU_ASSERT_EQUAL(ctx_hook_add(c, &r.h, NULL, &r), -EINVAL);
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1);
    latch_destroy(&r.runs);
    ctx_free(c);
    CHECK_BASELINE();
}

/* Hooks run once each, oldest first; a removed hook never runs. */
static atomic_int order_seq;

struct ordered {
    struct ctx_hook h; /* the hook */
    int pos;           /* order_seq when it ran, or -1 */
};

static void ordered_fn(void *arg)
{
    struct ordered *o = arg;
    o->pos = atomic_fetch_add(&order_seq, 1);
}

static void test_ctx_hooks_run_once_in_order(void)
{
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    struct ordered o[5];
    struct ctx_hook never = {0};
    atomic_store(&order_seq, 0);
    for (int i = 0; i < 5; i++) {
        o[i].pos = -1;
        CU_ASSERT_EQUAL(ctx_hook_add(c, &o[i].h, ordered_fn, &o[i]), 0);
    }
    CU_ASSERT_TRUE(ctx_hook_remove(c, &o[2].h));
    CU_ASSERT_TRUE(ctx_hook_remove(c, &o[2].h));                     /* twice: still true */
    CU_ASSERT_TRUE(ctx_hook_remove(c, &o[0].h));                     /* the head */
    CU_ASSERT_TRUE(ctx_hook_remove(c, &never));                      /* never added */
    CU_ASSERT_EQUAL(ctx_hook_add(c, &o[2].h, ordered_fn, &o[2]), 0); /* re-armed: now last */
    ctx_cancel(c, -EIO);
    ctx_cancel(c, -EIO);
    CU_ASSERT_EQUAL(o[0].pos, -1);
    CU_ASSERT_EQUAL(o[1].pos, 0);
    CU_ASSERT_EQUAL(o[3].pos, 1);
    CU_ASSERT_EQUAL(o[4].pos, 2);
    CU_ASSERT_EQUAL(o[2].pos, 3);
    CU_ASSERT_EQUAL(atomic_load(&order_seq), 4);
    CU_ASSERT_FALSE(ctx_hook_remove(c, &o[4].h));
    ctx_free(c);
    CHECK_BASELINE();
}

/* ctx_hook_remove() from inside the hook: returns false at once (no deadlock); removing another
 * armed hook of the same ctx from inside works too. On the canceling thread and on the timer
 * thread. */
struct self_rm {
    struct ctx *c;         /* the ctx */
    struct ctx_hook h;     /* removes itself and 'other' */
    struct ctx_hook other; /* must never run */
    bool self_ret;         /* what removing itself returned */
    bool other_ret;        /* what removing 'other' returned */
    atomic_int other_runs; /* runs of 'other' */
    struct latch done;     /* bumped at the end of h */
};

static void self_rm_fn(void *arg)
{
    struct self_rm *s = arg;
    s->self_ret = ctx_hook_remove(s->c, &s->h);
    s->other_ret = ctx_hook_remove(s->c, &s->other);
    latch_add(&s->done, 1);
}

static void other_fn(void *arg)
{
    struct self_rm *s = arg;
    atomic_fetch_add(&s->other_runs, 1);
}

static void self_rm_case(struct ctx *c, bool cancel_here)
{
    struct self_rm s = {.c = c};
    latch_init(&s.done);
    CU_ASSERT_EQUAL(ctx_hook_add(c, &s.h, self_rm_fn, &s), 0);
    CU_ASSERT_EQUAL(ctx_hook_add(c, &s.other, other_fn, &s), 0);
    if (cancel_here)
        ctx_cancel(c, -EIO);
    CU_ASSERT_TRUE(latch_wait(&s.done, 1, test_ms(5000)));
    CU_ASSERT_FALSE(s.self_ret);
    CU_ASSERT_TRUE(s.other_ret);
    CU_ASSERT_FALSE(ctx_hook_remove(c, &s.h)); /* waits for the hook to have returned */
    CU_ASSERT_TRUE(ctx_hook_remove(c, &s.other));
    CU_ASSERT_EQUAL(atomic_load(&s.other_runs), 0);
    latch_destroy(&s.done);
}

static void test_ctx_hook_remove_from_inside_hook(void)
{
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    self_rm_case(c, true);
    ctx_free(c);
    /* Fired by the timer thread: the deadline must pass after both hooks are in, so it is
     * far longer than the two calls take, even on a loaded machine. */
    c = ctx_with_timeout(ctx_background(), test_ms(200));
    self_rm_case(c, false);
    ctx_free(c);
    CHECK_BASELINE();
}

/* Hook removed while another thread cancels its ctx: when remove returns true the hook never
 * runs; when it returns false the hook has finished. The hook's memory is freed the moment
 * remove returns, so a hook still running afterwards is a use-after-free for ASan/TSan. */
struct race_hook {
    struct ctx_hook h; /* freed right after ctx_hook_remove() returns */
    atomic_int in;     /* the hook started */
    atomic_int out;    /* the hook finished */
};

static atomic_long race_hook_runs;

static void race_hook_fn(void *arg)
{
    struct race_hook *r = arg;
    atomic_store(&r->in, 1);
    spin(200);
    atomic_store(&r->out, 1);
    atomic_fetch_add(&race_hook_runs, 1);
}

struct canceler {
    pthread_barrier_t *start, *end; /* round start and end */
    struct ctx **c;                 /* the round's ctx, set before 'start' */
    int rounds;                     /* rounds to serve */
};

static void *canceler_main(void *arg)
{
    struct canceler *k = arg;
    for (int i = 0; i < k->rounds; i++) {
        pthread_barrier_wait(k->start);
        ctx_cancel(*k->c, -EIO);
        pthread_barrier_wait(k->end);
    }
    return NULL;
}

static void test_ctx_hook_remove_while_canceled_elsewhere(void)
{
    int rounds = core_rounds(8000);
    pthread_barrier_t start, end;
    pthread_barrier_init(&start, NULL, 2);
    pthread_barrier_init(&end, NULL, 2);
    struct ctx *c = NULL;
    struct canceler k = {.start = &start, .end = &end, .c = &c, .rounds = rounds};
    pthread_t t;
    atomic_store(&race_hook_runs, 0);
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, canceler_main, &k), 0);
    long removed = 0, ran = 0, unfinished = 0, ran_but_removed = 0;
    for (int i = 0; i < rounds; i++) {
        c = ctx_new(ctx_background(), CTX_FOREVER);
        struct race_hook *r = calloc(1, sizeof(*r));
        ctx_hook_add(c, &r->h, race_hook_fn, r);
        pthread_barrier_wait(&start);
        if (i & 1)
            spin(i % 300);
        bool rm = ctx_hook_remove(c, &r->h);
        if (rm) {
            removed++;
            ran_but_removed += atomic_load(&r->in);
        } else {
            ran++;
            unfinished += !atomic_load(&r->out);
        }
        free(r);
        pthread_barrier_wait(&end);
        ctx_free(c);
    }
    pthread_join(t, NULL);
    pthread_barrier_destroy(&start);
    pthread_barrier_destroy(&end);
    CU_ASSERT_EQUAL(removed + ran, rounds);
    CU_ASSERT_EQUAL(ran_but_removed, 0);
    CU_ASSERT_EQUAL(unfinished, 0);
    CU_ASSERT_EQUAL(atomic_load(&race_hook_runs), ran); /* removed hooks never ran later */
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- values and deadlines */

static const char key_a = 'a', key_b = 'b', key_c = 'c';

static void test_ctx_values_through_chain(void)
{
    int v1 = 1, v2 = 2, v3 = 3;
    struct ctx *a = ctx_with_value(ctx_background(), &key_a, &v1);
    struct ctx *m = ctx_new(a, CTX_FOREVER);
    struct ctx *b = ctx_with_value(m, &key_b, &v2);
    struct ctx *a2 = ctx_with_value(b, &key_a, &v3); /* shadows key_a */
    struct ctx *leaf = ctx_new(a2, CTX_FOREVER);
    CU_ASSERT_FATAL(a && m && b && a2 && leaf);
    CU_ASSERT_PTR_EQUAL(ctx_value(leaf, &key_a), &v3);
    CU_ASSERT_PTR_EQUAL(ctx_value(leaf, &key_b), &v2);
    CU_ASSERT_PTR_NULL(ctx_value(leaf, &key_c));
    CU_ASSERT_PTR_EQUAL(ctx_value(b, &key_a), &v1); /* above the shadow */
    CU_ASSERT_PTR_EQUAL(ctx_value(m, &key_a), &v1);
    CU_ASSERT_PTR_NULL(ctx_value(m, &key_b)); /* values flow down, not up */
    CU_ASSERT_PTR_NULL(ctx_value(ctx_background(), &key_a));
    CU_ASSERT_PTR_NULL(ctx_value(NULL, &key_a));
    struct ctx *nul = ctx_with_value(leaf, &key_b, NULL); /* NULL value shadows too */
    CU_ASSERT_PTR_NULL(ctx_value(nul, &key_b));
    ctx_cancel(a, -EIO); /* values survive cancellation */
    CU_ASSERT_EQUAL(ctx_err(leaf), -EIO);
    CU_ASSERT_PTR_EQUAL(ctx_value(leaf, &key_a), &v3);
    ctx_free(a); /* the root first: the chain keeps it readable */
    CU_ASSERT_PTR_EQUAL(ctx_value(m, &key_a), &v1);
    ctx_free(m);
    ctx_free(b);
    ctx_free(a2);
    ctx_free(leaf);
    ctx_free(nul);
    CHECK_BASELINE();
}

static void test_ctx_deadline_clamped_to_parent(void)
{
    int64_t now = ctx_now();
    struct ctx *p = ctx_new(ctx_background(), now + 10000);
    struct ctx *later = ctx_new(p, now + 20000);
    struct ctx *none = ctx_new(p, CTX_FOREVER);
    struct ctx *earlier = ctx_new(p, now + 5000);
    struct ctx *val = ctx_with_value(earlier, &key_a, NULL);
    struct ctx *tmo = ctx_with_timeout(p, 60000);
    struct ctx *deep = ctx_new(val, now + 7000);
    CU_ASSERT_FATAL(p && later && none && earlier && val && tmo && deep);
    CU_ASSERT_EQUAL(ctx_deadline(p), now + 10000);
    CU_ASSERT_EQUAL(ctx_deadline(later), now + 10000);
    CU_ASSERT_EQUAL(ctx_deadline(none), now + 10000);
    CU_ASSERT_EQUAL(ctx_deadline(earlier), now + 5000);
    CU_ASSERT_EQUAL(ctx_deadline(val), now + 5000);
    CU_ASSERT_EQUAL(ctx_deadline(tmo), now + 10000);
    CU_ASSERT_EQUAL(ctx_deadline(deep), now + 5000);
    /* Remaining time is the deadline less the clock when read: bracket the read. */
    int64_t rem = ctx_remaining(earlier), t1 = ctx_now();
    CU_ASSERT_TRUE(rem >= now + 5000 - t1 && rem <= 5000);
    rem = ctx_remaining(later);
    t1 = ctx_now();
    CU_ASSERT_TRUE(rem >= now + 10000 - t1 && rem <= 10000);
    CU_ASSERT_EQUAL(ctx_err(later), 0);
    ctx_free(deep);
    ctx_free(tmo);
    ctx_free(val);
    ctx_free(earlier);
    ctx_free(none);
    ctx_free(later);
    ctx_free(p);
    CHECK_BASELINE();
}

static void test_ctx_remaining(void)
{
    struct ctx *none = ctx_new(ctx_background(), CTX_FOREVER);
    int64_t t0 = ctx_now();
    struct ctx *ahead = ctx_with_timeout(ctx_background(), 3000);
    struct ctx *past = ctx_new(ctx_background(), ctx_now() - 1);
    CU_ASSERT_EQUAL(ctx_remaining(none), CTX_FOREVER);
    /* The deadline is at least t0 + 3000; the read happens before t1. */
    int64_t r = ctx_remaining(ahead), t1 = ctx_now();
    CU_ASSERT_TRUE(r >= t0 + 3000 - t1 && r <= 3000);
    CU_ASSERT_EQUAL(ctx_remaining(past), 0);
    ctx_cancel(ahead, -EIO); /* remaining is about the deadline, not about being done */
    r = ctx_remaining(ahead);
    t1 = ctx_now();
    CU_ASSERT_TRUE(r >= t0 + 3000 - t1 && r <= 3000);
    ctx_free(past);
    ctx_free(ahead);
    ctx_free(none);
    CHECK_BASELINE();
}

/* Hooks fire on time on the timer thread with nobody waiting on the ctx: not before the
 * deadline, and within a generous second after it; a clamped child fires with its parent;
 * several deadlines fire in deadline order. */
static void test_ctx_timeout_fires_hooks_unwaited(void)
{
    struct ctx *c[3];
    struct rec r[3];
    struct ctx *kid;
    struct rec rk;
    int ms[3] = {90, 30, 60};
    for (int i = 0; i < 3; i++) {
        c[i] = ctx_with_timeout(ctx_background(), ms[i]);
        CU_ASSERT_PTR_NOT_NULL_FATAL(c[i]);
        CU_ASSERT_EQUAL(rec_add(&r[i], c[i]), 0);
    }
    kid = ctx_new(c[1], CTX_FOREVER);
    CU_ASSERT_EQUAL(rec_add(&rk, kid), 0);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_TRUE(latch_wait(&r[i].runs, 1, test_ms(5000)));
        CU_ASSERT_EQUAL(ctx_err(c[i]), -ETIMEDOUT);
        CU_ASSERT_EQUAL(r[i].err, -ETIMEDOUT);
        CU_ASSERT_TRUE(r[i].at >= ctx_deadline(c[i]));
        CU_ASSERT_TRUE(r[i].at <= ctx_deadline(c[i]) + test_ms(1000));
        CU_ASSERT_FALSE(pthread_equal(r[i].tid, pthread_self()));
    }
    CU_ASSERT_TRUE(r[1].at <= r[2].at && r[2].at <= r[0].at);
    CU_ASSERT_TRUE(latch_wait(&rk.runs, 1, test_ms(5000)));
    CU_ASSERT_EQUAL(rk.err, -ETIMEDOUT);
    CU_ASSERT_TRUE(rk.at >= ctx_deadline(c[1]));
    ctx_free(kid);
    latch_destroy(&rk.runs);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(latch_get(&r[i].runs), 1);
        ctx_free(c[i]);
        latch_destroy(&r[i].runs);
    }
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- ctx_wait */

struct waiter {
    struct ctx *c;    /* what to wait on */
    int64_t until;    /* argument to ctx_wait */
    struct latch *go; /* bumped before waiting */
    int rc;           /* what ctx_wait returned */
    int64_t at;       /* when */
};

static void *waiter_main(void *arg)
{
    struct waiter *w = arg;
    latch_add(w->go, 1);
    w->rc = ctx_wait(w->c, w->until);
    w->at = ctx_now();
    return NULL;
}

static void test_ctx_wait_until_vs_cancel(void)
{
    /* 'until' first: 0, not before it. */
    struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
    int64_t until = ctx_now() + 30;
    CU_ASSERT_EQUAL(ctx_wait(c, until), 0);
    CU_ASSERT_TRUE(ctx_now() >= until);
    CU_ASSERT_EQUAL(ctx_err(c), 0);

    /* Canceled from another thread: every waiter gets the cause. */
    struct latch go;
    latch_init(&go);
    struct waiter w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct waiter){.c = c, .until = i ? CTX_FOREVER : ctx_now() + 60000, .go = &go};
        CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i], NULL, waiter_main, &w[i]), 0);
    }
    CU_ASSERT_TRUE(latch_wait(&go, 4, test_ms(5000)));
    int64_t t0 = ctx_now();
    ctx_cancel(c, -EIO);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CU_ASSERT_EQUAL(w[i].rc, -EIO);
        CU_ASSERT_TRUE(w[i].at - t0 < test_ms(5000));
    }
    ctx_free(c);

    /* An 'until' before a deadline: 0 (the deadline is a minute away, so no pause of this
     * thread can reorder them); a deadline first: -ETIMEDOUT, not before it. */
    c = ctx_with_timeout(ctx_background(), 60000);
    CU_ASSERT_EQUAL(ctx_wait(c, ctx_now() + 5), 0);
    ctx_free(c);
    c = ctx_with_timeout(ctx_background(), 30);
    CU_ASSERT_EQUAL(ctx_wait(c, CTX_FOREVER), -ETIMEDOUT);
    CU_ASSERT_TRUE(ctx_now() >= ctx_deadline(c));
    ctx_free(c);

    /* With no timer thread (ctx_shutdown), a waiter still enforces the deadline. */
    c = ctx_with_timeout(ctx_background(), 30);
    ctx_shutdown();
    CU_ASSERT_EQUAL(ctx_wait(c, CTX_FOREVER), -ETIMEDOUT);
    CU_ASSERT_TRUE(ctx_now() >= ctx_deadline(c));
    CU_ASSERT_EQUAL(ctx_err(c), -ETIMEDOUT);
    ctx_free(c);
    latch_destroy(&go);
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- deep chain */

#define DEEP 100000

static struct ctx **deep_chain(const void *key, void *val)
{
    struct ctx **v = calloc(DEEP, sizeof(*v));
    if (!v)
        return NULL;
    v[0] = ctx_with_value(ctx_background(), key, val);
    for (int i = 1; i < DEEP; i++)
        v[i] = ctx_new(v[i - 1], CTX_FOREVER);
    return v;
}

static int chain_missing(struct ctx **v)
{
    int missing = 0;
    for (int i = 0; i < DEEP; i++)
        missing += v[i] == NULL;
    return missing;
}

/* 100,000 nested ctxs: canceled from the root, values found from the leaf, freed root first
 * (the leaf's free then releases the whole chain in a loop) and leaf first; then a chain whose
 * root's ctx_free() cancels everything. No stack overflow anywhere. */
static void test_ctx_deep_chain_100000(void)
{
    int val = 7;
    struct ctx **v = deep_chain(&key_a, &val);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT_EQUAL_FATAL(chain_missing(v), 0);
    CU_ASSERT_PTR_EQUAL(ctx_value(v[DEEP - 1], &key_a), &val);
    CU_ASSERT_PTR_NULL(ctx_value(v[DEEP - 1], &key_b));
    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, v[DEEP - 1]), 0);
    ctx_cancel(v[0], -EIO);
    CU_ASSERT_EQUAL(ctx_err(v[DEEP - 1]), -EIO);
    CU_ASSERT_EQUAL(ctx_err(v[DEEP / 2]), -EIO);
    CU_ASSERT_EQUAL(latch_get(&r.runs), 1);
    CU_ASSERT_EQUAL(r.err, -EIO);
    latch_destroy(&r.runs);
    for (int i = 0; i < DEEP; i++)
        ctx_free(v[i]);
    free(v);

    v = deep_chain(&key_a, &val);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT_EQUAL_FATAL(chain_missing(v), 0);
    for (int i = DEEP - 1; i >= 0; i--) /* leaf first: each free cancels a leaf */
        ctx_free(v[i]);
    free(v);

    v = deep_chain(&key_a, &val);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT_EQUAL_FATAL(chain_missing(v), 0);
    ctx_free(v[0]); /* cancels the whole chain */
    CU_ASSERT_EQUAL(ctx_err(v[DEEP - 1]), -ECANCELED);
    for (int i = 1; i < DEEP; i++)
        ctx_free(v[i]);
    free(v);
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- timer thread life */

static void test_ctx_timer_thread_lazy_joined_restarted(void)
{
    struct baseline b = baseline_take();
    struct ctx *plain = ctx_new(ctx_background(), CTX_FOREVER);
    CU_ASSERT_EQUAL(test_thread_count(), b.threads); /* no deadline, no thread */
    struct ctx *d = ctx_with_timeout(ctx_background(), 60000);
    CU_ASSERT_EQUAL(test_thread_count(), b.threads + 1); /* started by the first deadline */
    struct ctx *d2 = ctx_with_timeout(ctx_background(), 60000);
    CU_ASSERT_EQUAL(test_thread_count(), b.threads + 1); /* one thread for all */
    ctx_shutdown();
    CU_ASSERT_TRUE(test_settles_to(b.threads, b.fds, test_ms(5000))); /* joined */
    CU_ASSERT_EQUAL(ctx_err(d), 0);
    ctx_shutdown(); /* twice: harmless */

    struct ctx *e = ctx_with_timeout(ctx_background(), 20); /* restarts it */
    struct rec r;
    CU_ASSERT_EQUAL(rec_add(&r, e), 0);
    CU_ASSERT_EQUAL(test_thread_count(), b.threads + 1);
    CU_ASSERT_TRUE(latch_wait(&r.runs, 1, test_ms(5000)));
    CU_ASSERT_TRUE(r.at >= ctx_deadline(e));
    CU_ASSERT_EQUAL(r.err, -ETIMEDOUT);
    latch_destroy(&r.runs);
    ctx_free(e);
    ctx_free(d2);
    ctx_free(d);
    ctx_free(plain);
    ctx_shutdown();
    CU_ASSERT_TRUE(test_settles_to(b.threads, b.fds, test_ms(5000)));
    CHECK_BASELINE();
}

/* Many deadlines in random order, half canceled first: each hook runs once, timed-out ones not
 * before their deadline; the canceled ones leave the timer heap (their memory is released by
 * ctx_free at once, which ASan's leak check would see otherwise only at exit). */
#define MANY_TIMERS 2000

struct timed {
    struct ctx_hook h; /* the hook */
    struct ctx *c;     /* the ctx */
    atomic_int runs;   /* hook runs */
    atomic_int early;  /* ran with -ETIMEDOUT before the deadline */
    struct latch *all; /* bumped per run */
};

static void timed_fn(void *arg)
{
    struct timed *t = arg;
    if (ctx_err(t->c) == -ETIMEDOUT && ctx_now() < ctx_deadline(t->c))
        atomic_store(&t->early, 1);
    atomic_fetch_add(&t->runs, 1);
    latch_add(t->all, 1);
}

static void test_ctx_many_deadlines(void)
{
    struct timed *t = calloc(MANY_TIMERS, sizeof(*t));
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    struct latch all;
    latch_init(&all);
    uint64_t seed = 88172645463325252ULL;
    int64_t now = ctx_now();
    for (int i = 0; i < MANY_TIMERS; i++) {
        t[i].all = &all;
        t[i].c = ctx_new(ctx_background(), now + 1 + (int64_t)(rng_next(&seed) % 200));
        CU_ASSERT_PTR_NOT_NULL_FATAL(t[i].c);
        ctx_hook_add(t[i].c, &t[i].h, timed_fn, &t[i]);
    }
    for (int i = 0; i < MANY_TIMERS; i += 2)
        ctx_cancel(t[i].c, -EIO);
    CU_ASSERT_TRUE(latch_wait(&all, MANY_TIMERS, test_ms(10000)));
    int bad_runs = 0, early = 0, bad_err = 0;
    for (int i = 0; i < MANY_TIMERS; i++) {
        bad_runs += atomic_load(&t[i].runs) != 1;
        early += atomic_load(&t[i].early);
        int e = ctx_err(t[i].c);
        bad_err += (i % 2 == 0) ? (e != -EIO && e != -ETIMEDOUT) : e != -ETIMEDOUT;
        ctx_free(t[i].c);
    }
    CU_ASSERT_EQUAL(bad_runs, 0);
    CU_ASSERT_EQUAL(early, 0);
    CU_ASSERT_EQUAL(bad_err, 0);
    latch_destroy(&all);
    free(t);
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- seed: batch loop */

/* Go: for _, it := range items { if err := ctx.Err(); err != nil { return err }; process(it) } */
struct batch {
    struct ctx *c;    /* checked before each item */
    long n;           /* items */
    long cancel_at;   /* processing this item cancels c (-1: never) */
    atomic_long done; /* items processed */
    int rc;           /* the loop's result */
};

static int batch_loop(struct batch *b)
{
    for (long i = 0; i < b->n; i++) {
        int err = ctx_err(b->c);
        if (err)
            return err;
        if (i == b->cancel_at)
            ctx_cancel(b->c, -ECANCELED);
        atomic_fetch_add_explicit(&b->done, 1, memory_order_relaxed);
    }
    return 0;
}

static void *batch_main(void *arg)
{
    struct batch *b = arg;
    b->rc = batch_loop(b);
    return NULL;
}

static bool batch_progress(void *arg)
{
    struct batch *b = arg;
    return atomic_load(&b->done) >= 1000;
}

static void test_ctx_seed_batch_loop_stops_on_cancel(void)
{
    /* Canceled while processing item 100: exactly 101 items done. */
    struct batch b = {.c = ctx_new(ctx_background(), CTX_FOREVER), .n = 1000, .cancel_at = 100};
    CU_ASSERT_EQUAL(batch_loop(&b), -ECANCELED);
    CU_ASSERT_EQUAL(atomic_load(&b.done), 101);
    ctx_free(b.c);

    /* No cancel: all done. */
    struct batch all = {.c = ctx_new(ctx_background(), CTX_FOREVER), .n = 1000, .cancel_at = -1};
    CU_ASSERT_EQUAL(batch_loop(&all), 0);
    CU_ASSERT_EQUAL(atomic_load(&all.done), 1000);
    ctx_free(all.c);

    /* Canceled from another thread mid-way: the loop returns the cause well before the end. */
    struct batch x = {.c = ctx_new(ctx_background(), CTX_FOREVER), .n = 1L << 40, .cancel_at = -1};
    pthread_t t;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&t, NULL, batch_main, &x), 0);
    CU_ASSERT_TRUE(test_wait_until(batch_progress, &x, test_ms(10000)));
    ctx_cancel(x.c, -EIO);
    pthread_join(t, NULL);
    CU_ASSERT_EQUAL(x.rc, -EIO);
    CU_ASSERT_TRUE(atomic_load(&x.done) < x.n);
    ctx_free(x.c);

    /* Stopped by a deadline that nobody waits on (the timer thread cancels). */
    struct batch d = {.c = ctx_with_timeout(ctx_background(), 20), .n = 1L << 40, .cancel_at = -1};
    CU_ASSERT_EQUAL(batch_loop(&d), -ETIMEDOUT);
    CU_ASSERT_TRUE(ctx_now() >= ctx_deadline(d.c));
    ctx_free(d.c);
    CHECK_BASELINE();
}

/* ---------------------------------------------------------------- races */

/* Many threads cancel one ctx with distinct causes at once: one cause wins, hooks run once and
 * see it, every waiter returns it. */
struct race_cancel {
    pthread_barrier_t *bar; /* round start */
    struct ctx **c;         /* the round's ctx */
    int cause;              /* this thread's cause */
    int rounds;             /* rounds */
};

static void *race_cancel_main(void *arg)
{
    struct race_cancel *r = arg;
    for (int i = 0; i < r->rounds; i++) {
        pthread_barrier_wait(r->bar);
        if (r->cause)
            ctx_cancel(*r->c, r->cause);
        else
            ctx_wait(*r->c, CTX_FOREVER); /* a waiter */
        pthread_barrier_wait(r->bar);
    }
    return NULL;
}

#define RC_THREADS 5

static void test_ctx_race_concurrent_cancel(void)
{
    int rounds = core_rounds(4000);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, RC_THREADS + 1);
    struct ctx *c = NULL;
    struct race_cancel rc[RC_THREADS];
    pthread_t t[RC_THREADS];
    for (int i = 0; i < RC_THREADS; i++) {
        rc[i] = (struct race_cancel){&bar, &c, i == 0 ? 0 : -(100 + i), rounds};
        CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i], NULL, race_cancel_main, &rc[i]), 0);
    }
    int bad = 0;
    for (int i = 0; i < rounds; i++) {
        c = ctx_new(ctx_background(), CTX_FOREVER);
        struct ctx *kid = ctx_new(c, CTX_FOREVER);
        struct rec r;
        rec_add(&r, c);
        pthread_barrier_wait(&bar);
        pthread_barrier_wait(&bar);
        int e = ctx_err(c);
        bad += e > -101 || e < -(100 + RC_THREADS - 1);
        bad += ctx_err(kid) != e;
        bad += latch_get(&r.runs) != 1 || r.err != e;
        latch_destroy(&r.runs);
        ctx_free(kid);
        ctx_free(c);
    }
    for (int i = 0; i < RC_THREADS; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&bar);
    CU_ASSERT_EQUAL(bad, 0);
    CHECK_BASELINE();
}

/* Rounds of a small tree attacked at once by: a root canceler, a kid canceler, a hook adder/
 * remover, a creator of grandchildren that waits briefly on them, and tiny deadlines expiring on
 * the timer thread. Invariants: every ctx ends done with one of the causes, agreeing with the
 * hooks that saw it; hooks whose removal returned true never ran; no hook ran twice. */
#define TREE_KIDS 4

struct tree_round {
    struct ctx *root;                   /* canceled by thread 0 */
    struct ctx *kids[TREE_KIDS];        /* some with tiny deadlines */
    atomic_int hook_runs[TREE_KIDS][8]; /* runs of thread 2's hooks */
    bool removed[TREE_KIDS][8];         /* what thread 2's removes returned */
    int seen[TREE_KIDS][8];             /* the cause each run saw */
};

struct tree_hook {
    struct ctx_hook h;    /* the hook */
    struct tree_round *r; /* round */
    int k, j;             /* kid and slot */
};

static void tree_hook_fn(void *arg)
{
    struct tree_hook *th = arg;
    th->r->seen[th->k][th->j] = ctx_err(th->r->kids[th->k]);
    atomic_fetch_add(&th->r->hook_runs[th->k][th->j], 1);
}

struct tree_worker {
    int role;               /* 0..3 */
    pthread_barrier_t *bar; /* round start/end */
    struct tree_round **r;  /* the round */
    int rounds;
    uint64_t seed;
    long bad; /* invariant violations seen here */
};

static void *tree_worker_main(void *arg)
{
    struct tree_worker *w = arg;
    for (int i = 0; i < w->rounds; i++) {
        pthread_barrier_wait(w->bar);
        struct tree_round *r = *w->r;
        int k = (int)(rng_next(&w->seed) % TREE_KIDS);
        switch (w->role) {
        case 0:
            spin((unsigned)(rng_next(&w->seed) % 2000));
            ctx_cancel(r->root, -EIO);
            break;
        case 1:
            spin((unsigned)(rng_next(&w->seed) % 2000));
            ctx_cancel(r->kids[k], -EPERM);
            break;
        case 2: {
            struct tree_hook th[TREE_KIDS][8];
            for (int kk = 0; kk < TREE_KIDS; kk++)
                for (int j = 0; j < 8; j++) {
                    th[kk][j] = (struct tree_hook){.r = r, .k = kk, .j = j};
                    ctx_hook_add(r->kids[kk], &th[kk][j].h, tree_hook_fn, &th[kk][j]);
                    if (j % 2 == 0)
                        r->removed[kk][j] = ctx_hook_remove(r->kids[kk], &th[kk][j].h);
                }
            /* th lives on this stack: every hook must be removed (or have run) before return */
            for (int kk = 0; kk < TREE_KIDS; kk++)
                for (int j = 1; j < 8; j += 2)
                    r->removed[kk][j] = ctx_hook_remove(r->kids[kk], &th[kk][j].h);
            for (int kk = 0; kk < TREE_KIDS; kk++)
                for (int j = 0; j < 8; j++) {
                    int runs = atomic_load(&r->hook_runs[kk][j]);
                    w->bad += r->removed[kk][j] ? runs != 0 : runs != 1;
                }
            break;
        }
        case 3:
            for (int j = 0; j < 4; j++) {
                struct ctx *g = ctx_new(r->kids[(k + j) % TREE_KIDS], ctx_now() + 1);
                ctx_wait(g, ctx_now() + 1);
                ctx_free(g);
            }
            break;
        }
        pthread_barrier_wait(w->bar);
    }
    return NULL;
}

static void test_ctx_race_tree_cancel_hooks_deadlines(void)
{
    int rounds = core_rounds(4000);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 5);
    struct tree_round *r = NULL;
    struct tree_worker w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct tree_worker){.role = i,
                                    .bar = &bar,
                                    .r = &r,
                                    .rounds = rounds,
                                    .seed = 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1)};
        CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i], NULL, tree_worker_main, &w[i]), 0);
    }
    long bad = 0;
    for (int i = 0; i < rounds; i++) {
        r = calloc(1, sizeof(*r));
        r->root = ctx_new(ctx_background(), CTX_FOREVER);
        for (int k = 0; k < TREE_KIDS; k++)
            r->kids[k] = k % 2 ? ctx_with_timeout(r->root, i % 3) : ctx_new(r->root, CTX_FOREVER);
        pthread_barrier_wait(&bar);
        pthread_barrier_wait(&bar);
        for (int k = 0; k < TREE_KIDS; k++) {
            int e = ctx_err(r->kids[k]);
            bad += e != -EIO && e != -EPERM && e != -ETIMEDOUT;
            for (int j = 0; j < 8; j++)
                if (atomic_load(&r->hook_runs[k][j]))
                    bad += r->seen[k][j] != e;
            ctx_free(r->kids[k]);
        }
        bad += ctx_err(r->root) != -EIO;
        ctx_free(r->root);
        free(r);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        bad += w[i].bad;
    }
    pthread_barrier_destroy(&bar);
    CU_ASSERT_EQUAL(bad, 0);
    CHECK_BASELINE();
}

/* References taken and dropped on many threads while the ctx is canceled and freed by its
 * creator: the last unref frees, exactly once (ASan), with no race (TSan). */
struct ref_worker {
    struct ctx *c; /* a reference of our own, dropped at the end */
    pthread_barrier_t *bar;
    int errs; /* ctx_err values out of range */
};

static void *ref_worker_main(void *arg)
{
    struct ref_worker *w = arg;
    pthread_barrier_wait(w->bar);
    for (int i = 0; i < 200; i++) {
        struct ctx *r = ctx_ref(w->c);
        int e = ctx_err(r);
        w->errs += e != 0 && e != -EIO;
        struct ctx *k = ctx_new(r, CTX_FOREVER);
        ctx_unref(r);
        ctx_free(k);
    }
    ctx_unref(w->c);
    return NULL;
}

static void test_ctx_race_refs(void)
{
    int rounds = core_rounds(200);
    int errs = 0;
    for (int i = 0; i < rounds; i++) {
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, 4);
        struct ctx *c = ctx_new(ctx_background(), CTX_FOREVER);
        struct ref_worker w[3];
        pthread_t t[3];
        for (int j = 0; j < 3; j++) {
            w[j] = (struct ref_worker){.c = ctx_ref(c), .bar = &bar};
            pthread_create(&t[j], NULL, ref_worker_main, &w[j]);
        }
        pthread_barrier_wait(&bar);
        ctx_cancel(c, -EIO);
        ctx_free(c);
        for (int j = 0; j < 3; j++) {
            pthread_join(t[j], NULL);
            errs += w[j].errs;
        }
        pthread_barrier_destroy(&bar);
    }
    CU_ASSERT_EQUAL(errs, 0);
    CHECK_BASELINE();
}

/* A hook that ctx_hook_add() runs at once (the ctx is already done) counts as running for
 * ctx_hook_remove() on another thread: the remove must wait until fn has returned. */
struct inline_hook {
    struct ctx *c;
    struct ctx_hook h;
    struct latch started, remover_ready;
    struct gate hold;      /* fn waits here until the test opens it */
    atomic_bool fn_done;   /* fn has returned */
    bool done_at_return;   /* fn_done as seen when ctx_hook_remove() returned */
    bool removed;          /* ctx_hook_remove()'s result */
};

static void inline_hook_fn(void *arg)
{
    struct inline_hook *t = arg;
    latch_add(&t->started, 1);
    gate_task(&t->hold);
    atomic_store(&t->fn_done, true);
}

static void *inline_hook_adder(void *arg)
{
    struct inline_hook *t = arg;
    ctx_hook_add(t->c, &t->h, inline_hook_fn, t);
    return NULL;
}

static void *inline_hook_remover(void *arg)
{
    struct inline_hook *t = arg;
    latch_add(&t->remover_ready, 1);
    t->removed = ctx_hook_remove(t->c, &t->h);
    t->done_at_return = atomic_load(&t->fn_done);
    return NULL;
}

static void test_ctx_hook_remove_waits_for_inline_run(void)
{
    struct inline_hook t = {0};
    latch_init(&t.started);
    latch_init(&t.remover_ready);
    gate_init(&t.hold);
    t.c = ctx_new(ctx_background(), CTX_FOREVER);
    ctx_cancel(t.c, -ECANCELED);
    pthread_t adder, remover;
    pthread_create(&adder, NULL, inline_hook_adder, &t);
    CU_ASSERT_TRUE(latch_wait(&t.started, 1, test_ms(10000)));
    pthread_create(&remover, NULL, inline_hook_remover, &t);
    latch_wait(&t.remover_ready, 1, test_ms(10000));
    /* Give the remover time to reach ctx_hook_remove() while fn is held; whenever it gets
     * there, a correct remove returns only after fn. */
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
    latch_add(&t.hold.open, 1);
    pthread_join(remover, NULL);
    pthread_join(adder, NULL);
    CU_ASSERT_FALSE(t.removed);
    CU_ASSERT_TRUE(t.done_at_return);
    ctx_free(t.c);
    gate_destroy(&t.hold);
    latch_destroy(&t.remover_ready);
    latch_destroy(&t.started);
    CHECK_BASELINE();
}

static CU_TestInfo ctx_tests[] = {
    {"ctx_now is monotonic", test_ctx_now_is_monotonic},
    {"background is inert", test_ctx_background_is_inert},
    {"new ctx is live", test_ctx_new_is_live},
    {"cancel causes (0 and positive mean -ECANCELED)", test_ctx_cancel_causes},
    {"cancel twice: first cause wins, hooks once", test_ctx_cancel_twice_first_cause_wins},
    {"cancel reaches descendants only", test_ctx_cancel_reaches_descendants_only},
    {"cancel a parent of 10,000 children", test_ctx_cancel_parent_of_10000_children},
    {"free a child before and after its parent", test_ctx_free_child_before_and_after_parent},
    {"child of a canceled parent is born done", test_ctx_child_of_canceled_parent},
    {"deadline in the past", test_ctx_deadline_in_past},
    {"hook added after done runs at once", test_ctx_hook_added_after_done_runs_at_once},
    {"hooks run once, oldest first; removed never", test_ctx_hooks_run_once_in_order},
    {"hook removes itself from inside (no deadlock)", test_ctx_hook_remove_from_inside_hook},
    {"hook removed while canceled elsewhere", test_ctx_hook_remove_while_canceled_elsewhere},
    {"hook remove waits for a run inside hook_add", test_ctx_hook_remove_waits_for_inline_run},
    {"values through a chain, shadowing", test_ctx_values_through_chain},
    {"deadline clamped to the parent's", test_ctx_deadline_clamped_to_parent},
    {"ctx_remaining", test_ctx_remaining},
    {"timeout fires hooks on time, unwaited", test_ctx_timeout_fires_hooks_unwaited},
    {"ctx_wait: 0 at until, cause when canceled", test_ctx_wait_until_vs_cancel},
    {"deep chain of 100,000 canceled and freed", test_ctx_deep_chain_100000},
    {"timer thread: lazy, joined, restarted", test_ctx_timer_thread_lazy_joined_restarted},
    {"2,000 deadlines, half canceled first", test_ctx_many_deadlines},
    {"seed: batch loop stops on cancel", test_ctx_seed_batch_loop_stops_on_cancel},
    {"race: concurrent cancels and waiters", test_ctx_race_concurrent_cancel},
    {"race: tree cancel, hooks, deadlines", test_ctx_race_tree_cancel_hooks_deadlines},
    {"race: refs across threads", test_ctx_race_refs},
    CU_TEST_INFO_NULL,
};
TEST_SUITE_INIT(ctx, ctx_tests, suite_init, NULL)
