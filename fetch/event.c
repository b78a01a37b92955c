/* event: fetch_event_*(): one-shot events, fired from any thread, run on a loop thread.
 *
 * An event is the caller's memory; the engine never allocates or frees one. fetch_event_init()
 * links it on its loop's 'armed' list under the loop's mutex. The first fire wins by a
 * compare-and-swap on its state (armed to fired), then moves it to the loop's 'fired' FIFO under
 * the mutex and wakes the loop when that FIFO was empty (from the loop's own thread a flag makes
 * it take another pass instead). Each pass takes the FIFO and runs the callbacks
 * (fetch__events_run()) with no lock held, reading nothing of an event once its callback has
 * begun: the callback may free it or arm it again.
 *
 * Shutdown: the loop, once it has completed its transfers and timers, ends every event still
 * armed by the same compare-and-swap, with FETCH_ESHUTDOWN (fetch__events_drain()). A fire that
 * won its swap just before has not queued its event yet, which is then still on 'armed': the
 * loop waits (events_cv) until every such fire has queued its event, then runs the callbacks
 * left. So each callback runs exactly once, all before fetch_free() returns, and a fire that
 * loses touches nothing but the event.
 *
 * Threads: init and fire on any thread; callbacks on the event's loop thread. */
#include "fetch/fetch_impl.h"

#include <errno.h>

enum { EVENT_ARMED = 1, EVENT_FIRED = 2 };

static void armed_push(struct fetch__event_list *q, struct fetch_event *ev)
{
    ev->_next = NULL;
    ev->_prev = q->tail;
    if (q->tail)
        q->tail->_next = ev;
    else
        q->head = ev;
    q->tail = ev;
}

static void armed_del(struct fetch__event_list *q, struct fetch_event *ev)
{
    if (ev->_prev)
        ev->_prev->_next = ev->_next;
    else
        q->head = ev->_next;
    if (ev->_next)
        ev->_next->_prev = ev->_prev;
    else
        q->tail = ev->_prev;
}

/* Appends to a FIFO of fired events (singly linked through _next). */
static void fired_push(struct fetch__event_list *q, struct fetch_event *ev)
{
    ev->_next = ev->_prev = NULL;
    if (q->tail)
        q->tail->_next = ev;
    else
        q->head = ev;
    q->tail = ev;
}

/* Armed to fired: true for the one caller that wins. */
static bool claim(struct fetch_event *ev)
{
    int armed = EVENT_ARMED;
    return atomic_compare_exchange_strong_explicit(&ev->_state, &armed, EVENT_FIRED,
                                                   memory_order_acq_rel, memory_order_acquire);
}

int fetch_event_init(struct fetch *f, unsigned loop, struct fetch_event *ev, fetch_event_cb cb,
                     void *arg)
{
    if (!f || !ev || !cb || loop >= f->nloops)
        return -EINVAL;
    struct fetch_loop *l = &f->loops[loop];
    ev->_cb = cb;
    ev->_arg = arg;
    ev->_loop = loop;
    ev->_cause = 0;
    pthread_mutex_lock(&l->mu);
    if (l->stopping) { /* a stray fire returns false */
        atomic_store_explicit(&ev->_state, EVENT_FIRED, memory_order_relaxed);
        pthread_mutex_unlock(&l->mu);
        return FETCH_ESHUTDOWN;
    }
    atomic_store_explicit(&ev->_state, EVENT_ARMED, memory_order_relaxed);
    armed_push(&l->armed, ev);
    pthread_mutex_unlock(&l->mu);
    return 0;
}

bool fetch_event_fire(struct fetch *f, struct fetch_event *ev, int cause)
{
    if (!f || !ev || !claim(ev))
        return false;
    struct fetch_loop *l = &f->loops[ev->_loop];
    pthread_mutex_lock(&l->mu);
    ev->_cause = cause;
    armed_del(&l->armed, ev);
    bool was_empty = l->fired.head == NULL;
    fired_push(&l->fired, ev);
    if (l->stopping) /* the loop may be waiting for this one (fetch__events_drain()) */
        pthread_cond_broadcast(&l->events_cv);
    else if (fetch__on_loop(l)) /* taken before the loop sleeps */
        l->self_inbox = true;
    else if (was_empty) /* otherwise a wakeup is already on its way */
        curl_multi_wakeup(l->multi);
    pthread_mutex_unlock(&l->mu);
    return true;
}

void fetch__events_run(struct fetch_event *ev)
{
    while (ev) {
        struct fetch_event *next = ev->_next;
        ev->_cb(ev->_arg, ev->_cause); /* may free or re-arm ev */
        ev = next;
    }
}

void fetch__events_drain(struct fetch_loop *l)
{
    for (;;) {
        pthread_mutex_lock(&l->mu);
        for (struct fetch_event *ev = l->armed.head, *next; ev; ev = next) {
            next = ev->_next;
            if (!claim(ev))
                continue; /* a fire won: it queues the event itself */
            ev->_cause = FETCH_ESHUTDOWN;
            armed_del(&l->armed, ev);
            fired_push(&l->fired, ev);
        }
        while (l->armed.head)
            pthread_cond_wait(&l->events_cv, &l->mu);
        struct fetch_event *list = l->fired.head;
        l->fired.head = l->fired.tail = NULL;
        pthread_mutex_unlock(&l->mu);
        if (!list)
            return;
        fetch__events_run(list); /* cannot arm more: fetch_event_init() sees 'stopping' */
    }
}
