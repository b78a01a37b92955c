/* run: the load tool's client (see run.h).
 *
 * DESIGN
 * Each worker thread owns an epoll set (level-triggered) and its connections; nothing is shared
 * between workers but the read-only options and mix, the interrupt flag and the progress
 * atomics. A connection is CLOSED (waiting to reconnect), CONNECTING, IDLE (on the worker's idle
 * stack) or BUSY (a request written or being written, its answer being parsed). One request per
 * connection at a time, no pipelining. The worker sleeps in epoll_pwait2() until the next due
 * request (open loop, nanosecond timeout so sends are not rounded to milliseconds), the end of
 * the run or the next housekeeping tick (timeouts and reconnects, every LT_TICK_NS).
 *
 * A connection closed by the server while idle is reopened at once; one that fails to connect
 * is retried after LT_RETRY_NS. Every figure is counted by the worker that saw it, in its own
 * struct lt_stats, and merged once the workers are joined. */
#include "deploy/loadtest/run.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "deploy/loadtest/http.h"
#include "deploy/loadtest/mix.h"

#define LT_TICK_NS 10000000LL   /* housekeeping: timeouts, reconnects */
#define LT_RETRY_NS 100000000LL /* wait before reconnecting after a failed connect */
#define LT_EVENTS 256           /* events taken per epoll wait */
#define LT_RBUF 65536           /* read buffer, one per worker */

/* 0 running, 1 stop sending, 2 abandon answers in flight. */
static atomic_int interrupt_level;

enum conn_state { C_CLOSED, C_CONNECTING, C_IDLE, C_BUSY };

struct worker;

struct conn {
    struct worker *w;      /* owner */
    int fd;                /* socket or -1 */
    enum conn_state state; /* see DESIGN */
    bool out_armed;        /* EPOLLOUT is in the interest set */
    bool got_bytes;        /* the current answer has begun */
    bool got_line;         /* NDJSON: its first line is in */
    int64_t first_line;    /* NDJSON: when it came */
    int64_t intended;      /* when the current request was due (latency origin) */
    int64_t deadline;      /* when the request (or, CONNECTING, the connect) times out */
    int64_t retry_at;      /* CLOSED: when to reconnect */
    int nids;              /* ids in the current request */
    char *wbuf;            /* the request being written (owned) */
    size_t wlen, woff;     /* its length and what is written */
    struct conn *next;     /* on the idle stack */
    struct lt_http http;   /* the answer's parser */
};

struct worker {
    const struct lt_opts *o; /* borrowed */
    int idx;                 /* 0..threads-1 */
    int ep;                  /* epoll fd */
    struct conn *conns;      /* its connections (owned) */
    int nconns;              /* how many */
    struct conn *idle;       /* idle stack */
    int busy;                /* BUSY connections */
    struct lt_gen gen;       /* request bodies */
    char *body;              /* scratch for one body */
    char head[1500];         /* request head up to "Content-Length: " */
    size_t head_len;         /* its length */
    size_t wcap;             /* allocation of each wbuf */
    int64_t start, end;      /* run start, end of sending */
    double period;           /* open loop: ns between this worker's requests */
    double offset;           /* open loop: this worker's phase */
    uint64_t k;              /* open loop: requests dispatched */
    bool pwait2;             /* epoll_pwait2() works */
    struct lt_stats st;      /* this worker's figures */
    atomic_uint_least64_t p_done, p_ok, p_failed; /* progress, written by this worker only */
    atomic_bool finished;    /* the worker's loop has ended */
    pthread_t th;            /* the thread running worker_main() */
    char rbuf[LT_RBUF];      /* read buffer: answers are parsed straight from it */
};

struct lt_run {
    struct lt_opts o;        /* a copy */
    struct worker **w;       /* threads workers */
    int started;             /* threads created */
};

int64_t lt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void lt_run_interrupt(void)
{
    int v = atomic_load_explicit(&interrupt_level, memory_order_relaxed);
    atomic_store_explicit(&interrupt_level, v < 2 ? v + 1 : 2, memory_order_relaxed);
}

void lt_run_clear_interrupt(void)
{
    atomic_store(&interrupt_level, 0);
}

uint64_t lt_stats_attempts(const struct lt_stats *st)
{
    return st->done + st->connect_errors + st->sock_errors + st->timeouts + st->proto_errors +
           st->unsent;
}

/* ------------------------------------------------------------------ counting */

static void count_code(struct lt_codes *cs, const char *name, uint64_t n)
{
    for (size_t i = 0; i < cs->n; i++)
        if (strcmp(cs->c[i].name, name) == 0) {
            cs->c[i].n += n;
            return;
        }
    if (cs->n == LT_MAX_CODES) {
        cs->other += n;
        return;
    }
    snprintf(cs->c[cs->n].name, sizeof(cs->c[0].name), "%s", name);
    cs->c[cs->n++].n = n;
}

static void merge_codes(struct lt_codes *into, const struct lt_codes *from)
{
    for (size_t i = 0; i < from->n; i++)
        count_code(into, from->c[i].name, from->c[i].n);
    into->other += from->other;
}

/* error.code of a JSON error body, or NULL. */
static const char *json_error_code(cJSON *doc)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(doc, "error");
    const cJSON *c = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "code") : NULL;
    return cJSON_IsString(c) ? c->valuestring : NULL;
}

/* Counts one result entry ({"id", "status", "data"} or {"id", "error": {...}}). */
static void count_entry(struct lt_stats *st, const cJSON *e)
{
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(e, "error");
    if (!cJSON_IsObject(err)) {
        st->entries_ok++;
        return;
    }
    st->entries_failed++;
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
    count_code(&st->entry_codes, cJSON_IsString(code) ? code->valuestring : "(no code)", 1);
}

/* The entries of a 200 JSON body: {"results": [...]}. */
static void count_results(struct lt_stats *st, const struct lt_http *h)
{
    cJSON *doc = h->body && !h->truncated ? cJSON_ParseWithLength(h->body, h->body_n) : NULL;
    const cJSON *res = cJSON_GetObjectItemCaseSensitive(doc, "results");
    if (!cJSON_IsArray(res)) {
        st->entries_unknown++;
    } else {
        const cJSON *e;
        cJSON_ArrayForEach(e, res) count_entry(st, e);
    }
    cJSON_Delete(doc);
}

/* NDJSON line hook: a line with an "index" is one entry. A line cut at LT_HTTP_LINE cannot be
 * parsed; error lines are short (id, code, message), so such a line is taken as a result. */
static void on_line(void *arg, const char *line, size_t n)
{
    struct conn *c = arg;
    struct lt_stats *st = &c->w->st;
    if (!c->got_line) { /* time to the first line: counted with the answer */
        c->got_line = true;
        c->first_line = lt_now_ns();
    }
    cJSON *doc = cJSON_ParseWithLength(line, n);
    if (!doc) {
        if (n >= LT_HTTP_LINE)
            st->entries_ok++;
        return;
    }
    if (cJSON_GetObjectItemCaseSensitive(doc, "index"))
        count_entry(st, doc);
    cJSON_Delete(doc);
}

/* Classifies a complete answer: true for success; otherwise counts its error code. */
static bool classify(struct lt_stats *st, const struct lt_http *h)
{
    if (h->status == 200 && !h->ndjson) {
        if (h->keep_ok)
            count_results(st, h);
        return true;
    }
    cJSON *doc = NULL;
    const char *code;
    bool ok = false;
    if (h->status == 200) { /* an NDJSON stream: its last line says how it ended */
        size_t n;
        const char *line = lt_http_last_line(h, &n);
        doc = line ? cJSON_ParseWithLength(line, n) : NULL;
        const cJSON *done = cJSON_GetObjectItemCaseSensitive(doc, "done");
        if (!cJSON_IsTrue(done))
            code = "stream_incomplete";
        else if ((code = json_error_code(doc)) == NULL)
            ok = true;
    } else {
        doc = h->body ? cJSON_ParseWithLength(h->body, h->body_n) : NULL;
        code = json_error_code(doc);
        if (!code)
            code = "(no code)";
    }
    if (!ok)
        count_code(&st->codes, code, 1);
    cJSON_Delete(doc);
    return ok;
}

static struct lt_row *row_at(struct worker *w, int64_t now)
{
    if (!w->o->rows)
        return NULL;
    size_t i = now > w->start ? (size_t)((now - w->start) / 1000000000LL) : 0;
    struct lt_stats *st = &w->st;
    if (i >= st->nrows) {
        size_t n = i + 16;
        struct lt_row *nr = realloc(st->rows, n * sizeof(*nr));
        if (!nr)
            return NULL;
        memset(nr + st->nrows, 0, (n - st->nrows) * sizeof(*nr));
        st->rows = nr;
        st->nrows = n;
    }
    struct lt_row *r = &st->rows[i];
    if (!r->hist) {
        r->hist = malloc(sizeof(*r->hist));
        if (!r->hist)
            return NULL;
        lt_hist_init(r->hist);
    }
    return r;
}

static void progress(struct worker *w)
{
    const struct lt_stats *st = &w->st;
    atomic_store_explicit(&w->p_done, st->done, memory_order_relaxed);
    atomic_store_explicit(&w->p_ok, st->ok, memory_order_relaxed);
    atomic_store_explicit(&w->p_failed,
                          st->done - st->ok + st->sock_errors + st->timeouts + st->proto_errors,
                          memory_order_relaxed);
}

/* A request ended without an answer: one of st's error counters has been raised. */
static void lost(struct worker *w, int64_t now)
{
    struct lt_row *r = row_at(w, now);
    if (r)
        r->errors++;
    progress(w);
}

/* ------------------------------------------------------------------ connections */

static void conn_close(struct conn *c, int64_t retry_at)
{
    struct worker *w = c->w;
    if (c->fd >= 0) {
        epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    if (c->state == C_BUSY)
        w->busy--;
    if (c->state == C_IDLE) { /* unlink from the idle stack */
        for (struct conn **p = &w->idle; *p; p = &(*p)->next)
            if (*p == c) {
                *p = c->next;
                break;
            }
    }
    c->fd = -1;
    c->state = C_CLOSED;
    c->out_armed = false;
    c->retry_at = retry_at;
}

static void set_out(struct conn *c, bool on)
{
    if (c->out_armed == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(c->w->ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->out_armed = on;
}

static void make_idle(struct conn *c)
{
    c->state = C_IDLE;
    c->next = c->w->idle;
    c->w->idle = c;
}

/* Opens c (CLOSED) to the target. */
static void conn_open(struct conn *c, int64_t now)
{
    struct worker *w = c->w;
    const struct lt_target *t = &w->o->target;
    c->fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (c->fd < 0)
        goto fail;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = connect(c->fd, (const struct sockaddr *)&t->addr, t->addrlen);
    if (rc != 0 && errno != EINPROGRESS)
        goto fail_fd;
    struct epoll_event ev = {.events = EPOLLIN | (rc ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, c->fd, &ev) != 0)
        goto fail_fd;
    c->out_armed = rc != 0;
    lt_http_reset(&c->http);
    if (rc == 0) {
        w->st.connects++;
        make_idle(c);
    } else {
        c->state = C_CONNECTING;
        c->deadline = now + w->o->timeout_ns; /* a connect gets as long as an answer */
    }
    return;
fail_fd:
    close(c->fd);
    c->fd = -1;
fail:
    w->st.connect_errors++;
    c->state = C_CLOSED;
    c->retry_at = now + LT_RETRY_NS;
}

/* Writes what is left of c's request. */
static void conn_write(struct conn *c, int64_t now)
{
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out(c, true);
            return;
        }
        c->w->st.sock_errors++;
        conn_close(c, now);
        lost(c->w, now);
        return;
    }
    set_out(c, false);
}

/* Sends the next request on idle connection c; its latency counts from 'intended'. */
static void conn_send(struct conn *c, int64_t intended, int64_t now)
{
    struct worker *w = c->w;
    size_t blen = lt_gen_body(&w->gen, w->body, &c->nids);
    char *p = c->wbuf;
    memcpy(p, w->head, w->head_len);
    p = lt_put_u64(p + w->head_len, blen);
    memcpy(p, "\r\n\r\n", 4);
    p += 4;
    memcpy(p, w->body, blen);
    c->wlen = (size_t)(p - c->wbuf) + blen;
    c->woff = 0;
    c->state = C_BUSY;
    c->got_bytes = false;
    c->got_line = false;
    c->intended = intended;
    c->deadline = now + w->o->timeout_ns;
    w->busy++;
    w->st.sent++;
    conn_write(c, now);
}

/* c's answer is complete. */
static void conn_answered(struct conn *c, int64_t now)
{
    struct worker *w = c->w;
    struct lt_stats *st = &w->st;
    const struct lt_http *h = &c->http;
    uint64_t us = now > c->intended ? (uint64_t)(now - c->intended) / 1000 : 0;
    st->done++;
    st->bytes_in += h->body_len;
    st->status[h->status > 0 && h->status < LT_MAX_STATUS ? h->status : 0]++;
    lt_hist_add(&st->lat, us);
    if (c->got_line) { /* from the intended send time, like the answer's; never after it */
        int64_t t = c->first_line < now ? c->first_line : now;
        lt_hist_add(&st->lat_first, t > c->intended ? (uint64_t)(t - c->intended) / 1000 : 0);
    }
    bool ok = classify(st, h);
    if (ok) {
        st->ok++;
        st->ok_ids += (uint64_t)c->nids;
        lt_hist_add(&st->lat_ok, us);
    }
    struct lt_row *r = row_at(w, now);
    if (r) {
        r->done++;
        lt_hist_add(r->hist, us);
        if (ok) {
            r->ok++;
            r->ok_ids += (uint64_t)c->nids;
        }
    }
    progress(w);
    if (h->close) {
        conn_close(c, now);
        conn_open(c, now);
        return;
    }
    w->busy--;
    lt_http_reset(&c->http);
    make_idle(c);
}

static void conn_readable(struct conn *c, int64_t now)
{
    struct worker *w = c->w;
    ssize_t n = recv(c->fd, w->rbuf, sizeof(w->rbuf), 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (c->state != C_BUSY) { /* idle: the server closed it (or sent what nobody asked for) */
        /* A 408 on an idle connection is the server (or a proxy in front of it, such as
         * haproxy with a connection that never carried a request) closing it, as RFC 9110
         * 15.5.9 allows: a close, not a wrong answer. Anything else unasked for is. */
        if (n > 0 && !(n >= 12 && !memcmp(w->rbuf, "HTTP/1.", 7) && !memcmp(w->rbuf + 8, " 408", 4)))
            w->st.proto_errors++;
        conn_close(c, now);
        conn_open(c, now);
        return;
    }
    if (n <= 0) {
        if (n == 0 && c->got_bytes && lt_http_eof(&c->http) == 1) {
            conn_answered(c, now); /* closes, since the body ended with the connection */
            return;
        }
        if (n == 0 && c->got_bytes)
            w->st.proto_errors++;
        else
            w->st.sock_errors++;
        conn_close(c, now);
        lost(w, now);
        conn_open(c, now);
        return;
    }
    c->got_bytes = true;
    size_t used;
    int r = lt_http_feed(&c->http, w->rbuf, (size_t)n, &used);
    if (r == 1 && used == (size_t)n) {
        conn_answered(c, now);
        return;
    }
    if (r == 0)
        return;
    w->st.proto_errors++; /* not HTTP, or bytes after the answer */
    conn_close(c, now);
    lost(w, now);
    conn_open(c, now);
}

static void conn_event(struct conn *c, uint32_t ev, int64_t now)
{
    struct worker *w = c->w;
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
            err = errno;
        if (err == 0 && !(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        if (err != 0 || (ev & (EPOLLERR | EPOLLHUP))) {
            conn_close(c, now + LT_RETRY_NS);
            w->st.connect_errors++;
            return;
        }
        w->st.connects++;
        set_out(c, false);
        make_idle(c);
        return;
    }
    if ((ev & EPOLLOUT) && c->state == C_BUSY && c->woff < c->wlen) {
        conn_write(c, now);
        if (c->state != C_BUSY)
            return;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
        conn_readable(c, now);
}

/* ------------------------------------------------------------------ the worker loop */

static int64_t due_at(const struct worker *w, uint64_t k)
{
    return w->start + (int64_t)(w->offset + (double)k * w->period);
}

static void housekeeping(struct worker *w, int64_t now, bool sending)
{
    for (int i = 0; i < w->nconns; i++) {
        struct conn *c = &w->conns[i];
        if (c->state == C_BUSY && now >= c->deadline) {
            w->st.timeouts++;
            conn_close(c, now);
            lost(w, now);
        } else if (c->state == C_CONNECTING && now >= c->deadline) {
            w->st.connect_errors++;
            conn_close(c, now + LT_RETRY_NS);
        }
        if (c->state == C_CLOSED && sending && now >= c->retry_at)
            conn_open(c, now);
    }
}

/* Sends what is due on idle connections. */
static void dispatch(struct worker *w, int64_t now)
{
    if (w->o->rate <= 0 && now >= w->end)
        return;
    while (w->idle) {
        int64_t due = now;
        if (w->o->rate > 0) {
            due = due_at(w, w->k);
            if (due > now || due >= w->end)
                return;
            w->k++;
        }
        struct conn *c = w->idle;
        w->idle = c->next;
        conn_send(c, due, now);
    }
}

static void wait_events(struct worker *w, int64_t now, int64_t until, struct epoll_event *evs,
                        int *n)
{
    int64_t d = until > now ? until - now : 0;
    if (w->pwait2) {
        struct timespec ts = {.tv_sec = d / 1000000000LL, .tv_nsec = d % 1000000000LL};
        *n = epoll_pwait2(w->ep, evs, LT_EVENTS, &ts, NULL);
        if (*n >= 0 || errno != ENOSYS)
            return;
        w->pwait2 = false;
    }
    *n = epoll_wait(w->ep, evs, LT_EVENTS, (int)((d + 999999) / 1000000));
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct epoll_event evs[LT_EVENTS];
    bool sending = true;
    int64_t next_tick = w->start + LT_TICK_NS, stop_at = w->end;
    for (int i = 0; i < w->nconns; i++)
        conn_open(&w->conns[i], w->start);
    for (;;) {
        int64_t now = lt_now_ns();
        int level = atomic_load_explicit(&interrupt_level, memory_order_relaxed);
        /* First what is due, so that a request due before the end but late because this thread
         * was not running is sent late (and its latency shows it), not counted as unsent. */
        if (sending && level == 0)
            dispatch(w, now);
        if (sending && (now >= w->end || level >= 1)) {
            sending = false;
            stop_at = now < w->end ? now : w->end;
            w->st.interrupted = level >= 1;
            if (w->o->rate > 0 && stop_at > w->start + (int64_t)w->offset) {
                double span = (double)(stop_at - w->start - 1) - w->offset;
                uint64_t due = (uint64_t)(span / w->period) + 1;
                if (due > w->k)
                    w->st.unsent = due - w->k;
            }
        }
        if (level >= 2 || (!sending && w->busy == 0))
            break;
        if (now >= next_tick) {
            housekeeping(w, now, sending);
            next_tick = now + LT_TICK_NS;
        }
        int64_t until = next_tick;
        if (sending && w->end < until)
            until = w->end;
        if (sending && w->o->rate > 0 && w->idle) {
            int64_t due = due_at(w, w->k);
            if (due < until)
                until = due;
        }
        int n;
        wait_events(w, now, until, evs, &n);
        if (n < 0 && errno != EINTR)
            break;
        now = lt_now_ns();
        for (int i = 0; i < n; i++)
            conn_event(evs[i].data.ptr, evs[i].events, now);
    }
    int64_t now = lt_now_ns();
    for (int i = 0; i < w->nconns; i++) {
        struct conn *c = &w->conns[i];
        if (c->state == C_BUSY)
            w->st.timeouts++; /* abandoned by a second interrupt */
        if (c->fd >= 0)
            conn_close(c, now);
    }
    w->st.elapsed_ns = now - w->start;
    w->st.window_ns = stop_at - w->start;
    progress(w);
    atomic_store(&w->finished, true);
    return NULL;
}

/* ------------------------------------------------------------------ setup and merge */

static void worker_free(struct worker *w)
{
    if (!w)
        return;
    for (int i = 0; i < w->nconns; i++) {
        free(w->conns[i].wbuf);
        lt_http_destroy(&w->conns[i].http);
    }
    free(w->conns);
    free(w->body);
    if (w->ep >= 0)
        close(w->ep);
    lt_stats_destroy(&w->st);
    free(w);
}

static struct worker *worker_new(const struct lt_opts *o, int idx, int nconns, int64_t start)
{
    struct worker *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->ep = -1;
    w->o = o;
    w->idx = idx;
    w->start = start;
    w->end = start + o->duration_ns;
    w->pwait2 = true;
    lt_hist_init(&w->st.lat);
    lt_hist_init(&w->st.lat_ok);
    lt_hist_init(&w->st.lat_first);
    if (o->rate > 0) {
        w->period = 1e9 * o->threads / o->rate;
        w->offset = 1e9 * idx / o->rate;
    }
    lt_gen_init(&w->gen, o->mix, o->seed, (uint64_t)idx, (uint64_t)o->threads);
    int hl = snprintf(w->head, sizeof(w->head),
                      "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s"
                      "Content-Length: ",
                      o->target.path, o->target.host,
                      o->ndjson ? "Accept: application/x-ndjson\r\n" : "");
    if (hl < 0 || (size_t)hl >= sizeof(w->head))
        goto fail;
    w->head_len = (size_t)hl;
    size_t bmax = lt_mix_body_max(o->mix);
    w->wcap = w->head_len + 24 + bmax;
    w->body = malloc(bmax);
    w->conns = calloc((size_t)nconns, sizeof(*w->conns));
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    if (!w->body || !w->conns || w->ep < 0)
        goto fail;
    w->nconns = nconns;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &w->conns[i];
        c->w = w;
        c->fd = -1;
        c->state = C_CLOSED;
        lt_http_init(&c->http);
        if (o->entries) {
            c->http.keep_ok = true;
            c->http.on_line = on_line;
            c->http.line_arg = c;
        }
        c->wbuf = malloc(w->wcap);
        if (!c->wbuf)
            goto fail;
    }
    return w;
fail:
    worker_free(w);
    return NULL;
}

int lt_run_start(const struct lt_opts *o, struct lt_run **out)
{
    struct lt_run *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->o = *o;
    r->w = calloc((size_t)o->threads, sizeof(*r->w));
    if (!r->w) {
        free(r);
        return -ENOMEM;
    }
    int64_t start = lt_now_ns();
    for (int i = 0; i < o->threads; i++) {
        int n = o->conns / o->threads + (i < o->conns % o->threads);
        r->w[i] = worker_new(&r->o, i, n, start);
        if (!r->w[i])
            goto fail;
    }
    for (int i = 0; i < o->threads; i++) {
        int rc = pthread_create(&r->w[i]->th, NULL, worker_main, r->w[i]);
        if (rc != 0) {
            lt_run_interrupt();
            lt_run_interrupt();
            struct lt_stats st;
            lt_run_finish(r, &st);
            lt_stats_destroy(&st);
            return -rc;
        }
        r->started++;
    }
    *out = r;
    return 0;
fail:
    for (int i = 0; i < o->threads; i++)
        worker_free(r->w[i]);
    free(r->w);
    free(r);
    return -ENOMEM;
}

bool lt_run_done(const struct lt_run *r)
{
    for (int i = 0; i < r->started; i++)
        if (!atomic_load(&r->w[i]->finished))
            return false;
    return true;
}

void lt_run_progress(const struct lt_run *r, uint64_t *done, uint64_t *ok, uint64_t *failed)
{
    *done = *ok = *failed = 0;
    for (int i = 0; i < r->started; i++) {
        *done += atomic_load_explicit(&r->w[i]->p_done, memory_order_relaxed);
        *ok += atomic_load_explicit(&r->w[i]->p_ok, memory_order_relaxed);
        *failed += atomic_load_explicit(&r->w[i]->p_failed, memory_order_relaxed);
    }
}

static void stats_merge(struct lt_stats *into, const struct lt_stats *from)
{
    into->sent += from->sent;
    into->done += from->done;
    into->ok += from->ok;
    into->ok_ids += from->ok_ids;
    into->connects += from->connects;
    into->connect_errors += from->connect_errors;
    into->sock_errors += from->sock_errors;
    into->timeouts += from->timeouts;
    into->proto_errors += from->proto_errors;
    into->unsent += from->unsent;
    into->bytes_in += from->bytes_in;
    for (size_t i = 0; i < LT_MAX_STATUS; i++)
        into->status[i] += from->status[i];
    merge_codes(&into->codes, &from->codes);
    merge_codes(&into->entry_codes, &from->entry_codes);
    into->entries_ok += from->entries_ok;
    into->entries_failed += from->entries_failed;
    into->entries_unknown += from->entries_unknown;
    lt_hist_merge(&into->lat, &from->lat);
    lt_hist_merge(&into->lat_ok, &from->lat_ok);
    lt_hist_merge(&into->lat_first, &from->lat_first);
    if (from->elapsed_ns > into->elapsed_ns)
        into->elapsed_ns = from->elapsed_ns;
    if (from->window_ns > into->window_ns)
        into->window_ns = from->window_ns;
    into->interrupted |= from->interrupted;
    if (from->nrows > into->nrows) {
        struct lt_row *nr = realloc(into->rows, from->nrows * sizeof(*nr));
        if (!nr)
            return;
        memset(nr + into->nrows, 0, (from->nrows - into->nrows) * sizeof(*nr));
        into->rows = nr;
        into->nrows = from->nrows;
    }
    for (size_t i = 0; i < from->nrows; i++) {
        const struct lt_row *f = &from->rows[i];
        struct lt_row *t = &into->rows[i];
        t->done += f->done;
        t->ok += f->ok;
        t->ok_ids += f->ok_ids;
        t->errors += f->errors;
        if (f->hist) {
            if (!t->hist && (t->hist = malloc(sizeof(*t->hist))) != NULL)
                lt_hist_init(t->hist);
            if (t->hist)
                lt_hist_merge(t->hist, f->hist);
        }
    }
}

void lt_run_finish(struct lt_run *r, struct lt_stats *st)
{
    memset(st, 0, sizeof(*st));
    lt_hist_init(&st->lat);
    lt_hist_init(&st->lat_ok);
    lt_hist_init(&st->lat_first);
    for (int i = 0; i < r->started; i++)
        pthread_join(r->w[i]->th, NULL);
    for (int i = 0; i < r->o.threads; i++) {
        if (i < r->started)
            stats_merge(st, &r->w[i]->st);
        worker_free(r->w[i]);
    }
    /* Rows past the last answer are empty: drop them. */
    while (st->nrows && !st->rows[st->nrows - 1].done && !st->rows[st->nrows - 1].errors) {
        free(st->rows[st->nrows - 1].hist);
        st->nrows--;
    }
    free(r->w);
    free(r);
}

void lt_stats_destroy(struct lt_stats *st)
{
    for (size_t i = 0; i < st->nrows; i++)
        free(st->rows[i].hist);
    free(st->rows);
    st->rows = NULL;
    st->nrows = 0;
}
