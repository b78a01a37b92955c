/* srvtest: the server end-to-end tests' harness (see srvtest.h).
 *
 * The client is plain libcurl easy: one handle per exchange unless the caller passes one in to
 * test keep-alive. Response headers are captured by a header callback into fixed buffers of the
 * response; the body into a malloc'd buffer that is parsed with cJSON at the end. No locks: a
 * response belongs to the thread that performs the exchange. */
#include "tests/srvtest.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "tests/support.h"

/* ---------------------------------------------------------------- environment */

int srvtest_env_init(struct srvtest_env *e)
{
    memset(e, 0, sizeof(*e));
    return upstub_new(2, &e->up);
}

void srvtest_config(const struct srvtest_env *e, struct srv_config *c)
{
    config_defaults(c);
    snprintf(c->listen_host, sizeof(c->listen_host), "127.0.0.1");
    c->listen_port = 0;
    if (e->up)
        upstub_url(e->up, c->upstream, sizeof(c->upstream), "/items/{id}");
    c->http_threads = 2;
    c->fetch_threads = 2;
    c->limit = 8;
    c->drain_ms = 2000;
    c->log_level = LOG_ERROR;
    const char *lv = getenv("SRVTEST_LOG");
    if (lv && !strcmp(lv, "debug"))
        c->log_level = LOG_DEBUG;
    else if (lv && !strcmp(lv, "info"))
        c->log_level = LOG_INFO;
    else if (lv && !strcmp(lv, "warn"))
        c->log_level = LOG_WARN;
}

int srvtest_start(struct srvtest_env *e, const struct srv_config *c)
{
    char err[256];
    int rc = srv_new(c, 2, &e->srv, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "srv_new: %s\n", err);
        e->srv = NULL;
        return rc;
    }
    e->port = srv_port(e->srv);
    return 0;
}

int srvtest_start_default(struct srvtest_env *e)
{
    struct srv_config c;
    srvtest_config(e, &c);
    return srvtest_start(e, &c);
}

void srvtest_env_free(struct srvtest_env *e)
{
    srv_free(e->srv);
    e->srv = NULL;
    upstub_free(e->up);
    e->up = NULL;
}

/* ---------------------------------------------------------------- the client */

struct upload {
    const char *data; /* what is left to send */
    size_t left;      /* how much */
};

static size_t on_read(char *buf, size_t size, size_t n, void *arg)
{
    struct upload *u = arg;
    size_t k = size * n;
    if (k > 1000) /* small pieces, so a chunked upload really is several chunks */
        k = 1000;
    if (k > u->left)
        k = u->left;
    memcpy(buf, u->data, k);
    u->data += k;
    u->left -= k;
    return k;
}

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    struct srvtest_resp *r = arg;
    size_t k = size * n;
    char *nb = realloc(r->body, r->len + k + 1);
    if (!nb)
        return 0;
    memcpy(nb + r->len, p, k);
    r->body = nb;
    r->len += k;
    r->body[r->len] = 0;
    return k;
}

/* Copies the value of header line 'p[0..k)' into 'dst' if its name is 'name'. */
static void take_header(const char *p, size_t k, const char *name, char *dst, size_t size)
{
    size_t nl = strlen(name);
    if (k <= nl || p[nl] != ':' || strncasecmp(p, name, nl) != 0)
        return;
    const char *v = p + nl + 1;
    const char *end = p + k;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
        end--;
    size_t vl = (size_t)(end - v);
    if (vl >= size)
        vl = size - 1;
    memcpy(dst, v, vl);
    dst[vl] = 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *arg)
{
    struct srvtest_resp *r = arg;
    size_t k = size * n;
    take_header(p, k, "X-Request-Id", r->request_id, sizeof(r->request_id));
    take_header(p, k, "Retry-After", r->retry_after, sizeof(r->retry_after));
    take_header(p, k, "Allow", r->allow, sizeof(r->allow));
    take_header(p, k, "Content-Type", r->content_type, sizeof(r->content_type));
    take_header(p, k, "Connection", r->connection, sizeof(r->connection));
    return k;
}

void srvtest_call(CURL *easy, uint16_t port, const struct srvtest_call *c,
                  struct srvtest_resp *out)
{
    memset(out, 0, sizeof(*out));
    CURL *e = easy ? easy : curl_easy_init();
    if (!e) {
        out->rc = CURLE_OUT_OF_MEMORY;
        return;
    }
    char url[256];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u%s", port, c->path ? c->path : "/v1/batch");
    struct curl_slist *hl = NULL;
    for (size_t i = 0; i < sizeof(c->headers) / sizeof(c->headers[0]) && c->headers[i]; i++)
        hl = curl_slist_append(hl, c->headers[i]);
    struct upload up = {0};
    const char *method = c->method ? c->method : (c->body ? "POST" : "GET");
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, c->timeout_ms ? c->timeout_ms : SRVTEST_WAIT_MS);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, out);
    /* Reset what a reused handle may carry over from its previous exchange. */
    curl_easy_setopt(e, CURLOPT_POST, 0L);
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, NULL);
    if (c->body) {
        size_t len = c->body_len ? c->body_len : strlen(c->body);
        if (c->chunked) {
            up.data = c->body;
            up.left = len;
            curl_easy_setopt(e, CURLOPT_POST, 1L);
            curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
            curl_easy_setopt(e, CURLOPT_READDATA, &up);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, NULL);
            hl = curl_slist_append(hl, "Transfer-Encoding: chunked");
        } else {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, c->body);
        }
        hl = curl_slist_append(hl, "Content-Type: application/json");
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    else if (!strcmp(method, "GET") && c->body)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, "GET");
    else if (!strcmp(method, "POST") && !c->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
    }
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, hl);
    int64_t t0 = ctx_now();
    out->rc = curl_easy_perform(e);
    out->elapsed_ms = ctx_now() - t0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &out->status);
    curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &out->connects);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(e, CURLOPT_READDATA, NULL);
    curl_slist_free_all(hl);
    if (!easy)
        curl_easy_cleanup(e);
    if (out->body)
        out->json = cJSON_ParseWithLength(out->body, out->len);
}

void srvtest_post(uint16_t port, const char *body, const char *const *headers,
                  struct srvtest_resp *out)
{
    struct srvtest_call c = {.body = body};
    for (size_t i = 0; headers && headers[i] && i + 1 < sizeof(c.headers) / sizeof(c.headers[0]);
         i++)
        c.headers[i] = headers[i];
    srvtest_call(NULL, port, &c, out);
}

void srvtest_get(uint16_t port, const char *path, struct srvtest_resp *out)
{
    struct srvtest_call c = {.path = path};
    srvtest_call(NULL, port, &c, out);
}

void srvtest_resp_free(struct srvtest_resp *r)
{
    cJSON_Delete(r->json);
    free(r->body);
    memset(r, 0, sizeof(*r));
}

const cJSON *srvtest_err_field(const struct srvtest_resp *r, const char *name)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(r->json, "error");
    return cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, name) : NULL;
}

const char *srvtest_err_code(const struct srvtest_resp *r)
{
    const cJSON *c = srvtest_err_field(r, "code");
    return cJSON_IsString(c) ? c->valuestring : "";
}

const char *srvtest_err_message(const struct srvtest_resp *r)
{
    const cJSON *c = srvtest_err_field(r, "message");
    return cJSON_IsString(c) ? c->valuestring : "";
}

const cJSON *srvtest_results(const struct srvtest_resp *r)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(r->json, "results");
    return cJSON_IsArray(a) ? a : NULL;
}

double srvtest_metric(uint16_t port, const char *name)
{
    struct srvtest_resp r;
    srvtest_get(port, "/metrics", &r);
    double v = -1;
    size_t nl = strlen(name);
    for (const char *p = r.body; p && *p;) {
        const char *eol = strchr(p, '\n');
        if (!strncmp(p, name, nl) && p[nl] == ' ') {
            v = strtod(p + nl + 1, NULL);
            break;
        }
        p = eol ? eol + 1 : NULL;
    }
    srvtest_resp_free(&r);
    return v;
}

/* ---------------------------------------------------------------- background requests */

static void *bg_main(void *arg)
{
    struct srvtest_bg *bg = arg;
    srvtest_call(NULL, bg->port, &bg->call, &bg->resp);
    return NULL;
}

int srvtest_bg_start(struct srvtest_bg *bg)
{
    memset(&bg->resp, 0, sizeof(bg->resp));
    return pthread_create(&bg->thread, NULL, bg_main, bg);
}

void srvtest_bg_join(struct srvtest_bg *bg)
{
    pthread_join(bg->thread, NULL);
}

/* ---------------------------------------------------------------- raw sockets and waits */

int srvtest_raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

bool srvtest_raw_send(int fd, const char *data, size_t len)
{
    while (len) {
        ssize_t k = send(fd, data, len, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return false;
        data += k;
        len -= (size_t)k;
    }
    return true;
}

bool srvtest_raw_open(struct srvtest_raw *c, uint16_t port)
{
    c->len = 0;
    c->fd = srvtest_raw_connect(port);
    return c->fd >= 0;
}

void srvtest_raw_close(struct srvtest_raw *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

/* The length of a complete response at the start of c->buf, or 0 if more bytes are needed; sets
 * *status, *body_off and *body_len. -1 if malformed. */
static long raw_complete(const struct srvtest_raw *c, int *status, size_t *body_off,
                         size_t *body_len)
{
    const char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end)
        return c->len == sizeof(c->buf) ? -1 : 0;
    size_t hl = (size_t)(end - c->buf) + 4;
    if (c->len < 12 || strncmp(c->buf, "HTTP/1.", 7) != 0)
        return -1;
    *status = atoi(c->buf + 9);
    size_t clen = 0;
    for (const char *p = c->buf; p && p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!strncasecmp(p, "Content-Length:", 15))
            clen = strtoul(p + 15, NULL, 10);
        p = nl ? nl + 1 : NULL;
    }
    if (c->len < hl + clen)
        return hl + clen > sizeof(c->buf) ? -1 : 0;
    *body_off = hl;
    *body_len = clen;
    return (long)(hl + clen);
}

int srvtest_raw_response(struct srvtest_raw *c, char *body, size_t cap, int64_t ms)
{
    int64_t until = ctx_now() + ms;
    for (;;) {
        int status = 0;
        size_t off = 0, blen = 0;
        long n = raw_complete(c, &status, &off, &blen);
        if (n < 0)
            return -1;
        if (n > 0) {
            if (body && cap) {
                size_t k = blen < cap - 1 ? blen : cap - 1;
                memcpy(body, c->buf + off, k);
                body[k] = 0;
            }
            memmove(c->buf, c->buf + n, c->len - (size_t)n);
            c->len -= (size_t)n;
            return status;
        }
        int64_t left = until - ctx_now();
        if (left <= 0)
            return -1;
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        int pr = poll(&pfd, 1, (int)left);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            return -1;
        ssize_t k = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return 0;
        c->len += (size_t)k;
    }
}

struct stub_wait {
    struct upstub *up;
    uint64_t n;
    bool canceled; /* wait for canceled instead of in_flight */
};

static bool stub_reached(void *arg)
{
    struct stub_wait *w = arg;
    struct upstub_stats st;
    upstub_stats(w->up, &st);
    return (w->canceled ? st.canceled : st.in_flight) >= w->n;
}

bool srvtest_wait_stub_in_flight(struct upstub *up, uint64_t n, int64_t ms)
{
    struct stub_wait w = {up, n, false};
    return test_wait_until(stub_reached, &w, ms);
}

bool srvtest_wait_stub_canceled(struct upstub *up, uint64_t n, int64_t ms)
{
    struct stub_wait w = {up, n, true};
    return test_wait_until(stub_reached, &w, ms);
}

struct target_wait {
    struct upstub *up;
    const char *target;
    size_t n;
};

static bool target_reached(void *arg)
{
    struct target_wait *w = arg;
    return upstub_count(w->up, w->target) >= w->n;
}

bool srvtest_wait_stub_target(struct upstub *up, const char *target, size_t n, int64_t ms)
{
    struct target_wait w = {up, target, n};
    return test_wait_until(target_reached, &w, ms);
}

struct srv_wait {
    struct srv *s;
    int64_t n;
};

static bool srv_reached(void *arg)
{
    struct srv_wait *w = arg;
    return srv_in_flight(w->s) == w->n;
}

bool srvtest_wait_srv_in_flight(struct srv *s, int64_t n, int64_t ms)
{
    struct srv_wait w = {s, n};
    return test_wait_until(srv_reached, &w, ms);
}

int srvtest_refusing_port(uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(sa.sin_port);
    return fd;
}
