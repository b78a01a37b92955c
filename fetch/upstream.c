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

struct upstream {
    struct url_template tmpl;          /* parsed template */
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
};

struct upstreams {
    struct upstreams_opts opts; /* as given */
    unsigned n;                 /* upstreams */
    unsigned max_ejected;       /* most ejected at once */
    atomic_uint nejected;       /* ejected now */
    struct upstream *u;         /* n of them */
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

int upstreams_new(const char *const *templates, unsigned n, const struct upstreams_opts *o,
                  struct upstreams **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n == 0)
        return fail(err, errlen, "no upstream given");
    if (n > UPSTREAMS_MAX)
        return fail(err, errlen, "%u upstreams given; at most %d", n, UPSTREAMS_MAX);
    if (o->max_ejected_pct > 100 || (o->eject_after && (o->eject_ms <= 0 ||
                                                         o->eject_max_ms < o->eject_ms)))
        return fail(err, errlen, "bad ejection settings");
    struct upstreams *s = calloc(1, sizeof(*s));
    if (!s || !(s->u = calloc(n, sizeof(*s->u)))) {
        free(s);
        return -ENOMEM;
    }
    s->opts = *o;
    s->max_ejected = o->policy == UPSTREAM_SHARDS || !o->eject_after
                         ? 0
                         : (unsigned)((uint64_t)n * o->max_ejected_pct / 100);
    for (unsigned i = 0; i < n; i++) {
        struct upstream *up = &s->u[i];
        char why[256];
        int rc = url_template_parse(templates[i], &up->tmpl, why, sizeof(why));
        if (rc == 0) {
            for (unsigned j = 0; j < i; j++)
                if (!strcmp(s->u[j].tmpl.text, templates[i])) {
                    snprintf(why, sizeof(why), "given twice");
                    rc = -EINVAL;
                }
        }
        if (rc != 0) {
            s->n = i + 1; /* a zeroed or parsed template: both destroy cleanly */
            upstreams_free(s);
            if (rc == -ENOMEM)
                return rc;
            return fail(err, errlen, "upstream %s: %s", templates[i], why);
        }
        s->n = i + 1;
        make_label(up->tmpl.text, up->label, sizeof(up->label));
        up->hash = mix(hash_bytes(up->tmpl.text, strlen(up->tmpl.text)));
        atomic_init(&up->p95_us, -1);
    }
    *out = s;
    return 0;
}

void upstreams_free(struct upstreams *u)
{
    if (!u)
        return;
    for (unsigned i = 0; i < u->n; i++)
        url_template_destroy(&u->u[i].tmpl);
    free(u->u);
    free(u);
}

unsigned upstreams_count(const struct upstreams *u)
{
    return u->n;
}

const char *upstream_template(const struct upstreams *u, unsigned i)
{
    return u->u[i].tmpl.text;
}

const char *upstream_label(const struct upstreams *u, unsigned i)
{
    return u->u[i].label;
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
        uint64_t wi = mix(kh ^ u->u[i].hash);
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
    struct upstream *up = &s->u[i];
    int64_t until = atomic_load_explicit(&up->ejected_until, memory_order_acquire);
    if (until == 0)
        return false;
    if (now_ms < until)
        return true;
    if (atomic_compare_exchange_strong(&up->ejected_until, &until, 0)) {
        atomic_store(&up->in_since, now_ms);
        atomic_fetch_sub(&s->nejected, 1);
        if (s->opts.on_event)
            s->opts.on_event(s->opts.event_arg, i, false, 0);
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
    return url_build_key_into(&u->u[i].tmpl, key, keylen, dst, cap);
}

static void eject(struct upstreams *s, unsigned i, int64_t now_ms)
{
    struct upstream *up = &s->u[i];
    int_fast64_t in = 0; /* claim it: another thread may be ejecting it right now */
    if (!atomic_compare_exchange_strong(&up->ejected_until, &in, INT64_MAX))
        return;
    unsigned have = atomic_load(&s->nejected);
    do {
        if (have >= s->max_ejected) {
            atomic_store(&up->ejected_until, 0); /* at the cap: it stays in */
            return;
        }
    } while (!atomic_compare_exchange_weak(&s->nejected, &have, have + 1));
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
    atomic_store_explicit(&up->ejected_until, now_ms + ms, memory_order_release);
    if (s->opts.on_event)
        s->opts.on_event(s->opts.event_arg, i, true, ms);
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
    struct upstream *up = &s->u[i];
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

uint64_t upstream_ejections(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->u[i].ejections, memory_order_relaxed);
}

int64_t upstream_p95_us(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->u[i].p95_us, memory_order_relaxed);
}
