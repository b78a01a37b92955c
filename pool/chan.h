/* chan: a bounded multi-producer multi-consumer queue of pointers, after Go's channels.
 *
 * Blocking calls take a ctx and return its error as soon as it is done. chan_close() wakes every
 * waiter: senders fail with -EPIPE, receivers drain what is queued and then get -EPIPE.
 * Thread-safe. */
#ifndef FANOUT_CHAN_H
#define FANOUT_CHAN_H

#include <stddef.h>

struct ctx;
struct chan;

/* A channel holding up to 'cap' items (cap >= 1). Returns NULL if cap is 0 or out of memory. */
struct chan *chan_new(size_t cap);

/* Queues 'item', blocking while the channel is full. Returns 0, -EPIPE once closed, or ctx_err(c)
 * once 'c' is done (c may be NULL: no cancellation). */
int chan_send(struct chan *ch, void *item, struct ctx *c);

/* Non-blocking send: 0, -EAGAIN when full, -EPIPE when closed. */
int chan_try_send(struct chan *ch, void *item);

/* Takes the oldest item into *item, blocking while the channel is empty. Returns 0, -EPIPE once
 * closed and drained, or ctx_err(c) once 'c' is done. */
int chan_recv(struct chan *ch, void **item, struct ctx *c);

/* Closes the channel. Idempotent. */
void chan_close(struct chan *ch);

/* Number of items queued now. */
size_t chan_len(struct chan *ch);

/* Frees the channel. No thread may still use it. Queued items are not freed. */
void chan_free(struct chan *ch);

#endif
