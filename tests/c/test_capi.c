/* The C API from C: a full round trip on the PyTorch fixtures, then every bad input the
 * API promises to survive. Built by tests/c_api.rs with gcc -Wall -Wextra -Werror.
 *
 * usage: test_capi FIXTURE_DIR TMP_DIR LOSS_GRID8 LOSS_LATENTS MISFIT_CHECKPOINT */
#include "dino_bridge.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

/* The fixture's latent side: 16x16 latents give a 4x4 token grid (adapter_depth 2). */
enum { S = 16 };

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                  \
            fprintf(stderr, "\n");                         \
            failures++;                                    \
        }                                                  \
    } while (0)

/* A call that must fail with `want` and leave a message containing `word`. */
#define EXPECT_ERR(want, word, call)                                                   \
    do {                                                                               \
        int32_t got_ = (call);                                                         \
        const char *msg_ = bridge_last_error();                                        \
        CHECK(got_ == (want), "%s: status %d, want %d (%s)", #call, got_, (want), msg_); \
        CHECK(msg_ && strstr(msg_, (word)), "%s: message '%s' lacks '%s'", #call, msg_, (word)); \
    } while (0)

#define EXPECT_OK(call)                                                              \
    do {                                                                             \
        int32_t got_ = (call);                                                       \
        CHECK(got_ == BRIDGE_OK, "%s: status %d (%s)", #call, got_, bridge_last_error()); \
    } while (0)

/* Reads a float32 .npy file; returns its element count or 0. */
static size_t read_npy(const char *dir, const char *name, float **out) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    unsigned char head[10];
    if (fread(head, 1, 10, f) != 10 || memcmp(head, "\x93NUMPY", 6) != 0) { fclose(f); return 0; }
    size_t header_len = (size_t)head[8] | ((size_t)head[9] << 8);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    size_t n = ((size_t)size - 10 - header_len) / 4;
    fseek(f, (long)(10 + header_len), SEEK_SET);
    *out = malloc(n * sizeof(float));
    size_t got = fread(*out, sizeof(float), n, f);
    fclose(f);
    return got == n ? n : 0;
}

/* max |a - b| <= tol * max |b| */
static int close_to(const float *a, const float *b, size_t n, float tol) {
    float scale = 0, err = 0;
    for (size_t i = 0; i < n; i++) {
        if (fabsf(b[i]) > scale) scale = fabsf(b[i]);
        if (fabsf(a[i] - b[i]) > err) err = fabsf(a[i] - b[i]);
    }
    if (!(err <= tol * scale)) fprintf(stderr, "  max error %g, scale %g\n", err, scale);
    return err <= tol * scale;
}

static uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s FIXTURES TMP LOSS_GRID8 LOSS_LATENTS MISFIT\n", argv[0]);
        return 2;
    }
    const char *fx = argv[1], *tmp = argv[2], *misfit = argv[5];
    double want_loss_grid8 = atof(argv[3]), want_loss_latents = atof(argv[4]);
    char path[4096];

    CHECK(bridge_abi_version() == BRIDGE_ABI_VERSION && BRIDGE_ABI_VERSION == 2, "ABI version %u",
          bridge_abi_version());

    BridgeParams params;
    params.struct_size = sizeof params;
    EXPECT_OK(bridge_params_default(&params));
    CHECK(params.width == 768 && params.depth == 8 && params.grid == 8 && params.adapter_depth == 2, "defaults");
    CHECK(params.w_gram == 0.0f && params.spatial_norm_gamma == 0.0f, "ABI 2 defaults: w_gram %g gamma %g",
          params.w_gram, params.spatial_norm_gamma);
    snprintf(path, sizeof path, "%s/model.safetensors", fx);
    params.checkpoint_path = path;
    params.warmup_steps = 0;
    params.lr = 1e-3f;
    BridgeHandle *h = NULL;
    EXPECT_OK(bridge_create(&params, &h));
    if (!h) return 1;

    BridgeInfo info;
    info.struct_size = sizeof info;
    EXPECT_OK(bridge_get_info(h, &info));
    CHECK(info.grid == 4 && info.tokens == 16 && info.target_dim == 48 && info.device == -1 &&
              info.latent_size == S && info.adapter_depth == 2,
          "info: grid %d tokens %d", info.grid, info.tokens);
    CHECK(info.param_count > 100000, "param_count %lld", (long long)info.param_count);

    float *lat, *out_want, *pred8, *grad8_want, *target, *glat_want;
    size_t n_lat = read_npy(fx, "latents.npy", &lat);
    size_t n_out = read_npy(fx, "out.npy", &out_want);
    size_t n_pred8 = read_npy(fx, "pred_grid8.npy", &pred8);
    read_npy(fx, "grad_pred_grid8.npy", &grad8_want);
    read_npy(fx, "target.npy", &target);
    read_npy(fx, "grad_latents.npy", &glat_want);
    CHECK(n_lat == 3 * 4 * 16 * 16 && n_out == 3 * 16 * 48 && n_pred8 == 3 * 64 * 48, "fixture sizes");
    const int64_t B = 3;

    /* forward, f32 */
    float *out = malloc(n_out * sizeof(float));
    EXPECT_OK(bridge_forward(h, lat, out, B, S, S, BRIDGE_DTYPE_F32));
    CHECK(close_to(out, out_want, n_out, 1e-4f), "forward f32 vs out.npy");

    /* forward, bf16 in and out: converted at the boundary */
    uint16_t *lat16 = malloc(n_lat * 2), *out16 = malloc(n_out * 2);
    for (size_t i = 0; i < n_lat; i++) lat16[i] = to_bf16(lat[i]);
    EXPECT_OK(bridge_forward(h, lat16, out16, B, S, S, BRIDGE_DTYPE_BF16));
    float *outb = malloc(n_out * sizeof(float));
    for (size_t i = 0; i < n_out; i++) outb[i] = from_bf16(out16[i]);
    CHECK(close_to(outb, out_want, n_out, 5e-2f), "forward bf16 vs out.npy");

    /* REPA loss on an 8x8 caller grid */
    float loss = 0, *grad8 = malloc(n_pred8 * sizeof(float));
    EXPECT_OK(bridge_loss_backward(h, pred8, lat, grad8, B, S, S, 8, 8, BRIDGE_DTYPE_F32, &loss, NULL));
    CHECK(fabs(loss - want_loss_grid8) <= 1e-5, "loss_grid8 %f vs %f", loss, want_loss_grid8);
    CHECK(close_to(grad8, grad8_want, n_pred8, 1e-4f), "grad_pred_grid8");

    /* gradient to the latents */
    float *glat = malloc(n_lat * sizeof(float));
    EXPECT_OK(bridge_latent_loss_backward(h, lat, target, glat, B, S, S, BRIDGE_DTYPE_F32, &loss, NULL));
    CHECK(fabs(loss - want_loss_latents) <= 1e-5, "loss_latents %f vs %f", loss, want_loss_latents);
    CHECK(close_to(glat, glat_want, n_lat, 1e-4f), "grad_latents");

    /* a train step on the fixture's own prediction target */
    BridgeStepStats stats;
    stats.struct_size = sizeof stats;
    EXPECT_OK(bridge_train_step(h, lat, target, B, S, S, BRIDGE_DTYPE_F32, &stats, NULL));
    CHECK(stats.step == 1 && !stats.skipped && isfinite(stats.loss) && stats.grad_norm > 0,
          "stats: step %lld skipped %d loss %f", (long long)stats.step, stats.skipped, stats.loss);
    EXPECT_OK(bridge_forward(h, lat, out, B, S, S, BRIDGE_DTYPE_F32));
    float change = 0;
    for (size_t i = 0; i < n_out; i++) change = fmaxf(change, fabsf(out[i] - out_want[i]));
    CHECK(change > 1e-4f, "the train step left the outputs as they were (max change %g)", change);

    /* save, reload, same outputs */
    char saved[4096];
    snprintf(saved, sizeof saved, "%s/trained.safetensors", tmp);
    EXPECT_OK(bridge_save(h, saved));
    BridgeParams p2;
    p2.struct_size = sizeof p2;
    EXPECT_OK(bridge_params_default(&p2));
    p2.checkpoint_path = saved;
    BridgeHandle *h2 = NULL;
    EXPECT_OK(bridge_create(&p2, &h2));
    float *out2 = malloc(n_out * sizeof(float));
    EXPECT_OK(bridge_forward(h2, lat, out2, B, S, S, BRIDGE_DTYPE_F32));
    CHECK(memcmp(out, out2, n_out * sizeof(float)) == 0, "reloaded forward differs");
    info.struct_size = sizeof info;
    EXPECT_OK(bridge_get_info(h2, &info));
    CHECK(info.step == 1, "reloaded step %lld", (long long)info.step);
    EXPECT_OK(bridge_destroy(h2));

    /* ---- bad input: named status, message, handle still usable ---- */
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_forward(NULL, lat, out, B, S, S, 0));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_forward(h2, lat, out, B, S, S, 0));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_destroy(h2));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "latents is NULL", bridge_forward(h, NULL, out, B, S, S, 0));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "out is NULL", bridge_forward(h, lat, NULL, B, S, S, 0));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "batch = 0", bridge_forward(h, lat, out, 0, S, S, 0));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "batch = -2", bridge_forward(h, lat, out, -2, S, S, 0));
    /* more than any memory: a shape error naming the call's size, before any work */
    EXPECT_ERR(BRIDGE_ERR_SHAPE, "batch 4611686018427387903", bridge_forward(h, lat, out, INT64_MAX / 2, S, S, 0));
    EXPECT_ERR(BRIDGE_ERR_SHAPE, "4096x4096", bridge_forward(h, lat, out, B, 16384, 16384, 0));
    /* latent sides: positive multiples of 2^adapter_depth = 4, at most 16384 */
    EXPECT_ERR(BRIDGE_ERR_SHAPE, "height = 18", bridge_forward(h, lat, out, B, 18, S, 0));
    EXPECT_ERR(BRIDGE_ERR_SHAPE, "width = 0", bridge_forward(h, lat, out, B, S, 0, 0));
    EXPECT_ERR(BRIDGE_ERR_SHAPE, "width = 16388", bridge_forward(h, lat, out, B, S, 16388, 0));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "dtype = 7", bridge_forward(h, lat, out, B, S, S, 7));
    /* caller grids: the bridge's 4x4, or k times it, or 1/k of it, one k on both sides */
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "pred grid 6x6: must equal the bridge's token grid 4x4",
               bridge_loss_backward(h, pred8, lat, grad8, B, S, S, 6, 6, 0, &loss, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "pred grid 8x4",
               bridge_loss_backward(h, pred8, lat, grad8, B, S, S, 8, 4, 0, &loss, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "pred grid 0x0",
               bridge_loss_backward(h, pred8, lat, grad8, B, S, S, 0, 0, 0, &loss, NULL));
    EXPECT_ERR(BRIDGE_ERR_SHAPE, "height = -16",
               bridge_loss_backward(h, pred8, lat, grad8, B, -16, S, 8, 8, 0, &loss, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "loss is NULL",
               bridge_loss_backward(h, pred8, lat, grad8, B, S, S, 8, 8, 0, NULL, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "grad_latents is NULL",
               bridge_latent_loss_backward(h, lat, target, NULL, B, S, S, 0, &loss, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "stats is NULL", bridge_train_step(h, lat, target, B, S, S, 0, NULL, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "path is NULL", bridge_save(h, NULL));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "params is NULL", bridge_create(NULL, &h2));
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "NULL", bridge_params_default(NULL));
    snprintf(path, sizeof path, "%s/no-such-dir/x.safetensors", tmp);
    EXPECT_ERR(BRIDGE_ERR_IO, "no-such-dir", bridge_save(h, path));
    EXPECT_ERR(BRIDGE_ERR_IO, "directory", bridge_save(h, tmp));
#ifndef DINO_BRIDGE_CUDA_BUILD
    EXPECT_ERR(BRIDGE_ERR_UNSUPPORTED, "without CUDA", bridge_forward_cuda_ptr(h, lat, out, B, S, S, 0, NULL));
#else
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "CPU", bridge_forward_cuda_ptr(h, lat, out, B, S, S, 0, NULL));
#endif

    /* NaN input: reported, output untouched */
    float saved0 = out[0], lat17 = lat[17];
    lat[17] = NAN;
    EXPECT_ERR(BRIDGE_ERR_NON_FINITE, "latents[17]", bridge_forward(h, lat, out, B, S, S, 0));
    CHECK(out[0] == saved0, "out written on error");
    EXPECT_OK(bridge_train_step(h, lat, target, B, S, S, BRIDGE_DTYPE_F32, &stats, NULL));
    CHECK(stats.skipped == 1 && stats.step == 1, "NaN step: skipped %d step %lld", stats.skipped,
          (long long)stats.step);
    lat[17] = lat17;

    /* structs of the wrong size */
    BridgeParams bad = params;
    bad.struct_size = 4;
    EXPECT_ERR(BRIDGE_ERR_ABI_MISMATCH, "struct_size = 4", bridge_create(&bad, &h2));
    bad.struct_size = sizeof bad + 8;
    EXPECT_ERR(BRIDGE_ERR_ABI_MISMATCH, "newer", bridge_create(&bad, &h2));
    stats.struct_size = 2;
    EXPECT_ERR(BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats", bridge_train_step(h, lat, target, B, S, S, 0, &stats, NULL));
    info.struct_size = 0;
    EXPECT_ERR(BRIDGE_ERR_ABI_MISMATCH, "BridgeInfo", bridge_get_info(h, &info));

    /* checkpoints that cannot be loaded */
    BridgeParams pc = params;
    snprintf(path, sizeof path, "%s/missing.safetensors", tmp);
    pc.checkpoint_path = path;
    EXPECT_ERR(BRIDGE_ERR_IO, "missing.safetensors", bridge_create(&pc, &h2));
    /* truncated: the first half of a real checkpoint */
    snprintf(path, sizeof path, "%s/model.safetensors", fx);
    FILE *src = fopen(path, "rb");
    char *bytes = malloc(1 << 20);
    size_t len = fread(bytes, 1, 1 << 20, src);
    fclose(src);
    snprintf(path, sizeof path, "%s/truncated.safetensors", tmp);
    FILE *dst = fopen(path, "wb");
    fwrite(bytes, 1, len / 2, dst);
    fclose(dst);
    EXPECT_ERR(BRIDGE_ERR_CHECKPOINT, "truncated", bridge_create(&pc, &h2));
    /* corrupt: garbage in the JSON header */
    memset(bytes + 8, 'x', 32);
    snprintf(path, sizeof path, "%s/corrupt.safetensors", tmp);
    dst = fopen(path, "wb");
    fwrite(bytes, 1, len, dst);
    fclose(dst);
    EXPECT_ERR(BRIDGE_ERR_CHECKPOINT, "corrupt", bridge_create(&pc, &h2));
    free(bytes);
    pc.checkpoint_path = misfit;
    EXPECT_ERR(BRIDGE_ERR_CHECKPOINT, "backbone.blocks.2", bridge_create(&pc, &h2));
    pc.checkpoint_path = "\xff\xfe.safetensors";
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "UTF-8", bridge_create(&pc, &h2));
    /* fresh weights from a config that does not hold together */
    BridgeParams pf = params;
    pf.checkpoint_path = NULL;
    pf.heads = 7;
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "heads", bridge_create(&pf, &h2));
#ifndef DINO_BRIDGE_CUDA_BUILD
    pf = params;
    pf.checkpoint_path = NULL;
    pf.device = 0;
    EXPECT_ERR(BRIDGE_ERR_UNSUPPORTED, "without CUDA", bridge_create(&pf, &h2));
#endif
    /* ABI 2 settings out of range */
    snprintf(path, sizeof path, "%s/model.safetensors", fx);
    pf = params;
    pf.checkpoint_path = path;
    pf.spatial_norm_gamma = -1.0f;
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "spatial_norm_gamma = -1", bridge_create(&pf, &h2));
    pf.spatial_norm_gamma = 0.0f;
    pf.w_gram = NAN;
    EXPECT_ERR(BRIDGE_ERR_INVALID_ARGUMENT, "w_gram = NaN", bridge_create(&pf, &h2));

    /* after all that, the handle still works and gives the same answer */
    EXPECT_OK(bridge_forward(h, lat, out2, B, S, S, BRIDGE_DTYPE_F32));
    CHECK(memcmp(out, out2, n_out * sizeof(float)) == 0, "handle changed by bad calls");
    EXPECT_OK(bridge_destroy(h));
    EXPECT_OK(bridge_destroy(NULL));

    free(lat); free(out_want); free(pred8); free(grad8_want); free(target); free(glat_want);
    free(out); free(out2); free(outb); free(lat16); free(out16); free(grad8); free(glat);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("C API: all checks passed\n");
    return 0;
}
