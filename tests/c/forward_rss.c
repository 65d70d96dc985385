/* Resident memory over many calls: 10,000 forward calls of one sample through the C API,
 * printing this process's RSS after the first 1,000 (allocator caches warm) and after all
 * of them. A program of its own, because RSS is per process (tests/it/memory.rs runs it
 * and compares the two).
 *
 * usage: forward_rss FIXTURE_DIR */
#include "dino_bridge.h"
#include "testing.h"

/* VmRSS of this process in KiB, or -1. */
static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kib) == 1) break;
    if (f) fclose(f);
    return kib;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    char ckpt[4096];
    snprintf(ckpt, sizeof ckpt, "%s/model.safetensors", argv[1]);
    BridgeParams p;
    p.struct_size = sizeof p;
    EXPECT_OK(bridge_params_default(&p));
    p.checkpoint_path = ckpt;
    BridgeHandle *h = NULL;
    EXPECT_OK(bridge_create(&p, &h));
    Npy lat = npy_read(argv[1], "latents.npy"); /* [3, 4, 16, 16]: the first sample is used */
    if (failures || !h || lat.n < 4 * 16 * 16) return 1;
    float out[16 * 48];
    long warm = 0;
    for (int i = 1; i <= 10000 && !failures; i++) {
        EXPECT_OK(bridge_forward(h, lat.data, out, 1, 16, 16, BRIDGE_DTYPE_F32));
        if (i == 1000) warm = rss_kib();
    }
    printf("rss after 1000 calls: %ld KiB\nrss after 10000 calls: %ld KiB\n", warm, rss_kib());
    EXPECT_OK(bridge_destroy(h));
    free(lat.data);
    return failures ? 1 : 0;
}
