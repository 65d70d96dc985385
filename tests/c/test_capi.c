/* The C API from C: a full round trip on the PyTorch fixtures; the DLPack entry points of
 * ABI 3 against their pointer-based counterparts (each tensor its own dtype), the
 * capability query and the log callback; then every bad input the API promises to
 * survive. Built by tests/it/c_api.rs with gcc -Wall -Wextra -Werror.
 *
 * usage: test_capi FIXTURE_DIR TMP_DIR LOSS_GRID8 LOSS_LATENTS MISFIT_CHECKPOINT */
#include "dino_bridge.h"
#include "testing.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The fixture's latent side: 16x16 latents give a 4x4 token grid (adapter_depth 2). */
enum { S = 16 };

/* A call that must fail with `want` and leave a message containing `word`. */
#define EXPECT_ERR(want, word, call)                                                   \
    do {                                                                               \
        int32_t got_ = (call);                                                         \
        const char *msg_ = bridge_last_error();                                        \
        CHECK(got_ == (want), "%s: status %d, want %d (%s)", #call, got_, (want), msg_); \
        CHECK(msg_ && strstr(msg_, (word)), "%s: message '%s' lacks '%s'", #call, msg_, (word)); \
    } while (0)

/* Reads a float32 .npy file of the fixture folder; returns its element count (0 when it
 * could not be read, which `npy_read` counts as a failure). */
static size_t read_npy(const char *dir, const char *name, float **out) {
    Npy a = npy_read(dir, name);
    *out = a.data;
    return a.n;
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

/* IEEE half precision, round to nearest even (as the library converts). Finite input. */
static uint16_t to_f16(float x) {
    uint16_t sign = signbit(x) ? 0x8000 : 0;
    float a = fabsf(x);
    if (a >= 65520.0f) return sign | 0x7c00;
    if (a == 0.0f) return sign;
    int e;
    frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    int q = e - 1 < -14 ? -24 : e - 11; /* the quantum: 2^-24 below 2^-14, else 11 bits */
    int n = (int)nearbyintf(ldexpf(a, -q));
    if (q == -24) return sign | (uint16_t)n; /* subnormal (n = 1024 is the smallest normal) */
    if (n == 2048) { /* rounded up to the next binade */
        n = 1024;
        q++;
    }
    if (q + 25 >= 31) return sign | 0x7c00;
    return sign | (uint16_t)((q + 25) << 10) | (uint16_t)(n - 1024);
}

static float from_f16(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    float a = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m + 1024), e - 25);
    return (h & 0x8000) ? -a : a;
}

/* Element i of a buffer of BRIDGE_DTYPE_* `dtype`, as f32. */
static float elem(const void *buf, size_t i, int dtype) {
    if (dtype == BRIDGE_DTYPE_F32) return ((const float *)buf)[i];
    uint16_t h = ((const uint16_t *)buf)[i];
    return dtype == BRIDGE_DTYPE_F16 ? from_f16(h) : from_bf16(h);
}

/* Each of `n` values of `dtype` is `want` (f32) rounded to that dtype: within half a unit
 * in the last place (relative 2^-8 for bf16, 2^-11 for f16, 0 for f32; 2^-25 absolute
 * below f16's normal range). */
static int rounded_from(const void *got, const float *want, size_t n, int dtype, const char *what) {
    float rel = dtype == BRIDGE_DTYPE_BF16 ? 1.0f / 256 : dtype == BRIDGE_DTYPE_F16 ? 1.0f / 2048 : 0.0f;
    float abs_min = dtype == BRIDGE_DTYPE_F16 ? ldexpf(1.0f, -25) : 0.0f;
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        float g = elem(got, i, dtype);
        if (!(fabsf(g - want[i]) <= rel * fabsf(want[i]) + abs_min)) {
            if (!bad++) first = i;
        }
    }
    if (bad)
        fprintf(stderr, "  %s: %zu of %zu values off, first [%zu] %g vs %g\n", what, bad, n, first,
                elem(got, first, dtype), want[first]);
    return bad == 0;
}

/* What the log callback saw; it expects `log_user_data` back. */
typedef struct {
    int calls, skip_warnings;
    char last[512];
} LogSeen;
static void *log_user_data;
static int log_wrong_user_data;

static void on_log(int32_t level, const char *message, void *user_data) {
    if (user_data != log_user_data) {
        log_wrong_user_data++;
        return;
    }
    LogSeen *seen = user_data;
    seen->calls++;
    snprintf(seen->last, sizeof seen->last, "%d %s", level, message ? message : "(null)");
    if (level == BRIDGE_LOG_WARN && message && strstr(message, "train step 2") && strstr(message, "skipped"))
        seen->skip_warnings++;
}

/* The DLPack entry points (ABI 3) on a CPU bridge give the numbers of the pointer-based
 * calls: f32 throughout bit for bit; a tensor of another dtype holds the f32 result
 * rounded to it (inputs are rounded first and the pointer call gets the same values as
 * f32). Also the capability query and the log callback. `h` is a live CPU bridge,
 * `params` made it; fixtures of B = 3 samples of 16x16 latents, 4x4 tokens, D = 48. */
static void dlpack_calls(BridgeHandle *h, const BridgeParams *params, const float *lat, const float *pred8,
                         const float *target) {
    enum { B = 3, C = 4, D = 48, T = 16, T8 = 64 };
    const size_t n_lat = B * C * S * S, n_tok = B * T * D, n_pred = B * T8 * D;
    int64_t s_lat[4] = {B, C, S, S}, s_tok[3] = {B, T, D}, s_p3[3] = {B, T8, D}, s_p4[4] = {B, 8, 8, D},
            s_one[1] = {1};
    float *ref = malloc(n_pred * sizeof(float)), *got = malloc(n_pred * sizeof(float));
    float *lat_r = malloc(n_lat * sizeof(float)), *tgt_r = malloc(n_tok * sizeof(float));
    uint16_t *lat_h = malloc(n_lat * 2), *tgt_b = malloc(n_tok * 2), *half = malloc(n_pred * 2);
    float *glat_ref = malloc(n_lat * sizeof(float));
    /* f16 latents and bf16 targets, and the f32 values they hold */
    for (size_t i = 0; i < n_lat; i++) lat_r[i] = from_f16(lat_h[i] = to_f16(lat[i]));
    for (size_t i = 0; i < n_tok; i++) tgt_r[i] = from_bf16(tgt_b[i] = to_bf16(target[i]));
    CHECK(from_f16(to_f16(1.0f)) == 1.0f && to_f16(1.0f) == 0x3c00 && to_f16(-2.5f) == 0xc100 &&
              to_f16(ldexpf(1.0f, -24)) == 1 && to_f16(65504.0f) == 0x7bff,
          "the test's own f16 conversion");

    /* forward: f32 -> f32 bit for bit; f16 latents -> f32 out; f32 -> bf16 and f16 out */
    DLTensor t_lat = host_tensor((void *)lat, 4, s_lat, BRIDGE_DTYPE_F32);
    DLTensor t_lat_h = host_tensor(lat_h, 4, s_lat, BRIDGE_DTYPE_F16);
    DLTensor t_out = host_tensor(got, 3, s_tok, BRIDGE_DTYPE_F32);
    DLTensor t_out_b = host_tensor(half, 3, s_tok, BRIDGE_DTYPE_BF16);
    DLTensor t_out_h = host_tensor(half, 3, s_tok, BRIDGE_DTYPE_F16);
    EXPECT_OK(bridge_forward(h, lat, ref, B, S, S, BRIDGE_DTYPE_F32));
    EXPECT_OK(bridge_forward_dlpack(h, &t_lat, &t_out, NULL));
    CHECK(memcmp(got, ref, n_tok * sizeof(float)) == 0, "forward_dlpack f32 differs from bridge_forward");
    EXPECT_OK(bridge_forward_dlpack(h, &t_lat, &t_out_b, NULL));
    CHECK(rounded_from(half, ref, n_tok, BRIDGE_DTYPE_BF16, "bf16 out"), "forward_dlpack: bf16 out");
    EXPECT_OK(bridge_forward_dlpack(h, &t_lat, &t_out_h, NULL));
    CHECK(rounded_from(half, ref, n_tok, BRIDGE_DTYPE_F16, "f16 out"), "forward_dlpack: f16 out");
    EXPECT_OK(bridge_forward(h, lat_r, ref, B, S, S, BRIDGE_DTYPE_F32));
    EXPECT_OK(bridge_forward_dlpack(h, &t_lat_h, &t_out, NULL));
    CHECK(memcmp(got, ref, n_tok * sizeof(float)) == 0, "forward_dlpack: f16 latents, f32 out");

    /* REPA loss on the 8x8 caller grid (2x the bridge's 4x4), given as [B, T, D] (grid
     * inferred) and as [B, ph, pw, D]; loss tensors of each dtype, on the host */
    float loss_ref = 0, loss32 = 0;
    uint16_t loss16 = 0;
    DLTensor t_p3 = host_tensor((void *)pred8, 3, s_p3, BRIDGE_DTYPE_F32);
    DLTensor t_p4 = host_tensor((void *)pred8, 4, s_p4, BRIDGE_DTYPE_F32);
    DLTensor t_g3 = host_tensor(got, 3, s_p3, BRIDGE_DTYPE_F32), t_g4 = host_tensor(got, 4, s_p4, BRIDGE_DTYPE_F32);
    DLTensor t_g3_b = host_tensor(half, 3, s_p3, BRIDGE_DTYPE_BF16);
    DLTensor t_loss32 = host_tensor(&loss32, 0, NULL, BRIDGE_DTYPE_F32);
    DLTensor t_loss_h = host_tensor(&loss16, 1, s_one, BRIDGE_DTYPE_F16);
    DLTensor t_loss_b = host_tensor(&loss16, 1, s_one, BRIDGE_DTYPE_BF16);
    EXPECT_OK(bridge_loss_backward(h, pred8, lat, ref, B, S, S, 8, 8, BRIDGE_DTYPE_F32, &loss_ref, NULL));
    EXPECT_OK(bridge_loss_backward_dlpack(h, &t_p3, &t_lat, &t_g3, &t_loss32, NULL));
    CHECK(loss32 == loss_ref && memcmp(got, ref, n_pred * sizeof(float)) == 0,
          "loss_backward_dlpack [B, T, D]: loss %.9g vs %.9g", loss32, loss_ref);
    memset(got, 0, n_pred * sizeof(float));
    EXPECT_OK(bridge_loss_backward_dlpack(h, &t_p4, &t_lat, &t_g4, &t_loss_b, NULL));
    CHECK(memcmp(got, ref, n_pred * sizeof(float)) == 0, "loss_backward_dlpack [B, ph, pw, D]: gradient");
    CHECK(rounded_from(&loss16, &loss_ref, 1, BRIDGE_DTYPE_BF16, "bf16 loss"), "bf16 loss");
    /* f16 latents, bf16 gradient, f16 loss: the f32 call on the same latent values */
    EXPECT_OK(bridge_loss_backward(h, pred8, lat_r, ref, B, S, S, 8, 8, BRIDGE_DTYPE_F32, &loss_ref, NULL));
    EXPECT_OK(bridge_loss_backward_dlpack(h, &t_p3, &t_lat_h, &t_g3_b, &t_loss_h, NULL));
    CHECK(rounded_from(half, ref, n_pred, BRIDGE_DTYPE_BF16, "bf16 grad_pred"), "bf16 grad_pred");
    CHECK(rounded_from(&loss16, &loss_ref, 1, BRIDGE_DTYPE_F16, "f16 loss"), "f16 loss");

    /* gradient to the latents: f32 latents, bf16 target, f16 gradient, f32 loss [1] */
    DLTensor t_tgt_b = host_tensor(tgt_b, 3, s_tok, BRIDGE_DTYPE_BF16);
    DLTensor t_glat_h = host_tensor(half, 4, s_lat, BRIDGE_DTYPE_F16);
    DLTensor t_glat = host_tensor(got, 4, s_lat, BRIDGE_DTYPE_F32);
    DLTensor t_tgt = host_tensor((void *)target, 3, s_tok, BRIDGE_DTYPE_F32);
    t_loss32 = host_tensor(&loss32, 1, s_one, BRIDGE_DTYPE_F32);
    EXPECT_OK(bridge_latent_loss_backward(h, lat, tgt_r, glat_ref, B, S, S, BRIDGE_DTYPE_F32, &loss_ref, NULL));
    EXPECT_OK(bridge_latent_loss_backward_dlpack(h, &t_lat, &t_tgt_b, &t_glat_h, &t_loss32, NULL));
    CHECK(loss32 == loss_ref, "latent_loss_backward_dlpack: loss %.9g vs %.9g", loss32, loss_ref);
    CHECK(rounded_from(half, glat_ref, n_lat, BRIDGE_DTYPE_F16, "f16 grad_latents"), "f16 grad_latents");
    EXPECT_OK(bridge_latent_loss_backward(h, lat, target, glat_ref, B, S, S, BRIDGE_DTYPE_F32, &loss_ref, NULL));
    EXPECT_OK(bridge_latent_loss_backward_dlpack(h, &t_lat, &t_tgt, &t_glat, &t_loss32, NULL));
    CHECK(loss32 == loss_ref && memcmp(got, glat_ref, n_lat * sizeof(float)) == 0,
          "latent_loss_backward_dlpack f32: loss %.9g vs %.9g", loss32, loss_ref);

    /* a train step on two bridges made alike: pointer call (f32) on one, DLPack (f16
     * latents, bf16 targets: the same values) on the other; the same step, weights after */
    BridgeHandle *ha = NULL, *hb = NULL;
    EXPECT_OK(bridge_create(params, &ha));
    EXPECT_OK(bridge_create(params, &hb));
    if (ha && hb) {
        BridgeStepStats sa, sb;
        sa.struct_size = sb.struct_size = sizeof sa;
        EXPECT_OK(bridge_train_step(ha, lat_r, tgt_r, B, S, S, BRIDGE_DTYPE_F32, &sa, NULL));
        EXPECT_OK(bridge_train_step_dlpack(hb, &t_lat_h, &t_tgt_b, &sb, NULL));
        CHECK(sa.step == 1 && sb.step == 1 && !sa.skipped && !sb.skipped && sa.loss == sb.loss &&
                  sa.grad_norm == sb.grad_norm && sa.lr == sb.lr,
              "train_step_dlpack: loss %.9g vs %.9g, grad_norm %.9g vs %.9g", sb.loss, sa.loss, sb.grad_norm,
              sa.grad_norm);
        EXPECT_OK(bridge_forward(ha, lat, ref, B, S, S, BRIDGE_DTYPE_F32));
        EXPECT_OK(bridge_forward(hb, lat, got, B, S, S, BRIDGE_DTYPE_F32));
        CHECK(memcmp(got, ref, n_tok * sizeof(float)) == 0, "train_step_dlpack: weights differ after the step");

        /* the log callback: a skipped step is a WARN naming it, with our user_data; nothing
         * arrives once the callback is removed */
        LogSeen seen;
        memset(&seen, 0, sizeof seen);
        float *tgt_nan = malloc(n_tok * sizeof(float));
        memcpy(tgt_nan, target, n_tok * sizeof(float));
        tgt_nan[5] = NAN;
        DLTensor t_tgt_nan = host_tensor(tgt_nan, 3, s_tok, BRIDGE_DTYPE_F32);
        log_user_data = &seen;
        EXPECT_OK(bridge_set_log_callback(on_log, &seen));
        EXPECT_OK(bridge_train_step_dlpack(hb, &t_lat, &t_tgt_nan, &sb, NULL));
        CHECK(sb.skipped == 1 && sb.step == 1, "NaN targets: skipped %d step %lld", sb.skipped, (long long)sb.step);
        CHECK(seen.skip_warnings == 1, "log callback: %d warnings naming the skipped step 2 (last: '%s')",
              seen.skip_warnings, seen.last);
        printf("log callback got: %s\n", seen.last);
        EXPECT_OK(bridge_set_log_callback(NULL, NULL));
        int calls = seen.calls;
        EXPECT_OK(bridge_train_step(hb, lat, tgt_nan, B, S, S, BRIDGE_DTYPE_F32, &sb, NULL));
        CHECK(sb.skipped == 1, "NaN targets (pointer call): skipped %d", sb.skipped);
        CHECK(seen.calls == calls, "log callback called after removal: '%s'", seen.last);
        CHECK(log_wrong_user_data == 0, "log callback got another user_data %d times", log_wrong_user_data);
        free(tgt_nan);
    }
    bridge_destroy(ha);
    bridge_destroy(hb);

    /* what this build can do */
    BridgeCapabilities caps;
    memset(&caps, 0xab, sizeof caps);
    caps.struct_size = sizeof caps;
    EXPECT_OK(bridge_get_capabilities(&caps));
    CHECK(caps.struct_size == sizeof caps && caps.abi_version == 5 && caps.dlpack_major == 1 &&
              caps.dlpack_minor == 0 && caps.max_latent_side == 16384,
          "capabilities: abi %u dlpack %d.%d max side %d", caps.abi_version, caps.dlpack_major, caps.dlpack_minor,
          caps.max_latent_side);
    CHECK(caps.buffer_dtypes == ((1u << BRIDGE_DTYPE_F32) | (1u << BRIDGE_DTYPE_F16) | (1u << BRIDGE_DTYPE_BF16)),
          "buffer_dtypes 0x%x", caps.buffer_dtypes);
#ifndef DINO_BRIDGE_CUDA_BUILD
    CHECK(caps.cuda == 0 && caps.cuda_devices == 0 && caps.compute_dtypes == (1u << BRIDGE_DTYPE_F32),
          "CPU build: cuda %d devices %d compute_dtypes 0x%x", caps.cuda, caps.cuda_devices, caps.compute_dtypes);
#else
    CHECK(caps.cuda == 1 && caps.cuda_devices >= 0 &&
              caps.compute_dtypes == ((1u << BRIDGE_DTYPE_F32) | (1u << BRIDGE_DTYPE_BF16)),
          "CUDA build: cuda %d devices %d compute_dtypes 0x%x", caps.cuda, caps.cuda_devices, caps.compute_dtypes);
#endif

    free(ref); free(got); free(lat_r); free(tgt_r); free(lat_h); free(tgt_b); free(half); free(glat_ref);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s FIXTURES TMP LOSS_GRID8 LOSS_LATENTS MISFIT\n", argv[0]);
        return 2;
    }
    const char *fx = argv[1], *tmp = argv[2], *misfit = argv[5];
    double want_loss_grid8 = atof(argv[3]), want_loss_latents = atof(argv[4]);
    char path[4096];

    CHECK(bridge_abi_version() == BRIDGE_ABI_VERSION && BRIDGE_ABI_VERSION == 5, "ABI version %u",
          bridge_abi_version());

    BridgeParams params;
    params.struct_size = sizeof params;
    EXPECT_OK(bridge_params_default(&params));
    CHECK(params.width == 768 && params.depth == 8 && params.grid == 8 && params.adapter_depth == 2, "defaults");
    CHECK(params.w_gram == 0.0f && params.spatial_norm_gamma == 0.0f, "ABI 2 defaults: w_gram %g gamma %g",
          params.w_gram, params.spatial_norm_gamma);
    CHECK(params.align_w_cos == 1.0f && params.align_w_norm == 0.0f && params.align_w_raw == 0.0f &&
              params.align_w_gram == 0.0f && params.w_norm == 0.25f,
          "ABI 4 defaults: alignment is REPA's loss (1, 0, 0, 0), training keeps (1, 0.25, 0.05, 0)");
    /* The fixtures' alignment losses were made with the composite weights. */
    params.align_w_norm = 0.25f;
    params.align_w_raw = 0.05f;
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

    /* ---- ABI 3: DLPack descriptors, capabilities, the log callback ---- */
    dlpack_calls(h, &params, lat, pred8, target);

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
        fprintf(stderr, "%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("C API: all checks passed (%d)\n", checks);
    return 0;
}
