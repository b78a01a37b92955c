/* ctx: Go's context.Context in C.
 *
 * DESIGN
 * Each ctx has its own mutex and condition variable. The mutex guards the list of live children,
 * the list of armed hooks and the hook being run; the cause ('err') is an atomic written once
 * under the mutex and read without it. Cancellation never holds two ctx locks: it records the
 * cause and detaches the children under the ctx's lock, then runs the hooks with no lock held,
 * then unlinks the ctx from its parent under the parent's lock, then does the same to each
 * detached child. Detached children form a chain (through their sibling links, which nobody else
 * touches once detached), so canceling a deep or wide tree uses no recursion.
 *
 * References: the creator holds one; a child holds one on its parent (parent pointers are fixed
 * for life, so values are read without locks); a parent holds one on each linked child until the
 * child is canceled or detached; the timer heap holds one on each ctx in it. The last unref
 * frees, then drops the ctx's reference on its parent (a loop, not recursion).
 *
 * Deadlines: a ctx whose own deadline is earlier than its parent's goes into a min-heap served by
 * one timer thread, which cancels it with -ETIMEDOUT when the deadline passes, so hooks fire on
 * time even when nobody waits. A child whose deadline is the parent's (clamped) needs no entry:
 * the parent's expiry reaches it. The thread starts with the first entry and ctx_shutdown()
 * stops and joins it.
 *
 * Lock order: a ctx's mu may be held while taking the timer's mu (never the reverse), and a child
 * never takes its parent's mu while holding its own. */
#include "ctx/ctx.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

enum { HOOK_IDLE = 0, HOOK_ARMED = 1, HOOK_FIRED = 2 };

/* A hook being run, recorded on the runner's stack (never inside the hook, which its fn may
 * free), so ctx_hook_remove() can wait for it. Several may run at once: the canceling thread's
 * run_hooks() and any number of ctx_hook_add() calls on a ctx already done. */
struct hook_run {
    const struct ctx_hook *h; /* the hook */
    pthread_t tid;            /* the thread running it */
    struct hook_run *next;    /* next record on the ctx */
};

struct ctx {
    atomic_uint refs;        /* references; the last ctx_unref() frees */
    atomic_int err;          /* 0 or the cause; written once, under mu */
    pthread_mutex_t mu;      /* guards kids, linked of kids, hooks, runs */
    pthread_cond_t cv;       /* broadcast when done and when a hook finishes running */
    struct ctx *parent;      /* NULL for children of ctx_background(); we hold a reference */
    int64_t deadline;        /* effective deadline, or CTX_FOREVER; fixed */
    bool timed;              /* has its own timer entry; fixed after creation */
    long heap_idx;           /* index in the timer heap or -1; guarded by the timer's mu */
    struct ctx *kids;        /* first linked child; guarded by mu */
    struct ctx *sib_prev;    /* sibling links; guarded by the parent's mu while linked, owned by */
    struct ctx *sib_next;    /* the canceling thread once detached */
    bool linked;             /* on the parent's kids list; guarded by the parent's mu */
    struct ctx_hook *hooks;  /* armed hooks, oldest first; guarded by mu */
    struct ctx_hook *hooks_tail; /* last armed hook; guarded by mu */
    struct hook_run *runs;   /* hooks running now; guarded by mu */
    const void *key;         /* value key (has_value only); fixed */
    void *val;               /* the value; fixed */
    bool has_value;          /* created by ctx_with_value(); fixed */
};

/* The background ctx: never done, never freed; every function treats it as a constant. */
static struct ctx background = {.deadline = CTX_FOREVER, .heap_idx = -1};

/* Condition variables wait on CLOCK_MONOTONIC so deadlines are immune to wall-clock changes. */
static pthread_condattr_t mono_attr;
static pthread_once_t mono_once = PTHREAD_ONCE_INIT;

static void mono_init(void)
{
    pthread_condattr_init(&mono_attr);
    pthread_condattr_setclock(&mono_attr, CLOCK_MONOTONIC);
}

static int cond_init(pthread_cond_t *cv)
{
    pthread_once(&mono_once, mono_init);
    return pthread_cond_init(cv, &mono_attr);
}

static struct timespec abs_ts(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    return ts;
}

int64_t ctx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct ctx *ctx_background(void)
{
    return &background;
}

/* ---------------------------------------------------------------- timer thread */

static struct {
    pthread_mutex_t mu;  /* guards everything below and every ctx's heap_idx */
    pthread_cond_t cv;   /* signalled when the earliest deadline changes or on stop */
    bool cv_ready;       /* cv initialised */
    struct ctx **heap;   /* min-heap by deadline */
    size_t n, cap;       /* entries, allocated slots */
    pthread_t thread;    /* the timer thread, while running */
    bool running;        /* thread started and not yet joined */
    bool stop;           /* asks the thread to exit */
} tm = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void heap_set(size_t i, struct ctx *c)
{
    tm.heap[i] = c;
    c->heap_idx = (long)i;
}

static void heap_up(size_t i)
{
    struct ctx *c = tm.heap[i];
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (tm.heap[up]->deadline <= c->deadline)
            break;
        heap_set(i, tm.heap[up]);
        i = up;
    }
    heap_set(i, c);
}

static void heap_down(size_t i)
{
    struct ctx *c = tm.heap[i];
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        int64_t best = c->deadline;
        if (l < tm.n && tm.heap[l]->deadline < best)
            m = l, best = tm.heap[l]->deadline;
        if (l + 1 < tm.n && tm.heap[l + 1]->deadline < best)
            m = l + 1;
        if (m == i)
            break;
        heap_set(i, tm.heap[m]);
        i = m;
    }
    heap_set(i, c);
}

static void heap_delete(size_t i)
{
    tm.heap[i]->heap_idx = -1;
    tm.n--;
    if (i == tm.n)
        return;
    heap_set(i, tm.heap[tm.n]);
    heap_down(i);
    heap_up((size_t)tm.heap[i]->heap_idx);
}

static void *timer_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&tm.mu);
    while (!tm.stop) {
        if (tm.n == 0) {
            pthread_cond_wait(&tm.cv, &tm.mu);
            continue;
        }
        struct ctx *c = tm.heap[0];
        if (c->deadline > ctx_now()) {
            struct timespec ts = abs_ts(c->deadline);
            pthread_cond_timedwait(&tm.cv, &tm.mu, &ts);
            continue;
        }
        heap_delete(0); /* its reference is now ours */
        pthread_mutex_unlock(&tm.mu);
        ctx_cancel(c, -ETIMEDOUT);
        ctx_unref(c);
        pthread_mutex_lock(&tm.mu);
    }
    pthread_mutex_unlock(&tm.mu);
    return NULL;
}

/* Puts 'c' in the heap with a new reference. Returns false if it could not (out of memory or no
 * thread); the deadline is then enforced only by waiters and transfers. */
static bool timer_add(struct ctx *c)
{
    bool ok = false;
    pthread_mutex_lock(&tm.mu);
    if (!tm.cv_ready) {
        if (cond_init(&tm.cv) != 0)
            goto out;
        tm.cv_ready = true;
    }
    if (!tm.running) {
        tm.stop = false;
        if (pthread_create(&tm.thread, NULL, timer_main, NULL) != 0)
            goto out;
        tm.running = true;
    }
    if (tm.n == tm.cap) {
        size_t cap = tm.cap ? tm.cap * 2 : 64;
        struct ctx **h = realloc(tm.heap, cap * sizeof(*h));
        if (!h)
            goto out;
        tm.heap = h;
        tm.cap = cap;
    }
    ctx_ref(c);
    heap_set(tm.n, c);
    tm.n++;
    heap_up(tm.n - 1);
    if (c->heap_idx == 0)
        pthread_cond_signal(&tm.cv);
    ok = true;
out:
    pthread_mutex_unlock(&tm.mu);
    return ok;
}

static void timer_remove(struct ctx *c)
{
    bool had = false;
    pthread_mutex_lock(&tm.mu);
    if (c->heap_idx >= 0) {
        heap_delete((size_t)c->heap_idx);
        had = true;
    }
    pthread_mutex_unlock(&tm.mu);
    if (had)
        ctx_unref(c);
}

void ctx_shutdown(void)
{
    pthread_mutex_lock(&tm.mu);
    bool running = tm.running;
    tm.stop = true;
    if (tm.cv_ready)
        pthread_cond_signal(&tm.cv);
    pthread_mutex_unlock(&tm.mu);
    if (running)
        pthread_join(tm.thread, NULL);

    pthread_mutex_lock(&tm.mu);
    tm.running = false;
    tm.stop = false;
    struct ctx **heap = tm.heap;
    size_t n = tm.n;
    for (size_t i = 0; i < n; i++)
        heap[i]->heap_idx = -1;
    tm.heap = NULL;
    tm.n = tm.cap = 0;
    pthread_mutex_unlock(&tm.mu);
    for (size_t i = 0; i < n; i++)
        ctx_unref(heap[i]);
    free(heap);
}

/* ---------------------------------------------------------------- references */

struct ctx *ctx_ref(struct ctx *c)
{
    if (c && c != &background)
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    return c;
}

void ctx_unref(struct ctx *c)
{
    while (c && c != &background) {
        if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1)
            return;
        struct ctx *parent = c->parent;
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
        free(c);
        c = parent; /* drop the reference the child held on it */
    }
}

/* ---------------------------------------------------------------- creation */

static struct ctx *ctx_alloc(struct ctx *parent, int64_t deadline)
{
    if (!parent)
        parent = &background;
    struct ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    if (pthread_mutex_init(&c->mu, NULL) != 0)
        goto fail_free;
    if (cond_init(&c->cv) != 0)
        goto fail_mutex;
    atomic_init(&c->refs, 1);
    atomic_init(&c->err, 0);
    c->heap_idx = -1;

    int64_t pd = parent->deadline;
    if (deadline < 0 || (pd != CTX_FOREVER && pd <= deadline)) {
        c->deadline = pd; /* clamped: the parent's expiry reaches us */
    } else {
        c->deadline = deadline;
        c->timed = true;
    }
    if (parent != &background)
        c->parent = ctx_ref(parent);
    return c;
fail_mutex:
    pthread_mutex_destroy(&c->mu);
fail_free:
    free(c);
    return NULL;
}

/* Links a new ctx under its parent and arms its timer, or marks it done at once when the parent
 * already is (the parent's cause: it came first) or its deadline has passed. */
static struct ctx *ctx_attach(struct ctx *c)
{
    bool past = c->timed && c->deadline <= ctx_now();
    struct ctx *p = c->parent;
    int err = past ? -ETIMEDOUT : 0;
    if (p) {
        pthread_mutex_lock(&p->mu);
        int perr = atomic_load(&p->err);
        if (perr) {
            err = perr;
        } else if (!past) {
            ctx_ref(c); /* the parent's reference on a linked child */
            c->linked = true;
            c->sib_prev = NULL;
            c->sib_next = p->kids;
            if (p->kids)
                p->kids->sib_prev = c;
            p->kids = c;
        }
        pthread_mutex_unlock(&p->mu);
    }
    if (err) {
        atomic_store(&c->err, err);
        return c;
    }
    if (c->timed) {
        timer_add(c); /* on failure waiters and transfers still honour the deadline value */
        /* A cancel through the parent between the link above and timer_add() found no timer
         * entry to remove: take ours out, or the heap would keep the ctx until its deadline. */
        if (atomic_load(&c->err) != 0)
            timer_remove(c);
    }
    return c;
}

struct ctx *ctx_new(struct ctx *parent, int64_t deadline)
{
    struct ctx *c = ctx_alloc(parent, deadline);
    return c ? ctx_attach(c) : NULL;
}

struct ctx *ctx_with_timeout(struct ctx *parent, int64_t ms)
{
    int64_t now = ctx_now();
    if (ms < 0)
        return ctx_new(parent, CTX_FOREVER);
    return ctx_new(parent, ms > INT64_MAX - now ? INT64_MAX : now + ms);
}

struct ctx *ctx_with_value(struct ctx *parent, const void *key, void *val)
{
    struct ctx *c = ctx_alloc(parent, CTX_FOREVER);
    if (!c)
        return NULL;
    c->key = key;
    c->val = val;
    c->has_value = true;
    return ctx_attach(c);
}

void *ctx_value(const struct ctx *c, const void *key)
{
    for (; c && c != &background; c = c->parent)
        if (c->has_value && c->key == key)
            return c->val;
    return NULL;
}

/* ---------------------------------------------------------------- cancellation */

/* With c->mu held: records that this thread runs 'h' now. */
static void run_begin(struct ctx *c, struct hook_run *run, const struct ctx_hook *h)
{
    run->h = h;
    run->tid = pthread_self();
    run->next = c->runs;
    c->runs = run;
}

/* With c->mu held: the run is over; wakes ctx_hook_remove() callers waiting for it. */
static void run_end(struct ctx *c, struct hook_run *run)
{
    struct hook_run **p = &c->runs;
    while (*p != run)
        p = &(*p)->next;
    *p = run->next;
    pthread_cond_broadcast(&c->cv);
}

/* With c->mu held: whether another thread is running 'h' now. */
static bool running_elsewhere(const struct ctx *c, const struct ctx_hook *h)
{
    for (const struct hook_run *r = c->runs; r; r = r->next)
        if (r->h == h && !pthread_equal(r->tid, pthread_self()))
            return true;
    return false;
}

static void run_hooks(struct ctx *c)
{
    pthread_mutex_lock(&c->mu);
    struct ctx_hook *h;
    while ((h = c->hooks) != NULL) {
        c->hooks = h->_next;
        if (c->hooks)
            c->hooks->_prev = NULL;
        else
            c->hooks_tail = NULL;
        h->_state = HOOK_FIRED;
        struct hook_run run;
        run_begin(c, &run, h);
        void (*fn)(void *) = h->_fn;
        void *arg = h->_arg;
        pthread_mutex_unlock(&c->mu);
        fn(arg); /* may free the memory holding h */
        pthread_mutex_lock(&c->mu);
        run_end(c, &run);
    }
    pthread_mutex_unlock(&c->mu);
}

/* Cancels one ctx. Its detached children (each carrying the reference its list held) are
 * prepended to *chain. Returns false if it was already done. */
static bool cancel_one(struct ctx *c, int cause, struct ctx **chain)
{
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->err) != 0) {
        pthread_mutex_unlock(&c->mu);
        return false;
    }
    atomic_store(&c->err, cause);
    pthread_cond_broadcast(&c->cv);
    struct ctx *kids = c->kids;
    c->kids = NULL;
    struct ctx *last = NULL;
    for (struct ctx *k = kids; k; k = k->sib_next) {
        k->linked = false;
        last = k;
    }
    pthread_mutex_unlock(&c->mu);

    run_hooks(c);
    if (c->timed)
        timer_remove(c);

    struct ctx *p = c->parent;
    if (p) {
        bool drop = false;
        pthread_mutex_lock(&p->mu);
        if (c->linked) {
            if (c->sib_prev)
                c->sib_prev->sib_next = c->sib_next;
            else
                p->kids = c->sib_next;
            if (c->sib_next)
                c->sib_next->sib_prev = c->sib_prev;
            c->linked = false;
            drop = true;
        }
        pthread_mutex_unlock(&p->mu);
        if (drop)
            ctx_unref(c); /* the parent's reference; the caller still holds one */
    }
    if (last) {
        last->sib_next = *chain;
        *chain = kids;
    }
    return true;
}

void ctx_cancel(struct ctx *c, int cause)
{
    if (!c || c == &background)
        return;
    if (cause >= 0)
        cause = -ECANCELED;
    struct ctx *chain = NULL;
    if (!cancel_one(c, cause, &chain))
        return;
    while (chain) {
        struct ctx *k = chain;
        chain = k->sib_next;
        cancel_one(k, cause, &chain);
        ctx_unref(k); /* the reference the parent's list held */
    }
}

int ctx_err(const struct ctx *c)
{
    if (!c || c == &background)
        return 0;
    return atomic_load_explicit(&c->err, memory_order_acquire);
}

int64_t ctx_deadline(const struct ctx *c)
{
    return c ? c->deadline : CTX_FOREVER;
}

int64_t ctx_remaining(const struct ctx *c)
{
    int64_t d = ctx_deadline(c);
    if (d == CTX_FOREVER)
        return CTX_FOREVER;
    int64_t left = d - ctx_now();
    return left > 0 ? left : 0;
}

int ctx_wait(struct ctx *c, int64_t until)
{
    if (!c)
        c = &background;
    if (c == &background) {
        /* Never done: just sleep until 'until' (forever means a very long sleep loop). */
        for (;;) {
            int64_t now = ctx_now();
            if (until != CTX_FOREVER && now >= until)
                return 0;
            int64_t step = until == CTX_FOREVER ? 3600000 : until - now;
            struct timespec ts = {.tv_sec = step / 1000, .tv_nsec = (step % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    bool expired = false;
    pthread_mutex_lock(&c->mu);
    while (atomic_load(&c->err) == 0) {
        int64_t wake = until;
        if (c->deadline != CTX_FOREVER && (wake == CTX_FOREVER || c->deadline < wake))
            wake = c->deadline;
        if (wake == CTX_FOREVER) {
            pthread_cond_wait(&c->cv, &c->mu);
            continue;
        }
        int64_t now = ctx_now();
        if (now >= wake) {
            expired = c->deadline != CTX_FOREVER && now >= c->deadline;
            break;
        }
        struct timespec ts = abs_ts(wake);
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    pthread_mutex_unlock(&c->mu);
    if (expired) /* do not wait for the timer thread: the deadline is a fact now */
        ctx_cancel(c, -ETIMEDOUT);
    return ctx_err(c);
}

void ctx_free(struct ctx *c)
{
    if (!c || c == &background)
        return;
    ctx_cancel(c, -ECANCELED);
    ctx_unref(c);
}

/* ---------------------------------------------------------------- hooks */

int ctx_hook_add(struct ctx *c, struct ctx_hook *h, void (*fn)(void *), void *arg)
{
    if (!c || !h || !fn)
        return -EINVAL;
    h->_fn = fn;
    h->_arg = arg;
    h->_next = h->_prev = NULL;
    if (c == &background) { /* never fires */
        h->_state = HOOK_ARMED;
        return 0;
    }
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->err) != 0) {
        h->_state = HOOK_FIRED;
        struct hook_run run; /* so that a remove from another thread waits for fn */
        run_begin(c, &run, h);
        pthread_mutex_unlock(&c->mu);
        fn(arg);
        pthread_mutex_lock(&c->mu);
        run_end(c, &run);
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    h->_state = HOOK_ARMED;
    h->_prev = c->hooks_tail;
    if (c->hooks_tail)
        c->hooks_tail->_next = h;
    else
        c->hooks = h;
    c->hooks_tail = h;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

bool ctx_hook_remove(struct ctx *c, struct ctx_hook *h)
{
    if (!c || !h)
        return true;
    if (c == &background) {
        h->_state = HOOK_IDLE;
        return true;
    }
    pthread_mutex_lock(&c->mu);
    if (h->_state == HOOK_ARMED) {
        if (h->_prev)
            h->_prev->_next = h->_next;
        else
            c->hooks = h->_next;
        if (h->_next)
            h->_next->_prev = h->_prev;
        else
            c->hooks_tail = h->_prev;
        h->_state = HOOK_IDLE;
        pthread_mutex_unlock(&c->mu);
        return true;
    }
    if (h->_state == HOOK_IDLE) { /* never armed, or removed already */
        pthread_mutex_unlock(&c->mu);
        return true;
    }
    while (running_elsewhere(c, h))
        pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    return false;
}
