/* eg: Go's errgroup with a limit, for thread tasks and for async (callback-completed) tasks.
 *
 * One mutex guards the counters and the queue of async tasks waiting for a slot. Every task end
 * goes through eg_end(), which records the first error, picks the next queued task for the slot
 * it freed and, once the group is sealed and empty, reports the end. Work that must happen with
 * the lock released (cancelling the ctx, starting the next task) is counted in 'busy' so that the
 * end is never reported, and the group never freed, while another thread still touches it.
 * A queued task that fails at once frees its slot again in the same loop, not by recursion; so
 * does one that completes (eg_complete) inside its start function: a thread-local list of the
 * eg_end() loops running on this thread lets that inner eg_end() only record the end and leave
 * the slot to the loop. eg_wait() claims the end for itself ('notified') so that the thread
 * ending the last task never touches the group after eg_wait() could have returned. */
#include "pool/errgroup.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "ctx/ctx.h"
#include "pool/pool.h"

struct eg_pending {
    eg_start_fn fn; /* starts the task */
    void *arg;      /* its argument */
};

struct eg {
    pthread_mutex_t mu;       /* guards every field below but ctx and pool */
    pthread_cond_t cv;        /* broadcast on every task end and every busy drop */
    struct ctx *ctx;          /* the group's ctx; owned */
    struct pool *pool;        /* where thread tasks run; borrowed */
    int limit;                /* tasks at once, or -1 */
    int running;              /* started and not ended */
    int busy;                 /* threads working on the group with mu released */
    int err;                  /* first non-zero result */
    struct eg_pending *queue; /* async tasks waiting for a slot: ring of qcap */
    size_t qhead, qlen, qcap;
    bool sealed;              /* eg_wait or eg_wait_async was called */
    bool notified;            /* the end was reported */
    eg_done_fn done;          /* eg_wait_async's callback */
    void *done_arg;
};

/* An eg_end() loop in progress on this thread (see in_loop()). */
struct eg_frame {
    const struct eg *g;  /* the group whose queue it serves */
    struct eg_frame *up; /* the next outer loop on this thread, or NULL */
};

/* This thread's eg_end() loops, innermost first. */
static _Thread_local struct eg_frame *eg_frames;

struct eg_task {
    struct eg *g; /* the group */
    eg_fn fn;     /* the task */
    void *arg;    /* its argument */
};

struct eg *eg_new(struct ctx *parent, struct pool *p)
{
    struct eg *g = calloc(1, sizeof(*g));
    if (!g)
        return NULL;
    if (pthread_mutex_init(&g->mu, NULL) != 0)
        goto fail_free;
    if (pthread_cond_init(&g->cv, NULL) != 0)
        goto fail_mutex;
    g->ctx = ctx_new(parent, CTX_FOREVER);
    if (!g->ctx)
        goto fail_cond;
    g->pool = p;
    g->limit = -1;
    return g;
fail_cond:
    pthread_cond_destroy(&g->cv);
fail_mutex:
    pthread_mutex_destroy(&g->mu);
fail_free:
    free(g);
    return NULL;
}

struct ctx *eg_ctx(struct eg *g)
{
    return g->ctx;
}

void eg_set_limit(struct eg *g, int n)
{
    pthread_mutex_lock(&g->mu);
    g->limit = n < 0 ? -1 : (n == 0 ? 1 : n);
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static bool slot_free(const struct eg *g)
{
    return g->limit < 0 || g->running < g->limit;
}

/* With mu held: true when the end should be reported now (and marks it reported). */
static bool end_due(struct eg *g)
{
    if (!g->sealed || g->notified || g->running || g->qlen || g->busy)
        return false;
    g->notified = true;
    return true;
}

static void report_end(struct eg *g)
{
    ctx_cancel(g->ctx, -ECANCELED); /* Go's Wait cancels the group's ctx */
    if (g->done)
        g->done(g->done_arg, g->err);
}

/* With mu held: one task ended with 'rc'. Returns true if 'rc' is the group's first error, which
 * the caller must then pass to ctx_cancel() with mu released. */
static bool end_one(struct eg *g, int rc)
{
    g->running--;
    if (rc == 0 || g->err != 0)
        return false;
    g->err = rc;
    g->qlen = 0; /* queued tasks never start once the group failed */
    return true;
}

/* True if an eg_end() loop of 'g' is running on this thread, i.e. we are inside a start function
 * that it called. */
static bool in_loop(const struct eg *g)
{
    for (const struct eg_frame *f = eg_frames; f; f = f->up)
        if (f->g == g)
            return true;
    return false;
}

/* Ends one task with result 'rc', then starts queued tasks while slots are free. A task that
 * ends inside a start function called by this loop (synchronously, on this thread) is only
 * recorded: this loop hands out its slot, so a long queue of such tasks needs no recursion. */
static void eg_end(struct eg *g, int rc)
{
    bool nested = in_loop(g);
    struct eg_frame frame = {g, eg_frames};
    pthread_mutex_lock(&g->mu);
    bool cancel = end_one(g, rc);
    for (;;) {
        struct eg_pending next = {0};
        if (!nested && g->qlen && slot_free(g)) {
            next = g->queue[g->qhead];
            g->qhead = (g->qhead + 1) % g->qcap;
            g->qlen--;
            g->running++;
        }
        if (!cancel && !next.fn)
            break;
        g->busy++;
        pthread_mutex_unlock(&g->mu);
        if (cancel)
            ctx_cancel(g->ctx, rc);
        cancel = false;
        int r = 0;
        if (next.fn) {
            eg_frames = &frame;
            r = next.fn(g, g->ctx, next.arg);
            eg_frames = frame.up;
        }
        pthread_mutex_lock(&g->mu);
        g->busy--;
        if (r != 0) { /* the task we started ended at once */
            rc = r;
            cancel = end_one(g, r);
        }
    }
    pthread_cond_broadcast(&g->cv);
    bool due = end_due(g);
    pthread_mutex_unlock(&g->mu);
    if (due)
        report_end(g);
}

static void eg_run(void *arg)
{
    struct eg_task *t = arg;
    struct eg *g = t->g;
    /* A task that reaches a worker once the group's ctx is done is skipped, not run; it ends
     * with the ctx's cause, which changes nothing if the group had already failed. */
    int rc = ctx_err(g->ctx);
    if (rc == 0)
        rc = t->fn(g->ctx, t->arg);
    free(t);
    eg_end(g, rc);
}

int eg_go(struct eg *g, eg_fn fn, void *arg)
{
    if (!g->pool || !fn)
        return -EINVAL;
    pthread_mutex_lock(&g->mu);
    while (!g->err && !slot_free(g))
        pthread_cond_wait(&g->cv, &g->mu);
    int err = g->err;
    if (!err)
        g->running++;
    pthread_mutex_unlock(&g->mu);
    if (err)
        return err;
    struct eg_task *t = malloc(sizeof(*t));
    if (t)
        *t = (struct eg_task){g, fn, arg};
    int rc = t ? pool_submit_wait(g->pool, eg_run, t) : -ENOMEM;
    if (rc == 0)
        return 0;
    free(t);
    eg_end(g, rc);
    return rc;
}

bool eg_try_go(struct eg *g, eg_fn fn, void *arg)
{
    if (!g->pool || !fn)
        return false;
    pthread_mutex_lock(&g->mu);
    bool ok = !g->err && slot_free(g);
    if (ok)
        g->running++;
    pthread_mutex_unlock(&g->mu);
    if (!ok)
        return false;
    struct eg_task *t = malloc(sizeof(*t));
    if (t) {
        *t = (struct eg_task){g, fn, arg};
        if (pool_submit(g->pool, eg_run, t) == 0)
            return true;
        free(t);
    }
    eg_end(g, 0); /* undo: a task that never ran; hands its slot on, may end the group */
    return false;
}

int eg_go_async(struct eg *g, eg_start_fn start, void *arg)
{
    if (!start)
        return -EINVAL;
    pthread_mutex_lock(&g->mu);
    if (g->err || g->sealed) {
        int err = g->err ? g->err : -EINVAL;
        pthread_mutex_unlock(&g->mu);
        return err;
    }
    if (!slot_free(g)) {
        if (g->qlen == g->qcap) {
            size_t cap = g->qcap ? g->qcap * 2 : 16;
            struct eg_pending *q = malloc(cap * sizeof(*q));
            if (!q) {
                pthread_mutex_unlock(&g->mu);
                return -ENOMEM;
            }
            for (size_t i = 0; i < g->qlen; i++)
                q[i] = g->queue[(g->qhead + i) % g->qcap];
            free(g->queue);
            g->queue = q;
            g->qhead = 0;
            g->qcap = cap;
        }
        g->queue[(g->qhead + g->qlen) % g->qcap] = (struct eg_pending){start, arg};
        g->qlen++;
        pthread_mutex_unlock(&g->mu);
        return 0;
    }
    g->running++;
    g->busy++;
    pthread_mutex_unlock(&g->mu);
    int r = start(g, g->ctx, arg);
    pthread_mutex_lock(&g->mu);
    g->busy--;
    pthread_cond_broadcast(&g->cv);
    /* The task may have completed during start and the group been sealed meanwhile: then the
     * end is ours to report (while busy, nobody else could). */
    bool due = end_due(g);
    pthread_mutex_unlock(&g->mu);
    if (due)
        report_end(g);
    else if (r != 0)
        eg_end(g, r);
    return r; /* 0, or start's result: the task has completed with it */
}

void eg_complete(struct eg *g, int rc)
{
    eg_end(g, rc);
}

int eg_wait(struct eg *g)
{
    pthread_mutex_lock(&g->mu);
    g->sealed = true;
    g->notified = true; /* the end is ours: a task ending must not touch the group after it */
    while (g->running || g->qlen || g->busy)
        pthread_cond_wait(&g->cv, &g->mu);
    int err = g->err;
    pthread_mutex_unlock(&g->mu);
    ctx_cancel(g->ctx, -ECANCELED);
    return err;
}

void eg_wait_async(struct eg *g, eg_done_fn done, void *arg)
{
    pthread_mutex_lock(&g->mu);
    g->done = done;
    g->done_arg = arg;
    g->sealed = true;
    bool due = end_due(g);
    pthread_mutex_unlock(&g->mu);
    if (due)
        report_end(g);
}

int eg_err(struct eg *g)
{
    pthread_mutex_lock(&g->mu);
    int err = g->err;
    pthread_mutex_unlock(&g->mu);
    return err;
}

void eg_free(struct eg *g)
{
    if (!g)
        return;
    ctx_free(g->ctx);
    free(g->queue);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
}
