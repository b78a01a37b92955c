/* Fuzz target: the HTTP front end end to end. A server (srv_new, with the built-in demo upstream
 * and short deadlines) runs in this process; each input is written as raw bytes to a fresh
 * loopback connection, the write side is shut, and the answer is read to the end of the stream.
 * Properties: no crash or sanitizer report anywhere in the server; the server always closes
 * the connection within a bound (no hang); whatever comes back starts as an HTTP/1.x status line;
 * and the server still answers /healthz afterwards. */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/config.h"
#include "server/http/srv.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define BOUND_MS 20000 /* the longest a connection may stay open after our side is shut */
#define QUIET_MS 50    /* after an answer, this long without bytes ends the exchange */

static struct srv *server;
static uint16_t port;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    struct srv_config c;
    config_defaults(&c);
    strcpy(c.listen_host, "127.0.0.1");
    c.listen_port = 0;
    c.demo = true;
    c.http_threads = 2;
    c.fetch_threads = 1;
    c.timeout_ms = 200;
    c.max_timeout_ms = 500;
    c.max_request_bytes = 64 * 1024;
    c.max_batch = 50;
    c.idle_timeout_s = 1;
    c.log_level = LOG_ERROR;
    int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    char err[256];
    if (srv_new(&c, devnull, &server, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_http: %s\n", err);
        abort();
    }
    port = srv_port(server);
    return 0;
}

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
        abort();
    return fd;
}

/* Sends 'data' and shuts the write side; reads until EOF. Returns the bytes read into buf
 * (up to cap), or aborts if the server keeps the connection open past the bound. */
static size_t exchange(const uint8_t *data, size_t size, char *buf, size_t cap)
{
    int fd = dial();
    size_t off = 0, got = 0;
    int64_t until = ctx_now() + BOUND_MS;
    bool shut = false;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN | (off < size ? POLLOUT : 0)};
        int64_t left = until - ctx_now();
        if (left <= 0)
            abort(); /* the server neither answered nor closed: a hang */
        /* Once an answer has come and everything is sent, a quiet connection is done with:
         * libmicrohttpd keeps a half-closed keep-alive connection until its idle timeout. */
        int wait = got > 0 && shut && left > QUIET_MS ? QUIET_MS : (int)left;
        int pr = poll(&p, 1, wait);
        if (pr < 0 && errno != EINTR)
            abort();
        if (pr == 0 && wait == QUIET_MS)
            break;
        if ((p.revents & POLLOUT) && off < size) {
            ssize_t n = send(fd, data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0)
                off += (size_t)n;
            else if (n < 0 && errno != EAGAIN && errno != EINTR)
                off = size; /* the server closed early: fine */
        }
        if (off >= size && !shut) {
            shutdown(fd, SHUT_WR);
            shut = true;
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            char tmp[4096];
            ssize_t n = recv(fd, tmp, sizeof(tmp), MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                break;
            if (n > 0) {
                size_t k = (size_t)n < cap - got ? (size_t)n : cap - got;
                memcpy(buf + got, tmp, k);
                got += k;
            }
        }
    }
    close(fd);
    return got;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char buf[256];
    size_t got = exchange(data, size, buf, sizeof(buf));
    if (got >= 8 && memcmp(buf, "HTTP/1.", 7) != 0)
        abort();
    static unsigned n;
    if (++n % 64 == 0) { /* still serving */
        static const char hz[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        got = exchange((const uint8_t *)hz, sizeof(hz) - 1, buf, sizeof(buf));
        if (got < 12 || memcmp(buf, "HTTP/1.1 200", 12) != 0)
            abort();
    }
    return 0;
}
