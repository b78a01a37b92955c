/* call: one distinct key of a batch, as a batch sees it: a wait on the key's flight.
 *
 * A call waits, bound to its batch's group ctx, on the flight that fetches its
 * key (flight.h: attempts, hedges, retries, shared with other batches when coalescing is on).
 * When the flight's outcome arrives the call takes it for its positions, counts its size
 * against --max-response-bytes and tells the errgroup; a call whose ctx ends first (the batch
 * failed or was canceled, the client went away, the deadline) leaves the flight, which goes on
 * for its other waiters, and reports that cause.
 *
 * Threads: a call lives on its batch's fetch loop thread; every function here runs there, its
 * flight's callback included, also when the flight itself runs on another loop. */
#ifndef FANOUT_CALL_H
#define FANOUT_CALL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/flight.h"

struct batch;
struct ctx;
struct eg;

#define CALL_MAX_HEDGES FLIGHT_MAX_HEDGES

/* The response would pass --max-response-bytes. */
#define CALL_ERESPONSE (-3001)

/* How a call ended. */
struct call_result {
    int err;        /* 0, FETCH_E*, CALL_ERESPONSE, -ETIMEDOUT, or a cancel cause */
    long status;    /* upstream status of the deciding attempt (0 if none answered) */
    const char *body; /* its body (the flight's; success and FETCH_ESTATUS), or NULL */
    size_t len;     /* body length */
    const char *detail; /* error text (static, or the flight's outcome's, valid until
                           call_destroy()) or NULL */
    bool decided;   /* the call has an outcome (false: it never started or was cut short) */
    int8_t valid;   /* for rendering: body is JSON -1 unknown, 0 no, 1 yes */
    size_t vstart, vend; /* the JSON value's span in body when valid */
};

struct call {
    struct batch *b;           /* owner */
    uint32_t idx;              /* index in the plan */
    struct flight_waiter w;    /* the wait on the key's flight */
    bool completed;            /* the errgroup was told */
    bool streamed;             /* its lines went to the batch's stream */
    struct call_result res;    /* the outcome */
};

/* The errgroup start function of a call (arg: the call). */
int call_start(struct eg *g, struct ctx *c, void *arg);

/* Releases what the call holds (after the group ended). */
void call_destroy(struct call *c);

#endif
