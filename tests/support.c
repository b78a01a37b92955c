/* Test support: the suite registry behind TEST_SUITE, /proc probes for leak checks, and a quiet
 * fetch engine. */
#include "tests/support.h"

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"

static struct test_suite *suites;

void test_register(struct test_suite *s)
{
    struct test_suite **p = &suites;
    while (*p) /* keep file order stable: append */
        p = &(*p)->next;
    *p = s;
}

struct test_suite *test_suites(void);
struct test_suite *test_suites(void)
{
    return suites;
}

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

uint64_t test_rng(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

#if defined(__SANITIZE_THREAD__)
#define SAN_MULT 3.0
#elif defined(__SANITIZE_ADDRESS__)
#define SAN_MULT 2.0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SAN_MULT 3.0
#elif __has_feature(address_sanitizer)
#define SAN_MULT 2.0
#endif
#endif
#ifndef SAN_MULT
#define SAN_MULT 1.0
#endif

static double mult;              /* set once by mult_init */
static pthread_once_t mult_once = PTHREAD_ONCE_INIT;

static void mult_init(void)
{
    const char *s = getenv("FANOUT_TEST_MULT");
    char *end = NULL;
    double env = s && *s ? strtod(s, &end) : 1.0;
    if (!(env > 0 && env <= 1000) || (end && *end)) {
        fprintf(stderr, "FANOUT_TEST_MULT=%s: not a number in (0, 1000]; using 1\n", s);
        env = 1.0;
    }
    mult = env * SAN_MULT;
}

double test_mult(void)
{
    pthread_once(&mult_once, mult_init);
    return mult;
}

int64_t test_ms(int64_t ms)
{
    return (int64_t)((double)ms * test_mult());
}

#define PF_EXITING 0x00000004 /* include/linux/sched.h: the task is in do_exit() */

/* True if /proc/self/task/<tid>/stat says the task has not started exiting. A task that
 * vanished while we read counts as exited. */
static bool task_live(const char *tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/self/task/%s/stat", tid);
    FILE *f = fopen(path, "re");
    if (!f)
        return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* pid (comm) state ppid pgrp session tty_nr tpgid flags ...; comm may hold spaces and ')' */
    const char *p = strrchr(buf, ')');
    if (!p)
        return false;
    char state;
    int ppid, pgrp, session, tty, tpgid;
    unsigned flags;
    if (sscanf(p + 1, " %c %d %d %d %d %d %u", &state, &ppid, &pgrp, &session, &tty, &tpgid,
               &flags) != 7)
        return false;
    return !(flags & PF_EXITING) && state != 'Z' && state != 'X';
}

int test_thread_count(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.' && task_live(e->d_name))
            n++;
    closedir(d);
    return n;
}

int test_fd_count(void)
{
    return count_dir("/proc/self/fd") - 1; /* the DIR's own fd */
}

bool test_wait_until(bool (*cond)(void *), void *arg, int64_t ms)
{
    int64_t end = ctx_now() + ms;
    for (;;) {
        if (cond(arg))
            return true;
        if (ctx_now() >= end)
            return cond(arg);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

struct settle {
    int threads, fds;
};

static bool settled(void *arg)
{
    const struct settle *s = arg;
    return test_thread_count() == s->threads && test_fd_count() == s->fds;
}

bool test_settles_to(int threads, int fds, int64_t ms)
{
    struct settle s = {threads, fds};
    return test_wait_until(settled, &s, ms);
}

uint64_t test_load(const atomic_uint_fast64_t *a)
{
    return atomic_load_explicit(a, memory_order_relaxed);
}

struct counter_want {
    const atomic_uint_fast64_t *a;
    uint64_t n;
};

static bool counter_reached(void *arg)
{
    struct counter_want *w = arg;
    return test_load(w->a) >= w->n;
}

bool test_wait_counter(const atomic_uint_fast64_t *a, uint64_t n, int64_t ms)
{
    struct counter_want w = {a, n};
    return test_wait_until(counter_reached, &w, ms);
}

void test_key_ranked(const struct upstreams *u, unsigned first, int second, char *out,
                     size_t cap)
{
    for (unsigned i = 0;; i++) {
        snprintf(out, cap, "k%u", i);
        uint16_t rank[UPSTREAM_MEMBERS_MAX];
        upstreams_rank(u, out, strlen(out), ctx_now(), rank);
        if (rank[0] == first && (second < 0 || rank[1] == (unsigned)second))
            return;
    }
}

unsigned test_pick(struct upstreams *u, const char *key, unsigned k, int64_t now_ms)
{
    struct upstream_key uk;
    upstream_key_init(u, key, strlen(key), &uk);
    uint16_t tried[8];
    unsigned n = 0, m = UPSTREAM_NONE;
    for (unsigned i = 0; i <= k; i++) {
        m = upstreams_pick(u, &uk, tried, n, now_ms);
        if (m == UPSTREAM_NONE)
            break;
        if (n == 8) {
            memmove(tried, tried + 1, 7 * sizeof(tried[0]));
            n--;
        }
        tried[n++] = (uint16_t)m;
    }
    return m;
}

struct fetch *test_quiet_engine(unsigned loops)
{
    struct fetch_opts o;
    fetch_opts_default(&o);
    o.loops = loops;
    o.max_conns = loops;
    o.idle_poll_ms = 600000;
    struct fetch *f = NULL;
    return fetch_new(&o, &f) == 0 ? f : NULL;
}
