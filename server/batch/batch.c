/* batch: a parsed request run as calls under an errgroup, on one fetch loop (see batch.h).
 *
 * FLOW: batch_new() (the caller's thread) plans the request, makes the batch's ctx (a child of the
 * server root with the request's deadline) and the errgroup (--limit), picks the batch's loop and
 * whether its flights are spread; batch_run() hands the batch to its fetch loop with a zero-delay
 * fetch_after(). On the loop thread, run() adds one async task per call (each waits on its key's
 * flight) and waits for the group by callback. A call completes its task from its waiter's
 * callback, on the batch's loop whatever loop its flight runs on, so when the group ends nothing
 * of the batch is left in the fetch engine (a flight the batch left goes on, or winds down, on its
 * own: it holds copies, never the batch); group_done() then calls the caller's done, and the batch
 * belongs to the caller again for rendering and freeing.
 *
 * SPREADING: a batch with at least env->spread_min calls in flight at once (its calls, or the
 * errgroup limit when that is lower) starts its new flights on every loop: call i's on loop (loop
 * + (i mod S) * nloops / S) mod nloops, S being that number of calls at once, so each run of S
 * consecutive calls is cut into nloops contiguous stripes, the first on the batch's own loop. With
 * the limit at or above the calls, S is the number of calls and the stripes are those of the whole
 * batch; under a lower limit (the calls start in order as slots free), any S consecutive calls
 * hold each stripe's share once, so the calls in flight at once are spread too, not all in the
 * first stripe. Only the flights move: the calls, their waiters and callbacks stay on the batch's
 * loop, and a flight's outcome reaches them through the waiter's ctx (flight.h). A smaller batch
 * keeps everything on its one loop, with no cross-thread handoff at all.
 *
 * The first failing call (mode all) is remembered in fail_call; calls aborted afterwards by the
 * group's cancel report the same cause and do not overwrite it.
 *
 * CALLS: one per distinct key. Life of a call, all on its batch's loop thread: call_start() (the
 * errgroup starts it when a slot is free) waits on the key's flight (flight.h), bound to the
 * group's ctx, joining a running one when coalescing allows, or starting one on the loop the batch
 * names for the call (its own, or a stripe's in a large batch: batch_run_loop()). flight_done()
 * takes the outcome, or the cause that made the call leave first, and tells the errgroup, on the
 * batch's loop whatever loop the flight runs on; after the group ends, call_destroy() drops the
 * call's reference to the flight, whose body the answer was rendered from.
 *
 * MODE: the one place where "all" and "settled" differ is call_verdict(): what the errgroup hears
 * of a call (its error, or 0 so that the batch goes on) and whether it is the batch's failure;
 * rendering then follows from fail_call. */
#include "server/batch/batch.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "pool/errgroup.h"
#include "server/membudget.h"
#include "server/batch/plan.h"
#include "server/batch/render.h"
#include "server/batch/result.h"

#define BATCH_RID_MAX 128

/* Bytes a result adds to the answer besides its body: {"id":..,"status":..,"data":..}. */
#define RESULT_OVERHEAD 48

/* One distinct key of a batch: its wait on the key's flight, and its outcome. */
struct call {
    struct batch *b;           /* owner */
    uint32_t idx;              /* index in the plan */
    struct flight_waiter w;    /* the wait on the key's flight */
    bool completed;            /* the errgroup was told */
    bool streamed;             /* its lines went to the batch's stream */
    struct call_result res;    /* the outcome */
};

struct batch {
    const struct batch_env *env; /* the server's */
    struct request rq;           /* the parsed request (owned) */
    struct plan plan;            /* positions -> calls */
    struct call *calls;          /* plan.ncalls of them */
    struct ctx *ctx;             /* the request's ctx: deadline, client gone, shutdown */
    struct eg *g;                /* the errgroup over the calls */
    unsigned loop;               /* the fetch loop the batch, its calls and their callbacks
                                    run on */
    unsigned nloops;             /* the engine's loops, when spreading */
    size_t stripe;               /* spreading: calls per round of stripes over the loops (the
                                    calls in flight at once); 0: every new flight on 'loop' */
    bool hedge;                  /* hedging on for this batch */
    bool coalesce;               /* its calls may share flights with other batches */
    batch_done_fn done;          /* the caller's callback and its argument */
    void *arg;
    /* Loop thread only, until done: */
    int err;                     /* the group's result */
    int start_err;               /* a call could not even be queued (out of memory) */
    long fail_call;              /* first call that failed (mode all), or -1 */
    size_t resp_bytes;           /* the answer's size so far, counted as results arrive */
    struct writer *stream;       /* batch_stream()'s writer, or NULL */
    uint32_t *pos_next;          /* streaming: next position of the same call, UINT32_MAX last */
    char rid[BATCH_RID_MAX + 1]; /* request id, sent upstream */
};

static unsigned batch_run_loop(const struct batch *b, uint32_t idx);
static void call_lines(struct batch *b, struct call *c);

/* ---------------------------------------------------------------- calls */

/* The mode's verdict on call c's outcome (decided), and the one place where "all" and
 * "settled" differ: what the errgroup hears. In mode all, an error is the group's error and
 * the first call with one is the batch's failure (fail_call); in mode settled an error is
 * reported at the call's positions and the batch goes on (0), unless it is 'fatal' (out of
 * memory starting it), which ends any batch. */
static int call_verdict(struct batch *b, struct call *c, bool fatal)
{
    int err = c->res.err;
    if (err == 0 || (b->rq.mode == MODE_SETTLED && !fatal))
        return 0;
    if (b->fail_call < 0)
        b->fail_call = (long)c->idx;
    return err;
}

/* The outcome is decided: record a failure for the batch and tell the errgroup. */
static void complete(struct call *c)
{
    struct batch *b = c->b;
    c->res.decided = true;
    c->completed = true;
    int rc = call_verdict(b, c, false);
    call_lines(b, c);
    eg_complete(b->g, rc); /* last: the group may end here, and cancels the siblings on rc */
}

/* The flight's outcome arrived (cause 0), or the call's ctx ended first. */
static void flight_done(void *arg, int cause)
{
    struct call *c = arg;
    struct batch *b = c->b;
    int gone = ctx_err(eg_ctx(b->g));
    if (cause != 0 || gone != 0) { /* left, or delivered after the group was done */
        int e = cause ? cause : gone;
        c->res.err = e ? e : cause;
        c->res.detail = c->res.err == -ETIMEDOUT ? "deadline exceeded" : "canceled";
        complete(c);
        return;
    }
    const struct flight_outcome *o = flight_outcome(&c->w);
    c->res.err = o->err;
    c->res.status = o->status;
    c->res.body = o->body;
    c->res.len = o->len;
    c->res.detail = o->detail; /* the flight's: valid as long as the call holds it */
    if (o->err == 0) {
        const struct plan_call *pc = &b->plan.calls[c->idx];
        size_t add = (o->len + b->rq.items[pc->first_pos].echo_len + RESULT_OVERHEAD) * pc->mult;
        if (b->resp_bytes + add > b->env->max_response_bytes ||
            !membudget_take(b->env->mem, add)) { /* refused here, while the others can still be
                                                    stopped; --max-memory as --max-response-bytes */
            c->res.body = NULL;
            c->res.len = 0;
            c->res.err = CALL_ERESPONSE;
            c->res.detail = "response too large";
        } else {
            b->resp_bytes += add;
        }
    }
    complete(c);
}

static int call_start(struct eg *g, struct ctx *gctx, void *arg)
{
    struct call *c = arg;
    struct batch *b = c->b;
    const struct batch_env *env = b->env;
    (void)g;
    const struct plan_call *pc = &b->plan.calls[c->idx];
    struct flight_params p = {.key = plan_key(&b->plan, c->idx),
                              .key_len = pc->key_len,
                              .hedge = b->hedge,
                              .coalesce = b->coalesce,
                              .rid = b->rid,
                              .loop = b->loop,
                              .run_loop = batch_run_loop(b, c->idx)};
    int rc = flight_wait(&env->flight, gctx, &p, &c->w, flight_done, c);
    if (rc == 0)
        return 0;
    c->res.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : rc;
    c->res.detail = "could not start the fetch";
    c->res.decided = c->completed = true;
    if (call_verdict(b, c, rc == -ENOMEM) == 0) {
        eg_complete(b->g, 0); /* reported at its position; the batch goes on */
        return 0;
    }
    return c->res.err;
}

static void call_destroy(struct call *c)
{
    flight_release(&c->w); /* last use of the outcome's body and detail */
    memset(c, 0, sizeof(*c));
}

/* ---------------------------------------------------------------- the batch */

static void batch_release(struct batch *b)
{
    membudget_give(b->env->mem, b->resp_bytes); /* taken in flight_done() as results arrived */
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
    b->hedge = b->rq.hedge && (env->flight.hedge_auto || env->flight.hedge_after_ms > 0);
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
        b->ctx = ctx_new(env->flight.root, ctx_now() + b->rq.timeout_ms);
        b->g = b->ctx ? eg_new(b->ctx, NULL) : NULL;
        if (!b->g)
            rc = -ENOMEM;
    }
    if (rc != 0) {
        batch_release(b);
        return rc;
    }
    eg_set_limit(b->g, env->limit);
    b->loop = fetch_pick_loop(env->flight.fetch);
    /* Calls in flight at once: all of them, or as many as the limit lets run (eg_set_limit():
     * 0 is 1, a negative limit none). */
    size_t at_once = b->plan.ncalls;
    if (env->limit >= 0) {
        size_t lim = env->limit > 0 ? (size_t)env->limit : 1;
        if (lim < at_once)
            at_once = lim;
    }
    unsigned nloops = fetch_loops(env->flight.fetch);
    if (nloops > 1 && env->spread_min > 0 && at_once >= env->spread_min) {
        b->nloops = nloops;
        b->stripe = at_once;
    }
    *out = b;
    return 0;
}

static unsigned batch_run_loop(const struct batch *b, uint32_t idx)
{
    if (b->stripe == 0)
        return b->loop;
    uint64_t k = (uint64_t)(idx % b->stripe) * b->nloops / b->stripe; /* its stripe, < nloops */
    return (unsigned)((b->loop + k) % b->nloops);
}

int batch_run(struct batch *b)
{
    return fetch_after(b->env->flight.fetch, b->loop, ctx_background(), 0, run, b);
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

/* A call's outcome is in (before the errgroup is told): streams its lines. */
static void call_lines(struct batch *b, struct call *c)
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
