/* Tests for server/obs/metrics.c and for the strict exposition-format parser (tests/prom.c) that
 * test_ops.c uses on live scrapes: the parser must accept what Prometheus accepts in the form
 * fanout writes and reject each way a scrape can be broken, and metrics_render() must produce a
 * valid scrape whose numbers are exactly what was counted, also while other threads count. */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/json.h"
#include "server/obs/metrics.h"
#include "server/version.h"
#include "tests/prom.h"
#include "tests/support.h"

/* Renders 'm' with 'fs' and parses it; returns 0 or -1 (the reason printed). */
static int render_parse_ups(const struct metrics *m, const struct fetch_stats *fs,
                            struct upstreams *ups, struct prom_scrape *out)
{
    struct json_buf b;
    json_buf_init(&b);
    metrics_render(m, fs, ups, &b);
    char err[512];
    int rc = json_buf_failed(&b) ? -1 : prom_parse(b.data, b.len, "fanout_", out, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "\n  scrape rejected: %s\n%s\n", err, b.data ? b.data : "");
    json_buf_destroy(&b);
    return rc;
}

static int render_parse(const struct metrics *m, const struct fetch_stats *fs,
                        struct prom_scrape *out)
{
    return render_parse_ups(m, fs, NULL, out);
}

static void test_metrics_render_is_valid_and_complete(void)
{
    struct metrics m;
    metrics_init(&m);
    struct fetch_stats fs = {.ok = 11,
                             .status = 12,
                             .unreachable = 13,
                             .deadline = 14,
                             .canceled = 15,
                             .too_large = 16,
                             .in_flight = 17,
                             .conns_opened = 18,
                             .bytes = 19};
    atomic_store(&m.in_flight, 3);
    atomic_store(&m.rejected, 4);
    struct prom_scrape sc;
    CU_ASSERT_FATAL(render_parse(&m, &fs, &sc) == 0);
    static const struct {
        const char *name, *type;
    } want[] = {{"fanout_requests_total", "counter"},
                {"fanout_request_duration_seconds", "histogram"},
                {"fanout_fetches_total", "counter"},
                {"fanout_fetch_duration_seconds", "histogram"},
                {"fanout_requests_in_flight", "gauge"},
                {"fanout_fetches_in_flight", "gauge"},
                {"fanout_upstream_connections_opened_total", "counter"},
                {"fanout_admission_rejections_total", "counter"},
                {"fanout_process_start_time_seconds", "gauge"},
                {"fanout_build_info", "gauge"}};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        const struct prom_family *f = prom_family(&sc, want[i].name);
        CU_ASSERT_PTR_NOT_NULL(f);
        if (!f) {
            fprintf(stderr, "\n  missing family %s\n", want[i].name);
            continue;
        }
        CU_ASSERT_STRING_EQUAL(f->type, want[i].type);
        CU_ASSERT(strlen(f->help) > 10);
    }
    /* No request yet: the family is declared without samples. */
    CU_ASSERT_EQUAL(prom_family(&sc, "fanout_requests_total")->count, 0);
    static const char *const results[] = {"ok",       "upstream_status", "unreachable",
                                          "deadline", "canceled",        "too_large"};
    for (int i = 0; i < 6; i++) {
        char lbl[64];
        snprintf(lbl, sizeof(lbl), "result=\"%s\"", results[i]);
        CU_ASSERT_EQUAL(prom_value(&sc, "fanout_fetches_total", lbl, -1), 11 + i);
    }
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_fetches_in_flight", "", -1), 17);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_connections_opened_total", "", -1), 18);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_in_flight", "", -1), 3);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_admission_rejections_total", "", -1), 4);
    double start = prom_value(&sc, "fanout_process_start_time_seconds", "", -1);
    /* time() reads a coarse clock that may lag clock_gettime() by a tick: bound loosely. */
    CU_ASSERT(start > (double)time(NULL) - 60 && start < (double)time(NULL) + 5);
    /* build_info carries the version (and the library versions) with the value 1. */
    bool found = false;
    for (size_t i = 0; i < sc.nsmp; i++)
        if (!strcmp(sc.smp[i].name, "fanout_build_info")) {
            char v[64];
            snprintf(v, sizeof(v), "version=\"%s\"", FANOUT_VERSION);
            found = strstr(sc.smp[i].labels, v) && strstr(sc.smp[i].labels, "libcurl=\"") &&
                    sc.smp[i].value == 1;
        }
    CU_ASSERT(found);
    prom_free(&sc);
}

static void test_metrics_histogram_counts_exact(void)
{
    struct metrics m;
    metrics_init(&m);
    /* Bounds are inclusive (le): 1000 us lands in le="0.001", 1001 us in le="0.0025". */
    const int64_t obs[] = {0, 999, 1000, 1001, 2500, 7000, 250000, 10000000, 10000001, -5};
    uint64_t sum = 0;
    for (size_t i = 0; i < sizeof(obs) / sizeof(obs[0]); i++) {
        hist_observe(&m.request_seconds, obs[i]);
        sum += obs[i] > 0 ? (uint64_t)obs[i] : 0;
    }
    struct fetch_stats fs = {0};
    struct prom_scrape sc;
    CU_ASSERT_FATAL(render_parse(&m, &fs, &sc) == 0);
    const char *n = "fanout_request_duration_seconds_bucket";
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"0.001\"", -1), 4); /* 0, 999, 1000, -5 */
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"0.0025\"", -1), 6);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"0.005\"", -1), 6);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"0.01\"", -1), 7);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"0.25\"", -1), 8);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"10\"", -1), 9);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "le=\"+Inf\"", -1), 10);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_request_duration_seconds_count", "", -1), 10);
    double got = prom_value(&sc, "fanout_request_duration_seconds_sum", "", -1);
    CU_ASSERT(got > (double)sum / 1e6 - 1e-6 && got < (double)sum / 1e6 + 1e-6);
    /* The fetch histogram is separate and empty. */
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_fetch_duration_seconds_count", "", -1), 0);
    prom_free(&sc);
}

static void test_metrics_status_counts(void)
{
    struct metrics m;
    metrics_init(&m);
    for (int i = 0; i < 3; i++)
        metrics_count_status(&m, ROUTE_BATCH, 200);
    metrics_count_status(&m, ROUTE_BATCH, 404);
    metrics_count_status(&m, ROUTE_BATCH, 0);
    metrics_count_status(&m, ROUTE_BATCH, 700); /* out of range: counted as 0 */
    struct fetch_stats fs = {0};
    struct prom_scrape sc;
    CU_ASSERT_FATAL(render_parse(&m, &fs, &sc) == 0);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_total", "code=\"200\",route=\"batch\"", -1), 3);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_total", "code=\"404\",route=\"batch\"", -1), 1);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_total", "code=\"0\",route=\"batch\"", -1), 2);
    CU_ASSERT_EQUAL(prom_family(&sc, "fanout_requests_total")->count, 3);
    prom_free(&sc);
}

/* Routes are labels of one family; per-upstream series carry the upstream's host:port; an
 * aborted attempt counts as canceled (or deadline), whatever its ctx's cause. */
static void test_metrics_routes_and_upstreams(void)
{
    struct metrics m;
    metrics_init(&m);
    metrics_count_status(&m, ROUTE_BATCH, 200);
    metrics_count_status(&m, ROUTE_HEALTHZ, 200);
    metrics_count_status(&m, ROUTE_HEALTHZ, 200);
    metrics_count_status(&m, ROUTE_READYZ, 503);
    metrics_count_status(&m, ROUTE_METRICS, 200);
    metrics_count_status(&m, ROUTE_OTHER, 404);
    const char *t[] = {"http://10.0.0.1:9000/i/{id}", "https://h.example/i/{id}"};
    struct upstreams_opts uo = {.eject_after = 5, .eject_ms = 1000, .eject_max_ms = 2000,
                                .max_ejected_pct = 50};
    struct upstreams *ups;
    char err[256];
    CU_ASSERT_FATAL(upstreams_new(t, 2, &uo, &ups, err, sizeof(err)) == 0);
    upstream_count(ups, 0, outcome_of(0, 200, false).kind, 1500);
    upstream_count(ups, 0, outcome_of(FETCH_ESTATUS, 502, false).kind, 100);
    upstream_count(ups, 0, outcome_of(FETCH_ESTATUS, 502, true).kind, 100); /* aborted by a
                                                                             sibling's 502 */
    upstream_count(ups, 1, outcome_of(-ETIMEDOUT, 0, true).kind, 100);
    upstream_count(ups, 1, outcome_of(FETCH_EUNREACH, 0, false).kind, 100);
    static const int64_t all_us[] = {1500, 100, 100, 100, 100}; /* every attempt, any upstream */
    for (int i = 0; i < 5; i++)
        hist_observe(&m.fetch_seconds, all_us[i]);
    struct fetch_stats fs = {0};
    struct prom_scrape sc;
    CU_ASSERT_FATAL(render_parse_ups(&m, &fs, ups, &sc) == 0);
    const char *n = "fanout_requests_total";
    CU_ASSERT_EQUAL(prom_value(&sc, n, "code=\"200\",route=\"batch\"", -1), 1);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "code=\"200\",route=\"healthz\"", -1), 2);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "code=\"503\",route=\"readyz\"", -1), 1);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "code=\"200\",route=\"metrics\"", -1), 1);
    CU_ASSERT_EQUAL(prom_value(&sc, n, "code=\"404\",route=\"other\"", -1), 1);
    n = "fanout_upstream_fetches_total";
    const char *a = "10.0.0.1:9000", *b = "h.example:443";
    char l[128];
    snprintf(l, sizeof(l), "member=\"%s\",result=\"ok\",upstream=\"%s\"", a, a);
    CU_ASSERT_EQUAL(prom_value(&sc, n, l, -1), 1);
    snprintf(l, sizeof(l), "member=\"%s\",result=\"upstream_status\",upstream=\"%s\"", a, a);
    CU_ASSERT_EQUAL(prom_value(&sc, n, l, -1), 1);
    snprintf(l, sizeof(l), "member=\"%s\",result=\"canceled\",upstream=\"%s\"", a, a);
    CU_ASSERT_EQUAL(prom_value(&sc, n, l, -1), 1);
    snprintf(l, sizeof(l), "member=\"%s\",result=\"deadline\",upstream=\"%s\"", b, b);
    CU_ASSERT_EQUAL(prom_value(&sc, n, l, -1), 1);
    snprintf(l, sizeof(l), "member=\"%s\",result=\"unreachable\",upstream=\"%s\"", b, b);
    CU_ASSERT_EQUAL(prom_value(&sc, n, l, -1), 1);
    snprintf(l, sizeof(l), "member=\"%s\",upstream=\"%s\"", a, a);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_fetch_duration_seconds_count", l, -1), 3);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_ejected", l, -1), 0);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_upstream_ejections_total", l, -1), 0);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_fetch_duration_seconds_count", "", -1), 5);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_hedges_sent_total", "", -1), 0);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_retries_refused_total", "", -1), 0);
    prom_free(&sc);
    upstreams_free(ups);
}

/* ---------------------------------------------------------------- the parser itself */

#define H(n, t) "# HELP " n " Some help.\n# TYPE " n " " t "\n"
#define HIST_OK                                                                                    \
    H("fanout_h", "histogram")                                                                     \
    "fanout_h_bucket{le=\"0.1\"} 1\nfanout_h_bucket{le=\"1\"} 2\nfanout_h_bucket{le=\"+Inf\"} 3\n" \
    "fanout_h_sum 1.5\nfanout_h_count 3\n"

static void test_metrics_parser_accepts_valid_text(void)
{
    /* clang-format off */
    static const char *const good[] = {
        H("fanout_a_total", "counter") "fanout_a_total 0\n",
        H("fanout_a_total", "counter")
            "fanout_a_total{code=\"200\"} 5\nfanout_a_total{code=\"500\"} 1e3\n",
        H("fanout_g", "gauge") "fanout_g -1.5e-3\n",
        H("fanout_g", "gauge") "fanout_g +Inf\n",
        H("fanout_g", "gauge") "fanout_g NaN 1700000000000\n",
        H("fanout_g", "gauge") "fanout_g{a=\"x\\\"y\\\\z\\n\",b=\"\",} 1\n",
        "# TYPE fanout_u untyped\n# HELP fanout_u Help with \\\\ and \\n escapes.\nfanout_u 2\n",
        H("fanout_empty_total", "counter"),
        HIST_OK,
        HIST_OK H("fanout_g", "gauge") "fanout_g 1\n",
        H("fanout_h", "histogram")
            "fanout_h_bucket{x=\"a\",le=\"1\"} 1\nfanout_h_bucket{x=\"a\",le=\"+Inf\"} 1\n"
            "fanout_h_sum{x=\"a\"} 0.5\nfanout_h_count{x=\"a\"} 1\n"
            "fanout_h_bucket{x=\"b\",le=\"+Inf\"} 0\nfanout_h_sum{x=\"b\"} 0\n"
            "fanout_h_count{x=\"b\"} 0\n",
        H("fanout_s", "summary") "fanout_s{quantile=\"0.5\"} 1\nfanout_s_sum 2\nfanout_s_count 2\n",
    };
    /* clang-format on */
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        struct prom_scrape sc;
        char err[256] = "";
        int rc = prom_parse(good[i], strlen(good[i]), "fanout_", &sc, err, sizeof(err));
        CU_ASSERT_EQUAL(rc, 0);
        if (rc != 0)
            fprintf(stderr, "\n  good[%zu] rejected: %s\n", i, err);
        prom_free(&sc);
    }
    /* Lookup uses the canonical (sorted) label set. */
    const char *t = H("fanout_g", "gauge") "fanout_g{b=\"2\",a=\"1\"} 7\n";
    struct prom_scrape sc;
    char err[256];
    CU_ASSERT_FATAL(prom_parse(t, strlen(t), NULL, &sc, err, sizeof(err)) == 0);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_g", "a=\"1\",b=\"2\"", -1), 7);
    CU_ASSERT_STRING_EQUAL(prom_family(&sc, "fanout_g")->help, "Some help.");
    prom_free(&sc);
}

static void test_metrics_parser_rejects_broken_text(void)
{
    static const struct {
        const char *why, *text;
    } bad[] = {
        {"empty", ""},
        {"no final newline", H("fanout_g", "gauge") "fanout_g 1"},
        {"empty line", H("fanout_g", "gauge") "\nfanout_g 1\n"},
        {"free comment", "# hello\n" H("fanout_g", "gauge") "fanout_g 1\n"},
        {"no TYPE", "# HELP fanout_g Help.\nfanout_g 1\n"},
        {"no HELP", "# TYPE fanout_g gauge\nfanout_g 1\n"},
        {"no HELP, no samples", "# TYPE fanout_g gauge\n"},
        {"sample without family", "fanout_g 1\n"},
        {"unknown type", "# HELP fanout_g Help.\n# TYPE fanout_g meter\nfanout_g 1\n"},
        {"two TYPEs", H("fanout_g", "gauge") "# TYPE fanout_g gauge\nfanout_g 1\n"},
        {"HELP after samples", H("fanout_g", "gauge") "fanout_g 1\n# HELP fanout_g Again.\n"},
        {"sample of another family", H("fanout_g", "gauge") "fanout_x 1\n"},
        {"family split", H("fanout_g", "gauge") "fanout_g{a=\"1\"} 1\n" H(
                             "fanout_k", "gauge") "fanout_k 1\nfanout_g{a=\"2\"} 1\n"},
        {"family declared twice", H("fanout_g", "gauge") "fanout_g 1\n" H(
                                      "fanout_k", "gauge") "fanout_k 1\n" H("fanout_g", "gauge")},
        {"duplicate series", H("fanout_g", "gauge") "fanout_g{a=\"1\"} 1\nfanout_g{a=\"1\"} 2\n"},
        {"duplicate label", H("fanout_g", "gauge") "fanout_g{a=\"1\",a=\"2\"} 1\n"},
        {"bad metric name", H("fanout_g", "gauge") "fanout-g 1\n"},
        {"bad label name", H("fanout_g", "gauge") "fanout_g{1a=\"1\"} 1\n"},
        {"reserved label", H("fanout_g", "gauge") "fanout_g{__a=\"1\"} 1\n"},
        {"unquoted label", H("fanout_g", "gauge") "fanout_g{a=1} 1\n"},
        {"bad escape", H("fanout_g", "gauge") "fanout_g{a=\"\\t\"} 1\n"},
        {"unterminated label", H("fanout_g", "gauge") "fanout_g{a=\"1} 1\n"},
        {"no value", H("fanout_g", "gauge") "fanout_g\n"},
        {"bad value", H("fanout_g", "gauge") "fanout_g one\n"},
        {"hex value", H("fanout_g", "gauge") "fanout_g 0x10\n"},
        {"lower-case inf", H("fanout_g", "gauge") "fanout_g inf\n"},
        {"two spaces", H("fanout_g", "gauge") "fanout_g  1\n"},
        {"trailing text", H("fanout_g", "gauge") "fanout_g 1 2 3\n"},
        {"CR line end", H("fanout_g", "gauge") "fanout_g 1\r\n"},
        {"wrong prefix", H("other_g", "gauge") "other_g 1\n"},
        {"negative counter", H("fanout_c_total", "counter") "fanout_c_total -1\n"},
        {"counter without _total", H("fanout_c", "counter") "fanout_c 1\n"},
        {"histogram: not cumulative",
         H("fanout_h",
           "histogram") "fanout_h_bucket{le=\"0.1\"} 2\nfanout_h_bucket{le=\"1\"} 1\n"
                        "fanout_h_bucket{le=\"+Inf\"} 2\nfanout_h_sum 1\nfanout_h_count 2\n"},
        {"histogram: no +Inf",
         H("fanout_h", "histogram") "fanout_h_bucket{le=\"0.1\"} 1\nfanout_h_bucket{le=\"1\"} 2\n"
                                    "fanout_h_sum 1\nfanout_h_count 2\n"},
        {"histogram: le not increasing",
         H("fanout_h",
           "histogram") "fanout_h_bucket{le=\"1\"} 1\nfanout_h_bucket{le=\"0.1\"} 1\n"
                        "fanout_h_bucket{le=\"+Inf\"} 1\nfanout_h_sum 1\nfanout_h_count 1\n"},
        {"histogram: bucket after +Inf",
         H("fanout_h",
           "histogram") "fanout_h_bucket{le=\"+Inf\"} 1\nfanout_h_bucket{le=\"+Inf\"} 1\n"
                        "fanout_h_sum 1\nfanout_h_count 1\n"},
        {"histogram: no _sum",
         H("fanout_h", "histogram") "fanout_h_bucket{le=\"+Inf\"} 1\nfanout_h_count 1\n"},
        {"histogram: no _count",
         H("fanout_h", "histogram") "fanout_h_bucket{le=\"+Inf\"} 1\nfanout_h_sum 1\n"},
        {"histogram: _count != +Inf",
         H("fanout_h",
           "histogram") "fanout_h_bucket{le=\"+Inf\"} 1\nfanout_h_sum 1\nfanout_h_count 2\n"},
        {"histogram: fractional count",
         H("fanout_h",
           "histogram") "fanout_h_bucket{le=\"+Inf\"} 1.5\nfanout_h_sum 1\nfanout_h_count 1.5\n"},
        {"histogram: bucket without le",
         H("fanout_h", "histogram") "fanout_h_bucket 1\nfanout_h_sum 1\nfanout_h_count 1\n"},
        {"histogram: bad le",
         H("fanout_h",
           "histogram") "fanout_h_bucket{le=\"x\"} 1\nfanout_h_sum 1\nfanout_h_count 1\n"},
        {"histogram: plain sample", H("fanout_h", "histogram") "fanout_h 1\n"},
        {"histogram: only _sum/_count",
         H("fanout_h", "histogram") "fanout_h_sum 1\nfanout_h_count 1\n"},
        {"gauge with _bucket", H("fanout_g", "gauge") "fanout_g_bucket{le=\"1\"} 1\n"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct prom_scrape sc;
        char err[256] = "";
        int rc = prom_parse(bad[i].text, strlen(bad[i].text), "fanout_", &sc, err, sizeof(err));
        CU_ASSERT_EQUAL(rc, -1);
        if (rc != -1)
            fprintf(stderr, "\n  accepted broken text (%s)\n", bad[i].why);
        else
            CU_ASSERT(!strncmp(err, "line ", 5));
        if (getenv("PROM_DEBUG"))
            fprintf(stderr, "\n  %-28s -> %s", bad[i].why, err);
        CU_ASSERT_EQUAL(sc.nfam, 0); /* emptied on failure */
        prom_free(&sc);
    }
}

/* ---------------------------------------------------------------- concurrency */

#define HAMMER_THREADS 4
#define HAMMER_ROUNDS 20000

struct hammer {
    struct metrics *m;   /* shared */
    atomic_int *running; /* threads not finished */
    unsigned seed;       /* per thread */
};

static void *hammer_main(void *arg)
{
    struct hammer *h = arg;
    for (int i = 0; i < HAMMER_ROUNDS; i++) {
        metrics_count_status(h->m, ROUTE_BATCH, i % 3 ? 200 : 503);
        hist_observe(&h->m->request_seconds, (int64_t)((h->seed + (unsigned)i) % 3000000));
        hist_observe(&h->m->fetch_seconds, 10);
        atomic_fetch_add_explicit(&h->m->in_flight, 1, memory_order_relaxed);
        atomic_fetch_sub_explicit(&h->m->in_flight, 1, memory_order_relaxed);
    }
    atomic_fetch_sub(h->running, 1);
    return NULL;
}

/* Scrapes taken while threads count are each valid, and counters never go back between
 * scrapes; once the threads are joined, every count is exact. */
static void test_metrics_scrapes_during_updates(void)
{
    struct metrics m;
    metrics_init(&m);
    atomic_int running = HAMMER_THREADS;
    pthread_t th[HAMMER_THREADS];
    struct hammer hs[HAMMER_THREADS];
    for (int i = 0; i < HAMMER_THREADS; i++) {
        hs[i] = (struct hammer){.m = &m, .running = &running, .seed = (unsigned)i * 7919u};
        CU_ASSERT_FATAL(pthread_create(&th[i], NULL, hammer_main, &hs[i]) == 0);
    }
    struct fetch_stats fs = {0};
    double last200 = 0, lastcount = 0;
    int scrapes = 0, bad = 0, backwards = 0;
    int64_t render_ns = 0;
    do {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        struct json_buf b;
        json_buf_init(&b);
        metrics_render(&m, &fs, NULL, &b);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        render_ns += (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
        struct prom_scrape sc;
        char err[256];
        if (prom_parse(b.data, b.len, "fanout_", &sc, err, sizeof(err)) != 0) {
            if (!bad++)
                fprintf(stderr, "\n  scrape under updates rejected: %s\n", err);
        } else {
            double v200 = prom_value(&sc, "fanout_requests_total", "code=\"200\",route=\"batch\"", 0);
            double cnt = prom_value(&sc, "fanout_request_duration_seconds_count", "", 0);
            backwards += v200 < last200 || cnt < lastcount;
            last200 = v200;
            lastcount = cnt;
            prom_free(&sc);
        }
        json_buf_destroy(&b);
        scrapes++;
    } while (atomic_load(&running) > 0);
    for (int i = 0; i < HAMMER_THREADS; i++)
        pthread_join(th[i], NULL);
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(backwards, 0);
    CU_ASSERT(scrapes > 0);
    struct prom_scrape sc;
    CU_ASSERT_FATAL(render_parse(&m, &fs, &sc) == 0);
    double total = (double)HAMMER_THREADS * HAMMER_ROUNDS;
    double n503 = (double)HAMMER_THREADS * ((HAMMER_ROUNDS + 2) / 3);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_total", "code=\"503\",route=\"batch\"", -1), n503);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_total", "code=\"200\",route=\"batch\"", -1), total - n503);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_request_duration_seconds_count", "", -1), total);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_fetch_duration_seconds_bucket", "le=\"0.001\"", -1),
                    total);
    CU_ASSERT_EQUAL(prom_value(&sc, "fanout_requests_in_flight", "", -1), 0);
    prom_free(&sc);
    fprintf(stderr, "\n  %d scrapes, %.1f us per render (not asserted) ", scrapes,
            (double)render_ns / scrapes / 1000.0);
}

static CU_TestInfo metrics_tests[] = {
    {"render: valid, every family, exact values", test_metrics_render_is_valid_and_complete},
    {"histogram: inclusive bounds, exact counts and sum", test_metrics_histogram_counts_exact},
    {"requests by status code", test_metrics_status_counts},
    {"requests by route; attempts by upstream, aborted ones canceled",
     test_metrics_routes_and_upstreams},
    {"parser accepts valid exposition text", test_metrics_parser_accepts_valid_text},
    {"parser rejects each kind of broken text", test_metrics_parser_rejects_broken_text},
    {"scrapes while threads count: valid, monotonic, exact", test_metrics_scrapes_during_updates},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(metrics, metrics_tests)
