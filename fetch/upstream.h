/* upstream: the set of upstreams an id can be fetched from, and which one an attempt goes to.
 *
 * Each upstream is a URL template (url.h). An id's key (url_encode_key()) ranks the upstreams
 * by rendezvous (highest random weight) hashing: weight = mix(hash(key), hash(template)), highest
 * first. The same key always ranks them the same way, and removing one upstream moves only the
 * keys it ranked first (to their second choice); adding one takes about 1/N of the keys.
 *
 * Policy: with replicas (same data everywhere) attempt k of an id goes to the k-th upstream of
 * its ranking that is not ejected (wrapping around); with shards (disjoint data) every attempt
 * goes to the first, and nothing is ejected.
 *
 * Passive outlier ejection (replicas only): 'eject_after' consecutive failures (transport errors
 * or 5xx) eject an upstream for eject_ms, doubled on each repeat ejection up to eject_max_ms;
 * never more than max_ejected_pct of the upstreams (rounded down) at once. An ejected upstream is
 * skipped by upstreams_pick() until its time is up; it then returns on the next pick or report.
 * The repeat count resets once an upstream has stayed in for eject_max_ms.
 *
 * Latency: successful attempts feed a decaying log-scale histogram per upstream, from which a
 * p95 estimate is kept (for hedging after the recent p95).
 *
 * Identity and snapshots: each upstream is an object whose identity is its template text; a
 * set (struct upstreams) is an immutable, reference-counted snapshot of them, and an index i is
 * the upstream's place in that snapshot only. upstreams_with() makes the next snapshot from a
 * list of templates: an upstream already in the old one is the same object, with its health,
 * ejection and latency state, and a new one starts fresh; an upstream dropped from the set
 * lives on until the last snapshot holding it is freed. A reader (a flight, a scrape) takes a
 * snapshot with upstream_live_get() and reads it as long as it holds it, so a swap while
 * requests run changes nothing under them; upstream_live_swap() publishes the next one.
 * Snapshots derived from one upstreams_new() share its settings and the count of ejected
 * upstreams, so the max_ejected_pct cap holds over the set as it is.
 *
 * Threads: a snapshot is immutable except for each upstream's health and latency state, which
 * is atomics only; every function is thread-safe, and all but upstream_live_get() and
 * upstream_live_swap() (one short mutex) are lock-free. */
#ifndef FANOUT_UPSTREAM_H
#define FANOUT_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fetch/hist.h"
#include "fetch/outcome.h"

#define UPSTREAMS_MAX 64

enum upstream_policy { UPSTREAM_REPLICAS, UPSTREAM_SHARDS };

/* What an attempt told about an upstream's health. */
enum upstream_outcome {
    UPSTREAM_OK,      /* it answered (2xx, 4xx, a body too large): alive */
    UPSTREAM_FAILED,  /* transport error or 5xx: counts toward ejection */
};

struct upstreams;
struct upstream_live;

/* Called on ejection (ejected true, 'ms' its length) and on return (false, 0) of the upstream
 * labelled 'label' ("host:port"; its ejections so far in 'ejections'); from whichever thread
 * noticed. */
typedef void (*upstream_event_fn)(void *arg, const char *label, bool ejected, int64_t ms,
                                  uint64_t ejections);

/* What an upstream counts of its attempts, for the metrics: it lives with the upstream, from
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
    unsigned max_ejected_pct;  /* most upstreams ejected at once, percent of them (0-100) */
    upstream_event_fn on_event; /* or NULL */
    void *event_arg;
};

/* Parses the templates (1..UPSTREAMS_MAX, each as url_template_parse() wants, no two the same).
 * Returns 0 and the set, or -EINVAL with a one-line reason in err (naming the template), or
 * -ENOMEM. */
int upstreams_new(const char *const *templates, unsigned n, const struct upstreams_opts *o,
                  struct upstreams **out, char *err, size_t errlen);

/* The next snapshot of the same group as 'old' for 'templates' (same rules as upstreams_new()):
 * upstreams whose template is in 'old' are carried over with their state. 'old' is unchanged.
 * Returns 0 and the snapshot, -EINVAL with a reason in err, or -ENOMEM. */
int upstreams_with(const struct upstreams *old, const char *const *templates, unsigned n,
                   struct upstreams **out, char *err, size_t errlen);

/* Another reference to a snapshot. */
struct upstreams *upstreams_ref(struct upstreams *u);

/* Drops one reference to a snapshot; the last frees it (and each upstream no other snapshot
 * holds). NULL is a no-op. */
void upstreams_free(struct upstreams *u);

/* The live set: the current snapshot, replaced while readers hold older ones. Takes 'first'
 * (its reference). Returns 0 or -ENOMEM / a negative errno. */
int upstream_live_new(struct upstreams *first, struct upstream_live **out);

/* A reference to the current snapshot (upstreams_free() it when done). */
struct upstreams *upstream_live_get(struct upstream_live *l);

/* Makes 'next' (its reference taken) the current snapshot; the old one is freed once its last
 * reader lets go. An upstream the new set no longer has stops counting as ejected. */
void upstream_live_swap(struct upstream_live *l, struct upstreams *next);

/* Frees the live set and its reference to the current snapshot. */
void upstream_live_free(struct upstream_live *l);

unsigned upstreams_count(const struct upstreams *u);

/* The template text of upstream i, and its "host:port" (for metrics and logs). */
const char *upstream_template(const struct upstreams *u, unsigned i);
const char *upstream_label(const struct upstreams *u, unsigned i);

/* Fills rank[0..count) with the upstream indices in the key's rendezvous order. */
void upstreams_rank(const struct upstreams *u, const char *key, size_t keylen, uint8_t *rank);

/* The upstream for attempt k (0 = first) of an id with ranking 'rank', at monotonic 'now_ms'
 * (see the policy at the top). When every upstream is ejected (only possible with
 * max_ejected_pct 100), the ranking is used as if none were. */
unsigned upstreams_pick(struct upstreams *u, const uint8_t *rank, unsigned k, int64_t now_ms);

/* Writes the URL of 'key' on upstream i into dst[0..cap) (url_build_key_into()). */
size_t upstream_url(const struct upstreams *u, unsigned i, const char *key, size_t keylen,
                    char *dst, size_t cap);

/* Reports an attempt's outcome (and, for a success, its latency) on upstream i. */
void upstream_report(struct upstreams *u, unsigned i, enum upstream_outcome o, int64_t latency_us,
                     int64_t now_ms);

/* Whether upstream i is ejected at 'now_ms' (an expired ejection ends here). */
bool upstream_ejected(struct upstreams *u, unsigned i, int64_t now_ms);

/* Counts an attempt on upstream i that ended as 'kind', and its duration. */
void upstream_count(struct upstreams *u, unsigned i, enum outcome_kind kind, int64_t us);

/* Upstream i's counters. */
const struct upstream_stats *upstream_stats(const struct upstreams *u, unsigned i);

/* Ejections of upstream i so far. */
uint64_t upstream_ejections(const struct upstreams *u, unsigned i);

/* The recent p95 of upstream i's successful attempts, microseconds; -1 until it has seen enough
 * of them (UPSTREAM_P95_MIN_SAMPLES). */
#define UPSTREAM_P95_MIN_SAMPLES 64
int64_t upstream_p95_us(const struct upstreams *u, unsigned i);

#endif
