/* config: fanout's settings from command-line flags and FANOUT_* environment variables.
 *
 * Every flag --some-name also reads FANOUT_SOME_NAME; a flag given on the command line wins.
 * Values are checked at parse time: a bad value is an error with a one-line reason, never a
 * silent default. Not thread-safe (parse once in main). */
#ifndef FANOUT_CONFIG_H
#define FANOUT_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "fetch/upstream.h"
#include "server/obs/log.h"

struct srv_config {
    char listen_host[256];      /* --listen host part (IPv4/IPv6 literal or name) */
    uint16_t listen_port;       /* --listen port; 0 picks a free one */
    char upstream[16384];       /* --upstream URL templates with {id}, one per line (the flag
                                   may repeat; FANOUT_UPSTREAM splits on commas and spaces);
                                   empty with --demo */
    enum upstream_policy upstream_policy; /* --upstream-policy replicas|shards */
    unsigned eject_after;       /* --eject-after: consecutive failures that eject (0: never) */
    int64_t eject_ms;           /* --eject-ms: first ejection's length */
    int64_t eject_max_ms;       /* --eject-max-ms: cap of the doubling */
    unsigned max_ejected_pct;   /* --max-ejected-pct: most members ejected at once, % */
    bool discovery_dns;         /* --upstream-discovery dns (true) or static */
    int64_t resolve_every_ms;   /* --resolve-every-ms: between lookups of a name */
    int64_t resolve_hold_ms;    /* --resolve-hold-ms: members kept after NXDOMAIN/empty */
    char upstreams_file[4096];  /* --upstreams-file: one template per line, or "" */
    unsigned max_members;       /* --max-members: members in all */
    int64_t slow_start_ms;      /* --slow-start-ms: a new member's ramp (0: none) */
    double balance_factor;      /* --balance-factor: bounded-load factor (0: off) */
    char health_path[256];      /* --health-path: GET on every member, or "" (no checks) */
    int64_t health_every_ms;    /* --health-every-ms */
    int64_t health_timeout_ms;  /* --health-timeout-ms */
    unsigned healthy_after;     /* --healthy-after: passes that make a member healthy */
    unsigned unhealthy_after;   /* --unhealthy-after: failures that make it unhealthy */
    int64_t hedge_after_ms;     /* --hedge-after-ms N: hedge delay (0: off) */
    bool hedge_auto;            /* --hedge-after-ms auto: after the member's recent latency
                                   percentile (attempt_hedge_pct()) */
    unsigned hedge_budget_pct;  /* --hedge-budget-pct: hedges per 100 first attempts */
    unsigned retries;           /* --retries: extra attempts after retryable failures */
    unsigned retry_budget_pct;  /* --retry-budget-pct: retries per 100 first attempts (+10/s) */
    bool demo;                  /* --demo: serve the built-in demo upstream and use it */
    unsigned demo_members;      /* --demo-members: demo members behind one name (with --demo) */
    bool demo_upstream_only;    /* --demo-upstream-only: serve only the demo upstream on --listen */
    int limit;                  /* --limit: in-flight fetches per request */
    unsigned spread_min;        /* --spread-min: calls in flight at once that spread a batch
                                   over the loops (0: never) */
    unsigned max_conns;         /* --max-conns: upstream connections, all loops together */
    unsigned max_batch;         /* --max-batch: ids per request */
    unsigned max_requests;      /* --max-requests: batches in flight before 503 */
    int64_t timeout_ms;         /* --timeout-ms: default request deadline */
    int64_t max_timeout_ms;     /* --max-timeout-ms: largest request deadline */
    size_t max_body;            /* --max-body: upstream body per id, bytes */
    size_t upstream_buffer;     /* --upstream-buffer: libcurl's receive buffer per fetch, bytes */
    size_t max_request_bytes;   /* --max-request-bytes: request body, bytes */
    size_t max_response_bytes;  /* --max-response-bytes: one batch response, bytes */
    unsigned http_threads;      /* --http-threads: libmicrohttpd worker threads (split) */
    bool loop_shared;           /* --loop-model shared: the fetch loops serve HTTP too */
    unsigned fetch_threads;     /* --fetch-threads: fetch loop threads */
    int64_t drain_ms;           /* --drain-ms: grace period on SIGTERM */
    enum log_level log_level;   /* --log-level */
    unsigned max_clients;       /* --max-clients: client connections held open at once */
    unsigned idle_timeout_s;    /* --idle-timeout-s: idle client connection timeout */
    int64_t connect_timeout_ms; /* --connect-timeout-ms: upstream connect phase cap */
    bool h2c;                   /* --h2c: HTTP/2 prior knowledge to the upstream */
    bool coalesce;              /* --coalesce on|off: share in-flight fetches across requests */
    int64_t header_timeout_ms;  /* --header-timeout-ms: first byte to end of headers (0: off) */
    int64_t body_timeout_ms;    /* --body-timeout-ms: end of headers to end of body (0: off) */
    unsigned max_clients_per_ip; /* --max-clients-per-ip: connections from one address (0: no
                                    limit); a quarter of --max-clients unless given */
    bool max_clients_per_ip_given; /* --max-clients-per-ip was set */
    size_t max_memory;          /* --max-memory: request bodies, upstream bodies and answers
                                   held at once, all requests together */
    int64_t linger_ms;          /* --linger-ms: longest lingering close (0: none) */
    size_t linger_bytes;        /* --linger-bytes: most bytes dropped while lingering */
    bool timeout_ms_given;      /* --timeout-ms was set; else it follows --max-timeout-ms down */
    char probe_path[128];       /* --healthcheck[=PATH]: the path it GETs [/healthz] */
};

/* What the command line asked for besides serving. */
enum config_action { CONFIG_RUN, CONFIG_HELP, CONFIG_VERSION, CONFIG_CHECK, CONFIG_HEALTHCHECK };

/* Fills 'c' with the defaults (CPU count for the thread settings). */
void config_defaults(struct srv_config *c);

/* Applies the environment, then argv[1..argc), to 'c' (config_defaults() first). --help and
 * --version anywhere on the command line win and skip the rest (the environment too).
 * Otherwise every value is checked, and so is the whole: --upstream (a valid template with
 * {id}, url.h) or --demo (or --demo-upstream-only, which excludes both), --timeout-ms <=
 * --max-timeout-ms, --max-conns >= --fetch-threads. For --healthcheck only the values are
 * checked, not the whole: the probe needs nothing but --listen.
 * Returns 0 and the action in *action, or -EINVAL with a one-line reason naming the flag (and
 * the FANOUT_* variable when the value came from the environment) in err. Not thread-safe. */
int config_parse(struct srv_config *c, int argc, char **argv, enum config_action *action, char *err,
                 size_t errlen);

/* Splits 'list' (a copy of srv_config.upstream, modified in place) into at most 'max'
 * templates; returns how many. */
unsigned config_split_upstreams(char *list, const char **out, unsigned max);

/* Resolves --listen's host and port (numeric or a name; a dotted all-digit host must be a
 * valid IPv4 address, never a name to look up) into 'ss'. Returns 0, or -EINVAL with a
 * one-line reason naming --listen. Used by --check-config and by the real start alike. */
struct sockaddr_storage;
int config_resolve_listen(const struct srv_config *c, struct sockaddr_storage *ss, char *err,
                          size_t errlen);

/* Prints --help text. */
void config_usage(FILE *out);

/* Writes the effective configuration as one JSON object (no newline). */
void config_print_json(const struct srv_config *c, FILE *out);


#endif
