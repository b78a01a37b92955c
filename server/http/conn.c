/* conn: the per-connection request machine: libmicrohttpd's handler calls for one request,
 * from its headers through its body to its answer and completion, and its access log line.
 *
 * THREADS: every function here runs on the thread that runs the connection's daemon (a fetch
 * loop with --loop-model shared, a libmicrohttpd worker with split), except on_batch_done(),
 * which runs on the batch's fetch loop thread, and conn_on_guard_timeout() and conn_new_id(),
 * which the guard thread calls. A batch request is parsed here (request.h), admitted (admit.h)
 * and run by batch.h on a fetch loop (shared: the connection's own, fetch_pick_loop()); its
 * connection is suspended meanwhile and resumed from that loop's thread when the batch is done
 * (conn_resume()); the answer is rendered (render.h) and queued on the connection's thread. A
 * streamed answer is stream.h's.
 *
 * ANSWERS: responses are queued on the handler call after the first, never on the first
 * (libmicrohttpd 0.9.75 closes the connection otherwise), except a body refused by its
 * Content-Length. A body without one that grows past --max-request-bytes (413) or
 * --max-memory (503) is read to its end and dropped, then answered: libmicrohttpd refuses a
 * response queued while the body is still arriving. Past DISCARD_MAX the body is cut off
 * instead: the answer is written straight to the socket and the connection closed, lingering.
 *
 * OBSERVABILITY: every request is counted (by route and status) and timed at completion, in
 * conn_on_completed(), and logged there as one JSON line: batches at info (5xx at warn), probes
 * and /metrics at debug. Log lines are copied into the log writer's ring, never written on a
 * worker.
 *
 * OWNERSHIP: a struct req is calloc'd on the first handler call and freed in
 * conn_on_completed(), with its body buffer (counted in --max-memory until then), its batch
 * and its failing id. A response body is freed by libmicrohttpd through its free callback. */
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/batch/batch.h"
#include "server/batch/render.h"
#include "server/batch/request.h"
#include "server/http/admit.h"
#include "server/http/framing.h"
#include "server/http/guard.h"
#include "server/http/srv_impl.h"
#include "server/http/stream.h"
#include "server/http/watch.h"
#include "server/json.h"
#include "server/membudget.h"
#include "server/obs/log.h"
#include "server/obs/metrics.h"

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

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

static bool is_probe(const struct req *r)
{
    return r->route == R_HEALTHZ || r->route == R_READYZ || r->route == R_METRICS;
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

enum MHD_Result conn_respond(struct req *r, unsigned status, const char *ctype, char *body,
                             size_t len, bool owned, bool charge)
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
    if (r->close || (atomic_load(&r->s->draining) &&
                     (!is_probe(r) || status == MHD_HTTP_SERVICE_UNAVAILABLE)))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    guard_body_done(r->gc); /* answered: no body deadline any more, even one not read */
    admit_leave_gauge(r); /* before the client can see the answer; a failed queue closes it */
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
    return conn_respond(r, status, ctype, body, len, owned, false);
}

/* A cut-off body's answer written straight to the socket (libmicrohttpd has written nothing
 * for this request), then the connection closed, lingering. Returns MHD_NO, which closes it. */
static enum MHD_Result answer_on_socket(struct req *r, unsigned status, const char *code,
                                        const char *message)
{
    r->err_code = code;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci && guard_body_done(r->gc) &&
        guard_answer(ci->connect_fd, status, code, message, r->request_id)) {
        r->answered = true;
        r->status = status;
        guard_linger(r->gc);
    }
    return MHD_NO;
}

enum MHD_Result conn_error(struct req *r, unsigned status, const char *code,
                           const char *message)
{
    if (r->cut_off)
        return answer_on_socket(r, status, code, message);
    struct json_buf b;
    json_buf_init(&b);
    json_error_doc(&b, code, message, NULL);
    r->err_code = code;
    if (json_buf_failed(&b)) {
        json_buf_destroy(&b);
        admit_leave_gauge(r);
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

void conn_new_id(void *arg, char *out)
{
    new_request_id(arg, out);
}

/* Ready only while some upstream has a member (the set follows DNS and the upstreams file). */
static bool upstreams_ready(struct srv *s)
{
    struct upstreams *ups = upstream_live_get(s->ups);
    bool any = upstreams_any_member(ups);
    upstreams_free(ups);
    return any;
}

static enum MHD_Result serve_metrics(struct req *r)
{
    struct fetch_stats fs;
    fetch_stats(r->s->fetch, &fs);
    struct json_buf b;
    json_buf_init(&b);
    struct upstreams *ups = upstream_live_get(r->s->ups);
    metrics_render(&r->s->metrics, &fs, ups, &b);
    upstreams_free(ups);
    if (json_buf_failed(&b)) {
        json_buf_destroy(&b);
        return MHD_NO;
    }
    size_t len;
    char *body = json_buf_take(&b, &len);
    return respond(r, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len, true);
}

/* ---------------------------------------------------------------- batches */

void conn_resume(struct srv *s, struct MHD_Connection *conn)
{
    MHD_resume_connection(conn);
    fetch_source_kick(s->fetch);
}

/* The batch is done (on its fetch loop's thread): hand the connection back to a worker. */
static void on_batch_done(void *arg)
{
    struct req *r = arg;
    if (r->watched)
        watch_remove(r->s->watch, r->watch_token);
    struct srv *s = r->s;
    struct MHD_Connection *conn = r->conn;
    atomic_store(&r->batch_done, true); /* last touch of the request from this thread */
    conn_resume(s, conn);
}

/* Back on a worker after the resume: the answer, or a close when the client went away. */
static enum MHD_Result answer_batch(struct req *r)
{
    struct srv *s = r->s;
    if (r->start_err == FETCH_ESHUTDOWN)
        return admit_reject(r, "the server is shutting down; retry on another instance");
    if (r->start_err)
        return conn_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    if (batch_err(r->batch) == -EPIPE) {
        r->err_code = "client_closed";
        admit_leave_gauge(r);
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
    if (json_buf_failed(&bw.out)) {
        buf_writer_destroy(&bw);
        return conn_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    }
    size_t len;
    char *body = json_buf_take(&bw.out, &len);
    unsigned status = bw.status;
    bool refused = bw.code && !strcmp(bw.code, "overloaded"); /* ended by shutdown */
    buf_writer_destroy(&bw);
    if (!body) {
        admit_leave_gauge(r);
        return MHD_NO;
    }
    if (refused)
        return admit_reject_rendered(r, body, len);
    return conn_respond(r, status, "application/json", body, len, true, true);
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

/* Runs the batch for 'rq' (taken) with a buffered answer: the connection is suspended until
 * on_batch_done() resumes it, and answered by answer_batch() on the call after that. */
static enum MHD_Result start_batch(struct req *r, struct request *rq)
{
    struct srv *s = r->s;
    int rc = batch_new(&s->env, rq, r->request_id, on_batch_done, r, &r->batch);
    if (rc != 0)
        return conn_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
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
        conn_resume(s, r->conn);
    }
    return MHD_YES;
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
        conn_error(r, MHD_HTTP_BAD_REQUEST, "bad_request", msg);
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
        conn_error(r, e.status, e.code, e.message);
        return r->answered ? MHD_YES : MHD_NO;
    }
    r->nids = (unsigned)rq.n;
    if (rq.n == 0) {
        request_free(&rq);
        static char empty[] = "{\"results\":[]}\n";
        return respond(r, MHD_HTTP_OK, "application/json", empty, sizeof(empty) - 1, false);
    }
    if (stream_wanted(r->conn))
        return stream_start(r, &rq);
    return start_batch(r, &rq);
}

static enum MHD_Result dispatch(struct req *r)
{
    static char ok[] = "{\"status\":\"ok\"}\n";
    static char draining[] = "{\"status\":\"draining\"}\n";
    static char no_member[] = "{\"status\":\"no_upstream_member\"}\n";
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
        if (!upstreams_ready(r->s))
            return respond(r, MHD_HTTP_SERVICE_UNAVAILABLE, "application/json", no_member,
                           sizeof(no_member) - 1, false);
        return respond(r, MHD_HTTP_OK, "application/json", ok, sizeof(ok) - 1, false);
    case R_METRICS:
        return serve_metrics(r);
    case R_BAD_METHOD:
        snprintf(msg, sizeof(msg), "method %s is not allowed on %s", r->method, r->path);
        return conn_error(r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed", msg);
    case R_NOT_FOUND:
        break;
    }
    snprintf(msg, sizeof(msg), "no such path: %s", r->path);
    return conn_error(r, MHD_HTTP_NOT_FOUND, "not_found", msg);
}

/* ---------------------------------------------------------------- the body */

static enum MHD_Result body_too_large(struct req *r)
{
    char msg[128];
    snprintf(msg, sizeof(msg), "request body exceeds %zu bytes (--max-request-bytes)",
             r->s->cfg.max_request_bytes);
    return conn_error(r, 413, "body_too_large", msg);
}

/* The answer to a body refused while it arrived: 413 past --max-request-bytes, or 503
 * overloaded past --max-memory; at its end, or on the socket once it is cut off. */
static enum MHD_Result refuse_body(struct req *r)
{
    if (r->too_large)
        return body_too_large(r);
    char msg[160];
    snprintf(msg, sizeof(msg), "the memory for request bodies is spent (--max-memory %zu "
             "bytes); retry later", r->s->cfg.max_memory);
    return admit_reject(r, msg);
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

/* An upload call with 'n' bytes of body. */
static enum MHD_Result body_piece(struct req *r, const char *data, size_t n)
{
    if (r->answered)
        return MHD_YES; /* discard */
    if (r->route != R_BATCH) { /* bodies of other routes are ignored, up to a bound */
        r->discarded += n;
        return r->discarded > DISCARD_MAX ? MHD_NO : MHD_YES;
    }
    if (r->too_large || r->over_memory) {
        /* libmicrohttpd cannot queue a response while the body is still arriving, so the
         * rest of a body without Content-Length is read and dropped, and answered at its
         * end; past DISCARD_MAX it is cut off: the answer is written to the socket here
         * instead, and the connection closes lingering. */
        r->discarded += n;
        if (r->discarded <= DISCARD_MAX)
            return MHD_YES;
        r->cut_off = true;
        return refuse_body(r);
    }
    int rc = take_body(r, data, n);
    if (rc == -E2BIG || rc == -ENOSPC) {
        r->too_large = rc == -E2BIG;
        r->over_memory = rc == -ENOSPC;
        r->discarded = n;
        drop_body(r);
    }
    return rc == -ENOMEM ? MHD_NO : MHD_YES;
}

/* The last upload call: the body is in (or there was none). */
static enum MHD_Result body_end(struct req *r)
{
    if (r->answered)
        return MHD_YES;
    if (!guard_body_done(r->gc)) /* answered 408 already: close */
        return MHD_NO;
    if (r->too_large || r->over_memory)
        return refuse_body(r);
    return dispatch(r);
}

/* ---------------------------------------------------------------- the headers */

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

/* A request's record, made on its first handler call; NULL when out of memory. */
static struct req *req_new(struct srv *s, struct MHD_Connection *conn, const char *url,
                           const char *method)
{
    struct req *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
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
    return r;
}

/* The first handler call: the header fields are in, none of the body. Takes the request id
 * and refuses what the framing or the Content-Length rules out. */
static enum MHD_Result on_headers(struct req *r, const char *version)
{
    struct head h;
    framing_init(&h.f);
    h.rid = NULL;
    h.rid_len = 0;
    h.rids = 0;
    MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, on_header, &h);
    framing_trim(&h.rid, &h.rid_len);
    bool rid_ok = h.rids == 1 && request_id_ok(h.rid, h.rid_len);
    if (rid_ok) {
        memcpy(r->request_id, h.rid, h.rid_len);
        r->request_id[h.rid_len] = '\0';
    } else {
        new_request_id(r->s, r->request_id);
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
        return conn_error(r, v.status, v.code, v.message);
    }
    if (r->route == R_BATCH) {
        /* Refuse a body that announces itself too large before reading it; the connection
         * closes after the answer (lingering, for a client still writing). */
        const char *cl =
            MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > r->s->cfg.max_request_bytes) {
            r->close = true;
            guard_linger(r->gc);
            return body_too_large(r);
        }
    }
    return MHD_YES;
}

enum MHD_Result conn_on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                const char *method, const char *version,
                                const char *upload_data, size_t *upload_data_size,
                                void **req_cls)
{
    struct req *r = *req_cls;
    if (!r) {
        if (!(r = req_new(cls, conn, url, method)))
            return MHD_NO;
        *req_cls = r;
        return on_headers(r, version);
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        return body_piece(r, upload_data, n);
    }
    return body_end(r);
}

/* ---------------------------------------------------------------- completion and logging */

/* The access log line of a completed request. */
static void log_request(struct srv *s, struct req *r, int64_t dur_us,
                        enum MHD_RequestTerminationCode toe)
{
    enum log_level lvl = is_probe(r) ? LOG_DEBUG : (r->status >= 500 ? LOG_WARN : LOG_INFO);
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

void conn_on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                       enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    struct srv *s = cls;
    struct req *r = *req_cls;
    if (!r)
        return;
    *req_cls = NULL;
    int64_t dur = now_us() - r->start_us;
    const char *code = NULL;
    /* The response holds the stream until libmicrohttpd drops it; the socket leaves the watch
     * now, before it is closed. A stream that ended overloaded was refused. */
    if (r->stream && stream_request_done(r->stream, &code)) {
        r->err_code = code;
        if (code && !strcmp(code, "overloaded"))
            admit_reject_streamed(r);
    }
    if (!r->answered && guard_timed_out(r->gc)) { /* its body missed --body-timeout-ms */
        r->answered = true;
        r->status = 408;
        r->err_code = "request_timeout";
    }
    guard_request_done(r->gc);
    metrics_count_status(&s->metrics, metrics_route_of(r->route), r->answered ? r->status : 0);
    hist_observe(&s->metrics.request_seconds, dur);
    log_request(s, r, dur, toe);
    if (r->batch)
        batch_free(r->batch);
    admit_release(r);
    free(r->fail_id);
    drop_body(r);
    free(r);
}

/* Every connection is registered with the guard from its accept to its close. */
void conn_on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                        enum MHD_ConnectionNotificationCode toe)
{
    struct srv *s = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        /* Each answer is read before the next call: libmicrohttpd 1.0 returns them all in one
         * union of the connection's, which the next call overwrites. */
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        int fd = ci ? ci->connect_fd : -1;
        ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        const struct sockaddr *peer = ci ? ci->client_addr : NULL;
        struct guard_conn *gc = fd >= 0 ? guard_conn_open(s->guard, fd, peer) : NULL;
        *socket_context = gc;
        /* Over --max-clients-per-ip: closed unanswered (libmicrohttpd sees the end at once). */
        if (guard_conn_refused(gc))
            shutdown(fd, SHUT_RDWR);
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        guard_conn_close(s->guard, *socket_context);
        *socket_context = NULL;
    }
}

/* The guard answered a request 408 before its headers were in: no handler call, so no
 * request line: count it and log it here. One whose body was late is logged at completion. */
void conn_on_guard_timeout(void *arg, bool in_body, const char *request_id)
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
