/* outcome: the one failure vocabulary. What an attempt's ending (its error, the upstream's
 * status, whether its own ctx ended it) means, decided here and nowhere else: fetch's
 * counters, the metrics' result label, the retry rule, ejection and the error a client sees
 * all read outcome_of().
 *
 * Pure functions; no state, no threads. */
#ifndef FANOUT_FETCH_OUTCOME_H
#define FANOUT_FETCH_OUTCOME_H

#include <stdbool.h>

/* Error codes in fetch's reserved range; ctx causes (-ETIMEDOUT, -ECANCELED, ...) pass through.
 * -ETIMEDOUT means the ctx's deadline: the ctx expired, or curl's CURLOPT_TIMEOUT_MS (set to the
 * ctx's remaining time) ran out. A connect phase that hits connect_timeout_ms while the deadline
 * is still ahead is FETCH_EUNREACH. */
#define FETCH_ESTATUS (-2001)  /* the upstream answered with a non-2xx status */
#define FETCH_EUNREACH (-2002) /* DNS, connect, reset, empty reply or another transport error */
#define FETCH_ETOOBIG (-2003)  /* the body passed the cap (aborted as soon as it did) */
#define FETCH_ESHUTDOWN (-2004) /* the engine is stopping */

/* The kinds of ending, in the order of the metrics' result label. */
enum outcome_kind {
    OUTCOME_OK,          /* a 2xx */
    OUTCOME_STATUS,      /* the upstream answered with another status (FETCH_ESTATUS) */
    OUTCOME_UNREACHABLE, /* DNS, connect, reset, empty reply (FETCH_EUNREACH) */
    OUTCOME_DEADLINE,    /* the deadline passed (-ETIMEDOUT) */
    OUTCOME_CANCELED,    /* ended by its ctx for any other cause, or the engine stopping */
    OUTCOME_TOO_LARGE,   /* the body passed its cap (FETCH_ETOOBIG) */
    OUTCOME_KINDS
};

/* What an ending says of the upstream's health (for ejection). */
enum outcome_health {
    OUTCOME_NO_VERDICT, /* nothing: it never heard from the upstream, or was cut short */
    OUTCOME_ALIVE,      /* it answered: a 2xx, a 4xx, a body too large */
    OUTCOME_FAILED,     /* a transport error or a 5xx */
};

struct outcome {
    enum outcome_kind kind;
    enum outcome_health health;
    bool retryable; /* another attempt may succeed: a transport error, 502, 503 or 504 */
};

/* The meaning of an attempt that ended with 'err' (0, FETCH_E*, or a ctx cause such as
 * -ETIMEDOUT, -ECANCELED, -EPIPE, -ESHUTDOWN, -ENOMEM) and upstream 'status' (0 if none
 * answered). 'aborted': its own ctx ended it (fetch_result.aborted), so it is a deadline when
 * err is -ETIMEDOUT and canceled otherwise, and says nothing of the upstream. */
struct outcome outcome_of(int err, long status, bool aborted);

/* The kind's name, as the metrics' result label has it: "ok", "upstream_status",
 * "unreachable", "deadline", "canceled", "too_large". */
const char *outcome_name(enum outcome_kind k);

#endif
