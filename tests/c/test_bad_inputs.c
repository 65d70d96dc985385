/* The bad-input matrix: every C entry point against every kind of bad argument it can
 * get. Each row names the status it must return and the words its message must contain
 * ("a|b": both); after every row no output buffer was written, and the handle gives
 * bit-identical output and the same step count (nothing half-applied). A few rows are
 * calls that must be accepted (ACCEPTED: an ABI 1 BridgeParams). Built and run by
 * tests/c_api.rs, also under valgrind.
 *
 * The fixture bridge has adapter_depth 2: latent sides are multiples of 4, and 16x16
 * latents give a 4x4 token grid.
 *
 * usage: test_bad_inputs FIXTURE_DIR TMP_DIR */
#include "dino_bridge.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    BridgeHandle *h, *dead, *hg;
    float *lat, *lat_nan, *lat_inf, *tgt, *tgt_inf, *pred8, *pred8_nan;
    float *out, *grad8, *glat;
    float loss;
    BridgeStepStats stats, stats_small, stats_big;
    BridgeInfo info, info_small, info_big;
    BridgeParams params, p_small, p_big, p_dir, p_missing, p_utf8, p_notdir, p_empty, p_heads,
        p_cuda, p_device, p_dtype, p_gamma_neg, p_gamma_nan, p_gamma_inf, p_gram_neg, p_gram_nan;
    BridgeHandle *made;
    char dir[4096], missing[4096], notdir[4096], why[512];
} Ctx;

/* S: the fixture's latent side. c->lat holds 16x32 latents (LAT_BUF) so that rectangular
 * calls read inside it; the fixture's 16x16 ones are its first LAT values. */
enum { B = 3, S = 16, LAT = 3 * 4 * 16 * 16, LAT_BUF = 2 * LAT, TOK = 3 * 16 * 48, TOK8 = 3 * 64 * 48 };
#define BIG (INT64_MAX / 2)
#define MAX_SIDE 16384
#define BAD_UTF8 "\xff\xfe.safetensors"
/* A BridgeParams as a caller built against the ABI 1 header passes it. */
#define ABI1_PARAMS_SIZE ((uint32_t)offsetof(BridgeParams, w_gram))

/* One call per compute entry point at batch n and latent size hh x ww; the rest valid. */
static int32_t fwd(Ctx *c, int64_t n, int32_t hh, int32_t ww) {
    return bridge_forward(c->h, c->lat, c->out, n, hh, ww, BRIDGE_DTYPE_F32);
}
static int32_t fwd_cuda(Ctx *c, int64_t n, int32_t hh, int32_t ww) {
    return bridge_forward_cuda_ptr(c->h, c->lat, c->out, n, hh, ww, BRIDGE_DTYPE_F32, NULL);
}
static int32_t loss_at(Ctx *c, int64_t n, int32_t hh, int32_t ww) {
    return bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, n, hh, ww, 8, 8, BRIDGE_DTYPE_F32, &c->loss, NULL);
}
static int32_t lat_loss_at(Ctx *c, int64_t n, int32_t hh, int32_t ww) {
    return bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, n, hh, ww, BRIDGE_DTYPE_F32, &c->loss, NULL);
}
static int32_t step_at(Ctx *c, int64_t n, int32_t hh, int32_t ww) {
    return bridge_train_step(c->h, c->lat, c->tgt, n, hh, ww, BRIDGE_DTYPE_F32, &c->stats, NULL);
}
/* bridge_loss_backward with the caller grid ph x pw, on the main handle or on the one
 * with spatial_norm_gamma = 0.6. */
static int32_t loss_grid(Ctx *c, int32_t hh, int32_t ww, int32_t ph, int32_t pw) {
    return bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, hh, ww, ph, pw, BRIDGE_DTYPE_F32, &c->loss, NULL);
}
static int32_t loss_gamma(Ctx *c, int32_t hh, int32_t ww, int32_t ph, int32_t pw) {
    return bridge_loss_backward(c->hg, c->pred8, c->lat, c->grad8, B, hh, ww, ph, pw, BRIDGE_DTYPE_F32, &c->loss, NULL);
}

static int32_t fail(Ctx *c, const char *why) {
    snprintf(c->why, sizeof c->why, "%s", why);
    return -100;
}

/* bridge_params_default on an ABI 1 struct: OK, the ABI 1 fields filled, not one byte
 * written past its struct_size. */
static int32_t abi1_default(Ctx *c) {
    BridgeParams p;
    memset(&p, 0xab, sizeof p);
    p.struct_size = ABI1_PARAMS_SIZE;
    int32_t st = bridge_params_default(&p);
    if (st != BRIDGE_OK) return st;
    const unsigned char *tail = (const unsigned char *)&p + ABI1_PARAMS_SIZE;
    for (size_t i = 0; i < sizeof p - ABI1_PARAMS_SIZE; i++)
        if (tail[i] != 0xab) return fail(c, "wrote past an ABI 1 struct_size");
    if (p.struct_size != ABI1_PARAMS_SIZE || p.width != c->params.width || p.w_cos != c->params.w_cos ||
        p.w_raw != c->params.w_raw || p.total_steps != c->params.total_steps)
        return fail(c, "the ABI 1 fields are not the defaults");
    return BRIDGE_OK;
}

/* bridge_create on an ABI 1 struct: accepted, the bytes past it ignored (they hold values
 * that bridge_create refuses), w_gram and spatial_norm_gamma defaulted to 0: the loss and
 * gradient are those of the main handle (full struct, both 0). */
static int32_t abi1_create(Ctx *c) {
    BridgeParams p = c->params;
    p.struct_size = ABI1_PARAMS_SIZE;
    p.w_gram = -1.0f;
    p.spatial_norm_gamma = NAN;
    BridgeHandle *old = NULL;
    int32_t st = bridge_create(&p, &old);
    if (st != BRIDGE_OK) return st;
    float *ga = malloc(TOK8 * sizeof(float)), *gb = malloc(TOK8 * sizeof(float)), la = 0, lb = 0;
    st = bridge_loss_backward(old, c->pred8, c->lat, ga, B, S, S, 8, 8, BRIDGE_DTYPE_F32, &la, NULL);
    if (st == BRIDGE_OK)
        st = bridge_loss_backward(c->h, c->pred8, c->lat, gb, B, S, S, 8, 8, BRIDGE_DTYPE_F32, &lb, NULL);
    if (st == BRIDGE_OK) {
        float scale = 0, err = 0;
        for (int i = 0; i < TOK8; i++) {
            scale = fmaxf(scale, fabsf(gb[i]));
            err = fmaxf(err, fabsf(ga[i] - gb[i]));
        }
        if (!(fabsf(la - lb) <= 1e-6f && err <= 1e-6f * scale)) {
            snprintf(c->why, sizeof c->why, "ABI 1 bridge: loss %.8f vs %.8f, gradient error %g: w_gram or "
                     "spatial_norm_gamma not defaulted to 0", la, lb, err);
            st = -100;
        }
    }
    free(ga);
    free(gb);
    bridge_destroy(old);
    return st;
}

/* The latent-size rows of one compute entry point `call(c, batch, height, width)`:
 * sides zero, negative, not a multiple of 4, above 16384; a call larger than any
 * memory (valid sides, or a batch whose buffer size overflows). All SHAPE. */
#define SIDE_ROWS(X, ep, call, ST, W)                                                                  \
    X(ep##_height0, ST, W("latent height = 0"), call(c, B, 0, S))                                   \
    X(ep##_width0, ST, W("latent width = 0"), call(c, B, S, 0))                                     \
    X(ep##_height_neg, ST, W("latent height = -16"), call(c, B, -16, S))                            \
    X(ep##_width_neg, ST, W("latent width = -4"), call(c, B, S, -4))                                \
    X(ep##_height18, ST, W("latent height = 18"), call(c, B, 18, S))                                \
    X(ep##_width2, ST, W("latent width = 2|multiple of 4"), call(c, B, S, 2))                       \
    X(ep##_height_i32max, ST, W("latent height = 2147483647"), call(c, B, INT32_MAX, S))            \
    X(ep##_width_i32min, ST, W("latent width = -2147483648"), call(c, B, S, INT32_MIN))             \
    X(ep##_width16388, ST, W("latent width = 16388|16384"), call(c, B, S, MAX_SIDE + 4))            \
    X(ep##_memory, ST, W("batch 3|4096x4096|GiB"), call(c, B, MAX_SIDE, MAX_SIDE))                 \
    X(ep##_batch_big, ST, W("batch 4611686018427387903|GiB"), call(c, BIG, S, S))                   \
    X(ep##_batch_size_big, ST, W("batch 4611686018427387903|4096x4096"), call(c, BIG, MAX_SIDE, MAX_SIDE))

#define AS_IS(word) word
#define INV BRIDGE_ERR_INVALID_ARGUMENT

/* name, status, words in the message, the call (on `c`) */
#define CASES(X)                                                                                          \
    X(params_default_null, INV, "NULL", bridge_params_default(NULL))                                     \
    X(params_default_small, BRIDGE_ERR_ABI_MISMATCH, "struct_size", bridge_params_default(&c->p_small))  \
    X(params_default_big, BRIDGE_ERR_ABI_MISMATCH, "struct_size", bridge_params_default(&c->p_big))      \
    X(params_default_abi1, ACCEPTED, "", abi1_default(c))                                                \
    X(create_params_null, INV, "params is NULL", bridge_create(NULL, &c->made))                          \
    X(create_out_null, INV, "NULL", bridge_create(&c->params, NULL))                                     \
    X(create_small, BRIDGE_ERR_ABI_MISMATCH, "struct_size", bridge_create(&c->p_small, &c->made))        \
    X(create_big, BRIDGE_ERR_ABI_MISMATCH, "newer", bridge_create(&c->p_big, &c->made))                  \
    X(create_abi1, ACCEPTED, "", abi1_create(c))                                                         \
    X(create_dir, BRIDGE_ERR_IO, "directory", bridge_create(&c->p_dir, &c->made))                        \
    X(create_missing, BRIDGE_ERR_IO, "missing.safetensors", bridge_create(&c->p_missing, &c->made))      \
    X(create_notdir, BRIDGE_ERR_IO, "passwd", bridge_create(&c->p_notdir, &c->made))                     \
    X(create_utf8, INV, "UTF-8", bridge_create(&c->p_utf8, &c->made))                                    \
    X(create_empty_path, INV, "empty", bridge_create(&c->p_empty, &c->made))                             \
    X(create_heads, INV, "heads", bridge_create(&c->p_heads, &c->made))                                  \
    X(create_cuda, CUDA_CREATE_STATUS, CUDA_CREATE_WORD, bridge_create(&c->p_cuda, &c->made))            \
    X(create_device, INV, "device", bridge_create(&c->p_device, &c->made))                               \
    X(create_dtype, INV, "compute_dtype", bridge_create(&c->p_dtype, &c->made))                          \
    X(create_gamma_neg, INV, "spatial_norm_gamma = -1", bridge_create(&c->p_gamma_neg, &c->made))        \
    X(create_gamma_nan, INV, "spatial_norm_gamma = NaN", bridge_create(&c->p_gamma_nan, &c->made))       \
    X(create_gamma_inf, INV, "spatial_norm_gamma = inf", bridge_create(&c->p_gamma_inf, &c->made))       \
    X(create_gram_neg, INV, "w_gram = -1", bridge_create(&c->p_gram_neg, &c->made))                      \
    X(create_gram_nan, INV, "w_gram = NaN", bridge_create(&c->p_gram_nan, &c->made))                     \
    X(destroy_dead, INV, "not a live bridge", bridge_destroy(c->dead))                                   \
    X(info_null_handle, INV, "handle is NULL", bridge_get_info(NULL, &c->info))                          \
    X(info_dead, INV, "not a live bridge", bridge_get_info(c->dead, &c->info))                           \
    X(info_null, INV, "NULL", bridge_get_info(c->h, NULL))                                               \
    X(info_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeInfo", bridge_get_info(c->h, &c->info_small))          \
    X(info_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeInfo", bridge_get_info(c->h, &c->info_big))              \
    X(fwd_null_handle, INV, "handle is NULL", bridge_forward(NULL, c->lat, c->out, B, S, S, 0))          \
    X(fwd_dead, INV, "not a live bridge", bridge_forward(c->dead, c->lat, c->out, B, S, S, 0))           \
    X(fwd_lat_null, INV, "latents is NULL", bridge_forward(c->h, NULL, c->out, B, S, S, 0))              \
    X(fwd_out_null, INV, "out is NULL", bridge_forward(c->h, c->lat, NULL, B, S, S, 0))                  \
    X(fwd_batch0, INV, "batch = 0", bridge_forward(c->h, c->lat, c->out, 0, S, S, 0))                    \
    X(fwd_batch_neg, INV, "batch = -1", bridge_forward(c->h, c->lat, c->out, -1, S, S, 0))               \
    X(fwd_batch_min, INV, "batch", bridge_forward(c->h, c->lat, c->out, INT64_MIN, S, S, 0))             \
    X(fwd_dtype7, INV, "dtype = 7", bridge_forward(c->h, c->lat, c->out, B, S, S, 7))                    \
    X(fwd_dtype_neg, INV, "dtype = -1", bridge_forward(c->h, c->lat, c->out, B, S, S, -1))               \
    X(fwd_nan, BRIDGE_ERR_NON_FINITE, "latents", bridge_forward(c->h, c->lat_nan, c->out, B, S, S, 0))   \
    X(fwd_inf, BRIDGE_ERR_NON_FINITE, "latents", bridge_forward(c->h, c->lat_inf, c->out, B, S, S, 0))   \
    SIDE_ROWS(X, fwd, fwd, BRIDGE_ERR_SHAPE, AS_IS)                                                      \
    X(cuda_null_handle, INV, "handle is NULL", bridge_forward_cuda_ptr(NULL, c->lat, c->out, B, S, S, 0, NULL)) \
    X(cuda_dead, INV, "not a live bridge", bridge_forward_cuda_ptr(c->dead, c->lat, c->out, B, S, S, 0, NULL))  \
    X(cuda_dtype7, INV, "dtype = 7", bridge_forward_cuda_ptr(c->h, c->lat, c->out, B, S, S, 7, NULL))           \
    X(cuda_cpu_build, CUDA_PTR_STATUS, CUDA_PTR_WORD, fwd_cuda(c, B, S, S))                              \
    SIDE_ROWS(X, cuda, fwd_cuda, CUDA_SHAPE_STATUS, CUDA_SHAPE_WORD)                                     \
    X(loss_null_handle, INV, "handle is NULL", bridge_loss_backward(NULL, c->pred8, c->lat, c->grad8, B, S, S, 8, 8, 0, &c->loss, NULL)) \
    X(loss_dead, INV, "not a live bridge", bridge_loss_backward(c->dead, c->pred8, c->lat, c->grad8, B, S, S, 8, 8, 0, &c->loss, NULL))  \
    X(loss_pred_null, INV, "pred is NULL", bridge_loss_backward(c->h, NULL, c->lat, c->grad8, B, S, S, 8, 8, 0, &c->loss, NULL))         \
    X(loss_lat_null, INV, "latents is NULL", bridge_loss_backward(c->h, c->pred8, NULL, c->grad8, B, S, S, 8, 8, 0, &c->loss, NULL))     \
    X(loss_grad_null, INV, "grad_pred is NULL", bridge_loss_backward(c->h, c->pred8, c->lat, NULL, B, S, S, 8, 8, 0, &c->loss, NULL))    \
    X(loss_loss_null, INV, "loss is NULL", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, S, S, 8, 8, 0, NULL, NULL))         \
    X(loss_batch0, INV, "batch = 0", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, 0, S, S, 8, 8, 0, &c->loss, NULL))           \
    X(loss_batch_neg, INV, "batch = -1", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, -1, S, S, 8, 8, 0, &c->loss, NULL))      \
    X(loss_dtype7, INV, "dtype = 7", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, S, S, 8, 8, 7, &c->loss, NULL))           \
    X(loss_pred_nan, BRIDGE_ERR_NON_FINITE, "pred", bridge_loss_backward(c->h, c->pred8_nan, c->lat, c->grad8, B, S, S, 8, 8, 0, &c->loss, NULL)) \
    X(loss_lat_inf, BRIDGE_ERR_NON_FINITE, "latents", bridge_loss_backward(c->h, c->pred8, c->lat_inf, c->grad8, B, S, S, 8, 8, 0, &c->loss, NULL)) \
    SIDE_ROWS(X, loss, loss_at, BRIDGE_ERR_SHAPE, AS_IS)                                                 \
    /* caller grids that are no multiple or divisor of the bridge's by one factor */                     \
    X(loss_grid6x6, INV, "pred grid 6x6|token grid 4x4", loss_grid(c, S, S, 6, 6))                       \
    X(loss_grid8x4, INV, "pred grid 8x4|token grid 4x4", loss_grid(c, S, S, 8, 4))                       \
    X(loss_grid2x4, INV, "pred grid 2x4|token grid 4x4", loss_grid(c, S, S, 2, 4))                       \
    X(loss_grid3x3, INV, "pred grid 3x3|token grid 4x4", loss_grid(c, S, S, 3, 3))                       \
    X(loss_grid0x4, INV, "pred grid 0x4|token grid 4x4", loss_grid(c, S, S, 0, 4))                       \
    X(loss_grid4x0, INV, "pred grid 4x0|token grid 4x4", loss_grid(c, S, S, 4, 0))                       \
    X(loss_grid0x0, INV, "pred grid 0x0|token grid 4x4", loss_grid(c, S, S, 0, 0))                       \
    X(loss_grid_neg, INV, "pred grid -4x-4|token grid 4x4", loss_grid(c, S, S, -4, -4))                  \
    X(loss_grid_neg_w, INV, "pred grid 8x-8|token grid 4x4", loss_grid(c, S, S, 8, -8))                  \
    X(loss_grid_huge, INV, "pred grid 1073741824x1073741824|token grid 4x4", loss_grid(c, S, S, 1 << 30, 1 << 30)) \
    X(loss_grid_i32max, INV, "pred grid 2147483647x2147483647", loss_grid(c, S, S, INT32_MAX, INT32_MAX)) \
    X(loss_rect8x8, INV, "pred grid 8x8|token grid 4x8", loss_grid(c, S, 2 * S, 8, 8))                   \
    X(loss_rect4x4, INV, "pred grid 4x4|token grid 4x8", loss_grid(c, S, 2 * S, 4, 4))                   \
    X(loss_rect2x2, INV, "pred grid 2x2|token grid 4x8", loss_grid(c, S, 2 * S, 2, 2))                   \
    X(loss_rect8x4, INV, "pred grid 8x4|token grid 4x8", loss_grid(c, S, 2 * S, 8, 4))                   \
    /* spatial normalisation on a one-token loss grid */                                                 \
    X(loss_gamma_pooled_target, INV, "spatial_norm_gamma = 0.6|1 token", loss_gamma(c, S, S, 1, 1))      \
    X(loss_gamma_one_token, INV, "spatial_norm_gamma = 0.6|1 token", loss_gamma(c, 4, 4, 1, 1))          \
    X(loss_gamma_pooled_pred, INV, "spatial_norm_gamma = 0.6|1 token", loss_gamma(c, 4, 4, 2, 2))        \
    X(lat_null_handle, INV, "handle is NULL", bridge_latent_loss_backward(NULL, c->lat, c->tgt, c->glat, B, S, S, 0, &c->loss, NULL))  \
    X(lat_dead, INV, "not a live bridge", bridge_latent_loss_backward(c->dead, c->lat, c->tgt, c->glat, B, S, S, 0, &c->loss, NULL))   \
    X(lat_lat_null, INV, "latents is NULL", bridge_latent_loss_backward(c->h, NULL, c->tgt, c->glat, B, S, S, 0, &c->loss, NULL))      \
    X(lat_tgt_null, INV, "target is NULL", bridge_latent_loss_backward(c->h, c->lat, NULL, c->glat, B, S, S, 0, &c->loss, NULL))       \
    X(lat_grad_null, INV, "grad_latents is NULL", bridge_latent_loss_backward(c->h, c->lat, c->tgt, NULL, B, S, S, 0, &c->loss, NULL)) \
    X(lat_loss_null, INV, "loss is NULL", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, B, S, S, 0, NULL, NULL))          \
    X(lat_batch0, INV, "batch = 0", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, 0, S, S, 0, &c->loss, NULL))            \
    X(lat_dtype7, INV, "dtype = 7", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, B, S, S, 7, &c->loss, NULL))            \
    X(lat_nan, BRIDGE_ERR_NON_FINITE, "latents", bridge_latent_loss_backward(c->h, c->lat_nan, c->tgt, c->glat, B, S, S, 0, &c->loss, NULL)) \
    X(lat_tgt_inf, BRIDGE_ERR_NON_FINITE, "target", bridge_latent_loss_backward(c->h, c->lat, c->tgt_inf, c->glat, B, S, S, 0, &c->loss, NULL)) \
    SIDE_ROWS(X, lat, lat_loss_at, BRIDGE_ERR_SHAPE, AS_IS)                                              \
    X(step_null_handle, INV, "handle is NULL", bridge_train_step(NULL, c->lat, c->tgt, B, S, S, 0, &c->stats, NULL))  \
    X(step_dead, INV, "not a live bridge", bridge_train_step(c->dead, c->lat, c->tgt, B, S, S, 0, &c->stats, NULL))   \
    X(step_lat_null, INV, "latents is NULL", bridge_train_step(c->h, NULL, c->tgt, B, S, S, 0, &c->stats, NULL))      \
    X(step_tgt_null, INV, "targets is NULL", bridge_train_step(c->h, c->lat, NULL, B, S, S, 0, &c->stats, NULL))      \
    X(step_stats_null, INV, "stats is NULL", bridge_train_step(c->h, c->lat, c->tgt, B, S, S, 0, NULL, NULL))         \
    X(step_batch0, INV, "batch = 0", bridge_train_step(c->h, c->lat, c->tgt, 0, S, S, 0, &c->stats, NULL))            \
    X(step_batch_neg, INV, "batch = -1", bridge_train_step(c->h, c->lat, c->tgt, -1, S, S, 0, &c->stats, NULL))       \
    X(step_dtype7, INV, "dtype = 7", bridge_train_step(c->h, c->lat, c->tgt, B, S, S, 7, &c->stats, NULL))            \
    X(step_stats_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats", bridge_train_step(c->h, c->lat, c->tgt, B, S, S, 0, &c->stats_small, NULL)) \
    X(step_stats_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats", bridge_train_step(c->h, c->lat, c->tgt, B, S, S, 0, &c->stats_big, NULL))     \
    X(step_nan, SKIPPED, "", bridge_train_step(c->h, c->lat_nan, c->tgt, B, S, S, 0, &c->stats, NULL))  \
    X(step_inf, SKIPPED, "", bridge_train_step(c->h, c->lat, c->tgt_inf, B, S, S, 0, &c->stats, NULL))  \
    SIDE_ROWS(X, step, step_at, BRIDGE_ERR_SHAPE, AS_IS)                                                 \
    X(save_null_handle, INV, "handle is NULL", bridge_save(NULL, c->missing))                            \
    X(save_dead, INV, "not a live bridge", bridge_save(c->dead, c->missing))                             \
    X(save_null_path, INV, "path is NULL", bridge_save(c->h, NULL))                                      \
    X(save_empty_path, INV, "empty", bridge_save(c->h, ""))                                              \
    X(save_utf8, INV, "UTF-8", bridge_save(c->h, BAD_UTF8))                                              \
    X(save_dir, BRIDGE_ERR_IO, "directory", bridge_save(c->h, c->dir))                                   \
    X(save_missing_dir, BRIDGE_ERR_IO, "no-such-dir", bridge_save(c->h, c->missing))                     \
    X(save_notdir, BRIDGE_ERR_IO, "passwd", bridge_save(c->h, c->notdir))

/* A non-finite train step is not an error: OK with stats.skipped = 1, nothing updated. */
#define SKIPPED (-1)
/* A call that must succeed (the row's function checks what it did). */
#define ACCEPTED (-2)
/* tests/c_api.rs defines DINO_BRIDGE_CUDA_BUILD when the library has the cuda feature.
 * Without it, bridge_forward_cuda_ptr checks the handle and dtype, then says so. */
#ifdef DINO_BRIDGE_CUDA_BUILD
#define CUDA_DEVICE 999
#define CUDA_CREATE_STATUS BRIDGE_ERR_DEVICE
#define CUDA_CREATE_WORD "device = 999"
#define CUDA_PTR_STATUS BRIDGE_ERR_INVALID_ARGUMENT
#define CUDA_PTR_WORD "CPU"
#define CUDA_SHAPE_STATUS BRIDGE_ERR_SHAPE
#define CUDA_SHAPE_WORD(word) word
#else
#define CUDA_DEVICE 0
#define CUDA_CREATE_STATUS BRIDGE_ERR_UNSUPPORTED
#define CUDA_CREATE_WORD "without CUDA"
#define CUDA_PTR_STATUS BRIDGE_ERR_UNSUPPORTED
#define CUDA_PTR_WORD "without CUDA"
#define CUDA_SHAPE_STATUS BRIDGE_ERR_UNSUPPORTED
#define CUDA_SHAPE_WORD(word) "without CUDA"
#endif

#define DEFINE(name, want, word, call) \
    static int32_t name(Ctx *c) { (void)c; return call; }
CASES(DEFINE)

typedef struct {
    const char *name;
    int32_t want;
    const char *word;
    int32_t (*call)(Ctx *);
} Case;

#define ROW(name, want, word, call) {#name, want, word, name},
static const Case cases[] = {CASES(ROW)};

/* Whether `msg` contains every '|'-separated part of `words`. */
static int has_words(const char *msg, const char *words) {
    if (!msg) return 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", words);
    for (char *part = strtok(buf, "|"); part; part = strtok(NULL, "|"))
        if (!strstr(msg, part)) return 0;
    return 1;
}

static int untouched(const void *buf, size_t bytes) {
    const unsigned char *b = buf;
    for (size_t i = 0; i < bytes; i++)
        if (b[i] != 0x7f) return 0;
    return 1;
}

static float *read_npy(const char *dir, const char *name, size_t want, size_t room) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char pre[10];
    if (fread(pre, 1, 10, f) != 10) { fclose(f); return NULL; }
    fseek(f, 10 + (pre[8] | (pre[9] << 8)), SEEK_SET);
    float *v = calloc(room, sizeof(float));
    size_t got = fread(v, sizeof(float), want, f);
    fclose(f);
    if (got != want) { free(v); return NULL; }
    return v;
}

static float *copy(const float *src, size_t n) {
    float *d = malloc(n * sizeof(float));
    memcpy(d, src, n * sizeof(float));
    return d;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FIXTURES TMP\n", argv[0]);
        return 2;
    }
    const char *fx = argv[1], *tmp = argv[2];
    static Ctx ctx;
    Ctx *c = &ctx;
    char ckpt[4096];
    snprintf(ckpt, sizeof ckpt, "%s/model.safetensors", fx);
    snprintf(c->dir, sizeof c->dir, "%s", tmp);
    snprintf(c->missing, sizeof c->missing, "%s/no-such-dir/missing.safetensors", tmp);
    snprintf(c->notdir, sizeof c->notdir, "/etc/passwd/x.safetensors");

    if (bridge_abi_version() != BRIDGE_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header ABI %d\n", bridge_abi_version(), BRIDGE_ABI_VERSION);
        return 1;
    }
    c->params.struct_size = sizeof c->params;
    if (bridge_params_default(&c->params) != BRIDGE_OK) return 1;
    c->params.checkpoint_path = ckpt;
    c->params.warmup_steps = 0;
    c->p_small = c->p_big = c->p_dir = c->p_missing = c->p_utf8 = c->p_notdir = c->p_empty =
        c->p_heads = c->p_cuda = c->p_device = c->p_dtype = c->p_gamma_neg = c->p_gamma_nan =
            c->p_gamma_inf = c->p_gram_neg = c->p_gram_nan = c->params;
    c->p_small.struct_size = 4;
    c->p_big.struct_size = sizeof c->params + 8;
    c->p_dir.checkpoint_path = tmp;
    c->p_missing.checkpoint_path = c->missing;
    c->p_utf8.checkpoint_path = BAD_UTF8;
    c->p_notdir.checkpoint_path = c->notdir;
    c->p_empty.checkpoint_path = "";
    c->p_heads.checkpoint_path = NULL;
    c->p_heads.heads = 7;
    c->p_cuda.checkpoint_path = NULL;
    c->p_cuda.device = CUDA_DEVICE;
    c->p_device.device = -5;
    c->p_dtype.compute_dtype = 9;
    c->p_gamma_neg.spatial_norm_gamma = -1.0f;
    c->p_gamma_nan.spatial_norm_gamma = NAN;
    c->p_gamma_inf.spatial_norm_gamma = INFINITY;
    c->p_gram_neg.w_gram = -1.0f;
    c->p_gram_nan.w_gram = NAN;
    BridgeParams pg = c->params;
    pg.spatial_norm_gamma = 0.6f;
    if (bridge_create(&c->params, &c->h) != BRIDGE_OK || bridge_create(&c->params, &c->dead) != BRIDGE_OK ||
        bridge_create(&pg, &c->hg) != BRIDGE_OK) {
        fprintf(stderr, "create failed: %s\n", bridge_last_error());
        return 1;
    }
    bridge_destroy(c->dead);

    c->lat = read_npy(fx, "latents.npy", LAT, LAT_BUF);
    c->tgt = read_npy(fx, "target.npy", TOK, TOK);
    c->pred8 = read_npy(fx, "pred_grid8.npy", TOK8, TOK8);
    if (!c->lat || !c->tgt || !c->pred8) {
        fprintf(stderr, "fixtures missing in %s\n", fx);
        return 1;
    }
    c->lat_nan = copy(c->lat, LAT);
    c->lat_nan[LAT - 5] = NAN;
    c->lat_inf = copy(c->lat, LAT);
    c->lat_inf[7] = INFINITY;
    c->tgt_inf = copy(c->tgt, TOK);
    c->tgt_inf[100] = -INFINITY;
    c->pred8_nan = copy(c->pred8, TOK8);
    c->pred8_nan[0] = NAN;
    c->out = malloc(TOK * sizeof(float));
    c->grad8 = malloc(TOK8 * sizeof(float));
    c->glat = malloc(LAT * sizeof(float));
    c->stats.struct_size = sizeof c->stats;
    c->stats_small.struct_size = 4;
    c->stats_big.struct_size = sizeof c->stats + 8;
    c->info.struct_size = sizeof c->info;
    c->info_small.struct_size = 4;
    c->info_big.struct_size = sizeof c->info + 8;

    float *baseline = malloc(TOK * sizeof(float)), *now = malloc(TOK * sizeof(float));
    if (bridge_forward(c->h, c->lat, baseline, B, S, S, BRIDGE_DTYPE_F32) != BRIDGE_OK) return 1;
    int failures = 0, n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++) {
        const Case *k = &cases[i];
        c->made = NULL;
        c->why[0] = 0;
        c->stats.skipped = 0;
        memset(c->out, 0x7f, TOK * sizeof(float));
        memset(c->grad8, 0x7f, TOK8 * sizeof(float));
        memset(c->glat, 0x7f, LAT * sizeof(float));
        memset(&c->loss, 0x7f, sizeof c->loss);
        int32_t got = k->call(c);
        const char *msg = c->why[0] ? c->why : bridge_last_error();
        int ok;
        if (k->want == SKIPPED) {
            ok = got == BRIDGE_OK && c->stats.skipped == 1;
        } else if (k->want == ACCEPTED) {
            ok = got == BRIDGE_OK;
        } else {
            ok = got == k->want && has_words(msg, k->word) && c->made == NULL;
        }
        /* no output buffer was written: not on an error, nor by a skipped step */
        ok &= untouched(c->out, TOK * sizeof(float)) && untouched(c->grad8, TOK8 * sizeof(float)) &&
              untouched(c->glat, LAT * sizeof(float)) && untouched(&c->loss, sizeof c->loss);
        /* the handle still works, with the weights it had */
        BridgeInfo info;
        info.struct_size = sizeof info;
        int usable = bridge_forward(c->h, c->lat, now, B, S, S, BRIDGE_DTYPE_F32) == BRIDGE_OK &&
                     memcmp(now, baseline, TOK * sizeof(float)) == 0 &&
                     bridge_get_info(c->h, &info) == BRIDGE_OK && info.step == 0;
        if (!ok || !usable) {
            failures++;
            fprintf(stderr, "FAIL %-26s status %d (want %d), message '%s' (want '%s')%s\n", k->name, got,
                    k->want, msg ? msg : "(null)", k->word, usable ? "" : ", handle changed or unusable");
        } else {
            printf("ok   %-26s %d: %s\n", k->name, got,
                   k->want == SKIPPED ? "skipped" : k->want == ACCEPTED ? "accepted" : msg);
        }
        if (c->made) bridge_destroy(c->made);
    }
    bridge_destroy(c->h);
    bridge_destroy(c->hg);
    free(c->lat); free(c->lat_nan); free(c->lat_inf); free(c->tgt); free(c->tgt_inf);
    free(c->pred8); free(c->pred8_nan); free(c->out); free(c->grad8); free(c->glat);
    free(baseline); free(now);
    if (failures) {
        fprintf(stderr, "%d of %d bad-input cases failed\n", failures, n);
        return 1;
    }
    printf("bad-input matrix: all %d cases passed\n", n);
    return 0;
}
