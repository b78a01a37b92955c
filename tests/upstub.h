/* upstub: an in-process HTTP/1.1 upstream for tests and benchmarks.
 *
 * A raw-socket server on 127.0.0.1, port 0 (the kernel picks; see upstub_port()), or on a given
 * IPv4 address and port (upstub_new_at()), run by a fixed
 * number of event-loop threads started by upstub_new() and joined by upstub_free(). Keep-alive is
 * supported (HTTP/1.1 default; "Connection: close" and HTTP/1.0 close after the response).
 *
 * What a request gets depends on the last segment of its path (after the final '/', before any
 * '?'), matched by prefix; <N> is a decimal number right after the prefix:
 *   status<NNN>*  status NNN with the body {"status":NNN}
 *   fail*         500 with {"error":"fail"}
 *   sleep<N>*     200 with the default body after N ms (a timer in the event loop; no thread
 *                 sleeps, and a client that goes away meanwhile is noticed at once)
 *   text*         200 text/plain "text"
 *   big<N>*       200 with an N-byte body of 'x', written as the socket accepts it, so a client
 *                 that aborts early stops the stub early (see bytes_sent)
 *   stream<N>*    like big<N> but without Content-Length: the body ends when the stub closes
 *   reset*        headers announcing 100000 bytes, 1000 of them, then an RST (SO_LINGER 0)
 *   empty*        the connection is closed without any reply
 *   close*        200 with the default body and "Connection: close", then a normal close
 *   redirect<NNN>* status NNN (300-399, else 302) with "Location: /items/redirect-target" and
 *                 the body {"moved":true}
 *   fault-<name>  a misbehaving upstream, exactly <name> (anything else: 404):
 *     rst-now          an RST before any byte of the reply
 *     rst-head         headers announcing 100 bytes, then an RST before the body
 *     rst-chunk        a chunked body cut by an RST after its first chunk
 *     silent           the request is read and never answered (the connection stays open)
 *     body-forever     200, chunked, a 4-byte chunk every 20 ms, never a last chunk
 *     headers-forever  a status line, then a header line every 20 ms, never the blank line
 *     trickle          a whole 13-byte-body response at 1 byte per second (about 80 s)
 *     status-garbage   "garbage" where the status line belongs (an HTTP/0.9 reply)
 *     status-letters   "HTTP/1.1 abc OK"
 *     status-long      "HTTP/1.1 2000 OK"
 *     status-version   "HTTP/7.3 200 OK"
 *     status-empty     an empty line where the status line belongs
 *     cl-long-close    Content-Length 100, 5 body bytes, then a normal close
 *     cl-long-hang     Content-Length 100, 5 body bytes, then silence (connection open)
 *     cl-short         Content-Length 5 followed by 5 bytes and then a whole second response
 *     chunk-bad-size   a chunk size that is not hex ("zz")
 *     chunk-overrun    a chunk holding more bytes than its size says
 *     chunk-cut        a close in the middle of a chunk
 *     chunk-no-end     a close after a complete chunk, before the last (zero) chunk
 *   Those that end "open" never complete: they stay in_flight until the client closes (then
 *   they count as canceled).
 *   anything else 200 application/json {"id":"<segment, percent-decoded, JSON-escaped>"}
 * One whole path may be given a status of its own, changed at any time (upstub_set_path_status():
 * a health path that fails, then passes).
 * New behaviours are one entry in the route table at the top of upstub.c.
 *
 * Every function is thread-safe. */
#ifndef FANOUT_TESTS_UPSTUB_H
#define FANOUT_TESTS_UPSTUB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct upstub;

/* Counters since upstub_new(); each field is a snapshot of an atomic. */
struct upstub_stats {
    uint64_t requests;      /* requests received (request line and headers parsed) */
    uint64_t in_flight;     /* requests received whose response is not complete yet */
    uint64_t max_in_flight; /* the most requests in flight at once */
    uint64_t accepted;      /* connections accepted */
    uint64_t open;          /* connections open now */
    uint64_t max_open;      /* the most connections open at once */
    uint64_t canceled;      /* requests whose client closed before the response was complete */
    uint64_t bytes_sent;    /* bytes written to clients (headers and bodies) */
};

#define UPSTUB_TARGET_MAX 512 /* longer request-targets are logged truncated */
#define UPSTUB_HEADER_MAX 128 /* longer logged header values are truncated */
#define UPSTUB_LOG_SIZE 2048  /* the log keeps this many most recent requests */

/* One logged request. Strings are NUL-terminated copies. */
struct upstub_req {
    char target[UPSTUB_TARGET_MAX];     /* request-target exactly as on the request line */
    char request_id[UPSTUB_HEADER_MAX]; /* X-Request-Id value, "" when absent */
    char timeout_ms[UPSTUB_HEADER_MAX]; /* X-Request-Timeout-Ms value, "" when absent */
    bool has_request_id;                /* the X-Request-Id header was present */
    bool has_timeout_ms;                /* the X-Request-Timeout-Ms header was present */
};

/* Starts a stub with 'threads' event loops (0 means 1) listening on 127.0.0.1 at a free port.
 * Returns 0 and the stub in *out, or a negative errno (nothing left running). */
int upstub_new(unsigned threads, struct upstub **out);

/* upstub_new() listening on the IPv4 address 'addr' and 'port' (0: a free one). Linux answers
 * on every address of 127.0.0.0/8, so stubs on 127.0.0.2 and 127.0.0.3 with one port are two
 * addresses of one upstream. Returns -EADDRINUSE when that address and port are taken. */
int upstub_new_at(unsigned threads, const char *addr, int port, struct upstub **out);

/* From now on a request whose target (before any '?') is exactly 'path' gets 'status' with the
 * body {"status":N}, whatever its last segment says; status 0 (or path NULL) ends that. */
void upstub_set_path_status(struct upstub *s, const char *path, int status);

/* Runs a stub with 'threads' loops in a forked child, so that the parent's CPU counters measure
 * a client alone. Call it before the parent starts any thread. Returns the child's pid, its port
 * in *port and in *ctl the pipe end whose close() stops the child (then waitpid() it), or -1. */
pid_t upstub_spawn(unsigned threads, int *port, int *ctl);

/* Stops the loops, closes every connection and the listener, joins the threads and frees. */
void upstub_free(struct upstub *s);

/* The TCP port the stub listens on. */
int upstub_port(const struct upstub *s);

/* Writes "http://<address>:<port>" (127.0.0.1 unless upstub_new_at() said) followed by 'path' (e.g. "/items/{id}", copied verbatim) into
 * buf. Returns the length written, or -ENOSPC if it does not fit in 'size' (buf then holds a
 * truncated, NUL-terminated string when size > 0). */
int upstub_url(const struct upstub *s, char *buf, size_t size, const char *path);

/* Reads the counters. */
void upstub_stats(struct upstub *s, struct upstub_stats *st);

/* Copies up to 'max' of the most recently logged requests into out[], oldest first. Returns how
 * many were copied. */
size_t upstub_log(struct upstub *s, struct upstub_req *out, size_t max);

/* Finds the most recent logged request whose target equals 'target'; copies it into *out (when
 * not NULL) and returns true, or returns false. */
bool upstub_find(struct upstub *s, const char *target, struct upstub_req *out);

/* Counts the logged requests whose target equals 'target' (only the last UPSTUB_LOG_SIZE
 * requests are logged; use upstub_stats() for totals). */
size_t upstub_count(struct upstub *s, const char *target);

/* One field of the stub's totals by its offset in struct upstub_stats, and a wait for it to
 * reach 'n' within 'ms' (returns whether it did); UPSTUB_STAT and UPSTUB_WAIT name the field. */
uint64_t upstub_stat(struct upstub *s, size_t off);
bool upstub_wait_stat(struct upstub *s, size_t off, uint64_t n, int64_t ms);
#define UPSTUB_STAT(s, field) upstub_stat(s, offsetof(struct upstub_stats, field))
#define UPSTUB_WAIT(s, field, n, ms) upstub_wait_stat(s, offsetof(struct upstub_stats, field), n, ms)

/* Starts 'n' stubs (one loop each) into stub[0..n) and writes their templates,
 * "<stub i's origin>/items/<prefix[i]>{id}" (prefix or prefix[i] may be NULL for none), into
 * tmpl[i] (UPSTUB_TMPL_MAX bytes each). Returns false if one could not start (those started
 * are in stub[], for upstub_free()). */
#define UPSTUB_TMPL_MAX 256
bool upstub_start_set(unsigned n, const char *const *prefix, struct upstub **stub,
                      char (*tmpl)[UPSTUB_TMPL_MAX]);

#endif
