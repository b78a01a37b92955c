/* upstub: a raw-socket HTTP/1.1 test upstream (see upstub.h for the behaviours).
 *
 * DESIGN
 * One listening socket (non-blocking) is shared by a fixed set of loop threads. Each loop owns an
 * epoll set holding the listener (EPOLLEXCLUSIVE when there are several loops, so one accepts), an
 * eventfd used only to stop it, and the connections it accepted; a connection never changes loop,
 * so its state needs no lock. Sockets are level-triggered: EPOLLIN|EPOLLRDHUP always (a client
 * that goes away is seen even while its response is delayed) and EPOLLOUT only while output is
 * pending. A connection serves one request at a time: parse, pick a reply from the route table,
 * then write it (at once, or when its timer is due for sleep<N>); generated bodies (big<N>) are
 * written only as fast as the socket accepts them. Delayed replies sit on the loop's timer list,
 * which bounds the epoll_wait timeout.
 *
 * Counters are atomics shared by all loops; the request log (a ring) and the path with a status
 * of its own are guarded by log_mu (the only lock; no other lock is taken under it). */
#include "tests/upstub.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/support.h"

#define IN_MAX 16384     /* request line + headers + body must fit */
#define FILL_CHUNK 65536 /* generated body bytes per send() */
#define RESET_ANNOUNCED 100000
#define RESET_SENT 1000

enum reply_kind {
    REPLY_NORMAL, /* status, headers and body */
    REPLY_RESET,  /* headers and part of the body, then RST */
    REPLY_EMPTY,  /* close without a reply */
    REPLY_RAW,    /* canned bytes written as they are (fault-*), see struct fault */
};

/* What a fault route does once its bytes are written. */
enum fault_end {
    END_HANG,  /* keep the connection open and never write again (the request stays in flight) */
    END_CLOSE, /* close normally */
    END_RESET, /* close with an RST (SO_LINGER 0) */
};

/* A fault route: 'head' written at once, then 'drip' written 'step' bytes every 'every_ms' ms
 * (from its start again after its end when 'repeat'), then 'end'. */
struct fault {
    const char *name;  /* the segment after "fault-" */
    const char *head;  /* written at once ("" for nothing) */
    const char *drip;  /* written slowly afterwards, or NULL */
    size_t step;       /* bytes per tick (0: the whole of 'drip') */
    int every_ms;      /* tick interval */
    bool repeat;       /* 'drip' never ends */
    enum fault_end end; /* then */
};

/* What a route decided; built from the request and kept while a reply is delayed. */
struct reply {
    enum reply_kind kind; /* how to answer */
    int status;           /* HTTP status */
    const char *ctype;    /* Content-Type (static string) */
    char *body;           /* malloc'd literal body or NULL */
    size_t body_len;      /* its length */
    uint64_t fill;        /* generated body bytes ('x') after 'body' */
    int64_t delay_ms;     /* answer this much later (0: at once) */
    bool close;           /* send "Connection: close" and close after */
    bool no_length;       /* no Content-Length: the body ends when the connection closes */
    const char *extra;    /* more header lines ("Name: value\r\n"...; static) or NULL */
    const struct fault *fault; /* REPLY_RAW: what to write */
};

struct stub_loop;

struct conn {
    int fd;                           /* the client socket */
    struct stub_loop *loop;           /* owning loop; everything below is that thread's only */
    struct conn *prev, *next;         /* on loop->conns */
    struct conn *tprev, *tnext;       /* on loop->timers while 'due' is set */
    char in[IN_MAX];                  /* bytes read and not yet consumed */
    size_t in_len;                    /* how many */
    char *out;                        /* headers + literal body being written */
    size_t out_cap, out_len, out_off; /* its capacity, length and bytes written so far */
    uint64_t fill_left;               /* generated body bytes still to write after 'out' */
    bool busy;                        /* a request is in flight (received, reply incomplete) */
    bool close_after;                 /* close once the reply is written */
    bool want_out;                    /* EPOLLOUT is in the interest set */
    int64_t due;                      /* monotonic ms at which 'pending' is answered, or 0 */
    struct reply pending;             /* the delayed reply while 'due' is set */
    const struct fault *fault;        /* a fault reply being dripped (its timer is 'due') */
    size_t drip_off;                  /* bytes of fault->drip written so far */
    bool hold;                        /* the reply is not complete when 'out' is flushed */
};

struct stub_loop {
    struct upstub *s;    /* owner */
    pthread_t thread;    /* the loop thread */
    int epfd;            /* its epoll set */
    int stop_fd;         /* eventfd; readable means stop */
    bool started;        /* thread was created (for unwinding) */
    struct conn *conns;  /* open connections; loop thread only (freed by it on stop) */
    struct conn *timers; /* connections with a delayed reply; loop thread only */
};

struct upstub {
    int listen_fd;           /* non-blocking listener on 'addr' */
    int port;                /* its port */
    char addr[INET_ADDRSTRLEN]; /* the IPv4 address it listens on (127.0.0.1 unless given) */
    unsigned nloops;         /* loop threads */
    struct stub_loop *loops; /* nloops of them */
    atomic_uint_fast64_t requests, in_flight, max_in_flight, accepted, open, max_open, canceled,
        bytes_sent;         /* see struct upstub_stats */
    pthread_mutex_t log_mu; /* guards the log fields below */
    struct upstub_req *log; /* ring of UPSTUB_LOG_SIZE entries */
    size_t log_next;        /* next slot to write; guarded by log_mu */
    size_t log_len;         /* valid entries, <= UPSTUB_LOG_SIZE; guarded by log_mu */
    char fixed_path[UPSTUB_TARGET_MAX]; /* upstub_set_path_status(); guarded by log_mu */
    int fixed_status;       /* its status, 0: none; guarded by log_mu */
};

/* Sentinels for epoll data: the listener and the stop eventfd. */
static char listen_tag, stop_tag;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void raise_max(atomic_uint_fast64_t *max, uint64_t v)
{
    uint64_t cur = atomic_load(max);
    while (cur < v && !atomic_compare_exchange_weak(max, &cur, v))
        ;
}

/* ---------------------------------------------------------------- routes */

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Writes 'seg' percent-decoded and JSON-escaped to 'dst' (room for 6 bytes per input byte).
 * Returns the length written. */
static size_t json_id(char *dst, const char *seg, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)seg[i];
        if (ch == '%' && i + 2 < len && hexval(seg[i + 1]) >= 0 && hexval(seg[i + 2]) >= 0) {
            ch = (unsigned char)(hexval(seg[i + 1]) * 16 + hexval(seg[i + 2]));
            i += 2;
        }
        if (ch == '"' || ch == '\\') {
            dst[n++] = '\\';
            dst[n++] = (char)ch;
        } else if (ch < 0x20 || ch == 0x7f) {
            memcpy(dst + n, "\\u00", 4);
            dst[n + 4] = hex[ch >> 4];
            dst[n + 5] = hex[ch & 15];
            n += 6;
        } else {
            dst[n++] = (char)ch;
        }
    }
    return n;
}

static void set_body(struct reply *r, const char *s)
{
    r->body_len = strlen(s);
    r->body = malloc(r->body_len + 1);
    if (r->body)
        memcpy(r->body, s, r->body_len + 1);
    else
        r->body_len = 0;
}

static void route_default(struct reply *r, const char *seg, size_t len, long n)
{
    (void)n;
    r->body = malloc(len * 6 + 16);
    if (!r->body)
        return;
    size_t k = 0;
    memcpy(r->body, "{\"id\":\"", 7);
    k = 7;
    k += json_id(r->body + k, seg, len);
    memcpy(r->body + k, "\"}", 3);
    r->body_len = k + 2;
}

static void route_status(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    r->status = n >= 100 && n <= 599 ? (int)n : 400;
    char b[32];
    snprintf(b, sizeof(b), "{\"status\":%d}", r->status);
    set_body(r, b);
}

static void route_fail(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    (void)n;
    r->status = 500;
    set_body(r, "{\"error\":\"fail\"}");
}

static void route_sleep(struct reply *r, const char *seg, size_t len, long n)
{
    route_default(r, seg, len, n);
    r->delay_ms = n > 0 ? n : 0;
}

static void route_text(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    (void)n;
    r->ctype = "text/plain";
    set_body(r, "text");
}

static void route_big(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    r->ctype = "application/octet-stream";
    r->fill = n > 0 ? (uint64_t)n : 0;
}

static void route_stream(struct reply *r, const char *seg, size_t len, long n)
{
    route_big(r, seg, len, n);
    r->no_length = true;
    r->close = true;
}

static void route_reset(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    (void)n;
    r->kind = REPLY_RESET;
}

static void route_empty(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    (void)n;
    r->kind = REPLY_EMPTY;
}

static void route_close(struct reply *r, const char *seg, size_t len, long n)
{
    route_default(r, seg, len, n);
    r->close = true;
}

static void route_redirect(struct reply *r, const char *seg, size_t len, long n)
{
    (void)seg;
    (void)len;
    r->status = n >= 300 && n <= 399 ? (int)n : 302;
    r->extra = "Location: /items/redirect-target\r\n";
    set_body(r, "{\"moved\":true}");
}

/* The fault table (see upstub.h). Bodies are short so that a cap never decides the outcome. */
static const struct fault faults[] = {
    /* transport */
    {"rst-now", "", NULL, 0, 0, false, END_RESET},
    {"rst-head", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
     NULL, 0, 0, false, END_RESET},
    {"rst-chunk",
     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5\r\n[1,2,\r\n",
     NULL, 0, 0, false, END_RESET},
    {"silent", "", NULL, 0, 0, false, END_HANG},
    /* time */
    {"body-forever",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
     "4\r\nxxxx\r\n", 0, 20, true, END_HANG},
    {"headers-forever", "HTTP/1.1 200 OK\r\n", "X-More: yes\r\n", 0, 20, true, END_HANG},
    {"trickle", "",
     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
     "{\"ok\":\"slow\"}",
     1, 1000, false, END_HANG},
    /* status line */
    {"status-garbage", "garbage\r\nContent-Length: 2\r\n\r\nok", NULL, 0, 0, false, END_HANG},
    {"status-letters", "HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok", NULL, 0, 0, false,
     END_HANG},
    {"status-long", "HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", NULL, 0, 0, false,
     END_HANG},
    {"status-version", "HTTP/7.3 200 OK\r\nContent-Length: 2\r\n\r\nok", NULL, 0, 0, false,
     END_HANG},
    {"status-empty", "\r\n\r\n", NULL, 0, 0, false, END_HANG},
    /* framing */
    {"cl-long-close",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nshort", NULL, 0,
     0, false, END_CLOSE},
    {"cl-long-hang",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nshort", NULL, 0,
     0, false, END_HANG},
    {"cl-short",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
     "12345HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
     NULL, 0, 0, false, END_HANG},
    {"chunk-bad-size",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
     "zz\r\nhello\r\n0\r\n\r\n",
     NULL, 0, 0, false, END_HANG},
    {"chunk-overrun",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
     "3\r\nhello\r\n0\r\n\r\n",
     NULL, 0, 0, false, END_HANG},
    {"chunk-cut",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5\r\nhel",
     NULL, 0, 0, false, END_CLOSE},
    {"chunk-no-end",
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5\r\nhello\r\n",
     NULL, 0, 0, false, END_CLOSE},
};

static void route_fault(struct reply *r, const char *seg, size_t len, long n)
{
    (void)n;
    size_t pl = strlen("fault-");
    for (size_t i = 0; i < sizeof(faults) / sizeof(faults[0]); i++) {
        if (strlen(faults[i].name) == len - pl && memcmp(seg + pl, faults[i].name, len - pl) == 0) {
            r->kind = REPLY_RAW;
            r->fault = &faults[i];
            return;
        }
    }
    r->status = 404;
    set_body(r, "{\"error\":\"no such fault\"}");
}

/* Matched in order by prefix of the last path segment; <N> is parsed right after the prefix.
 * A route fills in what differs from "200, application/json, no body". */
static const struct route {
    const char *prefix;
    void (*fn)(struct reply *r, const char *seg, size_t len, long n);
} routes[] = {
    {"status", route_status}, {"fail", route_fail},   {"sleep", route_sleep},
    {"text", route_text},     {"big", route_big},     {"reset", route_reset},
    {"empty", route_empty},   {"close", route_close}, {"stream", route_stream},
    {"fault-", route_fault},  {"redirect", route_redirect},
};

static void route(const char *target, size_t tlen, struct reply *r)
{
    memset(r, 0, sizeof(*r));
    r->kind = REPLY_NORMAL;
    r->status = 200;
    r->ctype = "application/json";
    const char *q = memchr(target, '?', tlen);
    size_t plen = q ? (size_t)(q - target) : tlen;
    const char *seg = target;
    for (size_t i = 0; i < plen; i++)
        if (target[i] == '/')
            seg = target + i + 1;
    size_t len = plen - (size_t)(seg - target);
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
        size_t pl = strlen(routes[i].prefix);
        if (len < pl || memcmp(seg, routes[i].prefix, pl) != 0)
            continue;
        long n = 0;
        for (size_t k = pl; k < len && seg[k] >= '0' && seg[k] <= '9' && n < 1000000000000L; k++)
            n = n * 10 + (seg[k] - '0');
        routes[i].fn(r, seg, len, n);
        return;
    }
    route_default(r, seg, len, 0);
}

/* ---------------------------------------------------------------- log */

static void copy_field(char *dst, size_t size, const char *src, size_t len)
{
    if (len >= size)
        len = size - 1;
    memcpy(dst, src, len);
    dst[len] = 0;
}

static void log_request(struct upstub *s, const char *target, size_t tlen, const char *rid,
                        size_t rlen, const char *tmo, size_t tmlen)
{
    pthread_mutex_lock(&s->log_mu);
    struct upstub_req *e = &s->log[s->log_next];
    copy_field(e->target, sizeof(e->target), target, tlen);
    e->has_request_id = rid != NULL;
    copy_field(e->request_id, sizeof(e->request_id), rid ? rid : "", rid ? rlen : 0);
    e->has_timeout_ms = tmo != NULL;
    copy_field(e->timeout_ms, sizeof(e->timeout_ms), tmo ? tmo : "", tmo ? tmlen : 0);
    s->log_next = (s->log_next + 1) % UPSTUB_LOG_SIZE;
    if (s->log_len < UPSTUB_LOG_SIZE)
        s->log_len++;
    pthread_mutex_unlock(&s->log_mu);
}

/* ---------------------------------------------------------------- connections */

static void timer_unlink(struct conn *c)
{
    if (!c->due)
        return;
    if (c->tprev)
        c->tprev->tnext = c->tnext;
    else
        c->loop->timers = c->tnext;
    if (c->tnext)
        c->tnext->tprev = c->tprev;
    c->tprev = c->tnext = NULL;
    c->due = 0;
}

/* Closes and frees 'c'. 'canceled': the client went away with its request in flight. */
static void conn_close(struct conn *c, bool canceled, bool reset)
{
    struct upstub *s = c->loop->s;
    if (c->busy) {
        atomic_fetch_sub(&s->in_flight, 1);
        if (canceled)
            atomic_fetch_add(&s->canceled, 1);
    }
    timer_unlink(c);
    free(c->pending.body);
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    /* Leave the epoll set explicitly: close() alone does not when a forked child still holds a
     * copy of the socket (between fork and exec), and the loop would then read a freed conn. */
    epoll_ctl(c->loop->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        c->loop->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c->out);
    free(c);
    atomic_fetch_sub(&s->open, 1);
}

static void set_want_out(struct conn *c, bool on)
{
    if (c->want_out == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(c->loop->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = on;
}

/* Writes what is pending. Returns false if the connection was closed. */
static bool conn_flush(struct conn *c)
{
    static const char fill[FILL_CHUNK] = {[0 ... FILL_CHUNK - 1] = 'x'};
    struct upstub *s = c->loop->s;
    while (c->out_off < c->out_len || c->fill_left > 0) {
        ssize_t n;
        if (c->out_off < c->out_len) {
            n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        } else {
            size_t k = c->fill_left < FILL_CHUNK ? (size_t)c->fill_left : FILL_CHUNK;
            n = send(c->fd, fill, k, MSG_NOSIGNAL);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_want_out(c, true);
                return true;
            }
            conn_close(c, true, false);
            return false;
        }
        atomic_fetch_add(&s->bytes_sent, (uint64_t)n);
        if (c->out_off < c->out_len)
            c->out_off += (size_t)n;
        else
            c->fill_left -= (uint64_t)n;
    }
    set_want_out(c, false);
    if (c->busy && !c->hold) {
        c->busy = false;
        atomic_fetch_sub(&s->in_flight, 1);
        if (c->close_after) {
            conn_close(c, false, false);
            return false;
        }
    }
    return true;
}

static const char *reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Status";
    }
}

static bool out_reserve(struct conn *c, size_t need)
{
    if (c->out_cap >= need)
        return true;
    size_t cap = c->out_cap ? c->out_cap : 512;
    while (cap < need)
        cap *= 2;
    char *p = realloc(c->out, cap);
    if (!p)
        return false;
    c->out = p;
    c->out_cap = cap;
    return true;
}

static void timer_link(struct conn *c, int64_t due)
{
    c->due = due;
    c->tprev = NULL;
    c->tnext = c->loop->timers;
    if (c->tnext)
        c->tnext->tprev = c;
    c->loop->timers = c;
}

/* Appends 'n' bytes to the output (after what is still unsent). */
static bool out_append(struct conn *c, const char *data, size_t n)
{
    if (c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (!out_reserve(c, c->out_len + n + 1))
        return false;
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
    return true;
}

/* A fault reply's bytes are all written (or it never ends): what comes next. Returns false if
 * the connection closed. */
static bool fault_end(struct conn *c)
{
    const struct fault *f = c->fault;
    c->fault = NULL;
    switch (f->end) {
    case END_HANG:
        return conn_flush(c); /* 'hold' stays: the request never completes */
    case END_CLOSE:
        c->hold = false;
        c->close_after = true;
        return conn_flush(c);
    default: {
        /* Best effort: the bytes are small and the socket buffer is empty. */
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0)
            atomic_fetch_add(&c->loop->s->bytes_sent, (uint64_t)n);
        conn_close(c, false, true);
        return false;
    }
    }
}

/* Writes the next piece of a dripping fault reply and schedules the one after. Returns false if
 * the connection closed. */
static bool fault_tick(struct conn *c)
{
    const struct fault *f = c->fault;
    size_t total = strlen(f->drip);
    if (c->drip_off == total && f->repeat)
        c->drip_off = 0;
    size_t n = f->step ? f->step : total;
    if (n > total - c->drip_off)
        n = total - c->drip_off;
    if (!out_append(c, f->drip + c->drip_off, n)) {
        conn_close(c, false, true);
        return false;
    }
    c->drip_off += n;
    if (c->drip_off == total && !f->repeat) {
        if (!conn_flush(c))
            return false;
        return fault_end(c);
    }
    timer_link(c, now_ms() + f->every_ms);
    return conn_flush(c);
}

/* Starts a fault reply ('r' consumed). Returns false if the connection closed. */
static bool fault_start(struct conn *c, struct reply *r)
{
    const struct fault *f = r->fault;
    free(r->body);
    r->body = NULL;
    c->hold = true;
    c->fault = f;
    c->drip_off = 0;
    if (!out_append(c, f->head, strlen(f->head))) {
        conn_close(c, false, true);
        return false;
    }
    if (f->drip) {
        timer_link(c, now_ms() + f->every_ms);
        return conn_flush(c);
    }
    if (f->end != END_RESET && !conn_flush(c))
        return false;
    return fault_end(c);
}

/* Answers the current request with 'r' (consumed). Returns false if the connection closed. */
static bool conn_reply(struct conn *c, struct reply *r)
{
    if (r->kind == REPLY_EMPTY) {
        free(r->body);
        conn_close(c, false, false);
        return false;
    }
    if (r->kind == REPLY_RAW)
        return fault_start(c, r);
    uint64_t clen = r->kind == REPLY_RESET ? RESET_ANNOUNCED : r->body_len + r->fill;
    if (!out_reserve(c, 256 + r->body_len + (r->kind == REPLY_RESET ? RESET_SENT : 0))) {
        free(r->body);
        conn_close(c, false, true);
        return false;
    }
    char lenhdr[48] = "";
    if (!r->no_length)
        snprintf(lenhdr, sizeof(lenhdr), "Content-Length: %llu\r\n", (unsigned long long)clen);
    int h =
        snprintf(c->out, c->out_cap, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s%s\r\n",
                 r->status, reason(r->status), r->ctype, lenhdr, r->extra ? r->extra : "",
                 r->close ? "Connection: close\r\n" : "");
    c->out_len = (size_t)h;
    c->out_off = 0;
    if (r->body_len)
        memcpy(c->out + c->out_len, r->body, r->body_len);
    c->out_len += r->body_len;
    free(r->body);
    r->body = NULL;
    if (r->kind == REPLY_RESET) {
        memset(c->out + c->out_len, 'x', RESET_SENT);
        c->out_len += RESET_SENT;
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n > 0)
            atomic_fetch_add(&c->loop->s->bytes_sent, (uint64_t)n);
        conn_close(c, false, true);
        return false;
    }
    c->fill_left = r->fill;
    c->close_after = r->close;
    return conn_flush(c);
}

/* A request for the path set by upstub_set_path_status() (the target before any '?') gets
 * that status instead of what the routes said. */
static void route_fixed(struct upstub *s, const char *target, size_t tlen, struct reply *r)
{
    const char *q = memchr(target, '?', tlen);
    size_t plen = q ? (size_t)(q - target) : tlen;
    pthread_mutex_lock(&s->log_mu);
    int status = s->fixed_status;
    bool match = status != 0 && strlen(s->fixed_path) == plen &&
                 memcmp(s->fixed_path, target, plen) == 0;
    pthread_mutex_unlock(&s->log_mu);
    if (!match)
        return;
    free(r->body);
    memset(r, 0, sizeof(*r));
    r->kind = REPLY_NORMAL;
    r->ctype = "application/json";
    route_status(r, "", 0, status);
}

static const char *find_header(const char *hdrs, const char *end, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    const char *p = hdrs;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol)
            eol = end;
        if ((size_t)(eol - p) > nl && p[nl] == ':' && strncasecmp(p, name, nl) == 0) {
            const char *v = p + nl + 1;
            while (v < eol && (*v == ' ' || *v == '\t'))
                v++;
            const char *ve = eol;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *len = (size_t)(ve - v);
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

/* Parses one request from c->in. Returns 1 (c->busy set, reply started or scheduled; 'alive'
 * tells whether c still exists), 0 (need more bytes) or -1 (protocol error: close). */
static int conn_parse(struct conn *c, bool *alive)
{
    struct upstub *s = c->loop->s;
    char *hend = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!hend)
        return c->in_len >= IN_MAX ? -1 : 0;
    char *line_end = memmem(c->in, (size_t)(hend + 2 - c->in), "\r\n", 2);
    char *sp1 = memchr(c->in, ' ', (size_t)(line_end - c->in));
    if (!sp1)
        return -1;
    char *target = sp1 + 1;
    char *sp2 = memchr(target, ' ', (size_t)(line_end - target));
    if (!sp2 || sp2 == target)
        return -1;
    size_t tlen = (size_t)(sp2 - target);
    bool http10 = (size_t)(line_end - sp2 - 1) == 8 && memcmp(sp2 + 1, "HTTP/1.0", 8) == 0;
    const char *hdrs = line_end + 2, *hdrs_end = hend + 2;
    size_t len, clen = 0;
    const char *v = find_header(hdrs, hdrs_end, "Content-Length", &len);
    if (v) {
        char num[24];
        copy_field(num, sizeof(num), v, len);
        clen = strtoul(num, NULL, 10);
    }
    size_t total = (size_t)(hend + 4 - c->in) + clen;
    if (total > IN_MAX)
        return -1;
    if (c->in_len < total)
        return 0;
    bool close = http10;
    v = find_header(hdrs, hdrs_end, "Connection", &len);
    if (v && len == 5 && strncasecmp(v, "close", 5) == 0)
        close = true;
    if (v && len == 10 && strncasecmp(v, "keep-alive", 10) == 0)
        close = false;
    size_t rlen = 0, tmlen = 0;
    const char *rid = find_header(hdrs, hdrs_end, "X-Request-Id", &rlen);
    const char *tmo = find_header(hdrs, hdrs_end, "X-Request-Timeout-Ms", &tmlen);
    log_request(s, target, tlen, rid, rlen, tmo, tmlen);
    atomic_fetch_add(&s->requests, 1);
    raise_max(&s->max_in_flight, atomic_fetch_add(&s->in_flight, 1) + 1);
    c->busy = true;

    struct reply r;
    route(target, tlen, &r);
    route_fixed(s, target, tlen, &r);
    r.close = r.close || close;
    memmove(c->in, c->in + total, c->in_len - total);
    c->in_len -= total;
    if (r.delay_ms > 0) {
        c->pending = r;
        c->due = now_ms() + r.delay_ms;
        c->tprev = NULL;
        c->tnext = c->loop->timers;
        if (c->tnext)
            c->tnext->tprev = c;
        c->loop->timers = c;
        *alive = true;
        return 1;
    }
    *alive = conn_reply(c, &r);
    return 1;
}

/* Serves the requests buffered on 'c' while it is idle. */
static void conn_serve(struct conn *c)
{
    while (!c->busy) {
        bool alive = true;
        int rc = conn_parse(c, &alive);
        if (rc < 0) {
            conn_close(c, false, false);
            return;
        }
        if (rc == 0 || !alive)
            return;
    }
}

/* Reads what has arrived. Returns false if the connection was closed. */
static bool conn_read(struct conn *c)
{
    for (;;) {
        if (c->in_len == IN_MAX) {
            conn_close(c, true, false); /* a request too large, or a flood while busy */
            return false;
        }
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_MAX - c->in_len, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return true;
        conn_close(c, true, false); /* EOF or error */
        return false;
    }
}

static void accept_all(struct stub_loop *l)
{
    struct upstub *s = l->s;
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or out of fds: the backlog keeps the rest */
        struct conn *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        c->fd = fd;
        c->loop = l;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        c->next = l->conns;
        if (c->next)
            c->next->prev = c;
        l->conns = c;
        atomic_fetch_add(&s->accepted, 1);
        raise_max(&s->max_open, atomic_fetch_add(&s->open, 1) + 1);
    }
}

static int next_timeout(struct stub_loop *l)
{
    if (!l->timers)
        return -1;
    int64_t now = now_ms(), min = INT64_MAX;
    for (struct conn *c = l->timers; c; c = c->tnext)
        if (c->due < min)
            min = c->due;
    return min <= now ? 0 : (int)(min - now > 60000 ? 60000 : min - now);
}

static void fire_timers(struct stub_loop *l)
{
    int64_t now = now_ms();
    struct conn *c = l->timers;
    while (c) {
        struct conn *next = c->tnext;
        if (c->due <= now && c->fault) {
            timer_unlink(c);
            if (fault_tick(c) && !c->busy)
                conn_serve(c);
            next = l->timers;
        } else if (c->due <= now) {
            struct reply r = c->pending;
            c->pending.body = NULL;
            timer_unlink(c);
            if (conn_reply(c, &r))
                conn_serve(c);
            next = l->timers; /* the list may have changed; restart (due ones leave it) */
        }
        c = next;
    }
}

static void *loop_main(void *arg)
{
    struct stub_loop *l = arg;
    struct epoll_event evs[128];
    for (;;) {
        int n = epoll_wait(l->epfd, evs, 128, next_timeout(l));
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &stop_tag)
                goto out;
            if (p == &listen_tag) {
                accept_all(l);
                continue;
            }
            struct conn *c = p;
            uint32_t e = evs[i].events;
            if ((e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && !conn_read(c))
                continue;
            if ((e & EPOLLOUT) && !conn_flush(c))
                continue;
            conn_serve(c);
        }
        fire_timers(l);
    }
out:
    while (l->conns)
        conn_close(l->conns, false, false);
    return NULL;
}

/* ---------------------------------------------------------------- API */

/* A listener on IPv4 'addr', port *port (0: a free one); the port bound goes to *port. */
static int listen_at(const char *addr, int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)*port)};
    if (*port < 0 || *port > 65535 || inet_pton(AF_INET, addr, &a.sin_addr) != 1)
        return -EINVAL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    socklen_t alen = sizeof(a);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 4096) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

void upstub_free(struct upstub *s)
{
    if (!s)
        return;
    for (unsigned i = 0; i < s->nloops; i++) {
        struct stub_loop *l = &s->loops[i];
        if (l->started) {
            uint64_t one = 1;
            ssize_t w = write(l->stop_fd, &one, sizeof(one));
            (void)w;
            pthread_join(l->thread, NULL);
        }
        if (l->stop_fd >= 0)
            close(l->stop_fd);
        if (l->epfd >= 0)
            close(l->epfd);
    }
    free(s->loops);
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    pthread_mutex_destroy(&s->log_mu);
    free(s->log);
    free(s);
}

int upstub_new(unsigned threads, struct upstub **out)
{
    return upstub_new_at(threads, "127.0.0.1", 0, out);
}

int upstub_new_at(unsigned threads, const char *addr, int port, struct upstub **out)
{
    *out = NULL;
    if (threads == 0)
        threads = 1;
    struct upstub *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->listen_fd = -1;
    pthread_mutex_init(&s->log_mu, NULL);
    s->log = calloc(UPSTUB_LOG_SIZE, sizeof(*s->log));
    s->loops = calloc(threads, sizeof(*s->loops));
    if (!s->log || !s->loops) {
        upstub_free(s);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < threads; i++)
        s->loops[i].epfd = s->loops[i].stop_fd = -1;
    s->nloops = threads;
    snprintf(s->addr, sizeof(s->addr), "%s", addr);
    s->port = port;
    int err = listen_at(addr, &s->port);
    if (err < 0) {
        upstub_free(s);
        return err;
    }
    s->listen_fd = err;
    for (unsigned i = 0; i < threads; i++) {
        struct stub_loop *l = &s->loops[i];
        l->s = s;
        l->epfd = epoll_create1(EPOLL_CLOEXEC);
        l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (l->epfd < 0 || l->stop_fd < 0) {
            err = -errno;
            upstub_free(s);
            return err;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &stop_tag};
        struct epoll_event lev = {.events = EPOLLIN | (threads > 1 ? EPOLLEXCLUSIVE : 0),
                                  .data.ptr = &listen_tag};
        if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->stop_fd, &ev) < 0 ||
            epoll_ctl(l->epfd, EPOLL_CTL_ADD, s->listen_fd, &lev) < 0) {
            err = -errno;
            upstub_free(s);
            return err;
        }
        err = -pthread_create(&l->thread, NULL, loop_main, l);
        if (err < 0) {
            upstub_free(s);
            return err;
        }
        l->started = true;
    }
    *out = s;
    return 0;
}

int upstub_port(const struct upstub *s)
{
    return s->port;
}

int upstub_url(const struct upstub *s, char *buf, size_t size, const char *path)
{
    int n = snprintf(buf, size, "http://%s:%d%s", s->addr, s->port, path ? path : "");
    return n < 0 || (size_t)n >= size ? -ENOSPC : n;
}

void upstub_stats(struct upstub *s, struct upstub_stats *st)
{
    st->requests = atomic_load(&s->requests);
    st->in_flight = atomic_load(&s->in_flight);
    st->max_in_flight = atomic_load(&s->max_in_flight);
    st->accepted = atomic_load(&s->accepted);
    st->open = atomic_load(&s->open);
    st->max_open = atomic_load(&s->max_open);
    st->canceled = atomic_load(&s->canceled);
    st->bytes_sent = atomic_load(&s->bytes_sent);
}

size_t upstub_log(struct upstub *s, struct upstub_req *out, size_t max)
{
    pthread_mutex_lock(&s->log_mu);
    size_t n = s->log_len < max ? s->log_len : max;
    size_t first = (s->log_next + UPSTUB_LOG_SIZE - n) % UPSTUB_LOG_SIZE;
    for (size_t i = 0; i < n; i++)
        out[i] = s->log[(first + i) % UPSTUB_LOG_SIZE];
    pthread_mutex_unlock(&s->log_mu);
    return n;
}

bool upstub_find(struct upstub *s, const char *target, struct upstub_req *out)
{
    bool found = false;
    pthread_mutex_lock(&s->log_mu);
    for (size_t i = 1; i <= s->log_len && !found; i++) {
        const struct upstub_req *e = &s->log[(s->log_next + UPSTUB_LOG_SIZE - i) % UPSTUB_LOG_SIZE];
        if (strcmp(e->target, target) == 0) {
            found = true;
            if (out)
                *out = *e;
        }
    }
    pthread_mutex_unlock(&s->log_mu);
    return found;
}

size_t upstub_count(struct upstub *s, const char *target)
{
    size_t n = 0;
    pthread_mutex_lock(&s->log_mu);
    for (size_t i = 0; i < s->log_len; i++)
        if (strcmp(s->log[i].target, target) == 0)
            n++;
    pthread_mutex_unlock(&s->log_mu);
    return n;
}

pid_t upstub_spawn(unsigned threads, int *port, int *ctl)
{
    int up[2], down[2];
    if (pipe(up) != 0)
        return -1;
    if (pipe(down) != 0) {
        close(up[0]);
        close(up[1]);
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        close(up[0]);
        close(up[1]);
        close(down[0]);
        close(down[1]);
        return -1;
    }
    if (pid == 0) {
        close(up[0]);
        close(down[1]);
        struct upstub *s;
        int p = upstub_new(threads, &s) == 0 ? upstub_port(s) : -1;
        if (write(up[1], &p, sizeof(p)) != sizeof(p))
            _exit(1);
        char c;
        while (read(down[0], &c, 1) > 0) /* until the parent closes its end */
            ;
        if (p > 0)
            upstub_free(s);
        _exit(0);
    }
    close(up[1]);
    close(down[0]);
    if (read(up[0], port, sizeof(*port)) != sizeof(*port) || *port <= 0) {
        close(up[0]);
        close(down[1]);
        waitpid(pid, NULL, 0);
        return -1;
    }
    close(up[0]);
    *ctl = down[1];
    return pid;
}

void upstub_set_path_status(struct upstub *s, const char *path, int status)
{
    pthread_mutex_lock(&s->log_mu);
    snprintf(s->fixed_path, sizeof(s->fixed_path), "%s", path && status ? path : "");
    s->fixed_status = path && status ? status : 0;
    pthread_mutex_unlock(&s->log_mu);
}

uint64_t upstub_stat(struct upstub *s, size_t off)
{
    struct upstub_stats st;
    upstub_stats(s, &st);
    uint64_t v;
    memcpy(&v, (const char *)&st + off, sizeof(v));
    return v;
}

struct stat_want {
    struct upstub *s;
    size_t off;
    uint64_t n;
};

static bool stat_reached(void *arg)
{
    struct stat_want *w = arg;
    return upstub_stat(w->s, w->off) >= w->n;
}

bool upstub_wait_stat(struct upstub *s, size_t off, uint64_t n, int64_t ms)
{
    struct stat_want w = {s, off, n};
    return test_wait_until(stat_reached, &w, ms);
}

bool upstub_start_set(unsigned n, const char *const *prefix, struct upstub **stub,
                      char (*tmpl)[UPSTUB_TMPL_MAX])
{
    for (unsigned i = 0; i < n; i++) {
        if (upstub_new(1, &stub[i]) != 0)
            return false;
        char path[128];
        snprintf(path, sizeof(path), "/items/%s{id}", prefix && prefix[i] ? prefix[i] : "");
        upstub_url(stub[i], tmpl[i], UPSTUB_TMPL_MAX, path);
    }
    return true;
}
