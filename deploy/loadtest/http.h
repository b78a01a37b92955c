/* http: an incremental HTTP/1.1 response parser for the load tool. It reads a status line and
 * headers (Content-Length, Transfer-Encoding: chunked, Connection, Content-Type), then a body
 * delimited by its length, by chunks (trailers skipped) or by the connection closing. Bytes are
 * fed as they arrive, in pieces of any size; nothing is pipelined, so a response ends a feed.
 *
 * The body is counted, and kept only when needed: a non-200 body (up to LT_HTTP_KEEP bytes, for
 * its JSON error code), with 'keep_ok' a 200 body too (up to LT_HTTP_KEEP_OK), and for an NDJSON
 * body its last non-empty line (up to LT_HTTP_LINE bytes), which a stream ends with its
 * {"done":true,...} summary; 'on_line', when set, is called with every complete NDJSON line.
 *
 * One parser per connection, used by one thread. */
#ifndef FANOUT_LT_HTTP_H
#define FANOUT_LT_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Largest status line plus headers accepted. */
#define LT_HTTP_MAX_HEAD 16384
/* Largest non-200 body kept. */
#define LT_HTTP_KEEP 65536
/* Largest 200 body kept with keep_ok. */
#define LT_HTTP_KEEP_OK (16u << 20)
/* Largest NDJSON line kept. */
#define LT_HTTP_LINE 4096

/* Where the parser is. */
enum lt_http_state {
    LT_HTTP_HEAD,       /* status line and headers */
    LT_HTTP_BODY_LEN,   /* Content-Length body */
    LT_HTTP_CHUNK_SIZE, /* a chunk-size line */
    LT_HTTP_CHUNK_DATA, /* inside a chunk */
    LT_HTTP_CHUNK_END,  /* the CRLF after a chunk */
    LT_HTTP_TRAILER,    /* trailer lines after the last chunk */
    LT_HTTP_BODY_EOF,   /* body up to the connection closing */
    LT_HTTP_DONE,       /* a whole response */
};

struct lt_http {
    enum lt_http_state state; /* where the parser is */
    int status;               /* status code, once the head is read */
    bool close;               /* the server closes the connection after this response */
    bool chunked;             /* Transfer-Encoding: chunked */
    bool ndjson;              /* Content-Type: application/x-ndjson */
    bool keep_body;           /* keep the body (set from the status, see above) */
    bool keep_ok;             /* keep 200 bodies too (set by the owner; kept by reset) */
    bool truncated;           /* the kept body was cut at its limit */
    void (*on_line)(void *arg, const char *line, size_t n); /* NDJSON line hook or NULL */
    void *line_arg;           /* its argument */
    uint64_t remaining;       /* bytes left of the body or of the current chunk */
    uint64_t body_len;        /* body bytes seen */
    size_t head_len;          /* bytes in head */
    char head[LT_HTTP_MAX_HEAD]; /* the head so far (also reused for chunk-size lines) */
    char *body;               /* kept body (malloc'd, owned) or NULL */
    size_t body_n, body_cap;  /* its length and allocation */
    char line[LT_HTTP_LINE];  /* NDJSON: the line being read */
    size_t line_n;            /* its length (bytes past LT_HTTP_LINE are dropped) */
    char last[LT_HTTP_LINE];  /* NDJSON: the last complete non-empty line */
    size_t last_n;            /* its length */
};

/* Prepares p for the first response. */
void lt_http_init(struct lt_http *p);

/* Prepares p for the next response on the same connection; keeps its allocation. */
void lt_http_reset(struct lt_http *p);

/* Frees what p holds. */
void lt_http_destroy(struct lt_http *p);

/* Feeds 'len' bytes; *used says how many belong to this response. Returns 1 when the response
 * is complete, 0 when more bytes are needed, -1 if the bytes are not a valid response. */
int lt_http_feed(struct lt_http *p, const char *buf, size_t len, size_t *used);

/* The connection closed. Returns 1 if that completes the response (a body delimited by the
 * close), -1 otherwise. */
int lt_http_eof(struct lt_http *p);

/* The kept NDJSON line that ends the body (the last non-empty one), or NULL; its length in *n. */
const char *lt_http_last_line(const struct lt_http *p, size_t *n);

#endif
