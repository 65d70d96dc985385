/* Load a bridge and predict DINOv2 tokens for a batch of latents.
 *
 *   cargo build --release
 *   gcc -Iinclude examples/forward.c -Ltarget/release -ldino_bridge -Wl,-rpath,target/release -o forward
 *   ./forward model.safetensors        (no argument: fresh weights, default config) */
#include "dino_bridge.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    BridgeParams params;
    params.struct_size = sizeof params;
    bridge_params_default(&params);
    params.checkpoint_path = argc > 1 ? argv[1] : NULL;

    BridgeHandle *bridge = NULL;
    if (bridge_create(&params, &bridge) != BRIDGE_OK) {
        fprintf(stderr, "bridge_create: %s\n", bridge_last_error());
        return 1;
    }
    BridgeInfo info;
    info.struct_size = sizeof info;
    bridge_get_info(bridge, &info);

    const int64_t batch = 2;
    size_t n_in = (size_t)batch * info.in_ch * info.latent_size * info.latent_size;
    size_t n_out = (size_t)batch * info.tokens * info.target_dim;
    float *latents = calloc(n_in, sizeof(float)), *tokens = malloc(n_out * sizeof(float));
    for (size_t i = 0; i < n_in; i++) latents[i] = (float)((i * 7919) % 1000) / 500.0f - 1.0f;

    int32_t status = bridge_forward(bridge, latents, tokens, batch, BRIDGE_DTYPE_F32);
    if (status != BRIDGE_OK) {
        fprintf(stderr, "bridge_forward (%d): %s\n", status, bridge_last_error());
    } else {
        printf("tokens [%lld, %d, %d], first values %.4f %.4f %.4f\n", (long long)batch, info.tokens,
               info.target_dim, tokens[0], tokens[1], tokens[2]);
    }
    free(latents);
    free(tokens);
    bridge_destroy(bridge);
    return status == BRIDGE_OK ? 0 : 1;
}
