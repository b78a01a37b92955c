/* attempt: one key's attempts, hedges and retries (policy in attempt.h).
 *
 * Life of a run: attempts_start() ranks the upstreams, starts the first attempt and, when
 * hedging is on, arms the hedge timer. Attempts (fetch_get()) and timers (fetch_after()) are
 * bound to the owner's ctx (an attempt through a child with its deadline) and call back on the
 * loop; 'pending' counts those not yet called back. An attempt's callback counts and reports its
 * ending, then keeps it as the latest result, decides, retries or waits for the others; a timer's
 * starts a hedge or the retry its backoff was for. Deciding tells the owner, then cancels the
 * owner's ctx when anything is still out (the losers and timers are aborted and call back within
 * the loop's next turn); the callback that brings 'pending' to 0 after the decision tells the
 * owner that the run has wound down, and touches nothing afterwards. */
#include "server/batch/attempt.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/budget.h"
#include "server/obs/metrics.h"
#include "server/rng.h"

#define URL_STACK 2048 /* URLs up to this long are built on the stack */

static void attempt_done(void *arg, struct fetch_result *r);
static void timer_done(void *arg, struct fetch_result *r);

/* ---------------------------------------------------------------- the policy's numbers */

int64_t attempt_hedge_wait(int64_t delay_ms, unsigned sent)
{
    if (sent >= ATTEMPT_MAX_HEDGES)
        return -1;
    if (sent == 0)
        return delay_ms;
    /* The next one after half the delay: the attempts out have been pending for the whole
     * delay and more, so the id is already in its tail (with one hedge, an attempt and its
     * hedge that both land in the tail would hold the batch for two delays). */
    return delay_ms > 1 ? delay_ms / 2 : 1;
}

int64_t attempt_backoff_cap(unsigned made)
{
    uint64_t cap = ((uint64_t)1 << (made + 1 < 20 ? made + 1 : 20)) - 1;
    cap *= ATTEMPT_BACKOFF_BASE_MS;
    return cap < ATTEMPT_BACKOFF_MAX_MS ? (int64_t)cap : ATTEMPT_BACKOFF_MAX_MS;
}

/* ---------------------------------------------------------------- the outcome */

/* The outcome's error text: a static one (never copied), or NULL. */
static void set_detail(struct attempts *a, const char *text)
{
    free(a->detail);
    a->detail = NULL;
    a->out.detail = text;
}

/* The same from a text valid only for now (an attempt's, from fetch): a copy. */
static void copy_detail(struct attempts *a, const char *text)
{
    free(a->detail);
    a->detail = text ? strdup(text) : NULL;
    a->out.detail = a->detail;
}

/* Keeps an attempt's result as the (latest) outcome, not yet decided. A success has no error
 * text. */
static void keep_result(struct attempts *a, struct fetch_result *r)
{
    free(a->body);
    a->out.err = r->err;
    a->out.status = r->status;
    a->out.body = a->body = r->body;
    a->out.len = r->len;
    r->body = NULL;
    if (r->err == 0)
        set_detail(a, NULL);
    else
        copy_detail(a, r->detail);
}

/* Once decided and nothing is out any more, the owner hears that the run has wound down: the
 * last thing done here (the owner may free 'a'). */
static void maybe_wound_down(struct attempts *a)
{
    if (a->decided && a->pending == 0)
        a->p.owner->wound_down(a->p.owner_arg);
}

/* The outcome is decided: the owner hears it; everything still out is stopped. */
static void decide(struct attempts *a)
{
    a->decided = true;
    a->p.owner->decided(a->p.owner_arg, &a->out);
    if (a->pending > 0)
        ctx_cancel(a->p.ctx, -ECANCELED); /* losers and timers: aborted, they call back soon */
    maybe_wound_down(a);
}

/* The outcome of a run cut short by the owner's ctx (the owner gave up, or shutdown). */
static void decide_canceled(struct attempts *a, int cause)
{
    free(a->body);
    a->out.body = a->body = NULL;
    a->out.len = 0;
    a->out.status = 0;
    int e = ctx_err(a->p.ctx);
    a->out.err = e ? e : cause;
    set_detail(a, a->out.err == -ETIMEDOUT ? "deadline exceeded" : "canceled");
    decide(a);
}

/* ---------------------------------------------------------------- attempts and timers */

/* The snapshot has no candidate left for the key (its members have left the set since it was
 * taken, or it had none): with no attempt out (none holds a member index of it), the run moves
 * on to the live set's current snapshot, forgetting the members tried in the old one. Returns
 * whether it moved. */
static bool follow_set(struct attempts *a)
{
    if (!a->env.live || a->in_flight > 0)
        return false;
    struct upstreams *cur = upstream_live_get(a->env.live);
    if (cur == a->env.ups) {
        upstreams_free(cur);
        return false;
    }
    upstreams_free(a->newer);
    a->newer = a->env.ups = cur;
    a->ntried = 0;
    upstream_key_init(cur, a->p.key, a->p.key_len, &a->key);
    return true;
}

/* Starts attempt number a->started, with the owner's deadline. Returns 0, or an error (nothing
 * started). */
static int start_attempt(struct attempts *a, bool hedge)
{
    const struct attempt_env *env = &a->env;
    unsigned up = upstreams_pick(env->ups, &a->key, a->tried, a->ntried, ctx_now());
    if (up == UPSTREAM_NONE && follow_set(a))
        up = upstreams_pick(env->ups, &a->key, a->tried, a->ntried, ctx_now());
    if (up == UPSTREAM_NONE)
        return FETCH_EUNREACH;
    char stack[URL_STACK], *url = stack;
    size_t n = upstream_url(env->ups, up, a->p.key, a->p.key_len, stack, sizeof(stack));
    if (n >= sizeof(stack)) {
        if (!(url = malloc(n + 1)))
            return -ENOMEM;
        upstream_url(env->ups, up, a->p.key, a->p.key_len, url, n + 1);
    }
    struct attempt *t = a->attempt_busy ? malloc(sizeof(*t)) : &a->attempt;
    int64_t deadline = a->p.owner->deadline(a->p.owner_arg);
    struct ctx *actx = t ? ctx_new(a->p.ctx, deadline) : NULL;
    int rc = -ENOMEM;
    if (actx) {
        *t = (struct attempt){.as = a, .ctx = actx, .up = up, .hedge = hedge};
        struct fetch_req fr = {.url = url,
                               .request_id = a->p.rid,
                               .connect_to = upstream_member_connect_to(env->ups, up),
                               .cb = attempt_done,
                               .arg = t};
        rc = fetch_get(env->fetch, a->p.loop, actx, &fr);
    }
    if (url != stack)
        free(url);
    if (rc != 0) {
        ctx_free(actx);
        if (t != &a->attempt)
            free(t);
        return rc;
    }
    if (t == &a->attempt)
        a->attempt_busy = true;
    upstream_attempt_begin(env->ups, up);
    if (a->ntried == ATTEMPT_TRIED_MAX) { /* forget the oldest */
        memmove(a->tried, a->tried + 1, (ATTEMPT_TRIED_MAX - 1) * sizeof(a->tried[0]));
        a->ntried--;
    }
    a->tried[a->ntried++] = (uint16_t)up;
    a->started++;
    a->pending++;
    a->in_flight++;
    return 0;
}

static int arm_timer(struct attempts *a, enum attempt_timer_kind kind, int64_t ms)
{
    struct attempt_timer *t = a->timer_busy ? malloc(sizeof(*t)) : &a->timer;
    if (!t)
        return -ENOMEM;
    *t = (struct attempt_timer){.as = a, .kind = kind, .gen = ++a->timer_gen};
    int rc = fetch_after(a->env.fetch, a->p.loop, a->p.ctx, ms, timer_done, t);
    if (rc != 0) {
        if (t != &a->timer)
            free(t);
        return rc;
    }
    if (t == &a->timer)
        a->timer_busy = true;
    a->pending++;
    return 0;
}

/* After a retryable failure with nothing else out: arms the backoff, if allowed. */
static bool try_retry(struct attempts *a)
{
    const struct attempt_env *env = &a->env;
    if (a->retries >= env->retries || ctx_err(a->p.ctx) != 0)
        return false;
    uint64_t cap = (uint64_t)attempt_backoff_cap(a->retries);
    int64_t wait = (int64_t)(env->jitter ? env->jitter(cap) : rng_upto(cap));
    int64_t deadline = a->p.owner->deadline(a->p.owner_arg), now = ctx_now();
    if (deadline != CTX_FOREVER && now + wait >= deadline)
        return false; /* it could not even start before the deadline */
    if (!budget_withdraw(env->retry_budget, now)) {
        atomic_fetch_add_explicit(&env->metrics->retries_refused, 1, memory_order_relaxed);
        return false;
    }
    if (arm_timer(a, ATTEMPT_TIMER_BACKOFF, wait) != 0)
        return false;
    a->retries++;
    atomic_fetch_add_explicit(&env->metrics->retries_sent, 1, memory_order_relaxed);
    return true;
}

/* An attempt that ran into its own deadline while the owner's is later (it moved after the
 * attempt started): one more attempt with the time that is left. */
static bool outlived(struct attempts *a, const struct fetch_result *r)
{
    if (r->err != -ETIMEDOUT || ctx_err(a->p.ctx) != 0 || a->in_flight > 0)
        return false;
    int64_t deadline = a->p.owner->deadline(a->p.owner_arg);
    return deadline == CTX_FOREVER || deadline - ctx_now() > 1;
}

/* Counts an attempt's ending, by upstream, and reports what it says of the upstream's health. */
static struct outcome count_attempt(struct attempts *a, unsigned up, const struct fetch_result *r)
{
    const struct attempt_env *env = &a->env;
    struct outcome o = outcome_of(r->err, r->status, r->aborted);
    hist_observe(&env->metrics->fetch_seconds, r->elapsed_us);
    upstream_attempt_end(env->ups, up);
    upstream_count(env->ups, up, o.kind, r->elapsed_us);
    if (o.health != OUTCOME_NO_VERDICT)
        upstream_report(env->ups, up, o.health == OUTCOME_FAILED ? UPSTREAM_FAILED : UPSTREAM_OK,
                        r->err == 0 ? r->elapsed_us : -1, ctx_now());
    return o;
}

static void attempt_done(void *arg, struct fetch_result *r)
{
    struct attempt *t = arg;
    struct attempts *a = t->as;
    bool hedge = t->hedge;
    unsigned t_up = t->up;
    a->pending--;
    a->in_flight--;
    struct outcome o = count_attempt(a, t->up, r);
    bool own_deadline = r->err == -ETIMEDOUT && ctx_err(t->ctx) != 0 && ctx_err(a->p.ctx) == 0;
    ctx_free(t->ctx);
    if (t == &a->attempt)
        a->attempt_busy = false;
    else
        free(t);
    if (a->decided && r->aborted && a->out.err == 0) /* it lost to a faster attempt */
        upstream_report_lost(a->env.ups, t_up, r->elapsed_us, ctx_now());
    if (a->decided) { /* a loser, aborted or late: its body is not wanted */
        free(r->body);
        r->body = NULL;
        maybe_wound_down(a);
        return;
    }
    if ((own_deadline || !r->aborted) && outlived(a, r) && start_attempt(a, false) == 0)
        return;
    if (r->aborted && !own_deadline) {
        free(r->body);
        r->body = NULL;
        decide_canceled(a, r->err);
        return;
    }
    keep_result(a, r);
    if (r->err == 0) {
        if (hedge)
            atomic_fetch_add_explicit(&a->env.metrics->hedges_won, 1, memory_order_relaxed);
        decide(a);
        return;
    }
    if (a->in_flight > 0)
        return; /* a hedge is still out and may answer */
    if (o.retryable && try_retry(a))
        return;
    decide(a);
}

/* The hedge timer passed with an attempt still out: one more attempt, as the budget allows, and
 * the next timer. */
static void hedge_fired(struct attempts *a)
{
    const struct attempt_env *env = &a->env;
    if (!budget_withdraw(env->hedge_budget, ctx_now())) {
        atomic_fetch_add_explicit(&env->metrics->hedges_refused, 1, memory_order_relaxed);
        a->hedges = ATTEMPT_MAX_HEDGES; /* no more for this key */
        return;
    }
    if (start_attempt(a, true) != 0)
        return;
    a->hedges++;
    atomic_fetch_add_explicit(&env->metrics->hedges_sent, 1, memory_order_relaxed);
    int64_t wait = attempt_hedge_wait(a->hedge_ms, a->hedges);
    if (wait >= 0)
        arm_timer(a, ATTEMPT_TIMER_HEDGE, wait); /* without it, simply no more hedges */
}

static void timer_done(void *arg, struct fetch_result *r)
{
    struct attempt_timer *t = arg;
    struct attempts *a = t->as;
    bool stale = t->gen != a->timer_gen;
    enum attempt_timer_kind kind = t->kind;
    if (t == &a->timer)
        a->timer_busy = false;
    else
        free(t);
    a->pending--;
    if (a->decided) {
        maybe_wound_down(a);
        return;
    }
    if (r->aborted || r->err != 0) {
        if (kind == ATTEMPT_TIMER_BACKOFF || a->in_flight == 0)
            decide_canceled(a, r->err);
        return; /* a hedge timer stopped early: the attempt in flight reports the cause */
    }
    if (kind == ATTEMPT_TIMER_BACKOFF && !stale) {
        int rc = start_attempt(a, false);
        if (rc != 0) {
            a->out.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : a->out.err;
            decide(a);
        }
        return;
    }
    if (kind == ATTEMPT_TIMER_HEDGE && !stale && a->hedges < ATTEMPT_MAX_HEDGES &&
        a->in_flight > 0)
        hedge_fired(a);
}

/* ---------------------------------------------------------------- the run */

/* The key's hedge delay (fixed, or auto: the fastest candidate member's recent latency at
 * attempt_hedge_pct()), or -1 for no hedge. */
static int64_t hedge_delay(const struct attempts *a)
{
    const struct attempt_env *env = &a->env;
    if (!a->p.hedge)
        return -1;
    if (!env->hedge_auto)
        return env->hedge_after_ms > 0 ? env->hedge_after_ms : -1;
    int64_t us = upstreams_hedge_us(env->ups, &a->key);
    return us < 0 ? -1 : (us + 999) / 1000;
}

void attempts_init(struct attempts *a, const struct attempt_env *env,
                   const struct attempts_params *p)
{
    *a = (struct attempts){.env = *env, .p = *p, .hedge_ms = -1};
}

int attempts_start(struct attempts *a)
{
    const struct attempt_env *env = &a->env;
    upstream_key_init(env->ups, a->p.key, a->p.key_len, &a->key);
    budget_deposit(env->hedge_budget, ctx_now());
    budget_deposit(env->retry_budget, ctx_now());
    int rc = start_attempt(a, false);
    if (rc != 0)
        return rc;
    a->hedge_ms = hedge_delay(a);
    if (a->hedge_ms >= 0) /* a timer that cannot be armed: simply no hedge */
        arm_timer(a, ATTEMPT_TIMER_HEDGE, attempt_hedge_wait(a->hedge_ms, 0));
    return 0;
}

unsigned attempt_hedge_pct(unsigned budget_pct)
{
    unsigned off = budget_pct * 2 / 5;
    if (off < 1)
        off = 1;
    return off > 50 ? 50 : 100 - off;
}

const char *attempts_no_member(const struct attempts *a)
{
    const char *why = upstream_why(a->env.ups, a->key.shard);
    return why[0] ? why : "every member of the upstream has left the set";
}

void attempts_destroy(struct attempts *a)
{
    upstreams_free(a->newer);
    a->newer = NULL;
    free(a->body);
    free(a->detail);
    a->body = a->detail = NULL;
    a->out = (struct flight_outcome){0};
}
