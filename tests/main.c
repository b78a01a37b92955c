/* CUnit runner shared by every test program: runs the suites registered with TEST_SUITE, prints
 * CUnit's summary and exits non-zero if any test or suite failed. Optional argument: a suite name
 * to run alone. */
#include <CUnit/Basic.h>
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "ctx/ctx.h"
#include "tests/support.h"

struct test_suite *test_suites(void);

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "curl_global_init failed\n");
        return 1;
    }
    if (CU_initialize_registry() != CUE_SUCCESS) {
        fprintf(stderr, "CUnit: %s\n", CU_get_error_msg());
        return 1;
    }
    for (struct test_suite *s = test_suites(); s; s = s->next) {
        if (argc > 1 && strcmp(argv[1], s->name) != 0)
            continue;
        CU_pSuite cs = CU_add_suite(s->name, s->init, s->cleanup);
        if (!cs) {
            fprintf(stderr, "CUnit: %s\n", CU_get_error_msg());
            return 1;
        }
        for (CU_TestInfo *t = s->tests; t->pName; t++)
            if (!CU_add_test(cs, t->pName, t->pTestFunc)) {
                fprintf(stderr, "CUnit: %s\n", CU_get_error_msg());
                return 1;
            }
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    /* Read the counters before cleanup: afterwards they read 0. */
    unsigned failed = CU_get_number_of_tests_failed() + CU_get_number_of_suites_failed();
    unsigned ran = CU_get_number_of_tests_run();
    printf("\nRESULT tests_run=%u tests_failed=%u\n", ran, CU_get_number_of_tests_failed());
    CU_cleanup_registry();
    ctx_shutdown();
    curl_global_cleanup();
    return failed ? 1 : (int)CU_get_error();
}
