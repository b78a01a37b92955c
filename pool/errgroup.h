/* eg: an errgroup, after Go's golang.org/x/sync/errgroup.
 *
 * A group owns a child ctx of its parent. The first task that returns non-zero cancels that ctx
 * with its result as the cause, and that result is what eg_wait() returns. eg_set_limit() caps the
 * tasks running at once. Past Go: once the group has failed, tasks not yet started never start.
 *
 * Two kinds of task share one group and one limit:
 * - thread tasks (eg_go, eg_try_go) run fn(ctx, arg) on a worker of the group's pool;
 * - async tasks (eg_go_async) are started by a function that returns at once and are completed
 *   later, from any thread, by eg_complete(): a transfer in flight occupies a slot, not a thread.
 *   Queued async tasks start as slots free, on the thread that freed the slot. eg_wait_async()
 *   reports the end of the group by callback instead of blocking a thread.
 * Thread-safe, except that eg_set_limit() should be called before the first task. */
#ifndef FANOUT_ERRGROUP_H
#define FANOUT_ERRGROUP_H

#include <stdbool.h>

struct ctx;
struct pool;
struct eg;

typedef int (*eg_fn)(struct ctx *c, void *arg);

/* Starts an async task. Returns 0 if the task is now running, in which case eg_complete() must be
 * called for it exactly once (possibly before this returns, from another thread); or a non-zero
 * result, which completes the task at once (eg_complete() must then not be called). */
typedef int (*eg_start_fn)(struct eg *g, struct ctx *c, void *arg);

/* Called once when an async-waited group has finished; 'err' is the group's result. The group
 * may be freed from inside it. */
typedef void (*eg_done_fn)(void *arg, int err);

/* A group whose ctx is a child of 'parent'; thread tasks run on 'p' (NULL if the group only runs
 * async tasks). Returns NULL if out of memory. */
struct eg *eg_new(struct ctx *parent, struct pool *p);

/* The group's ctx: done on the first error, when the group ends, or with the parent. Owned by the
 * group. */
struct ctx *eg_ctx(struct eg *g);

/* At most n tasks run at once (n < 0: no limit; n == 0 is treated as 1). */
void eg_set_limit(struct eg *g, int n);

/* Runs fn(eg_ctx(g), arg) on the pool, first waiting while the limit is reached. Returns 0; or,
 * once the group has failed, its error without running fn; or -EINVAL without a pool; or -ENOMEM
 * / -EPIPE (pool stopping) when the task cannot be queued, which also fails the group. */
int eg_go(struct eg *g, eg_fn fn, void *arg);

/* As eg_go() but never blocks: false (fn not run) when at the limit, when the pool queue is full
 * or when the group has failed. */
bool eg_try_go(struct eg *g, eg_fn fn, void *arg);

/* Adds an async task: started now if a slot is free, else queued. Returns:
 *   0        added: running (start returned 0) or queued;
 *   rc != 0  start ran now and returned rc: the task has completed with that result (and, rc
 *            being an error, the group has failed);
 *   the group's error, once it has failed (start not called);
 *   -ENOMEM  the queue could not grow (start not called; the group goes on);
 *   -EINVAL  start is NULL, or the group was already waited on (eg_wait, eg_wait_async). */
int eg_go_async(struct eg *g, eg_start_fn start, void *arg);

/* Completes one running async task with result 'rc'. Any thread. */
void eg_complete(struct eg *g, int rc);

/* Blocks until every task has ended; cancels the group's ctx; returns the first non-zero result. */
int eg_wait(struct eg *g);

/* Calls done(arg, err) once every task has ended, on the thread that ends the last one (at once on
 * this thread if none is left), after cancelling the group's ctx. No task may be added afterwards. */
void eg_wait_async(struct eg *g, eg_done_fn done, void *arg);

/* The group's first error so far (0 if none). */
int eg_err(struct eg *g);

/* Frees the group and its ctx. Every task must have ended (after eg_wait or the done callback). */
void eg_free(struct eg *g);

#endif
