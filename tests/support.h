/* Shared test support: suite registration and process-resource probes. */
#ifndef FANOUT_TEST_SUPPORT_H
#define FANOUT_TEST_SUPPORT_H

#include <CUnit/CUnit.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Registers a suite with tests/main.c from any test file:
 *   static CU_TestInfo ctx_tests[] = { {"...", fn}, CU_TEST_INFO_NULL };
 *   TEST_SUITE(ctx, ctx_tests)
 * Optional setup/teardown: TEST_SUITE_INIT(name, tests, init_fn, cleanup_fn). */
struct test_suite {
    const char *name;
    CU_TestInfo *tests;
    CU_InitializeFunc init;
    CU_CleanupFunc cleanup;
    struct test_suite *next;
};
void test_register(struct test_suite *s);
#define TEST_SUITE_INIT(nm, tests, ini, cln)                                                      \
    static struct test_suite test_suite_##nm = {#nm, tests, ini, cln, NULL};                       \
    __attribute__((constructor)) static void test_suite_ctor_##nm(void)                           \
    {                                                                                              \
        test_register(&test_suite_##nm);                                                          \
    }
#define TEST_SUITE(nm, tests) TEST_SUITE_INIT(nm, tests, NULL, NULL)

/* Deterministic xorshift64* step: advances *state (non-zero) and returns the next value, so a
 * failing randomised test reproduces. */
uint64_t test_rng(uint64_t *state);

/* The one factor every time bound in the suite is multiplied by: $FANOUT_TEST_MULT (a positive
 * number, default 1) times 2 under AddressSanitizer or 3 under ThreadSanitizer, which slow the
 * code under test down by about that much. A bound is a deadline for an event that should come
 * far sooner, never a measurement of speed. */
double test_mult(void);

/* 'ms' scaled by test_mult(). */
int64_t test_ms(int64_t ms);

/* Threads in this process (/proc/self/task) that are not exiting. A joined thread can stay
 * listed for a moment after pthread_join() returns; it is already marked PF_EXITING then, so
 * it is not counted and a count taken right after a join is exact. */
int test_thread_count(void);

/* Open file descriptors in this process (/proc/self/fd). */
int test_fd_count(void);

/* Polls cond(arg) every millisecond until it holds or 'ms' pass; returns its last value. For
 * waiting on another thread's progress with a generous bound (pass test_ms(N)), never for
 * timing assertions. */
bool test_wait_until(bool (*cond)(void *), void *arg, int64_t ms);

/* Thread and fd counts return to 'threads'/'fds' within 'ms' (for threads and fds that other
 * code releases asynchronously, such as a library's resolver thread). */
bool test_settles_to(int threads, int fds, int64_t ms);

/* A counter's value (a relaxed load), and a wait for it to reach 'n' within 'ms' (returns
 * whether it did): for the metrics' and the engine's atomics. */
uint64_t test_load(const atomic_uint_fast64_t *a);
bool test_wait_counter(const atomic_uint_fast64_t *a, uint64_t n, int64_t ms);

/* Writes into 'out' a key "k<N>" whose rendezvous ranking over 'u' puts upstream 'first'
 * first and, when 'second' >= 0, 'second' next (the first such N). */
struct upstreams;
void test_key_ranked(const struct upstreams *u, unsigned first, int second, char *out,
                     size_t cap);

/* The member attempt k (0 = first) of 'key' goes to at 'now_ms', the attempts before it having
 * gone where upstreams_pick() sent them. */
unsigned test_pick(struct upstreams *u, const char *key, unsigned k, int64_t now_ms);

/* A fetch engine of 'loops' loops (one upstream connection each) that never polls on its own
 * (idle poll of ten minutes), so a lost wakeup shows as a test that waits out its bound; NULL
 * if it cannot start. */
struct fetch;
struct fetch *test_quiet_engine(unsigned loops);

#endif
