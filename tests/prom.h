/* prom: a strict parser for the Prometheus text exposition format 0.0.4, for tests.
 *
 * Stricter than Prometheus itself where fanout's output should be: every line ends in '\n'
 * (empty lines and free comments are errors), every family has exactly one HELP and one TYPE
 * line before its first sample, a family's samples are contiguous, no series appears twice,
 * counter values are >= 0 and counter names end in _total, and each histogram series has
 * buckets with strictly increasing `le` bounds, cumulative (non-decreasing) whole counts, a last
 * bucket of le="+Inf", and _sum and _count, with _count equal to the +Inf bucket. Values are
 * Go-style floats ("+Inf", "-Inf", "NaN" spelled exactly so); hex floats are rejected. An
 * optional timestamp (an integer) may follow a value.
 *
 * Threads: none; a parsed scrape is plain data. */
#ifndef FANOUT_TESTS_PROM_H
#define FANOUT_TESTS_PROM_H

#include <stdbool.h>
#include <stddef.h>

#define PROM_NAME_MAX 128
#define PROM_LABELS_MAX 512

/* One sample line. */
struct prom_sample {
    char name[PROM_NAME_MAX];     /* metric name as written, e.g. fanout_x_bucket */
    char labels[PROM_LABELS_MAX]; /* canonical label set: name="value" pairs sorted by name,
                                     joined by ',', values escaped as on the wire; "" if none */
    char key[PROM_LABELS_MAX];    /* the label set without le/quantile: a histogram's or
                                     summary's series key */
    double value;                 /* the value */
    size_t family;                /* index of its family */
};

/* One metric family (HELP + TYPE + samples). */
struct prom_family {
    char name[PROM_NAME_MAX]; /* family name */
    char type[16];            /* counter, gauge, histogram, summary or untyped */
    char help[256];           /* help text, unescaped, truncated */
    size_t first, count;      /* its samples: smp[first .. first + count) */
};

/* A parsed scrape. Release with prom_free(). */
struct prom_scrape {
    struct prom_family *fam; /* families in order of appearance */
    size_t nfam;
    struct prom_sample *smp; /* samples in order of appearance */
    size_t nsmp;
};

/* Parses text[0..len). 'prefix' (or NULL) is required at the start of every family name.
 * Returns 0 and fills *out, or -1 with "line N: reason" in err (out is then empty but still
 * safe to prom_free()). */
int prom_parse(const char *text, size_t len, const char *prefix, struct prom_scrape *out, char *err,
               size_t errlen);

void prom_free(struct prom_scrape *s);

/* The family called 'name', or NULL. */
const struct prom_family *prom_family(const struct prom_scrape *s, const char *name);

/* The value of sample 'name' with the canonical label set 'labels' ("" for none; for one label,
 * exactly as rendered, e.g. code="200"). Returns true and *v, or false if there is none. */
bool prom_get(const struct prom_scrape *s, const char *name, const char *labels, double *v);

/* prom_get() or 'dflt' when absent. */
double prom_value(const struct prom_scrape *s, const char *name, const char *labels, double dflt);

#endif
