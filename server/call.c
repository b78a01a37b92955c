/* call: a batch's wait on one key's flight (see call.h).
 *
 * Life of a call, all on its batch's loop thread: call_start() (the errgroup starts it when a
 * slot is free) waits on the key's flight (flight.h), bound to the group's ctx, joining a
 * running one when coalescing allows, or starting one on the loop the batch names for the call
 * (its own, or a stripe's in a large batch: batch_run_loop()). flight_done() takes the outcome,
 * or the cause that made the call leave first, and tells the errgroup, on the batch's loop
 * whatever loop the flight runs on; after the group ends, call_destroy() drops the call's
 * reference to the flight, whose body the answer was rendered from. */
#include "server/call.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "pool/errgroup.h"
#include "server/batch_impl.h"
#include "server/membudget.h"

/* The outcome is decided: record a failure for the batch and tell the errgroup. */
static void complete(struct call *c)
{
    struct batch *b = c->b;
    c->res.decided = true;
    c->completed = true;
    if (c->res.err != 0 && b->rq.mode == MODE_ALL && b->fail_call < 0)
        b->fail_call = (long)c->idx;
    batch_call_done(b, c);
    int rc = b->rq.mode == MODE_SETTLED ? 0 : c->res.err;
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

int call_start(struct eg *g, struct ctx *gctx, void *arg)
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
    int rc = flight_wait(env, gctx, &p, &c->w, flight_done, c);
    if (rc == 0)
        return 0;
    c->res.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : rc;
    c->res.detail = "could not start the fetch";
    c->res.decided = c->completed = true;
    if (b->rq.mode == MODE_SETTLED && rc != -ENOMEM) {
        eg_complete(b->g, 0); /* reported at its position; the batch goes on */
        return 0;
    }
    if (b->fail_call < 0)
        b->fail_call = (long)c->idx;
    return c->res.err;
}

void call_destroy(struct call *c)
{
    flight_release(&c->w); /* last use of the outcome's body and detail */
    memset(c, 0, sizeof(*c));
}
