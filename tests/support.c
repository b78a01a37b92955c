/* Test support: the suite registry behind TEST_SUITE and /proc probes for leak checks. */
#include "tests/support.h"

#include <dirent.h>
#include <time.h>

#include "ctx/ctx.h"

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

int test_thread_count(void)
{
    return count_dir("/proc/self/task");
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
