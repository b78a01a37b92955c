/* discover: the live upstream set, followed. Each upstream's name is looked up again and again,
 * and each address it resolves to (A and AAAA) is a member; the set of upstreams itself comes
 * from --upstream or from an upstreams file, read again on request (SIGHUP) and when the file
 * is replaced. Every change is a new snapshot swapped into the live set (fetch/upstream.h), so
 * requests in flight keep the members they started with.
 *
 * Lookups (every_ms apart, jittered by +-20%, on the discover thread, never on a fetch loop):
 *   - an answer: the members follow it (new ones ramp, upstream.h's slow start; gone ones get
 *     no new attempt, their attempts in flight finish);
 *   - no answer (timeout, SERVFAIL, no resolver): the last good members stay, and the lookup is
 *     tried again after a backoff from 500 ms doubling up to 30 s;
 *   - NXDOMAIN or an empty answer: the members stay for hold_ms, then the upstream is emptied
 *     (its ids fail at once with the reason).
 * An upstream whose host is an IP literal is one member and never looked up. With 'dns' off
 * (--upstream-discovery static) each name is looked up until it first answers (at start, or
 * when it enters the set), and its members are fixed from then on. At most max_members members in all: the rest are left out
 * with a warning.
 *
 * Active health checks (health_path set): every health_every_ms each member gets a GET of the
 * path, through the fetch engine, bounded by health_timeout_ms; see upstream_health() for what
 * passes and fails do. The set is then built with health gating.
 *
 * Logs: one line per member added, removed, ejected, returned, passing or failing its checks,
 * per upstreams file refused, per lookup that starts or stops failing.
 *
 * Threads: one discover thread (started by discover_new(), joined by discover_free()) does
 * the lookups, reads the file and starts the health checks; the checks' callbacks run on fetch
 * loop threads and touch only atomics of the members. discover_reload() may be called from any
 * thread (a signal-handling one). The live set is read by any thread. */
#ifndef FANOUT_UPSTREAM_DISCOVER_H
#define FANOUT_UPSTREAM_DISCOVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fetch/lookup.h"
#include "fetch/upstream.h"

struct discover;
struct fetch;
struct log;

#define DISCOVER_BACKOFF_MIN_MS 500     /* first retry of a lookup that got no answer */
#define DISCOVER_BACKOFF_MAX_MS 30000   /* its cap */
#define DISCOVER_FILE_MAX (1024 * 1024) /* an upstreams file's largest size, bytes */

struct discover_opts {
    struct upstreams_opts set;  /* the set's settings (health_gated is set from health_path) */
    bool dns;                   /* follow the names; false: look each up once */
    int64_t every_ms;           /* between lookups of a name (> 0) */
    int64_t hold_ms;            /* members kept after NXDOMAIN or an empty answer (>= 0) */
    unsigned max_members;       /* members in all (1..UPSTREAM_MEMBERS_MAX) */
    const char *file;           /* the upstreams file, or NULL: the templates given */
    int64_t file_check_ms;      /* how often the file is looked at for a replacement; 0: 1000 */
    fetch_lookup_fn lookup;     /* the name lookup; NULL: fetch_lookup_default */
    void *lookup_arg;
    const char *health_path;    /* "/path" to GET, or NULL: no health checks */
    int64_t health_every_ms;    /* between checks of a member (> 0) */
    int64_t health_timeout_ms;  /* a check's deadline (> 0) */
    unsigned healthy_after;     /* passes in a row that make a member healthy (>= 1) */
    unsigned unhealthy_after;   /* failures in a row that make it unhealthy (>= 1) */
    struct log *log;            /* where its lines go, or NULL */
    uint64_t (*jitter)(uint64_t n); /* a uniform draw in [0, n]; NULL: a per-thread generator */
};

/* Reads the upstreams (the file, or 'templates'), looks their names up once (each lookup as
 * long as the system resolver takes) and builds the first snapshot; no thread yet. A name that does not resolve leaves its upstream without members (not an error: it
 * is looked up again). Returns 0, or -EINVAL with a one-line reason in err (a template, the
 * file), or another negative errno (nothing is left running). */
int discover_new(const struct discover_opts *o, const char *const *templates, unsigned n,
                 struct discover **out, char *err, size_t errlen);

/* Starts the discover thread, and the health checks on 'fetch' (with health_path). Returns 0
 * or a negative errno. */
int discover_start(struct discover *d, struct fetch *fetch);

/* Stops and joins the thread, ends the health checks still out (waits for their callbacks).
 * The live set stays, as it is. Idempotent. */
void discover_stop(struct discover *d);

/* The live set it keeps (valid until discover_free()). */
struct upstream_live *discover_live(struct discover *d);

/* Asks for the upstreams file to be read again (SIGHUP) and every name to be looked up again
 * now. Thread-safe; returns at once. */
void discover_reload(struct discover *d);

/* Loop passes the thread has finished (each lookup round, reload and check round is one):
 * tests wait on it. */
uint64_t discover_passes(struct discover *d);

/* discover_stop(), then frees everything, the live set included. NULL is a no-op. */
void discover_free(struct discover *d);

/* Parses an upstreams file's text: one template per line, blank lines and lines starting with
 * '#' (after spaces) skipped, spaces around a template ignored. Fills out[] (pointers into
 * 'text', modified in place) with at most 'max'; returns how many, or -EINVAL with the reason
 * and the line number in err (more than 'max', a line with a space inside). */
int discover_parse_file(char *text, const char **out, unsigned max, char *err, size_t errlen);

#endif
