/* flight: a key's fetch shared by its waiters (flight.h); the attempts themselves are
 * attempt.h's.
 *
 * Life of a flight: flight_wait() finds no open flight for the key (or coalescing is off), makes
 * one with two references (its run's and its first waiter's) and puts it in the registry. Its
 * run then starts on the flight's loop: at once, from inside flight_wait(), when that is the
 * caller's loop; otherwise through a zero-delay fetch_after() on the flight's loop bound to the
 * flight's ctx ('posted' until it runs), so that it starts on that loop's thread, or, when every
 * waiter has left by then, decides the flight canceled without an attempt. The run is the key's
 * attempts (struct attempts, bound to the flight's ctx): they tell the flight when the outcome
 * is decided (the flight leaves the registry; the attempts then cancel the flight's ctx, which
 * aborts every attempt and timer still out) and when they have wound down (every attempt and
 * timer called back). Decided and wound down, the flight marks every waiter delivered, cancels
 * each waiter's event with 0 (the callback then runs on the waiter's loop), and the run drops
 * its reference.
 *
 * A waiter is a one-shot loop event on the caller's loop (fetch.h: no allocation, no ctx of its
 * own), fired by whichever comes first: the flight delivering (cause 0), or a hook on the
 * caller's ctx when that ends (its cause). Cancelling a batch thus wakes exactly its waiters,
 * and a delivery exactly the flight's, never a scan of the loop. A waiter woken by its ctx
 * unlinks itself; the last one to leave an undecided flight takes it out of the registry and
 * cancels its ctx, and its callback waits for the run to wind down (flight.h): on the flight's
 * loop maybe_finish() calls it; on another loop the waiter arms a second event on its own loop
 * ('defer') that maybe_finish() fires, and the callback runs from it. A flight's memory (its outcome included) is freed when the last reference is
 * dropped: the run's, or the last waiter's flight_release().
 *
 * A new flight that cannot be started (its first waiter's event, the post to its loop, or its
 * first attempt fails) is decided by the flight itself, before anything of its run is out, and
 * while the starter's waiter is still linked: so no other waiter can have become its last to
 * leave, and no deferred callback is called from the wrong thread. */
#include "server/batch/flight.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/attempt.h"
#include "server/obs/metrics.h"

#define TABLE_MIN 256         /* registry buckets to begin with (a power of two) */

struct flights {
    pthread_mutex_t mu;
    struct flight **bucket; /* chains of open flights */
    size_t nbuckets;        /* a power of two */
    size_t count;           /* flights in the chains */
};

struct flight {
    /* Set when made, then read-only (any thread): */
    const struct flight_env *env;
    struct flights *table;
    struct ctx *ctx;           /* child of env->root; canceled when decided or abandoned */
    struct upstreams *ups;     /* the upstream set's snapshot when it was made (a reference):
                                  its attempts rank and pick from it to the end */
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
    bool posted;               /* the run is posted to the flight's loop and has not begun */
    bool running;              /* the attempts started and have not wound down */
    struct flight_outcome out; /* the attempts' (body and detail theirs), or the flight's own
                                  (no body, a static detail) */
    struct attempts att;       /* the key's attempts */
    char rid[129];             /* request id sent upstream */
    size_t key_len;
    char key[];                /* the key's bytes */
};

static void abandoner_fired(void *arg, int cause);

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
    attempts_destroy(&f->att);
    upstreams_free(f->ups);
    ctx_free(f->ctx);
    free(f);
}

/* ---------------------------------------------------------------- the run (flight's loop) */

/* The run is over once decided and nothing is out any more: the outcome goes to every waiter
 * (so a batch is answered only after the attempts it alone caused have ended and been counted:
 * aborted losers call back within the loop's next turn), the deferred callback of the last
 * waiter to leave is let go (see waiter_fired()), and the run drops its reference. */
static void maybe_finish(struct flight *f)
{
    if (!f->done || f->posted || f->running)
        return;
    struct flights *t = f->table;
    pthread_mutex_lock(&t->mu);
    for (struct flight_waiter *w = f->waiters; w; w = w->next) {
        w->delivered = true;
        if (w->armed) /* else flight_wait() fires it as it arms it */
            fetch_event_fire(f->env->fetch, &w->ev, 0); /* under the mutex: w stays */
    }
    f->waiters = NULL;
    f->nwaiters = 0;
    struct flight_waiter *ab = f->abandoner;
    f->abandoner = NULL;
    if (ab && ab->loop != f->loop) { /* its timer on its own loop calls it there */
        fetch_event_fire(f->env->fetch, &ab->defer, 0); /* under the mutex, as above */
        ab = NULL;
    }
    pthread_mutex_unlock(&t->mu);
    if (ab)
        ab->cb(ab->arg, ab->cause); /* on the flight's loop, which is the waiter's */
    flight_unref(f); /* last: may free the flight */
}

/* The outcome is decided: no one joins any more. */
static void close_flight(struct flight *f)
{
    struct flights *t = f->table;
    f->done = true;
    pthread_mutex_lock(&t->mu);
    table_remove(t, f);
    f->closed = true;
    pthread_mutex_unlock(&t->mu);
}

/* An outcome of the flight's own, with nothing of the run out: decided and delivered. */
static void decide_without_run(struct flight *f, int err, const char *detail)
{
    f->out = (struct flight_outcome){.err = err, .detail = detail};
    close_flight(f);
    maybe_finish(f);
}

/* A new flight that could not be started: the outcome is that error (delivered to the waiters
 * linked). */
static void fail_start(struct flight *f, int rc)
{
    if (rc == FETCH_EUNREACH) /* the key's upstream has no member */
        decide_without_run(f, rc, attempts_no_member(&f->att));
    else
        decide_without_run(f, rc == FETCH_ESHUTDOWN ? -ESHUTDOWN : rc, "could not start the fetch");
}

/* The attempts decided: their outcome (valid until attempts_destroy()) is the flight's. */
static void run_decided(void *arg, const struct flight_outcome *o)
{
    struct flight *f = arg;
    f->out = *o;
    close_flight(f);
}

/* The attempts have wound down: the outcome is delivered. */
static void run_wound_down(void *arg)
{
    struct flight *f = arg;
    f->running = false;
    maybe_finish(f); /* may free the flight */
}

/* The latest waiter's deadline, for each attempt and backoff as it starts. */
static int64_t run_deadline(void *arg)
{
    const struct flight *f = arg;
    return atomic_load_explicit(&f->deadline, memory_order_relaxed);
}

static const struct attempts_owner flight_owner = {
    .decided = run_decided,
    .wound_down = run_wound_down,
    .deadline = run_deadline,
};

/* Starts a new flight's run on its loop. On failure the outcome is that error, decided (and so
 * delivered to the waiter already linked). */
static void run(struct flight *f)
{
    int rc = attempts_start(&f->att);
    if (rc != 0) {
        fail_start(f, rc);
        return;
    }
    f->running = true; /* nothing of the attempts calls back from inside attempts_start() */
}

/* A run posted to the flight's loop by a starter on another one, now on the flight's loop. When
 * every waiter has left meanwhile (the flight's ctx is done), or the engine is stopping, the
 * flight is decided canceled without an attempt. */
static void run_posted(void *arg, struct fetch_result *r)
{
    struct flight *f = arg;
    f->posted = false;
    if (r->err != 0 || ctx_err(f->ctx) != 0) {
        int e = ctx_err(f->ctx);
        int err = e ? e : r->err == FETCH_ESHUTDOWN ? -ESHUTDOWN : r->err;
        decide_without_run(f, err, err == -ETIMEDOUT ? "deadline exceeded" : "canceled");
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

/* Mutex held. For the last waiter of an undecided flight on another loop: an event on the
 * waiter's loop that maybe_finish() fires once the run has wound down. Returns 0, or
 * FETCH_ESHUTDOWN (nothing armed: the engine is stopping). */
static int defer_arm(struct flight *f, struct flight_waiter *w)
{
    return fetch_event_init(f->env->fetch, w->loop, &w->defer, abandoner_fired, w);
}

/* The deferral of a last waiter on another loop than its flight's, on the waiter's loop: the
 * run has wound down (maybe_finish() fired it), or the engine is stopping (it ends every armed
 * event) and the callback no longer waits for the run. */
static void abandoner_fired(void *arg, int cause)
{
    struct flight_waiter *w = arg;
    struct flights *t = w->f->table;
    (void)cause;
    pthread_mutex_lock(&t->mu);
    if (w->f->abandoner == w) /* not let go by maybe_finish(): it must not touch w any more */
        w->f->abandoner = NULL;
    pthread_mutex_unlock(&t->mu);
    w->cb(w->arg, w->cause);
}

/* The caller's ctx ended (on whichever thread ended it): wake the waiter on its loop. */
static void waiter_hook(void *arg)
{
    struct flight_waiter *w = arg;
    fetch_event_fire(w->f->env->fetch, &w->ev, ctx_err(w->parent));
}

/* The waiter's event: the outcome was delivered, or the caller's ctx ended first. The last
 * waiter to leave an undecided flight cancels it with its own cause (so an attempt cut by the
 * deadline counts as a deadline, one cut by a failed sibling as canceled), and its callback waits
 * for the run to wind down, so a lone batch is answered after its attempts have ended and been
 * counted, as when the flight delivers: on the flight's loop, maybe_finish() calls it; on another
 * loop, maybe_finish() ends a timer armed here on the waiter's loop (defer_arm()), which calls it
 * there. When that timer cannot be armed, the callback runs now. */
static void waiter_fired(void *arg, int cause)
{
    struct flight_waiter *w = arg;
    struct flight *f = w->f;
    struct flights *t = f->table;
    ctx_hook_remove(w->parent, &w->hook); /* no fire from it after this (it may be running) */
    w->hooked = false;
    if (cause == 0 || cause == FETCH_ESHUTDOWN) /* 0 here with no delivery: cannot be */
        cause = -ESHUTDOWN;
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

/* The flight's attempts, bound to its ctx, key and loop, with the policy's part of its env. */
static void init_attempts(struct flight *f)
{
    const struct flight_env *env = f->env;
    struct attempt_env ae = {.fetch = env->fetch,
                             .ups = f->ups,
                             .live = env->ups,
                             .hedge_budget = env->hedge_budget,
                             .retry_budget = env->retry_budget,
                             .metrics = env->metrics,
                             .hedge_after_ms = env->hedge_after_ms,
                             .hedge_auto = env->hedge_auto,
                             .retries = env->retries};
    struct attempts_params ap = {.ctx = f->ctx,
                                 .loop = f->loop,
                                 .key = f->key,
                                 .key_len = f->key_len,
                                 .rid = f->rid,
                                 .hedge = f->hedge,
                                 .owner = &flight_owner,
                                 .owner_arg = f};
    attempts_init(&f->att, &ae, &ap);
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
    f->ups = upstream_live_get(env->ups);
    f->env = env;
    f->table = env->flights;
    f->hash = hash;
    f->loop = p->run_loop;
    f->hedge = p->hedge;
    f->key_len = p->key_len;
    memcpy(f->key, p->key, p->key_len);
    size_t rl = p->rid ? strlen(p->rid) : 0;
    if (rl >= sizeof(f->rid))
        rl = sizeof(f->rid) - 1;
    memcpy(f->rid, p->rid ? p->rid : "", rl);
    init_attempts(f);
    atomic_init(&f->refs, 2);
    atomic_init(&f->deadline, deadline);
    return f;
}

int flight_wait(const struct flight_env *env, struct ctx *parent, const struct flight_params *p,
                struct flight_waiter *w, flight_wait_fn cb, void *arg)
{
    *w = (struct flight_waiter){.cb = cb, .arg = arg, .loop = p->loop, .parent = parent};
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
    int rc = f ? fetch_event_init(env->fetch, p->loop, &w->ev, waiter_fired, w) : -ENOMEM;
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
        *w = (struct flight_waiter){0};
        return rc;
    }
    pthread_mutex_lock(&t->mu); /* armed: a delivery from now on fires it; one before did not */
    w->armed = true;
    if (w->delivered)
        fetch_event_fire(env->fetch, &w->ev, 0);
    pthread_mutex_unlock(&t->mu);
    w->hooked = true; /* the parent's end fires it too (at once, if it is over already) */
    ctx_hook_add(parent, &w->hook, waiter_hook, w);
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
    f->posted = true;
    rc = fetch_after(env->fetch, f->loop, f->ctx, 0, run_posted, f);
    if (rc != 0) {
        f->posted = false;
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
    if (w->hooked)
        ctx_hook_remove(w->parent, &w->hook);
    flight_unref(w->f);
    *w = (struct flight_waiter){0};
}
