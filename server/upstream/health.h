/* health: active health checks of an upstream set's members.
 *
 * A round GETs the health path of every member of a snapshot at once, through the fetch engine
 * (connected to the member's address, Host the upstream's), each bounded by the timeout. A 2xx
 * passes; anything else (a status, a transport error, the timeout) fails. Each result goes to
 * upstream_health(), and a member that turns healthy or unhealthy gets a log line. A round
 * starts only once the previous one has called back, so a slow member never piles checks up.
 *
 * Threads: health_round() on one thread (the discover thread); the checks' callbacks on fetch
 * loop threads (they touch the members' atomics, the log and this module's mutex);
 * health_free() from the thread that made it, after the discover thread has stopped. */
#ifndef FANOUT_UPSTREAM_HEALTH_H
#define FANOUT_UPSTREAM_HEALTH_H

#include <stdint.h>

struct fetch;
struct health;
struct log;
struct upstreams;

struct health_opts {
    struct fetch *fetch;      /* the engine the checks run on */
    const char *path;         /* "/path" (copied) */
    int64_t timeout_ms;       /* a check's deadline (> 0) */
    unsigned healthy_after;   /* passes in a row that make a member healthy again */
    unsigned unhealthy_after; /* failures in a row that make it unhealthy */
    struct log *log;          /* or NULL */
};

/* Returns 0 and the checker, -EINVAL (a path not starting with '/', or with a space or a
 * control character) or -ENOMEM. */
int health_new(const struct health_opts *o, struct health **out);

/* Starts a check of every member of 'snap' (each holds a reference to it) unless the last
 * round still has checks out. Returns how many started. */
unsigned health_round(struct health *h, struct upstreams *snap);

/* Rounds whose every check has called back (tests wait on it). */
uint64_t health_rounds_done(struct health *h);

/* Cancels the checks still out, waits for their callbacks, frees. NULL is a no-op. */
void health_free(struct health *h);

#endif
