/* metrics: lock-free counters and histograms, rendered in the Prometheus text format 0.0.4.
 *
 * Every update is one or two relaxed atomic increments, so the request path never waits for a
 * scrape; a scrape reads each atomic once (values of different series may be a few events
 * apart, as with any Prometheus client). Thread-safe. */
#ifndef FANOUT_METRICS_H
#define FANOUT_METRICS_H

#include <stdatomic.h>
#include <stdint.h>

struct json_buf;
struct fetch_stats;

#define METRICS_BUCKETS 14 /* upper bounds in seconds, +Inf last */

struct metrics_hist {
    atomic_uint_fast64_t bucket[METRICS_BUCKETS]; /* per-bucket (not cumulative) counts */
    atomic_uint_fast64_t sum_us;                  /* sum of observations, microseconds */
};

struct metrics {
    atomic_uint_fast64_t by_status[600]; /* requests answered, by HTTP status 0..599 */
    struct metrics_hist request_seconds; /* request duration */
    struct metrics_hist fetch_seconds;   /* upstream fetch duration */
    atomic_uint_fast64_t rejected;       /* 503 overloaded answers (admission or draining) */
    atomic_int_fast64_t in_flight;       /* batch requests admitted and not yet answered */
    atomic_uint_fast64_t log_dropped;    /* log lines dropped because stderr was slow */
    double start_time;                   /* process start, seconds since the epoch */
};

/* Zeroes 'm' and records the start time. */
void metrics_init(struct metrics *m);

/* Adds one observation of 'us' microseconds. */
void metrics_observe(struct metrics_hist *h, int64_t us);

/* Counts one answered request. */
void metrics_count_status(struct metrics *m, unsigned status);

/* Appends the exposition text: our series plus the fetch engine's counters in 'fs'. */
void metrics_render(const struct metrics *m, const struct fetch_stats *fs, struct json_buf *out);

#endif
