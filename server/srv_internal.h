/* Shared by server/srv.c (daemon, routing, lifecycle) and server/batch.c (POST /v1/batch).
 * Not part of the public API. */
#ifndef FANOUT_SRV_INTERNAL_H
#define FANOUT_SRV_INTERNAL_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/config.h"
#include "server/metrics.h"
#include "server/srv.h"
#include "server/url.h"

struct batch;

enum route { R_BATCH, R_HEALTHZ, R_READYZ, R_METRICS, R_NOT_FOUND, R_BAD_METHOD };

#define REQUEST_ID_MAX 128

struct srv {
    struct srv_config cfg;         /* effective configuration */
    struct MHD_Daemon *mhd;        /* the front end */
    struct fetch *fetch;           /* the upstream engine */
    struct watch *watch;           /* disconnect watch for suspended connections */
    struct log *log;               /* JSON line writer */
    struct demo *demo;             /* built-in demo upstream, or NULL */
    struct ctx *root;              /* parent of every request ctx; canceled at shutdown */
    struct url_template tmpl;      /* parsed upstream template */
    char upstream[2048];           /* its text */
    struct metrics metrics;        /* counters and histograms */
    uint16_t port;                 /* bound port */
    atomic_bool draining;          /* readyz 503, new batches 503 */
    bool drained;                  /* srv_drain ran; only the owner thread reads/writes it */
    pthread_mutex_t mu;            /* guards nothing but pairs with cv */
    pthread_cond_t cv;             /* signalled when a batch request completes */
    atomic_uint_fast64_t seq;      /* request id sequence */
    atomic_int_fast64_t mhd_log_sec;   /* second of the current libmicrohttpd log budget */
    atomic_int_fast64_t mhd_log_count; /* libmicrohttpd lines logged in that second */
    uint64_t id_seed;              /* random part of generated request ids */
};

struct req {
    struct srv *s;                 /* the server */
    struct MHD_Connection *conn;   /* the connection */
    enum route route;              /* what was asked */
    const char *method;            /* MHD's string, valid for the request */
    char path[64];                 /* request path, truncated, for the log */
    int64_t start_us;              /* monotonic start */
    char request_id[REQUEST_ID_MAX + 1]; /* given or generated */
    bool bad_request_id;           /* the client's X-Request-Id was unusable (batch: 400) */
    char *body;                    /* request body (batch only), NUL-terminated */
    size_t body_len, body_cap;     /* bytes read, allocated */
    bool too_large;                /* the body passed --max-request-bytes: 413 once it ends */
    size_t discarded;              /* body bytes dropped since then */
    bool admitted;                 /* counted in metrics.in_flight */
    bool answered;                 /* a response was queued */
    unsigned status;               /* status of the queued response */
    const char *err_code;          /* JSON error code sent, or NULL */
    char *fail_id;                 /* JSON text of the failing id for the log, or NULL */
    unsigned nids;                 /* ids in the batch */
    struct batch *batch;           /* the fan-out, while it exists */
};

/* Queues a response (takes ownership of 'body', a malloc'd buffer, when 'owned'). Adds
 * X-Request-Id and Content-Type. Returns MHD_queue_response's result. */
enum MHD_Result srv_respond(struct req *r, unsigned status, const char *ctype, char *body,
                            size_t len, bool owned);

/* Queues {"error":{"code":..,"message":..<extra>}}; 'extra' is raw JSON members starting with
 * a comma, or NULL. */
enum MHD_Result srv_error(struct req *r, unsigned status, const char *code, const char *message,
                          const char *extra);

/* Batch handling, server/batch.c. */
/* Called on the final handler call of POST /v1/batch (and again after the resume). */
enum MHD_Result batch_handle(struct req *r);
/* Releases the batch of a completed request. */
void batch_free(struct batch *b);

#endif
