/* budget: a token bucket that caps extra work (hedges, retries) at a share of the real work.
 *
 * Every first attempt deposits pct/100 of a token; time deposits floor_per_s tokens a second;
 * an extra attempt takes one whole token or is refused. The bucket holds at most what the last
 * BUDGET_WINDOW_S seconds deposited (and at least BUDGET_CAP_BASE tokens plus the floor's
 * window), as if every deposit expired after the window (Finagle's RetryBudget): a busy service
 * can absorb a burst of slow fetches, while a quiet spell cannot bank credit for later. One
 * budget is shared by all requests. Thread-safe: one short mutex per call. */
#ifndef FANOUT_BUDGET_H
#define FANOUT_BUDGET_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define BUDGET_CAP_BASE 100 /* tokens the bucket may always hold */
#define BUDGET_WINDOW_S 10  /* deposits older than this no longer count toward the cap */

struct budget {
    pthread_mutex_t mu;                 /* guards the fields below */
    int64_t milli;                      /* tokens in thousandths */
    int64_t base_milli;                 /* the cap without recent deposits, thousandths */
    int64_t per_deposit;                /* thousandths added per first attempt (pct * 10) */
    int64_t floor_per_s;                /* whole tokens added per second */
    int64_t last_ms;                    /* when the floor was last added (monotonic) */
    int64_t slot_sec[BUDGET_WINDOW_S];  /* the second each slot counts, or -1 */
    int64_t slot_milli[BUDGET_WINDOW_S]; /* thousandths deposited in that second */
};

/* 'pct' in 0..1000 (percent of first attempts); 'floor_per_s' >= 0. Starts with the floor's
 * first second (or empty without a floor). */
void budget_init(struct budget *b, unsigned pct, unsigned floor_per_s, int64_t now_ms);
void budget_destroy(struct budget *b);

/* A first attempt was made at 'now_ms'. */
void budget_deposit(struct budget *b, int64_t now_ms);

/* Takes a token for one extra attempt; false (refused) when there is none. */
bool budget_withdraw(struct budget *b, int64_t now_ms);

#endif
