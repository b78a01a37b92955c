/* Tests for fetch/outcome: the one failure vocabulary. Every ending an attempt can have maps
 * to one kind, one health verdict and one retry rule, and the names are the metrics labels. */
#include <errno.h>
#include <string.h>

#include "fetch/fetch.h"
#include "fetch/outcome.h"
#include "tests/support.h"

struct row {
    int err;
    long status;
    bool aborted;
    enum outcome_kind kind;
    enum outcome_health health;
    bool retryable;
};

static void test_outcome_table(void)
{
    static const struct row rows[] = {
        {0, 200, false, OUTCOME_OK, OUTCOME_ALIVE, false},
        {FETCH_ESTATUS, 404, false, OUTCOME_STATUS, OUTCOME_ALIVE, false},
        {FETCH_ESTATUS, 429, false, OUTCOME_STATUS, OUTCOME_ALIVE, false},
        {FETCH_ESTATUS, 500, false, OUTCOME_STATUS, OUTCOME_FAILED, false},
        {FETCH_ESTATUS, 501, false, OUTCOME_STATUS, OUTCOME_FAILED, false},
        {FETCH_ESTATUS, 502, false, OUTCOME_STATUS, OUTCOME_FAILED, true},
        {FETCH_ESTATUS, 503, false, OUTCOME_STATUS, OUTCOME_FAILED, true},
        {FETCH_ESTATUS, 504, false, OUTCOME_STATUS, OUTCOME_FAILED, true},
        {FETCH_ESTATUS, 505, false, OUTCOME_STATUS, OUTCOME_FAILED, false},
        {FETCH_EUNREACH, 0, false, OUTCOME_UNREACHABLE, OUTCOME_FAILED, true},
        {FETCH_ETOOBIG, 200, false, OUTCOME_TOO_LARGE, OUTCOME_ALIVE, false},
        {-ETIMEDOUT, 0, false, OUTCOME_DEADLINE, OUTCOME_NO_VERDICT, false},
        {-ECANCELED, 0, false, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {FETCH_ESHUTDOWN, 0, false, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {-ESHUTDOWN, 0, false, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {-ENOMEM, 0, false, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {-EPIPE, 0, false, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        /* Ended by its own ctx: a deadline or a cancel, whatever the transfer had seen, and
         * nothing said of the upstream (a sibling's failure is not this upstream's). */
        {-ETIMEDOUT, 0, true, OUTCOME_DEADLINE, OUTCOME_NO_VERDICT, false},
        {-ECANCELED, 0, true, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {FETCH_ESTATUS, 502, true, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {FETCH_EUNREACH, 0, true, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
        {0, 200, true, OUTCOME_CANCELED, OUTCOME_NO_VERDICT, false},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const struct row *w = &rows[i];
        struct outcome o = outcome_of(w->err, w->status, w->aborted);
        CU_ASSERT_EQUAL(o.kind, w->kind);
        CU_ASSERT_EQUAL(o.health, w->health);
        CU_ASSERT_EQUAL(o.retryable, w->retryable);
    }
}

static void test_outcome_names(void)
{
    static const char *const want[OUTCOME_KINDS] = {"ok",       "upstream_status", "unreachable",
                                                    "deadline", "canceled",        "too_large"};
    for (int k = 0; k < OUTCOME_KINDS; k++)
        CU_ASSERT_STRING_EQUAL(outcome_name((enum outcome_kind)k), want[k]);
    CU_ASSERT_STRING_EQUAL(outcome_name(OUTCOME_KINDS), "canceled"); /* out of range */
}

static CU_TestInfo outcome_tests[] = {
    {"every ending maps to one kind, health verdict and retry rule", test_outcome_table},
    {"kind names are the metrics result labels", test_outcome_names},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(outcome, outcome_tests)
