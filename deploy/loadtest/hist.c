/* hist: log-linear latency histogram (see hist.h). Bucket i < 2 * SUB holds the value i; above,
 * with m the position of a value's highest set bit and s = m - 7 the shift that leaves 8
 * significant bits, the value lands in (s + 1) * SUB + (v >> s) - SUB. No locks: one owner. */
#include "deploy/loadtest/hist.h"

#include <string.h>

void lt_hist_init(struct lt_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

size_t lt_hist_index(uint64_t us)
{
    if (us >= (UINT64_C(1) << LT_HIST_MAX_BITS))
        us = (UINT64_C(1) << LT_HIST_MAX_BITS) - 1;
    if (us < 2 * LT_HIST_SUB)
        return (size_t)us;
    unsigned msb = 63u - (unsigned)__builtin_clzll(us);
    unsigned shift = msb - 7u;
    return (size_t)(shift + 1) * LT_HIST_SUB + (size_t)(us >> shift) - LT_HIST_SUB;
}

uint64_t lt_hist_lowest(size_t index)
{
    if (index < 2 * LT_HIST_SUB)
        return index;
    size_t shift = index / LT_HIST_SUB - 1;
    uint64_t sub = index % LT_HIST_SUB + LT_HIST_SUB;
    return sub << shift;
}

void lt_hist_add(struct lt_hist *h, uint64_t us)
{
    h->bucket[lt_hist_index(us)]++;
    h->count++;
    h->sum += (double)us;
    if (us > h->max)
        h->max = us;
    if (us < h->min)
        h->min = us;
}

void lt_hist_merge(struct lt_hist *into, const struct lt_hist *from)
{
    if (!from->count)
        return;
    for (size_t i = 0; i < LT_HIST_BUCKETS; i++)
        into->bucket[i] += from->bucket[i];
    into->count += from->count;
    into->sum += from->sum;
    if (from->max > into->max)
        into->max = from->max;
    if (from->min < into->min)
        into->min = from->min;
}

uint64_t lt_hist_quantile(const struct lt_hist *h, double q)
{
    if (!h->count)
        return 0;
    if (q <= 0)
        return h->min;
    if (q >= 1)
        return h->max;
    uint64_t rank = (uint64_t)(q * (double)h->count);
    if ((double)rank < q * (double)h->count)
        rank++;
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < LT_HIST_BUCKETS; i++) {
        seen += h->bucket[i];
        if (seen >= rank) {
            uint64_t lo = lt_hist_lowest(i);
            uint64_t hi = i + 1 < LT_HIST_BUCKETS ? lt_hist_lowest(i + 1) : lo + 1;
            uint64_t mid = lo + (hi - lo - 1) / 2;
            if (mid > h->max)
                mid = h->max;
            if (mid < h->min)
                mid = h->min;
            return mid;
        }
    }
    return h->max;
}
