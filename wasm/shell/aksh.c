/*
 * aksh: the agentkernel Wasm shell. A small POSIX-flavoured shell compiled to WASI (wasm32-wasi) whose
 * commands are built-ins: WASI has no fork/exec, so `echo`, `cat`, `grep`... live in this module.
 *
 *   aksh -c 'echo a | wc -c; ls /'     run a script          (also as argv[0] = sh / bash)
 *   echo hello                         argv[0] selects a built-in (the host passes argv unchanged)
 *   aksh < script                      read the script from stdin
 *
 * Syntax: ; && || | (pipes through in-memory buffers), > >> < 2> 2>> 2>&1 >&2 &>, '...' "..." \x,
 * $VAR ${VAR} $? $# $0..$9 $@ $(...), VAR=value [cmd], # comments, globbing (* ? [...]) on unquoted
 * words. Not supported: if/for/while/case, functions, background jobs (& runs in the foreground).
 *
 * Unknown commands: "aksh: NAME: command not found" on stderr and status 127.
 * On start the shell changes to $PWD when it is set (the host sets it to the sandbox's workdir).
 *
 * Build: clang --target=wasm32-wasi -O2 (see wasm/Makefile).
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <glob.h>
#include <limits.h>
#include <regex.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------- */
/* buffers and output                                                                              */

typedef struct {
    char *p;
    size_t n, cap;
} Buf;

static void oom(void) {
    static const char m[] = "aksh: out of memory (the sandbox's memory cap)\n";
    write(2, m, sizeof m - 1);
    _Exit(137);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) oom();
    return p;
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) oom();
    return p;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s);
    char *d = xmalloc(n + 1);
    memcpy(d, s, n + 1);
    return d;
}

static void buf_add(Buf *b, const void *d, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n + 1) c *= 2;
        b->p = xrealloc(b->p, c);
        b->cap = c;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void buf_addc(Buf *b, char c) { buf_add(b, &c, 1); }
static void buf_adds(Buf *b, const char *s) { buf_add(b, s, strlen(s)); }
static void buf_free(Buf *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Where a command reads and writes. Output goes to a buffer (pipes, $(...)) or to an fd (buffered). */
typedef struct {
    const char *in;  /* stdin contents when in_fd < 0 */
    size_t inlen;
    int in_fd;       /* read stdin from this fd when >= 0 */
    Buf *out;        /* capture stdout here, or ... */
    int out_fd;      /* ... write it to this fd */
    Buf *err;        /* capture stderr here (2>&1 into a pipe), or ... */
    int err_fd;      /* ... write it to this fd */
} Io;

static Buf fdbuf[2]; /* pending writes for out fd (index 0) and err fd (index 1) */
static int fdbuf_fd[2] = {-1, -1};

static void flush_fd(int i) {
    if (fdbuf[i].n && fdbuf_fd[i] >= 0) write_all(fdbuf_fd[i], fdbuf[i].p, fdbuf[i].n);
    fdbuf[i].n = 0;
}

static void fd_out(int slot, int fd, const char *s, size_t n) {
    if (fdbuf_fd[slot] != fd) {
        flush_fd(slot);
        fdbuf_fd[slot] = fd;
    }
    buf_add(&fdbuf[slot], s, n);
    if (fdbuf[slot].n >= 65536) flush_fd(slot);
}

static void flush_all(void) {
    flush_fd(0);
    flush_fd(1);
}

static void out_write(Io *io, const char *s, size_t n) {
    if (io->out) buf_add(io->out, s, n);
    else fd_out(0, io->out_fd, s, n);
}

static void out_puts(Io *io, const char *s) { out_write(io, s, strlen(s)); }

static void out_printf(Io *io, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        out_write(io, tmp, (size_t)n);
        return;
    }
    char *big = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    out_write(io, big, (size_t)n);
    free(big);
}

static void err_printf(Io *io, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof tmp) n = sizeof tmp - 1;
    if (io->err) buf_add(io->err, tmp, (size_t)n);
    else {
        flush_fd(0); /* keep stdout/stderr ordering sensible on a terminal */
        fd_out(1, io->err_fd, tmp, (size_t)n);
        flush_fd(1);
    }
}

/* Read all of a file descriptor. */
static int read_fd_all(int fd, Buf *b) {
    char tmp[16384];
    for (;;) {
        ssize_t r = read(fd, tmp, sizeof tmp);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) return 0;
        buf_add(b, tmp, (size_t)r);
    }
}

static int read_file_all(const char *path, Buf *b) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        close(fd);
        errno = EISDIR;
        return -1;
    }
    int r = read_fd_all(fd, b);
    int e = errno;
    close(fd);
    errno = e;
    return r;
}

/* The command's stdin as one buffer (read once; stdin fd is drained). */
static void in_all(Io *io, const char **p, size_t *n) {
    static Buf stdin_buf;
    static int stdin_read = 0;
    if (io->in_fd < 0) {
        *p = io->in ? io->in : "";
        *n = io->inlen;
        return;
    }
    if (io->in_fd == 0) {
        if (!stdin_read) {
            read_fd_all(0, &stdin_buf);
            stdin_read = 1;
            *p = stdin_buf.p ? stdin_buf.p : "";
            *n = stdin_buf.n;
            return;
        }
        *p = "";
        *n = 0;
        return;
    }
    Buf b = {0};
    read_fd_all(io->in_fd, &b);
    *p = b.p ? b.p : "";
    *n = b.n; /* leaked on purpose: the command is short-lived */
}

/* Input of a file operand ("-" = stdin). Returns 0 or -1 with errno. */
static int operand_data(Io *io, const char *path, const char **p, size_t *n, Buf *hold) {
    if (strcmp(path, "-") == 0) {
        in_all(io, p, n);
        return 0;
    }
    hold->n = 0;
    if (read_file_all(path, hold) < 0) return -1;
    *p = hold->p ? hold->p : "";
    *n = hold->n;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* shell state                                                                                     */

static int last_status = 0;
static int exit_requested = 0;
static int exit_value = 0;
static int script_argc = 0;
static char **script_argv = NULL; /* $0 $1 ... */

static const char *getvar(const char *name) {
    static char num[32];
    if (strcmp(name, "?") == 0) {
        snprintf(num, sizeof num, "%d", last_status);
        return num;
    }
    if (strcmp(name, "#") == 0) {
        snprintf(num, sizeof num, "%d", script_argc > 0 ? script_argc - 1 : 0);
        return num;
    }
    if (strcmp(name, "$") == 0) return "1";
    if (isdigit((unsigned char)name[0]) && name[1] == 0) {
        int i = name[0] - '0';
        return i < script_argc ? script_argv[i] : "";
    }
    const char *v = getenv(name);
    return v ? v : "";
}

/* ---------------------------------------------------------------------------------------------- */
/* built-ins                                                                                       */

typedef int (*builtin_fn)(int argc, char **argv, Io *io);

static int parse_count(const char *s, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s) return -1;
    *out = v;
    return 0;
}

static void put_escape(Buf *o, const char **ps, int *stop) {
    const char *s = *ps; /* at the char after the backslash */
    switch (*s) {
    case 'n': buf_addc(o, '\n'); break;
    case 't': buf_addc(o, '\t'); break;
    case 'r': buf_addc(o, '\r'); break;
    case 'a': buf_addc(o, '\a'); break;
    case 'b': buf_addc(o, '\b'); break;
    case 'f': buf_addc(o, '\f'); break;
    case 'v': buf_addc(o, '\v'); break;
    case 'e': buf_addc(o, 27); break;
    case '\\': buf_addc(o, '\\'); break;
    case 'c':
        if (stop) *stop = 1;
        break;
    case '0': {
        int v = 0, k = 0;
        while (k < 3 && s[1] >= '0' && s[1] <= '7') {
            v = v * 8 + (s[1] - '0');
            s++;
            k++;
        }
        buf_addc(o, (char)v);
        break;
    }
    case 'x': {
        int v = 0, k = 0;
        while (k < 2 && isxdigit((unsigned char)s[1])) {
            char c = s[1];
            v = v * 16 + (isdigit((unsigned char)c) ? c - '0' : (tolower((unsigned char)c) - 'a' + 10));
            s++;
            k++;
        }
        if (k == 0) {
            buf_adds(o, "\\x");
        } else buf_addc(o, (char)v);
        break;
    }
    case 0:
        buf_addc(o, '\\');
        *ps = s;
        return;
    default:
        buf_addc(o, '\\');
        buf_addc(o, *s);
    }
    *ps = s + 1;
}

static int b_echo(int argc, char **argv, Io *io) {
    int nl = 1, esc = 0, i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || !a[1]) break;
        int ok = 1;
        for (const char *c = a + 1; *c; c++)
            if (*c != 'n' && *c != 'e' && *c != 'E') ok = 0;
        if (!ok) break;
        for (const char *c = a + 1; *c; c++) {
            if (*c == 'n') nl = 0;
            else if (*c == 'e') esc = 1;
            else esc = 0;
        }
    }
    Buf o = {0};
    int stop = 0;
    for (int first = 1; i < argc && !stop; i++, first = 0) {
        if (!first) buf_addc(&o, ' ');
        const char *s = argv[i];
        if (!esc) {
            buf_adds(&o, s);
            continue;
        }
        while (*s && !stop) {
            if (*s == '\\') {
                s++;
                put_escape(&o, &s, &stop);
            } else buf_addc(&o, *s++);
        }
    }
    if (nl && !stop) buf_addc(&o, '\n');
    out_write(io, o.p ? o.p : "", o.n);
    buf_free(&o);
    return 0;
}

static int b_printf(int argc, char **argv, Io *io) {
    if (argc < 2) {
        err_printf(io, "printf: usage: printf FORMAT [ARGUMENT]...\n");
        return 2;
    }
    const char *fmt = argv[1];
    int ai = 2, status = 0;
    Buf o = {0};
    do {
        int used = 0, stop = 0;
        for (const char *s = fmt; *s && !stop;) {
            if (*s == '\\') {
                s++;
                put_escape(&o, &s, &stop);
                continue;
            }
            if (*s != '%') {
                buf_addc(&o, *s++);
                continue;
            }
            if (s[1] == '%') {
                buf_addc(&o, '%');
                s += 2;
                continue;
            }
            char spec[64];
            size_t k = 0;
            spec[k++] = *s++;
            while (*s && strchr("-+ #0", *s) && k < 20) spec[k++] = *s++;
            while (*s && (isdigit((unsigned char)*s) || *s == '.') && k < 40) spec[k++] = *s++;
            char conv = *s ? *s++ : 0;
            const char *arg = ai < argc ? argv[ai++] : NULL;
            used = 1;
            char tmp[4096];
            if (conv == 's' || conv == 'b') {
                Buf sb = {0};
                const char *a = arg ? arg : "";
                if (conv == 'b') {
                    while (*a) {
                        if (*a == '\\') {
                            a++;
                            put_escape(&sb, &a, &stop);
                        } else buf_addc(&sb, *a++);
                    }
                } else buf_adds(&sb, a);
                spec[k++] = 's';
                spec[k] = 0;
                int n = snprintf(NULL, 0, spec, sb.p ? sb.p : "");
                char *t = xmalloc((size_t)n + 1);
                snprintf(t, (size_t)n + 1, spec, sb.p ? sb.p : "");
                buf_add(&o, t, (size_t)n);
                free(t);
                buf_free(&sb);
            } else if (conv && strchr("diouxXc", conv)) {
                long long v = 0;
                if (arg && *arg) {
                    char *end;
                    if ((arg[0] == '\'' || arg[0] == '"') && arg[1]) v = (unsigned char)arg[1];
                    else {
                        v = strtoll(arg, &end, 0);
                        if (*end) {
                            err_printf(io, "printf: %s: invalid number\n", arg);
                            status = 1;
                        }
                    }
                }
                if (conv == 'c') {
                    spec[k++] = 'c';
                    spec[k] = 0;
                    snprintf(tmp, sizeof tmp, spec, arg && *arg ? arg[0] : 0);
                    buf_add(&o, tmp, arg && *arg ? strlen(tmp) : 0);
                    if (!(arg && *arg)) buf_addc(&o, 0), o.n--;
                } else {
                    spec[k++] = 'l';
                    spec[k++] = 'l';
                    spec[k++] = conv;
                    spec[k] = 0;
                    snprintf(tmp, sizeof tmp, spec, v);
                    buf_adds(&o, tmp);
                }
            } else if (conv && strchr("feEgGaA", conv)) {
                double v = arg ? strtod(arg, NULL) : 0;
                spec[k++] = conv;
                spec[k] = 0;
                snprintf(tmp, sizeof tmp, spec, v);
                buf_adds(&o, tmp);
            } else {
                err_printf(io, "printf: %%%c: invalid directive\n", conv ? conv : ' ');
                status = 1;
                if (arg) ai--;
            }
        }
        if (!used || stop) break;
    } while (ai < argc);
    out_write(io, o.p ? o.p : "", o.n);
    buf_free(&o);
    return status;
}

static int b_cat(int argc, char **argv, Io *io) {
    int number = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        }
        if (strcmp(argv[i], "-n") == 0) number = 1;
        else if (strcmp(argv[i], "-u") == 0) continue;
        else {
            err_printf(io, "cat: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    static char *dash[] = {"-"};
    char **files = i < argc ? argv + i : dash;
    int nfiles = i < argc ? argc - i : 1;
    long line = 1;
    Buf hold = {0};
    for (int f = 0; f < nfiles; f++) {
        const char *p;
        size_t n;
        if (operand_data(io, files[f], &p, &n, &hold) < 0) {
            err_printf(io, "cat: %s: %s\n", files[f], strerror(errno));
            status = 1;
            continue;
        }
        if (!number) {
            out_write(io, p, n);
            continue;
        }
        size_t s = 0;
        while (s < n) {
            const char *e = memchr(p + s, '\n', n - s);
            size_t len = e ? (size_t)(e - (p + s)) + 1 : n - s;
            out_printf(io, "%6ld\t", line++);
            out_write(io, p + s, len);
            s += len;
        }
    }
    buf_free(&hold);
    return status;
}

static int cmpstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void mode_string(mode_t m, char *s) {
    s[0] = S_ISDIR(m) ? 'd' : S_ISLNK(m) ? 'l' : S_ISREG(m) ? '-' : '?';
    strcpy(s + 1, S_ISDIR(m) ? "rwxr-xr-x" : "rw-r--r--"); /* WASI has no permission bits */
}

static void ls_entry(Io *io, const char *dir, const char *name, int lng) {
    if (!lng) {
        out_printf(io, "%s\n", name);
        return;
    }
    char path[PATH_MAX];
    if (dir) snprintf(path, sizeof path, "%s/%s", dir, name);
    else snprintf(path, sizeof path, "%s", name);
    struct stat st;
    if (lstat(path, &st) < 0) {
        out_printf(io, "?????????? ? %s\n", name);
        return;
    }
    char ms[12], tb[32];
    mode_string(st.st_mode, ms);
    time_t t = st.st_mtim.tv_sec;
    struct tm *tm = gmtime(&t);
    if (tm) strftime(tb, sizeof tb, "%Y-%m-%d %H:%M", tm);
    else strcpy(tb, "?");
    out_printf(io, "%s %2lu user user %8lld %s %s\n", ms, (unsigned long)st.st_nlink, (long long)st.st_size, tb,
               name);
}

static int b_ls(int argc, char **argv, Io *io) {
    int all = 0, almost = 0, lng = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        for (const char *c = argv[i] + 1; *c; c++) {
            if (*c == 'a') all = 1;
            else if (*c == 'A') almost = 1;
            else if (*c == 'l') lng = 1;
            else if (*c == '1') continue;
            else {
                err_printf(io, "ls: unknown option -%c\n", *c);
                return 2;
            }
        }
    }
    static char *dot[] = {"."};
    char **paths = i < argc ? argv + i : dot;
    int np = i < argc ? argc - i : 1;
    int printed = 0;
    /* files first, then directories (like ls) */
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < np; k++) {
            struct stat st;
            if (stat(paths[k], &st) < 0) {
                if (pass == 0) {
                    err_printf(io, "ls: cannot access '%s': %s\n", paths[k], strerror(errno));
                    status = 2;
                }
                continue;
            }
            if (!S_ISDIR(st.st_mode)) {
                if (pass == 0) {
                    ls_entry(io, NULL, paths[k], lng);
                    printed++;
                }
                continue;
            }
            if (pass == 0) continue;
            DIR *d = opendir(paths[k]);
            if (!d) {
                err_printf(io, "ls: cannot open directory '%s': %s\n", paths[k], strerror(errno));
                status = 2;
                continue;
            }
            char **names = NULL;
            size_t nn = 0, cap = 0;
            struct dirent *de;
            while ((de = readdir(d))) {
                const char *nm = de->d_name;
                if (nm[0] == '.' && !all) {
                    if (!almost) continue;
                    if (!strcmp(nm, ".") || !strcmp(nm, "..")) continue;
                }
                if (nn == cap) {
                    cap = cap ? cap * 2 : 32;
                    names = xrealloc(names, cap * sizeof *names);
                }
                names[nn++] = xstrdup(nm);
            }
            closedir(d);
            if (all) { /* WASI readdir may not report . and .. */
                int hasdot = 0, hasdotdot = 0;
                for (size_t q = 0; q < nn; q++) {
                    if (!strcmp(names[q], ".")) hasdot = 1;
                    if (!strcmp(names[q], "..")) hasdotdot = 1;
                }
                if (nn + 2 > cap) names = xrealloc(names, (cap = nn + 2) * sizeof *names);
                if (!hasdot) names[nn++] = xstrdup(".");
                if (!hasdotdot) names[nn++] = xstrdup("..");
            }
            qsort(names, nn, sizeof *names, cmpstr);
            if (np > 1) out_printf(io, "%s%s:\n", printed ? "\n" : "", paths[k]);
            if (lng) out_printf(io, "total %zu\n", nn);
            for (size_t q = 0; q < nn; q++) {
                ls_entry(io, paths[k], names[q], lng);
                free(names[q]);
            }
            free(names);
            printed++;
        }
    }
    return status;
}

static int b_wc(int argc, char **argv, Io *io) {
    int fl = 0, fw = 0, fc = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++)
        for (const char *c = argv[i] + 1; *c; c++) {
            if (*c == 'l') fl = 1;
            else if (*c == 'w') fw = 1;
            else if (*c == 'c' || *c == 'm') fc = 1;
            else {
                err_printf(io, "wc: unknown option -%c\n", *c);
                return 2;
            }
        }
    if (!fl && !fw && !fc) fl = fw = fc = 1;
    static char *dash[] = {"-"};
    char **files = i < argc ? argv + i : dash;
    int nf = i < argc ? argc - i : 1;
    long long tl = 0, tw = 0, tc = 0;
    Buf hold = {0};
    int single = (fl + fw + fc) == 1 && i >= argc;
    for (int f = 0; f < nf; f++) {
        const char *p;
        size_t n;
        if (operand_data(io, files[f], &p, &n, &hold) < 0) {
            err_printf(io, "wc: %s: %s\n", files[f], strerror(errno));
            status = 1;
            continue;
        }
        long long l = 0, w = 0, inw = 0;
        for (size_t k = 0; k < n; k++) {
            unsigned char c = (unsigned char)p[k];
            if (c == '\n') l++;
            if (isspace(c)) inw = 0;
            else if (!inw) {
                inw = 1;
                w++;
            }
        }
        tl += l;
        tw += w;
        tc += (long long)n;
        Buf line = {0};
        char t[32];
        if (fl) {
            snprintf(t, sizeof t, single ? "%lld" : "%7lld", l);
            buf_adds(&line, t);
        }
        if (fw) {
            snprintf(t, sizeof t, single ? "%lld" : (line.n ? " %7lld" : "%7lld"), w);
            buf_adds(&line, t);
        }
        if (fc) {
            snprintf(t, sizeof t, single ? "%lld" : (line.n ? " %7lld" : "%7lld"), (long long)n);
            buf_adds(&line, t);
        }
        if (i < argc) {
            buf_addc(&line, ' ');
            buf_adds(&line, files[f]);
        }
        buf_addc(&line, '\n');
        out_write(io, line.p, line.n);
        buf_free(&line);
    }
    if (nf > 1) {
        if (fl) out_printf(io, "%7lld ", tl);
        if (fw) out_printf(io, "%7lld ", tw);
        if (fc) out_printf(io, "%7lld ", tc);
        out_puts(io, "total\n");
    }
    buf_free(&hold);
    return status;
}

/* head / tail: -n N, -N, -c N, tail -n +N */
static int head_tail(int argc, char **argv, Io *io, int tail) {
    const char *name = tail ? "tail" : "head";
    long count = 10;
    int bytes = 0, from_start = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        const char *val = NULL;
        if ((a[1] == 'n' || a[1] == 'c')) {
            bytes = a[1] == 'c';
            val = a[2] ? a + 2 : (i + 1 < argc ? argv[++i] : NULL);
        } else if (isdigit((unsigned char)a[1])) val = a + 1;
        else {
            err_printf(io, "%s: unknown option %s\n", name, a);
            return 2;
        }
        if (!val) {
            err_printf(io, "%s: option requires an argument\n", name);
            return 2;
        }
        if (tail && val[0] == '+') {
            from_start = 1;
            val++;
        }
        if (parse_count(val, &count) < 0 || count < 0) {
            err_printf(io, "%s: invalid number of lines: '%s'\n", name, val);
            return 2;
        }
    }
    static char *dash[] = {"-"};
    char **files = i < argc ? argv + i : dash;
    int nf = i < argc ? argc - i : 1;
    Buf hold = {0};
    for (int f = 0; f < nf; f++) {
        const char *p;
        size_t n;
        if (operand_data(io, files[f], &p, &n, &hold) < 0) {
            err_printf(io, "%s: cannot open '%s' for reading: %s\n", name, files[f], strerror(errno));
            status = 1;
            continue;
        }
        if (nf > 1) out_printf(io, "%s==> %s <==\n", f ? "\n" : "", files[f]);
        size_t start = 0, end = n;
        if (bytes) {
            if (!tail) end = (size_t)count < n ? (size_t)count : n;
            else if (from_start) start = count > 0 ? ((size_t)(count - 1) < n ? (size_t)(count - 1) : n) : 0;
            else start = (size_t)count < n ? n - (size_t)count : 0;
        } else if (!tail) {
            long seen = 0;
            size_t k = 0;
            while (k < n && seen < count) {
                const char *e = memchr(p + k, '\n', n - k);
                k = e ? (size_t)(e - p) + 1 : n;
                seen++;
            }
            end = k;
        } else if (from_start) {
            long line = 1;
            size_t k = 0;
            while (k < n && line < count) {
                const char *e = memchr(p + k, '\n', n - k);
                if (!e) {
                    k = n;
                    break;
                }
                k = (size_t)(e - p) + 1;
                line++;
            }
            start = k;
        } else {
            long seen = 0;
            size_t k = n;
            if (k > 0 && p[k - 1] == '\n') k--; /* the final newline ends the last line */
            while (k > 0) {
                if (p[k - 1] == '\n') {
                    if (++seen == count) break;
                }
                k--;
            }
            start = count == 0 ? n : k;
        }
        out_write(io, p + start, end - start);
    }
    buf_free(&hold);
    return status;
}

static int b_head(int argc, char **argv, Io *io) { return head_tail(argc, argv, io, 0); }
static int b_tail(int argc, char **argv, Io *io) { return head_tail(argc, argv, io, 1); }

static const char *ci_strstr(const char *h, size_t hn, const char *n, int icase) {
    size_t nn = strlen(n);
    if (nn == 0) return h;
    for (size_t i = 0; i + nn <= hn; i++) {
        size_t k = 0;
        for (; k < nn; k++) {
            char a = h[i + k], b = n[k];
            if (icase) {
                a = (char)tolower((unsigned char)a);
                b = (char)tolower((unsigned char)b);
            }
            if (a != b) break;
        }
        if (k == nn) return h + i;
    }
    return NULL;
}

static int b_grep(int argc, char **argv, Io *io) {
    int icase = 0, invert = 0, count = 0, number = 0, fixed = 0, ext = 0, quiet = 0, listf = 0, hname = -1;
    int i = 1;
    const char *pattern = NULL;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (!strcmp(argv[i], "-e")) {
            if (i + 1 >= argc) {
                err_printf(io, "grep: option requires an argument -- 'e'\n");
                return 2;
            }
            pattern = argv[++i];
            continue;
        }
        for (const char *c = argv[i] + 1; *c; c++) {
            switch (*c) {
            case 'i': icase = 1; break;
            case 'v': invert = 1; break;
            case 'c': count = 1; break;
            case 'n': number = 1; break;
            case 'F': fixed = 1; break;
            case 'E': ext = 1; break;
            case 'G': ext = 0; break;
            case 'q': quiet = 1; break;
            case 'l': listf = 1; break;
            case 'h': hname = 0; break;
            case 'H': hname = 1; break;
            case 's': break;
            default: err_printf(io, "grep: unknown option -%c\n", *c); return 2;
            }
        }
    }
    if (!pattern) {
        if (i >= argc) {
            err_printf(io, "usage: grep [-icnvFEqlhH] PATTERN [FILE]...\n");
            return 2;
        }
        pattern = argv[i++];
    }
    regex_t re;
    if (!fixed) {
        int rc = regcomp(&re, pattern, (ext ? REG_EXTENDED : 0) | (icase ? REG_ICASE : 0) | REG_NOSUB);
        if (rc) {
            char eb[256];
            regerror(rc, &re, eb, sizeof eb);
            err_printf(io, "grep: invalid regular expression '%s': %s\n", pattern, eb);
            return 2;
        }
    }
    static char *dash[] = {"-"};
    char **files = i < argc ? argv + i : dash;
    int nf = i < argc ? argc - i : 1;
    if (hname < 0) hname = nf > 1;
    int any = 0, status_err = 0;
    Buf hold = {0}, line = {0};
    for (int f = 0; f < nf; f++) {
        const char *p;
        size_t n;
        if (operand_data(io, files[f], &p, &n, &hold) < 0) {
            err_printf(io, "grep: %s: %s\n", files[f], strerror(errno));
            status_err = 1;
            continue;
        }
        const char *fname = strcmp(files[f], "-") ? files[f] : "(standard input)";
        long matches = 0, ln = 0;
        size_t k = 0;
        while (k < n) {
            const char *e = memchr(p + k, '\n', n - k);
            size_t len = e ? (size_t)(e - (p + k)) : n - k;
            ln++;
            int m;
            if (fixed) m = ci_strstr(p + k, len, pattern, icase) != NULL;
            else {
                line.n = 0;
                buf_add(&line, p + k, len);
                m = regexec(&re, line.p ? line.p : "", 0, NULL, 0) == 0;
            }
            if (m != invert) {
                matches++;
                any = 1;
                if (quiet) break;
                if (!count && !listf) {
                    if (hname) out_printf(io, "%s:", fname);
                    if (number) out_printf(io, "%ld:", ln);
                    out_write(io, p + k, len);
                    out_write(io, "\n", 1);
                }
            }
            k += len + (e ? 1 : 0);
        }
        if (quiet && any) break;
        if (count) {
            if (hname) out_printf(io, "%s:", fname);
            out_printf(io, "%ld\n", matches);
        } else if (listf && matches) out_printf(io, "%s\n", fname);
    }
    if (!fixed) regfree(&re);
    buf_free(&hold);
    buf_free(&line);
    if (status_err && !(quiet && any)) return 2;
    return any ? 0 : 1;
}

static int b_true(int argc, char **argv, Io *io) {
    (void)argc, (void)argv, (void)io;
    return 0;
}

static int b_false(int argc, char **argv, Io *io) {
    (void)argc, (void)argv, (void)io;
    return 1;
}

static int b_exit(int argc, char **argv, Io *io) {
    long v = last_status;
    if (argc > 1 && parse_count(argv[1], &v) < 0) {
        err_printf(io, "exit: %s: numeric argument required\n", argv[1]);
        v = 2;
    }
    exit_requested = 1;
    exit_value = (int)(v & 0xff);
    return exit_value;
}

static int b_pwd(int argc, char **argv, Io *io) {
    (void)argc, (void)argv;
    char buf[PATH_MAX];
    if (!getcwd(buf, sizeof buf)) {
        err_printf(io, "pwd: %s\n", strerror(errno));
        return 1;
    }
    out_printf(io, "%s\n", buf);
    return 0;
}

static int b_cd(int argc, char **argv, Io *io) {
    const char *d = argc > 1 ? argv[1] : getvar("HOME");
    if (!*d) d = "/";
    if (chdir(d) < 0) {
        err_printf(io, "cd: %s: %s\n", d, strerror(errno));
        return 1;
    }
    char buf[PATH_MAX];
    if (getcwd(buf, sizeof buf)) setenv("PWD", buf, 1);
    return 0;
}

static int mkdir_p(const char *path) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) < 0 && errno != EEXIST) return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) < 0) {
        struct stat st;
        if (errno == EEXIST && stat(tmp, &st) == 0 && S_ISDIR(st.st_mode)) return 0;
        return -1;
    }
    return 0;
}

static int b_mkdir(int argc, char **argv, Io *io) {
    int parents = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        if (!strcmp(argv[i], "-p")) parents = 1;
        else if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else {
            err_printf(io, "mkdir: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (i >= argc) {
        err_printf(io, "mkdir: missing operand\n");
        return 1;
    }
    for (; i < argc; i++) {
        int r = parents ? mkdir_p(argv[i]) : mkdir(argv[i], 0755);
        if (r < 0) {
            err_printf(io, "mkdir: cannot create directory '%s': %s\n", argv[i], strerror(errno));
            status = 1;
        }
    }
    return status;
}

static int rm_rf(const char *path) {
    struct stat st;
    if (lstat(path, &st) < 0) return -1;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return -1;
        struct dirent *de;
        char **names = NULL;
        size_t nn = 0;
        while ((de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
            names = xrealloc(names, (nn + 1) * sizeof *names);
            names[nn++] = xstrdup(de->d_name);
        }
        closedir(d);
        int rc = 0;
        for (size_t k = 0; k < nn; k++) {
            char sub[PATH_MAX];
            snprintf(sub, sizeof sub, "%s/%s", path, names[k]);
            if (rm_rf(sub) < 0) rc = -1;
            free(names[k]);
        }
        free(names);
        if (rmdir(path) < 0) return -1;
        return rc;
    }
    return unlink(path);
}

static int b_rm(int argc, char **argv, Io *io) {
    int rec = 0, force = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        for (const char *c = argv[i] + 1; *c; c++) {
            if (*c == 'r' || *c == 'R') rec = 1;
            else if (*c == 'f') force = 1;
            else if (*c == 'v' || *c == 'i') continue;
            else {
                err_printf(io, "rm: unknown option -%c\n", *c);
                return 2;
            }
        }
    }
    if (i >= argc && !force) {
        err_printf(io, "rm: missing operand\n");
        return 1;
    }
    for (; i < argc; i++) {
        struct stat st;
        if (lstat(argv[i], &st) < 0) {
            if (!force) {
                err_printf(io, "rm: cannot remove '%s': %s\n", argv[i], strerror(errno));
                status = 1;
            }
            continue;
        }
        if (S_ISDIR(st.st_mode) && !rec) {
            err_printf(io, "rm: cannot remove '%s': Is a directory\n", argv[i]);
            status = 1;
            continue;
        }
        if ((rec ? rm_rf(argv[i]) : unlink(argv[i])) < 0) {
            err_printf(io, "rm: cannot remove '%s': %s\n", argv[i], strerror(errno));
            status = 1;
        }
    }
    return status;
}

static int b_rmdir(int argc, char **argv, Io *io) {
    int status = 0;
    for (int i = 1; i < argc; i++)
        if (rmdir(argv[i]) < 0) {
            err_printf(io, "rmdir: failed to remove '%s': %s\n", argv[i], strerror(errno));
            status = 1;
        }
    return status;
}

static int copy_file(const char *src, const char *dst) {
    Buf b = {0};
    if (read_file_all(src, &b) < 0) return -1;
    int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        buf_free(&b);
        return -1;
    }
    int r = write_all(fd, b.p ? b.p : "", b.n);
    close(fd);
    buf_free(&b);
    return r;
}

static int copy_tree(const char *src, const char *dst) {
    struct stat st;
    if (stat(src, &st) < 0) return -1;
    if (!S_ISDIR(st.st_mode)) return copy_file(src, dst);
    if (mkdir(dst, 0755) < 0 && errno != EEXIST) return -1;
    DIR *d = opendir(src);
    if (!d) return -1;
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char s[PATH_MAX], t[PATH_MAX];
        snprintf(s, sizeof s, "%s/%s", src, de->d_name);
        snprintf(t, sizeof t, "%s/%s", dst, de->d_name);
        if (copy_tree(s, t) < 0) rc = -1;
    }
    closedir(d);
    return rc;
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s && s[1] ? s + 1 : p;
}

static int cp_mv(int argc, char **argv, Io *io, int move) {
    const char *name = move ? "mv" : "cp";
    int rec = 0, i = 1, status = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        for (const char *c = argv[i] + 1; *c; c++) {
            if (*c == 'r' || *c == 'R' || *c == 'a') rec = 1;
            else if (*c == 'f' || *c == 'v' || *c == 'p') continue;
            else {
                err_printf(io, "%s: unknown option -%c\n", name, *c);
                return 2;
            }
        }
    }
    if (argc - i < 2) {
        err_printf(io, "%s: missing file operand\n", name);
        return 1;
    }
    const char *dst = argv[argc - 1];
    struct stat dst_st;
    int dst_dir = stat(dst, &dst_st) == 0 && S_ISDIR(dst_st.st_mode);
    if (argc - i > 2 && !dst_dir) {
        err_printf(io, "%s: target '%s' is not a directory\n", name, dst);
        return 1;
    }
    for (; i < argc - 1; i++) {
        char target[PATH_MAX];
        if (dst_dir) snprintf(target, sizeof target, "%s/%s", dst, base_name(argv[i]));
        else snprintf(target, sizeof target, "%s", dst);
        struct stat st;
        if (stat(argv[i], &st) < 0) {
            err_printf(io, "%s: cannot stat '%s': %s\n", name, argv[i], strerror(errno));
            status = 1;
            continue;
        }
        int r;
        if (move) {
            r = rename(argv[i], target);
            if (r < 0 && errno == EXDEV) {
                r = copy_tree(argv[i], target);
                if (r == 0) r = rm_rf(argv[i]);
            }
        } else {
            if (S_ISDIR(st.st_mode) && !rec) {
                err_printf(io, "cp: -r not specified; omitting directory '%s'\n", argv[i]);
                status = 1;
                continue;
            }
            r = copy_tree(argv[i], target);
        }
        if (r < 0) {
            err_printf(io, "%s: cannot %s '%s' to '%s': %s\n", name, move ? "move" : "copy", argv[i], target,
                       strerror(errno));
            status = 1;
        }
    }
    return status;
}

static int b_cp(int argc, char **argv, Io *io) { return cp_mv(argc, argv, io, 0); }
static int b_mv(int argc, char **argv, Io *io) { return cp_mv(argc, argv, io, 1); }

static int b_touch(int argc, char **argv, Io *io) {
    int status = 0;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-' && argv[i][1]) continue;
        int fd = open(argv[i], O_WRONLY | O_CREAT, 0644);
        if (fd < 0) {
            err_printf(io, "touch: cannot touch '%s': %s\n", argv[i], strerror(errno));
            status = 1;
            continue;
        }
        struct timespec ts[2] = {{0, UTIME_NOW}, {0, UTIME_NOW}};
        futimens(fd, ts);
        close(fd);
    }
    return status;
}

extern char **environ;
static int run_argv(int argc, char **argv, Io *io);

static int b_env(int argc, char **argv, Io *io) {
    int i = 1;
    if (i < argc && !strcmp(argv[i], "-i")) i++; /* accepted; the environment is the sandbox's anyway */
    if (i < argc && (strchr(argv[i], '=') || i < argc)) {
        /* env VAR=value ... cmd args */
        int start = i;
        while (i < argc && strchr(argv[i], '=') && argv[i][0] != '=') i++;
        if (i < argc) {
            char **saved = xmalloc(sizeof(char *) * (size_t)(i - start + 1));
            char **names = xmalloc(sizeof(char *) * (size_t)(i - start + 1));
            for (int k = start; k < i; k++) {
                char *eq = strchr(argv[k], '=');
                names[k - start] = strndup(argv[k], (size_t)(eq - argv[k]));
                const char *old = getenv(names[k - start]);
                saved[k - start] = old ? xstrdup(old) : NULL;
                setenv(names[k - start], eq + 1, 1);
            }
            int rc = run_argv(argc - i, argv + i, io);
            for (int k = start; k < i; k++) {
                if (saved[k - start]) setenv(names[k - start], saved[k - start], 1);
                else unsetenv(names[k - start]);
                free(saved[k - start]);
                free(names[k - start]);
            }
            free(saved);
            free(names);
            return rc;
        }
        for (int k = start; k < i; k++) {
            char *eq = strchr(argv[k], '=');
            char *nm = strndup(argv[k], (size_t)(eq - argv[k]));
            setenv(nm, eq + 1, 1);
            free(nm);
        }
    }
    size_t n = 0;
    for (char **e = environ; e && *e; e++) n++;
    char **sorted = xmalloc(sizeof(char *) * (n + 1));
    for (size_t k = 0; k < n; k++) sorted[k] = environ[k];
    qsort(sorted, n, sizeof *sorted, cmpstr);
    for (size_t k = 0; k < n; k++) out_printf(io, "%s\n", sorted[k]);
    free(sorted);
    return 0;
}

static int b_export(int argc, char **argv, Io *io) {
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-') continue;
        char *eq = strchr(argv[i], '=');
        if (!eq) continue; /* every variable is exported already */
        char *nm = strndup(argv[i], (size_t)(eq - argv[i]));
        setenv(nm, eq + 1, 1);
        free(nm);
    }
    (void)io;
    return 0;
}

static int b_unset(int argc, char **argv, Io *io) {
    (void)io;
    for (int i = 1; i < argc; i++)
        if (argv[i][0] != '-') unsetenv(argv[i]);
    return 0;
}

static int b_sleep(int argc, char **argv, Io *io) {
    if (argc < 2) {
        err_printf(io, "sleep: missing operand\n");
        return 1;
    }
    double total = 0;
    for (int i = 1; i < argc; i++) {
        char *end;
        double v = strtod(argv[i], &end);
        if (end == argv[i] || v < 0) {
            err_printf(io, "sleep: invalid time interval '%s'\n", argv[i]);
            return 1;
        }
        if (*end == 'm') v *= 60;
        else if (*end == 'h') v *= 3600;
        else if (*end == 'd') v *= 86400;
        total += v;
    }
    flush_all();
    /* nanosleep is poll_oneoff: the host cuts it into slices and stops it at the time limit */
    struct timespec ts;
    ts.tv_sec = (time_t)total;
    ts.tv_nsec = (long)((total - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
    return 0;
}

static int b_seq(int argc, char **argv, Io *io) {
    double first = 1, inc = 1, last;
    if (argc == 2) last = atof(argv[1]);
    else if (argc == 3) {
        first = atof(argv[1]);
        last = atof(argv[2]);
    } else if (argc == 4) {
        first = atof(argv[1]);
        inc = atof(argv[2]);
        last = atof(argv[3]);
    } else {
        err_printf(io, "seq: usage: seq [FIRST [INCREMENT]] LAST\n");
        return 1;
    }
    if (inc == 0) {
        err_printf(io, "seq: invalid zero increment\n");
        return 1;
    }
    for (double v = first; inc > 0 ? v <= last : v >= last; v += inc) out_printf(io, "%g\n", v);
    return 0;
}

static int sort_numeric = 0, sort_reverse = 0;
static int cmp_lines(const void *a, const void *b) {
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    int r;
    if (sort_numeric) {
        double dx = atof(x), dy = atof(y);
        r = dx < dy ? -1 : dx > dy ? 1 : strcmp(x, y);
    } else r = strcmp(x, y);
    return sort_reverse ? -r : r;
}

static char **split_lines(const char *p, size_t n, size_t *count) {
    size_t cap = 64, c = 0;
    char **lines = xmalloc(cap * sizeof *lines);
    size_t k = 0;
    while (k < n) {
        const char *e = memchr(p + k, '\n', n - k);
        size_t len = e ? (size_t)(e - (p + k)) : n - k;
        if (c == cap) lines = xrealloc(lines, (cap *= 2) * sizeof *lines);
        lines[c++] = strndup(p + k, len);
        k += len + (e ? 1 : 0);
    }
    *count = c;
    return lines;
}

static int b_sort(int argc, char **argv, Io *io) {
    int uniq = 0, i = 1;
    sort_numeric = sort_reverse = 0;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++)
        for (const char *c = argv[i] + 1; *c; c++) {
            if (*c == 'n') sort_numeric = 1;
            else if (*c == 'r') sort_reverse = 1;
            else if (*c == 'u') uniq = 1;
            else {
                err_printf(io, "sort: unknown option -%c\n", *c);
                return 2;
            }
        }
    Buf all = {0}, hold = {0};
    if (i >= argc) {
        const char *p;
        size_t n;
        in_all(io, &p, &n);
        buf_add(&all, p, n);
    }
    for (; i < argc; i++) {
        const char *p;
        size_t n;
        if (operand_data(io, argv[i], &p, &n, &hold) < 0) {
            err_printf(io, "sort: cannot read: %s: %s\n", argv[i], strerror(errno));
            return 2;
        }
        buf_add(&all, p, n);
        if (n && p[n - 1] != '\n') buf_addc(&all, '\n');
    }
    size_t c;
    char **lines = split_lines(all.p ? all.p : "", all.n, &c);
    qsort(lines, c, sizeof *lines, cmp_lines);
    for (size_t k = 0; k < c; k++) {
        if (!uniq || k == 0 || strcmp(lines[k], lines[k - 1])) out_printf(io, "%s\n", lines[k]);
    }
    for (size_t k = 0; k < c; k++) free(lines[k]);
    free(lines);
    buf_free(&all);
    buf_free(&hold);
    return 0;
}

static int b_uniq(int argc, char **argv, Io *io) {
    int cnt = 0, i = 1;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++)
        if (!strcmp(argv[i], "-c")) cnt = 1;
    const char *p;
    size_t n;
    Buf hold = {0};
    if (operand_data(io, i < argc ? argv[i] : "-", &p, &n, &hold) < 0) {
        err_printf(io, "uniq: %s: %s\n", argv[i], strerror(errno));
        return 1;
    }
    size_t c;
    char **lines = split_lines(p, n, &c);
    for (size_t k = 0; k < c;) {
        size_t j = k + 1;
        while (j < c && !strcmp(lines[j], lines[k])) j++;
        if (cnt) out_printf(io, "%7zu %s\n", j - k, lines[k]);
        else out_printf(io, "%s\n", lines[k]);
        k = j;
    }
    for (size_t k = 0; k < c; k++) free(lines[k]);
    free(lines);
    buf_free(&hold);
    return 0;
}

static void expand_set(const char *s, Buf *o) {
    for (; *s; s++) {
        if (s[1] == '-' && s[2]) {
            for (int c = (unsigned char)s[0]; c <= (unsigned char)s[2]; c++) buf_addc(o, (char)c);
            s += 2;
        } else if (*s == '\\' && s[1]) {
            s++;
            buf_addc(o, *s == 'n' ? '\n' : *s == 't' ? '\t' : *s);
        } else buf_addc(o, *s);
    }
}

static int b_tr(int argc, char **argv, Io *io) {
    int del = 0, i = 1;
    if (i < argc && !strcmp(argv[i], "-d")) {
        del = 1;
        i++;
    }
    if (argc - i < (del ? 1 : 2)) {
        err_printf(io, "tr: missing operand\n");
        return 1;
    }
    Buf s1 = {0}, s2 = {0};
    expand_set(argv[i], &s1);
    if (!del) expand_set(argv[i + 1], &s2);
    const char *p;
    size_t n;
    in_all(io, &p, &n);
    Buf o = {0};
    for (size_t k = 0; k < n; k++) {
        char c = p[k];
        const char *hit = s1.n ? memchr(s1.p, c, s1.n) : NULL;
        if (!hit) buf_addc(&o, c);
        else if (!del) {
            size_t idx = (size_t)(hit - s1.p);
            buf_addc(&o, s2.n ? s2.p[idx < s2.n ? idx : s2.n - 1] : c);
        }
    }
    out_write(io, o.p ? o.p : "", o.n);
    buf_free(&o);
    buf_free(&s1);
    buf_free(&s2);
    return 0;
}

static int b_basename(int argc, char **argv, Io *io) {
    if (argc < 2) {
        err_printf(io, "basename: missing operand\n");
        return 1;
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", argv[1]);
    size_t l = strlen(tmp);
    while (l > 1 && tmp[l - 1] == '/') tmp[--l] = 0;
    const char *b = strrchr(tmp, '/') && l > 1 ? strrchr(tmp, '/') + 1 : tmp;
    char out[PATH_MAX];
    snprintf(out, sizeof out, "%s", b);
    if (argc > 2) {
        size_t ol = strlen(out), sl = strlen(argv[2]);
        if (sl < ol && !strcmp(out + ol - sl, argv[2])) out[ol - sl] = 0;
    }
    out_printf(io, "%s\n", out);
    return 0;
}

static int b_dirname(int argc, char **argv, Io *io) {
    if (argc < 2) {
        err_printf(io, "dirname: missing operand\n");
        return 1;
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", argv[1]);
    size_t l = strlen(tmp);
    while (l > 1 && tmp[l - 1] == '/') tmp[--l] = 0;
    char *s = strrchr(tmp, '/');
    if (!s) out_puts(io, ".\n");
    else if (s == tmp) out_puts(io, "/\n");
    else {
        *s = 0;
        out_printf(io, "%s\n", tmp);
    }
    return 0;
}

static int b_tee(int argc, char **argv, Io *io) {
    int append = 0, i = 1, status = 0;
    if (i < argc && !strcmp(argv[i], "-a")) {
        append = 1;
        i++;
    }
    const char *p;
    size_t n;
    in_all(io, &p, &n);
    for (; i < argc; i++) {
        int fd = open(argv[i], O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
        if (fd < 0 || write_all(fd, p, n) < 0) {
            err_printf(io, "tee: %s: %s\n", argv[i], strerror(errno));
            status = 1;
        }
        if (fd >= 0) close(fd);
    }
    out_write(io, p, n);
    return status;
}

static int b_cut(int argc, char **argv, Io *io) {
    char delim = '\t';
    const char *fields = NULL, *file = "-";
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "-d", 2)) delim = argv[i][2] ? argv[i][2] : (i + 1 < argc ? argv[++i][0] : '\t');
        else if (!strncmp(argv[i], "-f", 2)) fields = argv[i][2] ? argv[i] + 2 : (i + 1 < argc ? argv[++i] : NULL);
        else file = argv[i];
    }
    if (!fields) {
        err_printf(io, "cut: you must specify a list of fields (-f)\n");
        return 1;
    }
    int want[256] = {0}, open_from = 0;
    for (const char *s = fields; *s;) {
        long a = strtol(s, (char **)&s, 10), b = a;
        if (*s == '-') {
            s++;
            if (isdigit((unsigned char)*s)) b = strtol(s, (char **)&s, 10);
            else {
                open_from = (int)a;
                b = 255;
            }
        }
        for (long k = a; k <= b && k < 256; k++)
            if (k > 0) want[k] = 1;
        if (*s == ',') s++;
        else if (*s) break;
    }
    (void)open_from;
    const char *p;
    size_t n;
    Buf hold = {0};
    if (operand_data(io, file, &p, &n, &hold) < 0) {
        err_printf(io, "cut: %s: %s\n", file, strerror(errno));
        return 1;
    }
    size_t k = 0;
    while (k < n) {
        const char *e = memchr(p + k, '\n', n - k);
        size_t len = e ? (size_t)(e - (p + k)) : n - k;
        if (!memchr(p + k, delim, len)) out_write(io, p + k, len);
        else {
            int f = 1, firstout = 1;
            size_t s = k;
            for (size_t q = k; q <= k + len; q++) {
                if (q == k + len || p[q] == delim) {
                    if (f < 256 && want[f]) {
                        if (!firstout) out_write(io, &delim, 1);
                        out_write(io, p + s, q - s);
                        firstout = 0;
                    }
                    f++;
                    s = q + 1;
                }
            }
        }
        out_write(io, "\n", 1);
        k += len + (e ? 1 : 0);
    }
    buf_free(&hold);
    return 0;
}

static int b_test(int argc, char **argv, Io *io) {
    if (!strcmp(argv[0], "[")) {
        if (strcmp(argv[argc - 1], "]")) {
            err_printf(io, "[: missing ']'\n");
            return 2;
        }
        argc--;
    }
    int neg = 0, i = 1;
    if (i < argc && !strcmp(argv[i], "!")) {
        neg = 1;
        i++;
    }
    int n = argc - i, r;
    char **a = argv + i;
    struct stat st;
    if (n == 0) r = 0;
    else if (n == 1) r = a[0][0] != 0;
    else if (n == 2) {
        const char *op = a[0], *v = a[1];
        if (!strcmp(op, "-z")) r = !*v;
        else if (!strcmp(op, "-n")) r = *v != 0;
        else if (!strcmp(op, "-e")) r = stat(v, &st) == 0;
        else if (!strcmp(op, "-f")) r = stat(v, &st) == 0 && S_ISREG(st.st_mode);
        else if (!strcmp(op, "-d")) r = stat(v, &st) == 0 && S_ISDIR(st.st_mode);
        else if (!strcmp(op, "-s")) r = stat(v, &st) == 0 && st.st_size > 0;
        else if (!strcmp(op, "-r") || !strcmp(op, "-w") || !strcmp(op, "-x")) r = stat(v, &st) == 0;
        else {
            err_printf(io, "test: %s: unary operator expected\n", op);
            return 2;
        }
    } else if (n == 3) {
        const char *x = a[0], *op = a[1], *y = a[2];
        long lx = atol(x), ly = atol(y);
        if (!strcmp(op, "=") || !strcmp(op, "==")) r = !strcmp(x, y);
        else if (!strcmp(op, "!=")) r = strcmp(x, y) != 0;
        else if (!strcmp(op, "-eq")) r = lx == ly;
        else if (!strcmp(op, "-ne")) r = lx != ly;
        else if (!strcmp(op, "-lt")) r = lx < ly;
        else if (!strcmp(op, "-le")) r = lx <= ly;
        else if (!strcmp(op, "-gt")) r = lx > ly;
        else if (!strcmp(op, "-ge")) r = lx >= ly;
        else {
            err_printf(io, "test: %s: binary operator expected\n", op);
            return 2;
        }
    } else {
        err_printf(io, "test: too many arguments\n");
        return 2;
    }
    return (r != neg) ? 0 : 1;
}

typedef struct {
    const char *name;
    builtin_fn fn;
} Builtin;

static int b_help(int argc, char **argv, Io *io);
static int b_type(int argc, char **argv, Io *io);

static const Builtin builtins[] = {
    {"[", b_test},         {"basename", b_basename}, {"cat", b_cat},     {"cd", b_cd},     {"command", b_type},
    {"cp", b_cp},          {"cut", b_cut},           {"dirname", b_dirname}, {"echo", b_echo}, {"env", b_env},
    {"exit", b_exit},      {"export", b_export},     {"false", b_false}, {"grep", b_grep}, {"head", b_head},
    {"help", b_help},      {"ls", b_ls},             {"mkdir", b_mkdir}, {"mv", b_mv},     {"printf", b_printf},
    {"pwd", b_pwd},        {"rm", b_rm},             {"rmdir", b_rmdir}, {"seq", b_seq},   {"sleep", b_sleep},
    {"sort", b_sort},      {"tail", b_tail},         {"tee", b_tee},     {"test", b_test}, {"touch", b_touch},
    {"tr", b_tr},          {"true", b_true},         {"type", b_type},   {"uniq", b_uniq}, {"unset", b_unset},
    {"wc", b_wc},          {"which", b_type},        {":", b_true},
};

static const Builtin *find_builtin(const char *name) {
    for (size_t i = 0; i < sizeof builtins / sizeof *builtins; i++)
        if (!strcmp(builtins[i].name, name)) return &builtins[i];
    return NULL;
}

static int b_help(int argc, char **argv, Io *io) {
    (void)argc, (void)argv;
    out_puts(io, "aksh built-ins:");
    for (size_t i = 0; i < sizeof builtins / sizeof *builtins; i++) out_printf(io, " %s", builtins[i].name);
    out_puts(io, "\n");
    return 0;
}

static int b_type(int argc, char **argv, Io *io) {
    int status = 0, i = 1;
    if (i < argc && argv[i][0] == '-') i++; /* command -v, which -a */
    for (; i < argc; i++) {
        if (find_builtin(argv[i])) out_printf(io, strcmp(argv[0], "type") ? "%s\n" : "%s is a shell builtin\n",
                                              argv[i]);
        else status = 1;
    }
    return status;
}

/* The host's python3 and the shell are separate modules: say so instead of a bare "not found". */
static const char *not_here(const char *name) {
    static const char *py[] = {"python", "python3", "micropython", "pip", "pip3", NULL};
    for (int i = 0; py[i]; i++)
        if (!strcmp(name, py[i])) return "not available inside the wasm shell (run it as the command itself, "
                                          "not from sh -c)";
    return NULL;
}

static int run_argv(int argc, char **argv, Io *io) {
    const char *name = argv[0];
    static const char *prefixes[] = {"/bin/", "/usr/bin/", "/usr/local/bin/", "/sbin/", "/usr/sbin/", NULL};
    for (int k = 0; prefixes[k]; k++) {
        size_t l = strlen(prefixes[k]);
        if (!strncmp(name, prefixes[k], l) && !strchr(name + l, '/')) {
            name += l;
            break;
        }
    }
    const Builtin *b = find_builtin(name);
    if (!b) {
        const char *why = not_here(name);
        err_printf(io, "aksh: %s: %s\n", argv[0], why ? why : "command not found");
        return 127;
    }
    char *saved = argv[0];
    argv[0] = (char *)name;
    int rc = b->fn(argc, argv, io);
    argv[0] = saved;
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* parsing and execution                                                                           */

static int run_script(const char *src, Io *io);

typedef struct {
    char **v;
    size_t n, cap;
} StrList;

static void sl_push(StrList *l, char *s) {
    if (l->n + 2 > l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->v = xrealloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = s;
    l->v[l->n] = NULL;
}

static void sl_free(StrList *l) {
    for (size_t i = 0; i < l->n; i++) free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

/* End of a $(...) starting at s (pointing after "$("), honouring quotes and nesting. */
static const char *match_paren(const char *s) {
    int depth = 1;
    while (*s) {
        if (*s == '\\' && s[1]) s += 2;
        else if (*s == '\'') {
            s++;
            while (*s && *s != '\'') s++;
            if (*s) s++;
        } else if (*s == '"') {
            s++;
            while (*s && *s != '"') {
                if (*s == '\\' && s[1]) s++;
                s++;
            }
            if (*s) s++;
        } else if (*s == '(') {
            depth++;
            s++;
        } else if (*s == ')') {
            if (--depth == 0) return s;
            s++;
        } else s++;
    }
    return NULL;
}

/* A word being built: text plus whether each char may glob (unquoted) and whether it exists at all. */
typedef struct {
    Buf text;
    Buf globbable; /* '1' for unquoted glob chars */
    int exists;    /* quoted empty strings still make a word */
    int has_glob;
} Word;

static void word_addc(Word *w, char c, int quoted) {
    buf_addc(&w->text, c);
    int g = !quoted && (c == '*' || c == '?' || c == '[');
    buf_addc(&w->globbable, g ? '1' : '0');
    if (g) w->has_glob = 1;
    w->exists = 1;
}

static void word_reset(Word *w) {
    w->text.n = 0;
    if (w->text.p) w->text.p[0] = 0;
    w->globbable.n = 0;
    w->exists = 0;
    w->has_glob = 0;
}

static void word_finish(Word *w, StrList *out) {
    if (!w->exists) return;
    const char *t = w->text.p ? w->text.p : "";
    if (w->has_glob) {
        /* escape quoted glob chars so only the unquoted ones match patterns */
        Buf pat = {0};
        for (size_t i = 0; i < w->text.n; i++) {
            char c = t[i];
            if (w->globbable.p[i] == '0' && (c == '*' || c == '?' || c == '[' || c == '\\')) buf_addc(&pat, '\\');
            buf_addc(&pat, c);
        }
        glob_t g;
        if (glob(pat.p, 0, NULL, &g) == 0 && g.gl_pathc > 0) {
            for (size_t i = 0; i < g.gl_pathc; i++) sl_push(out, xstrdup(g.gl_pathv[i]));
            globfree(&g);
            buf_free(&pat);
            word_reset(w);
            return;
        }
        buf_free(&pat);
    }
    sl_push(out, xstrdup(t));
    word_reset(w);
}

/* Expand $... at s (pointing at '$'); appends to w; returns the new position. */
static const char *expand_dollar(const char *s, Word *w, StrList *out, int quoted, Io *io) {
    s++; /* past '$' */
    Buf val = {0};
    int is_at = 0;
    if (*s == '(') {
        const char *end = match_paren(s + 1);
        if (!end) {
            err_printf(io, "aksh: syntax error: unterminated $(\n");
            word_addc(w, '$', 1);
            return s;
        }
        char *sub = strndup(s + 1, (size_t)(end - (s + 1)));
        Buf cap = {0};
        Io sio = *io;
        sio.out = &cap;
        sio.in_fd = -1;
        sio.in = "";
        sio.inlen = 0;
        int saved_req = exit_requested, saved_val = exit_value;
        run_script(sub, &sio);
        exit_requested = saved_req;
        exit_value = saved_val;
        free(sub);
        while (cap.n && cap.p[cap.n - 1] == '\n') cap.p[--cap.n] = 0;
        buf_add(&val, cap.p ? cap.p : "", cap.n);
        buf_free(&cap);
        s = end + 1;
    } else if (*s == '{') {
        const char *end = strchr(s, '}');
        if (!end) {
            word_addc(w, '$', 1);
            return s;
        }
        char *name = strndup(s + 1, (size_t)(end - (s + 1)));
        char *def = strstr(name, ":-");
        if (def) {
            *def = 0;
            const char *v = getvar(name);
            buf_adds(&val, *v ? v : def + 2);
        } else buf_adds(&val, getvar(name));
        free(name);
        s = end + 1;
    } else if (*s == '?' || *s == '#' || *s == '$' || isdigit((unsigned char)*s)) {
        char name[2] = {*s, 0};
        buf_adds(&val, getvar(name));
        s++;
    } else if (*s == '@' || *s == '*') {
        is_at = 1;
        for (int i = 1; i < script_argc; i++) {
            if (i > 1) buf_addc(&val, ' ');
            buf_adds(&val, script_argv[i]);
        }
        s++;
    } else if (isalpha((unsigned char)*s) || *s == '_') {
        const char *st = s;
        while (isalnum((unsigned char)*s) || *s == '_') s++;
        char *name = strndup(st, (size_t)(s - st));
        buf_adds(&val, getvar(name));
        free(name);
    } else {
        word_addc(w, '$', 1);
        return s;
    }
    (void)is_at;
    const char *v = val.p ? val.p : "";
    if (quoted) {
        for (size_t i = 0; i < val.n; i++) word_addc(w, v[i], 1);
        w->exists = 1;
    } else { /* field splitting on blanks */
        for (size_t i = 0; i < val.n; i++) {
            char c = v[i];
            if (c == ' ' || c == '\t' || c == '\n') word_finish(w, out);
            else word_addc(w, c, 0);
        }
    }
    buf_free(&val);
    return s;
}

typedef struct {
    int kind; /* '<' '>' 'A' (>>) 'e' (2>) 'E' (2>>) '&' (2>&1) 'o' (>&2) 'b' (&>) */
    char *target;
} Redir;

/* Expand one simple command into words and redirections. Returns -1 on syntax error. */
static int expand_command(const char *s, StrList *words, Redir *redirs, int *nredir, Io *io) {
    Word w = {0};
    *nredir = 0;
    int pending = 0; /* a redirection waiting for its target word */
    StrList tmp = {0};
    while (1) {
        char c = *s;
        if (c == 0 || c == ' ' || c == '\t' || c == '\n') {
            if (pending && w.exists) {
                word_finish(&w, &tmp);
                if (tmp.n) {
                    redirs[*nredir - 1].target = xstrdup(tmp.v[0]);
                    sl_free(&tmp);
                }
                pending = 0;
            } else word_finish(&w, words);
            if (!c) break;
            s++;
            continue;
        }
        if (!w.exists && !pending && (c == '>' || c == '<' || (c == '2' && s[1] == '>') || (c == '&' && s[1] == '>') ||
                                      (c == '1' && s[1] == '>'))) {
            int kind;
            if (c == '2' && s[1] == '>' && s[2] == '&' && s[3] == '1') {
                kind = '&';
                s += 4;
            } else if (c == '2' && s[1] == '>' && s[2] == '>') {
                kind = 'E';
                s += 3;
            } else if (c == '2') {
                kind = 'e';
                s += 2;
            } else if (c == '&') {
                kind = 'b';
                s += 2;
            } else if ((c == '>' && s[1] == '&' && s[2] == '2') || (c == '1' && s[1] == '>' && s[2] == '&' && s[3] == '2')) {
                kind = 'o';
                s += c == '1' ? 4 : 3;
            } else if (c == '1' && s[1] == '>' && s[2] == '>') {
                kind = 'A';
                s += 3;
            } else if (c == '1') {
                kind = '>';
                s += 2;
            } else if (c == '>' && s[1] == '>') {
                kind = 'A';
                s += 2;
            } else {
                kind = c;
                s += 1;
            }
            if (*nredir >= 16) {
                err_printf(io, "aksh: too many redirections\n");
                return -1;
            }
            redirs[*nredir].kind = kind;
            redirs[*nredir].target = NULL;
            (*nredir)++;
            if (kind != '&' && kind != 'o') pending = 1;
            continue;
        }
        if (c == '\\') {
            if (s[1]) {
                word_addc(&w, s[1], 1);
                s += 2;
            } else s++;
            continue;
        }
        if (c == '\'') {
            const char *e = strchr(s + 1, '\'');
            if (!e) {
                err_printf(io, "aksh: syntax error: unterminated quoted string\n");
                return -1;
            }
            w.exists = 1;
            for (const char *q = s + 1; q < e; q++) word_addc(&w, *q, 1);
            s = e + 1;
            continue;
        }
        if (c == '"') {
            s++;
            w.exists = 1;
            while (*s && *s != '"') {
                if (*s == '\\' && (s[1] == '"' || s[1] == '\\' || s[1] == '$' || s[1] == '`')) {
                    word_addc(&w, s[1], 1);
                    s += 2;
                } else if (*s == '$') s = expand_dollar(s, &w, words, 1, io);
                else word_addc(&w, *s++, 1);
            }
            if (*s != '"') {
                err_printf(io, "aksh: syntax error: unterminated quoted string\n");
                return -1;
            }
            s++;
            continue;
        }
        if (c == '$') {
            s = expand_dollar(s, &w, pending ? &tmp : words, 0, io);
            continue;
        }
        word_addc(&w, c, 0);
        s++;
    }
    buf_free(&w.text);
    buf_free(&w.globbable);
    sl_free(&tmp);
    for (int i = 0; i < *nredir; i++)
        if (redirs[i].kind != '&' && redirs[i].kind != 'o' && !redirs[i].target) {
            err_printf(io, "aksh: syntax error: redirection without a file name\n");
            return -1;
        }
    return 0;
}

static int run_simple(const char *src, Io *io) {
    StrList words = {0};
    Redir redirs[16];
    int nredir = 0;
    if (expand_command(src, &words, redirs, &nredir, io) < 0) {
        sl_free(&words);
        return 2;
    }
    Io cio = *io;
    int fds[16], nfds = 0, status = 0;
    Buf inbuf = {0};
    for (int i = 0; i < nredir; i++) {
        Redir *r = &redirs[i];
        if (r->kind == '<') {
            if (read_file_all(r->target, &inbuf) < 0) {
                err_printf(io, "aksh: %s: %s\n", r->target, strerror(errno));
                status = 1;
                goto done;
            }
            cio.in = inbuf.p ? inbuf.p : "";
            cio.inlen = inbuf.n;
            cio.in_fd = -1;
        } else if (r->kind == '&') {
            if (cio.out) cio.err = cio.out;
            else {
                cio.err = NULL;
                cio.err_fd = cio.out_fd;
            }
        } else if (r->kind == 'o') {
            cio.out = cio.err;
            cio.out_fd = cio.err_fd;
        } else {
            int flags = O_WRONLY | O_CREAT | ((r->kind == 'A' || r->kind == 'E') ? O_APPEND : O_TRUNC);
            int fd = open(r->target, flags, 0644);
            if (fd < 0) {
                err_printf(io, "aksh: %s: %s\n", r->target, strerror(errno));
                status = 1;
                goto done;
            }
            fds[nfds++] = fd;
            if (r->kind == '>' || r->kind == 'A' || r->kind == 'b') {
                cio.out = NULL;
                cio.out_fd = fd;
            }
            if (r->kind == 'e' || r->kind == 'E' || r->kind == 'b') {
                cio.err = NULL;
                cio.err_fd = fd;
            }
        }
    }
    if (words.n == 0) goto done;
    /* leading NAME=value assignments */
    size_t first = 0;
    while (first < words.n) {
        char *eq = strchr(words.v[first], '=');
        if (!eq || eq == words.v[first]) break;
        int ok = 1;
        for (char *q = words.v[first]; q < eq; q++)
            if (!(isalnum((unsigned char)*q) || *q == '_')) ok = 0;
        if (!ok || isdigit((unsigned char)words.v[first][0])) break;
        first++;
    }
    if (first == words.n) {
        for (size_t k = 0; k < words.n; k++) {
            char *eq = strchr(words.v[k], '=');
            *eq = 0;
            setenv(words.v[k], eq + 1, 1);
            *eq = '=';
        }
        status = 0;
        goto done;
    }
    if (first > 0) {
        /* VAR=x cmd: run through env's temporary-assignment path */
        StrList a = {0};
        sl_push(&a, xstrdup("env"));
        for (size_t k = 0; k < words.n; k++) sl_push(&a, xstrdup(words.v[k]));
        status = run_argv((int)a.n, a.v, &cio);
        sl_free(&a);
        goto done;
    }
    status = run_argv((int)words.n, words.v, &cio);
done:
    if (cio.out == NULL) flush_fd(0);
    flush_fd(1);
    for (int i = 0; i < nfds; i++) {
        if (fdbuf_fd[0] == fds[i]) {
            flush_fd(0);
            fdbuf_fd[0] = -1;
        }
        if (fdbuf_fd[1] == fds[i]) {
            flush_fd(1);
            fdbuf_fd[1] = -1;
        }
        close(fds[i]);
    }
    for (int i = 0; i < nredir; i++) free(redirs[i].target);
    buf_free(&inbuf);
    sl_free(&words);
    return status;
}

/* Split a script into pipelines and run them. Operators are found on the raw text (quotes, $(...)
 * and escapes respected); each simple command is expanded right before it runs, so $? is current. */
typedef struct {
    char **segs;
    size_t n;
    int op; /* what follows: ';' 'A' (&&) 'O' (||) 0 (end) */
} Pipeline;

static int run_pipeline(Pipeline *p, Io *io) {
    if (p->n == 1) return run_simple(p->segs[0], io);
    Buf bufs[2] = {{0}, {0}};
    int status = 0;
    for (size_t i = 0; i < p->n; i++) {
        Io cio = *io;
        Buf *out = &bufs[i % 2];
        out->n = 0;
        if (i > 0) {
            Buf *in = &bufs[(i + 1) % 2];
            cio.in = in->p ? in->p : "";
            cio.inlen = in->n;
            cio.in_fd = -1;
        }
        if (i + 1 < p->n) {
            cio.out = out;
            if (cio.err == io->out && io->out) cio.err = NULL;
        }
        status = run_simple(p->segs[i], &cio);
        if (exit_requested) break;
    }
    buf_free(&bufs[0]);
    buf_free(&bufs[1]);
    return status;
}

static int run_script(const char *src, Io *io) {
    Pipeline pl = {0};
    Buf seg = {0};
    const char *s = src;
    int status = last_status;
    int skip = 0; /* 1: skip the next pipeline (short-circuit) */
    int at_word_start = 1;
    for (;;) {
        char c = *s;
        int end_pipeline = 0, op = 0;
        if (c == 0 || c == '\n' || c == ';') {
            end_pipeline = 1;
            op = ';';
            if (c) s++;
        } else if (c == '&' && s[1] == '&') {
            end_pipeline = 1;
            op = 'A';
            s += 2;
        } else if (c == '|' && s[1] == '|') {
            end_pipeline = 1;
            op = 'O';
            s += 2;
        } else if (c == '&' && s[1] != '>' && !(s > src && s[-1] == '>')) {
            end_pipeline = 1; /* background: run in the foreground */
            op = ';';
            s++;
        } else if (c == '|') {
            pl.segs = xrealloc(pl.segs, (pl.n + 1) * sizeof *pl.segs);
            pl.segs[pl.n++] = xstrdup(seg.p ? seg.p : "");
            seg.n = 0;
            if (seg.p) seg.p[0] = 0;
            s++;
            at_word_start = 1;
            continue;
        } else if (c == '#' && at_word_start) {
            while (*s && *s != '\n') s++;
            continue;
        } else if (c == '\\' && s[1]) {
            buf_add(&seg, s, 2);
            s += 2;
            at_word_start = 0;
            continue;
        } else if (c == '\'') {
            const char *e = strchr(s + 1, '\'');
            size_t len = e ? (size_t)(e - s) + 1 : strlen(s);
            buf_add(&seg, s, len);
            s += len;
            at_word_start = 0;
            continue;
        } else if (c == '"') {
            const char *q = s + 1;
            while (*q && *q != '"') {
                if (*q == '\\' && q[1]) q++;
                else if (*q == '$' && q[1] == '(') {
                    const char *e = match_paren(q + 2);
                    if (e) q = e;
                }
                q++;
            }
            size_t len = *q ? (size_t)(q - s) + 1 : (size_t)(q - s);
            buf_add(&seg, s, len);
            s += len;
            at_word_start = 0;
            continue;
        } else if (c == '$' && s[1] == '(') {
            const char *e = match_paren(s + 2);
            size_t len = e ? (size_t)(e - s) + 1 : strlen(s);
            buf_add(&seg, s, len);
            s += len;
            at_word_start = 0;
            continue;
        } else {
            buf_addc(&seg, c);
            at_word_start = (c == ' ' || c == '\t');
            s++;
            continue;
        }
        if (end_pipeline) {
            at_word_start = 1;
            const char *t = seg.p ? seg.p : "";
            int blank = 1;
            for (const char *q = t; *q; q++)
                if (!isspace((unsigned char)*q)) blank = 0;
            if (blank && pl.n == 0) {
                seg.n = 0;
                if (seg.p) seg.p[0] = 0;
                if (op == 'A' || op == 'O') {
                    err_printf(io, "aksh: syntax error near unexpected token '%s'\n", op == 'A' ? "&&" : "||");
                    status = 2;
                    break;
                }
                if (!c) break;
                continue;
            }
            pl.segs = xrealloc(pl.segs, (pl.n + 1) * sizeof *pl.segs);
            pl.segs[pl.n++] = xstrdup(t);
            seg.n = 0;
            if (seg.p) seg.p[0] = 0;
            if (!skip) {
                status = run_pipeline(&pl, io);
                last_status = status;
            }
            for (size_t k = 0; k < pl.n; k++) free(pl.segs[k]);
            pl.n = 0;
            if (exit_requested) break;
            if (op == 'A') skip = skip ? 1 : status != 0;
            else if (op == 'O') skip = skip ? 1 : status == 0;
            else skip = 0;
            /* a skipped && / || chain keeps the status of the last command that ran */
            if (!c) break;
        }
    }
    free(pl.segs);
    buf_free(&seg);
    return exit_requested ? exit_value : status;
}

/* ---------------------------------------------------------------------------------------------- */

/* wasi-libc keeps the working directory as a string; chdir() validates it with two filesystem calls
 * (~70 us each through wasmtime). The host created $PWD before starting us, so adopt it directly when
 * it is a clean absolute path, and fall back to a checked chdir() otherwise. */
extern char *__wasilibc_cwd;

static int clean_abs_path(const char *p) {
    if (p[0] != '/') return 0;
    for (const char *s = p; *s; s++) {
        if (s[0] == '/' && (s[1] == '/' || (s[1] == '.' && (s[2] == 0 || s[2] == '/' ||
                                                          (s[2] == '.' && (s[3] == 0 || s[3] == '/'))))))
            return 0;
    }
    size_t n = strlen(p);
    return n == 1 || p[n - 1] != '/';
}

int main(int argc, char **argv) {
    const char *pwd = getenv("PWD");
    if (pwd && *pwd && strcmp(pwd, "/") != 0) {
        if (clean_abs_path(pwd) && strlen(pwd) < PATH_MAX) __wasilibc_cwd = xstrdup(pwd);
        else if (chdir(pwd) < 0) chdir("/");
    }
    if (!getenv("HOME")) setenv("HOME", "/", 1);
    Io io = {0};
    io.in_fd = 0;
    io.out_fd = 1;
    io.err_fd = 2;
    const char *self = base_name(argc > 0 ? argv[0] : "aksh");
    int rc;
    int is_shell = !strcmp(self, "aksh") || !strcmp(self, "sh") || !strcmp(self, "bash") ||
                   !strcmp(self, "dash") || !strcmp(self, "ash") || !strcmp(self, "zsh");
    if (is_shell) {
        int i = 1;
        const char *script = NULL;
        while (i < argc && argv[i][0] == '-' && argv[i][1]) {
            if (!strcmp(argv[i], "-c")) {
                if (i + 1 >= argc) {
                    err_printf(&io, "%s: -c: option requires an argument\n", self);
                    flush_all();
                    return 2;
                }
                script = argv[i + 1];
                i += 2;
                break;
            }
            /* -e -u -x -o pipefail ... accepted and ignored */
            if (!strcmp(argv[i], "-o") && i + 1 < argc) i++;
            i++;
        }
        if (script) {
            script_argc = argc - i;
            script_argv = argv + i;
            if (script_argc == 0) {
                static char *zero[] = {"sh"};
                script_argv = zero;
                script_argc = 1;
            }
            rc = run_script(script, &io);
        } else {
            Buf src = {0};
            if (i < argc) {
                if (read_file_all(argv[i], &src) < 0) {
                    err_printf(&io, "%s: %s: %s\n", self, argv[i], strerror(errno));
                    flush_all();
                    return 127;
                }
                script_argc = argc - i;
                script_argv = argv + i;
            } else {
                read_fd_all(0, &src);
                io.in_fd = -1; /* the script consumed stdin */
                script_argc = 1;
                script_argv = argv;
            }
            rc = run_script(src.p ? src.p : "", &io);
        }
    } else {
        script_argc = 1;
        script_argv = argv;
        rc = run_argv(argc, argv, &io);
    }
    flush_all();
    return rc & 0xff;
}
