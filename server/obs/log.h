/* log: JSON lines on a file descriptor (stderr), written by one thread so the request path never
 * blocks on a slow reader.
 *
 * A line is built by the caller in a json_buf (log_begin() opens the object with time, level and
 * msg; the caller appends ",\"key\":value" fields; log_end() closes it and queues it). The queue
 * is a bounded byte ring: when it is full the line is dropped and counted, never waited for.
 * log_free() writes what is queued, then stops and joins the thread. Thread-safe. */
#ifndef FANOUT_LOG_H
#define FANOUT_LOG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

struct json_buf;
struct log;

/* "error", "warn", "info", "debug" (the --log-level words and the lines' "level"). */
const char *log_level_name(enum log_level l);

/* Starts the writer thread for 'fd' with a 'ring_bytes' queue; lines above 'level' are skipped.
 * '*dropped' (may be NULL) counts dropped lines. Returns 0 or a negative errno. */
int log_new(int fd, enum log_level level, size_t ring_bytes, atomic_uint_fast64_t *dropped,
            struct log **out);

/* Whether lines at 'level' are written. */
bool log_enabled(const struct log *l, enum log_level level);

/* Clears 'b' and starts a line: {"time":"<RFC 3339 UTC>","level":"...","msg":"<msg>" */
void log_begin(struct json_buf *b, enum log_level level, const char *msg);

/* Closes the line in 'b' and queues it (or counts it dropped). 'b' stays the caller's. */
void log_end(struct log *l, struct json_buf *b);

/* A line with only a message. */
void log_msg(struct log *l, enum log_level level, const char *msg);

/* A line with a message and fields: 'fmt' makes the text after the message, each field as
 * ",\"key\":value" (at most 512 bytes; the caller escapes what it puts in strings). 'l' may be
 * NULL: nothing is written. */
void log_fieldsf(struct log *l, enum log_level level, const char *msg, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Writes what is queued, stops and joins the writer, frees the log. If the fd stops taking
 * bytes (a reader that no longer reads), the rest is dropped after about a second without
 * progress, so shutdown never hangs on stderr. */
void log_free(struct log *l);

#endif
