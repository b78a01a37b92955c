/* report: the load tool's output (see report.h). The table and the JSON carry the same
 * figures; percentiles come from the run's merged histogram, in milliseconds. */
#include "deploy/loadtest/report.h"

#include <errno.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "deploy/loadtest/hist.h"

extern char **environ;

void lt_die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static const double quantiles[4] = {0.5, 0.9, 0.99, 0.999};

void lt_summarize(const struct lt_cli *c, const struct lt_stats *st, struct lt_summary *s)
{
    memset(s, 0, sizeof(*s));
    s->attempts = lt_stats_attempts(st);
    s->ratio = s->attempts ? (double)st->ok / (double)s->attempts : 0;
    s->secs = (double)st->elapsed_ns / 1e9;
    if (s->secs > 0) {
        s->rps = (double)st->done / s->secs;
        s->fps = (double)st->ok_ids / s->secs;
    }
    for (int i = 0; i < 4; i++)
        s->p[i] = (double)lt_hist_quantile(&st->lat, quantiles[i]) / 1000.0;
    s->p[4] = (double)st->lat.max / 1000.0;
    s->mean = st->lat.count ? st->lat.sum / (double)st->lat.count / 1000.0 : 0;
    s->pass = true;
    size_t off = 0;
    if (!s->attempts) {
        s->pass = false;
        off += (size_t)snprintf(s->why + off, sizeof(s->why) - off, "no request was sent");
    } else if ((double)st->ok < c->min_success * (double)s->attempts) {
        s->pass = false;
        off += (size_t)snprintf(s->why + off, sizeof(s->why) - off,
                                "success %.4f%% below --min-success %.4f%%", 100 * s->ratio,
                                100 * c->min_success);
    }
    if (c->max_p99_ms > 0 && (s->p[2] > c->max_p99_ms || !st->lat.count)) {
        s->pass = false;
        snprintf(s->why + off, sizeof(s->why) - off, "%sp99 %.3f ms above --max-p99-ms %g",
                 off ? "; " : "", s->p[2], c->max_p99_ms);
    }
}

static void print_codes(const char *title, const struct lt_codes *cs)
{
    if (!cs->n && !cs->other)
        return;
    printf("  %-12s", title);
    for (size_t i = 0; i < cs->n; i++)
        printf("  %s: %llu", cs->c[i].name, (unsigned long long)cs->c[i].n);
    if (cs->other)
        printf("  (others): %llu", (unsigned long long)cs->other);
    printf("\n");
}

static cJSON *codes_json(const struct lt_codes *cs)
{
    cJSON *o = cJSON_CreateObject();
    for (size_t i = 0; i < cs->n; i++)
        cJSON_AddNumberToObject(o, cs->c[i].name, (double)cs->c[i].n);
    if (cs->other)
        cJSON_AddNumberToObject(o, "(others)", (double)cs->other);
    return o;
}

void lt_print_table(const struct lt_cli *c, const struct lt_stats *st, const struct lt_summary *s)
{
    const struct lt_opts *o = &c->o;
    const struct lt_mix *m = o->mix;
    char batch[32];
    if (m->batch_min == m->batch_max)
        snprintf(batch, sizeof(batch), "%d", m->batch_min);
    else
        snprintf(batch, sizeof(batch), "%d-%d", m->batch_min, m->batch_max);
    static const char *dists[] = {"seq", "uniform", "zipf"};
    printf("%s %s\n", PROG, c->url);
    if (o->rate > 0)
        printf("  load          open loop at %g requests/s, %d connections, %d thread%s, %.1f s\n",
               o->rate, o->conns, o->threads, o->threads > 1 ? "s" : "",
               (double)o->duration_ns / 1e9);
    else
        printf("  load          closed loop, %d connections, %d thread%s, %.1f s\n", o->conns,
               o->threads, o->threads > 1 ? "s" : "", (double)o->duration_ns / 1e9);
    printf("  requests      batch %s, ids %s over %llu", batch, dists[m->dist],
           (unsigned long long)m->keys);
    if (m->dist == LT_DIST_ZIPF)
        printf(" (s=%g)", m->zipf_s);
    if (m->fail_frac > 0)
        printf(", %g failing", m->fail_frac);
    if (m->slow_frac > 0)
        printf(", %g slow (%d ms)", m->slow_frac, m->slow_ms);
    if (m->timeout_ms)
        printf(", timeout_ms %d", m->timeout_ms);
    if (m->mode)
        printf(", mode %s", m->mode);
    if (o->ndjson)
        printf(", NDJSON");
    printf("\n\n");
    printf("  answers       %llu in %.2f s   %.1f requests/s\n", (unsigned long long)st->done,
           s->secs, s->rps);
    printf("  fetches       %llu ids in successful batches   %.1f upstream fetches/s\n",
           (unsigned long long)st->ok_ids, s->fps);
    printf("  success       %.2f%%   (%llu of %llu)\n", 100 * s->ratio,
           (unsigned long long)st->ok, (unsigned long long)s->attempts);
    printf("  latency ms    p50 %.3f   p90 %.3f   p99 %.3f   p99.9 %.3f   max %.3f   mean %.3f\n",
           s->p[0], s->p[1], s->p[2], s->p[3], s->p[4], s->mean);
    if (st->ok != st->done && st->lat_ok.count)
        printf("  ok latency    p50 %.3f   p99 %.3f   (successful answers only)\n",
               (double)lt_hist_quantile(&st->lat_ok, 0.5) / 1000.0,
               (double)lt_hist_quantile(&st->lat_ok, 0.99) / 1000.0);
    if (st->lat_first.count)
        printf("  first line ms p50 %.3f   p90 %.3f   p99 %.3f   p99.9 %.3f   (NDJSON: time to "
               "the first result line)\n",
               (double)lt_hist_quantile(&st->lat_first, 0.5) / 1000.0,
               (double)lt_hist_quantile(&st->lat_first, 0.9) / 1000.0,
               (double)lt_hist_quantile(&st->lat_first, 0.99) / 1000.0,
               (double)lt_hist_quantile(&st->lat_first, 0.999) / 1000.0);
    printf("  status      ");
    bool any = false;
    for (int i = 0; i < LT_MAX_STATUS; i++)
        if (st->status[i]) {
            printf("  %d: %llu", i, (unsigned long long)st->status[i]);
            any = true;
        }
    printf("%s\n", any ? "" : "  none");
    print_codes("error codes", &st->codes);
    if (o->entries) {
        printf("  entries       ok %llu   failed %llu", (unsigned long long)st->entries_ok,
               (unsigned long long)st->entries_failed);
        if (st->entries_unknown)
            printf("   unreadable answers %llu", (unsigned long long)st->entries_unknown);
        printf("   (entries of 200 answers)\n");
        print_codes("entry codes", &st->entry_codes);
    }
    printf("  sockets       connects %llu   connect errors %llu   read/write errors %llu   "
           "timeouts %llu   bad HTTP %llu",
           (unsigned long long)st->connects, (unsigned long long)st->connect_errors,
           (unsigned long long)st->sock_errors, (unsigned long long)st->timeouts,
           (unsigned long long)st->proto_errors);
    if (o->rate > 0)
        printf("   unsent %llu", (unsigned long long)st->unsent);
    printf("\n");
    if (st->unsent)
        printf("  note          %llu requests came due while every connection was busy: raise -c\n",
               (unsigned long long)st->unsent);
    if (st->interrupted)
        printf("  note          interrupted before the end of --duration\n");
    printf("  result        %s%s%s\n", s->pass ? "PASS" : "FAIL", s->pass ? "" : ": ",
           s->pass ? "" : s->why);
}

cJSON *lt_summary_json(const struct lt_cli *c, const struct lt_stats *st,
                           const struct lt_summary *s)
{
    const struct lt_opts *o = &c->o;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "url", c->url);
    cJSON_AddStringToObject(j, "loop", o->rate > 0 ? "open" : "closed");
    if (o->rate > 0)
        cJSON_AddNumberToObject(j, "rate", o->rate);
    else
        cJSON_AddNullToObject(j, "rate");
    cJSON_AddNumberToObject(j, "connections", o->conns);
    cJSON_AddNumberToObject(j, "threads", o->threads);
    cJSON_AddNumberToObject(j, "duration_s", (double)o->duration_ns / 1e9);
    cJSON_AddNumberToObject(j, "elapsed_s", s->secs);
    cJSON_AddNumberToObject(j, "requests", (double)st->done);
    cJSON_AddNumberToObject(j, "sent", (double)st->sent);
    cJSON_AddNumberToObject(j, "attempts", (double)s->attempts);
    cJSON_AddNumberToObject(j, "ok", (double)st->ok);
    cJSON_AddNumberToObject(j, "success_ratio", s->ratio);
    cJSON_AddNumberToObject(j, "requests_per_s", s->rps);
    cJSON_AddNumberToObject(j, "fetches", (double)st->ok_ids);
    cJSON_AddNumberToObject(j, "fetches_per_s", s->fps);
    cJSON *lat = cJSON_AddObjectToObject(j, "latency_ms");
    static const char *names[5] = {"p50", "p90", "p99", "p99_9", "max"};
    for (int i = 0; i < 5; i++)
        cJSON_AddNumberToObject(lat, names[i], s->p[i]);
    cJSON_AddNumberToObject(lat, "mean", s->mean);
    cJSON *lok = cJSON_AddObjectToObject(j, "ok_latency_ms");
    for (int i = 0; i < 4; i++)
        cJSON_AddNumberToObject(lok, names[i],
                                (double)lt_hist_quantile(&st->lat_ok, quantiles[i]) / 1000.0);
    cJSON_AddNumberToObject(lok, "max", (double)st->lat_ok.max / 1000.0);
    if (st->lat_first.count) {
        cJSON *lf = cJSON_AddObjectToObject(j, "first_line_ms");
        for (int i = 0; i < 4; i++)
            cJSON_AddNumberToObject(lf, names[i],
                                    (double)lt_hist_quantile(&st->lat_first, quantiles[i]) / 1000.0);
        cJSON_AddNumberToObject(lf, "max", (double)st->lat_first.max / 1000.0);
    }
    cJSON *sc = cJSON_AddObjectToObject(j, "status");
    for (int i = 0; i < LT_MAX_STATUS; i++)
        if (st->status[i]) {
            char k[16];
            snprintf(k, sizeof(k), "%d", i);
            cJSON_AddNumberToObject(sc, k, (double)st->status[i]);
        }
    cJSON_AddItemToObject(j, "error_codes", codes_json(&st->codes));
    if (o->entries) {
        cJSON *en = cJSON_AddObjectToObject(j, "entries");
        cJSON_AddNumberToObject(en, "ok", (double)st->entries_ok);
        cJSON_AddNumberToObject(en, "failed", (double)st->entries_failed);
        cJSON_AddNumberToObject(en, "unreadable_answers", (double)st->entries_unknown);
        cJSON_AddItemToObject(en, "error_codes", codes_json(&st->entry_codes));
    }
    cJSON *er = cJSON_AddObjectToObject(j, "errors");
    cJSON_AddNumberToObject(er, "connect", (double)st->connect_errors);
    cJSON_AddNumberToObject(er, "socket", (double)st->sock_errors);
    cJSON_AddNumberToObject(er, "timeout", (double)st->timeouts);
    cJSON_AddNumberToObject(er, "protocol", (double)st->proto_errors);
    cJSON_AddNumberToObject(er, "unsent", (double)st->unsent);
    cJSON_AddNumberToObject(j, "connects", (double)st->connects);
    cJSON_AddBoolToObject(j, "interrupted", st->interrupted);
    cJSON_AddBoolToObject(j, "pass", s->pass);
    if (!s->pass)
        cJSON_AddStringToObject(j, "failed", s->why);
    return j;
}

void lt_print_json(cJSON *j)
{
    char *txt = cJSON_Print(j);
    if (txt) {
        puts(txt);
        free(txt);
    }
}

void lt_csv_header(FILE *f, bool sweep)
{
    fprintf(f, "%ssecond,requests,ok,fetches,errors,requests_per_s,fetches_per_s,p50_ms,p90_ms,"
               "p99_ms,p99_9_ms,max_ms\n",
            sweep ? "load," : "");
}

void lt_csv_rows(FILE *f, const struct lt_stats *st, const double *load)
{
    for (size_t i = 0; i < st->nrows; i++) {
        const struct lt_row *r = &st->rows[i];
        if (load)
            fprintf(f, "%g,", *load);
        fprintf(f, "%zu,%llu,%llu,%llu,%llu,%llu,%llu", i + 1, (unsigned long long)r->done,
                (unsigned long long)r->ok, (unsigned long long)r->ok_ids,
                (unsigned long long)r->errors, (unsigned long long)r->done,
                (unsigned long long)r->ok_ids);
        for (int q = 0; q < 4; q++)
            fprintf(f, ",%.3f", r->hist ? (double)lt_hist_quantile(r->hist, quantiles[q]) / 1000.0
                                        : 0.0);
        fprintf(f, ",%.3f\n", r->hist ? (double)r->hist->max / 1000.0 : 0.0);
    }
}

FILE *lt_open_out(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        lt_die(EXIT_CANNOT, "cannot write %s: %s", path, strerror(errno));
    return f;
}

void lt_close_out(FILE *f, const char *path)
{
    if (ferror(f) | (fclose(f) != 0))
        lt_die(EXIT_CANNOT, "cannot write %s: %s", path, strerror(errno));
}

void lt_write_plot(const struct lt_cli *c, const char *csv_path)
{
    char gp[1100], png[1100];
    snprintf(gp, sizeof(gp), "%s.gp", c->sweep_out);
    snprintf(png, sizeof(png), "%s.png", c->sweep_out);
    FILE *f = lt_open_out(gp);
    const char *x = c->sweep_rate ? "offered load (requests/s)" : "connections (closed loop)";
    fprintf(f,
            "# gnuplot script written by " PROG " --sweep; run: gnuplot %s\n"
            "set terminal pngcairo size 1000,900 noenhanced font ',10'\n"
            "set output '%s'\n"
            "set datafile separator ','\n"
            "set multiplot layout 2,1 title '" PROG " sweep: %s'\n"
            "set grid\n"
            "set key top left\n"
            "set xlabel '%s'\n"
            "set ylabel 'requests/s'\n"
            "set y2label 'upstream fetches/s'\n"
            "set ytics nomirror\n"
            "set y2tics\n"
            "plot '%s' skip 1 using 1:7 with linespoints lw 2 title 'requests/s', \\\n"
            "     '' skip 1 using 1:8 axes x1y2 with linespoints lw 2 title 'upstream fetches/s'\n"
            "unset y2label\n"
            "unset y2tics\n"
            "set ytics mirror\n"
            "set ylabel 'latency (ms)'\n"
            "set logscale y\n"
            "plot '%s' skip 1 using 1:9 with linespoints title 'p50', \\\n"
            "     '' skip 1 using 1:10 with linespoints title 'p90', \\\n"
            "     '' skip 1 using 1:11 with linespoints title 'p99', \\\n"
            "     '' skip 1 using 1:12 with linespoints title 'p99.9'\n"
            "unset multiplot\n",
            gp, png, c->url, x, csv_path, csv_path);
    lt_close_out(f, gp);
    char *argv[] = {"gnuplot", gp, NULL};
    pid_t pid;
    int rc = posix_spawnp(&pid, "gnuplot", NULL, NULL, argv, environ);
    if (rc != 0)
        lt_die(EXIT_CANNOT, "cannot run gnuplot: %s (Debian/Ubuntu: apt-get install gnuplot-nox)",
            strerror(rc));
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        lt_die(EXIT_CANNOT, "gnuplot failed on %s (status %d)", gp,
            WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    fprintf(stderr, PROG ": wrote %s and %s\n", csv_path, png);
}
