/* call: one distinct key of a batch, fetched by one or more attempts.
 *
 * A call owns a ctx (a child of its batch's group ctx) and the attempts made for it, each with
 * its own ctx (a child of the call's) and URL. The policy lives here, in one place:
 *   - the first attempt goes to the key's first upstream (upstream.h);
 *   - a hedge: when no answer has come within the hedge delay (fixed, or the first upstream's
 *     recent p95), and the hedge budget has a token, one more attempt goes to the next upstream
 *     (replicas) or the same one (shards), and again after each further delay, up to
 *     CALL_MAX_HEDGES; the first good answer wins and every other attempt is aborted at once;
 *   - a retry: an attempt that failed with a transport error or 502/503/504, when no other
 *     attempt is pending, retries left, the retry budget has a token and the deadline allows,
 *     is followed after a jittered exponential backoff (uniform in [0, (2^k - 1) * 25 ms],
 *     capped at 250 ms) by an attempt to the next upstream;
 *   - anything else (a 4xx, a 500, a body too large, the deadline, a cancel) is final.
 * Every outcome of an attempt that reached the upstream is reported to upstream.h (ejection,
 * latency) and counted in the metrics, by upstream.
 *
 * Threads: a call lives on its batch's fetch loop thread; every function here runs there. */
#ifndef FANOUT_CALL_H
#define FANOUT_CALL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fetch/upstream.h"

struct batch;
struct ctx;
struct eg;

/* Hedges per call: each time the delay passes with no answer, one more attempt, this many at
 * most (so an attempt and its hedge both landing in the tail cannot hold a batch back). */
#define CALL_MAX_HEDGES 2

/* The response would pass --max-response-bytes. */
#define CALL_ERESPONSE (-3001)

/* How a call ended. */
struct call_result {
    int err;        /* 0, FETCH_E*, CALL_ERESPONSE, -ETIMEDOUT, or a cancel cause */
    long status;    /* upstream status of the deciding attempt (0 if none answered) */
    char *body;     /* its body (malloc'd; success and FETCH_ESTATUS), or NULL */
    size_t len;     /* body length */
    char *detail;   /* error text (malloc'd) or NULL */
    bool decided;   /* the call has an outcome (false: it never started or was cut short) */
    int8_t valid;   /* for rendering: body is JSON -1 unknown, 0 no, 1 yes */
    size_t vstart, vend; /* the JSON value's span in body when valid */
};

struct call {
    struct batch *b;           /* owner */
    uint32_t idx;              /* index in the plan */
    struct ctx *ctx;           /* child of the group ctx; NULL before the call starts */
    uint8_t rank[UPSTREAMS_MAX]; /* the key's ranking of the upstreams */
    unsigned started;          /* attempts started (the next one's number) */
    unsigned retries;          /* retries started */
    unsigned pending;          /* attempts and timers not yet called back */
    unsigned in_flight;        /* attempts not yet called back */
    bool done;                 /* the outcome is decided (the rest only winds down) */
    unsigned hedges;           /* hedges sent (at most CALL_MAX_HEDGES) */
    int64_t hedge_ms;          /* the hedge delay in use, or -1 */
    unsigned timer_gen;        /* timers armed before the latest one are stale */
    bool completed;            /* the errgroup was told */
    struct call_result res;    /* the outcome */
};

/* The errgroup start function of a call (arg: the call). */
int call_start(struct eg *g, struct ctx *c, void *arg);

/* Releases what the call holds (after the group ended). */
void call_destroy(struct call *c);

#endif
