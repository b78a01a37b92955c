/* proc: child processes for the suites that run the fanout binary (proc.h). */
#include "tests/proc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ctx/ctx.h"

extern char **environ;

const char *fanout_bin(void)
{
    const char *b = getenv("FANOUT_BIN");
    return b && *b ? b : "build/bin/fanout";
}

/* True if the binary exists; otherwise fails the running test with a message. */
bool have_bin(void)
{
    if (access(fanout_bin(), X_OK) == 0)
        return true;
    fprintf(stderr, "\n  %s is not an executable (set FANOUT_BIN or run make)\n", fanout_bin());
    CU_FAIL("fanout binary missing");
    return false;
}

/* The environment without FANOUT_* (hermetic; but $TEST_LOOP_MODEL becomes FANOUT_LOOP_MODEL)
 * plus 'extra' ("NAME=value", NULL-terminated, may
 * be NULL). ThreadSanitizer's options gain atexit_sleep_ms=0: TSan otherwise sleeps a second in
 * an exit that leaves threads running, which is exactly what a second signal does. The strings
 * are borrowed (from environ, 'extra' or a static buffer); free() the vector. Test thread only. */
static char **make_env(char *const *extra)
{
    static char tsan[1024], model[64];
    size_t n = 1, k = 0;
    while (environ[n - 1])
        n++;
    for (size_t i = 0; extra && extra[i]; i++)
        n++;
    char **env = calloc(n + 2, sizeof(*env));
    if (!env)
        return NULL;
    const char *old = "";
    for (size_t i = 0; environ[i]; i++) {
        if (!strncmp(environ[i], "TSAN_OPTIONS=", 13))
            old = environ[i] + 13;
        else if (strncmp(environ[i], "FANOUT_", 7) != 0)
            env[k++] = environ[i];
    }
    snprintf(tsan, sizeof(tsan), "TSAN_OPTIONS=%s%satexit_sleep_ms=0", old, *old ? ":" : "");
    env[k++] = tsan;
    const char *lm = getenv("TEST_LOOP_MODEL"); /* the suite runs under the other loop model */
    if (lm && *lm) {
        snprintf(model, sizeof(model), "FANOUT_LOOP_MODEL=%s", lm);
        env[k++] = model;
    }
    for (size_t i = 0; extra && extra[i]; i++)
        env[k++] = extra[i];
    env[k] = NULL;
    return env;
}

/* Points 'target' (0, 1 or 2) at 'fd', or at /dev/null when fd < 0. Child side of fork only. */
static void child_fd(int fd, int target)
{
    if (fd < 0) {
        fd = open("/dev/null", target == 0 ? O_RDONLY : O_WRONLY);
        if (fd < 0)
            _exit(127);
    }
    if (fd != target && dup2(fd, target) < 0)
        _exit(127);
}

/* Starts argv[0] (a path) with 'extra_env' added to the hermetic environment; stdin from 'in_fd',
 * stdout and stderr to 'out_fd'/'err_fd' (each -1 for /dev/null). The child starts with an empty
 * signal mask and default dispositions, and is killed if this thread dies first (so a crashing
 * test leaves no server behind). Between fork and exec only async-signal-safe calls are made.
 * Returns 0 and the pid, or a positive errno. */
int spawn(char *const *argv, char *const *extra_env, int in_fd, int out_fd, int err_fd,
                 pid_t *pid)
{
    char **env = make_env(extra_env);
    if (!env)
        return ENOMEM;
    pid_t parent = getpid();
    pid_t child = fork();
    if (child == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(127);
        child_fd(in_fd, 0);
        child_fd(out_fd, 1);
        child_fd(err_fd, 2);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        static const int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGPIPE};
        for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
            sigaction(sigs[i], &dfl, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(argv[0], argv, env);
        _exit(127);
    }
    int err = child < 0 ? errno : 0;
    free(env);
    if (child > 0)
        *pid = child;
    return err;
}

/* Appends what can be read from fd to *buf; returns false at EOF or error. */
static bool drain_fd(int fd, char **buf, size_t *len, size_t *cap)
{
    char tmp[8192];
    ssize_t n = read(fd, tmp, sizeof(tmp));
    if (n < 0 && errno == EINTR)
        return true;
    if (n <= 0)
        return false;
    if (*len + (size_t)n + 1 > *cap) {
        size_t nc = *cap ? *cap : 16384;
        while (nc < *len + (size_t)n + 1)
            nc *= 2;
        char *nb = realloc(*buf, nc);
        if (!nb)
            return false;
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, tmp, (size_t)n);
    *len += (size_t)n;
    (*buf)[*len] = '\0';
    return true;
}


void run_free(struct run *r)
{
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof(*r));
}

/* Runs argv to completion (bounded by WAIT_MS), capturing stdout and stderr. 'in_fd' feeds
 * stdin (-1: /dev/null). Returns false if it could not be started. */
bool run_capture(char *const *argv, char *const *env, int in_fd, struct run *r)
{
    memset(r, 0, sizeof(*r));
    int po[2], pe[2];
    if (pipe2(po, O_CLOEXEC) != 0)
        return false;
    if (pipe2(pe, O_CLOEXEC) != 0) {
        close(po[0]);
        close(po[1]);
        return false;
    }
    pid_t pid;
    int rc = spawn(argv, env, in_fd, po[1], pe[1], &pid);
    close(po[1]);
    close(pe[1]);
    if (rc != 0) {
        close(po[0]);
        close(pe[0]);
        return false;
    }
    size_t ocap = 0, ecap = 0;
    bool oopen = true, eopen = true;
    int64_t until = ctx_now() + WAIT_MS;
    while ((oopen || eopen) && ctx_now() < until) {
        struct pollfd p[2] = {{.fd = oopen ? po[0] : -1, .events = POLLIN},
                              {.fd = eopen ? pe[0] : -1, .events = POLLIN}};
        if (poll(p, 2, 100) <= 0)
            continue;
        if (p[0].revents && !drain_fd(po[0], &r->out, &r->out_len, &ocap))
            oopen = false;
        if (p[1].revents && !drain_fd(pe[0], &r->err, &r->err_len, &ecap))
            eopen = false;
    }
    close(po[0]);
    close(pe[0]);
    r->finished = !oopen && !eopen;
    if (!r->finished)
        kill(pid, SIGKILL);
    waitpid(pid, &r->status, 0);
    return true;
}

/* Runs fanout with 'args' (NULL-terminated, after argv[0]) and 'env'. */
bool run_fanout(char *const *args, char *const *env, struct run *r)
{
    char *argv[40];
    size_t n = 0;
    argv[n++] = (char *)(uintptr_t)fanout_bin(); /* execve's prototype is not const */
    for (size_t i = 0; args && args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return run_capture(argv, env, -1, r);
}

bool exited_with(int status, int code)
{
    return WIFEXITED(status) && WEXITSTATUS(status) == code;
}


static void *reader_main(void *arg)
{
    struct proc *p = arg;
    for (;;) {
        char tmp[8192];
        ssize_t n = read(p->err_fd, tmp, sizeof(tmp));
        if (n < 0 && errno == EINTR)
            continue;
        pthread_mutex_lock(&p->mu);
        if (n > 0 && p->len + (size_t)n + 1 > p->cap) {
            size_t nc = p->cap ? p->cap : 65536;
            while (nc < p->len + (size_t)n + 1)
                nc *= 2;
            char *nb = realloc(p->buf, nc);
            if (nb) {
                p->buf = nb;
                p->cap = nc;
            } else {
                n = 0; /* give up: the test then sees a truncated log */
            }
        }
        if (n > 0) {
            memcpy(p->buf + p->len, tmp, (size_t)n);
            p->len += (size_t)n;
            p->buf[p->len] = '\0';
        } else {
            p->eof = true;
        }
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        if (n <= 0)
            return NULL;
    }
}

/* Waits until stderr holds 'needle' (true) or EOF / the bound (false). */
bool proc_wait_text(struct proc *p, const char *needle, int64_t ms)
{
    int64_t until = ctx_now() + ms;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&p->mu);
    bool found;
    while (!(found = p->buf && strstr(p->buf, needle)) && !p->eof && ctx_now() < until)
        pthread_cond_timedwait(&p->cv, &p->mu, &ts);
    pthread_mutex_unlock(&p->mu);
    return found;
}

/* A copy of stderr so far (free() it). */
char *proc_log(struct proc *p)
{
    pthread_mutex_lock(&p->mu);
    char *s = strdup(p->buf ? p->buf : "");
    pthread_mutex_unlock(&p->mu);
    return s;
}

/* Waits (bounded) for the child to exit and reaps it. Returns true if it exited in time. */
bool proc_wait_exit(struct proc *p, int64_t ms)
{
    if (p->reaped)
        return true;
    if (p->pidfd >= 0) {
        struct pollfd pf = {.fd = p->pidfd, .events = POLLIN};
        int64_t until = ctx_now() + ms;
        int n;
        do
            n = poll(&pf, 1, (int)(until - ctx_now() > 0 ? until - ctx_now() : 0));
        while (n < 0 && errno == EINTR);
        if (n <= 0)
            return false;
        p->exit_ms = ctx_now();
    } else { /* no pidfd: the end of its stderr marks the exit */
        int64_t until = ctx_now() + ms;
        pthread_mutex_lock(&p->mu);
        while (!p->eof && ctx_now() < until) {
            pthread_mutex_unlock(&p->mu);
            proc_wait_text(p, "\x01never\x01", until - ctx_now());
            pthread_mutex_lock(&p->mu);
        }
        bool eof = p->eof;
        pthread_mutex_unlock(&p->mu);
        if (!eof)
            return false;
        p->exit_ms = ctx_now();
    }
    waitpid(p->pid, &p->status, 0);
    p->reaped = true;
    /* Its output is complete only at EOF on the pipe, which can come after the exit is seen. */
    if (p->reader_started) {
        int64_t until = ctx_now() + test_ms(5000);
        pthread_mutex_lock(&p->mu);
        while (!p->eof && ctx_now() < until) {
            pthread_mutex_unlock(&p->mu);
            proc_wait_text(p, "\x01never\x01", until - ctx_now());
            pthread_mutex_lock(&p->mu);
        }
        pthread_mutex_unlock(&p->mu);
    }
    return true;
}

/* Kills (if needed) and reaps the child, joins the reader, frees everything. */
void proc_free(struct proc *p)
{
    if (p->pid > 0 && !p->reaped) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, &p->status, 0);
        p->reaped = true;
    }
    if (p->reader_started)
        pthread_join(p->reader, NULL);
    if (p->err_fd >= 0)
        close(p->err_fd);
    if (p->pidfd >= 0)
        close(p->pidfd);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->buf);
    memset(p, 0, sizeof(*p));
    p->err_fd = p->pidfd = -1;
}

/* Spawns one server on 'port' with 'args' (after --listen) and 'env'. */
bool proc_spawn(struct proc *p, uint16_t port, char *const *args, char *const *env,
                       bool read_stderr)
{
    memset(p, 0, sizeof(*p));
    p->err_fd = p->pidfd = -1;
    p->port = port;
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_cond_init(&p->cv, &ca); /* CLOCK_REALTIME, as proc_wait_text computes */
    pthread_condattr_destroy(&ca);
    char listen[32];
    snprintf(listen, sizeof(listen), "127.0.0.1:%u", port); /* 0: the child picks */
    char *argv[40];
    size_t n = 0;
    argv[n++] = (char *)(uintptr_t)fanout_bin();
    argv[n++] = "--listen";
    argv[n++] = listen;
    for (size_t i = 0; args && args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    int pe[2];
    if (pipe2(pe, O_CLOEXEC) != 0)
        return false;
    int rc = spawn(argv, env, -1, -1, pe[1], &p->pid);
    close(pe[1]);
    p->err_fd = pe[0];
    if (rc != 0) {
        p->pid = 0;
        return false;
    }
    p->pidfd = (int)syscall(SYS_pidfd_open, p->pid, 0);
    if (!read_stderr)
        return p->pidfd >= 0; /* the end of stderr cannot mark the exit then */
    if (pthread_create(&p->reader, NULL, reader_main, p) != 0)
        return false;
    p->reader_started = true;
    return true;
}

/* The socket inodes process 'pid' (0: this one) holds, from /proc/PID/fd; returns how many. */
static size_t socket_inodes(pid_t pid, unsigned long *inodes, size_t cap)
{
    char path[64];
    if (pid)
        snprintf(path, sizeof(path), "/proc/%ld/fd", (long)pid);
    else
        snprintf(path, sizeof(path), "/proc/self/fd");
    DIR *d = opendir(path);
    if (!d)
        return 0;
    size_t ni = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && ni < cap) {
        char fdp[320], link[64];
        snprintf(fdp, sizeof(fdp), "%s/%s", path, de->d_name);
        ssize_t n = readlink(fdp, link, sizeof(link) - 1);
        if (n <= 0)
            continue;
        link[n] = '\0';
        unsigned long ino;
        if (sscanf(link, "socket:[%lu]", &ino) == 1)
            inodes[ni++] = ino;
    }
    closedir(d);
    return ni;
}

/* The TCP port 'pid' listens on, read from the kernel: the inodes of its sockets matched
 * against the LISTEN entries of /proc/PID/net/tcp. Sockets this process also holds (inherited
 * across fork before exec closes them) are not the child's own. 0 if none yet, or if it
 * listens on more than one (then the caller must learn the port another way). */
uint16_t listen_port_of(pid_t pid)
{
    unsigned long inodes[256], mine[256];
    size_t ni = socket_inodes(pid, inodes, 256), nm = socket_inodes(0, mine, 256);
    for (size_t k = 0; k < ni; k++)
        for (size_t m = 0; m < nm; m++)
            if (inodes[k] == mine[m])
                inodes[k] = 0;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/net/tcp", (long)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    char line[512];
    uint16_t found = 0;
    int matches = 0;
    while (fgets(line, sizeof(line), f)) {
        unsigned addr, port, st;
        unsigned long ino;
        /* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
        if (sscanf(line, " %*d: %x:%x %*x:%*x %x %*x:%*x %*x:%*x %*x %*u %*u %lu", &addr, &port,
                   &st, &ino) != 4 || st != 0x0A)
            continue;
        for (size_t k = 0; k < ni; k++)
            if (inodes[k] != 0 && inodes[k] == ino) {
                found = (uint16_t)port;
                matches++;
                break; /* one socket may be open on several descriptors */
            }
    }
    fclose(f);
    return matches == 1 ? found : 0;
}

/* Learns the port of a child started with --listen 127.0.0.1:0: from its "starting" log line
 * when its stderr is read at info level, else from the kernel. */
struct port_probe {
    struct proc *p; /* the child */
    bool from_log;  /* parse the log line */
};

static bool port_known(void *arg)
{
    struct port_probe *q = arg;
    struct proc *p = q->p;
    if (q->from_log) {
        pthread_mutex_lock(&p->mu);
        const char *l = p->buf ? strstr(p->buf, "\"msg\":\"starting\"") : NULL;
        const char *k = l ? strstr(l, "\"port\":") : NULL;
        const char *nl = l ? strchr(l, '\n') : NULL;
        if (k && (!nl || k < nl))
            p->port = (uint16_t)strtoul(k + 7, NULL, 10);
        bool eof = p->eof;
        pthread_mutex_unlock(&p->mu);
        return p->port != 0 || eof;
    }
    p->port = listen_port_of(p->pid);
    struct pollfd pf = {.fd = p->pidfd, .events = POLLIN};
    return p->port != 0 || poll(&pf, 1, 0) != 0; /* found, or it exited */
}

/* Starts a server on a port of its own choosing (--listen 127.0.0.1:0, so no port is probed
 * and then reused) and waits until it serves: the port from its "starting" log line, or (with
 * 'quiet', for log levels that hide it, or when nobody reads its stderr) from the kernel's
 * table of its listening sockets. Returns false (after printing why) if it does not come up. */
bool server_start_opt(struct proc *p, char *const *args, char *const *env, bool quiet,
                             bool read_stderr)
{
    if (!proc_spawn(p, 0, args, env, read_stderr)) {
        proc_free(p);
        return false;
    }
    struct port_probe q = {.p = p, .from_log = !quiet};
    if (test_wait_until(port_known, &q, WAIT_MS) && p->port != 0)
        return true;
    char *log = proc_log(p);
    fprintf(stderr, "\n  fanout did not start: %s\n", log);
    free(log);
    proc_free(p);
    return false;
}

bool server_start(struct proc *p, char *const *args, char *const *env)
{
    return server_start_opt(p, args, env, false, true);
}
bool env_start(struct env *e, char *const *args, char *const *envv)
{
    memset(e, 0, sizeof(*e));
    e->p.err_fd = e->p.pidfd = -1;
    if (upstub_new(2, &e->up) != 0)
        return false;
    upstub_url(e->up, e->upstream, sizeof(e->upstream), "/items/{id}");
    char *argv[40];
    size_t n = 0;
    argv[n++] = "--upstream";
    argv[n++] = e->upstream;
    for (size_t i = 0; args && args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return server_start(&e->p, argv, envv);
}

void env_free(struct env *e)
{
    if (e->p.pid > 0 || e->p.reader_started)
        proc_free(&e->p);
    upstub_free(e->up);
    memset(e, 0, sizeof(*e));
}

