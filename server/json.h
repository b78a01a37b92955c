/* json: the JSON building blocks of server/: a growable output buffer, string escaping, a strict
 * UTF-8 check, a strict non-allocating validator and integer formatting.
 *
 * Everything here is a pure function of its arguments (no globals, no locks, no threads), so any
 * thread may call any function, as long as one struct json_buf is used by one thread at a time.
 *
 * Memory: a struct json_buf is embedded by its owner and holds one malloc'd block; nothing else
 * allocates. Appends never fail loudly: when memory runs out the buffer sets a sticky 'oom' flag
 * and ignores every later append, so a writer appends freely and checks json_buf_failed() (or the
 * NULL from json_buf_take()) once at the end. */
#ifndef FANOUT_JSON_H
#define FANOUT_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* An output buffer. Zero-initialised (or json_buf_init()) it is empty and owns no memory. While
 * 'data' is not NULL it is NUL-terminated at data[len] (the NUL is not counted in len), so it can
 * be printed or handed to C-string APIs. Read 'data' and 'len' freely; change them only through
 * the functions below. */
struct json_buf {
    char *data; /* malloc'd block of 'cap' bytes, or NULL before the first append */
    size_t len; /* bytes written, excluding the terminating NUL */
    size_t cap; /* bytes allocated, including room for the NUL */
    bool oom;   /* sticky: an allocation failed (or a size overflowed); appends are ignored */
};

/* Deepest nesting json_valid() accepts: "[]" and "{}" are depth 1, a scalar depth 0. */
#define JSON_MAX_DEPTH 512

/* Bytes json_format_int64() may write: "-9223372036854775808" is 20, no NUL is written. */
#define JSON_INT64_MAX_CHARS 20

/* Largest magnitude json_id_from_number() accepts: 2^53 - 1. From 2^53 on, a double stands for
 * more than one integer (2^53 + 1 parses as 2^53), so the id the client meant is unknown. */
#define JSON_ID_MAX_EXACT 9007199254740991.0

/* Makes 'b' empty, owning no memory. Does not allocate. */
void json_buf_init(struct json_buf *b);

/* Frees the block 'b' owns and makes it empty again (oom cleared); 'b' may be reused. */
void json_buf_destroy(struct json_buf *b);

/* Sets the length to 0 and clears 'oom', keeping the block for reuse. */
void json_buf_clear(struct json_buf *b);

/* Makes room for 'extra' more bytes (plus the NUL) so that appends totalling 'extra' bytes do not
 * reallocate. Returns false, setting 'oom', if memory runs out or the size overflows; false also
 * when 'oom' was already set. */
bool json_buf_reserve(struct json_buf *b, size_t extra);

/* Appends 'n' bytes from 'p' ('p' may be NULL when n is 0, and may point into b->data, e.g. to
 * repeat earlier output, even if the block moves). On failure sets 'oom'. */
void json_buf_append(struct json_buf *b, const void *p, size_t n);

/* Appends one byte. On failure sets 'oom'. */
void json_buf_append_char(struct json_buf *b, char c);

/* Appends the NUL-terminated string 's' verbatim (no escaping). On failure sets 'oom'. */
void json_buf_append_str(struct json_buf *b, const char *s);

/* Appends printf-formatted text (verbatim, no escaping); the arguments must not point into b->data.
 * On failure (memory, or a format error) sets 'oom'. */
void json_buf_printf(struct json_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* True once an append has failed; the contents are then incomplete and must not be sent. */
bool json_buf_failed(const struct json_buf *b);

/* Hands the block to the caller and leaves 'b' empty (oom cleared). Returns a NUL-terminated
 * malloc'd string that the caller frees with free() (so MHD_RESPMEM_MUST_FREE works), its length
 * in *len if 'len' is not NULL; an empty buffer gives "" (still malloc'd). Returns NULL if 'oom'
 * was set (the block is freed instead), or if a never-used buffer cannot allocate its "". */
char *json_buf_take(struct json_buf *b, size_t *len);

/* Appends 's[0..len)' as a JSON string literal, quotes included ('s' may be NULL when len is 0).
 * Escapes '"' and '\\'; \b \f \n \r \t in short form; the other control bytes 0x00-0x1F as
 * \u00XX (lower-case hex); and U+2028 and U+2029 as \u2028 and \u2029 so the output is also a
 * valid JavaScript literal. Everything else, including DEL and well-formed non-ASCII UTF-8, is
 * copied as is; '/' is not escaped. Invalid UTF-8 never reaches the output: each maximal
 * ill-formed subsequence (Unicode §3.9, "U+FFFD substitution of maximal subparts", the same as
 * WHATWG's decoder and Python's "replace") becomes one U+FFFD, written as the three raw bytes
 * EF BF BD. So the output is always valid UTF-8 and valid JSON, and equals the input plus quotes
 * and escapes when the input is valid UTF-8. 's' must not point into 'b' (the block may move).
 * On failure sets 'oom'. */
void json_append_string(struct json_buf *b, const char *s, size_t len);

/* Appends the decimal text of 'v' (a valid JSON number). On failure sets 'oom'. */
void json_append_int64(struct json_buf *b, int64_t v);

/* Writes the decimal text of 'v' to 'dst' (room for JSON_INT64_MAX_CHARS bytes, no NUL written)
 * and returns its length. */
size_t json_format_int64(int64_t v, char *dst);

/* True if 's[0..len)' is strict UTF-8 (RFC 3629): no overlong forms, no surrogates
 * U+D800-U+DFFF, nothing above U+10FFFF, no truncated sequence at the end. NUL bytes are valid
 * (U+0000). The empty string is valid. */
bool json_utf8_valid(const char *s, size_t len);

/* True if 's[0..len)' is exactly one RFC 8259 JSON value with optional surrounding whitespace
 * (space, tab, LF, CR). On success, when not NULL, *start and *end receive the span of the value
 * without that whitespace (s + *start up to s + *end), ready to be spliced raw into a response;
 * on failure they are left untouched. Strict on purpose, since what passes is copied verbatim:
 *   - numbers follow the RFC grammar exactly (no leading zeros, "+1", ".5", "1.", NaN, Infinity);
 *   - strings must be valid UTF-8 (as json_utf8_valid()) with no raw control bytes 0x00-0x1F and
 *     only the escapes \" \\ \/ \b \f \n \r \t \uXXXX;
 *   - \uXXXX must denote Unicode scalar values: a high surrogate \uD800-\uDBFF must be followed by
 *     a low one \uDC00-\uDFFF, and a lone surrogate is REJECTED. The RFC 8259 grammar allows lone
 *     surrogates but §8.2 calls their handling unpredictable and I-JSON (RFC 7493 §2.1) forbids
 *     them; rejecting means such a body is sent to the client as a JSON string instead, which
 *     every decoder reads. \u0000 is accepted;
 *   - nesting deeper than JSON_MAX_DEPTH is rejected. The validator is iterative with a fixed
 *     64-byte stack, so any input (say 100,000 '[') is safe;
 *   - no trailing commas, no comments, no byte-order mark, no second value ("1 2"); empty or
 *     all-whitespace input is rejected; object keys may repeat (RFC 8259 §4 allows it).
 * Does not allocate; linear time. */
bool json_valid(const char *s, size_t len, size_t *start, size_t *end);

/* Converts a JSON number id (cJSON gives a double) to an integer. Returns 0 and stores it in *out
 * if 'v' is integral with |v| <= 2^53 - 1 (-0 gives 0); -EINVAL if 'v' is NaN, infinite or has a
 * fractional part; -ERANGE if |v| >= 2^53, where a double no longer tells neighbours apart
 * (2^53+1 reads as 2^53). *out is left untouched on error. */
int json_id_from_number(double v, int64_t *out);

/* The error document every error answer of fanout's has:
 * {"error":{"code":"<code>","message":"<message>"<extra>}} and a newline. 'code' is a plain
 * token (not escaped); 'message' is escaped; 'extra' is raw JSON members starting with a comma,
 * or NULL. */
void json_error_doc(struct json_buf *out, const char *code, const char *message,
                    const char *extra);

#endif
