/* request: a POST /v1/batch body parsed and checked, with nothing fetched yet.
 *
 * request_parse() is pure (bytes in, a request or an error out; no I/O, no globals): the body
 * is parsed with cJSON and also checked by the strict RFC 8259 validator (json.h), every id is
 * checked (type, length, UTF-8, no \u0000) and the deadline is settled from the body's
 * timeout_ms, the X-Request-Timeout-Ms header (the smaller wins) and the limits. Every refusal
 * is an HTTP status, an error code and a message that names what was wrong (an id by index).
 *
 * Memory: a request owns one arena holding every position's echo text and id bytes; free it
 * with request_free(). Threads: none; a request is read-only once parsed. */
#ifndef FANOUT_REQUEST_H
#define FANOUT_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define REQUEST_ID_MAX_BYTES 256 /* longest string id */

enum batch_mode {
    MODE_ALL,     /* all results, or the first error (the default) */
    MODE_SETTLED, /* 200 with one entry per position, each a result or an error */
};

/* One position of the batch. Offsets are into the request's arena. */
struct request_item {
    uint32_t echo_off, echo_len; /* the id as JSON text, as the answer echoes it */
    uint32_t id_off, id_len;     /* the id's bytes (a number: its decimal text) */
};

struct request {
    size_t n;                   /* positions */
    struct request_item *items; /* n of them */
    char *arena;                /* every item's bytes */
    int64_t timeout_ms;         /* effective deadline: given (smaller of body and header) or the
                                   default, clamped to the maximum */
    enum batch_mode mode;       /* "mode" */
    bool hedge;                 /* "hedge" (default true): hedging allowed for this batch */
    bool coalesce;              /* "coalesce" (default true) */
};

struct request_limits {
    unsigned max_batch;         /* most ids */
    int64_t default_timeout_ms; /* when none is given */
    int64_t max_timeout_ms;     /* the largest allowed */
};

struct request_error {
    unsigned status;   /* 400 or 413, or 500 when out of memory */
    const char *code;  /* "bad_request", "too_many_ids", "internal" */
    char message[320]; /* one sentence */
};

/* The echo text and id bytes of position i. */
static inline const char *request_echo(const struct request *r, size_t i)
{
    return r->arena + r->items[i].echo_off;
}
static inline const char *request_id(const struct request *r, size_t i)
{
    return r->arena + r->items[i].id_off;
}

/* Parses body[0..len) (modified in place: \u0000 escapes are marked before cJSON sees them).
 * 'timeout_header' is the X-Request-Timeout-Ms value or NULL. Returns 0 and fills *out (free it
 * with request_free()), or -EINVAL / -ENOMEM with *err filled and *out empty. */
int request_parse(const struct request_limits *lim, char *body, size_t len,
                  const char *timeout_header, struct request *out, struct request_error *err);

void request_free(struct request *r);

#endif
