/* watch: notices clients that go away while their connection is suspended.
 *
 * libmicrohttpd takes a suspended connection's socket out of its own epoll set, so it cannot see
 * the peer closing. A watch is one thread with its own epoll set: watch_add() registers a socket
 * for EPOLLRDHUP (not EPOLLIN, so pipelined bytes do not wake it) together with a ctx; when the
 * peer closes or the socket fails, the thread cancels that ctx with -EPIPE. Entries are looked up
 * through a generation-checked table under one mutex, so an event that races with
 * watch_remove() never touches a released ctx. Thread-safe. */
#ifndef FANOUT_WATCH_H
#define FANOUT_WATCH_H

#include <stdint.h>

struct ctx;
struct watch;

/* Starts the watch thread. Returns 0 or a negative errno. */
int watch_new(struct watch **out);

/* Watches 'fd' (which must stay open until watch_remove) on behalf of 'c' (a reference is taken).
 * Returns 0 and a token for watch_remove, or a negative errno. */
int watch_add(struct watch *w, int fd, struct ctx *c, uint64_t *token);

/* Stops watching; when it returns, the watch holds no reference to the ctx and will not cancel
 * it: if the watch thread is cancelling that ctx right now, this waits until the cancel has
 * returned (so never call it from a hook of that ctx). Call it before the socket is handed back
 * to libmicrohttpd. */
void watch_remove(struct watch *w, uint64_t token);

/* Stops and joins the thread and frees the watch. Entries still registered are released. */
void watch_free(struct watch *w);

#endif
