/* framing: the request framing verdict (framing.h).
 *
 * Decisions, each from RFC 9112 / RFC 9110 or from removing a difference a front proxy could
 * exploit:
 * - Transfer-Encoding with Content-Length (either order): 400. RFC 9112 6.1 lets a server
 *   read such a message as chunked, but a proxy in front may have used the length, and the
 *   connection must be closed after it anyway; refusing leaves no two readings.
 * - Content-Length repeated, with different or with equal values: 400. RFC 9110 8.6 allows
 *   folding equal values into one, but a proxy that kept the first line and one that kept the
 *   last would still agree only by luck of the values; nginx refuses both too.
 * - Content-Length must be 1*DIGIT after trimming optional whitespace, and fit in 64 bits; a
 *   list ("13, 5"), a sign, an empty value or an overflow is 400 (RFC 9112 6.3 point 5).
 * - Transfer-Encoding repeated: 400 (the lines would be one list, and only a final chunked
 *   once is acceptable). A single line must be exactly the coding "chunked" (any case, OWS
 *   around it): another coding anywhere in it (gzip, identity, xchunked) is 501 (RFC 9112 6.1:
 *   a coding the server does not understand); chunked twice, an empty element or parameters on
 *   chunked are 400.
 * - Transfer-Encoding on HTTP/1.0: 400 (RFC 9112 6.1: the framing is faulty, close after).
 * - A field name must be a token: whitespace before the colon (RFC 9112 5.1 MUST 400) or any
 *   other separator inside it is 400.
 * - CR, LF or NUL inside a value is 400 (RFC 9110 5.5 allows reject or replace; rejecting keeps
 *   a truncated value from reaching a log or an upstream). So are other control bytes but HTAB.
 * - Host: exactly one on HTTP/1.1 (RFC 9112 3.2 MUST 400), at most one otherwise. */
#include "server/http/framing.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

enum { TE_CHUNKED = 0, TE_UNKNOWN = 1, TE_MALFORMED = 2 };

void framing_init(struct framing *f)
{
    memset(f, 0, sizeof(*f));
}

static bool is_tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return true;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

void framing_trim(const char **s, size_t *len)
{
    const char *p = *s;
    size_t n = *len;
    while (n && (p[0] == ' ' || p[0] == '\t')) {
        p++;
        n--;
    }
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    *s = p;
    *len = n;
}

static bool name_is(const char *name, size_t len, const char *want)
{
    return len == strlen(want) && strncasecmp(name, want, len) == 0;
}

/* Records the first field-level failure only: the client learns one reason. */
static void fail_field(struct framing *f, const char *code, const char *fmt, const char *what,
                       size_t what_len)
{
    if (f->_first.status)
        return;
    f->_first.status = 400;
    f->_first.code = code;
    snprintf(f->_first.message, sizeof(f->_first.message), fmt, (int)what_len, what);
}

/* Content-Length: 1*DIGIT, at most 2^64 - 1. */
static bool parse_length(const char *v, size_t n, uint64_t *out)
{
    if (n == 0)
        return false;
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return false;
        unsigned d = (unsigned)(v[i] - '0');
        if (x > (UINT64_MAX - d) / 10)
            return false;
        x = x * 10 + d;
    }
    *out = x;
    return true;
}

/* One Transfer-Encoding line: TE_CHUNKED when it is exactly one "chunked". */
static int parse_codings(const char *v, size_t n)
{
    int verdict = TE_CHUNKED;
    bool chunked_seen = false, any = false;
    size_t i = 0;
    for (;;) {
        size_t j = i;
        while (j < n && v[j] != ',')
            j++;
        const char *e = v + i;
        size_t el = j - i;
        framing_trim(&e, &el);
        if (el == 0)
            return TE_MALFORMED; /* "chunked," or ", chunked" or an empty value */
        size_t k = 0;
        while (k < el && is_tchar((unsigned char)e[k]))
            k++;
        bool chunked = k == 7 && strncasecmp(e, "chunked", 7) == 0;
        if (k == 0)
            return TE_MALFORMED;
        if (chunked && (k != el || chunked_seen))
            return TE_MALFORMED; /* parameters on chunked, or chunked twice */
        if (!chunked)
            verdict = TE_UNKNOWN; /* gzip, identity, xchunked, ...: codings fanout refuses, 501 */
        else if (j < n)
            verdict = verdict == TE_UNKNOWN ? TE_UNKNOWN : TE_MALFORMED; /* not the last */
        chunked_seen |= chunked;
        any = true;
        if (j >= n)
            break;
        i = j + 1;
    }
    if (!chunked_seen && verdict == TE_CHUNKED)
        verdict = TE_UNKNOWN;
    return any ? verdict : TE_MALFORMED;
}

void framing_field(struct framing *f, const char *name, size_t name_len, const char *value,
                   size_t value_len)
{
    for (size_t i = 0; i < name_len; i++) {
        if (!is_tchar((unsigned char)name[i])) {
            bool ws = name[i] == ' ' || name[i] == '\t';
            fail_field(f, ws ? "bad_framing" : "bad_header",
                       ws ? "whitespace between the field name \"%.*s\" and its colon"
                          : "the field name \"%.*s\" is not a token",
                       name, name_len > 64 ? 64 : name_len);
            return;
        }
    }
    if (name_len == 0) {
        fail_field(f, "bad_header", "an empty field name%.*s", "", 0);
        return;
    }
    for (size_t i = 0; i < value_len; i++) {
        unsigned char c = (unsigned char)value[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f) {
            fail_field(f, "bad_header",
                       c == 0 ? "a NUL byte inside the value of %.*s"
                              : "a control character inside the value of %.*s",
                       name, name_len > 64 ? 64 : name_len);
            return;
        }
    }
    framing_trim(&value, &value_len);
    if (name_is(name, name_len, "Content-Length")) {
        f->_cl_count++;
        uint64_t x;
        if (parse_length(value, value_len, &x))
            f->_cl = x;
        else
            f->_cl_bad = true;
    } else if (name_is(name, name_len, "Transfer-Encoding")) {
        f->_te_count++;
        int te = parse_codings(value, value_len);
        if (te > f->_te || f->_te_count == 1)
            f->_te = te;
    } else if (name_is(name, name_len, "Host")) {
        f->_host_count++;
    }
}

static bool verdict(struct framing_verdict *v, unsigned status, const char *code, const char *msg)
{
    v->status = status;
    v->code = code;
    snprintf(v->message, sizeof(v->message), "%s", msg);
    return false;
}

bool framing_finish(const struct framing *f, const char *version, struct framing_verdict *v)
{
    memset(v, 0, sizeof(*v));
    if (f->_first.status) {
        *v = f->_first;
        return false;
    }
    bool http11 = version && strcmp(version, "HTTP/1.1") == 0;
    if (f->_te_count && f->_cl_count)
        return verdict(v, 400, "bad_framing",
                       "both Transfer-Encoding and Content-Length: the body's length is ambiguous");
    if (f->_cl_count > 1)
        return verdict(v, 400, "bad_framing", "Content-Length is given more than once");
    if (f->_cl_bad)
        return verdict(v, 400, "bad_framing",
                       "Content-Length must be one decimal number below 2^64");
    if (f->_te_count > 1)
        return verdict(v, 400, "bad_framing", "Transfer-Encoding is given more than once");
    if (f->_te_count && !http11)
        return verdict(v, 400, "bad_framing", "Transfer-Encoding on a request that is not HTTP/1.1");
    if (f->_te_count && f->_te == TE_UNKNOWN)
        return verdict(v, 501, "unsupported_encoding",
                       "the only transfer coding accepted is a single chunked");
    if (f->_te_count && f->_te == TE_MALFORMED)
        return verdict(v, 400, "bad_framing", "Transfer-Encoding must be a single chunked");
    if (http11 && f->_host_count != 1)
        return verdict(v, 400, "bad_header",
                       f->_host_count ? "Host is given more than once"
                                      : "an HTTP/1.1 request needs a Host field");
    if (f->_host_count > 1)
        return verdict(v, 400, "bad_header", "Host is given more than once");
    return true;
}

const char *framing_target_path(const char *target)
{
    size_t skip = 0;
    if (strncasecmp(target, "http://", 7) == 0)
        skip = 7;
    else if (strncasecmp(target, "https://", 8) == 0)
        skip = 8;
    if (!skip)
        return target;
    const char *slash = strchr(target + skip, '/');
    return slash ? slash : "/";
}
