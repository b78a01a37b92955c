/* ctx: cancellation, deadlines and request-scoped values, after Go's context.Context.
 *
 * A ctx is a node in a refcounted tree. It becomes "done" when ctx_cancel() is called on it, when
 * its parent is done, or when its deadline passes, whichever is first; the first cause wins and is
 * what ctx_err() returns from then on. Deadlines fire on time even when nobody waits: a single
 * timer thread, started on first use and stopped by ctx_shutdown(), cancels expired contexts.
 *
 * Ownership: the creator of a ctx owns one reference and must call ctx_free() on every path (Go's
 * `defer cancel()`). Another owner that keeps the ctx takes ctx_ref() and drops it with
 * ctx_unref(). A child holds a reference on its parent; a live parent holds one on each child.
 *
 * Every function is thread-safe. Times are int64_t milliseconds on CLOCK_MONOTONIC. */
#ifndef FANOUT_CTX_H
#define FANOUT_CTX_H

#include <stdbool.h>
#include <stdint.h>

#define CTX_FOREVER ((int64_t)-1)

struct ctx;

/* A hook (Go's AfterFunc), embedded by the caller; its fields are private. */
struct ctx_hook {
    struct ctx_hook *_next, *_prev; /* on the ctx's hook list; guarded by the ctx's lock */
    void (*_fn)(void *);            /* what to run */
    void *_arg;                     /* its argument */
    int _state;                     /* idle, armed or fired; guarded by the ctx's lock */
};

/* Monotonic time in milliseconds. */
int64_t ctx_now(void);

/* The root of every tree: never done, no deadline, no values; ref/unref/free are no-ops. */
struct ctx *ctx_background(void);

/* Returns a child of 'parent' that is done when the parent is, when ctx_cancel() is called on it,
 * or at 'deadline' (absolute, clamped to the parent's; CTX_FOREVER for none). A deadline already
 * past gives a ctx that is done with -ETIMEDOUT. The caller owns one reference and must ctx_free()
 * it. Returns NULL if out of memory. */
struct ctx *ctx_new(struct ctx *parent, int64_t deadline);

/* ctx_new() with deadline now + ms (ms < 0: no deadline). */
struct ctx *ctx_with_timeout(struct ctx *parent, int64_t ms);

/* A child of 'parent' carrying 'val' under 'key' (compared by address). Done with its parent. */
struct ctx *ctx_with_value(struct ctx *parent, const void *key, void *val);

/* The value stored under 'key' by 'c' or its nearest ancestor, or NULL. */
void *ctx_value(const struct ctx *c, const void *key);

/* Cancels 'c' and all its descendants with 'cause' (< 0; 0 means -ECANCELED). The first cause
 * wins; later calls do nothing. Hooks run on the calling thread before it returns. */
void ctx_cancel(struct ctx *c, int cause);

/* 0 while not done, else the cause (-ETIMEDOUT when the deadline passed). */
int ctx_err(const struct ctx *c);

/* The effective deadline (the earliest on the path to the root), or CTX_FOREVER. */
int64_t ctx_deadline(const struct ctx *c);

/* Milliseconds left before the deadline (0 if past), or CTX_FOREVER when there is none. */
int64_t ctx_remaining(const struct ctx *c);

/* Blocks until 'c' is done or until the absolute time 'until' (CTX_FOREVER: no limit). Returns
 * ctx_err(c): 0 means 'until' came first. */
int ctx_wait(struct ctx *c, int64_t until);

/* Another reference on 'c', for another owner. Returns 'c'. */
struct ctx *ctx_ref(struct ctx *c);

/* Drops one reference; the last one frees. Does not cancel. */
void ctx_unref(struct ctx *c);

/* The creator's release: cancels 'c' (-ECANCELED) and drops the creator's reference. NULL is
 * allowed. */
void ctx_free(struct ctx *c);

/* Arranges for fn(arg) to run once when 'c' is done, on the thread that makes it done, with no
 * lock held; fn must not block. If 'c' is already done, fn runs at once on this thread. 'h' must
 * stay valid until fn has run or ctx_hook_remove() has returned, and must not be armed already
 * (its previous use must have fired or been removed). Returns 0, or -EINVAL for a NULL argument. */
int ctx_hook_add(struct ctx *c, struct ctx_hook *h, void (*fn)(void *), void *arg);

/* Disarms 'h'. Returns true if fn will never run; false if it has run or is running, in which
 * case this waits until it has returned (unless called from inside fn itself). When it returns,
 * fn is not running and never will, so 'h' may be freed. */
bool ctx_hook_remove(struct ctx *c, struct ctx_hook *h);

/* Stops and joins the timer thread and drops every pending timer entry: the deadlines of those
 * contexts are then enforced only by ctx_wait() callers (and the transfers bound to them); only
 * contexts created afterwards get a timer again (restarting the thread). Call at process exit. */
void ctx_shutdown(void);

#endif
