// Data-parallel training of a bridge by a C++ trainer's own loop: two handles on two
// threads (the two "ranks"), each computing the training loss's gradient on its half of
// the batch (bridge_loss_grads_dlpack), the gradients averaged by hand (where a GPU trainer
// calls ncclAllReduce), and each handle stepping its own AdamW with the average
// (bridge_apply_grads_dlpack). The ranks stay identical, and equal one handle trained on
// the whole batch with bridge_train_step: the loss is a mean over samples, so the mean of
// the halves' gradients is the whole batch's (with dropout 0: each rank would otherwise
// draw its own masks from its seed).
//
//   cargo build --release
//   g++ -std=c++17 -O2 -Iinclude -Ibindings/cpp examples/data_parallel.cpp -Ltarget/release
//       -ldino_bridge -Wl,-rpath,target/release -pthread -o data_parallel
//   ./data_parallel bridge.safetensors [steps]
#include "dino_bridge.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s CHECKPOINT [steps]\n", argv[0]);
        return 2;
    }
    const int steps = argc > 2 ? std::atoi(argv[2]) : 5;
    try {
        dino_bridge::Params params;  // the library's AdamW, warmup and clipping
        params.raw.warmup_steps = 2;
        dino_bridge::Bridge ranks[2] = {dino_bridge::Bridge::open(argv[1], params),
                                        dino_bridge::Bridge::open(argv[1], params)};
        dino_bridge::Bridge whole = dino_bridge::Bridge::open(argv[1], params);
        const BridgeInfo info = whole.info();
        if (info.dropout != 0.0f) {
            std::fprintf(stderr, "this example compares ranks with one process: it needs dropout 0\n");
            return 2;
        }
        const int64_t half = 2, batch = 2 * half, side = info.latent_size;
        const int64_t tokens = info.tokens, dim = info.target_dim, n = whole.param_count();
        const std::size_t lat_half = static_cast<std::size_t>(half * info.in_ch * side * side);
        const std::size_t tok_half = static_cast<std::size_t>(half * tokens * dim);
        std::mt19937 rng(7);
        std::normal_distribution<float> normal(0.0f, 1.0f);

        for (int step = 0; step < steps; ++step) {
            std::vector<float> latents(2 * lat_half), targets(2 * tok_half);
            for (auto& v : latents) v = normal(rng);
            for (auto& v : targets) v = normal(rng);
            // Each rank: the gradient of its half (one thread per rank, as one process per GPU).
            std::vector<float> grads[2] = {std::vector<float>(n), std::vector<float>(n)};
            float losses[2] = {0, 0};
            std::thread workers[2];
            for (int r = 0; r < 2; ++r) {
                workers[r] = std::thread([&, r] {
                    dino_bridge::Tensor x(latents.data() + r * lat_half, {half, info.in_ch, side, side});
                    dino_bridge::Tensor t(targets.data() + r * tok_half, {half, tokens, dim});
                    dino_bridge::Tensor g(grads[r], {n});
                    dino_bridge::Tensor loss(&losses[r], {1});
                    ranks[r].loss_grads(x, t, g, nullptr, loss, /*seed=*/1000 * step + r);
                });
            }
            for (auto& w : workers) w.join();
            // The all-reduce: the mean of the ranks' gradients, which every rank applies.
            std::vector<float> mean(n);
            for (int64_t i = 0; i < n; ++i) mean[i] = 0.5f * (grads[0][i] + grads[1][i]);
            BridgeStepStats s0 = ranks[0].apply_grads(mean);
            ranks[1].apply_grads(mean);
            BridgeStepStats ref = whole.train_step(dino_bridge::Tensor(latents, {batch, info.in_ch, side, side}),
                                                   dino_bridge::Tensor(targets, {batch, tokens, dim}));
            std::printf("step %d: loss %.6f (ranks %.6f, %.6f), grad norm %.6f vs %.6f\n", step + 1,
                        0.5 * (losses[0] + losses[1]), losses[0], losses[1], s0.grad_norm, ref.grad_norm);
        }
        // The ranks hold the same weights, bit for bit; one handle on the whole batch
        // computes the same function (its weights differ only in float rounding).
        const std::vector<float> w0 = ranks[0].get_params(), w1 = ranks[1].get_params();
        const bool same = w0 == w1;
        std::vector<float> probe(static_cast<std::size_t>(info.in_ch * side * side));
        for (auto& v : probe) v = normal(rng);
        std::vector<float> a(static_cast<std::size_t>(tokens * dim)), b(a.size());
        ranks[0].forward(probe, a, 1);
        whole.forward(probe, b, 1);
        float diff = 0, scale = 0;
        for (std::size_t i = 0; i < a.size(); ++i) {
            diff = std::max(diff, std::fabs(a[i] - b[i]));
            scale = std::max(scale, std::fabs(b[i]));
        }
        std::printf("ranks identical: %s; tokens vs one process on the whole batch: max difference %.3g of %.3g\n",
                    same ? "yes" : "no", diff, scale);
        return same && diff <= 1e-4f * scale ? 0 : 1;
    } catch (const dino_bridge::Error& e) {
        std::fprintf(stderr, "dino-bridge error: %s\n", e.what());
        return 1;
    }
}
