/* Tests for fetch/upstream.h's members (an upstream and an address): identity across snapshots,
 * how keys move when members come and go, slow start, the load bound, health gating, shards
 * over members, and the specs upstreams_with_members() refuses. Pure code: no threads, no
 * sockets; every time is a number passed in. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/upstream.h"
#include "tests/support.h"

#define SVC "http://svc.test:8080/items/{id}"
#define SH1 "http://shard1.test:8080/items/{id}"
#define SH2 "http://shard2.test:8080/items/{id}"
#define SH3 "http://shard3.test:8080/items/{id}"
#define KEYS 20000

static const char *const ADDR[] = {"10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4",
                                   "10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8"};

/* A group made of templates alone (one member by name each). */
static struct upstreams *group(const char *const *t, unsigned n, const struct upstreams_opts *o)
{
    struct upstreams *u = NULL;
    char err[256];
    if (upstreams_new(t, n, o, &u, err, sizeof(err)) != 0)
        fprintf(stderr, "\n  upstreams_new: %s\n", err);
    return u;
}

/* The next snapshot of 'old' with one upstream, 'tmpl', of members addrs[0..n). */
static struct upstreams *next1(const struct upstreams *old, const char *tmpl,
                               const char *const *addrs, unsigned n, int64_t now_ms)
{
    struct upstream_spec sp = {.tmpl = tmpl, .addrs = addrs, .naddrs = n};
    struct upstreams *u = NULL;
    char err[256];
    if (upstreams_with_members(old, &sp, 1, now_ms, &u, err, sizeof(err)) != 0)
        fprintf(stderr, "\n  upstreams_with_members: %s\n", err);
    return u;
}

/* The index of the member at 'addr' (port 8080) in 'u', or -1. */
static int member_at(const struct upstreams *u, const char *addr)
{
    char want[64];
    snprintf(want, sizeof(want), "%s:8080", addr);
    for (unsigned m = 0; m < upstreams_member_count(u); m++) {
        const char *c = upstream_member_connect_to(u, m);
        if (c && !strcmp(c, want))
            return (int)m;
    }
    return -1;
}

static void key_of(unsigned i, char *k, size_t cap)
{
    snprintf(k, cap, "item-%u", i);
}

/* The key's ranking over 'u' at 'now_ms', as member labels into lab[] (at most 8). */
static unsigned ranked_labels(const struct upstreams *u, const char *key, int64_t now_ms,
                              const char *lab[8])
{
    uint16_t r[UPSTREAM_MEMBERS_MAX];
    unsigned n = upstreams_rank(u, key, strlen(key), now_ms, r);
    for (unsigned j = 0; j < n && j < 8; j++)
        lab[j] = upstream_member_label(u, r[j]);
    return n;
}

/* ---------------------------------------------------------------- identity */

/* A member kept from one snapshot to the next is the same member: its ejection, its count of
 * ejections, its latency estimate, its counters and its attempts in flight come along. A member
 * dropped is not in the next snapshot (the old one still reads it); one added again later starts
 * fresh. */
static void test_members_carried_by_identity(void)
{
    const char *t[] = {SVC};
    struct upstreams_opts o = {.eject_after = 2, .eject_ms = 60000, .eject_max_ms = 60000,
                               .max_ejected_pct = 100};
    struct upstreams *s0 = group(t, 1, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    const char *a123[] = {ADDR[0], ADDR[1], ADDR[2]};
    struct upstreams *s1 = next1(s0, SVC, a123, 3, 1000);
    CU_ASSERT_FATAL(s1 != NULL);
    CU_ASSERT_EQUAL(upstreams_member_count(s1), 3);
    int64_t now = 1000;
    unsigned m1 = (unsigned)member_at(s1, ADDR[0]), m2 = (unsigned)member_at(s1, ADDR[1]),
             m3 = (unsigned)member_at(s1, ADDR[2]);
    upstream_report(s1, m2, UPSTREAM_FAILED, -1, now);
    upstream_report(s1, m2, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_TRUE(upstream_ejected(s1, m2, now));
    for (int i = 0; i < 2 * UPSTREAM_P95_MIN_SAMPLES; i++)
        upstream_report(s1, m1, UPSTREAM_OK, 5000, now);
    int64_t p95 = upstream_p95_us(s1, m1);
    CU_ASSERT(p95 > 0);
    upstream_attempt_begin(s1, m1);
    upstream_count(s1, m3, OUTCOME_OK, 1000);
    upstream_count(s1, m3, OUTCOME_OK, 1000);
    const struct upstream_stats *st3 = upstream_stats(s1, m3);

    /* 10.1.0.3 dropped, 10.1.0.4 added, the kept ones in other places. */
    const char *a421[] = {ADDR[3], ADDR[1], ADDR[0]};
    struct upstreams *s2 = next1(s1, SVC, a421, 3, now);
    CU_ASSERT_FATAL(s2 != NULL);
    CU_ASSERT_EQUAL(member_at(s2, ADDR[2]), -1);
    int n1 = member_at(s2, ADDR[0]), n2 = member_at(s2, ADDR[1]), n4 = member_at(s2, ADDR[3]);
    CU_ASSERT_FATAL(n1 >= 0 && n2 >= 0 && n4 >= 0);
    CU_ASSERT_PTR_EQUAL(upstream_stats(s2, (unsigned)n1), upstream_stats(s1, m1));
    CU_ASSERT_TRUE(upstream_ejected(s2, (unsigned)n2, now));
    CU_ASSERT_EQUAL(upstream_ejections(s2, (unsigned)n2), 1);
    CU_ASSERT_EQUAL(upstream_p95_us(s2, (unsigned)n1), p95);
    CU_ASSERT_EQUAL(upstream_in_flight(s2, (unsigned)n1), 1);
    upstream_attempt_end(s2, (unsigned)n1); /* ends where it began: the same member */
    CU_ASSERT_EQUAL(upstream_in_flight(s1, m1), 0);
    CU_ASSERT_EQUAL(upstream_p95_us(s2, (unsigned)n4), -1);
    CU_ASSERT_EQUAL(upstream_ejections(s2, (unsigned)n4), 0);
    CU_ASSERT_FALSE(upstream_ejected(s2, (unsigned)n4, now));
    CU_ASSERT_STRING_EQUAL(upstream_member_label(s2, (unsigned)n4), "10.1.0.4:8080");
    /* The old snapshot still has the dropped member, with its counters. */
    CU_ASSERT_EQUAL(member_at(s1, ADDR[2]), (int)m3);
    CU_ASSERT_EQUAL(test_load(&upstream_stats(s1, m3)->fetches[OUTCOME_OK]), 2);

    /* 10.1.0.3 again, while the snapshot that had it is still held: a new member all the same. */
    const char *a1234[] = {ADDR[0], ADDR[1], ADDR[2], ADDR[3]};
    struct upstreams *s3 = next1(s2, SVC, a1234, 4, now);
    CU_ASSERT_FATAL(s3 != NULL);
    int n3 = member_at(s3, ADDR[2]);
    CU_ASSERT_FATAL(n3 >= 0);
    CU_ASSERT_PTR_NOT_EQUAL(upstream_stats(s3, (unsigned)n3), st3);
    CU_ASSERT_EQUAL(test_load(&upstream_stats(s3, (unsigned)n3)->fetches[OUTCOME_OK]), 0);
    CU_ASSERT_TRUE(upstream_ejected(s3, (unsigned)member_at(s3, ADDR[1]), now));
    upstreams_free(s0);
    upstreams_free(s1);
    upstreams_free(s2);
    /* s3 outlives the snapshots it came from and still reads its members. */
    CU_ASSERT_STRING_EQUAL(upstream_member_label(s3, (unsigned)n3), "10.1.0.3:8080");
    CU_ASSERT_EQUAL(upstream_p95_us(s3, (unsigned)member_at(s3, ADDR[0])), p95);
    upstreams_free(s3);
}

/* ---------------------------------------------------------------- rendezvous over members */

/* Going from 5 members to 6 moves about a sixth of the keys, every one of them to the new
 * member; going from 5 to 4 moves exactly the keys the removed member had, each to its second
 * choice. pick() agrees with the ranking. */
static void test_members_add_and_remove_move_few_keys(void)
{
    const char *t[] = {SVC};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS};
    struct upstreams *s0 = group(t, 1, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    const char *five[] = {ADDR[0], ADDR[1], ADDR[2], ADDR[3], ADDR[4]};
    const char *six[] = {ADDR[0], ADDR[1], ADDR[2], ADDR[3], ADDR[4], ADDR[5]};
    const char *four[] = {ADDR[0], ADDR[1], ADDR[3], ADDR[4]}; /* 10.1.0.3 removed */
    struct upstreams *u5 = next1(s0, SVC, five, 5, 0);
    CU_ASSERT_FATAL(u5 != NULL);
    struct upstreams *u6 = next1(u5, SVC, six, 6, 0);
    struct upstreams *u4 = next1(u5, SVC, four, 4, 0);
    CU_ASSERT_FATAL(u6 && u4);
    unsigned added = 0, added_wrong = 0, removed = 0, removed_wrong = 0, on_removed = 0;
    unsigned pick_wrong = 0;
    for (unsigned i = 0; i < KEYS; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        const char *r5[8], *r6[8], *r4[8];
        ranked_labels(u5, k, 0, r5);
        ranked_labels(u6, k, 0, r6);
        ranked_labels(u4, k, 0, r4);
        if (strcmp(r6[0], r5[0]) != 0) {
            added++;
            added_wrong += strcmp(r6[0], "10.1.0.6:8080") != 0;
        }
        bool was_removed = !strcmp(r5[0], "10.1.0.3:8080");
        on_removed += was_removed;
        if (strcmp(r4[0], r5[0]) != 0) {
            removed++;
            removed_wrong += !was_removed || strcmp(r4[0], r5[1]) != 0;
        }
        pick_wrong += strcmp(upstream_member_label(u6, test_pick(u6, k, 0, 0)), r6[0]) != 0;
    }
    CU_ASSERT_EQUAL(added_wrong, 0);
    CU_ASSERT(added > KEYS / 6 - 600 && added < KEYS / 6 + 600);
    CU_ASSERT_EQUAL(removed_wrong, 0);
    CU_ASSERT_EQUAL(removed, on_removed);
    CU_ASSERT(on_removed > KEYS / 5 - 600 && on_removed < KEYS / 5 + 600);
    CU_ASSERT_EQUAL(pick_wrong, 0);
    upstreams_free(s0);
    upstreams_free(u5);
    upstreams_free(u6);
    upstreams_free(u4);
}

/* ---------------------------------------------------------------- slow start */

/* Counts the keys whose first choice in 'u' at 'now_ms' is the member labelled 'fresh', and
 * those whose ranking of the other members differs from their ranking in 'before' (which has
 * exactly the other members), or whose first pick is not their first ranked. */
static void ramp_counts(struct upstreams *u, const struct upstreams *before, const char *fresh,
                        int64_t now_ms, unsigned *on_fresh, unsigned *reordered,
                        unsigned *pick_wrong)
{
    *on_fresh = *reordered = *pick_wrong = 0;
    for (unsigned i = 0; i < KEYS; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        const char *r[8], *b[8];
        unsigned n = ranked_labels(u, k, now_ms, r);
        unsigned nb = ranked_labels(before, k, now_ms, b);
        *on_fresh += !strcmp(r[0], fresh);
        unsigned j = 0;
        bool same = true;
        for (unsigned x = 0; x < n; x++)
            if (strcmp(r[x], fresh) != 0)
                same = same && j < nb && !strcmp(r[x], b[j++]);
        *reordered += !same || j != nb;
        *pick_wrong += strcmp(upstream_member_label(u, test_pick(u, k, 0, now_ms)), r[0]) != 0;
    }
}

/* A member added to an upstream that has addressed members ramps: right after the add it is the
 * first choice of about its 10% weight's share (0.1 / 4.1 of the keys), at half the ramp of
 * 0.55 / 4.55, after slow_start_ms of its full fifth. While it ramps, the other members keep
 * their order for every key (a key that moves, moves to the new member). The members of the
 * first addressed snapshot take their full share at once. */
static void test_members_slow_start(void)
{
    const char *t[] = {SVC};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS, .slow_start_ms = 10000};
    struct upstreams *s0 = group(t, 1, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    const char *four[] = {ADDR[0], ADDR[1], ADDR[2], ADDR[3]};
    const char *five[] = {ADDR[0], ADDR[1], ADDR[2], ADDR[3], ADDR[4]};
    int64_t t0 = 50000;
    struct upstreams *u4 = next1(s0, SVC, four, 4, t0);
    CU_ASSERT_FATAL(u4 != NULL);
    /* The first addressed members: the same ranking at once as long after, even shares. */
    unsigned share[4] = {0}, differ = 0;
    for (unsigned i = 0; i < KEYS; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        uint16_t a[UPSTREAM_MEMBERS_MAX], b[UPSTREAM_MEMBERS_MAX];
        upstreams_rank(u4, k, strlen(k), t0, a);
        upstreams_rank(u4, k, strlen(k), t0 + 1000000, b);
        differ += memcmp(a, b, 4 * sizeof(a[0])) != 0;
        share[a[0]]++;
    }
    CU_ASSERT_EQUAL(differ, 0);
    for (unsigned m = 0; m < 4; m++)
        CU_ASSERT(share[m] > KEYS / 4 - 600 && share[m] < KEYS / 4 + 600);

    int64_t t1 = t0 + 60000;
    struct upstreams *u5 = next1(u4, SVC, five, 5, t1);
    CU_ASSERT_FATAL(u5 != NULL);
    const char *fresh = "10.1.0.5:8080";
    unsigned at[4], reordered, pick_wrong;
    const int64_t when[4] = {t1, t1 + 5000, t1 + 10000, t1 + 100000};
    for (unsigned w = 0; w < 4; w++) {
        ramp_counts(u5, u4, fresh, when[w], &at[w], &reordered, &pick_wrong);
        CU_ASSERT_EQUAL(reordered, 0);
        CU_ASSERT_EQUAL(pick_wrong, 0);
        if (reordered || pick_wrong)
            fprintf(stderr, "\n  at +%lld ms: %u keys reordered, %u picks off their ranking\n",
                    (long long)(when[w] - t1), reordered, pick_wrong);
    }
    /* expected: 488, 2418, 4000, 4000 of 20000 */
    CU_ASSERT(at[0] > 250 && at[0] < 750);
    CU_ASSERT(at[1] > 2000 && at[1] < 2850);
    CU_ASSERT(at[2] > KEYS / 5 - 600 && at[2] < KEYS / 5 + 600);
    CU_ASSERT_EQUAL(at[3], at[2]);
    CU_ASSERT(at[0] < at[1] && at[1] < at[2]);
    upstreams_free(s0);
    upstreams_free(u4);
    upstreams_free(u5);
}

/* ---------------------------------------------------------------- bounded load */

/* The member a pick should give with the loads held now: the first of the key's ranking whose
 * attempts in flight are under ceil(F * (total + 1) / members), else the first. */
static unsigned bounded_choice(struct upstreams *u, const uint16_t *rank, unsigned n, double f)
{
    unsigned total = 0;
    for (unsigned j = 0; j < n; j++)
        total += upstream_in_flight(u, rank[j]);
    unsigned cap = (unsigned)ceil(f * (double)(total + 1) / n);
    for (unsigned j = 0; j < n; j++)
        if (upstream_in_flight(u, rank[j]) < cap)
            return rank[j];
    return rank[0];
}

static void hold(struct upstreams *u, unsigned m, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        upstream_attempt_begin(u, m);
}

static void release(struct upstreams *u, unsigned m, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        upstream_attempt_end(u, m);
}

/* With balance_factor 1.25 and 3 members, attempts held in flight on a key's first choice push
 * its next pick to its second choice once the bound is reached, and on to the third when the
 * second is loaded too; any mix of loads gives the first of the ranking under the bound. Even
 * loads keep every key on its first choice; with balance_factor 0 nothing spills. */
static void test_members_bounded_load(void)
{
    const char *t[] = {SVC};
    const char *three[] = {ADDR[0], ADDR[1], ADDR[2]};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS, .balance_factor = 1.25};
    struct upstreams *s0 = group(t, 1, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    struct upstreams *u = next1(s0, SVC, three, 3, 0);
    CU_ASSERT_FATAL(u != NULL);
    uint16_t r[UPSTREAM_MEMBERS_MAX];
    CU_ASSERT_EQUAL(upstreams_rank(u, "k", 1, 0, r), 3);
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, 0), r[0]);
    hold(u, r[0], 1); /* cap ceil(1.25 * 2 / 3) = 1: the first choice is at it */
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, 0), r[1]);
    hold(u, r[0], 2);                  /* 3 held: cap ceil(1.25 * 4 / 3) = 2 */
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, 0), r[1]);
    hold(u, r[1], 2);                  /* 5 held: cap 3; the second under it */
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, 0), r[1]);
    hold(u, r[1], 1);                  /* 6 held: cap ceil(1.25 * 7 / 3) = 3; the second at it */
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, 0), r[2]);
    release(u, r[0], 3);
    release(u, r[1], 3);
    CU_ASSERT_EQUAL(test_pick(u, "k", 0, 0), r[0]);

    /* Random loads: the pick is the model's. */
    uint64_t seed = 0x5eed0f10adull;
    unsigned wrong = 0;
    for (unsigned i = 0; i < 2000; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        unsigned load[3];
        for (unsigned m = 0; m < 3; m++)
            hold(u, m, load[m] = (unsigned)(test_rng(&seed) % 7));
        upstreams_rank(u, k, strlen(k), 0, r);
        wrong += test_pick(u, k, 0, 0) != bounded_choice(u, r, 3, 1.25);
        for (unsigned m = 0; m < 3; m++)
            release(u, m, load[m]);
    }
    CU_ASSERT_EQUAL(wrong, 0);

    /* Even loads: everyone keeps its first choice. */
    for (unsigned m = 0; m < 3; m++)
        hold(u, m, 2);
    unsigned moved = 0;
    for (unsigned i = 0; i < 2000; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        upstreams_rank(u, k, strlen(k), 0, r);
        moved += test_pick(u, k, 0, 0) != r[0];
    }
    CU_ASSERT_EQUAL(moved, 0);
    for (unsigned m = 0; m < 3; m++)
        release(u, m, 2);

    /* No bound: a key stays on its first choice whatever it holds. */
    struct upstreams_opts unbound = {.policy = UPSTREAM_REPLICAS};
    struct upstreams *g0 = group(t, 1, &unbound);
    CU_ASSERT_FATAL(g0 != NULL);
    struct upstreams *v = next1(g0, SVC, three, 3, 0);
    CU_ASSERT_FATAL(v != NULL);
    upstreams_rank(v, "k", 1, 0, r);
    hold(v, r[0], 100);
    CU_ASSERT_EQUAL(test_pick(v, "k", 0, 0), r[0]);
    CU_ASSERT_EQUAL(test_pick(v, "k", 1, 0), r[1]); /* a retry still goes elsewhere */
    release(v, r[0], 100);
    upstreams_free(g0);
    upstreams_free(v);
    upstreams_free(s0);
    upstreams_free(u);
}

/* ---------------------------------------------------------------- health gating */

/* How many of 'nkeys' keys pick member m first at 'now_ms'; into *ranked_first, how many rank
 * it first. */
static unsigned picks_of(struct upstreams *u, unsigned m, int64_t now_ms, unsigned nkeys,
                         unsigned *ranked_first)
{
    unsigned n = 0;
    *ranked_first = 0;
    for (unsigned i = 0; i < nkeys; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        uint16_t r[UPSTREAM_MEMBERS_MAX];
        upstreams_rank(u, k, strlen(k), now_ms, r);
        *ranked_first += r[0] == m;
        n += test_pick(u, k, 0, now_ms) == m;
    }
    return n;
}

/* With health gating, a member added to a running upstream takes no first attempt while the
 * others are in, until its first passing check; unhealthy_after failures in a row take it out
 * again, and it returns only after healthy_after passes; a member ejected by failures whose
 * ejection time is up stays out until it has passed healthy_after checks. */
static void test_members_health_gating(void)
{
    enum { HEALTHY_AFTER = 2, UNHEALTHY_AFTER = 2 };
    const char *t[] = {SVC};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS,
                               .health_gated = true,
                               .eject_after = 1,
                               .eject_ms = 1000,
                               .eject_max_ms = 1000,
                               .max_ejected_pct = 50};
    struct upstreams *s0 = group(t, 1, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    const char *two[] = {ADDR[0], ADDR[1]};
    const char *three[] = {ADDR[0], ADDR[1], ADDR[2]};
    int64_t now = 1000;
    struct upstreams *s1 = next1(s0, SVC, two, 2, now);
    CU_ASSERT_FATAL(s1 != NULL);
    for (unsigned m = 0; m < 2; m++) {
        CU_ASSERT_FALSE(upstream_healthy(s1, m));
        CU_ASSERT_EQUAL(upstream_health(s1, m, true, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 1);
    }
    struct upstreams *u = next1(s1, SVC, three, 3, now);
    CU_ASSERT_FATAL(u != NULL);
    unsigned c = (unsigned)member_at(u, ADDR[2]), a = (unsigned)member_at(u, ADDR[0]);
    unsigned first_c, first_a;
    CU_ASSERT_FALSE(upstream_healthy(u, c));
    CU_ASSERT_EQUAL(picks_of(u, c, now, 3000, &first_c), 0);
    CU_ASSERT(first_c > 600); /* about a third of them rank it first */
    /* Its first pass lets it in. */
    CU_ASSERT_EQUAL(upstream_health(u, c, true, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 1);
    CU_ASSERT_EQUAL(picks_of(u, c, now, 3000, &first_c), first_c);
    /* One failure is not enough; unhealthy_after are. */
    CU_ASSERT_EQUAL(upstream_health(u, c, false, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 0);
    CU_ASSERT_EQUAL(picks_of(u, c, now, 3000, &first_c), first_c);
    CU_ASSERT_EQUAL(upstream_health(u, c, false, HEALTHY_AFTER, UNHEALTHY_AFTER, now), -1);
    CU_ASSERT_EQUAL(picks_of(u, c, now, 3000, &first_c), 0);
    /* Back after healthy_after passes, not one. */
    CU_ASSERT_EQUAL(upstream_health(u, c, true, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 0);
    CU_ASSERT_EQUAL(picks_of(u, c, now, 3000, &first_c), 0);
    CU_ASSERT_EQUAL(upstream_health(u, c, true, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 1);
    CU_ASSERT_EQUAL(picks_of(u, c, now, 3000, &first_c), first_c);

    /* A failure ejects 10.1.0.1 for 1000 ms; when that is up it is still out. */
    upstream_report(u, a, UPSTREAM_FAILED, -1, now);
    CU_ASSERT_TRUE(upstream_ejected(u, a, now));
    now += 1000;
    CU_ASSERT_TRUE(upstream_ejected(u, a, now));
    CU_ASSERT_EQUAL(picks_of(u, a, now, 3000, &first_a), 0);
    CU_ASSERT_EQUAL(upstream_health(u, a, true, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 0);
    CU_ASSERT_TRUE(upstream_ejected(u, a, now));
    CU_ASSERT_EQUAL(picks_of(u, a, now, 3000, &first_a), 0);
    CU_ASSERT_EQUAL(upstream_health(u, a, true, HEALTHY_AFTER, UNHEALTHY_AFTER, now), 1);
    CU_ASSERT_FALSE(upstream_ejected(u, a, now));
    CU_ASSERT_EQUAL(picks_of(u, a, now, 3000, &first_a), first_a);
    CU_ASSERT(first_a > 600);
    upstreams_free(s0);
    upstreams_free(s1);
    upstreams_free(u);
}

/* ---------------------------------------------------------------- shards */

/* The key's shard's template in 'u'. */
static const char *shard_of(const struct upstreams *u, const char *key)
{
    struct upstream_key k;
    upstream_key_init(u, key, strlen(key), &k);
    return upstream_template(u, k.shard);
}

/* Shards over members: a key's shard is the same whatever its upstreams' members are (by name,
 * several, none); its attempts (first, retry, hedge) go to distinct members of that shard; a
 * shard with no member gives UPSTREAM_NONE and its upstream says why (the reason given, or a
 * default); replicas whose every upstream is empty give UPSTREAM_NONE too. */
static void test_members_shards(void)
{
    const char *t[] = {SH1, SH2, SH3};
    struct upstreams_opts o = {.policy = UPSTREAM_SHARDS};
    struct upstreams *s0 = group(t, 3, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    const char *m1[] = {ADDR[0], ADDR[1]}, *m2[] = {ADDR[2], ADDR[3], ADDR[4]}, *m3[] = {ADDR[5]};
    struct upstream_spec sp1[] = {{.tmpl = SH1, .addrs = m1, .naddrs = 2},
                                  {.tmpl = SH2, .addrs = m2, .naddrs = 3},
                                  {.tmpl = SH3, .addrs = m3, .naddrs = 1}};
    struct upstreams *s1 = NULL, *s2 = NULL, *s3 = NULL;
    char err[256];
    CU_ASSERT_FATAL(upstreams_with_members(s0, sp1, 3, 0, &s1, err, sizeof(err)) == 0);
    /* shard 2 emptied with a reason, shard 3 without one; in another order */
    const char *m1b[] = {ADDR[0], ADDR[1], ADDR[6]};
    struct upstream_spec sp2[] = {{.tmpl = SH3, .addrs = m3, .naddrs = 0},
                                  {.tmpl = SH1, .addrs = m1b, .naddrs = 3},
                                  {.tmpl = SH2, .addrs = m2, .naddrs = 0, .why = "it went away"}};
    CU_ASSERT_FATAL(upstreams_with_members(s1, sp2, 3, 0, &s2, err, sizeof(err)) == 0);
    CU_ASSERT_STRING_EQUAL(upstream_template(s2, 2), SH2);
    CU_ASSERT_STRING_EQUAL(upstream_why(s2, 2), "it went away");
    CU_ASSERT_PTR_NOT_NULL(strstr(upstream_why(s2, 0), "no member"));
    CU_ASSERT_PTR_NOT_NULL(strstr(upstream_why(s2, 0), "shard3.test:8080"));
    CU_ASSERT_STRING_EQUAL(upstream_why(s2, 1), "");
    CU_ASSERT_STRING_EQUAL(upstream_why(s1, 1), "");
    unsigned bad_shard = 0, bad_member = 0, none_wrong = 0, per_shard[3] = {0};
    for (unsigned i = 0; i < 3000; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        const char *sh = shard_of(s0, k);
        bad_shard += strcmp(shard_of(s1, k), sh) != 0 || strcmp(shard_of(s2, k), sh) != 0;
        struct upstream_key uk;
        upstream_key_init(s1, k, strlen(k), &uk);
        per_shard[uk.shard]++;
        unsigned first, count = upstream_members(s1, uk.shard, &first);
        unsigned p[3];
        for (unsigned a = 0; a < 3; a++) {
            p[a] = test_pick(s1, k, a, 0);
            bad_member += p[a] == UPSTREAM_NONE || upstream_member_upstream(s1, p[a]) != uk.shard;
        }
        if (count >= 2)
            bad_member += p[0] == p[1];
        if (count >= 3)
            bad_member += p[2] == p[0] || p[2] == p[1];
        if (count == 1)
            bad_member += p[0] != first || p[1] != first;
        /* s2: the emptied shards give none, at every attempt */
        upstream_key_init(s2, k, strlen(k), &uk);
        unsigned n = upstream_members(s2, uk.shard, &first);
        for (unsigned a = 0; a < 3; a++) {
            unsigned got = test_pick(s2, k, a, 0);
            if (n == 0)
                none_wrong += got != UPSTREAM_NONE;
            else
                none_wrong += got == UPSTREAM_NONE || upstream_member_upstream(s2, got) != uk.shard;
        }
    }
    CU_ASSERT_EQUAL(bad_shard, 0);
    CU_ASSERT_EQUAL(bad_member, 0);
    CU_ASSERT_EQUAL(none_wrong, 0);
    for (unsigned s = 0; s < 3; s++)
        CU_ASSERT(per_shard[s] > 700); /* about 1000 each */
    /* Replicas with every upstream empty: nothing to pick. */
    struct upstreams_opts ro = {.policy = UPSTREAM_REPLICAS};
    struct upstreams *r0 = group(t, 2, &ro);
    CU_ASSERT_FATAL(r0 != NULL);
    struct upstream_spec empty[] = {{.tmpl = SH1, .addrs = m1, .naddrs = 0},
                                    {.tmpl = SH2, .addrs = m2, .naddrs = 0, .why = "gone"}};
    CU_ASSERT_FATAL(upstreams_with_members(r0, empty, 2, 0, &s3, err, sizeof(err)) == 0);
    CU_ASSERT_FALSE(upstreams_any_member(s3));
    CU_ASSERT_EQUAL(upstreams_member_count(s3), 0);
    CU_ASSERT_EQUAL(test_pick(s3, "k", 0, 0), UPSTREAM_NONE);
    CU_ASSERT_EQUAL(test_pick(s3, "k", 1, 0), UPSTREAM_NONE);
    uint16_t r[UPSTREAM_MEMBERS_MAX];
    CU_ASSERT_EQUAL(upstreams_rank(s3, "k", 1, 0, r), 0);
    CU_ASSERT_STRING_EQUAL(upstream_why(s3, 1), "gone");
    upstreams_free(s0);
    upstreams_free(s1);
    upstreams_free(s2);
    upstreams_free(r0);
    upstreams_free(s3);
}

/* ---------------------------------------------------------------- bad specs */

/* Refused with a reason naming what is wrong, nothing made and the old snapshot untouched: an
 * address that is not an IPv4 literal or a bracketed IPv6 literal, a member given twice, more
 * than UPSTREAM_MEMBERS_MAX members in all (that many exactly is fine). */
static void test_members_bad_specs_refused(void)
{
    const char *t[] = {SH1, SH2};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS};
    struct upstreams *s0 = group(t, 2, &o);
    CU_ASSERT_FATAL(s0 != NULL);
    char err[256];
    static const char *const bad[] = {"svc.test", "10.1.0.1:8080", "", "2001:db8::1",
                                      "[2001:db8::1", "[]", "[::g]", "1.2.3.4.5",
                                      "256.1.1.1", "10..1.1", "[2001:db8::1]:80"};
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *addrs[] = {ADDR[0], bad[i]};
        struct upstream_spec sp[] = {{.tmpl = SH1, .addrs = addrs, .naddrs = 2},
                                     {.tmpl = SH2}};
        struct upstreams *u = (struct upstreams *)&u;
        err[0] = 0;
        int rc = upstreams_with_members(s0, sp, 2, 0, &u, err, sizeof(err));
        CU_ASSERT_EQUAL(rc, -EINVAL);
        CU_ASSERT_PTR_NULL(u);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "not an IP literal"));
        CU_ASSERT_PTR_NOT_NULL(strstr(err, SH1));
        if (rc == 0) {
            fprintf(stderr, "\n  address '%s' taken\n", bad[i]);
            upstreams_free(u);
        }
    }
    static const char *const good[] = {"10.1.0.1", "[2001:db8::1]", "[::1]", "[::ffff:10.1.0.2]",
                                       "0.0.0.0", "255.255.255.255"};
    for (unsigned i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        struct upstream_spec sp = {.tmpl = SH1, .addrs = &good[i], .naddrs = 1};
        struct upstreams *u = NULL;
        CU_ASSERT_EQUAL(upstreams_with_members(s0, &sp, 1, 0, &u, err, sizeof(err)), 0);
        upstreams_free(u);
    }

    const char *twice[] = {ADDR[0], ADDR[1], ADDR[0]};
    struct upstream_spec sp2 = {.tmpl = SH1, .addrs = twice, .naddrs = 3};
    struct upstreams *u = (struct upstreams *)&u;
    CU_ASSERT_EQUAL(upstreams_with_members(s0, &sp2, 1, 0, &u, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NULL(u);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "10.1.0.1 given twice"));
    /* The same address under two upstreams is two members. */
    const char *one[] = {ADDR[0]};
    struct upstream_spec both[] = {{.tmpl = SH1, .addrs = one, .naddrs = 1},
                                   {.tmpl = SH2, .addrs = one, .naddrs = 1}};
    CU_ASSERT_EQUAL(upstreams_with_members(s0, both, 2, 0, &u, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(upstreams_member_count(u), 2);
    upstreams_free(u);

    /* UPSTREAM_MEMBERS_MAX over two upstreams is fine; one more is not. */
    enum { N = UPSTREAM_MEMBERS_MAX + 1 };
    char(*text)[16] = calloc(N, sizeof(*text));
    const char **addrs = calloc(N, sizeof(*addrs));
    CU_ASSERT_FATAL(text && addrs);
    for (unsigned i = 0; i < N; i++) {
        snprintf(text[i], sizeof(text[i]), "10.2.%u.%u", i / 250, i % 250 + 1);
        addrs[i] = text[i];
    }
    struct upstream_spec big[] = {{.tmpl = SH1, .addrs = addrs, .naddrs = 2048},
                                  {.tmpl = SH2, .addrs = addrs + 2048, .naddrs = N - 1 - 2048}};
    CU_ASSERT_EQUAL(upstreams_with_members(s0, big, 2, 0, &u, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(upstreams_member_count(u), UPSTREAM_MEMBERS_MAX);
    /* the last member is reachable by pick */
    unsigned last = 0;
    for (unsigned i = 0; i < 20000 && last == 0; i++) {
        char k[32];
        key_of(i, k, sizeof(k));
        last = test_pick(u, k, 0, 0) == UPSTREAM_MEMBERS_MAX - 1;
    }
    CU_ASSERT_EQUAL(last, 1);
    struct upstreams *keep = u;
    big[1].naddrs++;
    u = (struct upstreams *)&u;
    CU_ASSERT_EQUAL(upstreams_with_members(keep, big, 2, 0, &u, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NULL(u);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "at most 4096"));
    CU_ASSERT_EQUAL(upstreams_member_count(keep), UPSTREAM_MEMBERS_MAX);
    upstreams_free(keep);
    free(addrs);
    free(text);
    CU_ASSERT_EQUAL(upstreams_count(s0), 2);
    CU_ASSERT_EQUAL(upstreams_member_count(s0), 2);
    upstreams_free(s0);
}

static CU_TestInfo members_tests[] = {
    {"members carried by identity; dropped gone; re-added fresh", test_members_carried_by_identity},
    {"adding one moves ~1/(N+1), to it; removing moves only its keys",
     test_members_add_and_remove_move_few_keys},
    {"slow start: share grows over the ramp, others keep their order", test_members_slow_start},
    {"bounded load: spills past the bound, not before, not without one",
     test_members_bounded_load},
    {"health gating: first pass, unhealthy_after, ejection held until passes",
     test_members_health_gating},
    {"shards: stable over members, attempts in the shard, empty shard none",
     test_members_shards},
    {"bad specs refused with a reason", test_members_bad_specs_refused},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(members, members_tests)
