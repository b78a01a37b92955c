/* budget: a token bucket that caps extra work (hedges, retries) at a share of the real work.
 *
 * Every first attempt deposits pct/100 of a token; time deposits floor_per_s tokens a second;
 * an extra attempt takes one whole token or is refused. The bucket holds at most
 * BUDGET_CAP_BASE + 10 s of the floor, so a long quiet spell cannot bank enough credit to double
 * the load when an upstream turns slow. One budget is shared by all requests (after Finagle's
 * RetryBudget). Thread-safe: one short mutex per call. */
#ifndef FANOUT_BUDGET_H
#define FANOUT_BUDGET_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define BUDGET_CAP_BASE 100 /* tokens, before the floor's 10 seconds */

struct budget {
    pthread_mutex_t mu;  /* guards the fields below */
    int64_t milli;       /* tokens in thousandths */
    int64_t cap_milli;   /* most tokens held, thousandths */
    int64_t per_deposit; /* thousandths added per first attempt (pct * 10) */
    int64_t floor_per_s; /* whole tokens added per second */
    int64_t last_ms;     /* when the floor was last added (monotonic) */
};

/* 'pct' in 0..1000 (percent of first attempts); 'floor_per_s' >= 0. Starts full of the floor's
 * second (or empty without a floor). */
void budget_init(struct budget *b, unsigned pct, unsigned floor_per_s, int64_t now_ms);
void budget_destroy(struct budget *b);

/* A first attempt was made. */
void budget_deposit(struct budget *b);

/* Takes a token for one extra attempt; false (refused) when there is none. */
bool budget_withdraw(struct budget *b, int64_t now_ms);

#endif
