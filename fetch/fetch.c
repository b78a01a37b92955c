/* fetch: the curl-multi engine (see fetch.h for the contract).
 *
 * DESIGN
 * The engine is an array of loops. A loop is one thread owning one CURLM, its connection cache,
 * its easy handles and every transfer queued on it; nothing curl-related is touched by another
 * thread. Other threads reach a loop only through its inbox: fetch_get() appends a transfer under
 * the loop's mutex and, when the inbox was empty, calls curl_multi_wakeup() (still under the mutex,
 * so a loop that has stopped is never woken after its multi is gone). A transfer's ctx hook does
 * the same with the transfer itself: it appends it to the loop's list of canceled transfers
 * (intrusive links) and wakes the loop when that list was empty. From the loop's own thread (its
 * callbacks queue and cancel all the time: a batch's calls, a decided call's losers) neither
 * wakes anything: the inbox flag and a list of the loop's own make it take another pass before it
 * sleeps, which saves a wakeup write and read per batch step.
 *
 * Each pass of the loop thread: take the inbox, the canceled list and the flags; admit new
 * transfers (a ctx already done completes them without starting); abort each canceled transfer
 * where it is (out of the multi with curl_multi_remove_handle, on this thread, never from a curl
 * callback; off the waiting or resolving FIFO; out of the timer heap), so a cancel costs the same
 * whatever else the loop holds; move waiting transfers into the multi while fewer than 'limit' are
 * active; curl_multi_perform(); complete what curl reports done; curl_multi_poll() until curl has
 * work or a wakeup arrives. 'limit' is the loop's connection cap (HTTP/1.1: one transfer per
 * connection), or 100 streams per connection for h2c, so curl's own PENDING queue stays empty:
 * its timeout clock would otherwise run while a transfer waits, and 7.88 walks PENDING handles on
 * every perform (LIBRARY-NOTES 2.2, 2.3). The waiting FIFO is ours and costs nothing per pass.
 *
 * Completion (only on the loop thread): remove the ctx hook (ctx_hook_remove waits if the hook
 * is running right now, so the transfer can be freed), take the transfer off the canceled list
 * if its hook put it there (it may have ended on its own meanwhile), recycle the easy handle onto
 * the loop's free list, count, call the callback with no lock held, drop the ctx reference, free.
 *
 * Stop: fetch_free() sets 'stopping' under each loop's mutex and wakes it. fetch_get() checks
 * the flag under the same mutex, so once the loop has seen it its inbox can only be what it took
 * in that same critical section; it completes those, the active and the waiting transfers with
 * FETCH_ESHUTDOWN (or their ctx's cause), frees its curl handles and exits; fetch_free() joins.
 *
 * Names: before a transfer with a host name enters the multi, the engine's resolver (resolve.c)
 * answers it from its cache, or the transfer waits on the loop's 'resolving' list (outside curl,
 * not holding a slot) until a resolver thread answers and wakes the loops ('dns_ready'). It then
 * enters curl with the addresses pinned by CURLOPT_RESOLVE, so curl's threaded resolver, whose
 * abort joins its lookup thread and would block this loop, never runs. A transfer aborted while
 * it waits just drops its hold on the cache entry. The wait counts against connect_timeout_ms,
 * as curl's own lookup would (expire_resolving(), checked on every pass; its next expiry bounds
 * the poll).
 *
 * Locks: one mutex per loop (the inbox); no other lock is ever taken while holding it, and no
 * callback, hook or curl call except curl_multi_wakeup() runs under it. The resolver's mutex is
 * never held together with a loop's. Counters are atomics. */
#include "fetch/fetch.h"

#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "fetch/resolve.h"

#define POLL_MS 1000            /* default idle_poll_ms */
#define H2_STREAMS_PER_CONN 100 /* curl's default CURLMOPT_MAX_CONCURRENT_STREAMS */
#define BODY_MIN_CAP 1024       /* first body buffer when no Content-Length is known */
#define RESOLVER_THREADS 2      /* default fetch_opts.resolver_threads */
#define DNS_TTL_MS 60000        /* default fetch_opts.dns_ttl_ms (curl's own DNS cache default) */
#define DNS_NEG_TTL_MS 1000     /* longest a failed lookup is remembered */

struct fetch_loop;

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Where a transfer or timer is, for its loop (loop thread only; 0 while on the inbox). */
enum xfer_where {
    XFER_INBOX = 0, /* handed over, not admitted yet: admit() checks its ctx */
    XFER_WAITING,   /* on 'waiting' */
    XFER_RESOLVING, /* on 'resolving' */
    XFER_ACTIVE,    /* in the multi, on 'active' */
    XFER_TIMER,     /* in the timer heap at 'heap_idx' */
};

/* Which list of canceled transfers holds it (see on_ctx_done()). */
enum xfer_canceled {
    CANCELED_NONE = 0, /* none */
    CANCELED_SHARED,   /* the loop's 'canceled'; guarded by the loop's mu */
    CANCELED_OWN,      /* the loop's 'canceled_own'; loop thread only */
};

/* One transfer, from fetch_get() to its callback. Owned by its loop once queued. */
struct xfer {
    struct xfer *next, *prev; /* on the inbox, the waiting or resolving FIFO or the active list */
    struct xfer *cnext, *cprev; /* on one of its loop's lists of canceled transfers */
    struct fetch_loop *loop;  /* the loop it runs on */
    atomic_bool handed;       /* on the loop's inbox (or past it): its hook may queue it */
    unsigned char where;      /* enum xfer_where; loop thread only */
    unsigned char canceled;   /* enum xfer_canceled; written under the loop's mu when shared */
    struct ctx *ctx;          /* our reference on the caller's ctx */
    struct ctx_hook hook;     /* wakes the loop when ctx is done; armed until completion */
    fetch_cb cb;              /* the caller's callback and its argument */
    void *arg;
    size_t max_body;              /* body cap in bytes */
    int64_t t0_us;                /* monotonic microseconds at fetch_get() */
    CURL *easy;                   /* the easy handle while started, else NULL */
    struct curl_slist *hdrs;      /* extra request headers while started: 'hdr' nodes */
    struct curl_slist hdr[2];     /* their nodes (curl only reads the list; no allocation) */
    char timeout_line[48];        /* "X-Request-Timeout-Ms: N" */
    struct curl_slist *pin;       /* CURLOPT_RESOLVE entry for a host name while started */
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
    bool timer;                   /* a fetch_after() timer, not a transfer */
    int64_t due_us;               /* timers: when it fires (monotonic microseconds) */
    size_t heap_idx;              /* timers: position in the loop's heap */
    char strings[];               /* the URL, then the request id */
};

/* A FIFO of transfers, doubly linked through 'next' and 'prev'. */
struct xfer_queue {
    struct xfer *head, *tail;
};

/* A list of canceled transfers, doubly linked through 'cnext' and 'cprev'. */
struct xfer_canceled_list {
    struct xfer *head, *tail;
};

struct fetch_loop {
    struct fetch *f;         /* the engine */
    pthread_t thread;        /* the loop thread */
    bool started;            /* thread created (for unwinding and joining) */
    CURLM *multi;            /* used only by the loop thread; freed by fetch_free() after the join */
    pthread_mutex_t mu;      /* guards inbox, canceled, stopping, dns_ready */
    struct xfer_queue inbox; /* handed over by fetch_get(); guarded by mu */
    struct xfer_canceled_list canceled; /* ctx done, queued by hooks on other threads; mu */
    bool stopping;           /* fetch_free() began; guarded by mu */
    bool dns_ready;          /* the resolver answered some lookup; guarded by mu */
    /* Loop thread only: */
    struct xfer_queue waiting;  /* admitted, not started: FIFO */
    struct xfer_queue resolving; /* waiting for the resolver, outside curl: FIFO */
    char origin[320];           /* "scheme://authority" of the last URL whose host was parsed */
    size_t origin_len;          /* its length (0: none) */
    char origin_host[256];      /* that URL's host, as curl looks it up */
    long origin_port;           /* and port */
    bool origin_literal;        /* the host needs no lookup (fetch__host_is_literal) */
    struct xfer_canceled_list canceled_own; /* ctx done: queued by hooks on this thread, and
                                               'canceled' once taken */
    /* Set by the loop's own callbacks instead of a wakeup (kept away from the fields under mu:
     * a combined load of neighbouring bytes would race with their writers): */
    bool self_inbox;            /* work was queued: another pass before sleeping */
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

/* ---------------------------------------------------------------- small helpers */

static void heap_swap(struct fetch_loop *l, size_t a, size_t b)
{
    struct xfer *t = l->timers[a];
    l->timers[a] = l->timers[b];
    l->timers[b] = t;
    l->timers[a]->heap_idx = a;
    l->timers[b]->heap_idx = b;
}

static void heap_up(struct fetch_loop *l, size_t i)
{
    while (i > 0 && l->timers[(i - 1) / 2]->due_us > l->timers[i]->due_us) {
        heap_swap(l, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void heap_down(struct fetch_loop *l, size_t i)
{
    for (;;) {
        size_t m = i, a = 2 * i + 1, b = a + 1;
        if (a < l->ntimers && l->timers[a]->due_us < l->timers[m]->due_us)
            m = a;
        if (b < l->ntimers && l->timers[b]->due_us < l->timers[m]->due_us)
            m = b;
        if (m == i)
            return;
        heap_swap(l, i, m);
        i = m;
    }
}

/* Arms timer 'x'. Returns false if out of memory. */
static bool heap_push(struct fetch_loop *l, struct xfer *x)
{
    if (l->ntimers == l->timers_cap) {
        size_t cap = l->timers_cap ? l->timers_cap * 2 : 64;
        struct xfer **p = realloc(l->timers, cap * sizeof(*p));
        if (!p)
            return false;
        l->timers = p;
        l->timers_cap = cap;
    }
    x->heap_idx = l->ntimers;
    l->timers[l->ntimers++] = x;
    heap_up(l, x->heap_idx);
    return true;
}

/* Disarms the timer at heap position 'i' and returns it. */
static struct xfer *heap_take(struct fetch_loop *l, size_t i)
{
    struct xfer *x = l->timers[i];
    l->ntimers--;
    if (i != l->ntimers) {
        l->timers[i] = l->timers[l->ntimers];
        l->timers[i]->heap_idx = i;
        heap_down(l, i);
        heap_up(l, i);
    }
    return x;
}

static void queue_push(struct xfer_queue *q, struct xfer *x)
{
    x->next = NULL;
    x->prev = q->tail;
    if (q->tail)
        q->tail->next = x;
    else
        q->head = x;
    q->tail = x;
}

static void queue_del(struct xfer_queue *q, struct xfer *x)
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

static struct xfer *queue_pop(struct xfer_queue *q)
{
    struct xfer *x = q->head;
    if (x)
        queue_del(q, x);
    return x;
}

/* Moves all of 'src' before the head of 'dst', in order. */
static void queue_prepend(struct xfer_queue *dst, struct xfer_queue *src)
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

static void canceled_push(struct xfer_canceled_list *q, struct xfer *x)
{
    x->cnext = NULL;
    x->cprev = q->tail;
    if (q->tail)
        q->tail->cnext = x;
    else
        q->head = x;
    q->tail = x;
}

static void canceled_del(struct xfer_canceled_list *q, struct xfer *x)
{
    if (x->cprev)
        x->cprev->cnext = x->cnext;
    else
        q->head = x->cnext;
    if (x->cnext)
        x->cnext->cprev = x->cprev;
    else
        q->tail = x->cprev;
    x->cnext = x->cprev = NULL;
}

static void active_add(struct fetch_loop *l, struct xfer *x)
{
    x->where = XFER_ACTIVE;
    x->prev = NULL;
    x->next = l->active;
    if (l->active)
        l->active->prev = x;
    l->active = x;
    l->nactive++;
}

static void active_del(struct fetch_loop *l, struct xfer *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        l->active = x->next;
    if (x->next)
        x->next->prev = x->prev;
    x->next = x->prev = NULL;
    l->nactive--;
}

void fetch_opts_default(struct fetch_opts *o)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    o->loops = n > 0 ? (unsigned)n : 1;
    o->max_conns = 512;
    o->max_body = 1 << 20;
    o->recv_buffer = FETCH_RECV_BUFFER;
    o->connect_timeout_ms = 5000;
    o->h2c = false;
    o->idle_poll_ms = POLL_MS;
    o->resolver_threads = RESOLVER_THREADS;
    o->dns_ttl_ms = DNS_TTL_MS;
    o->lookup = NULL;
    o->lookup_arg = NULL;
}

/* ---------------------------------------------------------------- easy handles */

/* A status line as RFC 9112 has it: HTTP/1.0 or HTTP/1.1 (or the HTTP/2 one curl writes for
 * h2c), a space, exactly three digits, then a space or the end of the line. libcurl's own
 * parser is laxer in some versions (8.x reads "2000" as 200). */
static bool status_line_ok(const char *d, size_t n)
{
    size_t v;
    if (n >= 9 && (!memcmp(d, "HTTP/1.1 ", 9) || !memcmp(d, "HTTP/1.0 ", 9)))
        v = 9;
    else if (n >= 7 && !memcmp(d, "HTTP/2 ", 7))
        v = 7;
    else
        return false;
    if (n < v + 3)
        return false;
    for (size_t i = v; i < v + 3; i++)
        if (d[i] < '0' || d[i] > '9')
            return false;
    return n == v + 3 || d[v + 3] == ' ' || d[v + 3] == '\r' || d[v + 3] == '\n';
}

/* Header lines: the first of each response must be a well-formed status line. */
static size_t on_header(char *data, size_t size, size_t nmemb, void *arg)
{
    struct xfer *x = arg;
    size_t n = size * nmemb;
    if (!x->in_headers) { /* a status line */
        if (!status_line_ok(data, n)) {
            x->bad_status = true;
            return 0; /* curl stops with a write error */
        }
        x->in_headers = true;
    } else if (n <= 2 && (data[0] == '\r' || data[0] == '\n')) {
        x->in_headers = false; /* the end of these headers: an interim 1xx may be followed */
    }
    return n;
}

static size_t on_write(char *data, size_t size, size_t nmemb, void *arg)
{
    struct xfer *x = arg;
    size_t n = size * nmemb;
    x->received += n;
    if (n > x->max_body - x->len) {
        x->too_big = true;
        return 0; /* CURLE_WRITE_ERROR: curl stops reading at once */
    }
    if (x->len + n + 1 > x->cap) {
        size_t cap = x->cap;
        if (cap == 0) {
            curl_off_t cl = -1;
            curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
            cap = cl > 0 && (uint64_t)cl <= x->max_body ? (size_t)cl + 1 : BODY_MIN_CAP;
        }
        while (cap < x->len + n + 1)
            cap = cap > x->max_body / 2 ? x->max_body + 1 : cap * 2;
        char *p = realloc(x->body, cap);
        if (!p)
            return 0; /* reported as a write error */
        x->body = p;
        x->cap = cap;
    }
    memcpy(x->body + x->len, data, n);
    x->len += n;
    x->body[x->len] = 0;
    return n;
}

/* A configured easy handle from the free list, or a new one; NULL if out of memory. */
static CURL *easy_get(struct fetch_loop *l)
{
    if (l->nspare > 0)
        return l->spare[--l->nspare];
    CURL *e = curl_easy_init();
    if (!e)
        return NULL;
    const struct fetch_opts *o = &l->f->opts;
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    /* Send the path exactly as built: libcurl 8 treats %2E as a dot when it removes
     * dot-segments, so it would turn the encoded ids "." and ".." (url.h) back into path
     * navigation. The URL builder already leaves no dot-segment in an id. */
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
    /* curl allocates this buffer when a transfer starts (Curl_preconnect) and a finished
     * transfer no longer holds it, so it is memory per transfer in flight. With curl's default
     * 16 KiB the peak RSS under the harness's S1 (320 in flight) was 2.4 MB higher than with
     * 4 KiB, and its throughput no different (BENCHMARKS.md). */
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, (long)o->recv_buffer);
    if (!l->f->proxy_env) { /* none is set: spare curl its five getenv() calls per transfer */
        curl_easy_setopt(e, CURLOPT_PROXY, "");
        curl_easy_setopt(e, CURLOPT_NOPROXY, "");
    }
    if (o->h2c) {
        curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
        curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    } else {
        curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    }
    return e;
}

/* Returns a handle (already removed from the multi) to the free list, or frees it. */
static void easy_put(struct fetch_loop *l, CURL *e)
{
    /* Leave nothing pointing at the finished transfer. */
    curl_easy_setopt(e, CURLOPT_PRIVATE, NULL);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, NULL);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, NULL);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, NULL);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(e, CURLOPT_RESOLVE, NULL);
    if (l->nspare == l->spare_cap) {
        unsigned cap = l->spare_cap ? l->spare_cap * 2 : 16;
        CURL **p = realloc(l->spare, cap * sizeof(*p));
        if (!p) {
            curl_easy_cleanup(e);
            return;
        }
        l->spare = p;
        l->spare_cap = cap;
    }
    l->spare[l->nspare++] = e;
}

/* ---------------------------------------------------------------- completion */

/* After ctx_hook_remove(): takes 'x' off the list of canceled transfers its hook put it on, if
 * any, so that it can be freed. The hook cannot run any more, so 'canceled' is stable here: a hook
 * that ran on another thread wrote it before ctx_hook_remove() returned. */
static void canceled_forget(struct fetch_loop *l, struct xfer *x)
{
    if (x->canceled == CANCELED_OWN) {
        canceled_del(&l->canceled_own, x);
    } else if (x->canceled == CANCELED_SHARED) {
        pthread_mutex_lock(&l->mu);
        canceled_del(&l->canceled, x);
        pthread_mutex_unlock(&l->mu);
    }
    x->canceled = CANCELED_NONE;
}

/* Completes 'x' with 'err' (its easy handle, if any, already out of the multi): counts, calls the
 * callback and frees the transfer. 'detail' may be NULL for the default text of 'err'. */
static void complete_as(struct fetch_loop *l, struct xfer *x, int err, const char *detail,
                        bool from_ctx)
{
    struct fetch *f = l->f;
    struct fetch_result r = {.err = err, .aborted = from_ctx};
    if (x->timer) { /* no transfer, nothing to count */
        ctx_hook_remove(x->ctx, &x->hook);
        canceled_forget(l, x);
        r.detail = err == 0 ? "timer" : from_ctx ? "canceled" : "fetch engine shutting down";
        r.elapsed_us = now_us() - x->t0_us;
        r.elapsed_ms = r.elapsed_us / 1000;
        x->cb(x->arg, &r);
        ctx_unref(x->ctx);
        free(x);
        return;
    }
    char buf[CURL_ERROR_SIZE + 64];
    if (x->easy) {
        long status = 0, conns = 0;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(x->easy, CURLINFO_NUM_CONNECTS, &conns);
        r.status = status;
        if (conns > 0)
            atomic_fetch_add_explicit(&f->conns_opened, (uint64_t)conns, memory_order_relaxed);
        easy_put(l, x->easy);
        x->easy = NULL;
    }
    ctx_hook_remove(x->ctx, &x->hook); /* waits if the hook is running; never fires after */
    canceled_forget(l, x);
    x->hdrs = NULL; /* its nodes are the transfer's own */
    curl_slist_free_all(x->pin);
    x->pin = NULL;
    if (x->dns) {
        fetch__resolve_release(f->resolver, x->dns);
        x->dns = NULL;
    }

    struct outcome o = outcome_of(err, r.status, from_ctx);
    if (err == FETCH_ESTATUS) {
        snprintf(buf, sizeof(buf), "upstream answered with status %ld", r.status);
        detail = buf;
    } else if (err == FETCH_ETOOBIG) {
        snprintf(buf, sizeof(buf), "upstream body larger than %zu bytes", x->max_body);
        detail = buf;
    } else if (err == 0) {
        detail = "ok";
    }
    if (!detail) {
        if (err == -ETIMEDOUT)
            detail = "deadline exceeded";
        else if (err == FETCH_ESHUTDOWN)
            detail = "fetch engine shutting down";
        else if (err == -ECANCELED)
            detail = "canceled";
        else if (err == FETCH_EUNREACH)
            detail = "upstream unreachable";
        else {
            snprintf(buf, sizeof(buf), "canceled: %s", strerror(-err));
            detail = buf;
        }
    }
    r.detail = detail;
    if (err == 0 || err == FETCH_ESTATUS) {
        r.body = x->body; /* the callback owns it now */
        r.len = x->len;
    } else {
        free(x->body);
    }
    x->body = NULL;
    r.elapsed_us = now_us() - x->t0_us;
    r.elapsed_ms = r.elapsed_us / 1000;
    atomic_fetch_add_explicit(&f->outcomes[o.kind], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&f->bytes, x->received, memory_order_relaxed);
    atomic_fetch_sub_explicit(&f->in_flight, 1, memory_order_relaxed);

    x->cb(x->arg, &r);
    ctx_unref(x->ctx);
    free(x);
}

/* Completes 'x' for a reason of its own (the upstream's answer, a transport error). */
static void complete(struct fetch_loop *l, struct xfer *x, int err, const char *detail)
{
    complete_as(l, x, err, detail, false);
}

/* Completes 'x' because its ctx is done, with that ctx's cause. */
static void complete_ctx(struct fetch_loop *l, struct xfer *x, int cause)
{
    complete_as(l, x, cause, NULL, true);
}

/* Maps a finished curl transfer to a result and completes it. */
static void finish(struct fetch_loop *l, struct xfer *x, CURLcode rc)
{
    if (rc == CURLE_OK) {
        long status = 0;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
        complete(l, x, status >= 200 && status <= 299 ? 0 : FETCH_ESTATUS, NULL);
        return;
    }
    if (x->bad_status) {
        complete(l, x, FETCH_EUNREACH, "malformed status line from the upstream");
        return;
    }
    if (x->too_big || rc == CURLE_FILESIZE_EXCEEDED) {
        complete(l, x, FETCH_ETOOBIG, NULL);
        return;
    }
    const char *text = x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc);
    if (rc == CURLE_OPERATION_TIMEDOUT) {
        /* TIMEOUT_MS is the ctx's remaining time, so a curl timeout at the deadline is the
         * deadline; one well before it came from the connect cap: the upstream is unreachable. */
        int cause = ctx_err(x->ctx);
        if (cause != 0 && cause != -ETIMEDOUT) {
            complete_ctx(l, x, cause);
            return;
        }
        if (cause == -ETIMEDOUT ||
            (ctx_deadline(x->ctx) != CTX_FOREVER && ctx_remaining(x->ctx) <= 1)) {
            complete(l, x, -ETIMEDOUT, text);
            return;
        }
    }
    complete(l, x, FETCH_EUNREACH, text);
}

/* Aborts a started transfer because its ctx is done ('cause'), or at shutdown. */
static void abort_active(struct fetch_loop *l, struct xfer *x, int cause)
{
    active_del(l, x);
    curl_multi_remove_handle(l->multi, x->easy);
    complete_ctx(l, x, cause);
}

/* ---------------------------------------------------------------- the loop */

/* Copies the URL's host (as curl will look it up) and port. Returns false if curl cannot parse
 * the URL; curl then reports it as it always has. */
static bool url_host(const char *url, char *host, size_t size, long *port)
{
    CURLU *u = curl_url();
    char *h = NULL, *p = NULL;
    bool ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK;
#ifdef CURLU_PUNYCODE
    unsigned hflags = CURLU_PUNYCODE; /* curl resolves the ASCII form of a UTF-8 name */
#else
    unsigned hflags = 0;
#endif
    ok = ok && curl_url_get(u, CURLUPART_HOST, &h, hflags) == CURLUE_OK;
    ok = ok && curl_url_get(u, CURLUPART_PORT, &p, CURLU_DEFAULT_PORT) == CURLUE_OK;
    ok = ok && strlen(h) < size;
    if (ok) {
        memcpy(host, h, strlen(h) + 1);
        *port = strtol(p, NULL, 10);
    }
    curl_free(h);
    curl_free(p);
    curl_url_cleanup(u);
    return ok;
}

/* Resolves the host of 'x' before it enters curl. Returns true if 'x' may start now (an IP
 * literal, or the answer is pinned in x->pin); false if it now waits on 'resolving' or was
 * completed (the name did not resolve, or no memory). */
static bool resolve_host(struct fetch_loop *l, struct xfer *x)
{
    /* Parsing a URL costs more than the rest of a start; one request's URLs share an origin. */
    const char *sep = strstr(x->url, "://");
    size_t olen = sep ? (size_t)(sep + 3 - x->url) + strcspn(sep + 3, "/?#") : 0;
    if (olen == 0 || olen != l->origin_len || memcmp(x->url, l->origin, olen) != 0) {
        l->origin_len = 0;
        if (!url_host(x->url, l->origin_host, sizeof(l->origin_host), &l->origin_port))
            return true;
        l->origin_literal = fetch__host_is_literal(l->origin_host);
        if (olen > 0 && olen < sizeof(l->origin)) {
            memcpy(l->origin, x->url, olen);
            l->origin_len = olen;
        }
    }
    if (l->origin_literal)
        return true;
    const char *host = l->origin_host;
    long port = l->origin_port;
    char addrs[FETCH__DNS_ADDRS_SIZE];
    struct fetch__dns *d = NULL;
    int rc = fetch__resolve(l->f->resolver, host, addrs, &d);
    if (rc == 0) {
        x->dns = d;
        if (x->resolve_t0_us == 0)
            x->resolve_t0_us = now_us();
        x->where = XFER_RESOLVING;
        queue_push(&l->resolving, x);
        return false;
    }
    if (rc == -ESHUTDOWN) { /* fetch_free() began: as if this loop had seen it */
        complete_ctx(l, x, FETCH_ESHUTDOWN);
        return false;
    }
    if (rc < 0) {
        complete(l, x, FETCH_EUNREACH, addrs);
        return false;
    }
    size_t n = strlen(host) + strlen(addrs) + 32;
    char *entry = malloc(n);
    struct curl_slist *s = NULL;
    if (entry) {
        snprintf(entry, n, "%s:%ld:%s", host, port, addrs);
        s = curl_slist_append(NULL, entry);
        free(entry);
    }
    if (!s) {
        complete(l, x, FETCH_EUNREACH, "out of memory starting the transfer");
        return false;
    }
    curl_slist_free_all(x->pin);
    x->pin = s;
    return true;
}

/* curl's connect timeout covers its name lookup; ours does too: a transfer that has waited
 * connect_timeout_ms for its name is unreachable (the deadline, if sooner, ends it first, by its
 * ctx hook). Returns the ms until the next such expiry, or -1 if none is pending. */
static int64_t expire_resolving(struct fetch_loop *l)
{
    int64_t cap_ms = l->f->opts.connect_timeout_ms;
    if (!l->resolving.head || cap_ms <= 0)
        return -1;
    struct xfer_queue late = {NULL, NULL};
    int64_t now = now_us(), next = -1;
    struct xfer *x, *after;
    for (x = l->resolving.head; x; x = after) {
        after = x->next;
        int64_t due = x->resolve_t0_us + cap_ms * 1000;
        if (due <= now) {
            queue_del(&l->resolving, x);
            queue_push(&late, x);
            continue;
        }
        int64_t ms = (due - now + 999) / 1000;
        if (next < 0 || ms < next)
            next = ms;
    }
    char buf[320];
    while ((x = queue_pop(&late)) != NULL) {
        snprintf(buf, sizeof(buf), "resolving host %s took longer than %lld ms",
                 fetch__dns_host(x->dns), (long long)cap_ms);
        complete(l, x, FETCH_EUNREACH, buf);
    }
    return next;
}

/* After a resolver answer: moves the transfers whose lookup ended to the front of 'waiting', in
 * order, so that they start next (start() then finds the answer in the cache). */
static void resume_resolved(struct fetch_loop *l)
{
    struct xfer_queue ready = {NULL, NULL};
    char addrs[FETCH__DNS_ADDRS_SIZE];
    struct xfer *x, *after;
    for (x = l->resolving.head; x; x = after) {
        after = x->next;
        if (fetch__resolve_poll(l->f->resolver, x->dns, addrs) == 0)
            continue;
        fetch__resolve_release(l->f->resolver, x->dns);
        x->dns = NULL;
        queue_del(&l->resolving, x);
        x->where = XFER_WAITING;
        queue_push(&ready, x);
    }
    queue_prepend(&l->waiting, &ready);
}

/* Puts 'x' into the multi, or completes it if it must not start. */
static void start(struct fetch_loop *l, struct xfer *x)
{
    int cause = ctx_err(x->ctx);
    if (cause != 0) {
        complete_ctx(l, x, cause);
        return;
    }
    int64_t left = ctx_remaining(x->ctx);
    if (left == 0) { /* past the deadline; the timer has not fired yet */
        complete_ctx(l, x, -ETIMEDOUT);
        return;
    }
    if (!resolve_host(l, x))
        return;
    const struct fetch_opts *o = &l->f->opts;
    unsigned nh = 0;
    if (x->request_id)
        x->hdr[nh++].data = x->request_id;
    if (left != CTX_FOREVER) {
        snprintf(x->timeout_line, sizeof(x->timeout_line), "X-Request-Timeout-Ms: %lld",
                 (long long)left);
        x->hdr[nh++].data = x->timeout_line;
    }
    for (unsigned i = 0; i < nh; i++)
        x->hdr[i].next = i + 1 < nh ? &x->hdr[i + 1] : NULL;
    x->hdrs = nh ? &x->hdr[0] : NULL;
    x->easy = easy_get(l);
    if (!x->easy)
        goto nomem;
    int64_t conn_ms = o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 0;
    if (conn_ms > 0 && x->resolve_t0_us != 0) { /* the lookup spent part of it */
        int64_t waited = (now_us() - x->resolve_t0_us) / 1000;
        conn_ms = waited < conn_ms ? conn_ms - waited : 1;
    }
    if (left != CTX_FOREVER && (conn_ms == 0 || left < conn_ms))
        conn_ms = left;
    if (conn_ms == 0)
        conn_ms = INT32_MAX; /* no cap and no deadline: 0 would mean curl's 300 s default */
    x->errbuf[0] = 0;
    CURL *e = x->easy;
    if (curl_easy_setopt(e, CURLOPT_URL, x->url) != CURLE_OK)
        goto nomem;
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->hdrs);
    curl_easy_setopt(e, CURLOPT_RESOLVE, x->pin);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(left == CTX_FOREVER ? 0 : left));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)conn_ms);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)x->max_body);
    if (curl_multi_add_handle(l->multi, e) != CURLM_OK)
        goto nomem;
    active_add(l, x);
    return;
nomem:
    complete(l, x, FETCH_EUNREACH, "out of memory starting the transfer");
}

/* Queues newly handed-over transfers and arms new timers, completing those whose ctx is
 * already done. */
static void admit(struct fetch_loop *l, struct xfer *in)
{
    while (in) {
        struct xfer *x = in;
        in = in->next;
        int cause = ctx_err(x->ctx);
        if (cause != 0) {
            complete_ctx(l, x, cause);
        } else if (!x->timer) {
            x->where = XFER_WAITING;
            queue_push(&l->waiting, x);
        } else if (heap_push(l, x)) {
            x->where = XFER_TIMER;
        } else {
            complete(l, x, -ENOMEM, NULL);
        }
    }
}

/* Fires the timers that are due. Returns the milliseconds until the next one (rounded up), or
 * -1 when none is armed. */
static int64_t fire_timers(struct fetch_loop *l)
{
    int64_t now = now_us();
    while (l->ntimers > 0 && l->timers[0]->due_us <= now) {
        complete(l, heap_take(l, 0), 0, NULL);
        now = now_us();
    }
    return l->ntimers ? (l->timers[0]->due_us - now + 999) / 1000 : -1;
}

/* Aborts or drops the transfers and timers whose hooks reported their ctx done, each where it
 * is: O(1) per canceled transfer (O(log timers) for a timer), whatever else the loop holds. The
 * callbacks run here may cancel more; those are taken in the same turn. */
static void reap_canceled(struct fetch_loop *l)
{
    struct xfer *x;
    while ((x = l->canceled_own.head) != NULL) {
        canceled_del(&l->canceled_own, x);
        x->canceled = CANCELED_NONE;
        switch (x->where) {
        case XFER_INBOX: /* queued by a callback after this turn took the inbox */
            continue;    /* admit() sees its ctx done next turn */
        case XFER_WAITING:
            queue_del(&l->waiting, x);
            break;
        case XFER_RESOLVING: /* the lookup goes on; nothing waits for it */
            queue_del(&l->resolving, x);
            break;
        case XFER_ACTIVE:
            active_del(l, x);
            curl_multi_remove_handle(l->multi, x->easy);
            break;
        case XFER_TIMER:
            heap_take(l, x->heap_idx);
            break;
        }
        complete_ctx(l, x, ctx_err(x->ctx));
    }
}

static void reap_done(struct fetch_loop *l)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(l->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        CURL *e = m->easy_handle;
        CURLcode rc = m->data.result;
        struct xfer *x = NULL;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&x);
        curl_multi_remove_handle(l->multi, e); /* m is invalid from here on */
        active_del(l, x);
        finish(l, x, rc);
    }
}

static int stop_cause(struct xfer *x)
{
    int cause = ctx_err(x->ctx);
    return cause != 0 ? cause : FETCH_ESHUTDOWN;
}

static void drain_all(struct fetch_loop *l, struct xfer *in)
{
    while (in) {
        struct xfer *x = in;
        in = in->next;
        complete_ctx(l, x, stop_cause(x));
    }
    while (l->active)
        abort_active(l, l->active, stop_cause(l->active));
    struct xfer *x;
    while ((x = queue_pop(&l->waiting)) != NULL)
        complete_ctx(l, x, stop_cause(x));
    while ((x = queue_pop(&l->resolving)) != NULL)
        complete_ctx(l, x, stop_cause(x));
    while (l->ntimers > 0) {
        x = heap_take(l, l->ntimers - 1);
        complete_ctx(l, x, stop_cause(x));
    }
}

/* The loop whose thread this is, or NULL. */
static _Thread_local struct fetch_loop *this_loop;

/* With l->mu held: moves what hooks on other threads queued to the loop's own list. */
static void take_canceled(struct fetch_loop *l)
{
    struct xfer *x = l->canceled.head;
    if (!x)
        return;
    for (; x; x = x->cnext)
        x->canceled = CANCELED_OWN;
    struct xfer_canceled_list *own = &l->canceled_own;
    l->canceled.head->cprev = own->tail;
    if (own->tail)
        own->tail->cnext = l->canceled.head;
    else
        own->head = l->canceled.head;
    own->tail = l->canceled.tail;
    l->canceled.head = l->canceled.tail = NULL;
}

static void *loop_main(void *arg)
{
    struct fetch_loop *l = arg;
    this_loop = l;
    for (;;) {
        pthread_mutex_lock(&l->mu);
        struct xfer *in = l->inbox.head;
        l->inbox.head = l->inbox.tail = NULL;
        take_canceled(l);
        bool stop = l->stopping, dns = l->dns_ready;
        l->self_inbox = false;
        l->dns_ready = false;
        pthread_mutex_unlock(&l->mu);
        if (stop) {
            drain_all(l, in);
            break;
        }
        admit(l, in);
        reap_canceled(l);
        if (dns)
            resume_resolved(l);
        while (l->waiting.head && l->nactive < l->limit)
            start(l, queue_pop(&l->waiting));
        int running;
        curl_multi_perform(l->multi, &running);
        reap_done(l);
        int64_t next = fire_timers(l);
        int64_t dns_next = expire_resolving(l);
        if (dns_next >= 0 && (next < 0 || dns_next < next))
            next = dns_next;
        if ((l->waiting.head && l->nactive < l->limit) || l->canceled_own.head || l->self_inbox)
            continue; /* slots freed, or callbacks canceled or queued something: another turn */
        int wait = next >= 0 && next < l->poll_ms ? (int)next : l->poll_ms;
        curl_multi_poll(l->multi, NULL, 0, wait, NULL);
    }
    /* Callbacks run by drain_all() cannot have queued anything: fetch_get() saw 'stopping'. */
    while (l->nspare > 0)
        curl_easy_cleanup(l->spare[--l->nspare]);
    return NULL;
}

/* A transfer's ctx hook: runs on whichever thread made the ctx done, and must not block. It
 * queues the transfer on its loop's list of canceled transfers (its own list when this is the
 * loop's thread, from one of its callbacks: seen before the loop sleeps again; else the shared
 * one, waking the loop) and touches nothing else of it. A transfer not yet handed to the loop
 * (its ctx was done within fetch_get()) is left alone: admit() will see its ctx done. Completion
 * takes it off the list again (canceled_forget()) after ctx_hook_remove(), which waits for this
 * hook to return. */
static void on_ctx_done(void *arg)
{
    struct xfer *x = arg;
    struct fetch_loop *l = x->loop;
    if (this_loop == l) {
        if (atomic_load_explicit(&x->handed, memory_order_acquire)) {
            x->canceled = CANCELED_OWN;
            canceled_push(&l->canceled_own, x);
        }
        return;
    }
    pthread_mutex_lock(&l->mu);
    if (atomic_load_explicit(&x->handed, memory_order_relaxed)) {
        bool was_empty = l->canceled.head == NULL;
        x->canceled = CANCELED_SHARED;
        canceled_push(&l->canceled, x);
        if (was_empty && !l->stopping) /* otherwise a wakeup is already on its way */
            curl_multi_wakeup(l->multi);
    }
    pthread_mutex_unlock(&l->mu);
}

/* The resolver's notify: some lookup ended; every loop checks its waiting transfers. Runs on a
 * resolver thread with no lock held. */
static void on_dns_answer(void *arg)
{
    struct fetch *f = arg;
    for (unsigned i = 0; i < f->nloops; i++) {
        struct fetch_loop *l = &f->loops[i];
        pthread_mutex_lock(&l->mu);
        if (!l->dns_ready && !l->stopping) {
            l->dns_ready = true;
            curl_multi_wakeup(l->multi);
        }
        pthread_mutex_unlock(&l->mu);
    }
}

/* ---------------------------------------------------------------- API */

static bool header_value_ok(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

int fetch_get(struct fetch *f, unsigned loop, struct ctx *c, const struct fetch_req *r)
{
    if (!f || !c || !r || !r->url || !r->cb || loop >= f->nloops)
        return -EINVAL;
    if (r->request_id && !header_value_ok(r->request_id))
        return -EINVAL; /* no header injection through CR/LF */
    if (atomic_load_explicit(&f->stopping, memory_order_acquire))
        return FETCH_ESHUTDOWN;
    static const char rid_name[] = "X-Request-Id: ";
    size_t ulen = strlen(r->url) + 1;
    size_t rlen = r->request_id ? sizeof(rid_name) - 1 + strlen(r->request_id) + 1 : 0;
    struct xfer *x = calloc(1, sizeof(*x) + ulen + rlen);
    if (!x)
        return -ENOMEM;
    struct fetch_loop *l = &f->loops[loop];
    memcpy(x->strings, r->url, ulen);
    x->url = x->strings;
    if (r->request_id) {
        memcpy(x->strings + ulen, rid_name, sizeof(rid_name) - 1);
        memcpy(x->strings + ulen + sizeof(rid_name) - 1, r->request_id,
               rlen - (sizeof(rid_name) - 1));
        x->request_id = x->strings + ulen;
    }
    x->loop = l;
    x->cb = r->cb;
    x->arg = r->arg;
    x->max_body = r->max_body ? r->max_body : f->opts.max_body;
    x->t0_us = now_us();
    x->ctx = ctx_ref(c);
    atomic_fetch_add_explicit(&f->in_flight, 1, memory_order_relaxed);
    ctx_hook_add(c, &x->hook, on_ctx_done, x); /* runs at once if c is already done */

    pthread_mutex_lock(&l->mu);
    if (l->stopping) {
        pthread_mutex_unlock(&l->mu);
        ctx_hook_remove(c, &x->hook);
        ctx_unref(x->ctx);
        free(x);
        atomic_fetch_sub_explicit(&f->in_flight, 1, memory_order_relaxed);
        return FETCH_ESHUTDOWN;
    }
    bool was_empty = l->inbox.head == NULL;
    queue_push(&l->inbox, x);
    atomic_store_explicit(&x->handed, true, memory_order_release);
    if (this_loop == l) /* from the loop's own callback: taken before it sleeps */
        l->self_inbox = true;
    else if (was_empty) /* otherwise a wakeup is already on its way */
        curl_multi_wakeup(l->multi);
    pthread_mutex_unlock(&l->mu);
    return 0;
}

int fetch_after(struct fetch *f, unsigned loop, struct ctx *c, int64_t delay_ms, fetch_cb cb,
                void *arg)
{
    if (!f || !c || !cb || loop >= f->nloops || delay_ms < 0)
        return -EINVAL;
    if (atomic_load_explicit(&f->stopping, memory_order_acquire))
        return FETCH_ESHUTDOWN;
    struct xfer *x = calloc(1, sizeof(*x));
    if (!x)
        return -ENOMEM;
    struct fetch_loop *l = &f->loops[loop];
    x->timer = true;
    x->loop = l;
    x->cb = cb;
    x->arg = arg;
    x->t0_us = now_us();
    x->due_us = x->t0_us + (delay_ms > INT64_MAX / 2000 ? INT64_MAX / 2 : delay_ms * 1000);
    x->ctx = ctx_ref(c);
    ctx_hook_add(c, &x->hook, on_ctx_done, x);
    pthread_mutex_lock(&l->mu);
    if (l->stopping) {
        pthread_mutex_unlock(&l->mu);
        ctx_hook_remove(c, &x->hook);
        ctx_unref(x->ctx);
        free(x);
        return FETCH_ESHUTDOWN;
    }
    bool was_empty = l->inbox.head == NULL;
    queue_push(&l->inbox, x);
    atomic_store_explicit(&x->handed, true, memory_order_release);
    if (this_loop == l)
        l->self_inbox = true;
    else if (was_empty)
        curl_multi_wakeup(l->multi);
    pthread_mutex_unlock(&l->mu);
    return 0;
}

unsigned fetch_loops(const struct fetch *f)
{
    return f->nloops;
}

unsigned fetch_pick_loop(struct fetch *f)
{
    return atomic_fetch_add_explicit(&f->next_loop, 1, memory_order_relaxed) % f->nloops;
}

void fetch_stats(struct fetch *f, struct fetch_stats *s)
{
    s->ok = atomic_load_explicit(&f->outcomes[OUTCOME_OK], memory_order_relaxed);
    s->status = atomic_load_explicit(&f->outcomes[OUTCOME_STATUS], memory_order_relaxed);
    s->unreachable = atomic_load_explicit(&f->outcomes[OUTCOME_UNREACHABLE], memory_order_relaxed);
    s->deadline = atomic_load_explicit(&f->outcomes[OUTCOME_DEADLINE], memory_order_relaxed);
    s->canceled = atomic_load_explicit(&f->outcomes[OUTCOME_CANCELED], memory_order_relaxed);
    s->too_large = atomic_load_explicit(&f->outcomes[OUTCOME_TOO_LARGE], memory_order_relaxed);
    s->in_flight = atomic_load_explicit(&f->in_flight, memory_order_relaxed);
    s->conns_opened = atomic_load_explicit(&f->conns_opened, memory_order_relaxed);
    s->bytes = atomic_load_explicit(&f->bytes, memory_order_relaxed);
}

void fetch_free(struct fetch *f)
{
    if (!f)
        return;
    atomic_store_explicit(&f->stopping, true, memory_order_release);
    if (f->resolver)
        fetch__resolver_stop(f->resolver); /* queued lookups are dropped */
    for (unsigned i = 0; i < f->nloops; i++) {
        struct fetch_loop *l = &f->loops[i];
        pthread_mutex_lock(&l->mu);
        l->stopping = true;
        if (l->started)
            curl_multi_wakeup(l->multi);
        pthread_mutex_unlock(&l->mu);
    }
    /* Join every loop before tearing any down: a callback still running on one loop may call
     * fetch_get() on another, which takes that loop's mutex (and then sees 'stopping'). */
    for (unsigned i = 0; i < f->nloops; i++)
        if (f->loops[i].started)
            pthread_join(f->loops[i].thread, NULL);
    /* No transfer holds an entry now. This waits for lookups still running: a lookup cannot be
     * interrupted (it is bounded by the system resolver's own timeouts). */
    fetch__resolver_free(f->resolver);
    for (unsigned i = 0; i < f->nloops; i++) {
        struct fetch_loop *l = &f->loops[i];
        curl_multi_cleanup(l->multi);
        free(l->spare);
        free(l->timers);
        pthread_mutex_destroy(&l->mu);
    }
    free(f->loops);
    free(f);
}

static int loop_init(struct fetch *f, struct fetch_loop *l, unsigned cap)
{
    l->f = f;
    l->multi = curl_multi_init();
    if (!l->multi)
        return -ENOMEM;
    int err = -pthread_mutex_init(&l->mu, NULL);
    if (err) {
        curl_multi_cleanup(l->multi);
        return err;
    }
    curl_multi_setopt(l->multi, CURLMOPT_MAXCONNECTS, (long)cap);
    curl_multi_setopt(l->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)cap);
    l->limit = f->opts.h2c ? cap * H2_STREAMS_PER_CONN : cap;
    int64_t poll = f->opts.idle_poll_ms > 0 ? f->opts.idle_poll_ms : POLL_MS;
    l->poll_ms = poll > INT_MAX ? INT_MAX : (int)poll;
    return 0;
}

bool fetch_h2c_supported(void)
{
    /* Before 8.0.0, libcurl reusing an HTTP/2 prior-knowledge connection stacks a second HTTP/2
     * layer on it, and every later transfer on it fails with "Error in the HTTP2 framing layer"
     * (curl issue 10634, fixed in 8.0.0). Seen here with 7.88.1 against nginx: with reuse being
     * the point of h2c, such a build must not offer it. */
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    return v->version_num >= 0x080000 && (v->features & CURL_VERSION_HTTP2);
}

int fetch_new(const struct fetch_opts *o, struct fetch **out)
{
    *out = NULL;
    if (!o || o->loops == 0 || o->max_conns < o->loops || o->max_body == 0 ||
        o->max_body > SIZE_MAX / 2)
        return -EINVAL;
    if (o->h2c && !fetch_h2c_supported())
        return -ENOTSUP;
    struct fetch *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->opts = *o;
    if (f->opts.recv_buffer == 0)
        f->opts.recv_buffer = FETCH_RECV_BUFFER;
    else if (f->opts.recv_buffer < FETCH_RECV_BUFFER_MIN)
        f->opts.recv_buffer = FETCH_RECV_BUFFER_MIN;
    else if (f->opts.recv_buffer > FETCH_RECV_BUFFER_MAX)
        f->opts.recv_buffer = FETCH_RECV_BUFFER_MAX;
    static const char *const proxy_vars[] = {"http_proxy", "HTTP_PROXY", "https_proxy",
                                             "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                                             "no_proxy", "NO_PROXY"};
    for (size_t i = 0; i < sizeof(proxy_vars) / sizeof(proxy_vars[0]); i++)
        if (getenv(proxy_vars[i]))
            f->proxy_env = true;
    f->loops = calloc(o->loops, sizeof(*f->loops));
    if (!f->loops) {
        free(f);
        return -ENOMEM;
    }
    unsigned cap = o->max_conns / o->loops;
    if (cap < 1)
        cap = 1;
    int64_t ttl = o->dns_ttl_ms > 0 ? o->dns_ttl_ms : DNS_TTL_MS;
    f->resolver = fetch__resolver_new(o->resolver_threads ? o->resolver_threads : RESOLVER_THREADS,
                                      ttl, ttl < DNS_NEG_TTL_MS ? ttl : DNS_NEG_TTL_MS, o->lookup,
                                      o->lookup_arg, on_dns_answer, f);
    if (!f->resolver) {
        free(f->loops);
        free(f);
        return -ENOMEM;
    }
    int err = fetch__resolver_start(f->resolver);
    for (unsigned i = 0; i < o->loops && !err; i++) {
        err = loop_init(f, &f->loops[i], cap);
        if (!err)
            f->nloops++;
    }
    for (unsigned i = 0; i < f->nloops && !err; i++) {
        err = -pthread_create(&f->loops[i].thread, NULL, loop_main, &f->loops[i]);
        if (!err)
            f->loops[i].started = true;
    }
    if (err) {
        fetch_free(f); /* stops and joins what started; nothing was queued */
        return err;
    }
    *out = f;
    return 0;
}
