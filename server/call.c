/* call: a key's attempts, hedges and retries (policy in call.h).
 *
 * Life of a call, all on its batch's loop thread: call_start() (the errgroup starts it when a
 * slot is free) creates the call's ctx, ranks the upstreams for the key, starts the first
 * attempt and, when hedging is on, arms the hedge timer. Attempts and timers report through
 * fetch callbacks. Once the outcome is decided the call's ctx is canceled, which aborts every
 * attempt and timer still out; when the last of them has called back ('pending' reaches 0) the
 * errgroup is told, so nothing of a call outlives its task. A timer armed before the latest one
 * (a hedge timer overtaken by a retry's backoff) is stale and ignored when it fires. */
#include "server/call.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/url.h"
#include "pool/errgroup.h"
#include "server/batch_impl.h"
#include "server/budget.h"
#include "server/membudget.h"
#include "server/metrics.h"

#define BACKOFF_BASE_MS 25
#define BACKOFF_MAX_MS 250
#define URL_STACK 2048 /* URLs up to this long are built on the stack */

/* One attempt: a fetch of the key from one upstream. */
struct attempt {
    struct call *c;   /* owner */
    struct ctx *ctx;  /* child of the call's ctx */
    unsigned up;      /* upstream index */
    bool hedge;       /* started by the hedge timer */
};

enum timer_kind { TIMER_HEDGE, TIMER_BACKOFF };

struct call_timer {
    struct call *c;       /* owner */
    enum timer_kind kind; /* what it is for */
    unsigned gen;         /* the call's timer_gen when armed */
};

static void attempt_done(void *arg, struct fetch_result *r);

/* A uniform random number in [0, n] from a per-thread xorshift generator. */
static uint64_t jitter(uint64_t n)
{
    static _Thread_local uint64_t s;
    if (s == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        s = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)(uintptr_t)&s ^ 0x9E3779B97F4A7C15ull;
        s |= 1;
    }
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return n ? (s * 0x2545F4914F6CDD1DULL) % (n + 1) : 0;
}

static void set_detail(struct call_result *res, const char *detail)
{
    free(res->detail);
    res->detail = detail ? strdup(detail) : NULL;
}

/* Tells the errgroup, once the outcome is decided and nothing is out any more. */
static void maybe_complete(struct call *c)
{
    if (!c->done || c->pending > 0 || c->completed)
        return;
    c->completed = true;
    struct batch *b = c->b;
    int rc = b->rq.mode == MODE_SETTLED ? 0 : c->res.err;
    eg_complete(b->g, rc); /* last: the group may end here */
}

/* The outcome is decided: record a failure for the batch, stop everything still out. */
static void decide(struct call *c)
{
    struct batch *b = c->b;
    c->done = true;
    c->res.decided = true;
    if (c->res.err != 0 && b->rq.mode == MODE_ALL) {
        if (b->fail_call < 0)
            b->fail_call = (long)c->idx;
        ctx_cancel(eg_ctx(b->g), c->res.err); /* the siblings stop now, not at eg_complete */
    }
    if (c->pending > 0)
        ctx_cancel(c->ctx, -ECANCELED); /* losers and timers: aborted, they call back soon */
    maybe_complete(c);
}

/* The result of a call cut short by its ctx: the deadline, or the cancel's cause. */
static void decide_canceled(struct call *c, int cause)
{
    free(c->res.body);
    c->res.body = NULL;
    c->res.len = 0;
    c->res.status = 0;
    int e = ctx_err(c->ctx);
    c->res.err = e ? e : cause;
    set_detail(&c->res, c->res.err == -ETIMEDOUT ? "deadline exceeded" : "canceled");
    decide(c);
}

/* Starts attempt number c->started. Returns 0, or an error (nothing started). */
static int start_attempt(struct call *c, bool hedge)
{
    struct batch *b = c->b;
    const struct batch_env *env = b->env;
    const struct plan_call *pc = &b->plan.calls[c->idx];
    unsigned up = upstreams_pick(env->ups, c->rank, c->started, ctx_now());
    char stack[URL_STACK], *url = stack;
    size_t n = upstream_url(env->ups, up, plan_key(&b->plan, c->idx), pc->key_len, stack,
                            sizeof(stack));
    if (n >= sizeof(stack)) {
        if (!(url = malloc(n + 1)))
            return -ENOMEM;
        upstream_url(env->ups, up, plan_key(&b->plan, c->idx), pc->key_len, url, n + 1);
    }
    struct attempt *a = malloc(sizeof(*a));
    struct ctx *actx = a ? ctx_new(c->ctx, CTX_FOREVER) : NULL;
    int rc = -ENOMEM;
    if (actx) {
        *a = (struct attempt){.c = c, .ctx = actx, .up = up, .hedge = hedge};
        struct fetch_req fr = {.url = url, .request_id = b->rid, .cb = attempt_done, .arg = a};
        rc = fetch_get(env->fetch, b->loop, actx, &fr);
    }
    if (url != stack)
        free(url);
    if (rc != 0) {
        ctx_free(actx);
        free(a);
        return rc;
    }
    c->started++;
    c->pending++;
    c->in_flight++;
    return 0;
}

static void timer_done(void *arg, struct fetch_result *r);

static int arm_timer(struct call *c, enum timer_kind kind, int64_t ms)
{
    struct call_timer *t = malloc(sizeof(*t));
    if (!t)
        return -ENOMEM;
    *t = (struct call_timer){.c = c, .kind = kind, .gen = ++c->timer_gen};
    int rc = fetch_after(c->b->env->fetch, c->b->loop, c->ctx, ms, timer_done, t);
    if (rc != 0) {
        free(t);
        return rc;
    }
    c->pending++;
    return 0;
}

/* Whether a failed attempt may be retried: a transport error, or 502/503/504. */
static bool retryable(const struct fetch_result *r)
{
    if (r->err == FETCH_EUNREACH)
        return true;
    return r->err == FETCH_ESTATUS && (r->status == 502 || r->status == 503 || r->status == 504);
}

/* After a retryable failure with nothing else out: arms the backoff, if allowed. */
static bool try_retry(struct call *c)
{
    struct batch *b = c->b;
    const struct batch_env *env = b->env;
    if (c->retries >= env->retries || ctx_err(c->ctx) != 0)
        return false;
    uint64_t cap = ((uint64_t)1 << (c->retries + 1 < 20 ? c->retries + 1 : 20)) - 1;
    cap *= BACKOFF_BASE_MS;
    int64_t wait = (int64_t)jitter(cap < BACKOFF_MAX_MS ? cap : BACKOFF_MAX_MS);
    int64_t deadline = ctx_deadline(c->ctx), now = ctx_now();
    if (deadline != CTX_FOREVER && now + wait >= deadline)
        return false; /* it could not even start before the deadline */
    if (!budget_withdraw(env->retry_budget, now)) {
        atomic_fetch_add_explicit(&env->metrics->retries_refused, 1, memory_order_relaxed);
        return false;
    }
    if (arm_timer(c, TIMER_BACKOFF, wait) != 0)
        return false;
    c->retries++;
    atomic_fetch_add_explicit(&env->metrics->retries_sent, 1, memory_order_relaxed);
    return true;
}

/* Keeps a failed attempt's result as the call's (latest) outcome, not yet decided. */
static void keep_failure(struct call *c, struct fetch_result *r)
{
    free(c->res.body);
    c->res.err = r->err;
    c->res.status = r->status;
    c->res.body = r->body;
    c->res.len = r->len;
    r->body = NULL;
    set_detail(&c->res, r->detail);
}

static void attempt_done(void *arg, struct fetch_result *r)
{
    struct attempt *a = arg;
    struct call *c = a->c;
    struct batch *b = c->b;
    const struct batch_env *env = b->env;
    bool hedge = a->hedge;
    c->pending--;
    c->in_flight--;
    metrics_count_fetch(env->metrics, a->up, r->err, r->aborted, r->elapsed_us);
    if (!r->aborted) {
        bool failed = r->err == FETCH_EUNREACH || (r->err == FETCH_ESTATUS && r->status >= 500);
        bool alive = r->err == 0 || r->err == FETCH_ESTATUS || r->err == FETCH_ETOOBIG;
        if (failed || alive)
            upstream_report(env->ups, a->up, failed ? UPSTREAM_FAILED : UPSTREAM_OK,
                            r->err == 0 ? r->elapsed_us : -1, ctx_now());
    }
    ctx_free(a->ctx);
    free(a);
    if (c->done) { /* a loser, aborted or late: its body is not wanted */
        free(r->body);
        r->body = NULL;
        maybe_complete(c);
        return;
    }
    if (r->aborted) {
        free(r->body);
        r->body = NULL;
        decide_canceled(c, r->err);
        return;
    }
    if (r->err == 0) {
        keep_failure(c, r); /* the same fields, now a success */
        const struct plan_call *pc = &b->plan.calls[c->idx];
        size_t add = (c->res.len + b->rq.items[pc->first_pos].echo_len + RESULT_OVERHEAD) * pc->mult;
        if (b->resp_bytes + add > env->max_response_bytes ||
            !membudget_take(env->mem, add)) { /* refused here, while the others can still be
                                                  stopped; --max-memory as --max-response-bytes */
            free(c->res.body);
            c->res.body = NULL;
            c->res.len = 0;
            c->res.err = CALL_ERESPONSE;
            set_detail(&c->res, "response too large");
        } else {
            b->resp_bytes += add;
            if (hedge)
                atomic_fetch_add_explicit(&env->metrics->hedges_won, 1, memory_order_relaxed);
        }
        decide(c);
        return;
    }
    keep_failure(c, r);
    if (c->in_flight > 0)
        return; /* a hedge is still out and may answer */
    if (retryable(r) && try_retry(c))
        return;
    decide(c);
}

static void timer_done(void *arg, struct fetch_result *r)
{
    struct call_timer *t = arg;
    struct call *c = t->c;
    bool stale = t->gen != c->timer_gen;
    enum timer_kind kind = t->kind;
    free(t);
    c->pending--;
    if (c->done) {
        maybe_complete(c);
        return;
    }
    if (r->aborted || r->err != 0) {
        if (kind == TIMER_BACKOFF || c->in_flight == 0)
            decide_canceled(c, r->err);
        return; /* a hedge timer stopped early: the attempt in flight reports the cause */
    }
    struct batch *b = c->b;
    const struct batch_env *env = b->env;
    if (kind == TIMER_BACKOFF && !stale) {
        int rc = start_attempt(c, false);
        if (rc != 0) {
            c->res.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : c->res.err;
            decide(c);
        }
        return;
    }
    if (kind == TIMER_HEDGE && !stale && c->hedges < CALL_MAX_HEDGES && c->in_flight > 0) {
        if (!budget_withdraw(env->hedge_budget, ctx_now())) {
            atomic_fetch_add_explicit(&env->metrics->hedges_refused, 1, memory_order_relaxed);
            c->hedges = CALL_MAX_HEDGES; /* no more for this call */
            return;
        }
        if (start_attempt(c, true) != 0)
            return;
        c->hedges++;
        atomic_fetch_add_explicit(&env->metrics->hedges_sent, 1, memory_order_relaxed);
        if (c->hedges < CALL_MAX_HEDGES)
            arm_timer(c, TIMER_HEDGE, c->hedge_ms);
    }
}

/* The hedge delay for a call whose first attempt went to 'up', or -1 for no hedge. */
static int64_t hedge_delay(const struct batch *b, unsigned up)
{
    const struct batch_env *env = b->env;
    if (!b->hedge)
        return -1;
    if (!env->hedge_auto)
        return env->hedge_after_ms > 0 ? env->hedge_after_ms : -1;
    int64_t us = upstream_p95_us(env->ups, up);
    return us < 0 ? -1 : (us + 999) / 1000;
}

int call_start(struct eg *g, struct ctx *gctx, void *arg)
{
    struct call *c = arg;
    struct batch *b = c->b;
    const struct batch_env *env = b->env;
    c->ctx = ctx_new(gctx, CTX_FOREVER);
    if (!c->ctx) {
        c->res.err = -ENOMEM;
        c->done = c->res.decided = c->completed = true;
        return -ENOMEM;
    }
    const struct plan_call *pc = &b->plan.calls[c->idx];
    upstreams_rank(env->ups, plan_key(&b->plan, c->idx), pc->key_len, c->rank);
    budget_deposit(env->hedge_budget, ctx_now());
    budget_deposit(env->retry_budget, ctx_now());
    int rc = start_attempt(c, false);
    if (rc != 0) {
        c->res.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : rc;
        set_detail(&c->res, "could not start the fetch");
        c->done = c->res.decided = c->completed = true;
        if (b->rq.mode == MODE_SETTLED && rc != -ENOMEM) {
            eg_complete(g, 0); /* reported at its position; the batch goes on */
            return 0;
        }
        if (b->fail_call < 0)
            b->fail_call = (long)c->idx;
        return c->res.err;
    }
    c->hedge_ms = hedge_delay(b, upstreams_pick(env->ups, c->rank, 0, ctx_now()));
    if (c->hedge_ms >= 0)
        arm_timer(c, TIMER_HEDGE, c->hedge_ms); /* without it, simply no hedge */
    return 0;
}

void call_destroy(struct call *c)
{
    ctx_free(c->ctx);
    free(c->res.body);
    free(c->res.detail);
    memset(c, 0, sizeof(*c));
}
