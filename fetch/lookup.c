/* lookup: the default name lookup, getaddrinfo() turned into fetch's address list. */
#include "fetch/lookup.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

/* ---------------------------------------------------------------- the default lookup */

/* RFC 6761 6.4: names under "invalid." never resolve, and resolvers should say so at once
 * rather than ask a name server. */
static bool is_invalid_name(const char *host)
{
    size_t n = strlen(host);
    if (n > 0 && host[n - 1] == '.')
        n--;
    if (n == 7 && strncasecmp(host, "invalid", 7) == 0)
        return true;
    return n > 8 && strncasecmp(host + n - 8, ".invalid", 8) == 0;
}

int fetch_lookup_default(void *arg, const char *host, char *addrs, size_t size)
{
    (void)arg;
    if (is_invalid_name(host))
        return EAI_NONAME;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0)
        return rc;
    size_t len = 0;
    addrs[0] = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        char text[INET6_ADDRSTRLEN + 2];
        if (ai->ai_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)ai->ai_addr;
            inet_ntop(AF_INET, &a->sin_addr, text, sizeof(text));
        } else if (ai->ai_family == AF_INET6) {
            const struct sockaddr_in6 *a =
                (const struct sockaddr_in6 *)(const void *)ai->ai_addr;
            text[0] = '[';
            inet_ntop(AF_INET6, &a->sin6_addr, text + 1, sizeof(text) - 2);
            strcat(text, "]");
        } else {
            continue;
        }
        size_t tl = strlen(text);
        /* getaddrinfo() repeats an address once per socket type it could serve; keep one. */
        bool dup = false;
        for (const char *p = addrs; *p && !dup; p = strchr(p, ',') ? strchr(p, ',') + 1 : "")
            dup = strncmp(p, text, tl) == 0 && (p[tl] == ',' || p[tl] == 0);
        if (dup)
            continue;
        if (len + tl + 2 > size)
            break;
        if (len > 0)
            addrs[len++] = ',';
        memcpy(addrs + len, text, tl + 1);
        len += tl;
    }
    freeaddrinfo(res);
    return len > 0 ? 0 : EAI_NODATA;
}
