/* bench_curl: what libcurl alone does on this machine, the ceiling for a service that fetches
 * through it.
 *
 * No fanout code runs here: each of T threads owns one multi handle and runs a closed loop of
 * batches. A batch is B GETs with at most L in flight; when its last transfer completes, the
 * next batch starts at once. C batches are in flight over all threads (each batch stays on its
 * thread). Easy handles and connections are reused and set up as fanout's fetch loops set them
 * (HTTP/1.1 keep-alive, TCP_NODELAY, no proxy lookup, the body discarded), so the figures are
 * what fanout would reach if its own work (the HTTP front end, JSON, batching, coalescing, the
 * hand-offs between threads) cost nothing, on the same libcurl.
 *
 *   bench_curl [-t THREADS] [-c BATCHES] [-b BATCH] [-l LIMIT] [-d SECONDS] [-w SECONDS] [URL]
 *
 * Defaults: one thread per CPU, 32 batches of 10, limit 100, 5 s measured after 1 s of warm-up.
 * URL: where to fetch; "{id}" in it becomes a distinct id per transfer (without one, every
 * transfer fetches the URL as given). Without a URL it fetches /items/{id} from the test
 * upstream (tests/upstub.c) run in a forked child process. Prints transfers/s,
 * batches/s, batch latency p50/p99/max and this process's CPU time (user + system) per transfer.
 * Exit status: 0, 1 if a transfer failed (curl error or a status other than 200) or none
 * completed, 2 for bad arguments. */
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/upstub.h"

struct worker;

struct batch {
    struct worker *w;
    uint64_t t0;      /* when it started, ns */
    unsigned started; /* transfers started so far */
    unsigned pending; /* transfers in flight */
};

struct worker {
    pthread_t th;
    unsigned id;
    CURLM *m;
    struct batch *batches;
    unsigned nbatches;
    CURL **all;   /* every easy handle made, to clean up at the end */
    CURL **spare; /* the finished ones, reused (both arrays hold spare_cap) */
    unsigned nall, nspare, spare_cap;
    uint64_t seq;       /* ids handed out */
    uint64_t xfers;     /* transfers completed in the window */
    uint64_t failed;    /* of which failed */
    double *lat;        /* batch latencies in the window, ms */
    size_t nlat, lat_cap;
    int err;            /* setup failure (out of memory) */
};

static struct {
    unsigned threads, batches, batch, limit;
    char prefix[1100], suffix[1100]; /* the URL around "{id}", or the whole URL */
    bool has_id;                     /* whether the URL holds "{id}" */
    uint64_t t_measure, t_end;     /* the window, ns (CLOCK_MONOTONIC) */
    atomic_bool stop;
} g;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static size_t discard(char *data, size_t size, size_t nmemb, void *arg)
{
    (void)data;
    (void)arg;
    return size * nmemb;
}

static CURL *easy_get(struct worker *w)
{
    if (w->nspare > 0)
        return w->spare[--w->nspare];
    if (w->nall == w->spare_cap) {
        unsigned cap = w->spare_cap ? w->spare_cap * 2 : 64;
        CURL **a = realloc(w->all, cap * sizeof(*a));
        if (a)
            w->all = a;
        CURL **p = a ? realloc(w->spare, cap * sizeof(*p)) : NULL;
        if (!p)
            return NULL;
        w->spare = p;
        w->spare_cap = cap;
    }
    CURL *e = curl_easy_init();
    if (!e)
        return NULL;
    w->all[w->nall++] = e;
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_NOPROXY, "");
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    return e;
}

static void easy_put(struct worker *w, CURL *e)
{
    w->spare[w->nspare++] = e; /* room: spare_cap >= nall */
}

static int start_one(struct batch *b)
{
    struct worker *w = b->w;
    CURL *e = easy_get(w);
    if (!e)
        return -ENOMEM;
    if (g.has_id) {
        char url[2300];
        snprintf(url, sizeof(url), "%s%u-%llu%s", g.prefix, w->id, (unsigned long long)w->seq++,
                 g.suffix);
        curl_easy_setopt(e, CURLOPT_URL, url);
    } else {
        curl_easy_setopt(e, CURLOPT_URL, g.prefix);
    }
    curl_easy_setopt(e, CURLOPT_PRIVATE, b);
    if (curl_multi_add_handle(w->m, e) != CURLM_OK) {
        easy_put(w, e);
        return -ENOMEM;
    }
    b->started++;
    b->pending++;
    return 0;
}

static int batch_begin(struct batch *b)
{
    b->t0 = now_ns();
    b->started = b->pending = 0;
    for (unsigned i = 0; i < g.batch && i < g.limit; i++)
        if (start_one(b) != 0)
            return -ENOMEM;
    return 0;
}

static int record(struct worker *w, double ms)
{
    if (w->nlat == w->lat_cap) {
        size_t cap = w->lat_cap ? w->lat_cap * 2 : 4096;
        double *p = realloc(w->lat, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        w->lat = p;
        w->lat_cap = cap;
    }
    w->lat[w->nlat++] = ms;
    return 0;
}

/* One completed transfer: counts it, then keeps its batch going or starts the next batch. */
static int on_done(struct worker *w, CURLMsg *msg)
{
    CURL *e = msg->easy_handle;
    struct batch *b = NULL;
    long code = 0;
    curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&b);
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
    CURLcode res = msg->data.result; /* msg is invalid after remove_handle */
    curl_multi_remove_handle(w->m, e);
    easy_put(w, e);
    uint64_t now = now_ns();
    bool in = now >= g.t_measure && now <= g.t_end;
    if (in) {
        w->xfers++;
        if (res != CURLE_OK || code != 200)
            w->failed++;
    }
    b->pending--;
    if (b->started < g.batch)
        return start_one(b);
    if (b->pending > 0)
        return 0;
    if (in && b->t0 >= g.t_measure && record(w, (double)(now - b->t0) / 1e6) != 0)
        return -ENOMEM;
    return batch_begin(b);
}

static void *run(void *arg)
{
    struct worker *w = arg;
    for (unsigned i = 0; i < w->nbatches && w->err == 0; i++) {
        w->batches[i].w = w;
        w->err = batch_begin(&w->batches[i]);
    }
    while (w->err == 0 && !atomic_load_explicit(&g.stop, memory_order_relaxed)) {
        int running = 0, left = 0;
        curl_multi_perform(w->m, &running);
        CURLMsg *msg;
        while (w->err == 0 && (msg = curl_multi_info_read(w->m, &left)) != NULL)
            if (msg->msg == CURLMSG_DONE)
                w->err = on_done(w, msg);
        curl_multi_poll(w->m, NULL, 0, 100, NULL);
    }
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, size_t n, double p)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000u), .tv_nsec = (long)(t % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static int usage(FILE *to, int rc)
{
    fprintf(to, "usage: bench_curl [-t THREADS] [-c BATCHES] [-b BATCH] [-l LIMIT] [-d SECONDS] "
                "[-w SECONDS] [URL]\n"
                "  libcurl alone: closed loops of batches of GETs, one multi handle per thread\n"
                "  URL: \"{id}\" becomes a distinct id per transfer (default: /items/{id} on "
                "the test upstream, tests/upstub.c, in a child process)\n");
    return rc;
}

static int num(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = (unsigned)v;
    return 0;
}

/* Starts the workers, measures the window, joins them, prints the figures and frees what the
 * workers made. Returns the exit status. */
static int run_all(struct worker *ws, struct batch *bs, unsigned dur, unsigned warm)
{
    uint64_t t0 = now_ns();
    g.t_measure = t0 + (uint64_t)warm * 1000000000u;
    g.t_end = g.t_measure + (uint64_t)dur * 1000000000u;
    unsigned at = 0, nstarted = 0;
    int rc = 0;
    for (unsigned i = 0; i < g.threads; i++) {
        struct worker *w = &ws[i];
        w->id = i;
        w->nbatches = g.batches / g.threads + (i < g.batches % g.threads);
        w->batches = bs + at;
        at += w->nbatches;
        w->m = curl_multi_init();
        if (!w->m) {
            rc = 1;
            break;
        }
        curl_multi_setopt(w->m, CURLMOPT_MAX_TOTAL_CONNECTIONS, 512L / g.threads);
        curl_multi_setopt(w->m, CURLMOPT_MAXCONNECTS, 512L / g.threads);
        if (pthread_create(&w->th, NULL, run, w) != 0) {
            rc = 1;
            break;
        }
        nstarted++;
    }
    double c0 = 0, c1 = 0;
    if (rc == 0) {
        sleep_until(g.t_measure);
        c0 = cpu_s();
        sleep_until(g.t_end);
        c1 = cpu_s();
    }
    atomic_store(&g.stop, true);
    uint64_t xfers = 0, failed = 0;
    size_t nlat = 0;
    for (unsigned i = 0; i < nstarted; i++) {
        pthread_join(ws[i].th, NULL);
        xfers += ws[i].xfers;
        failed += ws[i].failed;
        nlat += ws[i].nlat;
        if (ws[i].err)
            rc = 1;
    }
    double *lat = malloc((nlat ? nlat : 1) * sizeof(*lat));
    size_t k = 0;
    for (unsigned i = 0; i < g.threads && lat; i++) {
        memcpy(lat + k, ws[i].lat, ws[i].nlat * sizeof(*lat));
        k += ws[i].nlat;
    }
    if (lat)
        qsort(lat, nlat, sizeof(*lat), cmp_double);
    printf("bench_curl: libcurl %s, %u thread(s), %u batches of %u in flight (limit %u), %u s\n",
           curl_version_info(CURLVERSION_NOW)->version, g.threads, g.batches, g.batch, g.limit,
           dur);
    printf("  transfers/s %.0f  batches/s %.1f  batch ms p50 %.2f p99 %.2f max %.2f  "
           "CPU us/transfer %.1f  failed %llu\n",
           (double)xfers / dur, (double)nlat / dur, lat ? pct(lat, nlat, 0.5) : 0,
           lat ? pct(lat, nlat, 0.99) : 0, nlat && lat ? lat[nlat - 1] : 0,
           xfers ? (c1 - c0) * 1e6 / (double)xfers : 0, (unsigned long long)failed);
    for (unsigned i = 0; i < g.threads; i++) {
        struct worker *w = &ws[i];
        for (unsigned j = 0; j < w->nall; j++) {
            curl_multi_remove_handle(w->m, w->all[j]); /* a no-op for a spare one */
            curl_easy_cleanup(w->all[j]);
        }
        if (w->m)
            curl_multi_cleanup(w->m);
        free(w->all);
        free(w->spare);
        free(w->lat);
    }
    free(lat);
    if (rc == 0 && (failed > 0 || xfers == 0))
        rc = 1;
    return rc;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned dur = 5, warm = 1;
    g.threads = ncpu > 0 ? (unsigned)ncpu : 1;
    g.batches = 32;
    g.batch = 10;
    g.limit = 100;
    int o;
    while ((o = getopt(argc, argv, "t:c:b:l:d:w:h")) != -1) {
        int bad = 0;
        switch (o) {
        case 't': bad = num(optarg, 1, 64, &g.threads); break;
        case 'c': bad = num(optarg, 1, 100000, &g.batches); break;
        case 'b': bad = num(optarg, 1, 100000, &g.batch); break;
        case 'l': bad = num(optarg, 1, 100000, &g.limit); break;
        case 'd': bad = num(optarg, 1, 3600, &dur); break;
        case 'w': bad = num(optarg, 0, 3600, &warm); break;
        case 'h': return usage(stdout, 0);
        default: return usage(stderr, 2);
        }
        if (bad) {
            fprintf(stderr, "bench_curl: -%c %s: not a number in range\n", o, optarg);
            return 2;
        }
    }
    if (argc - optind > 1)
        return usage(stderr, 2);
    if (g.batches < g.threads)
        g.threads = g.batches;

    pid_t child = 0; /* the test upstream's process, when no URL is given */
    int ctl = -1;
    char url[1100];
    if (optind < argc) {
        if (strlen(argv[optind]) >= sizeof(url)) {
            fprintf(stderr, "bench_curl: URL too long\n");
            return 2;
        }
        snprintf(url, sizeof(url), "%s", argv[optind]);
    } else {
        int port = 0;
        child = upstub_spawn(g.threads, &port, &ctl); /* before any thread in this process */
        if (child < 0) {
            fprintf(stderr, "bench_curl: cannot start the test upstream\n");
            return 1;
        }
        snprintf(url, sizeof(url), "http://127.0.0.1:%d/items/{id}", port);
    }
    char *id = strstr(url, "{id}");
    g.has_id = id != NULL;
    if (id) {
        snprintf(g.prefix, sizeof(g.prefix), "%.*s", (int)(id - url), url);
        snprintf(g.suffix, sizeof(g.suffix), "%s", id + 4);
    } else {
        snprintf(g.prefix, sizeof(g.prefix), "%s", url);
    }
    struct worker *ws = calloc(g.threads, sizeof(*ws));
    struct batch *bs = calloc(g.batches, sizeof(*bs));
    int rc = 0;
    if (!ws || !bs) {
        fprintf(stderr, "bench_curl: out of memory\n");
        rc = 1;
    } else if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fprintf(stderr, "bench_curl: curl_global_init failed\n");
        rc = 1;
    } else {
        rc = run_all(ws, bs, dur, warm);
        curl_global_cleanup();
    }
    free(ws);
    free(bs);
    if (child > 0) {
        close(ctl);
        waitpid(child, NULL, 0);
    }
    return rc;
}
