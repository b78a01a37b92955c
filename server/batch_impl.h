/* The inside of a batch, shared by batch.c (the run) and call.c (a call's attempts) only. */
#ifndef FANOUT_BATCH_IMPL_H
#define FANOUT_BATCH_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/batch.h"
#include "server/call.h"
#include "server/plan.h"
#include "server/request.h"

#define BATCH_RID_MAX 128

/* Bytes a result adds to the answer besides its body: {"id":..,"status":..,"data":..}. */
#define RESULT_OVERHEAD 48

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

/* A call's outcome is in (loop thread, before the errgroup is told): streams its lines. */
void batch_call_done(struct batch *b, struct call *c);

/* The loop a new flight for call 'idx' runs on: the batch's, or its stripe's when spreading. */
unsigned batch_run_loop(const struct batch *b, uint32_t idx);

#endif
