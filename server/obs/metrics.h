/* metrics: lock-free counters and histograms, rendered in the Prometheus text format 0.0.4.
 *
 * Every update is one or two relaxed atomic increments, so the request path never waits for a
 * scrape; a scrape reads each atomic once (values of different series may be a few events
 * apart, as with any Prometheus client). Thread-safe. */
#ifndef FANOUT_METRICS_H
#define FANOUT_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fetch/hist.h"

struct json_buf;
struct fetch_stats;
struct upstreams;

/* The route label of fanout_requests_total. */
enum metrics_route { ROUTE_BATCH, ROUTE_HEALTHZ, ROUTE_READYZ, ROUTE_METRICS, ROUTE_OTHER,
                     ROUTE_COUNT };

struct metrics {
    atomic_uint_fast64_t by_status[ROUTE_COUNT][600]; /* requests answered, by route and status */
    struct hist request_seconds; /* request duration */
    struct hist fetch_seconds;   /* upstream fetch duration */
    atomic_uint_fast64_t rejected;       /* requests refused as overloaded (admit.h): each
                                            once, streamed ones ended by shutdown included */
    atomic_int_fast64_t in_flight;       /* batch requests admitted and not yet answered */
    atomic_uint_fast64_t log_dropped;    /* log lines dropped because stderr was slow */
    atomic_uint_fast64_t hedges_sent;    /* hedged attempts started */
    atomic_uint_fast64_t hedges_won;     /* calls whose hedge answered first */
    atomic_uint_fast64_t hedges_refused; /* hedges the budget refused */
    atomic_uint_fast64_t retries_sent;   /* retries started */
    atomic_uint_fast64_t retries_refused; /* retries the budget refused */
    atomic_uint_fast64_t flights_started; /* flights started (one per key fetched) */
    atomic_uint_fast64_t flights_joined;  /* calls that joined a running flight */
    atomic_uint_fast64_t flights_abandoned; /* flights canceled because every waiter left */
    double start_time;                   /* process start, seconds since the epoch */
};

/* Zeroes 'm' and records the start time. */
void metrics_init(struct metrics *m);

/* Counts one answered request. */
void metrics_count_status(struct metrics *m, enum metrics_route route, unsigned status);

/* Appends the exposition text: our series, the fetch engine's counters in 'fs' and, when 'ups'
 * is not NULL, the per-upstream series (each upstream keeps its own counters: upstream.h). */
void metrics_render(const struct metrics *m, const struct fetch_stats *fs,
                    struct upstreams *ups, struct json_buf *out);

#endif
