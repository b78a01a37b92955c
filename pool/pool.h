/* pool: a fixed set of worker threads fed by a bounded queue.
 *
 * The threads start in pool_new() and are joined in pool_free(); nothing else creates or ends a
 * thread. A full queue is an answer, not a wait: pool_submit() returns -EAGAIN. Thread-safe. */
#ifndef FANOUT_POOL_H
#define FANOUT_POOL_H

#include <stddef.h>

struct pool;

/* Starts 'nthreads' workers (>= 1) with room for 'queue_cap' (>= 1) waiting tasks. Returns NULL
 * on bad arguments, out of memory or when a thread cannot be started (those started are joined). */
struct pool *pool_new(unsigned nthreads, size_t queue_cap);

/* Queues fn(arg) to run on a worker. Returns 0, -EAGAIN when the queue is full, -EPIPE once
 * pool_free() has begun. On failure fn is never called. */
int pool_submit(struct pool *p, void (*fn)(void *), void *arg);

/* As pool_submit(), but waits for room instead of returning -EAGAIN. */
int pool_submit_wait(struct pool *p, void (*fn)(void *), void *arg);

/* Number of worker threads. */
unsigned pool_threads(const struct pool *p);

/* Runs every queued task, then stops and joins all workers and frees the pool. Must not be called
 * from a worker of this pool. */
void pool_free(struct pool *p);

#endif
