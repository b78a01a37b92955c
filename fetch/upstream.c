/* upstream: upstreams, their members, choice, ejection and latency (see upstream.h).
 *
 * Objects: an upstream (struct upstream: a template, its label and hash, its lookup counters)
 * and a member (struct member: an upstream and an address, with all the state that follows it
 * from snapshot to snapshot), both reference counted by the snapshots that hold them.
 *
 * State per member, all atomics: the consecutive-failure count, the ejection deadline (0 when
 * in), how many times it was ejected in a row, its health-check run, its attempts in flight
 * and the latency histogram. The number of members ejected right now is one counter for the
 * group, raised with a compare-and-swap that respects the max_ejected_pct cap, so two loops
 * that see failures at once cannot eject more than the cap allows. An ejection ends lazily: the
 * first thread that sees its deadline passed (and, with health gating, the member healthy)
 * clears it (compare-and-swap, so exactly one) and lowers the counter. */
#include "fetch/upstream.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
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
#define LAT_RECOMPUTE 32    /* recompute the percentiles every this many observations */

/* An upstream: a template, shared by its members. */
struct upstream {
    atomic_uint refs;                 /* members and snapshots holding it */
    struct url_template tmpl;         /* parsed template; tmpl.text is its identity */
    char label[280];                  /* host:port */
    char port[8];                     /* the port members are reached on */
    uint64_t hash;                    /* rendezvous seed: hash of the template */
    atomic_uint_fast64_t resolves[UPSTREAM_RESOLVE_KINDS]; /* lookups of its name, by result */
};

/* A member: an upstream and an address (none: reached by the upstream's name), and the state
 * that follows it for as long as it stays in the set. */
struct member {
    atomic_uint refs;                  /* snapshots holding it */
    struct upstream *up;               /* its upstream (a reference) */
    char addr[UPSTREAM_ADDR_MAX];      /* "" when reached by name */
    char label[300];                   /* address:port, or the upstream's label */
    char connect_to[UPSTREAM_ADDR_MAX + 8]; /* address:port, or "" */
    uint64_t hash;                     /* rendezvous seed */
    int64_t ramp_from;                 /* slow start began (monotonic ms); INT64_MIN: none */
    atomic_uint consecutive;           /* failures in a row */
    atomic_int_fast64_t ejected_until; /* monotonic ms, 0 when not ejected */
    atomic_int_fast64_t in_since;      /* when it last returned (or started), ms */
    atomic_uint repeats;               /* ejections in a row (the doubling exponent) */
    atomic_uint_fast64_t ejections;    /* ejections so far */
    atomic_uint in_flight;             /* attempts on it not yet ended */
    atomic_bool healthy;               /* by its health checks (true without gating) */
    atomic_uint passes, fails;         /* health checks in a row */
    atomic_bool checked;               /* it has had a health check */
    atomic_uint_fast32_t lat[LAT_BUCKETS]; /* decaying histogram of successful attempts */
    atomic_uint_fast32_t lat_total;    /* its count (approximately the sum of lat[]) */
    atomic_uint_fast64_t lat_seen;     /* successful attempts ever observed */
    atomic_int_fast64_t p95_us;        /* cached estimates, -1 until enough samples */
    atomic_int_fast64_t hedge_us;
    atomic_int_fast64_t ewma_us;       /* moving average of successful attempts, 0: none yet */
    atomic_int_fast64_t ewma_ms;       /* when it was last moved (monotonic ms) */
    struct upstream_stats stats;       /* attempts by kind and their duration */
    atomic_bool gone;                  /* dropped from the live set: it may not stay ejected */
};

/* What every snapshot derived from one upstreams_new() shares: the settings and the count of
 * members ejected right now (the cap applies to the set as it is, whichever snapshot a thread
 * reads). */
struct upstream_group {
    atomic_uint refs;           /* snapshots of the group */
    struct upstreams_opts opts; /* as given */
    atomic_uint nejected;       /* ejected now */
};

/* An upstream's place in a snapshot. */
struct entry {
    struct upstream *up;        /* a reference */
    unsigned first, count;      /* its members */
    char why[UPSTREAM_WHY_MAX]; /* why it has none */
};

/* A snapshot: immutable lists of upstreams and members, reference counted. */
struct upstreams {
    atomic_uint refs;           /* holders of this snapshot */
    struct upstream_group *g;   /* shared with every snapshot derived from it */
    struct upstreams_opts opts; /* g's, copied for the hot path */
    unsigned n;                 /* upstreams */
    struct entry *e;            /* n of them */
    unsigned nm;                /* members */
    unsigned max_ejected;       /* most ejected at once */
    int64_t ramp_until;         /* some member ramps until then (monotonic ms); else INT64_MIN */
    atomic_uint *nejected;      /* &g->nejected */
    uint16_t *owner;            /* nm of them: the upstream of each member */
    struct member *m[];         /* nm of them (references), grouped by upstream */
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

/* "host:port" of a parsed template, with the scheme's default port when none is given; the
 * port alone into 'port'. */
static void make_label(const char *text, char *out, size_t cap, char *port, size_t pcap)
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
    if (colon) {
        snprintf(out, cap, "%.*s", (int)n, a);
        snprintf(port, pcap, "%.*s", (int)(n - (size_t)(colon + 1 - a)), colon + 1);
    } else {
        snprintf(port, pcap, "%s", https ? "443" : "80");
        snprintf(out, cap, "%.*s:%s", (int)n, a, port);
    }
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

static void member_unref(struct member *m)
{
    if (m && atomic_fetch_sub_explicit(&m->refs, 1, memory_order_acq_rel) == 1) {
        upstream_unref(m->up);
        free(m);
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
    make_label(up->tmpl.text, up->label, sizeof(up->label), up->port, sizeof(up->port));
    up->hash = mix(hash_bytes(up->tmpl.text, strlen(up->tmpl.text)));
    *out = up;
    return 0;
}

/* A fresh member of 'up' at 'addr' ("" by name), ramping from 'ramp_from' (INT64_MIN: not). */
static struct member *member_make(struct upstream *up, const char *addr, int64_t ramp_from,
                                  bool gated)
{
    struct member *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    atomic_init(&m->refs, 1);
    atomic_fetch_add_explicit(&up->refs, 1, memory_order_relaxed);
    m->up = up;
    snprintf(m->addr, sizeof(m->addr), "%s", addr);
    if (addr[0]) {
        snprintf(m->label, sizeof(m->label), "%s:%s", addr, up->port);
        snprintf(m->connect_to, sizeof(m->connect_to), "%s:%s", addr, up->port);
        m->hash = mix(up->hash ^ mix(hash_bytes(addr, strlen(addr))));
    } else {
        snprintf(m->label, sizeof(m->label), "%s", up->label);
        m->hash = up->hash;
    }
    m->ramp_from = ramp_from;
    atomic_init(&m->healthy, !gated);
    atomic_init(&m->p95_us, -1);
    atomic_init(&m->hedge_us, -1);
    return m;
}

static bool opts_ok(const struct upstreams_opts *o)
{
    return o->max_ejected_pct <= 100 && o->hedge_pct <= 99 &&
           (o->balance_factor == 0 || o->balance_factor >= 1) && o->slow_start_ms >= 0 &&
           (!o->eject_after || (o->eject_ms > 0 && o->eject_max_ms >= o->eject_ms));
}

/* An address as a member takes it: an IPv4 literal, or an IPv6 one in brackets. */
static bool addr_ok(const char *a)
{
    size_t n = strlen(a);
    unsigned char bin[sizeof(struct in6_addr)];
    if (n == 0 || n >= UPSTREAM_ADDR_MAX)
        return false;
    if (a[0] != '[')
        return inet_pton(AF_INET, a, bin) == 1;
    char inner[UPSTREAM_ADDR_MAX];
    if (n < 3 || a[n - 1] != ']')
        return false;
    memcpy(inner, a + 1, n - 2);
    inner[n - 2] = 0;
    return inet_pton(AF_INET6, inner, bin) == 1;
}

/* ---------------------------------------------------------------- snapshots */

static const struct entry *old_entry(const struct upstreams *old, const char *tmpl)
{
    for (unsigned j = 0; old && j < old->n; j++)
        if (!strcmp(old->e[j].up->tmpl.text, tmpl))
            return &old->e[j];
    return NULL;
}

static struct member *old_member(const struct upstreams *old, const struct entry *oe,
                                 const char *addr)
{
    for (unsigned j = 0; oe && j < oe->count; j++)
        if (!strcmp(old->m[oe->first + j]->addr, addr))
            return old->m[oe->first + j];
    return NULL;
}

/* Adds the member at 'addr' of the snapshot's latest upstream: the old one, or a new one. */
static int add_member(struct upstreams *s, const struct upstreams *old, const struct entry *oe,
                      const char *addr, int64_t ramp_from)
{
    struct entry *e = &s->e[s->n - 1];
    for (unsigned j = e->first; j < s->nm; j++)
        if (!strcmp(s->m[j]->addr, addr))
            return -EEXIST;
    struct member *m = old_member(old, oe, addr);
    if (m)
        atomic_fetch_add_explicit(&m->refs, 1, memory_order_relaxed);
    else if (!(m = member_make(e->up, addr, ramp_from, s->opts.health_gated)))
        return -ENOMEM;
    s->owner[s->nm] = (uint16_t)(s->n - 1);
    s->m[s->nm++] = m;
    e->count++;
    if (m->ramp_from != INT64_MIN && m->ramp_from + s->opts.slow_start_ms > s->ramp_until)
        s->ramp_until = m->ramp_from + s->opts.slow_start_ms;
    return 0;
}

/* Adds upstream 'sp' and its members to the snapshot being built. */
static int add_upstream(struct upstreams *s, const struct upstreams *old,
                        const struct upstream_spec *sp, int64_t now_ms, char *why, size_t wlen)
{
    for (unsigned j = 0; j < s->n; j++)
        if (!strcmp(s->e[j].up->tmpl.text, sp->tmpl))
            return fail(why, wlen, "given twice");
    const struct entry *oe = old_entry(old, sp->tmpl);
    struct upstream *up = oe ? oe->up : NULL;
    if (up)
        atomic_fetch_add_explicit(&up->refs, 1, memory_order_relaxed);
    else {
        int rc = upstream_make(sp->tmpl, &up, why, wlen);
        if (rc != 0)
            return rc;
    }
    struct entry *e = &s->e[s->n++];
    *e = (struct entry){.up = up, .first = s->nm};
    /* A member joining addressed members already serving ramps; the first ones do not. */
    bool ramp = false;
    for (unsigned j = 0; oe && j < oe->count && !ramp; j++)
        ramp = old->m[oe->first + j]->addr[0] != 0;
    int64_t from = ramp && s->opts.slow_start_ms > 0 ? now_ms : INT64_MIN;
    if (!sp->addrs)
        return add_member(s, old, oe, "", INT64_MIN) == -ENOMEM ? -ENOMEM : 0;
    for (unsigned a = 0; a < sp->naddrs; a++) {
        if (!addr_ok(sp->addrs[a]))
            return fail(why, wlen, "member address '%.60s' is not an IP literal", sp->addrs[a]);
        int rc = add_member(s, old, oe, sp->addrs[a], from);
        if (rc == -EEXIST)
            return fail(why, wlen, "member %s given twice", sp->addrs[a]);
        if (rc != 0)
            return rc;
    }
    if (e->count == 0)
    {
        if (sp->why)
            snprintf(e->why, sizeof(e->why), "%.150s", sp->why);
        else
            snprintf(e->why, sizeof(e->why), "upstream %.120s has no member", up->label);
    }
    return 0;
}

/* A snapshot of the group 'g' (a reference is taken) for 'specs': each upstream and member
 * found in 'old' is that one, the others are new. */
static int snapshot_make(struct upstream_group *g, const struct upstreams *old,
                         const struct upstream_spec *specs, unsigned n, int64_t now_ms,
                         struct upstreams **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n == 0)
        return fail(err, errlen, "no upstream given");
    if (n > UPSTREAMS_MAX)
        return fail(err, errlen, "%u upstreams given; at most %d", n, UPSTREAMS_MAX);
    size_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += specs[i].addrs ? specs[i].naddrs : 1;
    if (total > UPSTREAM_MEMBERS_MAX)
        return fail(err, errlen, "%zu members given; at most %d", total, UPSTREAM_MEMBERS_MAX);
    struct upstreams *s = calloc(1, sizeof(*s) + total * sizeof(s->m[0]));
    if (!s || !(s->e = calloc(n, sizeof(s->e[0]))) ||
        !(s->owner = calloc(total ? total : 1, sizeof(s->owner[0])))) {
        if (s)
            free(s->e);
        free(s);
        return -ENOMEM;
    }
    atomic_init(&s->refs, 1);
    atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);
    s->g = g;
    s->opts = g->opts;
    s->nejected = &g->nejected;
    s->ramp_until = INT64_MIN;
    for (unsigned i = 0; i < n; i++) {
        char why[256];
        int rc = add_upstream(s, old, &specs[i], now_ms, why, sizeof(why));
        if (rc != 0) {
            upstreams_free(s);
            return rc == -ENOMEM ? rc : fail(err, errlen, "upstream %s: %s", specs[i].tmpl, why);
        }
    }
    s->max_ejected = !s->opts.eject_after
                         ? 0
                         : (unsigned)((uint64_t)s->nm * s->opts.max_ejected_pct / 100);
    *out = s;
    return 0;
}

/* Specs for templates alone: one member each, by name. */
static int specs_of(const char *const *templates, unsigned n, struct upstream_spec *specs,
                    char *err, size_t errlen)
{
    if (n > UPSTREAMS_MAX)
        return fail(err, errlen, "%u upstreams given; at most %d", n, UPSTREAMS_MAX);
    for (unsigned i = 0; i < n; i++)
        specs[i] = (struct upstream_spec){.tmpl = templates[i]};
    return 0;
}

int upstreams_new(const char *const *templates, unsigned n, const struct upstreams_opts *o,
                  struct upstreams **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!opts_ok(o))
        return fail(err, errlen, "bad upstream settings");
    struct upstream_spec specs[UPSTREAMS_MAX];
    int rc = specs_of(templates, n, specs, err, errlen);
    if (rc != 0)
        return rc;
    struct upstream_group *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->opts = *o;
    if (!g->opts.hedge_pct)
        g->opts.hedge_pct = 95;
    atomic_init(&g->refs, 1); /* ours, until the snapshot holds its own */
    rc = snapshot_make(g, NULL, specs, n, 0, out, err, errlen);
    group_unref(g);
    return rc;
}

int upstreams_with_members(const struct upstreams *old, const struct upstream_spec *specs,
                           unsigned n, int64_t now_ms, struct upstreams **out, char *err,
                           size_t errlen)
{
    return snapshot_make(old->g, old, specs, n, now_ms, out, err, errlen);
}

int upstreams_with(const struct upstreams *old, const char *const *templates, unsigned n,
                   struct upstreams **out, char *err, size_t errlen)
{
    struct upstream_spec specs[UPSTREAMS_MAX];
    *out = NULL;
    int rc = specs_of(templates, n, specs, err, errlen);
    return rc ? rc : snapshot_make(old->g, old, specs, n, 0, out, err, errlen);
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
    for (unsigned i = 0; i < u->nm; i++)
        member_unref(u->m[i]);
    for (unsigned i = 0; u->e && i < u->n; i++)
        upstream_unref(u->e[i].up);
    free(u->e);
    free(u->owner);
    group_unref(u->g);
    free(u);
}

/* ---------------------------------------------------------------- reading a snapshot */

unsigned upstreams_count(const struct upstreams *u)
{
    return u->n;
}

const char *upstream_template(const struct upstreams *u, unsigned i)
{
    return u->e[i].up->tmpl.text;
}

const char *upstream_label(const struct upstreams *u, unsigned i)
{
    return u->e[i].up->label;
}

unsigned upstream_members(const struct upstreams *u, unsigned i, unsigned *first)
{
    *first = u->e[i].first;
    return u->e[i].count;
}

const char *upstream_why(const struct upstreams *u, unsigned i)
{
    return u->e[i].why;
}

void upstream_count_resolve(struct upstreams *u, unsigned i, enum upstream_resolve r)
{
    atomic_fetch_add_explicit(&u->e[i].up->resolves[r], 1, memory_order_relaxed);
}

uint64_t upstream_resolves(const struct upstreams *u, unsigned i, enum upstream_resolve r)
{
    return atomic_load_explicit(&u->e[i].up->resolves[r], memory_order_relaxed);
}

bool upstreams_any_member(const struct upstreams *u)
{
    return u->nm > 0;
}

unsigned upstreams_member_count(const struct upstreams *u)
{
    return u->nm;
}

unsigned upstream_member_upstream(const struct upstreams *u, unsigned m)
{
    return u->owner[m];
}

const char *upstream_member_label(const struct upstreams *u, unsigned m)
{
    return u->m[m]->label;
}

const char *upstream_member_connect_to(const struct upstreams *u, unsigned m)
{
    return u->m[m]->connect_to[0] ? u->m[m]->connect_to : NULL;
}

size_t upstream_url(const struct upstreams *u, unsigned m, const char *key, size_t keylen,
                    char *dst, size_t cap)
{
    return url_build_key_into(&u->m[m]->up->tmpl, key, keylen, dst, cap);
}

/* ---------------------------------------------------------------- choice */

void upstream_key_init(const struct upstreams *u, const char *key, size_t keylen,
                       struct upstream_key *k)
{
    k->hash = hash_bytes(key, keylen);
    k->shard = 0;
    if (u->opts.policy != UPSTREAM_SHARDS || u->n == 1)
        return;
    uint64_t best = 0;
    for (unsigned i = 0; i < u->n; i++) {
        uint64_t w = mix(k->hash ^ u->e[i].up->hash);
        if (i == 0 || w > best) {
            best = w;
            k->shard = i;
        }
    }
}

/* The key's candidates: members first .. first + count - 1. */
static unsigned candidates(const struct upstreams *u, const struct upstream_key *k,
                           unsigned *first)
{
    if (u->opts.policy == UPSTREAM_SHARDS) {
        *first = u->e[k->shard].first;
        return u->e[k->shard].count;
    }
    *first = 0;
    return u->nm;
}

/* Member m's rendezvous score for key hash 'kh': the raw hash, or, while members ramp, the
 * weighted score w / -ln(h) with h the hash as a fraction in (0, 1), kept as its logarithm
 * ln(w) - ln(-ln(h)) (about -6 .. 37) shifted and scaled onto the integers, so that scores
 * differ as finely as the doubles do (the order of members at full weight is the same either
 * way). */
static uint64_t score(const struct upstreams *u, const struct member *m, uint64_t kh,
                      int64_t now_ms)
{
    uint64_t h = mix(kh ^ m->hash);
    if (now_ms >= u->ramp_until)
        return h;
    double w = 1.0;
    if (m->ramp_from != INT64_MIN && now_ms - m->ramp_from < u->opts.slow_start_ms) {
        double f = (double)(now_ms - m->ramp_from) / (double)u->opts.slow_start_ms;
        double lo = UPSTREAM_SLOW_START_MIN_PCT / 100.0;
        w = f < 0 ? lo : lo + (1.0 - lo) * f;
    }
    double x = ((double)(h >> 11) + 0.5) * 0x1p-53; /* (0, 1], 1 when rounded up */
    double e = -log(x);                             /* ~1e-16 .. ~37, or 0 */
    if (!(e > 0))
        return UINT64_MAX;
    return (uint64_t)((log(w) - log(e) + 64.0) * 0x1p56); /* (58 .. 101) * 2^56 */
}

/* Whether member m is in: still in the live set, not ejected, and healthy by its checks. */
static bool member_in(struct upstreams *u, unsigned m, int64_t now_ms)
{
    return !atomic_load_explicit(&u->m[m]->gone, memory_order_relaxed) &&
           !upstream_ejected(u, m, now_ms) &&
           atomic_load_explicit(&u->m[m]->healthy, memory_order_relaxed);
}

/* Position of the latest try of 'm' in tried[], or -1. */
static int last_try(unsigned m, const uint16_t *tried, unsigned ntried)
{
    for (unsigned t = ntried; t-- > 0;)
        if (tried[t] == m)
            return (int)t;
    return -1;
}

/* How much slower member m has been than the fastest candidate ('fastest_us', 0: nothing
 * known): the ratio of their moving averages, or 1 below UPSTREAM_SLOW_RATIO (so that the noise
 * between members that answer alike never moves a key). A member not heard from for a while
 * (it gets little traffic because it was slow) and with nothing in flight sees its ratio fade
 * toward 1 with a time constant of UPSTREAM_SLOW_FADE_MS, so it is tried again now and then,
 * one attempt at a time, and a member that got fast again returns; its answers set the ratio
 * anew. */
static double slowness(const struct member *m, int64_t fastest_us, int64_t now_ms)
{
    int64_t avg = atomic_load_explicit(&m->ewma_us, memory_order_relaxed);
    if (fastest_us <= 0 || avg <= fastest_us)
        return 1.0;
    double r = (double)avg / (double)fastest_us;
    int64_t age = now_ms - atomic_load_explicit(&m->ewma_ms, memory_order_relaxed);
    /* Faded only while it has nothing in flight: the retry is one attempt at a time. */
    if (age > 0 && atomic_load_explicit(&m->in_flight, memory_order_relaxed) == 0)
        r = 1.0 + (r - 1.0) * exp(-(double)age / UPSTREAM_SLOW_FADE_MS);
    return r < UPSTREAM_SLOW_RATIO ? 1.0 : r; /* within it, members count as alike */
}

/* The tier of a candidate (see upstream.h), or 5 for a member that left the set, and in *order
 * what orders candidates within their tier before the score (lower first): for the tried tiers
 * the position of the latest try, for those over the load bound the load one more attempt
 * would give them (so that, when every member is over, the least loaded gets it), else 0.
 * Over the load bound means that one more attempt would take the member's load past the
 * bound: (attempts in flight + 1) x slowness > cap, which for members that answer alike is
 * attempts in flight >= cap. */
static unsigned tier_of(const struct member *m, bool in, int t, double cap, double slow,
                        double *order)
{
    *order = t;
    if (atomic_load_explicit(&m->gone, memory_order_relaxed))
        return 5;
    if (!in)
        return t >= 0 ? 4 : 3;
    if (t >= 0)
        return 2;
    *order = 0;
    double more = (atomic_load_explicit(&m->in_flight, memory_order_relaxed) + 1.0) * slow;
    if (more <= cap)
        return 0;
    *order = more;
    return 1;
}

unsigned upstreams_pick(struct upstreams *u, const struct upstream_key *k, const uint16_t *tried,
                        unsigned ntried, int64_t now_ms)
{
    unsigned first, count = candidates(u, k, &first);
    if (count == 1 && !atomic_load_explicit(&u->m[first]->gone, memory_order_relaxed))
        return first;
    bool in[UPSTREAM_MEMBERS_MAX];
    unsigned nin = 0;
    int64_t fastest = 0;
    for (unsigned j = 0; j < count; j++) {
        in[j] = member_in(u, first + j, now_ms);
        int64_t avg = atomic_load_explicit(&u->m[first + j]->ewma_us, memory_order_relaxed);
        if (in[j] && avg > 0 && (fastest == 0 || avg < fastest))
            fastest = avg;
        nin += in[j];
    }
    double cap = INFINITY;
    if (u->opts.balance_factor > 0 && nin > 0) {
        double load = 0; /* attempts in flight on the members in, each weighed by slowness */
        for (unsigned j = 0; j < count; j++)
            if (in[j])
                load += atomic_load_explicit(&u->m[first + j]->in_flight, memory_order_relaxed) *
                        slowness(u->m[first + j], fastest, now_ms);
        cap = ceil(u->opts.balance_factor * (load + 1) / nin);
    }
    unsigned best = UPSTREAM_NONE, best_tier = 5;
    double best_order = 0;
    uint64_t best_score = 0;
    for (unsigned j = 0; j < count; j++) {
        struct member *m = u->m[first + j];
        int t = last_try(first + j, tried, ntried);
        double slow = cap < INFINITY && in[j] && t < 0 ? slowness(m, fastest, now_ms) : 1.0;
        double order;
        unsigned tier = tier_of(m, in[j], t, cap, slow, &order);
        if (tier >= 5 || tier > best_tier)
            continue; /* one that left the set gets no new attempt */
        uint64_t sc = score(u, m, k->hash, now_ms);
        if (tier < best_tier || order < best_order || (order == best_order && sc > best_score)) {
            best = first + j;
            best_tier = tier;
            best_order = order;
            best_score = sc;
        }
    }
    return best;
}

int64_t upstreams_hedge_us(const struct upstreams *u, const struct upstream_key *k)
{
    unsigned first, count = candidates(u, k, &first);
    int64_t best = -1;
    for (unsigned j = 0; j < count; j++) {
        const struct member *m = u->m[first + j];
        int64_t us = atomic_load_explicit(&m->hedge_us, memory_order_relaxed);
        if (us >= 0 && !atomic_load_explicit(&m->gone, memory_order_relaxed) &&
            (best < 0 || us < best))
            best = us;
    }
    return best;
}

/* For rank(): the candidates in score order, highest first. */
struct ranked {
    uint64_t score;
    uint16_t m;
};

static int by_score(const void *a, const void *b)
{
    const struct ranked *x = a, *y = b;
    return x->score < y->score ? 1 : x->score > y->score ? -1 : 0;
}

unsigned upstreams_rank(const struct upstreams *u, const char *key, size_t keylen, int64_t now_ms,
                        uint16_t *rank)
{
    struct upstream_key k;
    upstream_key_init(u, key, keylen, &k);
    unsigned first, count = candidates(u, &k, &first);
    struct ranked *r = malloc((count ? count : 1) * sizeof(*r));
    if (!r)
        return 0;
    for (unsigned j = 0; j < count; j++)
        r[j] = (struct ranked){score(u, u->m[first + j], k.hash, now_ms), (uint16_t)(first + j)};
    qsort(r, count, sizeof(*r), by_score);
    for (unsigned j = 0; j < count; j++)
        rank[j] = r[j].m;
    free(r);
    return count;
}

void upstream_attempt_begin(struct upstreams *u, unsigned m)
{
    atomic_fetch_add_explicit(&u->m[m]->in_flight, 1, memory_order_relaxed);
}

void upstream_attempt_end(struct upstreams *u, unsigned m)
{
    atomic_fetch_sub_explicit(&u->m[m]->in_flight, 1, memory_order_relaxed);
}

unsigned upstream_in_flight(const struct upstreams *u, unsigned m)
{
    return atomic_load_explicit(&u->m[m]->in_flight, memory_order_relaxed);
}

/* ---------------------------------------------------------------- ejection and health */

static void event(struct upstreams *s, struct member *m, bool ejected, int64_t ms)
{
    if (s->opts.on_event)
        s->opts.on_event(s->opts.event_arg, m->up->label, m->label, ejected, ms,
                         atomic_load(&m->ejections));
}

/* Ends member m's ejection, which expired at 'until' (exactly one thread does). */
static void end_ejection(struct upstreams *s, struct member *m, int_fast64_t until, int64_t now_ms)
{
    if (atomic_compare_exchange_strong(&m->ejected_until, &until, 0)) {
        atomic_store(&m->in_since, now_ms);
        atomic_fetch_sub(s->nejected, 1);
        event(s, m, false, 0);
    }
}

bool upstream_ejected(struct upstreams *s, unsigned i, int64_t now_ms)
{
    struct member *m = s->m[i];
    int64_t until = atomic_load_explicit(&m->ejected_until, memory_order_acquire);
    if (until == 0)
        return false;
    if (now_ms < until)
        return true;
    if (s->opts.health_gated && !atomic_load(&m->healthy))
        return true; /* its time is up, but it returns by passing a check */
    end_ejection(s, m, until, now_ms);
    return false;
}

static void eject(struct upstreams *s, unsigned i, int64_t now_ms)
{
    struct member *up = s->m[i];
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
    if (s->opts.health_gated) { /* it returns by passing checks again */
        atomic_store(&up->healthy, false);
        atomic_store(&up->passes, 0);
    }
    atomic_store(&up->ejected_until, now_ms + ms);
    if (atomic_load(&up->gone)) { /* it left the set meanwhile: undo (release_dropped()) */
        int_fast64_t until = now_ms + ms;
        if (atomic_compare_exchange_strong(&up->ejected_until, &until, 0))
            atomic_fetch_sub(s->nejected, 1);
        return;
    }
    event(s, up, true, ms);
}

int upstream_health(struct upstreams *s, unsigned i, bool passed, unsigned healthy_after,
                    unsigned unhealthy_after, int64_t now_ms)
{
    struct member *m = s->m[i];
    if (passed) {
        atomic_store(&m->fails, 0);
        unsigned p = atomic_fetch_add(&m->passes, 1) + 1;
        bool first = !atomic_exchange(&m->checked, true); /* a new member's first pass */
        if (atomic_load(&m->healthy) || (p < healthy_after && !first))
            return 0;
        atomic_store(&m->healthy, true);
        int_fast64_t until = atomic_load(&m->ejected_until);
        if (until != 0 && until != INT64_MAX && now_ms >= until)
            end_ejection(s, m, until, now_ms);
        return 1;
    }
    atomic_store(&m->passes, 0);
    atomic_store(&m->checked, true);
    unsigned f = atomic_fetch_add(&m->fails, 1) + 1;
    if (!atomic_load(&m->healthy) || f < (unhealthy_after ? unhealthy_after : 1))
        return 0;
    atomic_store(&m->healthy, false);
    return -1;
}

bool upstream_healthy(const struct upstreams *u, unsigned m)
{
    return atomic_load_explicit(&u->m[m]->healthy, memory_order_relaxed);
}

/* ---------------------------------------------------------------- latency */

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

/* The pct-th percentile of the histogram c[] (total counts), interpolated inside its bucket. */
static int64_t percentile(const uint32_t *c, uint64_t total, unsigned pct)
{
    uint64_t want = (total * pct + 99) / 100, run = 0;
    for (unsigned b = 0; b < LAT_BUCKETS; b++) {
        if (run + c[b] >= want) {
            uint64_t lo = lat_lower(b), hi = b + 1 < LAT_BUCKETS ? lat_lower(b + 1) : lo * 2;
            return (int64_t)(lo + (hi - lo) * (want - run) / (c[b] ? c[b] : 1));
        }
        run += c[b];
    }
    return -1;
}

static void recompute_pcts(struct member *up, unsigned hedge_pct)
{
    uint32_t c[LAT_BUCKETS];
    uint64_t total = 0;
    for (unsigned b = 0; b < LAT_BUCKETS; b++)
        total += c[b] = (uint32_t)atomic_load_explicit(&up->lat[b], memory_order_relaxed);
    if (total == 0)
        return;
    atomic_store_explicit(&up->p95_us, percentile(c, total, 95), memory_order_relaxed);
    atomic_store_explicit(&up->hedge_us, percentile(c, total, hedge_pct), memory_order_relaxed);
}

static void observe(struct member *up, int64_t us, unsigned hedge_pct, int64_t now_ms)
{
    /* The moving average (weight 1/8 for the newest): racing updates may lose one, which an
     * average can afford. */
    int64_t avg = atomic_load_explicit(&up->ewma_us, memory_order_relaxed);
    int64_t sample = us > 0 ? us : 1;
    atomic_store_explicit(&up->ewma_us, avg ? avg + (sample - avg) / 8 : sample,
                          memory_order_relaxed);
    atomic_store_explicit(&up->ewma_ms, now_ms, memory_order_relaxed);
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
        recompute_pcts(up, hedge_pct);
}


/* ---------------------------------------------------------------- outcomes */

void upstream_report(struct upstreams *s, unsigned i, enum upstream_outcome o, int64_t latency_us,
                     int64_t now_ms)
{
    struct member *up = s->m[i];
    if (o == UPSTREAM_OK) {
        if (atomic_load_explicit(&up->consecutive, memory_order_relaxed))
            atomic_store_explicit(&up->consecutive, 0, memory_order_relaxed);
        if (latency_us >= 0)
            observe(up, latency_us, s->opts.hedge_pct, now_ms);
        return;
    }
    if (!s->max_ejected || upstream_ejected(s, i, now_ms))
        return;
    if (s->opts.policy == UPSTREAM_SHARDS && s->e[s->owner[i]].count < 2)
        return; /* a shard's only member: there is nowhere else to go */
    if (atomic_fetch_add(&up->consecutive, 1) + 1 >= s->opts.eject_after)
        eject(s, i, now_ms);
}

void upstream_report_lost(struct upstreams *u, unsigned i, int64_t elapsed_us, int64_t now_ms)
{
    struct member *m = u->m[i];
    int64_t avg = atomic_load_explicit(&m->ewma_us, memory_order_relaxed);
    if (avg <= 0)
        return; /* nothing known yet to compare it with */
    if (elapsed_us > avg)
        atomic_store_explicit(&m->ewma_us, avg + (elapsed_us - avg) / 8, memory_order_relaxed);
    atomic_store_explicit(&m->ewma_ms, now_ms, memory_order_relaxed); /* heard from, slow */
}

void upstream_count(struct upstreams *u, unsigned i, enum outcome_kind kind, int64_t us)
{
    struct upstream_stats *st = &u->m[i]->stats;
    atomic_fetch_add_explicit(&st->fetches[kind], 1, memory_order_relaxed);
    hist_observe(&st->seconds, us);
}

const struct upstream_stats *upstream_stats(const struct upstreams *u, unsigned i)
{
    return &u->m[i]->stats;
}

uint64_t upstream_ejections(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->m[i]->ejections, memory_order_relaxed);
}

int64_t upstream_p95_us(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->m[i]->p95_us, memory_order_relaxed);
}

int64_t upstream_hedge_us(const struct upstreams *u, unsigned i)
{
    return atomic_load_explicit(&u->m[i]->hedge_us, memory_order_relaxed);
}

/* ---------------------------------------------------------------- the live set */

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

/* The members of 'old' that 'next' no longer has: an ejection of theirs ends now, so that the
 * group's count of ejected members counts only members of the set. One being ejected right now
 * (claimed, INT64_MAX) is left to eject(), which sees 'gone' after it publishes the ejection
 * and undoes it (both sides are sequentially consistent, so one of them clears it). */
static void release_dropped(const struct upstreams *old, const struct upstreams *next)
{
    for (unsigned i = 0; i < old->nm; i++) {
        struct member *m = old->m[i];
        bool kept = false;
        for (unsigned j = 0; j < next->nm && !kept; j++)
            kept = m == next->m[j];
        if (kept)
            continue;
        atomic_store(&m->gone, true);
        int_fast64_t until = atomic_load(&m->ejected_until);
        if (until != 0 && until != INT64_MAX &&
            atomic_compare_exchange_strong(&m->ejected_until, &until, 0))
            atomic_fetch_sub(old->nejected, 1);
    }
}

void upstream_live_swap(struct upstream_live *l, struct upstreams *next)
{
    pthread_mutex_lock(&l->mu);
    struct upstreams *old = l->cur;
    l->cur = next;
    pthread_mutex_unlock(&l->mu);
    for (unsigned j = 0; j < next->nm; j++) /* derived from an older snapshot: back in the set */
        atomic_store(&next->m[j]->gone, false);
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
