/* demo: the built-in demo upstream behind `fanout --demo` (routes and magic ids in demo.h).
 *
 * DESIGN
 * libmicrohttpd serves on a small epoll thread pool. Every request is answered on the handler's
 * second call, never its first (LIBRARY-NOTES §0.1: a response queued on the first call closes
 * the keep-alive connection). An immediate answer allocates nothing but the response body: on
 * the first call *req_cls is set to a static marker that NOTIFY_COMPLETED recognises.
 *
 * A delayed request gets a struct demo_req and a ctx that is a child of the demo's root ctx with
 * the delay as its deadline. Its connection is suspended, its socket is added to the watcher's
 * epoll set (EPOLLRDHUP, one-shot), and a ctx hook is armed. The ctx is done in one of three
 * ways, and the first cause wins:
 *   - the deadline passes (-ETIMEDOUT, on the ctx timer thread): answer normally;
 *   - the watcher sees the client hang up and cancels it (DEMO_ECLIENT): close, count canceled;
 *   - demo_stop() cancels the root (-ECANCELED): answer 503 and close.
 * The hook never calls libmicrohttpd: it puts the request on the 'wake' list and signals the
 * watcher's eventfd. The watcher thread alone removes the socket from its epoll set and then calls
 * MHD_resume_connection(), so each connection is resumed exactly once (the hook runs once, and an
 * atomic flag guards it besides), and the socket leaves the epoll set before libmicrohttpd can
 * close it. The watcher resumes only after it has handled every event of its current
 * epoll_wait() batch, so an event it handles never names a request already resumed and freed.
 * After the resume, the handler runs again on the MHD thread and queues the answer;
 * NOTIFY_COMPLETED then disarms the hook (waiting for it if it is still running) and frees the
 * request. A client that closes just before its deadline is caught by a poll() at that point;
 * if MHD itself finds the socket closed first, it skips the handler and goes straight to
 * NOTIFY_COMPLETED, which then does the handler's bookkeeping.
 *
 * Shutdown: demo_stop() sets 'stopping' (delayed requests that arrive later get 503 at once),
 * cancels the root so every waiting request is woken, waits briefly (DEMO_STOP_GRACE_MS at most)
 * for their 503s to be sent, then without limit until no connection is suspended
 * (MHD_stop_daemon() with suspended connections is an API violation, LIBRARY-NOTES §1.7; the
 * wake-ups are already under way, so this wait is short), stops the daemon (which completes
 * every request, so every hook has returned), then stops and joins the watcher.
 *
 * Threads: the MHD workers (handler, NOTIFY_COMPLETED), the watcher, the ctx timer thread and
 * whoever calls demo_stop() (the last two run hooks). Locks: 'mu' guards the wake list, the count
 * of suspended connections and the stop flags; nothing else is called while it is held except
 * the eventfd write. Counters are atomics. */
#include "server/demo/demo.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/json.h"
#include "server/rng.h"

/* The cause a delayed request's ctx is canceled with when its client hangs up. */
#define DEMO_ECLIENT (-ECONNRESET)

/* How long demo_stop() waits for the 503s of woken requests to be sent. */
#define DEMO_STOP_GRACE_MS 1000

/* What a client that hung up mid-delay is "answered" (nginx's "client closed request"). */
#define DEMO_STATUS_CLIENT_GONE 499

/* Events the watcher takes from one epoll_wait(). */
#define WATCH_BATCH 64

/* A delayed request. Created on the MHD thread, freed in NOTIFY_COMPLETED. */
struct demo_req {
    struct demo *d;              /* the demo it belongs to */
    struct MHD_Connection *conn; /* its connection, suspended until the watcher resumes it */
    struct ctx *ctx;             /* done when the delay is over (or earlier: see DESIGN) */
    struct ctx_hook hook;        /* puts it on d->wake when ctx is done */
    struct demo_req *next;       /* on d->wake; guarded by d->mu */
    int fd;                      /* socket in the watcher's epoll set, or -1; fixed once armed */
    atomic_bool woken;           /* set by the first wake-up: resume exactly once */
    bool answered;               /* bookkeeping after the resume done; MHD thread only */
};

struct demo {
    struct MHD_Daemon *mhd;          /* the HTTP daemon */
    struct MHD_Response *not_found;  /* shared 404 response (refcounted by MHD) */
    struct MHD_Response *bad_method; /* shared 405 response */
    struct MHD_Response *shutting;   /* shared 503 response, with Connection: close */
    struct MHD_Response *gone;       /* shared empty 499 response, with Connection: close */
    struct MHD_Response *ok;         /* shared 200 response of the probes */
    struct ctx *root;                /* parent of every delayed request's ctx */
    pthread_t watcher;               /* the watcher thread */
    int epfd;                        /* the watcher's epoll set: evfd and suspended sockets */
    int evfd;                        /* wakes the watcher */
    uint16_t port;                   /* bound port; fixed */
    char host[INET6_ADDRSTRLEN + 2]; /* host as written in a URL (IPv6 in brackets); fixed */
    pthread_mutex_t mu;              /* guards the fields below up to the counters */
    pthread_cond_t cv;               /* signalled when 'parked' or 'live' drops to 0 while
                                        stopping; waits on CLOCK_MONOTONIC */
    struct demo_req *wake;           /* woken requests the watcher must resume */
    unsigned parked;                 /* delayed requests not yet answered after their resume */
    unsigned live;                   /* delayed requests not yet completed (freed) */
    bool stopping;                   /* demo_stop() has begun */
    bool quit;                       /* the watcher must exit */
    atomic_uint_fast64_t requests;   /* counters, as in struct demo_stats */
    atomic_uint_fast64_t in_flight;
    atomic_uint_fast64_t sleeping;
    atomic_uint_fast64_t delayed;
    atomic_uint_fast64_t canceled;
};

/* *req_cls of a request that needs no state of its own. */
static char plain_request;

static void count(atomic_uint_fast64_t *c, int delta)
{
    if (delta > 0)
        atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
    else
        atomic_fetch_sub_explicit(c, 1, memory_order_relaxed);
}

/* ---------------------------------------------------------------- responses */

/* 64-bit FNV-1a: a stable price per id. */
static uint64_t hash_id(const char *s, size_t n)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Reads decimal digits at 's', saturating past 'cap'; *len gets how many there were. */
static int64_t read_number(const char *s, int64_t cap, size_t *len)
{
    int64_t v = 0;
    size_t i = 0;
    for (; s[i] >= '0' && s[i] <= '9'; i++)
        if (v <= cap)
            v = v * 10 + (s[i] - '0');
    if (len)
        *len = i;
    return v > cap ? cap + 1 : v;
}

static bool has_prefix(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* The status asked for by a "status<NNN>" id, or 0. */
static unsigned magic_status(const char *id)
{
    if (!has_prefix(id, "status"))
        return 0;
    size_t len;
    int64_t v = read_number(id + 6, 999, &len);
    return len == 3 && v >= 200 && v <= 599 ? (unsigned)v : 0;
}

/* The delay a request asks for, in ms (0: none), capped at DEMO_MAX_DELAY_MS. */
static int64_t request_delay(struct MHD_Connection *conn, const char *id)
{
    int64_t ms = 0;
    if (has_prefix(id, "sleep"))
        ms = read_number(id + 5, DEMO_MAX_DELAY_MS, NULL);
    const char *q = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "ms");
    if (q)
        ms += read_number(q, DEMO_MAX_DELAY_MS, NULL);
    return ms > DEMO_MAX_DELAY_MS ? DEMO_MAX_DELAY_MS : ms;
}

/* Queues 'b' (taken) as the body with 'type'. MHD_NO (close) if out of memory. */
static enum MHD_Result queue_body(struct MHD_Connection *conn, unsigned status, struct json_buf *b,
                                  const char *type)
{
    size_t len;
    char *body = json_buf_take(b, &len);
    if (!body)
        return MHD_NO;
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    enum MHD_Result ret = MHD_NO;
    if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type) == MHD_YES)
        ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* {"id":"<id>","name":"Item <id>","price_cents":<n>,"tags":["demo"]} */
static enum MHD_Result queue_item(struct MHD_Connection *conn, unsigned status, const char *id,
                                  size_t n)
{
    struct json_buf b;
    json_buf_init(&b);
    json_buf_reserve(&b, n + 96); /* an ASCII id then needs no reallocation */
    json_buf_append_str(&b, "{\"id\":");
    size_t lit = b.len;
    json_append_string(&b, id, n);
    size_t esc = b.len - lit - 1; /* the escaped id and its closing quote */
    /* "Item " needs no escaping, so the name's literal is "Item plus the id's escaped text. The
     * reserve keeps b.data from moving while it is copied from itself. */
    if (!json_buf_reserve(&b, esc + 64)) {
        json_buf_destroy(&b);
        return MHD_NO;
    }
    json_buf_append_str(&b, ",\"name\":\"Item ");
    json_buf_append(&b, b.data + lit + 1, esc);
    json_buf_append_str(&b, ",\"price_cents\":");
    json_append_int64(&b, (int64_t)(100 + hash_id(id, n) % 99900));
    json_buf_append_str(&b, ",\"tags\":[\"demo\"]}");
    return queue_body(conn, status, &b, "application/json");
}

/* {"error":"<msg>"[,"status":<status>],"id":"<id>"} */
static enum MHD_Result queue_error(struct MHD_Connection *conn, unsigned status, const char *msg,
                                   bool with_status, const char *id, size_t n)
{
    struct json_buf b;
    json_buf_init(&b);
    json_buf_reserve(&b, n + 80);
    json_buf_append_str(&b, "{\"error\":\"");
    json_buf_append_str(&b, msg);
    json_buf_append_char(&b, '"');
    if (with_status) {
        json_buf_append_str(&b, ",\"status\":");
        json_append_int64(&b, status);
    }
    json_buf_append_str(&b, ",\"id\":");
    json_append_string(&b, id, n);
    json_buf_append_char(&b, '}');
    return queue_body(conn, status, &b, "application/json");
}

static enum MHD_Result queue_empty(struct MHD_Connection *conn, unsigned status)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* libmicrohttpd's messages, on stderr, except the one a dropped connection causes on purpose
 * (a drop<P> id). */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    if (!strstr(msg, "Application reported internal error"))
        fputs(msg, stderr);
}

/* For a "drop<P>" id: true with probability P percent. */
static bool drop_now(const char *id)
{
    if (!has_prefix(id, "drop"))
        return false;
    size_t len;
    int64_t pct = read_number(id + 4, 100, &len);
    if (len == 0)
        return false;
    return (int64_t)rng_upto(99) < pct;
}

/* For a "down@<address>" id: true on the demo listening on that address (d->host, so
 * "127.0.0.3" or "[::1]"), which must not go on with more of an address ("127.0.0.30"). */
static bool down_here(const struct demo *d, const char *id)
{
    if (!has_prefix(id, "down@"))
        return false;
    size_t hl = strlen(d->host);
    const char *rest = id + 5;
    return strncmp(rest, d->host, hl) == 0 && !(rest[hl] >= '0' && rest[hl] <= '9') &&
           rest[hl] != '.' && rest[hl] != ':';
}

/* Answers a GET of /items/<id>, once any delay is over. */
static enum MHD_Result answer(const struct demo *d, struct MHD_Connection *conn, const char *id)
{
    size_t n = strlen(id);
    if (drop_now(id))
        return MHD_NO; /* the connection is closed without an answer */
    if (down_here(d, id))
        return queue_error(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "member down", false, id, n);
    if (has_prefix(id, "fail"))
        return queue_error(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "injected failure", false, id, n);
    if (has_prefix(id, "text")) {
        struct json_buf b;
        json_buf_init(&b);
        json_buf_reserve(&b, n + 16);
        json_buf_append_str(&b, "plain text for ");
        json_buf_append(&b, id, n);
        return queue_body(conn, MHD_HTTP_OK, &b, "text/plain");
    }
    unsigned status = magic_status(id);
    if (status == MHD_HTTP_NO_CONTENT || status == MHD_HTTP_NOT_MODIFIED)
        return queue_empty(conn, status);
    if (status >= 300)
        return queue_error(conn, status, "injected status", true, id, n);
    return queue_item(conn, status ? status : MHD_HTTP_OK, id, n);
}

/* The id of a /items/<id> URL (already percent-decoded by libmicrohttpd), or NULL. */
static const char *item_id(const char *url)
{
    static const char prefix[] = "/items/";
    if (strncmp(url, prefix, sizeof(prefix) - 1) != 0 || url[sizeof(prefix) - 1] == '\0')
        return NULL;
    return url + sizeof(prefix) - 1;
}

/* ---------------------------------------------------------------- delayed requests */

/* The ctx hook: runs once when the request's ctx is done, on the thread that made it done. */
static void on_wake(void *arg)
{
    struct demo_req *r = arg;
    if (atomic_exchange(&r->woken, true))
        return;
    struct demo *d = r->d;
    pthread_mutex_lock(&d->mu);
    bool was_empty = d->wake == NULL;
    r->next = d->wake;
    d->wake = r;
    if (was_empty) { /* under mu: demo_stop() closes evfd only after the hooks are over */
        uint64_t one = 1;
        ssize_t w = write(d->evfd, &one, sizeof(one));
        (void)w; /* only fails when the counter is full, and then the watcher is awake anyway */
    }
    pthread_mutex_unlock(&d->mu);
}

static void unpark(struct demo *d)
{
    count(&d->sleeping, -1);
    pthread_mutex_lock(&d->mu);
    if (--d->parked == 0 && d->stopping)
        pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void unlive(struct demo *d)
{
    pthread_mutex_lock(&d->mu);
    if (--d->live == 0 && d->stopping)
        pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* Suspends the connection for 'ms' (see DESIGN). */
static enum MHD_Result start_delay(struct demo *d, struct MHD_Connection *conn, void **req_cls,
                                   int64_t ms)
{
    pthread_mutex_lock(&d->mu);
    bool stopping = d->stopping;
    if (!stopping) {
        d->parked++;
        d->live++;
    }
    pthread_mutex_unlock(&d->mu);
    if (stopping)
        return MHD_queue_response(conn, MHD_HTTP_SERVICE_UNAVAILABLE, d->shutting);
    count(&d->delayed, 1);
    count(&d->sleeping, 1);

    struct demo_req *r = calloc(1, sizeof(*r));
    struct ctx *c = r ? ctx_with_timeout(d->root, ms) : NULL;
    if (!c) {
        free(r);
        unpark(d);
        unlive(d);
        return MHD_NO; /* out of memory: close the connection */
    }
    r->d = d;
    r->conn = conn;
    r->ctx = c;
    r->fd = -1;
    atomic_init(&r->woken, false);
    *req_cls = r;

    /* Suspend before anything can resume it. */
    MHD_suspend_connection(conn);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) {
        /* RDHUP only, no EPOLLIN, so bytes the client pipelines do not count as hanging up;
         * HUP and ERR are always reported. One-shot: one report is all the watcher needs. */
        struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLONESHOT, .data.ptr = r};
        if (epoll_ctl(d->epfd, EPOLL_CTL_ADD, ci->connect_fd, &ev) == 0)
            r->fd = ci->connect_fd;
        /* Otherwise (out of memory) a hang-up is noticed only when the delay is over. */
    }
    /* Last, so that r->fd is set before the watcher can see r on the wake list. If the ctx is
     * already done (demo_stop() ran meanwhile), on_wake() runs here and now. */
    int armed = ctx_hook_add(c, &r->hook, on_wake, r);
    assert(armed == 0); /* a fresh hook cannot be armed already */
    (void)armed;
    return MHD_YES;
}

/* True if the client has shut down its side or the socket is in error. */
static bool client_gone(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return false;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

/* The handler's call after the watcher resumed a delayed request. */
static enum MHD_Result finish_delay(struct demo *d, struct MHD_Connection *conn, const char *url,
                                    struct demo_req *r)
{
    if (r->answered)
        return MHD_NO; /* cannot happen: a request is answered once */
    r->answered = true;
    unpark(d);
    int err = ctx_err(r->ctx);
    if (err == DEMO_ECLIENT || client_gone(conn)) {
        count(&d->canceled, 1);
        /* Nobody to answer: a bodiless 499 with Connection: close ends it quietly (returning
         * MHD_NO would do the same but log an "internal error"). */
        return MHD_queue_response(conn, DEMO_STATUS_CLIENT_GONE, d->gone);
    }
    if (err != -ETIMEDOUT)
        return MHD_queue_response(conn, MHD_HTTP_SERVICE_UNAVAILABLE, d->shutting);
    return answer(d, conn, item_id(url));
}

/* The watcher thread: cancels the requests whose clients hang up and resumes the woken ones. */
static void *watch_main(void *arg)
{
    struct demo *d = arg;
    pthread_setname_np(pthread_self(), "demo-watch");
    struct epoll_event evs[WATCH_BATCH];
    for (;;) {
        int n = epoll_wait(d->epfd, evs, WATCH_BATCH, -1);
        assert(n >= 0 || errno == EINTR);
        for (int i = 0; i < n; i++) {
            struct demo_req *r = evs[i].data.ptr;
            if (r) {
                ctx_cancel(r->ctx, DEMO_ECLIENT); /* its hook puts it on the wake list */
            } else {
                uint64_t v;
                ssize_t got = read(d->evfd, &v, sizeof(v));
                (void)got; /* EAGAIN: another batch drained it already */
            }
        }
        pthread_mutex_lock(&d->mu);
        struct demo_req *wake = d->wake;
        d->wake = NULL;
        bool quit = d->quit;
        pthread_mutex_unlock(&d->mu);
        while (wake) {
            struct demo_req *next = wake->next;
            if (wake->fd >= 0)
                epoll_ctl(d->epfd, EPOLL_CTL_DEL, wake->fd, NULL);
            MHD_resume_connection(wake->conn); /* from here on 'wake' may be freed */
            wake = next;
        }
        if (quit)
            return NULL;
    }
}

/* ---------------------------------------------------------------- MHD callbacks */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls)
{
    struct demo *d = cls;
    (void)version;
    (void)upload_data;
    if (*req_cls == NULL) {
        /* First call, headers only: queue nothing now (LIBRARY-NOTES §0.1). */
        count(&d->requests, 1);
        count(&d->in_flight, 1);
        *req_cls = &plain_request;
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        *upload_data_size = 0; /* no route reads a body: drop it, keep the connection */
        return MHD_YES;
    }
    if (*req_cls != &plain_request)
        return finish_delay(d, conn, url, *req_cls);
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0)
        return MHD_queue_response(conn, MHD_HTTP_METHOD_NOT_ALLOWED, d->bad_method);
    if (!strcmp(url, "/healthz") || !strcmp(url, "/readyz"))
        return MHD_queue_response(conn, MHD_HTTP_OK, d->ok);
    const char *id = item_id(url);
    if (!id)
        return MHD_queue_response(conn, MHD_HTTP_NOT_FOUND, d->not_found);
    int64_t ms = request_delay(conn, id);
    if (ms > 0)
        return start_delay(d, conn, req_cls, ms);
    return answer(d, conn, id);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct demo *d = cls;
    (void)conn;
    (void)toe;
    void *p = *req_cls;
    if (!p)
        return;
    *req_cls = NULL;
    count(&d->in_flight, -1);
    if (p == &plain_request)
        return;
    struct demo_req *r = p;
    if (!r->answered) {
        /* Resumed, but MHD found the connection closed before calling the handler again: the
         * client went away. (NOTIFY_COMPLETED never runs for a suspended connection.) */
        r->answered = true;
        unpark(d);
        count(&d->canceled, 1);
    }
    ctx_hook_remove(r->ctx, &r->hook); /* it has fired; this waits until it has returned */
    ctx_free(r->ctx);
    free(r);
    unlive(d);
}

/* ---------------------------------------------------------------- lifecycle */

static struct MHD_Response *static_json(const char *body, bool close)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        strlen(body), (void *)(uintptr_t)body, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return NULL;
    if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json") !=
            MHD_YES ||
        (close && MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close") != MHD_YES)) {
        MHD_destroy_response(resp);
        return NULL;
    }
    return resp;
}

static void destroy_responses(struct demo *d)
{
    if (d->not_found)
        MHD_destroy_response(d->not_found);
    if (d->bad_method)
        MHD_destroy_response(d->bad_method);
    if (d->shutting)
        MHD_destroy_response(d->shutting);
    if (d->gone)
        MHD_destroy_response(d->gone);
    if (d->ok)
        MHD_destroy_response(d->ok);
}

static int make_responses(struct demo *d)
{
    d->not_found = static_json("{\"error\":\"not found\"}", false);
    d->bad_method = static_json("{\"error\":\"method not allowed\"}", false);
    d->shutting = static_json("{\"error\":\"shutting down\"}", true);
    d->gone = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    d->ok = static_json("{\"status\":\"ok\"}", false);
    if (!d->not_found || !d->bad_method || !d->shutting || !d->gone || !d->ok ||
        MHD_add_response_header(d->gone, MHD_HTTP_HEADER_CONNECTION, "close") != MHD_YES ||
        MHD_add_response_header(d->bad_method, MHD_HTTP_HEADER_ALLOW, "GET") != MHD_YES) {
        destroy_responses(d);
        return -ENOMEM;
    }
    return 0;
}

/* Parses a numeric 'host' into *sa; returns its length, or 0 if it is not an address. */
static socklen_t parse_host(const char *host, uint16_t port, struct sockaddr_storage *sa)
{
    memset(sa, 0, sizeof(*sa));
    struct sockaddr_in *v4 = (struct sockaddr_in *)sa;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        return sizeof(*v4);
    }
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)sa;
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        return sizeof(*v6);
    }
    return 0;
}

/* Binds and listens; returns the socket or a negative errno. */
static int open_listener(const struct sockaddr_storage *sa, socklen_t len)
{
    int fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    int err = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        (sa->ss_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0) ||
        bind(fd, (const struct sockaddr *)sa, len) != 0 || listen(fd, SOMAXCONN) != 0)
        err = -errno;
    if (err) {
        close(fd);
        return err;
    }
    return fd;
}

/* After a failed MHD_start_daemon(), which may or may not have closed the listening socket
 * (undocumented): closes 'fd' only if it is still a listening socket bound to 'addr'. Another
 * thread that reused the number meanwhile cannot hold that address while ours is open. */
static void close_if_ours(int fd, const struct sockaddr_storage *addr, socklen_t len)
{
    struct sockaddr_storage now;
    socklen_t nlen = sizeof(now);
    int listening = 0;
    socklen_t ilen = sizeof(listening);
    if (getsockname(fd, (struct sockaddr *)&now, &nlen) == 0 && nlen == len &&
        memcmp(&now, addr, len) == 0 &&
        getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ilen) == 0 && listening)
        close(fd);
}

/* The mutex and the condition variable (on the monotonic clock). Returns 0 or -ENOMEM. */
static int init_sync(struct demo *d)
{
    if (pthread_mutex_init(&d->mu, NULL) != 0)
        return -ENOMEM;
    pthread_condattr_t ca;
    int rc = pthread_condattr_init(&ca);
    if (rc == 0) {
        rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        if (rc == 0)
            rc = pthread_cond_init(&d->cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (rc != 0) {
        pthread_mutex_destroy(&d->mu);
        return -ENOMEM;
    }
    return 0;
}

/* The watcher's epoll set and its wake-up eventfd. Returns 0 or a negative errno (both fds
 * closed). */
static int init_events(struct demo *d)
{
    d->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (d->epfd < 0)
        return -errno;
    d->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (d->evfd < 0 || epoll_ctl(d->epfd, EPOLL_CTL_ADD, d->evfd, &ev) != 0) {
        int err = -errno;
        if (d->evfd >= 0)
            close(d->evfd);
        close(d->epfd);
        d->epfd = d->evfd = -1;
        return err;
    }
    return 0;
}

static void stop_watcher(struct demo *d)
{
    pthread_mutex_lock(&d->mu);
    d->quit = true;
    pthread_mutex_unlock(&d->mu);
    uint64_t one = 1;
    ssize_t w = write(d->evfd, &one, sizeof(one));
    (void)w;
    pthread_join(d->watcher, NULL);
}

/* "host" as the demo's URLs spell it: the canonical address, IPv6 in brackets. */
static void canonical_host(const struct sockaddr_storage *sa, const char *host, char *out,
                           size_t cap)
{
    char text[INET6_ADDRSTRLEN];
    const void *addr = sa->ss_family == AF_INET6
                           ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                           : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;
    if (!inet_ntop(sa->ss_family, addr, text, sizeof(text)))
        snprintf(text, sizeof(text), "%s", host);
    snprintf(out, cap, sa->ss_family == AF_INET6 ? "[%s]" : "%s", text);
}

/* Listens on 'sa' and hands the socket to libmicrohttpd, which owns it from then on and
 * closes it in MHD_stop_daemon(). Sets d->port. Returns 0 or a negative errno (nothing left
 * open). */
static int start_daemon(struct demo *d, const struct sockaddr_storage *sa, socklen_t salen)
{
    int lfd = open_listener(sa, salen);
    if (lfd < 0)
        return lfd;
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    if (getsockname(lfd, (struct sockaddr *)&bound, &blen) != 0) {
        int err = -errno;
        close(lfd);
        return err;
    }
    d->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO |
                     MHD_USE_ERROR_LOG;
    MHD_LogCallback logger = mhd_log;
    if (sa->ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    d->mhd =
        MHD_start_daemon(flags, 0, NULL, NULL, on_request, d, MHD_OPTION_EXTERNAL_LOGGER,
                         logger, NULL, MHD_OPTION_LISTEN_SOCKET,
                         (MHD_socket)lfd, MHD_OPTION_THREAD_POOL_SIZE, (unsigned)DEMO_HTTP_THREADS,
                         MHD_OPTION_CONNECTION_LIMIT, (unsigned)DEMO_MAX_CONNECTIONS,
                         MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)DEMO_IDLE_TIMEOUT_S,
                         MHD_OPTION_NOTIFY_COMPLETED, on_completed, d, MHD_OPTION_END);
    if (!d->mhd) {
        close_if_ours(lfd, &bound, blen);
        return -EIO;
    }
    return 0;
}

int demo_start(const char *host, uint16_t port, struct demo **out)
{
    if (!host)
        host = "127.0.0.1";
    struct sockaddr_storage sa;
    socklen_t salen = parse_host(host, port, &sa);
    if (salen == 0)
        return -EINVAL;
    struct demo *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    canonical_host(&sa, host, d->host, sizeof(d->host));
    d->epfd = d->evfd = -1;
    int err = init_sync(d);
    if (err != 0)
        goto fail_free;
    err = -ENOMEM;
    if (!(d->root = ctx_new(ctx_background(), CTX_FOREVER)))
        goto fail_sync;
    if ((err = make_responses(d)) != 0)
        goto fail_root;
    if ((err = init_events(d)) != 0)
        goto fail_responses;
    if ((err = -pthread_create(&d->watcher, NULL, watch_main, d)) != 0)
        goto fail_events;
    if ((err = start_daemon(d, &sa, salen)) != 0)
        goto fail_watcher;
    *out = d;
    return 0;

fail_watcher:
    stop_watcher(d);
fail_events:
    close(d->evfd);
    close(d->epfd);
fail_responses:
    destroy_responses(d);
fail_root:
    ctx_free(d->root);
fail_sync:
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
fail_free:
    free(d);
    return err;
}

uint16_t demo_port(const struct demo *d)
{
    return d->port;
}

void demo_url_template(const struct demo *d, char *buf, size_t size)
{
    if (size > 0)
        snprintf(buf, size, "http://%s:%u/items/{id}", d->host, (unsigned)d->port);
}

void demo_stats(const struct demo *d, struct demo_stats *out)
{
    /* The counters are only ever read here; casting away const for the atomic load is safe. */
    struct demo *m = (struct demo *)(uintptr_t)d;
    out->requests = atomic_load_explicit(&m->requests, memory_order_relaxed);
    out->in_flight = atomic_load_explicit(&m->in_flight, memory_order_relaxed);
    out->sleeping = atomic_load_explicit(&m->sleeping, memory_order_relaxed);
    out->delayed = atomic_load_explicit(&m->delayed, memory_order_relaxed);
    out->canceled = atomic_load_explicit(&m->canceled, memory_order_relaxed);
}

void demo_stop(struct demo *d)
{
    if (!d)
        return;
    pthread_mutex_lock(&d->mu);
    d->stopping = true;
    pthread_mutex_unlock(&d->mu);
    /* Wake every delayed request; a handler about to suspend one sees a done ctx and wakes it
     * itself. Then wait until each has been answered, so none is suspended at MHD_stop_daemon(). */
    ctx_cancel(d->root, -ECANCELED);
    pthread_mutex_lock(&d->mu);
    /* Give the 503s a moment to go out: MHD_stop_daemon() drops responses not yet sent. They
     * are small and written at once, so this normally takes well under a millisecond. */
    int64_t until = ctx_now() + DEMO_STOP_GRACE_MS;
    struct timespec ts = {.tv_sec = until / 1000, .tv_nsec = (until % 1000) * 1000000L};
    while (d->live > 0)
        if (pthread_cond_timedwait(&d->cv, &d->mu, &ts) == ETIMEDOUT)
            break;
    while (d->parked > 0)
        pthread_cond_wait(&d->cv, &d->mu);
    pthread_mutex_unlock(&d->mu);
    /* Completes every request (NOTIFY_COMPLETED frees them), so no hook runs after this. */
    MHD_stop_daemon(d->mhd);

    pthread_mutex_lock(&d->mu);
    d->quit = true;
    uint64_t one = 1;
    ssize_t w = write(d->evfd, &one, sizeof(one));
    (void)w;
    pthread_mutex_unlock(&d->mu);
    pthread_join(d->watcher, NULL);

    close(d->evfd);
    close(d->epfd);
    destroy_responses(d);
    ctx_free(d->root);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    free(d);
}
