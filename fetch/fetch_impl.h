/* fetch_impl: the engine's private structures and the calls between its files.
 *
 * The engine (fetch.h) is one module in several files, each holding one part of a loop's work:
 *   fetch.c      the public API: fetch_new(), fetch_free(), fetch_get(), the counters
 *   loop.c       the loop thread: its pass, the inbox, wakeups, the lists of canceled transfers,
 *                the ctx hook, shutdown
 *   xfer.c       one transfer in curl: easy handles and options, curl's callbacks, start,
 *                completion
 *   resolving.c  transfers waiting for the resolver before they enter curl
 *   timer.c      fetch_after(): the timer heap
 *   event.c      fetch_event_*(): one-shot events fired from any thread
 * Everything here is for those files only; names shared between them take "fetch__".
 *
 * Threads: a loop's fields are the loop thread's unless a comment names 'mu'. A transfer belongs
 * to the thread that made it until it is handed to the loop (fetch__loop_hand()), then to the
 * loop thread alone, which frees it after its callback. */
#ifndef FANOUT_FETCH_IMPL_H
#define FANOUT_FETCH_IMPL_H

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/resolve.h"

#define FETCH__POLL_MS 1000            /* default idle_poll_ms */
#define FETCH__H2_STREAMS_PER_CONN 100 /* curl's default CURLMOPT_MAX_CONCURRENT_STREAMS */

/* Where a transfer or timer is, for its loop (loop thread only; 0 while on the inbox). */
enum xfer_where {
    XFER_INBOX = 0, /* handed over, not admitted yet: admit() checks its ctx */
    XFER_WAITING,   /* on 'waiting' */
    XFER_RESOLVING, /* on 'resolving' */
    XFER_ACTIVE,    /* in the multi, on 'active' */
    XFER_TIMER,     /* in the timer heap at 'heap_idx' */
};

/* Which list of canceled transfers holds it (see fetch__xfer_hook()). */
enum xfer_canceled {
    CANCELED_NONE = 0, /* none */
    CANCELED_SHARED,   /* the loop's 'canceled'; guarded by the loop's mu */
    CANCELED_OWN,      /* the loop's 'canceled_own'; loop thread only */
};

/* One transfer, or one fetch_after() timer, from its call to its callback. */
struct xfer {
    struct xfer *next, *prev;   /* on the inbox, the waiting or resolving FIFO or 'active' */
    struct xfer *cnext, *cprev; /* on one of its loop's lists of canceled transfers */
    struct fetch_loop *loop;    /* the loop it runs on */
    atomic_bool handed;         /* on the loop's inbox (or past it): its hook may queue it */
    unsigned char where;        /* enum xfer_where; loop thread only */
    unsigned char canceled;     /* enum xfer_canceled; written under the loop's mu when shared */
    bool timer;                 /* a fetch_after() timer, not a transfer */
    struct ctx *ctx;            /* our reference on the caller's ctx */
    struct ctx_hook hook;       /* queues it as canceled when ctx is done; armed until the end */
    fetch_cb cb;                /* the caller's callback and its argument */
    void *arg;
    int64_t t0_us;              /* monotonic microseconds at fetch_get() / fetch_after() */
    int64_t due_us;             /* timers: when it fires (monotonic microseconds) */
    size_t heap_idx;            /* timers: position in the loop's heap */
    /* Transfers only: */
    size_t max_body;              /* body cap in bytes */
    CURL *easy;                   /* the easy handle while started, else NULL */
    struct curl_slist *hdrs;      /* extra request headers while started: 'hdr' nodes */
    struct curl_slist hdr[2];     /* their nodes (curl only reads the list; no allocation) */
    char timeout_line[48];        /* "X-Request-Timeout-Ms: N" */
    struct curl_slist *pin;       /* CURLOPT_RESOLVE entry for a host name while started */
    struct curl_slist connect_to; /* CURLOPT_CONNECT_TO node ("::addr:port" in 'strings') when
                                     its data is not NULL; then no lookup is made */
    struct fetch__dns *dns;       /* the resolver entry held while on 'resolving' */
    int64_t resolve_t0_us;        /* when it first waited for the resolver, or 0 */
    char *body;                   /* received body (NUL-terminated room kept), or NULL */
    size_t len, cap;              /* body length and allocation */
    uint64_t received;            /* body bytes curl delivered, kept or not */
    bool too_big;                 /* the write callback refused data past the cap */
    bool bad_status;              /* the header callback refused a malformed status line */
    bool in_headers;              /* the next header line starts a response (status line) */
    const char *url;              /* points into 'strings' */
    char *request_id;             /* "X-Request-Id: <id>" in 'strings', or NULL */
    char errbuf[CURL_ERROR_SIZE]; /* curl's error text (CURLOPT_ERRORBUFFER) */
    char strings[];               /* the URL, the request id, the connect-to entry */
};

/* A FIFO of transfers, doubly linked through 'next' and 'prev'. */
struct xfer_queue {
    struct xfer *head, *tail;
};

/* A list of canceled transfers, doubly linked through 'cnext' and 'cprev'. */
struct xfer_canceled_list {
    struct xfer *head, *tail;
};

/* Events (event.c): armed ones doubly linked, fired ones a FIFO, through _next and _prev. */
struct fetch__event_list {
    struct fetch_event *head, *tail;
};

struct fetch_loop {
    struct fetch *f;  /* the engine */
    pthread_t thread; /* the loop thread */
    bool started;     /* thread created (for unwinding and joining) */
    CURLM *multi;     /* used only by the loop thread; freed by fetch_free() after the join */
    pthread_mutex_t mu;      /* guards what says so below */
    pthread_cond_t events_cv; /* a fire that raced with shutdown has queued its event; mu */
    struct xfer_queue inbox; /* handed over by fetch_get() and fetch_after(); mu */
    struct xfer_canceled_list canceled; /* ctx done, queued by hooks on other threads; mu */
    struct fetch__event_list armed;     /* events not fired yet; mu */
    struct fetch__event_list fired;     /* events fired, callbacks not run yet; mu */
    bool stopping;           /* fetch_free() began; mu */
    bool dns_ready;          /* the resolver answered some lookup; mu */
    struct fetch_source src_asked; /* the source fetch_loop_source() asked for (fd -1: none); mu */
    uint64_t src_gen, src_taken;   /* requests made and taken by the loop; mu */
    pthread_cond_t src_cv;   /* signalled when the loop has taken a source request; mu */
    /* Loop thread only: */
    struct xfer_queue waiting;   /* admitted, not started: FIFO */
    struct xfer_queue resolving; /* waiting for the resolver, outside curl: FIFO */
    char origin[320];            /* "scheme://authority" of the last URL whose host was parsed */
    size_t origin_len;           /* its length (0: none) */
    char origin_host[256];       /* that URL's host, as curl looks it up */
    long origin_port;            /* and port */
    bool origin_literal;         /* the host needs no lookup (fetch__host_is_literal) */
    struct xfer_canceled_list canceled_own; /* ctx done: queued by hooks on this thread, and
                                               'canceled' once taken */
    /* Set by the loop's own callbacks instead of a wakeup (kept away from the fields under mu:
     * a combined load of neighbouring bytes would race with their writers): */
    bool self_inbox;            /* work was queued or an event fired: another pass first */
    struct fetch_source src;    /* the source polled with curl's sockets (fd -1: none) */
    bool src_due;               /* its run() is due before the loop sleeps again */
    struct xfer *active;        /* started (in the multi): doubly linked */
    unsigned nactive;           /* length of 'active' */
    unsigned limit;             /* most transfers in the multi at once */
    int poll_ms;                /* curl_multi_poll() cap (fetch_opts.idle_poll_ms) */
    struct xfer **timers;       /* armed fetch_after() timers: a min-heap on due_us */
    size_t ntimers, timers_cap; /* count and allocation */
    CURL **spare;               /* configured easy handles not in use */
    unsigned nspare, spare_cap; /* count and allocation */
};

struct fetch {
    struct fetch_opts opts;   /* as given (validated) */
    unsigned nloops;          /* loops in 'loops' that were initialised */
    struct fetch_loop *loops; /* the loops */
    atomic_uint next_loop;    /* round-robin for fetch_pick_loop() */
    atomic_bool stopping;     /* fetch_free() began (fast path; the loop's flag decides) */
    bool proxy_env;           /* a proxy variable is set: curl reads them for each transfer */
    struct fetch_resolver *resolver; /* host name lookups for all loops */
    atomic_uint_fast64_t outcomes[OUTCOME_KINDS]; /* transfers ended, by kind (outcome.h) */
    atomic_uint_fast64_t in_flight, conns_opened, bytes; /* see struct fetch_stats */
};

static inline int64_t fetch__now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---------------------------------------------------------------- queues (loop thread) */

static inline void fetch__queue_push(struct xfer_queue *q, struct xfer *x)
{
    x->next = NULL;
    x->prev = q->tail;
    if (q->tail)
        q->tail->next = x;
    else
        q->head = x;
    q->tail = x;
}

static inline void fetch__queue_del(struct xfer_queue *q, struct xfer *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        q->head = x->next;
    if (x->next)
        x->next->prev = x->prev;
    else
        q->tail = x->prev;
    x->next = x->prev = NULL;
}

static inline struct xfer *fetch__queue_pop(struct xfer_queue *q)
{
    struct xfer *x = q->head;
    if (x)
        fetch__queue_del(q, x);
    return x;
}

/* Moves all of 'src' before the head of 'dst', in order. */
static inline void fetch__queue_prepend(struct xfer_queue *dst, struct xfer_queue *src)
{
    if (!src->head)
        return;
    src->tail->next = dst->head;
    if (dst->head)
        dst->head->prev = src->tail;
    else
        dst->tail = src->tail;
    dst->head = src->head;
    src->head = src->tail = NULL;
}

/* ---------------------------------------------------------------- loop.c */

/* Initialises loop 'l' of 'f' (not its thread); 'cap' is its share of max_conns. Returns 0 or
 * a negative errno, with nothing left to destroy. */
int fetch__loop_init(struct fetch *f, struct fetch_loop *l, unsigned cap);

/* Frees what fetch__loop_init() made, after the thread (if any) was joined. */
void fetch__loop_destroy(struct fetch_loop *l);

/* The loop thread's body (pthread_create() argument: the loop). */
void *fetch__loop_main(void *arg);

/* Tells the loop to stop (fetch_free()): it completes everything and exits. */
void fetch__loop_stop(struct fetch_loop *l);

/* Whether the calling thread is l's loop thread. */
bool fetch__on_loop(const struct fetch_loop *l);

/* The calling thread's loop when it is one of f's, else NULL. */
struct fetch_loop *fetch__current(const struct fetch *f);

/* Arms x's ctx hook and hands 'x' (new, x->loop set) to its loop. Returns 0, or FETCH_ESHUTDOWN
 * when the loop is stopping: then 'x' is the caller's again, its hook disarmed. Any thread. */
int fetch__loop_hand(struct fetch_loop *l, struct xfer *x);

/* The resolver's notify (arg: the engine): some lookup ended; every loop looks again. */
void fetch__dns_ready(void *arg);

/* After ctx_hook_remove() on the loop thread: takes 'x' off the list of canceled transfers its
 * hook put it on, if any, so that it can be freed (it may have ended on its own meanwhile). The
 * hook cannot run any more, so x->canceled is stable: a hook that ran on another thread wrote it
 * before ctx_hook_remove() returned. */
void fetch__canceled_forget(struct fetch_loop *l, struct xfer *x);

/* ---------------------------------------------------------------- xfer.c (loop thread) */

/* Puts 'x' into the multi, or completes it if it must not start (its ctx done, a name that
 * does not resolve), or leaves it waiting for the resolver. */
void fetch__start(struct fetch_loop *l, struct xfer *x);

/* Completes 'x' with 'err' for a reason of its own (its easy handle, if any, already out of the
 * multi, and 'x' on no list): counts, calls the callback and frees it. 'detail' may be NULL for
 * the default text of 'err'. */
void fetch__complete(struct fetch_loop *l, struct xfer *x, int err, const char *detail);

/* The same because its ctx is done ('cause'), or at shutdown (FETCH_ESHUTDOWN). */
void fetch__complete_ctx(struct fetch_loop *l, struct xfer *x, int cause);

/* Takes a started transfer out of the multi and completes it with 'cause'. */
void fetch__abort_active(struct fetch_loop *l, struct xfer *x, int cause);

/* Completes the transfers curl reports done. */
void fetch__reap_done(struct fetch_loop *l);

/* Frees the loop's spare easy handles (at its end). */
void fetch__easy_free_spares(struct fetch_loop *l);

/* ---------------------------------------------------------------- resolving.c (loop thread) */

/* Resolves the host of 'x' before it enters curl. Returns true if 'x' may start now (an IP
 * literal, or the answer is pinned in x->pin); false if it now waits on 'resolving' or was
 * completed (the name did not resolve, or no memory). */
bool fetch__resolving_enter(struct fetch_loop *l, struct xfer *x);

/* Ends the transfers that waited connect_timeout_ms for their name (unreachable). Returns the
 * ms until the next such expiry, or -1 if none is pending. */
int64_t fetch__resolving_expire(struct fetch_loop *l);

/* After a resolver answer: moves the transfers whose lookup ended to the front of 'waiting'. */
void fetch__resolving_resume(struct fetch_loop *l);

/* ---------------------------------------------------------------- timer.c (loop thread) */

/* Arms timer 'x'. Returns false if out of memory. */
bool fetch__timer_arm(struct fetch_loop *l, struct xfer *x);

/* Disarms the timer at heap position 'i' and returns it. */
struct xfer *fetch__timer_take(struct fetch_loop *l, size_t i);

/* Fires the timers that are due. Returns the ms until the next one (rounded up), or -1. */
int64_t fetch__timers_fire(struct fetch_loop *l);

/* ---------------------------------------------------------------- event.c */

/* Runs the callbacks of the fired events 'list' (taken from l->fired), on the loop thread. */
void fetch__events_run(struct fetch_event *list);

/* At shutdown, on the loop thread: ends every event still armed on 'l' (FETCH_ESHUTDOWN), waits
 * for fires that raced with it, and runs every callback left. */
void fetch__events_drain(struct fetch_loop *l);

#endif
