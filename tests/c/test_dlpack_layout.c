/* The DLPack declarations of dino_bridge.h against the real dlpack.h (the one the torch
 * wheel ships, <torch include dir>/ATen/dlpack.h, guard DLPACK_DLPACK_H_).
 *
 * Two translation units: this one includes ATen/dlpack.h first and dino_bridge.h after it,
 * so the header must compile against the real declarations (its own are skipped under
 * the guard) and its prototypes must take the real DLTensor; dlpack_layout_ours.c
 * includes this file with DLPACK_LAYOUT_OURS defined, which leaves dlpack.h out, so there
 * the header's own declarations serve. Both fill the same table (LAYOUT below): sizeof and
 * alignment of DLDevice, DLDataType and DLTensor, and the offset and size of every field.
 * They must agree; each value is printed ("real ..." and "ours ...") so that tests/it/c_api.rs
 * can also compare the header's with the Rust mirrors in src/ffi/dlpack.rs.
 *
 * Built by tests/it/c_api.rs with gcc -std=c11 -Wall -Wextra -Werror -Iinclude
 * -I<torch include dir> test_dlpack_layout.c dlpack_layout_ours.c (also under valgrind).
 *
 * usage: test_dlpack_layout */
#ifndef DLPACK_LAYOUT_OURS
#include <ATen/dlpack.h>
#endif
#include "dino_bridge.h"

#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* X(type, field) for every field of the three structs, in declaration order. */
#define FIELDS(X)             \
    X(DLDevice, device_type)  \
    X(DLDevice, device_id)    \
    X(DLDataType, code)       \
    X(DLDataType, bits)       \
    X(DLDataType, lanes)      \
    X(DLTensor, data)         \
    X(DLTensor, device)       \
    X(DLTensor, ndim)         \
    X(DLTensor, dtype)        \
    X(DLTensor, shape)        \
    X(DLTensor, strides)      \
    X(DLTensor, byte_offset)

#define STRUCTS(X) X(DLDevice) X(DLDataType) X(DLTensor)

typedef struct {
    const char *name; /* "DLTensor" or "DLTensor.shape" */
    size_t a, b;      /* sizeof and alignment of a struct; offset and size of a field */
} Entry;

#define STRUCT_ENTRY(type) {#type, sizeof(type), alignof(type)},
#define FIELD_ENTRY(type, field) {#type "." #field, offsetof(type, field), sizeof(((type *)0)->field)},
#define LAYOUT {STRUCTS(STRUCT_ENTRY) FIELDS(FIELD_ENTRY)}
enum { ENTRIES = 3 + 12 };

#ifdef DLPACK_LAYOUT_OURS

/* The layout with the header's own declarations. */
const Entry *dlpack_layout_ours(void) {
    static const Entry ours[ENTRIES] = LAYOUT;
    return ours;
}

#else

#ifndef DLPACK_MAJOR_VERSION
#error "ATen/dlpack.h did not define DLPACK_MAJOR_VERSION: not the real dlpack.h"
#endif

const Entry *dlpack_layout_ours(void);

int main(void) {
    static const Entry real[ENTRIES] = LAYOUT;
    const Entry *ours = dlpack_layout_ours();
    int failures = 0;
    printf("real dlpack.h: DLPack %d.%d\n", DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION);
    for (int i = 0; i < ENTRIES; i++) {
        const char *what = strchr(real[i].name, '.') ? "offset %zu size %zu" : "size %zu align %zu";
        printf("real %s ", real[i].name);
        printf(what, real[i].a, real[i].b);
        printf("\nours %s ", ours[i].name);
        printf(what, ours[i].a, ours[i].b);
        printf("\n");
        if (strcmp(real[i].name, ours[i].name) != 0 || real[i].a != ours[i].a || real[i].b != ours[i].b) {
            fprintf(stderr, "FAIL %s: dino_bridge.h's layout differs from dlpack.h's\n", real[i].name);
            failures++;
        }
    }

    /* The prototypes take the real DLTensor: a call with real descriptors (the handle is
     * NULL, so the library refuses it before reading them). */
    float data[4 * 16 * 16] = {0};
    int64_t shape[4] = {1, 4, 16, 16}, out_shape[3] = {1, 16, 48};
    float out[16 * 48];
    DLTensor latents = {
        .data = data,
        .device = {.device_type = kDLCPU, .device_id = 0},
        .ndim = 4,
        .dtype = {.code = kDLFloat, .bits = 32, .lanes = 1},
        .shape = shape,
        .strides = NULL,
        .byte_offset = 0,
    };
    DLTensor tokens = latents;
    tokens.data = out;
    tokens.ndim = 3;
    tokens.shape = out_shape;
    int32_t st = bridge_forward_dlpack(NULL, &latents, &tokens, NULL);
    const char *msg = bridge_last_error();
    printf("bridge_forward_dlpack(NULL, real DLTensor, ...): status %d, '%s'\n", st, msg);
    if (st != BRIDGE_ERR_INVALID_ARGUMENT || !strstr(msg, "handle is NULL")) {
        fprintf(stderr, "FAIL bridge_forward_dlpack with a NULL handle: status %d, '%s'\n", st, msg);
        failures++;
    }
    if (failures) {
        fprintf(stderr, "%d layout checks failed\n", failures);
        return 1;
    }
    printf("dlpack layout: all %d entries match\n", ENTRIES);
    return 0;
}

#endif
