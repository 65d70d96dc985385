/* The bad-input matrix: every C entry point against every kind of bad argument it can
 * get. Each row names the status it must return and a word its message must contain;
 * after every row the handle must give bit-identical output and the same step count
 * (nothing half-applied). Built and run by tests/c_api.rs, also under valgrind.
 *
 * usage: test_bad_inputs FIXTURE_DIR TMP_DIR */
#include "dino_bridge.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    BridgeHandle *h, *dead;
    float *lat, *lat_nan, *lat_inf, *tgt, *tgt_inf, *pred8, *pred8_nan;
    float *out, *grad8, *glat;
    float loss;
    BridgeStepStats stats, stats_small, stats_big;
    BridgeInfo info, info_small, info_big;
    BridgeParams params, p_small, p_big, p_dir, p_missing, p_utf8, p_notdir, p_empty, p_heads,
        p_cuda, p_device, p_dtype;
    BridgeHandle *made;
    char dir[4096], missing[4096], notdir[4096];
} Ctx;

enum { B = 3, LAT = 3 * 4 * 16 * 16, TOK = 3 * 16 * 48, TOK8 = 3 * 64 * 48 };
#define BIG (INT64_MAX / 2)
#define BAD_UTF8 "\xff\xfe.safetensors"

/* name, status, word in the message, the call (on `c`) */
#define CASES(X)                                                                                          \
    X(params_default_null, BRIDGE_ERR_INVALID_ARGUMENT, "NULL", bridge_params_default(NULL))             \
    X(params_default_small, BRIDGE_ERR_ABI_MISMATCH, "struct_size", bridge_params_default(&c->p_small))  \
    X(params_default_big, BRIDGE_ERR_ABI_MISMATCH, "struct_size", bridge_params_default(&c->p_big))      \
    X(create_params_null, BRIDGE_ERR_INVALID_ARGUMENT, "params is NULL", bridge_create(NULL, &c->made))  \
    X(create_out_null, BRIDGE_ERR_INVALID_ARGUMENT, "NULL", bridge_create(&c->params, NULL))             \
    X(create_small, BRIDGE_ERR_ABI_MISMATCH, "struct_size", bridge_create(&c->p_small, &c->made))        \
    X(create_big, BRIDGE_ERR_ABI_MISMATCH, "newer", bridge_create(&c->p_big, &c->made))                  \
    X(create_dir, BRIDGE_ERR_IO, "directory", bridge_create(&c->p_dir, &c->made))                        \
    X(create_missing, BRIDGE_ERR_IO, "missing.safetensors", bridge_create(&c->p_missing, &c->made))      \
    X(create_notdir, BRIDGE_ERR_IO, "passwd", bridge_create(&c->p_notdir, &c->made))                     \
    X(create_utf8, BRIDGE_ERR_INVALID_ARGUMENT, "UTF-8", bridge_create(&c->p_utf8, &c->made))            \
    X(create_empty_path, BRIDGE_ERR_INVALID_ARGUMENT, "empty", bridge_create(&c->p_empty, &c->made))     \
    X(create_heads, BRIDGE_ERR_INVALID_ARGUMENT, "heads", bridge_create(&c->p_heads, &c->made))          \
    X(create_cuda, BRIDGE_ERR_UNSUPPORTED, "CUDA", bridge_create(&c->p_cuda, &c->made))                  \
    X(create_device, BRIDGE_ERR_INVALID_ARGUMENT, "device", bridge_create(&c->p_device, &c->made))       \
    X(create_dtype, BRIDGE_ERR_INVALID_ARGUMENT, "compute_dtype", bridge_create(&c->p_dtype, &c->made))  \
    X(destroy_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_destroy(c->dead))           \
    X(info_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_get_info(NULL, &c->info))  \
    X(info_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_get_info(c->dead, &c->info))   \
    X(info_null, BRIDGE_ERR_INVALID_ARGUMENT, "NULL", bridge_get_info(c->h, NULL))                       \
    X(info_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeInfo", bridge_get_info(c->h, &c->info_small))          \
    X(info_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeInfo", bridge_get_info(c->h, &c->info_big))              \
    X(fwd_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_forward(NULL, c->lat, c->out, B, 0)) \
    X(fwd_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_forward(c->dead, c->lat, c->out, B, 0))  \
    X(fwd_lat_null, BRIDGE_ERR_INVALID_ARGUMENT, "latents is NULL", bridge_forward(c->h, NULL, c->out, B, 0))     \
    X(fwd_out_null, BRIDGE_ERR_INVALID_ARGUMENT, "out is NULL", bridge_forward(c->h, c->lat, NULL, B, 0))         \
    X(fwd_batch0, BRIDGE_ERR_INVALID_ARGUMENT, "batch = 0", bridge_forward(c->h, c->lat, c->out, 0, 0))           \
    X(fwd_batch_neg, BRIDGE_ERR_INVALID_ARGUMENT, "batch = -1", bridge_forward(c->h, c->lat, c->out, -1, 0))      \
    X(fwd_batch_min, BRIDGE_ERR_INVALID_ARGUMENT, "batch", bridge_forward(c->h, c->lat, c->out, INT64_MIN, 0))    \
    X(fwd_batch_big, BRIDGE_ERR_INVALID_ARGUMENT, "overflows", bridge_forward(c->h, c->lat, c->out, BIG, 0))      \
    X(fwd_dtype7, BRIDGE_ERR_INVALID_ARGUMENT, "dtype = 7", bridge_forward(c->h, c->lat, c->out, B, 7))           \
    X(fwd_dtype_neg, BRIDGE_ERR_INVALID_ARGUMENT, "dtype = -1", bridge_forward(c->h, c->lat, c->out, B, -1))      \
    X(fwd_nan, BRIDGE_ERR_NON_FINITE, "latents", bridge_forward(c->h, c->lat_nan, c->out, B, 0))                  \
    X(fwd_inf, BRIDGE_ERR_NON_FINITE, "latents", bridge_forward(c->h, c->lat_inf, c->out, B, 0))                  \
    X(cuda_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_forward_cuda_ptr(NULL, c->lat, c->out, B, 0, NULL)) \
    X(cuda_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_forward_cuda_ptr(c->dead, c->lat, c->out, B, 0, NULL)) \
    X(cuda_dtype7, BRIDGE_ERR_INVALID_ARGUMENT, "dtype = 7", bridge_forward_cuda_ptr(c->h, c->lat, c->out, B, 7, NULL))        \
    X(cuda_cpu_build, CUDA_PTR_STATUS, CUDA_PTR_WORD, bridge_forward_cuda_ptr(c->h, c->lat, c->out, B, 0, NULL))              \
    X(loss_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_loss_backward(NULL, c->pred8, c->lat, c->grad8, B, 8, 0, &c->loss, NULL)) \
    X(loss_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_loss_backward(c->dead, c->pred8, c->lat, c->grad8, B, 8, 0, &c->loss, NULL)) \
    X(loss_pred_null, BRIDGE_ERR_INVALID_ARGUMENT, "pred is NULL", bridge_loss_backward(c->h, NULL, c->lat, c->grad8, B, 8, 0, &c->loss, NULL))      \
    X(loss_lat_null, BRIDGE_ERR_INVALID_ARGUMENT, "latents is NULL", bridge_loss_backward(c->h, c->pred8, NULL, c->grad8, B, 8, 0, &c->loss, NULL))  \
    X(loss_grad_null, BRIDGE_ERR_INVALID_ARGUMENT, "grad_pred is NULL", bridge_loss_backward(c->h, c->pred8, c->lat, NULL, B, 8, 0, &c->loss, NULL)) \
    X(loss_loss_null, BRIDGE_ERR_INVALID_ARGUMENT, "loss is NULL", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, 8, 0, NULL, NULL))      \
    X(loss_batch0, BRIDGE_ERR_INVALID_ARGUMENT, "batch = 0", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, 0, 8, 0, &c->loss, NULL))        \
    X(loss_batch_neg, BRIDGE_ERR_INVALID_ARGUMENT, "batch = -1", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, -1, 8, 0, &c->loss, NULL))   \
    X(loss_batch_big, BRIDGE_ERR_INVALID_ARGUMENT, "overflows", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, BIG, 8, 0, &c->loss, NULL))   \
    X(loss_dtype7, BRIDGE_ERR_INVALID_ARGUMENT, "dtype = 7", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, 8, 7, &c->loss, NULL))        \
    X(loss_grid0, BRIDGE_ERR_INVALID_ARGUMENT, "pred_grid = 0", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, 0, 0, &c->loss, NULL))     \
    X(loss_grid_neg, BRIDGE_ERR_INVALID_ARGUMENT, "pred_grid = -4", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, -4, 0, &c->loss, NULL)) \
    X(loss_grid6, BRIDGE_ERR_INVALID_ARGUMENT, "pred_grid = 6", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, 6, 0, &c->loss, NULL))     \
    X(loss_grid_huge, BRIDGE_ERR_INVALID_ARGUMENT, "pred_grid", bridge_loss_backward(c->h, c->pred8, c->lat, c->grad8, B, 1 << 30, 0, &c->loss, NULL)) \
    X(loss_pred_nan, BRIDGE_ERR_NON_FINITE, "pred", bridge_loss_backward(c->h, c->pred8_nan, c->lat, c->grad8, B, 8, 0, &c->loss, NULL))            \
    X(loss_lat_inf, BRIDGE_ERR_NON_FINITE, "latents", bridge_loss_backward(c->h, c->pred8, c->lat_inf, c->grad8, B, 8, 0, &c->loss, NULL))          \
    X(lat_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_latent_loss_backward(NULL, c->lat, c->tgt, c->glat, B, 0, &c->loss, NULL)) \
    X(lat_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_latent_loss_backward(c->dead, c->lat, c->tgt, c->glat, B, 0, &c->loss, NULL)) \
    X(lat_lat_null, BRIDGE_ERR_INVALID_ARGUMENT, "latents is NULL", bridge_latent_loss_backward(c->h, NULL, c->tgt, c->glat, B, 0, &c->loss, NULL))    \
    X(lat_tgt_null, BRIDGE_ERR_INVALID_ARGUMENT, "target is NULL", bridge_latent_loss_backward(c->h, c->lat, NULL, c->glat, B, 0, &c->loss, NULL))     \
    X(lat_grad_null, BRIDGE_ERR_INVALID_ARGUMENT, "grad_latents is NULL", bridge_latent_loss_backward(c->h, c->lat, c->tgt, NULL, B, 0, &c->loss, NULL)) \
    X(lat_loss_null, BRIDGE_ERR_INVALID_ARGUMENT, "loss is NULL", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, B, 0, NULL, NULL))        \
    X(lat_batch0, BRIDGE_ERR_INVALID_ARGUMENT, "batch = 0", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, 0, 0, &c->loss, NULL))          \
    X(lat_batch_big, BRIDGE_ERR_INVALID_ARGUMENT, "overflows", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, BIG, 0, &c->loss, NULL))     \
    X(lat_dtype7, BRIDGE_ERR_INVALID_ARGUMENT, "dtype = 7", bridge_latent_loss_backward(c->h, c->lat, c->tgt, c->glat, B, 7, &c->loss, NULL))          \
    X(lat_nan, BRIDGE_ERR_NON_FINITE, "latents", bridge_latent_loss_backward(c->h, c->lat_nan, c->tgt, c->glat, B, 0, &c->loss, NULL))                 \
    X(lat_tgt_inf, BRIDGE_ERR_NON_FINITE, "target", bridge_latent_loss_backward(c->h, c->lat, c->tgt_inf, c->glat, B, 0, &c->loss, NULL))              \
    X(step_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_train_step(NULL, c->lat, c->tgt, B, 0, &c->stats, NULL))  \
    X(step_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_train_step(c->dead, c->lat, c->tgt, B, 0, &c->stats, NULL))   \
    X(step_lat_null, BRIDGE_ERR_INVALID_ARGUMENT, "latents is NULL", bridge_train_step(c->h, NULL, c->tgt, B, 0, &c->stats, NULL))      \
    X(step_tgt_null, BRIDGE_ERR_INVALID_ARGUMENT, "targets is NULL", bridge_train_step(c->h, c->lat, NULL, B, 0, &c->stats, NULL))      \
    X(step_stats_null, BRIDGE_ERR_INVALID_ARGUMENT, "stats is NULL", bridge_train_step(c->h, c->lat, c->tgt, B, 0, NULL, NULL))         \
    X(step_batch0, BRIDGE_ERR_INVALID_ARGUMENT, "batch = 0", bridge_train_step(c->h, c->lat, c->tgt, 0, 0, &c->stats, NULL))            \
    X(step_batch_neg, BRIDGE_ERR_INVALID_ARGUMENT, "batch = -1", bridge_train_step(c->h, c->lat, c->tgt, -1, 0, &c->stats, NULL))       \
    X(step_batch_big, BRIDGE_ERR_INVALID_ARGUMENT, "overflows", bridge_train_step(c->h, c->lat, c->tgt, BIG, 0, &c->stats, NULL))       \
    X(step_dtype7, BRIDGE_ERR_INVALID_ARGUMENT, "dtype = 7", bridge_train_step(c->h, c->lat, c->tgt, B, 7, &c->stats, NULL))            \
    X(step_stats_small, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats", bridge_train_step(c->h, c->lat, c->tgt, B, 0, &c->stats_small, NULL)) \
    X(step_stats_big, BRIDGE_ERR_ABI_MISMATCH, "BridgeStepStats", bridge_train_step(c->h, c->lat, c->tgt, B, 0, &c->stats_big, NULL))     \
    X(step_nan, SKIPPED, "", bridge_train_step(c->h, c->lat_nan, c->tgt, B, 0, &c->stats, NULL))                                        \
    X(step_inf, SKIPPED, "", bridge_train_step(c->h, c->lat, c->tgt_inf, B, 0, &c->stats, NULL))                                        \
    X(save_null_handle, BRIDGE_ERR_INVALID_ARGUMENT, "handle is NULL", bridge_save(NULL, c->missing))                 \
    X(save_dead, BRIDGE_ERR_INVALID_ARGUMENT, "not a live bridge", bridge_save(c->dead, c->missing))                  \
    X(save_null_path, BRIDGE_ERR_INVALID_ARGUMENT, "path is NULL", bridge_save(c->h, NULL))                           \
    X(save_empty_path, BRIDGE_ERR_INVALID_ARGUMENT, "empty", bridge_save(c->h, ""))                                   \
    X(save_utf8, BRIDGE_ERR_INVALID_ARGUMENT, "UTF-8", bridge_save(c->h, BAD_UTF8))                                   \
    X(save_dir, BRIDGE_ERR_IO, "directory", bridge_save(c->h, c->dir))                                                \
    X(save_missing_dir, BRIDGE_ERR_IO, "no-such-dir", bridge_save(c->h, c->missing))                                  \
    X(save_notdir, BRIDGE_ERR_IO, "passwd", bridge_save(c->h, c->notdir))

/* A non-finite train step is not an error: OK with stats.skipped = 1, nothing updated. */
#define SKIPPED (-1)
#ifdef DINO_BRIDGE_CUDA_BUILD
#define CUDA_PTR_STATUS BRIDGE_ERR_INVALID_ARGUMENT
#define CUDA_PTR_WORD "CPU"
#else
#define CUDA_PTR_STATUS BRIDGE_ERR_UNSUPPORTED
#define CUDA_PTR_WORD "without CUDA"
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

static float *read_npy(const char *dir, const char *name, size_t want) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char pre[10];
    if (fread(pre, 1, 10, f) != 10) { fclose(f); return NULL; }
    fseek(f, 10 + (pre[8] | (pre[9] << 8)), SEEK_SET);
    float *v = malloc(want * sizeof(float));
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

    c->params.struct_size = sizeof c->params;
    if (bridge_params_default(&c->params) != BRIDGE_OK) return 1;
    c->params.checkpoint_path = ckpt;
    c->params.warmup_steps = 0;
    c->p_small = c->p_big = c->p_dir = c->p_missing = c->p_utf8 = c->p_notdir = c->p_empty =
        c->p_heads = c->p_cuda = c->p_device = c->p_dtype = c->params;
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
    c->p_cuda.device = 0;
    c->p_device.device = -5;
    c->p_dtype.compute_dtype = 9;
    if (bridge_create(&c->params, &c->h) != BRIDGE_OK || bridge_create(&c->params, &c->dead) != BRIDGE_OK) {
        fprintf(stderr, "create failed: %s\n", bridge_last_error());
        return 1;
    }
    bridge_destroy(c->dead);

    c->lat = read_npy(fx, "latents.npy", LAT);
    c->tgt = read_npy(fx, "target.npy", TOK);
    c->pred8 = read_npy(fx, "pred_grid8.npy", TOK8);
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
    if (bridge_forward(c->h, c->lat, baseline, B, 0) != BRIDGE_OK) return 1;
    int failures = 0, n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++) {
        const Case *k = &cases[i];
        c->made = NULL;
        memset(c->out, 0x7f, TOK * sizeof(float));
        int32_t got = k->call(c);
        const char *msg = bridge_last_error();
        int ok;
        if (k->want == SKIPPED) {
            ok = got == BRIDGE_OK && c->stats.skipped == 1;
        } else {
            ok = got == k->want && msg && strstr(msg, k->word) != NULL && c->made == NULL;
            /* an error writes no output */
            unsigned char *o = (unsigned char *)c->out;
            for (size_t j = 0; j < TOK * sizeof(float); j++) ok &= o[j] == 0x7f;
        }
        /* the handle still works, with the weights it had */
        BridgeInfo info;
        info.struct_size = sizeof info;
        int usable = bridge_forward(c->h, c->lat, now, B, 0) == BRIDGE_OK &&
                     memcmp(now, baseline, TOK * sizeof(float)) == 0 &&
                     bridge_get_info(c->h, &info) == BRIDGE_OK && info.step == 0;
        if (!ok || !usable) {
            failures++;
            fprintf(stderr, "FAIL %-20s status %d (want %d), message '%s' (want '%s')%s\n", k->name, got,
                    k->want, msg ? msg : "(null)", k->word, usable ? "" : ", handle changed or unusable");
        } else {
            printf("ok   %-20s %d: %s\n", k->name, got, got == BRIDGE_OK ? "skipped" : msg);
        }
        if (c->made) bridge_destroy(c->made);
    }
    bridge_destroy(c->h);
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
