/* srv: the libmicrohttpd front end, routing, probes, metrics and the server's lifecycle.
 *
 * THREADS: libmicrohttpd runs --http-threads epoll workers (MHD_USE_EPOLL_INTERNAL_THREAD with a
 * thread pool); every handler call happens on one of them. A batch request is parsed here
 * (request.h), admitted here, and run by batch.h on a fetch loop; its connection is suspended
 * meanwhile and resumed from that loop's thread when the batch is done; the answer is rendered
 * (render.h) and queued back on a worker. This file alone touches libmicrohttpd connections,
 * suspend/resume, admission and the gauges. Responses are queued
 * on the handler call after the first, never on the first (libmicrohttpd 0.9.75 closes the
 * connection otherwise), except a body refused by its Content-Length. A body without one that
 * grows past --max-request-bytes is read to its end and dropped (up to DISCARD_MAX), then
 * answered 413: libmicrohttpd refuses a response queued while the body is still arriving.
 *
 * GAUGES: fanout_requests_in_flight counts batches admitted and not yet answered: it falls
 * when the answer is queued (or the connection is closed unanswered). The drain waits on a
 * separate count, 'active', that falls only when libmicrohttpd reports the request complete
 * (the answer sent), so nothing is cut off mid-write.
 *
 * OBSERVABILITY: every request is counted (by route and status) and timed at completion, in
 * on_completed(), and logged there as one JSON line: batches at info (5xx at warn), probes and
 * /metrics at debug. Counters are relaxed atomics (metrics.h); a scrape reads them without a
 * lock. Log lines are copied into the log writer's ring, never written on a worker.
 *
 * LIFECYCLE: srv_new() starts the log writer, the ctx timer thread (ctx.h starts it on the first
 * deadline; arming one here moves that out of the first request), the watch thread, the fetch
 * loops, the demo upstream and the daemon. srv_drain() turns /readyz to 503, stops accepting,
 * waits for batches in flight until the drain deadline, cancels the rest (they answer 503) and
 * waits for their answers, logging each step. srv_free() stops the daemon (no connection is
 * suspended any more) and then every other thread, in reverse order of creation; the ctx timer
 * is process-wide and stopped by ctx_shutdown() in main. */
#include "server/http/srv.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/batch.h"
#include "server/batch/budget.h"
#include "server/demo/demo.h"
#include "server/batch/flight.h"
#include "server/http/framing.h"
#include "server/http/guard.h"
#include "server/json.h"
#include "server/obs/log.h"
#include "server/membudget.h"
#include "server/obs/metrics.h"
#include "server/batch/render.h"
#include "server/batch/request.h"
#include "server/version.h"
#include "server/http/watch.h"

enum route { R_BATCH, R_HEALTHZ, R_READYZ, R_METRICS, R_NOT_FOUND, R_BAD_METHOD };

#define REQUEST_ID_MAX 128

struct srv {
    struct srv_config cfg;         /* effective configuration */
    struct MHD_Daemon *mhd;        /* the front end */
    struct fetch *fetch;           /* the upstream engine */
    struct upstreams *ups;         /* the upstream set */
    struct watch *watch;           /* disconnect watch for suspended connections */
    struct guard *guard;           /* header and body deadlines, lingering closes */
    struct membudget mem;          /* --max-memory: bodies and answers held, all requests */
    struct log *log;               /* JSON line writer */
    struct demo *demo;             /* built-in demo upstream, or NULL */
    struct ctx *root;              /* parent of every request ctx; canceled at shutdown */
    struct budget hedge_budget;    /* hedges: --hedge-budget-pct of first attempts */
    struct budget retry_budget;    /* retries: --retry-budget-pct plus 10 a second */
    struct flights *flights;       /* running flights (coalescing) */
    bool budgets;                  /* the budgets were initialised */
    struct batch_env env;          /* what every batch runs with */
    char upstream[2048];           /* the first upstream template (the demo's with --demo) */
    struct metrics metrics;        /* counters and histograms */
    uint16_t port;                 /* bound port */
    atomic_bool draining;          /* readyz 503, new batches 503 */
    bool drained;                  /* srv_drain ran; only the owner thread reads/writes it */
    atomic_int_fast64_t active;    /* batches admitted and not yet completed (sent or closed) */
    pthread_mutex_t mu;            /* guards nothing but pairs with cv */
    pthread_cond_t cv;             /* signalled when a batch request completes */
    atomic_uint_fast64_t seq;      /* request id sequence */
    atomic_int_fast64_t mhd_log_sec;   /* second of the current libmicrohttpd log budget */
    atomic_int_fast64_t mhd_log_count; /* libmicrohttpd lines logged in that second */
    uint64_t id_seed;              /* random part of generated request ids */
};

/* One HTTP request, from its first handler call to libmicrohttpd's completion notice. */
struct req {
    struct srv *s;                 /* the server */
    struct MHD_Connection *conn;   /* the connection */
    struct guard_conn *gc;         /* its deadlines (the socket context), or NULL */
    bool close;                    /* answer with Connection: close (framing errors, 413) */
    bool over_memory;              /* the body did not fit in --max-memory: 503 once it ends */
    enum route route;              /* what was asked */
    const char *method;            /* MHD's string, valid for the request */
    char path[64];                 /* request path, truncated, for the log */
    int64_t start_us;              /* monotonic start */
    char request_id[REQUEST_ID_MAX + 1]; /* given or generated */
    bool bad_request_id;           /* the client's X-Request-Id was unusable (batch: 400) */
    char *body;                    /* request body (batch only), NUL-terminated */
    size_t body_len, body_cap;     /* bytes read, allocated */
    bool too_large;                /* the body passed --max-request-bytes: 413 once it ends */
    size_t discarded;              /* body bytes dropped since then */
    bool admitted;                 /* counted in 'active' (and, until answered, the gauge) */
    bool in_gauge;                 /* still counted in fanout_requests_in_flight */
    bool answered;                 /* a response was queued */
    unsigned status;               /* status of the queued response */
    const char *err_code;          /* JSON error code sent, or NULL */
    char *fail_id;                 /* JSON text of the failing id for the log, or NULL */
    unsigned nids;                 /* ids in the batch */
    struct batch *batch;           /* the running or finished batch, or NULL */
    int start_err;                 /* the batch could not be handed to its loop */
    atomic_bool batch_done;        /* the batch called back (set on the loop thread) */
    struct stream *stream;         /* an NDJSON answer in progress, or NULL */
    bool watched;                  /* the socket is in the watch */
    uint64_t watch_token;          /* its token */
};

static enum metrics_route metrics_route_of(enum route r)
{
    switch (r) {
    case R_BATCH:
        return ROUTE_BATCH;
    case R_HEALTHZ:
        return ROUTE_HEALTHZ;
    case R_READYZ:
        return ROUTE_READYZ;
    case R_METRICS:
        return ROUTE_METRICS;
    default:
        return ROUTE_OTHER;
    }
}

/* The batch's answer is queued (or will never be): it leaves the in-flight gauge. */
static void leave_gauge(struct req *r)
{
    if (r->in_gauge) {
        r->in_gauge = false;
        atomic_fetch_sub(&r->s->metrics.in_flight, 1);
    }
}

#define LOG_RING_BYTES (4u << 20)
/* Body bytes of a request already refused as too large that are read and dropped before the
 * connection is closed instead. */
#define DISCARD_MAX ((size_t)1 << 20)
/* After the drain deadline, how long canceled batches get to send their 503s. */
#define DRAIN_CANCEL_GRACE_MS 5000
#define MHD_LOG_PER_SEC 10
/* Lingering closes at once (each holds a descriptor beyond --max-clients for up to
 * --linger-ms); past it a connection closes at once. */
#define LINGER_MAX 1024

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---------------------------------------------------------------- responses */

/* A rendered answer counted in --max-memory until libmicrohttpd lets it go. */
struct charged {
    struct membudget *mem; /* the server's */
    char *body;            /* the answer (owned) */
    size_t len;            /* its length, as taken from the budget */
};

static void charged_free(void *cls)
{
    struct charged *c = cls;
    membudget_give(c->mem, c->len);
    free(c->body);
    free(c);
}

/* A response for 'body' (owned when 'owned'; then also counted in --max-memory when 'charge'),
 * or NULL (the body freed) when out of memory. */
static struct MHD_Response *make_response(struct srv *s, char *body, size_t len, bool owned,
                                          bool charge)
{
    if (!owned)
        return MHD_create_response_from_buffer(len, body, MHD_RESPMEM_PERSISTENT);
    struct charged *c = charge ? malloc(sizeof(*c)) : NULL;
    if (!charge)
        return MHD_create_response_from_buffer_with_free_callback(len, body, free);
    struct MHD_Response *resp =
        c ? MHD_create_response_from_buffer_with_free_callback_cls(len, body, charged_free, c)
          : NULL;
    if (!resp) {
        free(c);
        free(body);
        return NULL;
    }
    *c = (struct charged){.mem = &s->mem, .body = body, .len = len};
    membudget_force(&s->mem, len); /* it exists already; admission looks at the total */
    return resp;
}

/* Queues a response (takes ownership of 'body', a malloc'd buffer, when 'owned'; a batch's
 * answer, 'charge', counts in --max-memory while it is held). Adds X-Request-Id and
 * Content-Type. Returns MHD_queue_response's result. */
static enum MHD_Result respond_charged(struct req *r, unsigned status, const char *ctype,
                                       char *body, size_t len, bool owned, bool charge)
{
    struct MHD_Response *resp = make_response(r->s, body, len, owned, charge);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
    if (status == MHD_HTTP_SERVICE_UNAVAILABLE)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(
            resp, MHD_HTTP_HEADER_ALLOW,
            r->route == R_BAD_METHOD && !strcmp(r->path, "/v1/batch") ? "POST" : "GET, HEAD");
    /* While draining, a client should take its next request elsewhere: close after answering.
     * Probes keep their connection unless the answer is 503, so a prober sees /readyz turn 503
     * on the connection it holds instead of a 200 that closes it. */
    bool probe = r->route == R_HEALTHZ || r->route == R_READYZ || r->route == R_METRICS;
    if (r->close ||
        (atomic_load(&r->s->draining) && (!probe || status == MHD_HTTP_SERVICE_UNAVAILABLE)))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    guard_body_done(r->gc); /* answered: no body deadline any more, even one not read */
    leave_gauge(r); /* before the client can see the answer; a failed queue closes it */
    enum MHD_Result ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    if (ret == MHD_YES) { /* otherwise the connection closes unanswered (status 0) */
        r->answered = true;
        r->status = status;
    }
    return ret;
}

static enum MHD_Result respond(struct req *r, unsigned status, const char *ctype, char *body,
                               size_t len, bool owned)
{
    return respond_charged(r, status, ctype, body, len, owned, false);
}

/* Queues {"error":{"code":..,"message":..}}. */
static enum MHD_Result error_resp(struct req *r, unsigned status, const char *code,
                                  const char *message)
{
    struct json_buf b;
    json_buf_init(&b);
    json_error_doc(&b, code, message, NULL);
    r->err_code = code;
    if (json_buf_failed(&b)) {
        json_buf_destroy(&b);
        leave_gauge(r);
        return MHD_NO;
    }
    size_t len;
    char *body = json_buf_take(&b, &len);
    return respond(r, status, "application/json", body, len, true);
}

/* ---------------------------------------------------------------- routing */

static enum route route_of(const char *url, const char *method)
{
    static const struct {
        const char *path;
        enum route route;
        const char *method;
    } routes[] = {{"/v1/batch", R_BATCH, "POST"},
                  {"/healthz", R_HEALTHZ, "GET"},
                  {"/readyz", R_READYZ, "GET"},
                  {"/metrics", R_METRICS, "GET"}};
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
        if (strcmp(url, routes[i].path) != 0)
            continue;
        if (!strcmp(method, routes[i].method) ||
            (!strcmp(routes[i].method, "GET") && !strcmp(method, "HEAD")))
            return routes[i].route;
        return R_BAD_METHOD;
    }
    return R_NOT_FOUND;
}

static bool request_id_ok(const char *v, size_t n)
{
    if (n == 0 || n > REQUEST_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (v[i] <= 0x20 || v[i] >= 0x7f || v[i] == '"' || v[i] == '\\')
            return false;
    return true;
}

static void new_request_id(struct srv *s, char *out)
{
    uint64_t x = s->id_seed + atomic_fetch_add(&s->seq, 1) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 30; /* splitmix64 finaliser: unique per sequence number, spread out */
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    snprintf(out, REQUEST_ID_MAX + 1, "%016" PRIx64, x);
}

static enum MHD_Result serve_metrics(struct req *r)
{
    struct fetch_stats fs;
    fetch_stats(r->s->fetch, &fs);
    struct json_buf b;
    json_buf_init(&b);
    metrics_render(&r->s->metrics, &fs, r->s->ups, &b);
    if (json_buf_failed(&b)) {
        json_buf_destroy(&b);
        return MHD_NO;
    }
    size_t len;
    char *body = json_buf_take(&b, &len);
    return respond(r, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len, true);
}

/* ---------------------------------------------------------------- batches */

/* Wakes srv_drain() when the last active batch is gone. */
static void active_dec(struct srv *s)
{
    if (atomic_fetch_sub(&s->active, 1) == 1) {
        pthread_mutex_lock(&s->mu);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

/* Admission: at most --max-requests batches in flight; none while draining.
 * 'active' is raised before 'draining' is read (both sequentially consistent), the mirror of
 * srv_drain(), which sets 'draining' and then waits for 'active' to reach 0: either the drain
 * sees this request and waits for it, or this request sees the drain and backs out. Checking
 * 'draining' first would let a request slip in after the drain found the server idle, and be
 * suspended while the daemon is being stopped. */
static bool admit(struct req *r)
{
    struct srv *s = r->s;
    atomic_fetch_add(&s->active, 1);
    int64_t before = atomic_fetch_add(&s->metrics.in_flight, 1);
    r->admitted = r->in_gauge = true;
    const char *why = NULL;
    char msg[160];
    if (atomic_load(&s->draining)) {
        why = "the server is draining; retry on another instance";
    } else if (before >= (int64_t)s->cfg.max_requests) {
        snprintf(msg, sizeof(msg), "%u batch requests already in flight (--max-requests)",
                 s->cfg.max_requests);
        why = msg;
    } else if (!membudget_room(&s->mem, s->cfg.max_body, r->body_cap)) {
        /* a batch that could not hold even one upstream body would only fail later */
        snprintf(msg, sizeof(msg), "the memory for requests in flight is spent (--max-memory "
                 "%zu bytes); retry later", s->cfg.max_memory);
        why = msg;
    }
    if (!why)
        return true;
    r->admitted = false;
    active_dec(s);
    atomic_fetch_add(&s->metrics.rejected, 1);
    error_resp(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded", why);
    return false;
}

/* The batch is done (on its fetch loop's thread): hand the connection back to a worker. */
static void on_batch_done(void *arg)
{
    struct req *r = arg;
    if (r->watched)
        watch_remove(r->s->watch, r->watch_token);
    atomic_store(&r->batch_done, true);
    MHD_resume_connection(r->conn); /* last touch of the request from this thread */
}

/* Back on a worker after the resume: the answer, or a close when the client went away. */
static enum MHD_Result answer_batch(struct req *r)
{
    struct srv *s = r->s;
    if (r->start_err) {
        if (r->start_err == FETCH_ESHUTDOWN) {
            atomic_fetch_add(&s->metrics.rejected, 1);
            return error_resp(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded",
                              "the server is shutting down; retry on another instance");
        }
        return error_resp(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    }
    if (batch_err(r->batch) == -EPIPE) {
        r->err_code = "client_closed";
        leave_gauge(r);
        return MHD_NO; /* the client went away: close, nobody to answer */
    }
    struct render_limits lim = {.timeout_ms = batch_timeout_ms(r->batch),
                                .max_body = s->cfg.max_body,
                                .max_response_bytes = s->cfg.max_response_bytes};
    struct buf_writer bw;
    buf_writer_init(&bw, &lim);
    batch_render(r->batch, &bw.w);
    r->err_code = bw.code;
    r->fail_id = bw.fail_id;
    bw.fail_id = NULL;
    if (bw.code && !strcmp(bw.code, "overloaded"))
        atomic_fetch_add(&s->metrics.rejected, 1);
    if (json_buf_failed(&bw.out)) {
        buf_writer_destroy(&bw);
        return error_resp(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    }
    size_t len;
    char *body = json_buf_take(&bw.out, &len);
    unsigned status = bw.status;
    buf_writer_destroy(&bw);
    if (!body) {
        leave_gauge(r);
        return MHD_NO;
    }
    return respond_charged(r, status, "application/json", body, len, true, true);
}

/* The value of header 'name' without optional whitespace around it, copied into 'buf'
 * (truncated to size - 1), or NULL when absent. */
static const char *header_trimmed(struct MHD_Connection *conn, const char *name, char *buf,
                                  size_t size)
{
    const char *v;
    size_t n;
    if (MHD_lookup_connection_value_n(conn, MHD_HEADER_KIND, name, strlen(name), &v, &n) !=
            MHD_YES ||
        !v)
        return NULL;
    framing_trim(&v, &n);
    if (n >= size)
        n = size - 1;
    memcpy(buf, v, n);
    buf[n] = '\0';
    return buf;
}

/* ---------------------------------------------------------------- NDJSON streams */

/* An answer streamed as lines (Accept: application/x-ndjson). The batch's loop thread writes
 * lines into 'q' through the line writer; libmicrohttpd's content reader takes them out on the
 * connection's worker and, when there is nothing to send yet, suspends the connection until the
 * next line (or the end) resumes it. Two references: the response's (dropped when
 * libmicrohttpd destroys it, which cancels a batch still running: the client is gone) and the
 * batch's (dropped when it is done); the last one frees the batch and the stream. Memory is
 * bounded by --max-response-bytes: the line writer stops queueing at that cap. */
struct stream {
    pthread_mutex_t mu;
    struct json_buf q;            /* lines not yet handed to libmicrohttpd (mu) */
    size_t off;                   /* bytes of q already handed (mu) */
    bool done;                    /* the last line is in q (mu) */
    bool suspended;               /* the reader is waiting for lines (mu) */
    bool gone;                    /* the response was destroyed: conn is no more (mu) */
    bool watched;                 /* the socket is in the disconnect watch (mu) */
    uint64_t watch_token;
    struct MHD_Connection *conn;
    struct srv *s;
    struct batch *batch;
    struct line_writer lw;        /* the loop thread's, until done */
    atomic_uint refs;
};

static void stream_unref(struct stream *st)
{
    if (atomic_fetch_sub(&st->refs, 1) != 1)
        return;
    batch_free(st->batch);
    line_writer_destroy(&st->lw);
    json_buf_destroy(&st->q);
    pthread_mutex_destroy(&st->mu);
    free(st);
}

/* Mutex held: wakes a reader waiting for lines. */
static void stream_wake(struct stream *st)
{
    if (st->suspended && !st->gone) {
        st->suspended = false;
        MHD_resume_connection(st->conn);
    }
}

/* Mutex held: the socket leaves the watch (before libmicrohttpd closes it, or at the end). */
static void stream_unwatch(struct stream *st)
{
    if (st->watched) {
        st->watched = false;
        watch_remove(st->s->watch, st->watch_token);
    }
}

/* The line writer's output (loop thread). */
static void stream_emit(void *arg, const char *data, size_t len)
{
    struct stream *st = arg;
    pthread_mutex_lock(&st->mu);
    if (data)
        json_buf_append(&st->q, data, len);
    else
        st->q.oom = true; /* the reader ends the stream with an error: never a silent gap */
    stream_wake(st);
    pthread_mutex_unlock(&st->mu);
}

/* The batch is done, its last line written (loop thread). */
static void on_stream_done(void *arg)
{
    struct stream *st = arg;
    pthread_mutex_lock(&st->mu);
    stream_unwatch(st);
    st->done = true;
    stream_wake(st);
    pthread_mutex_unlock(&st->mu);
    stream_unref(st);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    struct stream *st = cls;
    pthread_mutex_lock(&st->mu);
    ssize_t n = 0;
    if (json_buf_failed(&st->q)) {
        n = MHD_CONTENT_READER_END_WITH_ERROR; /* a line was lost: cut the stream visibly */
    } else if (st->off < st->q.len) {
        size_t k = st->q.len - st->off < max ? st->q.len - st->off : max;
        memcpy(buf, st->q.data + st->off, k);
        st->off += k;
        if (st->off == st->q.len) {
            json_buf_clear(&st->q);
            st->off = 0;
        }
        n = (ssize_t)k;
    } else if (st->done) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        st->suspended = true; /* resumed by the next line */
        MHD_suspend_connection(st->conn);
    }
    pthread_mutex_unlock(&st->mu);
    return n;
}

/* libmicrohttpd is done with the response: the connection is over. */
static void stream_response_gone(void *cls)
{
    struct stream *st = cls;
    pthread_mutex_lock(&st->mu);
    st->gone = true;
    stream_unwatch(st);
    bool running = !st->done;
    pthread_mutex_unlock(&st->mu);
    if (running)
        ctx_cancel(batch_ctx(st->batch), -EPIPE); /* the client is gone: stop the rest */
    stream_unref(st);
}

/* Whether the client asked for NDJSON (an Accept naming application/x-ndjson). */
static bool wants_ndjson(struct req *r)
{
    const char *a = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_ACCEPT);
    return a && strcasestr(a, "application/x-ndjson") != NULL;
}

/* Starts the batch for 'rq' (taken) with its answer streamed: 200 at once, a line per
 * position as it completes. */
static enum MHD_Result start_stream(struct req *r, struct request *rq)
{
    struct srv *s = r->s;
    struct stream *st = calloc(1, sizeof(*st));
    if (!st) {
        request_free(rq);
        return error_resp(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    }
    pthread_mutex_init(&st->mu, NULL);
    json_buf_init(&st->q);
    st->conn = r->conn;
    st->s = s;
    atomic_init(&st->refs, 1); /* ours, until the response takes it over */
    int64_t timeout = rq->timeout_ms;
    int rc = batch_new(&s->env, rq, r->request_id, on_stream_done, st, &st->batch);
    struct render_limits lim = {.timeout_ms = timeout,
                                .max_body = s->cfg.max_body,
                                .max_response_bytes = s->cfg.max_response_bytes};
    line_writer_init(&st->lw, &lim, stream_emit, st);
    if (rc == 0)
        rc = batch_stream(st->batch, &st->lw.w);
    struct MHD_Response *resp =
        rc == 0 ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read, st,
                                                    stream_response_gone)
                : NULL;
    if (!resp) {
        stream_unref(st);
        return error_resp(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci && watch_add(s->watch, ci->connect_fd, batch_ctx(st->batch), &st->watch_token) == 0)
        st->watched = true;
    atomic_fetch_add(&st->refs, 1); /* the batch's */
    if ((rc = batch_run(st->batch)) != 0) {
        atomic_fetch_sub(&st->refs, 1);
        pthread_mutex_lock(&st->mu);
        stream_unwatch(st);
        st->done = true; /* nothing will run */
        pthread_mutex_unlock(&st->mu);
        MHD_destroy_response(resp); /* drops the response's reference: frees the stream */
        if (rc == FETCH_ESHUTDOWN) {
            atomic_fetch_add(&s->metrics.rejected, 1);
            return error_resp(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded",
                              "the server is shutting down; retry on another instance");
        }
        return error_resp(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    }
    r->stream = st;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/x-ndjson");
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (atomic_load(&s->draining))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    leave_gauge(r); /* answered: the 200 is queued */
    enum MHD_Result ret = MHD_queue_response(r->conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp); /* the connection holds it now (or, if queueing failed, frees
                                   it: the batch is canceled as for a client gone) */
    if (ret == MHD_YES) {
        r->answered = true;
        r->status = MHD_HTTP_OK;
    }
    return ret;
}

/* POST /v1/batch, once its body is in (and again after the resume). */
static enum MHD_Result handle_batch(struct req *r)
{
    struct srv *s = r->s;
    if (r->batch || r->start_err) /* called again after the resume */
        return atomic_load(&r->batch_done) || r->start_err ? answer_batch(r) : MHD_YES;
    /* A refusal that could not even be queued (out of memory) closes the connection rather
     * than leave the client waiting for an answer that will never come. */
    if (!admit(r))
        return r->answered ? MHD_YES : MHD_NO;
    if (r->bad_request_id) {
        char msg[160];
        snprintf(msg, sizeof(msg), "X-Request-Id must be 1-%d visible ASCII characters without "
                 "quotes or backslashes", REQUEST_ID_MAX);
        error_resp(r, MHD_HTTP_BAD_REQUEST, "bad_request", msg);
        return r->answered ? MHD_YES : MHD_NO;
    }
    const struct request_limits lim = {.max_batch = s->cfg.max_batch,
                                       .default_timeout_ms = s->cfg.timeout_ms,
                                       .max_timeout_ms = s->cfg.max_timeout_ms};
    struct request rq;
    struct request_error e;
    char tbuf[64];
    const char *th = header_trimmed(r->conn, "X-Request-Timeout-Ms", tbuf, sizeof(tbuf));
    if (request_parse(&lim, r->body, r->body_len, th, &rq, &e) != 0) {
        error_resp(r, e.status, e.code, e.message);
        return r->answered ? MHD_YES : MHD_NO;
    }
    r->nids = (unsigned)rq.n;
    if (rq.n == 0) {
        request_free(&rq);
        static char empty[] = "{\"results\":[]}\n";
        return respond(r, MHD_HTTP_OK, "application/json", empty, sizeof(empty) - 1, false);
    }
    if (wants_ndjson(r))
        return start_stream(r, &rq);
    int rc = batch_new(&s->env, &rq, r->request_id, on_batch_done, r, &r->batch);
    if (rc != 0)
        return error_resp(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    /* Suspend, and watch the socket, before the batch can end: the resume may come any time
     * once it runs. */
    MHD_suspend_connection(r->conn);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci && watch_add(s->watch, ci->connect_fd, batch_ctx(r->batch), &r->watch_token) == 0)
        r->watched = true;
    rc = batch_run(r->batch);
    if (rc != 0) { /* nothing runs: answer on the resumed call */
        if (r->watched)
            watch_remove(s->watch, r->watch_token);
        r->watched = false;
        r->start_err = rc;
        batch_free(r->batch);
        r->batch = NULL;
        MHD_resume_connection(r->conn);
    }
    return MHD_YES;
}

static enum MHD_Result dispatch(struct req *r)
{
    static char ok[] = "{\"status\":\"ok\"}\n";
    static char draining[] = "{\"status\":\"draining\"}\n";
    char msg[160];
    switch (r->route) {
    case R_BATCH:
        return handle_batch(r);
    case R_HEALTHZ:
        return respond(r, MHD_HTTP_OK, "application/json", ok, sizeof(ok) - 1, false);
    case R_READYZ:
        if (atomic_load(&r->s->draining))
            return respond(r, MHD_HTTP_SERVICE_UNAVAILABLE, "application/json", draining,
                               sizeof(draining) - 1, false);
        return respond(r, MHD_HTTP_OK, "application/json", ok, sizeof(ok) - 1, false);
    case R_METRICS:
        return serve_metrics(r);
    case R_BAD_METHOD:
        snprintf(msg, sizeof(msg), "method %s is not allowed on %s", r->method, r->path);
        return error_resp(r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed", msg);
    case R_NOT_FOUND:
        break;
    }
    snprintf(msg, sizeof(msg), "no such path: %s", r->path);
    return error_resp(r, MHD_HTTP_NOT_FOUND, "not_found", msg);
}

static enum MHD_Result body_too_large(struct req *r)
{
    char msg[128];
    snprintf(msg, sizeof(msg), "request body exceeds %zu bytes (--max-request-bytes)",
             r->s->cfg.max_request_bytes);
    return error_resp(r, 413, "body_too_large", msg);
}

static enum MHD_Result over_memory(struct req *r)
{
    char msg[160];
    snprintf(msg, sizeof(msg), "the memory for request bodies is spent (--max-memory %zu "
             "bytes); retry later", r->s->cfg.max_memory);
    atomic_fetch_add(&r->s->metrics.rejected, 1);
    return error_resp(r, MHD_HTTP_SERVICE_UNAVAILABLE, "overloaded", msg);
}

/* A body still arriving past DISCARD_MAX: its answer (413, or 503 for --max-memory) written
 * straight to the socket (libmicrohttpd has written nothing for this request), then the
 * connection closed, lingering. Returns MHD_NO, which closes it. */
static enum MHD_Result answer_on_socket(struct req *r)
{
    char msg[160];
    unsigned status = r->too_large ? 413 : 503;
    r->err_code = r->too_large ? "body_too_large" : "overloaded";
    if (r->too_large)
        snprintf(msg, sizeof(msg), "request body exceeds %zu bytes (--max-request-bytes)",
                 r->s->cfg.max_request_bytes);
    else
        snprintf(msg, sizeof(msg), "the memory for request bodies is spent (--max-memory %zu "
                 "bytes); retry later", r->s->cfg.max_memory);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!r->too_large)
        atomic_fetch_add(&r->s->metrics.rejected, 1);
    if (ci && guard_body_done(r->gc) &&
        guard_answer(ci->connect_fd, status, r->err_code, msg, r->request_id)) {
        r->answered = true;
        r->status = status;
        guard_linger(r->gc);
    }
    return MHD_NO;
}

/* Drops the body buffer and gives its bytes back to --max-memory. */
static void drop_body(struct req *r)
{
    membudget_give(&r->s->mem, r->body_cap);
    free(r->body);
    r->body = NULL;
    r->body_len = r->body_cap = 0;
}

/* Appends to r->body. Returns 0, -E2BIG when --max-request-bytes is passed, -ENOSPC when
 * --max-memory is, or -ENOMEM. */
static int take_body(struct req *r, const char *data, size_t n)
{
    size_t cap = r->s->cfg.max_request_bytes;
    if (n > cap - r->body_len)
        return -E2BIG;
    if (r->body_len + n + 1 > r->body_cap) {
        size_t want = r->body_cap ? r->body_cap : 4096;
        while (want < r->body_len + n + 1)
            want *= 2;
        if (want > cap + 1)
            want = cap + 1;
        if (!membudget_take(&r->s->mem, want - r->body_cap))
            return -ENOSPC; /* --max-memory: answered 503 once the body ends */
        char *nb = realloc(r->body, want);
        if (!nb) {
            membudget_give(&r->s->mem, want - r->body_cap);
            return -ENOMEM;
        }
        r->body = nb;
        r->body_cap = want;
    }
    memcpy(r->body + r->body_len, data, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return 0;
}

/* What the first handler call gathers from the header fields. */
struct head {
    struct framing f; /* the framing verdict so far */
    const char *rid;  /* X-Request-Id's value (its last line), or NULL */
    size_t rid_len;   /* its length: a NUL inside counts */
    unsigned rids;    /* X-Request-Id lines */
};

static enum MHD_Result on_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                 size_t key_size, const char *value, size_t value_size)
{
    (void)kind;
    struct head *h = cls;
    framing_field(&h->f, key, key_size, value ? value : "", value ? value_size : 0);
    if (key_size == 12 && !strncasecmp(key, "X-Request-Id", 12)) {
        h->rids++;
        h->rid = value ? value : "";
        h->rid_len = value ? value_size : 0;
    }
    return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls)
{
    struct srv *s = cls;
    struct req *r = *req_cls;
    if (!r) {
        r = calloc(1, sizeof(*r));
        if (!r)
            return MHD_NO;
        r->s = s;
        r->conn = conn;
        r->start_us = now_us();
        r->method = method;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        r->gc = ci ? ci->socket_context : NULL;
        const char *path = framing_target_path(url); /* origin or absolute form */
        snprintf(r->path, sizeof(r->path), "%s", path);
        r->route = route_of(path, method);
        *req_cls = r;
        struct head h;
        framing_init(&h.f);
        h.rid = NULL;
        h.rid_len = 0;
        h.rids = 0;
        MHD_get_connection_values_n(conn, MHD_HEADER_KIND, on_header, &h);
        framing_trim(&h.rid, &h.rid_len);
        bool rid_ok = h.rids == 1 && request_id_ok(h.rid, h.rid_len);
        if (rid_ok) {
            memcpy(r->request_id, h.rid, h.rid_len);
            r->request_id[h.rid_len] = '\0';
        } else {
            new_request_id(s, r->request_id);
        }
        r->bad_request_id = h.rids && !rid_ok;
        if (!guard_headers_done(r->gc)) /* answered 408 already: close */
            return MHD_NO;
        struct framing_verdict v;
        if (!framing_finish(&h.f, version, &v)) {
            /* Nothing of the body is read: answer, close, and linger so that a client still
             * writing it reads the answer. */
            r->close = true;
            guard_linger(r->gc);
            return error_resp(r, v.status, v.code, v.message);
        }
        if (r->route == R_BATCH) {
            /* Refuse a body that announces itself too large before reading it; the
             * connection closes after the answer (lingering, for a client still writing). */
            const char *cl =
                MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
            if (cl && strtoull(cl, NULL, 10) > s->cfg.max_request_bytes) {
                r->close = true;
                guard_linger(r->gc);
                return body_too_large(r);
            }
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (r->answered)
            return MHD_YES; /* discard */
        if (r->route != R_BATCH) { /* bodies of other routes are ignored, up to a bound */
            r->discarded += n;
            return r->discarded > DISCARD_MAX ? MHD_NO : MHD_YES;
        }
        if (r->too_large || r->over_memory) {
            /* libmicrohttpd cannot queue a response while the body is still arriving, so the
             * rest of a body without Content-Length is read and dropped, and answered at its
             * end; past DISCARD_MAX the answer is written to the socket here instead, and the
             * connection closes lingering. */
            r->discarded += n;
            return r->discarded > DISCARD_MAX ? answer_on_socket(r) : MHD_YES;
        }
        int rc = take_body(r, upload_data, n);
        if (rc == -E2BIG || rc == -ENOSPC) {
            r->too_large = rc == -E2BIG;
            r->over_memory = rc == -ENOSPC;
            r->discarded = n;
            drop_body(r);
        }
        return rc == -ENOMEM ? MHD_NO : MHD_YES;
    }
    if (r->answered)
        return MHD_YES;
    if (!guard_body_done(r->gc)) /* answered 408 already: close */
        return MHD_NO;
    if (r->too_large)
        return body_too_large(r);
    if (r->over_memory)
        return over_memory(r);
    return dispatch(r);
}

/* ---------------------------------------------------------------- completion and logging */

static void log_request(struct srv *s, struct req *r, int64_t dur_us,
                        enum MHD_RequestTerminationCode toe)
{
    bool probe = r->route == R_HEALTHZ || r->route == R_READYZ || r->route == R_METRICS;
    enum log_level lvl = probe ? LOG_DEBUG : (r->status >= 500 ? LOG_WARN : LOG_INFO);
    if (!log_enabled(s->log, lvl))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, lvl, "request");
    json_buf_append_str(&b, ",\"request_id\":");
    json_append_string(&b, r->request_id, strlen(r->request_id));
    json_buf_append_str(&b, ",\"method\":");
    json_append_string(&b, r->method, strlen(r->method));
    json_buf_append_str(&b, ",\"path\":");
    json_append_string(&b, r->path, strlen(r->path));
    json_buf_printf(&b, ",\"status\":%u,\"ids\":%u,\"duration_ms\":%.3f", r->status, r->nids,
                    (double)dur_us / 1000.0);
    if (r->err_code)
        json_buf_printf(&b, ",\"error\":\"%s\"", r->err_code);
    if (r->fail_id) {
        json_buf_append_str(&b, ",\"failed_id\":");
        json_buf_append_str(&b, r->fail_id);
    }
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
        json_buf_printf(&b, ",\"terminated\":%d", (int)toe);
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    struct srv *s = cls;
    struct req *r = *req_cls;
    if (!r)
        return;
    *req_cls = NULL;
    int64_t dur = now_us() - r->start_us;
    if (r->stream) {
        pthread_mutex_lock(&r->stream->mu);
        if (r->stream->done) /* the line writer is finished with: its error code, for the log */
            r->err_code = r->stream->lw.code;
        pthread_mutex_unlock(&r->stream->mu);
        if (r->err_code && !strcmp(r->err_code, "overloaded")) /* ended by shutdown */
            atomic_fetch_add(&s->metrics.rejected, 1);
    }
    if (!r->answered && guard_timed_out(r->gc)) { /* its body missed --body-timeout-ms */
        r->answered = true;
        r->status = 408;
        r->err_code = "request_timeout";
    }
    guard_request_done(r->gc);
    metrics_count_status(&s->metrics, metrics_route_of(r->route), r->answered ? r->status : 0);
    metrics_observe(&s->metrics.request_seconds, dur);
    log_request(s, r, dur, toe);
    if (r->batch)
        batch_free(r->batch);
    if (r->stream) { /* the response holds the stream until libmicrohttpd drops it */
        pthread_mutex_lock(&r->stream->mu);
        stream_unwatch(r->stream); /* before the socket is closed */
        pthread_mutex_unlock(&r->stream->mu);
    }
    leave_gauge(r); /* a connection that failed before its answer was queued */
    if (r->admitted)
        active_dec(s);
    free(r->fail_id);
    drop_body(r);
    free(r);
}

/* Every connection is registered with the guard from its accept to its close. */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    struct srv *s = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        *socket_context = ci ? guard_conn_open(s->guard, ci->connect_fd) : NULL;
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        guard_conn_close(s->guard, *socket_context);
        *socket_context = NULL;
    }
}

/* The guard answered a request 408 before its headers were in: no handler call, so no
 * request line: count it and log it here. One whose body was late is logged at completion. */
static void on_guard_timeout(void *arg, bool in_body, const char *request_id)
{
    struct srv *s = arg;
    if (in_body)
        return;
    metrics_count_status(&s->metrics, ROUTE_OTHER, 408);
    if (!log_enabled(s->log, LOG_INFO))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, LOG_INFO, "request");
    json_buf_append_str(&b, ",\"request_id\":");
    json_append_string(&b, request_id, strlen(request_id));
    json_buf_printf(&b, ",\"status\":408,\"error\":\"request_timeout\",\"phase\":\"headers\"");
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

static void guard_new_id(void *arg, char *out)
{
    new_request_id(arg, out);
}

static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    struct srv *s = cls;
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    /* Closing a connection whose client went away is reported by MHD as an internal error;
     * it is expected here (the request's own log line says client_closed). */
    enum log_level lvl =
        strstr(msg, "Application reported internal error") ? LOG_DEBUG : LOG_WARN;
    if (!log_enabled(s->log, lvl))
        return;
    /* MHD can repeat a message in a tight loop (e.g. out of file descriptors): at most
     * MHD_LOG_PER_SEC lines a second reach the log, the rest are counted as dropped. */
    int64_t sec = ctx_now() / 1000;
    int64_t prev = atomic_load(&s->mhd_log_sec);
    if (prev != sec && atomic_compare_exchange_strong(&s->mhd_log_sec, &prev, sec))
        atomic_store(&s->mhd_log_count, 0);
    if (atomic_fetch_add(&s->mhd_log_count, 1) >= MHD_LOG_PER_SEC) {
        atomic_fetch_add_explicit(&s->metrics.log_dropped, 1, memory_order_relaxed);
        return;
    }
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, lvl, "http");
    json_buf_append_str(&b, ",\"detail\":");
    json_append_string(&b, msg, n);
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

/* ---------------------------------------------------------------- lifecycle */

/* Binds and listens on 'ss' ourselves, so a failure names its real reason and port (for the
 * socket handed to libmicrohttpd, MHD_OPTION_LISTEN_SOCKET). Returns the descriptor, or
 * -errno with the reason in err. */
static int bind_listen(const struct srv_config *c, const struct sockaddr_storage *ss, char *err,
                       size_t errlen)
{
    const char *fmt = strchr(c->listen_host, ':') ? "[%s]:%u" : "%s:%u";
    char where[300];
    snprintf(where, sizeof(where), fmt, c->listen_host, c->listen_port);
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot listen on %s: socket: %s", where, strerror(e));
        return -e;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)); /* restarts: TIME_WAIT */
    if (ss->ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    socklen_t len = ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                              : sizeof(struct sockaddr_in);
    if (bind(fd, (const struct sockaddr *)ss, len) != 0 || listen(fd, 4096) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot listen on %s: %s", where, strerror(e));
        close(fd);
        return -e;
    }
    return fd;
}

static void log_startup(struct srv *s)
{
    if (!log_enabled(s->log, LOG_INFO))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, LOG_INFO, "starting");
    json_buf_printf(&b,
                    ",\"version\":\"%s\",\"pid\":%ld,\"port\":%u,\"http_threads\":%u,"
                    "\"fetch_threads\":%u",
                    FANOUT_VERSION, (long)getpid(), s->port, s->cfg.http_threads,
                    s->cfg.fetch_threads);
    json_buf_append_str(&b, ",\"upstream\":");
    json_append_string(&b, s->upstream, strlen(s->upstream));
    json_buf_append_str(&b, ",\"upstreams\":[");
    for (unsigned i = 0; i < upstreams_count(s->ups); i++) {
        const char *t = upstream_template(s->ups, i);
        json_buf_append_str(&b, i ? "," : "");
        json_append_string(&b, t, strlen(t));
    }
    json_buf_append_str(&b, "],\"config\":");
    char *cfg = NULL;
    size_t cfglen = 0;
    FILE *mem = open_memstream(&cfg, &cfglen);
    if (mem) {
        config_print_json(&s->cfg, mem);
        fclose(mem);
        json_buf_append(&b, cfg, cfglen);
        free(cfg);
    } else {
        json_buf_append_str(&b, "null");
    }
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

/* Logs 'msg' with extra members 'fmt' (",\"key\":value" pieces, printf-style). */
static void log_fields(struct srv *s, enum log_level lvl, const char *msg, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Every client connection and every upstream connection is a descriptor. When RLIMIT_NOFILE
 * cannot hold --max-clients + --max-conns + LINGER_MAX (+ a margin for the process's own), the
 * server would hit EMFILE at accept time, where libmicrohttpd busy-waits; lower --max-clients
 * instead, and say so. */
static void fit_fd_budget(struct srv *s)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return;
    uint64_t reserve = (uint64_t)s->cfg.max_conns + 64 + LINGER_MAX;
    if ((uint64_t)s->cfg.max_clients + reserve <= rl.rlim_cur)
        return;
    uint64_t fit = rl.rlim_cur > reserve + 16 ? rl.rlim_cur - reserve : 16;
    log_fields(s, LOG_WARN, "--max-clients lowered to fit RLIMIT_NOFILE",
               ",\"max_clients\":%" PRIu64 ",\"requested\":%u,\"rlimit_nofile\":%" PRIu64, fit,
               s->cfg.max_clients, (uint64_t)rl.rlim_cur);
    s->cfg.max_clients = (unsigned)fit;
}

/* Retries the retry budget allows a second whatever the traffic (Finagle's floor). */
#define RETRY_FLOOR_PER_S 10

/* Outlier ejection's events, from whichever thread noticed them. */
static void on_upstream_event(void *arg, unsigned idx, bool ejected, int64_t ms)
{
    struct srv *s = arg;
    const char *label = upstream_label(s->ups, idx);
    if (ejected)
        log_fields(s, LOG_WARN, "upstream ejected",
                   ",\"upstream\":\"%s\",\"eject_ms\":%" PRId64 ",\"ejections\":%" PRIu64, label, ms,
                   upstream_ejections(s->ups, idx));
    else
        log_fields(s, LOG_INFO, "upstream returned", ",\"upstream\":\"%s\"", label);
}

int srv_new(const struct srv_config *cfg, int log_fd, struct srv **out, char *err, size_t errlen)
{
    struct srv *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->cfg = *cfg;
    metrics_init(&s->metrics);
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca; /* drain waits are on the monotonic clock, like every deadline */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    s->id_seed = (uint64_t)ts.tv_nsec * 6364136223846793005ull ^ (uint64_t)getpid() << 32 ^
                 (uint64_t)ts.tv_sec;
    int rc = log_new(log_fd, cfg->log_level, LOG_RING_BYTES, &s->metrics.log_dropped, &s->log);
    if (rc) {
        snprintf(err, errlen, "cannot start the log writer: %s", strerror(-rc));
        goto fail;
    }
    if (!(s->root = ctx_new(ctx_background(), CTX_FOREVER))) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    /* Start ctx's timer thread now, not on the first request's deadline, so that every thread
     * the server runs exists once srv_new() returns: arming any deadline starts it (ctx.h), and
     * it keeps running until ctx_shutdown() (main calls it after srv_free()). */
    ctx_free(ctx_with_timeout(ctx_background(), 3600000));
    const char *tmpls[UPSTREAMS_MAX];
    unsigned ntmpl = 0;
    char *list = NULL;
    if (cfg->demo) {
        if ((rc = demo_start("127.0.0.1", 0, &s->demo)) != 0) {
            snprintf(err, errlen, "cannot start the demo upstream: %s", strerror(-rc));
            goto fail;
        }
        demo_url_template(s->demo, s->upstream, sizeof(s->upstream));
        tmpls[ntmpl++] = s->upstream;
    } else {
        list = strdup(cfg->upstream);
        if (!list) {
            rc = -ENOMEM;
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        ntmpl = config_split_upstreams(list, tmpls, UPSTREAMS_MAX);
        snprintf(s->upstream, sizeof(s->upstream), "%s", ntmpl ? tmpls[0] : "");
    }
    struct upstreams_opts uo = {.policy = cfg->upstream_policy,
                                .eject_after = cfg->eject_after,
                                .eject_ms = cfg->eject_ms,
                                .eject_max_ms = cfg->eject_max_ms,
                                .max_ejected_pct = cfg->max_ejected_pct,
                                .on_event = on_upstream_event,
                                .event_arg = s};
    char terr[512];
    rc = upstreams_new(tmpls, ntmpl, &uo, &s->ups, terr, sizeof(terr));
    free(list);
    if (rc != 0) {
        snprintf(err, errlen, "--upstream: %s", rc == -ENOMEM ? "out of memory" : terr);
        goto fail;
    }
    budget_init(&s->hedge_budget, cfg->hedge_budget_pct, 0, ctx_now());
    budget_init(&s->retry_budget, cfg->retry_budget_pct, RETRY_FLOOR_PER_S, ctx_now());
    s->budgets = true;
    if (!(s->flights = flights_new())) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if ((rc = watch_new(&s->watch)) != 0) {
        snprintf(err, errlen, "cannot start the disconnect watch: %s", strerror(-rc));
        goto fail;
    }
    struct fetch_opts fo;
    fetch_opts_default(&fo);
    fo.loops = cfg->fetch_threads;
    fo.max_conns = cfg->max_conns;
    fo.max_body = cfg->max_body;
    fo.recv_buffer = cfg->upstream_buffer;
    fo.connect_timeout_ms = cfg->connect_timeout_ms;
    fo.h2c = cfg->h2c;
    if ((rc = fetch_new(&fo, &s->fetch)) != 0) {
        if (rc == -ENOTSUP) { /* a configuration this build cannot serve: exit 2 */
            rc = -EINVAL;
            snprintf(err, errlen, "--h2c needs libcurl 8.0.0 or later with HTTP/2 (this is %s: "
                     "it breaks reused HTTP/2 prior-knowledge connections)",
                     curl_version_info(CURLVERSION_NOW)->version);
        } else {
            snprintf(err, errlen, "cannot start the fetch loops: %s", strerror(-rc));
        }
        goto fail;
    }
    fit_fd_budget(s);
    s->env = (struct batch_env){.flight = {.fetch = s->fetch,
                                           .ups = s->ups,
                                           .root = s->root,
                                           .hedge_budget = &s->hedge_budget,
                                           .retry_budget = &s->retry_budget,
                                           .metrics = &s->metrics,
                                           .flights = s->flights,
                                           .hedge_after_ms = cfg->hedge_after_ms,
                                           .hedge_auto = cfg->hedge_auto,
                                           .retries = cfg->retries},
                                .limit = cfg->limit,
                                .max_response_bytes = cfg->max_response_bytes,
                                .max_body = cfg->max_body,
                                .coalesce = cfg->coalesce,
                                .spread_min = cfg->spread_min};
    membudget_init(&s->mem, cfg->max_memory);
    s->env.mem = &s->mem;
    struct guard_opts go = {.header_timeout_ms = cfg->header_timeout_ms,
                            .body_timeout_ms = cfg->body_timeout_ms,
                            .linger_ms = cfg->linger_ms,
                            .linger_bytes = cfg->linger_bytes,
                            .max_lingering = LINGER_MAX,
                            .on_timeout = on_guard_timeout,
                            .new_id = guard_new_id,
                            .arg = s};
    if ((rc = guard_new(&go, &s->guard)) != 0) {
        snprintf(err, errlen, "cannot start the connection guard: %s", strerror(-rc));
        goto fail;
    }
    struct sockaddr_storage ss;
    if ((rc = config_resolve_listen(cfg, &ss, err, errlen)) != 0)
        goto fail;
    int lfd = bind_listen(cfg, &ss, err, errlen);
    if (lfd < 0) {
        rc = lfd == -EINVAL ? -EADDRNOTAVAIL : lfd; /* exit 1: the system refused, not the config */
        goto fail;
    }
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO |
                     MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_OptionItem opts[] = {
        {MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_logger, s}, /* first, to catch all */
        {MHD_OPTION_LISTEN_SOCKET, lfd, NULL},
        {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, s},
        {MHD_OPTION_PER_IP_CONNECTION_LIMIT, s->cfg.max_clients_per_ip, NULL},
#if MHD_VERSION >= 0x00097701
        /* libmicrohttpd 1.0: refuse what RFC 9112 lets a server refuse (obs-fold, bare CR or
         * LF, whitespace before a colon, malformed chunk sizes) at its strictest level. */
        {MHD_OPTION_CLIENT_DISCIPLINE_LVL, 3, NULL},
#endif
        {MHD_OPTION_CONNECTION_LIMIT, s->cfg.max_clients, NULL},
        {MHD_OPTION_CONNECTION_TIMEOUT, cfg->idle_timeout_s, NULL},
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, 64 * 1024, NULL},
        {MHD_OPTION_LISTEN_BACKLOG_SIZE, 4096, NULL},
        {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, s},
        {cfg->http_threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END, cfg->http_threads,
         NULL},
        {MHD_OPTION_END, 0, NULL},
    };
    s->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s, MHD_OPTION_ARRAY, opts,
                              MHD_OPTION_END);
    if (!s->mhd) {
        close(lfd);
        rc = -EIO;
        snprintf(err, errlen, "cannot start the HTTP front end on %s:%u (libmicrohttpd's reason "
                 "is in the log above)", cfg->listen_host, cfg->listen_port);
        goto fail;
    }
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    s->port = cfg->listen_port;
    if (getsockname(lfd, (struct sockaddr *)&bound, &blen) == 0)
        s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                    : ((struct sockaddr_in *)&bound)->sin_port);
    log_startup(s);
    *out = s;
    return 0;
fail:
    srv_free(s);
    return rc;
}

uint16_t srv_port(const struct srv *s)
{
    return s->port;
}

const char *srv_upstream(const struct srv *s)
{
    return s->upstream;
}

static void log_fields(struct srv *s, enum log_level lvl, const char *msg, const char *fmt, ...)
{
    if (!log_enabled(s->log, lvl))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, lvl, msg);
    va_list ap;
    va_start(ap, fmt);
    char extra[256];
    vsnprintf(extra, sizeof(extra), fmt, ap);
    va_end(ap);
    json_buf_append_str(&b, extra);
    log_end(s->log, &b);
    json_buf_destroy(&b);
}

/* Stops accepting: new connections are refused and those waiting in the backlog are reset.
 *
 * Not MHD_quiesce_daemon(): in libmicrohttpd 0.9.75 it races with the epoll workers, which also
 * remove the listening socket from their epoll sets once they see the daemon quiesced; the loser
 * gets ENOENT and MHD_PANIC()s, aborting the process (seen about once in 2,700 drains here).
 * Instead the listening socket's descriptor is replaced, with dup3(), by an eventfd that never
 * becomes ready: the kernel closes the socket (so connects are refused at once and epoll drops it
 * from every worker's set by itself), libmicrohttpd keeps a valid descriptor that it never sees
 * ready, and closes it as usual in MHD_stop_daemon(). */
static void close_listener(struct srv *s)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_LISTEN_FD);
    int efd = eventfd(0, EFD_CLOEXEC);
    if (!di || efd < 0 || dup3(efd, di->listen_fd, O_CLOEXEC) < 0)
        log_msg(s->log, LOG_WARN, "could not close the listening socket; it stays open until exit");
    if (efd >= 0)
        close(efd);
}

void srv_drain_start(struct srv *s)
{
    if (atomic_exchange(&s->draining, true))
        return;
    log_fields(s, LOG_INFO, "draining", ",\"in_flight\":%" PRIdFAST64 ",\"drain_ms\":%" PRId64,
               atomic_load(&s->active), s->cfg.drain_ms);
    if (s->mhd)
        close_listener(s);
}

int64_t srv_in_flight(struct srv *s)
{
    return atomic_load(&s->metrics.in_flight);
}

int64_t srv_active(struct srv *s)
{
    return atomic_load(&s->active);
}

void srv_cancel_all(struct srv *s)
{
    ctx_cancel(s->root, -ESHUTDOWN);
}

/* Waits until no batch is in flight or 'until' (monotonic ms) passes. */
static bool wait_idle(struct srv *s, int64_t until)
{
    pthread_mutex_lock(&s->mu);
    while (atomic_load(&s->active) > 0 && ctx_now() < until) {
        struct timespec ts = {.tv_sec = until / 1000, .tv_nsec = (until % 1000) * 1000000L};
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    bool idle = atomic_load(&s->active) == 0;
    pthread_mutex_unlock(&s->mu);
    return idle;
}

void srv_drain(struct srv *s, int64_t drain_ms)
{
    s->drained = true;
    int64_t t0 = ctx_now();
    srv_drain_start(s);
    int64_t canceled = 0;
    if (!wait_idle(s, t0 + drain_ms)) {
        canceled = atomic_load(&s->active);
        log_fields(s, LOG_WARN, "drain deadline passed; canceling batches in flight",
                   ",\"in_flight\":%" PRId64, canceled);
        srv_cancel_all(s);
        wait_idle(s, ctx_now() + DRAIN_CANCEL_GRACE_MS);
    }
    log_fields(s, LOG_INFO, "drained",
               ",\"canceled\":%" PRId64 ",\"left\":%" PRIdFAST64 ",\"duration_ms\":%" PRId64,
               canceled, atomic_load(&s->active), ctx_now() - t0);
}

int srv_free(struct srv *s)
{
    if (!s)
        return 0;
    if (s->mhd && !s->drained)
        srv_drain(s, s->cfg.drain_ms);
    if (s->mhd && srv_active(s) > 0) {
        /* Batches that did not end even after their cancellation: MHD_stop_daemon() with
         * suspended connections is an API violation (0.9.75 aborts), and freeing anything they
         * use is unsafe. Leave everything running and tell the caller, who should exit. */
        log_fields(s, LOG_ERROR, "batches still in flight after the drain; not stopping",
                   ",\"in_flight\":%" PRIdFAST64, atomic_load(&s->active));
        struct log *l = s->log; /* written out now: the caller is about to exit */
        s->log = NULL;
        log_free(l);
        return -EBUSY;
    }
    if (s->mhd)
        MHD_stop_daemon(s->mhd);
    guard_free(s->guard); /* after the daemon: no connection is registered any more */
    fetch_free(s->fetch);
    flights_free(s->flights); /* every flight ended with the engine's last callback */
    watch_free(s->watch);
    demo_stop(s->demo);
    upstreams_free(s->ups);
    if (s->budgets) {
        budget_destroy(&s->hedge_budget);
        budget_destroy(&s->retry_budget);
    }
    ctx_free(s->root);
    if (s->log && s->mhd) {
        uint64_t total = 0;
        for (unsigned r = 0; r < ROUTE_COUNT; r++)
            for (unsigned i = 0; i < 600; i++)
                total += atomic_load_explicit(&s->metrics.by_status[r][i], memory_order_relaxed);
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        log_fields(s, LOG_INFO, "stopped", ",\"requests\":%" PRIu64 ",\"uptime_s\":%.3f", total,
                   (double)now.tv_sec + (double)now.tv_nsec / 1e9 - s->metrics.start_time);
    }
    log_free(s->log);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return 0;
}
