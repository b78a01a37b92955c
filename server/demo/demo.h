/* demo: the built-in demo upstream behind `fanout --demo`, a small HTTP item service run inside
 * the fanout process on loopback, so a newcomer can try fanout without any other service.
 *
 *   GET /items/{id}  200 application/json
 *                    {"id":"<id>","name":"Item <id>","price_cents":<n>,"tags":["demo"]}
 *                    where n (100..99999) is a deterministic hash of the id.
 * {id} is everything after "/items/", URL-decoded by libmicrohttpd (so "a%2Fb" is the id "a/b");
 * it is echoed JSON-escaped (invalid UTF-8 becomes U+FFFD). Magic ids, as in the bench upstream:
 *   fail*           500 {"error":"injected failure","id":"<id>"}
 *   sleep<N>*       200 item after N ms (e.g. sleep250, sleep20-a)
 *   text*           200 text/plain "plain text for <id>"
 *   status<NNN>*    status NNN (200..599): 2xx answer the item (204/304 no body), others
 *                   {"error":"injected status","status":NNN,"id":"<id>"}
 *   drop<P>*        with probability P percent (0..100) the connection is closed without an
 *                   answer (the client sees an empty reply); otherwise the item, as usual
 *   down@<addr>*    on the demo listening on address <addr> (e.g. down@127.0.0.3-1): 503
 *                   {"error":"member down","id":"<id>"}; on any other, the item as usual (so
 *                   one member of a demo set fails, server/demo/set.h)
 * and a query ?ms=N on any id adds N ms of delay. GET /healthz and GET /readyz answer 200
 * {"status":"ok"} (probes for `fanout --demo-upstream-only` in a container). A request's total delay is capped at
 * DEMO_MAX_DELAY_MS. Any other path is 404 {"error":"not found"}, any method but GET is 405
 * {"error":"method not allowed"} (with Allow: GET); a request body is read and dropped. Requests
 * delayed when demo_stop() runs get 503 {"error":"shutting down"} and a closed connection.
 *
 * A delayed request holds no thread: its connection is suspended and resumed when a ctx deadline
 * fires; a client that closes its connection while waiting is noticed at once and counted as
 * canceled.
 *
 * Threads: libmicrohttpd's pool (DEMO_HTTP_THREADS) and one watcher thread, all started by
 * demo_start() and joined by demo_stop(); deadlines use the ctx timer thread (ctx/ctx.h). */
#ifndef FANOUT_DEMO_H
#define FANOUT_DEMO_H

#include <stddef.h>
#include <stdint.h>

/* Longest delay one request may ask for, in milliseconds. */
#define DEMO_MAX_DELAY_MS 60000

/* libmicrohttpd worker threads. */
#define DEMO_HTTP_THREADS 2

/* Connections the demo accepts at once (all workers together). */
#define DEMO_MAX_CONNECTIONS 1024

/* Idle keep-alive connections are closed after this many seconds. Longer than the longest
 * delay, so that a connection resumed after one is never taken for idle. */
#define DEMO_IDLE_TIMEOUT_S 90

struct demo;

/* Counters, each read atomically (no lock); the set is not one snapshot. */
struct demo_stats {
    uint64_t requests;  /* requests received (every method and path) */
    uint64_t in_flight; /* received and not yet completed (response sent or connection closed) */
    uint64_t sleeping;  /* delayed requests waiting now (their connections are suspended) */
    uint64_t delayed;   /* delayed requests received, in all */
    uint64_t canceled;  /* delayed requests whose client closed before the response went out */
};

/* Starts the demo on 'host' (a numeric IPv4 or IPv6 address; NULL means "127.0.0.1") and
 * 'port' (0: any free port), with its threads. On success stores the demo in *out, which the
 * caller owns and must pass to demo_stop(). Returns 0, -EINVAL for a host that is not a numeric
 * address, the bind/listen error (-EADDRINUSE, -EACCES, ...), -ENOMEM, or -EIO if
 * libmicrohttpd fails to start. Thread-safe. */
int demo_start(const char *host, uint16_t port, struct demo **out);

/* The port the demo listens on. Thread-safe. */
uint16_t demo_port(const struct demo *d);

/* Writes the URL template for fanout's --upstream, "http://<host>:<port>/items/{id}" (IPv6
 * hosts in brackets), NUL-terminated and truncated to 'size' bytes (size 0 writes nothing).
 * Thread-safe. */
void demo_url_template(const struct demo *d, char *buf, size_t size);

/* Copies the counters into *out. Lock-free; thread-safe. */
void demo_stats(const struct demo *d, struct demo_stats *out);

/* Stops the demo: delayed requests still waiting are woken at once and answered 503 (connection
 * closed; up to a second is allowed for those answers to be written), then the daemon is stopped
 * (other connections are closed), every thread joined, every socket closed and 'd' freed. Returns
 * after that, without waiting for any delay to run out. NULL is allowed. Call once, from a thread
 * that is not one of the demo's own, and before ctx_shutdown(): delays end on the ctx timer
 * thread. */
void demo_stop(struct demo *d);

#endif
