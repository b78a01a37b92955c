/* flight: the fetch of one key, shared by every call that asks for the same key while it runs
 * (coalescing across requests). The fetch itself is the key's attempts, hedges and retries
 * (attempt.h: their policy); a flight keeps the registry of running flights, its waiters, their
 * deadlines, and delivers the outcome.
 *
 * A call waits on a flight: it joins the flight running for its key (same key encoding, same
 * hedging), or starts a new one on the loop its batch names for it. The flight has its own ctx
 * (a child of the server's root, no deadline of its own), so no waiter's cancel or deadline
 * reaches it: a waiter that leaves (its batch failed or was canceled, its client went away, its
 * deadline passed) only drops its reference, and the flight is canceled when its last waiter has
 * left. The flight's deadline is the latest of its waiters' deadlines: each attempt starts with
 * it (attempt.h), so an attempt that reaches its own while a later waiter still waits is
 * followed by one with the rest of that waiter's time. A flight that has its outcome, or that
 * every waiter left, is out of the registry at once: it is never joined, a later call starts a
 * new flight, and no result outlives its flight (this is coalescing, not a cache).
 *
 * Threads: a flight runs on the loop its starter names (flight_params.run_loop: the starter's
 * own, or another one when a large batch spreads its flights over the loops); its attempts run
 * on that loop's thread. Its waiters may be on any loop, and each waiter's callback runs on the
 * waiter's own loop, never on the flight's when they differ. A flight whose loop is the
 * starter's runs from inside flight_wait(); one on another loop is posted there and starts on
 * that loop's thread. The registry, each flight's list of waiters and its deadline are guarded
 * by the registry's mutex (the deadline is also read, without it, as each attempt starts); its
 * key, loop and ctx are set when it is made; everything else of a flight belongs to its loop
 * thread. A flight is freed by whoever drops its last reference: its run once wound down, or
 * the last waiter's flight_release(), on that one's thread.
 *
 * The last waiter to leave an undecided flight gets its callback only once the run has wound
 * down (every attempt and timer called back and counted), so a batch that alone caused a
 * flight is answered after that flight's attempts have ended, whatever loop each is on: on the
 * flight's loop the callback is called there when the run ends; on another loop, an event armed
 * on the waiter's loop when it left is fired by the run's end, and its callback runs there. Only
 * when that event cannot be armed (the engine stopping), or when the engine stops first, does
 * the callback come before the run has wound down.
 *
 * A waiter costs no allocation and no ctx of its own: it is the caller's memory (struct
 * flight_waiter), woken by a one-shot loop event (fetch.h) that the delivery or a hook on the
 * caller's ctx fires, whichever comes first. */
#ifndef FANOUT_FLIGHT_H
#define FANOUT_FLIGHT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "server/batch/result.h"

struct budget;
struct ctx;
struct fetch;
struct flight;
struct flights;
struct metrics;
struct upstream_live;

/* What every flight runs with: the server's, read-only, shared by all flights. Each flight
 * hands its attempts their part (attempt.h: struct attempt_env). */
struct flight_env {
    struct fetch *fetch;          /* the engine */
    struct upstream_live *ups;    /* where keys are fetched from: each flight reads the
                                     snapshot current when it starts, to its end */
    struct ctx *root;             /* parent of every flight's ctx (canceled at shutdown) */
    struct budget *hedge_budget;  /* shared by all flights */
    struct budget *retry_budget;  /* shared by all flights */
    struct metrics *metrics;      /* fetch, hedge, retry, flight and per-upstream counters */
    struct flights *flights;      /* the registry of running flights, for coalescing */
    int64_t hedge_after_ms;       /* fixed hedge delay; 0: off (unless hedge_auto) */
    bool hedge_auto;              /* hedge after the first member's recent latency percentile */
    unsigned retries;             /* extra attempts after a retryable failure */
};

/* What a call asks for. */
struct flight_params {
    const char *key;    /* the id's encoding (the registry key, with 'hedge') */
    size_t key_len;
    bool hedge;         /* hedging on for this call's batch */
    bool coalesce;      /* may join a running flight, and be joined */
    const char *rid;    /* request id sent upstream (a new flight keeps the starter's) */
    unsigned loop;      /* the caller's fetch loop: its callback runs there */
    unsigned run_loop;  /* the loop a new flight runs on: 'loop', or another one (spreading) */
};

/* A waiter's callback: 'cause' is 0 when the outcome is there (flight_outcome()), or the
 * cause that made the waiter leave first (its ctx's: -ETIMEDOUT, -ECANCELED, -EPIPE, ...). */
typedef void (*flight_wait_fn)(void *arg, int cause);

/* One call's wait on a flight (the caller's memory, until flight_release()). */
struct flight_waiter {
    struct flight *f;                  /* the flight waited on (a reference) */
    struct ctx *parent;                /* the caller's ctx (the caller's; it outlives the wait) */
    struct ctx_hook hook;              /* on 'parent': fires 'ev' with its cause when it ends */
    struct fetch_event ev;             /* the wake-up on the caller's loop: fired with 0 when the
                                          outcome is delivered, or with the parent's cause */
    struct flight_waiter *prev, *next; /* in the flight's list (registry mutex) */
    bool delivered;                    /* the outcome was set while in the list (mutex) */
    bool joined;                       /* joined a flight another call started */
    bool armed;                        /* 'ev' is armed: a delivery fires it (mutex) */
    bool hooked;                       /* 'hook' was added */
    unsigned loop;                     /* the caller's loop */
    int cause;                         /* why it left, for a callback deferred to the run's end */
    struct fetch_event defer;          /* that deferral, when the flight is on another loop: fired
                                          by the run's end, on the caller's loop */
    flight_wait_fn cb;
    void *arg;
};

/* The registry of running flights. */
struct flights *flights_new(void);
void flights_free(struct flights *t); /* every flight must have ended */

/* Waits for the key's flight, joining the running one or starting one on p->run_loop, bound to
 * 'parent' (the caller's ctx; its deadline is the waiter's). Must be called on p->loop's thread.
 * Returns 0, and cb(arg, cause) runs exactly once on that thread, never from inside
 * flight_wait(); or -ENOMEM / FETCH_ESHUTDOWN, and nothing was started or joined. A new flight
 * that cannot be posted to its loop is decided at once with that error (its waiters get it). */
int flight_wait(const struct flight_env *env, struct ctx *parent, const struct flight_params *p,
                struct flight_waiter *w, flight_wait_fn cb, void *arg);

/* The outcome (result.h), once cb was called with 0: valid until flight_release(). */
const struct flight_outcome *flight_outcome(const struct flight_waiter *w);

/* Drops the waiter's reference (after its callback; also with no flight, a no-op). */
void flight_release(struct flight_waiter *w);

#endif
