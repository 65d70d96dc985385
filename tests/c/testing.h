/* What the C test clients share: CHECK counts a check and, when `cond` is false, prints
 * where and why and counts a failure; EXPECT_OK checks that a call returned BRIDGE_OK;
 * npy_read reads a float32 .npy file; host_tensor describes a host buffer for the DLPack
 * calls. Each client reports `failures` (and `checks`) at its end. Everything is static
 * inline: a client that leaves a helper unused still compiles under -Werror. */
#ifndef DINO_BRIDGE_TESTING_H
#define DINO_BRIDGE_TESTING_H

#include "dino_bridge.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        checks++;                                                \
        if (!(cond)) {                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
            failures++;                                          \
        }                                                        \
    } while (0)

#define EXPECT_OK(call)                                                                   \
    do {                                                                                  \
        int32_t got_ = (call);                                                            \
        CHECK(got_ == BRIDGE_OK, "%s: status %d (%s)", #call, got_, bridge_last_error()); \
    } while (0)

/* A float32 array read from a .npy file (n = 0 when it could not be read). */
typedef struct {
    int ndim;
    size_t shape[8];
    size_t n;
    float *data;
} Npy;

/* Reads `dir/name`: .npy format 1.x/2.x, '<f4', C order. On any problem it prints why,
 * counts a failure and returns an empty array. */
static inline Npy npy_read(const char *dir, const char *name) {
    Npy a = {0, {0}, 0, NULL};
    char path[4096], *header = NULL;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    unsigned char pre[12];
    size_t hlen = 0;
    if (!f || fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) goto bad;
    if (pre[6] == 1) {
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    } else {
        if (fread(pre + 10, 1, 2, f) != 2) goto bad;
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
    }
    header = calloc(hlen + 1, 1);
    if (fread(header, 1, hlen, f) != hlen) goto bad;
    if (!strstr(header, "'descr': '<f4'") || !strstr(header, "'fortran_order': False")) goto bad;
    const char *s = strstr(header, "'shape': (");
    if (!s) goto bad;
    s += strlen("'shape': (");
    a.n = 1;
    while (*s != ')') {
        char *end;
        unsigned long long d = strtoull(s, &end, 10);
        if (end == s || a.ndim == 8) goto bad;
        a.shape[a.ndim++] = (size_t)d;
        a.n *= (size_t)d;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    a.data = malloc((a.n ? a.n : 1) * sizeof(float));
    if (fread(a.data, sizeof(float), a.n, f) != a.n) goto bad;
    fclose(f);
    free(header);
    return a;
bad:
    fprintf(stderr, "cannot read %s as a little-endian float32 C-order .npy\n", path);
    if (f) fclose(f);
    free(header);
    free(a.data);
    failures++;
    return (Npy){0, {0}, 0, NULL};
}

/* A host DLTensor of `ndim` dimensions `shape` of BRIDGE_DTYPE_* `dtype` at `data`
 * (compact row-major: no strides). */
static inline DLTensor host_tensor(void *data, int32_t ndim, int64_t *shape, int dtype) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = DL_CPU;
    t.device.device_id = 0;
    t.ndim = ndim;
    t.dtype.code = dtype == BRIDGE_DTYPE_BF16 ? 4 : 2; /* kDLBfloat : kDLFloat */
    t.dtype.bits = dtype == BRIDGE_DTYPE_F32 ? 32 : 16;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = NULL;
    t.byte_offset = 0;
    return t;
}

#endif
