/* Tests for fetch/upstream.h: ranking, picking, ejection and the latency estimate. Pure code: no
 * threads but the race test's, no sockets. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/upstream.h"
#include "tests/support.h"

static struct upstreams *make(unsigned n, enum upstream_policy p, unsigned eject_after,
                              unsigned pct)
{
    static char text[UPSTREAMS_MAX][64];
    const char *t[UPSTREAMS_MAX];
    for (unsigned i = 0; i < n; i++) {
        snprintf(text[i], sizeof(text[i]), "http://10.0.0.%u:8080/items/{id}", i + 1);
        t[i] = text[i];
    }
    struct upstreams_opts o = {.policy = p,
                               .eject_after = eject_after,
                               .eject_ms = 1000,
                               .eject_max_ms = 4000,
                               .max_ejected_pct = pct};
    struct upstreams *u = NULL;
    char err[256];
    if (upstreams_new(t, n, &o, &u, err, sizeof(err)) != 0)
        fprintf(stderr, "\n  upstreams_new: %s\n", err);
    return u;
}

static void key_of(unsigned i, char *k, size_t cap)
{
    snprintf(k, cap, "item-%u", i);
}

/* The ranking is a permutation, the same every time for a key, and spreads first choices. */
static void test_upstream_rank_is_stable_and_spread(void)
{
    struct upstreams *u = make(5, UPSTREAM_REPLICAS, 5, 50);
    CU_ASSERT_FATAL(u != NULL);
    unsigned first[5] = {0};
    for (unsigned i = 0; i < 10000; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        uint16_t a[UPSTREAM_MEMBERS_MAX], b[UPSTREAM_MEMBERS_MAX];
        CU_ASSERT_EQUAL(upstreams_rank(u, k, strlen(k), 0, a), 5);
        upstreams_rank(u, k, strlen(k), 0, b);
        CU_ASSERT(memcmp(a, b, 5 * sizeof(a[0])) == 0);
        unsigned seen = 0;
        for (unsigned j = 0; j < 5; j++)
            seen |= 1u << a[j];
        CU_ASSERT_EQUAL(seen, 0x1f);
        first[a[0]]++;
    }
    for (unsigned j = 0; j < 5; j++) /* 2000 expected each; a wide band for any hash */
        CU_ASSERT(first[j] > 1500 && first[j] < 2500);
    upstreams_free(u);
}

/* Removing one of 5 upstreams moves only the keys it ranked first, each to its second choice;
 * adding a sixth takes about a sixth of the keys and moves nothing else. */
static void test_upstream_rendezvous_moves_only_the_removed(void)
{
    const char *five[] = {"http://a:1/i/{id}", "http://b:1/i/{id}", "http://c:1/i/{id}",
                          "http://d:1/i/{id}", "http://e:1/i/{id}", "http://f:1/i/{id}"};
    const char *four[] = {five[0], five[1], five[3], five[4]}; /* "c" removed */
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS};
    struct upstreams *u5, *u4, *u6;
    char err[128];
    CU_ASSERT_FATAL(upstreams_new(five, 5, &o, &u5, err, sizeof(err)) == 0);
    CU_ASSERT_FATAL(upstreams_new(four, 4, &o, &u4, err, sizeof(err)) == 0);
    CU_ASSERT_FATAL(upstreams_new(five, 6, &o, &u6, err, sizeof(err)) == 0);
    unsigned moved = 0, on_c = 0, wrong = 0, taken = 0, moved6 = 0;
    for (unsigned i = 0; i < 20000; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        uint16_t r5[UPSTREAM_MEMBERS_MAX], r4[UPSTREAM_MEMBERS_MAX], r6[UPSTREAM_MEMBERS_MAX];
        upstreams_rank(u5, k, strlen(k), 0, r5);
        upstreams_rank(u4, k, strlen(k), 0, r4);
        upstreams_rank(u6, k, strlen(k), 0, r6);
        const char *was = upstream_template(u5, r5[0]), *now = upstream_template(u4, r4[0]);
        if (strcmp(was, now) != 0) {
            moved++;
            /* only keys that were on "c", and each lands where its second choice was */
            if (strcmp(was, five[2]) != 0 || strcmp(now, upstream_template(u5, r5[1])) != 0)
                wrong++;
        }
        on_c += strcmp(was, five[2]) == 0;
        const char *six = upstream_template(u6, r6[0]);
        if (strcmp(six, was) != 0) {
            moved6++;
            taken += strcmp(six, five[5]) == 0; /* moved only to the new one */
        }
    }
    CU_ASSERT_EQUAL(wrong, 0);
    CU_ASSERT_EQUAL(moved, on_c);
    CU_ASSERT_EQUAL(taken, moved6);
    CU_ASSERT(moved6 > 20000 / 6 - 600 && moved6 < 20000 / 6 + 600);
    upstreams_free(u5);
    upstreams_free(u4);
    upstreams_free(u6);
}

/* Replicas: attempt k goes to the k-th of the ranking, then round again; shards of one member
 * each: always the first. */
static void test_upstream_pick_follows_the_ranking(void)
{
    struct upstreams *r = make(3, UPSTREAM_REPLICAS, 5, 50);
    struct upstreams *s = make(3, UPSTREAM_SHARDS, 5, 50);
    CU_ASSERT_FATAL(r && s);
    uint16_t rank[UPSTREAM_MEMBERS_MAX];
    CU_ASSERT_EQUAL(upstreams_rank(r, "k", 1, 0, rank), 3);
    for (unsigned k = 0; k < 7; k++) {
        CU_ASSERT_EQUAL(test_pick(r, "k", k, 0), rank[k % 3]);
        CU_ASSERT_EQUAL(test_pick(s, "k", k, 0), rank[0]);
    }
    char url[128];
    size_t n = upstream_url(r, 1, "a%2Fb", 5, url, sizeof(url));
    CU_ASSERT_STRING_EQUAL(url, "http://10.0.0.2:8080/items/a%2Fb");
    CU_ASSERT_EQUAL(n, strlen(url));
    n = upstream_url(r, 0, "..", 2, url, sizeof(url)); /* the dot rule of the template */
    CU_ASSERT_STRING_EQUAL(url, "http://10.0.0.1:8080/items/%2E%2E");
    CU_ASSERT(upstream_url(r, 0, "abc", 3, url, 10) >= 10); /* too small: says so */
    CU_ASSERT_STRING_EQUAL(upstream_label(r, 2), "10.0.0.3:8080");
    upstreams_free(r);
    upstreams_free(s);
}

/* eject_after failures in a row eject; a success in between resets the count; the ejected one
 * is skipped; it returns after its time; a repeat ejection lasts twice as long; events fire. */
struct events {
    int ejected, returned;
    int64_t last_ms;
    char label[64];      /* the last event's upstream */
    uint64_t ejections;  /* and its ejections so far */
};

static void on_event(void *arg, const char *upstream, const char *label, bool ejected, int64_t ms,
                     uint64_t ejections)
{
    struct events *e = arg;
    (void)upstream;
    snprintf(e->label, sizeof(e->label), "%s", label);
    e->ejections = ejections;
    if (ejected) {
        e->ejected++;
        e->last_ms = ms;
    } else {
        e->returned++;
    }
}

static void test_upstream_ejection_and_return(void)
{
    const char *t[] = {"http://a:1/i/{id}", "http://b:1/i/{id}", "http://c:1/i/{id}"};
    struct events ev = {0};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS,
                               .eject_after = 3,
                               .eject_ms = 1000,
                               .eject_max_ms = 3000,
                               .max_ejected_pct = 50,
                               .on_event = on_event,
                               .event_arg = &ev};
    struct upstreams *u;
    char err[128];
    CU_ASSERT_FATAL(upstreams_new(t, 3, &o, &u, err, sizeof(err)) == 0);
    int64_t now = 100000;
    upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
    upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
    upstream_report(u, 0, UPSTREAM_OK, 10, now); /* resets */
    upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
    upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_FALSE(upstream_ejected(u, 0, now));
    upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_TRUE(upstream_ejected(u, 0, now));
    CU_ASSERT_EQUAL(ev.ejected, 1);
    CU_ASSERT_EQUAL(ev.last_ms, 1000);
    CU_ASSERT_EQUAL(upstream_ejections(u, 0), 1);
    CU_ASSERT_STRING_EQUAL(ev.label, upstream_label(u, 0));
    CU_ASSERT_EQUAL(ev.ejections, 1);
    /* A key ranking upstream 0 first skips it: attempt 0 goes to its second choice. */
    uint16_t rank[UPSTREAM_MEMBERS_MAX];
    char k[32];
    for (unsigned i = 0;; i++) {
        key_of(i, k, sizeof(k));
        upstreams_rank(u, k, strlen(k), 0, rank);
        if (rank[0] == 0)
            break;
    }
    CU_ASSERT_EQUAL(test_pick(u, k, 0, now + 999), rank[1]);
    CU_ASSERT_EQUAL(test_pick(u, k, 1, now + 999), rank[2]);
    /* The cap: 50% of 3 is 1, so a second upstream failing stays in. */
    for (int i = 0; i < 10; i++)
        upstream_report(u, 1, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_FALSE(upstream_ejected(u, 1, now));
    CU_ASSERT_EQUAL(ev.ejected, 1);
    /* Back after its time, once. */
    CU_ASSERT_EQUAL(test_pick(u, k, 0, now + 1000), rank[0]);
    CU_ASSERT_EQUAL(ev.returned, 1);
    CU_ASSERT_FALSE(upstream_ejected(u, 0, now + 1001));
    CU_ASSERT_EQUAL(ev.returned, 1);
    /* Ejected again soon: twice as long, then capped at eject_max_ms. The slot is free again,
     * but upstream 1 has failed ten times: its next failure ejects it first. */
    upstream_report(u, 1, UPSTREAM_OK, 10, now + 1000); /* it recovers */
    now += 2000;
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 3; i++)
            upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
        CU_ASSERT_TRUE(upstream_ejected(u, 0, now));
        int64_t want = round == 0 ? 2000 : 3000;
        CU_ASSERT_EQUAL(ev.last_ms, want);
        CU_ASSERT_TRUE(upstream_ejected(u, 0, now + want - 1));
        CU_ASSERT_FALSE(upstream_ejected(u, 0, now + want));
        now += want + 10;
    }
    CU_ASSERT_EQUAL(upstream_ejections(u, 0), 4);
    /* In for longer than eject_max_ms: the doubling starts over. */
    now += 3000;
    for (int i = 0; i < 3; i++)
        upstream_report(u, 0, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_EQUAL(ev.last_ms, 1000);
    upstreams_free(u);

    /* Shards and a single upstream never eject. */
    struct upstreams *s = make(3, UPSTREAM_SHARDS, 1, 100), *one = make(1, UPSTREAM_REPLICAS, 1, 50);
    CU_ASSERT_FATAL(s && one);
    for (int i = 0; i < 10; i++) {
        upstream_report(s, 0, UPSTREAM_FAILED, -1, 0);
        upstream_report(one, 0, UPSTREAM_FAILED, -1, 0);
    }
    CU_ASSERT_FALSE(upstream_ejected(s, 0, 0));
    CU_ASSERT_FALSE(upstream_ejected(one, 0, 0));
    upstreams_free(s);
    upstreams_free(one);
}

/* Several threads report failures on every upstream at once: the cap holds and the counts
 * balance (for make tsan). */
struct racer {
    struct upstreams *u;
    int64_t now;
};

static void *racer_main(void *arg)
{
    struct racer *r = arg;
    for (int i = 0; i < 20000; i++) {
        unsigned up = (unsigned)i % 4;
        upstream_report(r->u, up, i % 7 ? UPSTREAM_FAILED : UPSTREAM_OK, 100 + i % 50,
                        r->now + i / 100);
        char key[16];
        snprintf(key, sizeof(key), "r%d", i % 50);
        test_pick(r->u, key, (unsigned)i % 3, r->now + i / 100);
    }
    return NULL;
}

static void test_upstream_ejection_races(void)
{
    struct upstreams *u = make(4, UPSTREAM_REPLICAS, 2, 50);
    CU_ASSERT_FATAL(u != NULL);
    pthread_t t[4];
    struct racer r = {u, 0};
    for (int i = 0; i < 4; i++)
        CU_ASSERT_FATAL(pthread_create(&t[i], NULL, racer_main, &r) == 0);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    int ejected = 0;
    for (unsigned i = 0; i < 4; i++)
        ejected += upstream_ejected(u, i, 1000000 - 1) ? 1 : 0;
    CU_ASSERT(ejected <= 2);
    /* Far in the future every ejection has ended, and the set can eject again. */
    for (unsigned i = 0; i < 4; i++)
        CU_ASSERT_FALSE(upstream_ejected(u, i, 100000000));
    upstream_report(u, 0, UPSTREAM_FAILED, -1, 100000000);
    upstream_report(u, 0, UPSTREAM_FAILED, -1, 100000000);
    CU_ASSERT_TRUE(upstream_ejected(u, 0, 100000000));
    upstreams_free(u);
}

/* The p95 estimate appears after enough samples, and tracks the distribution within a bucket
 * (about 19%); it follows a shift once the old samples decay. */
static void test_upstream_p95_estimate(void)
{
    struct upstreams *u = make(1, UPSTREAM_REPLICAS, 0, 0);
    CU_ASSERT_FATAL(u != NULL);
    CU_ASSERT_EQUAL(upstream_p95_us(u, 0), -1);
    uint64_t seed = 7;
    for (int i = 0; i < UPSTREAM_P95_MIN_SAMPLES - 1; i++)
        upstream_report(u, 0, UPSTREAM_OK, 1000, 0);
    CU_ASSERT_EQUAL(upstream_p95_us(u, 0), -1);
    /* 95% at 5 ms, 5% at 100 ms: the p95 sits near 5 ms... */
    for (int i = 0; i < 4000; i++) {
        int64_t us = test_rng(&seed) % 100 < 95 ? 5000 : 100000;
        upstream_report(u, 0, UPSTREAM_OK, us, 0);
    }
    int64_t p = upstream_p95_us(u, 0);
    CU_ASSERT(p >= 4000 && p <= 7000);
    /* ...90% at 5 ms, 10% at 50 ms: now it is in the slow group. */
    for (int i = 0; i < 8000; i++) {
        int64_t us = test_rng(&seed) % 100 < 90 ? 5000 : 50000;
        upstream_report(u, 0, UPSTREAM_OK, us, 0);
    }
    p = upstream_p95_us(u, 0);
    CU_ASSERT(p >= 40000 && p <= 60000);
    if (p < 40000 || p > 60000)
        fprintf(stderr, "\n  p95 %lld us\n", (long long)p);
    upstreams_free(u);
}

static void test_upstream_rejects_bad_sets(void)
{
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS};
    struct upstreams *u = NULL;
    char err[256];
    const char *dup[] = {"http://a:1/{id}", "http://a:1/{id}"};
    CU_ASSERT_EQUAL(upstreams_new(dup, 2, &o, &u, err, sizeof(err)), -EINVAL);
    CU_ASSERT(strstr(err, "given twice") != NULL);
    const char *bad[] = {"http://a:1/{id}", "ftp://b/{id}"};
    CU_ASSERT_EQUAL(upstreams_new(bad, 2, &o, &u, err, sizeof(err)), -EINVAL);
    CU_ASSERT(strstr(err, "ftp://b/{id}") != NULL);
    CU_ASSERT_EQUAL(upstreams_new(bad, 0, &o, &u, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NULL(u);
    const char *cred[] = {"http://user:pw@h/{id}"};
    if (upstreams_new(cred, 1, &o, &u, err, sizeof(err)) == 0) {
        CU_ASSERT_STRING_EQUAL(upstream_label(u, 0), "h:80"); /* no credentials in labels */
        upstreams_free(u);
    }
}

/* A set of three members of one upstream (10.0.9.1-3), with the load bound at 'factor'. */
static struct upstreams *three_members(double factor)
{
    const char *t[] = {"http://items.test:8080/items/{id}"};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS, .balance_factor = factor};
    struct upstreams *base = NULL, *u = NULL;
    char err[256];
    if (upstreams_new(t, 1, &o, &base, err, sizeof(err)) != 0)
        return NULL;
    const char *addrs[] = {"10.0.9.1", "10.0.9.2", "10.0.9.3"};
    struct upstream_spec sp = {.tmpl = t[0], .addrs = addrs, .naddrs = 3};
    if (upstreams_with_members(base, &sp, 1, 0, &u, err, sizeof(err)) != 0)
        fprintf(stderr, "\n  upstreams_with_members: %s\n", err);
    upstreams_free(base);
    return u;
}

/* Holds 'n' attempts in flight on member m (or lets them go, with n negative). */
static void hold(struct upstreams *u, unsigned m, int n)
{
    for (int i = 0; i < (n > 0 ? n : -n); i++)
        if (n > 0)
            upstream_attempt_begin(u, m);
        else
            upstream_attempt_end(u, m);
}

/* The load bound weighs a member's attempts by its slowness (ten here): a key whose first choice
 * is ten times slower goes to its second choice while the others are idle (one more attempt
 * would weigh 10 > ceil(1.25 x 1 / 3) = 1), and with 3, 3 and 1 attempts in flight (the 1 on
 * the first choice: 20 > ceil(1.25 x 17 / 3) = 8); once the fast ones hold 12 each it is the
 * first choice again (10 <= ceil(1.25 x 25 / 3) = 11). Members that answer alike keep the key
 * on its first choice (2 <= ceil(1.25 x 8 / 3) = 4), and so does no bound (factor 0). Unheard
 * for a while, the slow member's slowness fades and it gets its key back when idle. */
static void test_upstream_bound_weighs_slow_members(void)
{
    struct upstreams *alike = three_members(1.25), *slow = three_members(1.25),
                     *off = three_members(0);
    CU_ASSERT_FATAL(alike && slow && off);
    uint16_t rank[UPSTREAM_MEMBERS_MAX];
    CU_ASSERT_EQUAL_FATAL(upstreams_rank(alike, "k", 1, 0, rank), 3);
    for (unsigned m = 0; m < 3; m++)
        for (int i = 0; i < 16; i++) {
            upstream_report(alike, m, UPSTREAM_OK, m == rank[0] ? 6000 : 5000, 0); /* noise */
            upstream_report(slow, m, UPSTREAM_OK, m == rank[0] ? 50000 : 5000, 0);
            upstream_report(off, m, UPSTREAM_OK, m == rank[0] ? 50000 : 5000, 0);
        }
    CU_ASSERT_EQUAL(test_pick(alike, "k", 0, 0), rank[0]); /* idle */
    CU_ASSERT_EQUAL(test_pick(slow, "k", 0, 0), rank[1]);
    CU_ASSERT_EQUAL(test_pick(off, "k", 0, 0), rank[0]);
    struct upstreams *sets[] = {alike, slow, off};
    for (int i = 0; i < 3; i++) {
        hold(sets[i], rank[0], 1);
        hold(sets[i], rank[1], 3);
        hold(sets[i], rank[2], 3);
    }
    CU_ASSERT_EQUAL(test_pick(alike, "k", 0, 0), rank[0]);
    CU_ASSERT_EQUAL(test_pick(slow, "k", 0, 0), rank[1]);
    CU_ASSERT_EQUAL(test_pick(off, "k", 0, 0), rank[0]);
    hold(slow, rank[0], -1);
    hold(slow, rank[1], 9);
    hold(slow, rank[2], 9);
    CU_ASSERT_EQUAL(test_pick(slow, "k", 0, 0), rank[0]); /* the fast ones are loaded */
    hold(slow, rank[1], -12);
    hold(slow, rank[2], -12);
    CU_ASSERT_EQUAL(test_pick(slow, "k", 0, 0), rank[1]);
    CU_ASSERT_EQUAL(test_pick(slow, "k", 0, 10000), rank[0]); /* 10 s unheard: faded */
    hold(alike, rank[0], -1);
    hold(off, rank[0], -1);
    for (int i = 0; i < 3; i++) {
        if (i != 1) {
            hold(sets[i], rank[1], -3);
            hold(sets[i], rank[2], -3);
        }
        for (unsigned m = 0; m < 3; m++)
            CU_ASSERT_EQUAL(upstream_in_flight(sets[i], m), 0);
        upstreams_free(sets[i]);
    }
}

/* Auto hedging waits for the fastest candidate: a key whose first choice is slow still gets a
 * hedge delay from the fast members' latency, and none until some member has enough samples. */
static void test_upstream_hedge_delay_is_the_fastest_candidates(void)
{
    struct upstreams *u = three_members(1.25);
    CU_ASSERT_FATAL(u != NULL);
    struct upstream_key k;
    upstream_key_init(u, "k", 1, &k);
    CU_ASSERT_EQUAL(upstreams_hedge_us(u, &k), -1);
    for (int i = 0; i < 2 * UPSTREAM_P95_MIN_SAMPLES; i++) {
        upstream_report(u, 0, UPSTREAM_OK, 50000, 0);
        upstream_report(u, 1, UPSTREAM_OK, 5000, 0);
    }
    int64_t slow = upstream_hedge_us(u, 0), fast = upstream_hedge_us(u, 1);
    CU_ASSERT(slow > 40000 && fast > 0 && fast < 7000);
    CU_ASSERT_EQUAL(upstreams_hedge_us(u, &k), fast);
    upstreams_free(u);
}

static CU_TestInfo upstream_tests[] = {
    {"rank: a stable permutation, first choices spread", test_upstream_rank_is_stable_and_spread},
    {"rendezvous: removing one moves only its keys", test_upstream_rendezvous_moves_only_the_removed},
    {"pick: replicas walk the ranking, shards stay", test_upstream_pick_follows_the_ranking},
    {"ejection: after N in a row, skipped, returns, doubles", test_upstream_ejection_and_return},
    {"ejection: concurrent reports respect the cap", test_upstream_ejection_races},
    {"p95 estimate: needs samples, tracks, decays", test_upstream_p95_estimate},
    {"bad sets are refused with a reason", test_upstream_rejects_bad_sets},
    {"load bound: a slow member's attempts weigh more", test_upstream_bound_weighs_slow_members},
    {"auto hedge delay: the fastest candidate's", test_upstream_hedge_delay_is_the_fastest_candidates},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(upstream, upstream_tests)
