/* guard: connection deadlines and lingering closes (guard.h).
 *
 * The registry is a doubly linked list under 'mu'. The guard thread wakes every 'tick' ms
 * (an eighth of the shorter deadline, 10 ms to 1 s) and walks it: a connection waiting for
 * a request whose kernel byte count (TCP_INFO tcpi_bytes_received) moved past the mark taken
 * when it started waiting has received its first byte at most a tick ago; from then on its
 * header deadline runs. A lingering socket is a dup() of the connection's descriptor taken in
 * guard_conn_close(), in the thread's epoll set (EPOLLIN); it is read and dropped until the
 * client's end, an error, its byte allowance, or its deadline, then closed. Lock order: only
 * 'mu'; the callbacks run with it released. */
#include "server/http/guard.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/json.h"

enum phase {
    PH_WAITING, /* between requests, or before the first: header deadline once bytes come */
    PH_BODY,    /* headers in, body being read */
    PH_HANDLING, /* request read; the answer is being made or sent */
    PH_TIMED_OUT /* answered 408; the connection is closing */
};

#define RID_MAX 128

struct guard_conn {
    struct guard *g;         /* its guard */
    int fd;                  /* the connection's descriptor (libmicrohttpd's) */
    atomic_int phase;        /* enum phase; CAS by the worker and the guard thread */
    atomic_bool linger;      /* linger when it closes */
    int64_t since;           /* when the body phase began (ms); guarded by mu */
    int64_t first_byte;      /* when a waiting connection's first byte was seen, or 0; mu */
    uint64_t mark;           /* bytes received when it began waiting; mu */
    bool mark_set;           /* 'mark' was read after the phase began; mu */
    struct peer *peer;       /* its address's count, or NULL (no limit, or out of memory); mu */
    bool refused;            /* over --max-clients-per-ip: to be closed unanswered */
    struct guard_conn *prev, *next; /* registry; mu */
};

/* Connections open from one address (max_per_ip). */
struct peer {
    struct peer *next;       /* in its bucket */
    unsigned char addr[16];  /* IPv4 (first 4 bytes) or IPv6 */
    unsigned char len;       /* 4 or 16 */
    unsigned n;              /* connections registered from it */
};

#define PEER_BUCKETS 256

struct lingerer {
    int fd;                     /* our duplicate of the descriptor */
    int64_t until;              /* close at this time */
    size_t left;                /* bytes still to drop */
    struct lingerer *prev, *next; /* the lingering list; mu */
};

struct guard {
    struct guard_opts o;        /* as given */
    int64_t tick;               /* scan period, ms */
    int ep;                     /* the thread's epoll set: wake and lingering sockets */
    int wake;                   /* eventfd: stop */
    pthread_t thread;           /* the guard thread */
    pthread_mutex_t mu;         /* guards conns, lingerers, nlinger, stop */
    struct guard_conn *conns;   /* the registry */
    struct lingerer *lingerers; /* lingering sockets */
    unsigned nlinger;           /* their number */
    bool stop;                  /* guard_free() was called */
    struct peer *peers[PEER_BUCKETS]; /* connections per address (max_per_ip); mu */
};

/* Bytes the kernel received on 'fd' so far, or false if it cannot say. */
static bool bytes_received(int fd, uint64_t *out)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 ||
        len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
        return false;
    *out = ti.tcpi_bytes_received;
    return true;
}

static const char *reason_of(unsigned status)
{
    switch (status) {
    case 400:
        return "Bad Request";
    case 408:
        return "Request Timeout";
    case 413:
        return "Content Too Large";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    default:
        return "Error";
    }
}

bool guard_answer(int fd, unsigned status, const char *code, const char *message,
                  const char *request_id)
{
    struct json_buf b;
    json_buf_init(&b);
    json_error_doc(&b, code, message, NULL);
    char head[512];
    int hn = snprintf(head, sizeof(head),
                      "HTTP/1.1 %u %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                      "X-Request-Id: %s\r\nConnection: close\r\n\r\n",
                      status, reason_of(status), b.len, request_id);
    bool ok = !json_buf_failed(&b) && hn > 0 && (size_t)hn < sizeof(head);
    if (ok) {
        struct iovec iov[2] = {{head, (size_t)hn}, {b.data, b.len}};
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        ok = n == (ssize_t)((size_t)hn + b.len);
    }
    json_buf_destroy(&b);
    return ok;
}

static void lingerer_close(struct guard *g, struct lingerer *l)
{
    epoll_ctl(g->ep, EPOLL_CTL_DEL, l->fd, NULL);
    close(l->fd);
    if (l->prev)
        l->prev->next = l->next;
    else
        g->lingerers = l->next;
    if (l->next)
        l->next->prev = l->prev;
    g->nlinger--;
    free(l);
}

/* Reads and drops what is there; true when the lingering is over. mu held. */
static bool lingerer_drain(struct lingerer *l)
{
    char buf[16384];
    for (;;) {
        size_t want = l->left < sizeof(buf) ? l->left : sizeof(buf);
        if (want == 0)
            return true;
        ssize_t n = recv(l->fd, buf, want, MSG_DONTWAIT);
        if (n > 0) {
            l->left -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)); /* end or error */
    }
}

/* A deadline passed: answer 408 and shut the socket so libmicrohttpd closes it. mu held. */
static void time_out(struct guard *g, struct guard_conn *c, bool in_body, char *rid)
{
    g->o.new_id(g->o.arg, rid);
    char msg[128];
    snprintf(msg, sizeof(msg), "the request %s did not arrive within %" PRId64 " ms (%s)",
             in_body ? "body" : "headers",
             in_body ? g->o.body_timeout_ms : g->o.header_timeout_ms,
             in_body ? "--body-timeout-ms" : "--header-timeout-ms");
    guard_answer(c->fd, 408, "request_timeout", msg, rid);
    shutdown(c->fd, SHUT_RDWR);
}

#define REPORTS_MAX 64

/* A 408 the guard sent, reported after the scan. */
struct report {
    bool in_body;            /* which deadline */
    char rid[RID_MAX + 1];   /* the id the 408 carried */
};

/* One pass over the registry and the lingering list: answers the requests whose deadline
 * passed (at most REPORTS_MAX a pass; the rest on the next) and records them in 'rep'; closes
 * the lingering sockets whose time is up. Returns how many 408s. mu held. */
static unsigned scan(struct guard *g, int64_t now, struct report *rep)
{
    unsigned nrep = 0;
    for (struct guard_conn *c = g->conns; c && nrep < REPORTS_MAX; c = c->next) {
        int ph = atomic_load(&c->phase);
        bool late = false;
        if (ph == PH_WAITING && g->o.header_timeout_ms > 0) {
            uint64_t n;
            if (!c->mark_set) {
                if (bytes_received(c->fd, &n)) {
                    c->mark = n;
                    c->mark_set = true;
                }
            } else if (!c->first_byte && bytes_received(c->fd, &n) && n > c->mark) {
                c->first_byte = now;
            }
            late = c->first_byte && now - c->first_byte >= g->o.header_timeout_ms;
        } else if (ph == PH_BODY && g->o.body_timeout_ms > 0) {
            late = now - c->since >= g->o.body_timeout_ms;
        }
        if (late && atomic_compare_exchange_strong(&c->phase, &ph, PH_TIMED_OUT)) {
            rep[nrep].in_body = ph == PH_BODY;
            time_out(g, c, rep[nrep].in_body, rep[nrep].rid);
            nrep++;
        }
    }
    for (struct lingerer *l = g->lingerers, *next; l; l = next) {
        next = l->next;
        if (now >= l->until)
            lingerer_close(g, l);
    }
    return nrep;
}

static void *guard_main(void *arg)
{
    struct guard *g = arg;
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(g->ep, evs, 64, (int)g->tick);
        pthread_mutex_lock(&g->mu);
        if (g->stop) {
            pthread_mutex_unlock(&g->mu);
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            struct lingerer *l = evs[i].data.ptr;
            if (l && lingerer_drain(l))
                lingerer_close(g, l);
        }
        struct report rep[REPORTS_MAX];
        unsigned nrep = scan(g, ctx_now(), rep);
        pthread_mutex_unlock(&g->mu);
        for (unsigned i = 0; i < nrep && g->o.on_timeout; i++) /* unlocked: it may log */
            g->o.on_timeout(g->o.arg, rep[i].in_body, rep[i].rid);
    }
}

int guard_new(const struct guard_opts *o, struct guard **out)
{
    struct guard *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->o = *o;
    int64_t shortest = 1000;
    if (o->header_timeout_ms > 0 && o->header_timeout_ms < shortest * 8)
        shortest = o->header_timeout_ms / 8;
    if (o->body_timeout_ms > 0 && o->body_timeout_ms / 8 < shortest)
        shortest = o->body_timeout_ms / 8;
    g->tick = shortest < 10 ? 10 : shortest;
    int rc;
    if ((g->ep = epoll_create1(EPOLL_CLOEXEC)) < 0) {
        rc = -errno;
        goto fail_free;
    }
    if ((g->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        rc = -errno;
        goto fail_ep;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(g->ep, EPOLL_CTL_ADD, g->wake, &ev) != 0) {
        rc = -errno;
        goto fail_wake;
    }
    pthread_mutex_init(&g->mu, NULL);
    if ((rc = pthread_create(&g->thread, NULL, guard_main, g)) != 0) {
        rc = -rc;
        pthread_mutex_destroy(&g->mu);
        goto fail_wake;
    }
    *out = g;
    return 0;
fail_wake:
    close(g->wake);
fail_ep:
    close(g->ep);
fail_free:
    free(g);
    return rc;
}

void guard_free(struct guard *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&g->mu);
    g->stop = true;
    pthread_mutex_unlock(&g->mu);
    uint64_t one = 1;
    if (write(g->wake, &one, sizeof(one)) < 0) {
        /* the counter cannot overflow with one write; nothing else can fail here */
    }
    pthread_join(g->thread, NULL);
    while (g->lingerers)
        lingerer_close(g, g->lingerers);
    while (g->conns) { /* none after libmicrohttpd stopped; freed anyway */
        struct guard_conn *c = g->conns;
        g->conns = c->next;
        free(c);
    }
    for (unsigned i = 0; i < PEER_BUCKETS; i++) /* none either, once every connection closed */
        while (g->peers[i]) {
            struct peer *p = g->peers[i];
            g->peers[i] = p->next;
            free(p);
        }
    pthread_mutex_destroy(&g->mu);
    close(g->wake);
    close(g->ep);
    free(g);
}

/* The address bytes of 'sa' (IPv4, or IPv6 with a mapped IPv4 address as IPv4), or 0. */
static size_t peer_key(const struct sockaddr *sa, unsigned char out[16])
{
    if (sa && sa->sa_family == AF_INET) {
        memcpy(out, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        return 4;
    }
    if (!sa || sa->sa_family != AF_INET6)
        return 0;
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a)) {
        memcpy(out, a->s6_addr + 12, 4);
        return 4;
    }
    memcpy(out, a->s6_addr, 16);
    return 16;
}

/* mu held: counts a connection from 'sa' in c->peer; false when that passes max_per_ip. */
static bool peer_take(struct guard *g, struct guard_conn *c, const struct sockaddr *sa)
{
    unsigned char key[16];
    size_t len = g->o.max_per_ip ? peer_key(sa, key) : 0;
    if (!len)
        return true;
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ key[i]) * 16777619u;
    struct peer **slot = &g->peers[h % PEER_BUCKETS], *p = *slot;
    while (p && (p->len != len || memcmp(p->addr, key, len) != 0))
        p = p->next;
    if (!p) {
        if (!(p = calloc(1, sizeof(*p))))
            return true; /* not counted: out of memory is no reason to refuse */
        memcpy(p->addr, key, len);
        p->len = (unsigned char)len;
        p->next = *slot;
        *slot = p;
    }
    if (p->n >= g->o.max_per_ip)
        return false; /* refused: closed at once, and never counted (a client retrying at
                         once must not find its own refused connections holding the count) */
    c->peer = p;
    p->n++;
    return true;
}

/* mu held: the connection of 'c' no longer counts for its address. */
static void peer_give(struct guard *g, struct guard_conn *c)
{
    struct peer *p = c->peer;
    if (!p || --p->n > 0)
        return;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < p->len; i++)
        h = (h ^ p->addr[i]) * 16777619u;
    struct peer **pp = &g->peers[h % PEER_BUCKETS];
    while (*pp != p)
        pp = &(*pp)->next;
    *pp = p->next;
    free(p);
}

struct guard_conn *guard_conn_open(struct guard *g, int fd, const struct sockaddr *peer)
{
    struct guard_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->g = g;
    c->fd = fd;
    atomic_init(&c->phase, PH_WAITING);
    pthread_mutex_lock(&g->mu);
    c->refused = !peer_take(g, c, peer);
    c->mark = 0; /* a new connection: any byte it received is its first request's */
    c->mark_set = true;
    c->next = g->conns;
    if (g->conns)
        g->conns->prev = c;
    g->conns = c;
    pthread_mutex_unlock(&g->mu);
    return c;
}

/* Starts lingering on a duplicate of 'fd'. mu held. */
static void linger_start(struct guard *g, int fd)
{
    if (g->o.linger_ms <= 0 || g->nlinger >= g->o.max_lingering)
        return;
    struct lingerer *l = calloc(1, sizeof(*l));
    if (!l)
        return;
    if ((l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        free(l);
        return;
    }
    shutdown(l->fd, SHUT_WR); /* the answer is in the send buffer; the end follows it */
    l->until = ctx_now() + g->o.linger_ms;
    l->left = g->o.linger_bytes;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = l};
    if (epoll_ctl(g->ep, EPOLL_CTL_ADD, l->fd, &ev) != 0) {
        close(l->fd);
        free(l);
        return;
    }
    l->next = g->lingerers;
    if (g->lingerers)
        g->lingerers->prev = l;
    g->lingerers = l;
    g->nlinger++;
}

void guard_conn_close(struct guard *g, struct guard_conn *c)
{
    if (!c)
        return;
    int unread = 0;
    bool want = atomic_load(&c->linger) ||
                (ioctl(c->fd, FIONREAD, &unread) == 0 && unread > 0);
    pthread_mutex_lock(&g->mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        g->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    peer_give(g, c);
    if (want && !c->refused && atomic_load(&c->phase) != PH_TIMED_OUT)
        linger_start(g, c->fd);
    pthread_mutex_unlock(&g->mu);
    free(c);
}

bool guard_conn_refused(const struct guard_conn *c)
{
    return c && c->refused;
}

bool guard_headers_done(struct guard_conn *c)
{
    if (!c)
        return true;
    pthread_mutex_lock(&c->g->mu); /* 'since' is set before the guard can see PH_BODY */
    int ph = PH_WAITING;
    bool moved = atomic_compare_exchange_strong(&c->phase, &ph, PH_BODY);
    if (moved)
        c->since = ctx_now();
    pthread_mutex_unlock(&c->g->mu);
    return moved || ph != PH_TIMED_OUT;
}

bool guard_body_done(struct guard_conn *c)
{
    if (!c)
        return true;
    int ph = PH_BODY;
    if (!atomic_compare_exchange_strong(&c->phase, &ph, PH_HANDLING))
        return ph != PH_TIMED_OUT;
    return true;
}

void guard_request_done(struct guard_conn *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->g->mu); /* a fresh mark and no first byte, with the phase */
    int ph = atomic_load(&c->phase);
    if (ph != PH_TIMED_OUT) {
        c->mark_set = false;
        c->first_byte = 0;
        atomic_store(&c->phase, PH_WAITING);
    }
    pthread_mutex_unlock(&c->g->mu);
}

void guard_linger(struct guard_conn *c)
{
    if (c)
        atomic_store(&c->linger, true);
}

bool guard_timed_out(const struct guard_conn *c)
{
    return c && atomic_load(&c->phase) == PH_TIMED_OUT;
}
