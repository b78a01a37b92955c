/* batch: a parsed request run as calls under an errgroup, on one fetch loop (see batch.h).
 *
 * FLOW: batch_new() (the caller's thread) plans the request, makes the batch's ctx (a child of
 * the server root with the request's deadline) and the errgroup (--limit), picks the batch's
 * loop and whether its flights are spread; batch_run() hands the batch to its fetch loop with a
 * zero-delay fetch_after(). On the loop thread, run() adds one async task per call (call.c waits
 * on the key's flight) and waits for the group by callback. A call completes its task from its
 * waiter's callback, on the batch's loop whatever loop its flight runs on, so when the group
 * ends nothing of the batch is left in the fetch engine (a flight the batch left goes on, or
 * winds down, on its own: it holds copies, never the batch); group_done() then calls the
 * caller's done, and the batch belongs to the caller again for rendering and freeing.
 *
 * SPREADING: a batch with at least env->spread_min calls in flight at once (its calls, or the
 * errgroup limit when that is lower) starts its new flights on every loop: call i's on loop
 * (loop + (i mod S) * nloops / S) mod nloops, S being that number of calls at once, so each run
 * of S consecutive calls is cut into nloops contiguous stripes, the first on the batch's own
 * loop. With the limit at or above the calls, S is the number of calls and the stripes are
 * those of the whole batch; under a lower limit (the calls start in order as slots free), any S
 * consecutive calls hold each stripe's share once, so the calls in flight at once are spread
 * too, not all in the first stripe. Only the flights move: the calls, their waiters and callbacks stay on the batch's
 * loop, and a flight's outcome reaches them through the waiter's ctx (flight.h). A smaller
 * batch keeps everything on its one loop, with no cross-thread handoff at all.
 *
 * The first failing call (mode all) is remembered in fail_call; calls aborted afterwards by the
 * group's cancel report the same cause and do not overwrite it. */
#include "server/batch_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "pool/errgroup.h"
#include "server/membudget.h"
#include "server/render.h"

static void batch_release(struct batch *b)
{
    membudget_give(b->env->mem, b->resp_bytes); /* taken in call.c as results arrived */
    if (b->calls)
        for (size_t i = 0; i < b->plan.ncalls; i++)
            call_destroy(&b->calls[i]);
    free(b->calls);
    free(b->pos_next);
    eg_free(b->g);
    ctx_free(b->ctx);
    plan_free(&b->plan);
    request_free(&b->rq);
    free(b);
}

void batch_free(struct batch *b)
{
    if (b)
        batch_release(b);
}

static void group_done(void *arg, int err)
{
    struct batch *b = arg;
    b->err = err;
    if (b->stream)
        batch_render(b, b->stream); /* the rest, and the last line */
    b->done(b->arg); /* last: the caller may free the batch from here on */
}

/* On the loop thread: starts the calls (as the limit allows) and waits for the group. */
static void run(void *arg, struct fetch_result *r)
{
    struct batch *b = arg;
    if (r->err != 0) /* the engine is stopping: nothing may start */
        ctx_cancel(b->ctx, -ESHUTDOWN);
    for (size_t i = 0; i < b->plan.ncalls; i++) {
        int rc = eg_go_async(b->g, call_start, &b->calls[i]);
        if (rc == -ENOMEM) { /* not a failed fetch: stop the group, answer 500 */
            b->start_err = rc;
            ctx_cancel(b->ctx, rc);
        }
        if (rc)
            break; /* the group failed: the rest never start */
    }
    eg_wait_async(b->g, group_done, b);
}

int batch_new(const struct batch_env *env, struct request *rq, const char *rid,
              batch_done_fn done, void *arg, struct batch **out)
{
    *out = NULL;
    struct batch *b = calloc(1, sizeof(*b));
    if (!b) {
        request_free(rq);
        return -ENOMEM;
    }
    b->env = env;
    b->rq = *rq;
    memset(rq, 0, sizeof(*rq));
    b->done = done;
    b->arg = arg;
    b->fail_call = -1;
    b->hedge = b->rq.hedge && (env->hedge_auto || env->hedge_after_ms > 0);
    b->coalesce = b->rq.coalesce && env->coalesce;
    snprintf(b->rid, sizeof(b->rid), "%s", rid ? rid : "");
    int rc = plan_build(&b->rq, &b->plan);
    if (rc == 0 && !(b->calls = calloc(b->plan.ncalls ? b->plan.ncalls : 1, sizeof(*b->calls))))
        rc = -ENOMEM;
    if (rc == 0) {
        for (size_t i = 0; i < b->plan.ncalls; i++) {
            b->calls[i].b = b;
            b->calls[i].idx = (uint32_t)i;
            b->calls[i].res.valid = -1;
        }
        b->ctx = ctx_new(env->root, ctx_now() + b->rq.timeout_ms);
        b->g = b->ctx ? eg_new(b->ctx, NULL) : NULL;
        if (!b->g)
            rc = -ENOMEM;
    }
    if (rc != 0) {
        batch_release(b);
        return rc;
    }
    eg_set_limit(b->g, env->limit);
    b->loop = fetch_pick_loop(env->fetch);
    /* Calls in flight at once: all of them, or as many as the limit lets run (eg_set_limit():
     * 0 is 1, a negative limit none). */
    size_t at_once = b->plan.ncalls;
    if (env->limit >= 0) {
        size_t lim = env->limit > 0 ? (size_t)env->limit : 1;
        if (lim < at_once)
            at_once = lim;
    }
    unsigned nloops = fetch_loops(env->fetch);
    if (nloops > 1 && env->spread_min > 0 && at_once >= env->spread_min) {
        b->nloops = nloops;
        b->stripe = at_once;
    }
    *out = b;
    return 0;
}

unsigned batch_run_loop(const struct batch *b, uint32_t idx)
{
    if (b->stripe == 0)
        return b->loop;
    uint64_t k = (uint64_t)(idx % b->stripe) * b->nloops / b->stripe; /* its stripe, < nloops */
    return (unsigned)((b->loop + k) % b->nloops);
}

int batch_run(struct batch *b)
{
    return fetch_after(b->env->fetch, b->loop, ctx_background(), 0, run, b);
}

int batch_stream(struct batch *b, struct writer *w)
{
    if (!(b->pos_next = malloc((b->plan.npos ? b->plan.npos : 1) * sizeof(*b->pos_next))))
        return -ENOMEM;
    uint32_t *last = malloc((b->plan.ncalls ? b->plan.ncalls : 1) * sizeof(*last));
    if (!last) {
        free(b->pos_next);
        b->pos_next = NULL;
        return -ENOMEM;
    }
    for (size_t c = 0; c < b->plan.ncalls; c++)
        last[c] = UINT32_MAX;
    for (size_t p = b->plan.npos; p-- > 0;) { /* chain each call's positions, in order */
        uint32_t c = b->plan.pos_call[p];
        b->pos_next[p] = last[c];
        last[c] = (uint32_t)p;
    }
    free(last);
    b->stream = w;
    return 0;
}

void batch_call_done(struct batch *b, struct call *c)
{
    struct writer *w = b->stream;
    if (!w)
        return;
    c->streamed = true;
    const struct plan_call *pc = &b->plan.calls[c->idx];
    if (c->res.err != 0 && b->rq.mode == MODE_ALL) {
        if (b->fail_call == (long)c->idx) { /* the first error; the rest are its cancels */
            w->fail_pos = pc->first_pos;
            w->ops->fail(w, request_echo(&b->rq, pc->first_pos), &c->res);
        }
        return;
    }
    for (uint32_t p = pc->first_pos; p != UINT32_MAX; p = b->pos_next[p])
        w->ops->item(w, p, request_echo(&b->rq, p), &c->res);
}

int64_t batch_timeout_ms(const struct batch *b)
{
    return b->rq.timeout_ms;
}

struct ctx *batch_ctx(struct batch *b)
{
    return b->ctx;
}

int batch_err(const struct batch *b)
{
    if (b->start_err)
        return b->start_err;
    int cause = ctx_err(b->ctx);
    if (cause == -EPIPE || cause == -ESHUTDOWN)
        return cause;
    return b->err;
}

void batch_render(struct batch *b, struct writer *w)
{
    static const struct call_result oom = {.err = -ENOMEM, .detail = "out of memory"};
    static const struct call_result shut = {.err = -ESHUTDOWN};
    int cause = ctx_err(b->ctx);
    if (b->start_err) {
        w->ops->fail(w, NULL, &oom);
    } else if (cause == -ESHUTDOWN) {
        w->ops->fail(w, NULL, &shut);
    } else if (b->rq.mode == MODE_ALL && b->err != 0) {
        struct call_result none = {.err = b->err};
        const struct call_result *r = &none;
        const char *echo = NULL;
        if (b->fail_call >= 0) {
            r = &b->calls[b->fail_call].res;
            w->fail_pos = b->plan.calls[b->fail_call].first_pos;
            echo = request_echo(&b->rq, w->fail_pos);
        }
        w->ops->fail(w, echo, r);
    } else {
        if (!b->stream)
            w->ops->begin(w);
        for (size_t i = 0; i < b->plan.npos; i++) {
            struct call *c = &b->calls[b->plan.pos_call[i]];
            if (c->streamed)
                continue; /* its lines are out */
            if (!c->res.decided) { /* never started, or cut short: the deadline's, in effect */
                c->res.err = cause ? cause : -ETIMEDOUT;
                c->res.decided = true;
            }
            w->ops->item(w, i, request_echo(&b->rq, i), &c->res);
        }
    }
    w->ops->end(w);
}
