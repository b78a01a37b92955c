/* HTTP front-end tests over raw sockets: framing (RFC 9112 6, RFC 9110 5 and 8.6), the request
 * target and Host, answers a write-first client can read (lingering close), header and body
 * deadlines, the per-address connection limit and the memory budget.
 *
 * Each test starts the real binary ($FANOUT_BIN, tests/proc.h) on a port of its own choosing,
 * in front of the in-process upstream stub, and speaks to it over the tests' raw connections
 * (tests/srvtest.h): every byte sent is the test's, so malformed requests reach the server as
 * written. A response is read
 * until its Content-Length is in; "closed" means the server ended the connection (EOF) within
 * the bound after it. Cases that libmicrohttpd 0.9.75 itself answers wrongly (before fanout
 * sees the request) are checked as far as fanout can answer for them there, and fully on
 * libmicrohttpd 1.0, which the container image builds against (MHD_VERSION at compile time).
 *
 * Every wait is for an event (bytes, EOF, a counter) bounded by WAIT_MS; the only client-side
 * pacing is the trickling clients', who must send slowly to be slow. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/proc.h"
#include "tests/srvtest.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define MHD_1 (MHD_VERSION >= 0x01000000) /* libmicrohttpd 1.0 or later */

/* ---------------------------------------------------------------- connections */

/* Connections are the tests' raw client (tests/srvtest.h): what is written is exactly these
 * bytes; everything that comes back is kept, with how the connection ended. */

static bool one_response(const struct srvtest_raw *r)
{
    return srvtest_raw_complete(r) >= 1;
}

static bool two_responses(const struct srvtest_raw *r)
{
    return srvtest_raw_complete(r) >= 2;
}

/* The JSON error code in the first response's body, or "" when there is none. */
static const char *code_of(const struct srvtest_raw *r, char *out, size_t size)
{
    const char *c = strstr(r->buf, "\"code\":\"");
    out[0] = '\0';
    if (c) {
        c += 8;
        size_t n = strcspn(c, "\"");
        if (n >= size)
            n = size - 1;
        memcpy(out, c, n);
        out[n] = '\0';
    }
    return out;
}

/* Sends 'req' on a new connection, reads one response, then waits for the end of the
 * connection (bounded) when 'want_close' says the server must close after it. */
static void exchange(uint16_t port, const char *req, size_t len, struct srvtest_raw *r,
                     bool want_close)
{
    CU_ASSERT_FATAL(srvtest_raw_open(r, port));
    CU_ASSERT(srvtest_raw_write(r, req, len));
    srvtest_raw_read(r, one_response, WAIT_MS);
    if (want_close)
        srvtest_raw_read(r, NULL, WAIT_MS);
    srvtest_raw_close(r);
}

/* ---------------------------------------------------------------- the server */

static bool start(struct env *e, char *const *args)
{
    return env_start(e, args, NULL);
}

/* ---------------------------------------------------------------- framing */

#define BODY "{\"ids\":[\"a\"]}" /* 13 bytes */
#define CHUNKED_BODY "d\r\n" BODY "\r\n0\r\n\r\n"

#define LIB_075 1u
#define LIB_1 2u
#define LIB_HERE (MHD_1 ? LIB_1 : LIB_075)

/* One request and what fanout must do with it. */
struct frame_case {
    const char *name;   /* what it is */
    const char *req;    /* the bytes (NUL-free; see the NUL case) */
    unsigned status;    /* the status wanted */
    const char *code;   /* fanout's error code wanted, or NULL for a success */
    unsigned lib;       /* LIB_075 / LIB_1: on that libmicrohttpd the library answers before
                           fanout sees the request; a 4xx and the close are checked there */
};

static const struct frame_case frame_cases[] = {
    /* RFC 9112 6.1: CL with TE is a smuggling vector; close after answering. */
    {"CL then TE", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n" CHUNKED_BODY, 400, "bad_framing", LIB_1},
    /* The same in the other order: a proxy may read either header first. */
    {"TE then CL", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                   "Content-Length: 13\r\n\r\n" CHUNKED_BODY, 400, "bad_framing", LIB_1},
    /* RFC 9110 8.6 / 9112 6.3: differing lengths MUST be rejected. */
    {"two Content-Length, different", "POST /v1/batch HTTP/1.1\r\nHost: x\r\n"
     "Content-Length: 13\r\nContent-Length: 5\r\n\r\n" BODY, 400, "bad_framing", 0},
    /* Equal repeats are refused too: a proxy that folds them and one that does not agree only by
     * the luck of the values (nginx refuses them as well). */
    {"two Content-Length, equal", "POST /v1/batch HTTP/1.1\r\nHost: x\r\n"
     "Content-Length: 13\r\nContent-Length: 13\r\n\r\n" BODY, 400, "bad_framing", 0},
    /* Two TE lines are one list "chunked, chunked": chunked applied twice (RFC 9112 7). */
    {"two Transfer-Encoding", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     "Transfer-Encoding: chunked\r\n\r\n" CHUNKED_BODY, 400, "bad_framing", 0},
    /* RFC 9112 5.1: whitespace between a field name and its colon MUST be 400; otherwise the CL
     * beside it would frame the body while a proxy used the TE. */
    {"space before the colon", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked"
     "\r\nContent-Length: 13\r\n\r\n" BODY, 400, "bad_framing", LIB_1},
    /* RFC 9112 6.1: chunked not last; identity is no transfer coding any more: 501. */
    {"chunked, identity", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, "
     "identity\r\n\r\n" CHUNKED_BODY, 501, "unsupported_encoding", LIB_1},
    /* An unknown coding that merely contains the word. */
    {"xchunked", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
     CHUNKED_BODY, 501, "unsupported_encoding", LIB_1},
    /* A real coding fanout does not implement (RFC 9112 6.1: 501). */
    {"gzip, chunked", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
     "\r\n" CHUNKED_BODY, 501, "unsupported_encoding", LIB_1},
    /* Chunked twice in one line. */
    {"chunked, chunked", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, "
     "chunked\r\n\r\n" CHUNKED_BODY, 400, "bad_framing", LIB_1},
    /* RFC 9112 6.1: TE in an HTTP/1.0 request means faulty framing; close. */
    {"HTTP/1.0 with Transfer-Encoding", "POST /v1/batch HTTP/1.0\r\nHost: x\r\n"
     "Transfer-Encoding: chunked\r\n\r\n" CHUNKED_BODY, 400, "bad_framing", 0},
    /* RFC 9112 6.3 point 5: a list as Content-Length is invalid (0.9.75 answers it itself). */
    {"Content-Length 13, 5", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 13, 5\r\n\r\n"
     BODY, 400, "bad_framing", LIB_075 | LIB_1},
    /* A sign is not 1*DIGIT. */
    {"Content-Length -1", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" BODY,
     400, "bad_framing", LIB_075 | LIB_1},
    /* RFC 9112 6.3: a length past 2^64 - 1 cannot be represented: invalid. */
    {"Content-Length over 2^64", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: "
     "18446744073709551616\r\n\r\n" BODY, 400, "bad_framing", LIB_075 | LIB_1},
    /* A plus sign neither. */
    {"Content-Length +13", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: +13\r\n\r\n"
     BODY, 400, "bad_framing", LIB_075 | LIB_1},
    /* RFC 9112 5.1 / 9110 5.6.2: a field name is a token; '(' is not a tchar. */
    {"a separator in a field name", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nX(A): 1\r\n"
     "Content-Length: 13\r\n\r\n" BODY, 400, "bad_header", 0},
    /* RFC 9112 3.2: an HTTP/1.1 request without Host MUST be 400. */
    {"no Host", "POST /v1/batch HTTP/1.1\r\nContent-Length: 13\r\n\r\n" BODY, 400, "bad_header", LIB_1},
    /* RFC 9112 3.2: more than one Host MUST be 400. */
    {"two Host", "POST /v1/batch HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 13\r\n\r\n"
     BODY, 400, "bad_header", 0},
    /* The same rule holds on a probe: framing is checked on every route. */
    {"two Content-Length on /healthz", "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
     "Content-Length: 0\r\n\r\n", 400, "bad_framing", 0},
};

/* Every framing case: its status, fanout's JSON error, exactly one response, and the close. */
static void test_http_framing_refused_and_closed(void)
{
    if (!have_bin())
        return;
    struct env e;
    CU_ASSERT_FATAL(start(&e, NULL));
    for (size_t i = 0; i < sizeof(frame_cases) / sizeof(frame_cases[0]); i++) {
        const struct frame_case *fc = &frame_cases[i];
        struct srvtest_raw r;
        exchange(e.p.port, fc->req, strlen(fc->req), &r, true);
        unsigned status = srvtest_raw_status(&r);
        int responses = srvtest_raw_status_lines(&r);
        char code[64], ct[64];
        bool ok;
        if (fc->lib & LIB_HERE) /* the library's own 4xx (0.9.75: 413 for a huge length) */
            ok = status / 100 == 4 && r.eof && !r.reset;
        else
            ok = status == fc->status && r.eof && !r.reset && responses == 1 &&
                 !strcmp(code_of(&r, code, sizeof(code)), fc->code) &&
                 srvtest_raw_header(&r, "Content-Type", ct, sizeof(ct)) &&
                 !strcmp(ct, "application/json");
        if (!ok)
            fprintf(stderr, "\n  case %s: status %u (want %u), eof %d, responses %d: %.300s\n",
                    fc->name, status, fc->status, r.eof, responses, r.buf);
        CU_ASSERT(ok);
    }
    env_free(&e);
}

/* Requests that are fine, and must stay fine (a strict parser must not refuse them). */
static void test_http_valid_requests_served(void)
{
    if (!have_bin())
        return;
    struct env e;
    CU_ASSERT_FATAL(start(&e, NULL));
    struct srvtest_raw r;
    char v[160];
    /* RFC 9112 3.2.2: a server MUST accept the absolute form. */
    const char *abs = "POST http://x/v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n" BODY;
    exchange(e.p.port, abs, strlen(abs), &r, false);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 200);
    /* RFC 9110 5.5: optional whitespace around a value is not part of it. */
    const char *ows = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nX-Request-Id:  abc-1 \t\r\n"
                      "Content-Length: 13\r\n\r\n" BODY;
    exchange(e.p.port, ows, strlen(ows), &r, false);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 200);
    CU_ASSERT(srvtest_raw_header(&r, "X-Request-Id", v, sizeof(v)) && !strcmp(v, "abc-1"));
    /* Transfer coding names are case-insensitive (RFC 9112 7). */
    const char *ch = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n"
                     CHUNKED_BODY;
    exchange(e.p.port, ch, strlen(ch), &r, false);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 200);
    /* HTTP/1.0 needs no Host (RFC 9112 3.2 binds 1.1 only). */
    const char *h10 = "POST /v1/batch HTTP/1.0\r\nContent-Length: 13\r\n\r\n" BODY;
    exchange(e.p.port, h10, strlen(h10), &r, true);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 200);
    /* RFC 9110 5.5: trailing whitespace is not part of a Content-Length either; 0.9.75 refuses
     * it itself (README), 1.0 reads 13. */
    const char *tw = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 13 \r\n\r\n" BODY;
    exchange(e.p.port, tw, strlen(tw), &r, !MHD_1);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), MHD_1 ? 200 : 400);
    /* Leading zeros are still 1*DIGIT. */
    const char *lz = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 0013\r\n\r\n" BODY;
    exchange(e.p.port, lz, strlen(lz), &r, false);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 200);
    /* Keep-alive survives: two pipelined requests in one write get two answers in order
     * (RFC 9112 9.3.2), so the strict checks cost no connection that was right. */
    const char *two = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x"
                      "\r\n\r\n";
    CU_ASSERT_FATAL(srvtest_raw_open(&r, e.p.port));
    CU_ASSERT(srvtest_raw_write(&r, two, strlen(two)));
    srvtest_raw_read(&r, two_responses, WAIT_MS);
    CU_ASSERT_EQUAL(srvtest_raw_complete(&r), 2);
    CU_ASSERT(!r.eof);
    srvtest_raw_close(&r);
    env_free(&e);
}

/* Header values: a NUL, an obs-fold, a folded Content-Length. libmicrohttpd 0.9.75 reads these
 * before fanout sees them (it cuts a value at a NUL and drops a folded line); 1.0 at fanout's
 * discipline level refuses them. */
static void test_http_header_values(void)
{
    if (!have_bin())
        return;
    struct env e;
    CU_ASSERT_FATAL(start(&e, NULL));
    struct srvtest_raw r;
    char v[160];
    /* RFC 9110 5.5: a NUL in a value must not be cut silently (reject or replace). */
    static const char nul[] = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc\0def\r\n"
                              "Content-Length: 13\r\n\r\n" BODY;
    exchange(e.p.port, nul, sizeof(nul) - 1, &r, MHD_1);
    CU_ASSERT_EQUAL(srvtest_raw_status_lines(&r), 1);
    if (MHD_1) {
        CU_ASSERT_EQUAL(srvtest_raw_status(&r), 400);
        CU_ASSERT(r.eof);
    } else { /* 0.9.75 cuts the value at the NUL before fanout sees it (README): one answer */
        CU_ASSERT(srvtest_raw_header(&r, "X-Request-Id", v, sizeof(v)) != NULL);
    }
    /* RFC 9112 5.2: obs-fold must be rejected or replaced; a folded Content-Length must not let
     * the rest of the body be read as a second request. */
    const char *fold = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n 3\r\n\r\n" BODY;
    exchange(e.p.port, fold, strlen(fold), &r, true);
    if (MHD_1) {
        CU_ASSERT_EQUAL(srvtest_raw_status(&r), 400);
        CU_ASSERT_EQUAL(srvtest_raw_status_lines(&r), 1);
        CU_ASSERT(r.eof);
    }
    env_free(&e);
}

/* ---------------------------------------------------------------- write-first clients */

/* A client that writes everything before it reads (Python's http.client, requests) must read
 * the early answer, not a reset: 'req' then 'tail' are written whole, then the reply read. */
static void write_first(uint16_t port, const char *req, size_t len, const char *tail,
                        size_t tail_len, struct srvtest_raw *r)
{
    CU_ASSERT_FATAL(srvtest_raw_open(r, port));
    bool head = srvtest_raw_write(r, req, len);
    bool sent = head && (!tail || srvtest_raw_write(r, tail, tail_len));
    CU_ASSERT(sent);
    if (!sent)
        fprintf(stderr, "\n  write-first: %s of %.40s... not sent: %s\n", head ? "the rest" : "the head",
                req, strerror(errno));
    srvtest_raw_read(r, NULL, WAIT_MS);
    srvtest_raw_close(r);
}

static void test_http_write_first_clients_read_the_error(void)
{
    if (!have_bin())
        return;
    struct env e;
    /* Lingering ends when the client closes; its time bound (5 s by default) is set far out so
     * that a client slowed by a loaded machine still gets its whole body through. */
    char linger[32];
    int64_t lms = test_ms(20000);
    snprintf(linger, sizeof(linger), "%" PRId64, lms < 60000 ? lms : 60000); /* its maximum */
    char *args[] = {"--max-request-bytes", "64KiB", "--linger-ms", linger, NULL};
    CU_ASSERT_FATAL(start(&e, args));
    size_t big = 4u << 20;
    char *body = malloc(big);
    CU_ASSERT_FATAL(body != NULL);
    memset(body, 'x', big);
    struct srvtest_raw r;
    char code[64];
    /* A Content-Length over --max-request-bytes is refused before the body is read. */
    char head[256];
    int hn = snprintf(head, sizeof(head),
                      "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n", big);
    write_first(e.p.port, head, (size_t)hn, body, big, &r);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 413);
    CU_ASSERT(!r.reset && r.eof);
    CU_ASSERT_STRING_EQUAL(code_of(&r, code, sizeof(code)), "body_too_large");
    /* A chunked body that passes the limit by more than 1 MiB: answered on the socket. */
    size_t csz = 3u << 20;
    char *chunked = malloc(csz + 64);
    CU_ASSERT_FATAL(chunked != NULL);
    int cn = snprintf(chunked, 64, "%zx\r\n", csz);
    memset(chunked + cn, 'y', csz);
    memcpy(chunked + cn + csz, "\r\n0\r\n\r\n", 7);
    const char *chead = "POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    write_first(e.p.port, chead, strlen(chead), chunked, (size_t)cn + csz + 7, &r);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 413);
    CU_ASSERT(!r.reset);
    CU_ASSERT_STRING_EQUAL(code_of(&r, code, sizeof(code)), "body_too_large");
    /* A framing error with a big body behind it. */
    hn = snprintf(head, sizeof(head), "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 60000"
                  "\r\nTransfer-Encoding: chunked\r\n\r\n");
    write_first(e.p.port, head, (size_t)hn, body, 2u << 20, &r);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 400);
    CU_ASSERT(!r.reset && r.eof);
    /* A 200 KB header line in one write: the library's 431, readable. */
    size_t hl = 200000;
    char *hdr = malloc(hl + 128);
    CU_ASSERT_FATAL(hdr != NULL);
    int pn = snprintf(hdr, 128, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(hdr + pn, 'a', hl);
    memcpy(hdr + pn + hl, "\r\n\r\n", 4);
    write_first(e.p.port, hdr, (size_t)pn + hl + 4, NULL, 0, &r);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 431);
    CU_ASSERT(!r.reset);
    free(hdr);
    free(chunked);
    free(body);
    env_free(&e);
}

/* ---------------------------------------------------------------- deadlines */

/* Sends 'first', then 'line' every 'gap' ms until a reply or the end comes (a slow client:
 * the pacing is the client's behaviour under test, not a wait for the server). */
static void trickle(uint16_t port, const char *first, const char *line, int gap,
                    struct srvtest_raw *r)
{
    CU_ASSERT_FATAL(srvtest_raw_open(r, port));
    CU_ASSERT(srvtest_raw_write(r, first, strlen(first)));
    int64_t until = ctx_now() + WAIT_MS;
    while (ctx_now() < until && !r->eof && !r->reset && r->len == 0) {
        srvtest_raw_read(r, one_response, gap);
        if (r->len == 0 && !r->eof && !srvtest_raw_write(r, line, strlen(line)))
            break; /* closed: what was sent back is still read below */
    }
    srvtest_raw_read(r, NULL, WAIT_MS);
    srvtest_raw_close(r);
}

static void test_http_slow_clients_get_408(void)
{
    if (!have_bin())
        return;
    struct env e;
    char hdr_ms[32], body_ms[32];
    snprintf(hdr_ms, sizeof(hdr_ms), "%lld", (long long)test_ms(1000));
    snprintf(body_ms, sizeof(body_ms), "%lld", (long long)test_ms(1500));
    char *args[] = {"--header-timeout-ms", hdr_ms, "--body-timeout-ms", body_ms, NULL};
    CU_ASSERT_FATAL(start(&e, args));
    struct srvtest_raw r;
    char code[64];
    /* One header line every 100 ms never ends the header section: the idle timeout never
     * fires (every byte restarts it), the header deadline does. */
    trickle(e.p.port, "GET /healthz HTTP/1.1\r\nHost: x\r\n", "X-A: b\r\n", 100, &r);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 408);
    CU_ASSERT_STRING_EQUAL(code_of(&r, code, sizeof(code)), "request_timeout");
    CU_ASSERT(r.eof || r.reset);
    /* A body one byte every 100 ms: the body deadline. */
    trickle(e.p.port, "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", "x",
            100, &r);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 408);
    CU_ASSERT_STRING_EQUAL(code_of(&r, code, sizeof(code)), "request_timeout");
    /* An idle keep-alive connection is not a slow request: past both deadlines it still
     * serves (the header deadline starts at a request's first byte). */
    CU_ASSERT_FATAL(srvtest_raw_open(&r, e.p.port));
    srvtest_raw_read(&r, NULL, test_ms(1000) * 3); /* nothing may come, not even the end */
    CU_ASSERT(r.len == 0 && !r.eof);
    const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    CU_ASSERT(srvtest_raw_write(&r, get, strlen(get)));
    srvtest_raw_read(&r, one_response, WAIT_MS);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 200);
    srvtest_raw_close(&r);
    env_free(&e);
}

/* ---------------------------------------------------------------- per-address limit */

static void test_http_clients_per_ip(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--max-clients-per-ip", "2", NULL};
    CU_ASSERT_FATAL(start(&e, args));
    const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    struct srvtest_raw *c = malloc(4 * sizeof(*c)); /* two kept, the third, a later one */
    CU_ASSERT_FATAL(c != NULL);
    for (int i = 0; i < 2; i++) { /* two connections, each proven accepted by an answer */
        CU_ASSERT_FATAL(srvtest_raw_open(&c[i], e.p.port));
        CU_ASSERT(srvtest_raw_write(&c[i], get, strlen(get)));
        srvtest_raw_read(&c[i], one_response, WAIT_MS);
        CU_ASSERT_EQUAL(srvtest_raw_status(&c[i]), 200);
    }
    /* The third from the same address is closed unanswered. */
    struct srvtest_raw *c3 = &c[2];
    CU_ASSERT_FATAL(srvtest_raw_open(c3, e.p.port));
    srvtest_raw_write(c3, get, strlen(get)); /* may fail: the server may have closed already */
    srvtest_raw_read(c3, one_response, WAIT_MS);
    CU_ASSERT(srvtest_raw_status(c3) == 0 && (c3->eof || c3->reset));
    srvtest_raw_close(c3);
    /* One closes; a new one is served (the count follows the closes). */
    srvtest_raw_close(&c[0]);
    bool served = false;
    for (int tries = 0; tries < 50 && !served; tries++) { /* the close reaches it soon */
        struct srvtest_raw *r = &c[3];
        if (!srvtest_raw_open(r, e.p.port))
            break;
        if (srvtest_raw_write(r, get, strlen(get)))
            srvtest_raw_read(r, one_response, WAIT_MS);
        served = srvtest_raw_status(r) == 200;
        srvtest_raw_close(r);
    }
    CU_ASSERT(served);
    srvtest_raw_close(&c[1]);
    free(c);
    env_free(&e);
}

/* ---------------------------------------------------------------- memory budget */

/* A POST /v1/batch with 'body' into req; returns its length. */
static size_t batch_request(char *req, size_t size, const char *body)
{
    int n = snprintf(req, size, "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n"
                     "\r\n%s", strlen(body), body);
    return n > 0 && (size_t)n < size ? (size_t)n : 0;
}

static bool stub_saw(void *arg)
{
    struct env *e = arg;
    return upstub_count(e->up, "/items/sleep60000-m") > 0;
}

struct budget_try {
    uint16_t port;
    const char *body;
    int last; /* status of the latest try */
};

/* One batch: true once it is answered 200 (503 overloaded: the budget is still held). */
static bool budget_back(void *arg)
{
    struct budget_try *t = arg;
    char req[512];
    struct srvtest_raw *r = malloc(sizeof(*r));
    CU_ASSERT_FATAL(r != NULL);
    exchange(t->port, req, batch_request(req, sizeof(req), t->body), r, false);
    t->last = (int)srvtest_raw_status(r);
    free(r);
    return t->last == 200 || t->last != 503;
}

static void test_http_memory_budget(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--max-memory", "1MiB", "--max-body", "1MiB", "--max-request-bytes", "64KiB",
                    NULL};
    CU_ASSERT_FATAL(start(&e, args));
    struct srvtest_raw r;
    char code[64];
    /* Two 600 KB upstream bodies cannot both be held in 1 MiB: the batch fails as too large,
     * though each body is within --max-body and the answer within --max-response-bytes. */
    const char *b2 = "{\"ids\":[\"big600000-1\",\"big600000-2\"]}";
    char req[512];
    exchange(e.p.port, req, batch_request(req, sizeof(req), b2), &r, false);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 502);
    CU_ASSERT_STRING_EQUAL(code_of(&r, code, sizeof(code)), "upstream_too_large");
    /* One of them alone fits: the budget comes back when the first batch is freed, which is
     * just after its answer went out (so the first try may still find it held: 503). */
    const char *b1 = "{\"ids\":[\"big600000-3\"]}";
    struct budget_try bt = {.port = e.p.port, .body = b1};
    CU_ASSERT(test_wait_until(budget_back, &bt, WAIT_MS));
    CU_ASSERT(bt.last == 200);
    /* While a batch holds memory (its request body, its results), a new batch that could not
     * hold one --max-body more is refused at admission. */
    const char *slow = "{\"ids\":[\"sleep60000-m\"],\"timeout_ms\":60000}";
    struct srvtest_raw *held = malloc(sizeof(*held));
    CU_ASSERT_FATAL(held != NULL && srvtest_raw_open(held, e.p.port));
    CU_ASSERT(srvtest_raw_write(held, req, batch_request(req, sizeof(req), slow)));
    CU_ASSERT_FATAL(test_wait_until(stub_saw, &e, WAIT_MS)); /* admitted and running */
    exchange(e.p.port, req, batch_request(req, sizeof(req), b1), &r, false);
    CU_ASSERT_EQUAL(srvtest_raw_status(&r), 503);
    CU_ASSERT_STRING_EQUAL(code_of(&r, code, sizeof(code)), "overloaded");
    srvtest_raw_close(held); /* the slow batch is canceled (client gone) */
    free(held);
    env_free(&e);
}

static CU_TestInfo http_tests[] = {
    {"framing: ambiguous or malformed framing is 400/501 with a JSON error, then closed",
     test_http_framing_refused_and_closed},
    {"valid requests stay served: absolute form, OWS, chunked, HTTP/1.0, pipelining",
     test_http_valid_requests_served},
    {"header values: NUL and obs-fold refused (libmicrohttpd 1.0)", test_http_header_values},
    {"write-first clients read 413, 400 and 431 instead of a reset (lingering close)",
     test_http_write_first_clients_read_the_error},
    {"trickling headers or body get 408 and a close; idle keep-alive does not",
     test_http_slow_clients_get_408},
    {"--max-clients-per-ip: the next connection from the address is closed unanswered",
     test_http_clients_per_ip},
    {"--max-memory: a running batch fails as too large, a new one is refused 503",
     test_http_memory_budget},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(http, http_tests)
