/* budget: the token bucket of budget.h. */
#include "server/budget.h"

void budget_init(struct budget *b, unsigned pct, unsigned floor_per_s, int64_t now_ms)
{
    pthread_mutex_init(&b->mu, NULL);
    b->per_deposit = (int64_t)pct * 10;
    b->floor_per_s = floor_per_s;
    b->cap_milli = ((int64_t)BUDGET_CAP_BASE + 10 * (int64_t)floor_per_s) * 1000;
    b->milli = (int64_t)floor_per_s * 1000;
    b->last_ms = now_ms;
}

void budget_destroy(struct budget *b)
{
    pthread_mutex_destroy(&b->mu);
}

void budget_deposit(struct budget *b)
{
    if (b->per_deposit == 0)
        return;
    pthread_mutex_lock(&b->mu);
    b->milli += b->per_deposit;
    if (b->milli > b->cap_milli)
        b->milli = b->cap_milli;
    pthread_mutex_unlock(&b->mu);
}

bool budget_withdraw(struct budget *b, int64_t now_ms)
{
    pthread_mutex_lock(&b->mu);
    if (b->floor_per_s && now_ms > b->last_ms) {
        b->milli += (now_ms - b->last_ms) * b->floor_per_s; /* ms * tokens/s = thousandths */
        if (b->milli > b->cap_milli)
            b->milli = b->cap_milli;
    }
    if (now_ms > b->last_ms)
        b->last_ms = now_ms;
    bool ok = b->milli >= 1000;
    if (ok)
        b->milli -= 1000;
    pthread_mutex_unlock(&b->mu);
    return ok;
}
