/* upstream: the set of upstreams an id can be fetched from, their members, and which member an
 * attempt goes to.
 *
 * An upstream is a URL template (url.h) and the name in it; its members are the addresses that
 * name stands for (each A and AAAA record, found by whoever builds the snapshot: server/
 * upstream/discover.c), all serving the same template on the template's port. A member given
 * no address is reached by the name itself (fetch resolves it): an IP literal, or a set built
 * from templates alone. An upstream may have no member for a while (its name stopped
 * resolving): its ids fail at once (upstreams_pick() says UPSTREAM_NONE).
 *
 * Choice: an id's key is hashed once; each candidate member gets a rendezvous (highest random
 * weight) score from the key and its identity, and the same key always ranks the members the
 * same way: removing one member moves only the keys it ranked first, adding one takes about
 * 1/N of them. Candidates: with replicas (the same data everywhere) every member of every
 * upstream; with shards (disjoint data) the members of the key's shard, the upstream that wins
 * a rendezvous over the upstreams' templates (stable whatever their members do).
 *
 * Attempt k of a key goes to the best candidate it has not tried yet, the tiers first:
 *   0. in (not ejected, and past its first health check when checks gate traffic) and under
 *      the load bound;
 *   1. in, but at or over the load bound (the least loaded first: when every member is over,
 *      the overflow goes where it weighs least);
 *   2. in, tried already (the least recently tried first);
 *   3. out (ejected or failing its checks), not tried; 4. out and tried.
 * A member that has left the live set since the snapshot was taken (upstream_live_swap()) gets
 * no new attempt from it at all, so retries and hedges of requests already running follow the
 * set too; when no candidate is left, the pick is UPSTREAM_NONE.
 * The load bound (balance_factor F > 0; bounded-load rendezvous): a member is over it when one
 * more attempt would take its load past ceil(F * (the load of the candidates that are in + 1)
 * / their number), a member's load being its attempts in flight, each weighed by its slowness:
 * how much slower it has been than the fastest candidate (the ratio of their moving averages
 * of successful attempts, counted as 1 below UPSTREAM_SLOW_RATIO, and fading back toward 1
 * while the member has no success to show, so that it is tried again now and then). For members that answer alike every weight is 1 and
 * this is the published bound: attempts in flight >= ceil(F * (all in flight + 1) / members).
 * So load spills off a slow member, which collects attempts and counts each several times,
 * while keys keep their first choice when all is well. (On attempts alone a member ten times
 * slower still gets about a tenth of a fast one's share, Little's law; more than a 5% hedge
 * budget can cover. Weighed, an idle slow member is over the bound until the fast ones are
 * loaded to its slowness.) Slow start: a member added to a running set weighs from 10% up to
 * 100% over slow_start_ms (weighted rendezvous, score = w / -ln(h)), so it takes its share
 * gradually and the ranking of the others does not move while it ramps.
 *
 * Passive outlier ejection (every member): 'eject_after' consecutive failures (transport errors
 * or 5xx) eject a member for eject_ms, doubled on each repeat ejection up to eject_max_ms; never
 * more than max_ejected_pct of the members (rounded down) at once. An ejection ends when its
 * time is up (seen by the next pick or report); with health gating, only once the member has
 * passed a health check since (upstream_health()). The repeat count resets once a member has
 * stayed in for eject_max_ms.
 *
 * Latency: successful attempts feed a decaying log-scale histogram per member, from which a
 * high percentile is kept (the hedge delay, upstream_hedge_us()).
 *
 * Identity and snapshots: a member's identity is its upstream's template and its address; a
 * set (struct upstreams) is an immutable, reference-counted snapshot, and an index is a place
 * in that snapshot only. upstreams_with_members() makes the next snapshot: a member already in
 * the old one is the same object, with its health, ejection, latency and counters; a new one
 * starts fresh (ramping, when the old snapshot was not empty of it). A dropped member lives on
 * until the last snapshot holding it is freed. A reader (a flight, a scrape) takes a snapshot
 * with upstream_live_get() and reads it as long as it holds it, so a swap while requests run
 * changes nothing under them; upstream_live_swap() publishes the next one. Snapshots derived
 * from one upstreams_new() share its settings and the count of ejected members.
 *
 * Threads: a snapshot is immutable except for each member's health, load and latency state and
 * each upstream's counters, which are atomics only; every function is thread-safe, and all but
 * upstream_live_get() and upstream_live_swap() (one short mutex) are lock-free. */
#ifndef FANOUT_UPSTREAM_H
#define FANOUT_UPSTREAM_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fetch/hist.h"
#include "fetch/outcome.h"

#define UPSTREAMS_MAX 64            /* upstreams (templates) in a set */
#define UPSTREAM_MEMBERS_MAX 4096   /* members in a set, all upstreams together */
#define UPSTREAM_NONE UINT_MAX      /* upstreams_pick(): the key's upstream has no member */
#define UPSTREAM_ADDR_MAX 48        /* a member's address text, "[IPv6]" included, NUL too */
#define UPSTREAM_WHY_MAX 160        /* an upstream's note on why it has no member */
#define UPSTREAM_SLOW_START_MIN_PCT 10 /* a ramping member's weight at the start, percent */
#define UPSTREAM_SLOW_FADE_MS 1000.0   /* how fast an unheard member's slowness fades (to 1/e) */
#define UPSTREAM_SLOW_RATIO 1.5        /* slower than the fastest by less: counted as alike */

enum upstream_policy { UPSTREAM_REPLICAS, UPSTREAM_SHARDS };

/* What an attempt told about a member's health. */
enum upstream_outcome {
    UPSTREAM_OK,      /* it answered (2xx, 4xx, a body too large): alive */
    UPSTREAM_FAILED,  /* transport error or 5xx: counts toward ejection */
};

/* How a lookup of an upstream's name ended, for fanout_resolves_total. */
enum upstream_resolve {
    UPSTREAM_RESOLVE_OK,     /* an answer (the members follow it) */
    UPSTREAM_RESOLVE_EMPTY,  /* NXDOMAIN or no address: the members are held, then dropped */
    UPSTREAM_RESOLVE_FAILED, /* timeout, SERVFAIL, no resolver: the members are kept */
    UPSTREAM_RESOLVE_KINDS
};

struct upstreams;
struct upstream_live;

/* Called on ejection (ejected true, 'ms' its length) and on return (false, 0) of the member
 * labelled 'member' of upstream 'upstream' (both "host:port"; its ejections so far in
 * 'ejections'); from whichever thread noticed. */
typedef void (*upstream_event_fn)(void *arg, const char *upstream, const char *member,
                                  bool ejected, int64_t ms, uint64_t ejections);

/* What a member counts of its attempts, for the metrics: it lives with the member, from
 * snapshot to snapshot. Atomics; read with relaxed loads. */
struct upstream_stats {
    atomic_uint_fast64_t fetches[OUTCOME_KINDS]; /* attempts, by how they ended */
    struct hist seconds;                         /* their duration */
};

struct upstreams_opts {
    enum upstream_policy policy;
    unsigned eject_after;      /* consecutive failures that eject; 0: never eject */
    int64_t eject_ms;          /* first ejection's length, ms (> 0 when eject_after > 0) */
    int64_t eject_max_ms;      /* cap of the doubling, ms (>= eject_ms) */
    unsigned max_ejected_pct;  /* most members ejected at once, percent of them (0-100) */
    int64_t slow_start_ms;     /* a new member's ramp, ms; 0: full weight at once */
    double balance_factor;     /* the load bound's F (>= 1); 0: no bound */
    bool health_gated;         /* active health checks run: a new member takes traffic after its
                                  first pass, an ejected one returns only after passing */
    unsigned hedge_pct;        /* the latency percentile upstream_hedge_us() keeps (50-99);
                                  0: 95 */
    upstream_event_fn on_event; /* or NULL */
    void *event_arg;
};

/* One upstream as given to upstreams_with_members(). */
struct upstream_spec {
    const char *tmpl;          /* its template */
    const char *const *addrs;  /* its members' addresses ("IPv4" or "[IPv6]", no port); NULL:
                                  one member, reached by the template's host name */
    unsigned naddrs;           /* how many (0 with addrs set: no member now) */
    const char *why;           /* with no member: why (for the error an id gets), or NULL */
};

/* Parses the templates (1..UPSTREAMS_MAX, each as url_template_parse() wants, no two the same);
 * each is one upstream with one member, reached by its host name. Returns 0 and the set, or
 * -EINVAL with a one-line reason in err (naming the template), or -ENOMEM. */
int upstreams_new(const char *const *templates, unsigned n, const struct upstreams_opts *o,
                  struct upstreams **out, char *err, size_t errlen);

/* The next snapshot of the same group as 'old' for 'specs' (1..UPSTREAMS_MAX upstreams, at most
 * UPSTREAM_MEMBERS_MAX members in all, no template or address of one upstream given twice):
 * members whose template and address are in 'old' are carried over with their state; a new
 * one ramps from 'now_ms' (monotonic) when the snapshot 'old' had members. 'old' is unchanged.
 * Returns 0 and the snapshot, -EINVAL with a reason in err, or -ENOMEM. */
int upstreams_with_members(const struct upstreams *old, const struct upstream_spec *specs,
                           unsigned n, int64_t now_ms, struct upstreams **out, char *err,
                           size_t errlen);

/* upstreams_with_members() for templates alone (one member each, by name). */
int upstreams_with(const struct upstreams *old, const char *const *templates, unsigned n,
                   struct upstreams **out, char *err, size_t errlen);

/* Another reference to a snapshot. */
struct upstreams *upstreams_ref(struct upstreams *u);

/* Drops one reference to a snapshot; the last frees it (and each member no other snapshot
 * holds). NULL is a no-op. */
void upstreams_free(struct upstreams *u);

/* The live set: the current snapshot, replaced while readers hold older ones. Takes 'first'
 * (its reference). Returns 0 or -ENOMEM / a negative errno. */
int upstream_live_new(struct upstreams *first, struct upstream_live **out);

/* A reference to the current snapshot (upstreams_free() it when done). */
struct upstreams *upstream_live_get(struct upstream_live *l);

/* Makes 'next' (its reference taken) the current snapshot; the old one is freed once its last
 * reader lets go. A member the new set no longer has stops counting as ejected. */
void upstream_live_swap(struct upstream_live *l, struct upstreams *next);

/* Frees the live set and its reference to the current snapshot. */
void upstream_live_free(struct upstream_live *l);

/* ---- upstreams: index i in 0..upstreams_count() */

unsigned upstreams_count(const struct upstreams *u);

/* The template text of upstream i, and its "host:port" (for metrics and logs). */
const char *upstream_template(const struct upstreams *u, unsigned i);
const char *upstream_label(const struct upstreams *u, unsigned i);

/* Upstream i's members: indices first .. first + count - 1. */
unsigned upstream_members(const struct upstreams *u, unsigned i, unsigned *first);

/* Why upstream i has no member ("" when it has some, or nobody said). */
const char *upstream_why(const struct upstreams *u, unsigned i);

/* Counts a lookup of upstream i's name, and reads the count. */
void upstream_count_resolve(struct upstreams *u, unsigned i, enum upstream_resolve r);
uint64_t upstream_resolves(const struct upstreams *u, unsigned i, enum upstream_resolve r);

/* Whether any upstream has a member (readiness). */
bool upstreams_any_member(const struct upstreams *u);

/* ---- members: index m in 0..upstreams_member_count() */

unsigned upstreams_member_count(const struct upstreams *u);

/* The upstream member m belongs to. */
unsigned upstream_member_upstream(const struct upstreams *u, unsigned m);

/* Member m's "address:port" (the upstream's "host:port" for a member reached by name). */
const char *upstream_member_label(const struct upstreams *u, unsigned m);

/* Member m's address as fetch_req.connect_to wants it ("address:port"), or NULL for one reached
 * by name. */
const char *upstream_member_connect_to(const struct upstreams *u, unsigned m);

/* A key's hashes, computed once and used for every attempt of the key. */
struct upstream_key {
    uint64_t hash;  /* of the key */
    unsigned shard; /* shards: the key's upstream; replicas: 0 */
};
void upstream_key_init(const struct upstreams *u, const char *key, size_t keylen,
                       struct upstream_key *k);

/* The member for the next attempt of key 'k' at monotonic 'now_ms', given the members tried
 * already ('tried', oldest first; a member may appear more than once): see the tiers at the
 * top. Returns a member index, or UPSTREAM_NONE when the key's candidates are none. */
unsigned upstreams_pick(struct upstreams *u, const struct upstream_key *k, const uint16_t *tried,
                        unsigned ntried, int64_t now_ms);

/* Fills rank[] with the key's candidate members in rendezvous order at 'now_ms' (weights only:
 * no ejection, load or tries), and returns how many (at most UPSTREAM_MEMBERS_MAX). */
unsigned upstreams_rank(const struct upstreams *u, const char *key, size_t keylen, int64_t now_ms,
                        uint16_t *rank);

/* Writes the URL of 'key' on member m into dst[0..cap) (url_build_key_into()). */
size_t upstream_url(const struct upstreams *u, unsigned m, const char *key, size_t keylen,
                    char *dst, size_t cap);

/* An attempt on member m begins and ends (its attempts in flight, for the load bound). */
void upstream_attempt_begin(struct upstreams *u, unsigned m);
void upstream_attempt_end(struct upstreams *u, unsigned m);
unsigned upstream_in_flight(const struct upstreams *u, unsigned m);

/* Reports an attempt's outcome (and, for a success, its latency) on member m. */
void upstream_report(struct upstreams *u, unsigned m, enum upstream_outcome o, int64_t latency_us,
                     int64_t now_ms);

/* An attempt on member m was aborted after 'elapsed_us' because another attempt of its key
 * answered first: the member's latency is at least that, which moves its moving average up
 * (never down), and it counts as hearing from the member (its slowness does not fade). Without this a slow member whose attempts all
 * lose to hedges would look unheard and have its slowness fade. */
void upstream_report_lost(struct upstreams *u, unsigned m, int64_t elapsed_us, int64_t now_ms);

/* Whether member m is ejected at 'now_ms' (an expired ejection ends here, unless health
 * gating holds it until a pass). */
bool upstream_ejected(struct upstreams *u, unsigned m, int64_t now_ms);

/* Active health checks: member m passed (true) or failed a check. After 'healthy_after'
 * passes in a row a member is healthy (and an expired ejection ends); after 'unhealthy_after'
 * failures in a row it is not. Returns 1 when it became healthy, -1 when it became unhealthy,
 * 0 otherwise. */
int upstream_health(struct upstreams *u, unsigned m, bool passed, unsigned healthy_after,
                    unsigned unhealthy_after, int64_t now_ms);

/* Whether member m is healthy by its checks (always true without health gating). */
bool upstream_healthy(const struct upstreams *u, unsigned m);

/* Counts an attempt on member m that ended as 'kind', and its duration. */
void upstream_count(struct upstreams *u, unsigned m, enum outcome_kind kind, int64_t us);

/* Member m's counters. */
const struct upstream_stats *upstream_stats(const struct upstreams *u, unsigned m);

/* Ejections of member m so far. */
uint64_t upstream_ejections(const struct upstreams *u, unsigned m);

/* The recent p95 of member m's successful attempts, microseconds; -1 until it has seen enough
 * of them (UPSTREAM_P95_MIN_SAMPLES). */
#define UPSTREAM_P95_MIN_SAMPLES 64
int64_t upstream_p95_us(const struct upstreams *u, unsigned m);

/* The hedge delay's percentile (opts.hedge_pct) of the same, or -1 until enough samples. */
int64_t upstream_hedge_us(const struct upstreams *u, unsigned m);

/* The hedge delay for key 'k': the lowest upstream_hedge_us() among its candidates (a hedge goes
 * to another member, so it is worth sending once the fastest of them would have answered), or
 * -1 while none has enough samples. */
int64_t upstreams_hedge_us(const struct upstreams *u, const struct upstream_key *k);

#endif
