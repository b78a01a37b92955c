/* Test support for suites that run the fanout binary: child processes with a hermetic
 * environment, their stderr read by a thread into a buffer the test searches, bounded waits for
 * their exit, and servers started on a port of their own choosing (--listen 127.0.0.1:0).
 * Test thread only unless said otherwise. */
#ifndef FANOUT_TEST_PROC_H
#define FANOUT_TEST_PROC_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "tests/support.h"
#include "tests/upstub.h"

#define WAIT_MS test_ms(20000) /* bound for anything that should happen soon */

/* What a short-lived command printed, and how it ended. */
struct run {
    char *out, *err; /* stdout and stderr, NUL-terminated (maybe NULL when empty) */
    size_t out_len, err_len;
    int status;    /* waitpid status */
    bool finished; /* exited within the bound */
};

/* A running server. */
struct proc {
    pid_t pid;           /* the child */
    int pidfd;           /* readable once it has exited, or -1 */
    uint16_t port;       /* where it listens */
    int err_fd;          /* read end of its stderr */
    pthread_t reader;    /* drains err_fd into buf */
    bool reader_started; /* reader runs */
    pthread_mutex_t mu;  /* guards buf, len, cap, eof */
    pthread_cond_t cv;   /* broadcast when buf grows or eof */
    char *buf;           /* stderr so far, NUL-terminated */
    size_t len, cap;     /* its length and allocation */
    bool eof;            /* the child closed stderr */
    bool reaped;         /* waitpid done */
    int status;          /* its status when reaped */
    int64_t exit_ms;     /* ctx_now() when its exit was seen */
};

const char *fanout_bin(void);

/* True if the binary exists; otherwise fails the running test with a message. */
bool have_bin(void);

/* Starts argv[0] (a path) with 'extra_env' added to the hermetic environment; stdin from 'in_fd',
 * stdout and stderr to 'out_fd'/'err_fd' (each -1 for /dev/null). The child starts with an empty
 * signal mask and default dispositions, and is killed if this thread dies first (so a crashing
 * test leaves no server behind). Between fork and exec only async-signal-safe calls are made.
 * Returns 0 and the pid, or a positive errno. */
int spawn(char *const *argv, char *const *extra_env, int in_fd, int out_fd, int err_fd, pid_t *pid);

void run_free(struct run *r);

/* Runs argv to completion (bounded by WAIT_MS), capturing stdout and stderr. 'in_fd' feeds
 * stdin (-1: /dev/null). Returns false if it could not be started. */
bool run_capture(char *const *argv, char *const *env, int in_fd, struct run *r);

/* Runs fanout with 'args' (NULL-terminated, after argv[0]) and 'env'. */
bool run_fanout(char *const *args, char *const *env, struct run *r);

bool exited_with(int status, int code);

/* Waits until stderr holds 'needle' (true) or EOF / the bound (false). */
bool proc_wait_text(struct proc *p, const char *needle, int64_t ms);

/* A copy of stderr so far (free() it). */
char *proc_log(struct proc *p);

/* Waits (bounded) for the child to exit and reaps it. Returns true if it exited in time. */
bool proc_wait_exit(struct proc *p, int64_t ms);

/* Kills (if needed) and reaps the child, joins the reader, frees everything. */
void proc_free(struct proc *p);

/* Spawns one server on 'port' with 'args' (after --listen) and 'env'. */
bool proc_spawn(struct proc *p, uint16_t port, char *const *args, char *const *env, bool read_stderr);

/* The TCP port 'pid' listens on, read from the kernel: the inodes of its sockets matched
 * against the LISTEN entries of /proc/PID/net/tcp. Sockets this process also holds (inherited
 * across fork before exec closes them) are not the child's own. 0 if none yet, or if it
 * listens on more than one (then the caller must learn the port another way). */
uint16_t listen_port_of(pid_t pid);

/* Starts a server on a port of its own choosing (--listen 127.0.0.1:0, so no port is probed
 * and then reused) and waits until it serves: the port from its "starting" log line, or (with
 * 'quiet', for log levels that hide it, or when nobody reads its stderr) from the kernel's
 * table of its listening sockets. Returns false (after printing why) if it does not come up. */
bool server_start_opt(struct proc *p, char *const *args, char *const *env, bool quiet, bool read_stderr);

bool server_start(struct proc *p, char *const *args, char *const *env);

/* A started stub and a server in front of it. */
struct env {
    struct upstub *up;  /* in-process upstream */
    char upstream[128]; /* its template */
    struct proc p;      /* the server */
};

/* Starts the stub and a server with "--upstream <stub>/items/{id}" plus 'args'. */
bool env_start(struct env *e, char *const *args, char *const *envv);

/* Stops the server (SIGKILL if still running) and the stub; frees both. */
void env_free(struct env *e);

#endif
