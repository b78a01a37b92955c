/* bench_fetch: transfers/s and client CPU per transfer of the fetch engine on loopback.
 *
 * The upstream is tests/upstub.c running in a forked child process, so getrusage(RUSAGE_SELF)
 * in this process measures the client alone. Each cell is a closed loop: 'conc' transfers are
 * kept outstanding (a completion queues the next one on the same loop), a short warm-up, then a
 * timed window. Rows: 1 loop and one loop per CPU; columns: concurrency 1, 16, 256, 1000, with
 * the default engine options (max_conns 512, split across the loops).
 *
 *   bench_fetch              run the table (about 35 s)
 *   bench_fetch --stub [N]   only serve the stub with N threads; prints its port, runs until
 *                            stdin closes (to drive another client against the same upstream)
 *   BENCH_MS=<ms>            measuring window per cell run (default 1000)
 *   BENCH_PORT=<port>        use an upstream already listening on 127.0.0.1:<port>
 *   BENCH_PATH=<path>        the path fetched there (default /items/42)
 *   BENCH_CELL=<loops>:<conc> run that one cell once (for profiling)
 *   bench_fetch --cancel     the cost of one cancel against what else the loop holds: N timers
 *                            (or N transfers queued behind one that holds the only connection)
 *                            pending on one loop, K of them canceled one at a time (each waits
 *                            for its callback); prints the loop thread's CPU per cancel. It
 *                            should not grow with N. BENCH_CANCEL_N=<max N>, BENCH_CANCEL_K=<K> */
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "tests/upstub.h"

struct bench {
    struct fetch *f;             /* the engine under test */
    char url[128];               /* the URL every transfer fetches */
    atomic_uint_fast64_t done;   /* completed transfers */
    atomic_uint_fast64_t errors; /* of which not ok */
    atomic_bool stop;            /* stop re-queueing */
    atomic_uint outstanding;     /* transfers queued and not yet completed for good */
};

struct slot {
    struct bench *b; /* the run */
    unsigned loop;   /* the loop this slot's transfers use */
};

static void on_done(void *arg, struct fetch_result *r);

static int submit(struct slot *s)
{
    struct fetch_req q = {.url = s->b->url, .cb = on_done, .arg = s};
    return fetch_get(s->b->f, s->loop, ctx_background(), &q);
}

static void on_done(void *arg, struct fetch_result *r)
{
    struct slot *s = arg;
    struct bench *b = s->b;
    free(r->body);
    atomic_fetch_add_explicit(&b->done, 1, memory_order_relaxed);
    if (r->err != 0)
        atomic_fetch_add_explicit(&b->errors, 1, memory_order_relaxed);
    if (atomic_load(&b->stop) || submit(s) != 0)
        atomic_fetch_sub(&b->outstanding, 1);
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

struct cell {
    double rate;     /* transfers per second */
    double cpu_us;   /* client CPU microseconds per transfer */
    uint64_t errors; /* failed transfers (should be 0) */
    uint64_t conns;  /* connections the engine opened */
};

static double median3(double v[3])
{
    double a = v[0], b = v[1], c = v[2];
    if ((a <= b && b <= c) || (c <= b && b <= a))
        return b;
    if ((b <= a && a <= c) || (c <= a && a <= b))
        return a;
    return c;
}

static int run_cell(int port, unsigned loops, unsigned conc, int64_t window_ms, struct cell *out)
{
    struct fetch_opts o;
    fetch_opts_default(&o);
    o.loops = loops;
    struct bench b = {0};
    const char *path = getenv("BENCH_PATH"); /* e.g. /slow/42?ms=20 on the harness upstream */
    snprintf(b.url, sizeof(b.url), "http://127.0.0.1:%d%s", port, path ? path : "/items/42");
    int rc = fetch_new(&o, &b.f);
    if (rc != 0)
        return rc;
    struct slot *slots = calloc(conc, sizeof(*slots));
    if (!slots) {
        fetch_free(b.f);
        return -1;
    }
    atomic_store(&b.outstanding, conc);
    for (unsigned i = 0; i < conc; i++) {
        slots[i] = (struct slot){&b, i % loops};
        if (submit(&slots[i]) != 0)
            atomic_fetch_sub(&b.outstanding, 1);
    }
    sleep_ms(window_ms / 4); /* warm-up: connections open, caches fill */
    uint64_t d0 = atomic_load(&b.done);
    double c0 = cpu_s();
    int64_t t0 = ctx_now();
    sleep_ms(window_ms);
    uint64_t d1 = atomic_load(&b.done);
    double c1 = cpu_s();
    int64_t t1 = ctx_now();
    atomic_store(&b.stop, true);
    while (atomic_load(&b.outstanding) > 0)
        sleep_ms(1);
    struct fetch_stats st;
    fetch_stats(b.f, &st);
    fetch_free(b.f);
    free(slots);
    out->rate = (double)(d1 - d0) * 1000.0 / (double)(t1 - t0);
    out->cpu_us = d1 > d0 ? (c1 - c0) * 1e6 / (double)(d1 - d0) : 0;
    out->errors = atomic_load(&b.errors);
    out->conns = st.conns_opened;
    return 0;
}

/* ---------------------------------------------------------------- --cancel */

/* One pending item of a --cancel run. */
struct cancel_item {
    atomic_int calls; /* callbacks (0 or 1) */
    atomic_int err;   /* the callback's err */
};

static void cancel_cb(void *arg, struct fetch_result *r)
{
    struct cancel_item *it = arg;
    free(r->body);
    atomic_store_explicit(&it->err, r->err, memory_order_relaxed);
    atomic_fetch_add_explicit(&it->calls, 1, memory_order_release);
}

/* The loop thread, seen from a zero-delay timer's callback. */
struct loop_thread {
    atomic_bool seen;
    pthread_t thread;
};

static void thread_cb(void *arg, struct fetch_result *r)
{
    struct loop_thread *t = arg;
    (void)r;
    t->thread = pthread_self();
    atomic_store_explicit(&t->seen, true, memory_order_release);
}

static double thread_cpu_s(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void wait_called(struct cancel_item *it)
{
    while (atomic_load_explicit(&it->calls, memory_order_acquire) == 0)
        sched_yield();
}

/* Queues the N items (timers, or transfers behind 'holder'), each with its own ctx in ctxs[]. */
static int cancel_fill(struct fetch *f, int port, bool transfers, unsigned n, struct ctx **ctxs,
                       struct cancel_item *items)
{
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/items/42", port);
    for (unsigned i = 0; i < n; i++) {
        struct fetch_req q = {.url = url, .cb = cancel_cb, .arg = &items[i]};
        if (!(ctxs[i] = ctx_new(ctx_background(), CTX_FOREVER)) ||
            (transfers ? fetch_get(f, 0, ctxs[i], &q)
                       : fetch_after(f, 0, ctxs[i], INT64_MAX, cancel_cb, &items[i])) != 0)
            return -1;
    }
    return 0;
}

/* N items pending on one loop (timers, or transfers waiting behind one that holds the only
 * connection and is never answered), then K of them canceled one at a time, each waited for.
 * Returns the loop thread's CPU microseconds per cancel, and the wall microseconds per cancel in
 * *wall_us; < 0 on failure, or when any item ended that was not canceled (the run is void). */
static double cancel_cell(int port, bool transfers, unsigned n, unsigned k, double *wall_us)
{
    struct fetch_opts o;
    fetch_opts_default(&o);
    o.loops = 1;
    o.max_conns = 1;
    struct fetch *f;
    if (fetch_new(&o, &f) != 0)
        return -1;
    struct ctx **ctxs = calloc(n, sizeof(*ctxs));
    struct cancel_item *items = calloc(n + 2, sizeof(*items)); /* then the holder, a marker */
    struct ctx *holder = ctx_new(ctx_background(), CTX_FOREVER);
    struct loop_thread lt = {0};
    char hold[128];
    snprintf(hold, sizeof(hold), "http://127.0.0.1:%d/items/fault-silent", port);
    struct fetch_req hq = {.url = hold, .cb = cancel_cb, .arg = &items[n]};
    double cpu = -1;
    clockid_t clk;
    if (!ctxs || !items || !holder || fetch_after(f, 0, ctx_background(), 0, thread_cb, &lt))
        goto out;
    while (!atomic_load_explicit(&lt.seen, memory_order_acquire))
        sched_yield();
    if (pthread_getcpuclockid(lt.thread, &clk) != 0 ||
        (transfers && fetch_get(f, 0, holder, &hq) != 0) ||
        cancel_fill(f, port, transfers, n, ctxs, items) != 0)
        goto out;
    /* All admitted (and the holder connected) once a later zero-delay timer has run. */
    sleep_ms(50);
    if (fetch_after(f, 0, ctx_background(), 0, cancel_cb, &items[n + 1]) != 0)
        goto out;
    wait_called(&items[n + 1]);
    double c0 = thread_cpu_s(clk);
    int64_t t0 = ctx_now();
    for (unsigned i = 0; i < k; i++) {
        unsigned j = (unsigned)((uint64_t)i * n / k);
        ctx_cancel(ctxs[j], -ECANCELED);
        wait_called(&items[j]);
    }
    int64_t t1 = ctx_now();
    cpu = (thread_cpu_s(clk) - c0) * 1e6 / k;
    *wall_us = (double)(t1 - t0) * 1000.0 / k;
    unsigned ended = 0;
    for (unsigned i = 0; i <= n; i++)
        ended += atomic_load(&items[i].calls) != 0;
    if (ended != k || atomic_load(&items[0].err) != -ECANCELED)
        cpu = -2; /* something ended on its own: not the loop this measures */
out:
    ctx_cancel(holder, -ECANCELED);
    fetch_free(f);
    for (unsigned i = 0; ctxs && i < n; i++)
        ctx_free(ctxs[i]);
    ctx_free(holder);
    free(ctxs);
    free(items);
    return cpu;
}

static int cancel_table(int port)
{
    const char *e = getenv("BENCH_CANCEL_N");
    unsigned max_n = e ? (unsigned)atoi(e) : 100000;
    e = getenv("BENCH_CANCEL_K");
    unsigned k = e ? (unsigned)atoi(e) : 1000;
    printf("one loop; K = %u cancels, one at a time, each waited for\n\n", k);
    printf("%-10s %8s %22s %18s\n", "pending", "N", "loop CPU us/cancel", "wall us/cancel");
    for (int t = 0; t < 2; t++)
        for (unsigned n = 1000; n <= max_n; n *= 10) {
            double wall = 0, cpu = cancel_cell(port, t == 1, n < k ? k : n, k, &wall);
            if (cpu < 0) {
                fprintf(stderr, "bench_fetch: cancel run %s\n",
                        cpu < -1 ? "void: an item ended on its own" : "failed");
                return 1;
            }
            printf("%-10s %8u %22.2f %18.2f\n", t ? "transfers" : "timers", n < k ? k : n, cpu,
                   wall);
        }
    return 0;
}

static int serve_only(unsigned threads)
{
    struct upstub *s;
    if (upstub_new(threads, &s) != 0) {
        fprintf(stderr, "bench_fetch: cannot start the stub\n");
        return 1;
    }
    printf("%d\n", upstub_port(s));
    fflush(stdout);
    char buf[64];
    while (fread(buf, 1, sizeof(buf), stdin) > 0)
        ;
    upstub_free(s);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1)
        ncpu = 1;
    unsigned stub_threads = (unsigned)ncpu;
    if (argc > 1 && strcmp(argv[1], "--stub") == 0)
        return serve_only(argc > 2 ? (unsigned)atoi(argv[2]) : stub_threads);
    const char *env = getenv("BENCH_MS");
    int64_t window = env ? atoll(env) : 1000;
    if (window < 100)
        window = 100;

    int port = 0, ctl = -1;
    pid_t stub = 0;
    const char *given = getenv("BENCH_PORT");
    if (given) {
        port = atoi(given);
    } else {
        stub = upstub_spawn(stub_threads, &port, &ctl); /* before any thread in this process */
        if (stub < 0) {
            fprintf(stderr, "bench_fetch: cannot start the stub\n");
            return 1;
        }
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "bench_fetch: curl_global_init failed\n");
        return 1;
    }
    int failed = 0;
    if (argc > 1 && strcmp(argv[1], "--cancel") == 0) {
        failed = cancel_table(port);
        goto out;
    }
    static const unsigned concs[] = {1, 16, 256, 1000};
    enum { NCONC = sizeof(concs) / sizeof(concs[0]), REPS = 3 };
    unsigned loop_rows[2] = {1, (unsigned)ncpu};
    int nrows = ncpu > 1 ? 2 : 1;
    printf("fetch engine, HTTP/1.1 keep-alive GETs on loopback against tests/upstub.c\n");
    printf("(%ld CPUs shared by client and stub; stub: %s; max_conns 512; median of %d "
           "interleaved %lld ms windows per cell)\n\n",
           ncpu, stub > 0 ? "a child process" : "BENCH_PORT", REPS, (long long)window);
    /* Repetitions are interleaved so that a burst of outside load hits one run of many cells,
     * not every run of one cell. */
    struct cell cells[2][NCONC][REPS];
    const char *only = getenv("BENCH_CELL"); /* "loops:conc": run just that cell (profiling) */
    if (only) {
        unsigned lo = 0, co = 0;
        struct cell c;
        if (sscanf(only, "%u:%u", &lo, &co) != 2 || lo == 0 || co == 0 ||
            run_cell(port, lo, co, window, &c) != 0)
            return 1;
        printf("%-6u %6u %14.0f %20.1f %8llu %7llu\n", lo, co, c.rate, c.cpu_us,
               (unsigned long long)c.conns, (unsigned long long)c.errors);
        failed = c.errors != 0;
        goto out;
    }
    for (int rep = 0; rep < REPS; rep++)
        for (int r = 0; r < nrows; r++)
            for (int i = 0; i < NCONC; i++)
                if (run_cell(port, loop_rows[r], concs[i], window, &cells[r][i][rep]) != 0) {
                    fprintf(stderr, "bench_fetch: run failed\n");
                    return 1;
                }
    printf("%-6s %6s %14s %20s %8s %7s\n", "loops", "conc", "transfers/s", "client CPU us/xfer",
           "conns", "errors");
    for (int r = 0; r < nrows; r++) {
        for (int i = 0; i < NCONC; i++) {
            double rate[REPS], cpu[REPS];
            uint64_t errors = 0, conns = 0;
            for (int k = 0; k < REPS; k++) {
                rate[k] = cells[r][i][k].rate;
                cpu[k] = cells[r][i][k].cpu_us;
                errors += cells[r][i][k].errors;
                if (cells[r][i][k].conns > conns)
                    conns = cells[r][i][k].conns;
            }
            printf("%-6u %6u %14.0f %20.1f %8llu %7llu\n", loop_rows[r], concs[i], median3(rate),
                   median3(cpu), (unsigned long long)conns, (unsigned long long)errors);
            if (errors)
                failed = 1;
        }
    }
out:
    if (stub > 0) {
        close(ctl);
        waitpid(stub, NULL, 0);
    }
    ctx_shutdown();
    curl_global_cleanup();
    return failed;
}
