/* prom: strict Prometheus text-format parser for tests (rules in prom.h).
 *
 * One pass over the lines builds the families and samples and checks everything local to a line
 * (syntax, names, label escapes, values, HELP/TYPE before samples, contiguity, duplicates); a
 * second pass over each family checks what spans lines (HELP and TYPE both present, counter
 * names, histogram shape). Threads: none. */
#include "tests/prom.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Parser state for one call. */
struct parser {
    struct prom_scrape *out; /* what is being built */
    size_t line;             /* current line number, from 1 */
    char *err;               /* reason buffer */
    size_t errlen;           /* its size */
    size_t cur;              /* index of the current family, or SIZE_MAX */
    bool *has_help;          /* per family */
    bool *has_type;          /* per family */
    size_t cap_fam, cap_smp; /* allocated entries */
};

static int fail(struct parser *ps, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int fail(struct parser *ps, const char *fmt, ...)
{
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (ps->errlen)
        snprintf(ps->err, ps->errlen, "line %zu: %s", ps->line, msg);
    return -1;
}

static bool name_start(int c, bool metric)
{
    return isalpha(c) || c == '_' || (metric && c == ':');
}

static bool name_char(int c, bool metric)
{
    return isalnum(c) || c == '_' || (metric && c == ':');
}

/* Reads a metric (metric=true) or label name at *p (up to 'end') into buf. */
static bool read_name(const char **p, const char *end, bool metric, char *buf, size_t size)
{
    const char *s = *p;
    if (s >= end || !name_start((unsigned char)*s, metric))
        return false;
    size_t n = 0;
    while (s < end && name_char((unsigned char)*s, metric)) {
        if (n + 1 >= size)
            return false;
        buf[n++] = *s++;
    }
    buf[n] = '\0';
    *p = s;
    return true;
}

/* A Go-style float: [+-]?(d+(.d*)?|.d+)([eE][+-]?d+)?, or +Inf, -Inf, NaN exactly. */
static bool read_value(const char *s, size_t n, double *v)
{
    char buf[64];
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (!strcmp(buf, "+Inf")) {
        *v = INFINITY;
        return true;
    }
    if (!strcmp(buf, "-Inf")) {
        *v = -INFINITY;
        return true;
    }
    if (!strcmp(buf, "NaN")) {
        *v = NAN;
        return true;
    }
    size_t i = 0, digits = 0;
    if (buf[i] == '+' || buf[i] == '-')
        i++;
    while (isdigit((unsigned char)buf[i]))
        i++, digits++;
    if (buf[i] == '.') {
        i++;
        while (isdigit((unsigned char)buf[i]))
            i++, digits++;
    }
    if (digits == 0)
        return false;
    if (buf[i] == 'e' || buf[i] == 'E') {
        i++;
        if (buf[i] == '+' || buf[i] == '-')
            i++;
        if (!isdigit((unsigned char)buf[i]))
            return false;
        while (isdigit((unsigned char)buf[i]))
            i++;
    }
    if (buf[i] != '\0')
        return false;
    *v = strtod(buf, NULL);
    return true;
}

/* One label pair as on the wire, for sorting. */
struct pair {
    char name[PROM_NAME_MAX];
    char text[PROM_LABELS_MAX]; /* name="escaped value" */
};

static int pair_cmp(const void *a, const void *b)
{
    return strcmp(((const struct pair *)a)->name, ((const struct pair *)b)->name);
}

/* Joins the pairs, skipping the one named 'skip' (or none). Returns false if too long. */
static bool join_pairs(const struct pair *pr, size_t n, const char *skip, char *out, size_t size)
{
    size_t len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (skip && !strcmp(pr[i].name, skip))
            continue;
        int w = snprintf(out + len, size - len, "%s%s", len ? "," : "", pr[i].text);
        if (w < 0 || (size_t)w >= size - len)
            return false;
        len += (size_t)w;
    }
    return true;
}

#define MAX_PAIRS 16

/* Parses "{...}" at *p into sorted pairs. */
static int read_labels(struct parser *ps, const char **p, const char *end, struct pair *pr,
                       size_t *npr)
{
    const char *s = *p + 1; /* past '{' */
    *npr = 0;
    for (;;) {
        if (s < end && *s == '}') {
            s++;
            break;
        }
        if (*npr == MAX_PAIRS)
            return fail(ps, "too many labels");
        struct pair *q = &pr[*npr];
        if (!read_name(&s, end, false, q->name, sizeof(q->name)))
            return fail(ps, "bad label name");
        if (!strncmp(q->name, "__", 2))
            return fail(ps, "reserved label name %s", q->name);
        for (size_t i = 0; i < *npr; i++)
            if (!strcmp(pr[i].name, q->name))
                return fail(ps, "label %s given twice", q->name);
        if (s + 1 >= end || s[0] != '=' || s[1] != '"')
            return fail(ps, "label %s: want =\"value\"", q->name);
        s += 2;
        const char *v = s;
        while (s < end && *s != '"') {
            if (*s == '\\') {
                if (s + 1 >= end || (s[1] != '\\' && s[1] != '"' && s[1] != 'n'))
                    return fail(ps, "label %s: bad escape", q->name);
                s++;
            }
            s++;
        }
        if (s >= end)
            return fail(ps, "label %s: unterminated value", q->name);
        int w = snprintf(q->text, sizeof(q->text), "%s=\"%.*s\"", q->name, (int)(s - v), v);
        if (w < 0 || (size_t)w >= sizeof(q->text))
            return fail(ps, "label %s: value too long", q->name);
        s++; /* closing quote */
        (*npr)++;
        if (s < end && *s == ',') {
            s++;
            continue;
        }
        if (s < end && *s == '}') {
            s++;
            break;
        }
        return fail(ps, "labels: want ',' or '}'");
    }
    qsort(pr, *npr, sizeof(*pr), pair_cmp);
    *p = s;
    return 0;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

static size_t find_family(const struct prom_scrape *s, const char *name)
{
    for (size_t i = 0; i < s->nfam; i++)
        if (!strcmp(s->fam[i].name, name))
            return i;
    return SIZE_MAX;
}

/* Unescapes HELP text (\\ and \n) into out; false on another escape. */
static bool unescape_help(const char *s, size_t n, char *out, size_t size)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\\') {
            if (i + 1 >= n || (s[i + 1] != '\\' && s[i + 1] != 'n'))
                return false;
            c = s[++i] == 'n' ? '\n' : '\\';
        }
        if (k + 1 < size)
            out[k++] = c;
    }
    out[k] = '\0';
    return true;
}

static int comment_line(struct parser *ps, const char *s, const char *end, const char *prefix)
{
    bool help = (size_t)(end - s) > 7 && !strncmp(s, "# HELP ", 7);
    bool type = (size_t)(end - s) > 7 && !strncmp(s, "# TYPE ", 7);
    if (!help && !type)
        return fail(ps, "a comment that is neither # HELP nor # TYPE");
    s += 7;
    char name[PROM_NAME_MAX];
    if (!read_name(&s, end, true, name, sizeof(name)))
        return fail(ps, "bad metric name after # %s", help ? "HELP" : "TYPE");
    if (s >= end || *s != ' ' || s + 1 >= end)
        return fail(ps, "# %s %s: want a space and text", help ? "HELP" : "TYPE", name);
    s++;
    struct prom_scrape *o = ps->out;
    size_t f = find_family(o, name);
    if (f == SIZE_MAX) {
        if (prefix && strncmp(name, prefix, strlen(prefix)) != 0)
            return fail(ps, "family %s lacks the prefix %s", name, prefix);
        if (o->nfam == ps->cap_fam) {
            size_t cap = ps->cap_fam ? 2 * ps->cap_fam : 16;
            struct prom_family *nf = realloc(o->fam, cap * sizeof(*nf));
            bool *nh = realloc(ps->has_help, cap * sizeof(*nh));
            if (nh)
                ps->has_help = nh;
            bool *nt = realloc(ps->has_type, cap * sizeof(*nt));
            if (nt)
                ps->has_type = nt;
            if (nf)
                o->fam = nf;
            if (!nf || !nh || !nt)
                return fail(ps, "out of memory");
            ps->cap_fam = cap;
        }
        f = o->nfam++;
        memset(&o->fam[f], 0, sizeof(o->fam[f]));
        snprintf(o->fam[f].name, sizeof(o->fam[f].name), "%s", name);
        o->fam[f].first = o->nsmp;
        ps->has_help[f] = ps->has_type[f] = false;
        ps->cur = f;
    } else if (f != ps->cur) {
        return fail(ps, "family %s continues after another family's lines", name);
    } else if (o->fam[f].count > 0) {
        return fail(ps, "# %s for %s after its samples", help ? "HELP" : "TYPE", name);
    }
    struct prom_family *fa = &o->fam[f];
    if (help) {
        if (ps->has_help[f])
            return fail(ps, "second # HELP for %s", name);
        if (!unescape_help(s, (size_t)(end - s), fa->help, sizeof(fa->help)))
            return fail(ps, "# HELP %s: bad escape", name);
        ps->has_help[f] = true;
    } else {
        if (ps->has_type[f])
            return fail(ps, "second # TYPE for %s", name);
        static const char *const types[] = {"counter", "gauge", "histogram", "summary", "untyped"};
        size_t n = (size_t)(end - s), i;
        for (i = 0; i < sizeof(types) / sizeof(types[0]); i++)
            if (strlen(types[i]) == n && !strncmp(s, types[i], n))
                break;
        if (i == sizeof(types) / sizeof(types[0]))
            return fail(ps, "# TYPE %s: unknown type \"%.*s\"", name, (int)n, s);
        snprintf(fa->type, sizeof(fa->type), "%s", types[i]);
        ps->has_type[f] = true;
    }
    return 0;
}

static int sample_line(struct parser *ps, const char *s, const char *end)
{
    struct prom_scrape *o = ps->out;
    struct prom_sample sm;
    memset(&sm, 0, sizeof(sm));
    if (!read_name(&s, end, true, sm.name, sizeof(sm.name)))
        return fail(ps, "bad metric name");
    struct pair pr[MAX_PAIRS];
    size_t npr = 0;
    if (s < end && *s == '{' && read_labels(ps, &s, end, pr, &npr) != 0)
        return -1;
    if (!join_pairs(pr, npr, NULL, sm.labels, sizeof(sm.labels)))
        return fail(ps, "labels too long");
    if (s >= end || *s != ' ')
        return fail(ps, "%s: want one space before the value", sm.name);
    s++;
    const char *v = s;
    while (s < end && *s != ' ')
        s++;
    if (!read_value(v, (size_t)(s - v), &sm.value))
        return fail(ps, "%s: bad value \"%.*s\"", sm.name, (int)(s - v), v);
    if (s < end) { /* a timestamp: an integer in ms */
        s++;
        const char *t = s;
        if (s < end && *s == '-')
            s++;
        while (s < end && isdigit((unsigned char)*s))
            s++;
        if (s == t || s != end || !isdigit((unsigned char)s[-1]))
            return fail(ps, "%s: bad timestamp or trailing text", sm.name);
    }

    if (ps->cur == SIZE_MAX)
        return fail(ps, "sample %s before any # HELP/# TYPE", sm.name);
    struct prom_family *fa = &o->fam[ps->cur];
    if (!ps->has_help[ps->cur] || !ps->has_type[ps->cur])
        return fail(ps, "sample %s: its family %s lacks %s before its samples", sm.name, fa->name,
                    ps->has_help[ps->cur] ? "# TYPE" : "# HELP");
    char want[PROM_NAME_MAX + 8];
    const char *sub = NULL;
    bool hist = !strcmp(fa->type, "histogram"), summ = !strcmp(fa->type, "summary");
    if (!strcmp(sm.name, fa->name))
        sub = "";
    static const char *const subs[] = {"_bucket", "_sum", "_count"};
    for (size_t i = 0; !sub && (hist || summ) && i < 3; i++) {
        snprintf(want, sizeof(want), "%s%s", fa->name, subs[i]);
        if (!strcmp(sm.name, want))
            sub = subs[i];
    }
    if (!sub || (hist && !*sub) || (summ && !strcmp(sub, "_bucket")))
        return fail(ps, "sample %s does not belong to family %s (%s)", sm.name, fa->name, fa->type);
    const char *special = hist ? "le" : summ ? "quantile" : NULL;
    bool has_special = false;
    for (size_t i = 0; i < npr; i++)
        if (special && !strcmp(pr[i].name, special))
            has_special = true;
    bool needs = (hist && !strcmp(sub, "_bucket")) || (summ && !*sub);
    if (needs != has_special)
        return fail(ps, "%s: label %s %s", sm.name, special, needs ? "missing" : "not allowed");
    join_pairs(pr, npr, special, sm.key, sizeof(sm.key));
    if (!strcmp(fa->type, "counter") && !(sm.value >= 0))
        return fail(ps, "counter %s is negative or NaN", sm.name);
    for (size_t i = fa->first; i < fa->first + fa->count; i++)
        if (!strcmp(o->smp[i].name, sm.name) && !strcmp(o->smp[i].labels, sm.labels))
            return fail(ps, "series %s{%s} appears twice", sm.name, sm.labels);
    if (o->nsmp == ps->cap_smp) {
        size_t cap = ps->cap_smp ? 2 * ps->cap_smp : 64;
        struct prom_sample *ns = realloc(o->smp, cap * sizeof(*ns));
        if (!ns)
            return fail(ps, "out of memory");
        o->smp = ns;
        ps->cap_smp = cap;
    }
    sm.family = ps->cur;
    o->smp[o->nsmp++] = sm;
    fa->count++;
    return 0;
}

/* The bound of a bucket sample (its le label), or false. */
static bool bucket_le(const struct prom_sample *sm, double *le)
{
    const char *p = strstr(sm->labels, "le=\"");
    while (p && p != sm->labels && p[-1] != ',')
        p = strstr(p + 1, "le=\"");
    if (!p)
        return false;
    p += 4;
    const char *q = strchr(p, '"');
    return q && read_value(p, (size_t)(q - p), le);
}

static int check_histogram(struct parser *ps, const struct prom_family *fa)
{
    const struct prom_scrape *o = ps->out;
    char bucket[PROM_NAME_MAX + 8], sum[PROM_NAME_MAX + 8], count[PROM_NAME_MAX + 8];
    snprintf(bucket, sizeof(bucket), "%s_bucket", fa->name);
    snprintf(sum, sizeof(sum), "%s_sum", fa->name);
    snprintf(count, sizeof(count), "%s_count", fa->name);
    for (size_t i = fa->first; i < fa->first + fa->count; i++) {
        const struct prom_sample *a = &o->smp[i];
        bool seen = false; /* each series key is checked at its first sample */
        for (size_t j = fa->first; j < i && !seen; j++)
            seen = !strcmp(o->smp[j].key, a->key);
        if (seen)
            continue;
        double prev_le = -INFINITY, prev_n = 0, inf_n = -1, sum_v = 0, count_v = -1;
        size_t nb = 0;
        bool has_sum = false;
        for (size_t j = i; j < fa->first + fa->count; j++) {
            const struct prom_sample *b = &o->smp[j];
            if (strcmp(b->key, a->key) != 0)
                continue;
            if (!strcmp(b->name, bucket)) {
                double le;
                if (!bucket_le(b, &le) || isnan(le))
                    return fail(ps, "%s{%s}: bad le", bucket, b->labels);
                if (nb > 0 && !(le > prev_le))
                    return fail(ps, "%s{%s}: le not increasing", bucket, b->labels);
                if (b->value < prev_n)
                    return fail(ps, "%s{%s}: buckets not cumulative (%g after %g)", bucket,
                                b->labels, b->value, prev_n);
                if (!(b->value >= 0 && b->value < 9007199254740992.0) ||
                    b->value != (double)(int64_t)b->value)
                    return fail(ps, "%s{%s}: count is not a whole number", bucket, b->labels);
                if (inf_n >= 0)
                    return fail(ps, "%s{%s}: bucket after le=\"+Inf\"", bucket, b->labels);
                if (isinf(le) && le > 0)
                    inf_n = b->value;
                prev_le = le;
                prev_n = b->value;
                nb++;
            } else if (!strcmp(b->name, sum)) {
                has_sum = true;
                sum_v = b->value;
            } else if (!strcmp(b->name, count)) {
                count_v = b->value;
            }
        }
        (void)sum_v;
        const char *k = a->key[0] ? a->key : "no labels";
        if (nb == 0)
            return fail(ps, "histogram %s{%s} has no buckets", fa->name, k);
        if (inf_n < 0)
            return fail(ps, "histogram %s{%s}: the last bucket is not le=\"+Inf\"", fa->name, k);
        if (!has_sum)
            return fail(ps, "histogram %s{%s} has no _sum", fa->name, k);
        if (count_v < 0)
            return fail(ps, "histogram %s{%s} has no _count", fa->name, k);
        if (count_v != inf_n)
            return fail(ps, "histogram %s{%s}: _count %g != +Inf bucket %g", fa->name, k, count_v,
                        inf_n);
    }
    return 0;
}

static int check_families(struct parser *ps)
{
    for (size_t f = 0; f < ps->out->nfam; f++) {
        const struct prom_family *fa = &ps->out->fam[f];
        if (!ps->has_help[f] || !ps->has_type[f])
            return fail(ps, "family %s lacks %s", fa->name, ps->has_help[f] ? "# TYPE" : "# HELP");
        if (!strcmp(fa->type, "counter") && !ends_with(fa->name, "_total"))
            return fail(ps, "counter %s does not end in _total", fa->name);
        if (!strcmp(fa->type, "histogram") && check_histogram(ps, fa) != 0)
            return -1;
    }
    return 0;
}

int prom_parse(const char *text, size_t len, const char *prefix, struct prom_scrape *out, char *err,
               size_t errlen)
{
    memset(out, 0, sizeof(*out));
    struct parser ps = {.out = out, .err = err, .errlen = errlen, .cur = SIZE_MAX};
    int rc = 0;
    if (len == 0) {
        rc = fail(&ps, "empty exposition");
        goto out;
    }
    if (text[len - 1] != '\n') {
        ps.line = 0;
        rc = fail(&ps, "the text does not end with a newline");
        goto out;
    }
    for (const char *p = text, *end = text + len; p < end && rc == 0;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        ps.line++;
        if (nl == p)
            rc = fail(&ps, "empty line");
        else if (memchr(p, '\0', (size_t)(nl - p)) || memchr(p, '\r', (size_t)(nl - p)))
            rc = fail(&ps, "NUL or CR in a line");
        else if (*p == '#')
            rc = comment_line(&ps, p, nl, prefix);
        else
            rc = sample_line(&ps, p, nl);
        p = nl + 1;
    }
    if (rc == 0) {
        ps.line++;
        rc = check_families(&ps);
    }
out:
    free(ps.has_help);
    free(ps.has_type);
    if (rc != 0)
        prom_free(out);
    return rc;
}

void prom_free(struct prom_scrape *s)
{
    free(s->fam);
    free(s->smp);
    memset(s, 0, sizeof(*s));
}

const struct prom_family *prom_family(const struct prom_scrape *s, const char *name)
{
    size_t f = find_family(s, name);
    return f == SIZE_MAX ? NULL : &s->fam[f];
}

bool prom_get(const struct prom_scrape *s, const char *name, const char *labels, double *v)
{
    for (size_t i = 0; i < s->nsmp; i++)
        if (!strcmp(s->smp[i].name, name) && !strcmp(s->smp[i].labels, labels)) {
            *v = s->smp[i].value;
            return true;
        }
    return false;
}

double prom_value(const struct prom_scrape *s, const char *name, const char *labels, double dflt)
{
    double v;
    return prom_get(s, name, labels, &v) ? v : dflt;
}
