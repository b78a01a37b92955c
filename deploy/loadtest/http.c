/* http: incremental HTTP/1.1 response parser (see http.h). The head is copied into p->head
 * until its blank line arrives, then parsed in place; chunk-size lines reuse the same buffer.
 * Body bytes are never copied unless kept. No locks: one parser per connection. */
#include "deploy/loadtest/http.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

void lt_http_init(struct lt_http *p)
{
    memset(p, 0, sizeof(*p));
    lt_http_reset(p);
}

void lt_http_reset(struct lt_http *p)
{
    p->state = LT_HTTP_HEAD;
    p->status = 0;
    p->close = p->chunked = p->ndjson = p->keep_body = p->truncated = false;
    p->remaining = p->body_len = 0;
    p->head_len = p->body_n = p->line_n = p->last_n = 0;
}

void lt_http_destroy(struct lt_http *p)
{
    free(p->body);
    p->body = NULL;
    p->body_cap = 0;
}

/* Case-insensitive: does the header value [v, v + n) contain the token 'tok'? */
static bool has_token(const char *v, size_t n, const char *tok)
{
    size_t k = strlen(tok);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(v + i, tok, k) == 0)
            return true;
    return false;
}

/* Parses the complete head in p->head (p->head_len bytes, ending in CRLF CRLF). */
static int parse_head(struct lt_http *p)
{
    const char *s = p->head, *end = p->head + p->head_len;
    if (p->head_len < 12 || memcmp(s, "HTTP/1.", 7) != 0)
        return -1;
    bool http10 = s[7] == '0';
    if (s[8] != ' ' || s[9] < '1' || s[9] > '5' || s[10] < '0' || s[10] > '9' || s[11] < '0' ||
        s[11] > '9')
        return -1;
    p->status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    bool have_len = false, keep_alive = false;
    uint64_t len = 0;
    const char *line = memchr(s, '\n', (size_t)(end - s));
    if (!line)
        return -1;
    line++;
    while (line < end) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol)
            return -1;
        size_t n = (size_t)(eol - line);
        if (n && line[n - 1] == '\r')
            n--;
        if (n == 0)
            break; /* the blank line */
        const char *colon = memchr(line, ':', n);
        if (!colon)
            return -1;
        size_t name_n = (size_t)(colon - line);
        const char *v = colon + 1;
        size_t vn = n - name_n - 1;
        while (vn && (*v == ' ' || *v == '\t')) {
            v++;
            vn--;
        }
        while (vn && (v[vn - 1] == ' ' || v[vn - 1] == '\t'))
            vn--;
        if (name_n == 14 && strncasecmp(line, "content-length", 14) == 0) {
            if (vn == 0 || vn > 18)
                return -1;
            uint64_t x = 0;
            for (size_t i = 0; i < vn; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return -1;
                x = x * 10 + (uint64_t)(v[i] - '0');
            }
            if (have_len && x != len)
                return -1;
            have_len = true;
            len = x;
        } else if (name_n == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
            if (has_token(v, vn, "chunked"))
                p->chunked = true;
        } else if (name_n == 10 && strncasecmp(line, "connection", 10) == 0) {
            if (has_token(v, vn, "close"))
                p->close = true;
            if (has_token(v, vn, "keep-alive"))
                keep_alive = true;
        } else if (name_n == 12 && strncasecmp(line, "content-type", 12) == 0) {
            if (has_token(v, vn, "application/x-ndjson"))
                p->ndjson = true;
        }
        line = eol + 1;
    }
    if (http10 && !keep_alive)
        p->close = true;
    p->keep_body = p->status != 200 || p->ndjson || p->keep_ok;
    if (p->status == 204 || p->status == 304 || p->status < 200) {
        p->state = LT_HTTP_DONE;
    } else if (p->chunked) {
        p->state = LT_HTTP_CHUNK_SIZE;
    } else if (have_len) {
        p->remaining = len;
        p->state = len ? LT_HTTP_BODY_LEN : LT_HTTP_DONE;
    } else {
        p->close = true;
        p->state = LT_HTTP_BODY_EOF;
    }
    p->head_len = 0;
    return 0;
}

/* Keeps body bytes as http.h says. */
static void keep(struct lt_http *p, const char *b, size_t n)
{
    p->body_len += n;
    if (!p->keep_body)
        return;
    if (p->ndjson) {
        while (n) {
            const char *nl = memchr(b, '\n', n);
            size_t seg = nl ? (size_t)(nl - b) : n;
            size_t room = LT_HTTP_LINE - p->line_n;
            size_t c = seg < room ? seg : room;
            memcpy(p->line + p->line_n, b, c);
            p->line_n += c;
            if (!nl)
                return;
            if (p->line_n && !(p->line_n == 1 && p->line[0] == '\r')) {
                memcpy(p->last, p->line, p->line_n);
                p->last_n = p->line_n;
                if (p->on_line)
                    p->on_line(p->line_arg, p->line, p->line_n);
            }
            p->line_n = 0;
            b = nl + 1;
            n -= seg + 1;
        }
        return;
    }
    size_t limit = p->status == 200 ? LT_HTTP_KEEP_OK : LT_HTTP_KEEP;
    if (p->body_n + n > limit) {
        n = limit - p->body_n;
        p->truncated = true;
    }
    if (!n)
        return;
    if (p->body_n + n > p->body_cap) {
        size_t cap = p->body_cap ? p->body_cap : 1024;
        while (cap < p->body_n + n)
            cap *= 2;
        char *nb = realloc(p->body, cap + 1);
        if (!nb)
            return; /* the error code is then unknown; counting goes on */
        p->body = nb;
        p->body_cap = cap;
    }
    memcpy(p->body + p->body_n, b, n);
    p->body_n += n;
    p->body[p->body_n] = '\0';
}

/* Appends to p->head up to and including the next '\n'; returns 1 when a line is complete. */
static int take_line(struct lt_http *p, const char *b, size_t n, size_t *used)
{
    const char *nl = memchr(b, '\n', n);
    size_t c = nl ? (size_t)(nl - b) + 1 : n;
    if (p->head_len + c > LT_HTTP_MAX_HEAD)
        return -1;
    memcpy(p->head + p->head_len, b, c);
    p->head_len += c;
    *used = c;
    return nl ? 1 : 0;
}

int lt_http_feed(struct lt_http *p, const char *buf, size_t len, size_t *used)
{
    size_t off = 0;
    while (off < len && p->state != LT_HTTP_DONE) {
        const char *b = buf + off;
        size_t n = len - off, u = 0;
        switch (p->state) {
        case LT_HTTP_HEAD: {
            /* Copy up to the end of the head: search from 3 bytes back for CRLF CRLF. */
            size_t from = p->head_len > 3 ? p->head_len - 3 : 0;
            size_t c = n;
            if (p->head_len + c > LT_HTTP_MAX_HEAD)
                c = LT_HTTP_MAX_HEAD - p->head_len;
            memcpy(p->head + p->head_len, b, c);
            size_t total = p->head_len + c;
            size_t endpos = 0;
            for (size_t i = from; i + 3 < total; i++)
                if (p->head[i] == '\r' && p->head[i + 1] == '\n' && p->head[i + 2] == '\r' &&
                    p->head[i + 3] == '\n') {
                    endpos = i + 4;
                    break;
                }
            if (!endpos) {
                if (total >= LT_HTTP_MAX_HEAD)
                    return -1;
                p->head_len = total;
                u = c;
                break;
            }
            u = endpos - p->head_len;
            p->head_len = endpos;
            if (parse_head(p) != 0)
                return -1;
            break;
        }
        case LT_HTTP_BODY_LEN:
            u = n < p->remaining ? n : (size_t)p->remaining;
            keep(p, b, u);
            p->remaining -= u;
            if (!p->remaining)
                p->state = LT_HTTP_DONE;
            break;
        case LT_HTTP_BODY_EOF:
            u = n;
            keep(p, b, u);
            break;
        case LT_HTTP_CHUNK_SIZE: {
            int r = take_line(p, b, n, &u);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
            uint64_t size = 0;
            size_t i = 0, digits = 0;
            for (; i < p->head_len; i++) {
                char ch = p->head[i];
                int d = ch >= '0' && ch <= '9'   ? ch - '0'
                        : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                        : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                                 : -1;
                if (d < 0)
                    break;
                if (++digits > 15)
                    return -1;
                size = size * 16 + (uint64_t)d;
            }
            if (!digits || (p->head[i] != ';' && p->head[i] != '\r' && p->head[i] != '\n' &&
                            p->head[i] != ' '))
                return -1;
            p->head_len = 0;
            p->remaining = size;
            p->state = size ? LT_HTTP_CHUNK_DATA : LT_HTTP_TRAILER;
            break;
        }
        case LT_HTTP_CHUNK_DATA:
            u = n < p->remaining ? n : (size_t)p->remaining;
            keep(p, b, u);
            p->remaining -= u;
            if (!p->remaining)
                p->state = LT_HTTP_CHUNK_END;
            break;
        case LT_HTTP_CHUNK_END:
        case LT_HTTP_TRAILER: {
            int r = take_line(p, b, n, &u);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
            bool blank = p->head_len == 1 || (p->head_len == 2 && p->head[0] == '\r');
            p->head_len = 0;
            if (p->state == LT_HTTP_CHUNK_END) {
                if (!blank)
                    return -1;
                p->state = LT_HTTP_CHUNK_SIZE;
            } else if (blank) {
                p->state = LT_HTTP_DONE;
            }
            break;
        }
        case LT_HTTP_DONE:
            break;
        }
        off += u;
    }
    *used = off;
    if (p->state == LT_HTTP_DONE) {
        if (p->ndjson && p->line_n) { /* a last line without its newline */
            memcpy(p->last, p->line, p->line_n);
            p->last_n = p->line_n;
            p->line_n = 0;
            if (p->on_line)
                p->on_line(p->line_arg, p->last, p->last_n);
        }
        return 1;
    }
    return 0;
}

int lt_http_eof(struct lt_http *p)
{
    if (p->state != LT_HTTP_BODY_EOF)
        return p->state == LT_HTTP_DONE ? 1 : -1;
    p->state = LT_HTTP_DONE;
    size_t used;
    lt_http_feed(p, "", 0, &used);
    return 1;
}

const char *lt_http_last_line(const struct lt_http *p, size_t *n)
{
    *n = p->last_n;
    return p->last_n ? p->last : NULL;
}
