/* srv_impl: what the HTTP wing's files share: the server, one request, and the functions they
 * call across each other. Only the wing's .c files include it.
 *
 * The server (struct srv) is built by srv.c and read by every file of the wing; after srv_new()
 * returns, its fields change only through atomics, except what srv.c's drain and srv_free()
 * change on the owner's thread. A request (struct req) belongs to its connection: created on
 * the first handler call and freed at completion, both in conn.c, and used by one libmicrohttpd
 * worker at a time; a batch's loop thread touches only the fields marked so. */
#ifndef FANOUT_SRV_IMPL_H
#define FANOUT_SRV_IMPL_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/batch/batch.h"
#include "server/batch/budget.h"
#include "server/config.h"
#include "server/membudget.h"
#include "server/obs/metrics.h"
#include "server/http/srv.h"

struct batch;
struct ctx;
struct demo_set;
struct discover;
struct fetch;
struct flights;
struct guard;
struct guard_conn;
struct log;
struct stream;
struct upstream_live;
struct watch;

enum route { R_BATCH, R_HEALTHZ, R_READYZ, R_METRICS, R_NOT_FOUND, R_BAD_METHOD };

#define REQUEST_ID_MAX 128
/* Body bytes of a request already refused (too large, or --max-memory) that are read and
 * dropped; past it the answer is written to the socket and the connection closed instead. */
#define DISCARD_MAX ((size_t)1 << 20)

struct srv {
    struct srv_config cfg;         /* effective configuration */
    struct MHD_Daemon **mhd;       /* the front end: one daemon (split), or one per fetch loop
                                      polled by it (shared) */
    unsigned nmhd;                 /* daemons started */
    unsigned nsources;             /* daemons attached to their loop (shared) */
    struct fetch *fetch;           /* the upstream engine */
    struct upstream_live *ups;     /* the upstream set: its current snapshot */
    struct discover *discover;     /* keeps it: lookups, the upstreams file, health checks */
    struct srv_seams seams;        /* what tests replace */
    struct watch *watch;           /* disconnect watch for suspended connections */
    struct guard *guard;           /* header and body deadlines, lingering closes */
    struct membudget mem;          /* --max-memory: bodies and answers held, all requests */
    struct log *log;               /* JSON line writer */
    struct demo_set *demo;         /* built-in demo upstream (--demo), or NULL */
    struct ctx *root;              /* parent of every request ctx; canceled at shutdown */
    struct budget hedge_budget;    /* hedges: --hedge-budget-pct of first attempts */
    struct budget retry_budget;    /* retries: --retry-budget-pct plus 10 a second */
    struct flights *flights;       /* running flights (coalescing) */
    struct batch_env env;          /* what every batch runs with */
    char upstream[2048];           /* the first upstream template (the demo's with --demo) */
    struct metrics metrics;        /* counters and histograms */
    uint16_t port;                 /* bound port */
    int log_fd;                    /* where the log writer writes (srv_new's argument) */
    unsigned steps;                /* srv_new()'s steps done, undone by srv_free() */
    bool serving;                  /* srv_new() finished: srv_free() logs "stopped" */
    atomic_bool draining;          /* readyz 503, new batches 503 */
    bool drained;                  /* srv_drain ran; only the owner thread reads/writes it */
    atomic_int_fast64_t active;    /* batches admitted and not yet completed (sent or closed) */
    pthread_mutex_t mu;            /* guards nothing but pairs with cv */
    pthread_cond_t cv;             /* signalled when the last active batch completes */
    atomic_uint_fast64_t seq;      /* request id sequence */
    atomic_int_fast64_t mhd_log_sec;   /* second of the current libmicrohttpd log budget */
    atomic_int_fast64_t mhd_log_count; /* libmicrohttpd lines logged in that second */
    uint64_t id_seed;              /* random part of generated request ids */
};

/* One HTTP request, from its first handler call to libmicrohttpd's completion notice. */
struct req {
    struct srv *s;                 /* the server */
    struct MHD_Connection *conn;   /* the connection */
    struct guard_conn *gc;         /* its deadlines (the socket context), or NULL */
    bool close;                    /* answer with Connection: close (framing errors, 413) */
    bool over_memory;              /* the body did not fit in --max-memory: 503 once it ends */
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
    bool cut_off;                  /* refused past DISCARD_MAX: answered on the socket */
    bool admitted;                 /* counted in 'active' (and, until answered, the gauge) */
    bool in_gauge;                 /* still counted in fanout_requests_in_flight */
    bool rejected;                 /* refused overloaded: counted in the rejections */
    bool answered;                 /* a response was queued */
    unsigned status;               /* status of the queued response */
    const char *err_code;          /* JSON error code sent, or NULL */
    char *fail_id;                 /* JSON text of the failing id for the log, or NULL */
    unsigned nids;                 /* ids in the batch */
    struct batch *batch;           /* the running or finished batch, or NULL */
    int start_err;                 /* the batch could not be handed to its loop */
    atomic_bool batch_done;        /* the batch called back (set on the loop thread) */
    struct stream *stream;         /* an NDJSON answer in progress, or NULL */
    bool watched;                  /* the socket is in the watch (loop thread: removes it) */
    uint64_t watch_token;          /* its token */
};

/* ---------------------------------------------------------------- conn.c */

/* libmicrohttpd's callbacks (srv.c hands them to the daemon; 'cls' is the server). */
enum MHD_Result conn_on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                const char *method, const char *version,
                                const char *upload_data, size_t *upload_data_size,
                                void **req_cls);
void conn_on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                       enum MHD_RequestTerminationCode toe);
void conn_on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                        enum MHD_ConnectionNotificationCode toe);

/* Resumes 'conn' (suspended for a batch or a stream) and, on a shared loop, has the loop run
 * its daemon before it sleeps (libmicrohttpd processes a resume at its next run, and in
 * external polling its wake-up does not reach the loop's poll). With --loop-model shared every
 * resume is made on the connection's own loop, where its batch runs, so the kick is that
 * loop's. */
void conn_resume(struct srv *s, struct MHD_Connection *conn);

/* The guard's callbacks (struct guard_opts; 'arg' is the server). */
void conn_on_guard_timeout(void *arg, bool in_body, const char *request_id);
void conn_new_id(void *arg, char *out);

/* Queues a response (takes 'body', a malloc'd buffer, when 'owned'; a batch's answer, 'charge',
 * counts in --max-memory while it is held). Adds X-Request-Id, Content-Type, Retry-After to a
 * 503, Allow to a 405, and Connection: close when the request asked for it or the server is
 * draining. Returns MHD_queue_response's result. */
enum MHD_Result conn_respond(struct req *r, unsigned status, const char *ctype, char *body,
                             size_t len, bool owned, bool charge);

/* Answers {"error":{"code":..,"message":..}}: queued, or, when the body was cut off
 * (r->cut_off: libmicrohttpd queues nothing while a body is arriving), written to the socket
 * and the connection closed, lingering (then it returns MHD_NO). A 503 "overloaded" is
 * answered through admit_reject() (admit.h), never directly. */
enum MHD_Result conn_error(struct req *r, unsigned status, const char *code,
                           const char *message);

#endif
