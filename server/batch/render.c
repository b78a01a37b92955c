/* render: error mapping and the buffer writer (see render.h). */
#include "server/batch/render.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch/fetch.h"
#include "server/batch/result.h"

void render_error(const struct render_limits *lim, const char *echo, const struct call_result *r,
                  struct render_error *e)
{
    const char *id = echo ? echo : "?";
    const char *detail = r->detail ? r->detail : "";
    e->upstream_status = false;
    e->status = 502;
    if (r->err == CALL_ERESPONSE) { /* the answer's own cap, not an attempt's ending */
        e->code = "upstream_too_large";
        snprintf(e->message, sizeof(e->message), "the response would exceed %zu bytes "
                 "(--max-response-bytes); it failed at id %s", lim->max_response_bytes, id);
        return;
    }
    switch (outcome_of(r->err, r->status, false).kind) {
    case OUTCOME_STATUS:
        e->code = "upstream_status";
        e->upstream_status = true;
        snprintf(e->message, sizeof(e->message), "upstream answered %ld for id %s", r->status, id);
        return;
    case OUTCOME_UNREACHABLE:
        e->code = "upstream_unreachable";
        snprintf(e->message, sizeof(e->message), "upstream unreachable for id %s: %s", id, detail);
        return;
    case OUTCOME_TOO_LARGE:
        e->code = "upstream_too_large";
        snprintf(e->message, sizeof(e->message), "upstream body for id %s exceeds %zu bytes "
                 "(--max-body)", id, lim->max_body);
        return;
    case OUTCOME_DEADLINE:
        e->status = 504;
        e->code = "deadline_exceeded";
        snprintf(e->message, sizeof(e->message), "deadline of %" PRId64 " ms exceeded%s%s",
                 lim->timeout_ms, echo ? " while fetching id " : "", echo ? echo : "");
        return;
    case OUTCOME_OK:
    case OUTCOME_CANCELED:
    case OUTCOME_KINDS:
        break;
    }
    /* Canceled: by shutdown (the client should go elsewhere), by a cancel, or for a cause of
     * the server's own. */
    e->status = 500;
    if (r->err == -ESHUTDOWN || r->err == FETCH_ESHUTDOWN) {
        e->status = 503;
        e->code = "overloaded";
        snprintf(e->message, sizeof(e->message),
                 "the server is shutting down; retry on another instance");
    } else if (r->err == -ECANCELED) {
        e->code = "canceled";
        snprintf(e->message, sizeof(e->message), "the fetch of id %s was canceled", id);
    } else {
        e->code = "internal";
        snprintf(e->message, sizeof(e->message), "internal error (%d)%s%s", r->err,
                 *detail ? ": " : "", detail);
    }
}

/* ---------------------------------------------------------------- the buffer writer */

/* The upstream body as a JSON value: spliced when it is JSON, else a JSON string. With
 * 'one_line' (NDJSON) a spliced value's line breaks become spaces: in valid JSON a raw CR or LF
 * can only be whitespace between tokens (inside strings they are escaped), so the value is the
 * same and the line stays one line. */
static void append_data(struct json_buf *o, struct call_result *r, bool one_line)
{
    if (r->valid < 0)
        r->valid = r->body && json_valid(r->body, r->len, &r->vstart, &r->vend);
    if (!r->valid) {
        json_append_string(o, r->body ? r->body : "", r->len);
        return;
    }
    const char *p = r->body + r->vstart, *end = r->body + r->vend;
    if (!one_line) {
        json_buf_append(o, p, (size_t)(end - p));
        return;
    }
    while (p < end) {
        const char *q = p;
        while (q < end && *q != '\n' && *q != '\r')
            q++;
        json_buf_append(o, p, (size_t)(q - p));
        if (q < end)
            json_buf_append_char(o, ' ');
        p = q < end ? q + 1 : q;
    }
}

/* The members of an error object after "code" and "message": ,"upstream_status":N. */
static void error_members(struct json_buf *o, const struct render_error *e,
                          const struct call_result *r)
{
    if (e->upstream_status)
        json_buf_printf(o, ",\"upstream_status\":%ld", r->status);
}

/* A position's members after "id": ,"status":N,"data":.. or ,"error":{..}. */
static void append_result(struct json_buf *o, const struct render_limits *lim, const char *echo,
                          const struct call_result *cr, bool one_line)
{
    struct call_result *r = (struct call_result *)(uintptr_t)cr; /* caches body validity */
    if (r->err == 0) {
        json_buf_printf(o, ",\"status\":%ld,\"data\":", r->status);
        append_data(o, r, one_line);
        return;
    }
    struct render_error e;
    render_error(lim, echo, r, &e);
    json_buf_append_str(o, ",\"error\":{\"code\":\"");
    json_buf_append_str(o, e.code);
    json_buf_append_str(o, "\",\"message\":");
    json_append_string(o, e.message, strlen(e.message));
    error_members(o, &e, r);
    json_buf_append_char(o, '}');
}

static void bw_begin(struct writer *w)
{
    struct buf_writer *bw = (struct buf_writer *)w;
    bw->status = 200;
    json_buf_append_str(&bw->out, "{\"results\":[");
}

static void bw_item(struct writer *w, size_t pos, const char *echo, const struct call_result *cr)
{
    struct buf_writer *bw = (struct buf_writer *)w;
    struct json_buf *o = &bw->out;
    json_buf_append_str(o, pos ? ",{\"id\":" : "{\"id\":");
    json_buf_append_str(o, echo);
    append_result(o, &w->lim, echo, cr, false);
    json_buf_append_char(o, '}');
    if (o->len > w->lim.max_response_bytes)
        bw->too_large = true;
}

static void bw_fail(struct writer *w, const char *echo, const struct call_result *r)
{
    struct buf_writer *bw = (struct buf_writer *)w;
    struct render_error e;
    render_error(&w->lim, echo, r, &e);
    json_buf_clear(&bw->out);
    struct json_buf extra;
    json_buf_init(&extra);
    if (echo) {
        json_buf_append_str(&extra, ",\"id\":");
        json_buf_append_str(&extra, echo);
        free(bw->fail_id);
        bw->fail_id = strdup(echo);
    }
    error_members(&extra, &e, r);
    json_error_doc(&bw->out, e.code, e.message, extra.data);
    if (json_buf_failed(&extra))
        bw->out.oom = true;
    json_buf_destroy(&extra);
    bw->status = e.status;
    bw->code = e.code;
}

static void bw_end(struct writer *w)
{
    struct buf_writer *bw = (struct buf_writer *)w;
    if (bw->code)
        return; /* an error document is complete as it is */
    json_buf_append_str(&bw->out, "]}\n");
    if (bw->too_large) {
        char msg[160];
        snprintf(msg, sizeof(msg), "the response would exceed %zu bytes (--max-response-bytes)",
                 w->lim.max_response_bytes);
        json_buf_clear(&bw->out);
        json_error_doc(&bw->out, "upstream_too_large", msg, NULL);
        bw->status = 502;
        bw->code = "upstream_too_large";
    }
}

static const struct writer_ops buf_ops = {bw_begin, bw_item, bw_fail, bw_end};

void buf_writer_init(struct buf_writer *bw, const struct render_limits *lim)
{
    memset(bw, 0, sizeof(*bw));
    bw->w.ops = &buf_ops;
    bw->w.lim = *lim;
    bw->w.fail_pos = SIZE_MAX;
    json_buf_init(&bw->out);
}

void buf_writer_destroy(struct buf_writer *bw)
{
    json_buf_destroy(&bw->out);
    free(bw->fail_id);
    bw->fail_id = NULL;
}

/* ---------------------------------------------------------------- the line writer (NDJSON) */

/* Hands the line built so far to the owner. */
static void lw_emit(struct line_writer *lw)
{
    if (json_buf_failed(&lw->line)) {
        lw->oom = true;
        lw->emit(lw->arg, NULL, 0); /* a line is lost: the owner must cut the stream */
    } else {
        lw->emit(lw->arg, lw->line.data, lw->line.len);
    }
    lw->sent += lw->line.len;
    json_buf_clear(&lw->line);
}

static void lw_begin(struct writer *w)
{
    (void)w; /* the 200 and its headers went out when the stream started */
}

static void lw_item(struct writer *w, size_t pos, const char *echo, const struct call_result *r)
{
    struct line_writer *lw = (struct line_writer *)w;
    if (lw->code)
        return;
    json_buf_printf(&lw->line, "{\"index\":%zu,\"id\":", pos);
    size_t head = lw->line.len;
    json_buf_append_str(&lw->line, echo);
    append_result(&lw->line, &w->lim, echo, r, true);
    json_buf_append_str(&lw->line, "}\n");
    if (r->err == 0 && lw->sent + lw->line.len > w->lim.max_response_bytes) {
        /* Past the cap (escaping grew a body): this position gets the cap's error instead. */
        static const struct call_result capped = {.err = CALL_ERESPONSE};
        lw->line.len = head;
        json_buf_append_str(&lw->line, echo);
        append_result(&lw->line, &w->lim, echo, &capped, true);
        json_buf_append_str(&lw->line, "}\n");
        r = &capped;
    }
    lw_emit(lw);
    if (r->err == 0)
        lw->results++;
    else
        lw->errors++;
}

static void lw_fail(struct writer *w, const char *echo, const struct call_result *r)
{
    struct line_writer *lw = (struct line_writer *)w;
    if (lw->code)
        return; /* the first error decides */
    struct render_error e;
    render_error(&w->lim, echo, r, &e);
    lw->code = e.code;
    lw->status = e.status;
    struct json_buf *o = &lw->line;
    if (echo && w->fail_pos != SIZE_MAX) {
        json_buf_printf(o, "{\"index\":%zu,\"id\":", w->fail_pos);
        json_buf_append_str(o, echo);
        append_result(o, &w->lim, echo, r, true);
        json_buf_append_str(o, "}\n");
        lw_emit(lw);
        free(lw->fail_id);
        lw->fail_id = strdup(echo);
    }
    json_buf_append_str(o, "{\"done\":true,\"error\":{\"code\":\"");
    json_buf_append_str(o, e.code);
    json_buf_append_str(o, "\",\"message\":");
    json_append_string(o, e.message, strlen(e.message));
    if (echo) {
        json_buf_append_str(o, ",\"id\":");
        json_buf_append_str(o, echo);
    }
    error_members(o, &e, r);
    json_buf_append_str(o, "}}\n");
    lw_emit(lw);
}

static void lw_end(struct writer *w)
{
    struct line_writer *lw = (struct line_writer *)w;
    if (lw->code)
        return; /* the fail line was the last */
    json_buf_printf(&lw->line, "{\"done\":true,\"results\":%u,\"errors\":%u}\n", lw->results,
                    lw->errors);
    lw_emit(lw);
}

static const struct writer_ops line_ops = {lw_begin, lw_item, lw_fail, lw_end};

void line_writer_init(struct line_writer *lw, const struct render_limits *lim,
                      void (*emit)(void *arg, const char *data, size_t len), void *arg)
{
    memset(lw, 0, sizeof(*lw));
    lw->w.ops = &line_ops;
    lw->w.lim = *lim;
    lw->emit = emit;
    lw->arg = arg;
    lw->w.fail_pos = SIZE_MAX;
    json_buf_init(&lw->line);
}

void line_writer_destroy(struct line_writer *lw)
{
    json_buf_destroy(&lw->line);
    free(lw->fail_id);
    lw->fail_id = NULL;
}
