/* Trains and saves to one path in a loop, printing each completed save, until killed.
 * tests/it/c_api.rs kills it inside its saves (at the fsync and rename it chose, through
 * tests/c/pause_at.c) and checks the file.
 *
 * usage: save_loop FIXTURE_DIR PATH */
#include "dino_bridge.h"

#include <stdio.h>
#include <stdlib.h>

/* the fixture bridge: 16x16 latents, a 4x4 token grid */
enum { B = 3, S = 16, LAT = 3 * 4 * S * S, TOK = 3 * 16 * 48 };

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    char ckpt[4096];
    snprintf(ckpt, sizeof ckpt, "%s/model.safetensors", argv[1]);
    BridgeParams p;
    p.struct_size = sizeof p;
    bridge_params_default(&p);
    p.checkpoint_path = ckpt;
    BridgeHandle *h = NULL;
    if (bridge_create(&p, &h) != BRIDGE_OK) {
        fprintf(stderr, "%s\n", bridge_last_error());
        return 1;
    }
    float *lat = calloc(LAT, sizeof(float)), *tgt = calloc(TOK, sizeof(float));
    for (int i = 0; i < LAT; i++) lat[i] = (float)((i * 7919) % 200) / 100.0f - 1.0f;
    for (int i = 0; i < TOK; i++) tgt[i] = (float)((i * 104729) % 300) / 150.0f - 1.0f;
    BridgeStepStats s;
    for (;;) {
        s.struct_size = sizeof s;
        if (bridge_train_step(h, lat, tgt, B, S, S, BRIDGE_DTYPE_F32, &s, NULL) != BRIDGE_OK ||
            bridge_save(h, argv[2]) != BRIDGE_OK) {
            fprintf(stderr, "%s\n", bridge_last_error());
            return 1;
        }
        printf("saved %lld\n", (long long)s.step);
        fflush(stdout);
    }
}
