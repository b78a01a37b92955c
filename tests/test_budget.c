/* Tests for server/batch/budget.h, the token bucket that caps hedges and retries: deposits of
 * pct/100 of a token, the floor per second, whole tokens or a refusal, the window cap (never
 * below the base plus the floor's window), credit that expires with its second, and the count
 * of grants from many threads at once. Time is the caller's argument, so every case is exact. */
#include <CUnit/CUnit.h>
#include <pthread.h>
#include <stdatomic.h>

#include "server/batch/budget.h"
#include "tests/support.h"

/* Withdraws at 'now' until refused (at most 'most'); returns how many were granted. */
static int drain(struct budget *b, int64_t now, int most)
{
    int got = 0;
    while (got < most && budget_withdraw(b, now))
        got++;
    return got;
}

static void test_budget_refuses_when_spent(void)
{
    struct budget b;
    budget_init(&b, 10, 0, 0); /* 10% of first attempts, no floor */
    CU_ASSERT_FALSE(budget_withdraw(&b, 0));
    for (int i = 0; i < 9; i++)
        budget_deposit(&b, 0);
    CU_ASSERT_FALSE(budget_withdraw(&b, 0)); /* 0.9 tokens */
    budget_deposit(&b, 0);
    CU_ASSERT_TRUE(budget_withdraw(&b, 0));
    CU_ASSERT_FALSE(budget_withdraw(&b, 0));
    /* 100000 first attempts within the window bank their 10% (a busy service's burst). */
    for (int i = 0; i < 100000; i++)
        budget_deposit(&b, 5000);
    CU_ASSERT_EQUAL(drain(&b, 5000, 20000), 10000);
    /* The same deposits, then a quiet window: only the base cap survives it. */
    for (int i = 0; i < 100000; i++)
        budget_deposit(&b, 10000);
    CU_ASSERT_EQUAL(drain(&b, 10000 + BUDGET_WINDOW_S * 1000 + 1000, 20000), BUDGET_CAP_BASE);
    budget_destroy(&b);

    /* A floor of 10 a second: 10 at once, then one per 100 ms. */
    budget_init(&b, 0, 10, 1000);
    CU_ASSERT_EQUAL(drain(&b, 1000, 1000), 10);
    CU_ASSERT_FALSE(budget_withdraw(&b, 1099)); /* 0.99 of a token so far */
    CU_ASSERT_TRUE(budget_withdraw(&b, 1200));  /* 2.0 by now */
    CU_ASSERT_TRUE(budget_withdraw(&b, 1200));
    CU_ASSERT_FALSE(budget_withdraw(&b, 1200));
    budget_destroy(&b);
}

/* pct is per first attempt in percent: 0 deposits nothing, 100 a token, 1000 ten tokens. */
static void test_budget_pct_range(void)
{
    struct budget b;
    budget_init(&b, 0, 0, 0);
    for (int i = 0; i < 1000; i++)
        budget_deposit(&b, 0);
    CU_ASSERT_FALSE(budget_withdraw(&b, 0));
    budget_destroy(&b);

    budget_init(&b, 100, 0, 0);
    for (int i = 0; i < 7; i++)
        budget_deposit(&b, 0);
    CU_ASSERT_EQUAL(drain(&b, 0, 100), 7);
    budget_destroy(&b);

    budget_init(&b, 1000, 0, 0);
    budget_deposit(&b, 0);
    CU_ASSERT_EQUAL(drain(&b, 0, 100), 10);
    budget_destroy(&b);

    budget_init(&b, 1, 0, 0); /* 1%: a hundred first attempts make one token */
    for (int i = 0; i < 99; i++)
        budget_deposit(&b, 0);
    CU_ASSERT_FALSE(budget_withdraw(&b, 0));
    budget_deposit(&b, 0);
    CU_ASSERT_TRUE(budget_withdraw(&b, 0));
    budget_destroy(&b);
}

/* The cap follows the window: deposits older than BUDGET_WINDOW_S seconds stop counting one
 * second at a time, and the bucket never holds more than the window deposited. */
static void test_budget_deposits_expire_with_their_second(void)
{
    struct budget b;
    budget_init(&b, 100, 0, 0); /* a token per deposit */
    for (int i = 0; i < 1000; i++)
        budget_deposit(&b, 0); /* second 0 */
    for (int i = 0; i < 500; i++)
        budget_deposit(&b, 5000); /* second 5 */
    /* At second 10 the deposits of second 0 have left the window: 500 remain. */
    CU_ASSERT_EQUAL(drain(&b, BUDGET_WINDOW_S * 1000 + 500, 5000), 500);
    budget_destroy(&b);

    /* Within the window everything deposited is there. */
    budget_init(&b, 100, 0, 0);
    for (int i = 0; i < 1000; i++)
        budget_deposit(&b, 0);
    for (int i = 0; i < 500; i++)
        budget_deposit(&b, 5000);
    CU_ASSERT_EQUAL(drain(&b, BUDGET_WINDOW_S * 1000 - 1, 5000), 1500);
    budget_destroy(&b);

    /* A burst in one second, spent in part, then a quiet window: only the base is left. */
    budget_init(&b, 100, 0, 0);
    for (int i = 0; i < 3 * BUDGET_CAP_BASE; i++)
        budget_deposit(&b, 2000);
    CU_ASSERT_EQUAL(drain(&b, 2000, BUDGET_CAP_BASE), BUDGET_CAP_BASE);
    CU_ASSERT_EQUAL(drain(&b, 2000 + BUDGET_WINDOW_S * 1000, 5000), BUDGET_CAP_BASE);
    budget_destroy(&b);
}

/* The floor's credit is capped too: a long quiet spell banks the base plus the floor's window,
 * no more. Time that goes back adds nothing. */
static void test_budget_floor_cap_and_time(void)
{
    struct budget b;
    budget_init(&b, 0, 10, 0);
    CU_ASSERT_EQUAL(drain(&b, 3600 * 1000, 100000), BUDGET_CAP_BASE + BUDGET_WINDOW_S * 10);
    budget_destroy(&b);

    budget_init(&b, 0, 10, 1000);
    CU_ASSERT_EQUAL(drain(&b, 1000, 1000), 10);
    CU_ASSERT_FALSE(budget_withdraw(&b, 500)); /* earlier than the last call: no credit */
    CU_ASSERT_FALSE(budget_withdraw(&b, 1000));
    CU_ASSERT_TRUE(budget_withdraw(&b, 1100)); /* 100 ms at 10 a second since 1000 */
    CU_ASSERT_FALSE(budget_withdraw(&b, 1100));
    CU_ASSERT_FALSE(budget_withdraw(&b, 900)); /* back again: still nothing */
    CU_ASSERT_TRUE(budget_withdraw(&b, 1200));
    budget_destroy(&b);

    /* Deposits and the floor add up. */
    budget_init(&b, 50, 1, 0); /* half a token a deposit; one a second */
    CU_ASSERT_EQUAL(drain(&b, 0, 100), 1);
    budget_deposit(&b, 0);
    CU_ASSERT_FALSE(budget_withdraw(&b, 0));
    CU_ASSERT_FALSE(budget_withdraw(&b, 499)); /* 0.5 + 0.499 */
    CU_ASSERT_TRUE(budget_withdraw(&b, 500));  /* 0.5 + 0.5 */
    budget_destroy(&b);
}

/* ---------------------------------------------------------------- threads */

#define THREADS 4
#define PER_THREAD 5000

struct shared {
    struct budget b;
    atomic_long granted;
};

static void *deposit_and_take(void *arg)
{
    struct shared *s = arg;
    long got = 0;
    for (int i = 0; i < PER_THREAD; i++) {
        budget_deposit(&s->b, 1000);
        if (i % 2 == 0 && budget_withdraw(&s->b, 1000))
            got++;
    }
    atomic_fetch_add(&s->granted, got);
    return NULL;
}

/* Deposits and withdrawals from many threads: no token is lost or made twice. Every deposit is a
 * whole token and the window holds them all, so the grants during the run plus what is left
 * afterwards are exactly the deposits. */
static void test_budget_threads_conserve_tokens(void)
{
    static struct shared s;
    budget_init(&s.b, 100, 0, 1000);
    atomic_init(&s.granted, 0);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        CU_ASSERT_FATAL(pthread_create(&t[i], NULL, deposit_and_take, &s) == 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    long during = atomic_load(&s.granted);
    long after = drain(&s.b, 1000, THREADS * PER_THREAD + 10);
    CU_ASSERT(during > 0);
    CU_ASSERT_EQUAL(during + after, (long)THREADS * PER_THREAD);
    budget_destroy(&s.b);
}

static CU_TestInfo budget_tests[] = {
    {"refuses when spent, window cap, floor per second", test_budget_refuses_when_spent},
    {"pct: 0 deposits nothing, 1 a hundredth, 1000 ten tokens", test_budget_pct_range},
    {"deposits leave the window one second at a time",
     test_budget_deposits_expire_with_their_second},
    {"floor: capped at the base plus its window; time going back adds nothing",
     test_budget_floor_cap_and_time},
    {"threads: grants plus what is left equal the deposits", test_budget_threads_conserve_tokens},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(budget, budget_tests)
