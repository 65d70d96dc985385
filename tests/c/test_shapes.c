/* One bridge, any latent size, through the C API only: every value of
 * shared/fixtures/shapes (PyTorch, float64, stored as float32) within the tolerances of
 * shared/fixtures/README.md. The bridge there has adapter_depth 1 (token grid = latent
 * sides / 2) and a 4x4 stored grid. tests/shapes.rs checks the same through Rust, plus the
 * parameter gradients, which the C API does not expose.
 *
 * - outputs at 8x8 (the stored grid), 12x20 (pos_embed upsampled) and 4x6 latents
 * - bridge_loss_backward on latents_rect (bridge grid 6x10) from caller grids 12x20
 *   (pred pooled), 3x5 (target pooled) and 6x10, with REPA weights, the defaults, and
 *   the defaults + w_gram 0.5 + spatial_norm_gamma 0.6
 * - bridge_latent_loss_backward on latents_rect / target_rect, defaults + w_gram 0.5
 *   (spatial_norm_gamma never applies to it), and the loss bridge_train_step reports
 *
 * usage: test_shapes SHAPES_FIXTURE_DIR   (expected losses are read from its expected.json) */
#include "dino_bridge.h"
#include "testing.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *dir;

/* DIR/name (see `npy_read`). */
static Npy npy(const char *name) { return npy_read(dir, name); }

/* ---- the few keys of expected.json ---- */

static char *json;

static const char *json_value(const char *key) {
    char quoted[128];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *at = json ? strstr(json, quoted) : NULL;
    if (!at || !(at = strchr(at + strlen(quoted), ':'))) {
        fprintf(stderr, "expected.json has no %s\n", key);
        failures++;
        return NULL;
    }
    return at + 1;
}

static double expect_num(const char *key) {
    const char *v = json_value(key);
    return v ? strtod(v, NULL) : NAN;
}

/* A token grid [h, w]. */
static void expect_grid(const char *key, long *h, long *w) {
    const char *v = json_value(key);
    *h = *w = -1;
    if (!v || !(v = strchr(v, '['))) return;
    char *end;
    *h = strtol(v + 1, &end, 10);
    if ((v = strchr(end, ','))) *w = strtol(v + 1, NULL, 10);
}

/* ---- comparisons ---- */

/* max |got - want| <= 1e-4 * max |want|, same element count */
static void check_close(const char *what, const float *got, const Npy *want) {
    float scale = 0, err = 0;
    for (size_t i = 0; i < want->n; i++) {
        scale = fmaxf(scale, fabsf(want->data[i]));
        err = fmaxf(err, fabsf(got[i] - want->data[i]));
    }
    CHECK(want->n > 0 && err <= 1e-4f * scale, "%s: max error %g > 1e-4 * %g", what, err, scale);
}

static void check_loss(const char *key, float got) {
    double want = expect_num(key);
    CHECK(fabs(got - want) <= 1e-5, "%s: %.8f, want %.8f", key, got, want);
}

/* ---- bridges ---- */

typedef enum { DEFAULTS, REPA, GRAM } Weights;

static BridgeHandle *open_bridge(Weights weights, float gamma) {
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    BridgeParams p;
    p.struct_size = sizeof p;
    EXPECT_OK(bridge_params_default(&p));
    p.checkpoint_path = path;
    /* Alignment (and the latent loss) with the fixture case's weights: REPA's loss, which
     * is alignment's default, or the composite loss (training's default), plus w_gram for
     * both alignment and training (a train step reports the same loss). */
    if (weights != REPA) {
        p.align_w_cos = p.w_cos;
        p.align_w_norm = p.w_norm;
        p.align_w_raw = p.w_raw;
    }
    if (weights == GRAM) p.w_gram = p.align_w_gram = (float)expect_num("w_gram");
    p.spatial_norm_gamma = gamma;
    BridgeHandle *h = NULL;
    EXPECT_OK(bridge_create(&p, &h));
    if (!h) exit(1);
    return h;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SHAPES_FIXTURE_DIR\n", argv[0]);
        return 2;
    }
    dir = argv[1];
    CHECK(bridge_abi_version() == BRIDGE_ABI_VERSION, "library ABI %u, header %d", bridge_abi_version(),
          BRIDGE_ABI_VERSION);
    char path[4096];
    snprintf(path, sizeof path, "%s/expected.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "no %s\n", path);
        return 1;
    }
    json = calloc(1 << 16, 1);
    size_t json_len = fread(json, 1, (1 << 16) - 1, f);
    fclose(f);
    CHECK(json_len > 0, "empty expected.json");
    const float gamma = (float)expect_num("spatial_norm_gamma");
    CHECK(gamma == 0.6f && expect_num("w_gram") == 0.5, "fixture settings: gamma %g", gamma);

    BridgeHandle *plain = open_bridge(DEFAULTS, 0.0f);
    BridgeInfo info;
    info.struct_size = sizeof info;
    EXPECT_OK(bridge_get_info(plain, &info));
    CHECK(info.adapter_depth == 1 && info.grid == 4 && info.latent_size == 8 && info.target_dim == 48,
          "info: adapter_depth %d grid %d latent_size %d", info.adapter_depth, info.grid, info.latent_size);
    const int32_t dim = info.target_dim;

    /* outputs at three latent sizes: the stored grid, upsampled and downsampled positions */
    const char *sizes[] = {"base", "rect", "small"};
    for (int i = 0; i < 3; i++) {
        char name[64], key[64];
        snprintf(name, sizeof name, "latents_%s.npy", sizes[i]);
        Npy lat = npy(name);
        snprintf(name, sizeof name, "out_%s.npy", sizes[i]);
        Npy want = npy(name);
        snprintf(key, sizeof key, "grid_%s", sizes[i]);
        long gh, gw;
        expect_grid(key, &gh, &gw);
        if (lat.ndim != 4 || want.ndim != 3) {
            CHECK(0, "%s: latents or outputs of the wrong rank", sizes[i]);
            free(lat.data);
            free(want.data);
            continue;
        }
        const int64_t batch = (int64_t)lat.shape[0];
        const int32_t height = (int32_t)lat.shape[2], width = (int32_t)lat.shape[3];
        /* the token grid rule: (height, width) / 2^adapter_depth */
        CHECK((height >> info.adapter_depth) == gh && (width >> info.adapter_depth) == gw,
              "%s: %dx%d latents, expected grid %ldx%ld", sizes[i], height, width, gh, gw);
        CHECK(want.shape[0] == (size_t)batch && want.shape[1] == (size_t)(gh * gw) && want.shape[2] == (size_t)dim,
              "%s: out shape", sizes[i]);
        float *out = malloc(want.n * sizeof(float));
        EXPECT_OK(bridge_forward(plain, lat.data, out, batch, height, width, BRIDGE_DTYPE_F32));
        snprintf(name, sizeof name, "out_%s", sizes[i]);
        check_close(name, out, &want);
        free(out);
        free(lat.data);
        free(want.data);
    }

    /* REPA alignment on latents_rect (bridge grid 6x10) from three caller grids */
    Npy lat = npy("latents_rect.npy"), target = npy("target_rect.npy");
    if (lat.ndim != 4) return 1;
    const int64_t batch = (int64_t)lat.shape[0];
    const int32_t height = (int32_t)lat.shape[2], width = (int32_t)lat.shape[3];
    BridgeHandle *repa = open_bridge(REPA, 0.0f), *normed = open_bridge(GRAM, gamma);
    const struct {
        const char *pred;
        int32_t ph, pw;
        BridgeHandle *bridge;
        const char *loss_key, *grad_key;
    } cases[] = {
        {"pred_fine", 12, 20, repa, "loss_fine_repa", "grad_pred_fine_repa"},
        {"pred_fine", 12, 20, plain, "loss_fine_default", "grad_pred_fine_default"},
        {"pred_coarse", 3, 5, repa, "loss_coarse_repa", "grad_pred_coarse_repa"},
        {"pred_same", 6, 10, normed, "loss_same_spatialnorm0.6_gram0.5", "grad_pred_same_spatialnorm0.6_gram0.5"},
        {"pred_fine", 12, 20, normed, "loss_fine_spatialnorm0.6_gram0.5", "grad_pred_fine_spatialnorm0.6_gram0.5"},
        {"pred_coarse", 3, 5, normed, "loss_coarse_spatialnorm0.6_gram0.5",
         "grad_pred_coarse_spatialnorm0.6_gram0.5"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[128];
        snprintf(name, sizeof name, "%s.npy", cases[i].pred);
        Npy pred = npy(name);
        snprintf(name, sizeof name, "%s.npy", cases[i].grad_key);
        Npy want = npy(name);
        CHECK(pred.ndim == 3 && pred.shape[1] == (size_t)(cases[i].ph * cases[i].pw) && want.n == pred.n,
              "%s: shapes", cases[i].grad_key);
        if (pred.n != want.n) continue;
        float loss = NAN, *grad = malloc(pred.n * sizeof(float));
        EXPECT_OK(bridge_loss_backward(cases[i].bridge, pred.data, lat.data, grad, batch, height, width,
                                       cases[i].ph, cases[i].pw, BRIDGE_DTYPE_F32, &loss, NULL));
        check_loss(cases[i].loss_key, loss);
        check_close(cases[i].grad_key, grad, &want);
        free(grad);
        free(pred.data);
        free(want.data);
    }

    /* the gradient to the latents through the resized position embedding, w_gram 0.5;
     * spatial_norm_gamma does not change it */
    Npy want_glat = npy("grad_latents_rect.npy");
    BridgeHandle *gram = open_bridge(GRAM, 0.0f);
    BridgeHandle *latent_bridges[] = {gram, normed};
    float *glat = malloc(lat.n * sizeof(float));
    for (int i = 0; i < 2; i++) {
        float loss = NAN;
        EXPECT_OK(bridge_latent_loss_backward(latent_bridges[i], lat.data, target.data, glat, batch, height, width,
                                              BRIDGE_DTYPE_F32, &loss, NULL));
        check_loss("loss_rect_train_gram0.5", loss);
        check_close("grad_latents_rect", glat, &want_glat);
    }
    /* a train step reports the same loss (dropout 0), before its update */
    BridgeStepStats stats;
    stats.struct_size = sizeof stats;
    EXPECT_OK(bridge_train_step(normed, lat.data, target.data, batch, height, width, BRIDGE_DTYPE_F32, &stats, NULL));
    CHECK(stats.step == 1 && !stats.skipped, "train step: step %lld skipped %d", (long long)stats.step, stats.skipped);
    check_loss("loss_rect_train_gram0.5", stats.loss);

    free(glat);
    free(want_glat.data);
    free(lat.data);
    free(target.data);
    free(json);
    EXPECT_OK(bridge_destroy(plain));
    EXPECT_OK(bridge_destroy(repa));
    EXPECT_OK(bridge_destroy(normed));
    EXPECT_OK(bridge_destroy(gram));
    if (failures) {
        fprintf(stderr, "%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("shapes through the C API: all %d checks passed\n", checks);
    return 0;
}
