/* flight: a key's attempts, hedges and retries, shared by its waiters (policy in flight.h).
 *
 * Life of a flight: flight_wait() finds no open flight for the key (or coalescing is off), makes
 * one with two references (its run's and its first waiter's) and puts it in the registry. Its
 * run then starts on the flight's loop: at once, from inside flight_wait(), when that is the
 * caller's loop; otherwise through a zero-delay fetch_after() on the flight's loop bound to the
 * flight's ctx (counted in 'pending' until it runs), so that it starts on that loop's thread,
 * or, when every waiter has left by then, decides the flight canceled without an attempt. The run
 * ranks the upstreams, starts the first attempt and, when hedging is on, arms the hedge timer.
 * Attempts and timers report through fetch callbacks on the flight's loop. When the outcome is
 * decided, the flight leaves the registry and cancels its own ctx, which aborts every attempt and
 * timer still out; when the last of them has called back ('pending' reaches 0) it marks every
 * waiter delivered, cancels each waiter's ctx with FLIGHT_DELIVERED (which wakes the waiter's
 * timer on the waiter's loop), and the run drops its reference.
 *
 * A waiter is a fetch_after() timer that never expires, bound to the waiter's ctx: it fires
 * when the flight delivers or when the caller's ctx ends first. In the second case the waiter
 * unlinks itself; the last one to leave an undecided flight takes it out of the registry and
 * cancels its ctx, and its callback waits for the run to wind down (flight.h): on the flight's
 * loop maybe_finish() calls it; on another loop the waiter arms a second timer on its own loop,
 * bound to a ctx of its own ('defer') that maybe_finish() cancels, and the callback runs from
 * that timer. A flight's memory (its outcome included) is freed when the last reference is
 * dropped: the run's, or the last waiter's flight_release().
 *
 * A new flight that cannot be started (its first waiter's timer, or the post to its loop, fails)
 * is decided on the caller's thread, before anything of its run exists, and while the caller's
 * waiter is still linked: so no other waiter can have become its last to leave, and no deferred
 * callback is called from the wrong thread. */
#include "server/batch/flight.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/budget.h"
#include "server/obs/metrics.h"

#define BACKOFF_BASE_MS 25
#define BACKOFF_MAX_MS 250
#define URL_STACK 2048        /* URLs up to this long are built on the stack */
#define FLIGHT_DELIVERED (-3002) /* a waiter ctx's cause: the outcome is set */
#define TABLE_MIN 256         /* registry buckets to begin with (a power of two) */

struct flights {
    pthread_mutex_t mu;
    struct flight **bucket; /* chains of open flights */
    size_t nbuckets;        /* a power of two */
    size_t count;           /* flights in the chains */
};

/* One attempt: a fetch of the key from one upstream. */
struct attempt {
    struct flight *f; /* owner */
    struct ctx *ctx;  /* child of the flight's ctx, with the deadline of its start */
    unsigned up;      /* upstream index */
    bool hedge;       /* started by the hedge timer */
};

enum timer_kind { TIMER_HEDGE, TIMER_BACKOFF };

struct flight_timer {
    struct flight *f;     /* owner */
    enum timer_kind kind; /* what it is for */
    unsigned gen;         /* the flight's timer_gen when armed */
};

struct flight {
    /* Set when made, then read-only (any thread): */
    const struct flight_env *env;
    struct flights *table;
    struct ctx *ctx;           /* child of env->root; canceled when decided or abandoned */
    unsigned loop;             /* the loop the run is on */
    bool hedge;
    uint64_t hash;             /* of key and hedge */
    atomic_uint refs;          /* the run's (until it winds down) + one per waiter */
    /* Under table->mu: */
    struct flight *tnext;      /* chain, while in the registry */
    bool in_table;
    bool closed;               /* decided or abandoned: never joined again */
    unsigned nwaiters;
    struct flight_waiter *waiters;
    struct flight_waiter *abandoner; /* the last waiter to leave: its callback waits until the
                                        run has wound down (waiter_fired()) */
    atomic_int_fast64_t deadline; /* the latest waiter's deadline (written under the mutex) */
    /* The flight's loop thread only (before its run is posted there, the starter's): */
    bool done;                 /* the outcome is decided (the rest only winds down) */
    uint8_t rank[UPSTREAMS_MAX]; /* the key's ranking of the upstreams */
    unsigned started;          /* attempts started (the next one's number) */
    unsigned retries;          /* retries started */
    unsigned pending;          /* attempts and timers (and a posted run) not yet called back */
    unsigned in_flight;        /* attempts not yet called back */
    unsigned hedges;           /* hedges sent (at most FLIGHT_MAX_HEDGES) */
    int64_t hedge_ms;          /* the hedge delay in use, or -1 */
    unsigned timer_gen;        /* timers armed before the latest one are stale */
    /* One attempt and one timer live here, so that a flight with no more out at once (most)
     * allocates none; further ones at the same time (a hedge, a stale hedge timer beside a
     * backoff) are malloc'd. */
    bool attempt_busy, timer_busy;
    struct attempt attempt;
    struct flight_timer timer;
    struct flight_outcome out; /* body malloc'd; detail a static text, or 'detail' */
    char *body, *detail;       /* what of them is malloc'd, writable */
    char rid[129];             /* request id sent upstream */
    size_t key_len;
    char key[];                /* the key's bytes */
};

static void attempt_done(void *arg, struct fetch_result *r);
static void timer_done(void *arg, struct fetch_result *r);
static void abandoner_fired(void *arg, struct fetch_result *r);

/* ---------------------------------------------------------------- registry */

struct flights *flights_new(void)
{
    struct flights *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->bucket = calloc(TABLE_MIN, sizeof(*t->bucket));
    if (!t->bucket) {
        free(t);
        return NULL;
    }
    t->nbuckets = TABLE_MIN;
    pthread_mutex_init(&t->mu, NULL);
    return t;
}

void flights_free(struct flights *t)
{
    if (!t)
        return;
    pthread_mutex_destroy(&t->mu);
    free(t->bucket);
    free(t);
}

static uint64_t key_hash(const char *key, size_t len, bool hedge)
{
    uint64_t h = 0xcbf29ce484222325ull ^ (hedge ? 0x9E3779B97F4A7C15ull : 0);
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 0x100000001b3ull;
    }
    return h ^ (h >> 29);
}

/* Mutex held. The open flight for the key, or NULL. */
static struct flight *table_find(struct flights *t, uint64_t h, const struct flight_params *p)
{
    for (struct flight *f = t->bucket[h & (t->nbuckets - 1)]; f; f = f->tnext)
        if (f->hash == h && f->hedge == p->hedge && f->key_len == p->key_len &&
            memcmp(f->key, p->key, p->key_len) == 0)
            return f;
    return NULL;
}

/* Mutex held. Doubles the buckets when the chains grow long (a failed allocation keeps them). */
static void table_grow(struct flights *t)
{
    size_t n = t->nbuckets * 2;
    struct flight **nb = calloc(n, sizeof(*nb));
    if (!nb)
        return;
    for (size_t i = 0; i < t->nbuckets; i++)
        for (struct flight *f = t->bucket[i], *next; f; f = next) {
            next = f->tnext;
            f->tnext = nb[f->hash & (n - 1)];
            nb[f->hash & (n - 1)] = f;
        }
    free(t->bucket);
    t->bucket = nb;
    t->nbuckets = n;
}

static void table_insert(struct flights *t, struct flight *f)
{
    if (t->count >= 2 * t->nbuckets)
        table_grow(t);
    struct flight **head = &t->bucket[f->hash & (t->nbuckets - 1)];
    f->tnext = *head;
    *head = f;
    f->in_table = true;
    t->count++;
}

static void table_remove(struct flights *t, struct flight *f)
{
    if (!f->in_table)
        return;
    for (struct flight **pp = &t->bucket[f->hash & (t->nbuckets - 1)]; *pp; pp = &(*pp)->tnext)
        if (*pp == f) {
            *pp = f->tnext;
            break;
        }
    f->in_table = false;
    t->count--;
}

/* ---------------------------------------------------------------- references */

static void flight_unref(struct flight *f)
{
    if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
        return;
    ctx_free(f->ctx);
    free(f->body);
    free(f->detail);
    free(f);
}

/* ---------------------------------------------------------------- the run (flight's loop) */

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

/* The outcome's error text: a static one (never copied), or NULL. */
static void set_detail(struct flight *f, const char *text)
{
    free(f->detail);
    f->detail = NULL;
    f->out.detail = text;
}

/* The same from a text valid only for now (an attempt's, from fetch): a copy. */
static void copy_detail(struct flight *f, const char *text)
{
    free(f->detail);
    f->detail = text ? strdup(text) : NULL;
    f->out.detail = f->detail;
}

/* Keeps an attempt's result as the flight's (latest) outcome, not yet decided. A success has
 * no error text. */
static void keep_result(struct flight *f, struct fetch_result *r)
{
    free(f->body);
    f->out.err = r->err;
    f->out.status = r->status;
    f->out.body = f->body = r->body;
    f->out.len = r->len;
    r->body = NULL;
    if (r->err == 0)
        set_detail(f, NULL);
    else
        copy_detail(f, r->detail);
}

/* The run is over once decided and nothing is out any more: the outcome goes to every waiter
 * (so a batch is answered only after the attempts it alone caused have ended and been counted:
 * aborted losers call back within the loop's next turn), the deferred callback of the last
 * waiter to leave is let go (see waiter_fired()), and the run drops its reference. */
static void maybe_finish(struct flight *f)
{
    if (!f->done || f->pending > 0)
        return;
    struct flights *t = f->table;
    pthread_mutex_lock(&t->mu);
    for (struct flight_waiter *w = f->waiters; w; w = w->next) {
        w->delivered = true;
        ctx_cancel(w->ctx, FLIGHT_DELIVERED); /* under the mutex: w cannot go away meanwhile */
    }
    f->waiters = NULL;
    f->nwaiters = 0;
    struct flight_waiter *ab = f->abandoner;
    f->abandoner = NULL;
    if (ab && ab->loop != f->loop) { /* its timer on its own loop calls it there */
        ctx_cancel(ab->defer, FLIGHT_DELIVERED); /* under the mutex, as above */
        ab = NULL;
    }
    pthread_mutex_unlock(&t->mu);
    if (ab)
        ab->cb(ab->arg, ab->cause); /* on the flight's loop, which is the waiter's */
    flight_unref(f); /* last: may free the flight */
}

/* The outcome is decided: no one joins any more; stop everything still out. */
static void decide(struct flight *f)
{
    struct flights *t = f->table;
    f->done = true;
    pthread_mutex_lock(&t->mu);
    table_remove(t, f);
    f->closed = true;
    pthread_mutex_unlock(&t->mu);
    if (f->pending > 0)
        ctx_cancel(f->ctx, -ECANCELED); /* losers and timers: aborted, they call back soon */
    maybe_finish(f);
}

/* The outcome of a flight cut short by its ctx (every waiter left, or shutdown). */
static void decide_canceled(struct flight *f, int cause)
{
    free(f->body);
    f->out.body = f->body = NULL;
    f->out.len = 0;
    f->out.status = 0;
    int e = ctx_err(f->ctx);
    f->out.err = e ? e : cause;
    set_detail(f, f->out.err == -ETIMEDOUT ? "deadline exceeded" : "canceled");
    decide(f);
}

/* Starts attempt number f->started, with the latest waiter's deadline. Returns 0, or an error
 * (nothing started). */
static int start_attempt(struct flight *f, bool hedge)
{
    const struct flight_env *env = f->env;
    unsigned up = upstreams_pick(env->ups, f->rank, f->started, ctx_now());
    char stack[URL_STACK], *url = stack;
    size_t n = upstream_url(env->ups, up, f->key, f->key_len, stack, sizeof(stack));
    if (n >= sizeof(stack)) {
        if (!(url = malloc(n + 1)))
            return -ENOMEM;
        upstream_url(env->ups, up, f->key, f->key_len, url, n + 1);
    }
    struct attempt *a = f->attempt_busy ? malloc(sizeof(*a)) : &f->attempt;
    int64_t deadline = atomic_load_explicit(&f->deadline, memory_order_relaxed);
    struct ctx *actx = a ? ctx_new(f->ctx, deadline) : NULL;
    int rc = -ENOMEM;
    if (actx) {
        *a = (struct attempt){.f = f, .ctx = actx, .up = up, .hedge = hedge};
        struct fetch_req fr = {.url = url, .request_id = f->rid, .cb = attempt_done, .arg = a};
        rc = fetch_get(env->fetch, f->loop, actx, &fr);
    }
    if (url != stack)
        free(url);
    if (rc != 0) {
        ctx_free(actx);
        if (a != &f->attempt)
            free(a);
        return rc;
    }
    if (a == &f->attempt)
        f->attempt_busy = true;
    f->started++;
    f->pending++;
    f->in_flight++;
    return 0;
}

static int arm_timer(struct flight *f, enum timer_kind kind, int64_t ms)
{
    struct flight_timer *t = f->timer_busy ? malloc(sizeof(*t)) : &f->timer;
    if (!t)
        return -ENOMEM;
    *t = (struct flight_timer){.f = f, .kind = kind, .gen = ++f->timer_gen};
    int rc = fetch_after(f->env->fetch, f->loop, f->ctx, ms, timer_done, t);
    if (rc != 0) {
        if (t != &f->timer)
            free(t);
        return rc;
    }
    if (t == &f->timer)
        f->timer_busy = true;
    f->pending++;
    return 0;
}

/* After a retryable failure with nothing else out: arms the backoff, if allowed. */
static bool try_retry(struct flight *f)
{
    const struct flight_env *env = f->env;
    if (f->retries >= env->retries || ctx_err(f->ctx) != 0)
        return false;
    uint64_t cap = ((uint64_t)1 << (f->retries + 1 < 20 ? f->retries + 1 : 20)) - 1;
    cap *= BACKOFF_BASE_MS;
    int64_t wait = (int64_t)jitter(cap < BACKOFF_MAX_MS ? cap : BACKOFF_MAX_MS);
    int64_t deadline = atomic_load_explicit(&f->deadline, memory_order_relaxed), now = ctx_now();
    if (deadline != CTX_FOREVER && now + wait >= deadline)
        return false; /* it could not even start before the deadline */
    if (!budget_withdraw(env->retry_budget, now)) {
        atomic_fetch_add_explicit(&env->metrics->retries_refused, 1, memory_order_relaxed);
        return false;
    }
    if (arm_timer(f, TIMER_BACKOFF, wait) != 0)
        return false;
    f->retries++;
    atomic_fetch_add_explicit(&env->metrics->retries_sent, 1, memory_order_relaxed);
    return true;
}

/* An attempt that ran into its own deadline while a waiter with a later one still waits (it
 * joined after the attempt started): one more attempt with the time that is left. */
static bool outlived(struct flight *f, const struct fetch_result *r)
{
    if (r->err != -ETIMEDOUT || ctx_err(f->ctx) != 0 || f->in_flight > 0)
        return false;
    int64_t deadline = atomic_load_explicit(&f->deadline, memory_order_relaxed);
    return deadline == CTX_FOREVER || deadline - ctx_now() > 1;
}

static void attempt_done(void *arg, struct fetch_result *r)
{
    struct attempt *a = arg;
    struct flight *f = a->f;
    const struct flight_env *env = f->env;
    bool hedge = a->hedge;
    f->pending--;
    f->in_flight--;
    struct outcome o = outcome_of(r->err, r->status, r->aborted);
    metrics_count_fetch(env->metrics, a->up, o.kind, r->elapsed_us);
    if (o.health != OUTCOME_NO_VERDICT)
        upstream_report(env->ups, a->up, o.health == OUTCOME_FAILED ? UPSTREAM_FAILED : UPSTREAM_OK,
                        r->err == 0 ? r->elapsed_us : -1, ctx_now());
    bool own_deadline = r->err == -ETIMEDOUT && ctx_err(a->ctx) != 0 && ctx_err(f->ctx) == 0;
    ctx_free(a->ctx);
    if (a == &f->attempt)
        f->attempt_busy = false;
    else
        free(a);
    if (f->done) { /* a loser, aborted or late: its body is not wanted */
        free(r->body);
        r->body = NULL;
        maybe_finish(f);
        return;
    }
    if ((own_deadline || !r->aborted) && outlived(f, r) && start_attempt(f, false) == 0)
        return;
    if (r->aborted && !own_deadline) {
        free(r->body);
        r->body = NULL;
        decide_canceled(f, r->err);
        return;
    }
    keep_result(f, r);
    if (r->err == 0) {
        if (hedge)
            atomic_fetch_add_explicit(&env->metrics->hedges_won, 1, memory_order_relaxed);
        decide(f);
        return;
    }
    if (f->in_flight > 0)
        return; /* a hedge is still out and may answer */
    if (o.retryable && try_retry(f))
        return;
    decide(f);
}

static void timer_done(void *arg, struct fetch_result *r)
{
    struct flight_timer *t = arg;
    struct flight *f = t->f;
    bool stale = t->gen != f->timer_gen;
    enum timer_kind kind = t->kind;
    if (t == &f->timer)
        f->timer_busy = false;
    else
        free(t);
    f->pending--;
    if (f->done) {
        maybe_finish(f);
        return;
    }
    if (r->aborted || r->err != 0) {
        if (kind == TIMER_BACKOFF || f->in_flight == 0)
            decide_canceled(f, r->err);
        return; /* a hedge timer stopped early: the attempt in flight reports the cause */
    }
    const struct flight_env *env = f->env;
    if (kind == TIMER_BACKOFF && !stale) {
        int rc = start_attempt(f, false);
        if (rc != 0) {
            f->out.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : f->out.err;
            decide(f);
        }
        return;
    }
    if (kind == TIMER_HEDGE && !stale && f->hedges < FLIGHT_MAX_HEDGES && f->in_flight > 0) {
        if (!budget_withdraw(env->hedge_budget, ctx_now())) {
            atomic_fetch_add_explicit(&env->metrics->hedges_refused, 1, memory_order_relaxed);
            f->hedges = FLIGHT_MAX_HEDGES; /* no more for this flight */
            return;
        }
        if (start_attempt(f, true) != 0)
            return;
        f->hedges++;
        atomic_fetch_add_explicit(&env->metrics->hedges_sent, 1, memory_order_relaxed);
        /* The next one after half the delay: the attempts out have been pending for the whole
         * delay and more, so the id is already in its tail (with one hedge, an attempt and its
         * hedge that both land in the tail would hold the batch for two delays). */
        if (f->hedges < FLIGHT_MAX_HEDGES)
            arm_timer(f, TIMER_HEDGE, f->hedge_ms > 1 ? f->hedge_ms / 2 : 1);
    }
}

/* The hedge delay for a flight whose first attempt went to 'up', or -1 for no hedge. */
static int64_t hedge_delay(const struct flight *f, unsigned up)
{
    const struct flight_env *env = f->env;
    if (!f->hedge)
        return -1;
    if (!env->hedge_auto)
        return env->hedge_after_ms > 0 ? env->hedge_after_ms : -1;
    int64_t us = upstream_p95_us(env->ups, up);
    return us < 0 ? -1 : (us + 999) / 1000;
}

/* A new flight that could not be started: the outcome is that error, decided (and so delivered
 * to the waiters linked). */
static void fail_start(struct flight *f, int rc)
{
    f->out.err = rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : rc;
    set_detail(f, "could not start the fetch");
    decide(f);
}

/* Starts a new flight's run on its loop. On failure the outcome is that error, decided (and so
 * delivered to the waiter already linked). */
static void run(struct flight *f)
{
    const struct flight_env *env = f->env;
    upstreams_rank(env->ups, f->key, f->key_len, f->rank);
    budget_deposit(env->hedge_budget, ctx_now());
    budget_deposit(env->retry_budget, ctx_now());
    int rc = start_attempt(f, false);
    if (rc != 0) {
        fail_start(f, rc);
        return;
    }
    f->hedge_ms = hedge_delay(f, upstreams_pick(env->ups, f->rank, 0, ctx_now()));
    if (f->hedge_ms >= 0)
        arm_timer(f, TIMER_HEDGE, f->hedge_ms); /* without it, simply no hedge */
}

/* A run posted to the flight's loop by a starter on another one, now on the flight's loop. When
 * every waiter has left meanwhile (the flight's ctx is done), or the engine is stopping, the
 * flight is decided canceled without an attempt. */
static void run_posted(void *arg, struct fetch_result *r)
{
    struct flight *f = arg;
    f->pending--;
    if (r->err != 0 || ctx_err(f->ctx) != 0) {
        decide_canceled(f, r->err == FETCH_ESHUTDOWN ? -ESHUTDOWN : r->err);
        return;
    }
    run(f);
}

/* ---------------------------------------------------------------- waiters */

/* Mutex held. */
static void link_waiter(struct flight *f, struct flight_waiter *w, int64_t deadline)
{
    w->f = f;
    w->prev = NULL;
    w->next = f->waiters;
    if (f->waiters)
        f->waiters->prev = w;
    f->waiters = w;
    f->nwaiters++;
    int64_t d = atomic_load_explicit(&f->deadline, memory_order_relaxed);
    if (d != CTX_FOREVER && (deadline == CTX_FOREVER || deadline > d))
        atomic_store_explicit(&f->deadline, deadline, memory_order_relaxed);
}

/* Mutex held. Returns true when 'w' was the last waiter of an undecided flight, which is then
 * closed (out of the registry) and must be canceled by the caller. */
static bool unlink_waiter(struct flight *f, struct flight_waiter *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        f->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
    if (--f->nwaiters > 0 || f->closed)
        return false;
    table_remove(f->table, f);
    f->closed = true;
    return true;
}

/* Mutex held. For the last waiter of an undecided flight on another loop: a timer on the
 * waiter's loop, bound to a ctx of the waiter's that maybe_finish() cancels once the run has
 * wound down. Returns 0, or an error (nothing armed: the engine is stopping, or no memory). */
static int defer_arm(struct flight *f, struct flight_waiter *w)
{
    if (!(w->defer = ctx_new(ctx_background(), CTX_FOREVER)))
        return -ENOMEM;
    int rc = fetch_after(f->env->fetch, w->loop, w->defer, INT64_MAX, abandoner_fired, w);
    if (rc != 0) {
        ctx_free(w->defer);
        w->defer = NULL;
    }
    return rc;
}

/* The deferral timer of a last waiter on another loop than its flight's, on the waiter's loop:
 * the run has wound down (maybe_finish() canceled 'defer'), or the engine is stopping (every
 * timer completes then) and the callback no longer waits for the run. */
static void abandoner_fired(void *arg, struct fetch_result *r)
{
    struct flight_waiter *w = arg;
    struct flights *t = w->f->table;
    (void)r;
    pthread_mutex_lock(&t->mu);
    if (w->f->abandoner == w) /* not let go by maybe_finish(): it must not touch w any more */
        w->f->abandoner = NULL;
    pthread_mutex_unlock(&t->mu);
    ctx_free(w->defer);
    w->defer = NULL;
    w->cb(w->arg, w->cause);
}

/* The waiter's timer: the outcome was delivered, or the caller's ctx ended first. The last
 * waiter to leave an undecided flight cancels it with its own cause (so an attempt cut by the
 * deadline counts as a deadline, one cut by a failed sibling as canceled), and its callback waits
 * for the run to wind down, so a lone batch is answered after its attempts have ended and been
 * counted, as when the flight delivers: on the flight's loop, maybe_finish() calls it; on another
 * loop, maybe_finish() ends a timer armed here on the waiter's loop (defer_arm()), which calls it
 * there. When that timer cannot be armed, the callback runs now. */
static void waiter_fired(void *arg, struct fetch_result *r)
{
    struct flight_waiter *w = arg;
    struct flight *f = w->f;
    struct flights *t = f->table;
    int cause = ctx_err(w->ctx);
    if (cause == 0 || cause == FETCH_ESHUTDOWN)
        cause = r->err == 0 || r->err == FETCH_ESHUTDOWN ? -ESHUTDOWN : r->err;
    bool abandon = false, wait = false;
    pthread_mutex_lock(&t->mu);
    bool delivered = w->delivered;
    if (!delivered && (abandon = unlink_waiter(f, w))) {
        w->cause = cause;
        if (w->loop == f->loop || defer_arm(f, w) == 0) {
            f->abandoner = w;
            wait = true;
        }
    }
    pthread_mutex_unlock(&t->mu);
    if (abandon) {
        atomic_fetch_add_explicit(&f->env->metrics->flights_abandoned, 1, memory_order_relaxed);
        ctx_cancel(f->ctx, cause); /* our reference keeps f alive here */
    }
    if (!wait)
        w->cb(w->arg, delivered ? 0 : cause);
}

/* A new flight with two references (its run's and its first waiter's). */
static struct flight *flight_alloc(const struct flight_env *env, const struct flight_params *p,
                                   uint64_t hash, int64_t deadline)
{
    struct flight *f = calloc(1, sizeof(*f) + p->key_len);
    if (!f)
        return NULL;
    f->ctx = ctx_new(env->root, CTX_FOREVER);
    if (!f->ctx) {
        free(f);
        return NULL;
    }
    f->env = env;
    f->table = env->flights;
    f->hash = hash;
    f->loop = p->run_loop;
    f->hedge = p->hedge;
    f->hedge_ms = -1;
    f->key_len = p->key_len;
    memcpy(f->key, p->key, p->key_len);
    size_t rl = p->rid ? strlen(p->rid) : 0;
    if (rl >= sizeof(f->rid))
        rl = sizeof(f->rid) - 1;
    memcpy(f->rid, p->rid ? p->rid : "", rl);
    atomic_init(&f->refs, 2);
    atomic_init(&f->deadline, deadline);
    return f;
}

int flight_wait(const struct flight_env *env, struct ctx *parent, const struct flight_params *p,
                struct flight_waiter *w, flight_wait_fn cb, void *arg)
{
    *w = (struct flight_waiter){.cb = cb, .arg = arg, .loop = p->loop};
    if (!(w->ctx = ctx_new(parent, CTX_FOREVER)))
        return -ENOMEM;
    struct flights *t = env->flights;
    int64_t deadline = ctx_deadline(parent);
    uint64_t h = key_hash(p->key, p->key_len, p->hedge);
    pthread_mutex_lock(&t->mu);
    struct flight *f = p->coalesce ? table_find(t, h, p) : NULL;
    if (f) {
        atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
        w->joined = true;
    } else if ((f = flight_alloc(env, p, h, deadline)) && p->coalesce) {
        table_insert(t, f); /* under the same lock as the lookup: one flight per key */
    }
    if (f)
        link_waiter(f, w, deadline);
    pthread_mutex_unlock(&t->mu);
    int rc = f ? fetch_after(env->fetch, p->loop, w->ctx, INT64_MAX, waiter_fired, w) : -ENOMEM;
    if (rc != 0) { /* undo: leave; a new flight fails at once, for any call that joined it */
        if (f && !w->joined) {
            /* Decided with ours still linked (no one else can have been the last to leave):
             * nothing is out, so it is delivered now (ours unlinked with the rest), and the
             * run's reference dropped. */
            fail_start(f, rc);
        } else if (f) {
            pthread_mutex_lock(&t->mu);
            bool abandon = unlink_waiter(f, w);
            pthread_mutex_unlock(&t->mu);
            if (abandon)
                ctx_cancel(f->ctx, -ECANCELED); /* its run winds down on its own loop */
        }
        if (f)
            flight_unref(f);
        ctx_free(w->ctx);
        *w = (struct flight_waiter){0};
        return rc;
    }
    if (w->joined) {
        atomic_fetch_add_explicit(&env->metrics->flights_joined, 1, memory_order_relaxed);
        return 0;
    }
    atomic_fetch_add_explicit(&env->metrics->flights_started, 1, memory_order_relaxed);
    if (f->loop == p->loop) {
        run(f);
        return 0;
    }
    /* Another loop's: its run starts there. Until the post is out, this thread is the only one
     * touching the run's fields; once it is, only that loop's. */
    f->pending = 1;
    rc = fetch_after(env->fetch, f->loop, f->ctx, 0, run_posted, f);
    if (rc != 0) {
        f->pending = 0;
        fail_start(f, rc); /* ours still linked: delivered to it (and any joiner) */
    }
    return 0;
}

const struct flight_outcome *flight_outcome(const struct flight_waiter *w)
{
    return &w->f->out;
}

void flight_release(struct flight_waiter *w)
{
    if (!w->f)
        return;
    ctx_free(w->ctx);
    flight_unref(w->f);
    *w = (struct flight_waiter){0};
}
