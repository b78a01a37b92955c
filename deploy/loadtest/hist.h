/* hist: a log-linear latency histogram (the HdrHistogram idea): values below 2 * LT_HIST_SUB
 * microseconds each have their own bucket; above that, every power of two is split into
 * LT_HIST_SUB equal buckets, so a bucket is never wider than 1/LT_HIST_SUB (0.8%) of its values.
 * Values are microseconds; the exact maximum is kept beside the buckets.
 *
 * A histogram belongs to one thread; merge copies into one on the thread that reports. */
#ifndef FANOUT_LT_HIST_H
#define FANOUT_LT_HIST_H

#include <stddef.h>
#include <stdint.h>

/* Sub-buckets per power of two (a power of two itself). */
#define LT_HIST_SUB 128
/* Largest value a bucket distinguishes, 2^36 us (about 19 hours); larger values are clamped. */
#define LT_HIST_MAX_BITS 36
/* Buckets in all: the exact range [0, 2 * SUB), then SUB for each power of two above it. */
#define LT_HIST_BUCKETS (2 * LT_HIST_SUB + (LT_HIST_MAX_BITS - 8) * LT_HIST_SUB)

struct lt_hist {
    uint64_t count;                   /* values recorded */
    uint64_t max;                     /* largest value recorded, exact */
    uint64_t min;                     /* smallest value recorded, exact (UINT64_MAX when empty) */
    double sum;                       /* sum of values, for the mean */
    uint64_t bucket[LT_HIST_BUCKETS]; /* counts per bucket */
};

/* Empties h. */
void lt_hist_init(struct lt_hist *h);

/* Records one value (microseconds). */
void lt_hist_add(struct lt_hist *h, uint64_t us);

/* Adds every value of 'from' to 'into'. */
void lt_hist_merge(struct lt_hist *into, const struct lt_hist *from);

/* The value at quantile q (0..1): the midpoint of the bucket holding the ceil(q * count)-th
 * smallest value, never above the exact maximum. 0 for an empty histogram. */
uint64_t lt_hist_quantile(const struct lt_hist *h, double q);

/* The bucket index of a value, and the smallest value of a bucket (exposed for tests). */
size_t lt_hist_index(uint64_t us);
uint64_t lt_hist_lowest(size_t index);

#endif
