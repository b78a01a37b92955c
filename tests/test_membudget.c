/* Tests for server/membudget.h: the byte budget's arithmetic (take within the budget or nothing,
 * force past it, give, the room hint, a NULL budget) and the cap under contention: threads that
 * take until refused hold no more than the budget together, and refusals do come. */
#include <CUnit/CUnit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

#include "server/membudget.h"
#include "tests/support.h"

static void test_membudget_take_and_give(void)
{
    struct membudget m;
    membudget_init(&m, 100);
    CU_ASSERT(membudget_take(&m, 60));
    CU_ASSERT(!membudget_take(&m, 41)); /* would pass: nothing taken */
    CU_ASSERT_EQUAL(membudget_used(&m), 60);
    CU_ASSERT(membudget_take(&m, 40));
    CU_ASSERT(!membudget_room(&m, 1, 0));
    CU_ASSERT(membudget_room(&m, 10, 10)); /* besides the caller's own 10 */
    membudget_force(&m, 50);                /* memory that exists already */
    CU_ASSERT_EQUAL(membudget_used(&m), 150);
    membudget_give(&m, 150);
    CU_ASSERT_EQUAL(membudget_used(&m), 0);
    CU_ASSERT(!membudget_take(&m, 101));
    CU_ASSERT(membudget_take(NULL, 1u << 30)); /* no budget: always granted */
}

/* A fresh budget is empty; taking exactly what is left succeeds, one byte more does not. */
static void test_membudget_limits(void)
{
    struct membudget m;
    membudget_init(&m, 1000);
    CU_ASSERT_EQUAL(membudget_used(&m), 0);
    CU_ASSERT(membudget_room(&m, 1000, 0));
    CU_ASSERT(!membudget_room(&m, 1001, 0));
    CU_ASSERT(membudget_take(&m, 1000)); /* the whole budget at once */
    CU_ASSERT(!membudget_take(&m, 1));
    CU_ASSERT(membudget_take(&m, 0)); /* nothing more keeps it within */
    CU_ASSERT_EQUAL(membudget_used(&m), 1000);
    membudget_give(&m, 1);
    CU_ASSERT(membudget_take(&m, 1));
    membudget_give(&m, 1000);
    /* Sizes near SIZE_MAX neither wrap the check nor take anything. */
    CU_ASSERT(membudget_take(&m, 10));
    CU_ASSERT(!membudget_take(&m, SIZE_MAX));
    CU_ASSERT(!membudget_take(&m, SIZE_MAX - 5));
    CU_ASSERT(!membudget_room(&m, SIZE_MAX, 0));
    CU_ASSERT(!membudget_room(&m, SIZE_MAX - 5, 10));
    CU_ASSERT_EQUAL(membudget_used(&m), 10);
    membudget_give(&m, 10);
    /* An empty budget grants nothing but nothing. */
    struct membudget z;
    membudget_init(&z, 0);
    CU_ASSERT(!membudget_take(&z, 1));
    CU_ASSERT(membudget_take(&z, 0));
    CU_ASSERT_EQUAL(membudget_used(&z), 0);
}

/* force goes past the budget and then take refuses everything until enough is given back; the
 * room hint counts only what others hold. */
static void test_membudget_force_and_room(void)
{
    struct membudget m;
    membudget_init(&m, 100);
    membudget_force(&m, 130);
    CU_ASSERT_EQUAL(membudget_used(&m), 130);
    CU_ASSERT(!membudget_take(&m, 1));
    CU_ASSERT(!membudget_room(&m, 1, 0));
    CU_ASSERT(membudget_room(&m, 100, 130)); /* all of it is the caller's own */
    CU_ASSERT(membudget_room(&m, 70, 100));  /* 30 held by others, 70 fit */
    CU_ASSERT(!membudget_room(&m, 71, 100));
    CU_ASSERT(membudget_room(&m, 100, 500)); /* claiming more than is held: nothing is others' */
    membudget_give(&m, 40);
    CU_ASSERT_EQUAL(membudget_used(&m), 90);
    CU_ASSERT(!membudget_take(&m, 11));
    CU_ASSERT(membudget_take(&m, 10));
    CU_ASSERT_EQUAL(membudget_used(&m), 100);
    membudget_give(&m, 100);
    CU_ASSERT_EQUAL(membudget_used(&m), 0);
}

/* A NULL budget: take grants any size, force and give do nothing. */
static void test_membudget_null_budget(void)
{
    CU_ASSERT(membudget_take(NULL, 0));
    CU_ASSERT(membudget_take(NULL, SIZE_MAX));
    membudget_force(NULL, 12345);
    membudget_give(NULL, 12345);
    struct membudget m;
    membudget_init(&m, 5); /* a real one beside it is untouched */
    membudget_force(NULL, 5);
    CU_ASSERT_EQUAL(membudget_used(&m), 0);
}

/* ---------------------------------------------------------------- contention */

#define TAKERS 4
#define ROUNDS 200
#define CAP 1000
#define TRIES 400 /* takes a thread tries a round: together far more than the budget */

struct contend {
    struct membudget m;
    pthread_barrier_t bar;
    atomic_int over;        /* times a thread saw more held than the budget */
    atomic_ulong refused;   /* refusals, all threads */
    atomic_ulong granted;   /* grants, all threads */
    size_t held[TAKERS];    /* bytes each thread holds at the round's middle */
    bool bad_round[ROUNDS]; /* the middle of a round broke the cap or left room unused */
};

struct taker {
    struct contend *c;
    int i; /* thread index */
};

static size_t chunk_of(int i)
{
    static const size_t sizes[TAKERS] = {7, 11, 13, 17};
    return sizes[i];
}

/* Each round: take until refused (or TRIES), hold, wait for everyone, give everything back. */
static void *taker_main(void *arg)
{
    struct taker *t = arg;
    struct contend *c = t->c;
    size_t chunk = chunk_of(t->i);
    for (int r = 0; r < ROUNDS; r++) {
        pthread_barrier_wait(&c->bar);
        size_t held = 0;
        for (int k = 0; k < TRIES; k++) {
            if (!membudget_take(&c->m, chunk)) {
                atomic_fetch_add(&c->refused, 1);
                break;
            }
            atomic_fetch_add(&c->granted, 1);
            held += chunk;
            if (membudget_used(&c->m) > CAP)
                atomic_fetch_add(&c->over, 1);
        }
        c->held[t->i] = held;
        pthread_barrier_wait(&c->bar); /* everyone holds; thread 0 checks */
        if (t->i == 0) {
            size_t sum = 0, used = membudget_used(&c->m);
            for (int i = 0; i < TAKERS; i++)
                sum += c->held[i];
            /* Each thread stopped at a refusal, when less than its chunk was left, and nothing
             * was given back since: the budget is full to within the largest chunk. */
            c->bad_round[r] = used != sum || used > CAP || used + chunk_of(TAKERS - 1) <= CAP;
        }
        pthread_barrier_wait(&c->bar);
        membudget_give(&c->m, held);
    }
    return NULL;
}

/* Threads whose demand is far past the budget: what they hold together never passes it, each
 * round ends full to within a chunk because the others were refused, and all of it comes back. */
static void test_membudget_threads(void)
{
    static struct contend c;
    membudget_init(&c.m, CAP);
    atomic_init(&c.over, 0);
    atomic_init(&c.refused, 0);
    atomic_init(&c.granted, 0);
    CU_ASSERT_FATAL(pthread_barrier_init(&c.bar, NULL, TAKERS) == 0);
    pthread_t th[TAKERS];
    struct taker tk[TAKERS];
    for (int i = 0; i < TAKERS; i++) {
        tk[i] = (struct taker){&c, i};
        CU_ASSERT_FATAL(pthread_create(&th[i], NULL, taker_main, &tk[i]) == 0);
    }
    for (int i = 0; i < TAKERS; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&c.bar);
    int bad = 0;
    for (int r = 0; r < ROUNDS; r++)
        bad += c.bad_round[r];
    CU_ASSERT_EQUAL(atomic_load(&c.over), 0);
    CU_ASSERT_EQUAL(bad, 0);
    /* Every thread was refused every round: the budget, not TRIES, ended its taking. */
    CU_ASSERT_EQUAL(atomic_load(&c.refused), (unsigned long)TAKERS * ROUNDS);
    CU_ASSERT(atomic_load(&c.granted) < (unsigned long)TAKERS * ROUNDS * TRIES);
    CU_ASSERT_EQUAL(membudget_used(&c.m), 0);
    if (atomic_load(&c.over) || bad)
        fprintf(stderr, "\n  membudget: %d samples over the cap, %d rounds not full to within a "
                        "chunk, %lu refusals\n",
                atomic_load(&c.over), bad, atomic_load(&c.refused));
}

static void *churn_main(void *arg)
{
    struct membudget *m = arg;
    for (int i = 0; i < 20000; i++) {
        size_t n = 1 + (size_t)(i % 9);
        if (membudget_take(m, n))
            membudget_give(m, n);
        if (i % 7 == 0) { /* forced bytes are counted too, and given back */
            membudget_force(m, 3);
            membudget_give(m, 3);
        }
    }
    return NULL;
}

/* Takes, forces and gives from many threads at once: no update is lost (it ends at zero). */
static void test_membudget_churn_ends_at_zero(void)
{
    struct membudget m;
    membudget_init(&m, 20);
    pthread_t t[TAKERS];
    for (int i = 0; i < TAKERS; i++)
        CU_ASSERT_FATAL(pthread_create(&t[i], NULL, churn_main, &m) == 0);
    for (int i = 0; i < TAKERS; i++)
        pthread_join(t[i], NULL);
    CU_ASSERT_EQUAL(membudget_used(&m), 0);
}

static CU_TestInfo membudget_tests[] = {
    {"take refuses past the budget, force and give", test_membudget_take_and_give},
    {"limits: exactly the budget, zero, sizes near SIZE_MAX, an empty budget",
     test_membudget_limits},
    {"force goes past the budget; room counts what others hold", test_membudget_force_and_room},
    {"a NULL budget grants everything, force and give are no-ops", test_membudget_null_budget},
    {"threads: the cap holds under contention, refusals come, it ends at zero",
     test_membudget_threads},
    {"threads: take, force and give lose no update", test_membudget_churn_ends_at_zero},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(membudget, membudget_tests)
