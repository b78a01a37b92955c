/* Tests for server/config.h in process: config_parse() over flags and FANOUT_* variables
 * (defaults, precedence, actions, bounds, the checks of the whole, every refusal naming its
 * flag or variable), --help beside the effective JSON, config_split_upstreams() and
 * config_resolve_listen(). The process-level behaviour (exit codes, --check-config's output)
 * is in test_ops. */
#include <CUnit/CUnit.h>
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "fetch/fetch.h"
#include "server/config.h"
#include "tests/support.h"

extern char **environ;

static double num(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

static const char *str(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* Runs config_parse on "fanout <args...>" with the FANOUT_* variables in 'env' set for the call
 * (and every other FANOUT_* variable unset). */
static int parse(struct srv_config *c, const char *const *args, const char *const *env,
                 enum config_action *act, char *err, size_t errlen)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = "fanout";
    for (size_t i = 0; args && args[i] && argc < 31; i++)
        argv[argc++] = (char *)(uintptr_t)args[i];
    argv[argc] = NULL;
    /* Unset what the process environment may hold, then set the case's variables. */
    for (;;) {
        char name[128] = "";
        for (char **e = environ; *e; e++)
            if (!strncmp(*e, "FANOUT_", 7) && strncmp(*e, "FANOUT_BIN=", 11) != 0 &&
                strncmp(*e, "FANOUT_STRESS=", 14) != 0 && strncmp(*e, "FANOUT_SKIP_", 12) != 0 &&
                strncmp(*e, "FANOUT_TEST_MULT=", 17) != 0) {
                size_t k = strcspn(*e, "=");
                snprintf(name, sizeof(name), "%.*s", (int)k, *e);
                break;
            }
        if (!name[0])
            break;
        unsetenv(name);
    }
    for (size_t i = 0; env && env[i]; i++) {
        char name[128];
        size_t k = strcspn(env[i], "=");
        snprintf(name, sizeof(name), "%.*s", (int)k, env[i]);
        setenv(name, env[i] + k + 1, 1);
    }
    config_defaults(c);
    err[0] = '\0';
    int rc = config_parse(c, argc, argv, act, err, errlen);
    for (size_t i = 0; env && env[i]; i++) {
        char name[128];
        snprintf(name, sizeof(name), "%.*s", (int)strcspn(env[i], "="), env[i]);
        unsetenv(name);
    }
    return rc;
}

#define A(...) ((const char *const[]){__VA_ARGS__, NULL})

/* Several upstreams: --upstream repeats, FANOUT_UPSTREAM is a list, the flags' list replaces
 * the variable's; the policy, ejection, hedging and retry settings and their errors. */
static void test_config_upstreams_and_resilience(void)
{
    struct srv_config c;
    enum config_action act;
    char err[512];
    CU_ASSERT_EQUAL(parse(&c, A("--upstream", "http://a:1/i/{id}", "--upstream",
                                "http://b:2/i/{id}"),
                          A("FANOUT_UPSTREAM=http://x:1/{id}"), &act, err, sizeof(err)),
                    0);
    CU_ASSERT_STRING_EQUAL(c.upstream, "http://a:1/i/{id}\nhttp://b:2/i/{id}");
    CU_ASSERT_EQUAL(parse(&c, NULL, A("FANOUT_UPSTREAM=http://a:1/{id}, http://b:1/{id} ,"
                                      "http://c:1/{id}"),
                          &act, err, sizeof(err)),
                    0);
    CU_ASSERT_STRING_EQUAL(c.upstream, "http://a:1/{id}\nhttp://b:1/{id}\nhttp://c:1/{id}");
    char list[sizeof(c.upstream)];
    memcpy(list, c.upstream, sizeof(list));
    const char *t[8];
    CU_ASSERT_EQUAL(config_split_upstreams(list, t, 8), 3);
    CU_ASSERT_STRING_EQUAL(t[2], "http://c:1/{id}");
    /* Defaults. */
    CU_ASSERT_EQUAL(c.upstream_policy, UPSTREAM_REPLICAS);
    CU_ASSERT_EQUAL(c.eject_after, 5);
    CU_ASSERT_EQUAL(c.eject_ms, 30000);
    CU_ASSERT_EQUAL(c.max_ejected_pct, 50);
    CU_ASSERT_EQUAL(c.hedge_after_ms, 0);
    CU_ASSERT_FALSE(c.hedge_auto);
    CU_ASSERT_EQUAL(c.hedge_budget_pct, 5);
    CU_ASSERT_EQUAL(c.retries, 1);
    CU_ASSERT_EQUAL(c.retry_budget_pct, 20);
    CU_ASSERT_TRUE(c.coalesce);
    CU_ASSERT_EQUAL(parse(&c, A("--demo", "--coalesce", "off"), NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT_FALSE(c.coalesce);
    CU_ASSERT_EQUAL(parse(&c, A("--demo", "--upstream-policy", "shards", "--hedge-after-ms",
                                "auto", "--eject-after", "0", "--retries", "3",
                                "--hedge-budget-pct", "10", "--retry-budget-pct", "50"),
                          NULL, &act, err, sizeof(err)),
                    0);
    CU_ASSERT_EQUAL(c.upstream_policy, UPSTREAM_SHARDS);
    CU_ASSERT_TRUE(c.hedge_auto);
    CU_ASSERT_EQUAL(c.eject_after, 0);
    CU_ASSERT_EQUAL(c.retries, 3);
    CU_ASSERT_EQUAL(c.hedge_budget_pct, 10);
    CU_ASSERT_EQUAL(c.retry_budget_pct, 50);
    CU_ASSERT_EQUAL(parse(&c, A("--demo", "--hedge-after-ms", "15"), NULL, &act, err, sizeof(err)),
                    0);
    CU_ASSERT_FALSE(c.hedge_auto);
    CU_ASSERT_EQUAL(c.hedge_after_ms, 15);
    /* Errors, each naming its flag. */
    static const struct {
        const char *args[6];
        const char *env;
        const char *want;
    } bad[] = {
        {{"--upstream", "http://a:1/{id}", "--upstream", "http://a:1/{id}"}, NULL, "given twice"},
        {{"--upstream", "http://a:1/{id}", "--upstream", "ftp://b/{id}"}, NULL, "ftp://b/{id}"},
        {{NULL}, "FANOUT_UPSTREAM= , ", "FANOUT_UPSTREAM"},
        {{"--demo", "--upstream-policy", "ring"}, NULL, "--upstream-policy"},
        {{"--demo", "--hedge-after-ms", "soon"}, NULL, "--hedge-after-ms"},
        {{"--demo", "--hedge-after-ms", "-1"}, NULL, "--hedge-after-ms"},
        {{"--demo", "--retries", "11"}, NULL, "--retries"},
        {{"--demo", "--max-ejected-pct", "101"}, NULL, "--max-ejected-pct"},
        {{"--demo", "--hedge-budget-pct", "101"}, NULL, "--hedge-budget-pct"},
        {{"--demo", "--coalesce", "sometimes"}, NULL, "want on or off"},
        {{"--demo", "--eject-ms", "5000", "--eject-max-ms", "1000"}, NULL, "--eject-max-ms"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *env[] = {bad[i].env, NULL};
        int rc = parse(&c, bad[i].args, bad[i].env ? env : NULL, &act, err, sizeof(err));
        CU_ASSERT_EQUAL(rc, -EINVAL);
        CU_ASSERT(strstr(err, bad[i].want) != NULL);
        if (rc != -EINVAL || !strstr(err, bad[i].want))
            fprintf(stderr, "\n  case %zu: rc %d, \"%s\"\n", i, rc, err);
    }
    /* 65 upstreams is one too many. */
    char env65[65 * 24 + 32] = "FANOUT_UPSTREAM=";
    for (int i = 0; i < 65; i++) {
        char one[32];
        snprintf(one, sizeof(one), "%shttp://h%d/{id}", i ? "," : "", i);
        strcat(env65, one);
    }
    const char *e65[] = {env65, NULL};
    CU_ASSERT_EQUAL(parse(&c, NULL, e65, &act, err, sizeof(err)), -EINVAL);
    CU_ASSERT(strstr(err, "64") != NULL);
}

static void test_config_values_and_precedence(void)
{
    struct srv_config c;
    enum config_action act;
    char err[512];
    CU_ASSERT_EQUAL(parse(&c, A("--demo"), NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(act, CONFIG_RUN);
    CU_ASSERT_EQUAL(c.limit, 32);
    CU_ASSERT_EQUAL(c.max_conns, 512);
    CU_ASSERT_EQUAL(c.max_batch, 1000);
    CU_ASSERT_EQUAL(c.max_requests, 1024);
    CU_ASSERT_EQUAL(c.timeout_ms, 5000);
    CU_ASSERT_EQUAL(c.max_timeout_ms, 30000);
    CU_ASSERT_EQUAL(c.max_body, 1u << 20);
    CU_ASSERT_EQUAL(c.max_request_bytes, 1u << 20);
    CU_ASSERT_EQUAL(c.drain_ms, 10000);
    CU_ASSERT_EQUAL(c.log_level, LOG_INFO);
    CU_ASSERT_STRING_EQUAL(c.listen_host, "0.0.0.0");
    CU_ASSERT_EQUAL(c.listen_port, 8080);
    CU_ASSERT(c.http_threads >= 1 && c.fetch_threads >= 1);

    /* Environment applies; flags win over it; both --flag V and --flag=V work. */
    CU_ASSERT_EQUAL(parse(&c, A("--demo", "--limit", "9", "--drain-ms=250", "--listen", "[::1]:0"),
                          A("FANOUT_LIMIT=4", "FANOUT_MAX_BATCH=77", "FANOUT_DRAIN_MS=1",
                            "FANOUT_DEMO=yes", "FANOUT_MAX_REQUEST_BYTES=64KiB"),
                          &act, err, sizeof(err)),
                    0);
    CU_ASSERT_EQUAL(c.limit, 9);
    CU_ASSERT_EQUAL(c.drain_ms, 250);
    CU_ASSERT_EQUAL(c.max_batch, 77);
    CU_ASSERT(c.demo);
    CU_ASSERT_EQUAL(c.max_request_bytes, 65536);
    CU_ASSERT_STRING_EQUAL(c.listen_host, "::1");
    CU_ASSERT_EQUAL(c.listen_port, 0);

    /* The last of a repeated flag wins; booleans take =false. */
    CU_ASSERT_EQUAL(parse(&c, A("--demo", "--limit", "3", "--limit", "6", "--h2c", "--h2c=false"),
                          NULL, &act, err, sizeof(err)),
                    0);
    CU_ASSERT_EQUAL(c.limit, 6);
    CU_ASSERT(!c.h2c);

    /* --h2c (here from the environment) is refused, naming it, where this libcurl cannot
     * serve it (before 8.0.0 reused h2c connections break). */
    int rc = parse(&c, A("--demo"), A("FANOUT_H2C=yes"), &act, err, sizeof(err));
    if (fetch_h2c_supported()) {
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(c.h2c);
    } else {
        CU_ASSERT_EQUAL(rc, -EINVAL);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "--h2c"));
    }

    /* --demo and --upstream: a flag beats the other one's variable; two flags conflict. */
    CU_ASSERT_EQUAL(
        parse(&c, A("--demo"), A("FANOUT_UPSTREAM=http://h/{id}"), &act, err, sizeof(err)), 0);
    CU_ASSERT(c.demo && c.upstream[0] == '\0');
    CU_ASSERT_EQUAL(
        parse(&c, A("--upstream", "http://h/{id}"), A("FANOUT_DEMO=1"), &act, err, sizeof(err)), 0);
    CU_ASSERT(!c.demo && !strcmp(c.upstream, "http://h/{id}"));
    CU_ASSERT_EQUAL(
        parse(&c, A("--upstream", "http://h/{id}", "--demo"), NULL, &act, err, sizeof(err)),
        -EINVAL);
    CU_ASSERT(strstr(err, "--demo") && strstr(err, "--upstream"));
    CU_ASSERT_EQUAL(parse(&c, NULL, A("FANOUT_UPSTREAM=http://h/{id}", "FANOUT_DEMO=true"), &act,
                          err, sizeof(err)),
                    -EINVAL);

    /* Actions: --help and --version win over everything, even a bad environment. */
    CU_ASSERT_EQUAL(
        parse(&c, A("--limit", "0", "--help"), A("FANOUT_LIMIT=x"), &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(act, CONFIG_HELP);
    CU_ASSERT_EQUAL(parse(&c, A("-h"), NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(act, CONFIG_HELP);
    CU_ASSERT_EQUAL(parse(&c, A("--version"), A("FANOUT_LIMIT=x"), &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(act, CONFIG_VERSION);
    CU_ASSERT_EQUAL(parse(&c, A("--check-config", "--demo"), NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(act, CONFIG_CHECK);
    /* --check-config still validates. */
    CU_ASSERT_EQUAL(
        parse(&c, A("--check-config", "--demo", "--limit", "0"), NULL, &act, err, sizeof(err)),
        -EINVAL);
}

static void test_config_rejects_bad_values(void)
{
    static const struct {
        const char *args[6];
        const char *env[2];
        const char *name; /* the flag or variable the message must name */
    } bad[] = {
        {{"--demo", "--bogus"}, {NULL}, "--bogus"},
        {{"--demo", "--limit", "0"}, {NULL}, "--limit"},
        {{"--demo", "--limit", "abc"}, {NULL}, "--limit"},
        {{"--demo", "--limit", "-3"}, {NULL}, "--limit"},
        {{"--demo", "--limit", "100001"}, {NULL}, "--limit"},
        {{"--demo", "--limit", "12abc"}, {NULL}, "--limit"},
        {{"--demo", "--limit", ""}, {NULL}, "--limit"},
        {{"--demo", "--limit"}, {NULL}, "--limit"},
        {{"--demo"}, {"FANOUT_LIMIT=-3"}, "FANOUT_LIMIT"},
        {{"--demo"}, {"FANOUT_LIMIT=-3"}, "--limit"},
        {{"--demo"}, {"FANOUT_MAX_BODY=1TiB"}, "FANOUT_MAX_BODY"},
        {{"--demo", "--listen", "nonsense"}, {NULL}, "--listen"},
        {{"--demo", "--listen", ":8080"}, {NULL}, "--listen"},
        {{"--demo", "--listen", "host:"}, {NULL}, "--listen"},
        {{"--demo", "--listen", "host:65536"}, {NULL}, "--listen"},
        {{"--upstream", "http://h/items/"}, {NULL}, "--upstream"},
        {{"--upstream", "ftp://h/{id}"}, {NULL}, "--upstream"},
        {{"--upstream", "http://h/{id}?q={id}"}, {NULL}, "--upstream"},
        {{"--upstream", "http://{id}/x"}, {NULL}, "--upstream"},
        {{NULL}, {"FANOUT_UPSTREAM=http://h/no-id"}, "--upstream"},
        {{NULL}, {NULL}, "--upstream"},
        {{"--demo", "--timeout-ms", "40000"}, {NULL}, "--timeout-ms"},
        {{"--demo", "--timeout-ms", "0"}, {NULL}, "--timeout-ms"},
        {{"--demo", "--timeout-ms", "200", "--max-timeout-ms", "100"}, {NULL}, "--max-timeout-ms"},
        {{"--demo", "--log-level", "verbose"}, {NULL}, "--log-level"},
        {{"--demo", "--demo=perhaps"}, {NULL}, "--demo"},
        {{"--demo", "--max-conns", "1", "--fetch-threads", "2"}, {NULL}, "--max-conns"},
        {{"--demo", "stray"}, {NULL}, "stray"},
        {{"--demo", "-x"}, {NULL}, "-x"},
        {{"--demo", "--"}, {NULL}, "--"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct srv_config c;
        enum config_action act;
        char err[512];
        int rc = parse(&c, bad[i].args, bad[i].env, &act, err, sizeof(err));
        bool ok = rc == -EINVAL && err[0] && !strchr(err, '\n') && strstr(err, bad[i].name);
        CU_ASSERT(ok);
        if (!ok)
            fprintf(stderr, "\n  case %zu (%s): rc %d, \"%s\"", i, bad[i].name, rc, err);
    }
    /* A lower --max-timeout-ms alone takes the default deadline down with it. */
    struct srv_config c;
    enum config_action act;
    char err[512];
    static const char *const lower[] = {"--demo", "--max-timeout-ms", "100", NULL};
    CU_ASSERT_EQUAL(parse(&c, lower, NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(c.timeout_ms, 100);
}

static void test_config_usage_and_json(void)
{
    struct srv_config c;
    enum config_action act;
    char err[512];
    CU_ASSERT_FATAL(parse(&c,
                          A("--upstream", "http://127.0.0.1:1/i/{id}?a=\"b\"", "--limit", "3",
                            "--log-level", "warn", "--listen", "[::1]:99"),
                          NULL, &act, err, sizeof(err)) == 0);
    char *json = NULL, *usage = NULL;
    size_t jl = 0, ul = 0;
    FILE *f = open_memstream(&json, &jl);
    CU_ASSERT_FATAL(f != NULL);
    config_print_json(&c, f);
    fclose(f);
    f = open_memstream(&usage, &ul);
    CU_ASSERT_FATAL(f != NULL);
    config_usage(f);
    fclose(f);
    cJSON *j = cJSON_Parse(json);
    CU_ASSERT_FATAL(j != NULL);
    CU_ASSERT_EQUAL(num(j, "limit"), 3);
    CU_ASSERT_STRING_EQUAL(str(j, "log_level"), "warn");
    CU_ASSERT_STRING_EQUAL(str(j, "upstream"), "http://127.0.0.1:1/i/{id}?a=\"b\"");
    CU_ASSERT_STRING_EQUAL(str(j, "listen"), "[::1]:99");
    const cJSON *it;
    cJSON_ArrayForEach(it, j)
    {
        char flag[64] = "--";
        size_t k = 2;
        for (const char *s = it->string; *s && k < sizeof(flag) - 1; s++)
            flag[k++] = *s == '_' ? '-' : *s;
        flag[k] = '\0';
        CU_ASSERT(strstr(usage, flag) != NULL);
        /* and each is accepted back as a flag with its printed value */
        if (cJSON_IsNumber(it)) {
            char v[32];
            snprintf(v, sizeof(v), "%.0f", it->valuedouble);
            struct srv_config c2;
            CU_ASSERT_EQUAL(parse(&c2, A("--demo", flag, v), NULL, &act, err, sizeof(err)), 0);
        }
    }
    cJSON_Delete(j);
    free(json);
    free(usage);
}

/* The JSON of a parsed configuration, parsed back (NULL if it is not JSON). */
static cJSON *json_of(const struct srv_config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f)
        return NULL;
    config_print_json(c, f);
    fclose(f);
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    return j;
}

/* Every numeric setting --some-name is also read from FANOUT_SOME_NAME, to the same value. */
static void test_config_every_flag_has_its_variable(void)
{
    struct srv_config c;
    enum config_action act;
    char err[512];
    CU_ASSERT_FATAL(parse(&c, A("--demo", "--limit", "3", "--max-batch", "17"), NULL, &act, err,
                          sizeof(err)) == 0);
    cJSON *j = json_of(&c);
    CU_ASSERT_FATAL(j != NULL);
    int checked = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, j)
    {
        if (!cJSON_IsNumber(it))
            continue;
        char var[128] = "FANOUT_";
        size_t k = strlen(var);
        for (const char *s = it->string; *s && k < sizeof(var) - 24; s++)
            var[k++] = (char)toupper((unsigned char)*s);
        snprintf(var + k, sizeof(var) - k, "=%.17g", it->valuedouble);
        struct srv_config c2;
        int rc = parse(&c2, A("--demo"), A(var), &act, err, sizeof(err));
        cJSON *j2 = rc == 0 ? json_of(&c2) : NULL;
        bool same = j2 && num(j2, it->string) == it->valuedouble;
        CU_ASSERT(same);
        if (!same)
            fprintf(stderr, "\n  %s: rc %d, %s, read back %.0f\n", var, rc, err,
                    j2 ? num(j2, it->string) : -1);
        cJSON_Delete(j2);
        checked++;
    }
    CU_ASSERT(checked >= 20);
    /* A variable that is not a flag is ignored; an empty value is a refusal naming it. */
    CU_ASSERT_EQUAL(parse(&c, A("--demo"), A("FANOUT_NO_SUCH_SETTING=1"), &act, err, sizeof(err)),
                    0);
    CU_ASSERT_EQUAL(parse(&c, A("--demo"), A("FANOUT_LIMIT="), &act, err, sizeof(err)), -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "FANOUT_LIMIT"));
    cJSON_Delete(j);
}

/* --healthcheck checks values only (it needs no upstream), takes an optional path, and still
 * refuses a bad value. */
static void test_config_healthcheck(void)
{
    struct srv_config c;
    enum config_action act;
    char err[512];
    CU_ASSERT_EQUAL(parse(&c, A("--healthcheck", "--listen", "127.0.0.1:9000"), NULL, &act, err,
                          sizeof(err)),
                    0);
    CU_ASSERT_EQUAL(act, CONFIG_HEALTHCHECK);
    CU_ASSERT_STRING_EQUAL(c.probe_path, "/healthz");
    CU_ASSERT_EQUAL(c.listen_port, 9000);
    CU_ASSERT_EQUAL(parse(&c, A("--healthcheck=/readyz"), NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(act, CONFIG_HEALTHCHECK);
    CU_ASSERT_STRING_EQUAL(c.probe_path, "/readyz");
    static const char *const bad_paths[] = {"--healthcheck=readyz", "--healthcheck=/a b",
                                            "--healthcheck=/x?y", "--healthcheck="};
    for (size_t i = 0; i < sizeof(bad_paths) / sizeof(bad_paths[0]); i++) {
        CU_ASSERT_EQUAL(parse(&c, A(bad_paths[i]), NULL, &act, err, sizeof(err)), -EINVAL);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "--healthcheck"));
    }
    CU_ASSERT_EQUAL(parse(&c, A("--healthcheck", "--limit", "0"), NULL, &act, err, sizeof(err)),
                    -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--limit"));
}

/* --demo-upstream-only excludes --demo and --upstream as flags, and beats their variables. */
static void test_config_demo_upstream_only(void)
{
    struct srv_config c;
    enum config_action act;
    char err[512];
    CU_ASSERT_EQUAL(parse(&c, A("--demo-upstream-only"), NULL, &act, err, sizeof(err)), 0);
    CU_ASSERT(c.demo_upstream_only && !c.demo && !c.upstream[0]);
    CU_ASSERT_EQUAL(parse(&c, A("--demo-upstream-only"),
                          A("FANOUT_UPSTREAM=http://h/{id}", "FANOUT_DEMO=1"), &act, err,
                          sizeof(err)),
                    0);
    CU_ASSERT(c.demo_upstream_only && !c.demo && !c.upstream[0]);
    CU_ASSERT_EQUAL(parse(&c, A("--demo-upstream-only", "--demo"), NULL, &act, err, sizeof(err)),
                    -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--demo-upstream-only"));
    CU_ASSERT_EQUAL(parse(&c, A("--demo-upstream-only", "--upstream", "http://h/{id}"), NULL, &act,
                          err, sizeof(err)),
                    -EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--demo-upstream-only"));
    /* A --demo flag beats the variable FANOUT_DEMO_UPSTREAM_ONLY. */
    CU_ASSERT_EQUAL(parse(&c, A("--demo"), A("FANOUT_DEMO_UPSTREAM_ONLY=1"), &act, err,
                          sizeof(err)),
                    0);
    CU_ASSERT(c.demo && !c.demo_upstream_only);
}

/* config_split_upstreams: one template per line, at most 'max'. */
static void test_config_split_upstreams(void)
{
    char list[256] = "http://a/{id}\nhttp://b/{id}\nhttp://c/{id}";
    const char *t[4] = {NULL};
    CU_ASSERT_EQUAL(config_split_upstreams(list, t, 2), 2);
    CU_ASSERT_STRING_EQUAL(t[0], "http://a/{id}");
    CU_ASSERT_STRING_EQUAL(t[1], "http://b/{id}");
    CU_ASSERT_PTR_NULL(t[2]);
    char one[64] = "http://only/{id}";
    CU_ASSERT_EQUAL(config_split_upstreams(one, t, 4), 1);
    CU_ASSERT_STRING_EQUAL(t[0], "http://only/{id}");
    char none[8] = "";
    CU_ASSERT_EQUAL(config_split_upstreams(none, t, 4), 0);
}

/* config_resolve_listen: numeric addresses of both families with the port, a name, and an
 * all-digit host that is not an IPv4 address refused without a lookup. */
static void test_config_resolve_listen(void)
{
    struct srv_config c;
    config_defaults(&c);
    struct sockaddr_storage ss;
    char err[256];
    snprintf(c.listen_host, sizeof(c.listen_host), "127.0.0.1");
    c.listen_port = 8123;
    CU_ASSERT_EQUAL_FATAL(config_resolve_listen(&c, &ss, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(ss.ss_family, AF_INET);
    const struct sockaddr_in *in = (const struct sockaddr_in *)&ss;
    CU_ASSERT_EQUAL(ntohs(in->sin_port), 8123);
    CU_ASSERT_EQUAL(ntohl(in->sin_addr.s_addr), INADDR_LOOPBACK);

    snprintf(c.listen_host, sizeof(c.listen_host), "::1");
    c.listen_port = 0;
    CU_ASSERT_EQUAL_FATAL(config_resolve_listen(&c, &ss, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(ss.ss_family, AF_INET6);
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&ss;
    CU_ASSERT(IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr));
    CU_ASSERT_EQUAL(in6->sin6_port, 0);

    snprintf(c.listen_host, sizeof(c.listen_host), "localhost");
    c.listen_port = 80;
    CU_ASSERT_EQUAL(config_resolve_listen(&c, &ss, err, sizeof(err)), 0);

    static const char *const bad[] = {"1.2.3.999", "256.0.0.1", "1.2.3", "12345", "1..2.3"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(c.listen_host, sizeof(c.listen_host), "%s", bad[i]);
        err[0] = '\0';
        CU_ASSERT_EQUAL(config_resolve_listen(&c, &ss, err, sizeof(err)), -EINVAL);
        CU_ASSERT(strstr(err, "--listen") && strstr(err, bad[i]) && !strchr(err, '\n'));
    }
}

static CU_TestInfo config_tests[] = {
    {"config_parse: defaults, env, flags win, actions", test_config_values_and_precedence},
    {"config_parse: bad values rejected, naming the flag", test_config_rejects_bad_values},
    {"config_parse: several upstreams, policy, ejection, hedging, retries",
     test_config_upstreams_and_resilience},
    {"config: --help and the JSON list the same settings", test_config_usage_and_json},
    {"every numeric flag reads its FANOUT_* variable", test_config_every_flag_has_its_variable},
    {"--healthcheck: values only, a path, refusals", test_config_healthcheck},
    {"--demo-upstream-only excludes --demo and --upstream", test_config_demo_upstream_only},
    {"config_split_upstreams: one a line, at most max", test_config_split_upstreams},
    {"config_resolve_listen: both families, a name, bad dotted hosts", test_config_resolve_listen},
    CU_TEST_INFO_NULL,
};
TEST_SUITE(config, config_tests)
