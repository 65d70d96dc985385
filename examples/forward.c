/* Load a bridge and predict DINOv2 tokens for a batch of latents.
 *
 *   cargo build --release
 *   gcc -Iinclude examples/forward.c -Ltarget/release -ldino_bridge -Wl,-rpath,target/release -o forward
 *   ./forward model.safetensors        (no argument: fresh weights, default config) */
#include "dino_bridge.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (bridge_abi_version() != BRIDGE_ABI_VERSION) {
        fprintf(stderr, "libdino_bridge has ABI %u, dino_bridge.h %d\n", bridge_abi_version(), BRIDGE_ABI_VERSION);
        return 1;
    }
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

    /* Any latent sides that are multiples of 2^adapter_depth; here the stored size. */
    const int64_t batch = 2;
    const int32_t height = info.latent_size, width = info.latent_size;
    const int32_t tokens = (height >> info.adapter_depth) * (width >> info.adapter_depth);
    size_t n_in = (size_t)batch * info.in_ch * height * width;
    size_t n_out = (size_t)batch * tokens * info.target_dim;
    float *latents = calloc(n_in, sizeof(float)), *out = malloc(n_out * sizeof(float));
    for (size_t i = 0; i < n_in; i++) latents[i] = (float)((i * 7919) % 1000) / 500.0f - 1.0f;

    int32_t status = bridge_forward(bridge, latents, out, batch, height, width, BRIDGE_DTYPE_F32);
    if (status != BRIDGE_OK) {
        fprintf(stderr, "bridge_forward (%d): %s\n", status, bridge_last_error());
    } else {
        printf("tokens [%lld, %d, %d], first values %.4f %.4f %.4f\n", (long long)batch, tokens,
               info.target_dim, out[0], out[1], out[2]);
    }
    free(latents);
    free(out);
    bridge_destroy(bridge);
    return status == BRIDGE_OK ? 0 : 1;
}
