/* Rendezvous movement and pick cost over upstream members (fetch/upstream.h).
 *
 * For N members of one upstream (N = 2, 3, 5, 10, 50), over 100,000 keys: the share of keys
 * whose first choice moves when one member is added, and when one is removed, against the ideal
 * 1/(N+1) and 1/N; and whether every key that moved went to the new member (added) or came from
 * the removed one (removed). Then the cost of one upstreams_pick() for 1, 3 and 50 members
 * (ns per call, not asserted). Prints a markdown table. Deterministic but for the timings. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "fetch/upstream.h"

#define KEYS 100000
#define TMPL "http://items.test:8080/items/{id}"

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A set of n members 10.0.x.y (first..first+n-1), derived from 'base' (NULL: a new group). */
static struct upstreams *with(struct upstreams *base, unsigned first, unsigned n)
{
    static char text[256][24];
    const char *addrs[256];
    for (unsigned i = 0; i < n; i++) {
        snprintf(text[i], sizeof(text[i]), "10.0.%u.%u", (first + i) / 250, (first + i) % 250 + 1);
        addrs[i] = text[i];
    }
    struct upstream_spec sp = {.tmpl = TMPL, .addrs = addrs, .naddrs = n};
    struct upstreams *out = NULL;
    char err[256];
    if (upstreams_with_members(base, &sp, 1, 0, &out, err, sizeof(err)) != 0)
        fprintf(stderr, "bench_members: %s\n", err);
    return out;
}

/* The first choice's address label of 'key' in 'u'. */
static const char *first_of(struct upstreams *u, const char *key)
{
    struct upstream_key k;
    upstream_key_init(u, key, strlen(key), &k);
    unsigned m = upstreams_pick(u, &k, NULL, 0, 0);
    return m == UPSTREAM_NONE ? "" : upstream_member_label(u, m);
}

static void movement(struct upstreams *base, unsigned n)
{
    struct upstreams *a = with(base, 0, n), *plus = with(base, 0, n + 1), *minus = with(base, 1, n - 1);
    const char *gone = upstream_member_label(a, 0); /* 'minus' lacks the first */
    char newest[64];
    snprintf(newest, sizeof(newest), "%s", upstream_member_label(plus, n));
    unsigned moved_add = 0, moved_rm = 0, wrong = 0;
    for (unsigned i = 0; i < KEYS; i++) {
        char key[32];
        snprintf(key, sizeof(key), "item-%u", i);
        const char *was = first_of(a, key);
        const char *p = first_of(plus, key), *m = first_of(minus, key);
        if (strcmp(was, p) != 0) {
            moved_add++;
            wrong += strcmp(p, newest) != 0;
        }
        if (strcmp(was, m) != 0) {
            moved_rm++;
            wrong += strcmp(was, gone) != 0;
        }
    }
    printf("| %u | %.2f%% | %.2f%% | %.2f%% | %.2f%% | %u |\n", n, 100.0 * moved_add / KEYS,
           100.0 / (n + 1), 100.0 * moved_rm / KEYS, 100.0 / n, wrong);
    upstreams_free(a);
    upstreams_free(plus);
    upstreams_free(minus);
}

static void pick_cost(struct upstreams *base, unsigned n)
{
    struct upstreams *u = with(base, 0, n);
    struct upstream_key k;
    upstream_key_init(u, "item-1", 6, &k);
    volatile unsigned sink = 0;
    int64_t t0 = now_ns();
    unsigned calls = 2000000 / n;
    for (unsigned i = 0; i < calls; i++)
        sink += upstreams_pick(u, &k, NULL, 0, 0);
    int64_t dt = now_ns() - t0;
    printf("| %u | %.0f |\n", n, (double)dt / calls);
    (void)sink;
    upstreams_free(u);
}

int main(void)
{
    const char *t[] = {TMPL};
    struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS, .balance_factor = 1.25};
    struct upstreams *base = NULL;
    char err[256];
    if (upstreams_new(t, 1, &o, &base, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_members: %s\n", err);
        return 1;
    }
    printf("| members N | moved when one is added | ideal 1/(N+1) | moved when one is removed | "
           "ideal 1/N | moved elsewhere than expected |\n|---|---|---|---|---|---|\n");
    unsigned ns[] = {2, 3, 5, 10, 50};
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++)
        movement(base, ns[i]);
    printf("\n| members | ns per upstreams_pick() (balance factor 1.25) |\n|---|---|\n");
    unsigned ps[] = {1, 3, 50};
    for (size_t i = 0; i < sizeof(ps) / sizeof(ps[0]); i++)
        pick_cost(base, ps[i]);
    upstreams_free(base);
    return 0;
}
