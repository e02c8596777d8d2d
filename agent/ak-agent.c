/*
 * ak-agent: agentkernel's in-sandbox agent.
 *
 * A small static program that runs inside every sandbox (usually as PID 1) and serves the agentkernel
 * agent protocol (docs/agent-protocol.md) over a unix socket or over stdin/stdout. One thread, one
 * poll() loop, non-blocking fds, bounded buffers with backpressure.
 *
 *   ak-agent serve [--wait-file PATH] --listen PATH [--ready-fd N] [--socket-mode OCTAL]
 *   ak-agent serve --stdio
 *   ak-agent exec -- ARGV...        tini-like init for one-shot runs
 *   ak-agent spawn-runtime [--pdeathsig PPID] [--overlay TARGET OPTIONS [--tmpfs ...] [--mkdir ...]
 *                          [--ro-runtime]] [--close-fds] -- RUNTIME ARGS...
 *                                   host side of the oci backend: an OCI runtime in a private mount
 *                                   namespace with the sandbox's overlay root (see spawn_runtime_main)
 *   ak-agent watch-owner --fd N -- PROGRAM ARGS...
 *                                   host side of agentkernel.deathwatch (see watch_owner_main)
 *   ak-agent --version
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AK_AGENT_VERSION "0.1.0"
#define PROTO_VERSION 1
#define PROTO_MAGIC "AKAG"

#define HDR_LEN 10u
#define MAX_PAYLOAD (1024u * 1024u)
#define CHUNK (64u * 1024u)
#define OUT_HIGH (1024u * 1024u)
#define OUT_LOW (256u * 1024u)
#define STDIN_HIGH (1024u * 1024u)
#define PTY_DRAIN_MS 100
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* client -> agent */
enum {
    RQ_HELLO = 0x01, RQ_PING = 0x02, RQ_INFO = 0x03, RQ_CANCEL = 0x04, RQ_RESEED = 0x05,
    RQ_EXEC = 0x10, RQ_STDIN = 0x11, RQ_STDIN_EOF = 0x12, RQ_SIGNAL = 0x13, RQ_RESIZE = 0x14,
    RQ_PUT = 0x20, RQ_PUT_DATA = 0x21, RQ_PUT_END = 0x22, RQ_GET = 0x23, RQ_STAT = 0x24, RQ_MKDIR = 0x25,
    RQ_REMOVE = 0x26,
};
/* agent -> client */
enum {
    RS_HELLO = 0x81, RS_PONG = 0x82, RS_INFO = 0x83, RS_OK = 0x84, RS_ERROR = 0x85,
    RS_STARTED = 0x90, RS_STDOUT = 0x91, RS_STDERR = 0x92, RS_EXIT = 0x93,
    RS_STAT = 0xA0, RS_DATA = 0xA1,
};
/* EXEC flags */
#define X_TTY 0x01u
#define X_STDIN_CLOSED 0x02u
#define X_SET_UID 0x04u
#define X_SET_GID 0x08u
#define X_KILL_GROUP_ON_EXIT 0x10u
#define X_RESTRICT 0x20u /* no_new_privs + every capability dropped (bounding, ambient, effective...) */
#define X_SECCOMP 0x40u  /* a trailing str: a classic BPF program installed as a seccomp filter */
/* EXIT flags */
#define E_SIGNALED 0x01u
#define E_TIMED_OUT 0x02u
#define E_OOM 0x04u
#define E_START_FAILED 0x08u
#define E_CORE 0x10u
#define E_STDOUT_TRUNC 0x20u
#define E_STDERR_TRUNC 0x40u
/* PUT flags */
#define P_MKDIRS 0x01u
#define P_SET_OWNER 0x02u
#define P_FSYNC 0x04u
/* STAT / MKDIR / REMOVE flags */
#define S_NOFOLLOW 0x01u
#define M_PARENTS 0x01u
#define RM_RECURSIVE 0x01u
#define RM_MISSING_OK 0x02u

/* ------------------------------------------------------------------------------------------------ */
/* small utilities */

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        static const char m[] = "ak-agent: out of memory\n";
        ssize_t r = write(2, m, sizeof m - 1);
        (void)r;
        _exit(125);
    }
    return q;
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void xclose(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* growable byte buffer: live data is d[off .. off+len) */
typedef struct {
    uint8_t *d;
    size_t off, len, cap;
} buf_t;

static uint8_t *buf_reserve(buf_t *b, size_t n) {
    if (b->off + b->len + n > b->cap) {
        if (b->off) {
            memmove(b->d, b->d + b->off, b->len);
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t nc = b->cap ? b->cap : 4096;
            while (nc < b->len + n) nc *= 2;
            b->d = xrealloc(b->d, nc);
            b->cap = nc;
        }
    }
    return b->d + b->off + b->len;
}

static void buf_append(buf_t *b, const void *p, size_t n) {
    if (!n) return;
    memcpy(buf_reserve(b, n), p, n);
    b->len += n;
}

static void buf_consume(buf_t *b, size_t n) {
    b->off += n;
    b->len -= n;
    if (!b->len) b->off = 0;
}

static void buf_free(buf_t *b) {
    free(b->d);
    memset(b, 0, sizeof *b);
}

/* shrink an idle buffer that grew large (keeps long-lived connections small) */
static void buf_trim(buf_t *b) {
    if (!b->len && b->cap > 256 * 1024) buf_free(b);
}

static void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
static void put_u64(uint8_t *p, uint64_t v) {
    put_u32(p, (uint32_t)(v >> 32));
    put_u32(p + 4, (uint32_t)v);
}
static uint32_t get_u32p(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* payload builder (small control payloads) */
typedef struct {
    uint8_t b[512];
    size_t n;
} pb_t;
static void pb_u8(pb_t *w, uint8_t v) {
    if (w->n + 1 <= sizeof w->b) w->b[w->n++] = v;
}
static void pb_u16(pb_t *w, uint16_t v) {
    if (w->n + 2 <= sizeof w->b) put_u16(w->b + w->n, v), w->n += 2;
}
static void pb_u32(pb_t *w, uint32_t v) {
    if (w->n + 4 <= sizeof w->b) put_u32(w->b + w->n, v), w->n += 4;
}
static void pb_u64(pb_t *w, uint64_t v) {
    if (w->n + 8 <= sizeof w->b) put_u64(w->b + w->n, v), w->n += 8;
}
static void pb_str(pb_t *w, const char *s) {
    size_t l = strlen(s);
    if (l > sizeof w->b - w->n - 4) l = sizeof w->b - w->n - 4;
    pb_u32(w, (uint32_t)l);
    memcpy(w->b + w->n, s, l);
    w->n += l;
}

/* payload reader */
typedef struct {
    const uint8_t *p;
    size_t n;
    int bad;
} rd_t;
static uint32_t rd_u32(rd_t *r) {
    if (r->n < 4) {
        r->bad = 1;
        return 0;
    }
    uint32_t v = get_u32p(r->p);
    r->p += 4;
    r->n -= 4;
    return v;
}
static uint16_t rd_u16(rd_t *r) {
    if (r->n < 2) {
        r->bad = 1;
        return 0;
    }
    uint16_t v = (uint16_t)(r->p[0] << 8 | r->p[1]);
    r->p += 2;
    r->n -= 2;
    return v;
}
static uint64_t rd_u64(rd_t *r) {
    uint64_t hi = rd_u32(r);
    return hi << 32 | rd_u32(r);
}
/* returns a pointer into the payload; *len set */
static const uint8_t *rd_str(rd_t *r, uint32_t *len) {
    uint32_t l = rd_u32(r);
    if (r->bad || l > r->n) {
        r->bad = 1;
        *len = 0;
        return NULL;
    }
    const uint8_t *s = r->p;
    r->p += l;
    r->n -= l;
    *len = l;
    return s;
}
/* copy a string field as a NUL-terminated C string; -1 if malformed or it contains NUL */
static int rd_cstr(rd_t *r, char **out) {
    uint32_t l;
    const uint8_t *s = rd_str(r, &l);
    *out = NULL;
    if (r->bad) return -1;
    char *c = xrealloc(NULL, (size_t)l + 1);
    memcpy(c, s, l);
    c[l] = 0;
    *out = c;
    return memchr(s, 0, l) ? -2 : 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* signals: a self-pipe written by the handlers */

static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t r = write(sig_pipe[1], &b, 1);
    (void)r;
    errno = saved;
}

static int is_fault_signal(int s) {
    return s == SIGSEGV || s == SIGBUS || s == SIGFPE || s == SIGILL || s == SIGTRAP || s == SIGABRT ||
           s == SIGSYS;
}

/* handle[] gets on_signal, everything else that would terminate or stop us is ignored */
static void setup_signals(const int *handle, int nhandle) {
    if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        perror("ak-agent: pipe");
        exit(125);
    }
    for (int s = 1; s < _NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP || is_fault_signal(s)) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sigemptyset(&sa.sa_mask);
        sa.sa_handler = SIG_IGN;
        if (s == SIGCHLD) {
            sa.sa_handler = on_signal;
            sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
        }
        for (int i = 0; i < nhandle; i++)
            if (handle[i] == s) {
                sa.sa_handler = on_signal;
                sa.sa_flags = SA_RESTART;
            }
        sigaction(s, &sa, NULL); /* fails harmlessly for libc-reserved signals */
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* in a forked child before exec: default dispositions, empty mask */
static void reset_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    for (int s = 1; s < _NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP) sigaction(s, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* ------------------------------------------------------------------------------------------------ */
/* exec helpers shared by serve and exec modes */

/* execve with a PATH search in the given PATH string (not the agent's environment) */
static void exec_search(char *const argv[], char *const envp[], const char *path) {
    const char *file = argv[0];
    if (!*file) {
        errno = ENOENT;
        return;
    }
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return;
    }
    if (!path) path = DEFAULT_PATH;
    size_t fl = strlen(file);
    int eacces = 0;
    for (const char *p = path;;) {
        const char *z = strchrnul(p, ':');
        size_t l = (size_t)(z - p);
        char b[PATH_MAX];
        if (l + fl + 2 <= sizeof b) {
            memcpy(b, p, l);
            if (l) b[l++] = '/';
            memcpy(b + l, file, fl + 1);
            execve(b, argv, envp);
            switch (errno) {
            case EACCES:
                eacces = 1;
                break;
            case ENOENT:
            case ENOTDIR:
                break;
            default:
                return;
            }
        }
        if (!*z) break;
        p = z + 1;
    }
    errno = eacces ? EACCES : ENOENT;
}

static const char *env_path(char *const envp[]) {
    for (int i = 0; envp[i]; i++)
        if (!strncmp(envp[i], "PATH=", 5)) return envp[i] + 5;
    return NULL;
}

static int exec_errno_code(int e) { return (e == ENOENT) ? 127 : 126; }

/* OOM-kill counter, a line "oom_kill N": the cgroup's (v2 memory.events or v1 memory.oom_control) or,
 * in a microVM (vm-init: the whole kernel is the sandbox's), the guest kernel's own /proc/vmstat */
static const char *oom_file;
static int oom_source; /* 0 none, 1 cgroup v1, 2 cgroup v2, 3 the (guest) kernel */
static int vm_guest;   /* set by vm-init */

static void oom_detect(void) {
    static const char *v2 = "/sys/fs/cgroup/memory.events";
    static const char *v1 = "/sys/fs/cgroup/memory/memory.oom_control";
    static const char *vm = "/proc/vmstat";
    if (vm_guest && access(vm, R_OK) == 0) oom_file = vm, oom_source = 3;
    else if (access(v2, R_OK) == 0) oom_file = v2, oom_source = 2;
    else if (access(v1, R_OK) == 0) oom_file = v1, oom_source = 1;
}

static long long oom_count(void) {
    if (!oom_file) return -1;
    int fd = open(oom_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char b[8192]; /* /proc/vmstat is ~4 KiB; oom_kill is near its end */
    ssize_t n = 0, r;
    while (n < (ssize_t)sizeof b - 1 && (r = read(fd, b + n, sizeof b - 1 - (size_t)n)) > 0) n += r;
    close(fd);
    if (n <= 0) return -1;
    b[n] = 0;
    for (char *p = b; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (!strncmp(p, "oom_kill ", 9)) return strtoll(p + 9, NULL, 10);
    return -1;
}

/* ------------------------------------------------------------------------------------------------ */
/* connections and streams */

enum { K_EXEC = 1, K_PUT, K_GET };

struct conn;

typedef struct stream {
    struct stream *next;
    struct conn *conn;
    uint32_t id;
    int kind;
    int done; /* terminal frame sent; freed at the end of the loop iteration */
    /* exec */
    pid_t pid;
    int running; /* not reaped yet */
    int status;
    int fd_in, fd_out, fd_err, fd_errpipe;
    int tty, in_eof, kill_group;
    buf_t inbuf;
    uint64_t start_us, end_us, deadline_us, drain_deadline_us;
    int timed_out;
    int start_stage, start_errno;
    long long oom_before;
    uint64_t out_limit, out_count[2];
    uint64_t drain_left[2]; /* bytes in the pipes when the command was reaped: all that EXIT waits for */
    int trunc[2];
    char *argv0, *cwd;
    uint32_t uid;
    /* put / get */
    int fd;
    char *path, *tmp;
    uint64_t bytes;
    int fsync;
} stream_t;

typedef struct conn {
    struct conn *next;
    int in_fd, out_fd;
    buf_t in, out;
    int hello, dead, out_paused;
    stream_t *streams;
} conn_t;

static conn_t *conns;
static int listen_fd = -1;
static char *listen_path;
static int stdio_mode;
/* serve --device: one long-lived port (virtio-serial) whose host side connects and disconnects. The
 * guest learns of (dis)connections on a control queue that is not ordered with the data queue, so a
 * hang-up cannot delimit sessions: a session starts with the host's HELLO (which resets the previous
 * one: its commands are killed, its unsent output dropped), and a hang-up only means "the host is
 * away" (the port reports POLLHUP until it is back: SIGIO says when, see device_away) */
static int device_fd = -1;
static conn_t *device_conn;
static uint64_t device_retry_at;
/* while the host is away the port raises SIGIO on a host (re)connection and when data arrives
 * (virtio_console's fasync; the owner is set when the port is opened). As a safety net the port is
 * also re-polled, every 2 ms for the first 200 ms (a client reconnecting between operations) and every
 * 25 ms after that (an idle VM stays quiet) */
#define DEVICE_FAST_US 2000
#define DEVICE_FAST_FOR_US 200000
#define DEVICE_SLOW_US 25000
static int device_async;
static uint64_t device_away_since;

/* the host side of the port is away: sleep until SIGIO (armed here; data or a reconnection raises it),
 * re-checking once after arming so a reconnection that came first is not missed */
static void device_away(void) {
    if (!device_async) {
        fcntl(device_fd, F_SETFL, fcntl(device_fd, F_GETFL) | O_ASYNC);
        device_async = 1;
    }
    struct pollfd p = {.fd = device_fd, .events = POLLIN};
    if (poll(&p, 1, 0) == 1 && !(p.revents & POLLHUP)) {
        device_retry_at = 0;
        return;
    }
    uint64_t now = now_us();
    if (!device_away_since) device_away_since = now;
    device_retry_at = now + (now - device_away_since < DEVICE_FAST_FOR_US ? DEVICE_FAST_US : DEVICE_SLOW_US);
}

/* the host is back: no SIGIO per incoming frame while it is */
static void device_present(void) {
    device_away_since = 0;
    if (device_async) {
        fcntl(device_fd, F_SETFL, fcntl(device_fd, F_GETFL) & ~O_ASYNC);
        device_async = 0;
    }
}
static uint64_t accept_paused_until; /* out of fds: retry accept() later, not in a busy loop */

static int conn_in_paused(conn_t *c) {
    /* a peer that does not read its replies gets no more requests served (bounded memory) */
    if (c->out.len >= 4 * OUT_HIGH) return 1;
    for (stream_t *s = c->streams; s; s = s->next)
        if (s->kind == K_EXEC && !s->done && s->inbuf.len >= STDIN_HIGH) return 1;
    return 0;
}

static int conn_has_get(conn_t *c) {
    for (stream_t *s = c->streams; s; s = s->next)
        if (s->kind == K_GET && !s->done) return 1;
    return 0;
}

/* start a frame in c->out and return a pointer to its payload area (n bytes reserved) */
static uint8_t *frame_begin(conn_t *c, uint8_t type, uint32_t sid, uint32_t n) {
    uint8_t *h = buf_reserve(&c->out, HDR_LEN + n);
    put_u32(h, n);
    put_u32(h + 4, sid);
    h[8] = type;
    h[9] = 0;
    return h + HDR_LEN;
}

static void send_frame(conn_t *c, uint8_t type, uint32_t sid, const void *p, size_t n) {
    if (c->dead) return;
    uint8_t *d = frame_begin(c, type, sid, (uint32_t)n);
    if (n) memcpy(d, p, n);
    c->out.len += HDR_LEN + n;
}

static void send_pb(conn_t *c, uint8_t type, uint32_t sid, pb_t *w) { send_frame(c, type, sid, w->b, w->n); }

static void send_error(conn_t *c, uint32_t sid, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void send_error(conn_t *c, uint32_t sid, int err, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pb_t w = {.n = 0};
    pb_u32(&w, (uint32_t)err);
    pb_str(&w, msg);
    send_pb(c, RS_ERROR, sid, &w);
}

static void send_ok(conn_t *c, uint32_t sid, uint64_t v) {
    uint8_t b[8];
    put_u64(b, v);
    send_frame(c, RS_OK, sid, b, 8);
}

static void conn_flush(conn_t *c) {
    while (!c->dead && c->out.len) {
        ssize_t n = write(c->out_fd, c->out.d + c->out.off, c->out.len);
        if (n > 0) {
            buf_consume(&c->out, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        c->dead = 1; /* EPIPE, ECONNRESET, ... */
    }
    if (!c->out.len) buf_trim(&c->out);
}

static void kill_group(stream_t *s, int sig) {
    if (s->pid <= 0 || !s->running) return;
    /* ESRCH: the child has not called setsid() yet (STARTED is sent right after fork); its signals
     * are blocked until it has reset their dispositions, so signalling the pid is enough */
    if (kill(-s->pid, sig) < 0 || sig == SIGKILL) kill(s->pid, sig);
}

static void stream_release(stream_t *s) {
    xclose(&s->fd_in);
    xclose(&s->fd_out);
    xclose(&s->fd_err);
    xclose(&s->fd_errpipe);
    xclose(&s->fd);
    if (s->tmp) unlink(s->tmp);
    buf_free(&s->inbuf);
    free(s->argv0);
    free(s->cwd);
    free(s->path);
    free(s->tmp);
    s->argv0 = s->cwd = s->path = s->tmp = NULL;
}

/* the connection is gone: kill what it started, drop partial uploads */
static void conn_abort(conn_t *c) {
    for (stream_t *s = c->streams; s; s = s->next) {
        if (s->kind == K_EXEC && s->running) kill_group(s, SIGKILL);
        stream_release(s);
        s->done = 1;
    }
}

static void conn_fail(conn_t *c, const char *msg) {
    if (c->dead) return;
    send_error(c, 0, EPROTO, "protocol error: %s", msg);
    conn_flush(c);
    c->dead = 1;
}

static stream_t *find_stream(conn_t *c, uint32_t sid) {
    for (stream_t *s = c->streams; s; s = s->next)
        if (s->id == sid && !s->done) return s;
    return NULL;
}

static stream_t *new_stream(conn_t *c, uint32_t sid, int kind) {
    stream_t *s = xrealloc(NULL, sizeof *s);
    memset(s, 0, sizeof *s);
    s->conn = c;
    s->id = sid;
    s->kind = kind;
    s->fd_in = s->fd_out = s->fd_err = s->fd_errpipe = s->fd = -1;
    s->next = c->streams;
    c->streams = s;
    return s;
}

/* ------------------------------------------------------------------------------------------------ */
/* exec */

enum { STAGE_EXEC = 1, STAGE_CHDIR, STAGE_SETGROUPS, STAGE_SETGID, STAGE_SETUID, STAGE_TTY, STAGE_DUP,
       STAGE_RESTRICT };

static void child_fail(int errfd, int stage) {
    int v[2] = {stage, errno};
    ssize_t r = write(errfd, v, sizeof v);
    (void)r;
    _exit(stage == STAGE_EXEC ? exec_errno_code(v[1]) : 126);
}

/* in the child: close every fd >= lowfd the agent itself may have inherited without CLOEXEC */
static void close_from(int lowfd) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0u) == 0) return;
#endif
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        int dfd = dirfd(d);
        struct dirent *e;
        while ((e = readdir(d))) {
            int fd = atoi(e->d_name);
            if (fd >= lowfd && fd != dfd) close(fd);
        }
        closedir(d);
        return;
    }
    long max = sysconf(_SC_OPEN_MAX);
    for (int fd = lowfd; fd < (max > 0 && max < 65536 ? max : 65536); fd++) close(fd);
}

static int move_fd(int fd, int target) {
    if (fd == target) return fcntl(fd, F_SETFD, 0);
    return dup2(fd, target) < 0 ? -1 : 0;
}

static void send_exit(stream_t *s) {
    conn_t *c = s->conn;
    uint8_t flags = 0, code = 0, sig = 0;
    char msg[400] = "";
    int err = 0;
    if (s->start_stage) {
        flags |= E_START_FAILED;
        err = s->start_errno;
        const char *es = strerror(err);
        switch (s->start_stage) {
        case STAGE_EXEC:
            code = (uint8_t)exec_errno_code(err);
            snprintf(msg, sizeof msg, "%s: %s", s->argv0, es);
            break;
        case STAGE_CHDIR:
            code = 126;
            snprintf(msg, sizeof msg, "chdir %s: %s", s->cwd ? s->cwd : "", es);
            break;
        case STAGE_SETUID:
        case STAGE_SETGID:
        case STAGE_SETGROUPS:
            code = 126;
            snprintf(msg, sizeof msg, "cannot switch to uid %u: %s", s->uid, es);
            break;
        case STAGE_RESTRICT:
            code = 126;
            snprintf(msg, sizeof msg, "cannot drop privileges / install the seccomp filter: %s", es);
            break;
        default:
            code = 126;
            snprintf(msg, sizeof msg, "cannot set up the command's terminal/stdio: %s", es);
        }
    } else if (WIFEXITED(s->status)) {
        code = (uint8_t)WEXITSTATUS(s->status);
    } else if (WIFSIGNALED(s->status)) {
        flags |= E_SIGNALED;
        sig = (uint8_t)WTERMSIG(s->status);
        if (WCOREDUMP(s->status)) flags |= E_CORE;
        if (sig == SIGKILL && !s->timed_out && s->oom_before >= 0 && oom_count() > s->oom_before)
            flags |= E_OOM;
    }
    if (s->timed_out) flags |= E_TIMED_OUT;
    if (s->trunc[0]) flags |= E_STDOUT_TRUNC;
    if (s->trunc[1]) flags |= E_STDERR_TRUNC;
    pb_t w = {.n = 0};
    pb_u8(&w, flags);
    pb_u8(&w, code);
    pb_u8(&w, sig);
    pb_u8(&w, 0);
    pb_u32(&w, (uint32_t)err);
    pb_u64(&w, s->end_us - s->start_us);
    pb_str(&w, msg);
    send_pb(c, RS_EXIT, s->id, &w);
}

/* read one chunk of command output into an output frame: bytes read, 0 at EOF, -1 if none yet */
static ssize_t exec_read_output(stream_t *s, int which) {
    conn_t *c = s->conn;
    int *fdp = which ? &s->fd_err : &s->fd_out;
    uint8_t *d = frame_begin(c, which ? RS_STDERR : RS_STDOUT, s->id, CHUNK);
    ssize_t n;
    do n = read(*fdp, d, CHUNK);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        uint64_t limit = s->out_limit, room = CHUNK;
        if (limit) {
            room = s->out_count[which] >= limit ? 0 : limit - s->out_count[which];
            if ((uint64_t)n > room) s->trunc[which] = 1;
        }
        s->out_count[which] += (uint64_t)n;
        uint32_t keep = (uint32_t)((uint64_t)n < room ? (uint64_t)n : room);
        if (keep) {
            put_u32(d - HDR_LEN, keep);
            c->out.len += HDR_LEN + keep;
        }
        return n;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return -1;
    xclose(fdp); /* EOF, or EIO on a pty master whose slave side is closed */
    return 0;
}

/* after the command exited: read what is left, then send EXIT once all output is in */
static void exec_finish(stream_t *s) {
    conn_t *c = s->conn;
    if (s->done || s->running || c->dead) return;
    for (int w = 0; w < 2; w++) {
        int *fdp = w ? &s->fd_err : &s->fd_out;
        while (*fdp >= 0 && !c->out_paused && c->out.len < OUT_HIGH) {
            /* pipe: what the command wrote is in the pipe when it is reaped; read exactly that much,
             * not what background processes holding the pipe keep writing. pty: the line discipline
             * may still be flushing, so read until EIO (slave closed) or a short grace period. */
            if (s->tty ? now_us() >= s->drain_deadline_us : !s->drain_left[w]) {
                xclose(fdp);
                break;
            }
            ssize_t r = exec_read_output(s, w);
            if (r < 0) {
                if (!s->tty) xclose(fdp);
                break;
            }
            if (!s->tty) s->drain_left[w] -= (uint64_t)r < s->drain_left[w] ? (uint64_t)r : s->drain_left[w];
        }
    }
    if (c->out.len >= OUT_HIGH) c->out_paused = 1;
    if (s->fd_out >= 0 || s->fd_err >= 0) return;
    if (s->fd_errpipe >= 0) {
        int v[2];
        ssize_t n = read(s->fd_errpipe, v, sizeof v);
        if (n == (ssize_t)sizeof v) {
            s->start_stage = v[0];
            s->start_errno = v[1];
        }
        xclose(&s->fd_errpipe);
    }
    xclose(&s->fd_in);
    send_exit(s);
    stream_release(s);
    s->done = 1;
}

static int def_restrict, def_user;
static const char *def_cgroup; /* serve --cgroup DIR: every command joins it (e.g. a pids.max limit) */
static uint32_t def_uid, def_gid;
static uint8_t *def_bpf;
static uint32_t def_bpf_len;

static int load_bpf(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size <= 0 || st.st_size % 8 || st.st_size > 4096 * 8) {
        fprintf(stderr, "ak-agent: seccomp program %s: %s\n", path, fd < 0 ? strerror(errno) : "bad size");
        if (fd >= 0) close(fd);
        return -1;
    }
    def_bpf = xrealloc(NULL, (size_t)st.st_size);
    ssize_t n = read(fd, def_bpf, (size_t)st.st_size);
    close(fd);
    if (n != st.st_size) return -1;
    def_bpf_len = (uint32_t)n;
    return 0;
}

/* drop every capability for good: bounding set, ambient set, then effective/permitted/inheritable
 * (a root command keeps uid 0 but gains nothing back on execve: its bounding set is empty) */
static int drop_bounding(void) {
    for (int cap = 0; cap < 64; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) return -1;
    return 0;
}

static int restrict_caps(void) {
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct {
        uint32_t version;
        int pid;
    } hdr = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
    struct {
        uint32_t effective, permitted, inheritable;
    } data[2];
    memset(data, 0, sizeof data);
    return (int)syscall(SYS_capset, &hdr, data);
}

static void exec_start(conn_t *c, uint32_t sid, rd_t *r) {
    uint32_t flags = rd_u32(r), timeout_ms = rd_u32(r);
    uint16_t rows = rd_u16(r), cols = rd_u16(r);
    uint32_t uid = rd_u32(r), gid = rd_u32(r);
    uint64_t out_limit = rd_u64(r);
    char *cwd = NULL;
    int bad = rd_cstr(r, &cwd);
    uint32_t argc = rd_u32(r);
    if (r->bad || bad == -1 || argc > MAX_PAYLOAD / 4) {
        free(cwd);
        conn_fail(c, "malformed EXEC payload");
        return;
    }
    char **argv = xrealloc(NULL, sizeof(char *) * (argc + 1));
    uint32_t i, envc = 0;
    char **envp = NULL;
    for (i = 0; i < argc; i++) {
        int e = rd_cstr(r, &argv[i]);
        if (e == -2) bad = -2;
        if (e == -1) break;
    }
    argv[i] = NULL;
    if (i == argc) {
        envc = rd_u32(r);
        if (envc > MAX_PAYLOAD / 4) r->bad = 1;
    }
    uint32_t j = 0;
    if (!r->bad && i == argc) {
        envp = xrealloc(NULL, sizeof(char *) * (envc + 1));
        for (; j < envc; j++) {
            int e = rd_cstr(r, &envp[j]);
            if (e == -2) bad = -2;
            if (e == -1) break;
        }
        envp[j] = NULL;
    }
    const uint8_t *bpf = NULL;
    uint32_t bpf_len = 0;
    if ((flags & X_SECCOMP) && !r->bad && i == argc && j == envc) {
        bpf = rd_str(r, &bpf_len);
        if (bpf_len % 8 || bpf_len == 0 || bpf_len / 8 > 4096) r->bad = 1;
    }
    int malformed = r->bad || i != argc || j != envc || r->n != 0;
    /* the agent's own policy (serve --restrict / --seccomp / --user) applies to every command */
    if (def_restrict) flags |= X_RESTRICT;
    if (!bpf && def_bpf) bpf = def_bpf, bpf_len = def_bpf_len;
    if (def_user && !(flags & X_SET_UID)) {
        flags |= X_SET_UID | X_SET_GID;
        uid = def_uid, gid = def_gid;
    }
    stream_t *s = NULL;
    int pfd_in[2] = {-1, -1}, pfd_out[2] = {-1, -1}, pfd_err[2] = {-1, -1}, pfd_e[2] = {-1, -1};
    int master = -1, slave = -1;

    if (malformed) {
        conn_fail(c, "malformed EXEC payload");
        goto out;
    }
    if (bad == -2) {
        send_error(c, sid, EINVAL, "argv, env and cwd must not contain NUL bytes");
        goto out;
    }
    if (argc == 0) {
        send_error(c, sid, EINVAL, "argv is empty");
        goto out;
    }
    s = new_stream(c, sid, K_EXEC);
    s->argv0 = strdup(argv[0]);
    s->cwd = (cwd && *cwd) ? strdup(cwd) : NULL;
    s->uid = uid;
    s->tty = !!(flags & X_TTY);
    s->kill_group = !!(flags & X_KILL_GROUP_ON_EXIT);
    s->out_limit = out_limit;

    if (pipe2(pfd_e, O_CLOEXEC) < 0) goto sysfail;
    if (s->tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) goto sysfail;
        char *name = ptsname(master);
        if (!name) goto sysfail;
        slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (slave < 0) goto sysfail;
        struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
        ioctl(master, TIOCSWINSZ, &ws);
    } else {
        if (pipe2(pfd_in, O_CLOEXEC) < 0 || pipe2(pfd_out, O_CLOEXEC) < 0 || pipe2(pfd_err, O_CLOEXEC) < 0)
            goto sysfail;
    }
    s->oom_before = oom_count();
    s->start_us = now_us();
    /* Block every signal across fork: a signal sent to the new process group before the child has
     * reset its dispositions stays pending (instead of running the agent's handler or being dropped
     * as ignored) and is delivered with the default action once reset_signals() unblocks it. */
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old);
    pid_t pid = fork();
    if (pid != 0) sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) goto sysfail;
    if (pid == 0) {
        int ef = pfd_e[1];
        reset_signals();
        setsid();
        if (s->tty) {
            if (ioctl(slave, TIOCSCTTY, 0) < 0) child_fail(ef, STAGE_TTY);
            if (move_fd(slave, 0) < 0 || move_fd(slave, 1) < 0 || move_fd(slave, 2) < 0)
                child_fail(ef, STAGE_DUP);
            if (slave > 2) close(slave);
        } else {
            /* stdin=pfd_in[0], stdout=pfd_out[1], stderr=pfd_err[1]; none of them is 0..2 (the
             * agent's own 0..2 are open: /dev/null or the stdio transport), so plain dup2 is safe */
            if (move_fd(pfd_in[0], 0) < 0 || move_fd(pfd_out[1], 1) < 0 || move_fd(pfd_err[1], 2) < 0)
                child_fail(ef, STAGE_DUP);
        }
        /* keep only 0..2 and the error pipe (moved to fd 3) */
        if (ef != 3) {
            if (dup3(ef, 3, O_CLOEXEC) < 0) child_fail(ef, STAGE_DUP);
            ef = 3;
        }
        close_from(4);
        if (def_cgroup) {
            char cp[512];
            snprintf(cp, sizeof cp, "%s/cgroup.procs", def_cgroup);
            int cfd = open(cp, O_WRONLY | O_CLOEXEC);
            if (cfd < 0 || write(cfd, "0", 1) != 1) child_fail(ef, STAGE_RESTRICT);
            close(cfd);
        }
        /* the bounding set needs CAP_SETPCAP: drop it before switching users */
        if ((flags & X_RESTRICT) && drop_bounding() < 0) child_fail(ef, STAGE_RESTRICT);
        if (flags & X_SET_GID) {
            gid_t g = gid;
            if (setgroups(1, &g) < 0 && errno != EPERM) child_fail(ef, STAGE_SETGROUPS);
            if (setgid(g) < 0) child_fail(ef, STAGE_SETGID);
        }
        if ((flags & X_SET_UID) && setuid(uid) < 0) child_fail(ef, STAGE_SETUID);
        if (cwd && *cwd && chdir(cwd) < 0) child_fail(ef, STAGE_CHDIR);
        if ((flags & (X_RESTRICT | X_SECCOMP)) && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            child_fail(ef, STAGE_RESTRICT);
        if ((flags & X_RESTRICT) && restrict_caps() < 0) child_fail(ef, STAGE_RESTRICT);
        if (bpf) {
            struct {
                unsigned short len;
                const void *filter;
            } prog = {(unsigned short)(bpf_len / 8), bpf};
            if (prctl(PR_SET_SECCOMP, 2 /* SECCOMP_MODE_FILTER */, &prog, 0, 0) < 0) child_fail(ef, STAGE_RESTRICT);
        }
        exec_search(argv, envp, env_path(envp));
        child_fail(ef, STAGE_EXEC);
    }
    s->pid = pid;
    s->running = 1;
    close(pfd_e[1]);
    s->fd_errpipe = pfd_e[0];
    set_nonblock(s->fd_errpipe);
    if (s->tty) {
        close(slave);
        s->fd_out = master;
        s->fd_in = dup(master);
        if (s->fd_in >= 0) fcntl(s->fd_in, F_SETFD, FD_CLOEXEC);
        set_nonblock(master);
        if (s->fd_in >= 0) set_nonblock(s->fd_in);
        if (flags & X_STDIN_CLOSED) {
            buf_append(&s->inbuf, "\x04", 1);
            s->in_eof = 1;
        }
    } else {
        close(pfd_in[0]);
        close(pfd_out[1]);
        close(pfd_err[1]);
        s->fd_in = pfd_in[1];
        s->fd_out = pfd_out[0];
        s->fd_err = pfd_err[0];
        set_nonblock(s->fd_in);
        set_nonblock(s->fd_out);
        set_nonblock(s->fd_err);
        if (flags & X_STDIN_CLOSED) {
            xclose(&s->fd_in);
            s->in_eof = 1;
        }
    }
    if (timeout_ms) s->deadline_us = s->start_us + (uint64_t)timeout_ms * 1000u;
    {
        uint8_t b[4];
        put_u32(b, (uint32_t)pid);
        send_frame(c, RS_STARTED, sid, b, 4);
    }
    goto out;

sysfail: {
    int e = errno;
    xclose(&pfd_e[0]);
    xclose(&pfd_e[1]);
    xclose(&pfd_in[0]);
    xclose(&pfd_in[1]);
    xclose(&pfd_out[0]);
    xclose(&pfd_out[1]);
    xclose(&pfd_err[0]);
    xclose(&pfd_err[1]);
    xclose(&master);
    xclose(&slave);
    send_error(c, sid, e, "agent cannot start the command: %s", strerror(e));
    stream_release(s);
    s->done = 1;
}
out:
    for (i = 0; argv[i]; i++) free(argv[i]);
    free(argv);
    if (envp)
        for (j = 0; envp[j]; j++) free(envp[j]);
    free(envp);
    free(cwd);
}

static void exec_write_stdin(stream_t *s) {
    while (s->fd_in >= 0 && s->inbuf.len) {
        ssize_t n = write(s->fd_in, s->inbuf.d + s->inbuf.off, s->inbuf.len);
        if (n > 0) {
            buf_consume(&s->inbuf, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        /* EPIPE: the command closed its stdin; discard the rest */
        s->inbuf.len = 0;
        s->inbuf.off = 0;
        xclose(&s->fd_in);
    }
    if (!s->inbuf.len) {
        buf_trim(&s->inbuf);
        if (s->in_eof && !s->tty) xclose(&s->fd_in);
    }
}

static void reap_children(void) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (conn_t *c = conns; c; c = c->next)
            for (stream_t *s = c->streams; s; s = s->next)
                if (s->kind == K_EXEC && s->running && s->pid == pid) {
                    s->running = 0;
                    s->status = st;
                    s->end_us = now_us();
                    s->drain_deadline_us = s->end_us + PTY_DRAIN_MS * 1000u;
                    for (int w = 0; w < 2; w++) {
                        int fd = w ? s->fd_err : s->fd_out, n = 0;
                        if (fd >= 0 && !s->tty && ioctl(fd, FIONREAD, &n) == 0 && n > 0)
                            s->drain_left[w] = (uint64_t)n;
                    }
                    if (s->kill_group) kill(-pid, SIGKILL);
                    xclose(&s->fd_in);
                    s->inbuf.len = s->inbuf.off = 0;
                }
        /* anything else is an orphan re-parented to us (PID 1 / subreaper): reaped, nothing to do */
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* files */

static int mkdir_p(char *path, mode_t mode) {
    /* path is modified temporarily */
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/') path[--len] = 0;
    struct stat st;
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode)) return 0;
        errno = ENOTDIR;
        return -1;
    }
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        int r = mkdir(path, 0755);
        int e = errno;
        *p = '/';
        if (r < 0 && e != EEXIST) {
            errno = e;
            return -1;
        }
    }
    if (mkdir(path, mode) < 0) {
        if (errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return 0;
        return -1;
    }
    return 0;
}

static void file_put_open(conn_t *c, uint32_t sid, rd_t *r) {
    uint32_t flags = rd_u32(r), mode = rd_u32(r), uid = rd_u32(r), gid = rd_u32(r);
    char *path;
    int e = rd_cstr(r, &path);
    if (e == -1 || r->bad || r->n) {
        free(path);
        conn_fail(c, "malformed PUT payload");
        return;
    }
    if (e == -2 || !*path) {
        free(path);
        send_error(c, sid, EINVAL, "invalid path");
        return;
    }
    char *slash = strrchr(path, '/');
    size_t dl = slash ? (size_t)(slash - path) : 0;
    char *dir = xrealloc(NULL, dl + 2);
    if (slash) {
        memcpy(dir, path, dl ? dl : 1);
        dir[dl ? dl : 1] = 0;
    } else {
        strcpy(dir, ".");
    }
    if ((flags & P_MKDIRS) && mkdir_p(dir, 0755) < 0) {
        e = errno;
        send_error(c, sid, e, "mkdir %s: %s", dir, strerror(e));
        free(dir);
        free(path);
        return;
    }
    const char *base = slash ? slash + 1 : path;
    size_t tl = strlen(dir) + strlen(base) + 32;
    char *tmp = xrealloc(NULL, tl);
    snprintf(tmp, tl, "%s/.%s.ak-XXXXXX", dir, base);
    free(dir);
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) {
        e = errno;
        send_error(c, sid, e, "%s: %s", path, strerror(e));
        free(tmp);
        free(path);
        return;
    }
    if (fchmod(fd, mode & 07777) < 0 || ((flags & P_SET_OWNER) && fchown(fd, uid, gid) < 0)) {
        e = errno;
        send_error(c, sid, e, "%s: %s", path, strerror(e));
        close(fd);
        unlink(tmp);
        free(tmp);
        free(path);
        return;
    }
    stream_t *s = new_stream(c, sid, K_PUT);
    s->fd = fd;
    s->path = path;
    s->tmp = tmp;
    s->fsync = !!(flags & P_FSYNC);
}

static void file_put_fail(stream_t *s, int e, const char *what) {
    send_error(s->conn, s->id, e, "%s %s: %s", what, s->path, strerror(e));
    stream_release(s); /* unlinks the temp file */
    s->done = 1;
}

static void file_put_data(stream_t *s, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = write(s->fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            file_put_fail(s, w < 0 ? errno : EIO, "write");
            return;
        }
        p += w;
        n -= (size_t)w;
        s->bytes += (uint64_t)w;
    }
}

static void file_put_end(stream_t *s) {
    if (s->fsync && fsync(s->fd) < 0) return file_put_fail(s, errno, "fsync");
    if (close(s->fd) < 0) {
        s->fd = -1;
        return file_put_fail(s, errno, "close");
    }
    s->fd = -1;
    if (rename(s->tmp, s->path) < 0) return file_put_fail(s, errno, "rename to");
    free(s->tmp);
    s->tmp = NULL;
    send_ok(s->conn, s->id, s->bytes);
    stream_release(s);
    s->done = 1;
}

static int stat_type(mode_t m) {
    if (S_ISREG(m)) return 1;
    if (S_ISDIR(m)) return 2;
    if (S_ISLNK(m)) return 3;
    if (S_ISCHR(m)) return 4;
    if (S_ISBLK(m)) return 5;
    if (S_ISFIFO(m)) return 6;
    if (S_ISSOCK(m)) return 7;
    return 8;
}

static void send_stat(conn_t *c, uint32_t sid, const struct stat *st) {
    pb_t w = {.n = 0};
    pb_u8(&w, st ? (uint8_t)stat_type(st->st_mode) : 0);
    pb_u8(&w, 0);
    pb_u8(&w, 0);
    pb_u8(&w, 0);
    pb_u32(&w, st ? (uint32_t)st->st_mode : 0);
    pb_u64(&w, st ? (uint64_t)st->st_size : 0);
    pb_u64(&w, st ? (uint64_t)st->st_mtim.tv_sec * 1000000000ull + (uint64_t)st->st_mtim.tv_nsec : 0);
    pb_u32(&w, st ? (uint32_t)st->st_uid : 0);
    pb_u32(&w, st ? (uint32_t)st->st_gid : 0);
    send_pb(c, RS_STAT, sid, &w);
}

/* common prologue for requests that carry "u32 flags, [u32 mode,] str path" */
static char *rd_path_req(conn_t *c, uint32_t sid, rd_t *r, const char *what) {
    char *path;
    int e = rd_cstr(r, &path);
    if (e == -1 || r->bad || r->n) {
        free(path);
        char m[64];
        snprintf(m, sizeof m, "malformed %s payload", what);
        conn_fail(c, m);
        return NULL;
    }
    if (e == -2 || !*path) {
        free(path);
        send_error(c, sid, EINVAL, "invalid path");
        return NULL;
    }
    return path;
}

static void file_get_open(conn_t *c, uint32_t sid, rd_t *r) {
    (void)rd_u32(r); /* flags, reserved */
    char *path = rd_path_req(c, sid, r, "GET");
    if (!path) return;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        int e = errno;
        send_error(c, sid, e, "%s: %s", path, strerror(e));
        if (fd >= 0) close(fd);
        free(path);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        send_error(c, sid, e, "%s: %s", path, S_ISDIR(st.st_mode) ? strerror(e) : "not a regular file");
        close(fd);
        free(path);
        return;
    }
    send_stat(c, sid, &st);
    stream_t *s = new_stream(c, sid, K_GET);
    s->fd = fd;
    s->path = path;
}

/* move file data into the connection's buffer while it has room */
static void file_get_pump(conn_t *c) {
    for (stream_t *s = c->streams; s; s = s->next) {
        if (s->kind != K_GET || s->done) continue;
        while (!c->dead && c->out.len < OUT_HIGH) {
            uint8_t *d = frame_begin(c, RS_DATA, s->id, CHUNK);
            ssize_t n = read(s->fd, d, CHUNK);
            if (n < 0 && errno == EINTR) continue;
            if (n > 0) {
                put_u32(d - HDR_LEN, (uint32_t)n);
                c->out.len += HDR_LEN + (size_t)n;
                s->bytes += (uint64_t)n;
                continue;
            }
            if (n == 0) send_ok(c, s->id, s->bytes);
            else send_error(c, s->id, errno, "read %s: %s", s->path, strerror(errno));
            stream_release(s);
            s->done = 1;
            break;
        }
    }
}

static void file_stat(conn_t *c, uint32_t sid, rd_t *r) {
    uint32_t flags = rd_u32(r);
    char *path = rd_path_req(c, sid, r, "STAT");
    if (!path) return;
    struct stat st;
    int rc = (flags & S_NOFOLLOW) ? lstat(path, &st) : stat(path, &st);
    if (rc == 0) send_stat(c, sid, &st);
    else if (errno == ENOENT || errno == ENOTDIR) send_stat(c, sid, NULL);
    else send_error(c, sid, errno, "%s: %s", path, strerror(errno));
    free(path);
}

static void file_mkdir(conn_t *c, uint32_t sid, rd_t *r) {
    uint32_t flags = rd_u32(r), mode = rd_u32(r);
    char *path = rd_path_req(c, sid, r, "MKDIR");
    if (!path) return;
    int rc = (flags & M_PARENTS) ? mkdir_p(path, mode & 07777) : mkdir(path, mode & 07777);
    if (rc == 0) send_ok(c, sid, 0);
    else send_error(c, sid, errno, "mkdir %s: %s", path, strerror(errno));
    free(path);
}

static int rm_one(const char *p, const struct stat *st, int type, struct FTW *f) {
    (void)st;
    (void)f;
    return (type == FTW_DP ? rmdir(p) : unlink(p)) < 0 && errno != ENOENT ? -1 : 0;
}

static void file_remove(conn_t *c, uint32_t sid, rd_t *r) {
    uint32_t flags = rd_u32(r);
    char *path = rd_path_req(c, sid, r, "REMOVE");
    if (!path) return;
    struct stat st;
    int rc;
    if (lstat(path, &st) < 0) {
        rc = -1;
    } else if (S_ISDIR(st.st_mode)) {
        if (flags & RM_RECURSIVE) rc = nftw(path, rm_one, 32, FTW_DEPTH | FTW_PHYS);
        else rc = rmdir(path);
    } else {
        rc = unlink(path);
    }
    if (rc == 0 || ((flags & RM_MISSING_OK) && errno == ENOENT)) send_ok(c, sid, 0);
    else send_error(c, sid, errno, "remove %s: %s", path, strerror(errno));
    free(path);
}

/* ------------------------------------------------------------------------------------------------ */
/* frame dispatch */

static void send_info(conn_t *c, uint32_t sid) {
    pb_t w = {.n = 0};
    pb_u16(&w, PROTO_VERSION);
    pb_u8(&w, (uint8_t)((getpid() == 1 ? 1 : 0) | (stdio_mode ? 2 : 0)));
    pb_u8(&w, (uint8_t)oom_source);
    pb_u32(&w, (uint32_t)getpid());
    pb_u32(&w, (uint32_t)getuid());
    pb_u32(&w, (uint32_t)getgid());
    pb_u32(&w, MAX_PAYLOAD);
    pb_str(&w, AK_AGENT_VERSION);
    send_pb(c, RS_INFO, sid, &w);
}

#ifndef RNDADDENTROPY
#define RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG 0x5207 /* _IO('R', 0x07) */
#endif

/* RESEED: after a VM snapshot is restored every clone has the same RNG state and a stale clock. The
 * host sends fresh entropy (credited with RNDADDENTROPY when permitted, else mixed in by a plain write)
 * and the wall-clock time. OK carries the number of entropy bytes credited. */
static void reseed(conn_t *c, uint32_t sid, rd_t *r) {
    uint64_t ns = rd_u64(r);
    if (r->bad || r->n > 1024) {
        send_error(c, sid, EINVAL, "RESEED payload: u64 time_ns + at most 1024 entropy bytes");
        return;
    }
    if (ns) {
        struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
            send_error(c, sid, errno, "clock_settime: %s", strerror(errno));
            return;
        }
    }
    size_t m = r->n;
    uint64_t credited = 0;
    if (m) {
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0) {
            send_error(c, sid, errno, "/dev/urandom: %s", strerror(errno));
            return;
        }
        struct {
            int entropy_count, buf_size;
            unsigned char buf[1024];
        } e;
        e.entropy_count = (int)(m * 8);
        e.buf_size = (int)m;
        memcpy(e.buf, r->p, m);
        if (ioctl(fd, RNDADDENTROPY, &e) == 0) {
            credited = m;
            /* entropy added to the input pool reaches /dev/urandom only at the next reseed (a minute
             * away): reseed now, or every clone keeps producing the snapshot's byte stream */
            if (ioctl(fd, RNDRESEEDCRNG) < 0) {
                int err = errno;
                close(fd);
                send_error(c, sid, err, "RNDRESEEDCRNG: %s", strerror(err));
                return;
            }
        } else if (write(fd, e.buf, m) != (ssize_t)m) {
            int err = errno;
            close(fd);
            send_error(c, sid, err, "/dev/urandom: %s", strerror(err));
            return;
        }
        close(fd);
    }
    send_ok(c, sid, credited);
}

static void handle_frame(conn_t *c, uint8_t type, uint32_t sid, const uint8_t *p, uint32_t n) {
    rd_t r = {p, n, 0};
    if (c->hello && type == RQ_HELLO && sid == 0 && c->in_fd == device_fd) {
        /* a new host session on the device whose end the agent has not seen yet: forget the old one */
        conn_abort(c);
        c->out.off = c->out.len = 0;
        c->hello = 0;
    }
    if (!c->hello) {
        if (type != RQ_HELLO || sid != 0 || n < 8 || memcmp(p, PROTO_MAGIC, 4)) {
            conn_fail(c, "the first frame must be HELLO on stream 0");
            return;
        }
        r.p += 4, r.n -= 4;
        uint16_t lo = rd_u16(&r), hi = rd_u16(&r);
        if (lo > PROTO_VERSION || hi < PROTO_VERSION) {
            send_error(c, 0, EPROTONOSUPPORT, "protocol versions %u..%u not supported (agent speaks %u)", lo,
                       hi, PROTO_VERSION);
            conn_flush(c);
            c->dead = 1;
            return;
        }
        pb_t w = {.n = 0};
        memcpy(w.b, PROTO_MAGIC, 4);
        w.n = 4;
        pb_u16(&w, PROTO_VERSION);
        pb_u32(&w, MAX_PAYLOAD);
        pb_str(&w, AK_AGENT_VERSION);
        send_pb(c, RS_HELLO, 0, &w);
        c->hello = 1;
        return;
    }
    if (sid == 0) {
        conn_fail(c, "stream id 0 is reserved");
        return;
    }
    stream_t *s = find_stream(c, sid);
    switch (type) {
    case RQ_PING:
    case RQ_INFO:
    case RQ_EXEC:
    case RQ_PUT:
    case RQ_GET:
    case RQ_STAT:
    case RQ_MKDIR:
    case RQ_REMOVE:
    case RQ_RESEED:
        if (s) {
            conn_fail(c, "stream id already in use");
            return;
        }
        break;
    default:
        break;
    }
    switch (type) {
    case RQ_PING:
        if (n > 1024) return conn_fail(c, "PING payload too large");
        send_frame(c, RS_PONG, sid, p, n);
        return;
    case RQ_INFO:
        send_info(c, sid);
        return;
    case RQ_EXEC:
        exec_start(c, sid, &r);
        return;
    case RQ_PUT:
        file_put_open(c, sid, &r);
        return;
    case RQ_GET:
        file_get_open(c, sid, &r);
        file_get_pump(c);
        return;
    case RQ_STAT:
        file_stat(c, sid, &r);
        return;
    case RQ_MKDIR:
        file_mkdir(c, sid, &r);
        return;
    case RQ_REMOVE:
        file_remove(c, sid, &r);
        return;
    case RQ_RESEED:
        reseed(c, sid, &r);
        return;
    case RQ_STDIN:
    case RQ_STDIN_EOF:
    case RQ_SIGNAL:
    case RQ_RESIZE:
        if (!s || s->kind != K_EXEC) return; /* stream already finished: ignored */
        if (type == RQ_STDIN) {
            if (s->fd_in >= 0 && !s->in_eof) buf_append(&s->inbuf, p, n);
            exec_write_stdin(s);
        } else if (type == RQ_STDIN_EOF) {
            if (!s->in_eof) {
                s->in_eof = 1;
                if (s->tty) buf_append(&s->inbuf, "\x04", 1); /* VEOF: ends input of a canonical tty */
            }
            exec_write_stdin(s);
        } else if (type == RQ_SIGNAL) {
            uint32_t sig = rd_u32(&r);
            if (r.bad) return conn_fail(c, "malformed SIGNAL payload");
            if (sig > 0 && sig < _NSIG) kill_group(s, (int)sig);
        } else {
            uint16_t rows = rd_u16(&r), cols = rd_u16(&r);
            if (r.bad) return conn_fail(c, "malformed RESIZE payload");
            if (s->tty && s->fd_out >= 0) {
                struct winsize ws = {.ws_row = rows, .ws_col = cols};
                ioctl(s->fd_out, TIOCSWINSZ, &ws); /* the kernel sends SIGWINCH to the foreground group */
            }
        }
        return;
    case RQ_PUT_DATA:
    case RQ_PUT_END:
        if (!s || s->kind != K_PUT) return;
        if (type == RQ_PUT_DATA) file_put_data(s, p, n);
        else file_put_end(s);
        return;
    case RQ_CANCEL:
        if (!s) return;
        if (s->kind == K_EXEC) {
            kill_group(s, SIGKILL);
        } else {
            send_error(c, sid, ECANCELED, "cancelled");
            stream_release(s);
            s->done = 1;
        }
        return;
    default:
        send_error(c, sid, ENOSYS, "unknown frame type 0x%02x", type);
        return;
    }
}

static void conn_read(conn_t *c) {
    uint8_t *d = buf_reserve(&c->in, 256 * 1024);
    ssize_t n = read(c->in_fd, d, 256 * 1024);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n == 0 && c == device_conn) {
        device_away(); /* the host is away, not gone for good */
        return;
    }
    if (c == device_conn) device_present();
    if (n <= 0) {
        c->dead = 1; /* peer closed or reset: conn_abort kills what it started */
        return;
    }
    c->in.len += (size_t)n;
    while (!c->dead && c->in.len >= HDR_LEN) {
        const uint8_t *h = c->in.d + c->in.off;
        uint32_t len = get_u32p(h);
        if (len > MAX_PAYLOAD) {
            conn_fail(c, "frame larger than the maximum payload size");
            return;
        }
        if (h[9] != 0) {
            conn_fail(c, "reserved header byte is not zero");
            return;
        }
        if (c->in.len < HDR_LEN + len) break;
        handle_frame(c, h[8], get_u32p(h + 4), h + HDR_LEN, len);
        buf_consume(&c->in, HDR_LEN + len);
    }
    buf_trim(&c->in);
}

static conn_t *conn_new(int in_fd, int out_fd) {
    conn_t *c = xrealloc(NULL, sizeof *c);
    memset(c, 0, sizeof *c);
    c->in_fd = in_fd;
    c->out_fd = out_fd;
    set_nonblock(in_fd);
    set_nonblock(out_fd);
    c->next = conns;
    conns = c;
    return c;
}

/* ------------------------------------------------------------------------------------------------ */
/* serve: the event loop */

enum { W_SIG = 1, W_LISTEN, W_CIN, W_COUT, W_XOUT, W_XERR, W_XIN, W_DEV };

typedef struct {
    int what;
    void *obj;
} pref_t;

static struct pollfd *pfds;
static pref_t *prefs;
static size_t npfd, cappfd;

static void pf_add(int fd, short ev, int what, void *obj) {
    if (npfd == cappfd) {
        cappfd = cappfd ? cappfd * 2 : 64;
        pfds = xrealloc(pfds, cappfd * sizeof *pfds);
        prefs = xrealloc(prefs, cappfd * sizeof *prefs);
    }
    pfds[npfd] = (struct pollfd){.fd = fd, .events = ev};
    prefs[npfd] = (pref_t){what, obj};
    npfd++;
}

static void shutdown_all(int code) {
    for (conn_t *c = conns; c; c = c->next) {
        conn_abort(c);
        conn_flush(c);
    }
    if (listen_path) unlink(listen_path);
    exit(code);
}

static void sweep(void) {
    for (conn_t **cp = &conns; *cp;) {
        conn_t *c = *cp;
        if (c->dead) conn_abort(c);
        for (stream_t **sp = &c->streams; *sp;) {
            stream_t *s = *sp;
            if (s->done) {
                *sp = s->next;
                stream_release(s);
                free(s);
            } else {
                sp = &s->next;
            }
        }
        if (c->dead) {
            *cp = c->next;
            if (c == device_conn) {
                device_conn = NULL; /* the port stays open: wait for the host's next session */
                device_away();
            } else {
                close(c->in_fd);
                if (c->out_fd != c->in_fd) close(c->out_fd);
            }
            buf_free(&c->in);
            buf_free(&c->out);
            free(c);
            accept_paused_until = 0;
            if (stdio_mode) shutdown_all(0);
        } else {
            cp = &c->next;
        }
    }
}

static int serve_loop(void) {
    for (;;) {
        uint64_t now = now_us();
        int64_t timeout = -1;
        npfd = 0;
        pf_add(sig_pipe[0], POLLIN, W_SIG, NULL);
        if (accept_paused_until && now >= accept_paused_until) accept_paused_until = 0;
        if (listen_fd >= 0 && !accept_paused_until) pf_add(listen_fd, POLLIN, W_LISTEN, NULL);
        if (accept_paused_until) timeout = (int64_t)((accept_paused_until - now + 999) / 1000);
        if (device_fd >= 0 && !device_conn) {
            /* no host session: a virtio port reports POLLHUP until the host connects, so poll it only
             * when SIGIO or the safety-net timer says so, instead of spinning */
            if (now >= device_retry_at) pf_add(device_fd, POLLIN, W_DEV, NULL);
            else timeout = (int64_t)((device_retry_at - now + 999) / 1000);
        }
        for (conn_t *c = conns; c; c = c->next) {
            if (c == device_conn && now < device_retry_at) {
                int64_t ms = (int64_t)((device_retry_at - now + 999) / 1000);
                if (timeout < 0 || ms < timeout) timeout = ms;
                goto streams;
            }
            if (c->out_paused && c->out.len <= OUT_LOW) c->out_paused = 0;
            if (c->out.len >= OUT_HIGH) c->out_paused = 1;
            short in_ev = conn_in_paused(c) ? 0 : POLLIN;
            /* POLLOUT also while a download is active: the socket may have swallowed the whole
             * buffer, and becoming writable again is what refills it (file_get_pump) */
            short out_ev = (c->out.len || conn_has_get(c)) ? POLLOUT : 0;
            if (c->in_fd == c->out_fd) {
                pf_add(c->in_fd, in_ev | out_ev, W_CIN, c);
            } else {
                pf_add(c->in_fd, in_ev, W_CIN, c);
                if (out_ev) pf_add(c->out_fd, out_ev, W_COUT, c);
            }
        streams:
            for (stream_t *s = c->streams; s; s = s->next) {
                if (s->kind != K_EXEC || s->done) continue;
                if (!c->out_paused) {
                    if (s->fd_out >= 0) pf_add(s->fd_out, POLLIN, W_XOUT, s);
                    if (s->fd_err >= 0) pf_add(s->fd_err, POLLIN, W_XERR, s);
                }
                if (s->fd_in >= 0 && s->inbuf.len) pf_add(s->fd_in, POLLOUT, W_XIN, s);
                uint64_t dl = 0;
                if (s->running && s->deadline_us) dl = s->deadline_us;
                if (!s->running && s->tty) dl = s->drain_deadline_us;
                if (dl) {
                    int64_t ms = dl > now ? (int64_t)((dl - now + 999) / 1000) : 0;
                    if (timeout < 0 || ms < timeout) timeout = ms;
                }
            }
        }
        int rc = poll(pfds, npfd, (int)timeout);
        if (rc < 0 && errno != EINTR) {
            perror("ak-agent: poll");
            return 125;
        }
        for (size_t i = 0; rc > 0 && i < npfd; i++) {
            short re = pfds[i].revents;
            if (!re) continue;
            pref_t *pr = &prefs[i];
            if (pr->what == W_SIG) {
                unsigned char b[64];
                ssize_t n;
                int term = 0;
                while ((n = read(sig_pipe[0], b, sizeof b)) > 0)
                    for (ssize_t k = 0; k < n; k++) {
                        if (b[k] == SIGTERM || b[k] == SIGINT) term = 1;
                        if (b[k] == SIGIO) device_retry_at = 0; /* the port's host side changed */
                    }
                reap_children();
                if (term) shutdown_all(0);
            } else if (pr->what == W_DEV) {
                if (re & POLLIN) {
                    device_conn = conn_new(device_fd, device_fd);
                    conn_read(device_conn);
                } else {
                    device_away();
                }
            } else if (pr->what == W_LISTEN) {
                for (int k = 0; k < 16; k++) {
                    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                            accept_paused_until = now_us() + 100000;
                        break;
                    }
                    conn_new(fd, fd);
                }
            } else if (pr->what == W_CIN || pr->what == W_COUT) {
                conn_t *c = pr->obj;
                if (c->dead) continue;
                if (c == device_conn && (re & POLLHUP) && !(re & POLLIN)) {
                    device_away();
                    continue;
                }
                if (re & POLLOUT) conn_flush(c);
                if (pr->what == W_CIN && (re & (POLLIN | POLLHUP | POLLERR)) && !conn_in_paused(c))
                    conn_read(c);
                else if (pr->what == W_CIN && (re & (POLLHUP | POLLERR)) && !(re & POLLIN))
                    c->dead = 1;
                if (re & POLLOUT) file_get_pump(c);
            } else {
                stream_t *s = pr->obj;
                if (s->done || s->conn->dead) continue;
                if (pr->what == W_XIN) {
                    if (s->fd_in == pfds[i].fd) exec_write_stdin(s);
                } else {
                    int w = pr->what == W_XERR;
                    if ((w ? s->fd_err : s->fd_out) != pfds[i].fd) continue;
                    if (!s->conn->out_paused && s->conn->out.len < OUT_HIGH) exec_read_output(s, w);
                }
            }
        }
        /* timers: exec timeouts */
        now = now_us();
        for (conn_t *c = conns; c; c = c->next)
            for (stream_t *s = c->streams; s; s = s->next)
                if (s->kind == K_EXEC && s->running && s->deadline_us && now >= s->deadline_us &&
                    !s->timed_out) {
                    s->timed_out = 1;
                    kill_group(s, SIGKILL);
                }
        /* finish exited commands, flush, refill file downloads, free what is done */
        for (conn_t *c = conns; c; c = c->next) {
            for (stream_t *s = c->streams; s; s = s->next)
                if (s->kind == K_EXEC && !s->running && !s->done) exec_finish(s);
            conn_flush(c);
            if (c->out.len < OUT_LOW) {
                file_get_pump(c);
                conn_flush(c);
            }
        }
        sweep();
    }
}

static char *device_path, *vsock_port;

/* --wait-file: the host finishes setting the sandbox up (e.g. moves its network interface in) after the
 * engine started it; nothing of the user's runs before this file exists. Gives up after 30 s. */
static int wait_for_file(const char *path) {
    struct timespec ts = {0, 1000000};
    for (int i = 0; i < 30000; i++) {
        if (access(path, F_OK) == 0) return 0;
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "ak-agent: %s did not appear within 30 s (sandbox set-up failed)\n", path);
    return -1;
}

static int serve_main(int argc, char **argv) {
    int ready_fd = -1;
    long sock_mode = -1;
    const char *wait_file = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--wait-file") && i + 1 < argc) wait_file = argv[++i];
        else if (!strcmp(argv[i], "--stdio")) stdio_mode = 1;
        else if (!strcmp(argv[i], "--listen") && i + 1 < argc) listen_path = argv[++i];
        else if (!strcmp(argv[i], "--vsock") && i + 1 < argc) vsock_port = argv[++i];
        else if (!strcmp(argv[i], "--ready-fd") && i + 1 < argc) ready_fd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--socket-mode") && i + 1 < argc) sock_mode = strtol(argv[++i], NULL, 8);
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) device_path = argv[++i];
        else if (!strcmp(argv[i], "--restrict")) def_restrict = 1;
        else if (!strcmp(argv[i], "--cgroup") && i + 1 < argc) def_cgroup = argv[++i];
        else if (!strcmp(argv[i], "--seccomp") && i + 1 < argc) {
            if (load_bpf(argv[++i]) < 0) return 125;
        } else if (!strcmp(argv[i], "--user") && i + 1 < argc) {
            unsigned u, g;
            if (sscanf(argv[++i], "%u:%u", &u, &g) != 2) {
                fprintf(stderr, "ak-agent: --user wants UID:GID\n");
                return 125;
            }
            def_user = 1, def_uid = u, def_gid = g;
        } else {
            fprintf(stderr, "ak-agent: serve: unknown argument %s\n", argv[i]);
            return 125;
        }
    }
    if (stdio_mode + !!listen_path + !!device_path + !!vsock_port != 1) {
        fprintf(stderr, "usage: ak-agent serve [--wait-file PATH] (--listen PATH [--ready-fd N] [--socket-mode OCTAL] | "
                        "--stdio | --device PATH | --vsock PORT)\n");
        return 125;
    }
    if (wait_file && wait_for_file(wait_file) < 0) return 125;
    static const int handled[] = {SIGTERM, SIGINT, SIGIO};
    setup_signals(handled, device_path ? 3 : 2);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    oom_detect();
    /* children must never see a closed 0..2 (pipes could land there); keep them open */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0) {
            int n = open("/dev/null", O_RDWR);
            if (n >= 0 && n != fd) {
                dup2(n, fd);
                close(n);
            }
        }
    if (stdio_mode) {
        int in = fcntl(0, F_DUPFD_CLOEXEC, 3), out = fcntl(1, F_DUPFD_CLOEXEC, 3);
        if (in < 0 || out < 0) {
            perror("ak-agent: dup");
            return 125;
        }
        int n = open("/dev/null", O_RDWR);
        if (n >= 0) {
            /* keep the transport away from fds 0/1 so nothing else writes into the stream */
            dup2(n, 0);
            dup2(n, 1);
            if (n > 2) close(n);
        }
        conn_new(in, out);
    } else if (vsock_port) {
        /* Firecracker: the host reaches us through its vsock UDS ("CONNECT <port>") */
        struct {
            unsigned short family, reserved1;
            unsigned int port, cid;
            unsigned char zero[4];
        } sv = {40 /* AF_VSOCK */, 0, (unsigned)atoi(vsock_port), 0xFFFFFFFFu /* VMADDR_CID_ANY */, {0}};
        listen_fd = socket(40, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sv, sizeof sv) < 0 || listen(listen_fd, 128) < 0) {
            fprintf(stderr, "ak-agent: listen on vsock port %s: %s\n", vsock_port, strerror(errno));
            return 125;
        }
    } else if (device_path) {
        /* opened once, read-write, for the agent's whole life: the host side comes and goes */
        device_fd = open(device_path, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
        if (device_fd < 0) {
            fprintf(stderr, "ak-agent: open %s: %s\n", device_path, strerror(errno));
            return 125;
        }
        /* SIGIO (armed by device_away) goes to us: without an owner the kernel sends it to no one, and
         * a host reconnecting to an idle agent waits for the safety-net re-poll (25 ms) */
        if (fcntl(device_fd, F_SETOWN, getpid()) < 0) perror("ak-agent: F_SETOWN");
        device_conn = conn_new(device_fd, device_fd);
    } else {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(listen_path) >= sizeof sa.sun_path) {
            fprintf(stderr, "ak-agent: socket path too long: %s\n", listen_path);
            return 125;
        }
        strcpy(sa.sun_path, listen_path);
        struct stat st;
        if (lstat(listen_path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(listen_path);
        listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
            listen(listen_fd, 128) < 0) {
            fprintf(stderr, "ak-agent: listen %s: %s\n", listen_path, strerror(errno));
            return 125;
        }
        if (sock_mode >= 0) chmod(listen_path, (mode_t)sock_mode);
    }
    if (ready_fd >= 0) {
        ssize_t r = write(ready_fd, "ready\n", 6);
        (void)r;
        close(ready_fd);
    }
    return serve_loop();
}

/* ------------------------------------------------------------------------------------------------ */
/* exec mode: a tini-like init for one-shot runs */

/* --status-file: the exact outcome for the host, which cannot tell an engine failure (e.g. podman's
 * 125) from a command that exited 125 by the exit code alone. Written atomically (temp + rename). */
static void write_status(const char *path, int code, int sig, int oom) {
    if (!path) return;
    char tmp[4200], buf[128];
    int n = snprintf(buf, sizeof buf, "exit=%d signal=%d oom=%d\n", code, sig, oom);
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t w = write(fd, buf, n > 0 ? (size_t)n : 0);
    close(fd);
    if (w == n) rename(tmp, path);
    else unlink(tmp);
}

static int exec_main(int argc, char **argv) {
    const char *status_file = NULL, *wait_file = NULL;
    while (argc > 0 && strcmp(argv[0], "--")) {
        if (!strcmp(argv[0], "--status-file") && argc > 1) {
            status_file = argv[1];
            argv += 2, argc -= 2;
        } else if (!strcmp(argv[0], "--wait-file") && argc > 1) {
            wait_file = argv[1];
            argv += 2, argc -= 2;
        } else {
            break;
        }
    }
    if (argc > 0 && !strcmp(argv[0], "--")) argv++, argc--;
    if (argc < 1) {
        fprintf(stderr, "usage: ak-agent exec [--status-file PATH] [--wait-file PATH] -- ARGV...\n");
        return 125;
    }
    if (wait_file && wait_for_file(wait_file) < 0) return 125;
    oom_detect();
    long long oom_before = oom_count();
    static const int fwd[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
    setup_signals(fwd, 7);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    int tty = isatty(0);
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old); /* see exec_start: nothing is lost or mishandled across fork */
    pid_t child = fork();
    if (child != 0) sigprocmask(SIG_SETMASK, &old, NULL);
    if (child < 0) {
        perror("ak-agent: fork");
        return 125;
    }
    if (child == 0) {
        setpgid(0, 0);
        if (tty) {
            signal(SIGTTOU, SIG_IGN); /* blocked anyway, but tcsetpgrp checks the disposition */
            tcsetpgrp(0, getpid());
        }
        reset_signals();
        extern char **environ;
        exec_search(argv, environ, getenv("PATH"));
        int e = errno;
        char msg[512];
        int n = snprintf(msg, sizeof msg, "ak-agent: %s: %s\n", argv[0], strerror(e));
        ssize_t r = write(2, msg, n > 0 ? (size_t)n : 0);
        (void)r;
        _exit(exec_errno_code(e));
    }
    setpgid(child, child);
    for (;;) {
        struct pollfd p = {.fd = sig_pipe[0], .events = POLLIN};
        if (poll(&p, 1, -1) < 0 && errno != EINTR) return 125;
        unsigned char b[64];
        ssize_t n;
        while ((n = read(sig_pipe[0], b, sizeof b)) > 0)
            for (ssize_t k = 0; k < n; k++) {
                if (b[k] == SIGCHLD) continue;
                if (kill(-child, b[k]) < 0) kill(child, b[k]);
            }
        int st;
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            if (pid != child) continue;
            if (WIFEXITED(st)) {
                write_status(status_file, WEXITSTATUS(st), 0, 0);
                return WEXITSTATUS(st);
            }
            int sig = WTERMSIG(st);
            int oom = sig == SIGKILL && oom_before >= 0 && oom_count() > oom_before;
            write_status(status_file, 128 + sig, sig, oom);
            return 128 + sig;
        }
    }
}


/* ------------------------------------------------------------------------------------------------ */
/* vm-init: PID 1 of a microVM (the initramfs's /init). Mounts the pseudo filesystems, loads the kernel
 * modules the initramfs carries (in the order of DIR/order), switches to the root disk, brings up
 * loopback, then serves the agent protocol on the virtio-serial port. */

static void vm_mount(const char *src, const char *dst, const char *type, unsigned long fl, const char *opt) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, fl, opt) < 0 && errno != EBUSY)
        fprintf(stderr, "ak-agent: mount %s on %s: %s\n", type, dst, strerror(errno));
}

static int wait_path(const char *path, int ms) {
    struct stat st;
    for (int i = 0; i < ms; i++) {
        if (stat(path, &st) == 0) return 0;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return stat(path, &st);
}

/* the /dev node of the virtio-serial port called NAME (its vportNpM number depends on device order) */
static int find_port(const char *name, char *out, size_t outlen, int ms) {
    for (int i = 0; i <= ms; i++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char p[300], buf[128];
            snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
            int fd = open(p, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n <= 0) continue;
            buf[n] = 0;
            buf[strcspn(buf, "\n")] = 0;
            if (!strcmp(buf, name)) {
                snprintf(out, outlen, "/dev/%s", e->d_name);
                closedir(d);
                struct stat st;
                if (stat(out, &st) == 0) return 0;
                d = NULL;
                break;
            }
        }
        if (d) closedir(d);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

static void vm_load_modules(const char *dir) {
    char path[512], line[256];
    snprintf(path, sizeof path, "%s/order", dir);
    FILE *f = fopen(path, "re");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        snprintf(path, sizeof path, "%s/%s", dir, line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
            fprintf(stderr, "ak-agent: module %s: %s\n", line, strerror(errno));
        if (fd >= 0) close(fd);
    }
    fclose(f);
}

static void vm_loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    close(s);
}

static int vminit_main(int argc, char **argv) {
    const char *root = NULL, *dev = NULL, *mods = "/ak/modules", *fstype = "ext4", *host = "agentkernel";
    char *sv[12];
    int nsv = 2;
    const char *pids = NULL, *workdir = NULL, *user = NULL, *vport = NULL, *ro_mb = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--root") && i + 1 < argc) root = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) dev = argv[++i];
        else if (!strcmp(argv[i], "--vsock") && i + 1 < argc) vport = argv[++i];
        else if (!strcmp(argv[i], "--modules") && i + 1 < argc) mods = argv[++i];
        else if (!strcmp(argv[i], "--fstype") && i + 1 < argc) fstype = argv[++i];
        else if (!strcmp(argv[i], "--hostname") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--restrict")) sv[nsv++] = argv[i];
        else if (!strcmp(argv[i], "--pids") && i + 1 < argc) pids = argv[++i];
        else if (!strcmp(argv[i], "--workdir") && i + 1 < argc) workdir = argv[++i];
        else if (!strcmp(argv[i], "--readonly") && i + 1 < argc) ro_mb = argv[++i];
        else if (!strcmp(argv[i], "--seccomp") && i + 1 < argc) {
            if (load_bpf(argv[++i]) < 0) return 125; /* read now: the initramfs is left behind below */
        } else if (!strcmp(argv[i], "--user") && i + 1 < argc && nsv < 10) {
            sv[nsv++] = argv[i];
            user = argv[++i];
            sv[nsv++] = argv[i];
        } else {
            fprintf(stderr, "ak-agent: vm-init: unknown argument %s\n", argv[i]);
            return 125;
        }
    }
    if (!dev == !vport) {
        fprintf(stderr, "usage: ak-agent vm-init (--device PATH|name:PORT | --vsock PORT) [--root DEV] [--fstype T] "
                        "[--modules DIR]\n");
        return 125;
    }
    vm_guest = 1;
    vm_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    vm_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    vm_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    vm_load_modules(mods);
    if (root) {
        if (wait_path(root, 10000) < 0) {
            fprintf(stderr, "ak-agent: root device %s did not appear\n", root);
            return 125;
        }
        mkdir("/newroot", 0755);
        if (mount(root, "/newroot", fstype, 0, NULL) < 0) {
            fprintf(stderr, "ak-agent: mount %s: %s\n", root, strerror(errno));
            return 125;
        }
        static const char *const moved[] = {"/dev", "/proc", "/sys"};
        char dst[64];
        for (int i = 0; i < 3; i++) {
            snprintf(dst, sizeof dst, "/newroot%s", moved[i]);
            mkdir(dst, 0755);
            if (mount(moved[i], dst, NULL, MS_MOVE, NULL) < 0)
                fprintf(stderr, "ak-agent: move %s: %s\n", moved[i], strerror(errno));
        }
        if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0) {
            fprintf(stderr, "ak-agent: switch root: %s\n", strerror(errno));
            return 125;
        }
    }
    vm_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
    vm_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    vm_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    if (pids) { /* commands run in a cgroup with pids.max: a fork bomb stops there */
        /* favordynmods: moving a task into a cgroup (every command joins one) takes the threadgroup
         * rwsem for writing, which otherwise waits for an RCU grace period per command (kernel >= 6.0) */
        mkdir("/sys/fs/cgroup", 0755);
        if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "favordynmods") < 0)
            vm_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
        int fd = open("/sys/fs/cgroup/cgroup.subtree_control", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, "+pids", 5) < 0) perror("ak-agent: enable pids controller");
            close(fd);
        }
        mkdir("/sys/fs/cgroup/sandbox", 0755);
        fd = open("/sys/fs/cgroup/sandbox/pids.max", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, pids, strlen(pids)) < 0) {
            fprintf(stderr, "ak-agent: pids.max: %s\n", strerror(errno));
            return 125;
        }
        close(fd);
        sv[nsv++] = "--cgroup";
        sv[nsv++] = "/sys/fs/cgroup/sandbox";
    }
    if (workdir) { /* the commands' working directory exists and belongs to their user */
        char *w = strdup(workdir);
        mkdir_p(w, 0755);
        free(w);
        unsigned u = 0, g = 0;
        if (user && sscanf(user, "%u:%u", &u, &g) == 2 && chown(workdir, u, g) < 0)
            fprintf(stderr, "ak-agent: chown %s: %s\n", workdir, strerror(errno));
    }
    if (ro_mb) { /* read-only root: writable /tmp and workdir are tmpfs of ro_mb MiB each */
        mkdir("/tmp", 01777);
        if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0) {
            fprintf(stderr, "ak-agent: remount / read-only: %s\n", strerror(errno));
            return 125;
        }
        char opt[128];
        snprintf(opt, sizeof opt, "size=%sm,mode=1777", ro_mb);
        if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opt) < 0)
            fprintf(stderr, "ak-agent: tmpfs on /tmp: %s\n", strerror(errno));
        if (workdir && strcmp(workdir, "/tmp")) {
            unsigned u = 0, g = 0;
            if (user) sscanf(user, "%u:%u", &u, &g);
            snprintf(opt, sizeof opt, "size=%sm,mode=0755,uid=%u,gid=%u", ro_mb, u, g);
            if (mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, opt) < 0)
                fprintf(stderr, "ak-agent: tmpfs on %s: %s\n", workdir, strerror(errno));
        }
    }
    sethostname(host, strlen(host));
    vm_loopback_up();
    setenv("PATH", DEFAULT_PATH, 1);
    static char port[300];
    if (vport) {
        sv[0] = "--vsock";
        sv[1] = (char *)vport;
        return serve_main(nsv, sv);
    }
    if (!strncmp(dev, "name:", 5)) {
        if (find_port(dev + 5, port, sizeof port, 10000) < 0) {
            fprintf(stderr, "ak-agent: no virtio-serial port named %s appeared\n", dev + 5);
            return 125;
        }
        dev = port;
    } else if (wait_path(dev, 10000) < 0) {
        fprintf(stderr, "ak-agent: agent port %s did not appear\n", dev);
        return 125;
    }
    sv[0] = "--device";
    sv[1] = (char *)dev;
    return serve_main(nsv, sv);
}

/* ---- spawn-runtime: the host side of the oci backend (never run inside a sandbox) -------------------
 *
 * Starts an OCI runtime (crun, runc, runsc) the way agentkernel.oci.runtime.Preexec does between fork and
 * exec, so that the Python parent needs no preexec hook and can vfork (a Python preexec_fn forces a full
 * fork() of the whole, possibly large and multithreaded, parent):
 *   --pdeathsig PPID   die (SIGKILL) with the parent; exits at once if PPID is no longer the parent
 *   --overlay T OPTS   unshare(CLONE_NEWNS), make / a recursive slave (host mounts still propagate in,
 *                      ours never out), mount the overlay OPTS at T: only this private namespace (and
 *                      the container's, a copy of it) ever has the sandbox's root mounted
 *   --tmpfs T OPTS     (with --overlay) a tmpfs (nosuid, nodev, OPTS) at T in that namespace first: the
 *                      writable layer of a one-shot run, which then never appears on the host either
 *   --mkdir P MODE UID GID   (with --overlay, after the tmpfs) mkdir -p P (MODE octal), chown the last
 *                      one to UID:GID (parents: 0755, root)
 *   --ro-runtime       (with --overlay) bind-mount RUNTIME read-only onto itself in that namespace and
 *                      set _LIBCONTAINER_CLONED_BINARY=1: crun's own guard against a container
 *                      overwriting the runtime binary through /proc/self/exe (CVE-2019-5736) accepts a
 *                      read-only mount of it and skips making one itself (a temporary file, a bind mount
 *                      and a second exec of crun: ~1.5 ms of CPU per start)
 *   --close-fds        close every fd >= 3 before exec (for a parent that could not close them itself)
 * then execv(RUNTIME, [RUNTIME, ARGS...]). A failed step prints "agentkernel: oci: WHAT: REASON" and
 * exits 125 (the runtime never ran); a failed exec exits 127 (not found) or 126. */
#define SPAWN_USAGE                                                                                    \
    "usage: ak-agent spawn-runtime [--pdeathsig PPID] [--overlay TARGET OPTIONS [--tmpfs TARGET OPTIONS]" \
    " [--mkdir PATH MODE UID GID]... [--ro-runtime]] [--close-fds] -- RUNTIME ARGS...\n"
#define SPAWN_MAX 16

static int spawn_fail(const char *what, const char *path) {
    int e = errno;
    if (path) fprintf(stderr, "agentkernel: oci: %s %s: %s\n", what, path, strerror(e));
    else fprintf(stderr, "agentkernel: oci: %s: %s\n", what, strerror(e));
    return 125;
}

static int mkdir_owned(char *path, mode_t mode, uid_t uid, gid_t gid) {
    if (mkdir_p(path, mode) != 0 || chmod(path, mode) != 0) return -1; /* chmod: not subject to the umask */
    return chown(path, uid, gid);
}

static int spawn_runtime_main(int argc, char **argv) {
    long parent = 0;
    const char *target = NULL, *opts = NULL, *tmpfs = NULL, *tmpfs_opts = NULL;
    char *mk[SPAWN_MAX];
    mode_t mk_mode[SPAWN_MAX];
    uid_t mk_uid[SPAWN_MAX];
    gid_t mk_gid[SPAWN_MAX];
    int nmk = 0, close_fds = 0, ro_runtime = 0;
    while (argc > 0 && strcmp(argv[0], "--")) {
        if (!strcmp(argv[0], "--pdeathsig") && argc > 1) {
            parent = strtol(argv[1], NULL, 10);
            argv += 2, argc -= 2;
        } else if (!strcmp(argv[0], "--overlay") && argc > 2) {
            target = argv[1], opts = argv[2];
            argv += 3, argc -= 3;
        } else if (!strcmp(argv[0], "--tmpfs") && argc > 2) {
            tmpfs = argv[1], tmpfs_opts = argv[2];
            argv += 3, argc -= 3;
        } else if (!strcmp(argv[0], "--mkdir") && argc > 4 && nmk < SPAWN_MAX && argv[1][0] == '/') {
            mk[nmk] = argv[1];
            mk_mode[nmk] = (mode_t)strtol(argv[2], NULL, 8);
            mk_uid[nmk] = (uid_t)strtol(argv[3], NULL, 10);
            mk_gid[nmk] = (gid_t)strtol(argv[4], NULL, 10);
            nmk++;
            argv += 5, argc -= 5;
        } else if (!strcmp(argv[0], "--close-fds")) {
            close_fds = 1;
            argv++, argc--;
        } else if (!strcmp(argv[0], "--ro-runtime")) {
            ro_runtime = 1;
            argv++, argc--;
        } else {
            break;
        }
    }
    if (argc > 0 && !strcmp(argv[0], "--")) argv++, argc--;
    if (argc < 1 || argv[0][0] != '/' || ((tmpfs || nmk || ro_runtime) && !target)) {
        fputs(SPAWN_USAGE, stderr);
        return 125;
    }
    if (parent > 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) return spawn_fail("prctl(PR_SET_PDEATHSIG)", NULL);
        if (getppid() != (pid_t)parent) { /* the parent died before the prctl: nobody to run for */
            fputs("agentkernel: oci: the parent process is gone\n", stderr);
            return 125;
        }
    }
    if (target) {
        if (unshare(CLONE_NEWNS) != 0) return spawn_fail("unshare(CLONE_NEWNS)", NULL);
        if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0) return spawn_fail("making / a slave mount", NULL);
        if (tmpfs && mount("tmpfs", tmpfs, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs_opts) != 0)
            return spawn_fail("mounting a tmpfs at", tmpfs);
        for (int i = 0; i < nmk; i++)
            if (mkdir_owned(mk[i], mk_mode[i], mk_uid[i], mk_gid[i]) != 0) return spawn_fail("creating", mk[i]);
        if (mount("overlay", target, "overlay", 0, opts) != 0) return spawn_fail("mounting the overlay root", NULL);
        if (ro_runtime) {
            if (mount(argv[0], argv[0], NULL, MS_BIND, NULL) != 0 ||
                mount(NULL, argv[0], NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL) != 0)
                return spawn_fail("bind-mounting read-only", argv[0]);
            if (setenv("_LIBCONTAINER_CLONED_BINARY", "1", 1) != 0) return spawn_fail("setenv", NULL);
        }
    }
    if (close_fds) close_from(3);
    execv(argv[0], argv);
    int e = errno;
    fprintf(stderr, "agentkernel: oci: cannot run %s: %s\n", argv[0], strerror(e));
    return exec_errno_code(e);
}

/* ---- watch-owner: agentkernel.deathwatch's watcher (on the host, never inside a sandbox) ------------
 *
 *   ak-agent watch-owner --fd N -- PROGRAM ARGS...
 * Blocks reading fd N, the read end of a pipe whose only write end the owner (a daemon-less CLI run)
 * holds. One byte: the owner finished normally, exit 0. EOF: the owner died without saying so (e.g.
 * SIGKILL): exec PROGRAM (agentkernel's reaper for the owner's sandbox). Every other fd >= 3 is closed
 * first. A small static process instead of a fork() of the owning Python process, whose every page
 * the owner would then copy on write while the watcher lives. */
static int watch_owner_main(int argc, char **argv) {
    int fd = -1;
    if (argc >= 2 && !strcmp(argv[0], "--fd")) {
        fd = atoi(argv[1]);
        argv += 2, argc -= 2;
    }
    if (argc > 0 && !strcmp(argv[0], "--")) argv++, argc--;
    if (fd < 0 || argc < 1 || argv[0][0] != '/') {
        fputs("usage: ak-agent watch-owner --fd N -- PROGRAM ARGS...\n", stderr);
        return 125;
    }
    if (fd != 3) {
        if (dup2(fd, 3) < 0) return 125;
        close(fd);
    }
    close_from(4);
    char b;
    ssize_t n;
    do n = read(3, &b, 1);
    while (n < 0 && errno == EINTR);
    if (n == 1) return 0;
    close(3);
    execv(argv[0], argv);
    return exec_errno_code(errno);
}

int main(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version"))) {
        printf("ak-agent %s (protocol %d)\n", AK_AGENT_VERSION, PROTO_VERSION);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "serve")) return serve_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "exec")) return exec_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "spawn-runtime")) return spawn_runtime_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "watch-owner")) return watch_owner_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "vm-init")) {
        int rc = vminit_main(argc - 2, argv + 2);
        if (getpid() == 1) { /* PID 1 must not exit: the kernel would panic; power off instead */
            sync();
            reboot(RB_POWER_OFF);
        }
        return rc;
    }
    fprintf(stderr,
            "usage: ak-agent serve --listen PATH [--ready-fd N] [--socket-mode OCTAL]\n"
            "       ak-agent serve --stdio\n"
            "       ak-agent serve --device PATH | --vsock PORT\n"
            "       ak-agent vm-init --device PATH|name:PORT|--vsock PORT [--root DEV] [--fstype T] [--modules DIR] [--hostname H]\n"
            "       ak-agent exec [--status-file PATH] [--wait-file PATH] -- ARGV...\n"
            "       ak-agent spawn-runtime [--pdeathsig PPID] [--overlay TARGET OPTIONS [--tmpfs TARGET OPTIONS]\n"
            "                              [--mkdir PATH MODE UID GID]... [--ro-runtime]] [--close-fds] -- RUNTIME ARGS...\n"
            "       ak-agent watch-owner --fd N -- PROGRAM ARGS...\n"
            "       ak-agent --version\n");
    return 125;
}
