/* timer: fetch_after(): one-shot timers on a loop, bound to a ctx, in a min-heap on due time.
 *
 * A timer is a struct xfer marked 'timer', so it shares the inbox, the ctx hook, the canceled
 * list and completion with transfers (loop.c, xfer.c). fetch_after() runs on any thread and
 * hands the timer over like fetch_get(); from then on the loop thread alone arms it here, fires
 * it when due (fetch__timers_fire(), every pass; the next due time bounds the poll), takes it out
 * by its heap index when its ctx is done (loop.c), and completion frees it after its callback. */
#include "fetch/fetch_impl.h"

#include <errno.h>
#include <stdlib.h>

static void heap_swap(struct fetch_loop *l, size_t a, size_t b)
{
    struct xfer *t = l->timers[a];
    l->timers[a] = l->timers[b];
    l->timers[b] = t;
    l->timers[a]->heap_idx = a;
    l->timers[b]->heap_idx = b;
}

static void heap_up(struct fetch_loop *l, size_t i)
{
    while (i > 0 && l->timers[(i - 1) / 2]->due_us > l->timers[i]->due_us) {
        heap_swap(l, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void heap_down(struct fetch_loop *l, size_t i)
{
    for (;;) {
        size_t m = i, a = 2 * i + 1, b = a + 1;
        if (a < l->ntimers && l->timers[a]->due_us < l->timers[m]->due_us)
            m = a;
        if (b < l->ntimers && l->timers[b]->due_us < l->timers[m]->due_us)
            m = b;
        if (m == i)
            return;
        heap_swap(l, i, m);
        i = m;
    }
}

/* Arms timer 'x'. Returns false if out of memory. */
bool fetch__timer_arm(struct fetch_loop *l, struct xfer *x)
{
    if (l->ntimers == l->timers_cap) {
        size_t cap = l->timers_cap ? l->timers_cap * 2 : 64;
        struct xfer **p = realloc(l->timers, cap * sizeof(*p));
        if (!p)
            return false;
        l->timers = p;
        l->timers_cap = cap;
    }
    x->heap_idx = l->ntimers;
    l->timers[l->ntimers++] = x;
    heap_up(l, x->heap_idx);
    return true;
}

/* Disarms the timer at heap position 'i' and returns it. */
struct xfer *fetch__timer_take(struct fetch_loop *l, size_t i)
{
    struct xfer *x = l->timers[i];
    l->ntimers--;
    if (i != l->ntimers) {
        l->timers[i] = l->timers[l->ntimers];
        l->timers[i]->heap_idx = i;
        heap_down(l, i);
        heap_up(l, i);
    }
    return x;
}

/* Fires the timers that are due. Returns the milliseconds until the next one (rounded up), or
 * -1 when none is armed. */
int64_t fetch__timers_fire(struct fetch_loop *l)
{
    int64_t now = fetch__now_us();
    while (l->ntimers > 0 && l->timers[0]->due_us <= now) {
        fetch__complete(l, fetch__timer_take(l, 0), 0, NULL);
        now = fetch__now_us();
    }
    return l->ntimers ? (l->timers[0]->due_us - now + 999) / 1000 : -1;
}

int fetch_after(struct fetch *f, unsigned loop, struct ctx *c, int64_t delay_ms, fetch_cb cb,
                void *arg)
{
    if (!f || !c || !cb || loop >= f->nloops || delay_ms < 0)
        return -EINVAL;
    if (atomic_load_explicit(&f->stopping, memory_order_acquire))
        return FETCH_ESHUTDOWN;
    struct xfer *x = calloc(1, sizeof(*x));
    if (!x)
        return -ENOMEM;
    struct fetch_loop *l = &f->loops[loop];
    x->timer = true;
    x->loop = l;
    x->cb = cb;
    x->arg = arg;
    x->t0_us = fetch__now_us();
    x->due_us = x->t0_us + (delay_ms > INT64_MAX / 2000 ? INT64_MAX / 2 : delay_ms * 1000);
    x->ctx = ctx_ref(c);
    int rc = fetch__loop_hand(l, x);
    if (rc != 0) {
        ctx_unref(x->ctx);
        free(x);
    }
    return rc;
}
