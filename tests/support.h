/* Shared test support: suite registration and process-resource probes. */
#ifndef FANOUT_TEST_SUPPORT_H
#define FANOUT_TEST_SUPPORT_H

#include <CUnit/CUnit.h>
#include <stdbool.h>
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

/* Threads in this process (/proc/self/task). */
int test_thread_count(void);

/* Open file descriptors in this process (/proc/self/fd). */
int test_fd_count(void);

/* Polls cond(arg) every millisecond until it holds or 'ms' pass; returns its last value. For
 * waiting on another thread's progress with a generous bound, never for timing assertions. */
bool test_wait_until(bool (*cond)(void *), void *arg, int64_t ms);

/* Thread and fd counts return to 'threads'/'fds' within 'ms' (threads exit asynchronously after
 * a join returns only in the kernel's view). */
bool test_settles_to(int threads, int fds, int64_t ms);

#endif
