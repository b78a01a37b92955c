/* result: how one key ended: its fetch's outcome, and the batch's report of it at each of its
 * positions.
 *
 * Plain values: the outcome is made by the key's attempts (attempt.h) or its flight, and read
 * by the flight's waiters (flight.h); the batch fills a call_result from it and render writes
 * that. No functions, no threads. */
#ifndef FANOUT_RESULT_H
#define FANOUT_RESULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The response would pass --max-response-bytes. */
#define CALL_ERESPONSE (-3001)

/* The outcome of a key's fetch (its flight's), read-only for whoever reads it. */
struct flight_outcome {
    int err;            /* 0, FETCH_E*, or a cause (-ETIMEDOUT, -ECANCELED, -ESHUTDOWN, -ENOMEM) */
    long status;        /* upstream status of the deciding attempt (0 if none answered) */
    const char *body;   /* its body (success and FETCH_ESTATUS), or NULL */
    size_t len;         /* body length */
    const char *detail; /* error text, or NULL (a success has none) */
};

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

#endif
