/* srvtest: the tests' HTTP client and the in-process server harness (see srvtest.h).
 *
 * libcurl exchanges: one easy handle per exchange unless the caller passes one in to test
 * keep-alive. Response headers are captured by a header callback into fixed buffers of the
 * response; the body into a malloc'd buffer that is parsed with cJSON at the end. No locks: a
 * response belongs to the thread that performs the exchange (or drives the multi handle).
 * Raw connections: plain blocking sockets, read with poll() against a bound. */
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
#include <sys/time.h>
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
    const char *lm = getenv("TEST_LOOP_MODEL"); /* make test runs the server suites in both */
    if (lm && *lm)
        c->loop_shared = strcmp(lm, "split") != 0;
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

/* One exchange's request-side state, alive from prepare() to complete(). */
struct srvtest_xfer {
    CURL *easy;              /* its handle */
    bool own;                /* the handle was made for it */
    struct curl_slist *hl;   /* request header lines */
    struct upload up;        /* a chunked body's progress */
    int64_t t0;              /* when it started */
    struct srvtest_resp *out; /* where the answer goes */
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
    if (k >= 5 && !strncmp(p, "HTTP/", 5)) { /* a new response (after a 1xx): start afresh */
        r->request_id[0] = r->retry_after[0] = r->allow[0] = r->content_type[0] = 0;
        r->connection[0] = 0;
    }
    take_header(p, k, "X-Request-Id", r->request_id, sizeof(r->request_id));
    take_header(p, k, "Retry-After", r->retry_after, sizeof(r->retry_after));
    take_header(p, k, "Allow", r->allow, sizeof(r->allow));
    take_header(p, k, "Content-Type", r->content_type, sizeof(r->content_type));
    take_header(p, k, "Connection", r->connection, sizeof(r->connection));
    return k;
}

/* Sets up 'x' (its easy handle given or made) for exchange 'c' with 'port' into 'out'. Returns
 * false when out of memory (out->rc says so). */
static bool prepare(struct srvtest_xfer *x, CURL *easy, uint16_t port,
                    const struct srvtest_call *c, struct srvtest_resp *out)
{
    memset(out, 0, sizeof(*out));
    memset(x, 0, sizeof(*x));
    x->out = out;
    x->own = !easy;
    x->easy = easy ? easy : curl_easy_init();
    if (!x->easy) {
        out->rc = CURLE_OUT_OF_MEMORY;
        return false;
    }
    CURL *e = x->easy;
    const char *host = c->host ? c->host : "127.0.0.1";
    bool v6 = strchr(host, ':') != NULL;
    char url[1280];
    snprintf(url, sizeof(url), "http://%s%s%s:%u%s", v6 ? "[" : "", host, v6 ? "]" : "", port,
             c->path ? c->path : "/v1/batch");
    for (size_t i = 0; i < sizeof(c->headers) / sizeof(c->headers[0]) && c->headers[i]; i++)
        x->hl = curl_slist_append(x->hl, c->headers[i]);
    const char *method = c->method ? c->method : (c->body ? "POST" : "GET");
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, c->timeout_ms ? c->timeout_ms : SRVTEST_WAIT_MS);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, out);
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    /* Reset what a reused handle may carry over from its previous exchange. */
    curl_easy_setopt(e, CURLOPT_POST, 0L);
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, NULL);
    if (c->body) {
        size_t len = c->body_len ? c->body_len : strlen(c->body);
        if (c->chunked) {
            x->up.data = c->body;
            x->up.left = len;
            curl_easy_setopt(e, CURLOPT_POST, 1L);
            curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
            curl_easy_setopt(e, CURLOPT_READDATA, &x->up);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, NULL);
            x->hl = curl_slist_append(x->hl, "Transfer-Encoding: chunked");
        } else {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, c->body);
        }
        x->hl = curl_slist_append(x->hl, "Content-Type: application/json");
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    else if (!strcmp(method, "GET") && c->body)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, "GET");
    else if (!strcmp(method, "POST") && !c->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
    }
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->hl);
    x->t0 = ctx_now();
    return true;
}

/* Records the outcome 'rc' of x's exchange and releases its request-side state (and its handle
 * when it made one). */
static void complete(struct srvtest_xfer *x, CURLcode rc)
{
    struct srvtest_resp *out = x->out;
    CURL *e = x->easy;
    out->rc = rc;
    out->elapsed_ms = ctx_now() - x->t0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &out->status);
    curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &out->connects);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(e, CURLOPT_READDATA, NULL);
    curl_slist_free_all(x->hl);
    x->hl = NULL;
    if (x->own)
        curl_easy_cleanup(e);
    x->easy = NULL;
    if (!out->body && out->status != 0)
        out->body = calloc(1, 1);
    if (out->body && out->len)
        out->json = cJSON_ParseWithLength(out->body, out->len);
}

void srvtest_call(CURL *easy, uint16_t port, const struct srvtest_call *c,
                  struct srvtest_resp *out)
{
    struct srvtest_xfer x;
    if (prepare(&x, easy, port, c, out))
        complete(&x, curl_easy_perform(x.easy));
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

/* ---------------------------------------------------------------- many at once */

int srvtest_multi_init(struct srvtest_multi *g)
{
    memset(g, 0, sizeof(*g));
    g->m = curl_multi_init();
    return g->m ? 0 : -ENOMEM;
}

int srvtest_multi_add(struct srvtest_multi *g, uint16_t port, const struct srvtest_call *c)
{
    if (g->n == SRVTEST_MULTI_MAX)
        return -1;
    int i = g->n;
    struct srvtest_xfer *x = malloc(sizeof(*x));
    if (!x)
        return -1;
    if (!prepare(x, NULL, port, c, &g->resp[i])) {
        free(x);
        return -1;
    }
    if (curl_multi_add_handle(g->m, x->easy) != CURLM_OK) {
        complete(x, CURLE_FAILED_INIT);
        free(x);
        return -1;
    }
    g->x[i] = x;
    g->n++;
    return i;
}

void srvtest_multi_pump(struct srvtest_multi *g, int ms)
{
    int running;
    curl_multi_perform(g->m, &running);
    if (running)
        curl_multi_poll(g->m, NULL, 0, ms, NULL);
    curl_multi_perform(g->m, &running);
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(g->m, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        struct srvtest_xfer *x = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
        CURLcode rc = msg->data.result; /* read before the handle goes */
        for (int i = 0; i < g->n; i++)
            if (g->x[i] == x && !g->done[i]) {
                curl_multi_remove_handle(g->m, x->easy);
                complete(x, rc);
                free(x);
                g->x[i] = NULL;
                g->done[i] = true;
            }
    }
}

int srvtest_multi_pending(const struct srvtest_multi *g)
{
    int k = 0;
    for (int i = 0; i < g->n; i++)
        k += !g->done[i];
    return k;
}

bool srvtest_multi_wait(struct srvtest_multi *g, bool (*until)(void *), void *arg, int64_t ms)
{
    int64_t end = ctx_now() + ms;
    for (;;) {
        bool ok = until ? until(arg) : srvtest_multi_pending(g) == 0;
        if (ok)
            return true;
        int64_t left = end - ctx_now();
        if (left <= 0)
            return false;
        srvtest_multi_pump(g, left < 10 ? (int)left : 10);
    }
}

void srvtest_multi_free(struct srvtest_multi *g)
{
    for (int i = 0; i < g->n; i++) {
        if (g->x[i]) { /* not finished: ended here */
            curl_multi_remove_handle(g->m, g->x[i]->easy);
            complete(g->x[i], CURLE_ABORTED_BY_CALLBACK);
            free(g->x[i]);
            g->x[i] = NULL;
        }
        srvtest_resp_free(&g->resp[i]);
    }
    if (g->m)
        curl_multi_cleanup(g->m);
    memset(g, 0, sizeof(*g));
}

/* ---------------------------------------------------------------- raw connections */

int srvtest_raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "\n  srvtest: socket: %s\n", strerror(errno));
        return -1;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        /* Said, so that a failure on a loaded machine shows what the kernel answered. */
        fprintf(stderr, "\n  srvtest: connect to 127.0.0.1:%u: %s\n", port, strerror(errno));
        close(fd);
        return -1;
    }
    int64_t bound = 2 * SRVTEST_WAIT_MS;
    struct timeval tv = {.tv_sec = bound / 1000, .tv_usec = (bound % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
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
    c->buf[0] = 0;
    c->eof = c->reset = c->clipped = false;
    c->fd = srvtest_raw_connect(port);
    return c->fd >= 0;
}

bool srvtest_raw_write(struct srvtest_raw *c, const void *data, size_t len)
{
    return c->fd >= 0 && srvtest_raw_send(c->fd, data, len);
}

void srvtest_raw_close(struct srvtest_raw *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

/* Waits up to 'ms' for bytes and reads what fits in the rest of the buffer. Returns the bytes
 * read, 0 at EOF (sets eof), -1 on a reset (sets reset), an error or the bound. */
static ssize_t raw_fill(struct srvtest_raw *c, int64_t ms)
{
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    int pr = poll(&pfd, 1, ms > 0 ? (int)ms : 0);
    if (pr <= 0)
        return -1;
    ssize_t k = recv(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len, 0);
    if (k == 0)
        c->eof = true;
    else if (k < 0 && errno == ECONNRESET)
        c->reset = true;
    else if (k > 0)
        c->len += (size_t)k;
    c->buf[c->len] = 0;
    return k;
}

/* The length of a complete response at the start of buf[0..len), or 0 if more bytes are needed;
 * sets *status, *body_off and *body_len. -1 if malformed. */
static long parse_response(const char *buf, size_t len, size_t cap, int *status, size_t *body_off,
                           size_t *body_len)
{
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end)
        return len >= cap ? -1 : 0;
    size_t hl = (size_t)(end - buf) + 4;
    if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0)
        return -1;
    *status = atoi(buf + 9);
    size_t clen = 0;
    for (const char *p = buf; p && p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!strncasecmp(p, "Content-Length:", 15))
            clen = strtoul(p + 15, NULL, 10);
        p = nl ? nl + 1 : NULL;
    }
    if (len < hl + clen)
        return hl + clen > cap ? -1 : 0;
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
        long n = parse_response(c->buf, c->len, sizeof(c->buf) - 1, &status, &off, &blen);
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
            c->buf[c->len] = 0;
            return status;
        }
        if (c->eof || c->reset)
            return 0;
        int64_t left = until - ctx_now();
        if (left <= 0)
            return -1;
        ssize_t k = raw_fill(c, left);
        if (k < 0 && errno == EINTR)
            continue;
        if (k == 0 || c->reset)
            return 0;
    }
}

bool srvtest_raw_read(struct srvtest_raw *c, bool (*done)(const struct srvtest_raw *c),
                      int64_t ms)
{
    int64_t until = ctx_now() + ms;
    for (;;) {
        if (done && done(c))
            return true;
        if (c->eof || c->reset)
            return !done;
        int64_t left = until - ctx_now();
        if (left <= 0)
            return false;
        if (c->len + 1 >= sizeof(c->buf)) { /* full: keep the first half, read on */
            c->len = sizeof(c->buf) / 2;
            c->buf[c->len] = 0;
            c->clipped = true;
        }
        raw_fill(c, left);
    }
}

int srvtest_raw_complete(const struct srvtest_raw *c)
{
    int n = 0;
    size_t at = 0;
    for (;;) {
        int status;
        size_t off, blen;
        long k = parse_response(c->buf + at, c->len - at, sizeof(c->buf) - 1 - at, &status,
                                &off, &blen);
        if (k <= 0)
            return n;
        n++;
        at += (size_t)k;
    }
}

int srvtest_raw_status_lines(const struct srvtest_raw *c)
{
    int n = 0;
    for (const char *p = c->buf; (p = strstr(p, "HTTP/1.")) != NULL; p++)
        if (p == c->buf || (p >= c->buf + 2 && p[-1] == '\n' && p[-2] == '\r'))
            n++;
    return n;
}

unsigned srvtest_raw_status(const struct srvtest_raw *c)
{
    if (c->len > 12 && !strncmp(c->buf, "HTTP/1.", 7))
        return (unsigned)strtoul(c->buf + 9, NULL, 10);
    return 0;
}

const char *srvtest_raw_header(const struct srvtest_raw *c, const char *name, char *out,
                               size_t size)
{
    const char *end = strstr(c->buf, "\r\n\r\n");
    size_t nl = strlen(name);
    for (const char *p = strstr(c->buf, "\r\n"); p && end && p < end; p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, name, nl) == 0 && p[2 + nl] == ':') {
            const char *v = p + 3 + nl;
            while (*v == ' ' || *v == '\t')
                v++;
            size_t n = strcspn(v, "\r");
            while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
                n--;
            if (n >= size)
                n = size - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return out;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- waits */

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

struct metric_wait {
    uint16_t port;
    const char *name;
    double n;
};

static bool metric_reached(void *arg)
{
    const struct metric_wait *w = arg;
    return srvtest_metric(w->port, w->name) >= w->n;
}

bool srvtest_wait_metric(uint16_t port, const char *name, double n, int64_t ms)
{
    struct metric_wait w = {port, name, n};
    return test_wait_until(metric_reached, &w, ms);
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
