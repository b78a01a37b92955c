/* framing: the verdict on a request's header section, before any of its body is read.
 *
 * A pure module: header fields (name and value with their lengths, so a NUL inside is seen) go
 * in one at a time, a verdict comes out. It decides what RFC 9112 and RFC 9110 leave no doubt
 * about and what a front proxy could read differently from fanout (request smuggling):
 * Content-Length with Transfer-Encoding, repeated Content-Length or Transfer-Encoding lines, a
 * Transfer-Encoding other than a single final "chunked", a malformed Content-Length, whitespace
 * between a field name and its colon, CR, LF or NUL inside a value, and the Host count.
 * The caller answers a failed verdict and closes the connection after the answer.
 * No threads, no allocation; a struct framing lives on the caller's stack. */
#ifndef FANOUT_FRAMING_H
#define FANOUT_FRAMING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A verdict: status 0 means acceptable. */
struct framing_verdict {
    unsigned status;   /* 0, 400, or 501 (a transfer coding fanout does not implement) */
    const char *code;  /* JSON error code: "bad_framing", "bad_header", "unsupported_encoding" */
    char message[160]; /* one sentence for the client */
};

/* What has been seen so far; the fields are private. */
struct framing {
    unsigned _cl_count, _te_count, _host_count; /* lines of each */
    bool _cl_bad;                               /* a Content-Length value was malformed */
    uint64_t _cl;                               /* its value, when well formed */
    int _te;                                    /* 0 chunked only, 1 unknown coding, 2 malformed */
    struct framing_verdict _first;              /* the first field-level failure, if any */
};

/* Starts a header section. */
void framing_init(struct framing *f);

/* Feeds one header field: 'name' (name_len bytes, as the parser split it at the colon) and
 * 'value' (value_len bytes; optional whitespace around it is ignored). */
void framing_field(struct framing *f, const char *name, size_t name_len, const char *value,
                   size_t value_len);

/* The verdict on the whole section, for a request line of HTTP version 'version' ("HTTP/1.1",
 * "HTTP/1.0"). Returns true when the request is acceptable; false fills 'v'. */
bool framing_finish(const struct framing *f, const char *version, struct framing_verdict *v);

/* Trims optional whitespace (SP, HTAB; RFC 9110 5.5) from both ends of *s / *len. */
void framing_trim(const char **s, size_t *len);

/* The path of a request target: the origin form as it is, the absolute form
 * ("http://host:port/path", RFC 9112 3.2.2) without its scheme and authority ("/" when it has
 * no path). Returns a pointer into 'target'. */
const char *framing_target_path(const char *target);

#endif
