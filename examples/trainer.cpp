// A C++ training loop using the bridge as its alignment loss: a linear projector maps the
// trainer's own hidden tokens (here: a fixed random feature map of the latents on a 2x
// finer grid) to DINOv2 space, and plain SGD on the bridge's gradient aligns it. The
// latents are wider than the size the bridge was trained at (3:2): the same weights run on
// any sides that are multiples of 2^adapter_depth.
//
//   cargo build --release
//   g++ -std=c++17 -O2 -Iinclude -Ibindings/cpp examples/trainer.cpp -Ltarget/release
//       -ldino_bridge -Wl,-rpath,target/release -o trainer
//   ./trainer bridge.safetensors [steps]
#include "dino_bridge.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s CHECKPOINT [steps]\n", argv[0]);
        return 2;
    }
    const int steps = argc > 2 ? std::atoi(argv[2]) : 40;
    try {
        // The library's messages (which BLAS the CPU path uses, fallbacks, skipped steps).
        dino_bridge::set_log_callback([](int32_t level, const char* message, void*) {
            if (level >= BRIDGE_LOG_INFO) std::fprintf(stderr, "[dino-bridge] %s\n", message);
        });
        auto bridge = dino_bridge::Bridge::open(argv[1]);
        const BridgeInfo info = bridge.info();
        const int64_t batch = 4;
        const int32_t m = 1 << info.adapter_depth;
        const int32_t height = info.latent_size, width = (3 * info.latent_size / 2) / m * m;
        const dino_bridge::Grid bridge_grid = bridge.token_grid(height, width);
        // The trainer's own token grid, twice as fine: the bridge pools it 2x2 to its own.
        const int gh = 2 * bridge_grid.h, gw = 2 * bridge_grid.w;
        const int tokens = gh * gw, dim = info.target_dim, hidden = 32;

        std::mt19937 rng(0);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> latents(bridge.latent_elems(batch, height, width));
        for (auto& v : latents) v = normal(rng);
        // Hidden tokens: each caller token sees the latent pixels under it through a fixed
        // random map (a stand-in for a diffusion model's features).
        std::vector<float> feats(static_cast<std::size_t>(batch) * tokens * hidden);
        const int cell = height / gh, ch = info.in_ch;
        const int patch = ch * cell * cell;
        std::vector<float> mix(static_cast<std::size_t>(patch) * hidden);
        for (auto& v : mix) v = normal(rng) / static_cast<float>(patch);
        for (int64_t b = 0; b < batch; ++b)
            for (int t = 0; t < tokens; ++t)
                for (int h = 0; h < hidden; ++h) {
                    float acc = 0;
                    for (int c = 0; c < ch; ++c)
                        for (int dy = 0; dy < cell; ++dy)
                            for (int dx = 0; dx < cell; ++dx) {
                                int y = (t / gw) * cell + dy, x = (t % gw) * cell + dx;
                                float k = mix[((c * cell + dy) * cell + dx) * hidden + h];
                                acc += k * latents[((b * ch + c) * height + y) * width + x];
                            }
                    feats[(b * tokens + t) * hidden + h] = std::tanh(4.0f * acc);
                }

        std::vector<float> W(static_cast<std::size_t>(hidden) * dim, 0.0f);
        for (auto& v : W) v = 0.01f * normal(rng);
        std::vector<float> pred(bridge.token_elems(batch, gh, gw)), grad(pred.size());
        const float lr = 20.0f;
        for (int step = 0; step < steps; ++step) {
            for (int64_t r = 0; r < batch * tokens; ++r)
                for (int d = 0; d < dim; ++d) {
                    float acc = 0;
                    for (int h = 0; h < hidden; ++h) acc += feats[r * hidden + h] * W[h * dim + d];
                    pred[r * dim + d] = acc;
                }
            float loss = bridge.loss_backward(pred, latents, grad, batch, height, width, gh, gw);
            for (int h = 0; h < hidden; ++h)  // dL/dW = feats^T grad, then SGD
                for (int d = 0; d < dim; ++d) {
                    float g = 0;
                    for (int64_t r = 0; r < batch * tokens; ++r) g += feats[r * hidden + h] * grad[r * dim + d];
                    W[h * dim + d] -= lr * g;
                }
            if (step % 10 == 0 || step == steps - 1) std::printf("step %3d  alignment loss %.4f\n", step, loss);
        }
    } catch (const dino_bridge::Error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    dino_bridge::set_log_callback(nullptr);
    return 0;
}
