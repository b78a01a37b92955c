/* batch: running one parsed request: its plan's calls under an errgroup, on one fetch loop.
 *
 * batch_new() takes a parsed request and plans it (plan.h); batch_run() hands it to a fetch loop;
 * from then on everything about the batch itself (the errgroup's tasks, each call's wait and
 * callback, the streamed lines) happens on that loop's thread, so no lock guards a batch. The
 * flights its calls start (flight.h: the attempts and timers of each key) run on the same loop,
 * except in a large batch: when at least env->spread_min of its calls can be in flight at once
 * (the errgroup limit allowing), the new flights are spread over every loop in contiguous
 * stripes (batch_run_loop() in batch.c), so that one loop thread does not start and complete
 * them all; their outcomes come back to the batch's loop. What crosses threads is cancellation
 * and delivery: the batch's ctx (a child of env->root with the request's deadline) may be
 * canceled from anywhere (a client gone, shutdown), and the fetch engine turns that into aborted
 * transfers on each flight's loop; a flight delivers by waking its waiters on their loops. When
 * the group has ended and every attempt and timer its calls alone caused has called back,
 * done(arg) runs once, on the batch's loop thread; after it the batch is the caller's again, to
 * render (batch_render()) and free on any one thread.
 *
 * There is no HTTP here: the caller (srv.c) owns connections, admission and gauges. */
#ifndef FANOUT_BATCH_H
#define FANOUT_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/batch/flight.h"
#include "server/batch/request.h"

struct ctx;
struct writer;
struct batch;
struct membudget;

/* The default batch_env.spread_min: a batch with at least this many calls in flight at once
 * spreads its new flights over the fetch loops. Below it one loop costs less than the
 * cross-thread handoffs; above it the loop's own per-fetch work (tens of microseconds each)
 * would start the last fetch of the batch milliseconds after the first. */
#define BATCH_SPREAD_MIN 32

/* Everything a batch needs from the server. Read-only, shared by all batches. */
struct batch_env {
    struct flight_env flight;     /* what its calls' flights run with (flight.h) */
    bool coalesce;                /* --coalesce on */
    int limit;                    /* calls in flight per batch (the errgroup limit) */
    size_t max_response_bytes;    /* one answer's size */
    size_t max_body;              /* upstream body per id (for messages) */
    struct membudget *mem;        /* the server's memory budget, or NULL for none */
    unsigned spread_min;          /* spread a batch's new flights over the loops when at least
                                     this many of its calls can be in flight at once
                                     (BATCH_SPREAD_MIN); 0: never */
};

typedef void (*batch_done_fn)(void *arg);

/* Makes a batch for 'rq' (taken: freed with the batch, also on failure) with request id 'rid'
 * (copied; sent upstream): the plan, the ctx and the errgroup. Nothing runs yet. The request
 * must have at least one position. Returns 0 and the batch, or -ENOMEM. */
int batch_new(const struct batch_env *env, struct request *rq, const char *rid,
              batch_done_fn done, void *arg, struct batch **out);

/* Hands the batch to its fetch loop. Returns 0, and done(arg) is then called exactly once, on
 * the loop thread, never from inside batch_run(); or -ENOMEM / FETCH_ESHUTDOWN, and nothing
 * runs (free the batch). */
int batch_run(struct batch *b);

/* Streams the answer through 'w' (render.h) as it is made, instead of batch_render() after
 * done: before batch_run(). On the loop thread, item() for each position as its call
 * completes, fail() once when the batch fails (mode all), and, just before done(arg), the
 * positions not yet written (in request order) and end() (or fail()). Returns 0 or -ENOMEM. */
int batch_stream(struct batch *b, struct writer *w);

/* The request's effective deadline, ms (for messages). */
int64_t batch_timeout_ms(const struct batch *b);

/* The batch's ctx, to cancel it from outside (a client gone: -EPIPE). Valid until batch_free. */
struct ctx *batch_ctx(struct batch *b);

/* Why the batch ended, after done: 0, or the group's error, or the ctx's cause (-EPIPE for a
 * client gone, -ESHUTDOWN). */
int batch_err(const struct batch *b);

/* Writes the answer through 'w' (render.h): results in request order, or the error. After done
 * only, and only for a batch that does not stream (batch_stream() renders on its own). */
void batch_render(struct batch *b, struct writer *w);

/* Frees a batch: after done, or one that never ran. */
void batch_free(struct batch *b);

#endif
