/* Fuzz target: URL building (fetch/url.h, fetch/upstream.h). For any id bytes, the URL built
 * for each of several templates keeps the template's scheme, host, port, path prefix and the
 * query after {id} byte for byte; the id's bytes hold no '/', '?' or '#', the path segment
 * holding them is never "." or ".."; and they percent-decode back to the id. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/upstream.h"
#include "fetch/url.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const templates[] = {
    "http://10.0.0.1:9000/items/{id}",
    "https://h.example/a/b/{id}?x=1&y=%20",
    "http://[::1]:8080/{id}/tail#frag",
    "http://h/p/{id}.json",
    "http://h/p;{id};q",
};
#define NT (sizeof(templates) / sizeof(templates[0]))

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct upstreams *u;
    if (!u) {
        struct upstreams_opts o = {.policy = UPSTREAM_REPLICAS};
        char err[256];
        if (upstreams_new((const char *const *)templates, NT, &o, &u, err, sizeof(err)) != 0)
            abort();
    }
    if (size == 0 || size > 256)
        return 0;
    const char *id = (const char *)data;
    char key[3 * 256];
    size_t kl = url_encode_key(id, size, key);
    uint16_t rank[UPSTREAMS_MAX];
    /* templates alone: one member per upstream, named by it, so member t is template t */
    if (upstreams_rank(u, key, kl, 0, rank) != NT)
        abort();
    unsigned seen = 0;
    for (unsigned i = 0; i < NT; i++)
        seen |= 1u << rank[i];
    if (seen != (1u << NT) - 1)
        abort(); /* a permutation */
    for (unsigned t = 0; t < NT; t++) {
        char url[4096];
        size_t n = upstream_url(u, t, key, kl, url, sizeof(url));
        if (n >= sizeof(url) || strlen(url) != n)
            abort();
        const char *tm = templates[t];
        const char *mark = strstr(tm, "{id}");
        size_t pre = (size_t)(mark - tm), suf = strlen(mark + 4);
        if (n < pre + suf || memcmp(url, tm, pre) != 0 || strcmp(url + n - suf, mark + 4) != 0)
            abort();
        const char *seg = url + pre;
        size_t sl = n - pre - suf;
        if (memchr(seg, '/', sl) || memchr(seg, '?', sl) || memchr(seg, '#', sl))
            abort();
        /* The whole path segment holding the id is never a dot-segment. */
        size_t a = pre, b = pre + sl;
        while (a > 0 && url[a - 1] != '/')
            a--;
        while (b < n && !strchr("/?#", url[b]))
            b++;
        if ((b - a == 1 && url[a] == '.') || (b - a == 2 && url[a] == '.' && url[a + 1] == '.'))
            abort();
        /* percent-decode: every byte is unreserved or %XX, and the result is the id */
        char dec[256];
        size_t dl = 0;
        for (size_t i = 0; i < sl; i++) {
            char c = seg[i];
            if (c == '%') {
                if (i + 2 >= sl)
                    abort();
                int h = hexval(seg[i + 1]), l = hexval(seg[i + 2]);
                if (h < 0 || l < 0)
                    abort();
                c = (char)(h * 16 + l);
                i += 2;
            } else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                         (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == '~')) {
                abort();
            }
            if (dl >= sizeof(dec))
                abort();
            dec[dl++] = c;
        }
        if (dl != size || memcmp(dec, id, size) != 0)
            abort();
    }
    return 0;
}
