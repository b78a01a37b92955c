/* xfer: one transfer in curl: easy handles and their options, curl's callbacks, start, and
 * completion.
 *
 * Threads: the loop thread alone. A transfer is the loop's from admission on; fetch__complete()
 * and fetch__complete_ctx() remove its ctx hook (ctx_hook_remove() waits if the hook is running
 * right now), take it off the canceled list if its hook put it there, recycle its easy handle
 * onto the loop's free list, count it, call the callback with no lock held (the callback owns
 * the body from then on), drop the ctx reference and free the transfer. Timers end here too,
 * with nothing to count. Easy handles are the loop's: configured once (easy_get()), reset to
 * point at nothing when a transfer lets go of one (easy_put()), freed when the loop ends. */
#include "fetch/fetch_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BODY_MIN_CAP 1024 /* first body buffer when no Content-Length is known */

/* ---------------------------------------------------------------- curl's callbacks */

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

/* ---------------------------------------------------------------- easy handles */

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
    curl_easy_setopt(e, CURLOPT_CONNECT_TO, NULL);
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

void fetch__easy_free_spares(struct fetch_loop *l)
{
    while (l->nspare > 0)
        curl_easy_cleanup(l->spare[--l->nspare]);
}

/* ---------------------------------------------------------------- completion */

/* Ends a fetch_after() timer: no transfer, nothing to count. */
static void complete_timer(struct fetch_loop *l, struct xfer *x, int err, bool from_ctx)
{
    struct fetch_result r = {.err = err, .aborted = from_ctx};
    ctx_hook_remove(x->ctx, &x->hook);
    fetch__canceled_forget(l, x);
    r.detail = err == 0 ? "timer" : from_ctx ? "canceled" : "fetch engine shutting down";
    r.elapsed_us = fetch__now_us() - x->t0_us;
    r.elapsed_ms = r.elapsed_us / 1000;
    x->cb(x->arg, &r);
    ctx_unref(x->ctx);
    free(x);
}

/* Lets go of what a transfer holds in the loop: its easy handle (reading the status and the
 * connections it opened into *status and the counters), its ctx hook, its place on a canceled
 * list, its pinned addresses and its hold on a resolver entry. */
static void release(struct fetch_loop *l, struct xfer *x, long *status)
{
    struct fetch *f = l->f;
    if (x->easy) {
        long conns = 0;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, status);
        curl_easy_getinfo(x->easy, CURLINFO_NUM_CONNECTS, &conns);
        if (conns > 0)
            atomic_fetch_add_explicit(&f->conns_opened, (uint64_t)conns, memory_order_relaxed);
        easy_put(l, x->easy);
        x->easy = NULL;
    }
    ctx_hook_remove(x->ctx, &x->hook); /* waits if the hook is running; never fires after */
    fetch__canceled_forget(l, x);
    x->hdrs = NULL; /* its nodes are the transfer's own */
    curl_slist_free_all(x->pin);
    x->pin = NULL;
    if (x->dns) {
        fetch__resolve_release(f->resolver, x->dns);
        x->dns = NULL;
    }
}

/* The text of a result: 'detail' when given (except for the codes that have their own), else
 * one for 'err'. May write into 'buf'. */
static const char *result_detail(const struct xfer *x, int err, long status, const char *detail,
                                 char *buf, size_t size)
{
    if (err == FETCH_ESTATUS) {
        snprintf(buf, size, "upstream answered with status %ld", status);
        return buf;
    }
    if (err == FETCH_ETOOBIG) {
        snprintf(buf, size, "upstream body larger than %zu bytes", x->max_body);
        return buf;
    }
    if (err == 0)
        return "ok";
    if (detail)
        return detail;
    if (err == -ETIMEDOUT)
        return "deadline exceeded";
    if (err == FETCH_ESHUTDOWN)
        return "fetch engine shutting down";
    if (err == -ECANCELED)
        return "canceled";
    if (err == FETCH_EUNREACH)
        return "upstream unreachable";
    snprintf(buf, size, "canceled: %s", strerror(-err));
    return buf;
}

/* Completes 'x' with 'err' (its easy handle, if any, already out of the multi): counts, calls the
 * callback and frees the transfer. 'detail' may be NULL for the default text of 'err'. */
static void complete_as(struct fetch_loop *l, struct xfer *x, int err, const char *detail,
                        bool from_ctx)
{
    if (x->timer) {
        complete_timer(l, x, err, from_ctx);
        return;
    }
    struct fetch *f = l->f;
    struct fetch_result r = {.err = err, .aborted = from_ctx};
    release(l, x, &r.status);
    char buf[CURL_ERROR_SIZE + 64];
    r.detail = result_detail(x, err, r.status, detail, buf, sizeof(buf));
    if (err == 0 || err == FETCH_ESTATUS) {
        r.body = x->body; /* the callback owns it now */
        r.len = x->len;
    } else {
        free(x->body);
    }
    x->body = NULL;
    r.elapsed_us = fetch__now_us() - x->t0_us;
    r.elapsed_ms = r.elapsed_us / 1000;
    struct outcome o = outcome_of(err, r.status, from_ctx);
    atomic_fetch_add_explicit(&f->outcomes[o.kind], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&f->bytes, x->received, memory_order_relaxed);
    atomic_fetch_sub_explicit(&f->in_flight, 1, memory_order_relaxed);

    x->cb(x->arg, &r);
    ctx_unref(x->ctx);
    free(x);
}

void fetch__complete(struct fetch_loop *l, struct xfer *x, int err, const char *detail)
{
    complete_as(l, x, err, detail, false);
}

void fetch__complete_ctx(struct fetch_loop *l, struct xfer *x, int cause)
{
    complete_as(l, x, cause, NULL, true);
}

/* ---------------------------------------------------------------- in and out of curl */

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

/* Aborts a started transfer because its ctx is done ('cause'), or at shutdown. */
void fetch__abort_active(struct fetch_loop *l, struct xfer *x, int cause)
{
    active_del(l, x);
    curl_multi_remove_handle(l->multi, x->easy);
    fetch__complete_ctx(l, x, cause);
}

/* Maps a finished curl transfer to a result and completes it. */
static void finish(struct fetch_loop *l, struct xfer *x, CURLcode rc)
{
    if (rc == CURLE_OK) {
        long status = 0;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
        fetch__complete(l, x, status >= 200 && status <= 299 ? 0 : FETCH_ESTATUS, NULL);
        return;
    }
    if (x->bad_status) {
        fetch__complete(l, x, FETCH_EUNREACH, "malformed status line from the upstream");
        return;
    }
    if (x->too_big || rc == CURLE_FILESIZE_EXCEEDED) {
        fetch__complete(l, x, FETCH_ETOOBIG, NULL);
        return;
    }
    const char *text = x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc);
    if (rc == CURLE_OPERATION_TIMEDOUT) {
        /* TIMEOUT_MS is the ctx's remaining time, so a curl timeout at the deadline is the
         * deadline; one well before it came from the connect cap: the upstream is unreachable. */
        int cause = ctx_err(x->ctx);
        if (cause != 0 && cause != -ETIMEDOUT) {
            fetch__complete_ctx(l, x, cause);
            return;
        }
        if (cause == -ETIMEDOUT ||
            (ctx_deadline(x->ctx) != CTX_FOREVER && ctx_remaining(x->ctx) <= 1)) {
            fetch__complete(l, x, -ETIMEDOUT, text);
            return;
        }
    }
    fetch__complete(l, x, FETCH_EUNREACH, text);
}

/* Puts 'x' into the multi, or completes it if it must not start. */
void fetch__start(struct fetch_loop *l, struct xfer *x)
{
    int cause = ctx_err(x->ctx);
    if (cause != 0) {
        fetch__complete_ctx(l, x, cause);
        return;
    }
    int64_t left = ctx_remaining(x->ctx);
    if (left == 0) { /* past the deadline; the timer has not fired yet */
        fetch__complete_ctx(l, x, -ETIMEDOUT);
        return;
    }
    if (!x->connect_to.data && !fetch__resolving_enter(l, x))
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
        int64_t waited = (fetch__now_us() - x->resolve_t0_us) / 1000;
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
    curl_easy_setopt(e, CURLOPT_CONNECT_TO, x->connect_to.data ? &x->connect_to : NULL);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(left == CTX_FOREVER ? 0 : left));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)conn_ms);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)x->max_body);
    if (curl_multi_add_handle(l->multi, e) != CURLM_OK)
        goto nomem;
    active_add(l, x);
    return;
nomem:
    fetch__complete(l, x, FETCH_EUNREACH, "out of memory starting the transfer");
}

/* Completes the transfers curl reports done. */
void fetch__reap_done(struct fetch_loop *l)
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
