/* bench_core: micro-benchmarks of ctx/ and pool/ (own main; `make bench` runs it, < 60 s).
 *
 * Each row runs its operation N times, three times over, and reports the median run: total
 * time, ns per operation and operations per second. Rows:
 *   ctx_new+ctx_free            a child of ctx_background(), and of a live cancelable parent
 *   10k tree                    build a 10,000-node tree (root, 100 kids, 99 grandkids each),
 *                               cancel the root, free every node; per tree and per node
 *   eg_go+eg_wait               100,000 trivial tasks on a 4-thread pool, limit 4 and no limit
 *   eg_go_async+eg_complete     async tasks, completed on the same thread, and on another thread
 *                               (handed over through a chan)
 *   chan send/recv              items between two threads, cap 1024 and cap 1
 *   10k tree again, trim off    glibc returns a freed tree's memory to the kernel (brk) and
 *                               page-faults it back on the next build, which dominates the first
 *                               tree rows; the last rows rerun them with trimming off (mallopt)
 * Optional argument: a multiplier for every N (e.g. 0.1 for a quick run). */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ctx/ctx.h"
#include "pool/chan.h"
#include "pool/errgroup.h"
#include "pool/pool.h"

static double scale = 1.0;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long scaled(long n)
{
    long s = (long)((double)n * scale);
    return s < 1 ? 1 : s;
}

/* Runs fn(n) three times; returns the median elapsed ns. fn returns its own elapsed ns so that
 * setup can stay outside the measurement. */
static int64_t median3(int64_t (*fn)(long), long n)
{
    int64_t t[3];
    for (int i = 0; i < 3; i++)
        t[i] = fn(n);
    for (int i = 0; i < 2; i++)
        for (int j = i + 1; j < 3; j++)
            if (t[j] < t[i]) {
                int64_t x = t[i];
                t[i] = t[j];
                t[j] = x;
            }
    return t[1];
}

static void row(const char *name, long n, const char *unit, int64_t ns)
{
    double per = (double)ns / (double)n;
    printf("%-48s %9ld %-6s %9.3f s %12.1f ns %14.0f /s\n", name, n, unit, (double)ns / 1e9, per,
           1e9 / per);
}

/* ---------------------------------------------------------------- ctx */

static int64_t b_ctx_bg(long n)
{
    int64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        ctx_free(ctx_new(ctx_background(), CTX_FOREVER));
    return now_ns() - t0;
}

static int64_t b_ctx_parent(long n)
{
    struct ctx *p = ctx_new(ctx_background(), CTX_FOREVER);
    int64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        ctx_free(ctx_new(p, CTX_FOREVER));
    int64_t t = now_ns() - t0;
    ctx_free(p);
    return t;
}

enum { TREE_KIDS = 100, TREE_GRAND = 99, TREE_NODES = 1 + TREE_KIDS * (1 + TREE_GRAND) };

static struct ctx *tree[TREE_NODES];
static int64_t tree_build_ns, tree_cancel_ns, tree_free_ns;

static int64_t b_tree(long n)
{
    tree_build_ns = tree_cancel_ns = tree_free_ns = 0;
    int64_t total = 0;
    for (long r = 0; r < n; r++) {
        int64_t t0 = now_ns();
        int k = 0;
        tree[k++] = ctx_new(ctx_background(), CTX_FOREVER);
        for (int i = 0; i < TREE_KIDS; i++) {
            struct ctx *kid = tree[k++] = ctx_new(tree[0], CTX_FOREVER);
            for (int j = 0; j < TREE_GRAND; j++)
                tree[k++] = ctx_new(kid, CTX_FOREVER);
        }
        int64_t t1 = now_ns();
        ctx_cancel(tree[0], -ECANCELED);
        int64_t t2 = now_ns();
        for (int i = TREE_NODES - 1; i >= 0; i--)
            ctx_free(tree[i]);
        int64_t t3 = now_ns();
        tree_build_ns += t1 - t0;
        tree_cancel_ns += t2 - t1;
        tree_free_ns += t3 - t2;
        total += t3 - t0;
    }
    return total;
}

static void tree_rows(const char *what, long trees)
{
    char name[64];
    int64_t t = median3(b_tree, trees);
    snprintf(name, sizeof(name), "%s: build+cancel+free, per tree", what);
    row(name, trees, "tree", t);
    snprintf(name, sizeof(name), "%s: build+cancel+free, per node", what);
    row(name, trees * TREE_NODES, "node", t);
    b_tree(trees); /* phases of one more run, per node */
    row("  of which build (ctx_new), per node", trees * TREE_NODES, "node", tree_build_ns);
    row("  of which cancel from the root, per node", trees * TREE_NODES, "node", tree_cancel_ns);
    row("  of which ctx_free, per node", trees * TREE_NODES, "node", tree_free_ns);
}

/* ---------------------------------------------------------------- errgroup, thread tasks */

static struct pool *bench_pool;
static int eg_limit;

static int nop_task(struct ctx *c, void *arg)
{
    (void)c;
    (void)arg;
    return 0;
}

static int64_t b_eg_go(long n)
{
    int64_t t0 = now_ns();
    struct eg *g = eg_new(ctx_background(), bench_pool);
    eg_set_limit(g, eg_limit);
    for (long i = 0; i < n; i++)
        if (eg_go(g, nop_task, NULL) != 0)
            abort();
    if (eg_wait(g) != 0)
        abort();
    eg_free(g);
    return now_ns() - t0;
}

/* ---------------------------------------------------------------- errgroup, async tasks */

static int start_hold(struct eg *g, struct ctx *c, void *arg)
{
    (void)g;
    (void)c;
    (void)arg;
    return 0;
}

static int64_t b_async_same(long n)
{
    struct eg *g = eg_new(ctx_background(), NULL);
    int64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        eg_go_async(g, start_hold, NULL);
        eg_complete(g, 0);
    }
    int64_t t = now_ns() - t0;
    eg_wait(g);
    eg_free(g);
    return t;
}

/* Limit 1, all queued first, each completing inside its start: the trampoline path. */
static int start_complete(struct eg *g, struct ctx *c, void *arg)
{
    (void)c;
    (void)arg;
    eg_complete(g, 0);
    return 0;
}

static int64_t b_async_queued(long n)
{
    struct eg *g = eg_new(ctx_background(), NULL);
    eg_set_limit(g, 1);
    int64_t t0 = now_ns();
    eg_go_async(g, start_hold, NULL);
    for (long i = 1; i < n; i++)
        eg_go_async(g, start_complete, NULL);
    eg_complete(g, 0); /* runs the whole queue */
    int64_t t = now_ns() - t0;
    eg_wait(g);
    eg_free(g);
    return t;
}

static struct chan *handoff;

static int start_handoff(struct eg *g, struct ctx *c, void *arg)
{
    (void)c;
    (void)arg;
    return chan_send(handoff, g, NULL);
}

static void *completer(void *arg)
{
    (void)arg;
    void *it;
    while (chan_recv(handoff, &it, NULL) == 0)
        eg_complete(it, 0);
    return NULL;
}

static int64_t b_async_cross(long n)
{
    handoff = chan_new(1024);
    pthread_t t;
    pthread_create(&t, NULL, completer, NULL);
    int64_t t0 = now_ns();
    struct eg *g = eg_new(ctx_background(), NULL);
    eg_set_limit(g, 256);
    for (long i = 0; i < n; i++)
        eg_go_async(g, start_handoff, NULL);
    if (eg_wait(g) != 0)
        abort();
    int64_t el = now_ns() - t0;
    eg_free(g);
    chan_close(handoff);
    pthread_join(t, NULL);
    chan_free(handoff);
    return el;
}

/* ---------------------------------------------------------------- chan */

static size_t chan_cap;

static void *receiver(void *arg)
{
    struct chan *ch = arg;
    void *it;
    while (chan_recv(ch, &it, NULL) == 0)
        ;
    return NULL;
}

static int64_t b_chan(long n)
{
    struct chan *ch = chan_new(chan_cap);
    pthread_t t;
    pthread_create(&t, NULL, receiver, ch);
    int64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        chan_send(ch, (void *)(uintptr_t)(i + 1), NULL);
    chan_close(ch);
    pthread_join(t, NULL);
    int64_t el = now_ns() - t0;
    chan_free(ch);
    return el;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        scale = strtod(argv[1], NULL);
    if (scale <= 0)
        scale = 1.0;
    int64_t start = now_ns();
    printf("fanout core benchmarks (median of 3 runs; scale %.2f)\n", scale);
    printf("%-48s %9s %-6s %11s %15s %16s\n", "operation", "N", "unit", "total", "per unit",
           "rate");

    long n = scaled(1000000);
    row("ctx_new(background)+ctx_free", n, "ctx", median3(b_ctx_bg, n));
    row("ctx_new(live parent)+ctx_free", n, "ctx", median3(b_ctx_parent, n));

    long trees = scaled(100);
    tree_rows("10k tree", trees);

    bench_pool = pool_new(4, 1024);
    n = scaled(100000);
    eg_limit = 4;
    row("eg_go+eg_wait, 4-thread pool, limit 4", n, "task", median3(b_eg_go, n));
    eg_limit = -1;
    row("eg_go+eg_wait, 4-thread pool, no limit", n, "task", median3(b_eg_go, n));
    pool_free(bench_pool);

    n = scaled(1000000);
    row("eg_go_async+eg_complete, same thread", n, "task", median3(b_async_same, n));
    row("eg_go_async queued, completes in start (lim 1)", n, "task", median3(b_async_queued, n));
    n = scaled(200000);
    row("eg_go_async+eg_complete, other thread (chan)", n, "task", median3(b_async_cross, n));

    n = scaled(1000000);
    chan_cap = 1024;
    row("chan send/recv, 2 threads, cap 1024", n, "item", median3(b_chan, n));
    n = scaled(100000);
    chan_cap = 1;
    row("chan send/recv, 2 threads, cap 1", n, "item", median3(b_chan, n));

    mallopt(M_TRIM_THRESHOLD, 1 << 30); /* last: it changes the allocator for good */
    tree_rows("10k tree, trim off", trees);

    ctx_shutdown();
    printf("total %.1f s\n", (double)(now_ns() - start) / 1e9);
    return 0;
}
