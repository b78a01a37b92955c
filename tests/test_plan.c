/* Tests for server/batch/plan.h: plan_build() maps a request's positions to calls, one call per
 * distinct key (url_encode_key() of the id; a number's decimal text), in order of first
 * appearance, with each call's first position and its number of positions. Pure code. */
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/url.h"
#include "server/batch/plan.h"
#include "server/batch/request.h"
#include "tests/support.h"

/* Parses 'body' into *rq and builds its plan; false (after a failed assertion) if either fails. */
static bool build(const char *body, struct request *rq, struct plan *p)
{
    struct request_limits lim = {.max_batch = 100000, .default_timeout_ms = 1000,
                                 .max_timeout_ms = 1000};
    size_t len = strlen(body);
    char *copy = malloc(len + 1);
    CU_ASSERT_FATAL(copy != NULL);
    memcpy(copy, body, len + 1);
    struct request_error e;
    int rc = request_parse(&lim, copy, len, NULL, rq, &e);
    free(copy);
    CU_ASSERT_EQUAL(rc, 0);
    if (rc != 0) {
        fprintf(stderr, "\n  request_parse: %s\n", e.message);
        return false;
    }
    rc = plan_build(rq, p);
    CU_ASSERT_EQUAL(rc, 0);
    if (rc != 0)
        request_free(rq);
    return rc == 0;
}

static void release(struct request *rq, struct plan *p)
{
    plan_free(p);
    request_free(rq);
}

/* Call c has key 'key' (as text), first position 'first' and 'mult' positions. */
static void expect_call(const struct plan *p, size_t c, const char *key, uint32_t first,
                        uint32_t mult)
{
    CU_ASSERT_FATAL(c < p->ncalls);
    CU_ASSERT_EQUAL(p->calls[c].key_len, strlen(key));
    CU_ASSERT(p->calls[c].key_len == strlen(key) && !memcmp(plan_key(p, c), key, strlen(key)));
    CU_ASSERT_EQUAL(p->calls[c].first_pos, first);
    CU_ASSERT_EQUAL(p->calls[c].mult, mult);
}

/* The plan agrees with its request: every position's call has that position's key, the
 * multiplicities add up to the positions, and first_pos is the first position naming it. */
static void expect_consistent(const struct request *rq, const struct plan *p)
{
    CU_ASSERT_EQUAL_FATAL(p->npos, rq->n);
    uint32_t total = 0;
    for (size_t c = 0; c < p->ncalls; c++)
        total += p->calls[c].mult;
    CU_ASSERT_EQUAL(total, rq->n);
    int wrong = 0;
    char key[URL_ENCODED_MAX(REQUEST_ID_MAX_BYTES)];
    for (size_t i = 0; i < rq->n; i++) {
        uint32_t c = p->pos_call[i];
        if (c >= p->ncalls) {
            wrong++;
            continue;
        }
        size_t kl = url_encode_key(request_id(rq, i), rq->items[i].id_len, key);
        wrong += kl != p->calls[c].key_len || memcmp(key, plan_key(p, c), kl) != 0;
        wrong += p->calls[c].first_pos > i || p->pos_call[p->calls[c].first_pos] != c;
    }
    /* Distinct calls have distinct keys, in order of first appearance. */
    for (size_t c = 0; c < p->ncalls; c++) {
        if (c > 0 && p->calls[c].first_pos <= p->calls[c - 1].first_pos)
            wrong++;
        for (size_t d = c + 1; d < p->ncalls; d++)
            wrong += p->calls[c].key_len == p->calls[d].key_len &&
                     !memcmp(plan_key(p, c), plan_key(p, d), p->calls[c].key_len);
    }
    CU_ASSERT_EQUAL(wrong, 0);
}

static void test_plan_distinct_ids(void)
{
    struct request rq;
    struct plan p;
    CU_ASSERT_FATAL(build("{\"ids\":[\"a\",\"b\",\"c\"]}", &rq, &p));
    CU_ASSERT_EQUAL(p.npos, 3);
    CU_ASSERT_EQUAL_FATAL(p.ncalls, 3);
    expect_call(&p, 0, "a", 0, 1);
    expect_call(&p, 1, "b", 1, 1);
    expect_call(&p, 2, "c", 2, 1);
    for (uint32_t i = 0; i < 3; i++)
        CU_ASSERT_EQUAL(p.pos_call[i], i);
    expect_consistent(&rq, &p);
    release(&rq, &p);
}

/* Duplicates are one call, counted at each position; the first position names it. */
static void test_plan_duplicates_fetched_once(void)
{
    struct request rq;
    struct plan p;
    CU_ASSERT_FATAL(build("{\"ids\":[\"b\",\"a\",\"b\",\"b\",\"c\",\"a\"]}", &rq, &p));
    CU_ASSERT_EQUAL_FATAL(p.ncalls, 3);
    expect_call(&p, 0, "b", 0, 3);
    expect_call(&p, 1, "a", 1, 2);
    expect_call(&p, 2, "c", 4, 1);
    static const uint32_t want[] = {0, 1, 0, 0, 2, 1};
    for (size_t i = 0; i < 6; i++)
        CU_ASSERT_EQUAL(p.pos_call[i], want[i]);
    expect_consistent(&rq, &p);
    release(&rq, &p);
}

/* "7" and 7 share a key (a number's key is its decimal text), as do -0 and 0 and 1e1 and 10. */
static void test_plan_number_and_string_share_a_key(void)
{
    struct request rq;
    struct plan p;
    CU_ASSERT_FATAL(build("{\"ids\":[\"7\",7,0,\"0\",-0,1e1,\"10\",\"07\"]}", &rq, &p));
    CU_ASSERT_EQUAL_FATAL(p.ncalls, 4);
    expect_call(&p, 0, "7", 0, 2);
    expect_call(&p, 1, "0", 2, 3);
    expect_call(&p, 2, "10", 5, 2);
    expect_call(&p, 3, "07", 7, 1); /* a string of other digits is another id */
    expect_consistent(&rq, &p);
    release(&rq, &p);
}

/* Keys are the ids percent-encoded: every byte outside A-Z a-z 0-9 - . _ ~ as %XX, the same
 * for every upstream (no dot rule), so ids that differ stay apart, "%41" included. */
static void test_plan_keys_are_percent_encoded(void)
{
    struct request rq;
    struct plan p;
    CU_ASSERT_FATAL(build("{\"ids\":[\"a/b\",\"a b\",\"\\u00e9\",\"%41\",\"A\",\".\",\"..\","
                          "\"~x_-.\",\"a/b\"]}",
                          &rq, &p));
    CU_ASSERT_EQUAL_FATAL(p.ncalls, 8);
    expect_call(&p, 0, "a%2Fb", 0, 2);
    expect_call(&p, 1, "a%20b", 1, 1);
    expect_call(&p, 2, "%C3%A9", 2, 1);
    expect_call(&p, 3, "%2541", 3, 1);
    expect_call(&p, 4, "A", 4, 1);
    expect_call(&p, 5, ".", 5, 1);
    expect_call(&p, 6, "..", 6, 1);
    expect_call(&p, 7, "~x_-.", 7, 1);
    expect_consistent(&rq, &p);
    release(&rq, &p);
}

static void test_plan_empty_request(void)
{
    struct request rq;
    struct plan p;
    CU_ASSERT_FATAL(build("{\"ids\":[]}", &rq, &p));
    CU_ASSERT_EQUAL(p.npos, 0);
    CU_ASSERT_EQUAL(p.ncalls, 0);
    release(&rq, &p);
    CU_ASSERT(p.pos_call == NULL && p.calls == NULL && p.keys == NULL && p.ncalls == 0);
    plan_free(&p); /* freeing an emptied plan again is harmless */
}

/* Many positions over few keys, and many distinct keys with the longest ids (the table grows
 * with the positions; escaping triples an id's bytes). */
static void test_plan_large(void)
{
    size_t cap = 200000, k = 0;
    char *body = malloc(cap);
    CU_ASSERT_FATAL(body != NULL);
    k += (size_t)snprintf(body + k, cap - k, "{\"ids\":[");
    for (int i = 0; i < 10000; i++)
        k += (size_t)snprintf(body + k, cap - k, "%s\"hot-%d\"", i ? "," : "", i % 37);
    snprintf(body + k, cap - k, "]}");
    struct request rq;
    struct plan p;
    CU_ASSERT_FATAL(build(body, &rq, &p));
    CU_ASSERT_EQUAL(p.ncalls, 37);
    for (size_t c = 0; c < p.ncalls; c++)
        CU_ASSERT_EQUAL(p.calls[c].mult, c < 10000 % 37 ? 10000 / 37 + 1 : 10000 / 37);
    expect_consistent(&rq, &p);
    release(&rq, &p);

    /* 300 distinct ids of 256 bytes that all escape, and each again. */
    k = (size_t)snprintf(body, cap, "{\"ids\":[");
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < 300; i++) {
            k += (size_t)snprintf(body + k, cap - k, "%s\"%03d", pass || i ? "," : "", i);
            for (int j = 0; j < 253; j++)
                body[k++] = ' ';
            body[k++] = '"';
        }
    snprintf(body + k, cap - k, "]}");
    CU_ASSERT_FATAL(build(body, &rq, &p));
    CU_ASSERT_EQUAL(p.ncalls, 300);
    CU_ASSERT_EQUAL(p.calls[0].key_len, 3 + 3 * 253);
    for (size_t c = 0; c < p.ncalls; c++)
        CU_ASSERT_EQUAL(p.calls[c].mult, 2);
    expect_consistent(&rq, &p);
    release(&rq, &p);
    free(body);
}

static CU_TestInfo plan_tests[] = {
    {"distinct ids: a call each, in order", test_plan_distinct_ids},
    {"duplicates: one call, each position mapped, first position kept",
     test_plan_duplicates_fetched_once},
    {"\"7\" and 7 are one key; other spellings of a number too",
     test_plan_number_and_string_share_a_key},
    {"keys are percent-encoded; different ids stay apart", test_plan_keys_are_percent_encoded},
    {"an empty request plans nothing; plan_free empties", test_plan_empty_request},
    {"large: 10000 positions on 37 keys; 300 long escaped keys", test_plan_large},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(plan, plan_tests)
