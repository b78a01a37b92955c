/* loop: a loop thread's pass, its inbox and wakeups, canceled transfers, and its shutdown.
 *
 * Threads: fetch__loop_main() runs on the loop thread and owns every transfer and timer it has
 * admitted; it frees each after its callback (xfer.c). Any thread may hand work to it
 * (fetch__loop_hand()), and a transfer's ctx hook (xfer_hook()) runs on whichever thread makes
 * the ctx done; both touch the loop only under its mutex 'mu', or on the loop thread itself.
 *
 * Handing over: fetch_get() and fetch_after() append a transfer to the inbox under 'mu' and,
 * when the inbox was empty, call curl_multi_wakeup() (still under the mutex, so a loop that has
 * stopped is never woken after its multi is gone). From the loop's own thread (its callbacks
 * queue and cancel all the time: a batch's calls, a decided call's losers) nothing wakes: a flag
 * of the loop's own makes it take another pass before it sleeps, which saves a wakeup write and
 * read per batch step.
 *
 * Cancel: a transfer's hook appends the transfer itself to the loop's list of canceled transfers
 * (intrusive links): the shared list under 'mu', waking the loop when the list was empty, or the
 * loop's own list when the hook runs on the loop thread. The loop takes exactly those and aborts
 * each where it is (reap_canceled()): out of the multi, off the waiting or resolving FIFO, out of
 * the timer heap. So a cancel costs the same whatever else the loop holds. A transfer may end on
 * its own after its hook queued it; completion then takes it off the list again
 * (fetch__canceled_forget()), after ctx_hook_remove(), which waits for a running hook.
 *
 * Source: a loop may poll one descriptor besides curl's (fetch_loop_source(): the HTTP daemon's
 * epoll set in the shared loop model). Its run() comes first in a pass, so that what it hands
 * the loop (a batch's zero-delay timer) is taken in the same pass; it is due when the descriptor
 * was readable, when the time its timeout_ms() asked for has passed, or after a kick. A change
 * of source is taken in take(), which wakes the thread that asked for it: between two passes,
 * so the old source's callbacks are never running then.
 *
 * Each pass: run the source if it is due; take the inbox, the canceled list, the fired events
 * and the flags; admit new transfers and timers (a ctx already done completes them without
 * starting); abort the canceled ones; run the fired events' callbacks; move waiting transfers
 * into the multi while fewer than 'limit' are active; curl_multi_perform(); complete what curl
 * reports done; fire due timers; curl_multi_poll() (with the source's descriptor) until curl
 * has work, a timer or the source is due, or a wakeup arrives. 'limit' is the
 * loop's connection cap (HTTP/1.1: one transfer per connection), or 100 streams per connection
 * for h2c, so curl's own PENDING queue stays empty: its timeout clock would otherwise run while a
 * transfer waits, and 7.88 walks PENDING handles on every perform (LIBRARY-NOTES 2.2, 2.3). The
 * waiting FIFO is ours and costs nothing per pass.
 *
 * Stop: fetch_free() sets 'stopping' under each loop's mutex and wakes it. fetch_get(),
 * fetch_after() and fetch_event_init() check the flag under the same mutex, so once the loop has
 * seen it its inbox can only be what it took in that same critical section; it completes those,
 * the active, waiting and resolving transfers and the timers with FETCH_ESHUTDOWN (or their
 * ctx's cause), ends its events (event.c), frees its curl handles and exits; fetch_free() joins.
 *
 * Locks: 'mu' is a leaf: no other lock is taken while holding it, and no callback, hook or curl
 * call except curl_multi_wakeup() runs under it. */
#include "fetch/fetch_impl.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>

/* The loop whose thread this is, or NULL. */
static _Thread_local struct fetch_loop *this_loop;

bool fetch__on_loop(const struct fetch_loop *l)
{
    return this_loop == l;
}

struct fetch_loop *fetch__current(const struct fetch *f)
{
    return this_loop && this_loop->f == f ? this_loop : NULL;
}

/* ---------------------------------------------------------------- canceled transfers */

static void canceled_push(struct xfer_canceled_list *q, struct xfer *x)
{
    x->cnext = NULL;
    x->cprev = q->tail;
    if (q->tail)
        q->tail->cnext = x;
    else
        q->head = x;
    q->tail = x;
}

static void canceled_del(struct xfer_canceled_list *q, struct xfer *x)
{
    if (x->cprev)
        x->cprev->cnext = x->cnext;
    else
        q->head = x->cnext;
    if (x->cnext)
        x->cnext->cprev = x->cprev;
    else
        q->tail = x->cprev;
    x->cnext = x->cprev = NULL;
}

void fetch__canceled_forget(struct fetch_loop *l, struct xfer *x)
{
    if (x->canceled == CANCELED_OWN) {
        canceled_del(&l->canceled_own, x);
    } else if (x->canceled == CANCELED_SHARED) {
        pthread_mutex_lock(&l->mu);
        canceled_del(&l->canceled, x);
        pthread_mutex_unlock(&l->mu);
    }
    x->canceled = CANCELED_NONE;
}

/* With l->mu held: moves what hooks on other threads queued to the loop's own list. */
static void take_canceled(struct fetch_loop *l)
{
    struct xfer *x = l->canceled.head;
    if (!x)
        return;
    for (; x; x = x->cnext)
        x->canceled = CANCELED_OWN;
    struct xfer_canceled_list *own = &l->canceled_own;
    l->canceled.head->cprev = own->tail;
    if (own->tail)
        own->tail->cnext = l->canceled.head;
    else
        own->head = l->canceled.head;
    own->tail = l->canceled.tail;
    l->canceled.head = l->canceled.tail = NULL;
}

/* A transfer's ctx hook: runs on whichever thread made the ctx done, and must not block. It
 * queues the transfer on its loop's list of canceled transfers (its own list when this is the
 * loop's thread, from one of its callbacks: seen before the loop sleeps again; else the shared
 * one, waking the loop) and touches nothing else of it. A transfer not yet handed to the loop
 * (its ctx was done within fetch_get()) is left alone: admit() will see its ctx done. */
static void xfer_hook(void *arg)
{
    struct xfer *x = arg;
    struct fetch_loop *l = x->loop;
    if (this_loop == l) {
        if (atomic_load_explicit(&x->handed, memory_order_acquire)) {
            x->canceled = CANCELED_OWN;
            canceled_push(&l->canceled_own, x);
        }
        return;
    }
    pthread_mutex_lock(&l->mu);
    if (atomic_load_explicit(&x->handed, memory_order_relaxed)) {
        bool was_empty = l->canceled.head == NULL;
        x->canceled = CANCELED_SHARED;
        canceled_push(&l->canceled, x);
        if (was_empty && !l->stopping) /* otherwise a wakeup is already on its way */
            curl_multi_wakeup(l->multi);
    }
    pthread_mutex_unlock(&l->mu);
}

/* Aborts or drops the transfers and timers whose hooks reported their ctx done, each where it
 * is: O(1) per canceled transfer (O(log timers) for a timer), whatever else the loop holds. The
 * callbacks run here may cancel more; those are taken in the same turn. */
static void reap_canceled(struct fetch_loop *l)
{
    struct xfer *x;
    while ((x = l->canceled_own.head) != NULL) {
        canceled_del(&l->canceled_own, x);
        x->canceled = CANCELED_NONE;
        int cause = ctx_err(x->ctx);
        switch (x->where) {
        case XFER_INBOX: /* queued by a callback after this turn took the inbox */
            continue;    /* admit() sees its ctx done next turn */
        case XFER_ACTIVE:
            fetch__abort_active(l, x, cause);
            continue;
        case XFER_WAITING:
            fetch__queue_del(&l->waiting, x);
            break;
        case XFER_RESOLVING: /* the lookup goes on; nothing waits for it */
            fetch__queue_del(&l->resolving, x);
            break;
        case XFER_TIMER:
            fetch__timer_take(l, x->heap_idx);
            break;
        }
        fetch__complete_ctx(l, x, cause);
    }
}

/* ---------------------------------------------------------------- handing over */

int fetch__loop_hand(struct fetch_loop *l, struct xfer *x)
{
    ctx_hook_add(x->ctx, &x->hook, xfer_hook, x); /* runs at once if the ctx is done */
    pthread_mutex_lock(&l->mu);
    if (l->stopping) {
        pthread_mutex_unlock(&l->mu);
        ctx_hook_remove(x->ctx, &x->hook);
        return FETCH_ESHUTDOWN;
    }
    bool was_empty = l->inbox.head == NULL;
    fetch__queue_push(&l->inbox, x);
    atomic_store_explicit(&x->handed, true, memory_order_release);
    if (this_loop == l) /* from the loop's own callback: taken before it sleeps */
        l->self_inbox = true;
    else if (was_empty) /* otherwise a wakeup is already on its way */
        curl_multi_wakeup(l->multi);
    pthread_mutex_unlock(&l->mu);
    return 0;
}

void fetch__dns_ready(void *arg)
{
    struct fetch *f = arg;
    for (unsigned i = 0; i < f->nloops; i++) {
        struct fetch_loop *l = &f->loops[i];
        pthread_mutex_lock(&l->mu);
        if (!l->dns_ready && !l->stopping) {
            l->dns_ready = true;
            curl_multi_wakeup(l->multi);
        }
        pthread_mutex_unlock(&l->mu);
    }
}

/* ---------------------------------------------------------------- the pass */

/* Queues newly handed-over transfers and arms new timers, completing those whose ctx is
 * already done. */
static void admit(struct fetch_loop *l, struct xfer *in)
{
    while (in) {
        struct xfer *x = in;
        in = in->next;
        int cause = ctx_err(x->ctx);
        if (cause != 0) {
            fetch__complete_ctx(l, x, cause);
        } else if (!x->timer) {
            x->where = XFER_WAITING;
            fetch__queue_push(&l->waiting, x);
        } else if (fetch__timer_arm(l, x)) {
            x->where = XFER_TIMER;
        } else {
            fetch__complete(l, x, -ENOMEM, NULL);
        }
    }
}

static int stop_cause(const struct xfer *x)
{
    int cause = ctx_err(x->ctx);
    return cause != 0 ? cause : FETCH_ESHUTDOWN;
}

/* Completes everything the loop holds: the inbox it took last, then what it admitted. */
static void drain_all(struct fetch_loop *l, struct xfer *in)
{
    while (in) {
        struct xfer *x = in;
        in = in->next;
        fetch__complete_ctx(l, x, stop_cause(x));
    }
    while (l->active)
        fetch__abort_active(l, l->active, stop_cause(l->active));
    struct xfer *x;
    while ((x = fetch__queue_pop(&l->waiting)) != NULL)
        fetch__complete_ctx(l, x, stop_cause(x));
    while ((x = fetch__queue_pop(&l->resolving)) != NULL)
        fetch__complete_ctx(l, x, stop_cause(x));
    while (l->ntimers > 0) {
        x = fetch__timer_take(l, l->ntimers - 1);
        fetch__complete_ctx(l, x, stop_cause(x));
    }
}

/* What one pass takes from the other threads, in one critical section. */
struct take {
    struct xfer *in;         /* the inbox */
    struct fetch_event *ev;  /* events fired since the last pass */
    bool stop, dns;          /* 'stopping', 'dns_ready' */
};

static void take(struct fetch_loop *l, struct take *t)
{
    pthread_mutex_lock(&l->mu);
    t->in = l->inbox.head;
    l->inbox.head = l->inbox.tail = NULL;
    take_canceled(l);
    t->ev = l->fired.head;
    l->fired.head = l->fired.tail = NULL;
    t->stop = l->stopping;
    t->dns = l->dns_ready;
    if (l->src_taken != l->src_gen) { /* a new source: its run() first, before any sleep */
        l->src = l->src_asked;
        l->src_due = l->src.fd >= 0;
        l->src_taken = l->src_gen;
        pthread_cond_broadcast(&l->src_cv);
    }
    l->self_inbox = false;
    l->dns_ready = false;
    pthread_mutex_unlock(&l->mu);
}

/* Sleeps in curl_multi_poll() for at most 'wait' ms, or until the source's timeout, with the
 * source's descriptor among curl's; notes whether the source is due. */
static void sleep_poll(struct fetch_loop *l, int wait)
{
    if (l->src.fd < 0) {
        curl_multi_poll(l->multi, NULL, 0, wait, NULL);
        return;
    }
    int64_t src_ms = l->src.timeout_ms ? l->src.timeout_ms(l->src.arg) : -1;
    bool src_wait = src_ms >= 0 && src_ms <= wait;
    if (src_wait)
        wait = (int)src_ms;
    int64_t t0 = src_wait ? fetch__now_us() : 0;
    struct curl_waitfd wfd = {.fd = l->src.fd, .events = CURL_WAIT_POLLIN};
    curl_multi_poll(l->multi, &wfd, 1, wait, NULL);
    /* poll() may end a little before its timeout: within a millisecond counts as due */
    if (wfd.revents || (src_wait && fetch__now_us() - t0 >= src_ms * 1000 - 1000))
        l->src_due = true;
}

void *fetch__loop_main(void *arg)
{
    struct fetch_loop *l = arg;
    this_loop = l;
    for (;;) {
        if (l->src_due) { /* first, so that what it hands the loop is taken in this pass */
            l->src_due = false;
            l->src.run(l->src.arg);
        }
        struct take t;
        take(l, &t);
        if (t.stop) {
            drain_all(l, t.in);
            fetch__events_run(t.ev);
            fetch__events_drain(l);
            break;
        }
        admit(l, t.in);
        reap_canceled(l);
        fetch__events_run(t.ev);
        if (t.dns)
            fetch__resolving_resume(l);
        while (l->waiting.head && l->nactive < l->limit)
            fetch__start(l, fetch__queue_pop(&l->waiting));
        int running;
        curl_multi_perform(l->multi, &running);
        fetch__reap_done(l);
        int64_t next = fetch__timers_fire(l);
        int64_t dns_next = fetch__resolving_expire(l);
        if (dns_next >= 0 && (next < 0 || dns_next < next))
            next = dns_next;
        if ((l->waiting.head && l->nactive < l->limit) || l->canceled_own.head || l->self_inbox ||
            l->src_due)
            continue; /* slots freed, callbacks canceled or queued something, or the source is
                         due: another turn */
        sleep_poll(l, next >= 0 && next < l->poll_ms ? (int)next : l->poll_ms);
    }
    /* Callbacks run by the drain cannot have queued anything: fetch_get() saw 'stopping'. */
    fetch__easy_free_spares(l);
    return NULL;
}

void fetch_source_kick(struct fetch *f)
{
    struct fetch_loop *l = fetch__current(f);
    if (l && l->src.fd >= 0)
        l->src_due = true;
}

int fetch_loop_source(struct fetch *f, unsigned loop, const struct fetch_source *src)
{
    if (loop >= f->nloops || fetch__current(f) || (src && (src->fd < 0 || !src->run)))
        return -EINVAL;
    struct fetch_loop *l = &f->loops[loop];
    pthread_mutex_lock(&l->mu);
    if (l->stopping) {
        pthread_mutex_unlock(&l->mu);
        return FETCH_ESHUTDOWN;
    }
    l->src_asked = src ? *src : (struct fetch_source){.fd = -1};
    uint64_t gen = ++l->src_gen;
    curl_multi_wakeup(l->multi);
    while (l->src_taken < gen) /* take() answers every request, also on its way out */
        pthread_cond_wait(&l->src_cv, &l->mu);
    pthread_mutex_unlock(&l->mu);
    return 0;
}

/* ---------------------------------------------------------------- life */

int fetch__loop_init(struct fetch *f, struct fetch_loop *l, unsigned cap)
{
    l->f = f;
    l->multi = curl_multi_init();
    if (!l->multi)
        return -ENOMEM;
    int err = -pthread_mutex_init(&l->mu, NULL);
    if (err)
        goto fail_multi;
    err = -pthread_cond_init(&l->events_cv, NULL);
    if (err)
        goto fail_mutex;
    err = -pthread_cond_init(&l->src_cv, NULL);
    if (err) {
        pthread_cond_destroy(&l->events_cv);
        goto fail_mutex;
    }
    l->src.fd = l->src_asked.fd = -1;
    curl_multi_setopt(l->multi, CURLMOPT_MAXCONNECTS, (long)cap);
    curl_multi_setopt(l->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)cap);
    l->limit = f->opts.h2c ? cap * FETCH__H2_STREAMS_PER_CONN : cap;
    int64_t poll = f->opts.idle_poll_ms > 0 ? f->opts.idle_poll_ms : FETCH__POLL_MS;
    l->poll_ms = poll > INT_MAX ? INT_MAX : (int)poll;
    return 0;
fail_mutex:
    pthread_mutex_destroy(&l->mu);
fail_multi:
    curl_multi_cleanup(l->multi);
    return err;
}

void fetch__loop_stop(struct fetch_loop *l)
{
    pthread_mutex_lock(&l->mu);
    l->stopping = true;
    if (l->started)
        curl_multi_wakeup(l->multi);
    pthread_mutex_unlock(&l->mu);
}

void fetch__loop_destroy(struct fetch_loop *l)
{
    curl_multi_cleanup(l->multi);
    free(l->spare);
    free(l->timers);
    pthread_cond_destroy(&l->src_cv);
    pthread_cond_destroy(&l->events_cv);
    pthread_mutex_destroy(&l->mu);
}
