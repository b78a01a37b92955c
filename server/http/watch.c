/* watch: one epoll thread that cancels a request's ctx when its client hangs up.
 *
 * Table entries are {generation, fd, ctx}; the epoll data carries (index, generation). The thread
 * looks an event up under the table mutex and takes a ctx reference before cancelling with the
 * mutex released, so watch_remove() (which deletes the fd from the epoll set and clears the entry
 * under the same mutex) and an event in flight can never disagree about the ctx's lifetime. While
 * it cancels, the thread publishes the entry's token in 'firing'; watch_remove() of that token
 * waits until the cancel has returned, so once watch_remove() returns the ctx is never canceled
 * by the watch (a late -EPIPE would otherwise turn an answer that is ready into a closed
 * connection). The cancel only runs ctx hooks, which never call back into the watch, so the wait
 * cannot deadlock.
 * EPOLLONESHOT: a hung-up socket reports once instead of on every wait. An eventfd stops the
 * thread. */
#include "server/http/watch.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ctx/ctx.h"

struct entry {
    uint32_t gen;    /* bumped on every release; odd while in use */
    int fd;          /* the watched socket */
    struct ctx *c;   /* referenced while in use */
    uint32_t next;   /* next free index when free */
};

struct watch {
    int ep;              /* epoll set */
    int stop_fd;         /* eventfd that wakes the thread to exit */
    pthread_t thread;    /* the watch thread */
    pthread_mutex_t mu;  /* guards the table and 'firing' */
    pthread_cond_t cv;   /* signalled when 'firing' is cleared */
    uint64_t firing;     /* token of the entry whose ctx the thread is cancelling, or 0 */
    struct entry *tab;   /* entries */
    uint32_t n, cap;     /* used prefix, allocated */
    uint32_t free_head;  /* first free index, or UINT32_MAX */
};

#define NO_FREE UINT32_MAX
#define STOP_TAG UINT64_MAX

static void *watch_main(void *arg)
{
    struct watch *w = arg;
    struct epoll_event ev[64];
    for (;;) {
        int n = epoll_wait(w->ep, ev, 64, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u64 == STOP_TAG)
                return NULL;
            uint32_t idx = (uint32_t)(ev[i].data.u64 >> 32), gen = (uint32_t)ev[i].data.u64;
            struct ctx *c = NULL;
            pthread_mutex_lock(&w->mu);
            if (idx < w->n && w->tab[idx].gen == gen && w->tab[idx].c) {
                c = ctx_ref(w->tab[idx].c);
                w->firing = ev[i].data.u64;
            }
            pthread_mutex_unlock(&w->mu);
            if (c) {
                ctx_cancel(c, -EPIPE);
                ctx_unref(c);
                pthread_mutex_lock(&w->mu);
                w->firing = 0;
                pthread_cond_broadcast(&w->cv);
                pthread_mutex_unlock(&w->mu);
            }
        }
    }
    return NULL;
}

int watch_new(struct watch **out)
{
    struct watch *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    int rc;
    w->free_head = NO_FREE;
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    if (w->ep < 0) {
        rc = -errno;
        goto fail_free;
    }
    w->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->stop_fd < 0) {
        rc = -errno;
        goto fail_ep;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STOP_TAG};
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, w->stop_fd, &ev) < 0) {
        rc = -errno;
        goto fail_efd;
    }
    if ((rc = pthread_mutex_init(&w->mu, NULL)) != 0) {
        rc = -rc;
        goto fail_efd;
    }
    if ((rc = pthread_cond_init(&w->cv, NULL)) != 0) {
        rc = -rc;
        goto fail_mutex;
    }
    if ((rc = pthread_create(&w->thread, NULL, watch_main, w)) != 0) {
        rc = -rc;
        goto fail_cond;
    }
    *out = w;
    return 0;
fail_cond:
    pthread_cond_destroy(&w->cv);
fail_mutex:
    pthread_mutex_destroy(&w->mu);
fail_efd:
    close(w->stop_fd);
fail_ep:
    close(w->ep);
fail_free:
    free(w);
    return rc;
}

int watch_add(struct watch *w, int fd, struct ctx *c, uint64_t *token)
{
    pthread_mutex_lock(&w->mu);
    uint32_t idx;
    if (w->free_head != NO_FREE) {
        idx = w->free_head;
        w->free_head = w->tab[idx].next;
    } else {
        if (w->n == w->cap) {
            uint32_t cap = w->cap ? w->cap * 2 : 64;
            struct entry *t = realloc(w->tab, cap * sizeof(*t));
            if (!t) {
                pthread_mutex_unlock(&w->mu);
                return -ENOMEM;
            }
            w->tab = t;
            w->cap = cap;
        }
        idx = w->n++;
        w->tab[idx].gen = 0;
    }
    struct entry *e = &w->tab[idx];
    e->gen++;
    e->fd = fd;
    e->c = ctx_ref(c);
    uint64_t tok = (uint64_t)idx << 32 | e->gen;
    struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLONESHOT, .data.u64 = tok};
    int rc = 0;
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        rc = -errno;
        e->gen++;
        e->c = NULL;
        e->next = w->free_head;
        w->free_head = idx;
    }
    pthread_mutex_unlock(&w->mu);
    if (rc) {
        ctx_unref(c);
        return rc;
    }
    *token = tok;
    return 0;
}

void watch_remove(struct watch *w, uint64_t token)
{
    uint32_t idx = (uint32_t)(token >> 32), gen = (uint32_t)token;
    struct ctx *c = NULL;
    pthread_mutex_lock(&w->mu);
    if (idx < w->n && w->tab[idx].gen == gen) {
        struct entry *e = &w->tab[idx];
        epoll_ctl(w->ep, EPOLL_CTL_DEL, e->fd, NULL);
        c = e->c;
        e->c = NULL;
        e->gen++;
        e->next = w->free_head;
        w->free_head = idx;
    }
    while (w->firing == token) /* the thread is cancelling this entry's ctx: let it finish */
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    ctx_unref(c);
}

void watch_free(struct watch *w)
{
    if (!w)
        return;
    uint64_t one = 1;
    if (write(w->stop_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write only fails on overflow, which cannot happen with one write */
    }
    pthread_join(w->thread, NULL);
    for (uint32_t i = 0; i < w->n; i++)
        if (w->tab[i].c) {
            epoll_ctl(w->ep, EPOLL_CTL_DEL, w->tab[i].fd, NULL);
            ctx_unref(w->tab[i].c);
        }
    free(w->tab);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    close(w->stop_fd);
    close(w->ep);
    free(w);
}
