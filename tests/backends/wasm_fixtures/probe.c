/* Test guest: echo argv/env/stdin, exit with a code, read/write files, eat memory, spin.
 *   probe io CODE          stdout: argv and $FOO and stdin (as given); stderr: "err:" + argv[2]; exit CODE
 *   probe read PATH        print the file, or "ERR <errno>" and exit 1
 *   probe write PATH TEXT  write TEXT to PATH, or "ERR <errno>" and exit 1
 *   probe mem MIB_STEP     malloc MIB_STEP MiB blocks until NULL; print the MiB obtained; exit 0
 *   probe spin             loop forever (for time limits)
 *   probe sleep SECONDS    sleep (WASI poll_oneoff)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void *volatile sink;

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "io")) {
        for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
        const char *foo = getenv("FOO");
        printf("FOO=%s\n", foo ? foo : "(unset)");
        printf("HOME=%s\n", getenv("HOME") ? getenv("HOME") : "(unset)");
        char buf[65536];
        size_t n = fread(buf, 1, sizeof buf, stdin);
        printf("stdin=%zu:", n);
        fwrite(buf, 1, n, stdout);
        fprintf(stderr, "err:%s\n", argc > 2 ? argv[2] : "");
        return argc > 2 ? atoi(argv[2]) : 0;
    }
    if (!strcmp(cmd, "read")) {
        FILE *f = fopen(argv[2], "rb");
        if (!f) {
            printf("ERR %d %s\n", errno, strerror(errno));
            return 1;
        }
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
        return 0;
    }
    if (!strcmp(cmd, "write")) {
        FILE *f = fopen(argv[2], "wb");
        if (!f) {
            printf("ERR %d %s\n", errno, strerror(errno));
            return 1;
        }
        fputs(argv[3], f);
        fclose(f);
        return 0;
    }
    if (!strcmp(cmd, "mem")) {
        size_t step = (size_t)atoi(argv[2]) << 20, total = 0;
        void *head = NULL; /* keep every block reachable so the compiler cannot elide the allocations */
        for (;;) {
            char *p = malloc(step);
            if (!p) break;
            memset(p, 1, step);
            *(void **)p = head;
            head = p;
            total += step;
        }
        sink = head;
        printf("%zu\n", total >> 20);
        return 0;
    }
    if (!strcmp(cmd, "spin")) {
        volatile unsigned long x = 0;
        for (;;) x++;
    }
    if (!strcmp(cmd, "sleep")) {
        sleep((unsigned)atoi(argv[2]));
        return 0;
    }
    return 2;
}
