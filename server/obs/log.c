/* log: a byte ring guarded by one mutex, drained to the fd by one writer thread.
 *
 * Producers copy a complete line into the ring under the mutex (a memcpy, no I/O) and signal
 * the writer only when the ring was empty (otherwise it is awake or about to look); if the line
 * does not fit, it is dropped and counted. Woken with little queued, the writer waits up to
 * LOG_BATCH_MS for more, so under load it makes a few large writes a second instead of a
 * wake-up and a write per line. The writer takes the lock only
 * to find the readable span, writes it with the lock released, then frees the span. It writes at
 * most PIPE_BUF bytes at a time, after poll() says the fd takes bytes, so log_free() is never
 * stuck behind a reader that stopped reading: once stopping, the writer gives the fd
 * LOG_FLUSH_MS to make progress, then drops what is left. */
#include "server/obs/log.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "server/json.h"

/* How long log_free() waits for a blocked fd to take more bytes before dropping the rest. */
#define LOG_FLUSH_MS 1000
/* Batching: with less than LOG_BATCH_BYTES queued, the writer waits up to LOG_BATCH_MS for more. */
#define LOG_BATCH_MS 5
#define LOG_BATCH_BYTES (64 * 1024)

struct log {
    int fd;                        /* where lines go */
    enum log_level level;          /* most verbose level written */
    atomic_uint_fast64_t *dropped; /* drop counter, or NULL */
    pthread_mutex_t mu;            /* guards the ring */
    pthread_cond_t cv;             /* data queued, or stop */
    char *ring;                    /* cap bytes */
    size_t cap, head, len;         /* size, first unread byte, bytes queued; guarded by mu */
    atomic_bool stop;              /* log_free() has begun; set under mu (for cv), read anywhere */
    pthread_t thread;              /* the writer */
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until the fd takes bytes (or fails, which write() then reports). Returns false when
 * stopping and the fd made no progress for LOG_FLUSH_MS. */
static bool wait_writable(struct log *l)
{
    struct pollfd p = {.fd = l->fd, .events = POLLOUT};
    int64_t give_up = -1;
    for (;;) {
        int n = poll(&p, 1, 100);
        if (n != 0 && !(n < 0 && errno == EINTR))
            return true;
        if (!atomic_load(&l->stop))
            continue;
        int64_t now = mono_ms();
        if (give_up < 0)
            give_up = now + LOG_FLUSH_MS;
        else if (now >= give_up)
            return false;
    }
}

/* Writes p[0..n); returns false if the fd is stuck while stopping (the rest is to be dropped). */
static bool write_all(struct log *l, const char *p, size_t n)
{
    while (n > 0) {
        if (!wait_writable(l))
            return false;
        ssize_t w = write(l->fd, p, n < PIPE_BUF ? n : PIPE_BUF);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return true; /* nowhere to report a failing stderr; drop this span */
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static void *log_main(void *arg)
{
    struct log *l = arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (l->len == 0 && !atomic_load(&l->stop))
            pthread_cond_wait(&l->cv, &l->mu);
        if (l->len == 0)
            break;
        if (l->len < LOG_BATCH_BYTES && !atomic_load(&l->stop)) {
            int64_t until = mono_ms() + LOG_BATCH_MS;
            struct timespec ts = {.tv_sec = until / 1000, .tv_nsec = (until % 1000) * 1000000L};
            pthread_cond_timedwait(&l->cv, &l->mu, &ts); /* producers do not signal meanwhile */
        }
        size_t head = l->head;
        size_t n = l->len;
        if (head + n > l->cap)
            n = l->cap - head; /* up to the ring's end; the rest next round */
        pthread_mutex_unlock(&l->mu);
        bool ok = write_all(l, l->ring + head, n); /* producers write outside [head, head+n) */
        pthread_mutex_lock(&l->mu);
        if (!ok) { /* stopping and the fd is stuck: drop everything */
            l->len = 0;
            break;
        }
        l->head = (l->head + n) % l->cap;
        l->len -= n;
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

int log_new(int fd, enum log_level level, size_t ring_bytes, atomic_uint_fast64_t *dropped,
            struct log **out)
{
    struct log *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    int rc = -ENOMEM;
    l->ring = malloc(ring_bytes);
    if (!l->ring)
        goto fail_free;
    l->fd = fd;
    l->level = level;
    l->dropped = dropped;
    l->cap = ring_bytes;
    if ((rc = -pthread_mutex_init(&l->mu, NULL)) != 0)
        goto fail_ring;
    pthread_condattr_t ca; /* the batching wait is on the monotonic clock */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    rc = -pthread_cond_init(&l->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0)
        goto fail_mutex;
    if ((rc = -pthread_create(&l->thread, NULL, log_main, l)) != 0)
        goto fail_cond;
    *out = l;
    return 0;
fail_cond:
    pthread_cond_destroy(&l->cv);
fail_mutex:
    pthread_mutex_destroy(&l->mu);
fail_ring:
    free(l->ring);
fail_free:
    free(l);
    return rc;
}

const char *log_level_name(enum log_level l)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    return (unsigned)l < 4 ? names[l] : "info";
}

bool log_enabled(const struct log *l, enum log_level level)
{
    return l && level <= l->level;
}

void log_begin(struct json_buf *b, enum log_level level, const char *msg)
{
    json_buf_clear(b);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    json_buf_printf(b,
                    "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\",\"msg\":",
                    tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                    ts.tv_nsec / 1000000, log_level_name(level));
    json_append_string(b, msg, strlen(msg));
}

void log_end(struct log *l, struct json_buf *b)
{
    json_buf_append_str(b, "}\n");
    if (!l || json_buf_failed(b))
        return;
    bool queued = false;
    pthread_mutex_lock(&l->mu);
    if (!atomic_load(&l->stop) && b->len <= l->cap - l->len) {
        size_t tail = (l->head + l->len) % l->cap;
        size_t first = b->len < l->cap - tail ? b->len : l->cap - tail;
        memcpy(l->ring + tail, b->data, first);
        memcpy(l->ring, b->data + first, b->len - first);
        if (l->len == 0)
            pthread_cond_signal(&l->cv);
        l->len += b->len;
        queued = true;
    }
    pthread_mutex_unlock(&l->mu);
    if (!queued && l->dropped)
        atomic_fetch_add_explicit(l->dropped, 1, memory_order_relaxed);
}

void log_msg(struct log *l, enum log_level level, const char *msg)
{
    if (!log_enabled(l, level))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, level, msg);
    log_end(l, &b);
    json_buf_destroy(&b);
}

void log_free(struct log *l)
{
    if (!l)
        return;
    pthread_mutex_lock(&l->mu);
    atomic_store(&l->stop, true);
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->thread, NULL);
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l->ring);
    free(l);
}

void log_fieldsf(struct log *l, enum log_level level, const char *msg, const char *fmt, ...)
{
    if (!l || !log_enabled(l, level))
        return;
    struct json_buf b;
    json_buf_init(&b);
    log_begin(&b, level, msg);
    va_list ap;
    va_start(ap, fmt);
    char extra[512];
    vsnprintf(extra, sizeof(extra), fmt, ap);
    va_end(ap);
    json_buf_append_str(&b, extra);
    log_end(l, &b);
    json_buf_destroy(&b);
}
