/* Throughput through the C API, as a C trainer sees it: forward (pointer and DLPack),
 * loss_backward and train_step on a fresh default-config bridge (or --config repa),
 * host f32 buffers. Prints one line per measure, "NAME VALUE UNIT". bench/alternate.sh
 * runs it against two builds of the library in turn.
 *
 * usage: capi_bench [--batch 16] [--iters 4] [--train-iters 2] [--config default|repa] */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include "dino_bridge.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void ok(int32_t status, const char *what) {
    if (status != BRIDGE_OK) {
        fprintf(stderr, "%s: %s\n", what, bridge_last_error());
        exit(1);
    }
}

int main(int argc, char **argv) {
    int batch = 16, iters = 4, train_iters = 2, repa = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--train-iters")) train_iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--config")) repa = !strcmp(argv[i + 1], "repa");
    }
    BridgeParams p;
    /* An ABI 3 library (an older build to compare with) takes the struct up to ABI 4's
     * alignment weights. */
    p.struct_size = bridge_abi_version() < 4 ? (uint32_t)offsetof(BridgeParams, align_w_cos) : sizeof p;
    ok(bridge_params_default(&p), "params");
    if (repa) p.adapter_depth = 1, p.grid = 16;
    p.seed = 1;
    p.warmup_steps = 0;
    BridgeHandle *h = NULL;
    ok(bridge_create(&p, &h), "create");
    const int S = 32, C = p.in_ch, D = p.target_dim, g = S >> p.adapter_depth, T = g * g;
    size_t nlat = (size_t)batch * C * S * S, ntok = (size_t)batch * T * D;
    float *lat = malloc(nlat * 4), *out = malloc(ntok * 4), *pred = malloc(ntok * 4), *grad = malloc(ntok * 4);
    unsigned s = 12345;
    for (size_t i = 0; i < nlat; i++) lat[i] = (float)((s = s * 1103515245u + 12345u) >> 8) / 16777216.0f - 0.5f;
    for (size_t i = 0; i < ntok; i++) pred[i] = (float)((s = s * 1103515245u + 12345u) >> 8) / 16777216.0f - 0.5f;
    int64_t lat_shape[4] = {batch, C, S, S}, tok_shape[3] = {batch, T, D};
    DLTensor dl_lat = {lat, {DL_CPU, 0}, 4, {2, 32, 1}, lat_shape, NULL, 0};
    DLTensor dl_out = {out, {DL_CPU, 0}, 3, {2, 32, 1}, tok_shape, NULL, 0};
    float loss;
    BridgeStepStats st;
    st.struct_size = sizeof st;

    ok(bridge_forward(h, lat, out, batch, S, S, BRIDGE_DTYPE_F32), "warm-up"); /* caches, BLAS */
    double t0 = now();
    for (int i = 0; i < iters; i++) ok(bridge_forward(h, lat, out, batch, S, S, BRIDGE_DTYPE_F32), "forward");
    printf("forward %.3f samples/s\n", batch * iters / (now() - t0));
    t0 = now();
    for (int i = 0; i < iters; i++) ok(bridge_forward_dlpack(h, &dl_lat, &dl_out, NULL), "forward_dlpack");
    printf("forward_dlpack %.3f samples/s\n", batch * iters / (now() - t0));
    t0 = now();
    for (int i = 0; i < iters; i++)
        ok(bridge_loss_backward(h, pred, lat, grad, batch, S, S, g, g, BRIDGE_DTYPE_F32, &loss, NULL), "loss");
    printf("loss_backward %.3f calls/s\n", iters / (now() - t0));
    ok(bridge_train_step(h, lat, out, batch, S, S, BRIDGE_DTYPE_F32, &st, NULL), "warm-up step");
    t0 = now();
    for (int i = 0; i < train_iters; i++)
        ok(bridge_train_step(h, lat, out, batch, S, S, BRIDGE_DTYPE_F32, &st, NULL), "train_step");
    printf("train_step %.3f samples/s\n", batch * train_iters / (now() - t0));
    bridge_destroy(h);
    free(lat), free(out), free(pred), free(grad);
    return 0;
}
