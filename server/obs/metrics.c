/* metrics: fixed-bucket histograms and counters on relaxed atomics; text rendering on scrape.
 *
 * The request path does one relaxed fetch_add per counter and two per histogram observation
 * (its bucket and its sum); nothing takes a lock. A scrape loads each atomic once and formats
 * about 60 lines into the caller's buffer, so it costs microseconds and never holds anything the
 * request path needs. A histogram's buckets are stored per bucket and summed while rendering, so
 * the rendered buckets are cumulative and _count equals the +Inf bucket in every scrape even while
 * observations land. Threads: any. */
#include "server/obs/metrics.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <microhttpd.h>
#include <string.h>
#include <time.h>

#include "ctx/ctx.h"
#include "fetch/fetch.h"
#include "fetch/upstream.h"
#include "server/json.h"
#include "server/version.h"

void metrics_init(struct metrics *m)
{
    memset(m, 0, sizeof(*m));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->start_time = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void metrics_count_status(struct metrics *m, enum metrics_route route, unsigned status)
{
    if (status >= 600)
        status = 0;
    if ((unsigned)route >= ROUTE_COUNT)
        route = ROUTE_OTHER;
    atomic_fetch_add_explicit(&m->by_status[route][status], 1, memory_order_relaxed);
}

static uint64_t ld(const atomic_uint_fast64_t *a)
{
    return atomic_load_explicit(a, memory_order_relaxed);
}

static void family(struct json_buf *o, const char *name, const char *type, const char *help)
{
    json_buf_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* The series of one histogram; 'labels' is "" or label pairs ending in a comma
 * ("upstream=\"h:1\","), put before le and alone (without the comma) on _sum and _count. */
static void hist_series(struct json_buf *o, const char *name, const char *labels,
                        const struct hist *h)
{
    uint64_t cum = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        cum += ld(&h->bucket[i]);
        json_buf_printf(o, "%s_bucket{%sle=\"%s\"} %" PRIu64 "\n", name, labels, hist_bound_text((unsigned)i),
                        cum);
    }
    uint64_t sum = ld(&h->sum_us);
    size_t ll = strlen(labels);
    if (ll) {
        json_buf_printf(o, "%s_sum{%.*s} %" PRIu64 ".%06" PRIu64 "\n%s_count{%.*s} %" PRIu64 "\n",
                        name, (int)ll - 1, labels, sum / 1000000, sum % 1000000, name,
                        (int)ll - 1, labels, cum);
    } else {
        json_buf_printf(o, "%s_sum %" PRIu64 ".%06" PRIu64 "\n%s_count %" PRIu64 "\n", name,
                        sum / 1000000, sum % 1000000, name, cum);
    }
}

static void hist(struct json_buf *o, const char *name, const char *help,
                 const struct hist *h)
{
    family(o, name, "histogram", help);
    hist_series(o, name, "", h);
}

/* The labels of member m: upstream="host:port",member="address:port". */
static void member_labels(const struct upstreams *ups, unsigned m, char *lab, size_t cap)
{
    snprintf(lab, cap, "upstream=\"%s\",member=\"%s\"",
             upstream_label(ups, upstream_member_upstream(ups, m)), upstream_member_label(ups, m));
}

/* The per-upstream families: members and lookups by upstream, attempts and ejection by member
 * (a member's series go when it leaves the set). */
static void render_upstreams(struct upstreams *ups, struct json_buf *o)
{
    unsigned n = upstreams_count(ups), nm = upstreams_member_count(ups);
    static const char *const resolve_txt[UPSTREAM_RESOLVE_KINDS] = {"ok", "empty", "failed"};
    char lab[700], hl[710];
    family(o, "fanout_upstream_members", "gauge", "Members of the upstream now.");
    for (unsigned i = 0; i < n; i++) {
        unsigned first;
        json_buf_printf(o, "fanout_upstream_members{upstream=\"%s\"} %u\n", upstream_label(ups, i),
                        upstream_members(ups, i, &first));
    }
    family(o, "fanout_resolves_total", "counter",
           "Lookups of the upstream's name, by result (ok; empty: NXDOMAIN or no address; "
           "failed: no answer).");
    for (unsigned i = 0; i < n; i++)
        for (unsigned r = 0; r < UPSTREAM_RESOLVE_KINDS; r++)
            json_buf_printf(o, "fanout_resolves_total{upstream=\"%s\",result=\"%s\"} %" PRIu64 "\n",
                            upstream_label(ups, i), resolve_txt[r],
                            upstream_resolves(ups, i, (enum upstream_resolve)r));
    family(o, "fanout_upstream_fetches_total", "counter",
           "Upstream attempts completed, by upstream, member and result (hedges and retries "
           "included).");
    for (unsigned m = 0; m < nm; m++) {
        member_labels(ups, m, lab, sizeof(lab));
        for (unsigned r = 0; r < OUTCOME_KINDS; r++)
            json_buf_printf(o, "fanout_upstream_fetches_total{%s,result=\"%s\"} %" PRIu64 "\n", lab,
                            outcome_name((enum outcome_kind)r), ld(&upstream_stats(ups, m)->fetches[r]));
    }
    family(o, "fanout_upstream_fetch_duration_seconds", "histogram",
           "Upstream attempt duration in seconds, by upstream and member.");
    for (unsigned m = 0; m < nm; m++) {
        member_labels(ups, m, lab, sizeof(lab));
        snprintf(hl, sizeof(hl), "%s,", lab);
        hist_series(o, "fanout_upstream_fetch_duration_seconds", hl, &upstream_stats(ups, m)->seconds);
    }
    family(o, "fanout_upstream_in_flight", "gauge", "Attempts in flight on the member.");
    for (unsigned m = 0; m < nm; m++) {
        member_labels(ups, m, lab, sizeof(lab));
        json_buf_printf(o, "fanout_upstream_in_flight{%s} %u\n", lab, upstream_in_flight(ups, m));
    }
    family(o, "fanout_upstream_ejected", "gauge",
           "1 while the member is ejected by outlier detection (or waits for a health check to "
           "return), else 0.");
    int64_t now = ctx_now();
    for (unsigned m = 0; m < nm; m++) {
        member_labels(ups, m, lab, sizeof(lab));
        json_buf_printf(o, "fanout_upstream_ejected{%s} %d\n", lab, upstream_ejected(ups, m, now) ? 1 : 0);
    }
    family(o, "fanout_upstream_healthy", "gauge",
           "1 while the member passes its health checks (always 1 without --health-path).");
    for (unsigned m = 0; m < nm; m++) {
        member_labels(ups, m, lab, sizeof(lab));
        json_buf_printf(o, "fanout_upstream_healthy{%s} %d\n", lab, upstream_healthy(ups, m) ? 1 : 0);
    }
    family(o, "fanout_upstream_ejections_total", "counter",
           "Times the member was ejected by outlier detection.");
    for (unsigned m = 0; m < nm; m++) {
        member_labels(ups, m, lab, sizeof(lab));
        json_buf_printf(o, "fanout_upstream_ejections_total{%s} %" PRIu64 "\n", lab,
                        upstream_ejections(ups, m));
    }
}

/* Requests by route and status, and fetches by result, with their durations. */
static void render_traffic(const struct metrics *m, const struct fetch_stats *fs,
                           struct json_buf *o)
{
    static const char *const route_txt[ROUTE_COUNT] = {"batch", "healthz", "readyz", "metrics",
                                                       "other"};
    family(o, "fanout_requests_total", "counter",
           "HTTP requests completed, by route and status code (code 0: closed without an "
           "answer).");
    for (unsigned r = 0; r < ROUTE_COUNT; r++)
        for (unsigned s = 0; s < 600; s++) {
            uint64_t v = ld(&m->by_status[r][s]);
            if (v)
                json_buf_printf(o, "fanout_requests_total{route=\"%s\",code=\"%u\"} %" PRIu64
                                "\n", route_txt[r], s, v);
        }
    hist(o, "fanout_request_duration_seconds",
         "Time from a request's first byte to its completion, in seconds.", &m->request_seconds);
    family(o, "fanout_fetches_total", "counter", "Upstream fetches completed, by result.");
    const uint64_t by_kind[OUTCOME_KINDS] = {[OUTCOME_OK] = fs->ok,
                                             [OUTCOME_STATUS] = fs->status,
                                             [OUTCOME_UNREACHABLE] = fs->unreachable,
                                             [OUTCOME_DEADLINE] = fs->deadline,
                                             [OUTCOME_CANCELED] = fs->canceled,
                                             [OUTCOME_TOO_LARGE] = fs->too_large};
    for (int k = 0; k < OUTCOME_KINDS; k++)
        json_buf_printf(o, "fanout_fetches_total{result=\"%s\"} %" PRIu64 "\n",
                        outcome_name((enum outcome_kind)k), by_kind[k]);
    hist(o, "fanout_fetch_duration_seconds",
         "Upstream fetch duration in seconds, from its start (after the --limit queue) to its end.",
         &m->fetch_seconds);
}

/* Gauges of what is in flight, and the engine's connection and byte counters. */
static void render_engine(const struct metrics *m, const struct fetch_stats *fs,
                          struct json_buf *o)
{
    family(o, "fanout_requests_in_flight", "gauge",
           "Batch requests admitted and not yet answered.");
    json_buf_printf(o, "fanout_requests_in_flight %" PRIdFAST64 "\n",
                    atomic_load_explicit(&m->in_flight, memory_order_relaxed));
    family(o, "fanout_fetches_in_flight", "gauge", "Upstream fetches submitted and not completed.");
    json_buf_printf(o, "fanout_fetches_in_flight %" PRIu64 "\n", fs->in_flight);
    family(o, "fanout_upstream_connections_opened_total", "counter",
           "Connections opened to the upstream.");
    json_buf_printf(o, "fanout_upstream_connections_opened_total %" PRIu64 "\n", fs->conns_opened);
    family(o, "fanout_upstream_bytes_total", "counter", "Upstream body bytes received.");
    json_buf_printf(o, "fanout_upstream_bytes_total %" PRIu64 "\n", fs->bytes);
}

/* Hedges, retries and flights. */
static void render_attempts(const struct metrics *m, struct json_buf *o)
{
    const struct {
        const char *name, *help;
        const atomic_uint_fast64_t *v;
    } extra[] = {
        {"fanout_hedges_sent_total", "Hedged attempts sent.", &m->hedges_sent},
        {"fanout_hedges_won_total", "Flights whose hedged attempt answered first.", &m->hedges_won},
        {"fanout_hedges_refused_total", "Hedges not sent because the hedge budget was spent.",
         &m->hedges_refused},
        {"fanout_retries_sent_total", "Retried attempts sent.", &m->retries_sent},
        {"fanout_retries_refused_total", "Retries not sent because the retry budget was spent.",
         &m->retries_refused},
        {"fanout_flights_started_total",
         "Flights started: upstream fetches of a key, each shared by every call that joined it.",
         &m->flights_started},
        {"fanout_flights_joined_total",
         "Calls that joined a flight already running for their key (coalesced).",
         &m->flights_joined},
        {"fanout_flights_abandoned_total",
         "Flights canceled because every call waiting on them had left.", &m->flights_abandoned},
    };
    for (size_t i = 0; i < sizeof(extra) / sizeof(extra[0]); i++) {
        family(o, extra[i].name, "counter", extra[i].help);
        json_buf_printf(o, "%s %" PRIu64 "\n", extra[i].name, ld(extra[i].v));
    }
}

/* Refusals, dropped log lines, the process and the build. */
static void render_process(const struct metrics *m, struct json_buf *o)
{
    family(o, "fanout_admission_rejections_total", "counter",
           "Batch requests refused as overloaded: the in-flight cap, --max-memory, draining or "
           "shutdown (a stream that shutdown ended included).");
    json_buf_printf(o, "fanout_admission_rejections_total %" PRIu64 "\n", ld(&m->rejected));
    family(o, "fanout_log_lines_dropped_total", "counter",
           "Log lines dropped because stderr could not keep up.");
    json_buf_printf(o, "fanout_log_lines_dropped_total %" PRIu64 "\n", ld(&m->log_dropped));
    family(o, "fanout_process_start_time_seconds", "gauge", "Start time since the Unix epoch.");
    json_buf_printf(o, "fanout_process_start_time_seconds %.3f\n", m->start_time);
    family(o, "fanout_build_info", "gauge", "Build information; the value is always 1.");
    json_buf_printf(o, "fanout_build_info{version=\"%s\",libcurl=\"%s\",libmicrohttpd=\"%s\"} 1\n",
                    FANOUT_VERSION, curl_version_info(CURLVERSION_NOW)->version, MHD_get_version());
}

void metrics_render(const struct metrics *m, const struct fetch_stats *fs,
                    struct upstreams *ups, struct json_buf *o)
{
    render_traffic(m, fs, o);
    render_engine(m, fs, o);
    render_attempts(m, o);
    if (ups)
        render_upstreams(ups, o);
    render_process(m, o);
}
