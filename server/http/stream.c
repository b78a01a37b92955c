/* stream: the NDJSON transport. The batch's loop thread writes lines into 'q' through the line
 * writer (render.h); libmicrohttpd's content reader takes them out on the connection's worker
 * and, when there is nothing to send yet, suspends the connection until the next line (or the
 * end) resumes it.
 *
 * THREADS: stream_start(), stream_read(), stream_response_gone() and stream_request_done() run
 * on the connection's libmicrohttpd worker; stream_emit() and on_stream_done() on the batch's
 * fetch loop thread. Everything they share is under st->mu.
 *
 * OWNERSHIP: two references. The response's is dropped when libmicrohttpd destroys it
 * (stream_response_gone(), which also cancels a batch still running: the client is gone); the
 * batch's when it is done (on_stream_done()). The last one frees the batch and the stream.
 * Memory is bounded by --max-response-bytes: the line writer stops queueing at that cap.
 *
 * LOCK ORDER, outermost first:
 *   1. libmicrohttpd's mutex of the response, held by libmicrohttpd while it calls
 *      stream_read().
 *   2. st->mu, one per stream.
 *   3. Taken with st->mu held, innermost:
 *      a. libmicrohttpd's daemon mutex for suspended connections, inside
 *         MHD_suspend_connection() (stream_read) and MHD_resume_connection() (stream_wake);
 *      b. the watch's table mutex, inside watch_remove() (stream_unwatch), which also waits
 *         for a cancel of this batch's ctx that the watch thread may have in progress.
 * Why it cannot deadlock: every path takes them in that order and none the other way round.
 * Nothing here takes 1 with st->mu held: MHD_queue_response() and MHD_destroy_response() are
 * called with st->mu released. libmicrohttpd holds 3a only to move connections between its
 * lists and calls nothing of ours meanwhile (0.9.75 and 1.0 release it before they notify,
 * read from or destroy a response; the one exception, upgraded connections, fanout does not
 * use). The watch thread holds 3b only to look an entry up, never while it cancels; the cancel
 * watch_remove() may wait for runs only ctx hooks (the fetch loops' and channels' wake-ups),
 * which take their own innermost locks and never st->mu, so that wait always ends.
 * Keep it so: with st->mu held, call no libmicrohttpd response function, no ctx_cancel() (it
 * runs hooks; stream_response_gone() cancels after unlocking) and nothing of the batch's. */
#include "server/http/stream.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "server/batch/batch.h"
#include "server/batch/render.h"
#include "server/batch/request.h"
#include "server/http/admit.h"
#include "server/http/srv_impl.h"
#include "server/http/watch.h"
#include "server/json.h"

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
        conn_resume(st->s, st->conn);
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

/* libmicrohttpd's content reader (the worker, holding the response's mutex). */
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

bool stream_wanted(struct MHD_Connection *conn)
{
    const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_ACCEPT);
    return a && strcasestr(a, "application/x-ndjson") != NULL;
}

/* A stream for 'rq' (taken) with its batch made and its lines wired, and the response that
 * reads it; NULL when out of memory (everything freed). The caller holds the one reference. */
static struct stream *stream_new(struct req *r, struct request *rq, struct MHD_Response **resp)
{
    struct srv *s = r->s;
    struct stream *st = calloc(1, sizeof(*st));
    if (!st) {
        request_free(rq);
        return NULL;
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
    *resp = rc == 0 ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read,
                                                        st, stream_response_gone)
                    : NULL;
    if (!*resp) {
        stream_unref(st);
        return NULL;
    }
    return st;
}

/* The batch could not be handed to its loop ('rc'): nothing will run. Frees the stream (with
 * 'resp') and answers the error. */
static enum MHD_Result stream_not_run(struct req *r, struct stream *st, struct MHD_Response *resp,
                                      int rc)
{
    atomic_fetch_sub(&st->refs, 1); /* the batch's */
    pthread_mutex_lock(&st->mu);
    stream_unwatch(st);
    st->done = true;
    pthread_mutex_unlock(&st->mu);
    MHD_destroy_response(resp); /* drops the response's reference: frees the stream */
    if (rc == FETCH_ESHUTDOWN)
        return admit_reject(r, "the server is shutting down; retry on another instance");
    return conn_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
}

enum MHD_Result stream_start(struct req *r, struct request *rq)
{
    struct srv *s = r->s;
    struct MHD_Response *resp;
    struct stream *st = stream_new(r, rq, &resp);
    if (!st)
        return conn_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci && watch_add(s->watch, ci->connect_fd, batch_ctx(st->batch), &st->watch_token) == 0)
        st->watched = true;
    atomic_fetch_add(&st->refs, 1); /* the batch's */
    int rc = batch_run(st->batch);
    if (rc != 0)
        return stream_not_run(r, st, resp, rc);
    r->stream = st;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/x-ndjson");
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (atomic_load(&s->draining))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    admit_leave_gauge(r); /* answered: the 200 is queued */
    enum MHD_Result ret = MHD_queue_response(r->conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp); /* the connection holds it now (or, if queueing failed, frees
                                   it: the batch is canceled as for a client gone) */
    if (ret == MHD_YES) {
        r->answered = true;
        r->status = MHD_HTTP_OK;
    }
    return ret;
}

bool stream_request_done(struct stream *st, const char **code)
{
    pthread_mutex_lock(&st->mu);
    bool done = st->done;
    if (done) /* the line writer is finished with: its error code */
        *code = st->lw.code;
    stream_unwatch(st); /* before the socket is closed */
    pthread_mutex_unlock(&st->mu);
    return done;
}
