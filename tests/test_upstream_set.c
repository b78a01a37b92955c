/* Tests for fetch/upstream.h's identity and snapshots: an upstream keeps its state from one
 * snapshot to the next, a snapshot stays whole for its readers after a swap, a dropped upstream
 * stops counting against the ejection cap, and readers race a swapping writer cleanly. */
#include <CUnit/CUnit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "ctx/ctx.h"
#include "fetch/upstream.h"
#include "tests/support.h"

#define A "http://10.0.1.1:8080/items/{id}"
#define B "http://10.0.1.2:8080/items/{id}"
#define C "http://10.0.1.3:8080/items/{id}"
#define D "http://10.0.1.4:8080/items/{id}"

static struct upstreams *first(const char *const *t, unsigned n, unsigned eject_after,
                               unsigned pct)
{
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS,
                               .eject_after = eject_after,
                               .eject_ms = 60000,
                               .eject_max_ms = 60000,
                               .max_ejected_pct = pct};
    struct upstreams *u = NULL;
    char err[256];
    if (upstreams_new(t, n, &o, &u, err, sizeof(err)) != 0)
        fprintf(stderr, "\n  upstreams_new: %s\n", err);
    return u;
}

/* The index of the upstream with template 'text' in 'u', or -1. */
static int index_of(const struct upstreams *u, const char *text)
{
    for (unsigned i = 0; i < upstreams_count(u); i++)
        if (!strcmp(upstream_template(u, i), text))
            return (int)i;
    return -1;
}

/* An upstream carried into the next snapshot is the same upstream: its ejection, its count of
 * ejections and its latency estimate come along; a new one starts fresh. */
static void test_set_carries_state_by_identity(void)
{
    const char *t1[] = {A, B, C};
    struct upstreams *s1 = first(t1, 3, 2, 100);
    CU_ASSERT_FATAL(s1 != NULL);
    int64_t now = 1000;
    int ib = index_of(s1, B);
    upstream_report(s1, (unsigned)ib, UPSTREAM_FAILED, -1, now);
    upstream_report(s1, (unsigned)ib, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_TRUE(upstream_ejected(s1, (unsigned)ib, now));
    int ia = index_of(s1, A);
    for (int i = 0; i < 2 * UPSTREAM_P95_MIN_SAMPLES; i++)
        upstream_report(s1, (unsigned)ia, UPSTREAM_OK, 5000, now);
    int64_t p95 = upstream_p95_us(s1, (unsigned)ia);
    CU_ASSERT(p95 > 0);

    const char *t2[] = {D, B, A}; /* C dropped, D new, the others in other places */
    struct upstreams *s2 = NULL;
    char err[256];
    CU_ASSERT_FATAL(upstreams_with(s1, t2, 3, &s2, err, sizeof(err)) == 0);
    CU_ASSERT_EQUAL(upstreams_count(s2), 3);
    CU_ASSERT_EQUAL(index_of(s2, B), 1);
    CU_ASSERT_TRUE(upstream_ejected(s2, 1, now)); /* still out, in the new snapshot */
    CU_ASSERT_EQUAL(upstream_ejections(s2, 1), 1);
    CU_ASSERT_EQUAL(upstream_p95_us(s2, 2), p95); /* A's estimate came along */
    CU_ASSERT_EQUAL(upstream_p95_us(s2, 0), -1);  /* D has none yet */
    CU_ASSERT_FALSE(upstream_ejected(s2, 0, now));
    CU_ASSERT_STRING_EQUAL(upstream_label(s2, 0), "10.0.1.4:8080");
    /* The old snapshot is unchanged: C is still in it, in its place. */
    CU_ASSERT_EQUAL(upstreams_count(s1), 3);
    CU_ASSERT_EQUAL(index_of(s1, C), 2);
    upstreams_free(s1);
    /* s2 outlives s1 and still reads its upstreams (ASan sees a use after free otherwise). */
    CU_ASSERT_STRING_EQUAL(upstream_template(s2, 2), A);
    upstreams_free(s2);
}

/* upstreams_with() refuses what upstreams_new() refuses, and leaves the old snapshot as it was. */
static void test_set_with_refuses_bad_lists(void)
{
    const char *t1[] = {A, B};
    struct upstreams *s1 = first(t1, 2, 0, 0);
    CU_ASSERT_FATAL(s1 != NULL);
    struct upstreams *s2 = (struct upstreams *)&s2;
    char err[256] = "";
    const char *twice[] = {A, C, A};
    CU_ASSERT_EQUAL(upstreams_with(s1, twice, 3, &s2, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NULL(s2);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "given twice"));
    const char *bad[] = {B, "http://10.0.1.9/no-placeholder"};
    CU_ASSERT_EQUAL(upstreams_with(s1, bad, 2, &s2, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "no-placeholder"));
    CU_ASSERT_EQUAL(upstreams_with(s1, t1, 0, &s2, err, sizeof(err)), -EINVAL);
    CU_ASSERT_EQUAL(upstreams_count(s1), 2);
    CU_ASSERT_STRING_EQUAL(upstream_template(s1, 1), B);
    upstreams_free(s1);
}

/* A live set hands out the current snapshot; a reader keeps the one it took across swaps; an
 * ejected upstream that leaves the set no longer counts against the cap. */
static void test_live_swap_and_the_ejection_cap(void)
{
    const char *t1[] = {A, B};
    struct upstreams *s1 = first(t1, 2, 1, 50); /* one of two may be out */
    CU_ASSERT_FATAL(s1 != NULL);
    struct upstream_live *live = NULL;
    CU_ASSERT_FATAL(upstream_live_new(s1, &live) == 0);
    int64_t now = 1000;
    struct upstreams *r1 = upstream_live_get(live);
    CU_ASSERT_PTR_EQUAL(r1, s1);
    upstream_report(r1, (unsigned)index_of(r1, A), UPSTREAM_FAILED, -1, now);
    CU_ASSERT_TRUE(upstream_ejected(r1, (unsigned)index_of(r1, A), now));
    upstream_report(r1, (unsigned)index_of(r1, B), UPSTREAM_FAILED, -1, now);
    CU_ASSERT_FALSE(upstream_ejected(r1, (unsigned)index_of(r1, B), now)); /* at the cap */

    const char *t2[] = {B, C};
    struct upstreams *s2 = NULL;
    char err[256];
    CU_ASSERT_FATAL(upstreams_with(r1, t2, 2, &s2, err, sizeof(err)) == 0);
    upstream_live_swap(live, s2);
    struct upstreams *r2 = upstream_live_get(live);
    CU_ASSERT_PTR_EQUAL(r2, s2);
    /* A left while ejected: the cap has room again, and B can be ejected now. */
    upstream_report(r2, (unsigned)index_of(r2, B), UPSTREAM_FAILED, -1, now);
    CU_ASSERT_TRUE(upstream_ejected(r2, (unsigned)index_of(r2, B), now));
    /* The reader that took the first snapshot still has A and B, in their places. */
    CU_ASSERT_EQUAL(index_of(r1, A), 0);
    CU_ASSERT_EQUAL(index_of(r1, B), 1);
    upstreams_free(r1);
    upstreams_free(r2);
    upstream_live_free(live);
}

struct race {
    struct upstream_live *live;
    atomic_bool stop;
    atomic_uint_fast64_t picks;
    atomic_uint bad;
};

static void *reader(void *arg)
{
    struct race *r = arg;
    unsigned long k = 0;
    while (!atomic_load(&r->stop)) {
        struct upstreams *u = upstream_live_get(r->live);
        char key[32], url[128];
        int n = snprintf(key, sizeof(key), "k%lu", k++);
        unsigned i = test_pick(u, key, (unsigned)(k % 3), ctx_now());
        if (i >= upstreams_member_count(u) ||
            upstream_url(u, i, key, (size_t)n, url, sizeof(url)) >= sizeof(url) ||
            strncmp(url, upstream_template(u, i), 20) != 0)
            atomic_fetch_add(&r->bad, 1);
        upstream_report(u, i, k % 7 ? UPSTREAM_OK : UPSTREAM_FAILED, 1000, ctx_now());
        upstreams_free(u);
        atomic_fetch_add(&r->picks, 1);
    }
    return NULL;
}

static bool readers_running(void *arg)
{
    struct race *r = arg;
    return atomic_load(&r->picks) >= 100;
}

/* Readers take, use and drop snapshots while a writer swaps set after set (under TSan and ASan
 * this is the proof that a snapshot is never freed under a reader). */
static void test_live_readers_race_swaps(void)
{
    const char *lists[3][3] = {{A, B, C}, {B, C, D}, {D, A, B}};
    struct upstreams *s = first(lists[0], 3, 3, 34);
    CU_ASSERT_FATAL(s != NULL);
    struct race r = {.bad = 0};
    CU_ASSERT_FATAL(upstream_live_new(s, &r.live) == 0);
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        CU_ASSERT_FATAL(pthread_create(&th[i], NULL, reader, &r) == 0);
    CU_ASSERT(test_wait_until(readers_running, &r, test_ms(10000)));
    for (int round = 1; round <= 2000; round++) {
        struct upstreams *cur = upstream_live_get(r.live), *next = NULL;
        char err[256];
        CU_ASSERT_FATAL(upstreams_with(cur, lists[round % 3], 3, &next, err, sizeof(err)) == 0);
        upstreams_free(cur);
        upstream_live_swap(r.live, next);
    }
    atomic_store(&r.stop, true);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    CU_ASSERT_EQUAL(atomic_load(&r.bad), 0);
    upstream_live_free(r.live);
}

static CU_TestInfo set_tests[] = {
    {"an upstream keeps its state from one snapshot to the next", test_set_carries_state_by_identity},
    {"with(): bad lists refused, the old snapshot unchanged", test_set_with_refuses_bad_lists},
    {"live: swap, readers keep theirs, a dropped upstream frees the cap",
     test_live_swap_and_the_ejection_cap},
    {"live: readers race a swapping writer", test_live_readers_race_swaps},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(upstream_set, set_tests)
