/* srv: the fanout HTTP server: libmicrohttpd front end, batch fan-out, probes and metrics.
 *
 * srv_new() starts every thread the server will ever have: the fetch loops (--fetch-threads),
 * which with --loop-model shared also run one libmicrohttpd daemon each (split: the
 * libmicrohttpd workers of --http-threads besides), their two resolver threads, the
 * disconnect watch, the connection guard, the log writer, the ctx timer and, with --demo, the
 * demo upstream. srv_drain() and srv_free() stop them; nothing
 * is started per request or per fetch.
 *
 * The HTTP wing (server/http/) is this server's front end:
 *   srv.c       lifecycle: srv_new()'s steps, the listener and daemon, the drain, srv_free()
 *   conn.c      the request machine: headers, body, routes, answers, completion, access log
 *   admit.c/h   admission, the in-flight counts, every refusal "overloaded" (counted once)
 *   stream.c/h  NDJSON answers (Accept: application/x-ndjson) and their lock order
 *   srv_impl.h  what those four share: struct srv, struct req, conn.c's functions
 *   guard.c/h   header and body deadlines, lingering closes
 *   framing.c/h the verdict on a request's framing (RFC 9112)
 *   watch.c/h   notices clients that leave while their connection is suspended */
#ifndef FANOUT_SRV_H
#define FANOUT_SRV_H

#include <stdint.h>

#include "fetch/lookup.h"
#include "server/config.h"

struct srv;

/* What a test may put in place of the real thing (zero: the real thing). */
struct srv_seams {
    fetch_lookup_fn lookup;  /* how upstream names are looked up (discovery); with --demo it
                                also replaces the demo's own (demo_set_lookup()) */
    void *lookup_arg;
    int64_t file_check_ms;   /* how often the upstreams file is looked at; 0: 1000 */
};

/* Starts a server for 'cfg' (copied). Logs go to 'log_fd' (stderr in main). Returns 0 and the
 * server, or a negative errno with a one-line reason in err. curl_global_init() must have been
 * called and SIGPIPE ignored. */
int srv_new(const struct srv_config *cfg, int log_fd, struct srv **out, char *err, size_t errlen);

/* srv_new() with seams (NULL: none). */
int srv_new_seams(const struct srv_config *cfg, int log_fd, const struct srv_seams *seams,
                  struct srv **out, char *err, size_t errlen);

/* SIGHUP: the upstreams file is read again and every upstream name looked up again, now.
 * Thread-safe; returns at once. */
void srv_reload(struct srv *s);

/* Passes of the discover thread so far (tests wait on it). */
uint64_t srv_discover_passes(struct srv *s);

/* With --demo: demo member i (0..--demo-members - 1, server/demo/set.h), else NULL. */
struct demo;
struct demo *srv_demo_member(struct srv *s, unsigned i);

/* The bound port (useful with --listen HOST:0). */
uint16_t srv_port(const struct srv *s);

/* Graceful drain: /readyz turns 503, the listener closes, batches in flight get until
 * 'drain_ms' to finish; those still running are then canceled and answered 503. Returns when
 * every admitted request has been answered (or a short grace after that has passed). */
void srv_drain(struct srv *s, int64_t drain_ms);

/* The pieces of srv_drain(), for a caller that must stay responsive while it waits (main
 * watches for a second signal): start draining; batches admitted and not yet answered (the
 * fanout_requests_in_flight gauge); cancel them all. */
void srv_drain_start(struct srv *s);
int64_t srv_in_flight(struct srv *s);
void srv_cancel_all(struct srv *s);

/* Batches admitted and not yet completed (their answer sent, or the connection closed). */
int64_t srv_active(struct srv *s);

/* Stops (draining with --drain-ms first if srv_drain was not called), joins every thread and
 * frees everything; returns 0. If batches are still running after the drain and their cancel
 * (which would mean a bug), stopping is unsafe: it logs why, writes out the log and returns
 * -EBUSY with everything left running, and the caller should exit the process. */
int srv_free(struct srv *s);

#endif
