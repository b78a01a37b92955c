/* Tests for server/http/guard.h at the module level, on loopback TCP connections: the test
 * accepts each connection itself and plays libmicrohttpd's part (guard_conn_open on accept,
 * headers_done, body_done, request_done, guard_conn_close before its close), while the client
 * side is the tests' raw client. Covered: the header deadline from the first byte (an idle or
 * kept-alive connection is left alone), the body deadline, the 408 written on the socket and
 * reported, the worker and the guard racing for a request, lingering closes (asked for, or
 * with unread bytes; ended by the client's close, linger_bytes or linger_ms; at most
 * max_lingering; never after a 408; all closed by guard_free), a NULL record, and
 * guard_answer() itself.
 *
 * Every wait is for an event (bytes or the end at the client, a report, a descriptor count)
 * bounded by WAIT_MS. A lingering socket is our own duplicate descriptor, so whether one exists
 * is read from this process's descriptor count, which nothing else here changes. */
#include <CUnit/CUnit.h>
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/http/guard.h"
#include "tests/srvtest.h"
#include "tests/support.h"

#define WAIT_MS test_ms(20000)
#define MAX_SEEN 256

/* ---------------------------------------------------------------- what the guard reports */

struct seen {
    pthread_mutex_t mu;
    atomic_int ids;             /* ids handed out */
    int n;                      /* 408s reported */
    bool in_body[MAX_SEEN];     /* which deadline, per report */
    char rid[MAX_SEEN][129];    /* the id each carried */
};

static void seen_init(struct seen *s)
{
    memset(s, 0, sizeof(*s));
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->ids, 0);
}

static void on_timeout(void *arg, bool in_body, const char *rid)
{
    struct seen *s = arg;
    pthread_mutex_lock(&s->mu);
    if (s->n < MAX_SEEN) {
        s->in_body[s->n] = in_body;
        snprintf(s->rid[s->n], sizeof(s->rid[s->n]), "%s", rid);
    }
    s->n++;
    pthread_mutex_unlock(&s->mu);
}

static void new_id(void *arg, char *out)
{
    struct seen *s = arg;
    snprintf(out, 129, "guard-test-%d", atomic_fetch_add(&s->ids, 1));
}

static int seen_count(struct seen *s)
{
    pthread_mutex_lock(&s->mu);
    int n = s->n;
    pthread_mutex_unlock(&s->mu);
    return n;
}

struct seen_wait {
    struct seen *s;
    int n;
};

static bool seen_reached(void *arg)
{
    struct seen_wait *w = arg;
    return seen_count(w->s) >= w->n;
}

/* Waits until 'n' 408s have been reported. */
static bool wait_seen(struct seen *s, int n)
{
    struct seen_wait w = {s, n};
    return test_wait_until(seen_reached, &w, WAIT_MS);
}

static struct guard *guard_with(struct seen *s, int64_t header_ms, int64_t body_ms,
                                int64_t linger_ms, size_t linger_bytes, unsigned max_lingering)
{
    struct guard_opts o = {.header_timeout_ms = header_ms,
                           .body_timeout_ms = body_ms,
                           .linger_ms = linger_ms,
                           .linger_bytes = linger_bytes,
                           .max_lingering = max_lingering,
                           .on_timeout = on_timeout,
                           .new_id = new_id,
                           .arg = s};
    struct guard *g = NULL;
    CU_ASSERT_FATAL(guard_new(&o, &g) == 0 && g != NULL);
    return g;
}

/* ---------------------------------------------------------------- connections */

/* A loopback listener. */
struct listener {
    int fd;
    uint16_t port;
};

static void listener_open(struct listener *l)
{
    l->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CU_ASSERT_FATAL(l->fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    CU_ASSERT_FATAL(bind(l->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
                    listen(l->fd, 128) == 0 &&
                    getsockname(l->fd, (struct sockaddr *)&sa, &sl) == 0);
    l->port = ntohs(sa.sin_port);
}

/* One connection: the client's end and the server's, registered with the guard. */
struct conn {
    struct srvtest_raw cl;  /* the client */
    int sfd;                /* the server's descriptor (what libmicrohttpd would hold) */
    struct guard_conn *gc;  /* its record */
};

static struct conn *conn_open(struct listener *l, struct guard *g)
{
    struct conn *c = calloc(1, sizeof(*c));
    CU_ASSERT_FATAL(c != NULL);
    CU_ASSERT_FATAL(srvtest_raw_open(&c->cl, l->port));
    c->sfd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    CU_ASSERT_FATAL(c->sfd >= 0);
    c->gc = guard_conn_open(g, c->sfd, NULL);
    CU_ASSERT_FATAL(c->gc != NULL);
    return c;
}

/* The server closes its side the way libmicrohttpd does: guard_conn_close, then close. */
static void conn_server_close(struct guard *g, struct conn *c)
{
    if (c->sfd < 0)
        return;
    guard_conn_close(g, c->gc);
    c->gc = NULL;
    close(c->sfd);
    c->sfd = -1;
}

static void conn_free(struct guard *g, struct conn *c)
{
    conn_server_close(g, c);
    srvtest_raw_close(&c->cl);
    free(c);
}

static bool client_write(struct conn *c, const char *s)
{
    return srvtest_raw_write(&c->cl, s, strlen(s));
}

/* Waits until the server's descriptor has 'n' unread bytes. */
static bool server_has_bytes(struct conn *c, int n)
{
    int64_t until = ctx_now() + WAIT_MS;
    for (;;) {
        int unread = 0;
        if (ioctl(c->sfd, FIONREAD, &unread) == 0 && unread >= n)
            return true;
        int64_t left = until - ctx_now();
        if (left <= 0)
            return false;
        struct pollfd p = {.fd = c->sfd, .events = POLLIN};
        poll(&p, 1, (int)(left < 50 ? left : 50));
    }
}

/* Reads (and drops) exactly n bytes on the server's side. */
static void server_read(struct conn *c, size_t n)
{
    char buf[4096];
    while (n) {
        ssize_t k = recv(c->sfd, buf, n < sizeof(buf) ? n : sizeof(buf), 0);
        CU_ASSERT_FATAL(k > 0);
        n -= (size_t)k;
    }
}

/* The client reads until the server's end arrives; true if it did. */
static bool client_reads_to_end(struct conn *c)
{
    return srvtest_raw_read(&c->cl, NULL, WAIT_MS) && (c->cl.eof || c->cl.reset);
}

/* The body of the first response the client holds, parsed (NULL if none or not JSON). */
static cJSON *client_body(const struct conn *c)
{
    const char *b = strstr(c->cl.buf, "\r\n\r\n");
    return b ? cJSON_Parse(b + 4) : NULL;
}

/* The client holds a complete 408 request_timeout naming 'which' deadline, with 'rid'. */
static void expect_408(const struct conn *c, const char *which, const char *flag, const char *rid)
{
    CU_ASSERT_EQUAL(srvtest_raw_status(&c->cl), 408);
    CU_ASSERT_EQUAL(srvtest_raw_complete(&c->cl), 1);
    char v[160];
    CU_ASSERT(srvtest_raw_header(&c->cl, "Connection", v, sizeof(v)) && !strcmp(v, "close"));
    CU_ASSERT(srvtest_raw_header(&c->cl, "Content-Type", v, sizeof(v)) &&
              !strcmp(v, "application/json"));
    CU_ASSERT(srvtest_raw_header(&c->cl, "X-Request-Id", v, sizeof(v)) && !strcmp(v, rid));
    cJSON *j = client_body(c);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(e, "code");
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(e, "message");
    CU_ASSERT(cJSON_IsString(code) && !strcmp(code->valuestring, "request_timeout"));
    CU_ASSERT(cJSON_IsString(msg) && strstr(msg->valuestring, which) &&
              strstr(msg->valuestring, flag));
    cJSON_Delete(j);
}

struct fd_wait {
    int want;
};

static bool fds_are(void *arg)
{
    return test_fd_count() == ((struct fd_wait *)arg)->want;
}

/* Waits until this process holds exactly 'n' descriptors. */
static bool wait_fds(int n)
{
    struct fd_wait w = {n};
    return test_wait_until(fds_are, &w, WAIT_MS);
}

static const char EARLY[] = "HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n"
                            "Connection: close\r\n\r\n";

/* ---------------------------------------------------------------- deadlines */

/* A request's headers must be complete within the header deadline of its first byte: the slow
 * one is answered 408 (and reported with the same id) and shut; a connection that sent nothing,
 * and a kept-alive one waiting for its next request, are left alone. */
static void test_guard_header_deadline(void)
{
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    struct guard *g = guard_with(&s, test_ms(200), 0, 0, 0, 0);
    struct conn *idle = conn_open(&l, g);
    struct conn *kept = conn_open(&l, g);
    /* A whole request on 'kept', served: it then waits for the next one. (Its headers are
     * declared done before its bytes are sent, so its first request cannot miss a deadline
     * however slowly this thread runs.) */
    const char *req = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    CU_ASSERT(guard_headers_done(kept->gc));
    CU_ASSERT(client_write(kept, req));
    CU_ASSERT_FATAL(server_has_bytes(kept, (int)strlen(req)));
    server_read(kept, strlen(req));
    CU_ASSERT(guard_body_done(kept->gc));
    guard_request_done(kept->gc);
    /* The slow one: a first byte, then nothing more. Opened last, so any deadline the others
     * wrongly had would have passed first. */
    struct conn *slow = conn_open(&l, g);
    CU_ASSERT(client_write(slow, "GET /healthz HTTP/1.1\r\nHost: x\r\n"));
    CU_ASSERT_FATAL(client_reads_to_end(slow));
    CU_ASSERT_FATAL(wait_seen(&s, 1));
    CU_ASSERT_EQUAL(seen_count(&s), 1);
    CU_ASSERT_FALSE(s.in_body[0]);
    expect_408(slow, "headers", "--header-timeout-ms", s.rid[0]);
    CU_ASSERT(guard_timed_out(slow->gc));
    CU_ASSERT_FALSE(guard_headers_done(slow->gc)); /* the deadline came first: close */
    CU_ASSERT_FALSE(guard_body_done(slow->gc));
    /* The others heard nothing and still wait. */
    CU_ASSERT_FALSE(guard_timed_out(idle->gc));
    CU_ASSERT_FALSE(guard_timed_out(kept->gc));
    CU_ASSERT_EQUAL(idle->cl.len + kept->cl.len, 0);
    CU_ASSERT(guard_headers_done(idle->gc));
    conn_free(g, slow);
    conn_free(g, idle);
    conn_free(g, kept);
    guard_free(g);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* The body must be in within the body deadline of the end of the headers; a request being
 * handled has no deadline. */
static void test_guard_body_deadline(void)
{
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    struct guard *g = guard_with(&s, 0, test_ms(200), 0, 0, 0);
    struct conn *handled = conn_open(&l, g);
    CU_ASSERT(guard_headers_done(handled->gc));
    CU_ASSERT(guard_body_done(handled->gc));
    /* Headers without a deadline (header_timeout_ms 0): a partial header section waits. */
    struct conn *partial = conn_open(&l, g);
    CU_ASSERT(client_write(partial, "POST /v1/batch HTTP/1.1\r\n"));
    struct conn *slow = conn_open(&l, g);
    CU_ASSERT(client_write(slow, "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                                 "\r\n{\"ids\":"));
    CU_ASSERT(guard_headers_done(slow->gc));
    CU_ASSERT_FATAL(client_reads_to_end(slow));
    CU_ASSERT_FATAL(wait_seen(&s, 1));
    CU_ASSERT_EQUAL(seen_count(&s), 1);
    CU_ASSERT_TRUE(s.in_body[0]);
    expect_408(slow, "body", "--body-timeout-ms", s.rid[0]);
    CU_ASSERT(guard_timed_out(slow->gc));
    CU_ASSERT_FALSE(guard_body_done(slow->gc));
    CU_ASSERT_FALSE(guard_timed_out(handled->gc));
    CU_ASSERT_FALSE(guard_timed_out(partial->gc));
    CU_ASSERT_EQUAL(handled->cl.len + partial->cl.len, 0);
    /* The handled request ends; the next one on that connection starts afresh. */
    guard_request_done(handled->gc);
    CU_ASSERT(guard_headers_done(handled->gc));
    CU_ASSERT(guard_body_done(handled->gc));
    conn_free(g, slow);
    conn_free(g, handled);
    conn_free(g, partial);
    guard_free(g);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* More requests miss their deadline at once than one pass of the guard answers: every one is
 * answered and reported, each with its own id. A guard without on_timeout answers as well. */
static void test_guard_many_at_once(void)
{
    enum { N = 80 };
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    struct guard *g = guard_with(&s, test_ms(200), 0, 0, 0, 0);
    struct conn *c[N];
    for (int i = 0; i < N; i++) {
        c[i] = conn_open(&l, g);
        CU_ASSERT(client_write(c[i], "G"));
    }
    int answered = 0;
    for (int i = 0; i < N; i++)
        answered += client_reads_to_end(c[i]) && srvtest_raw_status(&c[i]->cl) == 408;
    CU_ASSERT_EQUAL(answered, N);
    CU_ASSERT(wait_seen(&s, N));
    CU_ASSERT_EQUAL(seen_count(&s), N);
    int dup = 0;
    for (int i = 0; i < N; i++)
        for (int k = i + 1; k < N; k++)
            dup += !strcmp(s.rid[i], s.rid[k]);
    CU_ASSERT_EQUAL(dup, 0);
    for (int i = 0; i < N; i++)
        conn_free(g, c[i]);
    guard_free(g);

    struct guard_opts o = {.header_timeout_ms = test_ms(200), .new_id = new_id, .arg = &s};
    CU_ASSERT_FATAL(guard_new(&o, &g) == 0);
    struct conn *one = conn_open(&l, g);
    CU_ASSERT(client_write(one, "G"));
    CU_ASSERT(client_reads_to_end(one));
    CU_ASSERT_EQUAL(srvtest_raw_status(&one->cl), 408);
    conn_free(g, one);
    guard_free(g);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* The worker finishing the headers and the guard timing the request out race for it: exactly
 * one wins. When the worker wins there is no 408 and no report; when the guard wins the worker
 * is told to close. */
static void test_guard_worker_and_guard_race(void)
{
    enum { ROUNDS = 40 };
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    struct guard *g = guard_with(&s, 20, 0, 0, 0, 0);
    int inconsistent = 0, guard_won = 0;
    for (int r = 0; r < ROUNDS; r++) {
        struct conn *c = conn_open(&l, g);
        CU_ASSERT(client_write(c, "GET / HTTP/1.1\r\n"));
        CU_ASSERT_FATAL(server_has_bytes(c, 1));
        /* Vary where the worker's call lands against the 20 ms deadline (pacing, not a bound). */
        struct timespec ts = {0, (long)(r % 7) * 5000000L};
        nanosleep(&ts, NULL);
        bool worker_won = guard_headers_done(c->gc);
        bool timed_out = guard_timed_out(c->gc);
        guard_won += !worker_won;
        if (worker_won) {
            CU_ASSERT(guard_body_done(c->gc));
            guard_request_done(c->gc);
            /* No deadline for headers that are done; the server ends the connection itself. */
            shutdown(c->sfd, SHUT_RDWR);
        }
        CU_ASSERT_FATAL(client_reads_to_end(c));
        bool got_408 = srvtest_raw_status(&c->cl) == 408;
        inconsistent += worker_won == timed_out || worker_won == got_408 ||
                        (!worker_won && c->cl.len == 0) || (worker_won && c->cl.len != 0);
        conn_free(g, c);
    }
    CU_ASSERT_EQUAL(inconsistent, 0);
    CU_ASSERT(wait_seen(&s, guard_won));
    guard_free(g); /* joins the thread: no report can still be on its way */
    CU_ASSERT_EQUAL(s.n, guard_won);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* ---------------------------------------------------------------- lingering closes */

/* Closed after an early answer with guard_linger: the client reads the answer and the end (not
 * a reset), what it still sends is read and dropped, and its close ends the lingering. Without
 * guard_linger and with nothing unread there is no lingering. */
static void test_guard_linger_until_the_client_closes(void)
{
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    struct guard *g = guard_with(&s, 0, 0, 60000, 64u << 20, 8);
    int base = test_fd_count();
    struct conn *c = conn_open(&l, g);
    CU_ASSERT_EQUAL(test_fd_count(), base + 2);
    /* A write-first client: its body is on the way when the early answer goes out. */
    static char chunk[256 * 1024];
    memset(chunk, 'x', sizeof(chunk));
    CU_ASSERT(srvtest_raw_write(&c->cl, chunk, 16 * 1024));
    CU_ASSERT_FATAL(server_has_bytes(c, 1));
    CU_ASSERT(send(c->sfd, EARLY, sizeof(EARLY) - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof(EARLY) - 1));
    guard_linger(c->gc);
    conn_server_close(g, c);
    CU_ASSERT_EQUAL(test_fd_count(), base + 2); /* the client and the lingering duplicate */
    /* The rest of the body (far more than the socket buffers hold) is read and dropped. */
    for (int i = 0; i < 8; i++)
        CU_ASSERT(srvtest_raw_write(&c->cl, chunk, sizeof(chunk)));
    CU_ASSERT(client_reads_to_end(c));
    CU_ASSERT(c->cl.eof && !c->cl.reset);
    CU_ASSERT_EQUAL(srvtest_raw_status(&c->cl), 413);
    srvtest_raw_close(&c->cl);
    CU_ASSERT(wait_fds(base)); /* the client's end closes the duplicate */
    free(c);

    /* Nothing asked for and nothing unread: closed at once. */
    c = conn_open(&l, g);
    conn_server_close(g, c);
    CU_ASSERT_EQUAL(test_fd_count(), base + 1);
    CU_ASSERT(client_reads_to_end(c));
    CU_ASSERT(c->cl.eof && c->cl.len == 0);
    conn_free(g, c);
    guard_free(g);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* Bytes the server never read make a close linger without guard_linger: the answer written
 * before it is read, not lost to a reset. */
static void test_guard_linger_for_unread_bytes(void)
{
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    struct guard *g = guard_with(&s, 0, 0, 60000, 1u << 20, 8);
    int base = test_fd_count();
    struct conn *c = conn_open(&l, g);
    CU_ASSERT(client_write(c, "POST /v1/batch HTTP/1.1\r\nContent-Length: 5000\r\n\r\nabc"));
    CU_ASSERT_FATAL(server_has_bytes(c, 10));
    CU_ASSERT(send(c->sfd, EARLY, sizeof(EARLY) - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof(EARLY) - 1));
    conn_server_close(g, c);
    CU_ASSERT_EQUAL(test_fd_count(), base + 2);
    CU_ASSERT(client_reads_to_end(c));
    CU_ASSERT(c->cl.eof && !c->cl.reset);
    CU_ASSERT_EQUAL(srvtest_raw_status(&c->cl), 413);
    conn_free(g, c);
    CU_ASSERT(wait_fds(base));
    guard_free(g);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* Lingering ends after linger_bytes dropped, or after linger_ms, whatever the client does. */
static void test_guard_linger_limits(void)
{
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    /* linger_bytes: a client that keeps sending is cut off after 64 KiB. */
    struct guard *g = guard_with(&s, 0, 0, 60000, 64 * 1024, 8);
    int base = test_fd_count();
    struct conn *c = conn_open(&l, g);
    guard_linger(c->gc);
    conn_server_close(g, c);
    CU_ASSERT_EQUAL(test_fd_count(), base + 2);
    static char chunk[16 * 1024];
    memset(chunk, 'y', sizeof(chunk));
    for (int i = 0; i < 5; i++) /* 80 KiB: more than the allowance (the last may be refused) */
        srvtest_raw_write(&c->cl, chunk, sizeof(chunk));
    CU_ASSERT(wait_fds(base + 1)); /* the duplicate is closed; the client is still open */
    conn_free(g, c);
    guard_free(g);

    /* linger_ms: a client that neither sends nor closes is let go after the time. */
    g = guard_with(&s, 0, 0, test_ms(200), 1u << 20, 8);
    base = test_fd_count();
    c = conn_open(&l, g);
    guard_linger(c->gc);
    conn_server_close(g, c);
    CU_ASSERT_EQUAL(test_fd_count(), base + 2);
    CU_ASSERT(wait_fds(base + 1));
    conn_free(g, c);
    guard_free(g);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* At most max_lingering sockets linger; a timed-out connection never does; guard_free closes
 * every lingering socket. */
static void test_guard_linger_cap_timeout_and_free(void)
{
    struct seen s;
    seen_init(&s);
    struct listener l;
    listener_open(&l);
    int before_guard = test_fd_count();
    struct guard *g = guard_with(&s, test_ms(200), 0, 60000, 1u << 20, 1);
    int base = test_fd_count();
    /* A request answered 408 closes without lingering, even when asked to (and with its bytes
     * unread), while there is room for one. */
    struct conn *t = conn_open(&l, g);
    CU_ASSERT(client_write(t, "GET"));
    CU_ASSERT(client_reads_to_end(t));
    CU_ASSERT_EQUAL(srvtest_raw_status(&t->cl), 408);
    guard_linger(t->gc);
    conn_server_close(g, t);
    CU_ASSERT_EQUAL(test_fd_count(), base + 1); /* its client alone */
    conn_free(g, t);
    CU_ASSERT_EQUAL(test_fd_count(), base);

    /* Two ask to linger; there is room for one. */
    struct conn *a = conn_open(&l, g), *b = conn_open(&l, g);
    CU_ASSERT(guard_headers_done(a->gc) && guard_headers_done(b->gc)); /* no header deadline */
    guard_linger(a->gc);
    guard_linger(b->gc);
    conn_server_close(g, a);
    conn_server_close(g, b);
    CU_ASSERT_EQUAL(test_fd_count(), base + 3); /* two clients, one lingering duplicate */
    CU_ASSERT(client_reads_to_end(b));          /* b was closed at once */

    /* guard_free closes the lingering socket (and its own): its client sees the end. */
    guard_free(g);
    CU_ASSERT_EQUAL(test_fd_count(), before_guard + 2);
    CU_ASSERT(client_reads_to_end(a));
    conn_free(NULL, a);
    conn_free(NULL, b);
    close(l.fd);
    pthread_mutex_destroy(&s.mu);
}

/* A connection without a record (guard_conn_open out of memory) runs without deadlines: every
 * call takes NULL. guard_free takes NULL too. */
static void test_guard_null_record(void)
{
    struct seen s;
    seen_init(&s);
    struct guard *g = guard_with(&s, 100, 100, 100, 100, 1);
    CU_ASSERT_TRUE(guard_headers_done(NULL));
    CU_ASSERT_TRUE(guard_body_done(NULL));
    guard_request_done(NULL);
    guard_linger(NULL);
    CU_ASSERT_FALSE(guard_timed_out(NULL));
    guard_conn_close(g, NULL);
    guard_free(g);
    guard_free(NULL);
    pthread_mutex_destroy(&s.mu);
}

/* ---------------------------------------------------------------- guard_answer */

static void test_guard_answer(void)
{
    int sv[2];
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    CU_ASSERT(guard_answer(sv[0], 413, "body_too_large", "a \"big\" body\nof 9 MB", "rid-1"));
    shutdown(sv[0], SHUT_WR);
    struct srvtest_raw *r = malloc(sizeof(*r));
    CU_ASSERT_FATAL(r != NULL);
    memset(r, 0, sizeof(*r));
    r->fd = sv[1];
    CU_ASSERT(srvtest_raw_read(r, NULL, WAIT_MS));
    CU_ASSERT(strncmp(r->buf, "HTTP/1.1 413 ", 13) == 0);
    CU_ASSERT_EQUAL(srvtest_raw_complete(r), 1);
    char v[160];
    CU_ASSERT(srvtest_raw_header(r, "Content-Type", v, sizeof(v)) &&
              !strcmp(v, "application/json"));
    CU_ASSERT(srvtest_raw_header(r, "X-Request-Id", v, sizeof(v)) && !strcmp(v, "rid-1"));
    CU_ASSERT(srvtest_raw_header(r, "Connection", v, sizeof(v)) && !strcmp(v, "close"));
    const char *body = strstr(r->buf, "\r\n\r\n");
    CU_ASSERT_FATAL(body != NULL);
    body += 4;
    CU_ASSERT(srvtest_raw_header(r, "Content-Length", v, sizeof(v)) &&
              strtoul(v, NULL, 10) == strlen(body));
    cJSON *j = cJSON_Parse(body);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(e, "code");
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(e, "message");
    CU_ASSERT(cJSON_IsString(code) && !strcmp(code->valuestring, "body_too_large"));
    CU_ASSERT(cJSON_IsString(msg) && !strcmp(msg->valuestring, "a \"big\" body\nof 9 MB"));
    cJSON_Delete(j);
    close(sv[0]);
    close(sv[1]);

    /* Every status it is used with gets a status line of its own. */
    static const unsigned statuses[] = {400, 408, 413, 501, 503, 418};
    for (size_t i = 0; i < sizeof(statuses) / sizeof(statuses[0]); i++) {
        CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        CU_ASSERT(guard_answer(sv[0], statuses[i], "c", "m", "r"));
        close(sv[0]);
        memset(r, 0, sizeof(*r));
        r->fd = sv[1];
        srvtest_raw_read(r, NULL, WAIT_MS);
        CU_ASSERT_EQUAL(srvtest_raw_status(r), statuses[i]);
        char line[64];
        snprintf(line, sizeof(line), "HTTP/1.1 %u ", statuses[i]);
        CU_ASSERT(strncmp(r->buf, line, strlen(line)) == 0 && r->buf[strlen(line)] > ' ');
        close(sv[1]);
    }
    free(r);

    /* A peer that is gone, or a socket that takes nothing more: false, and no signal. */
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    close(sv[1]);
    CU_ASSERT_FALSE(guard_answer(sv[0], 408, "request_timeout", "m", "r"));
    close(sv[0]);
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    static const char fill[4096];
    while (send(sv[0], fill, sizeof(fill), MSG_NOSIGNAL) > 0)
        ;
    while (send(sv[0], fill, 1, MSG_NOSIGNAL) > 0)
        ;
    CU_ASSERT_FALSE(guard_answer(sv[0], 408, "request_timeout", "m", "r"));
    close(sv[0]);
    close(sv[1]);
}

/* ---------------------------------------------------------------- connections per address */

static struct sockaddr_storage addr_of(const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
    } else {
        CU_ASSERT_FATAL(inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1);
        v6->sin6_family = AF_INET6;
    }
    return ss;
}

/* A record for a connection from 'ip' (NULL: no address), on no real descriptor. */
static struct guard_conn *open_from(struct guard *g, const char *ip)
{
    struct sockaddr_storage ss;
    if (ip)
        ss = addr_of(ip);
    struct guard_conn *c = guard_conn_open(g, -1, ip ? (struct sockaddr *)&ss : NULL);
    CU_ASSERT_FATAL(c != NULL);
    return c;
}

static void test_guard_per_address(void)
{
    struct seen s;
    seen_init(&s);
    struct guard_opts o = {.max_per_ip = 2, .on_timeout = on_timeout, .new_id = new_id, .arg = &s};
    struct guard *g = NULL;
    CU_ASSERT_FATAL(guard_new(&o, &g) == 0);
    struct guard_conn *a1 = open_from(g, "10.0.0.1"), *a2 = open_from(g, "10.0.0.1");
    CU_ASSERT_FALSE(guard_conn_refused(a1));
    CU_ASSERT_FALSE(guard_conn_refused(a2));
    struct guard_conn *a3 = open_from(g, "::ffff:10.0.0.1"); /* the same address, mapped */
    CU_ASSERT_TRUE(guard_conn_refused(a3));
    struct guard_conn *b1 = open_from(g, "10.0.0.2"); /* another address has its own count */
    CU_ASSERT_FALSE(guard_conn_refused(b1));
    struct guard_conn *v[3];
    for (int i = 0; i < 3; i++)
        v[i] = open_from(g, "2001:db8::1");
    CU_ASSERT_FALSE(guard_conn_refused(v[0]));
    CU_ASSERT_FALSE(guard_conn_refused(v[1]));
    CU_ASSERT_TRUE(guard_conn_refused(v[2]));
    struct guard_conn *n1 = open_from(g, NULL), *n2 = open_from(g, NULL), *n3 = open_from(g, NULL);
    CU_ASSERT_FALSE(guard_conn_refused(n3)); /* no address: not counted */
    /* A refused connection is not counted: with a3 still open, one close makes room. */
    struct guard_conn *a4 = open_from(g, "10.0.0.1");
    CU_ASSERT_TRUE(guard_conn_refused(a4));
    guard_conn_close(g, a1);
    struct guard_conn *a5 = open_from(g, "10.0.0.1");
    CU_ASSERT_FALSE(guard_conn_refused(a5));
    struct guard_conn *a6 = open_from(g, "10.0.0.1"); /* full again */
    CU_ASSERT_TRUE(guard_conn_refused(a6));
    guard_conn_close(g, a3);
    guard_conn_close(g, a4);
    guard_conn_close(g, a6);
    struct guard_conn *all[] = {a2, a5, b1, v[0], v[1], v[2], n1, n2, n3};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        guard_conn_close(g, all[i]);
    /* Every count is back to zero: two more from each address are accepted. */
    struct guard_conn *again[4] = {open_from(g, "10.0.0.1"), open_from(g, "10.0.0.1"),
                                   open_from(g, "2001:db8::1"), open_from(g, "2001:db8::1")};
    for (int i = 0; i < 4; i++) {
        CU_ASSERT_FALSE(guard_conn_refused(again[i]));
        guard_conn_close(g, again[i]);
    }
    guard_free(g);
    /* 0: no limit. */
    o.max_per_ip = 0;
    CU_ASSERT_FATAL(guard_new(&o, &g) == 0);
    struct guard_conn *m[5];
    for (int i = 0; i < 5; i++) {
        m[i] = open_from(g, "10.0.0.1");
        CU_ASSERT_FALSE(guard_conn_refused(m[i]));
    }
    for (int i = 0; i < 5; i++)
        guard_conn_close(g, m[i]);
    guard_free(g);
}

static CU_TestInfo guard_tests[] = {
    {"header deadline from the first byte; idle and kept-alive connections left alone",
     test_guard_header_deadline},
    {"body deadline from the end of the headers; none while handling",
     test_guard_body_deadline},
    {"more late requests than one pass answers: every one 408, each its own id",
     test_guard_many_at_once},
    {"worker and guard race for a request: exactly one wins", test_guard_worker_and_guard_race},
    {"linger after an early answer: the client reads it, then the end; its close ends it",
     test_guard_linger_until_the_client_closes},
    {"linger for unread bytes without being asked", test_guard_linger_for_unread_bytes},
    {"lingering ends after linger_bytes or linger_ms", test_guard_linger_limits},
    {"max_lingering; no lingering after a 408; guard_free closes the lingering",
     test_guard_linger_cap_timeout_and_free},
    {"a NULL record runs without deadlines", test_guard_null_record},
    {"guard_answer: a whole answer on the socket, or false", test_guard_answer},
    {"max_per_ip: counted per address (IPv4-mapped as IPv4) until each closes; refusals not",
     test_guard_per_address},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(guard, guard_tests)
