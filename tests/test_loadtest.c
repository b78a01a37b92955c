/* Tests for the load tool (deploy/loadtest/, build/bin/fanout-load).
 *
 * In process: the latency histogram (bucket bounds, quantile precision, merge), the HTTP
 * response parser (fed whole and byte by byte: Content-Length, chunked with extensions and
 * trailers, a body ended by the close, Connection: close, HTTP/1.0, NDJSON last lines, bad
 * input) and the request mix (valid JSON, batch ranges, Zipf skew, failing fractions, seeds).
 *
 * End to end: the suite starts one real fanout (--demo, $FANOUT_BIN) on a free loopback port
 * and runs $FANOUT_LOAD_BIN against it: closed and open loop with --json, failing ids and a
 * latency objective (exit 1 with exact status and error-code counts), --csv rows, a sweep with
 * and without gnuplot on PATH. Flags and targets that must fail (bad values: exit 2 with one
 * line; an unreachable port: exit 3) need no server. A canned HTTP server thread in this process
 * answers with fixed bytes (chunked NDJSON streams, Connection: close) to check what the tool
 * makes of answers fanout does not send yet.
 *
 * Children are started with fork+exec, their output read through pipes to EOF, every wait
 * bounded (bound() scales the bounds by TEST_TIME_FACTOR). No assertion is about speed: counts
 * are checked for consistency with each other and with wide ranges only. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "deploy/loadtest/hist.h"
#include "deploy/loadtest/http.h"
#include "deploy/loadtest/mix.h"
#include "tests/srvtest.h"
#include "tests/support.h"

extern char **environ;

/* Bounds before scaling: a short run (its --duration plus start-up) and a server start. */
#define RUN_MS 60000
#define START_MS 30000

static int64_t bound(int64_t ms)
{
    const char *f = getenv("TEST_TIME_FACTOR");
    long k = f && *f ? strtol(f, NULL, 10) : 1;
    return ms * (k > 0 ? k : 1);
}

/* ---------------------------------------------------------------- histogram */

static void test_loadtest_hist_buckets(void)
{
    /* Exact below 2 * SUB; each bucket's lowest value maps back to it; indexes never fall. */
    for (uint64_t v = 0; v < 2 * LT_HIST_SUB; v++)
        CU_ASSERT_EQUAL(lt_hist_index(v), v);
    size_t prev = 0;
    for (uint64_t v = 1; v < (UINT64_C(1) << 30); v += v / 7 + 1) {
        size_t i = lt_hist_index(v);
        CU_ASSERT(i >= prev);
        CU_ASSERT(i < LT_HIST_BUCKETS);
        CU_ASSERT(lt_hist_lowest(i) <= v);
        CU_ASSERT(i + 1 == LT_HIST_BUCKETS || lt_hist_lowest(i + 1) > v);
        CU_ASSERT_EQUAL(lt_hist_index(lt_hist_lowest(i)), i);
        prev = i;
    }
    CU_ASSERT_EQUAL(lt_hist_index(UINT64_MAX), LT_HIST_BUCKETS - 1);
}

static void test_loadtest_hist_quantiles(void)
{
    static struct lt_hist h, a, b;
    lt_hist_init(&h);
    CU_ASSERT_EQUAL(lt_hist_quantile(&h, 0.99), 0);
    /* 1..100000 us: quantile q is q * 100000 within a bucket's width (< 1%). */
    for (uint64_t v = 1; v <= 100000; v++)
        lt_hist_add(&h, v);
    static const double qs[] = {0.5, 0.9, 0.99, 0.999};
    for (size_t i = 0; i < sizeof(qs) / sizeof(qs[0]); i++) {
        double want = qs[i] * 100000, got = (double)lt_hist_quantile(&h, qs[i]);
        CU_ASSERT(got > want * 0.99 && got < want * 1.01);
    }
    CU_ASSERT_EQUAL(lt_hist_quantile(&h, 1.0), 100000);
    CU_ASSERT_EQUAL(h.max, 100000);
    CU_ASSERT_EQUAL(h.count, 100000);
    /* One slow value in a thousand shows at p99.9 and max, not at p99. */
    lt_hist_init(&a);
    for (int i = 0; i < 998; i++)
        lt_hist_add(&a, 500);
    lt_hist_init(&b);
    lt_hist_add(&b, 250000);
    lt_hist_add(&b, 250000);
    lt_hist_merge(&a, &b);
    CU_ASSERT_EQUAL(a.count, 1000);
    CU_ASSERT(lt_hist_quantile(&a, 0.99) < 510);
    CU_ASSERT(lt_hist_quantile(&a, 0.999) > 247000);
    CU_ASSERT_EQUAL(a.max, 250000);
    CU_ASSERT_EQUAL(a.min, 500);
}

/* ---------------------------------------------------------------- HTTP parser */

/* Feeds 'text' whole (step 0) or 'step' bytes at a time; returns the last feed result and the
 * bytes consumed in *used_total. */
static int feed(struct lt_http *p, const char *text, size_t step, size_t *used_total)
{
    size_t len = strlen(text), off = 0;
    int r = 0;
    while (off < len) {
        size_t n = step && len - off > step ? step : len - off, used = 0;
        r = lt_http_feed(p, text + off, n, &used);
        off += used;
        if (r != 0)
            break;
        if (used < n) {
            r = -2; /* the parser stopped early without saying why */
            break;
        }
    }
    *used_total = off;
    return r;
}

static void test_loadtest_http_lengths_and_chunks(void)
{
    static struct lt_http p;
    static const size_t steps[] = {0, 1, 3, 7};
    for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]); s++) {
        size_t used;
        lt_http_init(&p);
        const char *ok = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         "content-length: 12\r\n\r\n{\"results\":}";
        CU_ASSERT_EQUAL(feed(&p, ok, steps[s], &used), 1);
        CU_ASSERT_EQUAL(used, strlen(ok));
        CU_ASSERT_EQUAL(p.status, 200);
        CU_ASSERT_EQUAL(p.body_len, 12);
        CU_ASSERT_FALSE(p.close);
        CU_ASSERT_PTR_NULL(p.body); /* a 200 JSON body is counted, not kept */

        /* The same parser, next answer: chunked, with an extension and a trailer. */
        lt_http_reset(&p);
        const char *ch = "HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n"
                         "Connection: close\r\n\r\n"
                         "a;x=y\r\n{\"error\":{\r\n13\r\n\"code\":\"upstream_st\r\n"
                         "7\r\natus\"}}\r\n0\r\nX-Trailer: 1\r\n\r\n";
        CU_ASSERT_EQUAL(feed(&p, ch, steps[s], &used), 1);
        CU_ASSERT_EQUAL(used, strlen(ch));
        CU_ASSERT_EQUAL(p.status, 502);
        CU_ASSERT_TRUE(p.close);
        CU_ASSERT_EQUAL(p.body_n, 36);
        CU_ASSERT(p.body && strcmp(p.body, "{\"error\":{\"code\":\"upstream_status\"}}") == 0);

        /* No length: the body ends with the connection. */
        lt_http_reset(&p);
        const char *eof = "HTTP/1.0 404 Not Found\r\n\r\nnot here";
        CU_ASSERT_EQUAL(feed(&p, eof, steps[s], &used), 0);
        CU_ASSERT_EQUAL(lt_http_eof(&p), 1);
        CU_ASSERT_EQUAL(p.status, 404);
        CU_ASSERT_TRUE(p.close);
        CU_ASSERT(p.body && strcmp(p.body, "not here") == 0);

        /* HTTP/1.0 keep-alive stays open; 204 has no body; extra bytes are not consumed. */
        lt_http_reset(&p);
        const char *ka = "HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\nXX";
        CU_ASSERT_EQUAL(feed(&p, ka, steps[s], &used), 1);
        CU_ASSERT_EQUAL(used, strlen(ka) - 2);
        CU_ASSERT_FALSE(p.close);
        lt_http_destroy(&p);
    }
}

static void test_loadtest_http_ndjson_and_errors(void)
{
    static struct lt_http p;
    size_t used, n;
    lt_http_init(&p);
    const char *nd = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n"
                     "f\r\n{\"index\":0}\n{\"i\r\n"
                     "1d\r\nndex\":1}\n{\"done\":true,\"n\":2}\n\r\n0\r\n\r\n";
    CU_ASSERT_EQUAL(feed(&p, nd, 1, &used), 1);
    CU_ASSERT_TRUE(p.ndjson);
    const char *last = lt_http_last_line(&p, &n);
    CU_ASSERT(last && n == 19 && memcmp(last, "{\"done\":true,\"n\":2}", 19) == 0);
    /* A last line without its newline still counts. */
    lt_http_reset(&p);
    const char *nd2 = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                      "Content-Length: 21\r\n\r\n{\"a\":1}\n{\"done\":true}";
    CU_ASSERT_EQUAL(feed(&p, nd2, 0, &used), 1);
    last = lt_http_last_line(&p, &n);
    CU_ASSERT(last && n == 13 && memcmp(last, "{\"done\":true}", 13) == 0);

    static const char *const bad[] = {
        "HTTX/1.1 200 OK\r\n\r\n",
        "HTTP/1.1 2x0 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        lt_http_reset(&p);
        CU_ASSERT_EQUAL(feed(&p, bad[i], 0, &used), -1);
    }
    /* A head that never ends is refused once it passes the limit. */
    lt_http_reset(&p);
    static char big[LT_HTTP_MAX_HEAD + 64];
    memset(big, 'a', sizeof(big) - 1);
    memcpy(big, "HTTP/1.1 200 OK\r\nX: ", 20);
    CU_ASSERT_EQUAL(feed(&p, big, 1000, &used), -1);
    /* A close before the head is complete is an error, not an answer. */
    lt_http_reset(&p);
    CU_ASSERT_EQUAL(feed(&p, "HTTP/1.1 200 OK\r\n", 0, &used), 0);
    CU_ASSERT_EQUAL(lt_http_eof(&p), -1);
    lt_http_destroy(&p);
}

/* ---------------------------------------------------------------- request mix */

static void test_loadtest_mix_bodies(void)
{
    struct lt_mix m = {.batch_min = 3, .batch_max = 7, .dist = LT_DIST_UNIFORM, .keys = 50,
                       .fail_frac = 0.25, .slow_frac = 0.25, .slow_ms = 40, .timeout_ms = 900,
                       .mode = "settled"};
    snprintf(m.prefix, sizeof(m.prefix), "k-");
    CU_ASSERT_EQUAL_FATAL(lt_mix_prepare(&m), 0);
    char *buf = malloc(lt_mix_body_max(&m));
    CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
    struct lt_gen g;
    lt_gen_init(&g, &m, 7, 0, 1);
    int seen_min = 100, seen_max = 0, fails = 0, slows = 0, plain = 0;
    for (int i = 0; i < 2000; i++) {
        int nids;
        size_t len = lt_gen_body(&g, buf, &nids);
        CU_ASSERT_EQUAL(len, strlen(buf));
        cJSON *doc = cJSON_Parse(buf);
        CU_ASSERT_PTR_NOT_NULL_FATAL(doc);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(doc, "ids");
        CU_ASSERT_EQUAL(cJSON_GetArraySize(ids), nids);
        CU_ASSERT_EQUAL(cJSON_GetObjectItemCaseSensitive(doc, "timeout_ms")->valueint, 900);
        CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItemCaseSensitive(doc, "mode")->valuestring,
                               "settled");
        const cJSON *id;
        cJSON_ArrayForEach(id, ids)
        {
            const char *s = id->valuestring;
            if (!strncmp(s, "fail-", 5))
                fails++;
            else if (!strncmp(s, "sleep40-", 8))
                slows++;
            else if (!strncmp(s, "k-", 2) && strtol(s + 2, NULL, 10) < 50)
                plain++;
            else
                CU_FAIL("unexpected id");
        }
        seen_min = nids < seen_min ? nids : seen_min;
        seen_max = nids > seen_max ? nids : seen_max;
        cJSON_Delete(doc);
    }
    CU_ASSERT_EQUAL(seen_min, 3);
    CU_ASSERT_EQUAL(seen_max, 7);
    int all = fails + slows + plain; /* about 10000; each quarter within a wide band */
    CU_ASSERT(fails > all / 5 && fails < all * 3 / 10);
    CU_ASSERT(slows > all / 5 && slows < all * 3 / 10);
    free(buf);
    lt_mix_destroy(&m);
}

static void test_loadtest_mix_distributions(void)
{
    /* Zipf over 1000 keys, s = 1: rank 1 takes about 1/H(1000) = 13% of the draws, far more
     * than rank 10, and sequential ids count up by the stride. The same seed repeats. */
    struct lt_mix z = {.batch_min = 1, .batch_max = 1, .dist = LT_DIST_ZIPF, .keys = 1000,
                       .zipf_s = 1.0};
    CU_ASSERT_EQUAL_FATAL(lt_mix_prepare(&z), 0);
    struct lt_gen g1, g2;
    lt_gen_init(&g1, &z, 42, 0, 1);
    lt_gen_init(&g2, &z, 42, 0, 1);
    int hot = 0, tenth = 0, same = 0;
    for (int i = 0; i < 20000; i++) {
        uint64_t k = lt_gen_key(&g1);
        CU_ASSERT(k < 1000);
        hot += k == 0;
        tenth += k == 9;
        same += k == lt_gen_key(&g2);
    }
    CU_ASSERT(hot > 2000 && hot < 3200);
    CU_ASSERT(tenth > 150 && tenth < 400);
    CU_ASSERT_EQUAL(same, 20000);
    lt_mix_destroy(&z);

    struct lt_mix s = {.batch_min = 1, .batch_max = 1, .dist = LT_DIST_SEQ, .keys = 10};
    CU_ASSERT_EQUAL_FATAL(lt_mix_prepare(&s), 0);
    lt_gen_init(&g1, &s, 1, 1, 3);
    uint64_t want[] = {1, 4, 7, 0, 3, 6, 9, 2};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        CU_ASSERT_EQUAL(lt_gen_key(&g1), want[i]);
    lt_mix_destroy(&s);
}

/* ---------------------------------------------------------------- child processes */

static const char *env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

static const char *load_bin(void)
{
    return env_or("FANOUT_LOAD_BIN", "build/bin/fanout-load");
}

/* What a command printed and how it ended. */
struct run {
    char *out, *err;     /* stdout and stderr, NUL-terminated (never NULL after run_tool) */
    size_t out_n, err_n; /* their lengths */
    int status;          /* waitpid status */
    bool finished;       /* ended within the bound */
};

static void run_free(struct run *r)
{
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof(*r));
}

static bool append(int fd, char **buf, size_t *n)
{
    char tmp[8192];
    ssize_t k = read(fd, tmp, sizeof(tmp));
    if (k < 0 && errno == EINTR)
        return true;
    if (k <= 0)
        return false;
    char *nb = realloc(*buf, *n + (size_t)k + 1);
    if (!nb)
        return false;
    memcpy(nb + *n, tmp, (size_t)k);
    *n += (size_t)k;
    nb[*n] = '\0';
    *buf = nb;
    return true;
}

/* Runs the load tool with 'args' (NULL-terminated) and, if path_env is not NULL, PATH set to
 * it; waits (bounded) for both pipes to reach EOF and for the exit. */
static void run_tool(const char *const *args, const char *path_env, struct run *r)
{
    memset(r, 0, sizeof(*r));
    r->out = calloc(1, 1);
    r->err = calloc(1, 1);
    const char *argv[48];
    size_t n = 0;
    argv[n++] = load_bin();
    for (size_t i = 0; args[i] && n < 47; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    int po[2], pe[2];
    if (pipe2(po, O_CLOEXEC) != 0)
        return;
    if (pipe2(pe, O_CLOEXEC) != 0) {
        close(po[0]);
        close(po[1]);
        return;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(127);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(po[1], 1) < 0 || dup2(pe[1], 2) < 0)
            _exit(127);
        if (path_env)
            setenv("PATH", path_env, 1); /* the child's own copy of the environment */
        execv(argv[0], (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    if (pid < 0) {
        close(po[0]);
        close(pe[0]);
        return;
    }
    bool oo = true, eo = true;
    int64_t until = ctx_now() + bound(RUN_MS);
    while ((oo || eo) && ctx_now() < until) {
        struct pollfd p[2] = {{.fd = oo ? po[0] : -1, .events = POLLIN},
                              {.fd = eo ? pe[0] : -1, .events = POLLIN}};
        if (poll(p, 2, 200) <= 0)
            continue;
        if (p[0].revents && !append(po[0], &r->out, &r->out_n))
            oo = false;
        if (p[1].revents && !append(pe[0], &r->err, &r->err_n))
            eo = false;
    }
    close(po[0]);
    close(pe[0]);
    r->finished = !oo && !eo;
    if (!r->finished)
        kill(pid, SIGKILL);
    waitpid(pid, &r->status, 0);
}

static int exit_code(const struct run *r)
{
    return r->finished && WIFEXITED(r->status) ? WEXITSTATUS(r->status) : -1;
}

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    uint16_t port = 0;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &al) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static bool port_open(uint16_t port)
{
    int fd = srvtest_raw_connect(port);
    if (fd >= 0)
        close(fd);
    return fd >= 0;
}

/* The suite's fanout --demo. */
static struct {
    pid_t pid;      /* 0 when not running */
    uint16_t port;  /* where it listens */
    char url[64];   /* http://127.0.0.1:<port> */
} srv;

static bool srv_up(void *arg)
{
    (void)arg;
    int st;
    if (waitpid(srv.pid, &st, WNOHANG) == srv.pid) {
        srv.pid = 0;
        return true; /* it died: stop waiting */
    }
    return port_open(srv.port);
}

static int suite_init(void)
{
    const char *bin = env_or("FANOUT_BIN", "build/bin/fanout");
    for (int attempt = 0; attempt < 5; attempt++) {
        srv.port = free_port();
        char listen[32];
        snprintf(listen, sizeof(listen), "127.0.0.1:%u", srv.port);
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid == 0) {
            if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
                _exit(127);
            int devnull = open("/dev/null", O_RDWR);
            if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0)
                _exit(127);
            execl(bin, bin, "--demo", "--listen", listen, "--log-level", "error", (char *)NULL);
            _exit(127);
        }
        if (pid < 0)
            return -1;
        srv.pid = pid;
        if (test_wait_until(srv_up, NULL, bound(START_MS)) && srv.pid) {
            snprintf(srv.url, sizeof(srv.url), "http://127.0.0.1:%u", srv.port);
            return 0;
        }
        if (srv.pid) {
            kill(srv.pid, SIGKILL);
            waitpid(srv.pid, NULL, 0);
            srv.pid = 0;
        }
    }
    fprintf(stderr, "\n  %s --demo did not start (set FANOUT_BIN or run make)\n", bin);
    return -1;
}

static int suite_cleanup(void)
{
    if (srv.pid) {
        kill(srv.pid, SIGKILL);
        waitpid(srv.pid, NULL, 0);
        srv.pid = 0;
    }
    return 0;
}

static bool have_tool(void)
{
    if (access(load_bin(), X_OK) == 0)
        return true;
    fprintf(stderr, "\n  %s is not an executable (set FANOUT_LOAD_BIN or run make)\n",
            load_bin());
    CU_FAIL("fanout-load binary missing");
    return false;
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

/* Parses the JSON summary on stdout (NULL and a failed assertion if it is not JSON). */
static cJSON *summary(const struct run *r)
{
    cJSON *j = cJSON_Parse(r->out);
    if (!j)
        fprintf(stderr, "\n  not JSON on stdout: %s\n  stderr: %s\n", r->out, r->err);
    CU_ASSERT_PTR_NOT_NULL(j);
    return j;
}

/* ---------------------------------------------------------------- end to end */

static void test_loadtest_closed_loop_json(void)
{
    if (!have_tool())
        return;
    const char *args[] = {"-d", "1s", "-c", "4", "-t", "2", "-b", "5", "--json", "--no-progress",
                          srv.url, NULL};
    struct run r;
    run_tool(args, NULL, &r);
    CU_ASSERT_EQUAL(exit_code(&r), 0);
    cJSON *j = summary(&r);
    if (j) {
        double req = num(j, "requests"), ok = num(j, "ok");
        CU_ASSERT(req >= 1);
        CU_ASSERT_EQUAL(ok, req);
        CU_ASSERT_EQUAL(num(j, "attempts"), req);
        CU_ASSERT_EQUAL(num(j, "fetches"), 5 * ok);
        CU_ASSERT_EQUAL(num(j, "success_ratio"), 1);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(j, "status"), "200"), req);
        CU_ASSERT_EQUAL(num(j, "connections"), 4);
        CU_ASSERT_EQUAL(num(j, "threads"), 2);
        CU_ASSERT(num(j, "connects") >= 4);
        const cJSON *lat = cJSON_GetObjectItem(j, "latency_ms");
        CU_ASSERT(num(lat, "p50") > 0);
        CU_ASSERT(num(lat, "p50") <= num(lat, "p99"));
        CU_ASSERT(num(lat, "p99") <= num(lat, "p99_9"));
        CU_ASSERT(num(lat, "p99_9") <= num(lat, "max") * 1.01);
        CU_ASSERT_TRUE(cJSON_IsTrue(cJSON_GetObjectItem(j, "pass")));
        CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(j, "loop")->valuestring, "closed");
    }
    cJSON_Delete(j);
    run_free(&r);
}

static void test_loadtest_open_loop_json(void)
{
    if (!have_tool())
        return;
    /* 100/s for 2 s over two threads: 200 requests are due; each is sent or counted unsent. */
    const char *args[] = {"-r", "100", "-d", "2s", "-c", "8", "-t", "2", "--ids", "zipf", "-k",
                          "50", "--json", "--progress", srv.url, NULL};
    struct run r;
    run_tool(args, NULL, &r);
    cJSON *j = summary(&r);
    if (j) {
        double req = num(j, "requests"), sent = num(j, "sent");
        const cJSON *er = cJSON_GetObjectItem(j, "errors");
        CU_ASSERT_EQUAL(num(j, "attempts"), req + num(er, "connect") + num(er, "socket") +
                                                num(er, "timeout") + num(er, "protocol") +
                                                num(er, "unsent"));
        CU_ASSERT_EQUAL(sent + num(er, "unsent"), 200); /* exactly what the schedule holds */
        CU_ASSERT(req >= 100 && req <= 200);
        CU_ASSERT_EQUAL(num(j, "rate"), 100);
        CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(j, "loop")->valuestring, "open");
        CU_ASSERT_EQUAL(exit_code(&r), num(j, "ok") == num(j, "attempts") ? 0 : 1);
    }
    /* --progress: lines on stderr (not a terminal here), none on stdout. */
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "s/2.0s  "));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, " answers "));
    cJSON_Delete(j);
    run_free(&r);
}

static void test_loadtest_failing_ids_exit_1(void)
{
    if (!have_tool())
        return;
    /* Half the ids fail: most batches of 4 get 502 upstream_status (with the default seed the
     * ids are the same on every run, and the first batches hold failing ones). */
    const char *args[] = {"-d", "1s", "-c", "2", "-b", "4", "--fail-frac", "0.5",
                          "--min-success", "1", "--json", srv.url, NULL};
    struct run r;
    run_tool(args, NULL, &r);
    CU_ASSERT_EQUAL(exit_code(&r), 1);
    cJSON *j = summary(&r);
    if (j) {
        const cJSON *st = cJSON_GetObjectItem(j, "status");
        const cJSON *ec = cJSON_GetObjectItem(j, "error_codes");
        double n200 = num(st, "200"), n502 = num(st, "502");
        CU_ASSERT(n502 >= 1);
        CU_ASSERT_EQUAL(n200 < 0 ? 0 : n200, num(j, "ok"));
        CU_ASSERT_EQUAL((n200 < 0 ? 0 : n200) + n502, num(j, "requests"));
        CU_ASSERT_EQUAL(num(ec, "upstream_status"), n502);
        CU_ASSERT_EQUAL(cJSON_GetArraySize(ec), 1);
        CU_ASSERT_FALSE(cJSON_IsTrue(cJSON_GetObjectItem(j, "pass")));
        const cJSON *why = cJSON_GetObjectItem(j, "failed");
        CU_ASSERT(cJSON_IsString(why) && strstr(why->valuestring, "min-success"));
    }
    cJSON_Delete(j);
    run_free(&r);

    /* The table says the same, and --min-success 0 accepts it. */
    const char *args2[] = {"-d", "1s", "-c", "2", "-b", "4", "--fail-frac", "0.5",
                           "--min-success", "0", srv.url, NULL};
    run_tool(args2, NULL, &r);
    CU_ASSERT_EQUAL(exit_code(&r), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "upstream_status: "));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "502: "));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "p99.9"));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "PASS"));
    run_free(&r);
}

static void test_loadtest_latency_objective(void)
{
    if (!have_tool())
        return;
    /* Every id waits 30 ms at the demo: p99 cannot be under 5 ms. */
    const char *args[] = {"-d", "1s", "-c", "2", "-b", "1", "--slow-frac", "1", "--slow-ms",
                          "30", "--max-p99-ms", "5", "--json", srv.url, NULL};
    struct run r;
    run_tool(args, NULL, &r);
    CU_ASSERT_EQUAL(exit_code(&r), 1);
    cJSON *j = summary(&r);
    if (j) {
        CU_ASSERT_EQUAL(num(j, "success_ratio"), 1);
        CU_ASSERT(num(cJSON_GetObjectItem(j, "latency_ms"), "p50") >= 29);
        const cJSON *why = cJSON_GetObjectItem(j, "failed");
        CU_ASSERT(cJSON_IsString(why) && strstr(why->valuestring, "max-p99-ms"));
    }
    cJSON_Delete(j);
    run_free(&r);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    char *buf = calloc(1, 1 << 20);
    if (buf)
        fread(buf, 1, (1 << 20) - 1, f);
    fclose(f);
    return buf;
}

static void test_loadtest_csv_rows(void)
{
    if (!have_tool())
        return;
    char dir[] = "/tmp/fanout-load-test-XXXXXX", path[128];
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/rows.csv", dir);
    const char *args[] = {"-d", "2s", "-r", "50", "-c", "2", "--csv", path, "--json", srv.url,
                          NULL};
    struct run r;
    run_tool(args, NULL, &r);
    CU_ASSERT(exit_code(&r) == 0 || exit_code(&r) == 1);
    char *csv = slurp(path);
    CU_ASSERT_PTR_NOT_NULL(csv);
    if (csv) {
        CU_ASSERT(!strncmp(csv, "second,requests,ok,fetches,errors,", 34));
        int lines = count_lines(csv);
        CU_ASSERT(lines >= 2 && lines <= 5); /* a header and a row per second */
        /* Every row has 12 fields, and the rows add up to the summary's requests. */
        cJSON *j = summary(&r);
        long total = 0;
        char *save = NULL;
        strtok_r(csv, "\n", &save);
        for (char *l = strtok_r(NULL, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
            int commas = 0;
            for (char *p = l; *p; p++)
                commas += *p == ',';
            CU_ASSERT_EQUAL(commas, 11);
            total += strtol(strchr(l, ',') + 1, NULL, 10);
        }
        if (j)
            CU_ASSERT_EQUAL(total, (long)num(j, "requests"));
        cJSON_Delete(j);
    }
    free(csv);
    unlink(path);
    rmdir(dir);
    run_free(&r);
}

static bool have_gnuplot(void)
{
    const char *path = getenv("PATH");
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", path ? path : "");
    char *save = NULL;
    for (char *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        char p[4200];
        snprintf(p, sizeof(p), "%s/gnuplot", d);
        if (access(p, X_OK) == 0)
            return true;
    }
    return false;
}

static void test_loadtest_sweep(void)
{
    if (!have_tool())
        return;
    char dir[] = "/tmp/fanout-load-test-XXXXXX", prefix[128], path[160];
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    snprintf(prefix, sizeof(prefix), "%s/sw", dir);

    /* Without gnuplot on PATH: a clear error naming the package, before any load. */
    const char *args[] = {"-d", "500ms", "--sweep", "rate=20,40", "--sweep-out", prefix, srv.url,
                          NULL};
    struct run r;
    run_tool(args, "/nonexistent", &r);
    CU_ASSERT_EQUAL(exit_code(&r), 3);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "gnuplot-nox"));
    CU_ASSERT_EQUAL(count_lines(r.err), 1);
    run_free(&r);

    /* --no-plot: a CSV with a header and one row per step. */
    const char *args2[] = {"-d", "500ms", "--sweep", "conns=1,2,3", "--sweep-out", prefix,
                           "--no-plot", "--min-success", "0", srv.url, NULL};
    run_tool(args2, "/nonexistent", &r);
    CU_ASSERT_EQUAL(exit_code(&r), 0);
    snprintf(path, sizeof(path), "%s.csv", prefix);
    char *csv = slurp(path);
    CU_ASSERT(csv && count_lines(csv) == 4 && !strncmp(csv, "load,rate,connections,", 22));
    CU_ASSERT(csv && strstr(csv, "\n3,0,3,"));
    free(csv);
    run_free(&r);
    unlink(path);

    /* With gnuplot (when installed here): the PNG too. */
    if (have_gnuplot()) {
        const char *args3[] = {"-d", "500ms", "--sweep", "rate=20:60:20", "--sweep-out", prefix,
                               "--json", srv.url, NULL};
        run_tool(args3, NULL, &r);
        CU_ASSERT(exit_code(&r) == 0 || exit_code(&r) == 1);
        cJSON *j = summary(&r);
        CU_ASSERT(j && cJSON_GetArraySize(cJSON_GetObjectItem(j, "steps")) == 3);
        cJSON_Delete(j);
        snprintf(path, sizeof(path), "%s.png", prefix);
        char *png = slurp(path);
        CU_ASSERT(png && !memcmp(png, "\x89PNG", 4));
        free(png);
        unlink(path);
        snprintf(path, sizeof(path), "%s.csv", prefix);
        unlink(path);
        snprintf(path, sizeof(path), "%s.gp", prefix);
        unlink(path);
        run_free(&r);
    } else {
        fprintf(stderr, "\n  gnuplot not installed: the PNG part of the sweep test is skipped\n");
    }
    rmdir(dir);
}

static void test_loadtest_bad_flags_exit_2(void)
{
    if (!have_tool())
        return;
    static const char *const cases[][4] = {
        {"-b", "abc", NULL},         {"--batch", "9-3", NULL},     {"-c", "0", NULL},
        {"-c", "12x", NULL},         {"-t", "-1", NULL},           {"-r", "fast", NULL},
        {"-r", "0", NULL},           {"-d", "10x", NULL},          {"-d", "0s", NULL},
        {"-k", "", NULL},            {"--zipf-s", "nan", NULL},    {"--fail-frac", "2", NULL},
        {"--slow-ms", "1e3", NULL},  {"--timeout-ms", "-5", NULL}, {"--mode", "some", NULL},
        {"--ids", "random", NULL},   {"--seed", "x", NULL},        {"--min-success", "1.5", NULL},
        {"--max-p99-ms", "-1", NULL}, {"--sweep", "rate=", NULL},  {"--sweep", "conns=1.5", NULL},
        {"--bogus", NULL},           {"-x", NULL},                 {"-c", NULL},
        {"--prefix", "a b", NULL},   {"ftp://127.0.0.1:1", NULL},  {"https://127.0.0.1:1", NULL},
        {"http://127.0.0.1:99999", NULL},
        {"--fail-frac", "0.6", "--slow-frac", "0.6"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *args[6] = {NULL};
        for (size_t k = 0; k < 4 && cases[i][k]; k++)
            args[k] = cases[i][k];
        struct run r;
        run_tool(args, NULL, &r);
        bool ok = exit_code(&r) == 2 && r.out_n == 0 && count_lines(r.err) == 1 &&
                  !strncmp(r.err, "fanout-load: ", 13);
        if (!ok)
            fprintf(stderr, "\n  %s %s: exit %d, stderr '%s'\n", cases[i][0],
                    cases[i][1] ? cases[i][1] : "", exit_code(&r), r.err);
        CU_ASSERT(ok);
        run_free(&r);
    }
}

static void test_loadtest_help_exits_0(void)
{
    if (!have_tool())
        return;
    static const char *const flags[] = {"--help", "-h"};
    for (size_t i = 0; i < 2; i++) {
        const char *args[] = {flags[i], NULL};
        struct run r;
        run_tool(args, NULL, &r);
        CU_ASSERT_EQUAL(exit_code(&r), 0);
        CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "Usage: fanout-load"));
        CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "--rate"));
        CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "--max-p99-ms"));
        CU_ASSERT_EQUAL(r.err_n, 0);
        run_free(&r);
    }
}

static void test_loadtest_unreachable_target(void)
{
    if (!have_tool())
        return;
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u", free_port());
    const char *args[] = {"-d", "1s", url, NULL};
    struct run r;
    run_tool(args, NULL, &r);
    CU_ASSERT_EQUAL(exit_code(&r), 3);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "cannot connect to"));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "refused"));
    CU_ASSERT_EQUAL(count_lines(r.err), 1);
    CU_ASSERT_EQUAL(r.out_n, 0);
    run_free(&r);
    /* --wait retries, then says the same. */
    const char *args2[] = {"--wait", "300ms", "-d", "1s", url, NULL};
    run_tool(args2, NULL, &r);
    CU_ASSERT_EQUAL(exit_code(&r), 3);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "(after --wait)"));
    run_free(&r);
}

/* ---------------------------------------------------------------- canned server */

/* Answers every request on every connection with 'reply', one connection at a time; closes the
 * connection after each answer when 'close_after' is set. Runs on its own thread. */
struct canned {
    int lfd;              /* listening socket */
    int stop;             /* eventfd: the test asks the thread to end */
    uint16_t port;        /* where it listens */
    const char *reply;    /* bytes of each answer */
    bool close_after;     /* close after each answer */
    pthread_t th;         /* the thread */
};

/* Reads one request (head and Content-Length body) from fd; false at EOF, error or stop. */
static bool read_request(struct canned *c, int fd)
{
    char buf[65536];
    size_t n = 0;
    for (;;) {
        struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = c->stop, .events = POLLIN}};
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            return false;
        if (p[1].revents)
            return false;
        if (!p[0].revents)
            continue;
        ssize_t k = read(fd, buf + n, sizeof(buf) - 1 - n);
        if (k <= 0)
            return false;
        n += (size_t)k;
        buf[n] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        char *cl = strcasestr(buf, "content-length:");
        size_t want = (size_t)(end + 4 - buf) + (cl ? strtoul(cl + 15, NULL, 10) : 0);
        if (n >= want)
            return true;
    }
}

static void *canned_main(void *arg)
{
    struct canned *c = arg;
    for (;;) {
        struct pollfd p[2] = {{.fd = c->lfd, .events = POLLIN}, {.fd = c->stop, .events = POLLIN}};
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            return NULL;
        if (p[1].revents)
            return NULL;
        if (!p[0].revents)
            continue;
        int fd = accept4(c->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        while (read_request(c, fd)) {
            size_t len = strlen(c->reply), off = 0;
            while (off < len) {
                ssize_t k = send(fd, c->reply + off, len - off, MSG_NOSIGNAL);
                if (k <= 0)
                    break;
                off += (size_t)k;
            }
            if (c->close_after)
                break;
        }
        close(fd);
    }
}

static bool canned_start(struct canned *c, const char *reply, bool close_after)
{
    memset(c, 0, sizeof(*c));
    c->reply = reply;
    c->close_after = close_after;
    c->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    c->stop = eventfd(0, EFD_CLOEXEC);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    if (c->lfd < 0 || c->stop < 0 || bind(c->lfd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        listen(c->lfd, 16) != 0 || getsockname(c->lfd, (struct sockaddr *)&a, &al) != 0 ||
        pthread_create(&c->th, NULL, canned_main, c) != 0) {
        if (c->lfd >= 0)
            close(c->lfd);
        if (c->stop >= 0)
            close(c->stop);
        return false;
    }
    c->port = ntohs(a.sin_port);
    return true;
}

static void canned_stop(struct canned *c)
{
    uint64_t one = 1;
    if (write(c->stop, &one, sizeof(one)) != sizeof(one))
        return; /* cannot happen with an eventfd; the thread would then outlive the test */
    pthread_join(c->th, NULL);
    close(c->lfd);
    close(c->stop);
}

/* Runs the tool with -c 1 against a canned server; returns the JSON summary (or NULL). */
static cJSON *against_canned(const char *reply, bool close_after, const char *extra, int *code)
{
    struct canned c;
    *code = -1;
    if (!canned_start(&c, reply, close_after)) {
        CU_FAIL("canned server did not start");
        return NULL;
    }
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/v1/batch", c.port);
    const char *args[] = {"-d", "300ms", "-c", "1", "--json", extra, url, NULL};
    if (!extra) {
        args[5] = url;
        args[6] = NULL;
    }
    struct run r;
    run_tool(args, NULL, &r);
    canned_stop(&c);
    *code = exit_code(&r);
    cJSON *j = summary(&r);
    run_free(&r);
    return j;
}

static void test_loadtest_ndjson_answers(void)
{
    if (!have_tool())
        return;
    int code;
    /* A stream that ends with its done line succeeds. */
    cJSON *j = against_canned("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                              "Transfer-Encoding: chunked\r\n\r\n"
                              "1e\r\n{\"index\":0,\"id\":\"a\",\"data\":1}\n\r\n"
                              "e\r\n{\"done\":true}\n\r\n0\r\n\r\n",
                              false, "--ndjson", &code);
    CU_ASSERT_EQUAL(code, 0);
    if (j) {
        CU_ASSERT(num(j, "requests") >= 1);
        CU_ASSERT_EQUAL(num(j, "ok"), num(j, "requests"));
        CU_ASSERT_EQUAL(num(j, "connects"), 1); /* kept alive */
        const cJSON *en = cJSON_GetObjectItem(j, "entries");
        CU_ASSERT_EQUAL(num(en, "ok"), num(j, "requests"));
        CU_ASSERT_EQUAL(num(en, "failed"), 0);
        /* Time to the first line: measured for every answer, never after the whole answer. */
        const cJSON *fl = cJSON_GetObjectItem(j, "first_line_ms");
        CU_ASSERT(cJSON_IsObject(fl) && num(fl, "p50") >= 0);
        CU_ASSERT(num(fl, "max") <= num(cJSON_GetObjectItem(j, "latency_ms"), "max"));
    }
    cJSON_Delete(j);

    /* One that stops before it: a failure counted as stream_incomplete. */
    j = against_canned("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                       "Content-Length: 29\r\n\r\n{\"index\":0,\"id\":\"a\",\"data\":1}",
                       false, "--ndjson", &code);
    CU_ASSERT_EQUAL(code, 1);
    if (j) {
        CU_ASSERT_EQUAL(num(j, "ok"), 0);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(j, "error_codes"), "stream_incomplete"),
                        num(j, "requests"));
    }
    cJSON_Delete(j);

    /* A done line that carries an error counts that error's code. */
    j = against_canned("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                       "Content-Length: 57\r\n\r\n"
                       "{\"done\":true,\"error\":{\"code\":\"deadline_exceeded\",\"x\":1}}\n",
                       false, "--ndjson", &code);
    CU_ASSERT_EQUAL(code, 1);
    if (j)
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(j, "error_codes"), "deadline_exceeded"),
                        num(j, "requests"));
    cJSON_Delete(j);
}

static void test_loadtest_settled_entries(void)
{
    if (!have_tool())
        return;
    int code;
    /* mode settled: a 200 whose entries are counted one by one (two results, one error). */
    static const char body[] =
        "{\"results\":[{\"id\":\"a\",\"status\":200,\"data\":{\"error\":\"not ours\"}},"
        "{\"id\":\"fail-1\",\"error\":{\"code\":\"upstream_status\",\"message\":\"500\"}},"
        "{\"id\":7,\"status\":200,\"data\":\"x\"}]}";
    char reply[1024];
    snprintf(reply, sizeof(reply),
             "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    cJSON *j = against_canned(reply, false, "--mode=settled", &code);
    CU_ASSERT_EQUAL(code, 0); /* every answer is a 200 */
    if (j) {
        double req = num(j, "requests");
        const cJSON *en = cJSON_GetObjectItem(j, "entries");
        CU_ASSERT(req >= 1);
        CU_ASSERT_EQUAL(num(en, "ok"), 2 * req);
        CU_ASSERT_EQUAL(num(en, "failed"), req);
        CU_ASSERT_EQUAL(num(en, "unreadable_answers"), 0);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(en, "error_codes"), "upstream_status"), req);
    }
    cJSON_Delete(j);

    /* NDJSON entries: an error line is a failed entry; the done line is not an entry. */
    j = against_canned("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                       "Content-Length: 102\r\n\r\n"
                       "{\"index\":1,\"id\":\"b\",\"error\":{\"code\":\"deadline_exceeded\"}}\n"
                       "{\"index\":0,\"id\":\"a\",\"data\":1}\n{\"done\":true}\n",
                       false, "--ndjson", &code);
    CU_ASSERT_EQUAL(code, 0);
    if (j) {
        double req = num(j, "requests");
        const cJSON *en = cJSON_GetObjectItem(j, "entries");
        CU_ASSERT_EQUAL(num(en, "ok"), req);
        CU_ASSERT_EQUAL(num(en, "failed"), req);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(en, "error_codes"), "deadline_exceeded"), req);
    }
    cJSON_Delete(j);
}

static void test_loadtest_connection_close_and_errors(void)
{
    if (!have_tool())
        return;
    int code;
    /* Connection: close after each answer: every answer counts, on a new connection each. */
    cJSON *j = against_canned("HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                              "Content-Type: application/json\r\nContent-Length: 48\r\n\r\n"
                              "{\"error\":{\"code\":\"overloaded\",\"message\":\"busy\"}}",
                              true, NULL, &code);
    CU_ASSERT_EQUAL(code, 1);
    if (j) {
        double req = num(j, "requests");
        CU_ASSERT(req >= 1);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(j, "status"), "503"), req);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(j, "error_codes"), "overloaded"), req);
        CU_ASSERT(num(j, "connects") >= req);
        CU_ASSERT_EQUAL(num(cJSON_GetObjectItem(j, "errors"), "socket"), 0);
    }
    cJSON_Delete(j);

    /* Not HTTP at all: protocol errors, no answers. */
    j = against_canned("SSH-2.0-nope\r\n", true, NULL, &code);
    CU_ASSERT_EQUAL(code, 1);
    if (j) {
        CU_ASSERT_EQUAL(num(j, "requests"), 0);
        CU_ASSERT(num(cJSON_GetObjectItem(j, "errors"), "protocol") >= 1);
    }
    cJSON_Delete(j);
}

static CU_TestInfo loadtest_tests[] = {
    {"histogram buckets are exact, then log-linear", test_loadtest_hist_buckets},
    {"histogram quantiles within 1% and merge", test_loadtest_hist_quantiles},
    {"parser: lengths, chunks, close, pieces of any size", test_loadtest_http_lengths_and_chunks},
    {"parser: NDJSON last line and bad input", test_loadtest_http_ndjson_and_errors},
    {"mix: bodies are valid JSON with the asked mix", test_loadtest_mix_bodies},
    {"mix: Zipf skew, sequential stride, seeds repeat", test_loadtest_mix_distributions},
    {"closed loop --json against fanout --demo", test_loadtest_closed_loop_json},
    {"open loop --rate sends what the schedule holds", test_loadtest_open_loop_json},
    {"failing ids: exit 1, status and error-code counts", test_loadtest_failing_ids_exit_1},
    {"--max-p99-ms missed: exit 1", test_loadtest_latency_objective},
    {"--csv writes one row per second", test_loadtest_csv_rows},
    {"--sweep writes CSV (and PNG with gnuplot)", test_loadtest_sweep},
    {"bad flags: one line, exit 2", test_loadtest_bad_flags_exit_2},
    {"--help and -h exit 0", test_loadtest_help_exits_0},
    {"unreachable target: clear error, exit 3", test_loadtest_unreachable_target},
    {"NDJSON answers judged by their done line", test_loadtest_ndjson_answers},
    {"mode settled and NDJSON: entries counted", test_loadtest_settled_entries},
    {"Connection: close, error codes, non-HTTP", test_loadtest_connection_close_and_errors},
    CU_TEST_INFO_NULL,
};
TEST_SUITE_INIT(loadtest, loadtest_tests, suite_init, suite_cleanup)
