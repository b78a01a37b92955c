/* outcome: see outcome.h. */
#include "fetch/outcome.h"

#include <errno.h>

struct outcome outcome_of(int err, long status, bool aborted)
{
    struct outcome o = {.kind = OUTCOME_CANCELED, .health = OUTCOME_NO_VERDICT};
    if (aborted) {
        o.kind = err == -ETIMEDOUT ? OUTCOME_DEADLINE : OUTCOME_CANCELED;
        return o;
    }
    switch (err) {
    case 0:
        o.kind = OUTCOME_OK;
        o.health = OUTCOME_ALIVE;
        break;
    case FETCH_ESTATUS:
        o.kind = OUTCOME_STATUS;
        o.health = status >= 500 ? OUTCOME_FAILED : OUTCOME_ALIVE;
        o.retryable = status == 502 || status == 503 || status == 504;
        break;
    case FETCH_EUNREACH:
        o.kind = OUTCOME_UNREACHABLE;
        o.health = OUTCOME_FAILED;
        o.retryable = true;
        break;
    case FETCH_ETOOBIG:
        o.kind = OUTCOME_TOO_LARGE;
        o.health = OUTCOME_ALIVE;
        break;
    case -ETIMEDOUT:
        o.kind = OUTCOME_DEADLINE;
        break;
    default:
        break; /* a cause of a ctx, the engine stopping: canceled */
    }
    return o;
}

const char *outcome_name(enum outcome_kind k)
{
    static const char *const names[OUTCOME_KINDS] = {
        "ok", "upstream_status", "unreachable", "deadline", "canceled", "too_large"};
    return (unsigned)k < OUTCOME_KINDS ? names[k] : "canceled";
}
