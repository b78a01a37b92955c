/* Tests for fetch_loop_source(): a descriptor a fetch loop polls with curl's sockets (how a loop
 * serves its own HTTP daemon in the shared loop model), fetch_source_kick(), and
 * fetch_pick_loop() on a loop thread.
 *
 * The source's descriptor is a pipe the test writes to. Callbacks run on loop threads and only
 * record (atomics); the test thread waits with test_wait_until() and asserts afterwards. The
 * engines never poll on their own (idle poll of ten minutes), so a lost wakeup shows as a test
 * that waits out its bound. */
#include "fetch/fetch.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/support.h"

#define WAIT_MS test_ms(10000) /* bound for anything that should happen "soon" */

/* A source on a pipe: run() drains it and counts. */
struct src {
    struct fetch *f;
    int p[2];                /* the pipe: p[0] is the source's descriptor */
    atomic_int runs;         /* run() calls */
    atomic_int bytes;        /* bytes it read */
    atomic_int loop;         /* fetch_pick_loop() inside run(): its own loop's index */
    atomic_int want_timeout; /* how many more wake-ups timeout_ms() asks for */
    atomic_llong due_ms;     /* when the next one is due (monotonic ms), or -1 */
    atomic_int early;        /* run() calls before that time */
};

static void src_run(void *arg)
{
    struct src *s = arg;
    char buf[64];
    ssize_t n;
    while ((n = read(s->p[0], buf, sizeof(buf))) > 0)
        atomic_fetch_add(&s->bytes, (int)n);
    atomic_store(&s->loop, (int)fetch_pick_loop(s->f));
    /* Like a server's timer: due at a time; a run at or after it serves it, and asks for the
     * next one while any are wanted. The first run (when the source is set) asks for the
     * first. */
    int64_t now = ctx_now(), due = atomic_load(&s->due_ms);
    if (due >= 0 && now < due - 2) /* the loop may run it within a millisecond of the time */
        atomic_fetch_add(&s->early, 1);
    if (due < 0 || now >= due)
        atomic_store(&s->due_ms, atomic_fetch_sub(&s->want_timeout, 1) > 0 ? now + 20 : -1);
    atomic_fetch_add(&s->runs, 1);
}

static int64_t src_timeout(void *arg) /* asked before every sleep: the time left */
{
    struct src *s = arg;
    int64_t due = atomic_load(&s->due_ms), now = ctx_now();
    return due < 0 ? -1 : due > now ? due - now : 0;
}

static bool src_init(struct src *s, struct fetch *f)
{
    memset(s, 0, sizeof(*s));
    s->f = f;
    atomic_init(&s->loop, -1);
    atomic_init(&s->due_ms, -1);
    return pipe2(s->p, O_NONBLOCK | O_CLOEXEC) == 0;
}

static void src_destroy(struct src *s)
{
    close(s->p[0]);
    close(s->p[1]);
}

static int src_set(struct src *s, unsigned loop)
{
    struct fetch_source fs = {.fd = s->p[0], .run = src_run, .timeout_ms = src_timeout, .arg = s};
    return fetch_loop_source(s->f, loop, &fs);
}

static bool runs_at_least(void *arg) /* the run made when the source is set */
{
    return atomic_load(&((struct src *)arg)->runs) >= 1;
}

struct want {
    struct src *s;
    int bytes, runs;
};

static bool reached(void *arg)
{
    struct want *w = arg;
    return atomic_load(&w->s->bytes) >= w->bytes && atomic_load(&w->s->runs) >= w->runs;
}

static void test_source_descriptor_wakes_loop(void)
{
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    struct src s;
    CU_ASSERT_FATAL(src_init(&s, f));
    CU_ASSERT_EQUAL(src_set(&s, 1), 0);
    CU_ASSERT(test_wait_until(runs_at_least, &s, WAIT_MS)); /* run once when set */
    for (int i = 1; i <= 5; i++) { /* each write wakes the sleeping loop */
        CU_ASSERT_EQUAL(write(s.p[1], "x", 1), 1);
        struct want w = {.s = &s, .bytes = i, .runs = 1};
        CU_ASSERT(test_wait_until(reached, &w, WAIT_MS));
    }
    CU_ASSERT_EQUAL(atomic_load(&s.bytes), 5);
    CU_ASSERT_EQUAL(atomic_load(&s.loop), 1); /* on loop 1, whose pick is itself */
    fetch_free(f);
    src_destroy(&s);
}

static bool timeouts_served(void *arg) /* three wake-ups served, none asked for any more */
{
    struct src *s = arg;
    return atomic_load(&s->want_timeout) < 0 && atomic_load(&s->due_ms) < 0;
}

static void test_source_timeout(void)
{
    struct fetch *f = test_quiet_engine(1);
    CU_ASSERT_FATAL(f != NULL);
    struct src s;
    CU_ASSERT_FATAL(src_init(&s, f));
    atomic_store(&s.want_timeout, 3); /* nothing is ever written: only the timeouts run it */
    CU_ASSERT_EQUAL(src_set(&s, 0), 0);
    CU_ASSERT(test_wait_until(timeouts_served, &s, WAIT_MS));
    CU_ASSERT(atomic_load(&s.runs) >= 4); /* the run at set, then one per wake-up */
    CU_ASSERT_EQUAL(atomic_load(&s.early), 0); /* the loop did not run it long before */
    CU_ASSERT_EQUAL(atomic_load(&s.bytes), 0);
    fetch_free(f);
    src_destroy(&s);
}

/* A loop callback: kicks (or, with 'set', tries to set a source from the loop thread). */
struct on_loop {
    struct fetch *f;
    struct src *s;
    atomic_int done;
    atomic_int set_rc;
    atomic_int pick;
};

static void kick_cb(void *arg, struct fetch_result *r)
{
    (void)r;
    struct on_loop *o = arg;
    fetch_source_kick(o->f);
    struct fetch_source fs = {.fd = o->s->p[0], .run = src_run, .arg = o->s};
    atomic_store(&o->set_rc, fetch_loop_source(o->f, 0, &fs)); /* refused: it would wait */
    atomic_store(&o->pick, (int)fetch_pick_loop(o->f));
    atomic_store(&o->done, 1);
}

static bool on_loop_done(void *arg)
{
    return atomic_load(&((struct on_loop *)arg)->done) == 1;
}

static void test_source_kick_and_clear(void)
{
    struct fetch *f = test_quiet_engine(2);
    CU_ASSERT_FATAL(f != NULL);
    struct src s;
    CU_ASSERT_FATAL(src_init(&s, f));
    CU_ASSERT_EQUAL(src_set(&s, 1), 0);
    CU_ASSERT(test_wait_until(runs_at_least, &s, WAIT_MS));
    int before = atomic_load(&s.runs);
    /* A kick from a callback on the source's loop runs it again with nothing to read. */
    struct on_loop o = {.f = f, .s = &s};
    atomic_init(&o.pick, -1);
    CU_ASSERT_EQUAL(fetch_after(f, 1, ctx_background(), 0, kick_cb, &o), 0);
    CU_ASSERT(test_wait_until(on_loop_done, &o, WAIT_MS));
    struct want w = {.s = &s, .bytes = 0, .runs = before + 1};
    CU_ASSERT(test_wait_until(reached, &w, WAIT_MS));
    CU_ASSERT_EQUAL(atomic_load(&o.set_rc), -EINVAL);
    CU_ASSERT_EQUAL(atomic_load(&o.pick), 1);
    fetch_source_kick(f); /* off the loops: nothing */
    /* Cleared: once it returns, run() is never called again, even with input waiting. */
    CU_ASSERT_EQUAL(fetch_loop_source(f, 1, NULL), 0);
    int runs = atomic_load(&s.runs);
    CU_ASSERT_EQUAL(write(s.p[1], "y", 1), 1);
    struct on_loop o2 = {.f = f, .s = &s}; /* a kick too, then a pass of the loop to see it */
    CU_ASSERT_EQUAL(fetch_after(f, 1, ctx_background(), 0, kick_cb, &o2), 0);
    CU_ASSERT(test_wait_until(on_loop_done, &o2, WAIT_MS));
    struct on_loop o3 = {.f = f, .s = &s};
    CU_ASSERT_EQUAL(fetch_after(f, 1, ctx_background(), 0, kick_cb, &o3), 0);
    CU_ASSERT(test_wait_until(on_loop_done, &o3, WAIT_MS));
    CU_ASSERT_EQUAL(atomic_load(&s.runs), runs);
    CU_ASSERT_EQUAL(atomic_load(&s.bytes), 0);
    fetch_free(f);
    src_destroy(&s);
}

static void test_source_bad_arguments(void)
{
    struct fetch *f = test_quiet_engine(1);
    CU_ASSERT_FATAL(f != NULL);
    struct src s;
    CU_ASSERT_FATAL(src_init(&s, f));
    struct fetch_source fs = {.fd = s.p[0], .run = src_run, .arg = &s};
    CU_ASSERT_EQUAL(fetch_loop_source(f, 1, &fs), -EINVAL); /* no loop 1 */
    fs.run = NULL;
    CU_ASSERT_EQUAL(fetch_loop_source(f, 0, &fs), -EINVAL);
    fs.run = src_run;
    fs.fd = -1;
    CU_ASSERT_EQUAL(fetch_loop_source(f, 0, &fs), -EINVAL);
    CU_ASSERT_EQUAL(fetch_loop_source(f, 0, NULL), 0); /* clearing none is fine */
    fetch_free(f);
    CU_ASSERT_EQUAL(atomic_load(&s.runs), 0);
    src_destroy(&s);
}

static CU_TestInfo source_tests[] = {
    {"a source's descriptor wakes its loop; run() on that loop, whose pick is itself",
     test_source_descriptor_wakes_loop},
    {"timeout_ms(): run() once the time asked for has passed", test_source_timeout},
    {"kick from a loop callback runs it; cleared: never run again", test_source_kick_and_clear},
    {"bad arguments: -EINVAL", test_source_bad_arguments},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(source, source_tests)
