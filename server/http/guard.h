/* guard: per-connection time limits and lingering closes for the HTTP front end.
 *
 * Every client connection is registered when libmicrohttpd accepts it and dropped when it
 * closes. One thread (started by guard_new) does two things for all of them:
 * - Deadlines. A request's header section must be complete within header_timeout_ms of its
 *   first byte (the kernel's count of bytes received tells when a waiting connection got one,
 *   so an idle keep-alive connection is left to the idle timeout), and its body within
 *   body_timeout_ms of the end of its headers. A request that misses one is answered 408
 *   directly on the socket (libmicrohttpd has written nothing for it yet) and the socket is
 *   shut down, so libmicrohttpd closes the connection.
 * - Lingering closes. A connection closed after an early answer (an error sent before the
 *   request was read to its end), or with request bytes still unread, is not closed at once:
 *   a duplicate of its descriptor outlives libmicrohttpd's close, its sending side is shut
 *   (the client sees the answer, then the end), and what the client still sends is read and
 *   dropped until it closes, linger_ms pass or linger_bytes arrive. A write-first client (one
 *   that sends its whole body before reading) then reads the answer instead of a reset.
 *
 * THREADS: guard_conn_* calls come from libmicrohttpd's workers; the guard thread runs the
 * deadlines and the lingering sockets. One mutex guards the registry; a descriptor is used by
 * the guard thread only under it, and guard_conn_close() (called by libmicrohttpd before it
 * closes the descriptor) unregisters under it, so a descriptor is never used after its close.
 * A request's phase is an atomic that both sides change by compare-and-swap: whichever moves
 * it first (the worker to "headers done", or the guard to "timed out") wins. */
#ifndef FANOUT_GUARD_H
#define FANOUT_GUARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct guard;
struct guard_conn;
struct sockaddr;

struct guard_opts {
    int64_t header_timeout_ms; /* first byte to end of headers; 0: none */
    int64_t body_timeout_ms;   /* end of headers to end of body; 0: none */
    int64_t linger_ms;         /* longest lingering close; 0: no lingering */
    size_t linger_bytes;       /* most bytes read and dropped while lingering */
    unsigned max_lingering;    /* lingering sockets at once; more close at once */
    unsigned max_per_ip;       /* connections open from one address at once; 0: no limit */
    /* Called on the guard thread, under no lock, for each request answered 408: 'in_body' tells
     * which deadline; 'request_id' is the id the answer carries. May be NULL. */
    void (*on_timeout)(void *arg, bool in_body, const char *request_id);
    /* Writes a fresh request id (at most 128 characters) into 'out'. Thread-safe. */
    void (*new_id)(void *arg, char *out);
    void *arg;
};

/* Starts the guard thread. Returns 0 and the guard, or a negative errno. */
int guard_new(const struct guard_opts *o, struct guard **out);

/* Closes every lingering socket, stops and joins the thread, frees. After libmicrohttpd has
 * stopped (no connection is registered any more). NULL is a no-op. */
void guard_free(struct guard *g);

/* A connection from 'peer' (its address, or NULL) was accepted on 'fd'
 * (MHD_CONNECTION_NOTIFY_STARTED). Returns its record, or NULL when out of memory (the
 * connection then runs without deadlines). */
struct guard_conn *guard_conn_open(struct guard *g, int fd, const struct sockaddr *peer);

/* The connection of 'c' would pass max_per_ip: close it unanswered. It is not counted. */
bool guard_conn_refused(const struct guard_conn *c);

/* The connection is about to be closed (MHD_CONNECTION_NOTIFY_CLOSED; its descriptor is still
 * open): unregisters and frees 'c', and lingers when it was asked to or bytes are unread. */
void guard_conn_close(struct guard *g, struct guard_conn *c);

/* The current request's headers are in (its first handler call). Returns false when its
 * deadline passed first (it was answered 408: close the connection). */
bool guard_headers_done(struct guard_conn *c);

/* The current request's body is in (its last upload call). Returns false when its deadline
 * passed first (answered 408: close). */
bool guard_body_done(struct guard_conn *c);

/* The current request is finished: the connection waits for the next one. */
void guard_request_done(struct guard_conn *c);

/* Asks for a lingering close whenever this connection closes (after an early answer). */
void guard_linger(struct guard_conn *c);

/* True when the guard answered the current request 408 (the connection is closing). */
bool guard_timed_out(const struct guard_conn *c);

/* Writes a whole HTTP/1.1 answer (status line, Content-Type: application/json, Content-Length,
 * X-Request-Id, Connection: close, then the JSON error document) straight to the socket 'fd',
 * for an answer libmicrohttpd cannot queue at this point (in the middle of a body). Returns
 * true when it was all written. */
bool guard_answer(int fd, unsigned status, const char *code, const char *message,
                  const char *request_id);

#endif
