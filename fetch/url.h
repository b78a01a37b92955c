/* url: upstream URLs built from a template such as "http://10.0.0.5:9000/items/{id}?v=2".
 *
 * The template is parsed and checked once at startup (url_template_parse()); then, per id,
 * url_build() replaces "{id}" by the percent-encoded id. The encoding is chosen so that no id,
 * whatever bytes it holds, can change the scheme, host, port, the path before "{id}", or the query
 * and fragment after it:
 *   - every byte except the RFC 3986 unreserved set A-Z a-z 0-9 - . _ ~ is written as %XX with
 *     upper-case hex, so '/', '?', '#', '%', '@', ':', ';', space, controls and every byte >= 0x80
 *     (UTF-8 or not) are all escaped;
 *   - when "{id}" starts a path segment (it follows a '/') and the id is exactly "." or "..", the
 *     dots are written as %2E, so neither curl nor an RFC 3986 path normaliser on the way sees a
 *     dot-segment that would climb out of the path prefix. This covers "/items/{id}" and
 *     "/items/{id}/x", and also "/items/{id};p" (Tomcat-style "..;"); in other positions, say
 *     "/items/{id}.json", "." is already harmless. The caller should also set CURLOPT_PATH_AS_IS.
 *     Caveat: a WHATWG-URL-style server that decodes "%2e" before removing dot-segments will still
 *     treat "%2E%2E" as ".."; no encoding can stop that, so reject "." and ".." as ids if such a
 *     server is the upstream.
 * Percent-encoding is injective, so the encoded id (url_encode_id()) or the whole URL is a sound
 * key for deduplicating ids that would fetch the same resource; string "7" and number 7 (see
 * url_build_int64()) deliberately map to the same URL.
 *
 * Threads: none. A parsed template is immutable and may be read by any number of threads. */
#ifndef FANOUT_URL_H
#define FANOUT_URL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A parsed template, embedded by its owner. Filled by url_template_parse(), released by
 * url_template_destroy(); read-only in between (callers may read the fields). */
struct url_template {
    char *text;        /* malloc'd copy of the whole template, NUL-terminated */
    size_t prefix_len; /* text[0..prefix_len) comes before "{id}" */
    size_t suffix_off; /* text[suffix_off..) comes after "{id}" (prefix_len + 4) */
    size_t suffix_len; /* its length */
    bool id_seg_start; /* "{id}" follows a '/': the ids "." and ".." get their dots escaped */
};

/* Parses 'tmpl' (NUL-terminated). The rules, each with its own message in 'err':
 *   - it is not empty, and only printable ASCII (0x21-0x7E): no spaces, controls or raw UTF-8;
 *   - it starts with "http://" or "https://" (scheme case-insensitive);
 *   - the authority (up to the first '/', '?' or '#') has a host, and a port, if any, of 1-65535
 *     ("[...]" IPv6 literals are accepted as the host);
 *   - "{id}" occurs exactly once, and in the path: after the authority's first '/', before any
 *     '?' or '#' (so an id can never land in the host, port, query or fragment);
 *   - no other '{' or '}' (a likely typo such as "{ID}" or a second placeholder).
 * Returns 0 and fills *out, which the caller then releases with url_template_destroy(); or
 * -EINVAL, with a one-line reason (no trailing newline) in err[0..errlen) if errlen > 0, and *out
 * untouched; or -ENOMEM. */
int url_template_parse(const char *tmpl, struct url_template *out, char *err, size_t errlen);

/* Frees what url_template_parse() allocated; 't' is zeroed and may be destroyed again. */
void url_template_destroy(struct url_template *t);

/* Most bytes url_encode_id() or url_encode_key() writes for an id of 'idlen' bytes. */
#define URL_ENCODED_MAX(idlen) (3 * (idlen))

/* Bytes url_format_int64() may write: "-9223372036854775808" is 20. */
#define URL_INT64_MAX_CHARS 20

/* Writes the id's key: the id percent-encoded as by url_encode_id() but without the dot rule,
 * which depends on a template. The key is the same for every upstream, so it names the
 * resource for deduplication; url_build_key_into() turns it into a URL for one template.
 * 'dst' has room for URL_ENCODED_MAX(idlen) bytes; no NUL is written. Returns the length. */
size_t url_encode_key(const char *id, size_t idlen, char *dst);

/* Writes the decimal text of 'v' (no NUL) to 'dst' (URL_INT64_MAX_CHARS bytes); returns its
 * length. A numeric id's key is its decimal text, so 7 and "7" share a key. */
size_t url_format_int64(int64_t v, char *dst);

/* Writes the URL for a key (from url_encode_key()) into dst[0..cap), NUL-terminated, applying
 * the template's dot rule. Returns the URL's length; when that is cap or more, nothing useful was
 * written and the return value + 1 is the room needed. */
size_t url_build_key_into(const struct url_template *t, const char *key, size_t keylen, char *dst,
                          size_t cap);

/* Writes the percent-encoded id (rules at the top of this file, including the dot rule that
 * depends on 't') to 'dst', which has room for URL_ENCODED_MAX(idlen) bytes; writes no NUL.
 * Returns the number of bytes written. */
size_t url_encode_id(const struct url_template *t, const char *id, size_t idlen, char *dst);

/* Builds the URL for the id 'id[0..idlen)' (any bytes, NUL included). Returns 0 and stores in *out
 * a NUL-terminated malloc'd string the caller frees with free(), its length in *outlen if 'outlen'
 * is not NULL. Returns -EINVAL for an empty id, which would name the collection rather than an
 * item (*out untouched), or -ENOMEM. */
int url_build(const struct url_template *t, const char *id, size_t idlen, char **out,
              size_t *outlen);

/* url_build() for a numeric id, which becomes its decimal text first: 7 gives ".../items/7",
 * -3 gives ".../items/-3". Returns 0 or -ENOMEM. */
int url_build_int64(const struct url_template *t, int64_t id, char **out, size_t *outlen);

#endif
