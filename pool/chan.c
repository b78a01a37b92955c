/* chan: a bounded MPMC ring of pointers guarded by one mutex and two condition variables.
 *
 * A blocked sender or receiver that was given a ctx arms a ctx hook that takes the channel's
 * mutex and wakes every waiter; the waiter then sees ctx_err() != 0 and returns it. The hook is
 * armed only on the slow path (the caller must block), so uncontended calls cost one lock. */
#include "pool/chan.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "ctx/ctx.h"

struct chan {
    pthread_mutex_t mu;         /* guards everything below */
    pthread_cond_t not_empty;   /* an item arrived, or closed, or a ctx was canceled */
    pthread_cond_t not_full;    /* room appeared, or closed, or a ctx was canceled */
    void **ring;                /* cap slots */
    size_t cap, head, len;      /* capacity, oldest slot, items queued */
    bool closed;                /* chan_close() was called */
};

struct chan *chan_new(size_t cap)
{
    if (cap == 0)
        return NULL;
    struct chan *ch = calloc(1, sizeof(*ch));
    if (!ch)
        return NULL;
    ch->ring = calloc(cap, sizeof(*ch->ring));
    if (!ch->ring)
        goto fail_free;
    if (pthread_mutex_init(&ch->mu, NULL) != 0)
        goto fail_ring;
    if (pthread_cond_init(&ch->not_empty, NULL) != 0)
        goto fail_mutex;
    if (pthread_cond_init(&ch->not_full, NULL) != 0)
        goto fail_cond;
    ch->cap = cap;
    return ch;
fail_cond:
    pthread_cond_destroy(&ch->not_empty);
fail_mutex:
    pthread_mutex_destroy(&ch->mu);
fail_ring:
    free(ch->ring);
fail_free:
    free(ch);
    return NULL;
}

static void chan_wake_all(void *arg)
{
    struct chan *ch = arg;
    pthread_mutex_lock(&ch->mu);
    pthread_cond_broadcast(&ch->not_empty);
    pthread_cond_broadcast(&ch->not_full);
    pthread_mutex_unlock(&ch->mu);
}

/* Blocks on 'cv' (ch->mu held) until woken. Arms the ctx hook the first time; returns with
 * ch->mu held. Cancellation shows as ctx_err(c) afterwards. */
static void chan_block(struct chan *ch, pthread_cond_t *cv, struct ctx *c, struct ctx_hook *h,
                       bool *armed)
{
    if (c && c != ctx_background() && !*armed) {
        pthread_mutex_unlock(&ch->mu);
        ctx_hook_add(c, h, chan_wake_all, ch);
        *armed = true;
        pthread_mutex_lock(&ch->mu);
        return; /* re-check the state before sleeping */
    }
    pthread_cond_wait(cv, &ch->mu);
}

static int chan_put(struct chan *ch, void *item, struct ctx *c, bool wait)
{
    struct ctx_hook h;
    bool armed = false;
    int rc;
    pthread_mutex_lock(&ch->mu);
    for (;;) {
        if (ch->closed) {
            rc = -EPIPE;
            break;
        }
        if ((rc = ctx_err(c)) != 0)
            break;
        if (ch->len < ch->cap) {
            ch->ring[(ch->head + ch->len) % ch->cap] = item;
            ch->len++;
            pthread_cond_signal(&ch->not_empty);
            rc = 0;
            break;
        }
        if (!wait) {
            rc = -EAGAIN;
            break;
        }
        chan_block(ch, &ch->not_full, c, &h, &armed);
    }
    pthread_mutex_unlock(&ch->mu);
    if (armed)
        ctx_hook_remove(c, &h);
    return rc;
}

int chan_send(struct chan *ch, void *item, struct ctx *c)
{
    return chan_put(ch, item, c, true);
}

int chan_try_send(struct chan *ch, void *item)
{
    return chan_put(ch, item, NULL, false);
}

int chan_recv(struct chan *ch, void **item, struct ctx *c)
{
    struct ctx_hook h;
    bool armed = false;
    int rc;
    pthread_mutex_lock(&ch->mu);
    for (;;) {
        if ((rc = ctx_err(c)) != 0)
            break;
        if (ch->len > 0) {
            *item = ch->ring[ch->head];
            ch->head = (ch->head + 1) % ch->cap;
            ch->len--;
            pthread_cond_signal(&ch->not_full);
            rc = 0;
            break;
        }
        if (ch->closed) {
            rc = -EPIPE;
            break;
        }
        chan_block(ch, &ch->not_empty, c, &h, &armed);
    }
    pthread_mutex_unlock(&ch->mu);
    if (armed)
        ctx_hook_remove(c, &h);
    return rc;
}

void chan_close(struct chan *ch)
{
    pthread_mutex_lock(&ch->mu);
    ch->closed = true;
    pthread_cond_broadcast(&ch->not_empty);
    pthread_cond_broadcast(&ch->not_full);
    pthread_mutex_unlock(&ch->mu);
}

size_t chan_len(struct chan *ch)
{
    pthread_mutex_lock(&ch->mu);
    size_t n = ch->len;
    pthread_mutex_unlock(&ch->mu);
    return n;
}

void chan_free(struct chan *ch)
{
    if (!ch)
        return;
    pthread_cond_destroy(&ch->not_full);
    pthread_cond_destroy(&ch->not_empty);
    pthread_mutex_destroy(&ch->mu);
    free(ch->ring);
    free(ch);
}
