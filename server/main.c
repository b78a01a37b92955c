/* fanout's main(): configuration, signals, and the server's lifetime.
 *
 * SIGTERM/SIGINT/SIGHUP are blocked in every thread (the mask is set before any thread starts)
 * and taken here with sigtimedwait(). The first SIGTERM or SIGINT drains: /readyz turns 503, the
 * listener closes, batches in flight get --drain-ms to finish, the rest are canceled and
 * answered 503, every thread is joined and the process exits 0. A second one exits at once with
 * status 1. SIGHUP is ignored (logs go to stderr; there is nothing to reopen). SIGPIPE is
 * ignored so that a vanished peer is an error code, not a death.
 * Exit status: 0 after a drain or for --help/--version/--check-config, 1 when the server cannot
 * start, 2 for invalid configuration. */
#include <curl/curl.h>
#include <errno.h>
#include <microhttpd.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "ctx/ctx.h"
#include "server/config.h"
#include "server/srv.h"
#include "server/url.h"
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

static int wait_signal(const sigset_t *set, int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    int sig = ms < 0 ? sigwaitinfo(set, NULL) : sigtimedwait(set, NULL, &ts);
    return sig < 0 ? 0 : sig;
}

/* Drains; returns false if a second signal asked to stop at once. */
static bool drain(struct srv *s, const sigset_t *set, int64_t drain_ms)
{
    srv_drain_start(s);
    int64_t deadline = ctx_now() + drain_ms, hard = -1;
    while (srv_in_flight(s) > 0) {
        int64_t now = ctx_now();
        if (hard < 0 && now >= deadline) {
            srv_cancel_all(s); /* past the grace period: answer 503 to what is left */
            hard = now + 5000;
        }
        if (hard >= 0 && now >= hard)
            break;
        int sig = wait_signal(set, 10);
        if (sig == SIGTERM || sig == SIGINT)
            return false;
    }
    return true;
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
        if (!cfg.demo) {
            struct url_template t;
            if (url_template_parse(cfg.upstream, &t, err, sizeof(err)) != 0) {
                fprintf(stderr, "fanout: --upstream: %s\n", err);
                return 2;
            }
            url_template_destroy(&t);
        }
        config_print_json(&cfg, stdout);
        putchar('\n');
        return 0;
    case CONFIG_RUN:
        break;
    }

    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* inherited by every thread started below */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "fanout: curl_global_init failed\n");
        return 1;
    }
    struct srv *s;
    int rc = srv_new(&cfg, STDERR_FILENO, &s, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "fanout: %s\n", err);
        curl_global_cleanup();
        return rc == -EINVAL ? 2 : 1;
    }
    for (;;) {
        int sig = wait_signal(&set, -1);
        if (sig == SIGTERM || sig == SIGINT)
            break;
    }
    if (!drain(s, &set, cfg.drain_ms)) {
        fprintf(stderr, "{\"level\":\"warn\",\"msg\":\"second signal: exiting at once\"}\n");
        _exit(1);
    }
    srv_free(s);
    ctx_shutdown();
    curl_global_cleanup();
    return 0;
}
