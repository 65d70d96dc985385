/* LD_PRELOAD shim for the kill tests (tests/it/pause.rs). Before each fsync() and
 * rename() of the program it is loaded into, it writes one line to stderr,
 * "@pause fsync PATH" or "@pause rename TO", and waits for one byte on stdin before
 * making the real call. The test reads those events and either lets the program go on
 * or kills it right there, inside a checkpoint write: the moment of a kill is chosen by
 * event, never by time. Without DINO_TEST_PAUSE in the environment it only forwards. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Reports `what` on `path` and waits for the test (EOF on stdin: go on). */
static void pause_at(const char *what, const char *path) {
    if (!getenv("DINO_TEST_PAUSE")) return;
    char line[PATH_MAX + 32];
    int n = snprintf(line, sizeof line, "@pause %s %s\n", what, path);
    if (n <= 0 || write(2, line, (size_t)n) != n) return;
    char go;
    if (read(0, &go, 1) < 0) return;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    char link[64], path[PATH_MAX] = "?";
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n > 0) path[n] = 0;
    pause_at("fsync", path);
    return real(fd);
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    pause_at("rename", to);
    return real(from, to);
}
