/* budget: the windowed token bucket of budget.h. The window is BUDGET_WINDOW_S one-second
 * slots of deposits; the cap is their sum (at least the base), so it follows the recent rate. */
#include "server/batch/budget.h"

void budget_init(struct budget *b, unsigned pct, unsigned floor_per_s, int64_t now_ms)
{
    pthread_mutex_init(&b->mu, NULL);
    b->per_deposit = (int64_t)pct * 10;
    b->floor_per_s = floor_per_s;
    b->base_milli = ((int64_t)BUDGET_CAP_BASE + BUDGET_WINDOW_S * (int64_t)floor_per_s) * 1000;
    b->milli = (int64_t)floor_per_s * 1000;
    b->last_ms = now_ms;
    for (int i = 0; i < BUDGET_WINDOW_S; i++) {
        b->slot_sec[i] = -1;
        b->slot_milli[i] = 0;
    }
}

void budget_destroy(struct budget *b)
{
    pthread_mutex_destroy(&b->mu);
}

/* The cap at second 'sec': the base, or what the window deposited when that is more. */
static int64_t cap_at(const struct budget *b, int64_t sec)
{
    int64_t sum = 0;
    for (int i = 0; i < BUDGET_WINDOW_S; i++)
        if (b->slot_sec[i] > sec - BUDGET_WINDOW_S)
            sum += b->slot_milli[i];
    return sum > b->base_milli ? sum : b->base_milli;
}

void budget_deposit(struct budget *b, int64_t now_ms)
{
    if (b->per_deposit == 0)
        return;
    int64_t sec = now_ms / 1000;
    int i = (int)(sec % BUDGET_WINDOW_S);
    pthread_mutex_lock(&b->mu);
    if (b->slot_sec[i] != sec) {
        b->slot_sec[i] = sec;
        b->slot_milli[i] = 0;
    }
    b->slot_milli[i] += b->per_deposit;
    b->milli += b->per_deposit;
    int64_t cap = cap_at(b, sec);
    if (b->milli > cap)
        b->milli = cap;
    pthread_mutex_unlock(&b->mu);
}

bool budget_withdraw(struct budget *b, int64_t now_ms)
{
    pthread_mutex_lock(&b->mu);
    if (b->floor_per_s && now_ms > b->last_ms)
        b->milli += (now_ms - b->last_ms) * b->floor_per_s; /* ms * tokens/s = thousandths */
    if (now_ms > b->last_ms)
        b->last_ms = now_ms;
    int64_t cap = cap_at(b, now_ms / 1000);
    if (b->milli > cap)
        b->milli = cap; /* credit from deposits that have left the window is gone */
    bool ok = b->milli >= 1000;
    if (ok)
        b->milli -= 1000;
    pthread_mutex_unlock(&b->mu);
    return ok;
}
