/* fetch: HTTP GETs on libcurl's multi interface, driven by ctx.
 *
 * A fetch engine runs N loop threads, each owning one CURLM and the easy handles and connections
 * on it. Other threads hand work to a loop through its mutex-guarded inbox plus
 * curl_multi_wakeup(); transfers are started, aborted and completed only on their loop thread, so
 * no curl handle is ever touched by two threads. Callers keep all transfers of one request on one
 * loop (fetch_pick_loop() once, then that index).
 *
 * Each transfer is bound to a ctx: its deadline becomes CURLOPT_TIMEOUT_MS; its cancellation wakes
 * the loop, which removes the handle at once. Transfers of a ctx that is done before they start
 * never start. The loops start in fetch_new() and stop in fetch_free(), which aborts everything in
 * flight, calls every pending callback exactly once and joins the threads.
 *
 * Host names are resolved by fetch itself, never by curl: a fixed set of resolver threads runs
 * the lookups (shared by all loops, cached for dns_ttl_ms), a transfer waits for its answer
 * outside curl, and enters curl with the answer pinned (CURLOPT_RESOLVE). So aborting a
 * transfer while its name is being looked up (a cancel, a deadline, fetch_free()) costs the
 * loop nothing: libcurl 7.88's own threaded resolver would instead block the loop until the
 * lookup returned. A name that does not resolve is FETCH_EUNREACH.
 *
 * Besides transfers, a loop runs timers (fetch_after(), bound to a ctx) and one-shot events
 * (fetch_event_*(): the caller's memory, fired once from any thread, with no ctx), so that other
 * threads can hand work or wake a waiter on a loop thread; and it may poll one source of its own
 * (fetch_loop_source(): a descriptor and a callback, such as an HTTP server's event set), so that
 * one thread serves requests and their fetches. */
#ifndef FANOUT_FETCH_H
#define FANOUT_FETCH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fetch/lookup.h"
#include "fetch/outcome.h"

struct ctx;
struct fetch;

struct fetch_opts {
    unsigned loops;            /* loop threads (>= 1) */
    unsigned max_conns;        /* connections to upstreams, all loops together (>= loops);
                                  each loop may open max_conns / loops */
    size_t max_body;           /* default body cap per transfer, bytes (> 0) */
    size_t recv_buffer;        /* libcurl's receive buffer per transfer in flight
                                  (CURLOPT_BUFFERSIZE), bytes; 0: FETCH_RECV_BUFFER. Held by
                                  each transfer while it runs: smaller holds less memory with
                                  many in flight, larger reads big bodies in fewer calls.
                                  Clamped to FETCH_RECV_BUFFER_MIN..FETCH_RECV_BUFFER_MAX */
    int64_t connect_timeout_ms; /* connect phase cap, the name lookup included (still bounded
                                   by the ctx deadline); <= 0: only the deadline */
    bool h2c;                  /* HTTP/2 with prior knowledge over cleartext */
    int64_t idle_poll_ms;      /* longest a loop sleeps in curl_multi_poll() with nothing due
                                  (wakeups and curl's timers end it sooner); <= 0: 1000. Only
                                  a safety net: tests raise it to prove no wakeup is missed */
    unsigned resolver_threads; /* name lookups run at once, all loops together (a fixed set of
                                  threads, started by fetch_new() and joined by fetch_free());
                                  0: 2. IP literals and "localhost" need no lookup */
    int64_t dns_ttl_ms;        /* how long an answer is used before it is looked up again (the
                                  old one still serves while that runs); <= 0: 60000. A
                                  failure is kept min(this, 1000) ms */
    fetch_lookup_fn lookup;    /* the name lookup; NULL: fetch_lookup_default */
    void *lookup_arg;          /* passed to 'lookup' */
};

/* What a transfer produced, handed to its callback. */
struct fetch_result {
    int err;            /* 0, FETCH_E*, or the ctx's cause (-ETIMEDOUT, -ECANCELED, ...) */
    long status;        /* HTTP status if a response line arrived, else 0 */
    char *body;         /* malloc'd body, NUL-terminated (not counted in len); the callback owns
                           it and must free() it. Only for err 0 and FETCH_ESTATUS; NULL for
                           other errors and for an empty body */
    size_t len;         /* body length in bytes */
    int64_t elapsed_ms; /* from fetch_get() to completion, milliseconds */
    int64_t elapsed_us; /* the same in microseconds (for latency histograms) */
    bool aborted;       /* ended because its ctx was done (err is then the ctx's cause, or
                           FETCH_ESHUTDOWN), not by anything the upstream did */
    const char *detail; /* human-readable reason for err (curl's text where there is one); valid
                           only during the callback */
};

typedef void (*fetch_cb)(void *arg, struct fetch_result *r);

/* One transfer. Only 'url' and 'cb' are required; the strings are copied by fetch_get(). */
struct fetch_req {
    const char *url;        /* absolute http:// URL */
    const char *request_id; /* sent as X-Request-Id when not NULL or ""; control characters
                               (CR, LF, ...) make fetch_get() fail with -EINVAL */
    size_t max_body;        /* body cap, 0 for the engine's default */
    const char *connect_to; /* or NULL: the address to connect to instead of resolving the URL's
                               host, "IPv4:port" or "[IPv6]:port" (an upstream member); the
                               URL's host still names the request (Host, and TLS) and curl
                               keeps its connections apart by it (CURLOPT_CONNECT_TO) */
    fetch_cb cb;            /* called exactly once, on the loop thread */
    void *arg;              /* passed to cb */
};

/* Engine-wide counters; every field is a snapshot of an atomic. */
struct fetch_stats {
    uint64_t ok;          /* completed with a 2xx */
    uint64_t status;      /* FETCH_ESTATUS */
    uint64_t unreachable; /* FETCH_EUNREACH */
    uint64_t deadline;    /* -ETIMEDOUT */
    uint64_t canceled;    /* ended by its ctx for any other cause (a sibling's failure, a
                             hedge that won, a client gone), or shutdown */
    uint64_t too_large;   /* FETCH_ETOOBIG */
    uint64_t in_flight;   /* submitted and not yet completed */
    uint64_t conns_opened; /* new connections made to upstreams */
    uint64_t bytes;       /* body bytes received */
};

/* Fills 'o' with the defaults: loops = CPUs, max_conns 512, max_body 1 MiB, connect 5000 ms,
 * 2 resolver threads, DNS answers kept 60 s, the getaddrinfo() lookup. */
void fetch_opts_default(struct fetch_opts *o);

#define FETCH_RECV_BUFFER (4 * 1024)       /* default fetch_opts.recv_buffer */
#define FETCH_RECV_BUFFER_MIN 1024         /* libcurl's smallest CURLOPT_BUFFERSIZE */
#define FETCH_RECV_BUFFER_MAX (512 * 1024) /* ours: larger only holds more memory per fetch */

/* Whether this libcurl can run --h2c transfers (HTTP/2 with nghttp2, and 8.0.0 or later:
 * earlier versions break every transfer after the first on a reused h2c connection). */
bool fetch_h2c_supported(void);

/* Starts the loops. curl_global_init() must have been called. Returns 0 and the engine in *out,
 * or -EINVAL / -ENOMEM / -ENOTSUP (h2c asked for but not fetch_h2c_supported()) / another negative
 * errno (nothing is left running). */
int fetch_new(const struct fetch_opts *o, struct fetch **out);

/* Number of loops. */
unsigned fetch_loops(const struct fetch *f);

/* A loop index for a new request: the calling thread's own loop when it is one of f's (a request
 * that arrived on a loop stays there: no handoff), else round-robin. Thread-safe. */
unsigned fetch_pick_loop(struct fetch *f);

/* A descriptor a loop polls with curl's sockets, and what to run when it is ready: how a loop
 * also serves an HTTP front end's event set (libmicrohttpd's epoll descriptor), so that one
 * thread serves a request from its first byte to its answer. */
struct fetch_source {
    int fd;                           /* polled for input */
    void (*run)(void *arg);           /* on the loop thread, when fd is readable, when the
                                         timeout it asked for has passed, or first thing after
                                         it is set */
    int64_t (*timeout_ms)(void *arg); /* on the loop thread before each sleep: ms until run()
                                         is due anyway, or -1 for none; may be NULL */
    void *arg;
};

/* Sets loop 'loop''s source to a copy of *src, or clears it (src NULL). Returns 0 once the loop
 * runs with it: from then on the previous source's callbacks are not running and are never
 * called again. Returns FETCH_ESHUTDOWN when fetch_free() has begun, -EINVAL for a loop index
 * out of range or a call from one of f's loop threads (it waits for the loop). Thread-safe. */
int fetch_loop_source(struct fetch *f, unsigned loop, const struct fetch_source *src);

/* On one of f's loop threads that has a source: its run() is due before the loop sleeps again
 * (the source has work its descriptor does not show, such as a connection resumed on this
 * thread). Elsewhere a no-op. */
void fetch_source_kick(struct fetch *f);

/* Queues a GET on loop 'loop' bound to 'c' (the engine takes its own ctx reference). Returns 0, in
 * which case r->cb is called exactly once with the outcome, on that loop's thread (never from
 * inside fetch_get()); or a negative code (-EINVAL, -ENOMEM, FETCH_ESHUTDOWN) and the callback is
 * never called. Thread-safe; may be called from a fetch callback (FETCH_ESHUTDOWN once
 * fetch_free() has begun). Each loop keeps at most max_conns / loops transfers in curl at once
 * (h2c: 100 times that) and queues the rest in order; the deadline runs while they wait. */
int fetch_get(struct fetch *f, unsigned loop, struct ctx *c, const struct fetch_req *r);

/* A timer on loop 'loop': cb(arg, r) runs once on that loop's thread, with r->err 0 once
 * 'delay_ms' (>= 0) has passed, or earlier with the cause when 'c' is done first (r->aborted
 * set), or FETCH_ESHUTDOWN when the engine stops. Only err, aborted and elapsed are filled.
 * With delay 0 and ctx_background() it runs 'cb' on the loop thread soon: a way to hand work to
 * a loop. Returns 0, or -EINVAL / -ENOMEM / FETCH_ESHUTDOWN and cb is never called. Timers are
 * not counted in fetch_stats. Thread-safe, and callable from a fetch callback. */
int fetch_after(struct fetch *f, unsigned loop, struct ctx *c, int64_t delay_ms, fetch_cb cb,
                void *arg);

/* A one-shot event's callback: runs once, on the event's loop thread, with the cause of the fire
 * that won (or FETCH_ESHUTDOWN). It may free or re-arm the event. */
typedef void (*fetch_event_cb)(void *arg, int cause);

/* A one-shot event on a loop: lets any thread run a callback once on a loop thread, such as a
 * waiter woken by whoever has its answer, with no allocation and no ctx. The caller embeds it;
 * its fields are private (fetch_event_init() sets them). */
struct fetch_event {
    struct fetch_event *_next, *_prev; /* on its loop's armed or fired list; under its mutex */
    fetch_event_cb _cb;                /* the callback and its argument */
    void *_arg;
    unsigned _loop;                    /* the loop's index */
    atomic_int _state;                 /* armed, or fired (by a fire or by the engine) */
    int _cause;                        /* the cause the callback gets */
};

/* Arms 'ev' on loop 'loop': cb(arg, cause) will run exactly once on that loop's thread, with the
 * cause of the first fetch_event_fire() on it, or with FETCH_ESHUTDOWN if fetch_free() comes
 * first (fetch_free() runs it before it returns). 'ev' is the caller's memory: it must stay valid
 * until cb has begun and no fetch_event_fire() on it can still be running; cb may free it or arm
 * it again (a fire still running then may win the new arming). Returns 0, or -EINVAL / FETCH_ESHUTDOWN (fetch_free() has begun) and cb is never
 * called. Thread-safe, and callable from a fetch callback or an event's callback. */
int fetch_event_init(struct fetch *f, unsigned loop, struct fetch_event *ev, fetch_event_cb cb,
                     void *arg);

/* Fires 'ev' (armed on 'f' by fetch_event_init()) with 'cause' (any value; FETCH_ESHUTDOWN is
 * what the engine uses). The first fire wins: it returns true and the callback will run with
 * 'cause' on the event's loop thread, never from inside this call. Any later fire, or one after
 * fetch_free() has ended the event, returns false and does nothing. Callable from any thread,
 * from callbacks and ctx hooks, and while fetch_free() runs (a fire that wins keeps its cause:
 * fetch_free() waits for it to be queued); a losing fire reads nothing but 'ev'. */
bool fetch_event_fire(struct fetch *f, struct fetch_event *ev, int cause);

/* Reads the counters. Thread-safe and lock-free. */
void fetch_stats(struct fetch *f, struct fetch_stats *s);

/* Aborts all transfers (callbacks get FETCH_ESHUTDOWN unless their ctx was already done), ends
 * every event still armed (FETCH_ESHUTDOWN; one already fired gets its fire's cause), joins the
 * loops and the resolver threads and frees the engine. Every callback has run before it waits
 * for the resolver, which finishes the lookups still running (a lookup cannot be
 * interrupted: it is bounded by the system resolver's timeouts, resolv.conf "timeout" and
 * "attempts"); queued ones are dropped. Must not be called from a fetch callback. */
void fetch_free(struct fetch *f);

#endif
