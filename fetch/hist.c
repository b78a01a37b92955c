/* hist: see hist.h. */
#include "fetch/hist.h"

/* Upper bounds in microseconds and their rendering; the last bucket is +Inf. */
static const int64_t bound_us[HIST_BUCKETS - 1] = {1000,   2500,   5000,    10000,   25000,
                                                   50000,  100000, 250000,  500000,  1000000,
                                                   2500000, 5000000, 10000000};
static const char *const bound_txt[HIST_BUCKETS] = {"0.001", "0.0025", "0.005", "0.01", "0.025",
                                                    "0.05",  "0.1",    "0.25",  "0.5",  "1",
                                                    "2.5",   "5",      "10",    "+Inf"};

void hist_observe(struct hist *h, int64_t us)
{
    if (us < 0)
        us = 0;
    unsigned i = 0;
    while (i < HIST_BUCKETS - 1 && us > bound_us[i])
        i++;
    atomic_fetch_add_explicit(&h->bucket[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, (uint_fast64_t)us, memory_order_relaxed);
}

const char *hist_bound_text(unsigned i)
{
    return i < HIST_BUCKETS ? bound_txt[i] : "+Inf";
}
