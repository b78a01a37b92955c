/* stream: a batch's answer streamed as NDJSON lines (Accept: application/x-ndjson).
 *
 * stream_start() answers 200 at once and runs the batch; each position's line follows as it
 * completes, the done line last. The stream lives until both libmicrohttpd has dropped the
 * response and the batch is done; the request keeps a pointer to it only until its completion
 * (conn.c), which is before libmicrohttpd drops the response. See stream.c for the threads and
 * the lock order. */
#ifndef FANOUT_STREAM_H
#define FANOUT_STREAM_H

#include <microhttpd.h>
#include <stdbool.h>

struct req;
struct request;
struct stream;

/* Whether the client asked for NDJSON (an Accept naming application/x-ndjson). */
bool stream_wanted(struct MHD_Connection *conn);

/* Starts the batch for 'rq' (taken) with its answer streamed; on success r->stream is set.
 * Otherwise 'r' is answered with an error (500, or 503 overloaded when the fetch engine is
 * shutting down). Returns what the handler returns. On the request's worker. */
enum MHD_Result stream_start(struct req *r, struct request *rq);

/* The request is complete (on its worker): the socket leaves the disconnect watch before
 * libmicrohttpd closes it. Returns true when the last line had been written, with the line
 * writer's error code (NULL for none) in *code, for the log. */
bool stream_request_done(struct stream *st, const char **code);

#endif
