/* fanout's main(): configuration, signals, and the server's lifetime.
 *
 * SIGNALS. SIGTERM, SIGINT and SIGHUP are blocked before any thread starts, so every thread
 * inherits the mask, and the main thread takes them with sigwaitinfo(). SIGHUP reads the upstreams
 * file again and looks every upstream name up again (srv_reload()); logs go to stderr, so there is
 * nothing to reopen. The first SIGTERM or SIGINT drains (srv_drain()):
 * /readyz turns 503, the listener closes, batches in flight get --drain-ms to finish, the rest are
 * canceled and answered 503; then srv_free() joins every thread and frees everything, and the
 * process exits 0. Before draining, the main thread installs a handler for SIGTERM/SIGINT and
 * unblocks them for itself alone, so a second signal interrupts whatever the drain or the
 * teardown is waiting for and exits at once (status 1) without running any cleanup. SIGPIPE is
 * ignored so that a vanished peer is an error code, not a death.
 *
 * --demo-upstream-only runs the demo upstream (demo.h) on --listen instead of fanout, with the
 * same signal handling: the first SIGTERM/SIGINT stops it (demo_stop()) and exits 0.
 *
 * --healthcheck[=PATH] is a probe for container runtimes whose image has no HTTP client: one GET
 * of PATH (/healthz by default) on the --listen port over loopback (the listen address itself when it is a specific
 * one), exit 0 on a 200 and 1 otherwise, with a one-line reason on stderr.
 *
 * Exit status: 0 after a drain, and for --help, --version and --check-config; 1 when the server
 * cannot start or after a second signal; 2 for invalid configuration (one line on stderr). */
#include <curl/curl.h>
#include <errno.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/config.h"
#include "server/demo/demo.h"
#include "server/http/srv.h"
#include "server/version.h"

/* Lifts the open-file limit to the hard limit: every client and upstream connection is an fd. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Writes 'v' as exactly 'width' decimal digits at 'p'; returns the end. Async-signal-safe. */
static char *put_digits(char *p, long v, int width)
{
    for (int i = width - 1; i >= 0; i--, v /= 10)
        p[i] = (char)('0' + v % 10);
    return p + width;
}

/* The log's time format, "YYYY-MM-DDThh:mm:ss.mmmZ", without gmtime (not async-signal-safe):
 * the civil date from days since the epoch (H. Hinnant's algorithm). Returns the end. */
static char *put_utc(char *p, const struct timespec *ts)
{
    long days = (long)(ts->tv_sec / 86400), secs = (long)(ts->tv_sec % 86400);
    long z = days + 719468, era = z / 146097, doe = z - era * 146097;
    long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    long d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9;
    long y = yoe + era * 400 + (m <= 2);
    p = put_digits(p, y, 4);
    *p++ = '-';
    p = put_digits(p, m, 2);
    *p++ = '-';
    p = put_digits(p, d, 2);
    *p++ = 'T';
    p = put_digits(p, secs / 3600, 2);
    *p++ = ':';
    p = put_digits(p, secs / 60 % 60, 2);
    *p++ = ':';
    p = put_digits(p, secs % 60, 2);
    *p++ = '.';
    p = put_digits(p, ts->tv_nsec / 1000000, 3);
    *p++ = 'Z';
    return p;
}

/* The second SIGTERM/SIGINT: one log line and out, skipping every cleanup (which is what may be
 * stuck). Only async-signal-safe calls. */
static void on_second_signal(int sig)
{
    char line[192], *p = line;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    static const char a[] = "{\"time\":\"", b[] = "\",\"level\":\"warn\",\"msg\":\"second signal: "
                                                  "exiting at once\",\"signal\":\"";
    const char *name = sig == SIGINT ? "SIGINT" : "SIGTERM";
    memcpy(p, a, sizeof(a) - 1);
    p = put_utc(p + sizeof(a) - 1, &ts);
    memcpy(p, b, sizeof(b) - 1);
    p += sizeof(b) - 1;
    memcpy(p, name, strlen(name));
    p += strlen(name);
    memcpy(p, "\"}\n", 3);
    p += 3;
    ssize_t w = write(STDERR_FILENO, line, (size_t)(p - line));
    (void)w;
    _exit(1);
}

/* From now on a SIGTERM or SIGINT reaches this thread's handler, wherever it is blocked. */
static void arm_second_signal(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_second_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_UNBLOCK, &stop, NULL); /* a pending one is delivered right here */
}

/* Discards a response body. */
static size_t discard(char *data, size_t size, size_t n, void *arg)
{
    (void)data;
    (void)arg;
    return size * n;
}

/* --healthcheck[=PATH]: GET c->probe_path on the port 'c' listens on. Returns the exit status. */
static int healthcheck(const struct srv_config *c)
{
    const char *host = c->listen_host;
    if (!strcmp(host, "0.0.0.0"))
        host = "127.0.0.1";
    else if (!strcmp(host, "::"))
        host = "::1";
    char url[320];
    snprintf(url, sizeof(url), strchr(host, ':') ? "http://[%s]:%u%s" : "http://%s:%u%s", host,
             c->listen_port, c->probe_path);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "fanout: healthcheck: curl_global_init failed\n");
        return 1;
    }
    CURL *h = curl_easy_init();
    if (!h) {
        fprintf(stderr, "fanout: healthcheck: out of memory\n");
        curl_global_cleanup();
        return 1;
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROXY, ""); /* never through a proxy from the environment */
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 2000L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    curl_global_cleanup();
    if (rc != CURLE_OK) {
        fprintf(stderr, "fanout: healthcheck: %s: %s\n", url, curl_easy_strerror(rc));
        return 1;
    }
    if (status != 200) {
        fprintf(stderr, "fanout: healthcheck: %s: status %ld\n", url, status);
        return 1;
    }
    return 0;
}

/* One log line on stderr, for the mode that runs without the server's logger:
 * {"time":...,"level":"info","msg":<msg>,"mode":"demo-upstream-only"[,"version":...,"port":N]}
 * (the port and version when port >= 0). */
static void log_line(const char *msg, int port)
{
    char now[32];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    *put_utc(now, &ts) = '\0';
    fprintf(stderr, "{\"time\":\"%s\",\"level\":\"info\",\"msg\":\"%s\",\"mode\":\"demo-upstream-only\"",
            now, msg);
    if (port >= 0)
        fprintf(stderr, ",\"version\":\"%s\",\"port\":%d", FANOUT_VERSION, port);
    fputs("}\n", stderr);
}

/* --demo-upstream-only: the demo upstream on --listen until SIGTERM/SIGINT ('set' is blocked).
 * Returns the exit status. */
static int run_demo_upstream(const struct srv_config *c, const sigset_t *set)
{
    struct demo *d;
    int rc = demo_start(c->listen_host, c->listen_port, &d);
    if (rc != 0) {
        if (rc == -EINVAL)
            fprintf(stderr, "fanout: --listen: the demo upstream needs a numeric address, got "
                            "\"%s\"\n",
                    c->listen_host);
        else
            fprintf(stderr, "fanout: cannot start the demo upstream: %s\n", strerror(-rc));
        ctx_shutdown();
        return rc == -EINVAL ? 2 : 1;
    }
    log_line("starting", demo_port(d));
    for (;;) {
        int sig = sigwaitinfo(set, NULL);
        if (sig == SIGTERM || sig == SIGINT)
            break;
    }
    arm_second_signal();
    log_line("draining", -1);
    demo_stop(d);
    ctx_shutdown();
    log_line("stopped", -1);
    return 0;
}

int main(int argc, char **argv)
{
    struct srv_config cfg;
    config_defaults(&cfg);
    enum config_action action;
    char err[512];
    if (config_parse(&cfg, argc, argv, &action, err, sizeof(err)) != 0) {
        fprintf(stderr, "fanout: %s\n", err);
        return 2;
    }
    switch (action) {
    case CONFIG_HELP:
        config_usage(stdout);
        return 0;
    case CONFIG_VERSION:
        printf("fanout %s (libcurl %s, libmicrohttpd %s)\n", FANOUT_VERSION,
               curl_version_info(CURLVERSION_NOW)->version, MHD_get_version());
        return 0;
    case CONFIG_CHECK:
        config_print_json(&cfg, stdout);
        putchar('\n');
        return 0;
    case CONFIG_HEALTHCHECK:
        return healthcheck(&cfg);
    case CONFIG_RUN:
        break;
    }

    signal(SIGPIPE, SIG_IGN);
    /* Whatever the parent left: default actions, so that blocked signals stay pending. */
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    raise_nofile();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* inherited by every thread started below */
    if (cfg.demo_upstream_only)
        return run_demo_upstream(&cfg, &set);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "fanout: curl_global_init failed\n");
        return 1;
    }
    struct srv *s;
    int rc = srv_new(&cfg, STDERR_FILENO, &s, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "fanout: %s\n", err);
        ctx_shutdown();
        curl_global_cleanup();
        return rc == -EINVAL ? 2 : 1;
    }
    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig == SIGTERM || sig == SIGINT)
            break;
        if (sig == SIGHUP)
            srv_reload(s);
        /* or EINTR: keep serving. */
    }
    arm_second_signal();
    srv_drain(s, cfg.drain_ms);
    if (srv_free(s) != 0)
        _exit(1); /* batches stuck after their cancel: leave at once rather than free under them */
    ctx_shutdown();
    curl_global_cleanup();
    return 0;
}
