/* admit: admission of batch requests, the two counts it keeps, and refusals (503 overloaded).
 *
 * A batch is admitted when fewer than --max-requests are in flight, the server is not draining
 * and --max-memory has room for it. Admission raises two counts: 'active' (struct srv), which
 * falls when libmicrohttpd reports the request complete and which the drain waits on, and the
 * fanout_requests_in_flight gauge, which falls as soon as the answer is queued.
 *
 * Every answer coded "overloaded" goes through the admit_reject functions: one for a refusal
 * decided in the wing (admission, --max-memory while a body arrives, the fetch engine shutting
 * down as a batch starts), one for a batch whose own rendered answer is the refusal (ended by
 * shutdown), one for a stream that ended with the refusal as its last line. Each counts the
 * request once in fanout_admission_rejections_total, when it is refused; its status is counted
 * at completion with every other answer (conn.c).
 *
 * Threads: every function runs on the request's libmicrohttpd worker. */
#ifndef FANOUT_ADMIT_H
#define FANOUT_ADMIT_H

#include <microhttpd.h>
#include <stdbool.h>
#include <stddef.h>

struct req;

/* Admits batch 'r' (true), or refuses it through admit_reject() (false; r->answered tells
 * whether the refusal could be queued). */
bool admit(struct req *r);

/* The answer of 'r' is queued, or will never be: it leaves fanout_requests_in_flight (once). */
void admit_leave_gauge(struct req *r);

/* 'r' completed: it leaves the gauge if still in it and, if admitted, 'active' (waking the
 * drain when it was the last). */
void admit_release(struct req *r);

/* Refuses 'r' 503 overloaded with the message 'why' (conn_error(): queued, or on the socket
 * when its body was cut off). */
enum MHD_Result admit_reject(struct req *r, const char *why);

/* Answers 'r' with its batch's own refusal 'body' (malloc'd, taken; 503 overloaded, rendered
 * by render.h), counted in --max-memory while held. */
enum MHD_Result admit_reject_rendered(struct req *r, char *body, size_t len);

/* The stream of 'r' (answered 200 when it started) ended with the overloaded line: nothing is
 * left to send; counted. */
void admit_reject_streamed(struct req *r);

#endif
