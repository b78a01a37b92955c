/* attempt: one key's attempts at an upstream answer, and the policy that makes them.
 *
 * A key is fetched by a series of attempts, each a GET of the key from one member of the
 * upstream set, until one decides the outcome:
 *   - the first attempt goes to the key's first member (upstream.h: its ranking, with ejected,
 *     unhealthy and overloaded members skipped); a key whose upstream has no member fails at
 *     once (attempts_start() says FETCH_EUNREACH);
 *   - a hedge: when no answer has come within the hedge delay (fixed, or the first member's
 *     recent latency at attempt_hedge_pct()), and the hedge budget has a token, one more
 *     attempt goes to the next member not tried yet (of the key's shard, with shards), and
 *     again after half the delay more, up to
 *     ATTEMPT_MAX_HEDGES (an attempt and its hedge both in the tail would otherwise hold the
 *     key for two whole delays); an empty budget ends the key's hedging. The first good answer
 *     wins, and every other attempt is aborted at once;
   - a retry: an attempt that failed with a retryable outcome (outcome.h: a transport error,
 *     502, 503 or 504), when no other attempt is pending, retries are left, the retry budget has
 *     a token and the deadline allows, is followed after a jittered exponential backoff
 *     (uniform in [0, (2^k - 1) * 25 ms], capped at 250 ms, k being the retries made plus one)
 *     by an attempt to the next member; a backoff that would end at or past the deadline is
 *     not started;
 *   - an attempt cut by its own deadline, with no other attempt out, while the owner's
 *     deadline has moved later since it started (more than 1 ms left) is followed at once by a
 *     fresh attempt with the time that is left;
 *   - anything else (a 4xx, a 500, a body too large, the deadline) is final: the latest
 *     attempt's ending is the outcome.
 * Attempts pick from the snapshot the run started with. When it has no candidate left for the
 * key (every member it had has left the set) as an attempt is due and no other is out, the run
 * moves on to the live set's current snapshot (env.live) and picks from that.
 * Each attempt's deadline is the owner's deadline when it starts (sent upstream as
 * X-Request-Timeout-Ms). Every ending of an attempt is counted in the metrics by upstream, and
 * those that say something of the upstream's health are reported to upstream.h (ejection,
 * latency). A key canceled from outside (its ctx) is decided with the cause.
 *
 * The owner embeds a struct attempts, gives it a ctx, the key and the loop to run on
 * (attempts_init()), and starts it (attempts_start()). From then on the attempts tell the owner,
 * through struct attempts_owner, once that the outcome is decided, and once, later or at once,
 * that they have wound down: every attempt and timer has called back and been counted. Nothing
 * of the attempts is in the fetch engine after that.
 *
 * Threads: attempts_start() and everything after it (fetch callbacks, timers, the owner's
 * callbacks) run on the loop thread given to attempts_init(). The owner's ctx may be canceled
 * from any thread; the owner's deadline may be raised from any thread (it is read when an
 * attempt or a backoff starts). attempts_init() and attempts_destroy() run on any one thread,
 * before the start, or after the wound-down callback (or when attempts_start() failed).
 *
 * Memory: the owner owns the struct attempts, its ctx, key and request id, which must outlive
 * the attempts' run; the attempts own the outcome's body and error text (until
 * attempts_destroy()) and the records of their attempts and timers (one of each inline, more
 * malloc'd and freed as they call back). */
#ifndef FANOUT_ATTEMPT_H
#define FANOUT_ATTEMPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fetch/upstream.h"
#include "server/batch/result.h"

struct budget;
struct ctx;
struct fetch;
struct metrics;

/* Hedges per key: each time the delay passes with no answer, one more attempt, this many at
 * most (so an attempt and its hedge both landing in the tail cannot hold a batch back). */
#define ATTEMPT_MAX_HEDGES 2

#define ATTEMPT_TRIED_MAX 8         /* members remembered as tried, per key */

#define ATTEMPT_BACKOFF_BASE_MS 25  /* the backoff's unit */
#define ATTEMPT_BACKOFF_MAX_MS 250  /* and its cap */

/* What the attempts run with: the server's, shared by every key (copied by attempts_init()). */
struct attempt_env {
    struct fetch *fetch;          /* the engine */
    struct upstreams *ups;        /* where keys are fetched from (the snapshot a run starts
                                     with) */
    struct upstream_live *live;   /* the live set, or NULL: a run with nothing out whose
                                     snapshot has no candidate left for its key moves on to
                                     the live set's current snapshot */
    struct budget *hedge_budget;  /* shared by all keys */
    struct budget *retry_budget;  /* shared by all keys */
    struct metrics *metrics;      /* fetch, hedge, retry and per-upstream counters */
    int64_t hedge_after_ms;       /* fixed hedge delay; 0: off (unless hedge_auto) */
    bool hedge_auto;              /* hedge after the first member's recent latency percentile */
    unsigned retries;             /* extra attempts after a retryable failure */
    uint64_t (*jitter)(uint64_t n); /* a uniform draw in [0, n] for the backoff; NULL: a
                                       per-thread generator (set for deterministic tests) */
};

/* How the attempts reach their owner; each is called on the attempts' loop thread. */
struct attempts_owner {
    /* The outcome is decided, once. 'o' is valid until attempts_destroy(). The attempts and
     * timers still out are being aborted. */
    void (*decided)(void *owner, const struct flight_outcome *o);
    /* Every attempt and timer has called back and been counted, once, after decided(): the last
     * call the attempts make. The owner may destroy and free them from here. */
    void (*wound_down)(void *owner);
    /* The owner's deadline now (monotonic ms, or CTX_FOREVER): the latest it has; it may only
     * move later. */
    int64_t (*deadline)(void *owner);
};

/* What one set of attempts is for. The pointers are borrowed (they must outlive the run). */
struct attempts_params {
    struct ctx *ctx;       /* the owner's: parent of every attempt and timer; the attempts cancel
                              it once decided (with -ECANCELED), which aborts the losers */
    unsigned loop;         /* the fetch loop everything runs on */
    const char *key;       /* the id's encoding, for the upstream URLs */
    size_t key_len;
    const char *rid;       /* request id sent upstream ("" for none) */
    bool hedge;            /* hedging on for this key */
    const struct attempts_owner *owner;
    void *owner_arg;       /* passed to the owner's callbacks */
};

enum attempt_timer_kind { ATTEMPT_TIMER_HEDGE, ATTEMPT_TIMER_BACKOFF };

/* One attempt: a fetch of the key from one upstream. */
struct attempt {
    struct attempts *as; /* owner */
    struct ctx *ctx;     /* child of the attempts' ctx, with the deadline of its start */
    unsigned up;         /* member index in the attempts' snapshot */
    bool hedge;          /* started by the hedge timer */
};

/* A hedge or backoff timer. */
struct attempt_timer {
    struct attempts *as;          /* owner */
    enum attempt_timer_kind kind; /* what it is for */
    unsigned gen;                 /* the attempts' timer_gen when armed */
};

/* One key's attempts (embedded in the owner; fields are the module's own). */
struct attempts {
    /* Set by attempts_init(), then read-only (but env.ups, which moves on to 'newer'): */
    struct attempt_env env;
    struct attempts_params p;
    /* The loop thread only: */
    struct upstreams *newer;   /* a snapshot taken from env.live (a reference), or NULL */
    bool decided;              /* the outcome is decided (the rest only winds down) */
    struct upstream_key key;   /* the key's hashes, for upstreams_pick() */
    uint16_t tried[ATTEMPT_TRIED_MAX]; /* members tried, oldest first (the latest ones kept) */
    unsigned ntried;
    unsigned started;          /* attempts started (the next one's number) */
    unsigned retries;          /* retries started */
    unsigned pending;          /* attempts and timers not yet called back */
    unsigned in_flight;        /* attempts not yet called back */
    unsigned hedges;           /* hedges sent (at most ATTEMPT_MAX_HEDGES) */
    int64_t hedge_ms;          /* the hedge delay in use, or -1 */
    unsigned timer_gen;        /* timers armed before the latest one are stale */
    /* One attempt and one timer live here, so that a key with no more out at once (most)
     * allocates none; further ones at the same time (a hedge, a stale hedge timer beside a
     * backoff) are malloc'd. */
    bool attempt_busy, timer_busy;
    struct attempt attempt;
    struct attempt_timer timer;
    struct flight_outcome out; /* body malloc'd; detail a static text, or 'detail' */
    char *body, *detail;       /* what of them is malloc'd, writable */
};

/* Prepares 'a' (nothing runs yet). */
void attempts_init(struct attempts *a, const struct attempt_env *env,
                   const struct attempts_params *p);

/* On the loop thread: hashes the key, deposits the first attempt in both budgets, starts the
 * first attempt and, when hedging is on, arms the hedge timer. Returns 0, and the owner hears
 * decided() and wound_down() later (never from inside this call); or an error (-ENOMEM,
 * FETCH_ESHUTDOWN, FETCH_EUNREACH when the key's upstream has no member, with the reason from
 * attempts_no_member()): nothing was started, nothing will be heard, and the outcome is the
 * owner's to decide. */
int attempts_start(struct attempts *a);

/* After attempts_start() said FETCH_EUNREACH: why the key has no member to go to (text of the
 * attempts' snapshot, valid while the owner holds it). */
const char *attempts_no_member(const struct attempts *a);

/* Frees what the attempts own (the outcome's body and text). After wound_down(), or when
 * attempts_start() failed or was never called. */
void attempts_destroy(struct attempts *a);

/* The latency percentile --hedge-after-ms auto hedges after, for a hedge budget of
 * 'budget_pct' percent: 100 - budget_pct * 2 / 5 (at least 50, at most 99). With the default 5%
 * budget that is the p98: about 2% of first attempts are hedged in steady state, so the budget
 * fills up (to what its window deposited) and has room for the bursts in which many attempts
 * pass the delay at once; at the p95 the steady state spent the whole 5% and a burst found the
 * bucket empty. */
unsigned attempt_hedge_pct(unsigned budget_pct);

/* The wait before the next hedge of a key whose hedge delay is 'delay_ms' (>= 0) and that has
 * sent 'sent' hedges: the delay before the first, half of it (at least 1 ms) before each next
 * one, -1 once ATTEMPT_MAX_HEDGES are out. */
int64_t attempt_hedge_wait(int64_t delay_ms, unsigned sent);

/* The cap of the backoff before a retry when 'made' retries have been made already:
 * (2^(made+1) - 1) * ATTEMPT_BACKOFF_BASE_MS, at most ATTEMPT_BACKOFF_MAX_MS. The wait is
 * uniform in [0, cap]. */
int64_t attempt_backoff_cap(unsigned made);

#endif
