/* Operability tests: the real fanout binary as an operator meets it.
 *
 * Each server test spawns $FANOUT_BIN (build/bin/fanout by default; `make asan`/`make tsan` pass
 * their sanitized build, so a leak or a race makes the child exit non-zero and the exit-status
 * assertions fail) with --listen 127.0.0.1:<free port> in front of an upstream stub running in
 * this process (tests/upstub.h) or the built-in --demo upstream. Its stderr comes back through a
 * pipe, drained by one reader thread per child into a buffer the test searches and parses; the
 * test sends signals with kill() and reaps with a pidfd (poll with a bound) and waitpid().
 * Children are started with fork+exec and PR_SET_PDEATHSIG, so none outlives a crashed test.
 * HTTP goes through the tests' client (tests/srvtest.h) on the test thread: one exchange at a
 * time (a kept easy handle where a test needs the same connection), and a multi set for batches
 * that must stay in flight while the test does something else.
 *
 * Synchronization is by events the test can observe (a log line, the stub receiving a request, a
 * pidfd becoming readable), or where nothing else shows it (a server that logs nothing at
 * startup, a demo batch admitted, gauges settling) by a bounded poll with test_wait_until().
 * Times appear only as generous bounds, except the two the specification states: exit within
 * --drain-ms + 1 s after a drain deadline, and within 1 s of a second signal. */
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/version.h"
#include "tests/proc.h"
#include "tests/prom.h"
#include "tests/srvtest.h"
#include "tests/support.h"
#include "tests/upstub.h"

#define HTTP_TIMEOUT_MS test_ms(20000)

/* ---------------------------------------------------------------- HTTP (tests/srvtest.h) */

/* One exchange on 'e' (a kept-alive handle) or on a fresh connection (NULL): GET 'path', or
 * POST 'body' when not NULL, with extra header lines 'hdrs' (NULL-terminated or NULL). */
static void http(CURL *e, uint16_t port, const char *path, const char *body,
                 const char *const *hdrs, struct srvtest_resp *r)
{
    struct srvtest_call c = {.path = path, .body = body, .timeout_ms = HTTP_TIMEOUT_MS};
    for (size_t i = 0; hdrs && hdrs[i] && i + 1 < sizeof(c.headers) / sizeof(c.headers[0]); i++)
        c.headers[i] = hdrs[i];
    srvtest_call(e, port, &c, r);
}

/* Starts an exchange in 'g' that stays in flight while the test does something else: GET
 * 'path', or POST 'body'. Returns its index or -1. */
static int bg_add(struct srvtest_multi *g, uint16_t port, const char *path, const char *body)
{
    struct srvtest_call c = {.path = path, .body = body, .timeout_ms = HTTP_TIMEOUT_MS};
    return srvtest_multi_add(g, port, &c);
}

struct stub_seen {
    struct upstub *up;
    const char *target;
    size_t n;
};

static bool stub_saw(void *arg)
{
    const struct stub_seen *w = arg;
    return upstub_count(w->up, w->target) >= w->n;
}

/* Drives 'g' until the stub has logged 'n' requests for 'target' (e.g. "/items/sleep3000-a"). */
static bool bg_wait_stub(struct srvtest_multi *g, struct upstub *up, const char *target, size_t n,
                         int64_t ms)
{
    struct stub_seen w = {up, target, n};
    return srvtest_multi_wait(g, stub_saw, &w, ms);
}

/* Number of entries in "results" of a 200, or -1. */
static int result_count(const struct srvtest_resp *r)
{
    const cJSON *a = srvtest_results(r);
    return a ? cJSON_GetArraySize(a) : -1;
}

/* Sends SIGTERM and waits for a clean exit; true if it exited 0 in time. Prints the log if not. */
static bool stop_clean(struct proc *p)
{
    kill(p->pid, SIGTERM);
    bool ok = proc_wait_exit(p, WAIT_MS) && exited_with(p->status, 0);
    if (!ok) {
        char *log = proc_log(p);
        fprintf(stderr, "\n  unclean exit (status 0x%x):\n%s\n", p->status, log);
        free(log);
    }
    return ok;
}

/* Scrapes /metrics on 'e' (or a fresh connection) and parses it strictly. */
static bool scrape(CURL *e, uint16_t port, struct prom_scrape *sc, char **text)
{
    struct srvtest_resp r;
    http(e, port, "/metrics", NULL, NULL, &r);
    char err[512] = "";
    bool ok = r.rc == CURLE_OK && r.status == 200 && r.body &&
              prom_parse(r.body, r.len, "fanout_", sc, err, sizeof(err)) == 0;
    if (!ok)
        fprintf(stderr, "\n  scrape failed (rc %d, status %ld): %s\n%s\n", r.rc, r.status, err,
                r.body ? r.body : "");
    if (text) {
        *text = r.body;
        r.body = NULL;
    }
    srvtest_resp_free(&r);
    return ok;
}

/* ---------------------------------------------------------------- command line */

static void test_ops_version(void)
{
    if (!have_bin())
        return;
    struct run r;
    char *args[] = {"--version", NULL};
    CU_ASSERT_FATAL(run_fanout(args, NULL, &r));
    CU_ASSERT(r.finished && exited_with(r.status, 0));
    char want[64];
    snprintf(want, sizeof(want), "fanout %s", FANOUT_VERSION);
    CU_ASSERT(r.out && !strncmp(r.out, want, strlen(want)));
    CU_ASSERT(r.out && strchr(r.out, '\n') == r.out + r.out_len - 1); /* one line */
    CU_ASSERT_EQUAL(r.err_len, 0);
    run_free(&r);
    /* --version wins even over a bad environment or other flags. */
    char *env[] = {"FANOUT_LIMIT=abc", NULL};
    char *args2[] = {"--limit", "5", "--version", NULL};
    CU_ASSERT_FATAL(run_fanout(args2, env, &r));
    CU_ASSERT(exited_with(r.status, 0));
    CU_ASSERT(r.out && !strncmp(r.out, want, strlen(want)));
    run_free(&r);
}

/* The effective config as JSON from --check-config with 'args'/'env', or NULL. */
static cJSON *check_config(char *const *args, char *const *env, struct run *r)
{
    char *argv[40];
    size_t n = 0;
    argv[n++] = "--check-config";
    for (size_t i = 0; args && args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    if (!run_fanout(argv, env, r) || !exited_with(r->status, 0) || !r->out)
        return NULL;
    return cJSON_Parse(r->out);
}

static void test_ops_help_lists_every_flag(void)
{
    if (!have_bin())
        return;
    struct run rc, rh;
    char *demo[] = {"--demo", NULL};
    cJSON *cfg = check_config(demo, NULL, &rc);
    CU_ASSERT_FATAL(cfg != NULL);
    char *args[] = {"--help", NULL};
    CU_ASSERT_FATAL(run_fanout(args, NULL, &rh));
    CU_ASSERT(exited_with(rh.status, 0));
    CU_ASSERT_FATAL(rh.out != NULL);
    /* Every setting the effective config reports is a flag --help documents. */
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, cfg)
    {
        char flag[64] = "--";
        size_t k = 2;
        for (const char *s = it->string; *s && k < sizeof(flag) - 1; s++)
            flag[k++] = *s == '_' ? '-' : *s;
        flag[k] = '\0';
        char *hit = strstr(rh.out, flag);
        /* As a whole word: followed by a space or the end of the line. */
        bool whole = hit && (hit[k] == ' ' || hit[k] == '\n');
        CU_ASSERT(whole);
        if (!whole)
            fprintf(stderr, "\n  --help does not list %s\n", flag);
        n++;
    }
    CU_ASSERT(n >= 15);
    CU_ASSERT(strstr(rh.out, "--check-config") && strstr(rh.out, "--version") &&
              strstr(rh.out, "--help"));
    CU_ASSERT(strstr(rh.out, "FANOUT_") != NULL); /* the environment is explained */
    cJSON_Delete(cfg);
    run_free(&rc);
    run_free(&rh);
}

static void test_ops_invalid_config_exits_2(void)
{
    if (!have_bin())
        return;
    static const struct {
        const char *args[6]; /* NULL-terminated */
        const char *env;     /* one NAME=value or NULL */
        const char *names;   /* what the message must mention */
    } cases[] = {
        {{"--demo", "--bogus", NULL}, NULL, "--bogus"},
        {{"--demo", "--limit", "0", NULL}, NULL, "--limit"},
        {{"--demo", "--limit", "abc", NULL}, NULL, "--limit"},
        {{"--demo", "--limit", NULL}, NULL, "--limit"},
        {{"--demo", "--listen", "nonsense", NULL}, NULL, "--listen"},
        {{"--demo", "--listen", "127.0.0.1:99999", NULL}, NULL, "--listen"},
        {{"--demo", NULL}, "FANOUT_LIMIT=-3", "FANOUT_LIMIT"},
        {{"--demo", NULL}, "FANOUT_LIMIT=-3", "--limit"},
        {{"--upstream", "http://127.0.0.1:9/items/", NULL}, NULL, "--upstream"},
        {{"--upstream", "http://127.0.0.1:9/items/{id}/{id}", NULL}, NULL, "--upstream"},
        {{NULL}, NULL, "--upstream"},
        {{"--demo", "--timeout-ms", "40000", NULL}, NULL, "--timeout-ms"},
        {{"--demo", "--timeout-ms", "2000", "--max-timeout-ms", "1000", NULL},
         NULL,
         "--max-timeout-ms"},
        {{"--demo", "--log-level", "loud", NULL}, NULL, "--log-level"},
        {{"--demo", "--max-body", "12XB", NULL}, NULL, "--max-body"},
        {{"--demo", "--upstream-buffer", "1000", NULL}, NULL, "--upstream-buffer"},
        {{"--demo", "--upstream-buffer", "1MiB", NULL}, NULL, "--upstream-buffer"},
        {{"--demo", "positional", NULL}, NULL, "positional"},
        {{"--demo", NULL}, "FANOUT_DEMO=maybe", "FANOUT_DEMO"},
        /* An all-digit host that is no IPv4 address: refused before any bind or lookup. */
        {{"--demo", "--listen", "999.1.1.1:1", NULL}, NULL, "--listen"},
        {{"--demo", "--header-timeout-ms", "soon", NULL}, NULL, "--header-timeout-ms"},
        {{"--demo", "--body-timeout-ms", "-1", NULL}, NULL, "--body-timeout-ms"},
        {{"--demo", "--max-clients-per-ip", "x", NULL}, NULL, "--max-clients-per-ip"},
        {{"--demo", "--max-memory", "1000", NULL}, NULL, "--max-memory"},
        {{"--demo", "--max-memory", "1MiB", "--max-request-bytes", "2MiB", NULL},
         NULL,
         "--max-memory"},
        {{"--demo", "--linger-ms", "600000", NULL}, NULL, "--linger-ms"},
        {{"--demo", "--linger-bytes", "2GiB", NULL}, NULL, "--linger-bytes"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *args[8];
        size_t n = 0;
        for (; cases[i].args[n]; n++)
            args[n] = (char *)(uintptr_t)cases[i].args[n];
        args[n] = NULL;
        char envbuf[64];
        char *env[2] = {NULL, NULL};
        if (cases[i].env) {
            snprintf(envbuf, sizeof(envbuf), "%s", cases[i].env);
            env[0] = envbuf;
        }
        struct run r;
        CU_ASSERT_FATAL(run_fanout(args, env, &r));
        bool two = r.finished && exited_with(r.status, 2);
        bool one_line = r.err && r.err_len > 0 && strchr(r.err, '\n') == r.err + r.err_len - 1;
        bool named = r.err && strstr(r.err, cases[i].names);
        CU_ASSERT(two);
        CU_ASSERT(one_line);
        CU_ASSERT(named);
        CU_ASSERT_EQUAL(r.out_len, 0);
        if (!two || !one_line || !named)
            fprintf(stderr, "\n  case %zu (%s): status 0x%x, stderr: %s", i, cases[i].names,
                    r.status, r.err ? r.err : "(none)\n");
        /* --check-config refuses the same way, with the same line. */
        char *cargs[9] = {"--check-config"};
        memcpy(cargs + 1, args, (n + 1) * sizeof(args[0]));
        struct run rc;
        CU_ASSERT_FATAL(run_fanout(cargs, env, &rc));
        bool same = rc.finished && exited_with(rc.status, 2) && r.err && rc.err &&
                    !strcmp(r.err, rc.err);
        CU_ASSERT(rc.finished && exited_with(rc.status, 2));
        CU_ASSERT(r.err && rc.err && !strcmp(r.err, rc.err));
        if (!same)
            fprintf(stderr, "\n  case %zu --check-config: finished %d, status 0x%x, stderr: %s",
                    i, rc.finished, rc.status, rc.err ? rc.err : "(none)\n");
        run_free(&rc);
        run_free(&r);
    }
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

static const char *str(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static void test_ops_check_config_effective_values(void)
{
    if (!have_bin())
        return;
    struct run r;
    /* Flags beat the environment; the environment beats defaults; defaults fill the rest. */
    char *args[] = {"--upstream",      "http://127.0.0.1:9/items/{id}",
                    "--limit",         "7",
                    "--max-body=2MiB", "--log-level",
                    "debug",           NULL};
    char *env[] = {"FANOUT_LIMIT=5",         "FANOUT_MAX_BATCH=12",
                   "FANOUT_DEMO=1",          "FANOUT_LOG_LEVEL=error",
                   "FANOUT_LISTEN=127.0.0.1:0", "FANOUT_UPSTREAM_BUFFER=8KiB", NULL};
    cJSON *c = check_config(args, env, &r);
    CU_ASSERT_FATAL(c != NULL);
    CU_ASSERT(cJSON_IsObject(c));
    CU_ASSERT_EQUAL(num(c, "limit"), 7);
    CU_ASSERT_EQUAL(num(c, "max_batch"), 12);
    CU_ASSERT_EQUAL(num(c, "max_body"), 2 * 1048576);
    CU_ASSERT_EQUAL(num(c, "upstream_buffer"), 8192);
    CU_ASSERT_EQUAL(num(c, "timeout_ms"), 5000);
    CU_ASSERT_EQUAL(num(c, "max_timeout_ms"), 30000);
    CU_ASSERT_EQUAL(num(c, "drain_ms"), 10000);
    CU_ASSERT_STRING_EQUAL(str(c, "log_level"), "debug");
    CU_ASSERT_STRING_EQUAL(str(c, "listen"), "127.0.0.1:0");
    CU_ASSERT_STRING_EQUAL(str(c, "upstream"), "http://127.0.0.1:9/items/{id}");
    CU_ASSERT(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(c, "demo"))); /* --upstream won */
    CU_ASSERT(r.out && strchr(r.out, '\n') == r.out + r.out_len - 1);      /* one line */
    cJSON_Delete(c);
    run_free(&r);
    /* And --demo as a flag beats FANOUT_UPSTREAM. */
    char *args2[] = {"--demo", NULL};
    char *env2[] = {"FANOUT_UPSTREAM=http://127.0.0.1:9/x/{id}", NULL};
    c = check_config(args2, env2, &r);
    CU_ASSERT_FATAL(c != NULL);
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "demo")));
    CU_ASSERT_STRING_EQUAL(str(c, "upstream"), "");
    CU_ASSERT_EQUAL(num(c, "upstream_buffer"), 4096); /* the default */
    cJSON_Delete(c);
    run_free(&r);
}

/* ---------------------------------------------------------------- metrics */

struct metric_wait {
    uint16_t port;    /* server */
    const char *name; /* unlabelled metric */
    double want;      /* value to reach */
};

static bool metric_is(void *arg)
{
    const struct metric_wait *w = arg;
    struct prom_scrape sc;
    if (!scrape(NULL, w->port, &sc, NULL))
        return false;
    bool ok = prom_value(&sc, w->name, "", -1) == w->want;
    prom_free(&sc);
    return ok;
}

static bool metric_reached(void *arg)
{
    const struct metric_wait *w = arg;
    struct prom_scrape sc;
    if (!scrape(NULL, w->port, &sc, NULL))
        return false;
    bool ok = prom_value(&sc, w->name, "", -1) >= w->want;
    prom_free(&sc);
    return ok;
}

static void test_ops_metrics_exact_amounts(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--limit", "4", "--fetch-threads", "1", NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    CURL *k = curl_easy_init(); /* one connection: each exchange completes before the next */
    struct prom_scrape a, b;
    CU_ASSERT_FATAL(scrape(k, e.p.port, &a, NULL));
    struct upstub_stats s0, s1;
    upstub_stats(e.up, &s0);

    struct srvtest_resp r;
    /* 4 positions, 3 distinct ids (the number 7 and the string "7" are one URL). */
    http(k, e.p.port, "/v1/batch", "{\"ids\":[\"m-a\",\"m-b\",\"m-a\",7]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(result_count(&r), 4);
    srvtest_resp_free(&r);
    http(k, e.p.port, "/v1/batch", "{\"ids\":[\"fail-m\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    srvtest_resp_free(&r);
    http(k, e.p.port, "/v1/batch", "{\"ids\":[\"status404-m\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    srvtest_resp_free(&r);
    http(k, e.p.port, "/v1/batch", "{\"ids\":[\"sleep60000-m\"],\"timeout_ms\":100}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 504);
    srvtest_resp_free(&r);
    http(k, e.p.port, "/v1/batch", "{\"ids\":[1,}", NULL, &r); /* no fetch */
    CU_ASSERT_EQUAL(r.status, 400);
    srvtest_resp_free(&r);
    http(k, e.p.port, "/nope", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 404);
    srvtest_resp_free(&r);
    http(k, e.p.port, "/healthz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT_FATAL(scrape(k, e.p.port, &b, NULL));
    upstub_stats(e.up, &s1);

#define D(name, labels) (prom_value(&b, name, labels, 0) - prom_value(&a, name, labels, 0))
    /* By route: the batch, healthz, the first scrape (the second counts after it is sent). */
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"200\",route=\"batch\""), 1);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"200\",route=\"healthz\""), 1);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"200\",route=\"metrics\""), 1);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"502\",route=\"batch\""), 2);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"504\",route=\"batch\""), 1);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"400\",route=\"batch\""), 1);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"404\",route=\"other\""), 1);
    CU_ASSERT_EQUAL(D("fanout_requests_total", "code=\"503\",route=\"batch\""), 0);
    CU_ASSERT_EQUAL(D("fanout_request_duration_seconds_count", ""), 8);
    CU_ASSERT_EQUAL(D("fanout_request_duration_seconds_bucket", "le=\"+Inf\""), 8);
    CU_ASSERT(D("fanout_request_duration_seconds_sum", "") >= 0.1); /* the 504 took 100 ms */
    CU_ASSERT(D("fanout_request_duration_seconds_bucket", "le=\"0.05\"") <= 7);
    CU_ASSERT_EQUAL(D("fanout_fetches_total", "result=\"ok\""), 3);
    CU_ASSERT_EQUAL(D("fanout_fetches_total", "result=\"upstream_status\""), 2);
    CU_ASSERT_EQUAL(D("fanout_fetches_total", "result=\"deadline\""), 1);
    CU_ASSERT_EQUAL(D("fanout_fetches_total", "result=\"unreachable\""), 0);
    CU_ASSERT_EQUAL(D("fanout_fetches_total", "result=\"canceled\""), 0);
    CU_ASSERT_EQUAL(D("fanout_fetches_total", "result=\"too_large\""), 0);
    CU_ASSERT_EQUAL(D("fanout_fetch_duration_seconds_count", ""), 6);
    CU_ASSERT(D("fanout_fetch_duration_seconds_sum", "") >= 0.09);
    CU_ASSERT_EQUAL(D("fanout_admission_rejections_total", ""), 0);
    /* Exactly the connections the stub accepted. */
    CU_ASSERT_EQUAL(D("fanout_upstream_connections_opened_total", ""),
                    (double)(s1.accepted - s0.accepted));
    CU_ASSERT(s1.accepted > s0.accepted);
    CU_ASSERT_EQUAL(s1.requests - s0.requests, 6);
    CU_ASSERT_EQUAL(prom_value(&b, "fanout_requests_in_flight", "", -1), 0);
    CU_ASSERT_EQUAL(prom_value(&b, "fanout_fetches_in_flight", "", -1), 0);
    CU_ASSERT_EQUAL(prom_value(&a, "fanout_process_start_time_seconds", "", -1),
                    prom_value(&b, "fanout_process_start_time_seconds", "", -2));
#undef D
    prom_free(&a);
    prom_free(&b);
    curl_easy_cleanup(k);
    CU_ASSERT(stop_clean(&e.p));
    env_free(&e);
}

static void test_ops_metrics_admission_rejections(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--max-requests", "1", NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    int slow = bg_add(&g, e.p.port, "/v1/batch", "{\"ids\":[\"sleep2000-adm\"]}");
    CU_ASSERT_FATAL(bg_wait_stub(&g, e.up, "/items/sleep2000-adm", 1, WAIT_MS));
    CURL *k = curl_easy_init(); /* one connection: each exchange completes before the next */
    struct prom_scrape a, b;
    CU_ASSERT_FATAL(scrape(k, e.p.port, &a, NULL));
    CU_ASSERT_EQUAL(prom_value(&a, "fanout_requests_in_flight", "", -1), 1);
    CU_ASSERT_EQUAL(prom_value(&a, "fanout_fetches_in_flight", "", -1), 1);
    struct srvtest_resp r;
    http(k, e.p.port, "/v1/batch", "{\"ids\":[\"x\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&r), "overloaded");
    srvtest_resp_free(&r);
    CU_ASSERT_FATAL(scrape(k, e.p.port, &b, NULL));
    CU_ASSERT_EQUAL(prom_value(&b, "fanout_admission_rejections_total", "", -1) -
                        prom_value(&a, "fanout_admission_rejections_total", "", -1),
                    1);
    CU_ASSERT_EQUAL(prom_value(&b, "fanout_requests_total", "code=\"503\",route=\"batch\"", -1), 1);
    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, WAIT_MS));
    CU_ASSERT_EQUAL(g.resp[slow].status, 200);
    prom_free(&a);
    prom_free(&b);
    srvtest_multi_free(&g);
    curl_easy_cleanup(k);
    CU_ASSERT(stop_clean(&e.p));
    env_free(&e);
}

static bool stub_idle(void *arg)
{
    struct upstub_stats st;
    upstub_stats(arg, &st);
    return st.open == 0;
}

/* Path of an executable named 'name' on $PATH, or false. */
static bool find_on_path(const char *name, char *out, size_t size)
{
    const char *path = getenv("PATH");
    if (!path)
        return false;
    while (*path) {
        size_t n = strcspn(path, ":");
        snprintf(out, size, "%.*s/%s", (int)n, path, name);
        if (n && access(out, X_OK) == 0)
            return true;
        path += n + (path[n] == ':');
    }
    return false;
}

/* Runs `promtool check metrics` on 'text'. Returns 1 pass, 0 fail (printed), -1 not run. */
static int promtool_check(const char *text)
{
    char tool[512];
    if (!find_on_path("promtool", tool, sizeof(tool)))
        return -1;
    char path[] = "/tmp/fanout-metrics-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        return 0;
    size_t len = strlen(text);
    bool wrote = write(fd, text, len) == (ssize_t)len && lseek(fd, 0, SEEK_SET) == 0;
    unlink(path);
    if (!wrote) {
        close(fd);
        return 0;
    }
    char *argv[] = {tool, "check", "metrics", NULL};
    struct run r;
    bool ran = run_capture(argv, NULL, fd, &r);
    close(fd);
    if (!ran)
        return 0;
    bool ok = r.finished && exited_with(r.status, 0);
    if (!ok)
        fprintf(stderr, "\n  promtool check metrics failed (status 0x%x):\n%s%s\n", r.status,
                r.out ? r.out : "", r.err ? r.err : "");
    run_free(&r);
    return ok;
}

/* A scrape taken while batches of every outcome run: promtool and the strict parser accept it,
 * and it shows the work in flight. */
static void test_ops_metrics_under_load(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--limit", "8", NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    /* 8 batches that hold their fetches in the stub while the scrape happens. */
    char holds[8][64];
    for (int i = 0; i < 8; i++) {
        snprintf(holds[i], sizeof(holds[i]), "{\"ids\":[\"sleep3000-h%d\",\"q%d\"]}", i, i);
        bg_add(&g, e.p.port, "/v1/batch", holds[i]);
    }
    for (int i = 0; i < 8; i++) {
        char t[64];
        snprintf(t, sizeof(t), "/items/sleep3000-h%d", i);
        CU_ASSERT(bg_wait_stub(&g, e.up, t, 1, WAIT_MS));
    }
    /* A stream of short batches with mixed outcomes around the scrape (ids differ from batch
     * to batch, so none of them shares a fetch with another: each outcome is counted). */
    static const char *const mix[] = {"{\"ids\":[\"a%d\",\"b\",\"c\",\"a%d\",1,2,3]}",
                                      "{\"ids\":[\"fail-l%d\",\"sleep200-l%d\"]}",
                                      "{\"ids\":[\"sleep1000-t%d\"],\"timeout_ms\":50}",
                                      "{\"ids\":[\"big2000000-%d\"]}",
                                      "{\"ids\":[]}",
                                      "{\"bad\":",
                                      "{\"ids\":[\"status503-l%d\",\"d%d\"]}"};
    static char mixed[21][96];
    for (int i = 0; i < 21; i++) {
        snprintf(mixed[i], sizeof(mixed[i]), mix[i % 7], i, i);
        CU_ASSERT(bg_add(&g, e.p.port, "/v1/batch", mixed[i]) >= 0);
    }
    for (int i = 0; i < 5; i++)
        srvtest_multi_pump(&g, 10);
    int sidx = bg_add(&g, e.p.port, "/metrics", NULL);
    CU_ASSERT_FATAL(sidx >= 0);
    while (!g.done[sidx] && srvtest_multi_pending(&g) > 0)
        srvtest_multi_pump(&g, 50);
    CU_ASSERT_FATAL(g.done[sidx]);
    CU_ASSERT_EQUAL(g.resp[sidx].status, 200);
    char *text = strdup(g.resp[sidx].body ? g.resp[sidx].body : "");
    CU_ASSERT_FATAL(text != NULL);
    struct prom_scrape sc;
    char err[512] = "";
    int prc = prom_parse(text, strlen(text), "fanout_", &sc, err, sizeof(err));
    CU_ASSERT_EQUAL(prc, 0);
    if (prc != 0)
        fprintf(stderr, "\n  scrape under load rejected: %s\n%s\n", err, text);
    /* The holding batches are in flight, and their fetches too. */
    CU_ASSERT(prom_value(&sc, "fanout_requests_in_flight", "", -1) >= 8);
    CU_ASSERT(prom_value(&sc, "fanout_fetches_in_flight", "", -1) >= 8);
    prom_free(&sc);

    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, WAIT_MS));
    int s200 = 0;
    for (int i = 0; i < g.n; i++)
        s200 += g.resp[i].status == 200;
    CU_ASSERT(s200 >= 8 + 6); /* holds, a/b/c x3, the empty batch x3 */

    /* Afterwards everything settles: the gauges fall back to 0 once the last requests are
     * complete on the server's side (just after their responses went out). */
    struct metric_wait idle = {.port = e.p.port, .name = "fanout_requests_in_flight", .want = 0};
    CU_ASSERT(test_wait_until(metric_is, &idle, WAIT_MS));
    CU_ASSERT_FATAL(scrape(NULL, e.p.port, &sc, NULL));
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_in_flight", "", -1), 0);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_fetches_in_flight", "", -1), 0);
    CU_ASSERT(prom_value(&sc, "fanout_fetches_total", "result=\"too_large\"", -1) >= 3);
    CU_ASSERT(prom_value(&sc, "fanout_fetches_total", "result=\"deadline\"", -1) >= 3);
    prom_free(&sc);
    srvtest_multi_free(&g);
    CU_ASSERT(stop_clean(&e.p));
    /* promtool runs on the scrape taken under load, but only now that the server is gone and
     * the stub has no connection left: a child spawned while the stub's sockets are open holds
     * them for a moment (between fork and exec), and upstub frees a connection on close()
     * without EPOLL_CTL_DEL, which that moment turns into a use after free. */
    CU_ASSERT(test_wait_until(stub_idle, e.up, WAIT_MS));
    int pt = promtool_check(text);
    const char *skip = getenv("FANOUT_SKIP_PROMTOOL");
    if (pt < 0 && !(skip && !strcmp(skip, "1"))) {
        fprintf(stderr, "\n  *** promtool not found on PATH: install it (Debian: apt-get install "
                        "prometheus) or set FANOUT_SKIP_PROMTOOL=1 to skip this check ***\n");
        CU_FAIL("promtool missing (FANOUT_SKIP_PROMTOOL=1 to skip)");
    } else if (pt < 0) {
        fprintf(stderr, "\n  promtool check skipped (FANOUT_SKIP_PROMTOOL=1) ");
    } else {
        CU_ASSERT_EQUAL(pt, 1);
    }
    free(text);
    env_free(&e);
}

/* ---------------------------------------------------------------- probes and signals */

static void test_ops_probes_and_sighup(void)
{
    if (!have_bin())
        return;
    struct env e;
    CU_ASSERT_FATAL(env_start(&e, NULL, NULL));
    struct srvtest_resp r;
    http(NULL, e.p.port, "/healthz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    http(NULL, e.p.port, "/readyz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    /* SIGHUP changes nothing. */
    kill(e.p.pid, SIGHUP);
    http(NULL, e.p.port, "/readyz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":[\"h\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    CU_ASSERT(!proc_wait_exit(&e.p, 0)); /* still running */
    CU_ASSERT(stop_clean(&e.p));
    env_free(&e);
}

/* A second server on a port in use fails to start (exit 1, a reason on stderr) instead of
 * sharing the port (no SO_REUSEPORT). */
static void test_ops_port_in_use_exits_1(void)
{
    if (!have_bin())
        return;
    struct env e;
    CU_ASSERT_FATAL(env_start(&e, NULL, NULL));
    struct proc p2;
    char *args[] = {"--demo", NULL};
    CU_ASSERT_FATAL(proc_spawn(&p2, e.p.port, args, NULL, true));
    CU_ASSERT(proc_wait_exit(&p2, WAIT_MS) && exited_with(p2.status, 1));
    char *log = proc_log(&p2);
    CU_ASSERT(log && strstr(log, "cannot listen"));
    /* The real reason and the real port, not libmicrohttpd's "port 0" or a guess. */
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%u: Address already in use", e.p.port);
    CU_ASSERT(log && strstr(log, want));
    if (log && !strstr(log, want))
        fprintf(stderr, "\n  want \"%s\" in: %s\n", want, log);
    free(log);
    proc_free(&p2);
    CU_ASSERT(stop_clean(&e.p));
    env_free(&e);
}

/* SIGTERM while a batch runs: readyz turns 503 on a kept-alive connection, new connections are
 * refused, the batch completes 200, and the process exits 0. */
static void test_ops_sigterm_drains(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--drain-ms", "15000", NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    CURL *k = curl_easy_init(), *k2 = curl_easy_init();
    struct srvtest_resp r;
    http(k, e.p.port, "/readyz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(r.connects, 1);
    srvtest_resp_free(&r);
    http(k2, e.p.port, "/healthz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    int b = bg_add(&g, e.p.port, "/v1/batch", "{\"ids\":[\"sleep3000-d\",\"d1\",\"d2\"]}");
    CU_ASSERT_FATAL(bg_wait_stub(&g, e.up, "/items/sleep3000-d", 1, WAIT_MS));

    CU_ASSERT_FATAL(kill(e.p.pid, SIGTERM) == 0);
    /* readyz on the same connection: 200 until the signal is handled, then 503. */
    long last = 0;
    bool reused = true;
    int64_t until = ctx_now() + WAIT_MS;
    while (ctx_now() < until) {
        http(k, e.p.port, "/readyz", NULL, NULL, &r);
        last = r.status;
        reused &= r.rc == CURLE_OK && r.connects == 0;
        srvtest_resp_free(&r);
        if (last != 200)
            break;
    }
    CU_ASSERT_EQUAL(last, 503);
    CU_ASSERT(reused);
    CU_ASSERT(proc_wait_text(&e.p, "\"msg\":\"draining\"", WAIT_MS));
    /* The process is alive: /healthz stays 200 (on a connection opened before the signal). */
    http(k2, e.p.port, "/healthz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(r.connects, 0);
    srvtest_resp_free(&r);
    /* A new connection is refused while the batch is still in flight. */
    http(NULL, e.p.port, "/healthz", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.rc, CURLE_COULDNT_CONNECT);
    srvtest_resp_free(&r);
    struct upstub_stats st;
    upstub_stats(e.up, &st);
    CU_ASSERT_EQUAL(st.in_flight, 1); /* the slow fetch has not been answered yet */
    CU_ASSERT(!g.done[b]);
    /* The batch completes normally. */
    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, WAIT_MS));
    CU_ASSERT_EQUAL(g.resp[b].rc, CURLE_OK);
    CU_ASSERT_EQUAL(g.resp[b].status, 200);
    CU_ASSERT_EQUAL(result_count(&g.resp[b]), 3);
    CU_ASSERT(proc_wait_exit(&e.p, WAIT_MS));
    CU_ASSERT(exited_with(e.p.status, 0));
    char *log = proc_log(&e.p);
    CU_ASSERT(strstr(log, "\"msg\":\"drained\",\"canceled\":0") != NULL);
    CU_ASSERT(strstr(log, "\"msg\":\"stopped\"") != NULL);
    if (!exited_with(e.p.status, 0))
        fprintf(stderr, "\n  status 0x%x, log:\n%s\n", e.p.status, log);
    free(log);
    srvtest_multi_free(&g);
    curl_easy_cleanup(k);
    curl_easy_cleanup(k2);
    env_free(&e);
}

static bool stub_canceled(void *arg)
{
    struct upstub_stats st;
    upstub_stats(arg, &st);
    return st.canceled >= 1;
}

/* A batch longer than --drain-ms is canceled and answered 503; exit 0 within drain + 1 s. */
static void test_ops_drain_deadline(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--drain-ms", "300", "--timeout-ms", "30000", NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    int b = bg_add(&g, e.p.port, "/v1/batch", "{\"ids\":[\"sleep20000-x\",\"x1\"]}");
    CU_ASSERT_FATAL(bg_wait_stub(&g, e.up, "/items/sleep20000-x", 1, WAIT_MS));
    int64_t t0 = ctx_now();
    CU_ASSERT_FATAL(kill(e.p.pid, SIGTERM) == 0);
    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, WAIT_MS));
    int64_t answered = ctx_now() - t0;
    CU_ASSERT_EQUAL(g.resp[b].status, 503);
    CU_ASSERT_STRING_EQUAL(srvtest_err_code(&g.resp[b]), "overloaded");
    CU_ASSERT(answered >= 290); /* not before the grace period */
    CU_ASSERT(proc_wait_exit(&e.p, test_ms(5000)));
    int64_t exited = e.p.exit_ms - t0;
    CU_ASSERT(exited_with(e.p.status, 0));
    CU_ASSERT(exited <= 300 + test_ms(1000)); /* the batch alone would take 20 s */
    if (exited > 300 + test_ms(1000) || !exited_with(e.p.status, 0))
        fprintf(stderr, "\n  exit after %lld ms, status 0x%x\n", (long long)exited, e.p.status);
    char *log = proc_log(&e.p);
    CU_ASSERT(strstr(log, "drain deadline passed") != NULL);
    CU_ASSERT(strstr(log, "\"msg\":\"drained\",\"canceled\":1") != NULL);
    free(log);
    /* The stub saw fanout abandon the upstream fetch. */
    CU_ASSERT(test_wait_until(stub_canceled, e.up, WAIT_MS));
    srvtest_multi_free(&g);
    env_free(&e);
}

/* A second signal during the drain exits at once. */
static void test_ops_second_signal(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--drain-ms", "60000", "--timeout-ms", "60000", "--max-timeout-ms",
                    "60000",      NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    bg_add(&g, e.p.port, "/v1/batch", "{\"ids\":[\"sleep30000-s\"]}");
    CU_ASSERT_FATAL(bg_wait_stub(&g, e.up, "/items/sleep30000-s", 1, WAIT_MS));
    CU_ASSERT_FATAL(kill(e.p.pid, SIGINT) == 0);
    CU_ASSERT_FATAL(proc_wait_text(&e.p, "\"msg\":\"draining\"", WAIT_MS));
    CU_ASSERT(!proc_wait_exit(&e.p, 0)); /* draining, waiting for the batch */
    int64_t t0 = ctx_now();
    CU_ASSERT_FATAL(kill(e.p.pid, SIGTERM) == 0);
    CU_ASSERT(proc_wait_exit(&e.p, test_ms(2000)));
    CU_ASSERT(e.p.exit_ms - t0 <= test_ms(1000)); /* the drain alone would take 30 s */
    CU_ASSERT(exited_with(e.p.status, 1));
    CU_ASSERT(proc_wait_text(&e.p, "second signal", test_ms(1000)));
    srvtest_multi_wait(&g, NULL, NULL, WAIT_MS); /* the client sees the connection close */
    srvtest_multi_free(&g);
    env_free(&e);
}

/* ---------------------------------------------------------------- logs */

/* Every stderr line parsed; returns the number of lines, or -1 if one is not a JSON object
 * with time, level and msg (printed). Fills lines[] (cJSON objects, caller deletes). */
static int parse_log(const char *log, cJSON **lines, int max)
{
    int n = 0;
    for (const char *p = log; *p;) {
        const char *nl = strchr(p, '\n');
        if (!nl) {
            fprintf(stderr, "\n  unterminated log line: %s\n", p);
            return -1;
        }
        cJSON *j = cJSON_ParseWithLength(p, (size_t)(nl - p));
        const char *t = str(j, "time"), *lvl = str(j, "level");
        bool time_ok =
            strlen(t) == 24 && t[4] == '-' && t[10] == 'T' && t[19] == '.' && t[23] == 'Z';
        bool lvl_ok = !strcmp(lvl, "error") || !strcmp(lvl, "warn") || !strcmp(lvl, "info") ||
                      !strcmp(lvl, "debug");
        if (!cJSON_IsObject(j) || !time_ok || !lvl_ok || !*str(j, "msg") || n == max) {
            fprintf(stderr, "\n  bad log line: %.*s\n", (int)(nl - p), p);
            cJSON_Delete(j);
            return -1;
        }
        lines[n++] = j;
        p = nl + 1;
    }
    return n;
}

static const cJSON *find_line(cJSON **lines, int n, const char *msg, const char *request_id)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(str(lines[i], "msg"), msg) &&
            (!request_id || !strcmp(str(lines[i], "request_id"), request_id)))
            return lines[i];
    return NULL;
}

static int line_index(cJSON **lines, int n, const char *msg)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(str(lines[i], "msg"), msg))
            return i;
    return -1;
}

static void test_ops_logs_are_json_lines(void)
{
    if (!have_bin())
        return;
    struct env e;
    char *args[] = {"--log-level", "debug", "--http-threads", "2", "--fetch-threads", "2", NULL};
    CU_ASSERT_FATAL(env_start(&e, args, NULL));
    struct srvtest_resp r;
    const char *h1[] = {"X-Request-Id: ops-log-ok", NULL};
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":[\"la\",\"lb\",\"la\"]}", h1, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.request_id, "ops-log-ok");
    srvtest_resp_free(&r);
    const char *h2[] = {"X-Request-Id: ops-log-fail", NULL};
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":[\"lok\",\"fail-7\"]}", h2, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    srvtest_resp_free(&r);
    const char *h3[] = {"X-Request-Id: ops-log-bad", NULL};
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":", h3, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    srvtest_resp_free(&r);
    const char *h4[] = {"X-Request-Id: ops-log-probe", NULL};
    http(NULL, e.p.port, "/healthz", NULL, h4, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":[\"gen\"]}", NULL, &r); /* generated id */
    CU_ASSERT_EQUAL(r.status, 200);
    char generated[256];
    snprintf(generated, sizeof(generated), "%s", r.request_id);
    CU_ASSERT(strlen(generated) > 0);
    srvtest_resp_free(&r);
    CU_ASSERT_FATAL(stop_clean(&e.p));

    char *log = proc_log(&e.p);
    cJSON *lines[256];
    int n = parse_log(log, lines, 256);
    CU_ASSERT_FATAL(n > 0);
    /* Startup: version, threads, the effective config. */
    const cJSON *st = find_line(lines, n, "starting", NULL);
    CU_ASSERT_FATAL(st != NULL);
    CU_ASSERT_STRING_EQUAL(str(st, "level"), "info");
    CU_ASSERT_STRING_EQUAL(str(st, "version"), FANOUT_VERSION);
    CU_ASSERT_EQUAL(num(st, "http_threads"), 2);
    CU_ASSERT_EQUAL(num(st, "fetch_threads"), 2);
    CU_ASSERT_EQUAL(num(st, "port"), e.p.port);
    CU_ASSERT_EQUAL(num(st, "pid"), e.p.pid);
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(st, "config");
    CU_ASSERT(cJSON_IsObject(cfg));
    CU_ASSERT_STRING_EQUAL(str(cfg, "log_level"), "debug");
    CU_ASSERT_STRING_EQUAL(str(cfg, "upstream"), e.upstream);
    CU_ASSERT_EQUAL(line_index(lines, n, "starting"), 0);
    /* One line per request with its fields. */
    const cJSON *ok = find_line(lines, n, "request", "ops-log-ok");
    CU_ASSERT_FATAL(ok != NULL);
    CU_ASSERT_STRING_EQUAL(str(ok, "level"), "info");
    CU_ASSERT_STRING_EQUAL(str(ok, "method"), "POST");
    CU_ASSERT_STRING_EQUAL(str(ok, "path"), "/v1/batch");
    CU_ASSERT_EQUAL(num(ok, "status"), 200);
    CU_ASSERT_EQUAL(num(ok, "ids"), 3);
    CU_ASSERT(num(ok, "duration_ms") >= 0);
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(ok, "error"));
    CU_ASSERT_PTR_NULL(cJSON_GetObjectItemCaseSensitive(ok, "failed_id"));
    const cJSON *bad = find_line(lines, n, "request", "ops-log-fail");
    CU_ASSERT_FATAL(bad != NULL);
    CU_ASSERT_STRING_EQUAL(str(bad, "level"), "warn");
    CU_ASSERT_EQUAL(num(bad, "status"), 502);
    CU_ASSERT_EQUAL(num(bad, "ids"), 2);
    CU_ASSERT_STRING_EQUAL(str(bad, "error"), "upstream_status");
    CU_ASSERT_STRING_EQUAL(str(bad, "failed_id"), "fail-7");
    const cJSON *b400 = find_line(lines, n, "request", "ops-log-bad");
    CU_ASSERT_FATAL(b400 != NULL);
    CU_ASSERT_EQUAL(num(b400, "status"), 400);
    CU_ASSERT_STRING_EQUAL(str(b400, "error"), "bad_request");
    const cJSON *pr = find_line(lines, n, "request", "ops-log-probe");
    CU_ASSERT_FATAL(pr != NULL);
    CU_ASSERT_STRING_EQUAL(str(pr, "level"), "debug");
    CU_ASSERT_STRING_EQUAL(str(pr, "method"), "GET");
    CU_ASSERT_STRING_EQUAL(str(pr, "path"), "/healthz");
    CU_ASSERT_PTR_NOT_NULL(find_line(lines, n, "request", generated));
    int requests = 0;
    for (int i = 0; i < n; i++)
        requests += !strcmp(str(lines[i], "msg"), "request");
    CU_ASSERT_EQUAL(requests, 5);
    /* Shutdown, in order, after the requests. */
    int dr = line_index(lines, n, "draining"), dd = line_index(lines, n, "drained"),
        sp = line_index(lines, n, "stopped");
    CU_ASSERT(dr > 0 && dd > dr && sp > dd && sp == n - 1);
    CU_ASSERT_EQUAL(num(lines[sp], "requests"), 5);
    for (int i = 0; i < n; i++)
        cJSON_Delete(lines[i]);
    free(log);
    env_free(&e);
}

static void test_ops_log_level_warn(void)
{
    if (!have_bin())
        return;
    struct env e;
    memset(&e, 0, sizeof(e));
    CU_ASSERT_FATAL(upstub_new(1, &e.up) == 0);
    upstub_url(e.up, e.upstream, sizeof(e.upstream), "/items/{id}");
    char *env[] = {"FANOUT_LOG_LEVEL=warn", NULL};
    char *args[] = {"--upstream", e.upstream, NULL};
    CU_ASSERT_FATAL(server_start_opt(&e.p, args, env, true, true));
    struct srvtest_resp r;
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":[\"w1\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    http(NULL, e.p.port, "/v1/batch", "{\"ids\":[\"fail-w\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    srvtest_resp_free(&r);
    CU_ASSERT_FATAL(stop_clean(&e.p));
    char *log = proc_log(&e.p);
    cJSON *lines[64];
    int n = parse_log(log, lines, 64);
    CU_ASSERT_EQUAL(n, 1); /* only the 502 */
    if (n != 1)
        fprintf(stderr, "\n  log:\n%s\n", log);
    for (int i = 0; i < n; i++) {
        CU_ASSERT_STRING_EQUAL(str(lines[i], "level"), "warn");
        CU_ASSERT_EQUAL(num(lines[i], "status"), 502);
        cJSON_Delete(lines[i]);
    }
    free(log);
    env_free(&e);
}

static bool pipe_nearly_full(void *arg)
{
    int queued = 0;
    return ioctl(*(int *)arg, FIONREAD, &queued) == 0 && queued >= 32768;
}

/* Nobody reads stderr: once the pipe is full the log writer is stuck, and requests must still be
 * answered (logging only copies into the writer's ring); at shutdown the writer gives up on the
 * stuck pipe and the process still exits 0. */
static void test_ops_stuck_stderr_never_blocks(void)
{
    if (!have_bin())
        return;
    struct env e;
    memset(&e, 0, sizeof(e));
    CU_ASSERT_FATAL(upstub_new(1, &e.up) == 0);
    upstub_url(e.up, e.upstream, sizeof(e.upstream), "/items/{id}");
    char *args[] = {"--upstream", e.upstream, "--log-level", "debug", "--drain-ms", "1000", NULL};
    CU_ASSERT_FATAL(server_start_opt(&e.p, args, NULL, true, false));
    CURL *k = curl_easy_init();
    int ok = 0, n = 1500; /* about 300 KB of log lines, several times a pipe's capacity */
    for (int i = 0; i < n; i++) {
        struct srvtest_resp r;
        http(k, e.p.port, "/healthz", NULL, NULL, &r);
        ok += r.status == 200;
        srvtest_resp_free(&r);
    }
    CU_ASSERT_EQUAL(ok, n);
    struct srvtest_resp r;
    http(k, e.p.port, "/v1/batch", "{\"ids\":[\"s1\",\"s2\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    srvtest_resp_free(&r);
    curl_easy_cleanup(k);
    /* The pipe really is (nearly) full: stderr was stuck. The log writer fills it on its own
     * thread, so wait for that. */
    CU_ASSERT(test_wait_until(pipe_nearly_full, &e.p.err_fd, WAIT_MS));
    int64_t t0 = ctx_now();
    kill(e.p.pid, SIGTERM);
    CU_ASSERT(proc_wait_exit(&e.p, WAIT_MS));
    CU_ASSERT(exited_with(e.p.status, 0));
    if (!exited_with(e.p.status, 0) || e.p.exit_ms - t0 > 10000)
        fprintf(stderr, "\n  status 0x%x after %lld ms\n", e.p.status,
                (long long)(e.p.exit_ms - t0));
    env_free(&e);
}

/* ---------------------------------------------------------------- the demo, drained */

/* fanout --demo with work of every kind, drained with a batch still running: exit 0, which
 * under make asan also means no leak in any thread's teardown. */
static void test_ops_demo_drain_exit_clean(void)
{
    if (!have_bin())
        return;
    struct proc p;
    char *args[] = {"--demo", "--drain-ms", "200", NULL};
    CU_ASSERT_FATAL(server_start(&p, args, NULL));
    struct srvtest_resp r;
    http(NULL, p.port, "/v1/batch", "{\"ids\":[\"a\",\"b\",7,\"a\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_EQUAL(result_count(&r), 4);
    srvtest_resp_free(&r);
    http(NULL, p.port, "/v1/batch", "{\"ids\":[\"fail-1\",\"sleep300\"]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 502);
    srvtest_resp_free(&r);
    http(NULL, p.port, "/v1/batch", "{\"ids\":[\"sleep2000\"],\"timeout_ms\":50}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 504);
    srvtest_resp_free(&r);
    struct srvtest_multi g;
    CU_ASSERT_FATAL(srvtest_multi_init(&g) == 0);
    int b = bg_add(&g, p.port, "/v1/batch", "{\"ids\":[\"sleep10000\",\"z\"]}");
    /* Pump until the batch is admitted (its request fully sent), then signal. */
    struct metric_wait w = {.port = p.port, .name = "fanout_requests_in_flight", .want = 1};
    int64_t until = ctx_now() + WAIT_MS;
    bool admitted = false;
    while (!admitted && ctx_now() < until) {
        srvtest_multi_pump(&g, 20);
        admitted = metric_reached(&w);
    }
    CU_ASSERT_FATAL(admitted);
    kill(p.pid, SIGTERM);
    CU_ASSERT(srvtest_multi_wait(&g, NULL, NULL, WAIT_MS));
    CU_ASSERT_EQUAL(g.resp[b].status, 503);
    CU_ASSERT(proc_wait_exit(&p, WAIT_MS));
    CU_ASSERT(exited_with(p.status, 0));
    char *log = proc_log(&p);
    if (!exited_with(p.status, 0))
        fprintf(stderr, "\n  status 0x%x, log:\n%s\n", p.status, log);
    CU_ASSERT(strstr(log, "LeakSanitizer") == NULL &&
              strstr(log, "ERROR: AddressSanitizer") == NULL);
    free(log);
    srvtest_multi_free(&g);
    proc_free(&p);
}

/* fanout --healthcheck[=PATH] (probe: "" or "=PATH") against 127.0.0.1:port; returns its exit
 * status (-1 if it did not run). */
static int healthcheck_on(uint16_t port, const char *probe, struct run *r)
{
    char listen[48], flag[64];
    snprintf(listen, sizeof(listen), "FANOUT_LISTEN=127.0.0.1:%u", port);
    snprintf(flag, sizeof(flag), "--healthcheck%s", probe);
    char *args[] = {flag, NULL};
    char *env[] = {listen, NULL};
    if (!run_fanout(args, env, r) || !r->finished || !WIFEXITED(r->status))
        return -1;
    return WEXITSTATUS(r->status);
}

/* --demo-upstream-only serves the demo upstream alone on --listen (items and probes, no fanout
 * routes), passes --healthcheck, serves a fanout pointed at it, and exits 0 on SIGTERM; it
 * excludes --demo and --upstream, and beats FANOUT_UPSTREAM as a flag. */
static void test_ops_demo_upstream_only(void)
{
    if (!have_bin())
        return;
    struct run r;
    char *both[] = {"--demo-upstream-only", "--upstream", "http://127.0.0.1:9/items/{id}", NULL};
    CU_ASSERT_FATAL(run_fanout(both, NULL, &r));
    CU_ASSERT(exited_with(r.status, 2));
    CU_ASSERT(r.err && strstr(r.err, "--demo-upstream-only"));
    run_free(&r);
    char *only[] = {"--demo-upstream-only", NULL};
    char *env_up[] = {"FANOUT_UPSTREAM=http://127.0.0.1:9/items/{id}", NULL};
    cJSON *c = check_config(only, env_up, &r);
    CU_ASSERT_FATAL(c != NULL);
    CU_ASSERT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "demo_upstream_only")));
    CU_ASSERT_STRING_EQUAL(str(c, "upstream"), "");
    cJSON_Delete(c);
    run_free(&r);

    struct proc up;
    CU_ASSERT_FATAL(server_start(&up, only, NULL));
    struct srvtest_resp h;
    http(NULL, up.port, "/items/apple", NULL, NULL, &h);
    CU_ASSERT_EQUAL(h.status, 200);
    CU_ASSERT(h.body && strstr(h.body, "\"id\":\"apple\""));
    srvtest_resp_free(&h);
    http(NULL, up.port, "/healthz", NULL, NULL, &h);
    CU_ASSERT_EQUAL(h.status, 200);
    srvtest_resp_free(&h);
    http(NULL, up.port, "/readyz", NULL, NULL, &h);
    CU_ASSERT_EQUAL(h.status, 200);
    srvtest_resp_free(&h);
    http(NULL, up.port, "/metrics", NULL, NULL, &h); /* the demo, not fanout */
    CU_ASSERT_EQUAL(h.status, 404);
    srvtest_resp_free(&h);
    CU_ASSERT_EQUAL(healthcheck_on(up.port, "", &r), 0);
    run_free(&r);
    CU_ASSERT_EQUAL(healthcheck_on(up.port, "=/readyz", &r), 0);
    run_free(&r);
    CU_ASSERT_EQUAL(healthcheck_on(up.port, "=/items/fail-1", &r), 1); /* a 500 */
    CU_ASSERT(r.err && strstr(r.err, "status 500"));
    run_free(&r);
    CU_ASSERT_EQUAL(healthcheck_on(up.port, "=nopath", &r), 2);
    run_free(&r);

    /* A fanout in front of it. */
    char tmpl[96];
    snprintf(tmpl, sizeof(tmpl), "http://127.0.0.1:%u/items/{id}", up.port);
    char *fargs[] = {"--upstream", tmpl, NULL};
    struct proc fo;
    CU_ASSERT_FATAL(server_start(&fo, fargs, NULL));
    http(NULL, fo.port, "/v1/batch", "{\"ids\":[\"apple\",7,\"sleep20-x\"]}", NULL, &h);
    CU_ASSERT_EQUAL(h.status, 200);
    CU_ASSERT_EQUAL(result_count(&h), 3);
    srvtest_resp_free(&h);
    http(NULL, fo.port, "/v1/batch", "{\"ids\":[\"apple\",\"fail-1\"]}", NULL, &h);
    CU_ASSERT_EQUAL(h.status, 502);
    srvtest_resp_free(&h);
    CU_ASSERT_EQUAL(healthcheck_on(fo.port, "=/readyz", &r), 0);
    run_free(&r);
    CU_ASSERT(stop_clean(&fo));
    proc_free(&fo);

    CU_ASSERT(stop_clean(&up));
    char *log = proc_log(&up);
    CU_ASSERT(log && strstr(log, "\"mode\":\"demo-upstream-only\"") && strstr(log, "\"msg\":\"stopped\""));
    free(log);
    /* Nothing listens there now: the probe fails with one line. */
    CU_ASSERT_EQUAL(healthcheck_on(up.port, "", &r), 1);
    CU_ASSERT(r.err && strstr(r.err, "healthcheck") && strchr(r.err, '\n') == r.err + r.err_len - 1);
    run_free(&r);
    proc_free(&up);
}

static CU_TestInfo ops_tests[] = {
    {"--version prints the version, exit 0", test_ops_version},
    {"--help lists every flag", test_ops_help_lists_every_flag},
    {"invalid configuration exits 2 with one line naming the flag",
     test_ops_invalid_config_exits_2},
    {"--check-config prints the effective config; flags beat env",
     test_ops_check_config_effective_values},
    {"metrics: known requests move counters by exact amounts", test_ops_metrics_exact_amounts},
    {"metrics: admission rejections and in-flight gauges", test_ops_metrics_admission_rejections},
    {"metrics under load: promtool and the strict parser", test_ops_metrics_under_load},
    {"healthz/readyz while serving; SIGHUP ignored", test_ops_probes_and_sighup},
    {"a port in use: exit 1, no shared port", test_ops_port_in_use_exits_1},
    {"SIGTERM: readyz 503, new connections refused, batch completes, exit 0",
     test_ops_sigterm_drains},
    {"drain deadline: batch 503, exit 0 within drain + 1 s", test_ops_drain_deadline},
    {"a second signal exits at once", test_ops_second_signal},
    {"logs: JSON lines with the request fields", test_ops_logs_are_json_lines},
    {"--log-level warn (from the environment) keeps only warnings", test_ops_log_level_warn},
    {"a stuck stderr blocks neither requests nor shutdown", test_ops_stuck_stderr_never_blocks},
    {"--demo: drain with work in flight, exit 0 (leak-checked under asan)",
     test_ops_demo_drain_exit_clean},
    {"--demo-upstream-only: the demo upstream alone; --healthcheck", test_ops_demo_upstream_only},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(ops, ops_tests)
