/* report: the load tool's command-line settings and what it prints from a run's figures: the
 * verdict on the objectives, the table, the JSON summary, the per-second CSV rows and the
 * sweep plot (a gnuplot script, then gnuplot). main.c fills struct lt_cli from the flags.
 *
 * Main thread only; every function here runs after the run's workers are joined. */
#ifndef FANOUT_LT_REPORT_H
#define FANOUT_LT_REPORT_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "deploy/loadtest/mix.h"
#include "deploy/loadtest/run.h"

#define PROG "fanout-load"
/* Exit status: an objective missed, bad usage, the run could not be made. */
#define EXIT_MISSED 1
#define EXIT_USAGE 2
#define EXIT_CANNOT 3
#define MAX_STEPS 100 /* most --sweep values */

/* Everything the flags say. */
struct lt_cli {
    char url[1200];          /* the target URL */
    struct lt_opts o;        /* the run (target filled in after resolving) */
    struct lt_mix mix;       /* the request mix */
    bool json;               /* --json */
    const char *csv;         /* --csv FILE or NULL */
    bool sweep_rate;         /* --sweep over rates (else connections) */
    double steps[MAX_STEPS]; /* sweep values */
    int nsteps;              /* 0: no sweep */
    const char *sweep_out;   /* --sweep-out */
    bool plot;               /* draw the sweep plot */
    int progress;            /* -1 auto, 0 off, 1 on */
    double min_success;      /* --min-success */
    double max_p99_ms;       /* --max-p99-ms, 0: none */
    int64_t wait_ns;         /* --wait: keep probing the target this long */
};

/* The verdict on one run's figures. */
struct lt_summary {
    uint64_t attempts;     /* lt_stats_attempts() */
    double ratio;          /* ok / attempts (0 when none) */
    double secs;           /* elapsed */
    double rps, fps;       /* answers/s, ids in successful answers/s */
    double p[5];           /* p50 p90 p99 p99.9 max, ms */
    double mean;           /* ms */
    bool pass;             /* every objective met */
    char why[256];         /* what failed */
};

/* Prints "fanout-load: <message>" on stderr and exits with 'code'. */
void lt_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

/* Computes the ratios, the percentiles (ms) and the verdict on c's objectives. */
void lt_summarize(const struct lt_cli *c, const struct lt_stats *st, struct lt_summary *s);

/* Prints the table on stdout. */
void lt_print_table(const struct lt_cli *c, const struct lt_stats *st, const struct lt_summary *s);

/* The JSON summary of one run; the caller cJSON_Delete()s it. */
cJSON *lt_summary_json(const struct lt_cli *c, const struct lt_stats *st,
                       const struct lt_summary *s);

/* Prints j on stdout, formatted. */
void lt_print_json(cJSON *j);

/* The header line of the per-second CSV (with a leading "load" column in a sweep). */
void lt_csv_header(FILE *f, bool sweep);

/* One CSV row per second of st; 'load' (or NULL) is the sweep value written first. */
void lt_csv_rows(FILE *f, const struct lt_stats *st, const double *load);

/* fopen(path, "w"), or lt_die() with exit 3. */
FILE *lt_open_out(const char *path);

/* fclose(f), or lt_die() with exit 3 if anything written to it failed. */
void lt_close_out(FILE *f, const char *path);

/* Writes c->sweep_out.gp for the sweep CSV at 'csv_path' and runs gnuplot on it to draw
 * c->sweep_out.png; lt_die()s with exit 3 if gnuplot cannot run or fails. */
void lt_write_plot(const struct lt_cli *c, const char *csv_path);

#endif
