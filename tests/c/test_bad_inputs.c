/* The bad-input matrix: every C entry point against every kind of bad argument it can
 * get. Each row names the status it must return and the words its message must contain
 * ("a|b": both); after every row no output buffer was written, and the handle holds
 * bit-identical weights and the same step count (nothing half-applied; every 25th row a
 * forward also gives the same bits). A few rows are
 * calls that must be accepted (ACCEPTED: an ABI 1 BridgeParams; DLPack descriptors with
 * free strides, compact strides, a byte offset, pinned-host memory, a 0-d loss). Built
 * and run by tests/it/c_api.rs, also under valgrind.
 *
 * The DLPack entry points (ABI 3) get the same rows on their descriptors: each row passes
 * valid descriptors of the buffers above (c->d_*) except one, spoiled in one field by the
 * helpers below. Descriptor problems (NULL, data, device, dtype, ndim, shape pointer,
 * negative sizes, strides) are INVALID_ARGUMENT, shapes that do not fit the model or each
 * other SHAPE, a pred token count or grid that meets no caller grid INVALID_ARGUMENT (as
 * the pred_h, pred_w of bridge_loss_backward).
 *
 * The fixture bridge has adapter_depth 2: latent sides are multiples of 4, and 16x16
 * latents give a 4x4 token grid.
 *
 * usage: test_bad_inputs FIXTURE_DIR TMP_DIR */
#include "dino_bridge.h"
#include "testing.h"

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
        p_cuda, p_device, p_dtype, p_gamma_neg, p_gamma_nan, p_gamma_inf, p_gram_neg, p_gram_nan,
        p_align_neg, p_align_nan;
    BridgeHandle *made;
    char dir[4096], missing[4096], notdir[4096], why[512];
    /* ABI 3: valid descriptors of lat, out, pred8, grad8, tgt, glat and loss, their shapes,
     * and copies that the rows spoil (slots, taken in turn) */
    DLTensor d_lat, d_out, d_pred8, d_grad8, d_tgt, d_glat, d_loss;
    int64_t sh_lat[4], sh_tok[3], sh_tok8[3], sh_one[1], nine[9];
    DLTensor slot[8];
    int64_t slot_shape[8][8], slot_strides[8][8];
    int next;
    float *pred8_big, *baseline;
    BridgeCapabilities caps, caps_small, caps_big;
    /* ABI 5: the flat parameter vector (the weights as loaded; the same with a NaN), a flat
     * gradient buffer (an output, checked untouched), their descriptors, info structs */
    int64_t n_params, sh_flat[1];
    float *flat, *flat_nan, *gflat;
    DLTensor d_flat, d_gflat;
    BridgeParamInfo pinfo, pinfo_small, pinfo_big;
    int64_t count;
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

/* ---- ABI 3: DLPack descriptors ---- */

/* A host descriptor of `ndim` dimensions `shape` of f32 at `data`. */
static DLTensor host_f32(void *data, int32_t ndim, int64_t *shape) {
    return host_tensor(data, ndim, shape, BRIDGE_DTYPE_F32);
}

/* A copy of `t` in the next slot, with its own shape (and strides) for a row to change. */
static DLTensor *spoil(Ctx *c, const DLTensor *t) {
    int i = c->next++ % 8;
    c->slot[i] = *t;
    if (t->shape && t->ndim > 0 && t->ndim <= 8) {
        memcpy(c->slot_shape[i], t->shape, (size_t)t->ndim * sizeof(int64_t));
        c->slot[i].shape = c->slot_shape[i];
    }
    return &c->slot[i];
}
static const DLTensor *data_at(Ctx *c, const DLTensor *t, void *data) {
    DLTensor *s = spoil(c, t);
    s->data = data;
    return s;
}
static const DLTensor *on_device(Ctx *c, const DLTensor *t, int32_t type, int32_t id) {
    DLTensor *s = spoil(c, t);
    s->device.device_type = type;
    s->device.device_id = id;
    return s;
}
static const DLTensor *typed(Ctx *c, const DLTensor *t, uint8_t code, uint8_t bits, uint16_t lanes) {
    DLTensor *s = spoil(c, t);
    s->dtype.code = code;
    s->dtype.bits = bits;
    s->dtype.lanes = lanes;
    return s;
}
static const DLTensor *offset_by(Ctx *c, const DLTensor *t, uint64_t byte_offset) {
    DLTensor *s = spoil(c, t);
    s->byte_offset = byte_offset;
    return s;
}
static const DLTensor *no_shape(Ctx *c, const DLTensor *t) {
    DLTensor *s = spoil(c, t);
    s->shape = NULL;
    return s;
}
/* ndim set to `ndim` (the shape pointer holds 9 values, so even 9 reads nothing wrong). */
static const DLTensor *ndim_is(Ctx *c, const DLTensor *t, int32_t ndim) {
    DLTensor *s = spoil(c, t);
    s->ndim = ndim;
    s->shape = c->nine;
    return s;
}
/* The last size negated. */
static const DLTensor *negative(Ctx *c, const DLTensor *t) {
    DLTensor *s = spoil(c, t);
    s->shape[s->ndim - 1] = -s->shape[s->ndim - 1];
    return s;
}
static const DLTensor *shaped(Ctx *c, const DLTensor *t, int32_t ndim, const int64_t *shape) {
    DLTensor *s = spoil(c, t);
    s->ndim = ndim;
    s->shape = c->slot_shape[s - c->slot];
    memcpy(s->shape, shape, (size_t)ndim * sizeof(int64_t));
    return s;
}
/* `t` with the shape given, e.g. SHAPED(&c->d_lat, 3, 4, 18, 16). */
#define SHAPED(t, ...) \
    shaped(c, t, (int32_t)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__})
static const DLTensor *strided(Ctx *c, const DLTensor *t, const int64_t *strides) {
    DLTensor *s = spoil(c, t);
    s->strides = c->slot_strides[s - c->slot];
    memcpy(s->strides, strides, (size_t)s->ndim * sizeof(int64_t));
    return s;
}
#define STRIDED(t, ...) strided(c, t, (int64_t[]){__VA_ARGS__})
/* Compact row-major strides with the last two dimensions' swapped (a transposed view). */
static const DLTensor *transposed(Ctx *c, const DLTensor *t) {
    int64_t st[8];
    int n = t->ndim;
    st[n - 1] = 1;
    for (int i = n - 2; i >= 0; i--) st[i] = st[i + 1] * t->shape[i + 1];
    st[n - 1] = t->shape[n - 2];
    st[n - 2] = 1;
    return strided(c, t, st);
}

/* The calls with one descriptor `t` replaced, the rest valid. */
#define FWD_LAT(t) bridge_forward_dlpack(c->h, t, &c->d_out, NULL)
#define FWD_OUT(t) bridge_forward_dlpack(c->h, &c->d_lat, t, NULL)
#define LOSS_PRED(t) bridge_loss_backward_dlpack(c->h, t, &c->d_lat, &c->d_grad8, &c->d_loss, NULL)
#define LOSS_LAT(t) bridge_loss_backward_dlpack(c->h, &c->d_pred8, t, &c->d_grad8, &c->d_loss, NULL)
#define LOSS_GRAD(t) bridge_loss_backward_dlpack(c->h, &c->d_pred8, &c->d_lat, t, &c->d_loss, NULL)
#define LOSS_LOSS(t) bridge_loss_backward_dlpack(c->h, &c->d_pred8, &c->d_lat, &c->d_grad8, t, NULL)
#define LAT_LAT(t) bridge_latent_loss_backward_dlpack(c->h, t, &c->d_tgt, &c->d_glat, &c->d_loss, NULL)
#define LAT_TGT(t) bridge_latent_loss_backward_dlpack(c->h, &c->d_lat, t, &c->d_glat, &c->d_loss, NULL)
#define LAT_GRAD(t) bridge_latent_loss_backward_dlpack(c->h, &c->d_lat, &c->d_tgt, t, &c->d_loss, NULL)
#define LAT_LOSS(t) bridge_latent_loss_backward_dlpack(c->h, &c->d_lat, &c->d_tgt, &c->d_glat, t, NULL)
#define STEP_LAT(t) bridge_train_step_dlpack(c->h, t, &c->d_tgt, &c->stats, NULL)
#define STEP_TGT(t) bridge_train_step_dlpack(c->h, &c->d_lat, t, &c->stats, NULL)
#define GET(t) bridge_get_params_dlpack(c->h, t, NULL)
#define SET(t) bridge_set_params_dlpack(c->h, t, NULL)
#define LG_LAT(t) bridge_loss_grads_dlpack(c->h, t, &c->d_tgt, &c->d_gflat, &c->d_glat, &c->d_loss, 1, NULL)
#define LG_TGT(t) bridge_loss_grads_dlpack(c->h, &c->d_lat, t, &c->d_gflat, &c->d_glat, &c->d_loss, 1, NULL)
#define LG_GP(t) bridge_loss_grads_dlpack(c->h, &c->d_lat, &c->d_tgt, t, &c->d_glat, &c->d_loss, 1, NULL)
#define LG_GL(t) bridge_loss_grads_dlpack(c->h, &c->d_lat, &c->d_tgt, &c->d_gflat, t, &c->d_loss, 1, NULL)
#define LG_LOSS(t) bridge_loss_grads_dlpack(c->h, &c->d_lat, &c->d_tgt, &c->d_gflat, &c->d_glat, t, 1, NULL)
#define FT_LAT(t) bridge_forward_train_dlpack(c->h, t, &c->d_out, 1, NULL)
#define FT_OUT(t) bridge_forward_train_dlpack(c->h, &c->d_lat, t, 1, NULL)
#define VJP_LAT(t) bridge_vjp_dlpack(c->h, t, &c->d_tgt, &c->d_gflat, &c->d_glat, 1, NULL)
#define VJP_GO(t) bridge_vjp_dlpack(c->h, &c->d_lat, t, &c->d_gflat, &c->d_glat, 1, NULL)
#define VJP_GP(t) bridge_vjp_dlpack(c->h, &c->d_lat, &c->d_tgt, t, &c->d_glat, 1, NULL)
#define VJP_GL(t) bridge_vjp_dlpack(c->h, &c->d_lat, &c->d_tgt, &c->d_gflat, t, 1, NULL)
#define APPLY(t) bridge_apply_grads_dlpack(c->h, t, &c->stats, NULL)

/* The descriptor rows of one tensor argument, named `word` in messages: `call(t)` is the
 * call with it replaced by `t`, `v` its valid descriptor. DESC_ROWS: one row per check
 * (NULL descriptor, NULL data, a CUDA device on the CPU bridge, float64, NULL shape);
 * DESC_ROWS_ALL: every kind of bad descriptor. STRIDE_ROW: a transposed (non-compact)
 * view, for tensors of two dimensions or more. */
#define DESC_ROWS(X, ep, word, call, v)                                                               \
    X(ep##_null, INV, word " is NULL", call(NULL))                                                    \
    X(ep##_data_null, INV, word ".data is NULL", call(data_at(c, v, NULL)))                           \
    X(ep##_cuda, INV, word " is on DLPack device type 2|CPU", call(on_device(c, v, DL_CUDA, 0)))     \
    X(ep##_f64, INV, word " has dtype code 2, 64 bits, 1 lanes", call(typed(c, v, 2, 64, 1)))        \
    X(ep##_shape_null, INV, word ".shape is NULL", call(no_shape(c, v)))
#define STRIDE_ROW(X, ep, word, call, v) \
    X(ep##_transposed, INV, word " has strides|compact row-major", call(transposed(c, v)))
/* DESC_ROWS and STRIDE_ROW: the rows of a tensor of two dimensions or more. */
#define DESC_STRIDE_ROWS(X, ep, word, call, v) \
    DESC_ROWS(X, ep, word, call, v)            \
    STRIDE_ROW(X, ep, word, call, v)
#define DESC_ROWS_ALL(X, ep, word, call, v)                                                           \
    DESC_STRIDE_ROWS(X, ep, word, call, v)                                                            \
    X(ep##_vulkan, INV, word " is on DLPack device type 7", call(on_device(c, v, 7, 0)))             \
    X(ep##_managed, INV, word " is on DLPack device type 13", call(on_device(c, v, DL_CUDA_MANAGED, 0))) \
    X(ep##_device_junk, INV, "device type -559038737, id 77", call(on_device(c, v, (int32_t)0xdeadbeef, 77))) \
    X(ep##_int32, INV, word " has dtype code 0, 32 bits, 1 lanes", call(typed(c, v, 0, 32, 1)))      \
    X(ep##_lanes2, INV, "dtype code 2, 32 bits, 2 lanes", call(typed(c, v, 2, 32, 2)))                \
    X(ep##_bf32, INV, "dtype code 4, 32 bits", call(typed(c, v, 4, 32, 1)))                           \
    X(ep##_f8, INV, "dtype code 2, 8 bits", call(typed(c, v, 2, 8, 1)))                               \
    X(ep##_ndim9, INV, word ".ndim = 9|0..=8", call(ndim_is(c, v, 9)))                               \
    X(ep##_ndim_neg, INV, word ".ndim = -1", call(ndim_is(c, v, -1)))                                 \
    X(ep##_neg_size, INV, word ".shape|sizes must be >= 0", call(negative(c, v)))

/* DLPack calls that must be accepted; each checks what it wrote into buffers of its own
 * against the pointer-based call (bit for bit: the same f32 computation). */
static int same(Ctx *c, const void *a, const void *b, size_t bytes, const char *what) {
    if (memcmp(a, b, bytes) == 0) return 1;
    snprintf(c->why, sizeof c->why, "%s: not the pointer call's result", what);
    return 0;
}
/* batch 1: every size-1 dimension with an odd stride (the stride of a size-1 dimension is
 * free) */
static int32_t dl_size1_strides(Ctx *c) {
    float *a = malloc(16 * 48 * sizeof(float)), *b = malloc(16 * 48 * sizeof(float));
    int32_t st = bridge_forward(c->h, c->lat, a, 1, S, S, BRIDGE_DTYPE_F32);
    if (st == BRIDGE_OK) {
        const DLTensor *lat = STRIDED(SHAPED(&c->d_lat, 1, 4, S, S), 12345, S * S, S, 1);
        DLTensor out = host_f32(b, 3, (int64_t[]){1, 16, 48});
        out.strides = (int64_t[]){7, 48, 1};
        st = bridge_forward_dlpack(c->h, lat, &out, NULL);
        if (st == BRIDGE_OK && !same(c, b, a, 16 * 48 * sizeof(float), "size-1 strides")) st = -100;
    }
    free(a);
    free(b);
    return st;
}
/* compact strides given explicitly; latents on kDLCUDAHost (pinned host memory) */
static int32_t dl_compact_strides(Ctx *c) {
    float *b = malloc(TOK * sizeof(float));
    const DLTensor *lat = STRIDED(&c->d_lat, 4 * S * S, S * S, S, 1);
    DLTensor out = host_f32(b, 3, c->sh_tok);
    out.strides = (int64_t[]){16 * 48, 48, 1};
    int32_t st = bridge_forward_dlpack(c->h, lat, &out, NULL);
    if (st == BRIDGE_OK && !same(c, b, c->baseline, TOK * sizeof(float), "compact strides")) st = -100;
    memset(b, 0, TOK * sizeof(float));
    if (st == BRIDGE_OK) st = bridge_forward_dlpack(c->h, on_device(c, &c->d_lat, DL_CUDA_HOST, 0), &out, NULL);
    if (st == BRIDGE_OK && !same(c, b, c->baseline, TOK * sizeof(float), "kDLCUDAHost latents")) st = -100;
    free(b);
    return st;
}
/* data + byte_offset: latents and out after a 16-byte prefix, which stays as it was */
static int32_t dl_byte_offset(Ctx *c) {
    unsigned char *lat = malloc(16 + LAT * sizeof(float)), *out = malloc(16 + TOK * sizeof(float));
    memset(lat, 0xee, 16);
    memset(out, 0xee, 16);
    memcpy(lat + 16, c->lat, LAT * sizeof(float));
    DLTensor tl = host_f32(lat, 4, c->sh_lat), to = host_f32(out, 3, c->sh_tok);
    tl.byte_offset = to.byte_offset = 16;
    int32_t st = bridge_forward_dlpack(c->h, &tl, &to, NULL);
    if (st == BRIDGE_OK && !same(c, out + 16, c->baseline, TOK * sizeof(float), "byte_offset 16")) st = -100;
    for (int i = 0; i < 16 && st == BRIDGE_OK; i++)
        if (out[i] != 0xee) st = fail(c, "byte_offset: the prefix was written");
    free(lat);
    free(out);
    return st;
}
/* a 0-d loss tensor, and pred [B, 4, D]: the 2x2 grid (half the bridge's 4x4) inferred */
static int32_t dl_loss_0d_coarse(Ctx *c) {
    enum { N = 3 * 4 * 48 };
    float ga[N], gb[N], la = 0, lb = 0;
    int32_t st = bridge_loss_backward(c->h, c->pred8, c->lat, ga, B, S, S, 2, 2, BRIDGE_DTYPE_F32, &la, NULL);
    if (st != BRIDGE_OK) return st;
    DLTensor pred = host_f32(c->pred8, 3, (int64_t[]){B, 4, 48}), grad = host_f32(gb, 3, (int64_t[]){B, 4, 48});
    DLTensor loss = host_f32(&lb, 0, NULL);
    st = bridge_loss_backward_dlpack(c->h, &pred, &c->d_lat, &grad, &loss, NULL);
    if (st == BRIDGE_OK && (la != lb || !same(c, gb, ga, sizeof ga, "pred [3, 4, 48]")))
        st = c->why[0] ? -100 : fail(c, "0-d loss: not the pointer call's loss");
    return st;
}
/* (ABI 4) a [B] loss tensor: each sample's loss, whose mean is the one-element call's
 * loss; the same gradient (of the mean). Both loss calls. */
static int32_t dl_loss_per_sample(Ctx *c) {
    enum { N = 3 * 64 * 48 };
    static float ga[N], gb[N];
    float la = 0, per[B] = {0};
    DLTensor pred = host_f32(c->pred8, 3, (int64_t[]){B, 64, 48}), g1 = host_f32(ga, 3, (int64_t[]){B, 64, 48}),
             g2 = host_f32(gb, 3, (int64_t[]){B, 64, 48});
    DLTensor one = host_f32(&la, 1, (int64_t[]){1}), each = host_f32(per, 1, (int64_t[]){B});
    int32_t st = bridge_loss_backward_dlpack(c->h, &pred, &c->d_lat, &g1, &one, NULL);
    if (st == BRIDGE_OK) st = bridge_loss_backward_dlpack(c->h, &pred, &c->d_lat, &g2, &each, NULL);
    if (st != BRIDGE_OK) return st;
    float mean = (per[0] + per[1] + per[2]) / 3;
    if (fabsf(mean - la) > 1e-6f * fabsf(la) || per[0] == per[1] || !same(c, gb, ga, sizeof ga, "grad_pred"))
        return c->why[0] ? -100 : fail(c, "per-sample alignment losses: not the mean's parts");
    enum { L = 3 * 4 * 16 * 16 };
    static float gl1[L], gl2[L];
    DLTensor d1 = host_f32(gl1, 4, c->sh_lat), d2 = host_f32(gl2, 4, c->sh_lat);
    st = bridge_latent_loss_backward_dlpack(c->h, &c->d_lat, &c->d_tgt, &d1, &one, NULL);
    if (st == BRIDGE_OK) st = bridge_latent_loss_backward_dlpack(c->h, &c->d_lat, &c->d_tgt, &d2, &each, NULL);
    if (st != BRIDGE_OK) return st;
    mean = (per[0] + per[1] + per[2]) / 3;
    if (fabsf(mean - la) > 1e-6f * fabsf(la) || !same(c, gl2, gl1, sizeof gl1, "grad_latents"))
        return c->why[0] ? -100 : fail(c, "per-sample latent losses: not the mean's parts");
    return BRIDGE_OK;
}
/* a train step with compact strides and a byte offset, on a bridge of its own, against
 * the pointer call on another made alike */
static int32_t dl_step_accepted(Ctx *c) {
    BridgeHandle *a = NULL, *b = NULL;
    BridgeStepStats sa, sb;
    sa.struct_size = sb.struct_size = sizeof sa;
    unsigned char *tgt = malloc(8 + TOK * sizeof(float));
    memcpy(tgt + 8, c->tgt, TOK * sizeof(float));
    DLTensor tt = host_f32(tgt, 3, c->sh_tok);
    tt.byte_offset = 8;
    int32_t st = bridge_create(&c->params, &a);
    if (st == BRIDGE_OK) st = bridge_create(&c->params, &b);
    if (st == BRIDGE_OK) st = bridge_train_step(a, c->lat, c->tgt, B, S, S, BRIDGE_DTYPE_F32, &sa, NULL);
    if (st == BRIDGE_OK)
        st = bridge_train_step_dlpack(b, STRIDED(&c->d_lat, 4 * S * S, S * S, S, 1), &tt, &sb, NULL);
    if (st == BRIDGE_OK && !(sb.step == 1 && sa.loss == sb.loss && sa.grad_norm == sb.grad_norm))
        st = fail(c, "train_step_dlpack: not the pointer call's step");
    free(tgt);
    bridge_destroy(a);
    bridge_destroy(b);
    return st;
}
/* bridge_get_capabilities: the whole struct, and a caller's older, smaller one (only its
 * struct_size bytes are written) */
static int32_t get_caps_whole(Ctx *c) {
    int32_t st = bridge_get_capabilities(&c->caps);
    if (st == BRIDGE_OK && !(c->caps.abi_version == BRIDGE_ABI_VERSION && c->caps.dlpack_major == 1 &&
                             c->caps.max_latent_side == MAX_SIDE && c->caps.struct_size == sizeof c->caps))
        st = fail(c, "capabilities: abi, dlpack or max side wrong");
    return st;
}
static int32_t get_caps_prefix(Ctx *c) {
    BridgeCapabilities p;
    memset(&p, 0xab, sizeof p);
    p.struct_size = (uint32_t)offsetof(BridgeCapabilities, cuda);
    int32_t st = bridge_get_capabilities(&p);
    const unsigned char *tail = (const unsigned char *)&p + offsetof(BridgeCapabilities, cuda);
    for (size_t i = 0; st == BRIDGE_OK && i < sizeof p - offsetof(BridgeCapabilities, cuda); i++)
        if (tail[i] != 0xab) st = fail(c, "capabilities: wrote past a smaller struct_size");
    if (st == BRIDGE_OK && p.abi_version != BRIDGE_ABI_VERSION) st = fail(c, "capabilities prefix: abi_version");
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
    X(create_align_neg, INV, "align_w_raw = -1", bridge_create(&c->p_align_neg, &c->made))               \
    X(create_align_nan, INV, "align_w_cos = NaN", bridge_create(&c->p_align_nan, &c->made))              \
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
    X(save_notdir, BRIDGE_ERR_IO, "passwd", bridge_save(c->h, c->notdir))                                \
    DLPACK_CASES(X)

#define SH BRIDGE_ERR_SHAPE
/* ABI 3: the DLPack entry points and the capability query. */
#define DLPACK_CASES(X)                                                                                   \
    /* bridge_forward_dlpack */                                                                           \
    X(dfwd_null_handle, INV, "handle is NULL", bridge_forward_dlpack(NULL, &c->d_lat, &c->d_out, NULL))  \
    X(dfwd_dead, INV, "not a live bridge", bridge_forward_dlpack(c->dead, &c->d_lat, &c->d_out, NULL))   \
    DESC_ROWS_ALL(X, dfwd_lat, "latents", FWD_LAT, &c->d_lat)                                             \
    DESC_STRIDE_ROWS(X, dfwd_out, "out", FWD_OUT, &c->d_out) \
    X(dfwd_lat_ndim3, SH, "latents has shape [3, 4, 256]|[B, 4, H, W]", FWD_LAT(SHAPED(&c->d_lat, B, 4, S * S))) \
    X(dfwd_lat_ndim5, SH, "latents has shape [1, 3, 4, 16, 16]", FWD_LAT(SHAPED(&c->d_lat, 1, B, 4, S, S))) \
    X(dfwd_lat_ch3, SH, "latents has shape [3, 3, 16, 16]|[B, 4, H, W]", FWD_LAT(SHAPED(&c->d_lat, B, 3, S, S))) \
    X(dfwd_lat_batch0, SH, "latents has shape [0, 4, 16, 16]|B > 0", FWD_LAT(SHAPED(&c->d_lat, 0, 4, S, S))) \
    X(dfwd_lat_h18, SH, "latent height = 18|multiple of 4", FWD_LAT(SHAPED(&c->d_lat, B, 4, 18, S)))     \
    X(dfwd_lat_w2, SH, "latent width = 2|multiple of 4", FWD_LAT(SHAPED(&c->d_lat, B, 4, S, 2)))         \
    X(dfwd_lat_h0, SH, "latent height = 0", FWD_LAT(SHAPED(&c->d_lat, B, 4, 0, S)))                      \
    X(dfwd_lat_w16388, SH, "latent width = 16388|16384", FWD_LAT(SHAPED(&c->d_lat, B, 4, S, MAX_SIDE + 4))) \
    X(dfwd_lat_memory, SH, "batch 3|4096x4096|GiB", FWD_LAT(SHAPED(&c->d_lat, B, 4, MAX_SIDE, MAX_SIDE))) \
    X(dfwd_lat_batch_big, SH, "batch 4611686018427387903|GiB", FWD_LAT(SHAPED(&c->d_lat, BIG, 4, S, S))) \
    X(dfwd_lat_offset_wrap, INV, "latents.byte_offset = 18446744073709551615|address space",             \
      FWD_LAT(offset_by(c, &c->d_lat, UINT64_MAX)))                                                       \
    X(dfwd_lat_nan, BRIDGE_ERR_NON_FINITE, "latents", FWD_LAT(data_at(c, &c->d_lat, c->lat_nan)))        \
    X(dfwd_out_tokens, SH, "out has shape [3, 17, 48]; expected [3, 16, 48]", FWD_OUT(SHAPED(&c->d_out, B, 17, 48))) \
    X(dfwd_out_dim, SH, "out has shape [3, 16, 47]; expected [3, 16, 48]", FWD_OUT(SHAPED(&c->d_out, B, 16, 47))) \
    X(dfwd_out_batch, SH, "out has shape [2, 16, 48]; expected [3, 16, 48]", FWD_OUT(SHAPED(&c->d_out, 2, 16, 48))) \
    X(dfwd_out_grid4d, SH, "out has shape [3, 4, 4, 48]; expected [3, 16, 48]", FWD_OUT(SHAPED(&c->d_out, B, 4, 4, 48))) \
    X(dfwd_out_rect, SH, "out has shape [3, 16, 48]; expected [3, 32, 48]",                             \
      bridge_forward_dlpack(c->h, SHAPED(&c->d_lat, B, 4, S, 2 * S), &c->d_out, NULL))                    \
    X(dfwd_size1_strides, ACCEPTED, "", dl_size1_strides(c))                                              \
    X(dfwd_compact_strides, ACCEPTED, "", dl_compact_strides(c))                                          \
    X(dfwd_byte_offset, ACCEPTED, "", dl_byte_offset(c))                                                  \
    /* bridge_loss_backward_dlpack */                                                                     \
    X(dloss_null_handle, INV, "handle is NULL",                                                           \
      bridge_loss_backward_dlpack(NULL, &c->d_pred8, &c->d_lat, &c->d_grad8, &c->d_loss, NULL))           \
    X(dloss_dead, INV, "not a live bridge",                                                               \
      bridge_loss_backward_dlpack(c->dead, &c->d_pred8, &c->d_lat, &c->d_grad8, &c->d_loss, NULL))        \
    DESC_ROWS_ALL(X, dloss_pred, "pred", LOSS_PRED, &c->d_pred8)                                          \
    DESC_STRIDE_ROWS(X, dloss_lat, "latents", LOSS_LAT, &c->d_lat) \
    DESC_STRIDE_ROWS(X, dloss_grad, "grad_pred", LOSS_GRAD, &c->d_grad8) \
    DESC_ROWS(X, dloss_loss, "loss", LOSS_LOSS, &c->d_loss)                                               \
    X(dloss_loss_ndim9, INV, "loss.ndim = 9", LOSS_LOSS(ndim_is(c, &c->d_loss, 9)))                       \
    X(dloss_loss_neg, INV, "loss.shape = [-1]", LOSS_LOSS(negative(c, &c->d_loss)))                       \
    X(dloss_loss2, SH, "loss has shape [2]; expected one element", LOSS_LOSS(SHAPED(&c->d_loss, 2)))     \
    X(dloss_loss0, SH, "loss has shape [0]; expected one element", LOSS_LOSS(SHAPED(&c->d_loss, 0)))     \
    X(dloss_loss_1x2, SH, "loss has shape [1, 2]", LOSS_LOSS(SHAPED(&c->d_loss, 1, 2)))                   \
    /* sizes whose product wraps to 1 in 64 bits: not one element (was taken as one) */                   \
    X(dloss_loss_wraps, SH, "loss has shape [7, 7905747460161236407]; expected one element",             \
      LOSS_LOSS(SHAPED(&c->d_loss, 7, 7905747460161236407LL)))                                            \
    /* pred token counts and grids that meet no caller grid of the 4x4 token grid */                      \
    X(dloss_pred_t36, INV, "pred has 36 tokens|4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 36, 48)))           \
    X(dloss_pred_t32, INV, "pred has 32 tokens|4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 32, 48)))           \
    X(dloss_pred_t8, INV, "pred has 8 tokens|4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 8, 48)))              \
    X(dloss_pred_t0, INV, "pred has 0 tokens|4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 0, 48)))              \
    X(dloss_pred_6x6, INV, "pred grid 6x6|token grid 4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 6, 6, 48)))   \
    X(dloss_pred_8x4, INV, "pred grid 8x4|token grid 4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 8, 4, 48)))   \
    X(dloss_pred_0x0, INV, "pred grid 0x0|token grid 4x4", LOSS_PRED(SHAPED(&c->d_pred8, B, 0, 0, 48)))   \
    X(dloss_pred_huge, INV, "pred grid 16388x16388", LOSS_PRED(SHAPED(&c->d_pred8, B, 16388, 16388, 48))) \
    X(dloss_rect_t64, INV, "pred has 64 tokens|4x8",                                                      \
      bridge_loss_backward_dlpack(c->h, &c->d_pred8, SHAPED(&c->d_lat, B, 4, S, 2 * S), &c->d_grad8, &c->d_loss, NULL)) \
    X(dloss_pred_batch, SH, "pred has shape [2, 64, 48]; expected [3, T, 48] or [3, pred_h, pred_w, 48]", \
      LOSS_PRED(SHAPED(&c->d_pred8, 2, 64, 48)))                                                          \
    X(dloss_pred_dim, SH, "pred has shape [3, 64, 47]", LOSS_PRED(SHAPED(&c->d_pred8, B, 64, 47)))        \
    X(dloss_pred_ndim2, SH, "pred has shape [192, 48]", LOSS_PRED(SHAPED(&c->d_pred8, B * 64, 48)))       \
    X(dloss_pred_ndim5, SH, "pred has shape [3, 1, 8, 8, 48]", LOSS_PRED(SHAPED(&c->d_pred8, B, 1, 8, 8, 48))) \
    X(dloss_grad_4d, SH, "grad_pred has shape [3, 8, 8, 48]; expected [3, 64, 48]",                      \
      LOSS_GRAD(SHAPED(&c->d_grad8, B, 8, 8, 48)))                                                        \
    X(dloss_grad_tokens, SH, "grad_pred has shape [3, 16, 48]; expected [3, 64, 48]",                    \
      LOSS_GRAD(SHAPED(&c->d_grad8, B, 16, 48)))                                                          \
    X(dloss_lat_h18, SH, "latent height = 18", LOSS_LAT(SHAPED(&c->d_lat, B, 4, 18, S)))                  \
    X(dloss_lat_ch3, SH, "latents has shape [3, 3, 16, 16]", LOSS_LAT(SHAPED(&c->d_lat, B, 3, S, S)))     \
    X(dloss_pred_nan, BRIDGE_ERR_NON_FINITE, "pred", LOSS_PRED(data_at(c, &c->d_pred8, c->pred8_nan)))    \
    X(dloss_lat_inf, BRIDGE_ERR_NON_FINITE, "latents", LOSS_LAT(data_at(c, &c->d_lat, c->lat_inf)))       \
    X(dloss_loss_inf, BRIDGE_ERR_NON_FINITE, "the loss is|nothing was written",                           \
      LOSS_PRED(data_at(c, &c->d_pred8, c->pred8_big)))                                                   \
    X(dloss_0d_coarse, ACCEPTED, "", dl_loss_0d_coarse(c))                                                \
    X(dloss_per_sample, ACCEPTED, "", dl_loss_per_sample(c))                                              \
    X(dloss_loss_b1, SH, "loss has shape [3, 1]; expected one element (the mean), or [3]",                \
      LOSS_LOSS(SHAPED(&c->d_loss, B, 1)))                                                                \
    /* bridge_latent_loss_backward_dlpack */                                                              \
    X(dlat_null_handle, INV, "handle is NULL",                                                            \
      bridge_latent_loss_backward_dlpack(NULL, &c->d_lat, &c->d_tgt, &c->d_glat, &c->d_loss, NULL))       \
    X(dlat_dead, INV, "not a live bridge",                                                                \
      bridge_latent_loss_backward_dlpack(c->dead, &c->d_lat, &c->d_tgt, &c->d_glat, &c->d_loss, NULL))    \
    DESC_ROWS_ALL(X, dlat_lat, "latents", LAT_LAT, &c->d_lat)                                             \
    DESC_STRIDE_ROWS(X, dlat_tgt, "target", LAT_TGT, &c->d_tgt) \
    DESC_STRIDE_ROWS(X, dlat_grad, "grad_latents", LAT_GRAD, &c->d_glat) \
    DESC_ROWS(X, dlat_loss, "loss", LAT_LOSS, &c->d_loss)                                                 \
    X(dlat_loss2, SH, "loss has shape [2]; expected one element", LAT_LOSS(SHAPED(&c->d_loss, 2)))       \
    X(dlat_loss_wraps, SH, "loss has shape [7, 7905747460161236407]; expected one element",              \
      LAT_LOSS(SHAPED(&c->d_loss, 7, 7905747460161236407LL)))                                             \
    X(dlat_lat_w6, SH, "latent width = 6|multiple of 4", LAT_LAT(SHAPED(&c->d_lat, B, 4, S, 6)))         \
    X(dlat_lat_ch3, SH, "latents has shape [3, 3, 16, 16]", LAT_LAT(SHAPED(&c->d_lat, B, 3, S, S)))       \
    X(dlat_lat_ndim3, SH, "latents has shape [3, 4, 256]", LAT_LAT(SHAPED(&c->d_lat, B, 4, S * S)))       \
    X(dlat_tgt_tokens, SH, "target has shape [3, 64, 48]; expected [3, 16, 48]", LAT_TGT(SHAPED(&c->d_tgt, B, 64, 48))) \
    X(dlat_tgt_4d, SH, "target has shape [3, 4, 4, 48]; expected [3, 16, 48]", LAT_TGT(SHAPED(&c->d_tgt, B, 4, 4, 48))) \
    X(dlat_tgt_batch, SH, "target has shape [2, 16, 48]", LAT_TGT(SHAPED(&c->d_tgt, 2, 16, 48)))          \
    X(dlat_tgt_dim, SH, "target has shape [3, 16, 47]", LAT_TGT(SHAPED(&c->d_tgt, B, 16, 47)))            \
    X(dlat_tgt_rect, SH, "target has shape [3, 16, 48]; expected [3, 32, 48]",                           \
      bridge_latent_loss_backward_dlpack(c->h, SHAPED(&c->d_lat, B, 4, S, 2 * S), &c->d_tgt, &c->d_glat, &c->d_loss, NULL)) \
    X(dlat_grad_shape, SH, "grad_latents has shape [3, 4, 16, 32]; expected [3, 4, 16, 16]",             \
      LAT_GRAD(SHAPED(&c->d_glat, B, 4, S, 2 * S)))                                                       \
    X(dlat_grad_flat, SH, "grad_latents has shape [3, 1024]", LAT_GRAD(SHAPED(&c->d_glat, B, 4 * S * S))) \
    X(dlat_nan, BRIDGE_ERR_NON_FINITE, "latents", LAT_LAT(data_at(c, &c->d_lat, c->lat_nan)))             \
    X(dlat_tgt_inf, BRIDGE_ERR_NON_FINITE, "target", LAT_TGT(data_at(c, &c->d_tgt, c->tgt_inf)))          \
    /* bridge_train_step_dlpack */                                                                        \
    X(dstep_null_handle, INV, "handle is NULL", bridge_train_step_dlpack(NULL, &c->d_lat, &c->d_tgt, &c->stats, NULL)) \
    X(dstep_dead, INV, "not a live bridge", bridge_train_step_dlpack(c->dead, &c->d_lat, &c->d_tgt, &c->stats, NULL)) \
    DESC_ROWS_ALL(X, dstep_lat, "latents", STEP_LAT, &c->d_lat)                                           \
    DESC_STRIDE_ROWS(X, dstep_tgt, "targets", STEP_TGT, &c->d_tgt) \
    X(dstep_stats_null, INV, "stats is NULL", bridge_train_step_dlpack(c->h, &c->d_lat, &c->d_tgt, NULL, NULL)) \
    X(dstep_stats_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats",                                      \
      bridge_train_step_dlpack(c->h, &c->d_lat, &c->d_tgt, &c->stats_small, NULL))                        \
    X(dstep_stats_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats",                                        \
      bridge_train_step_dlpack(c->h, &c->d_lat, &c->d_tgt, &c->stats_big, NULL))                          \
    X(dstep_lat_ndim3, SH, "latents has shape [3, 4, 256]", STEP_LAT(SHAPED(&c->d_lat, B, 4, S * S)))     \
    X(dstep_lat_h18, SH, "latent height = 18", STEP_LAT(SHAPED(&c->d_lat, B, 4, 18, S)))                  \
    X(dstep_lat_batch_big, SH, "batch 4611686018427387903|GiB", STEP_LAT(SHAPED(&c->d_lat, BIG, 4, S, S))) \
    X(dstep_tgt_tokens, SH, "targets has shape [3, 64, 48]; expected [3, 16, 48]",                       \
      STEP_TGT(SHAPED(&c->d_tgt, B, 64, 48)))                                                             \
    X(dstep_tgt_dim, SH, "targets has shape [3, 16, 47]", STEP_TGT(SHAPED(&c->d_tgt, B, 16, 47)))         \
    X(dstep_nan, SKIPPED, "", STEP_LAT(data_at(c, &c->d_lat, c->lat_nan)))                                \
    X(dstep_tgt_inf, SKIPPED, "", STEP_TGT(data_at(c, &c->d_tgt, c->tgt_inf)))                            \
    X(dstep_accepted, ACCEPTED, "", dl_step_accepted(c))                                                  \
    /* bridge_get_capabilities */                                                                         \
    X(caps_null, INV, "caps is NULL", bridge_get_capabilities(NULL))                                      \
    X(caps_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeCapabilities.struct_size = 4", bridge_get_capabilities(&c->caps_small)) \
    X(caps_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeCapabilities|newer", bridge_get_capabilities(&c->caps_big)) \
    X(caps_whole, ACCEPTED, "", get_caps_whole(c))                                                            \
    X(caps_prefix, ACCEPTED, "", get_caps_prefix(c))                                                   \
    /* ABI 5: bridge_param_count, bridge_param_info */                                                   \
    X(pcount_null_handle, INV, "handle is NULL", bridge_param_count(NULL, &c->count))                    \
    X(pcount_dead, INV, "not a live bridge", bridge_param_count(c->dead, &c->count))                     \
    X(pcount_null, INV, "count is NULL", bridge_param_count(c->h, NULL))                                 \
    X(pinfo_null_handle, INV, "handle is NULL", bridge_param_info(NULL, 0, &c->pinfo))                   \
    X(pinfo_neg, INV, "index = -1|55 tensors", bridge_param_info(c->h, -1, &c->pinfo))                  \
    X(pinfo_past, INV, "index = 55|55 tensors", bridge_param_info(c->h, 55, &c->pinfo))                 \
    X(pinfo_huge, INV, "index = 9223372036854775807", bridge_param_info(c->h, INT64_MAX, &c->pinfo))    \
    X(pinfo_null, INV, "info is NULL", bridge_param_info(c->h, 0, NULL))                                 \
    X(pinfo_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeParamInfo.struct_size = 4",                           \
      bridge_param_info(c->h, 0, &c->pinfo_small))                                                       \
    X(pinfo_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeParamInfo|newer", bridge_param_info(c->h, 0, &c->pinfo_big)) \
    X(pinfo_ends, ACCEPTED, "", abi5_pinfo_ends(c))                                                           \
    /* bridge_get_params_dlpack, bridge_set_params_dlpack */                                             \
    X(get_null_handle, INV, "handle is NULL", bridge_get_params_dlpack(NULL, &c->d_gflat, NULL))         \
    DESC_ROWS(X, get, "params", GET, &c->d_gflat)                                                         \
    X(get_short, SH, "params has shape [214831]; expected [214832]", GET(SHAPED(&c->d_gflat, 214831)))  \
    X(get_2d, SH, "params has shape [1, 214832]; expected [214832]", GET(SHAPED(&c->d_gflat, 1, 214832))) \
    X(get_f16, INV, "params is float16|float32", GET(typed(c, &c->d_gflat, 2, 16, 1)))                  \
    X(set_null_handle, INV, "handle is NULL", bridge_set_params_dlpack(NULL, &c->d_flat, NULL))          \
    X(set_dead, INV, "not a live bridge", bridge_set_params_dlpack(c->dead, &c->d_flat, NULL))           \
    DESC_ROWS(X, set, "params", SET, &c->d_flat)                                                          \
    X(set_long, SH, "params has shape [214833]; expected [214832]", SET(SHAPED(&c->d_flat, 214833)))     \
    X(set_bf16, INV, "params is bfloat16|float32", SET(typed(c, &c->d_flat, 4, 16, 1)))                 \
    X(set_nan, BRIDGE_ERR_NON_FINITE, "params[214000] = NaN", SET(data_at(c, &c->d_flat, c->flat_nan)))  \
    X(get_set_same, ACCEPTED, "", abi5_get_set_same(c))                                                       \
    /* bridge_loss_grads_dlpack */                                                                        \
    X(lg_null_handle, INV, "handle is NULL",                                                              \
      bridge_loss_grads_dlpack(NULL, &c->d_lat, &c->d_tgt, &c->d_gflat, NULL, &c->d_loss, 1, NULL))      \
    DESC_ROWS_ALL(X, lg_lat, "latents", LG_LAT, &c->d_lat)                                                \
    DESC_STRIDE_ROWS(X, lg_tgt, "targets", LG_TGT, &c->d_tgt)                                             \
    DESC_ROWS(X, lg_gp, "grad_params", LG_GP, &c->d_gflat)                                                \
    X(lg_gl_cuda, INV, "grad_latents is on DLPack device type 2", LG_GL(on_device(c, &c->d_glat, DL_CUDA, 0))) \
    X(lg_gl_f64, INV, "grad_latents has dtype code 2, 64 bits", LG_GL(typed(c, &c->d_glat, 2, 64, 1)))   \
    DESC_ROWS(X, lg_loss, "loss", LG_LOSS, &c->d_loss)                                                    \
    X(lg_gp_short, SH, "grad_params has shape [214831]", LG_GP(SHAPED(&c->d_gflat, 214831)))            \
    X(lg_gp_f16, INV, "grad_params is float16", LG_GP(typed(c, &c->d_gflat, 2, 16, 1)))                 \
    X(lg_gl_shape, SH, "grad_latents has shape [3, 4, 16, 32]; expected [3, 4, 16, 16]",                 \
      LG_GL(SHAPED(&c->d_glat, B, 4, S, 2 * S)))                                                          \
    X(lg_tgt_tokens, SH, "targets has shape [3, 64, 48]; expected [3, 16, 48]", LG_TGT(SHAPED(&c->d_tgt, B, 64, 48))) \
    X(lg_lat_h18, SH, "latent height = 18", LG_LAT(SHAPED(&c->d_lat, B, 4, 18, S)))                      \
    X(lg_loss_per_sample, SH, "loss has shape [3]; expected one element", LG_LOSS(SHAPED(&c->d_loss, B))) \
    X(lg_nan_latents, ACCEPTED, "", abi5_lg_nan_latents(c))                                                    \
    X(lg_no_latent_grad, ACCEPTED, "", abi5_lg_no_latent_grad(c))                                              \
    /* bridge_forward_train_dlpack */                                                                     \
    X(ft_null_handle, INV, "handle is NULL", bridge_forward_train_dlpack(NULL, &c->d_lat, &c->d_out, 1, NULL)) \
    DESC_STRIDE_ROWS(X, ft_lat, "latents", FT_LAT, &c->d_lat)                                             \
    DESC_STRIDE_ROWS(X, ft_out, "out", FT_OUT, &c->d_out)                                                 \
    X(ft_out_tokens, SH, "out has shape [3, 64, 48]; expected [3, 16, 48]", FT_OUT(SHAPED(&c->d_out, B, 64, 48))) \
    X(ft_nan, BRIDGE_ERR_NON_FINITE, "latents", FT_LAT(data_at(c, &c->d_lat, c->lat_nan)))               \
    /* bridge_vjp_dlpack */                                                                               \
    X(vjp_null_handle, INV, "handle is NULL",                                                             \
      bridge_vjp_dlpack(NULL, &c->d_lat, &c->d_tgt, &c->d_gflat, NULL, 1, NULL))                          \
    DESC_STRIDE_ROWS(X, vjp_lat, "latents", VJP_LAT, &c->d_lat)                                           \
    DESC_STRIDE_ROWS(X, vjp_go, "grad_out", VJP_GO, &c->d_tgt)                                            \
    DESC_ROWS(X, vjp_gp, "grad_params", VJP_GP, &c->d_gflat)                                              \
    X(vjp_gl_f64, INV, "grad_latents has dtype code 2, 64 bits", VJP_GL(typed(c, &c->d_glat, 2, 64, 1))) \
    X(vjp_go_tokens, SH, "grad_out has shape [3, 64, 48]; expected [3, 16, 48]", VJP_GO(SHAPED(&c->d_tgt, B, 64, 48))) \
    X(vjp_gp_long, SH, "grad_params has shape [214833]", VJP_GP(SHAPED(&c->d_gflat, 214833)))           \
    X(vjp_gl_shape, SH, "grad_latents has shape [3, 4, 256]", VJP_GL(SHAPED(&c->d_glat, B, 4, S * S)))   \
    X(vjp_go_inf, BRIDGE_ERR_NON_FINITE, "grad_out", VJP_GO(data_at(c, &c->d_tgt, c->tgt_inf)))          \
    /* bridge_apply_grads_dlpack */                                                                       \
    X(apply_null_handle, INV, "handle is NULL", bridge_apply_grads_dlpack(NULL, &c->d_flat, &c->stats, NULL)) \
    X(apply_dead, INV, "not a live bridge", bridge_apply_grads_dlpack(c->dead, &c->d_flat, &c->stats, NULL)) \
    DESC_ROWS(X, apply, "grad_params", APPLY, &c->d_flat)                                                 \
    X(apply_short, SH, "grad_params has shape [214831]", APPLY(SHAPED(&c->d_flat, 214831)))             \
    X(apply_f16, INV, "grad_params is float16", APPLY(typed(c, &c->d_flat, 2, 16, 1)))                  \
    X(apply_stats_null, INV, "stats is NULL", bridge_apply_grads_dlpack(c->h, &c->d_flat, NULL, NULL))  \
    X(apply_stats_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats",                                      \
      bridge_apply_grads_dlpack(c->h, &c->d_flat, &c->stats_small, NULL))                                 \
    X(apply_nan, SKIPPED, "", APPLY(data_at(c, &c->d_flat, c->flat_nan)))

/* ABI 5 calls that must be accepted, into buffers of their own. */
/* param_info of tensor 0 and of the last: names, offsets, shapes, and the count covered */
static int32_t abi5_pinfo_ends(Ctx *c) {
    BridgeParamInfo a = {.struct_size = sizeof a}, z = {.struct_size = sizeof z};
    int32_t st = bridge_param_info(c->h, 0, &a);
    if (st == BRIDGE_OK) st = bridge_param_info(c->h, 54, &z);
    if (st != BRIDGE_OK) return st;
    if (strcmp(a.name, "adapter.stem.weight") != 0 || a.offset != 0 || a.ndim != 4 || a.shape[0] != 32 ||
        a.decays != 1 || z.offset + z.numel != c->n_params || strcmp(z.name, "head.bias") != 0 || z.decays != 0)
        return fail(c, "param_info: tensor 0 or 54 is not what the fixture holds");
    return BRIDGE_OK;
}
/* get_params gives the weights the set_params of the same values leaves in place */
static int32_t abi5_get_set_same(Ctx *c) {
    float *mine = malloc((size_t)c->n_params * sizeof(float));
    DLTensor t = host_f32(mine, 1, c->sh_flat);
    int32_t st = bridge_get_params_dlpack(c->h, &t, NULL);
    if (st == BRIDGE_OK && memcmp(mine, c->flat, (size_t)c->n_params * sizeof(float)) != 0)
        st = fail(c, "get_params: not the weights as loaded");
    if (st == BRIDGE_OK) st = bridge_set_params_dlpack(c->h, &t, NULL);
    free(mine);
    return st;
}
/* NaN latents in loss_grads: no error, the loss written as NaN (a host's all-reduce then
 * carries it to every rank, and apply_grads skips the step on all) */
static int32_t abi5_lg_nan_latents(Ctx *c) {
    float loss = 0, *g = malloc((size_t)c->n_params * sizeof(float));
    DLTensor tg = host_f32(g, 1, c->sh_flat), tl = host_f32(&loss, 1, c->sh_one);
    int32_t st = bridge_loss_grads_dlpack(c->h, data_at(c, &c->d_lat, c->lat_nan), &c->d_tgt, &tg, NULL, &tl, 1, NULL);
    if (st == BRIDGE_OK && !isnan(loss)) st = fail(c, "loss_grads on NaN latents: the loss is not NaN");
    free(g);
    return st;
}
/* loss_grads with no latent gradient (NULL), a 0-d loss */
static int32_t abi5_lg_no_latent_grad(Ctx *c) {
    float loss = NAN, *g = malloc((size_t)c->n_params * sizeof(float));
    DLTensor tg = host_f32(g, 1, c->sh_flat), tl = host_f32(&loss, 0, NULL);
    int32_t st = bridge_loss_grads_dlpack(c->h, &c->d_lat, &c->d_tgt, &tg, NULL, &tl, 1, NULL);
    if (st == BRIDGE_OK && !(loss > 0 && isfinite(loss))) st = fail(c, "loss_grads: no finite loss written");
    free(g);
    return st;
}

/* A non-finite train step is not an error: OK with stats.skipped = 1, nothing updated. */
#define SKIPPED (-1)
/* A call that must succeed (the row's function checks what it did). */
#define ACCEPTED (-2)
/* tests/it/c_api.rs defines DINO_BRIDGE_CUDA_BUILD when the library has the cuda feature.
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
            c->p_gamma_inf = c->p_gram_neg = c->p_gram_nan = c->p_align_neg = c->p_align_nan = c->params;
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
    c->p_align_neg.align_w_raw = -1.0f;
    c->p_align_nan.align_w_cos = NAN;
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
    c->caps.struct_size = sizeof c->caps;
    c->caps_small.struct_size = 4;
    c->caps_big.struct_size = sizeof c->caps + 8;
    /* finite predictions whose squares overflow: a non-finite loss */
    c->pred8_big = malloc(TOK8 * sizeof(float));
    for (int i = 0; i < TOK8; i++) c->pred8_big[i] = (i % 2 ? 3e38f : -3e38f);
    memcpy(c->sh_lat, (int64_t[]){B, 4, S, S}, sizeof c->sh_lat);
    memcpy(c->sh_tok, (int64_t[]){B, 16, 48}, sizeof c->sh_tok);
    memcpy(c->sh_tok8, (int64_t[]){B, 64, 48}, sizeof c->sh_tok8);
    c->sh_one[0] = 1;
    for (int i = 0; i < 9; i++) c->nine[i] = 1;
    c->d_lat = host_f32(c->lat, 4, c->sh_lat);
    c->d_out = host_f32(c->out, 3, c->sh_tok);
    c->d_pred8 = host_f32(c->pred8, 3, c->sh_tok8);
    c->d_grad8 = host_f32(c->grad8, 3, c->sh_tok8);
    c->d_tgt = host_f32(c->tgt, 3, c->sh_tok);
    c->d_glat = host_f32(c->glat, 4, c->sh_lat);
    c->d_loss = host_f32(&c->loss, 1, c->sh_one);
    if (bridge_param_count(c->h, &c->n_params) != BRIDGE_OK || c->n_params != 214832) {
        fprintf(stderr, "param count %lld (the fixture has 214832)\n", (long long)c->n_params);
        return 1;
    }
    c->sh_flat[0] = c->n_params;
    c->flat = malloc((size_t)c->n_params * sizeof(float));
    c->gflat = malloc((size_t)c->n_params * sizeof(float));
    c->d_flat = host_f32(c->flat, 1, c->sh_flat);
    c->d_gflat = host_f32(c->gflat, 1, c->sh_flat);
    if (bridge_get_params_dlpack(c->h, &c->d_flat, NULL) != BRIDGE_OK) return 1;
    c->flat_nan = copy(c->flat, (size_t)c->n_params);
    c->flat_nan[214000] = NAN;
    c->pinfo.struct_size = sizeof c->pinfo;
    c->pinfo_small.struct_size = 4;
    c->pinfo_big.struct_size = sizeof c->pinfo + 8;

    float *baseline = malloc(TOK * sizeof(float)), *now = malloc(TOK * sizeof(float));
    if (bridge_forward(c->h, c->lat, baseline, B, S, S, BRIDGE_DTYPE_F32) != BRIDGE_OK) return 1;
    c->baseline = baseline;
    /* After every row the handle holds the weights it had, bit for bit (the flat vector,
     * ABI 5), and every 25th row (and the last) a forward gives the same bits again. */
    float *weights_now = malloc((size_t)c->n_params * sizeof(float));
    DLTensor d_weights_now = host_f32(weights_now, 1, c->sh_flat);
    int n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++) {
        const Case *k = &cases[i];
        c->made = NULL;
        c->why[0] = 0;
        c->stats.skipped = 0;
        memset(c->out, 0x7f, TOK * sizeof(float));
        memset(c->grad8, 0x7f, TOK8 * sizeof(float));
        memset(c->glat, 0x7f, LAT * sizeof(float));
        memset(&c->loss, 0x7f, sizeof c->loss);
        memset(c->gflat, 0x7f, (size_t)c->n_params * sizeof(float));
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
              untouched(c->glat, LAT * sizeof(float)) && untouched(&c->loss, sizeof c->loss) &&
              untouched(c->gflat, (size_t)c->n_params * sizeof(float));
        /* the handle still works, with the weights it had */
        BridgeInfo info;
        info.struct_size = sizeof info;
        int usable = bridge_get_params_dlpack(c->h, &d_weights_now, NULL) == BRIDGE_OK &&
                     memcmp(weights_now, c->flat, (size_t)c->n_params * sizeof(float)) == 0 &&
                     bridge_get_info(c->h, &info) == BRIDGE_OK && info.step == 0;
        if (usable && (i % 25 == 0 || i == n - 1))
            usable = bridge_forward(c->h, c->lat, now, B, S, S, BRIDGE_DTYPE_F32) == BRIDGE_OK &&
                     memcmp(now, baseline, TOK * sizeof(float)) == 0;
        checks++;
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
    free(c->pred8); free(c->pred8_nan); free(c->pred8_big); free(c->out); free(c->grad8); free(c->glat);
    free(baseline); free(weights_now); free(now); free(c->flat); free(c->flat_nan); free(c->gflat);
    if (failures) {
        fprintf(stderr, "%d of %d bad-input cases failed\n", failures, n);
        return 1;
    }
    printf("bad-input matrix: all %d cases passed\n", n);
    return 0;
}
