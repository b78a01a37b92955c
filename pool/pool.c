/* pool: fixed worker threads over a bounded FIFO ring of tasks.
 *
 * One mutex guards the ring and the stopping flag; 'work' wakes workers, 'space' wakes
 * pool_submit_wait() callers. pool_free() sets 'stopping', lets the workers run what is queued,
 * and joins them: a task queued before pool_free() always runs. */
#include "pool/pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

struct task {
    void (*fn)(void *); /* what to run */
    void *arg;          /* its argument */
};

struct pool {
    pthread_mutex_t mu;   /* guards ring, head, len, stopping */
    pthread_cond_t work;  /* a task was queued, or stopping */
    pthread_cond_t space; /* a slot freed, or stopping */
    struct task *ring;    /* cap slots */
    size_t cap, head, len;
    bool stopping;        /* pool_free() has begun */
    unsigned nthreads;    /* workers started */
    pthread_t *threads;   /* their ids */
};

static void *pool_worker(void *arg)
{
    struct pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->len == 0 && !p->stopping)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->len == 0)
            break; /* stopping and drained */
        struct task t = p->ring[p->head];
        p->head = (p->head + 1) % p->cap;
        p->len--;
        pthread_cond_signal(&p->space);
        pthread_mutex_unlock(&p->mu);
        t.fn(t.arg);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void pool_stop(struct pool *p)
{
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->work);
    pthread_cond_broadcast(&p->space);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
}

static void pool_release(struct pool *p)
{
    pthread_cond_destroy(&p->space);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p->ring);
    free(p);
}

struct pool *pool_new(unsigned nthreads, size_t queue_cap)
{
    if (nthreads == 0 || queue_cap == 0)
        return NULL;
    struct pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->ring = calloc(queue_cap, sizeof(*p->ring));
    p->threads = calloc(nthreads, sizeof(*p->threads));
    if (!p->ring || !p->threads)
        goto fail_alloc;
    if (pthread_mutex_init(&p->mu, NULL) != 0)
        goto fail_alloc;
    if (pthread_cond_init(&p->work, NULL) != 0)
        goto fail_mutex;
    if (pthread_cond_init(&p->space, NULL) != 0)
        goto fail_work;
    p->cap = queue_cap;
    for (; p->nthreads < nthreads; p->nthreads++) {
        if (pthread_create(&p->threads[p->nthreads], NULL, pool_worker, p) != 0) {
            pool_stop(p); /* joins those started */
            pool_release(p);
            return NULL;
        }
    }
    return p;
fail_work:
    pthread_cond_destroy(&p->work);
fail_mutex:
    pthread_mutex_destroy(&p->mu);
fail_alloc:
    free(p->threads);
    free(p->ring);
    free(p);
    return NULL;
}

static int pool_put(struct pool *p, void (*fn)(void *), void *arg, bool wait)
{
    if (!fn)
        return -EINVAL;
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    while (!p->stopping && p->len == p->cap && wait)
        pthread_cond_wait(&p->space, &p->mu);
    if (p->stopping) {
        rc = -EPIPE;
    } else if (p->len == p->cap) {
        rc = -EAGAIN;
    } else {
        p->ring[(p->head + p->len) % p->cap] = (struct task){fn, arg};
        p->len++;
        pthread_cond_signal(&p->work);
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int pool_submit(struct pool *p, void (*fn)(void *), void *arg)
{
    return pool_put(p, fn, arg, false);
}

int pool_submit_wait(struct pool *p, void (*fn)(void *), void *arg)
{
    return pool_put(p, fn, arg, true);
}

unsigned pool_threads(const struct pool *p)
{
    return p->nthreads;
}

void pool_free(struct pool *p)
{
    if (!p)
        return;
    pool_stop(p);
    pool_release(p);
}
