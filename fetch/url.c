/* url: template parsing and per-id URL building.
 *
 * Design. The template is checked once, strictly, so that what url_build() does per id is a
 * plain concatenation: prefix, encoded id, suffix, with one malloc of the exact upper bound. The
 * safety argument lives in the encoding (see url.h): after url_template_parse() has proved that
 * "{id}" sits in the path, an id made only of unreserved bytes and %XX triplets cannot contain a
 * delimiter that ends the path ('?', '#'), starts a new segment ('/'), or is a dot-segment, so
 * the host, port, path prefix, query and fragment are those of the template.
 *
 * Threads and locks: none; a parsed template is read-only. */
#include "fetch/url.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>


#define ID_MARK "{id}"
#define ID_MARK_LEN 4

/* RFC 3986 unreserved bytes, the only ones an encoded id holds raw. */
/* clang-format off */
static const unsigned char unreserved[256] = {
    ['-'] = 1, ['.'] = 1, ['_'] = 1, ['~'] = 1,
    ['0'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['A'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['a'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
};
/* clang-format on */

static const char hexup[16] = "0123456789ABCDEF";

/* Writes the reason to err (if there is room) and returns -EINVAL. */
static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

/* Checks the authority a[0..n): optional userinfo, then a host (a name or a "[...]" literal),
 * then optionally ":port". Returns NULL if fine, else the reason. */
static const char *check_authority(const char *a, size_t n)
{
    const char *end = a + n;
    for (const char *q = a; q < end; q++) /* the host starts after the last '@' */
        if (*q == '@')
            a = q + 1;
    const char *port = NULL;
    if (a < end && *a == '[') {
        const char *close = memchr(a, ']', (size_t)(end - a));
        if (!close)
            return "upstream URL has an unterminated [IPv6] host";
        if (close == a + 1)
            return "upstream URL has no host";
        if (close + 1 < end) {
            if (close[1] != ':')
                return "upstream URL has junk after the [IPv6] host";
            port = close + 2;
        }
    } else {
        const char *colon = memchr(a, ':', (size_t)(end - a));
        if ((colon ? colon : end) == a)
            return "upstream URL has no host";
        if (colon)
            port = colon + 1;
    }
    if (port) {
        long v = 0;
        if (port == end)
            return "upstream URL has an empty port";
        for (const char *q = port; q < end; q++) {
            if (*q < '0' || *q > '9')
                return "upstream URL port is not a number";
            v = v * 10 + (*q - '0');
            if (v > 65535)
                return "upstream URL port is out of range (1-65535)";
        }
        if (v == 0)
            return "upstream URL port is out of range (1-65535)";
    }
    return NULL;
}

int url_template_parse(const char *tmpl, struct url_template *out, char *err, size_t errlen)
{
    if (errlen > 0)
        err[0] = '\0';
    if (!tmpl || !*tmpl)
        return fail(err, errlen, "upstream URL template is empty");
    size_t len = strlen(tmpl);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)tmpl[i];
        if (c < 0x21 || c > 0x7E)
            return fail(
                err, errlen,
                "upstream URL has a space, control or non-ASCII byte (0x%02X) at offset %zu", c, i);
    }
    size_t scheme;
    if (strncasecmp(tmpl, "http://", 7) == 0)
        scheme = 7;
    else if (strncasecmp(tmpl, "https://", 8) == 0)
        scheme = 8;
    else
        return fail(err, errlen, "upstream URL must start with http:// or https://");

    const char *mark = strstr(tmpl, ID_MARK);
    if (!mark)
        return fail(err, errlen, "upstream URL must contain {id}");
    if (strstr(mark + ID_MARK_LEN, ID_MARK))
        return fail(err, errlen, "upstream URL must contain {id} exactly once");
    for (size_t i = 0; i < len; i++) {
        if ((tmpl[i] == '{' || tmpl[i] == '}') &&
            !(tmpl + i >= mark && tmpl + i < mark + ID_MARK_LEN))
            return fail(err, errlen, "upstream URL has a '%c' at offset %zu besides {id}", tmpl[i],
                        i);
    }

    const char *auth = tmpl + scheme;
    const char *auth_end = auth + strcspn(auth, "/?#");
    if (mark < auth_end)
        return fail(err, errlen, "{id} must be in the upstream URL path, not in the host or port");
    const char *why = check_authority(auth, (size_t)(auth_end - auth));
    if (why)
        return fail(err, errlen, "%s", why);
    const char *path_end = auth_end + strcspn(auth_end, "?#");
    if (mark >= path_end) /* also when there is no path at all: "http://h?{id}" */
        return fail(err, errlen,
                    "{id} must be in the upstream URL path, not in the query or fragment");

    char *text = strdup(tmpl);
    if (!text)
        return -ENOMEM;
    out->text = text;
    out->prefix_len = (size_t)(mark - tmpl);
    out->suffix_off = out->prefix_len + ID_MARK_LEN;
    out->suffix_len = len - out->suffix_off;
    out->id_seg_start = mark[-1] == '/'; /* mark > auth_end >= tmpl + 7, so mark[-1] exists */
    return 0;
}

void url_template_destroy(struct url_template *t)
{
    free(t->text);
    memset(t, 0, sizeof(*t));
}

size_t url_encode_key(const char *id, size_t idlen, char *dst)
{
    char *q = dst;
    for (size_t i = 0; i < idlen; i++) {
        unsigned char c = (unsigned char)id[i];
        if (unreserved[c]) {
            *q++ = (char)c;
        } else {
            *q++ = '%';
            *q++ = hexup[c >> 4];
            *q++ = hexup[c & 15];
        }
    }
    return (size_t)(q - dst);
}

size_t url_format_int64(int64_t v, char *dst)
{
    char tmp[24];
    int n = snprintf(tmp, sizeof(tmp), "%" PRId64, v);
    memcpy(dst, tmp, (size_t)n);
    return (size_t)n;
}

/* The bytes that stand for 'key' in a URL from 't': the key itself, except "." and ".." right
 * after a '/', whose dots are escaped so that no dot-segment appears. */
static size_t put_key(const struct url_template *t, const char *key, size_t keylen, char *dst)
{
    bool dots = t->id_seg_start && keylen >= 1 && keylen <= 2 && key[0] == '.' &&
                (keylen == 1 || key[1] == '.');
    if (!dots) {
        memcpy(dst, key, keylen);
        return keylen;
    }
    for (size_t i = 0; i < keylen; i++)
        memcpy(dst + 3 * i, "%2E", 3);
    return 3 * keylen;
}

size_t url_encode_id(const struct url_template *t, const char *id, size_t idlen, char *dst)
{
    size_t n = url_encode_key(id, idlen, dst);
    if (n <= 2) { /* only "." and ".." change, and both encode to themselves */
        char key[2];
        memcpy(key, dst, n);
        n = put_key(t, key, n, dst);
    }
    return n;
}

size_t url_build_key_into(const struct url_template *t, const char *key, size_t keylen, char *dst,
                          size_t cap)
{
    size_t need = t->prefix_len + (keylen <= 2 ? 3 * keylen : keylen) + t->suffix_len + 1;
    if (need > cap)
        return need - 1; /* >= cap: the caller needs a larger buffer */
    char *q = dst;
    memcpy(q, t->text, t->prefix_len);
    q += t->prefix_len;
    q += put_key(t, key, keylen, q);
    memcpy(q, t->text + t->suffix_off, t->suffix_len + 1); /* with the NUL */
    return (size_t)(q - dst) + t->suffix_len;
}

int url_build(const struct url_template *t, const char *id, size_t idlen, char **out,
              size_t *outlen)
{
    if (idlen == 0)
        return -EINVAL;
    size_t fixed = t->prefix_len + t->suffix_len + 1;
    if (idlen > (SIZE_MAX - fixed) / 3)
        return -ENOMEM;
    char *u = malloc(fixed + URL_ENCODED_MAX(idlen));
    if (!u)
        return -ENOMEM;
    char *q = u;
    memcpy(q, t->text, t->prefix_len);
    q += t->prefix_len;
    q += url_encode_id(t, id, idlen, q);
    memcpy(q, t->text + t->suffix_off, t->suffix_len + 1); /* with the NUL */
    q += t->suffix_len;
    if (outlen)
        *outlen = (size_t)(q - u);
    *out = u;
    return 0;
}

int url_build_int64(const struct url_template *t, int64_t id, char **out, size_t *outlen)
{
    char num[URL_INT64_MAX_CHARS];
    return url_build(t, num, url_format_int64(id, num), out, outlen);
}
