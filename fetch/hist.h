/* hist: a latency histogram in fixed buckets (the bounds Prometheus clients use by default, 1 ms
 * to 10 s, then +Inf), on relaxed atomics.
 *
 * An observation is two relaxed increments (its bucket and the sum), so any thread records
 * without waiting; a reader loads each atomic once (counts of different buckets may be a few
 * observations apart). Embedded, zero-initialised; no functions to free it. */
#ifndef FANOUT_FETCH_HIST_H
#define FANOUT_FETCH_HIST_H

#include <stdatomic.h>
#include <stdint.h>

#define HIST_BUCKETS 14 /* upper bounds, +Inf last */

struct hist {
    atomic_uint_fast64_t bucket[HIST_BUCKETS]; /* per-bucket (not cumulative) counts */
    atomic_uint_fast64_t sum_us;               /* sum of observations, microseconds */
};

/* Adds one observation of 'us' microseconds (negative counts as 0). */
void hist_observe(struct hist *h, int64_t us);

/* Bucket i's upper bound in seconds as text ("0.001" ... "10", "+Inf"). */
const char *hist_bound_text(unsigned i);

#endif
