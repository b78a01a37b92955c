/* srvtest: the tests' one HTTP client, and the harness for an in-process server.
 *
 * The client speaks to any HTTP server on a loopback port (the in-process server, a spawned
 * fanout binary, the demo upstream) in two ways:
 * - Exchanges through libcurl: one at a time (srvtest_call(); pass a kept easy handle to reuse
 *   its connection), on a background thread (srvtest_bg), or many at once driven from the
 *   calling thread (srvtest_multi). Each records what a test asserts on: curl's result, the
 *   status, the body (parsed as JSON when it is), the headers we care about, the connections
 *   opened and the elapsed time.
 * - Raw connections (srvtest_raw): every byte sent is the test's, so malformed requests reach
 *   the server as written; responses are read one at a time (Content-Length framing), or
 *   everything until a condition, the end of the connection, or a reset.
 *
 * The harness: an in-process fanout server (srv_new on 127.0.0.1, port 0) in front of an
 * in-process upstream stub (tests/upstub.h), and waits for their counters.
 *
 * Threads: every function is called from the test thread, except srvtest_call() and the
 * background-request helpers, which may run on any thread with their own struct srvtest_resp
 * (each call uses its own curl easy handle unless one is passed in); a struct srvtest_multi or
 * srvtest_raw belongs to one thread. Nothing here asserts: the test asserts on what the helpers
 * return. */
#ifndef FANOUT_TESTS_SRVTEST_H
#define FANOUT_TESTS_SRVTEST_H

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/config.h"
#include "server/http/srv.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define SRVTEST_WAIT_MS test_ms(10000) /* bound for anything that should happen "soon" */

/* One HTTP exchange to ask for. Zero-initialise and fill what you need; the strings must
 * outlive the exchange. */
struct srvtest_call {
    const char *method;      /* NULL: POST when body is set, else GET */
    const char *host;        /* NULL: "127.0.0.1"; an IPv6 literal is bracketed for the URL */
    const char *path;        /* NULL: "/v1/batch" */
    const char *body;        /* request body or NULL */
    size_t body_len;         /* 0: strlen(body) */
    bool chunked;            /* send the body with Transfer-Encoding: chunked */
    const char *headers[6];  /* extra "Name: value" lines (curl syntax), NULL-terminated */
    long timeout_ms;         /* whole-exchange cap; 0: SRVTEST_WAIT_MS */
};

/* What came back. Release with srvtest_resp_free(). */
struct srvtest_resp {
    CURLcode rc;             /* curl's result; CURLE_OK when a response arrived */
    long status;             /* HTTP status, 0 if none */
    char *body;              /* malloc'd, NUL-terminated; "" when the response had none, NULL
                                when no response came */
    size_t len;              /* body length */
    char request_id[256];    /* X-Request-Id response header, "" if absent */
    char retry_after[64];    /* Retry-After, "" if absent */
    char allow[64];          /* Allow, "" if absent */
    char content_type[128];  /* Content-Type, "" if absent */
    char connection[64];     /* Connection, "" if absent */
    long connects;           /* CURLINFO_NUM_CONNECTS: new connections this exchange made */
    int64_t elapsed_ms;      /* wall time of the exchange */
    cJSON *json;             /* the body parsed, or NULL if it is not JSON */
};

/* A server in front of a stub. */
struct srvtest_env {
    struct upstub *up;       /* the upstream stub (owned) */
    struct srv *srv;         /* the server, or NULL before srvtest_start() */
    uint16_t port;           /* the server's port */
};

/* Starts the stub (2 loops). Returns 0 or a negative errno. */
int srvtest_env_init(struct srvtest_env *e);

/* Test defaults: 127.0.0.1:0, upstream <stub>/items/{id}, 2 http and 2 fetch threads, limit 8,
 * drain 2000 ms, log level from $SRVTEST_LOG (default error), the rest config_defaults(). */
void srvtest_config(const struct srvtest_env *e, struct srv_config *c);

/* Starts the server for 'c'. Returns 0 or srv_new()'s error. */
int srvtest_start(struct srvtest_env *e, const struct srv_config *c);

/* srvtest_config() + srvtest_start(). */
int srvtest_start_default(struct srvtest_env *e);

/* Frees the server (if any) and the stub. */
void srvtest_env_free(struct srvtest_env *e);

/* Performs one exchange against 'c->host' (127.0.0.1) port 'port'. 'easy' may be a handle to
 * reuse (keep-alive) or NULL for a fresh one. Fills *out (call srvtest_resp_free()). Any
 * thread. */
void srvtest_call(CURL *easy, uint16_t port, const struct srvtest_call *c,
                  struct srvtest_resp *out);

/* POST 'body' to /v1/batch with optional extra header lines (NULL-terminated list or NULL). */
void srvtest_post(uint16_t port, const char *body, const char *const *headers,
                  struct srvtest_resp *out);

/* GET 'path'. */
void srvtest_get(uint16_t port, const char *path, struct srvtest_resp *out);

void srvtest_resp_free(struct srvtest_resp *r);

/* For an error response {"error":{...}}: the member 'name' of the error object, or NULL. */
const cJSON *srvtest_err_field(const struct srvtest_resp *r, const char *name);

/* The error's "code" string, or "" if the response is not such an error. */
const char *srvtest_err_code(const struct srvtest_resp *r);

/* The error's "message" string, or "". */
const char *srvtest_err_message(const struct srvtest_resp *r);

/* The "results" array of a 200, or NULL. */
const cJSON *srvtest_results(const struct srvtest_resp *r);

/* The value of an unlabelled metric line "name value" from /metrics, or -1. */
double srvtest_metric(uint16_t port, const char *name);

/* Waits up to 'ms' for the series 'name' (as srvtest_metric() reads it) to reach 'n'. */
bool srvtest_wait_metric(uint16_t port, const char *name, double n, int64_t ms);

/* A request on a background thread. */
struct srvtest_bg {
    pthread_t thread;        /* runs the request */
    uint16_t port;           /* server port */
    struct srvtest_call call; /* what to send (strings must outlive the join) */
    struct srvtest_resp resp; /* what came back; read after srvtest_bg_join() */
};

/* Starts 'bg' (port and call filled by the caller). Returns 0 or a positive pthread error. */
int srvtest_bg_start(struct srvtest_bg *bg);

/* Joins it. */
void srvtest_bg_join(struct srvtest_bg *bg);

/* Many exchanges at once on one libcurl multi handle, driven from the calling thread (no thread
 * per request): add them, then pump or wait. Large: allocate it static or on the heap. */
#define SRVTEST_MULTI_MAX 64
struct srvtest_xfer;
struct srvtest_multi {
    CURLM *m;                                /* the multi handle */
    int n;                                   /* exchanges added so far */
    struct srvtest_xfer *x[SRVTEST_MULTI_MAX]; /* their transfers */
    struct srvtest_resp resp[SRVTEST_MULTI_MAX]; /* what came back; read once done[i] */
    bool done[SRVTEST_MULTI_MAX];            /* finished */
};

/* Prepares an empty set. Returns 0, or -ENOMEM. */
int srvtest_multi_init(struct srvtest_multi *g);

/* Starts exchange 'c' with 'port' (c's strings must outlive it). Returns its index, or -1 when
 * the set is full or out of memory. */
int srvtest_multi_add(struct srvtest_multi *g, uint16_t port, const struct srvtest_call *c);

/* Drives the transfers for at most 'ms' (one wait for activity) and records those that finished. */
void srvtest_multi_pump(struct srvtest_multi *g, int ms);

/* Exchanges not finished yet. */
int srvtest_multi_pending(const struct srvtest_multi *g);

/* Pumps until until(arg) holds (with until NULL: until every exchange has finished) or 'ms'
 * pass; returns whether it held. */
bool srvtest_multi_wait(struct srvtest_multi *g, bool (*until)(void *), void *arg, int64_t ms);

/* Ends every exchange (finished or not) and frees the responses. */
void srvtest_multi_free(struct srvtest_multi *g);

/* A TCP connection to 127.0.0.1:'port' (blocking; a write blocked for 2 * SRVTEST_WAIT_MS
 * fails instead of hanging). Returns the fd or -1. */
int srvtest_raw_connect(uint16_t port);

/* Writes all of 'data'. Returns true on success. */
bool srvtest_raw_send(int fd, const char *data, size_t len);

/* A raw client connection: the bytes read and not yet consumed, and how the connection ended. */
struct srvtest_raw {
    int fd;                 /* the socket, or -1 */
    char buf[65536];        /* bytes read and not yet consumed, NUL-terminated */
    size_t len;             /* how many */
    bool eof;               /* the peer closed its side (a read gave 0) */
    bool reset;             /* the connection was reset (ECONNRESET) */
    bool clipped;           /* srvtest_raw_read() dropped bytes to keep reading (buffer full) */
};

/* Connects 'c' to 127.0.0.1:'port' (as srvtest_raw_connect). Returns true on success. */
bool srvtest_raw_open(struct srvtest_raw *c, uint16_t port);

/* Writes all of 'data' on the connection. Returns true on success. */
bool srvtest_raw_write(struct srvtest_raw *c, const void *data, size_t len);

/* Reads one response within 'ms' and consumes it. Returns its status and copies its body
 * (NUL-terminated, truncated to 'cap') into 'body' when not NULL; 0 if the peer closed first,
 * -1 on timeout or a malformed response. */
int srvtest_raw_response(struct srvtest_raw *c, char *body, size_t cap, int64_t ms);

/* Reads, keeping everything, until done(c) holds (with done NULL: until the connection ends),
 * the peer closes, the connection is reset, or 'ms' pass. A full buffer keeps its first half
 * and goes on reading (clipped). Returns whether done(c) held (with done NULL: whether the
 * connection ended). */
bool srvtest_raw_read(struct srvtest_raw *c, bool (*done)(const struct srvtest_raw *c),
                      int64_t ms);

/* Of the bytes held: the number of complete responses (each framed by its Content-Length). */
int srvtest_raw_complete(const struct srvtest_raw *c);

/* Of the bytes held: the number of status lines at the start of a response. */
int srvtest_raw_status_lines(const struct srvtest_raw *c);

/* The status of the first response held, or 0. */
unsigned srvtest_raw_status(const struct srvtest_raw *c);

/* The header 'name' of the first response held, copied into out (NUL-terminated), or NULL. */
const char *srvtest_raw_header(const struct srvtest_raw *c, const char *name, char *out,
                               size_t size);

/* Closes the socket. */
void srvtest_raw_close(struct srvtest_raw *c);

/* Waits until the stub has at least 'n' requests in flight (true) or the bound passes (false). */
bool srvtest_wait_stub_in_flight(struct upstub *up, uint64_t n, int64_t ms);

/* Waits until the stub has counted at least 'n' canceled requests. */
bool srvtest_wait_stub_canceled(struct upstub *up, uint64_t n, int64_t ms);

/* Waits until the stub has logged at least 'n' requests for 'target' (e.g. "/items/a"). */
bool srvtest_wait_stub_target(struct upstub *up, const char *target, size_t n, int64_t ms);

/* Waits until srv_in_flight(s) == n. */
bool srvtest_wait_srv_in_flight(struct srv *s, int64_t n, int64_t ms);

/* A TCP port on 127.0.0.1 that refuses connections and that nobody else can take: bound and
 * never listened on, for as long as the returned fd stays open (close it when done). Returns
 * the fd and the port in *port, or -1. */
int srvtest_refusing_port(uint16_t *port);

#endif
