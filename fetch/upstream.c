/* upstream: ranking, picking, ejection and latency of a set of upstreams (see upstream.h).
 *
 * State per upstream, all atomics: the consecutive-failure count, the ejection deadline
 * (0 when in), how many times it was ejected in a row, and the latency histogram. The number
 * of upstreams ejected right now is one counter for the set, raised with a compare-and-swap
 * that respects the max_ejected_pct cap, so two loops that see failures at once cannot eject
 * more than the cap allows. An ejection ends lazily: the first thread that sees its deadline
 * passed clears it (compare-and-swap, so exactly one) and lowers the counter. */
#include "fetch/upstream.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fetch/url.h"

#define LAT_BUCKETS 160     /* 4 per power of two of microseconds, up to 2^40 us */
#define LAT_DECAY_AT 2048   /* halve every count once the histogram holds this many */
#define LAT_RECOMPUTE 32    /* recompute the p95 every this many observations */

/* One upstream: its identity (the template text), and the state that follows it from one
 * snapshot to the next for as long as it stays in the set. Reference counted: every snapshot
 * holding it has one reference. */
struct upstream {
    atomic_uint refs;                  /* snapshots holding it */
    struct url_template tmpl;          /* parsed template; tmpl.text is its identity */
    char label[280];                   /* host:port */
    uint64_t hash;                     /* rendezvous seed: hash of the template */
    atomic_uint consecutive;           /* failures in a row */
    atomic_int_fast64_t ejected_until; /* monotonic ms, 0 when not ejected */
    atomic_int_fast64_t in_since;      /* when it last returned (or started), ms */
    atomic_uint repeats;               /* ejections in a row (the doubling exponent) */
    atomic_uint_fast64_t ejections;    /* ejections so far */
    atomic_uint_fast32_t lat[LAT_BUCKETS]; /* decaying histogram of successful attempts */
    atomic_uint_fast32_t lat_total;    /* its count (approximately the sum of lat[]) */
    atomic_uint_fast64_t lat_seen;     /* successful attempts ever observed */
    atomic_int_fast64_t p95_us;        /* cached estimate, -1 until enough samples */
    struct upstream_stats stats;       /* attempts by kind and their duration */
    atomic_bool gone;                  /* dropped from the live set: it may not stay ejected */
};

/* What every snapshot derived from one upstreams_new() shares: the settings and the count of
 * upstreams ejected right now (the cap applies to the set as it is, whichever snapshot a
 * thread reads). */
struct upstream_group {
    atomic_uint refs;           /* snapshots of the group */
    struct upstreams_opts opts; /* as given */
    atomic_uint nejected;       /* ejected now */
};

/* A snapshot: an immutable list of upstreams, reference counted. */
struct upstreams {
    atomic_uint refs;           /* holders of this snapshot */
    struct upstream_group *g;   /* shared with every snapshot derived from it */
    struct upstreams_opts opts; /* g's, copied for the hot path */
    unsigned n;                 /* upstreams */
    unsigned max_ejected;       /* most ejected at once */
    atomic_uint *nejected;      /* &g->nejected */
    struct upstream *u[];       /* n of them (references) */
};

struct upstream_live {
    pthread_mutex_t mu;         /* guards cur */
    struct upstreams *cur;      /* the current snapshot (a reference) */
};

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30; /* splitmix64's finaliser: every input bit moves every output bit */
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

/* "host:port" of a parsed template, with the scheme's default port when none is given. */
static void make_label(const char *text, char *out, size_t cap)
{
    bool https = strncasecmp(text, "https://", 8) == 0;
    const char *a = text + (https ? 8 : 7);
    size_t n = strcspn(a, "/?#");
    const char *at = memchr(a, '@', n); /* never show credentials */
    if (at) {
        n -= (size_t)(at + 1 - a);
        a = at + 1;
    }
    const char *close = n && a[0] == '[' ? memchr(a, ']', n) : NULL;
    const char *colon = memchr(close ? close : a, ':', n - (size_t)((close ? close : a) - a));
    if (colon)
        snprintf(out, cap, "%.*s", (int)n, a);
    else
        snprintf(out, cap, "%.*s:%s", (int)n, a, https ? "443" : "80");
}

static void group_unref(struct upstream_group *g)
{
    if (atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel) == 1)
        free(g);
}

static void upstream_unref(struct upstream *up)
{
    if (up && atomic_fetch_sub_explicit(&up->refs, 1, memory_order_acq_rel) == 1) {
        url_template_destroy(&up->tmpl);
        free(up);
    }
}

/* A fresh upstream for 'text': 0, -ENOMEM, or -EINVAL with the reason in 'why'. */
static int upstream_make(const char *text, struct upstream **out, char *why, size_t whylen)
{
    struct upstream *up = calloc(1, sizeof(*up));
    if (!up)
        return -ENOMEM;
    int rc = url_template_parse(text, &up->tmpl, why, whylen);
    if (rc != 0) {
        free(up);
        return rc;
    }
    atomic_init(&up->refs, 1);
    make_label(up->tmpl.text, up->label, sizeof(up->label));
    up->hash = mix(hash_bytes(up->tmpl.text, strlen(up->tmpl.text)));
    atomic_init(&up->p95_us, -1);
    *out = up;
    return 0;
}

static bool opts_ok(const struct upstreams_opts *o)
{
    return o->max_ejected_pct <= 100 &&
           (!o->eject_after || (o->eject_ms > 0 && o->eject_max_ms >= o->eject_ms));
}

/* A snapshot of the group 'g' (a reference is taken) for 'templates': each one found in 'old'
 * (by its text) is that upstream, the others are new. */
static int snapshot_make(struct upstream_group *g, const struct upstreams *old,
                         const char *const *templates, unsigned n, struct upstreams **out,
                         char *err, size_t errlen)
{
    *out = NULL;
    if (n == 0)
        return fail(err, errlen, "no upstream given");
    if (n > UPSTREAMS_MAX)
        return fail(err, errlen, "%u upstreams given; at most %d", n, UPSTREAMS_MAX);
    struct upstreams *s = calloc(1, sizeof(*s) + n * sizeof(s->u[0]));
    if (!s)
        return -ENOMEM;
    atomic_init(&s->refs, 1);
    atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);
    s->g = g;
    s->opts = g->opts;
    s->nejected = &g->nejected;
    s->max_ejected = s->opts.policy == UPSTREAM_SHARDS || !s->opts.eject_after
                         ? 0
                         : (unsigned)((uint64_t)n * s->opts.max_ejected_pct / 100);
    for (unsigned i = 0; i < n; i++) {
        char why[256];
        int rc = 0;
        for (unsigned j = 0; j < i && rc == 0; j++)
            if (!strcmp(s->u[j]->tmpl.text, templates[i]))
                rc = fail(why, sizeof(why), "given twice");
        struct upstream *up = NULL;
        for (unsigned j = 0; old && rc == 0 && j < old->n && !up; j++)
            if (!strcmp(old->u[j]->tmpl.text, templates[i]))
                up = old->u[j];
        if (up)
            atomic_fetch_add_explicit(&up->refs, 1, memory_order_relaxed);
        else if (rc == 0)
            rc = upstream_make(templates[i], &up, why, sizeof(why));
        if (rc != 0) {
            upstreams_free(s);
            return rc == -ENOMEM ? rc : fail(err, errlen, "upstream %s: %s", templates[i], why);
        }
        s->u[i] = up;
        s->n = i + 1;
    }
    *out = s;
    return 0;
}

int upstreams_new(const char *const *templates, unsigned n, const struct upstreams_opts *o,
                  struct upstreams **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!opts_ok(o))
        return fail(err, errlen, "bad ejection settings");
    struct upstream_group *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->opts = *o;
    atomic_init(&g->refs, 1); /* ours, until the snapshot holds its own */
    int rc = snapshot_make(g, NULL, templates, n, out, err, errlen);
    group_unref(g);
    return rc;
}

int upstreams_with(const struct upstreams *old, const char *const *templates, unsigned n,
                   struct upstreams **out, char *err, size_t errlen)
{
    return snapshot_make(old->g, old, templates, n, out, err, errlen);
}

struct upstreams *upstreams_ref(struct upstreams *u)
{
    atomic_fetch_add_explicit(&u->refs, 1, memory_order_relaxed);
    return u;
}

void upstreams_free(struct upstreams *u)
{
    if (!u || atomic_fetch_sub_explicit(&u->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (unsigned i = 0; i < u->n; i++)
        upstream_unref(u->u[i]);
    group_unref(u->g);
    free(u);
}

unsigned upstreams_count(const struct upstreams *u)
{
    return u->n;
}

const char *upstream_template(const struct upstreams *u, unsigned i)
{
    return u->u[i]->tmpl.text;
}

const char *upstream_label(const struct upstreams *u, unsigned i)
{
    return u->u[i]->label;
}

void upstreams_rank(const struct upstreams *u, const char *key, size_t keylen, uint8_t *rank)
{
    if (u->n == 1) {
        rank[0] = 0;
        return;
    }
    uint64_t kh = hash_bytes(key, keylen);
    uint64_t w[UPSTREAMS_MAX];
    for (unsigned i = 0; i < u->n; i++) { /* insertion sort, highest weight first */
        uint64_t wi = mix(kh ^ u->u[i]->hash);
        unsigned j = i;
        while (j > 0 && w[j - 1] < wi) {
            w[j] = w[j - 1];
            rank[j] = rank[j - 1];
            j--;
        }
        w[j] = wi;
        rank[j] = (uint8_t)i;
    }
}

bool upstream_ejected(struct upstreams *s, unsigned i, int64_t now_ms)
{
    struct upstream *up = s->u[i];
    int64_t until = atomic_load_explicit(&up->ejected_until, memory_order_acquire);
    if (until == 0)
        return false;
    if (now_ms < until)
        return true;
    if (atomic_compare_exchange_strong(&up->ejected_until, &until, 0)) {
        atomic_store(&up->in_since, now_ms);
        atomic_fetch_sub(s->nejected, 1);
        if (s->opts.on_event)
            s->opts.on_event(s->opts.event_arg, up->label, false, 0,
                             atomic_load(&up->ejections));
    }
    return false;
}

unsigned upstreams_pick(struct upstreams *s, const uint8_t *rank, unsigned k, int64_t now_ms)
{
    if (s->n == 1 || s->opts.policy == UPSTREAM_SHARDS)
        return rank[0];
    uint8_t live[UPSTREAMS_MAX];
    unsigned nl = 0;
    for (unsigned j = 0; j < s->n; j++)
        if (!upstream_ejected(s, rank[j], now_ms))
            live[nl++] = rank[j];
    return nl ? live[k % nl] : rank[k % s->n];
}

size_t upstream_url(const struct upstreams *u, unsigned i, const char *key, size_t keylen,
                    char *dst, size_t cap)
{
    return url_build_key_into(&u->u[i]->tmpl, key, keylen, dst, cap);
}

static void eject(struct upstreams *s, unsigned i, int64_t now_ms)
{
    struct upstream *up = s->u[i];
    int_fast64_t in = 0; /* claim it: another thread may be ejecting it right now */
    if (!atomic_compare_exchange_strong(&up->ejected_until, &in, INT64_MAX))
        return;
    unsigned have = atomic_load(s->nejected);
    do {
        if (have >= s->max_ejected) {
            atomic_store(&up->ejected_until, 0); /* at the cap: it stays in */
            return;
        }
    } while (!atomic_compare_exchange_weak(s->nejected, &have, have + 1));
    if (now_ms - atomic_load(&up->in_since) >= s->opts.eject_max_ms)
        atomic_store(&up->repeats, 0); /* it had been fine for long: start over */
    unsigned rep = atomic_fetch_add(&up->repeats, 1);
    int64_t ms = s->opts.eject_ms;
    for (unsigned r = 0; r < rep && ms < s->opts.eject_max_ms; r++)
        ms *= 2;
    if (ms > s->opts.eject_max_ms)
        ms = s->opts.eject_max_ms;
    atomic_store(&up->consecutive, 0);
    atomic_fetch_add(&up->ejections, 1);
    atomic_store(&up->ejected_until, now_ms + ms);
    if (atomic_load(&up->gone)) { /* it left the set meanwhile: undo (release_dropped()) */
        int_fast64_t until = now_ms + ms;
        if (atomic_compare_exchange_strong(&up->ejected_until, &until, 0))
            atomic_fetch_sub(s->nejected, 1);
        return;
    }
    if (s->opts.on_event)
        s->opts.on_event(s->opts.event_arg, up->label, true, ms, atomic_load(&up->ejections));
}

/* Bucket of a latency: 4 per power of two (about 19% wide), exact below 4 us. */
static unsigned lat_bucket(uint64_t us)
{
    if (us < 4)
        return (unsigned)us;
    unsigned oct = 63u - (unsigned)__builtin_clzll(us); /* >= 2 */
    unsigned b = 4 * (oct - 1) + (unsigned)((us >> (oct - 2)) & 3);
    return b < LAT_BUCKETS ? b : LAT_BUCKETS - 1;
}

static uint64_t lat_lower(unsigned b)
{
    if (b < 4)
        return b;
    unsigned oct = b / 4 + 1, sub = b % 4;
    return (uint64_t)(4 + sub) << (oct - 2);
}

static void recompute_p95(struct upstream *up)
{
    uint32_t c[LAT_BUCKETS];
    uint64_t total = 0;
    for (unsigned b = 0; b < LAT_BUCKETS; b++)
        total += c[b] = (uint32_t)atomic_load_explicit(&up->lat[b], memory_order_relaxed);
    if (total == 0)
        return;
    uint64_t want = (total * 95 + 99) / 100, run = 0;
    for (unsigned b = 0; b < LAT_BUCKETS; b++) {
        if (run + c[b] >= want) { /* interpolate inside the bucket */
            uint64_t lo = lat_lower(b), hi = b + 1 < LAT_BUCKETS ? lat_lower(b + 1) : lo * 2;
            uint64_t est = lo + (hi - lo) * (want - run) / (c[b] ? c[b] : 1);
            atomic_store_explicit(&up->p95_us, (int64_t)est, memory_order_relaxed);
            return;
        }
        run += c[b];
    }
}

static void observe(struct upstream *up, int64_t us)
{
    atomic_fetch_add_explicit(&up->lat[lat_bucket(us > 0 ? (uint64_t)us : 0)], 1,
                              memory_order_relaxed);
    uint_fast32_t t = atomic_fetch_add_explicit(&up->lat_total, 1, memory_order_relaxed) + 1;
    uint64_t seen = atomic_fetch_add_explicit(&up->lat_seen, 1, memory_order_relaxed) + 1;
    if (t == LAT_DECAY_AT) { /* exactly one observer halves: recent samples weigh more */
        uint_fast32_t left = 0;
        for (unsigned b = 0; b < LAT_BUCKETS; b++) {
            uint_fast32_t v = atomic_load_explicit(&up->lat[b], memory_order_relaxed);
            atomic_fetch_sub_explicit(&up->lat[b], v - v / 2, memory_order_relaxed);
            left += v / 2;
        }
        atomic_fetch_sub_explicit(&up->lat_total, LAT_DECAY_AT - left, memory_order_relaxed);
    }
    if (seen >= UPSTREAM_P95_MIN_SAMPLES && seen % LAT_RECOMPUTE == 0)
        recompute_p95(up);
}

void upstream_report(struct upstreams *s, unsigned i, enum upstream_outcome o, int64_t latency_us,
                     int64_t now_ms)
{
    struct upstream *up = s->u[i];
    if (o == UPSTREAM_OK) {
        if (atomic_load_explicit(&up->consecutive, memory_order_relaxed))
            atomic_store_explicit(&up->consecutive, 0, memory_order_relaxed);
        if (latency_us >= 0)
            observe(up, latency_us);
        return;
    }
    if (!s->max_ejected || upstream_ejected(s, i, now_ms))
        return;
    if (atomic_fetch_add(&up->consecutive, 1) + 1 >= s->opts.eject_after)
        eject(s, i, now_ms);
}

void upstream_count(struct upstreams *u, unsigned i, enum outcome_kind kind, int64_t us)
{
    struct upstream_stats *st = &u->u[i]->stats;
    atomic_fetch_add_explicit(&st->fetches[kind], 1, memory_order_relaxed);
    hist_observe(&st->seconds, us);
}

const struct upstream_stats *upstream_stats(const struct upstreams *u, unsigned i)
{
    return &u->u[i]->stats;
}

uint64_t upstream_ejections(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->u[i]->ejections, memory_order_relaxed);
}

int64_t upstream_p95_us(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->u[i]->p95_us, memory_order_relaxed);
}

int upstream_live_new(struct upstreams *first, struct upstream_live **out)
{
    struct upstream_live *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    int rc = pthread_mutex_init(&l->mu, NULL);
    if (rc != 0) {
        free(l);
        return -rc;
    }
    l->cur = first;
    *out = l;
    return 0;
}

struct upstreams *upstream_live_get(struct upstream_live *l)
{
    pthread_mutex_lock(&l->mu);
    struct upstreams *u = upstreams_ref(l->cur);
    pthread_mutex_unlock(&l->mu);
    return u;
}

/* The upstreams of 'old' that 'next' no longer has: an ejection of theirs ends now, so that
 * the group's count of ejected upstreams counts only members of the set. One being ejected
 * right now (claimed, INT64_MAX) is left to eject(), which sees 'gone' after it publishes the
 * ejection and undoes it (both sides are sequentially consistent, so one of them clears it). */
static void release_dropped(const struct upstreams *old, const struct upstreams *next)
{
    for (unsigned i = 0; i < old->n; i++) {
        struct upstream *up = old->u[i];
        bool kept = false;
        for (unsigned j = 0; j < next->n && !kept; j++)
            kept = up == next->u[j];
        if (kept)
            continue;
        atomic_store(&up->gone, true);
        int_fast64_t until = atomic_load(&up->ejected_until);
        if (until != 0 && until != INT64_MAX &&
            atomic_compare_exchange_strong(&up->ejected_until, &until, 0))
            atomic_fetch_sub(old->nejected, 1);
    }
}

void upstream_live_swap(struct upstream_live *l, struct upstreams *next)
{
    pthread_mutex_lock(&l->mu);
    struct upstreams *old = l->cur;
    l->cur = next;
    pthread_mutex_unlock(&l->mu);
    for (unsigned j = 0; j < next->n; j++) /* derived from an older snapshot: back in the set */
        atomic_store(&next->u[j]->gone, false);
    if (old->g == next->g)
        release_dropped(old, next);
    upstreams_free(old);
}

void upstream_live_free(struct upstream_live *l)
{
    if (!l)
        return;
    upstreams_free(l->cur);
    pthread_mutex_destroy(&l->mu);
    free(l);
}
