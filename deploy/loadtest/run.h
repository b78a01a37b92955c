/* run: one load run, i.e. worker threads that each own an epoll set and a share of the
 * connections, send POST requests built from the mix and parse the answers (http.h).
 *
 * Closed loop (rate 0): every connection sends its next request as soon as the previous answer
 * is in; latency is measured from the send. Open loop (rate R): requests are due at fixed
 * intervals (each thread has R / threads of them, interleaved), an idle connection takes the
 * oldest due request, and latency is measured from the time it was due, not from when a
 * connection was free to send it, so a stalled server shows in the latency (coordinated omission
 * is corrected). Requests due when no connection was free before the end are counted as unsent.
 *
 * A run ends by itself: no request is started after 'duration'; those in flight get until
 * their own 'timeout' (counted as timeouts after that). lt_run_interrupt() ends it early.
 *
 * Threads: lt_run_start() starts 'threads' workers; lt_run_finish() joins them, on the thread
 * that started them. Progress counters are atomics, readable from any thread while it runs. */
#ifndef FANOUT_LT_RUN_H
#define FANOUT_LT_RUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "deploy/loadtest/hist.h"
#include "deploy/loadtest/mix.h"

/* Distinct error codes counted by name; more go into codes_other. */
#define LT_MAX_CODES 32
/* Highest HTTP status counted one by one. */
#define LT_MAX_STATUS 600

/* Where to send. */
struct lt_target {
    struct sockaddr_storage addr; /* resolved address */
    socklen_t addrlen;            /* its length */
    char host[300];               /* Host header value */
    char path[1024];              /* request target */
};

/* What to run. */
struct lt_opts {
    struct lt_target target;  /* where */
    int conns;                /* connections in all (>= threads) */
    int threads;              /* worker threads (>= 1) */
    double rate;              /* requests/s, open loop; 0: closed loop */
    int64_t duration_ns;      /* sending stops after this */
    int64_t timeout_ns;       /* a request unanswered this long is a timeout */
    const struct lt_mix *mix; /* request bodies (prepared; borrowed) */
    bool ndjson;              /* send Accept: application/x-ndjson */
    uint64_t seed;            /* seeds every thread's generator */
    bool rows;                /* keep per-second rows */
    bool entries;             /* count the entries of 200 answers (mode settled, NDJSON) */
};

/* An error code (error.code of a non-200 JSON answer) and how often it came. */
struct lt_code {
    char name[48]; /* the code, truncated */
    uint64_t n;    /* answers with it */
};

/* Error codes by name, in order of first appearance. */
struct lt_codes {
    struct lt_code c[LT_MAX_CODES]; /* the codes */
    size_t n;                       /* entries used */
    uint64_t other;                 /* answers whose code did not fit */
};

/* One second of the run, by completion time. */
struct lt_row {
    uint64_t done;         /* answers */
    uint64_t ok;           /* successful answers */
    uint64_t ok_ids;       /* ids in them */
    uint64_t errors;       /* socket errors, timeouts, protocol errors */
    struct lt_hist *hist;  /* latency of the answers (owned) */
};

/* What a run measured. */
struct lt_stats {
    uint64_t sent;          /* requests written */
    uint64_t done;          /* answers received (any status) */
    uint64_t ok;            /* successful: 200 (for NDJSON, ending in a done line without error) */
    uint64_t ok_ids;        /* ids in successful requests (upstream fetches) */
    uint64_t connects;      /* connections opened */
    uint64_t connect_errors;/* connects that failed */
    uint64_t sock_errors;   /* requests lost to a reset, a close or a failed write */
    uint64_t timeouts;      /* requests unanswered within the timeout */
    uint64_t proto_errors;  /* answers that were not valid HTTP */
    uint64_t unsent;        /* open loop: due requests no connection was free to send */
    uint64_t bytes_in;      /* body bytes received */
    uint64_t status[LT_MAX_STATUS]; /* answers by status code (index 0: out of range) */
    struct lt_codes codes;  /* error codes of failed answers */
    uint64_t entries_ok;    /* with 'entries': result entries without an error */
    uint64_t entries_failed;/* with 'entries': result entries with an error */
    uint64_t entries_unknown; /* with 'entries': 200 answers whose entries could not be read */
    struct lt_codes entry_codes; /* with 'entries': error codes of failed entries */
    struct lt_hist lat;     /* latency of every answer (us) */
    struct lt_hist lat_ok;  /* latency of successful answers (us) */
    struct lt_hist lat_first; /* NDJSON: latency of each answer's first line (us) */
    struct lt_row *rows;    /* per-second rows (owned), when asked for */
    size_t nrows;           /* their number */
    int64_t elapsed_ns;     /* from the start to the last worker's end */
    int64_t window_ns;      /* from the start to the end of sending */
    bool interrupted;       /* ended by lt_run_interrupt() */
};

struct lt_run;

/* Starts a run. Returns 0 and the run in *out (the caller must lt_run_finish() it), or a
 * negative errno. */
int lt_run_start(const struct lt_opts *o, struct lt_run **out);

/* True once every worker has ended. Thread-safe. */
bool lt_run_done(const struct lt_run *r);

/* Progress so far: answers, successful answers, failed requests. Thread-safe. */
void lt_run_progress(const struct lt_run *r, uint64_t *done, uint64_t *ok, uint64_t *failed);

/* Joins the workers, merges their figures into *st (lt_stats_destroy() it) and frees r. */
void lt_run_finish(struct lt_run *r, struct lt_stats *st);

/* Frees what *st holds. */
void lt_stats_destroy(struct lt_stats *st);

/* Ends the running run early: the first call stops sending and lets answers in flight arrive,
 * the second abandons them. Async-signal-safe (a lock-free atomic store). */
void lt_run_interrupt(void);

/* Clears the interrupt state before a new run. */
void lt_run_clear_interrupt(void);

/* What the success ratio divides by: answers, failed connects (each one a request that could
 * not be sent), socket errors, timeouts, protocol errors and unsent requests. */
uint64_t lt_stats_attempts(const struct lt_stats *st);

/* Monotonic clock in nanoseconds. */
int64_t lt_now_ns(void);

#endif
