/* render: writing a batch's answer, as a writer with begin / item / fail / end.
 *
 * batch_render() drives a writer: begin, then item() for each position in request order (a
 * result, or in settled mode possibly an error), then end; or, when the batch failed as a whole,
 * fail() once with the deciding call's result. The mapping from a result to an HTTP status, an
 * error code and a message (render_error()) is here, in one place, for every writer. The buffer
 * writer builds the JSON answer in memory; the line writer streams it as NDJSON, driven by
 * batch_stream() as calls complete.
 * Threads: a writer is used by one thread. */
#ifndef FANOUT_RENDER_H
#define FANOUT_RENDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/json.h"

struct call_result;
struct writer;

/* Limits quoted in messages. */
struct render_limits {
    int64_t timeout_ms;        /* the request's effective deadline */
    size_t max_body;           /* --max-body */
    size_t max_response_bytes; /* --max-response-bytes */
};

struct writer_ops {
    void (*begin)(struct writer *w);
    /* Position 'pos' (id echoed as 'echo') has result 'r' (success, or an error in settled
     * mode). */
    void (*item)(struct writer *w, size_t pos, const char *echo, const struct call_result *r);
    /* The batch failed with 'r' at the id 'echo' (NULL when no id is to blame). */
    void (*fail)(struct writer *w, const char *echo, const struct call_result *r);
    void (*end)(struct writer *w);
};

struct writer {
    const struct writer_ops *ops;
    struct render_limits lim;
    size_t fail_pos; /* set before fail(): the failing id's first position, or SIZE_MAX */
};

/* What an error result means to a client. */
struct render_error {
    unsigned status;      /* HTTP status of a batch failing with it */
    const char *code;     /* JSON error code */
    char message[1900];   /* one sentence (room for an escaped 256-byte id) */
    bool upstream_status; /* add "upstream_status": r->status */
};

/* The error of result 'r' (err != 0) at id 'echo' (JSON text, or NULL). */
void render_error(const struct render_limits *lim, const char *echo, const struct call_result *r,
                  struct render_error *out);

/* The buffer writer: a complete JSON answer in 'out' with its HTTP status. */
struct buf_writer {
    struct writer w;     /* first: a struct writer * is a struct buf_writer * */
    struct json_buf out; /* the answer */
    unsigned status;     /* its HTTP status */
    const char *code;    /* the error code when it is an error, else NULL */
    char *fail_id;       /* the failing id's JSON text (malloc'd), for the log, or NULL */
    bool too_large;      /* it grew past max_response_bytes (escaping can grow bodies) */
};

void buf_writer_init(struct buf_writer *bw, const struct render_limits *lim);
void buf_writer_destroy(struct buf_writer *bw);

/* The line writer (Accept: application/x-ndjson): one JSON line per position as it completes,
 * {"index":i,"id":..,"status":..,"data":..} or {"index":i,"id":..,"error":{..}}, then
 * {"done":true,"results":N,"errors":M}; when the batch fails (mode all), the failing position's
 * error line and {"done":true,"error":{..}} last. Each line goes to emit() whole (or NULL
 * when it could not be built for want of memory: the owner must end the stream as broken). A result
 * whose line would take the answer past max_response_bytes gets an upstream_too_large error
 * line instead (the calls' own accounting refuses bodies past the cap before that), so the
 * lines waiting for a slow reader never pass the cap by more than an error line a position. */
struct line_writer {
    struct writer w;       /* first */
    struct json_buf line;  /* the line being built */
    void (*emit)(void *arg, const char *data, size_t len);
    void *arg;
    size_t sent;           /* bytes emitted */
    unsigned results;      /* lines with a result */
    unsigned errors;       /* lines with an error (settled mode) */
    unsigned status;       /* the HTTP status the error would have had (for the log) */
    const char *code;      /* the error code once failed, or NULL */
    char *fail_id;         /* the failing id's JSON text (malloc'd), or NULL */
    bool oom;              /* a line could not be built */
};

void line_writer_init(struct line_writer *lw, const struct render_limits *lim,
                      void (*emit)(void *arg, const char *data, size_t len), void *arg);
void line_writer_destroy(struct line_writer *lw);

#endif
